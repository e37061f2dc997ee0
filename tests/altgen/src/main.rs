//! altgen: an independent synthetic RGB-D weld-inspection dataset generator.
//!
//! A pinhole depth camera looks down at a tilted steel plate carrying a weld
//! bead. Every pixel ray is intersected exactly with the plate plane and then
//! refined against a height field (bead, defects) by fixed-point iteration.
//! Depth is the z coordinate along the optical axis (RealSense convention).

use std::f64::consts::{FRAC_PI_2, PI, TAU};
use std::fs;
use std::ops::{Add, Mul, Sub};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use clap::Parser;
use image::{ImageBuffer, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

const CLASSES: [&str; 5] = ["good", "porosity", "undercut", "spatter", "burn_through"];
type DepthImage = ImageBuffer<Luma<u16>, Vec<u16>>;

#[derive(Parser, Debug)]
#[command(
    name = "altgen",
    about = "Independent synthetic RGB-D weld inspection dataset generator"
)]
struct Args {
    /// Output dataset folder (must be missing or empty)
    #[arg(long, required_unless_present = "preview")]
    out: Option<PathBuf>,
    /// Number of frames per class
    #[arg(long, required_unless_present = "preview")]
    per_class: Option<usize>,
    /// Master seed; the same seed gives byte-identical output
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image size as WxH
    #[arg(long, default_value = "640x480", value_parser = parse_size)]
    size: (usize, usize),
    /// Depth unit in mm (stored value * unit = depth in mm)
    #[arg(long, default_value_t = 0.1)]
    depth_unit_mm: f64,
    /// Harder variation: more tilt, more noise, brightness and colour cast
    #[arg(long)]
    hard: bool,
    /// Write one contact sheet (one frame per class: RGB | false-colour depth) instead
    #[arg(long)]
    preview: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or("expected WxH, e.g. 640x480")?;
    let w: usize = w.trim().parse().map_err(|e| format!("bad width: {e}"))?;
    let h: usize = h.trim().parse().map_err(|e| format!("bad height: {e}"))?;
    if !(64..=8192).contains(&w) || !(48..=8192).contains(&h) {
        return Err("size must be between 64x48 and 8192x8192".into());
    }
    Ok((w, h))
}

// ---------------------------------------------------------------- math utils

#[derive(Clone, Copy, Debug, Default)]
struct V3 {
    x: f64,
    y: f64,
    z: f64,
}

