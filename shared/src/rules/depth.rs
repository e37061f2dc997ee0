//! The depth analysis: plane fit -> height map -> bead and its axis -> rectified strip along the
//! bead -> cross-section profiles -> pores, undercut, spatter and burn-through with measurements.
//!
//! Heights are mm above the fitted base metal (toward the camera). Thresholds come from
//! [`DepthRules`] in mm, raised to a multiple of the measured noise where the sensor is noisier,
//! so the same rules hold for any distance, resolution and camera.

use crate::frame::{DepthMap, Frame};
use crate::plane::{PlaneFitOptions, fit_plane};
use crate::result::{Finding, FindingKind, Measurements};

use super::blobs::regions;
use super::config::DepthRules;
use super::{Evidence, RulesNote, focal_px};

/// What the depth analysis concluded.
#[derive(Debug)]
pub(super) enum DepthOutcome {
    Analysed {
        evidence: Evidence,
        findings: Vec<Finding>,
        measurements: Measurements,
    },
    Unusable(RulesNote),
}

/// The strip: the height map resampled along the bead axis, one sample per
/// pixel; row = position along the bead, column = signed distance across it.
struct Strip {
    /// Column of the bead axis.
    centre_col: usize,
    /// Image point of row 0, column `centre_col`; `dir` along the bead, `nrm` across it.
    origin: [f32; 2],
    dir: [f32; 2],
    nrm: [f32; 2],
    /// Heights (NaN = no depth), and the 3x3 NaN-aware mean of them.
    raw: Vec<f32>,
    smooth: Vec<f32>,
}

impl Strip {
    fn pixel(&self, row: f32, col: f32) -> [f32; 2] {
        let s = col - self.centre_col as f32;
        [
            self.origin[0] + row * self.dir[0] + s * self.nrm[0],
            self.origin[1] + row * self.dir[1] + s * self.nrm[1],
        ]
    }

    /// Row and column (fractional) of an image point.
    fn coords(&self, x: f32, y: f32) -> (f32, f32) {
        let (dx, dy) = (x - self.origin[0], y - self.origin[1]);
        (
            dx * self.dir[0] + dy * self.dir[1],
            dx * self.nrm[0] + dy * self.nrm[1] + self.centre_col as f32,
        )
    }

    /// Pixel box of strip rows `r0..=r1` and columns `c0..=c1`, clipped to the image.
    fn bbox(&self, r0: usize, r1: usize, c0: usize, c1: usize, w: usize, h: usize) -> [u32; 4] {
        let corners = [
            self.pixel(r0 as f32 - 0.5, c0 as f32 - 0.5),
            self.pixel(r0 as f32 - 0.5, c1 as f32 + 0.5),
            self.pixel(r1 as f32 + 0.5, c0 as f32 - 0.5),
            self.pixel(r1 as f32 + 0.5, c1 as f32 + 0.5),
        ];
        let xs = corners.map(|p| p[0]);
        let ys = corners.map(|p| p[1]);
        bbox_from(xs, ys, w, h)
    }
}

fn bbox_from(xs: [f32; 4], ys: [f32; 4], w: usize, h: usize) -> [u32; 4] {
    let fmin = |v: [f32; 4]| v.iter().copied().fold(f32::INFINITY, f32::min);
    let fmax = |v: [f32; 4]| v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let x0 = fmin(xs).floor().clamp(0.0, w as f32 - 1.0) as u32;
    let y0 = fmin(ys).floor().clamp(0.0, h as f32 - 1.0) as u32;
    let x1 = fmax(xs).ceil().clamp(0.0, w as f32 - 1.0) as u32;
    let y1 = fmax(ys).ceil().clamp(0.0, h as f32 - 1.0) as u32;
    [x0, y0, x1.saturating_sub(x0) + 1, y1.saturating_sub(y0) + 1]
}

/// Per strip row: where the bead is.
#[derive(Clone, Copy)]
struct Row {
    /// Toe columns (fractional), smoothed along the bead; NaN where unknown.
    left: f32,
    right: f32,
    /// mm per strip sample at this row (the plate's distance / focal length).
    mm: f32,
}

/// A toe as found in one profile: its column (NaN if not found) and how many missing samples
/// the search stepped over just before it.
#[derive(Clone, Copy)]
struct Toe {
    pos: f32,
    gap: usize,
}

impl Toe {
    const NONE: Toe = Toe {
        pos: f32::NAN,
        gap: 0,
    };

    fn clean(&self) -> bool {
        self.pos.is_finite() && self.gap <= MAX_TOE_GAP
    }
}

/// One profile before smoothing along the bead.
#[derive(Clone, Copy)]
struct RawRow {
    left: Toe,
    right: Toe,
    crown: f32,
}

impl RawRow {
    const NONE: RawRow = RawRow {
        left: Toe::NONE,
        right: Toe::NONE,
        crown: f32::NAN,
    };
}

impl Row {
    fn known(&self) -> bool {
        self.left.is_finite() && self.right.is_finite()
    }
}

/// Longest run of missing samples before a toe for it to count as cleanly seen.
const MAX_TOE_GAP: usize = 2;

/// Finest pixel size the analysis works at, mm: a 0.8 mm pore is still 3-4 px across, and a
/// frame from a high-resolution or close camera is binned down to it first.
const FINEST_PIXEL_MM: f32 = 0.4;

pub(super) fn analyse(frame: &Frame, depth: &DepthMap, r: &DepthRules) -> DepthOutcome {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let fx = focal_px(frame, r.assumed_hfov_deg);
    // Pixel size from the median of a sparse sample of the depth (a plane fit comes later).
    let mut sample: Vec<u16> = depth
        .values
        .as_raw()
        .iter()
        .step_by(97)
        .copied()
        .filter(|&v| v != 0)
        .collect();
    if !sample.is_empty() {
        let mid = sample.len() / 2;
        let z = f32::from(*sample.select_nth_unstable(mid).1) * depth.unit_mm;
        let bin = ((FINEST_PIXEL_MM / (z / fx)).floor() as usize).clamp(1, 4);
        if bin >= 2 && w / bin >= 16 && h / bin >= 16 {
            return analyse_binned(frame, depth, r, bin);
        }
    }
    analyse_at(frame, depth, r)
}

/// Runs the analysis on the frame binned `bin` x `bin` (depth: mean of the valid values, at
/// least half valid; RGB: mean) and maps the findings back to the frame's pixels.
fn analyse_binned(frame: &Frame, depth: &DepthMap, r: &DepthRules, bin: usize) -> DepthOutcome {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let (bw, bh) = (w / bin, h / bin);
    let (raw, rgb) = (depth.values.as_raw(), frame.rgb().as_raw());
    let (dvals, cvals) = match bin {
        2 => bin_pixels::<2>(raw, rgb, w, bw, bh),
        3 => bin_pixels::<3>(raw, rgb, w, bw, bh),
        _ => bin_pixels::<4>(raw, rgb, w, bw, bh),
    };
    let (Some(values), Some(rgb)) = (
        crate::frame::DepthImage::from_raw(bw as u32, bh as u32, dvals),
        image::RgbImage::from_raw(bw as u32, bh as u32, cvals),
    ) else {
        return analyse_at(frame, depth, r);
    };
    let small_depth = DepthMap {
        values,
        unit_mm: depth.unit_mm,
    };
    let Ok(small) = Frame::new(rgb, Some(small_depth.clone())) else {
        return analyse_at(frame, depth, r);
    };
    let scale = 1.0 / bin as f64;
    let small = small.with_intrinsics(frame.intrinsics.map(|i| {
        // Pixel centres: x_small = (x + 0.5) / bin - 0.5.
        let s = i.scaled(scale, scale);
        crate::frame::Intrinsics {
            cx: s.cx + 0.5 * scale - 0.5,
            cy: s.cy + 0.5 * scale - 0.5,
            ..s
        }
    }));
    match analyse_at(&small, &small_depth, r) {
        DepthOutcome::Analysed {
            evidence,
            mut findings,
            measurements,
        } => {
            let b = bin as u32;
            for f in &mut findings {
                let [x, y, fw, fh] = f.bbox;
                f.bbox = [x * b, y * b, fw * b, fh * b];
            }
            DepthOutcome::Analysed {
                evidence,
                findings,
                measurements,
            }
        }
        other => other,
    }
}

