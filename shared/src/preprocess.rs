//! Frame -> model input tensor. The one place where pixels become numbers for a model: the
//! trainer and the daemon both call [`preprocess`], so a model never sees different inputs in
//! training and on the line.
//!
//! Per channel of the [`InputSpec`]:
//! - `r`, `g`, `b`: `(value / 255 - mean) / std` after resizing the RGB image;
//! - `height`: height above the reference surface (see [`DepthNormalisation`]) in mm, clipped to
//!   `±range_mm`, divided by `range_mm`, then `(h - mean) / std`; computed at full resolution,
//!   then resized like the RGB;
//! - `relief`: the local relief of that height ([`relief_channel`]) on the same scale, then
//!   `(v - mean) / std`.
//!
//! Resizing is bilinear with antialiasing (`image`'s triangle filter widens its support when
//! shrinking), and skipped when the frame already has the input size.

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Luma};
use ndarray::{Array4, ArrayViewMut2, s};
use thiserror::Error;

use crate::frame::{DepthMap, Frame};
use crate::manifest::{Channel, DepthNormalisation, HeightReference, InputSpec, ResizeMode};
use crate::plane::{PlaneFitOptions, fit_plane};

/// A single-channel f32 image.
pub type FloatImage = ImageBuffer<Luma<f32>, Vec<f32>>;

#[derive(Debug, Error, PartialEq)]
pub enum PreprocessError {
    #[error("the model input spec is not valid: {}", .0.join("; "))]
    InvalidSpec(Vec<String>),
    #[error(
        "the model needs a height or relief channel but the frame has no depth (an RGB-only \
         camera or dataset with an RGB+depth model)"
    )]
    NoDepth,
}

/// Turns a frame into a `[1, C, H, W]` tensor as the spec describes.
///
/// Where the frame's depth is too sparse to find a reference surface, every height value is the
/// spec's `missing_mm` and the relief is 0: the model still runs on the colour channels.
pub fn preprocess(frame: &Frame, spec: &InputSpec) -> Result<Array4<f32>, PreprocessError> {
    let problems = spec.problems();
    if !problems.is_empty() {
        return Err(PreprocessError::InvalidSpec(problems));
    }
    match spec.resize {
        ResizeMode::Stretch => stretched(frame, spec),
        ResizeMode::BeadStrip { across_mm } => bead_strip(frame, spec, across_mm),
    }
}

/// [`ResizeMode::Stretch`].
fn stretched(frame: &Frame, spec: &InputSpec) -> Result<Array4<f32>, PreprocessError> {
    let [w, h] = spec.size;
    let mut out = Array4::<f32>::zeros((1, spec.channels.len(), h as usize, w as usize));
    let same_size = frame.width() == w && frame.height() == h;

    let needs_rgb = spec.channels.iter().any(|c| !c.from_depth());
    let resized_rgb;
    let rgb = if needs_rgb && !same_size {
        resized_rgb = imageops::resize(frame.rgb(), w, h, FilterType::Triangle);
        &resized_rgb
    } else {
        frame.rgb()
    };

    // `problems()` is empty, so a depth channel comes with its normalisation.
    let norm = spec.depth.unwrap_or_default();
    let heights = if spec.needs_depth() {
        let depth = frame.depth().ok_or(PreprocessError::NoDepth)?;
        Some(heights_mm(depth, norm.reference))
    } else {
        None
    };
    let height = match (&heights, spec.channels.contains(&Channel::Height)) {
        (Some(mm), true) => {
            let full = normalise_heights(mm, &norm);
            Some(if same_size {
                full
            } else {
                imageops::resize(&full, w, h, FilterType::Triangle)
            })
        }
        _ => None,
    };
    let relief = match (&heights, spec.channels.contains(&Channel::Relief)) {
        (Some(mm), true) => Some(relief_channel(mm, &norm, w, h)),
        _ => None,
    };

    for (ci, channel) in spec.channels.iter().enumerate() {
        let (mean, std) = (spec.mean[ci], spec.std[ci]);
        let mut plane: ArrayViewMut2<f32> = out.slice_mut(s![0, ci, .., ..]);
        let k = match channel {
            Channel::Height | Channel::Relief => {
                let map = if *channel == Channel::Height {
                    &height
                } else {
                    &relief
                };
                let map = map.as_ref().ok_or(PreprocessError::NoDepth)?;
                for (o, v) in plane.iter_mut().zip(map.as_raw()) {
                    *o = (v - mean) / std;
                }
                continue;
            }
            Channel::R => 0,
            Channel::G => 1,
            Channel::B => 2,
        };
        for (o, px) in plane.iter_mut().zip(rgb.pixels()) {
            *o = (f32::from(px.0[k]) / 255.0 - mean) / std;
        }
    }
    Ok(out)
}

