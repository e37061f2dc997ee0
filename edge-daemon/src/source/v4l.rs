//! `kind = "v4l"`: a Video4Linux2 camera (USB webcam, or a MIPI camera through the board's
//! ISP), streamed through memory-mapped buffers, YUYV or MJPEG converted to RGB. No depth.
//!
//! The config and the pixel conversions are compiled in every build (the config is validated on
//! any machine, the conversions are unit-tested); the device itself needs the cargo feature
//! `v4l`, which needs `libclang` at build time (bindgen in `v4l2-sys-mit`).
//!
//! Errors: a device that cannot be opened or stops delivering is
//! [`SourceError::Disconnected`] (the capture loop retries); a device that offers none of the
//! wanted pixel formats is [`SourceError::Fatal`].

use std::path::PathBuf;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::camera_mode_problems;

/// The pixel formats this source decodes, by their V4L2 four-character code.
pub const FOURCCS: [&str; 2] = ["MJPG", "YUYV"];

/// Largest frame side asked of a camera, px: above any UVC camera's mode.
const MAX_SIDE_PX: u32 = 8192;
/// Highest frame rate asked of a camera, frames/s.
const MAX_CAMERA_FPS: u32 = 1000;

/// `[source]` with `kind = "v4l"`.
///
/// ```toml
/// [source]
/// kind = "v4l"
/// device = "/dev/video0"
/// width = 1280
/// height = 720
/// fps = 30
/// fourcc = ["MJPG", "YUYV"]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct V4lConfig {
    /// The camera's device node (default `/dev/video0`); a stable `/dev/v4l/by-id/...` link
    /// survives replugging into another port.
    pub device: PathBuf,
    /// Width to ask for, px, 1..=8192 (default 640); the camera may pick the nearest mode,
    /// which is then used and logged.
    pub width: u32,
    /// Height to ask for, px, 1..=8192 (default 480).
    pub height: u32,
    /// Frame rate to ask for, 1..=1000 frames/s (default 30); the camera may pick another.
    pub fps: u32,
    /// Pixel formats in order of preference, from `MJPG` and `YUYV` (default both, MJPEG
    /// first: it fits 1280x720 at 30 fps through USB 2, where YUYV manages about 10).
    pub fourcc: Vec<String>,
}

impl Default for V4lConfig {
    fn default() -> V4lConfig {
        V4lConfig {
            device: PathBuf::from("/dev/video0"),
            width: 640,
            height: 480,
            fps: 30,
            fourcc: FOURCCS.map(String::from).to_vec(),
        }
    }
}

impl V4lConfig {
    /// Every invalid value, each naming its key and the allowed values.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.device.as_os_str().is_empty() {
            out.push("source.device is empty; give the camera's device, e.g. /dev/video0".into());
        }
        out.extend(camera_mode_problems(
            [self.width, self.height, self.fps],
            MAX_SIDE_PX,
            MAX_CAMERA_FPS,
        ));
        if self.fourcc.is_empty() {
            out.push(format!(
                "source.fourcc is empty; allowed: one or more of {FOURCCS:?}"
            ));
        }
        for (i, f) in self.fourcc.iter().enumerate() {
            if !FOURCCS.contains(&f.as_str()) {
                out.push(format!("source.fourcc[{i}] is {f:?}; allowed: {FOURCCS:?}"));
            }
        }
        out
    }
}

/// Fixed-point BT.601 coefficients scaled by 256, for "studio swing" YUV (Y in 16..=235, U and
/// V in 16..=240) as UVC cameras send it; the table of Microsoft's "Converting 8-bit YUV to
/// RGB888" (learn.microsoft.com, "Recommended 8-Bit YUV Formats for Video Rendering").
/// Written out by hand because it is 10 lines and the image crate has no YUV input.
const Y_GAIN: i32 = 298; // 255 / 219 * 256
const V_TO_R: i32 = 409; // 1.596 * 256
const U_TO_G: i32 = 100; // 0.391 * 256
const V_TO_G: i32 = 208; // 0.813 * 256
const U_TO_B: i32 = 516; // 2.018 * 256