/// The depth (`raw`, `w` wide) and RGB binned `B` x `B` into `bw` x `bh`: depth the rounded mean
/// of the valid values where at least half are valid (else 0), RGB the rounded mean. `B` is a
/// constant so the loops over a bin unroll (this pass reads every pixel of a large frame).
fn bin_pixels<const B: usize>(
    raw: &[u16],
    rgb: &[u8],
    w: usize,
    bw: usize,
    bh: usize,
) -> (Vec<u16>, Vec<u8>) {
    let mut dvals = vec![0u16; bw * bh];
    let mut cvals = vec![0u8; bw * bh * 3];
    let (mut s, mut n, mut c) = (vec![0u32; bw], vec![0u32; bw], vec![0u32; 3 * bw]);
    let area = (B * B) as u32;
    for by in 0..bh {
        s.fill(0);
        n.fill(0);
        c.fill(0);
        for y in by * B..(by + 1) * B {
            let drow = &raw[y * w..y * w + bw * B];
            for ((cell, s), n) in drow.chunks_exact(B).zip(&mut s).zip(&mut n) {
                for &v in cell {
                    *s += u32::from(v);
                    *n += u32::from(v != 0);
                }
            }
            let crow = &rgb[3 * y * w..3 * (y * w + bw * B)];
            for (cell, acc) in crow.chunks_exact(3 * B).zip(c.chunks_exact_mut(3)) {
                for px in cell.chunks_exact(3) {
                    for (a, &v) in acc.iter_mut().zip(px) {
                        *a += u32::from(v);
                    }
                }
            }
        }
        let (dout, cout) = (
            &mut dvals[by * bw..(by + 1) * bw],
            &mut cvals[3 * by * bw..3 * (by + 1) * bw],
        );
        for ((d, &s), &n) in dout.iter_mut().zip(&s).zip(&n) {
            if 2 * n >= area {
                *d = ((s + n / 2) / n) as u16;
            }
        }
        for (o, &a) in cout.iter_mut().zip(&c) {
            *o = ((a + area / 2) / area) as u8;
        }
    }
    (dvals, cvals)
}

/// The base metal, the heights above it and the bead found on it: what the analysis and the
/// model input's bead strip ([`super::bead_axis`]) start from.
pub(super) struct BeadFit {
    /// The fitted plane `1 / depth = pa x + pb y + pc`.
    pub pa: f32,
    pub pb: f32,
    pub pc: f32,
    /// Noise of one depth sample, mm.
    pub sigma: f32,
    /// Focal length, px.
    pub fx: f32,
    /// Size of a pixel on the plate at the image centre, mm.
    pub centre_mm: f32,
    /// Height above the plate at every pixel, mm; NaN without depth.
    pub hm: Vec<f32>,
    /// Coarse grid cell side, px.
    pub k: usize,
    /// Centres of the bead's grid cells, px.
    pub pts: Vec<[f32; 2]>,
    /// Centroid of the bead cells, and the unit vectors along and across the bead.
    pub mx: f32,
    pub my: f32,
    pub dir: [f32; 2],
    pub nrm: [f32; 2],
}

/// Fits the plate, measures the heights and finds the bead and its axis.
pub(super) fn find_bead(
    frame: &Frame,
    depth: &DepthMap,
    r: &DepthRules,
) -> Result<BeadFit, RulesNote> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    // (The share of pixels with depth is checked below, counted in the pass that computes the
    // heights rather than in a pass of its own; a frame without enough fails either way.)
    let opts = PlaneFitOptions {
        target_samples: 3000,
        iterations: 4,
        ..Default::default()
    };
    let Some(fit) = fit_plane(depth, &opts) else {
        return Err(RulesNote::InsufficientDepth);
    };
    let (pa, pb, pc) = (fit.plane.a as f32, fit.plane.b as f32, fit.plane.c as f32);
    // Noise of one depth sample, mm: the plane fit's inlier RMS (sensor noise and texture).
    let sigma = (fit.rms_mm as f32).max(0.01);
    let fx = focal_px(frame, r.assumed_hfov_deg);
    let plane_z = |x: f32, y: f32| {
        let inv = pa * x + pb * y + pc;
        if inv > 1e-9 { 1.0 / inv } else { f32::NAN }
    };
    let centre_mm = plane_z(w as f32 / 2.0, h as f32 / 2.0) / fx;
    if !(centre_mm.is_finite() && centre_mm > 0.0) {
        return Err(RulesNote::InsufficientDepth);
    }

    // Height above the plate at every pixel, mm; NaN where there is no depth.
    let unit = depth.unit_mm;
    let mut hm: Vec<f32> = Vec::with_capacity(w * h);
    let mut valid = 0usize;
    for (y, raw) in depth.values.as_raw().chunks_exact(w).enumerate() {
        let row0 = pb * y as f32 + pc;
        // Branch-free, so that it vectorises: no return (0) becomes NaN by selection.
        hm.extend(raw.iter().enumerate().map(|(x, &v)| {
            let height = 1.0 / (pa * x as f32 + row0) - f32::from(v) * unit;
            if v == 0 { f32::NAN } else { height }
        }));
        valid += raw.iter().filter(|&&v| v != 0).count();
    }
    if (valid as f32 / (w * h).max(1) as f32) < r.min_valid_fraction {
        return Err(RulesNote::InsufficientDepth);
    }

    // --- the bead on a coarse grid of ~1 mm cells
    let k = ((1.0 / centre_mm).round() as usize).clamp(2, 8);
    let (gw, gh) = (w / k, h / k);
    if gw < 4 || gh < 4 {
        return Err(RulesNote::InsufficientDepth);
    }
    let (gsum, gcnt) = match k {
        2 => cell_sums::<2>(&hm, w, gw, gh, -r.hole_far_mm),
        3 => cell_sums::<3>(&hm, w, gw, gh, -r.hole_far_mm),
        4 => cell_sums::<4>(&hm, w, gw, gh, -r.hole_far_mm),
        5 => cell_sums::<5>(&hm, w, gw, gh, -r.hole_far_mm),
        6 => cell_sums::<6>(&hm, w, gw, gh, -r.hole_far_mm),
        7 => cell_sums::<7>(&hm, w, gw, gh, -r.hole_far_mm),
        _ => cell_sums::<8>(&hm, w, gw, gh, -r.hole_far_mm),
    };
    let grid: Vec<f32> = gsum
        .iter()
        .zip(&gcnt)
        .map(|(&s, &n)| {
            if n * 4 >= (k * k) as u32 {
                s / n as f32
            } else {
                f32::NAN
            }
        })
        .collect();
    let bead_thr = (0.5 * r.bead_min_height_mm).max(5.0 * sigma / k as f32);
    let mut bead_cell: Vec<bool> = grid.iter().map(|&v| v > bead_thr).collect();
    let cell_mm2 = (k as f32 * centre_mm).powi(2);
    let cells: Vec<usize> = regions(&mut bead_cell, gw, 0..gw * gh, true)
        .into_iter()
        .filter(|m| m.len() as f32 * cell_mm2 >= r.bead_min_area_mm2)
        .flatten()
        .collect();
    if cells.is_empty() {
        return Err(RulesNote::NoBead);
    }
    // Principal axis of the bead cells (pixel coordinates).
    let pts: Vec<[f32; 2]> = cells
        .iter()
        .map(|&i| {
            [
                ((i % gw) * k) as f32 + k as f32 / 2.0,
                ((i / gw) * k) as f32 + k as f32 / 2.0,
            ]
        })
        .collect();
    let n = pts.len() as f32;
    let mx = pts.iter().map(|p| p[0]).sum::<f32>() / n;
    let my = pts.iter().map(|p| p[1]).sum::<f32>() / n;
    let (mut sxx, mut syy, mut sxy) = (0.0f32, 0.0f32, 0.0f32);
    for p in &pts {
        let (dx, dy) = (p[0] - mx, p[1] - my);
        sxx += dx * dx;
        syy += dy * dy;
        sxy += dx * dy;
    }
    let theta = 0.5 * (2.0 * sxy).atan2(sxx - syy);
    let dir = [theta.cos(), theta.sin()];
    let nrm = [-dir[1], dir[0]];
    let tr = (sxx + syy) / n;
    let det = (sxx * syy - sxy * sxy) / (n * n);
    let disc = (tr * tr / 4.0 - det).max(0.0).sqrt();
    let (l1, l2) = (tr / 2.0 + disc, (tr / 2.0 - disc).max(1e-6));
    // A bead is long and narrow: length/width >= 2, i.e. eigenvalue ratio >= 4.
    if l1 / l2 < 4.0 {
        return Err(RulesNote::NoBead);
    }
    Ok(BeadFit {
        pa,
        pb,
        pc,
        sigma,
        fx,
        centre_mm,
        hm,
        k,
        pts,
        mx,
        my,
        dir,
        nrm,
    })
}

