//! Pictures for people: false-colour depth, RGB and depth side by side, contact sheets.

use image::imageops::{self, FilterType};
use image::{Rgb, RgbImage};

use crate::frame::{DepthMap, Frame};
use crate::plane::{PlaneFitOptions, fit_plane};
use crate::result::{Finding, FindingKind};

/// Depth as a colour image for people: height above the fitted base-metal plane (so a bead a
/// few mm high stands out on a tilted plate 200 mm away), near/high warm (red, yellow) and
/// far/low cool (blue), on the Turbo map stretched between the 1st and 99th percentile. Where no
/// plane can be fitted, raw depth is shown the same way. The darkest tenth of the map is not
/// used, so black always means "no depth here".
pub fn depth_false_colour(depth: &DepthMap) -> RgbImage {
    let (w, h) = depth.values.dimensions();
    let plane = fit_plane(depth, &PlaneFitOptions::default()).map(|f| f.plane);
    // Height toward the camera, mm; NaN where there is no depth.
    let heights: Vec<f32> = depth
        .values
        .enumerate_pixels()
        .map(|(x, y, v)| match (v.0[0], plane) {
            (0, _) => f32::NAN,
            (raw, Some(p)) => p
                .depth_mm(f64::from(x), f64::from(y))
                .map_or(f32::NAN, |z| z as f32 - f32::from(raw) * depth.unit_mm),
            (raw, None) => -f32::from(raw) * depth.unit_mm,
        })
        .collect();
    let mut valid: Vec<f32> = heights.iter().copied().filter(|v| v.is_finite()).collect();
    if valid.is_empty() {
        return RgbImage::new(w, h);
    }
    let lo_i = valid.len() / 100;
    let hi_i = (valid.len() * 99 / 100).min(valid.len() - 1);
    let lo = *valid.select_nth_unstable_by(lo_i, f32::total_cmp).1;
    let hi = *valid.select_nth_unstable_by(hi_i, f32::total_cmp).1;
    let span = (hi - lo).max(1e-3);
    let pixels = heights.iter().flat_map(|&v| {
        if v.is_finite() {
            let t = 0.1 + 0.9 * f64::from(((v - lo) / span).clamp(0.0, 1.0));
            let c = colorous::TURBO.eval_continuous(t);
            [c.r, c.g, c.b]
        } else {
            [0, 0, 0]
        }
    });
    RgbImage::from_raw(w, h, pixels.collect()).unwrap_or_else(|| RgbImage::new(w, h))
}

/// The frame's RGB with its false-colour depth on the right (a black half when it has none).
pub fn rgb_and_depth(frame: &Frame) -> RgbImage {
    let right = match frame.depth() {
        Some(d) => depth_false_colour(d),
        None => RgbImage::new(frame.width(), frame.height()),
    };
    let mut out = RgbImage::new(frame.width() * 2, frame.height());
    imageops::replace(&mut out, frame.rgb(), 0, 0);
    imageops::replace(&mut out, &right, i64::from(frame.width()), 0);
    out
}

