//! Robust fit of the base-metal plane in a depth image.
//!
//! For a pinhole camera, a plane `n·P = d` seen at pixel (u, v) has depth
//! `z = d / (n·r(u, v))` with `r` affine in (u, v); so `1/z` is exactly affine in pixel
//! coordinates: `1/z = a·u + b·v + c`. Fitting that model needs no intrinsics and is exact for
//! tilted plates, where fitting `z` itself would bend with perspective.

use crate::frame::DepthMap;

/// A plane in inverse depth: `1/z_mm = a·u + b·v + c` (u, v in pixels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DepthPlane {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

impl DepthPlane {
    /// Depth of the plane at pixel (u, v), mm; `None` where the plane is behind the camera or at
    /// infinity (the fitted plane cannot be seen there).
    pub fn depth_mm(&self, u: f64, v: f64) -> Option<f64> {
        let w = self.a * u + self.b * v + self.c;
        (w > 1e-9).then(|| 1.0 / w)
    }
}

/// The result of a fit, with how well the plane explains the base metal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlaneFit {
    pub plane: DepthPlane,
    /// Sampled pixels that carried depth.
    pub samples: usize,
    /// Samples within the final inlier band.
    pub inliers: usize,
    /// RMS distance of the inliers from the plane, mm (sensor noise plus surface texture).
    pub rms_mm: f64,
}

/// Settings of [`fit_plane`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlaneFitOptions {
    /// About how many pixels to sample on a regular grid.
    pub target_samples: usize,
    /// Fewer valid samples than this: no fit.
    pub min_samples: usize,
    /// Inlier band = max(`k_sigma` · robust sigma, `min_band_mm`).
    pub k_sigma: f64,
    /// Floor of the inlier band, mm: below the noise of short-range depth cameras (~0.1 mm).
    pub min_band_mm: f64,
    /// Re-fits on the inliers of the previous fit.
    pub iterations: usize,
}

impl Default for PlaneFitOptions {
    fn default() -> Self {
        PlaneFitOptions {
            target_samples: 6000,
            min_samples: 50,
            k_sigma: 2.5,
            min_band_mm: 0.15,
            iterations: 5,
        }
    }
}

/// Fits the dominant plane of the depth image, ignoring what stands above or sinks below it
/// (bead, spatter, holes) by iterated trimming with a median-based sigma.
/// `None` when there are too few valid depth pixels or they do not span a plane.
pub fn fit_plane(depth: &DepthMap, opts: &PlaneFitOptions) -> Option<PlaneFit> {
    let (w, h) = depth.values.dimensions();
    let area = w as usize * h as usize;
    let step = ((area as f64 / opts.target_samples.max(1) as f64)
        .sqrt()
        .floor() as u32)
        .max(1);
    let mut pts: Vec<(f64, f64, f64)> = Vec::with_capacity(area / (step * step) as usize + 1);
    for y in (step / 2..h).step_by(step as usize) {
        for x in (step / 2..w).step_by(step as usize) {
            if let Some(z) = depth.mm_at(x, y) {
                pts.push((f64::from(x), f64::from(y), f64::from(z)));
            }
        }
    }
    let samples = pts.len();
    if samples < opts.min_samples.max(3) {
        return None;
    }
    let mut inlier = vec![true; samples];
    let mut plane = solve(&pts, &inlier)?;
    let mut residuals = vec![0.0f64; samples];
    let mut band = f64::INFINITY;
    for _ in 0..opts.iterations {
        for (r, &(u, v, z)) in residuals.iter_mut().zip(&pts) {
            *r = plane.depth_mm(u, v).map_or(f64::INFINITY, |pz| z - pz);
        }
        let mut abs: Vec<f64> = residuals.iter().map(|r| r.abs()).collect();
        let mid = abs.len() / 2;
        let mad = *abs.select_nth_unstable_by(mid, f64::total_cmp).1;
        // 1.4826 turns the median absolute deviation of a normal distribution into its sigma.
        band = (opts.k_sigma * 1.4826 * mad).max(opts.min_band_mm);
        for (keep, r) in inlier.iter_mut().zip(&residuals) {
            *keep = r.abs() <= band;
        }
        match solve(&pts, &inlier) {
            Some(p) => plane = p,
            None => break,
        }
    }
    let (mut n, mut ss) = (0usize, 0.0f64);
    for &(u, v, z) in &pts {
        if let Some(pz) = plane.depth_mm(u, v) {
            let r = z - pz;
            if r.abs() <= band {
                n += 1;
                ss += r * r;
            }
        }
    }
    if n < opts.min_samples.max(3) {
        return None;
    }
    Some(PlaneFit {
        plane,
        samples,
        inliers: n,
        rms_mm: (ss / n as f64).sqrt(),
    })
}