fn analyse_at(frame: &Frame, depth: &DepthMap, r: &DepthRules) -> DepthOutcome {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let BeadFit {
        pa,
        pb,
        pc,
        sigma,
        fx,
        centre_mm,
        hm,
        k,
        pts,
        mx,
        my,
        dir,
        nrm,
    } = match find_bead(frame, depth, r) {
        Ok(fit) => fit,
        Err(note) => return DepthOutcome::Unusable(note),
    };
    let plane_z = |x: f32, y: f32| {
        let inv = pa * x + pb * y + pc;
        if inv > 1e-9 { 1.0 / inv } else { f32::NAN }
    };
    let ts: Vec<f32> = pts
        .iter()
        .map(|p| (p[0] - mx) * dir[0] + (p[1] - my) * dir[1])
        .collect();
    let cells_len = ts.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        - ts.iter().copied().fold(f32::INFINITY, f32::min)
        + k as f32;
    // Width of the part above the threshold, px; the full bead is wider (toes are lower).
    let core_px = pts.len() as f32 * (k * k) as f32 / cells_len.max(1.0);
    // The strip runs along the axis for as long as the axis is in the image, so the bead is
    // followed right to the image edges (the coarse cells stop short of them).
    let (t0, t1) = axis_span([mx, my], dir, w as f32, h as f32);
    let len_px = (t1 - t0).max(1.0);
    let half_cols = ((core_px * 0.8 + (r.undercut_search_mm + 2.0) / centre_mm)
        .min(22.0 / centre_mm)
        .ceil() as usize)
        .max(4);

    // --- the strip
    let rows = len_px.ceil() as usize + 1;
    let cols = 2 * half_cols + 1;
    let origin = [mx + t0 * dir[0], my + t0 * dir[1]];
    let mut strip = Strip {
        centre_col: half_cols,
        origin,
        dir,
        nrm,
        raw: vec![f32::NAN; rows * cols],
        smooth: vec![f32::NAN; rows * cols],
    };
    // Nearest pixel: +0.5 then truncation (a floor for the non-negative values kept) instead
    // of `round`, which is a library call on baseline x86_64. The casts go through i32, which
    // is one instruction where a float-to-usize cast is several.
    let (wf, hf) = (w as f32, h as f32);
    let mut raw = std::mem::take(&mut strip.raw);
    // Per strip row, the columns `a..b` that fall inside the image (one run: a line crosses a
    // rectangle once), so missing depth is told apart from the image's edge.
    let mut in_image = vec![(0usize, 0usize); rows];
    for ((i, out), span) in raw.chunks_exact_mut(cols).enumerate().zip(&mut in_image) {
        let (mut a, mut b) = (cols, 0);
        for (j, o) in out.iter_mut().enumerate() {
            let p = strip.pixel(i as f32, j as f32);
            let (x, y) = (p[0] + 0.5, p[1] + 0.5);
            if x >= 0.0 && y >= 0.0 && x < wf && y < hf {
                *o = hm[(y as i32) as usize * w + (x as i32) as usize];
                a = a.min(j);
                b = j + 1;
            }
        }
        *span = (a.min(b), b);
    }
    strip.raw = raw;
    fill_isolated(&mut strip.raw, rows, cols);
    smooth3(&strip.raw, &mut strip.smooth, rows, cols);
    let sigma_s = sigma / 3.0; // 3x3 mean of independent noise

    // --- cross-section profiles: crown and toes per row
    let toe_level = r.toe_level_mm.max(4.0 * sigma_s);
    let search = ((core_px * 0.7).ceil() as usize).max(2).min(half_cols);
    let mut raw_rows: Vec<RawRow> = Vec::with_capacity(rows);
    for (i, &(a, b)) in in_image.iter().enumerate() {
        let line = &strip.smooth[i * cols..(i + 1) * cols];
        let lo = half_cols - search;
        let hi = (half_cols + search).min(cols - 1);
        let mut best = (f32::NEG_INFINITY, half_cols);
        for (j, &v) in line.iter().enumerate().take(hi + 1).skip(lo) {
            if v > best.0 {
                best = (v, j);
            }
        }
        let (crown, cj) = best;
        if crown.is_nan() || crown < r.bead_min_height_mm {
            raw_rows.push(RawRow::NONE);
            continue;
        }
        // Walked within the image only: past its edge nothing is seen, which is not a hole.
        if !(a..b).contains(&cj) {
            raw_rows.push(RawRow::NONE);
            continue;
        }
        let walk = ToeWalk {
            level: toe_level,
            far: -r.hole_far_mm,
            rise: 0.5 * crown,
            ahead: search,
            beyond_hole: r.bead_min_height_mm,
        };
        let shift = |t: Toe| Toe {
            pos: t.pos + a as f32,
            ..t
        };
        let left = shift(walk_to_toe(&line[a..b], cj - a, walk, false));
        let right = shift(walk_to_toe(&line[a..b], cj - a, walk, true));
        raw_rows.push(RawRow { left, right, crown });
    }
    let mm_at_row = |i: usize| {
        let p = strip.pixel(i as f32, half_cols as f32);
        let z = plane_z(p[0], p[1]);
        if z.is_finite() { z / fx } else { centre_mm }
    };
    // Toes smoothed with a running median over ~2 mm along the bead, so a defect that breaks
    // a few profiles (a hole, a deep pore) does not move the bead's edges. A toe seen only
    // across a gap of missing depth (dropouts on a glaring flank) is placed at the far end of
    // the gap, which overstates the width; where possible it is taken instead from the other
    // toe and the median width of rows that show both toes cleanly.
    let mut clean: Vec<f32> = raw_rows
        .iter()
        .filter(|r| r.left.clean() && r.right.clean())
        .map(|r| r.right.pos - r.left.pos)
        .collect();
    let clean_width = median(&mut clean);
    let half_win = ((2.0 / centre_mm).round() as usize).max(2);
    let toes = |pick: fn(&RawRow) -> Toe, clean_only: bool| -> Vec<f32> {
        let pos: Vec<f32> = raw_rows
            .iter()
            .map(|q| {
                let t = pick(q);
                if !clean_only || t.clean() {
                    t.pos
                } else {
                    f32::NAN
                }
            })
            .collect();
        running_medians(&pos, half_win, 3)
    };
    let (lc, rc) = (toes(|q| q.left, true), toes(|q| q.right, true));
    let (la, ra) = (toes(|q| q.left, false), toes(|q| q.right, false));
    let mut prof: Vec<Row> = Vec::with_capacity(rows);
    for i in 0..rows {
        let (l_clean, r_clean, l_any, r_any) = (lc[i], rc[i], la[i], ra[i]);
        let (left, right) = match (
            l_clean.is_finite(),
            r_clean.is_finite(),
            clean_width.is_finite(),
        ) {
            (true, true, _) => (l_clean, r_clean),
            (true, false, true) => (l_clean, (l_clean + clean_width).min(r_any.max(l_clean))),
            (false, true, true) => ((r_clean - clean_width).max(l_any.min(r_clean)), r_clean),
            _ => (l_any, r_any),
        };
        let known = left.is_finite() && right.is_finite() && right > left;
        prof.push(Row {
            left: if known { left } else { f32::NAN },
            right: if known { right } else { f32::NAN },
            mm: mm_at_row(i),
        });
    }
    let mut widths: Vec<f32> = prof
        .iter()
        .filter(|p| p.known())
        .map(|p| (p.right - p.left) * p.mm)
        .collect();
    let known_rows = widths.len();
    if (known_rows as f32) * centre_mm < 4.0 {
        // Less than 4 mm of bead with both toes visible.
        return DepthOutcome::Unusable(RulesNote::NoBead);
    }
    let bead_width_mm = median(&mut widths);
    let mut crowns: Vec<f32> = raw_rows
        .iter()
        .map(|r| r.crown)
        .filter(|v| v.is_finite())
        .collect();
    let bead_height_mm = median(&mut crowns);
    // Bead position for every row: its own toes, or those of the nearest row that has them
    // (near the image edges and across holes the toes are not visible).
    let mut zones: Vec<(f32, f32)> = vec![(f32::NAN, f32::NAN); rows];
    let mut last = None;
    for (i, p) in prof.iter().enumerate() {
        if p.known() {
            last = Some((p.left, p.right));
        }
        if let Some(z) = last {
            zones[i] = z;
        }
    }
    let mut next = None;
    for i in (0..rows).rev() {
        if prof[i].known() {
            next = Some((prof[i].left, prof[i].right));
        }
        match (next, prof[i].known()) {
            (Some(z), false) if !zones[i].0.is_finite() => zones[i] = z,
            // Between two known rows, take the nearer one's (the earlier fill took the one before).
            (Some(z), false) => {
                let before = (0..i)
                    .rev()
                    .find(|&q| prof[q].known())
                    .map_or(usize::MAX, |q| i - q);
                let after = (i..rows)
                    .find(|&q| prof[q].known())
                    .map_or(usize::MAX, |q| q - i);
                if after < before {
                    zones[i] = z;
                }
            }
            _ => {}
        }
    }
    let zone = |i: usize| zones[i.min(rows - 1)];

    let mut findings = Vec::new();
    let mut evidence = Evidence {
        noise_mm: sigma_s,
        ..Evidence::default()
    };

    // --- spatter and burn-through: regions of the full-resolution height map, placed
    // relative to the bead found above.
    let sp_mask_thr = (0.6 * r.spatter_min_height_mm).max(3.5 * sigma);
    let sp_thr = r.spatter_min_height_mm.max(5.0 * sigma);
    let margin_sp = 1.0 / centre_mm;
    let margin_bt = 1.0 / centre_mm;
    let reach = r.spatter_reach_mm / centre_mm;
    let mut sp_mask = vec![false; w * h];
    let mut hole_mask = vec![false; w * h];
    let mut far_mask = vec![false; w * h];
    let (mut sp_seeds, mut hole_seeds, mut far_seeds) = (Vec::new(), Vec::new(), Vec::new());
    // Only pixels within reach of the bead can be spatter or a hole in the joint: per image
    // row, the columns whose distance across the bead stays inside the widest zone + reach.
    let (band_lo, band_hi) = zones
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), z| {
            (a.min(z.0), b.max(z.1))
        });
    let (band_lo, band_hi) = (band_lo - reach - 1.0, band_hi + reach + 1.0);
    // Columns inside every row's zone: a raised pixel there is bead, not spatter, whatever its
    // row (most raised pixels are the bead's, and this skips looking up their row's zone).
    let (inner_lo, inner_hi) = zones
        .iter()
        .fold((f32::NEG_INFINITY, f32::INFINITY), |(a, b), z| {
            (a.max(z.0), b.min(z.1))
        });
    let (inner_lo, inner_hi) = (inner_lo - margin_sp, inner_hi + margin_sp);
    for y in 0..h {
        // Across-bead column at pixel x of this row: c0 + x * nrm[0].
        let c0 = (y as f32 - strip.origin[1]) * strip.nrm[1] - strip.origin[0] * strip.nrm[0]
            + strip.centre_col as f32;
        let (x0, x1) = if strip.nrm[0].abs() < 1e-6 {
            if (band_lo..=band_hi).contains(&c0) {
                (0, w)
            } else {
                (0, 0)
            }
        } else {
            let (a, b) = ((band_lo - c0) / strip.nrm[0], (band_hi - c0) / strip.nrm[0]);
            let (a, b) = (a.min(b).floor().max(0.0), a.max(b).ceil() + 1.0);
            (a as usize, (b.max(0.0) as usize).min(w))
        };
        for x in x0..x1.max(x0) {
            let q = y * w + x;
            let v = hm[q];
            let hole = v.is_nan() || v <= -r.hole_far_mm; // no return, or far behind the plate
            if !(hole || v > sp_mask_thr) {
                continue;
            }
            let (ri, cj) = strip.coords(x as f32, y as f32);
            if !hole && cj >= inner_lo && cj <= inner_hi {
                continue;
            }
            // Nearest row: +0.5 and truncation (`round` is a library call, see the strip).
            let (l, rt) = zone((ri + 0.5).max(0.0) as usize);
            if hole {
                let inside = cj >= l - margin_bt && cj <= rt + margin_bt;
                // Far returns and no returns are labelled apart: a far hole is a hole however it
                // touches a dropout, while a dropout region is judged by its darkness.
                if inside && v.is_nan() {
                    hole_mask[q] = true;
                    hole_seeds.push(q);
                } else if inside {
                    far_mask[q] = true;
                    far_seeds.push(q);
                }
            } else {
                let outside = cj < l - margin_sp || cj > rt + margin_sp;
                let near = cj > l - reach && cj < rt + reach;
                if outside && near {
                    sp_mask[q] = true;
                    sp_seeds.push(q);
                }
            }
        }
    }
    let luma = |q: usize| {
        let p = frame.rgb().as_raw();
        0.299 * f32::from(p[3 * q])
            + 0.587 * f32::from(p[3 * q + 1])
            + 0.114 * f32::from(p[3 * q + 2])
    };
    let mut burn_area = 0.0f32;
    let mut hole_zones: Vec<[f32; 4]> = Vec::new();
    let holes: Vec<Vec<usize>> = regions(&mut far_mask, w, far_seeds, true)
        .into_iter()
        .chain(regions(&mut hole_mask, w, hole_seeds, true))
        .collect();
    if !holes.is_empty() {
        // Reference brightness: the bead surface (rows with toes, the middle half of the bead).
        let mut bead_luma = Vec::new();
        for i in (0..rows).step_by(3) {
            let p = prof[i];
            if !p.known() {
                continue;
            }
            let c = (p.left + p.right) / 2.0;
            let q = (p.right - p.left) / 4.0;
            for jj in [c - q, c, c + q] {
                let px = strip.pixel(i as f32, jj);
                let (x, y) = (px[0].round(), px[1].round());
                if x >= 0.0 && y >= 0.0 && (x as usize) < w && (y as usize) < h {
                    bead_luma.push(luma(y as usize * w + x as usize));
                }
            }
        }
        let ref_luma = if bead_luma.is_empty() {
            128.0
        } else {
            median(&mut bead_luma).max(1.0)
        };
        let dark_luma = r.burn_dark_ratio * ref_luma;
        for reg in holes {
            // A far region is seen through a hole; a region without returns counts only where
            // it is also dark (a hole), not where it is bright (a glint) or plain (a dropout).
            let seen = if reg.first().is_some_and(|&q| hm[q].is_nan()) {
                reg.iter().filter(|&&q| luma(q) < dark_luma).count()
            } else {
                reg.len()
            };
            let area = seen as f32 * centre_mm * centre_mm;
            if area < r.burn_min_area_mm2 {
                continue;
            }
            burn_area = burn_area.max(area);
            // The crater around a hole (the sagging bead, its rim) is part of the burn-through:
            // pits and grooves within one hole diameter (and 1 mm) of it are not counted apart.
            let bb = pixel_bbox(&reg, w);
            let grow = bb[2].max(bb[3]) as f32 + 1.0 / centre_mm;
            hole_zones.push([
                bb[0] as f32 - grow,
                bb[1] as f32 - grow,
                (bb[0] + bb[2]) as f32 + grow,
                (bb[1] + bb[3]) as f32 + grow,
            ]);
            evidence.burn = evidence.burn.max((area / r.burn_min_area_mm2).sqrt());
            let mut f = Finding::new(FindingKind::BurnThrough, pixel_bbox(&reg, w));
            f.area_mm2 = Some(round2(area));
            findings.push(f);
        }
    }

    let mut spatter_count = 0u32;
    for reg in regions(&mut sp_mask, w, sp_seeds, true) {
        if reg.len() < 2 {
            continue;
        }
        let peak = reg.iter().map(|&q| hm[q]).fold(0.0f32, f32::max);
        let area = reg.len() as f32 * centre_mm * centre_mm;
        let diameter = 2.0 * (area / std::f32::consts::PI).sqrt();
        let [dmin, dmax] = r.spatter_diameter_mm;
        let bb = pixel_bbox(&reg, w);
        let centre = [
            bb[0] as f32 + bb[2] as f32 / 2.0,
            bb[1] as f32 + bb[3] as f32 / 2.0,
        ];
        if peak < sp_thr || diameter < dmin || diameter > dmax || near_hole(&hole_zones, centre) {
            continue;
        }
        spatter_count += 1;
        evidence.spatter = evidence.spatter.max(peak / sp_thr);
        let mut f = Finding::new(FindingKind::Spatter, bb);
        f.diameter_mm = Some(round2(diameter));
        findings.push(f);
    }
    if spatter_count > 1 {
        // Several droplets are stronger evidence than one: add a little per extra droplet.
        evidence.spatter += 0.25 * (spatter_count - 1).min(8) as f32;
    }

    // --- pores: compact pits below the local bead surface, inside the bead.
    // The bead is first straightened: each row is resampled at fixed offsets from the bead's
    // centre line, smoothed over the pore window along the bead from rows whose toes are both
    // cleanly seen. Following one offset along the bead then stays at the same place on the
    // cross-section where the bead wanders; on the steep flanks a 0.3 mm sideways shift would
    // otherwise look like a 0.4 mm pit.
    let mut halves: Vec<f32> = prof
        .iter()
        .filter(|p| p.known())
        .map(|p| (p.right - p.left) / 2.0)
        .collect();
    let half_med = median(&mut halves);
    let m_cols = ((2.0 * r.pore_band * half_med).round() as usize).max(3);
    let u_at = |m: usize| r.pore_band * (2.0 * m as f32 / (m_cols - 1) as f32 - 1.0);
    let centre_win = ((r.pore_window_mm / centre_mm).round() as usize).max(3);
    let clean_centre: Vec<f32> = raw_rows
        .iter()
        .map(|q| {
            if q.left.clean() && q.right.clean() {
                (q.left.pos + q.right.pos) / 2.0
            } else {
                f32::NAN
            }
        })
        .collect();
    let centre_line = fit_centre_line(&clean_centre);
    // Pits are looked for in the heights averaged over 3 samples along the bead only: smoothing
    // across as well would halve the depth of a pore 3 px wide. Only the few samples the
    // resampling reads are averaged, not the whole strip.
    let along = |i: usize, j: usize| {
        if i == 0 || i + 1 >= rows {
            return f32::NAN;
        }
        let (a, b, c) = (
            strip.raw[(i - 1) * cols + j],
            strip.raw[i * cols + j],
            strip.raw[(i + 1) * cols + j],
        );
        (a + b + c) / 3.0 // NaN if any is missing
    };
    let mut bead = vec![f32::NAN; rows * m_cols];
    let mut bead_col = vec![f32::NAN; rows * m_cols];
    let centres = running_medians(&clean_centre, centre_win, 5);
    for (i, p) in prof.iter().enumerate() {
        if !p.known() {
            continue;
        }
        let c = if centres[i].is_finite() {
            centres[i]
        } else {
            centre_line(i as f32)
        };
        for m in 0..m_cols {
            let col = c + u_at(m) * half_med;
            bead_col[i * m_cols + m] = col;
            let v = lerp_with(cols, col, |j| along(i, j));
            // Depth far behind the plate is seen through a hole: not a surface to find pits in.
            bead[i * m_cols + m] = if v > -r.hole_far_mm { v } else { f32::NAN };
        }
    }
    let pore_window = ((r.pore_window_mm / 2.0 / centre_mm).round() as usize).max(3);
    let sigma_a = sigma / 3f32.sqrt(); // mean of 3 samples along the bead
    let trim = (0.5 * r.pore_min_depth_mm).max(3.0 * sigma_a);
    let mask_thr = (0.5 * r.pore_min_depth_mm).max(3.0 * sigma_a);
    let pore_thr = r.pore_min_depth_mm.max(5.0 * sigma_a);
    let uc_row_floor = r.pore_min_depth_mm.max(5.0 * sigma_a);
    let resid = pit_residuals(&bead, rows, m_cols, pore_window, trim);
    let mut pmask: Vec<bool> = resid.iter().map(|&v| v > mask_thr).collect();
    let mut pore_count = 0u32;
    for reg in regions(&mut pmask, m_cols, 0..rows * m_cols, false) {
        let depth_mm = reg.iter().map(|&q| resid[q]).fold(0.0f32, f32::max);
        let (mut r0, mut r1, mut c0, mut c1) = (usize::MAX, 0, usize::MAX, 0);
        let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
        for &q in &reg {
            let (ri, mi) = (q / m_cols, q % m_cols);
            r0 = r0.min(ri);
            r1 = r1.max(ri);
            c0 = c0.min(mi);
            c1 = c1.max(mi);
            let px = strip.pixel(ri as f32, bead_col[q]);
            x0 = x0.min(px[0]);
            x1 = x1.max(px[0]);
            y0 = y0.min(px[1]);
            y1 = y1.max(px[1]);
        }
        let mm = prof[(r0 + r1) / 2].mm;
        let (et, seen) = ((r1 - r0 + 1) as f32, (c1 - c0 + 1) as f32);
        // A pit cut by the edge of the band (a pore near a toe) shows only part of its width:
        // it is taken to reach beyond the edge by at most what is seen, so a round pore passes
        // the shape checks and a sliver running along the edge (a flank artefact) does not.
        let es = if c0 == 0 || c1 + 1 == m_cols {
            seen.max(et.min(2.0 * seen))
        } else {
            seen
        };
        let area = reg.len() as f32 * (es / seen) * mm * mm;
        let diameter = 2.0 * (area / std::f32::consts::PI).sqrt();
        let aspect = et.max(es) / et.min(es);
        let [dmin, dmax] = r.pore_diameter_mm;
        let centre = [(x0 + x1) / 2.0, (y0 + y1) / 2.0];
        // A pit whose floor lies below the plate went through the bead: a crater, not a pore.
        let floor = reg.iter().map(|&q| bead[q]).fold(f32::INFINITY, f32::min);
        if depth_mm < pore_thr
            || floor < -uc_row_floor
            || diameter < dmin
            || diameter > dmax
            || aspect > 3.0
            || near_hole(&hole_zones, centre)
        {
            continue;
        }
        pore_count += 1;
        evidence.pore = evidence.pore.max(depth_mm / pore_thr);
        let mut f = Finding::new(
            FindingKind::Pore,
            bbox_from([x0, x1, x0, x1], [y0, y1, y0, y1], w, h),
        );
        f.depth_mm = Some(round2(depth_mm));
        f.diameter_mm = Some(round2(diameter));
        findings.push(f);
    }

    // --- undercut: a groove below the plate just outside a toe, along the bead.
    // The profile beyond each toe is averaged over ~2 mm of bead length (but not across it) at
    // each distance from that row's own toe: a groove runs along the toe, noise does not, so
    // the average keeps even a narrow groove and cuts the noise by the square root of the rows.
    let uc_half = ((1.0 / centre_mm).round() as usize).max(1);
    let sigma_avg = sigma / ((2 * uc_half + 1) as f32).sqrt();
    let uc_thr = r.undercut_min_depth_mm.max(5.0 * sigma_avg);
    let uc_row_thr = (0.7 * r.undercut_min_depth_mm).max(4.0 * sigma_avg);
    let reach_cols = (r.undercut_search_mm / centre_mm).ceil() as usize + 1;
    let mut undercut_depth = 0.0f32;
    for side in [false, true] {
        // Height at distance d (columns) beyond row i's toe, NaN where unknown.
        let beyond = |i: usize, d: usize| -> f32 {
            let p = prof[i];
            if !p.known() {
                return f32::NAN;
            }
            let col = if side {
                p.right + d as f32
            } else {
                p.left - d as f32
            };
            // Unsmoothed across the bead: a groove may be only 2 px wide.
            let v = lerp_at(&strip.raw[i * cols..(i + 1) * cols], col);
            // Depth seen through a hole is no groove floor.
            if v > -r.hole_far_mm { v } else { f32::NAN }
        };
        // Heights beyond each row's toe once, then prefix sums along the bead per distance,
        // so each window average costs O(1).
        let mut psum = vec![0.0f32; (rows + 1) * reach_cols];
        let mut pcnt = vec![0u32; (rows + 1) * reach_cols];
        for i in 0..rows {
            for d in 0..reach_cols {
                let v = beyond(i, d);
                let (k0, k1) = (i * reach_cols + d, (i + 1) * reach_cols + d);
                psum[k1] = psum[k0] + if v.is_finite() { v } else { 0.0 };
                pcnt[k1] = pcnt[k0] + u32::from(v.is_finite());
            }
        }
        // Per row: the deepest averaged point within the search distance, mm below the plate,
        // and its column.
        let groove: Vec<Option<(f32, usize)>> = (0..rows)
            .map(|i| {
                let p = prof[i];
                if !p.known() {
                    return None;
                }
                let (a, b) = (i.saturating_sub(uc_half), (i + uc_half + 1).min(rows));
                let mut best: Option<(f32, usize)> = None;
                for d in 0..reach_cols {
                    let n = pcnt[b * reach_cols + d] - pcnt[a * reach_cols + d];
                    let sum = psum[b * reach_cols + d] - psum[a * reach_cols + d];
                    if n * 2 > (b - a) as u32 && best.is_none_or(|q| -sum / n as f32 > q.0) {
                        let col = if side {
                            p.right + d as f32
                        } else {
                            p.left - d as f32
                        };
                        best = Some((-sum / n as f32, col.clamp(0.0, (cols - 1) as f32) as usize));
                    }
                }
                best.filter(|q| q.0 >= uc_row_thr)
            })
            .collect();
        // Runs of groove rows, bridging gaps up to 1 mm.
        let gap = ((1.0 / centre_mm).round() as usize).max(1);
        let mut i = 0;
        while i < rows {
            if groove[i].is_none() {
                i += 1;
                continue;
            }
            let start = i;
            let mut end = i;
            let mut j = i + 1;
            while j < rows && j <= end + gap + 1 {
                if groove[j].is_some() {
                    end = j;
                }
                j += 1;
            }
            i = end + 1;
            let mut depths: Vec<f32> = groove[start..=end].iter().flatten().map(|g| g.0).collect();
            let length_mm: f32 = (start..=end).map(|q| prof[q].mm).sum();
            let depth_mm = median(&mut depths);
            let in_crater = (start..=end)
                .filter_map(|q| groove[q].map(|g| strip.pixel(q as f32, g.1 as f32)))
                .filter(|p| near_hole(&hole_zones, *p))
                .count()
                * 2
                > (end - start + 1);
            if length_mm < r.undercut_min_length_mm || depth_mm < uc_thr || in_crater {
                continue;
            }
            undercut_depth = undercut_depth.max(depth_mm);
            // A long groove is stronger evidence than a short one of the same depth: noise does
            // not line up along a toe for centimetres.
            let strength = depth_mm / uc_thr * (length_mm / r.undercut_min_length_mm).sqrt();
            evidence.undercut = evidence.undercut.max(strength);
            let (c0, c1) = groove[start..=end]
                .iter()
                .flatten()
                .fold((usize::MAX, 0), |(a, b), g| (a.min(g.1), b.max(g.1)));
            let mut f = Finding::new(FindingKind::Undercut, strip.bbox(start, end, c0, c1, w, h));
            f.depth_mm = Some(round2(depth_mm));
            f.length_mm = Some(round2(length_mm));
            findings.push(f);
        }
    }

    let measurements = Measurements {
        bead_width_mm: Some(round2(bead_width_mm)),
        bead_height_mm: Some(round2(bead_height_mm)),
        pore_count: Some(pore_count),
        undercut_depth_mm: Some(round2(undercut_depth)),
        spatter_count: Some(spatter_count),
        burn_through_area_mm2: Some(round2(burn_area)),
    };
    DepthOutcome::Analysed {
        evidence,
        findings,
        measurements,
    }
}