/// One BT.601 pixel to RGB.
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = Y_GAIN * (i32::from(y) - 16);
    let d = i32::from(u) - 128;
    let e = i32::from(v) - 128;
    // +128 rounds the >> 8 to nearest.
    let px = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [
        px(c + V_TO_R * e),
        px(c - U_TO_G * d - V_TO_G * e),
        px(c + U_TO_B * d),
    ]
}

/// A YUYV (YUV 4:2:2, bytes `Y0 U Y1 V` per two pixels) image to RGB. `stride` is the bytes per
/// line the driver uses (at least `2 * width`). `None` when `data` is too short or the width
/// is odd (4:2:2 shares U and V between pixel pairs).
#[cfg_attr(not(feature = "v4l"), allow(dead_code))]
pub(crate) fn yuyv_to_rgb(data: &[u8], width: u32, height: u32, stride: usize) -> Option<RgbImage> {
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 || w % 2 != 0 || stride < 2 * w {
        return None;
    }
    let needed = stride.checked_mul(h - 1)?.checked_add(2 * w)?;
    if data.len() < needed {
        return None;
    }
    let mut rgb = Vec::with_capacity(w * h * 3);
    for row in 0..h {
        let line = &data[row * stride..row * stride + 2 * w];
        for q in line.chunks_exact(4) {
            rgb.extend_from_slice(&yuv_to_rgb(q[0], q[1], q[3]));
            rgb.extend_from_slice(&yuv_to_rgb(q[2], q[1], q[3]));
        }
    }
    RgbImage::from_raw(width, height, rgb)
}

/// An MJPEG frame (one JPEG image) to RGB.
#[cfg_attr(not(feature = "v4l"), allow(dead_code))]
pub(crate) fn mjpeg_to_rgb(data: &[u8]) -> Result<RgbImage, image::ImageError> {
    Ok(image::load_from_memory_with_format(data, image::ImageFormat::Jpeg)?.into_rgb8())
}

#[cfg(feature = "v4l")]
pub use device::V4lSource;

#[cfg(feature = "v4l")]
mod device {
    use std::io;
    use std::path::PathBuf;
    use std::time::Duration;

    use ::v4l::buffer::Type;
    use ::v4l::io::mmap::Stream;
    use ::v4l::io::traits::CaptureStream;
    use ::v4l::video::Capture;
    use ::v4l::video::capture::Parameters;
    use ::v4l::{Device, FourCC};
    use image::RgbImage;
    use weld_core::Frame;

    use super::{V4lConfig, mjpeg_to_rgb, yuyv_to_rgb};
    use crate::source::{Next, Source, SourceError};

    /// Driver buffers: one being filled, one being read, two spare so a slow frame does not
    /// make the driver drop the next one.
    const BUFFERS: u32 = 4;
    /// A camera that delivers nothing for this long is treated as lost: 2 s is 60 frame
    /// periods at 30 fps, far beyond any exposure time.
    const READ_TIMEOUT: Duration = Duration::from_secs(2);
    /// Frames in a row that fail to decode before the camera is treated as lost (1 s at 30
    /// fps): a single corrupt USB transfer is skipped, a stuck stream is reopened.
    const MAX_BAD_FRAMES: u32 = 30;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Pixel {
        Yuyv,
        Mjpg,
    }

    impl Pixel {
        fn from_name(name: &str) -> Option<Pixel> {
            match name {
                "YUYV" => Some(Pixel::Yuyv),
                "MJPG" => Some(Pixel::Mjpg),
                _ => None,
            }
        }

        fn fourcc(self) -> FourCC {
            match self {
                Pixel::Yuyv => FourCC::new(b"YUYV"),
                Pixel::Mjpg => FourCC::new(b"MJPG"),
            }
        }
    }

