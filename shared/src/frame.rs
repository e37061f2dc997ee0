//! One camera frame: RGB, optional depth with its unit, optional intrinsics, time and sequence.
//!
//! On disk a frame is the PNG pair of the dataset format (DESIGN.md): `STEM.png` (8-bit RGB;
//! `.jpg` and grayscale are accepted on read) and `STEM.depth.png` (16-bit single channel,
//! `value * depth_unit_mm` = distance from the camera in mm, 0 = no depth at that pixel).

use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ColorType, DynamicImage, ImageBuffer, ImageEncoder, Luma, RgbImage};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fsutil::write_atomic;

/// 16-bit depth image; 0 means "no depth at this pixel".
pub type DepthImage = ImageBuffer<Luma<u16>, Vec<u16>>;

/// Suffix that turns a frame's stem into its depth file name (`STEM.depth.png`).
pub const DEPTH_SUFFIX: &str = ".depth.png";

/// Pinhole camera intrinsics in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intrinsics {
    /// Focal length along x, in pixels.
    pub fx: f64,
    /// Focal length along y, in pixels.
    pub fy: f64,
    /// Principal point x, in pixels from the left edge.
    pub cx: f64,
    /// Principal point y, in pixels from the top edge.
    pub cy: f64,
}

impl Intrinsics {
    /// Every problem with these values, each naming the key (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, v) in [("fx", self.fx), ("fy", self.fy)] {
            if !(v.is_finite() && v > 0.0) {
                out.push(format!(
                    "intrinsics.{name} must be a positive number of pixels, got {v}"
                ));
            }
        }
        for (name, v) in [("cx", self.cx), ("cy", self.cy)] {
            if !v.is_finite() {
                out.push(format!(
                    "intrinsics.{name} must be a finite number of pixels, got {v}"
                ));
            }
        }
        out
    }

    /// The intrinsics of the same camera after the image is resized by `sx` and `sy`.
    pub fn scaled(&self, sx: f64, sy: f64) -> Intrinsics {
        Intrinsics {
            fx: self.fx * sx,
            fy: self.fy * sy,
            cx: self.cx * sx,
            cy: self.cy * sy,
        }
    }
}

/// Depth values and the unit that turns them into millimetres.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthMap {
    /// Raw sensor values; 0 = no depth.
    pub values: DepthImage,
    /// Millimetres per raw unit (e.g. 0.05).
    pub unit_mm: f32,
}

impl DepthMap {
    /// Distance from the camera in mm at (x, y), `None` where the sensor gave no depth or the
    /// pixel is outside the image.
    pub fn mm_at(&self, x: u32, y: u32) -> Option<f32> {
        if x >= self.values.width() || y >= self.values.height() {
            return None;
        }
        match self.values.get_pixel(x, y).0[0] {
            0 => None,
            v => Some(f32::from(v) * self.unit_mm),
        }
    }
}

/// What went wrong with a frame, naming the file where there is one.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: not a readable image: {source}", path.display())]
    Decode {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("{}: depth must be a 16-bit single-channel PNG, found {found}", path.display())]
    DepthNotU16 { path: PathBuf, found: String },
    #[error(
        "{}: depth is {}x{} but the RGB image {} is {}x{}; they must be the same size",
        depth_path.display(), depth_size.0, depth_size.1, rgb_path.display(), rgb_size.0, rgb_size.1
    )]
    SizeMismatchFiles {
        rgb_path: PathBuf,
        depth_path: PathBuf,
        rgb_size: (u32, u32),
        depth_size: (u32, u32),
    },
    #[error("depth is {}x{} but RGB is {}x{}; they must be the same size", depth.0, depth.1, rgb.0, rgb.1)]
    SizeMismatch { rgb: (u32, u32), depth: (u32, u32) },
    #[error("{what} image is empty ({width}x{height})")]
    Empty {
        what: &'static str,
        width: u32,
        height: u32,
    },
    #[error("depth unit must be a positive number of mm, got {0}")]
    BadDepthUnit(f32),
    #[error("{}: cannot encode PNG: {source}", path.display())]
    Encode {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// One frame from a camera or a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    rgb: RgbImage,
    depth: Option<DepthMap>,
    /// Camera intrinsics, when known; needed for measurements in mm.
    pub intrinsics: Option<Intrinsics>,
    /// When the frame was captured (or, for files, last modified).
    pub ts: DateTime<Utc>,
    /// Sequence number from the source; 0 when the source has none.
    pub seq: u64,
}

impl Frame {
    /// A frame from an RGB image and optional depth of the same size.
    pub fn new(rgb: RgbImage, depth: Option<DepthMap>) -> Result<Frame, FrameError> {
        let (w, h) = rgb.dimensions();
        if w == 0 || h == 0 {
            return Err(FrameError::Empty {
                what: "RGB",
                width: w,
                height: h,
            });
        }
        if let Some(d) = &depth {
            if d.values.dimensions() != (w, h) {
                return Err(FrameError::SizeMismatch {
                    rgb: (w, h),
                    depth: d.values.dimensions(),
                });
            }
            if !(d.unit_mm.is_finite() && d.unit_mm > 0.0) {
                return Err(FrameError::BadDepthUnit(d.unit_mm));
            }
        }
        Ok(Frame {
            rgb,
            depth,
            intrinsics: None,
            ts: Utc::now(),
            seq: 0,
        })
    }