/// Sums and counts of the heights above `floor` (NaN and depth far behind the plate left out)
/// in `K` x `K` cells of the `w`-wide height map, `gw` x `gh` cells. `K` is a constant so the
/// loop over a cell's row unrolls: the cells are 2-8 pixels wide and this pass reads every
/// pixel of the frame.
fn cell_sums<const K: usize>(
    hm: &[f32],
    w: usize,
    gw: usize,
    gh: usize,
    floor: f32,
) -> (Vec<f32>, Vec<u32>) {
    let mut gsum = vec![0.0f32; gw * gh];
    let mut gcnt = vec![0u32; gw * gh];
    for (y, row) in hm.chunks_exact(w).take(gh * K).enumerate() {
        let (sums, cnts) = (&mut gsum[(y / K) * gw..], &mut gcnt[(y / K) * gw..]);
        for ((cell, s), n) in row
            .chunks_exact(K)
            .zip(sums.iter_mut())
            .zip(cnts.iter_mut())
        {
            for &v in cell {
                let ok = v > floor;
                *s += if ok { v } else { 0.0 };
                *n += u32::from(ok);
            }
        }
    }
    (gsum, gcnt)
}

/// How far each sample lies below its local surface along the bead (mm, positive = pit):
/// per column of `grid` (`rows` x `cols`), the reference is the mean over `±window` rows of the
/// samples not more than `trim` below the plain window mean, so a pit does not pull its own
/// reference down. The reference changes slowly along the bead (it spans millimetres), so it is
/// computed every [`REF_STEP`] rows and interpolated between. NaN where there is no sample or
/// too few neighbours.
fn pit_residuals(grid: &[f32], rows: usize, cols: usize, window: usize, trim: f32) -> Vec<f32> {
    // Column-wise prefix sums (NaN skipped) give each window's plain mean in O(1). All loops
    // run along rows of the grid (every column at once), so they read memory in order and
    // vectorise; each column's arithmetic is the same as a loop down that column.
    let mut psum = vec![0.0f64; (rows + 1) * cols];
    let mut pcnt = vec![0u32; (rows + 1) * cols];
    for i in 0..rows {
        let (done, next) = psum.split_at_mut((i + 1) * cols);
        let (cdone, cnext) = pcnt.split_at_mut((i + 1) * cols);
        let (prev, cprev) = (&done[i * cols..], &cdone[i * cols..]);
        for j in 0..cols {
            let v = grid[i * cols + j];
            let ok = v.is_finite();
            next[j] = prev[j] + if ok { f64::from(v) } else { 0.0 };
            cnext[j] = cprev[j] + u32::from(ok);
        }
    }
    // The reference of every column at row `i`, written into `out`.
    let (mut s2, mut n2, mut m1) = (vec![0.0f32; cols], vec![0u32; cols], vec![0.0f32; cols]);
    let mut reference = |i: usize, out: &mut [f32]| {
        let (a, b) = (i.saturating_sub(window), (i + window + 1).min(rows));
        for j in 0..cols {
            let n1 = pcnt[b * cols + j] - pcnt[a * cols + j];
            m1[j] = ((psum[b * cols + j] - psum[a * cols + j]) / f64::from(n1.max(1))) as f32;
            s2[j] = 0.0;
            n2[j] = 0;
        }
        for ii in a..b {
            let line = &grid[ii * cols..(ii + 1) * cols];
            for j in 0..cols {
                let u = line[j];
                let keep = u >= m1[j] - trim; // false for NaN
                s2[j] += if keep { u } else { 0.0 };
                n2[j] += u32::from(keep);
            }
        }
        for j in 0..cols {
            let n1 = pcnt[b * cols + j] - pcnt[a * cols + j];
            out[j] = if n1 >= 3 && n2[j] >= 3 {
                s2[j] / n2[j] as f32
            } else {
                f32::NAN
            };
        }
    };
    let knots: Vec<usize> = (0..rows).step_by(REF_STEP).chain([rows - 1]).collect();
    let mut refs = vec![0.0f32; knots.len() * cols];
    for (k, &i) in knots.iter().enumerate() {
        reference(i, &mut refs[k * cols..(k + 1) * cols]);
    }
    let mut resid = vec![f32::NAN; rows * cols];
    for (k, pair) in knots.windows(2).enumerate() {
        let (i0, i1) = (pair[0], pair[1]);
        let (r0, r1) = (
            &refs[k * cols..(k + 1) * cols],
            &refs[(k + 1) * cols..(k + 2) * cols],
        );
        for i in i0..=i1 {
            let f = if i1 > i0 {
                (i - i0) as f32 / (i1 - i0) as f32
            } else {
                0.0
            };
            for j in 0..cols {
                let v = grid[i * cols + j];
                if v.is_finite() {
                    let r = r0[j] + (r1[j] - r0[j]) * f;
                    resid[i * cols + j] = r - v;
                }
            }
        }
    }
    resid
}