/// The normalised height map in [-1, 1] at the depth image's resolution.
pub fn height_channel(depth: &DepthMap, norm: &DepthNormalisation) -> FloatImage {
    normalise_heights(&heights_mm(depth, norm.reference), norm)
}

/// Height above the reference surface in mm (positive toward the camera) at the depth image's
/// resolution; NaN where the pixel has no depth or the frame has no usable reference.
pub fn heights_mm(depth: &DepthMap, reference: HeightReference) -> FloatImage {
    let (w, h) = depth.values.dimensions();
    let reference: Box<dyn Fn(u32, u32) -> Option<f32>> = match reference {
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
            (Some(z), Some(r)) => r - z,
            _ => f32::NAN,
        };
        Luma([v])
    })
}

/// Heights in mm -> clipped to `±range_mm`, divided by it; `missing_mm` where there is none.
fn normalise_heights(mm: &FloatImage, norm: &DepthNormalisation) -> FloatImage {
    let range = norm.range_mm;
    let scale = |height_mm: f32| height_mm.clamp(-range, range) / range;
    let missing = scale(norm.missing_mm);
    let (w, h) = mm.dimensions();
    let values = mm
        .as_raw()
        .iter()
        .map(|&v| if v.is_nan() { missing } else { scale(v) })
        .collect();
    ImageBuffer::from_raw(w, h, values).unwrap_or_else(|| ImageBuffer::new(w, h))
}

/// The relief channel at `out_w x out_h`, on the height's [-1, 1] scale.
///
/// At the depth image's resolution, heights (`missing_mm` where there is no depth, as in the
/// height channel) clipped to `±range_mm` (a hole does not swamp its neighbourhood) are
/// smoothed by a 3x3 mean (sensor noise) and their mean over a square window of side `2r + 1`,
/// `r = max(2, round(width / 128))` (5 px, about 3 mm, for a 640 px camera at 150 mm), is
/// subtracted: the bead's gentle curvature mostly cancels, a pore, groove, droplet or hole
/// stays. Shrinking
/// keeps, in each input pixel's block of camera pixels, the value of largest magnitude, so a
/// feature one camera pixel across still shows at the input size, where averaging would
/// dilute it below the noise.
pub fn relief_channel(
    heights: &FloatImage,
    norm: &DepthNormalisation,
    out_w: u32,
    out_h: u32,
) -> FloatImage {
    let (w, h) = (heights.width() as usize, heights.height() as usize);
    let relief = relief_full(heights, norm);
    let (ow, oh) = (out_w as usize, out_h as usize);
    // Block of camera pixels of each input pixel along one axis: [start, end), never empty.
    let blocks = |n: usize, out: usize| -> Vec<(usize, usize)> {
        (0..out)
            .map(|i| {
                let a = (i * n / out).min(n - 1);
                let b = ((i + 1) * n / out).clamp(a + 1, n);
                (a, b)
            })
            .collect()
    };
    let (bx, by) = (blocks(w, ow), blocks(h, oh));
    let mut out = Vec::with_capacity(ow * oh);
    for &(y0, y1) in &by {
        for &(x0, x1) in &bx {
            let mut best = 0.0f32;
            for row in relief[y0 * w..y1 * w].chunks_exact(w) {
                for &v in &row[x0..x1] {
                    if v.abs() > best.abs() {
                        best = v;
                    }
                }
            }
            out.push(best);
        }
    }
    ImageBuffer::from_raw(out_w, out_h, out).unwrap_or_else(|| ImageBuffer::new(out_w, out_h))
}