    /// A V4L2 camera streaming through memory-mapped buffers.
    pub struct V4lSource {
        path: PathBuf,
        // The stream holds the device's file handle; the device is kept for clarity of
        // ownership (the fd closes when both are gone).
        _device: Device,
        stream: Stream<'static>,
        pixel: Pixel,
        width: u32,
        height: u32,
        stride: usize,
        seq: u64,
    }

    impl std::fmt::Debug for V4lSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("V4lSource")
                .field("path", &self.path)
                .field("pixel", &self.pixel)
                .field("size", &(self.width, self.height))
                .finish_non_exhaustive()
        }
    }

    impl V4lSource {
        /// Opens the device, negotiates format, size and rate, and maps the buffers.
        pub fn open(cfg: &V4lConfig) -> Result<V4lSource, SourceError> {
            let path = cfg.device.clone();
            let lost = |what: &str, e: io::Error| {
                SourceError::Disconnected(format!("{}: {what}: {e}", path.display()))
            };
            let device = Device::with_path(&path).map_err(|e| lost("cannot open", e))?;
            let offered: Vec<FourCC> = device
                .enum_formats()
                .map_err(|e| lost("cannot list formats", e))?
                .into_iter()
                .map(|d| d.fourcc)
                .collect();
            let pixel = cfg
                .fourcc
                .iter()
                .filter_map(|n| Pixel::from_name(n))
                .find(|p| offered.contains(&p.fourcc()))
                .ok_or_else(|| {
                    let names: Vec<String> = offered.iter().map(|f| f.to_string()).collect();
                    SourceError::Fatal(format!(
                        "{}: offers {} but source.fourcc asks for {:?}",
                        path.display(),
                        names.join(", "),
                        cfg.fourcc
                    ))
                })?;
            let mut want = device.format().map_err(|e| lost("cannot read format", e))?;
            want.width = cfg.width;
            want.height = cfg.height;
            want.fourcc = pixel.fourcc();
            let got = device
                .set_format(&want)
                .map_err(|e| lost("cannot set format", e))?;
            if got.fourcc != pixel.fourcc() {
                return Err(SourceError::Fatal(format!(
                    "{}: asked for {} but the driver chose {}",
                    path.display(),
                    pixel.fourcc(),
                    got.fourcc
                )));
            }
            if (got.width, got.height) != (cfg.width, cfg.height) {
                tracing::warn!(
                    device = %path.display(),
                    "camera has no {}x{} mode; using {}x{}",
                    cfg.width, cfg.height, got.width, got.height
                );
            }
            // Not every driver lets the rate be set (some MIPI ISPs fix it): worth a warning,
            // not a refusal.
            match device.set_params(&Parameters::with_fps(cfg.fps)) {
                Ok(p) if p.interval.numerator > 0 => {
                    let fps = f64::from(p.interval.denominator) / f64::from(p.interval.numerator);
                    if (fps - f64::from(cfg.fps)).abs() > 0.5 {
                        tracing::warn!(device = %path.display(), "camera runs at {fps:.1} fps, not {}", cfg.fps);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(device = %path.display(), "cannot set the frame rate: {e}")
                }
            }
            let mut stream = Stream::with_buffers(&device, Type::VideoCapture, BUFFERS)
                .map_err(|e| lost("cannot map buffers", e))?;
            stream.set_timeout(READ_TIMEOUT);
            tracing::info!(
                device = %path.display(),
                "v4l camera opened: {}x{} {}",
                got.width, got.height, got.fourcc
            );
            Ok(V4lSource {
                path,
                _device: device,
                stream,
                pixel,
                width: got.width,
                height: got.height,
                stride: got.stride as usize,
                seq: 0,
            })
        }

        /// The next buffer converted to RGB; `Ok(None)` for a frame that does not decode.
        fn read(&mut self) -> Result<Option<RgbImage>, SourceError> {
            let (buf, meta) = self.stream.next().map_err(|e| {
                SourceError::Disconnected(format!(
                    "{}: cannot read a frame: {e}",
                    self.path.display()
                ))
            })?;
            let used = (meta.bytesused as usize).min(buf.len());
            let data = &buf[..used];
            Ok(match self.pixel {
                Pixel::Yuyv => {
                    let stride = self.stride.max(2 * self.width as usize);
                    yuyv_to_rgb(data, self.width, self.height, stride)
                }
                Pixel::Mjpg => match mjpeg_to_rgb(data) {
                    Ok(rgb) => Some(rgb),
                    Err(e) => {
                        tracing::debug!(device = %self.path.display(), "bad MJPEG frame: {e}");
                        None
                    }
                },
            })
        }
    }

    impl Source for V4lSource {
        fn name(&self) -> &'static str {
            "v4l"
        }

        fn next_frame(&mut self) -> Result<Next, SourceError> {
            for _ in 0..MAX_BAD_FRAMES {
                let Some(rgb) = self.read()? else {
                    continue;
                };
                let ts = chrono::Utc::now();
                self.seq += 1;
                let frame = Frame::new(rgb, None)
                    .map_err(|e| SourceError::Fatal(format!("{}: {e}", self.path.display())))?
                    .with_time(ts, self.seq);
                return Ok(Next::Frame(Box::new(frame)));
            }
            Err(SourceError::Disconnected(format!(
                "{}: {MAX_BAD_FRAMES} frames in a row could not be decoded",
                self.path.display()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_greys_and_primaries_convert_per_bt601() {
        // Y=16 is black, Y=235 white, U=V=128 grey; (81, 90, 240) is BT.601 studio red.
        let data = [16, 128, 235, 128, 81, 90, 81, 240];
        let rgb = yuyv_to_rgb(&data, 4, 1, 8).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 255, 255]);
        let red = rgb.get_pixel(2, 0).0;
        assert!(red[0] >= 250 && red[1] <= 5 && red[2] <= 5, "{red:?}");
    }

    #[test]
    fn yuyv_honours_stride_and_rejects_short_or_odd_input() {
        // 2x2 image, 6 bytes per line (2 of padding that must be ignored).
        let data = [16, 128, 16, 128, 99, 99, 235, 128, 235, 128];
        let rgb = yuyv_to_rgb(&data, 2, 2, 6).unwrap();
        assert_eq!(rgb.get_pixel(1, 0).0, [0, 0, 0]);
        assert_eq!(rgb.get_pixel(0, 1).0, [255, 255, 255]);
        assert!(yuyv_to_rgb(&data[..9], 2, 2, 6).is_none(), "short");
        assert!(yuyv_to_rgb(&data, 3, 1, 6).is_none(), "odd width");
        assert!(
            yuyv_to_rgb(&data, 2, 1, 3).is_none(),
            "stride below 2 * width"
        );
    }

    #[test]
    fn mjpeg_frames_decode_and_garbage_is_an_error() {
        let mut jpeg = Vec::new();
        let src = RgbImage::from_pixel(16, 8, image::Rgb([200, 100, 50]));
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
            .encode_image(&src)
            .unwrap();
        let rgb = mjpeg_to_rgb(&jpeg).unwrap();
        assert_eq!(rgb.dimensions(), (16, 8));
        let px = rgb.get_pixel(4, 4).0;
        assert!(px[0].abs_diff(200) < 6 && px[2].abs_diff(50) < 6, "{px:?}");
        assert!(mjpeg_to_rgb(b"not a jpeg").is_err());
    }

    #[test]
    fn problems_name_every_key() {
        let cfg = V4lConfig {
            device: PathBuf::new(),
            width: 0,
            height: 9000,
            fps: 0,
            fourcc: vec!["H264".into()],
        };
        let p = cfg.problems();
        for key in [
            "source.device",
            "source.width",
            "source.height",
            "source.fps",
            "source.fourcc[0]",
        ] {
            assert!(
                p.iter().any(|m| m.starts_with(key)),
                "{key} missing in {p:?}"
            );
        }
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(V4lConfig::default().problems().is_empty());
    }
}