/// Rows between computed references in [`pit_residuals`].
const REF_STEP: usize = 4;

/// A quadratic `c(row)` through the finite centres, refitted twice without the centres more
/// than 1.5 samples off (rows where a defect or dropout moved a toe); the median centre when
/// too few rows have one.
fn fit_centre_line(centres: &[f32]) -> impl Fn(f32) -> f32 {
    let pts: Vec<(f64, f64)> = centres
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_finite())
        .map(|(i, &c)| (i as f64, f64::from(c)))
        .collect();
    let mut sorted: Vec<f32> = pts.iter().map(|p| p.1 as f32).collect();
    let fallback = f64::from(median(&mut sorted));
    let mut coef = [fallback, 0.0, 0.0];
    let mut keep = vec![true; pts.len()];
    for _ in 0..3 {
        // Normal equations of c = a + b i + q i^2 over the kept points (i scaled to ~1).
        let scale = centres.len().max(1) as f64;
        let mut m = [[0.0f64; 3]; 3];
        let mut rhs = [0.0f64; 3];
        for (&(i, c), _) in pts.iter().zip(&keep).filter(|(_, k)| **k) {
            let x = i / scale;
            let row = [1.0, x, x * x];
            for a in 0..3 {
                for b in 0..3 {
                    m[a][b] += row[a] * row[b];
                }
                rhs[a] += row[a] * c;
            }
        }
        match crate::plane::solve3(m, rhs) {
            Some([a, b, q]) => coef = [a, b / scale, q / (scale * scale)],
            None => break,
        }
        for (k, &(i, c)) in keep.iter_mut().zip(&pts) {
            *k = (c - (coef[0] + coef[1] * i + coef[2] * i * i)).abs() <= 1.5;
        }
    }
    move |i: f32| {
        let i = f64::from(i);
        (coef[0] + coef[1] * i + coef[2] * i * i) as f32
    }
}

