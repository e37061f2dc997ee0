//! Frame -> model input tensor. The one place where pixels become numbers for a model: the
//! trainer and the daemon both call [`preprocess`], so a model never sees different inputs in
//! training and on the line.
//!
//! Per channel of the [`InputSpec`]:
//! - `r`, `g`, `b`: `(value / 255 - mean) / std` after resizing the RGB image;
//! - `height`: height above the reference surface (see [`DepthNormalisation`]) in mm, clipped to
//!   `±range_mm`, divided by `range_mm`, then `(h - mean) / std`; computed at full resolution,
//!   then resized like the RGB.
//!
//! Resizing is bilinear with antialiasing (`image`'s triangle filter widens its support when
//! shrinking), and skipped when the frame already has the input size.

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Luma};
use ndarray::{Array4, ArrayViewMut2, s};
use thiserror::Error;

use crate::frame::{DepthMap, Frame};
use crate::manifest::{Channel, DepthNormalisation, HeightReference, InputSpec};
use crate::plane::{PlaneFitOptions, fit_plane};

#[derive(Debug, Error, PartialEq)]
pub enum PreprocessError {
    #[error("the model input spec is not valid: {}", .0.join("; "))]
    InvalidSpec(Vec<String>),
    #[error(
        "the model needs a height channel but the frame has no depth (an RGB-only camera or \
         dataset with an RGB+depth model)"
    )]
    NoDepth,
}

/// Turns a frame into a `[1, C, H, W]` tensor as the spec describes.
///
/// Where the frame's depth is too sparse to find a reference surface, every height value is the
/// spec's `missing_mm`: the model still runs on the colour channels.
pub fn preprocess(frame: &Frame, spec: &InputSpec) -> Result<Array4<f32>, PreprocessError> {
    let problems = spec.problems();
    if !problems.is_empty() {
        return Err(PreprocessError::InvalidSpec(problems));
    }
    let [w, h] = spec.size;
    let mut out = Array4::<f32>::zeros((1, spec.channels.len(), h as usize, w as usize));
    let same_size = frame.width() == w && frame.height() == h;

    let needs_rgb = spec.channels.iter().any(|c| *c != Channel::Height);
    let resized_rgb;
    let rgb = if needs_rgb && !same_size {
        resized_rgb = imageops::resize(frame.rgb(), w, h, FilterType::Triangle);
        &resized_rgb
    } else {
        frame.rgb()
    };

    let height = if spec.needs_depth() {
        let depth = frame.depth().ok_or(PreprocessError::NoDepth)?;
        // `problems()` is empty, so a height channel comes with its normalisation.
        let norm = spec.depth.unwrap_or_default();
        let full = height_channel(depth, &norm);
        Some(if same_size {
            full
        } else {
            imageops::resize(&full, w, h, FilterType::Triangle)
        })
    } else {
        None
    };

    for (ci, channel) in spec.channels.iter().enumerate() {
        let (mean, std) = (spec.mean[ci], spec.std[ci]);
        let mut plane: ArrayViewMut2<f32> = out.slice_mut(s![0, ci, .., ..]);
        match (channel, &height) {
            (Channel::Height, Some(hm)) => {
                for (o, v) in plane.iter_mut().zip(hm.as_raw()) {
                    *o = (v - mean) / std;
                }
            }
            (Channel::Height, None) => return Err(PreprocessError::NoDepth),
            (c, _) => {
                let k = match c {
                    Channel::R => 0,
                    Channel::G => 1,
                    _ => 2,
                };
                for (o, px) in plane.iter_mut().zip(rgb.pixels()) {
                    *o = (f32::from(px.0[k]) / 255.0 - mean) / std;
                }
            }
        }
    }
    Ok(out)
}