/// Least squares of `1/z = a·u + b·v + c` over the selected points (normal equations, 3x3).
fn solve(pts: &[(f64, f64, f64)], sel: &[bool]) -> Option<DepthPlane> {
    // Centre the pixel coordinates so the normal equations stay well conditioned at 4K sizes.
    let (mut n, mut su, mut sv) = (0.0, 0.0, 0.0);
    for (&(u, v, _), _) in pts.iter().zip(sel).filter(|(_, s)| **s) {
        n += 1.0;
        su += u;
        sv += v;
    }
    if n < 3.0 {
        return None;
    }
    let (mu, mv) = (su / n, sv / n);
    let mut m = [[0.0f64; 3]; 3];
    let mut rhs = [0.0f64; 3];
    for (&(u, v, z), _) in pts.iter().zip(sel).filter(|(_, s)| **s) {
        let row = [u - mu, v - mv, 1.0];
        let w = 1.0 / z;
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += row[i] * row[j];
            }
            rhs[i] += row[i] * w;
        }
    }
    let [a, b, c0] = solve3(m, rhs)?;
    Some(DepthPlane {
        a,
        b,
        c: c0 - a * mu - b * mv,
    })
}

/// Cramer's rule; `None` when the points do not span a plane (all on one line).
pub(crate) fn solve3(m: [[f64; 3]; 3], r: [f64; 3]) -> Option<[f64; 3]> {
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(&m);
    let scale = m[0][0].abs().max(m[1][1].abs()).max(m[2][2].abs());
    if !d.is_finite() || d.abs() <= 1e-12 * scale * scale * scale {
        return None;
    }
    let mut out = [0.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut mk = m;
        for i in 0..3 {
            mk[i][k] = r[i];
        }
        *o = det(&mk) / d;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DepthImage;
    use image::Luma;

    const UNIT: f32 = 0.05;

    /// A plane tilted about both axes, seen by a 600 px focal-length camera, as raw depth.
    fn tilted(w: u32, h: u32) -> (DepthPlane, DepthImage) {
        let plane = DepthPlane {
            a: 2.0e-6,
            b: -1.5e-6,
            c: 1.0 / 180.0,
        };
        let img = DepthImage::from_fn(w, h, |x, y| {
            let z = plane.depth_mm(f64::from(x), f64::from(y)).unwrap();
            Luma([(z / f64::from(UNIT)).round() as u16])
        });
        (plane, img)
    }

    #[test]
    fn recovers_a_tilted_plane_under_a_bead_and_a_hole() {
        let (truth, mut img) = tilted(320, 240);
        for y in 0..240 {
            for x in 0..320 {
                let z = truth.depth_mm(f64::from(x), f64::from(y)).unwrap();
                // A 3 mm high bead over 20% of the width, and a hole 60 mm deeper.
                let z = if (130..194).contains(&x) { z - 3.0 } else { z };
                let z = if (20..40).contains(&x) && (20..40).contains(&y) {
                    z + 60.0
                } else {
                    z
                };
                img.put_pixel(x, y, Luma([(z / f64::from(UNIT)).round() as u16]));
            }
        }
        for x in 0..320 {
            img.put_pixel(x, 100, Luma([0])); // a dropout line
        }
        let fit = fit_plane(
            &DepthMap {
                values: img,
                unit_mm: UNIT,
            },
            &Default::default(),
        )
        .expect("a plane");
        for (u, v) in [
            (0.0, 0.0),
            (319.0, 0.0),
            (160.0, 120.0),
            (0.0, 239.0),
            (319.0, 239.0),
        ] {
            let err = fit.plane.depth_mm(u, v).unwrap() - truth.depth_mm(u, v).unwrap();
            assert!(err.abs() < 0.03, "error {err} mm at ({u},{v})");
        }
        assert!(fit.rms_mm < 0.03, "{fit:?}");
        assert!(
            fit.inliers < fit.samples * 85 / 100,
            "the bead must be outside: {fit:?}"
        );
    }

    #[test]
    fn no_depth_or_a_line_of_depth_gives_no_plane() {
        let empty = DepthMap {
            values: DepthImage::new(64, 48),
            unit_mm: UNIT,
        };
        assert!(fit_plane(&empty, &Default::default()).is_none());
        let mut line = DepthImage::new(64, 48);
        for x in 0..64 {
            line.put_pixel(x, 24, Luma([4000]));
        }
        let line = DepthMap {
            values: line,
            unit_mm: UNIT,
        };
        let opts = PlaneFitOptions {
            target_samples: 64 * 48,
            min_samples: 10,
            ..Default::default()
        };
        assert!(fit_plane(&line, &opts).is_none());
    }
}