/// Fills missing samples that have at least 6 of their 8 neighbours with the mean of those
/// neighbours: isolated dropouts (specular glints on the bead crown) are common, and a ring mean
/// is unbiased on a slope where a one-sided mean is not. Larger holes stay missing.
fn fill_isolated(grid: &mut [f32], rows: usize, cols: usize) {
    let src = grid.to_vec();
    for i in 1..rows.saturating_sub(1) {
        for j in 1..cols.saturating_sub(1) {
            if src[i * cols + j].is_finite() {
                continue;
            }
            let (mut s, mut n) = (0.0f32, 0u32);
            for ii in i - 1..=i + 1 {
                for &v in &src[ii * cols + j - 1..=ii * cols + j + 1] {
                    if v.is_finite() {
                        s += v;
                        n += 1;
                    }
                }
            }
            if n >= 6 {
                grid[i * cols + j] = s / n as f32;
            }
        }
    }
}

/// Whether an image point lies in one of the (grown) hole boxes `[x0, y0, x1, y1]`.
fn near_hole(zones: &[[f32; 4]], p: [f32; 2]) -> bool {
    zones
        .iter()
        .any(|z| p[0] >= z[0] && p[0] <= z[2] && p[1] >= z[1] && p[1] <= z[3])
}

/// Linear interpolation of `line` at fractional index `x`; NaN outside or next to no depth.
fn lerp_at(line: &[f32], x: f32) -> f32 {
    lerp_with(line.len(), x, |i| line[i])
}

