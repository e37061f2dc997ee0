//! Image cues for frames without depth. Only a burn-through has a signature that colour alone
//! shows reliably (a near-black hole in a bright metal scene); pores, undercut and spatter are
//! millimetre-scale relief that shading alone cannot tell from texture, tint and shadows. So an
//! RGB-only frame is "burn_through" when a large dark hole is seen and otherwise leans "good",
//! and its confidence is capped (`rgb_only_max_confidence`) so the model always decides it.

use crate::frame::Frame;
use crate::result::{Finding, FindingKind};

use super::blobs::regions;
use super::config::RulesConfig;
use super::depth::median;
use super::{Evidence, focal_px};

/// Distance assumed when there is no depth, mm: the middle of the 100-250 mm working range.
const ASSUMED_DISTANCE_MM: f32 = 175.0;
/// A hole is darker than this share of the frame's median brightness.
const DARK_SHARE: f32 = 0.25;

pub(super) fn analyse(frame: &Frame, cfg: &RulesConfig) -> (Evidence, Vec<Finding>) {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    // Work on 2x2 blocks: holes are millimetres wide, and this quarters the cost.
    let (bw, bh) = (w / 2, h / 2);
    let mut evidence = Evidence::default();
    if bw < 2 || bh < 2 {
        return (evidence, Vec::new());
    }
    let raw = frame.rgb().as_raw();
    let luma_at = |x: usize, y: usize| {
        let q = 3 * (y * w + x);
        0.299 * f32::from(raw[q]) + 0.587 * f32::from(raw[q + 1]) + 0.114 * f32::from(raw[q + 2])
    };
    let luma: Vec<f32> = (0..bw * bh)
        .map(|i| {
            let (x, y) = (2 * (i % bw), 2 * (i / bw));
            (luma_at(x, y) + luma_at(x + 1, y) + luma_at(x, y + 1) + luma_at(x + 1, y + 1)) / 4.0
        })
        .collect();
    let mut sorted = luma.clone();
    let mid = median(&mut sorted).max(1.0);
    let mut mask: Vec<bool> = luma.iter().map(|&l| l < DARK_SHARE * mid).collect();
    let fx = focal_px(frame, cfg.depth.assumed_hfov_deg);
    let block_mm = 2.0 * ASSUMED_DISTANCE_MM / fx;
    let mut findings = Vec::new();
    for reg in regions(&mut mask, bw, 0..bw * bh, true) {
        let area = reg.len() as f32 * block_mm * block_mm;
        // Larger than a pore can be (3 mm across) and smaller than a shadowed quarter of the frame.
        if area < 2.0 * cfg.depth.burn_min_area_mm2 || reg.len() * 4 > bw * bh {
            continue;
        }
        evidence.burn = evidence
            .burn
            .max((area / cfg.depth.burn_min_area_mm2).sqrt());
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for &q in &reg {
            x0 = x0.min(q % bw);
            x1 = x1.max(q % bw);
            y0 = y0.min(q / bw);
            y1 = y1.max(q / bw);
        }
        let mut f = Finding::new(
            FindingKind::BurnThrough,
            [
                2 * x0 as u32,
                2 * y0 as u32,
                2 * (x1 - x0 + 1) as u32,
                2 * (y1 - y0 + 1) as u32,
            ],
        );
        f.area_mm2 = Some((area * 100.0).round() / 100.0);
        findings.push(f);
    }
    (evidence, findings)
}