/// The relief of [`relief_channel`] at the depth image's resolution, row-major.
fn relief_full(heights: &FloatImage, norm: &DepthNormalisation) -> Vec<f32> {
    let (w, h) = (heights.width() as usize, heights.height() as usize);
    let range = norm.range_mm;
    let clipped: Vec<f32> = heights
        .as_raw()
        .iter()
        .map(|v| if v.is_nan() { norm.missing_mm } else { *v }.clamp(-range, range))
        .collect();
    let r = ((w as f32 / 128.0).round() as usize).max(2);
    let fine = box_mean(&clipped, w, h, 1);
    let coarse = box_mean(&clipped, w, h, r);
    fine.iter()
        .zip(&coarse)
        .map(|(f, c)| ((f - c).clamp(-range, range) / range).clamp(-1.0, 1.0))
        .collect()
}

/// [`ResizeMode::BeadStrip`]: each input pixel samples a square of camera pixels (side: the
/// input's pixel size in camera pixels, at least 1) around its point on the plate; colour and
/// height take the square's mean, relief its value of largest magnitude (as when shrinking).
/// Points off the image are neutral: each channel's mean colour, plate level (0 mm) and no
/// relief, so that nothing off the image looks like a dark hole.
/// Without a bead found in the depth, the strip runs level through the image centre and spans
/// the image's width.
fn bead_strip(
    frame: &Frame,
    spec: &InputSpec,
    across_mm: f32,
) -> Result<Array4<f32>, PreprocessError> {
    let depth = frame.depth().ok_or(PreprocessError::NoDepth)?;
    let [w, h] = spec.size;
    let (w, h) = (w as usize, h as usize);
    let (fw, fh) = (frame.width() as usize, frame.height() as usize);
    let (centre, dir, step) = match crate::rules::bead_axis(frame) {
        Some(a) => (a.centre, a.dir, across_mm / h as f32 / a.mm_per_px),
        None => (
            [fw as f32 / 2.0, fh as f32 / 2.0],
            [1.0, 0.0],
            fw as f32 / w as f32,
        ),
    };
    let nrm = [-dir[1], dir[0]];
    let norm = spec.depth.unwrap_or_default();
    let heights = spec
        .depth_channels()
        .then(|| heights_mm(depth, norm.reference));
    let height = heights
        .as_ref()
        .filter(|_| spec.channels.contains(&Channel::Height))
        .map(|mm| normalise_heights(mm, &norm));
    let relief = heights
        .as_ref()
        .filter(|_| spec.channels.contains(&Channel::Relief))
        .map(|mm| relief_full(mm, &norm));
    let side = (step.round() as i64).max(1);
    let half = (side - 1) as f32 / 2.0;
    let rgb = frame.rgb().as_raw();
    let mut out = Array4::<f32>::zeros((1, spec.channels.len(), h, w));
    for v in 0..h {
        let b = v as f32 - (h as f32 - 1.0) / 2.0;
        for u in 0..w {
            let a = u as f32 - (w as f32 - 1.0) / 2.0;
            let px = centre[0] + step * (a * dir[0] + b * nrm[0]);
            let py = centre[1] + step * (a * dir[1] + b * nrm[1]);
            let (x0, y0) = ((px - half).round() as i64, (py - half).round() as i64);
            let xs = x0.max(0)..(x0 + side).min(fw as i64);
            let ys = y0.max(0)..(y0 + side).min(fh as i64);
            // Colour sums, height sum, strongest relief, pixel count.
            let (mut c, mut hs, mut best, mut n) = ([0.0f32; 3], 0.0f32, 0.0f32, 0u32);
            for y in ys {
                for x in xs.clone() {
                    let i = y as usize * fw + x as usize;
                    for (k, ck) in c.iter_mut().enumerate() {
                        *ck += f32::from(rgb[3 * i + k]);
                    }
                    if let Some(hm) = &height {
                        hs += hm.as_raw()[i];
                    }
                    if let Some(r) = &relief
                        && r[i].abs() > best.abs()
                    {
                        best = r[i];
                    }
                    n += 1;
                }
            }
            for (ci, channel) in spec.channels.iter().enumerate() {
                let (mean, std) = (spec.mean[ci], spec.std[ci]);
                let value = match (channel, n) {
                    (Channel::Height, 0) => 0.0,
                    (Channel::Height, _) => hs / n as f32,
                    (Channel::Relief, _) => best,
                    (_, 0) => mean,
                    (Channel::R, _) => c[0] / n as f32 / 255.0,
                    (Channel::G, _) => c[1] / n as f32 / 255.0,
                    (Channel::B, _) => c[2] / n as f32 / 255.0,
                };
                out[[0, ci, v, u]] = (value - mean) / std;
            }
        }
    }
    Ok(out)
}