/// [`lerp_at`] over `len` samples read through `at`.
fn lerp_with(len: usize, x: f32, at: impl Fn(usize) -> f32) -> f32 {
    if len == 0 || x.is_nan() || x < 0.0 || x > (len - 1) as f32 {
        return f32::NAN;
    }
    // Truncation is the floor here (x >= 0), without the library call `floor` is on baseline
    // x86_64.
    let i = x as usize;
    let f = x - i as f32;
    if f > 0.0 && i + 1 < len {
        let (a, b) = (at(i), at(i + 1));
        a + (b - a) * f
    } else {
        at(i)
    }
}

/// How a profile is walked from the crown to a toe.
#[derive(Clone, Copy)]
struct ToeWalk {
    /// Height of the toe (mm above the plate).
    level: f32,
    /// Depth below which a sample is seen through a hole (mm, negative).
    far: f32,
    /// Height the profile must regain, within `ahead` samples of a drop to `level`, for the
    /// drop to be a dip inside the bead rather than its toe.
    rise: f32,
    ahead: usize,
    /// Height that, seen beyond a hole, is still bead (mm above the plate).
    beyond_hole: f32,
}

/// The toe: the column where the profile drops to `walk.level` for the last time walking from
/// `from` (fractional, linear between samples), stepping over missing samples and samples
/// below `walk.far` (seen through a hole: the bead goes on beyond it) and counting the longest
/// such gap; not found if the strip edge comes first. A drop after which the profile rises
/// back to `walk.rise` within `walk.ahead` samples is a dip inside the bead (the sagging crater
/// around a hole, a pore near the toe), not the toe: the bead only ends where the plate
/// begins. Beyond a hole the bead counts as going on where it stands above `walk.beyond_hole`;
/// a drop followed by a hole (depth seen through the plate) and no bead beyond gives no toe:
/// the bead's end is not seen.
fn walk_to_toe(line: &[f32], from: usize, walk: ToeWalk, right: bool) -> Toe {
    let step = |j: usize| -> Option<usize> {
        if right {
            (j + 1 < line.len()).then_some(j + 1)
        } else {
            j.checked_sub(1)
        }
    };
    let missing = |v: f32| v.is_nan() || v <= walk.far;
    let mut prev = (from, line[from]);
    let mut j = from;
    let (mut gap, mut longest) = (0, 0);
    loop {
        let Some(next) = step(j) else {
            return Toe::NONE;
        };
        j = next;
        let v = line[j];
        if missing(v) {
            gap += 1;
            longest = longest.max(gap);
            continue;
        }
        gap = 0;
        if v <= walk.level {
            // Look beyond the drop for the bead going on; the missing samples crossed on the
            // way count as a gap like any other.
            let (mut k, mut run, mut crossed) = (j, 0, 0);
            let (mut again, mut through_hole) = (None, false);
            for _ in 0..walk.ahead {
                let Some(n) = step(k) else { break };
                k = n;
                let u = line[k];
                if missing(u) {
                    run += 1;
                    crossed = crossed.max(run);
                    through_hole |= u <= walk.far; // depth seen through the plate
                    continue;
                }
                run = 0;
                // The bead regains height; or, past a hole, it is still above the plate (the
                // sagging far side of a crater).
                if u > walk.rise || (crossed > MAX_TOE_GAP && u > walk.beyond_hole) {
                    again = Some(k);
                    break;
                }
            }
            if let Some(k) = again {
                longest = longest.max(crossed);
                prev = (k, line[k]);
                j = k;
                continue;
            }
            if through_hole && crossed > MAX_TOE_GAP {
                // A hole right beyond the drop: the bead may go on past it, so where it ends is
                // not seen in this profile. (Missing depth alone is common beside a toe, on
                // glare, and leaves the drop as the toe.)
                return Toe {
                    pos: f32::NAN,
                    gap: crossed,
                };
            }
            let (pj, pv) = prev;
            let frac = if pv > v {
                (pv - walk.level) / (pv - v)
            } else {
                0.0
            };
            let span = j as f32 - pj as f32;
            return Toe {
                pos: pj as f32 + frac.clamp(0.0, 1.0) * span,
                gap: longest,
            };
        }
        prev = (j, v);
    }
}