/// The normalised height map in [-1, 1] at the depth image's resolution.
pub fn height_channel(
    depth: &DepthMap,
    norm: &DepthNormalisation,
) -> ImageBuffer<Luma<f32>, Vec<f32>> {
    let (w, h) = depth.values.dimensions();
    let range = norm.range_mm;
    let scale = |height_mm: f32| height_mm.clamp(-range, range) / range;
    let missing = scale(norm.missing_mm);
    let reference: Box<dyn Fn(u32, u32) -> Option<f32>> = match norm.reference {
        HeightReference::Plane => match fit_plane(depth, &PlaneFitOptions::default()) {
            Some(fit) => Box::new(move |x, y| {
                fit.plane
                    .depth_mm(f64::from(x), f64::from(y))
                    .map(|z| z as f32)
            }),
            None => Box::new(|_, _| None),
        },
        HeightReference::Median => {
            let mut valid: Vec<u16> = depth
                .values
                .as_raw()
                .iter()
                .copied()
                .filter(|&v| v != 0)
                .collect();
            if valid.is_empty() {
                Box::new(|_, _| None)
            } else {
                let mid = valid.len() / 2;
                let median = f32::from(*valid.select_nth_unstable(mid).1) * depth.unit_mm;
                Box::new(move |_, _| Some(median))
            }
        }
    };
    ImageBuffer::from_fn(w, h, |x, y| {
        let v = match (depth.mm_at(x, y), reference(x, y)) {
            (Some(z), Some(r)) => scale(r - z),
            _ => missing,
        };
        Luma([v])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DepthImage;
    use crate::manifest::Layout;
    use image::{Rgb, RgbImage};

    fn spec(channels: Vec<Channel>, mean: Vec<f32>, std: Vec<f32>, size: [u32; 2]) -> InputSpec {
        InputSpec {
            layout: Layout::Nchw,
            channels,
            size,
            mean,
            std,
            depth: Some(DepthNormalisation {
                reference: HeightReference::Median,
                range_mm: 2.0,
                missing_mm: 0.0,
            }),
            resize: Default::default(),
        }
    }

    #[test]
    fn colour_channels_by_hand() {
        // Pixel (0,0) = (255, 0, 51), pixel (1,0) = (0, 255, 102).
        let mut rgb = RgbImage::new(2, 1);
        rgb.put_pixel(0, 0, Rgb([255, 0, 51]));
        rgb.put_pixel(1, 0, Rgb([0, 255, 102]));
        let frame = Frame::new(rgb, None).unwrap();
        // Channel order b, r: b = (51/255 - 0.1) / 0.5 = (0.2 - 0.1) / 0.5 = 0.2;
        // r = (1 - 0.5) / 0.25 = 2.
        let s = spec(
            vec![Channel::B, Channel::R],
            vec![0.1, 0.5],
            vec![0.5, 0.25],
            [2, 1],
        );
        let t = preprocess(&frame, &s).unwrap();
        assert_eq!(t.shape(), &[1, 2, 1, 2]);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
        assert!(close(t[[0, 0, 0, 0]], 0.2), "{t}");
        assert!(close(t[[0, 0, 0, 1]], (0.4 - 0.1) / 0.5), "{t}");
        assert!(close(t[[0, 1, 0, 0]], 2.0), "{t}");
        assert!(close(t[[0, 1, 0, 1]], -2.0), "{t}");
    }

    #[test]
    fn height_channel_by_hand_with_median_reference() {
        // 3x1 depth at 0.05 mm units: 100 mm, 99 mm, no depth. Median of valid = 100 mm
        // (upper median of {99, 100}). Heights: 0, +1 mm, missing (0).
        // range 2 mm -> 0, 0.5, 0; mean 0.25, std 0.5 -> -0.5, 0.5, -0.5.
        let depth = DepthImage::from_raw(3, 1, vec![2000, 1980, 0]).unwrap();
        let frame = Frame::new(
            RgbImage::new(3, 1),
            Some(DepthMap {
                values: depth,
                unit_mm: 0.05,
            }),
        )
        .unwrap();
        let s = spec(vec![Channel::Height], vec![0.25], vec![0.5], [3, 1]);
        let t = preprocess(&frame, &s).unwrap();
        let got: Vec<f32> = t.iter().copied().collect();
        for (g, e) in got.iter().zip([-0.5, 0.5, -0.5]) {
            assert!((g - e).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn heights_are_clipped_to_the_range() {
        // 150 mm plate with a pixel 5 mm nearer and one 30 mm further: clipped to +-1.
        let mut raw = vec![3000u16; 9];
        raw[0] = 2900;
        raw[8] = 3600;
        let depth = DepthMap {
            values: DepthImage::from_raw(3, 3, raw).unwrap(),
            unit_mm: 0.05,
        };
        let norm = DepthNormalisation {
            reference: HeightReference::Median,
            range_mm: 2.0,
            missing_mm: -7.0,
        };
        let hm = height_channel(&depth, &norm);
        assert_eq!(hm.as_raw()[0], 1.0);
        assert_eq!(hm.as_raw()[8], -1.0);
        assert_eq!(hm.as_raw()[4], 0.0);
    }

    #[test]
    fn tilted_plate_is_flat_with_plane_reference() {
        let (w, h) = (64u32, 48u32);
        let depth = DepthImage::from_fn(w, h, |x, y| {
            let z = 1.0 / (1.0 / 150.0 + 3e-6 * f64::from(x) - 2e-6 * f64::from(y));
            Luma([(z / 0.05).round() as u16])
        });
        let mut depth = DepthMap {
            values: depth,
            unit_mm: 0.05,
        };
        // A 1 mm bump on 4 pixels.
        for (x, y) in [(10, 10), (11, 10), (10, 11), (11, 11)] {
            let v = depth.values.get_pixel(x, y).0[0];
            depth.values.put_pixel(x, y, Luma([v - 20]));
        }
        let norm = DepthNormalisation {
            reference: HeightReference::Plane,
            range_mm: 2.0,
            missing_mm: 0.0,
        };
        let hm = height_channel(&depth, &norm);
        // Quantisation of 0.05 mm is 0.025 on this scale: everything but the bump is ~0.
        assert!(
            (hm.get_pixel(10, 10).0[0] - 0.5).abs() < 0.03,
            "{:?}",
            hm.get_pixel(10, 10)
        );
        assert!(hm.get_pixel(40, 30).0[0].abs() < 0.03);
        assert!(hm.get_pixel(63, 0).0[0].abs() < 0.03);
    }

    #[test]
    fn resize_keeps_a_uniform_image_uniform() {
        let frame = Frame::new(RgbImage::from_pixel(640, 480, Rgb([51, 102, 153])), None).unwrap();
        let t = preprocess(&frame, &InputSpec::rgb(224)).unwrap();
        assert_eq!(t.shape(), &[1, 3, 224, 224]);
        let expect = [
            (0.2 - 0.485) / 0.229,
            (0.4 - 0.456) / 0.224,
            (0.6 - 0.406) / 0.225,
        ];
        for (c, e) in expect.iter().enumerate() {
            let ch = t.slice(s![0, c, .., ..]);
            assert!(ch.iter().all(|v| (v - e).abs() < 1e-5), "channel {c}");
        }
    }

    #[test]
    fn height_model_on_rgb_only_frame_is_an_error() {
        let frame = Frame::new(RgbImage::new(8, 8), None).unwrap();
        assert_eq!(
            preprocess(&frame, &InputSpec::rgb_height(8)),
            Err(PreprocessError::NoDepth)
        );
    }

    #[test]
    fn all_zero_depth_gives_missing_heights_not_an_error() {
        let depth = DepthMap {
            values: DepthImage::new(16, 16),
            unit_mm: 0.05,
        };
        let frame = Frame::new(RgbImage::new(16, 16), Some(depth)).unwrap();
        let t = preprocess(&frame, &InputSpec::rgb_height(16)).unwrap();
        // missing 0 mm -> 0 on the [-1,1] scale -> (0 - 0) / 0.5 = 0.
        assert!(t.slice(s![0, 3, .., ..]).iter().all(|v| *v == 0.0));
    }

    #[test]
    fn invalid_spec_is_refused() {
        let frame = Frame::new(RgbImage::new(8, 8), None).unwrap();
        let mut s = InputSpec::rgb(8);
        s.std[0] = -1.0;
        assert!(matches!(
            preprocess(&frame, &s),
            Err(PreprocessError::InvalidSpec(_))
        ));
    }
}