    /// Sets the intrinsics (builder style).
    pub fn with_intrinsics(mut self, intrinsics: Option<Intrinsics>) -> Frame {
        self.intrinsics = intrinsics;
        self
    }

    /// Sets timestamp and sequence number (builder style).
    pub fn with_time(mut self, ts: DateTime<Utc>, seq: u64) -> Frame {
        self.ts = ts;
        self.seq = seq;
        self
    }

    pub fn rgb(&self) -> &RgbImage {
        &self.rgb
    }

    pub fn depth(&self) -> Option<&DepthMap> {
        self.depth.as_ref()
    }

    pub fn width(&self) -> u32 {
        self.rgb.width()
    }

    pub fn height(&self) -> u32 {
        self.rgb.height()
    }

    /// Reads a frame from its RGB file and, if given, its 16-bit depth PNG.
    ///
    /// The RGB file may be PNG or JPEG, colour or grayscale (converted to RGB). The timestamp is
    /// the RGB file's modification time.
    pub fn load(
        rgb_path: &Path,
        depth_path: Option<&Path>,
        depth_unit_mm: f32,
    ) -> Result<Frame, FrameError> {
        let rgb = load_rgb(rgb_path)?;
        let depth = match depth_path {
            Some(p) => {
                let values = load_depth(p)?;
                if values.dimensions() != rgb.dimensions() {
                    return Err(FrameError::SizeMismatchFiles {
                        rgb_path: rgb_path.to_path_buf(),
                        depth_path: p.to_path_buf(),
                        rgb_size: rgb.dimensions(),
                        depth_size: values.dimensions(),
                    });
                }
                Some(DepthMap {
                    values,
                    unit_mm: depth_unit_mm,
                })
            }
            None => None,
        };
        let ts = std::fs::metadata(rgb_path)
            .and_then(|m| m.modified())
            .map(DateTime::<Utc>::from)
            .unwrap_or_else(|_| Utc::now());
        let frame = Frame::new(rgb, depth).map_err(|e| match e {
            FrameError::Empty {
                what,
                width,
                height,
            } => FrameError::Decode {
                path: rgb_path.to_path_buf(),
                source: image::ImageError::IoError(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what} image is empty ({width}x{height})"),
                )),
            },
            other => other,
        })?;
        Ok(frame.with_time(ts, 0))
    }

    /// Writes the frame as `rgb_path` (8-bit RGB PNG) and, when it has depth, `depth_path`
    /// (16-bit PNG). Each file is written to a temporary name and renamed, so a crash never
    /// leaves a half-written image under the final name.
    pub fn save(&self, rgb_path: &Path, depth_path: &Path) -> Result<(), FrameError> {
        let rgb = encode_png(
            rgb_path,
            self.rgb.as_raw(),
            self.width(),
            self.height(),
            false,
        )?;
        write_atomic(rgb_path, &rgb).map_err(|source| FrameError::Write {
            path: rgb_path.to_path_buf(),
            source,
        })?;
        if let Some(d) = &self.depth {
            // The encoder takes 16-bit samples in native byte order and writes PNG's big-endian.
            let bytes: Vec<u8> = d
                .values
                .as_raw()
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect();
            let png = encode_png(depth_path, &bytes, self.width(), self.height(), true)?;
            write_atomic(depth_path, &png).map_err(|source| FrameError::Write {
                path: depth_path.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The depth file that belongs to an RGB file: `dir/STEM.png` -> `dir/STEM.depth.png`.
pub fn depth_path_for(rgb_path: &Path) -> PathBuf {
    let stem = rgb_path
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    rgb_path.with_file_name(format!("{stem}{DEPTH_SUFFIX}"))
}

fn decode(path: &Path) -> Result<DynamicImage, FrameError> {
    let bytes = std::fs::read(path).map_err(|source| FrameError::Read {
        path: path.into(),
        source,
    })?;
    image::ImageReader::new(io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| FrameError::Read {
            path: path.into(),
            source,
        })?
        .decode()
        .map_err(|source| FrameError::Decode {
            path: path.into(),
            source,
        })
}

/// Reads an RGB image (PNG or JPEG; grayscale, 16-bit and alpha are converted to 8-bit RGB).
pub fn load_rgb(path: &Path) -> Result<RgbImage, FrameError> {
    Ok(decode(path)?.into_rgb8())
}

/// Reads a 16-bit single-channel depth PNG; any other pixel format is an error.
pub fn load_depth(path: &Path) -> Result<DepthImage, FrameError> {
    match decode(path)? {
        DynamicImage::ImageLuma16(img) => Ok(img),
        other => Err(FrameError::DepthNotU16 {
            path: path.into(),
            found: color_name(other.color()).to_string(),
        }),
    }
}

pub(crate) fn color_name(c: ColorType) -> &'static str {
    match c {
        ColorType::L8 => "8-bit grayscale",
        ColorType::La8 => "8-bit grayscale with alpha",
        ColorType::Rgb8 => "8-bit RGB",
        ColorType::Rgba8 => "8-bit RGBA",
        ColorType::L16 => "16-bit grayscale",
        ColorType::La16 => "16-bit grayscale with alpha",
        ColorType::Rgb16 => "16-bit RGB",
        ColorType::Rgba16 => "16-bit RGBA",
        ColorType::Rgb32F => "32-bit float RGB",
        ColorType::Rgba32F => "32-bit float RGBA",
        _ => "an unsupported pixel format",
    }
}

/// PNG bytes for 8-bit RGB (`depth16 = false`) or 16-bit native-endian grayscale data.
/// The encoder settings are fixed so the same pixels always give the same bytes.
fn encode_png(
    path: &Path,
    raw: &[u8],
    width: u32,
    height: u32,
    depth16: bool,
) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    let color = if depth16 {
        image::ExtendedColorType::L16
    } else {
        image::ExtendedColorType::Rgb8
    };
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(raw, width, height, color)
        .map_err(|source| FrameError::Encode {
            path: path.into(),
            source,
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frame {
        let rgb = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let depth = DepthImage::from_fn(5, 3, |x, y| Luma([(x * 1000 + y) as u16]));
        Frame::new(
            rgb,
            Some(DepthMap {
                values: depth,
                unit_mm: 0.05,
            }),
        )
        .unwrap()
    }

    #[test]
    fn png_pair_round_trips_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let f = sample();
        let rgb = dir.path().join("a.png");
        let depth = depth_path_for(&rgb);
        assert_eq!(depth, dir.path().join("a.depth.png"));
        f.save(&rgb, &depth).unwrap();
        let back = Frame::load(&rgb, Some(&depth), 0.05).unwrap();
        assert_eq!(back.rgb(), f.rgb());
        assert_eq!(back.depth().unwrap().values, f.depth().unwrap().values);
        assert_eq!(back.depth().unwrap().mm_at(2, 1), Some(2001.0 * 0.05));
        assert_eq!(back.depth().unwrap().mm_at(0, 0), None, "0 is no depth");
    }

    #[test]
    fn depth_of_another_size_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let rgb = dir.path().join("a.png");
        sample()
            .save(&rgb, &dir.path().join("unused.depth.png"))
            .unwrap();
        let depth = dir.path().join("a.depth.png");
        DepthImage::new(4, 3).save(&depth).unwrap();
        let err = Frame::load(&rgb, Some(&depth), 0.05)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.depth.png") && err.contains("4x3") && err.contains("5x3"),
            "{err}"
        );
    }

    #[test]
    fn eight_bit_depth_is_rejected_with_the_format_found() {
        let dir = tempfile::tempdir().unwrap();
        let depth = dir.path().join("a.depth.png");
        image::GrayImage::new(5, 3).save(&depth).unwrap();
        let err = load_depth(&depth).unwrap_err().to_string();
        assert!(
            err.contains("a.depth.png") && err.contains("8-bit grayscale"),
            "{err}"
        );
    }

    #[test]
    fn unreadable_and_missing_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not a png at all").unwrap();
        let err = load_rgb(&junk).unwrap_err().to_string();
        assert!(
            err.contains("junk.png") && err.contains("not a readable image"),
            "{err}"
        );
        let err = load_rgb(&dir.path().join("gone.png"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gone.png") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn grayscale_and_jpeg_rgb_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("g.png");
        image::GrayImage::from_pixel(4, 2, Luma([99]))
            .save(&gray)
            .unwrap();
        assert_eq!(load_rgb(&gray).unwrap().get_pixel(1, 1).0, [99, 99, 99]);
        let jpg = dir.path().join("c.jpg");
        RgbImage::from_pixel(8, 8, image::Rgb([200, 100, 50]))
            .save(&jpg)
            .unwrap();
        let px = load_rgb(&jpg).unwrap().get_pixel(3, 3).0;
        assert!(px[0].abs_diff(200) < 6 && px[1].abs_diff(100) < 6, "{px:?}");
    }

    #[test]
    fn empty_frames_and_bad_units_are_errors() {
        assert!(matches!(
            Frame::new(RgbImage::new(0, 0), None),
            Err(FrameError::Empty { .. })
        ));
        let d = DepthMap {
            values: DepthImage::new(2, 2),
            unit_mm: 0.0,
        };
        assert!(matches!(
            Frame::new(RgbImage::new(2, 2), Some(d)),
            Err(FrameError::BadDepthUnit(_))
        ));
    }

    #[test]
    fn same_pixels_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = sample();
        let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
        f.save(&a, &depth_path_for(&a)).unwrap();
        f.save(&b, &depth_path_for(&b)).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(
            std::fs::read(depth_path_for(&a)).unwrap(),
            std::fs::read(depth_path_for(&b)).unwrap()
        );
    }
}