/// Mean over the `(2r + 1)²` window around each pixel of the values that are not NaN (NaN where
/// the window has none), by running sums along rows and then columns.
/// Written here because it must skip missing depth, which `image`'s filters do not.
fn box_mean(values: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    // Pass 1: per row, sums and counts over [x - r, x + r].
    let mut rs = vec![0.0f64; w * h];
    let mut rc = vec![0u32; w * h];
    for y in 0..h {
        let row = &values[y * w..(y + 1) * w];
        let (mut s, mut c) = (0.0f64, 0u32);
        let add = |v: f32, s: &mut f64, c: &mut u32, sign: f64| {
            if !v.is_nan() {
                *s += sign * f64::from(v);
                if sign > 0.0 {
                    *c += 1;
                } else {
                    *c -= 1;
                }
            }
        };
        for &v in &row[..r.min(w)] {
            add(v, &mut s, &mut c, 1.0);
        }
        for x in 0..w {
            if x + r < w {
                add(row[x + r], &mut s, &mut c, 1.0);
            }
            if x > r {
                add(row[x - r - 1], &mut s, &mut c, -1.0);
            }
            rs[y * w + x] = s;
            rc[y * w + x] = c;
        }
    }
    // Pass 2: per column, the row sums over [y - r, y + r].
    let mut out = vec![f32::NAN; w * h];
    let mut s = vec![0.0f64; w];
    let mut c = vec![0u32; w];
    for y in 0..r.min(h) {
        for x in 0..w {
            s[x] += rs[y * w + x];
            c[x] += rc[y * w + x];
        }
    }
    for y in 0..h {
        for x in 0..w {
            if y + r < h {
                s[x] += rs[(y + r) * w + x];
                c[x] += rc[(y + r) * w + x];
            }
            if y > r {
                s[x] -= rs[(y - r - 1) * w + x];
                c[x] -= rc[(y - r - 1) * w + x];
            }
            if c[x] > 0 {
                out[y * w + x] = (s[x] / f64::from(c[x])) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DepthImage;
    use crate::manifest::Layout;
    use image::{Rgb, RgbImage};
    use proptest::prelude::{Just, Strategy, prop_assert, prop_oneof, proptest};

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

    fn flat_depth(w: u32, h: u32, mm: f32) -> DepthMap {
        DepthMap {
            values: DepthImage::from_pixel(w, h, Luma([(mm / 0.05).round() as u16])),
            unit_mm: 0.05,
        }
    }

    #[test]
    fn relief_keeps_a_one_pixel_pit_when_shrinking() {
        // A 640x480 flat plate at 150 mm with a 0.4 mm pit on one camera pixel, shrunk 10x.
        let mut depth = flat_depth(640, 480, 150.0);
        depth
            .values
            .put_pixel(333, 222, Luma([((150.0 + 0.4) / 0.05) as u16]));
        let norm = DepthNormalisation {
            reference: HeightReference::Median,
            range_mm: 4.0,
            missing_mm: 0.0,
        };
        let relief = relief_channel(&heights_mm(&depth, norm.reference), &norm, 64, 48);
        // The 3x3 mean spreads the pit to -0.4/9 mm; the 11x11 window removes 1/121 of it.
        let expect = (-0.4 / 9.0 + 0.4 / 121.0) / 4.0;
        let pit = relief.get_pixel(33, 22).0[0];
        assert!((pit - expect).abs() < 1e-4, "{pit} vs {expect}");
        // Elsewhere: flat plate, no relief; far from the pit exactly 0.
        assert_eq!(relief.get_pixel(5, 5).0[0], 0.0);
        let strongest = relief
            .enumerate_pixels()
            .filter(|(x, y, _)| (*x, *y) != (33, 22))
            .map(|(_, _, p)| p.0[0].abs())
            .fold(0.0f32, f32::max);
        assert!(strongest < pit.abs(), "{strongest} elsewhere");
        // Averaging (the height channel's resize) dilutes the same pit 100x.
        let height = imageops::resize(&height_channel(&depth, &norm), 64, 48, FilterType::Triangle);
        assert!(height.get_pixel(33, 22).0[0].abs() < pit.abs() / 3.0);
    }

    #[test]
    fn relief_of_a_bump_is_positive_and_missing_depth_is_none() {
        let mut depth = flat_depth(64, 48, 150.0);
        for (x, y) in [(20, 20), (21, 20), (20, 21), (21, 21)] {
            depth
                .values
                .put_pixel(x, y, Luma([((150.0 - 1.0) / 0.05) as u16]));
        }
        for x in 40..50 {
            depth.values.put_pixel(x, 10, Luma([0]));
        }
        let norm = DepthNormalisation {
            reference: HeightReference::Median,
            ..Default::default()
        };
        let relief = relief_channel(&heights_mm(&depth, norm.reference), &norm, 64, 48);
        assert!(
            relief.get_pixel(20, 20).0[0] > 0.05,
            "{:?}",
            relief.get_pixel(20, 20)
        );
        // Pixels without depth are at `missing_mm` (0 mm: the plate), so neither they nor the
        // plate beside them have relief.
        for x in 38..52 {
            assert_eq!(relief.get_pixel(x, 10).0[0], 0.0, "x {x}");
            assert_eq!(relief.get_pixel(x, 11).0[0], 0.0, "x {x}");
        }
    }

    #[test]
    fn relief_channel_in_the_tensor_and_without_depth() {
        let mut depth = flat_depth(32, 32, 120.0);
        depth
            .values
            .put_pixel(16, 16, Luma([((120.0 + 1.0) / 0.05) as u16]));
        let frame = Frame::new(RgbImage::new(32, 32), Some(depth)).unwrap();
        let spec = InputSpec::rgb_height_relief(16);
        assert_eq!(spec.channels.len(), 5);
        let t = preprocess(&frame, &spec).unwrap();
        let relief = t.slice(s![0, 4, .., ..]);
        let min = relief.iter().copied().fold(0.0f32, f32::min);
        // (-1/9 + 1/25) mm / 4 mm / std 0.1.
        let expect = (-1.0 / 9.0 + 1.0 / 25.0) / 4.0 / 0.1;
        assert!((min - expect).abs() < 1e-4, "{min} vs {expect}");
        assert_eq!(relief[[8usize, 8]], min);
        let rgb_only = Frame::new(RgbImage::new(32, 32), None).unwrap();
        assert_eq!(preprocess(&rgb_only, &spec), Err(PreprocessError::NoDepth));
    }

    #[test]
    fn bead_strip_lays_the_bead_level_through_the_middle() {
        use crate::synth::{SynthClass, SynthConfig, generate};
        let cfg = SynthConfig::new(320, 240);
        let mut spec = InputSpec::rgb_height_relief(0);
        spec.size = [96, 24];
        spec.resize = ResizeMode::BeadStrip { across_mm: 52.0 };
        for seed in 0..6u64 {
            let s = generate(SynthClass::Good, seed, &cfg).unwrap();
            let truth = s.truth.bead.angle_deg;
            let axis = crate::rules::bead_axis(&s.frame).unwrap();
            assert!(axis.dir[0] >= 0.0);
            // Orientation modulo 180 deg agrees with the generator's.
            let found = axis.dir[1]
                .atan2(axis.dir[0])
                .to_degrees()
                .rem_euclid(180.0);
            let off = (found - truth).rem_euclid(180.0);
            assert!(
                off.min(180.0 - off) < 3.0,
                "seed {seed}: {found} vs {truth}"
            );
            let t = preprocess(&s.frame, &spec).unwrap();
            assert_eq!(t.shape(), &[1, 5, 24, 96]);
            // Height (channel 3): the middle rows are the bead (1-3 mm high, 0.25-0.75 of the
            // range over std 0.5), the outer rows the plate (0).
            let row_mean = |r: usize| t.slice(s![0, 3, r, 24..72]).mean().unwrap();
            let (middle, edge) = ((row_mean(11) + row_mean(12)) / 2.0, row_mean(1));
            assert!(
                middle > edge + 0.3,
                "seed {seed}: middle {middle}, edge {edge}"
            );
        }
    }

    #[test]
    fn bead_strip_needs_depth_and_falls_back_without_a_bead() {
        let mut spec = InputSpec::rgb(0);
        spec.size = [32, 8];
        spec.resize = ResizeMode::BeadStrip { across_mm: 52.0 };
        let rgb_only = Frame::new(RgbImage::new(64, 48), None).unwrap();
        assert_eq!(preprocess(&rgb_only, &spec), Err(PreprocessError::NoDepth));
        // A flat plate has no bead: the strip is the image's width, level through its centre,
        // so a uniform image stays uniform.
        let frame = Frame::new(
            RgbImage::from_pixel(64, 48, Rgb([51, 102, 153])),
            Some(flat_depth(64, 48, 150.0)),
        )
        .unwrap();
        let t = preprocess(&frame, &spec).unwrap();
        let expect = (0.2 - 0.485) / 0.229;
        assert!(
            t.slice(s![0, 0, .., ..])
                .iter()
                .all(|v| (v - expect).abs() < 1e-5)
        );
        spec.resize = ResizeMode::BeadStrip { across_mm: 5.0 };
        assert!(matches!(
            preprocess(&frame, &spec),
            Err(PreprocessError::InvalidSpec(p)) if p[0].contains("across_mm")
        ));
    }

    proptest! {
        /// The running sums give what a fresh mean of each window gives, NaNs included.
        #[test]
        fn box_mean_matches_a_mean_per_window(
            (w, h, values) in (1usize..12, 1usize..12).prop_flat_map(|(w, h)| (
                Just(w),
                Just(h),
                proptest::collection::vec(prop_oneof![Just(f32::NAN), -4.0f32..4.0], w * h),
            )),
            r in 0usize..6,
        ) {
            let got = box_mean(&values, w, h, r);
            for y in 0..h {
                for x in 0..w {
                    let window: Vec<f64> = (y.saturating_sub(r)..(y + r + 1).min(h))
                        .flat_map(|yy| (x.saturating_sub(r)..(x + r + 1).min(w))
                            .map(move |xx| yy * w + xx))
                        .map(|i| values[i])
                        .filter(|v| !v.is_nan())
                        .map(f64::from)
                        .collect();
                    let g = got[y * w + x];
                    if window.is_empty() {
                        prop_assert!(g.is_nan());
                    } else {
                        let mean = window.iter().sum::<f64>() / window.len() as f64;
                        prop_assert!((f64::from(g) - mean).abs() < 1e-5, "{g} vs {mean}");
                    }
                }
            }
        }
    }
}