/// Tiles in rows of `columns`, each scaled to `tile_width` (keeping its aspect ratio), with a
/// 4-pixel dark grey gutter.
pub fn contact_sheet(tiles: &[RgbImage], columns: u32, tile_width: u32) -> RgbImage {
    const GUTTER: u32 = 4;
    let columns = columns.max(1);
    let scaled: Vec<RgbImage> = tiles
        .iter()
        .filter(|t| t.width() > 0 && t.height() > 0)
        .map(|t| {
            let h = (u64::from(t.height()) * u64::from(tile_width) / u64::from(t.width())).max(1);
            imageops::resize(t, tile_width, h as u32, FilterType::Triangle)
        })
        .collect();
    let rows = (scaled.len() as u32).div_ceil(columns);
    let mut row_heights = vec![0u32; rows as usize];
    for (i, t) in scaled.iter().enumerate() {
        let r = i / columns as usize;
        row_heights[r] = row_heights[r].max(t.height());
    }
    let width = columns * (tile_width + GUTTER) + GUTTER;
    let height = row_heights.iter().map(|h| h + GUTTER).sum::<u32>() + GUTTER;
    let mut out = RgbImage::from_pixel(width, height, Rgb([40, 40, 40]));
    let mut y = GUTTER;
    for (r, rh) in row_heights.iter().enumerate() {
        for c in 0..columns as usize {
            if let Some(t) = scaled.get(r * columns as usize + c) {
                let x = GUTTER + c as u32 * (tile_width + GUTTER);
                imageops::replace(&mut out, t, i64::from(x), i64::from(y));
            }
        }
        y += rh + GUTTER;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DepthImage;
    use image::Luma;

    #[test]
    fn near_is_warm_far_is_cool_missing_is_black() {
        let values = DepthImage::from_fn(100, 1, |x, _| {
            Luma([if x == 0 { 0 } else { 3000 + x as u16 }])
        });
        let img = depth_false_colour(&DepthMap {
            values,
            unit_mm: 0.05,
        });
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        let near = img.get_pixel(1, 0).0;
        let far = img.get_pixel(99, 0).0;
        assert!(near[0] > near[2], "near should be red-ish: {near:?}");
        assert!(far[2] > far[0], "far should be blue-ish: {far:?}");
    }

    #[test]
    fn a_bead_on_a_tilted_plate_is_warm_and_the_plate_is_not() {
        // A plate tilted along x (1/z affine in x: depth 150..~180 mm), a 2 mm bead at
        // columns 30..34.
        let values = DepthImage::from_fn(64, 48, |x, _| {
            let plate = 1.0 / (1.0 / 150.0 - 1.7e-5 * x as f32);
            let z = plate - if (30..34).contains(&x) { 2.0 } else { 0.0 };
            Luma([(z / 0.05).round() as u16])
        });
        let img = depth_false_colour(&DepthMap {
            values,
            unit_mm: 0.05,
        });
        let bead = img.get_pixel(31, 20).0;
        let (left, right) = (img.get_pixel(2, 20).0, img.get_pixel(60, 20).0);
        assert!(
            bead[0] > 100 && bead[2] < 50,
            "bead should be red: {bead:?}"
        );
        for plate in [left, right] {
            // Both ends of the tilted plate read as the same low height: blue.
            assert!(
                plate[2] > 200 && plate[0] < 100,
                "plate should be blue: {plate:?}"
            );
        }
    }

    #[test]
    fn sheet_size_follows_tiles() {
        let tiles = vec![RgbImage::new(200, 100); 5];
        let sheet = contact_sheet(&tiles, 2, 100);
        assert_eq!(sheet.dimensions(), (2 * 104 + 4, 3 * 54 + 4));
    }
}

/// The colour a finding of `kind` is drawn in: one per kind, distinct on weld photos (which are
/// mostly grey and orange).
pub fn finding_colour(kind: FindingKind) -> Rgb<u8> {
    match kind {
        FindingKind::Pore => Rgb([255, 40, 40]),
        FindingKind::Undercut => Rgb([255, 220, 0]),
        FindingKind::Spatter => Rgb([0, 200, 255]),
        FindingKind::BurnThrough => Rgb([255, 0, 255]),
    }
}

/// The image with each finding's box outlined in its kind's colour (2 px, clipped to the
/// image). Drawn here rather than with `imageproc`: hollow rectangles are a few lines, and that
/// crate would bring a second copy of much of `image`'s dependency tree.
pub fn annotate(rgb: &RgbImage, findings: &[Finding]) -> RgbImage {
    let mut out = rgb.clone();
    let (w, h) = out.dimensions();
    if w == 0 || h == 0 {
        return out;
    }
    for f in findings {
        let [x, y, bw, bh] = f.bbox;
        let (x0, y0) = (x.min(w - 1), y.min(h - 1));
        let x1 = x.saturating_add(bw.max(1) - 1).min(w - 1);
        let y1 = y.saturating_add(bh.max(1) - 1).min(h - 1);
        let c = finding_colour(f.kind);
        for t in 0..2u32 {
            for px in x0..=x1 {
                out.put_pixel(px, (y0 + t).min(y1), c);
                out.put_pixel(px, y1.saturating_sub(t).max(y0), c);
            }
            for py in y0..=y1 {
                out.put_pixel((x0 + t).min(x1), py, c);
                out.put_pixel(x1.saturating_sub(t).max(x0), py, c);
            }
        }
    }
    out
}

#[cfg(test)]
mod annotate_tests {
    use super::*;

    #[test]
    fn boxes_are_outlined_and_clipped() {
        let img = RgbImage::new(20, 10);
        let f = [
            Finding::new(FindingKind::Pore, [2, 1, 8, 6]),
            Finding::new(FindingKind::Spatter, [15, 5, 50, 50]),
        ];
        let a = annotate(&img, &f);
        assert_eq!(*a.get_pixel(2, 1), finding_colour(FindingKind::Pore));
        assert_eq!(*a.get_pixel(9, 6), finding_colour(FindingKind::Pore));
        // The inside stays as it was.
        assert_eq!(*a.get_pixel(5, 4), Rgb([0, 0, 0]));
        // A box past the edge is drawn up to it.
        assert_eq!(*a.get_pixel(19, 9), finding_colour(FindingKind::Spatter));
    }
}