impl V3 {
    const fn new(x: f64, y: f64, z: f64) -> Self {
        V3 { x, y, z }
    }
    fn dot(self, o: V3) -> f64 {
        self.x * o.x + self.y * o.y + self.z * o.z
    }
    fn cross(self, o: V3) -> V3 {
        V3::new(
            self.y * o.z - self.z * o.y,
            self.z * o.x - self.x * o.z,
            self.x * o.y - self.y * o.x,
        )
    }
    fn unit(self) -> V3 {
        let l = self.dot(self).sqrt().max(1e-12);
        self * (1.0 / l)
    }
}
macro_rules! v3_op {
    ($tr:ident, $f:ident, $op:tt) => {
        impl $tr for V3 {
            type Output = V3;
            fn $f(self, o: V3) -> V3 {
                V3::new(self.x $op o.x, self.y $op o.y, self.z $op o.z)
            }
        }
    };
}
v3_op!(Add, add, +);
v3_op!(Sub, sub, -);
impl Mul<f64> for V3 {
    type Output = V3;
    fn mul(self, k: f64) -> V3 {
        V3::new(self.x * k, self.y * k, self.z * k)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn frame_seed(seed: u64, class: usize, index: usize) -> u64 {
    splitmix(splitmix(splitmix(seed) ^ (class as u64 + 1)) ^ index as u64)
}

fn uni(rng: &mut ChaCha8Rng, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    rng.sample::<f64, _>(StandardNormal)
}

fn smoothstep(e0: f64, e1: f64, x: f64) -> f64 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

fn lerp3(a: [f64; 3], b: [f64; 3], t: f64) -> [f64; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

/// Hash-based lattice value in [0, 1).
fn lattice(x: i64, y: i64, s: u64) -> f64 {
    let h = splitmix(
        s ^ (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Smooth 2D value noise in [0, 1).
fn vnoise(x: f64, y: f64, s: u64) -> f64 {
    let ffloor = |t: f64| {
        let i = t as i64 as f64;
        if i > t { i - 1.0 } else { i }
    };
    let (fx, fy) = (ffloor(x), ffloor(y));
    let (ix, iy) = (fx as i64, fy as i64);
    let (tx, ty) = (x - fx, y - fy);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let a = lattice(ix, iy, s) + (lattice(ix + 1, iy, s) - lattice(ix, iy, s)) * sx;
    let b = lattice(ix, iy + 1, s) + (lattice(ix + 1, iy + 1, s) - lattice(ix, iy + 1, s)) * sx;
    a + (b - a) * sy
}

/// Fractal value noise in roughly [0, 1).
fn fbm(x: f64, y: f64, s: u64, octaves: u32) -> f64 {
    let (mut sum, mut amp, mut norm, mut fr) = (0.0, 1.0, 0.0, 1.0);
    for o in 0..octaves {
        sum += amp
            * vnoise(
                x * fr + 17.3 * o as f64,
                y * fr - 9.1 * o as f64,
                s.wrapping_add(o as u64),
            );
        norm += amp;
        amp *= 0.5;
        fr *= 2.03;
    }
    sum / norm
}

// ---------------------------------------------------------------- scene model

#[derive(Clone, Copy)]
struct Cfg {
    w: usize,
    h: usize,
    f: f64,
    unit: f64,
    hard: bool,
}

/// Weld bead in its own 2D frame: `a` along the bead, `b` across it (mm).
struct Bead {
    q: [f64; 2],
    t: [f64; 2],
    hw0: f64,
    k: f64,
    rip_amp: f64,
    rip_aa: f64,
    rip_k: f64,
    rip_curv: f64,
    rip_sharp: f64,
    seed: u64,
    /// (centre offset, half width, height) tabulated every TRACK_STEP mm along the bead
    track: Vec<[f64; 3]>,
}

const TRACK_HALF: f64 = 800.0;
const TRACK_STEP: f64 = 0.1;

impl Bead {
    fn ab(&self, s: f64, w: f64) -> (f64, f64) {
        let (ds, dw) = (s - self.q[0], w - self.q[1]);
        (
            ds * self.t[0] + dw * self.t[1],
            -ds * self.t[1] + dw * self.t[0],
        )
    }
    fn sw(&self, a: f64, b: f64) -> (f64, f64) {
        (
            self.q[0] + a * self.t[0] - b * self.t[1],
            self.q[1] + a * self.t[1] + b * self.t[0],
        )
    }
    fn at(&self, a: f64) -> [f64; 3] {
        let x = ((a + TRACK_HALF) / TRACK_STEP).clamp(0.0, (self.track.len() - 2) as f64);
        let (i, f) = (x as usize, x.fract());
        lerp3(self.track[i], self.track[i + 1], f)
    }
    fn center(&self, a: f64) -> f64 {
        self.at(a)[0]
    }
    fn hw(&self, a: f64) -> f64 {
        self.at(a)[1]
    }
    fn ripple_phase(&self, a: f64, u: f64) -> f64 {
        self.rip_k * (a - self.rip_curv * self.hw0 * u * u)
    }
    /// Cross-section: cos^k cap whose width/height drift along the bead, plus
    /// chevron-shaped solidification ripples and a little roughness.
    /// Returns (height, normalised across coordinate u, distance beyond the toe in mm).
    fn profile(&self, a: f64, b: f64) -> (f64, f64, f64) {
        let [c, hw, ht] = self.at(a);
        let u = (b - c) / hw;
        if u.abs() >= 1.0 {
            return (0.0, u, (b - c).abs() - hw);
        }
        let base = ht * (FRAC_PI_2 * u).cos().powf(self.k);
        let env = 1.0 - u * u;
        let ph = self.ripple_phase(a, u);
        let rip = self.rip_amp * self.rip_aa * (ph.sin() + self.rip_sharp * (2.0 * ph).sin())
            / (1.0 + self.rip_sharp);
        let rough = 0.03 * (vnoise(a * 2.0, b * 2.0, self.seed) - 0.5);
        ((base + (rip + rough) * env).max(0.0), u, 0.0)
    }
}

enum Defect {
    Pore {
        a: f64,
        b: f64,
        r: f64,
        d: f64,
    },
    Groove {
        side: f64,
        a0: f64,
        a1: f64,
        ghw: f64,
        d: f64,
    },
    Drop {
        a: f64,
        b: f64,
        r: f64,
        hf: f64,
    },
    Hole {
        a: f64,
        b: f64,
        r: f64,
        harm: [f64; 4],
        sag_r: f64,
        sag_d: f64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mat {
    Plate,
    Bead,
    Drop,
    Hole,
}

struct Surf {
    h: f64,
    mat: Mat,
    cav: f64,
    a: f64,
    b: f64,
    u: f64,
    toe: f64,
}

struct Scene {
    cfg: Cfg,
    p0: V3,
    n: V3,
    e1: V3,
    e2: V3,
    c: f64,
    bead: Bead,
    defects: Vec<Defect>,
    behind: Option<f64>,
    wave_amp: f64,
    seed: u64,
}

impl Scene {
    fn ray(&self, u: f64, v: f64) -> V3 {
        V3::new(
            (u - self.cfg.w as f64 / 2.0) / self.cfg.f,
            (v - self.cfg.h as f64 / 2.0) / self.cfg.f,
            1.0,
        )
    }
    fn plate_sw(&self, x: V3) -> (f64, f64) {
        let r = x - self.p0;
        (r.dot(self.e1), r.dot(self.e2))
    }
    /// Exact intersection of a pixel ray with the plate plane lifted by `h` mm.
    fn hit(&self, d: V3, h: f64) -> V3 {
        d * ((self.c + h) / self.n.dot(d))
    }
    fn project_ab(&self, a: f64, b: f64, h: f64) -> (f64, f64) {
        let (s, w) = self.bead.sw(a, b);
        let x = self.p0 + self.e1 * s + self.e2 * w + self.n * h;
        let cx = self.cfg.w as f64 / 2.0;
        let cy = self.cfg.h as f64 / 2.0;
        (self.cfg.f * x.x / x.z + cx, self.cfg.f * x.y / x.z + cy)
    }
    fn inside(&self, a: f64, b: f64, m: f64) -> bool {
        let (u, v) = self.project_ab(a, b, 0.0);
        u >= m && v >= m && u <= self.cfg.w as f64 - 1.0 - m && v <= self.cfg.h as f64 - 1.0 - m
    }
    /// True when the disc of radius r around (a, b) projects fully into the image.
    fn disc_inside(&self, a: f64, b: f64, r: f64) -> bool {
        [(r, 0.0), (-r, 0.0), (0.0, r), (0.0, -r)]
            .iter()
            .all(|&(da, db)| self.inside(a + da, b + db, 3.0))
    }
    /// Range of `a` for which the bead centre line is visible.
    fn visible_a(&self) -> (f64, f64) {
        let vis = (-2400..=2400)
            .map(|i| i as f64 * 0.25)
            .filter(|&a| self.inside(a, self.bead.center(a), 2.0));
        vis.fold((f64::MAX, f64::MIN), |(lo, hi), a| (lo.min(a), hi.max(a)))
    }

    /// Gentle plate waviness (mm).
    fn wave(&self, s: f64, w: f64) -> f64 {
        self.wave_amp * (2.0 * fbm(s * 0.035, w * 0.035, self.seed ^ 0x55, 2) - 1.0)
    }
    /// Height field above the plate plane at plate coordinates (s, w).
    fn eval(&self, s: f64, w: f64, plate_h: f64) -> Surf {
        let (a, b) = self.bead.ab(s, w);
        let (bh, u, toe) = self.bead.profile(a, b);
        let mut h = plate_h + bh;
        let mut mat = if bh > 0.0 { Mat::Bead } else { Mat::Plate };
        let mut cav: f64 = 0.0;
        for d in &self.defects {
            match *d {
                Defect::Pore { a: pa, b: pb, r, d } => {
                    let rho2 = (a - pa).powi(2) + (b - pb).powi(2);
                    if rho2 < r * r {
                        let dd = d * (1.0 - rho2 / (r * r)).sqrt();
                        h -= dd;
                        cav = cav.max(0.45 + 0.45 * dd / d);
                    }
                }
                Defect::Groove {
                    side,
                    a0,
                    a1,
                    ghw,
                    d,
                } => {
                    if a > a0 && a < a1 {
                        let bc = self.bead.center(a) + side * (self.bead.hw(a) + 0.35 * ghw);
                        let x = (b - bc) / ghw;
                        if x.abs() < 1.0 {
                            let env = smoothstep(a0, a0 + 2.5, a) * smoothstep(a1, a1 - 2.5, a);
                            let g = d * env * (1.0 - x * x);
                            if g > 0.0 && plate_h - g < h {
                                h = plate_h - g;
                                mat = Mat::Plate;
                            }
                            cav = cav.max(0.75 * g / d);
                        }
                    }
                }
                Defect::Drop {
                    a: pa,
                    b: pb,
                    r,
                    hf,
                } => {
                    let rho2 = (a - pa).powi(2) + (b - pb).powi(2);
                    if rho2 < r * r {
                        let hd = plate_h + hf * (r * r - rho2).sqrt();
                        if hd > h {
                            h = hd;
                            mat = Mat::Drop;
                        }
                    } else if rho2 < 2.56 * r * r {
                        cav = cav.max(0.5 * (1.0 - (rho2.sqrt() - r) / (0.6 * r)));
                    }
                }
                Defect::Hole {
                    a: pa,
                    b: pb,
                    r,
                    harm,
                    sag_r,
                    sag_d,
                } => {
                    let (da, db) = (a - pa, b - pb);
                    let rho = (da * da + db * db).sqrt();
                    if rho < sag_r {
                        let ang = db.atan2(da);
                        let rr = r
                            * (1.0
                                + harm[0] * (2.0 * ang + harm[1]).sin()
                                + harm[2] * (3.0 * ang + harm[3]).sin());
                        if rho < rr {
                            mat = Mat::Hole;
                        } else {
                            let x = rho / sag_r;
                            h -= sag_d * (1.0 - x * x).powi(2);
                            cav = cav.max(0.55 * (1.0 - (rho - rr) / (sag_r - rr)).clamp(0.0, 1.0));
                        }
                    }
                }
            }
        }
        Surf {
            h,
            mat,
            cav,
            a,
            b,
            u,
            toe,
        }
    }
}

/// Draws a scene; if the class's defect cannot be placed in view, the scene is redrawn.
fn build_scene(cfg: Cfg, class: usize, rng: &mut ChaCha8Rng) -> Scene {
    loop {
        let mut sc = draw_scene(cfg, rng);
        if place_defects(&mut sc, class, rng) {
            return sc;
        }
    }
}

fn draw_scene(cfg: Cfg, rng: &mut ChaCha8Rng) -> Scene {
    let hard = cfg.hard;
    let dist = uni(rng, 100.0, 250.0);
    let tilt = uni(rng, 0.0, if hard { 20.0 } else { 8.0 }).to_radians();
    let psi = uni(rng, 0.0, TAU);
    let n = V3::new(tilt.sin() * psi.cos(), tilt.sin() * psi.sin(), -tilt.cos());
    let e1 = n.cross(V3::new(0.0, 1.0, 0.0)).unit();
    let e2 = n.cross(e1).unit();
    let p0 = V3::new(0.0, 0.0, dist);
    let seed = rng.random::<u64>();
    let (hw0, h0) = (uni(rng, 5.6, 10.8) / 2.0, uni(rng, 1.1, 2.8));
    // Meandering centre line (<= 0.4 mm), width drift (<= 8 %), height drift (<= 6 %) as sines.
    let mut sine = |amp: f64, l0: f64, l1: f64| {
        [
            uni(rng, 0.0, amp),
            TAU / uni(rng, l0, l1),
            uni(rng, 0.0, TAU),
        ]
    };
    let drift = [
        sine(0.4, 25.0, 80.0),
        sine(0.05, 15.0, 60.0),
        sine(0.03, 4.0, 12.0),
        sine(0.06, 10.0, 50.0),
    ];
    let sn = |i: usize, a: f64| drift[i][0] * (drift[i][1] * a + drift[i][2]).sin();
    let track = (0..=(2.0 * TRACK_HALF / TRACK_STEP) as usize)
        .map(|i| i as f64 * TRACK_STEP - TRACK_HALF)
        .map(|a| {
            [
                sn(0, a),
                hw0 * (1.0 + sn(1, a) + sn(2, a)),
                h0 * (1.0 + sn(3, a)),
            ]
        })
        .collect();
    let rip_lambda = uni(rng, 0.7, 2.0);
    let bead = Bead {
        q: [0.0, 0.0],
        t: [1.0, 0.0],
        hw0,
        k: uni(rng, 0.6, 1.4),
        rip_amp: uni(rng, 0.05, 0.15),
        // ripples finer than a few pixels are attenuated (the optics would blur them)
        rip_aa: 0.3 + 0.7 * smoothstep(1.5, 4.0, rip_lambda * cfg.f / dist),
        rip_k: TAU / rip_lambda * if rng.random::<bool>() { 1.0 } else { -1.0 },
        rip_curv: uni(rng, 0.2, 0.9),
        rip_sharp: uni(rng, 0.0, 0.5),
        seed: seed ^ 0xBEAD,
        track,
    };
    let mut sc = Scene {
        cfg,
        p0,
        n,
        e1,
        e2,
        c: n.dot(p0),
        bead,
        defects: Vec::new(),
        behind: None,
        wave_amp: uni(rng, 0.0, 0.05),
        seed,
    };
    // Bead line: through a point within 25% of the image centre, any image angle.
    let (w, h) = (cfg.w as f64, cfg.h as f64);
    let ou = w / 2.0 + uni(rng, -0.25, 0.25) * w;
    let ov = h / 2.0 + uni(rng, -0.25, 0.25) * h;
    let th = uni(rng, 0.0, PI);
    let q = sc.plate_sw(sc.hit(sc.ray(ou, ov), 0.0));
    let q2 = sc.plate_sw(sc.hit(sc.ray(ou + 50.0 * th.cos(), ov + 50.0 * th.sin()), 0.0));
    let l = ((q2.0 - q.0).powi(2) + (q2.1 - q.1).powi(2)).sqrt();
    sc.bead.q = [q.0, q.1];
    sc.bead.t = [(q2.0 - q.0) / l, (q2.1 - q.1) / l];
    sc
}

/// True when a disc of radius r at (a, b) keeps clear of the pores/droplets placed so far.
fn clear(defects: &[Defect], a: f64, b: f64, r: f64) -> bool {
    defects.iter().all(|d| match *d {
        Defect::Pore {
            a: pa,
            b: pb,
            r: pr,
            ..
        }
        | Defect::Drop {
            a: pa,
            b: pb,
            r: pr,
            ..
        } => (a - pa).hypot(b - pb) > r + pr,
        _ => true,
    })
}

fn place_defects(sc: &mut Scene, class: usize, rng: &mut ChaCha8Rng) -> bool {
    let (amin, amax) = sc.visible_a();
    let mut defects: Vec<Defect> = Vec::new();
    match class {
        1 => {
            let count = rng.random_range(1..=5);
            for _ in 0..400 {
                if defects.len() >= count {
                    break;
                }
                let a = uni(rng, amin, amax);
                let hw = sc.bead.hw(a);
                let r = uni(rng, 0.5, 1.5).min(0.42 * hw);
                let lim = (0.6 * hw - r).max(0.0);
                let b = sc.bead.center(a) + uni(rng, -lim, lim);
                if clear(&defects, a, b, r + 0.4) && sc.disc_inside(a, b, r) {
                    defects.push(Defect::Pore {
                        a,
                        b,
                        r,
                        d: uni(rng, 0.3, 1.2),
                    });
                }
            }
        }
        2 => {
            let ghw = uni(rng, 0.25, 0.75);
            let d = uni(rng, 0.3, 1.0);
            for _ in 0..400 {
                let max_len = (amax - amin - 6.0).clamp(10.0, 50.0);
                let len = uni(rng, 10.0, max_len);
                let a0 = uni(rng, amin + 3.0, (amax - 3.0 - len).max(amin + 3.0));
                let a1 = a0 + len;
                let side = if rng.random::<bool>() { 1.0 } else { -1.0 };
                let ok = [a0, (a0 + a1) / 2.0, a1].iter().all(|&a| {
                    let b = sc.bead.center(a) + side * (sc.bead.hw(a) + 0.35 * ghw);
                    sc.disc_inside(a, b, ghw)
                });
                if ok {
                    defects.push(Defect::Groove {
                        side,
                        a0,
                        a1,
                        ghw,
                        d,
                    });
                    break;
                }
            }
        }
        3 => {
            let count = rng.random_range(2..=15);
            for _ in 0..2000 {
                if defects.len() >= count {
                    break;
                }
                let a = uni(rng, amin, amax);
                let r = uni(rng, 0.25, 1.0);
                let side = if rng.random::<bool>() { 1.0 } else { -1.0 };
                let gap = uni(rng, (r + 0.3).max(1.0), 20.0);
                let b = sc.bead.center(a) + side * (sc.bead.hw(a) + gap);
                if clear(&defects, a, b, r + 0.3) && sc.disc_inside(a, b, r) {
                    defects.push(Defect::Drop {
                        a,
                        b,
                        r,
                        hf: uni(rng, 0.6, 1.0),
                    });
                }
            }
        }
        4 => {
            for _ in 0..400 {
                let r = uni(rng, 1.0, 3.0);
                let a = uni(rng, amin, amax);
                let b = sc.bead.center(a) + uni(rng, -0.25, 0.25) * sc.bead.hw(a);
                let sag_r = r * uni(rng, 1.5, 2.2);
                if sc.disc_inside(a, b, sag_r) {
                    let harm = [
                        uni(rng, 0.0, 0.12),
                        uni(rng, 0.0, TAU),
                        uni(rng, 0.0, 0.08),
                        uni(rng, 0.0, TAU),
                    ];
                    defects.push(Defect::Hole {
                        a,
                        b,
                        r,
                        harm,
                        sag_r,
                        sag_d: uni(rng, 0.2, 0.6),
                    });
                    break;
                }
            }
            sc.behind = if rng.random::<bool>() {
                Some(uni(rng, 30.0, 100.0))
            } else {
                None
            };
        }
        _ => {}
    }
    let ok = defects.len() >= [0, 1, 1, 2, 1][class];
    sc.defects = defects;
    ok
}

// ---------------------------------------------------------------- rendering

struct Frame {
    rgb: RgbImage,
    depth: DepthImage,
    /// noise-free depth of the bare plate plane per pixel (for the preview)
    plane: Vec<f64>,
}

struct Px {
    x: V3,
    z0: f64,
    s: Surf,
}

fn heat_color(t: f64) -> [f64; 3] {
    const STOPS: [(f64, [f64; 3]); 6] = [
        (0.0, [0.30, 0.24, 0.20]),
        (0.15, [0.74, 0.60, 0.32]),
        (0.35, [0.62, 0.38, 0.24]),
        (0.55, [0.44, 0.28, 0.50]),
        (0.75, [0.32, 0.44, 0.66]),
        (1.0, [0.52, 0.55, 0.60]),
    ];
    let t = t.clamp(0.0, 1.0);
    for win in STOPS.windows(2) {
        let ((t0, c0), (t1, c1)) = (win[0], win[1]);
        if t <= t1 {
            return lerp3(c0, c1, (t - t0) / (t1 - t0));
        }
    }
    STOPS[5].1
}

fn render(sc: &Scene, rng: &mut ChaCha8Rng) -> Frame {
    let (w, h) = (sc.cfg.w, sc.cfg.h);
    // 1. geometry: exact ray/plane hit, refined against the height field.
    let mut px: Vec<Px> = Vec::with_capacity(w * h);
    for v in 0..h {
        for u in 0..w {
            let d = sc.ray(u as f64, v as f64);
            let x0 = sc.hit(d, 0.0);
            let (s0, w0) = sc.plate_sw(x0);
            let plate_h = sc.wave(s0, w0);
            // fixed-point iteration: re-intersect the ray with the plane lifted by the height found
            let (mut surf, mut hh) = (sc.eval(s0, w0, plate_h), 0.0);
            for _ in 0..6 {
                if surf.mat == Mat::Hole || (surf.h - hh).abs() < 0.04 {
                    break;
                }
                hh = surf.h;
                let (s, ww) = sc.plate_sw(sc.hit(d, hh));
                surf = sc.eval(s, ww, plate_h);
            }
            let x = sc.hit(d, if surf.mat == Mat::Hole { 0.0 } else { surf.h });
            px.push(Px {
                x,
                z0: x0.z,
                s: surf,
            });
        }
    }
    // 2. normals from neighbouring 3D points (noise free).
    let pos = |u: usize, v: usize, fallback: V3| {
        let p = &px[v * w + u];
        if p.s.mat == Mat::Hole { fallback } else { p.x }
    };
    let mut normals = vec![V3::new(0.0, 0.0, -1.0); w * h];
    for v in 0..h {
        for u in 0..w {
            let c = px[v * w + u].x;
            let dx = pos((u + 1).min(w - 1), v, c) - pos(u.saturating_sub(1), v, c);
            let dy = pos(u, (v + 1).min(h - 1), c) - pos(u, v.saturating_sub(1), c);
            let mut nn = dx.cross(dy);
            if nn.dot(c) > 0.0 {
                nn = nn * -1.0;
            }
            if nn.dot(nn) > 1e-18 {
                normals[v * w + u] = nn.unit();
            }
        }
    }
    let rgb = shade(sc, &px, &normals, rng);
    let depth = sense_depth(sc, &px, &normals, rng);
    Frame {
        rgb,
        depth,
        plane: px.iter().map(|p| p.z0).collect(),
    }
}

fn shade(sc: &Scene, px: &[Px], normals: &[V3], rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h, hard) = (sc.cfg.w, sc.cfg.h, sc.cfg.hard);
    // per-frame look: steel tone, bead tone, light, heat tint, brushing, camera response
    let g = uni(rng, 0.46, 0.68);
    let steel = [g * uni(rng, 0.96, 1.02), g, g * uni(rng, 1.0, 1.06)];
    let bk = uni(rng, 0.45, 0.7);
    let bead_col = [steel[0] * bk * 1.04, steel[1] * bk, steel[2] * bk * 0.96];
    let light = V3::new(uni(rng, -0.6, 0.6), uni(rng, -0.6, 0.6), -1.0).unit();
    let (amb, heat_s, rainbow) = (
        uni(rng, 0.22, 0.38),
        uni(rng, 0.3, 0.8),
        uni(rng, 0.15, 1.0),
    );
    let heat_w = [uni(rng, 3.0, 10.0), uni(rng, 3.0, 10.0)];
    let brush = [
        uni(rng, 0.0, PI),
        uni(rng, 0.04, 0.16),
        uni(rng, 0.03, 0.12),
    ];
    let vignette = uni(rng, 0.05, 0.3);
    let rgb_sigma = if hard {
        uni(rng, 3.0, 8.0)
    } else {
        uni(rng, 1.5, 4.0)
    } / 255.0;
    let k = if hard { uni(rng, 0.6, 1.4) } else { 1.0 };
    let cast = if hard { 0.1 } else { 0.0 };
    let gain = [(); 3].map(|_| k * uni(rng, 1.0 - cast, 1.0 + cast));
    let bead = &sc.bead;
    let (bs, bc) = brush[0].sin_cos();
    let dark_oxide = [0.20, 0.18, 0.17];
    let mut lin = vec![[0.0f64; 3]; w * h];
    for (i, p) in px.iter().enumerate() {
        let nn = normals[i];
        let view = (p.x * -1.0).unit();
        let half = (light + view).unit();
        let ndl = nn.dot(light).max(0.0);
        let ndh = nn.dot(half).max(0.0);
        let Surf {
            a,
            b,
            u,
            toe,
            mat,
            cav,
            ..
        } = p.s;
        let (s, ww) = bead.sw(a, b);
        let (albedo, ks, shin) = match mat {
            Mat::Hole => ([0.02, 0.018, 0.016], 0.0, 1),
            Mat::Drop => ([0.13, 0.12, 0.11], 1.6, 50),
            Mat::Bead => {
                let mott = 0.8 + 0.4 * fbm(a * 0.6, b * 0.6, sc.seed ^ 7, 2);
                let band = 1.0 + 0.12 * bead.rip_aa * bead.ripple_phase(a, u).sin();
                let base = bead_col.map(|c| c * mott * band);
                let tint = lerp3(dark_oxide, heat_color(0.1 + 0.3 * u.abs()), rainbow);
                (lerp3(base, tint, 0.25 * heat_s), 0.55, 45)
            }
            Mat::Plate => {
                let along = s * bc + ww * bs;
                let across = -s * bs + ww * bc;
                let streak = fbm(along * 0.05, across * 3.0, sc.seed ^ 11, 2);
                let stain = fbm(s * 0.015, ww * 0.015, sc.seed ^ 13, 2);
                let k = (1.0 - brush[1] + 2.0 * brush[1] * streak)
                    * (1.0 - brush[2] + 2.0 * brush[2] * stain);
                let base = steel.map(|c| c * k);
                let t = toe.max(0.0) / heat_w[usize::from(u > 0.0)];
                if t >= 1.0 {
                    (base, 0.18, 14)
                } else {
                    let var = 0.6 + 0.8 * fbm(a * 0.08, u.signum() * toe * 0.3, sc.seed ^ 17, 2);
                    let tint = lerp3(dark_oxide, heat_color(t), rainbow);
                    let st = (heat_s * var * (1.0 - smoothstep(0.55, 1.0, t))).clamp(0.0, 1.0);
                    (lerp3(base, tint, st), 0.18, 14)
                }
            }
        };
        let occl = 1.0 - cav;
        let diff = amb + (1.0 - amb) * ndl;
        let spec = ks * ndh.powi(shin);
        lin[i] = albedo.map(|c| (c * diff + spec) * occl);
    }
    // Sub-pixel spatter droplets still produce a glint in the colour image.
    for d in &sc.defects {
        if let Defect::Drop { a, b, r, hf } = *d {
            let (pu, pv) = sc.project_ab(a, b, hf * r);
            let (s, ww) = bead.sw(a, b);
            let z = (sc.p0 + sc.e1 * s + sc.e2 * ww).z;
            let rp = r * sc.cfg.f / z;
            if rp > 1.5 {
                continue;
            }
            let sig = rp.max(0.45);
            let cov = (rp / 0.6).powi(2).min(1.0);
            let (u0, v0) = (pu.round() as i64, pv.round() as i64);
            for v in (v0 - 2).max(0)..=(v0 + 2).min(h as i64 - 1) {
                for u in (u0 - 2).max(0)..=(u0 + 2).min(w as i64 - 1) {
                    let d2 = (u as f64 - pu).powi(2) + (v as f64 - pv).powi(2);
                    let body = 0.8 * cov * (-d2 / (2.0 * sig * sig)).exp();
                    let glint = 0.9 * cov * (-d2 / (0.5 * sig * sig)).exp();
                    let c = &mut lin[v as usize * w + u as usize];
                    *c = lerp3(
                        lerp3(*c, [0.1, 0.095, 0.09], body),
                        [0.97, 0.95, 0.92],
                        glint,
                    );
                }
            }
        }
    }
    let mut img = RgbImage::new(w as u32, h as u32);
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let rmax2 = cx * cx + cy * cy;
    for (i, c) in lin.iter().enumerate() {
        let (u, v) = ((i % w) as f64, (i / w) as f64);
        let vig = 1.0 - vignette * ((u - cx).powi(2) + (v - cy).powi(2)) / rmax2;
        let mut out = [0u8; 3];
        for k in 0..3 {
            let val = c[k] * vig * gain[k] + rgb_sigma * gauss(rng);
            out[k] = (val.clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
        }
        img.put_pixel((i % w) as u32, (i / w) as u32, Rgb(out));
    }
    img
}

fn sense_depth(sc: &Scene, px: &[Px], normals: &[V3], rng: &mut ChaCha8Rng) -> DepthImage {
    let (w, h, hard) = (sc.cfg.w, sc.cfg.h, sc.cfg.hard);
    let depth_sigma = if hard {
        uni(rng, 0.1, 0.2)
    } else {
        uni(rng, 0.05, 0.1)
    };
    let drop_p = if hard {
        uni(rng, 0.004, 0.02)
    } else {
        uni(rng, 0.002, 0.01)
    };
    let blob_frac = if hard {
        uni(rng, 0.01, 0.04)
    } else {
        uni(rng, 0.005, 0.025)
    };
    let steep_c = if hard {
        uni(rng, 0.25, 0.4)
    } else {
        uni(rng, 0.18, 0.3)
    };
    // true depth (hole: missing or the floor far behind the plate)
    let behind_tilt = [uni(rng, -0.02, 0.02), uni(rng, -0.02, 0.02)];
    let zt: Vec<f64> = px
        .iter()
        .enumerate()
        .map(|(i, p)| match (p.s.mat, sc.behind) {
            (Mat::Hole, Some(off)) => {
                let (u, v) = (
                    (i % w) as f64 - w as f64 / 2.0,
                    (i / w) as f64 - h as f64 / 2.0,
                );
                p.z0 + off + behind_tilt[0] * u + behind_tilt[1] * v
            }
            (Mat::Hole, None) => 0.0,
            _ => p.x.z,
        })
        .collect();
    // dropout blobs
    let mut mask = vec![false; w * h];
    let target = blob_frac * (w * h) as f64;
    let mut area = 0.0;
    let scale = w as f64 / 640.0;
    while area < target {
        let (bu, bv) = (uni(rng, 0.0, w as f64), uni(rng, 0.0, h as f64));
        let (ra, rb) = (uni(rng, 1.5, 9.0) * scale, uni(rng, 1.5, 6.0) * scale);
        let (sn, cs) = uni(rng, 0.0, PI).sin_cos();
        area += PI * ra * rb;
        let rr = ra.max(rb).ceil() as i64 + 1;
        for v in (bv as i64 - rr).max(0)..(bv as i64 + rr).min(h as i64) {
            for u in (bu as i64 - rr).max(0)..(bu as i64 + rr).min(w as i64) {
                let (du, dv) = (u as f64 - bu, v as f64 - bv);
                let (x, y) = ((du * cs + dv * sn) / ra, (-du * sn + dv * cs) / rb);
                if x * x + y * y < 1.0 {
                    mask[v as usize * w + u as usize] = true;
                }
            }
        }
    }
    let mut img = DepthImage::new(w as u32, h as u32);
    for v in 0..h {
        for u in 0..w {
            let i = v * w + u;
            let z = zt[i];
            let nb = [
                ((u + 1).min(w - 1), v),
                (u.saturating_sub(1), v),
                (u, (v + 1).min(h - 1)),
                (u, v.saturating_sub(1)),
            ];
            let jump = nb
                .iter()
                .map(|&(x, y)| (zt[y * w + x] - z).abs())
                .fold(0.0, f64::max);
            let cosi = if px[i].s.mat == Mat::Hole {
                1.0
            } else {
                normals[i].dot((px[i].x * -1.0).unit())
            };
            let steep_p = 1.0 - smoothstep(steep_c, steep_c + 0.2, cosi);
            let r: f64 = rng.random();
            let noise = gauss(rng) * depth_sigma;
            let drop = z <= 0.0
                || mask[i]
                || r < drop_p
                || rng.random::<f64>() < 0.75 * steep_p
                || (jump > 1.5 && rng.random::<f64>() < 0.6);
            let q = if drop {
                0
            } else {
                ((z + noise) / sc.cfg.unit + 0.5).clamp(1.0, 65535.0) as u16
            };
            img.put_pixel(u as u32, v as u32, Luma([q]));
        }
    }
    img
}

// ---------------------------------------------------------------- output

fn make_frame(cfg: Cfg, seed: u64, class: usize, index: usize) -> Frame {
    let mut rng = ChaCha8Rng::seed_from_u64(frame_seed(seed, class, index));
    let sc = build_scene(cfg, class, &mut rng);
    render(&sc, &mut rng)
}

fn dataset_cfg(args: &Args) -> Result<(Cfg, f64)> {
    if !(0.01..=10.0).contains(&args.depth_unit_mm) {
        bail!("--depth-unit-mm must be in [0.01, 10] (16-bit range must cover ~400 mm)");
    }
    let (w, h) = args.size;
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix(args.seed ^ 0xA176_E11D));
    let fov = uni(&mut rng, 70.0, 90.0);
    let f = (w as f64 / 2.0) / (fov.to_radians() / 2.0).tan();
    Ok((
        Cfg {
            w,
            h,
            f,
            unit: args.depth_unit_mm,
            hard: args.hard,
        },
        fov,
    ))
}

fn turbo(t: f64) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let r = 0.13572138
        + t * (4.61539260
            + t * (-42.66032258 + t * (132.13108234 + t * (-152.94239396 + t * 59.28637943))));
    let g = 0.09140261
        + t * (2.19418839
            + t * (4.84296658 + t * (-14.18503333 + t * (4.27729857 + t * 2.82956604))));
    let b = 0.10667330
        + t * (12.64194608
            + t * (-60.58204836 + t * (110.36276771 + t * (-89.90310912 + t * 27.34824973))));
    [r, g, b].map(|c| (c.clamp(0.0, 1.0) * 255.0).round() as u8)
}

/// False-colour depth relative to the bare plate plane (near = red, far = blue,
/// no depth = black), so that the mm-scale relief is visible despite the tilt.
fn depth_vis(fr: &Frame, unit: f64) -> RgbImage {
    let w = fr.depth.width() as usize;
    let resid = |i: usize, raw: u16| raw as f64 * unit - fr.plane[i];
    let mut res: Vec<f64> = fr
        .depth
        .pixels()
        .enumerate()
        .filter(|p| p.1.0[0] > 0)
        .map(|(i, p)| resid(i, p.0[0]))
        .collect();
    res.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        res.get(((res.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let (lo, hi) = (pick(0.003), pick(0.997).max(pick(0.003) + 0.5));
    RgbImage::from_fn(fr.depth.width(), fr.depth.height(), |u, v| {
        match fr.depth.get_pixel(u, v).0[0] {
            0 => Rgb([0, 0, 0]),
            raw => Rgb(turbo(
                (hi - resid(v as usize * w + u as usize, raw)) / (hi - lo),
            )),
        }
    })
}

fn write_preview(args: &Args, path: &Path) -> Result<()> {
    let (cfg, _) = dataset_cfg(args)?;
    let (w, h) = (cfg.w as u32, cfg.h as u32);
    let mut sheet = RgbImage::new(2 * w, h * CLASSES.len() as u32);
    for class in 0..CLASSES.len() {
        let fr = make_frame(cfg, args.seed, class, 0);
        let dv = depth_vis(&fr, cfg.unit);
        image::imageops::replace(&mut sheet, &fr.rgb, 0, (class as u32 * h) as i64);
        image::imageops::replace(&mut sheet, &dv, w as i64, (class as u32 * h) as i64);
    }
    sheet
        .save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "preview written to {} (rows: {})",
        path.display(),
        CLASSES.join(", ")
    );
    Ok(())
}

fn write_dataset(args: &Args, out: &Path, per_class: usize) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!("{} exists and is not a folder", out.display());
        }
        if fs::read_dir(out)?.next().is_some() {
            bail!("refusing to write into non-empty folder {}", out.display());
        }
    }
    let (cfg, fov) = dataset_cfg(args)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let classes = CLASSES.map(|c| format!("\"{c}\"")).join(", ");
    let (f, unit, hard) = (cfg.f, cfg.unit, if cfg.hard { ", hard" } else { "" });
    let (cx, cy, seed) = (cfg.w as f64 / 2.0, cfg.h as f64 / 2.0, args.seed);
    let toml = format!(
        "# generated by altgen, seed {seed}, horizontal fov {fov:.3} deg{hard}\nclasses = [{classes}]\n\
         depth_unit_mm = {unit:?}\n\n[intrinsics]\nfx = {f:?}\nfy = {f:?}\ncx = {cx:?}\ncy = {cy:?}\n"
    );
    fs::write(out.join("dataset.toml"), toml)?;
    for c in CLASSES {
        fs::create_dir_all(out.join(c))?;
    }
    let total = per_class * CLASSES.len();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(total.max(1));
    // Frames are independent (own RNG stream), so worker order does not affect the bytes written.
    let work = || -> Result<()> {
        loop {
            let job = next.fetch_add(1, Ordering::Relaxed);
            if job >= total {
                return Ok(());
            }
            let (class, index) = (job % CLASSES.len(), job / CLASSES.len());
            let fr = make_frame(cfg, args.seed, class, index);
            let stem = out
                .join(CLASSES[class])
                .join(format!("{}_{index:05}", CLASSES[class]));
            fr.rgb.save(stem.with_extension("png"))?;
            fr.depth.save(stem.with_extension("depth.png"))?;
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
        handles
            .into_iter()
            .try_for_each(|hd| hd.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
    })?;
    println!(
        "wrote {total} frames ({per_class} per class) to {}",
        out.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(p) = &args.preview {
        return write_preview(&args, p);
    }
    let out = args.out.clone().context("--out is required")?;
    let per_class = args.per_class.context("--per-class is required")?;
    write_dataset(&args, &out, per_class)
}