/// The range of `t` for which `centre + t * dir` lies inside a `w` x `h` image.
fn axis_span(centre: [f32; 2], dir: [f32; 2], w: f32, h: f32) -> (f32, f32) {
    let (mut lo, mut hi) = (f32::NEG_INFINITY, f32::INFINITY);
    for (c, d, size) in [(centre[0], dir[0], w), (centre[1], dir[1], h)] {
        if d.abs() > 1e-6 {
            let (a, b) = ((0.0 - c) / d, (size - 1.0 - c) / d);
            lo = lo.max(a.min(b));
            hi = hi.min(a.max(b));
        }
    }
    if lo.is_finite() && hi.is_finite() && lo < hi {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

/// 3x3 mean of the valid samples where at least 8 of the 9 are valid, else NaN: on a steep
/// bead flank a mean over a one-sided neighbourhood would be biased by the slope. Separable:
/// sums and counts along rows, then along columns.
fn smooth3(src: &[f32], dst: &mut [f32], rows: usize, cols: usize) {
    // Missing samples count as 0 with weight 0, without branches, so the loops vectorise; the
    // additions happen in the same order as a plain loop, so the sums are bit-identical.
    let val = |v: f32| if v.is_finite() { v } else { 0.0 };
    let cnt = |v: f32| u8::from(v.is_finite());
    let mut hs = vec![0.0f32; rows * cols];
    let mut hn = vec![0u8; rows * cols];
    for i in 0..rows {
        let row = &src[i * cols..(i + 1) * cols];
        let (srow, nrow) = (
            &mut hs[i * cols..(i + 1) * cols],
            &mut hn[i * cols..(i + 1) * cols],
        );
        for j in [0, cols - 1] {
            let (a, b) = (j.saturating_sub(1), (j + 2).min(cols));
            let (mut s, mut n) = (0.0f32, 0u8);
            for &v in &row[a..b] {
                s += val(v);
                n += cnt(v);
            }
            srow[j] = s;
            nrow[j] = n;
        }
        // Interior columns: three neighbours each, written out so the loop vectorises.
        for (j, w3) in row.windows(3).enumerate() {
            srow[j + 1] = val(w3[0]) + val(w3[1]) + val(w3[2]);
            nrow[j + 1] = cnt(w3[0]) + cnt(w3[1]) + cnt(w3[2]);
        }
    }
    let mean = |s: f32, n: usize, all: usize| {
        if n > 0 && n + 1 >= all {
            s / n as f32
        } else {
            f32::NAN
        }
    };
    for i in 0..rows {
        let (a, b) = (i.saturating_sub(1), (i + 2).min(rows));
        let out = &mut dst[i * cols..(i + 1) * cols];
        if b - a == 3 {
            // Interior rows: three rows of sums, written out so the loop vectorises; the two
            // edge columns have 6 neighbours in all, the others 9.
            let (s0, s1, s2) = (
                &hs[a * cols..],
                &hs[(a + 1) * cols..],
                &hs[(a + 2) * cols..],
            );
            let (n0, n1, n2) = (
                &hn[a * cols..],
                &hn[(a + 1) * cols..],
                &hn[(a + 2) * cols..],
            );
            for (j, o) in out.iter_mut().enumerate() {
                let s = s0[j] + s1[j] + s2[j];
                let n = usize::from(n0[j]) + usize::from(n1[j]) + usize::from(n2[j]);
                let all = if j == 0 || j + 1 == cols { 6 } else { 9 };
                *o = mean(s, n, all);
            }
            continue;
        }
        // First and last rows: 6 neighbours in all (4 in the corners).
        let tall = b - a;
        for (j, o) in out.iter_mut().enumerate() {
            let wide = (j + 2).min(cols) - j.saturating_sub(1);
            let (mut s, mut n) = (0.0f32, 0usize);
            for ii in a..b {
                s += hs[ii * cols + j];
                n += usize::from(hn[ii * cols + j]);
            }
            *o = mean(s, n, tall * wide);
        }
    }
}

fn pixel_bbox(reg: &[usize], w: usize) -> [u32; 4] {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for &q in reg {
        let (x, y) = (q % w, q / w);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    [
        x0 as u32,
        y0 as u32,
        (x1 - x0 + 1) as u32,
        (y1 - y0 + 1) as u32,
    ]
}

/// Per index `i`, the median of the finite values among `values[i - half..=i + half]` (clipped
/// to the slice), NaN where fewer than `min_count` are finite: what [`median`] gives for each
/// window, from one sorted window slid along instead of a selection per index.
fn running_medians(values: &[f32], half: usize, min_count: usize) -> Vec<f32> {
    let mut window: Vec<f32> = Vec::with_capacity(2 * half + 1);
    let insert = |w: &mut Vec<f32>, v: f32| {
        if v.is_finite() {
            let at = w.partition_point(|x| x.total_cmp(&v).is_lt());
            w.insert(at, v);
        }
    };
    for &v in values.iter().take(half) {
        insert(&mut window, v);
    }
    let mut out = Vec::with_capacity(values.len());
    for i in 0..values.len() {
        if let Some(&v) = values.get(i + half) {
            insert(&mut window, v);
        }
        if i > half {
            let v = values[i - half - 1];
            if v.is_finite() {
                let at = window.partition_point(|x| x.total_cmp(&v).is_lt());
                window.remove(at);
            }
        }
        out.push(if window.len() >= min_count.max(1) {
            window[window.len() / 2]
        } else {
            f32::NAN
        });
    }
    out
}

/// Median of finite values (reorders `v`); NaN when empty.
pub(super) fn median(v: &mut [f32]) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    let mid = v.len() / 2;
    *v.select_nth_unstable_by(mid, f32::total_cmp).1
}

fn round2(v: f32) -> f32 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WALK: ToeWalk = ToeWalk {
        level: 0.15,
        far: -3.0,
        rise: 1.0,
        ahead: 8,
        beyond_hole: 0.6,
    };
    const N: f32 = f32::NAN;

    /// Walks right from index 0 (the crown).
    fn toe(profile: &[f32]) -> Toe {
        walk_to_toe(profile, 0, WALK, true)
    }

    #[test]
    fn the_toe_is_where_the_flank_meets_the_plate() {
        let t = toe(&[2.0, 1.5, 1.0, 0.5, 0.25, 0.05, 0.0, 0.0]);
        assert!((t.pos - 4.5).abs() < 1e-6, "{}", t.pos);
        assert!(t.clean());
        // Walking left finds the mirror toe.
        let t = walk_to_toe(&[0.0, 0.05, 0.25, 0.5, 2.0], 4, WALK, false);
        assert!((t.pos - 1.5).abs() < 1e-6, "{}", t.pos);
        // No plate before the strip's edge: no toe.
        assert!(toe(&[2.0, 1.5, 1.0]).pos.is_nan());
    }

    #[test]
    fn a_dip_inside_the_bead_is_not_its_toe() {
        // The sagging crater next to a hole drops to the plate and the bead rises again.
        let t = toe(&[2.0, 1.0, 0.1, 0.1, 1.4, 1.5, 0.5, 0.05, 0.0, 0.0]);
        assert!((t.pos - (6.0 + 0.35 / 0.45)).abs() < 1e-5, "{}", t.pos);
        assert!(t.clean());
        // A droplet beside the toe, lower than half the crown, is beyond the toe.
        let t = toe(&[2.0, 1.0, 0.05, 0.0, 0.6, 0.7, 0.0, 0.0]);
        assert!((t.pos - (1.0 + 0.85 / 0.95)).abs() < 1e-5, "{}", t.pos);
    }

    #[test]
    fn missing_depth_beside_the_toe_leaves_the_toe_clean() {
        // Glare on the plate: no returns just beyond the toe, then the plate.
        let t = toe(&[2.0, 1.0, 0.3, 0.1, N, N, N, N, N, 0.0, 0.0]);
        assert!(t.pos > 2.0 && t.pos < 3.0, "{}", t.pos);
        assert!(t.clean());
    }

    #[test]
    fn a_hole_beyond_a_drop_hides_the_toe_or_is_crossed() {
        // Depth seen through a hole right after the drop, plate beyond: the bead's end is not
        // seen in this profile.
        let t = toe(&[
            2.0, 1.0, 0.1, -9.0, -9.0, -9.0, -9.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ]);
        assert!(t.pos.is_nan() && !t.clean());
        // Sagged bead beyond the hole: the walk goes on to the far toe, across a gap.
        let t = toe(&[
            2.0, 1.0, 0.1, -9.0, -9.0, -9.0, -9.0, 0.8, 0.4, 0.05, 0.0, 0.0,
        ]);
        assert!(t.pos > 8.0 && t.pos < 9.0, "{}", t.pos);
        assert_eq!(t.gap, 4);
        assert!(!t.clean());
    }

    proptest! {
        /// The sliding window gives what a fresh median of each window gives, NaNs and
        /// repeated values included.
        #[test]
        fn running_medians_match_a_median_per_window(
            values in proptest::collection::vec(
                prop_oneof![Just(f32::NAN), Just(1.5f32), -50.0f32..50.0], 0..80),
            half in 0usize..12,
            min_count in 0usize..6,
        ) {
            let got = running_medians(&values, half, min_count);
            prop_assert_eq!(got.len(), values.len());
            for (i, g) in got.iter().enumerate() {
                let lo = i.saturating_sub(half);
                let hi = (i + half + 1).min(values.len());
                let mut w: Vec<f32> =
                    values[lo..hi].iter().copied().filter(|v| v.is_finite()).collect();
                let want = if w.len() >= min_count.max(1) { median(&mut w) } else { f32::NAN };
                prop_assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "index {}: {} against {}", i, g, want
                );
            }
        }
    }
}
