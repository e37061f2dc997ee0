//! Seeded, reproducible synthetic RGB-D frames of welds, with ground truth.
//!
//! # Scene
//! What a short-range stereo depth camera (Intel RealSense D405 class) sees from 100-250 mm
//! above a welded steel plate: a plate tilted by up to 12 deg, one straight, slightly wobbling
//! bead through the central 40 % of the image, and at most one kind of defect. Lengths are mm in
//! the world and reach the image through the pinhole model of [`SynthConfig::intrinsics`].
//!
//! # Pipeline
//! scene sampling (`Scene::sample`) -> per-pixel plate and bead coordinates (`Geometry`) ->
//! height map with the defects (`Surface`, f32 mm at full resolution) -> RGB shading from the
//! height map's normals -> depth with stereo noise and dropouts.
//!
//! # Determinism
//! Every random draw comes from `ChaCha8Rng::seed_from_u64`, textures from an integer hash,
//! and every transcendental function from `libm` (pure Rust), so one seed and config give
//! bit-identical frames on x86_64 and aarch64 (Rust never fuses multiply-adds on its own).
//! Per-pixel Gaussian noise is Irwin-Hall (sum of four 8-bit uniforms): Gaussian to the eye,
//! cut off at 3.5 sigma, and two per 64-bit draw.
//!
//! # Smallest defects
//! Each class has a smallest feature (pore, spatter and burn-through diameter, undercut groove
//! width). Its lower bound is raised so that it is at least 2 px across at the farthest plate
//! point in view (never above its upper bound). Where 75 % of the smallest upper bound (1.6 mm
//! groove width) would be under 2 px, the camera is moved closer until it is not, in frames of
//! every class alike so that distance says nothing about the class. At 640x480 (65 deg) this
//! never happens; at 320x240 it caps the distance at 110-150 mm; below about 290 px of width
//! it can bring the camera nearer than 100 mm.

use std::f32::consts::{PI, TAU};

use chrono::{DateTime, Utc};
use image::RgbImage;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::frame::{DepthImage, DepthMap, Frame, FrameError, Intrinsics};
use crate::result::FindingKind;

/// Class names in dataset order: `SynthClass::ALL[i].name() == DEFAULT_CLASSES[i]`.
pub const DEFAULT_CLASSES: [&str; 5] = ["good", "porosity", "undercut", "spatter", "burn_through"];

/// The class of a synthetic frame: a sound weld, or a weld with exactly one kind of defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SynthClass {
    /// A sound bead without defects.
    Good,
    /// 1-6 pores (pits) in the bead surface.
    Porosity,
    /// A groove melted into the plate along one toe (sometimes both).
    Undercut,
    /// 3-20 droplets of weld metal on the plate beside the bead.
    Spatter,
    /// One hole through the joint near the bead axis.
    BurnThrough,
}

impl SynthClass {
    /// Every class, in the order of [`DEFAULT_CLASSES`].
    pub const ALL: [SynthClass; 5] = [
        SynthClass::Good,
        SynthClass::Porosity,
        SynthClass::Undercut,
        SynthClass::Spatter,
        SynthClass::BurnThrough,
    ];

    /// The class name used in datasets and results (`"burn_through"`, ...).
    pub fn name(self) -> &'static str {
        DEFAULT_CLASSES[self as usize]
    }

    /// The class with this exact name, if any.
    pub fn from_name(s: &str) -> Option<SynthClass> {
        SynthClass::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The finding kind of this class's defects (`None` for `Good`).
    pub fn finding_kind(self) -> Option<FindingKind> {
        match self {
            SynthClass::Good => None,
            SynthClass::Porosity => Some(FindingKind::Pore),
            SynthClass::Undercut => Some(FindingKind::Undercut),
            SynthClass::Spatter => Some(FindingKind::Spatter),
            SynthClass::BurnThrough => Some(FindingKind::BurnThrough),
        }
    }
}

/// Image size and camera of the generated frames.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Image width in px, 64..=8192.
    pub width: u32,
    /// Image height in px, 48..=8192.
    pub height: u32,
    /// Horizontal field of view in degrees, 20..=120 (default 65).
    pub hfov_deg: f64,
    /// Millimetres per raw depth unit, 0.01..=1 (default 0.05).
    pub depth_unit_mm: f32,
}

impl Default for SynthConfig {
    /// 640x480, the usual stereo-camera mode.
    fn default() -> SynthConfig {
        SynthConfig::new(640, 480)
    }
}

/// Accepted sizes (px) and camera values; the ranges are named in [`SynthError`] messages.
const MIN_WIDTH: u32 = 64;
const MIN_HEIGHT: u32 = 48;
const MAX_SIDE: u32 = 8192;
const HFOV_RANGE_DEG: (f64, f64) = (20.0, 120.0);
/// A view under 10 deg tall (17 mm at 100 mm) cannot hold a 12 mm bead with the toe region on
/// both sides; over 120 deg the plate is seen at grazing angles no stereo camera matches.
const VFOV_RANGE_DEG: (f64, f64) = (10.0, 120.0);
/// Below 0.01 mm the farthest depth (~340 mm: 250 mm / cos 12 deg + 80 mm through a hole) no
/// longer fits in 16 bits; above 1 mm the defects (0.3 mm deep) vanish in quantisation.
const DEPTH_UNIT_RANGE_MM: (f32, f32) = (0.01, 1.0);

impl SynthConfig {
    /// A `width` x `height` config with a 65 deg field of view and 0.05 mm depth units.
    pub fn new(width: u32, height: u32) -> SynthConfig {
        SynthConfig {
            width,
            height,
            hfov_deg: 65.0,
            depth_unit_mm: 0.05,
        }
    }

    /// Pinhole intrinsics: `fx = fy = width / (2 tan(hfov / 2))`, principal point at the centre.
    pub fn intrinsics(&self) -> Intrinsics {
        let f = f64::from(self.width) / (2.0 * libm::tan(self.hfov_deg.to_radians() / 2.0));
        Intrinsics {
            fx: f,
            fy: f,
            cx: f64::from(self.width) / 2.0,
            cy: f64::from(self.height) / 2.0,
        }
    }

    /// Vertical field of view in degrees, from `hfov_deg` and the aspect ratio.
    pub fn vfov_deg(&self) -> f64 {
        let half = libm::tan(self.hfov_deg.to_radians() / 2.0);
        2.0 * libm::atan(half * f64::from(self.height) / f64::from(self.width)).to_degrees()
    }

    /// Checks every value against its allowed range; the error names the bad value.
    pub fn validate(&self) -> Result<(), SynthError> {
        for (what, value, min) in [
            ("width", self.width, MIN_WIDTH),
            ("height", self.height, MIN_HEIGHT),
        ] {
            if !(min..=MAX_SIDE).contains(&value) {
                return Err(SynthError::BadSize {
                    what,
                    value,
                    min,
                    max: MAX_SIDE,
                });
            }
        }
        let (lo, hi) = HFOV_RANGE_DEG;
        if !(self.hfov_deg.is_finite() && (lo..=hi).contains(&self.hfov_deg)) {
            return Err(SynthError::BadHfov(self.hfov_deg));
        }
        let (lo, hi) = VFOV_RANGE_DEG;
        let vfov = self.vfov_deg();
        if !(lo..=hi).contains(&vfov) {
            return Err(SynthError::BadVfov {
                vfov_deg: vfov,
                width: self.width,
                height: self.height,
            });
        }
        let (lo, hi) = DEPTH_UNIT_RANGE_MM;
        if !(self.depth_unit_mm.is_finite() && (lo..=hi).contains(&self.depth_unit_mm)) {
            return Err(SynthError::BadDepthUnit(self.depth_unit_mm));
        }
        Ok(())
    }
}

/// Why a frame could not be generated.
#[derive(Debug, Error)]
pub enum SynthError {
    /// Image width or height outside its range.
    #[error("image {what} {value} px is outside the allowed range {min}..={max} px")]
    BadSize {
        /// `"width"` or `"height"`.
        what: &'static str,
        /// The value given, px.
        value: u32,
        /// Smallest allowed value, px.
        min: u32,
        /// Largest allowed value, px.
        max: u32,
    },
    /// Field of view outside 20..=120 deg.
    #[error("hfov_deg {0} is outside the allowed range 20..=120 degrees")]
    BadHfov(f64),
    /// Aspect ratio that makes the vertical field of view too narrow or too wide.
    #[error(
        "{width}x{height} px with this hfov_deg gives a vertical field of view of {vfov_deg:.1} \
         degrees, outside the allowed range 10..=120 degrees"
    )]
    BadVfov {
        /// The vertical field of view, deg.
        vfov_deg: f64,
        /// Image width, px.
        width: u32,
        /// Image height, px.
        height: u32,
    },
    /// Depth unit outside 0.01..=1 mm.
    #[error("depth_unit_mm {0} is outside the allowed range 0.01..=1 mm")]
    BadDepthUnit(f32),
    /// The frame could not be assembled (should not happen for a valid config).
    #[error("cannot assemble the frame: {0}")]
    Frame(#[from] FrameError),
}

/// What was generated: class, defects, bead and camera pose.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundTruth {
    /// The class of the frame.
    pub class: SynthClass,
    /// One entry per defect instance (empty for `Good`); every one is at least partly visible.
    pub defects: Vec<DefectTruth>,
    /// The bead.
    pub bead: BeadTruth,
    /// Distance from the camera to the plate along the optical axis, mm.
    pub camera_distance_mm: f32,
    /// Tilt of the plate normal away from the optical axis, deg (0..12).
    pub tilt_deg: f32,
}

/// One defect instance.
#[derive(Debug, Clone, PartialEq)]
pub struct DefectTruth {
    /// What it is.
    pub kind: FindingKind,
    /// Pixel box `[x, y, w, h]` of its projected extent, clipped to the image.
    pub bbox: [u32; 4],
    /// Diameter in mm (pores: of the circle of equal area; burn-through: nominal), or length
    /// along the bead for undercut.
    pub size_mm: f32,
    /// Depth below the surrounding surface in mm (pores: below the bead; undercut: below the
    /// plate), height above the plate for spatter (positive), and for burn-through the distance
    /// behind the plate of what the camera sees through the hole, `f32::INFINITY` when the
    /// sensor gets no return there.
    pub depth_mm: f32,
}

/// The bead as placed.
#[derive(Debug, Clone, PartialEq)]
pub struct BeadTruth {
    /// Nominal width, mm (5..12; varies +-5-8 % along the bead).
    pub width_mm: f32,
    /// Nominal reinforcement height above the plate, mm (1..3).
    pub height_mm: f32,
    /// Orientation of the bead axis in the image, deg in 0..180, from +x toward +y (down).
    pub angle_deg: f32,
    /// A pixel on the bead axis (inside the central 40 % of the image).
    pub centre_px: [f32; 2],
}

/// A generated frame and what is in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Synthesized {
    /// RGB, depth (unit `cfg.depth_unit_mm`), intrinsics, a fixed time from the seed, seq 0.
    pub frame: Frame,
    /// What was generated.
    pub truth: GroundTruth,
}

/// Seed of frame `index` of class `class_index` in a dataset made with `dataset_seed`
/// (chained SplitMix64), so frames can be made in parallel and in any order.
pub fn frame_seed(dataset_seed: u64, class_index: usize, index: usize) -> u64 {
    splitmix64(splitmix64(splitmix64(dataset_seed) ^ class_index as u64) ^ index as u64)
}

/// Generates one frame of `class`; the same seed and config always give the same bytes.
pub fn generate(
    class: SynthClass,
    seed: u64,
    cfg: &SynthConfig,
) -> Result<Synthesized, SynthError> {
    cfg.validate()?;
    let scene = Scene::sample(class, seed, cfg);
    let geo = Geometry::new(&scene);
    let surf = Surface::new(&scene, &geo);
    let (rgb, depth) = render(&scene, &geo, &surf);
    // 2026-01-01T00:00:00Z plus up to ~11.6 days, so the time is reproducible from the seed.
    const EPOCH_2026_S: i64 = 1_767_225_600;
    let ts = DateTime::<Utc>::from_timestamp(EPOCH_2026_S + (seed % 1_000_000) as i64, 0)
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let frame = Frame::new(
        rgb,
        Some(DepthMap {
            values: depth,
            unit_mm: cfg.depth_unit_mm,
        }),
    )?
    .with_intrinsics(Some(cfg.intrinsics()))
    .with_time(ts, 0);
    Ok(Synthesized {
        frame,
        truth: scene.truth,
    })
}

// ------------------------------------------------------------------ deterministic helpers

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [lo, hi]; unlike `random_range` it accepts lo == hi.
fn uni(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    let u: f64 = rng.random();
    lo + (hi - lo) * u as f32
}

/// Two unit Gaussians from one draw: Irwin-Hall sums of four 8-bit uniforms each (mean 510,
/// variance 4 (256^2 - 1) / 12 = 21845, so sigma 147.80).
fn gauss2(rng: &mut ChaCha8Rng) -> [f32; 2] {
    let r = rng.next_u64();
    let lanes = |r: u64| (r & 0xFF) + ((r >> 8) & 0xFF) + ((r >> 16) & 0xFF) + ((r >> 24) & 0xFF);
    [
        (lanes(r) as f32 - 510.0) / 147.800_54,
        (lanes(r >> 32) as f32 - 510.0) / 147.800_54,
    ]
}

fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// `x.floor() as i32` without the libm call that baseline x86_64 makes of `floor` (the
/// result is the same; saturates like `as`).
fn floor_i(x: f32) -> i32 {
    let i = x as i32;
    if (i as f32) > x { i - 1 } else { i }
}

/// Value in [-1, 1) at an integer lattice point (an integer hash, not an RNG stream).
fn lattice(seed: u32, i: i32, j: i32) -> f32 {
    let mut h = seed ^ (i as u32).wrapping_mul(0x27D4_EB2D) ^ (j as u32).wrapping_mul(0x1656_67B1);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297A_2D39);
    h ^= h >> 15;
    (h >> 8) as f32 * (2.0 / 16_777_216.0) - 1.0
}

/// Smooth 1-D value noise in [-1, 1], one lattice cell per unit of `x`.
fn noise1(seed: u32, x: f32) -> f32 {
    let i = floor_i(x);
    let f = x - i as f32;
    let (a, b) = (lattice(seed, i, 0), lattice(seed, i + 1, 0));
    a + (b - a) * f * f * (3.0 - 2.0 * f)
}

/// Smooth 2-D value noise in [-1, 1], one lattice cell per unit.
fn noise2(seed: u32, x: f32, y: f32) -> f32 {
    let (i, j) = (floor_i(x), floor_i(y));
    let (fx, fy) = (x - i as f32, y - j as f32);
    let (ux, uy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
    let a = lattice(seed, i, j) + (lattice(seed, i + 1, j) - lattice(seed, i, j)) * ux;
    let b = lattice(seed, i, j + 1) + (lattice(seed, i + 1, j + 1) - lattice(seed, i, j + 1)) * ux;
    a + (b - a) * uy
}

/// A smooth field sampled every `COARSE_STEP` px and interpolated bilinearly: for fields that
/// change over tens of pixels, at a fraction of the cost of evaluating them per pixel.
struct Coarse {
    gw: usize,
    grid: Vec<f32>,
}

const COARSE_STEP: usize = 8; // px

impl Coarse {
    fn new(w: usize, h: usize, f: impl Fn(f32, f32) -> f32) -> Coarse {
        let (gw, gh) = (w.div_ceil(COARSE_STEP) + 1, h.div_ceil(COARSE_STEP) + 1);
        let grid = (0..gw * gh)
            .map(|k| {
                f(
                    ((k % gw) * COARSE_STEP) as f32,
                    ((k / gw) * COARSE_STEP) as f32,
                )
            })
            .collect();
        Coarse { gw, grid }
    }

    fn at(&self, x: usize, y: usize) -> f32 {
        let inv = 1.0 / COARSE_STEP as f32;
        let (gx, fx) = (x / COARSE_STEP, (x % COARSE_STEP) as f32 * inv);
        let (gy, fy) = (y / COARSE_STEP, (y % COARSE_STEP) as f32 * inv);
        let k = gy * self.gw + gx;
        let (r0, r1) = (
            &self.grid[k..k + 2],
            &self.grid[k + self.gw..k + self.gw + 2],
        );
        let a = r0[0] + (r0[1] - r0[0]) * fx;
        a + (r1[0] + (r1[1] - r1[0]) * fx - a) * fy
    }
}

fn dot3(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn normalize3(v: [f32; 3]) -> [f32; 3] {
    let k = 1.0 / dot3(v, v).sqrt().max(1e-12);
    [v[0] * k, v[1] * k, v[2] * k]
}

/// `v` rotated by `angle` rad about the unit `axis` (Rodrigues).
fn rotate(v: [f32; 3], axis: [f32; 3], angle: f32) -> [f32; 3] {
    let (s, c) = (libm::sinf(angle), libm::cosf(angle));
    let k = dot3(axis, v) * (1.0 - c);
    let x = [
        axis[1] * v[2] - axis[2] * v[1],
        axis[2] * v[0] - axis[0] * v[2],
        axis[0] * v[1] - axis[1] * v[0],
    ];
    [
        v[0] * c + x[0] * s + axis[0] * k,
        v[1] * c + x[1] * s + axis[1] * k,
        v[2] * c + x[2] * s + axis[2] * k,
    ]
}

// ------------------------------------------------------------------------ scene sampling

/// The bead in plate coordinates: `t` runs along the axis from the centre, `s` across it.
#[derive(Debug, Clone)]
struct Bead {
    /// Plate point (mm) of the centre pixel, axis direction and its normal in the plate.
    c: [f32; 2],
    dir: [f32; 2],
    perp: [f32; 2],
    /// Nominal half-width and height (mm), cap exponent p, toe fillet in units of q.
    hw: f32,
    height: f32,
    p: f32,
    kq: f32,
    /// Relative width / height variation along the bead and its length scale (mm).
    width_var: f32,
    height_var: f32,
    var_scale: f32,
    /// Curvature (1/mm) and lateral wobble (mm over `wobble_scale` mm).
    curv: f32,
    wobble: f32,
    wobble_scale: f32,
    /// Ripple amplitude (mm, already faded by pixel size), pitch (mm), chevron shift (1/mm).
    ripple_amp: f32,
    ripple_pitch: f32,
    chevron: f32,
    seed: u32,
    /// `along_direct` sampled from `along_t0` every 1 / `along_inv_step` mm.
    along_lut: Vec<[f32; 4]>,
    along_t0: f32,
    along_inv_step: f32,
    /// u^(2p) for u = k / POW_LUT_N.
    pow_lut: Vec<f32>,
}

const POW_LUT_N: usize = 1024;

impl Bead {
    /// Slowly varying properties at `t`: axis offset (mm; 0 at the centre so the truth centre
    /// is exact), half-width (mm), height (mm) and ripple phase jitter (rad).
    fn along_direct(&self, t: f32) -> [f32; 4] {
        let wob = noise1(self.seed, t / self.wobble_scale) - noise1(self.seed, 0.0);
        [
            0.5 * self.curv * t * t + self.wobble * wob,
            self.hw * (1.0 + self.width_var * noise1(self.seed ^ 0x51, t / self.var_scale)),
            self.height * (1.0 + self.height_var * noise1(self.seed ^ 0xA3, t / self.var_scale)),
            0.6 * noise1(self.seed ^ 0x77, t / 3.0), // irregular ripple spacing
        ]
    }

    /// `along_direct` from the table where `t` is covered (linear between 0.1 mm samples of
    /// functions that vary over >= 3 mm), else computed.
    fn along(&self, t: f32) -> [f32; 4] {
        let k = (t - self.along_t0) * self.along_inv_step;
        if k >= 0.0 && k + 1.0 < self.along_lut.len() as f32 {
            let (i, f) = (k as usize, k - (k as usize) as f32);
            let (a, b) = (self.along_lut[i], self.along_lut[i + 1]);
            return [
                a[0] + (b[0] - a[0]) * f,
                a[1] + (b[1] - a[1]) * f,
                a[2] + (b[2] - a[2]) * f,
                a[3] + (b[3] - a[3]) * f,
            ];
        }
        self.along_direct(t)
    }

    /// Fills the lookup tables that keep the per-pixel loops free of hashing and `powf`.
    fn build_tables(&mut self, t_lo: f32, t_hi: f32) {
        let step = ((t_hi - t_lo) / 20_000.0).max(0.1); // mm
        let n = ((t_hi - t_lo) / step).ceil() as usize + 2;
        self.along_lut = (0..n)
            .map(|k| self.along_direct(t_lo + k as f32 * step))
            .collect();
        (self.along_t0, self.along_inv_step) = (t_lo, 1.0 / step);
        // qs^p tabulated over u = sqrt(qs): u^(2p) with 2p in [1, 2] is smooth in u.
        self.pow_lut = (0..=POW_LUT_N)
            .map(|k| libm::powf(k as f32 / POW_LUT_N as f32, 2.0 * self.p))
            .collect();
    }

    fn offset(&self, t: f32) -> f32 {
        self.along(t)[0]
    }

    fn half_width(&self, t: f32) -> f32 {
        self.along(t)[1]
    }

    fn height_at(&self, t: f32) -> f32 {
        self.along(t)[2]
    }

    /// Cap height (mm) at lateral offset `s`: `H (1 - (s/hw)^2)^p`, with `q = 1 - (s/hw)^2`
    /// softened over `kq` so the cap meets the plate in a fillet instead of a vertical wall.
    /// Also returns q, which fades the ripples toward the toes.
    fn profile(&self, s: f32, hw: f32, height: f32) -> (f32, f32) {
        let x = s / hw;
        let q = 1.0 - x * x;
        if q <= -self.kq {
            return (0.0, q);
        }
        let qs = if q >= self.kq {
            q
        } else {
            (q + self.kq) * (q + self.kq) / (4.0 * self.kq)
        };
        let k = (qs.sqrt() * POW_LUT_N as f32).min(POW_LUT_N as f32 - 0.001);
        let (i, f) = (k as usize, k - (k as usize) as f32);
        (
            height * (self.pow_lut[i] + (self.pow_lut[i + 1] - self.pow_lut[i]) * f),
            q,
        )
    }

    /// Chevron solidification ripples: phase along `t + chevron s^2`.
    fn ripple(&self, t: f32, s: f32, q: f32, jitter: f32) -> f32 {
        if q <= 0.0 || self.ripple_amp <= 0.0 {
            return 0.0;
        }
        let phase = TAU * (t + self.chevron * s * s) / self.ripple_pitch + jitter;
        self.ripple_amp * libm::cosf(phase) * q.min(1.0)
    }
}

#[derive(Debug, Clone)]
struct Pore {
    t: f32,
    s: f32,
    ra: f32,
    rb: f32,
    rot: [f32; 2],
    depth: f32,
}

impl Pore {
    /// (r/R)^2 of a plate point in the pore's elliptic outline.
    fn rho2(&self, t: f32, s: f32) -> f32 {
        let (dt, ds) = (t - self.t, s - self.s);
        let a = dt * self.rot[0] + ds * self.rot[1];
        let b = -dt * self.rot[1] + ds * self.rot[0];
        (a / self.ra) * (a / self.ra) + (b / self.rb) * (b / self.rb)
    }
}

#[derive(Debug, Clone)]
struct Groove {
    side: f32,
    t0: f32,
    t1: f32,
    g: f32,
    depth: f32,
}

impl Groove {
    /// Share (0..1) of the groove depth at plate point (t, s) where the half-width is `hw`:
    /// cosine across the groove, smooth over the first and last 2 mm along it.
    fn share(&self, t: f32, s: f32, hw: f32) -> f32 {
        let x = s * self.side - (hw + self.g / 2.0);
        if x.abs() >= self.g / 2.0 || t <= self.t0 || t >= self.t1 {
            return 0.0;
        }
        let ramp = (0.25 * (self.t1 - self.t0)).min(2.0);
        let along = smoothstep(self.t0, self.t0 + ramp, t) * smoothstep(self.t1, self.t1 - ramp, t);
        along * 0.5 * (1.0 + libm::cosf(TAU * x / self.g))
    }
}

#[derive(Debug, Clone)]
struct Droplet {
    t: f32,
    s: f32,
    r: f32,
    height: f32,
}

impl Droplet {
    /// Height (mm) of the half-ellipsoid at plate point (t, s).
    fn height_at(&self, t: f32, s: f32) -> f32 {
        let rho2 = ((t - self.t) * (t - self.t) + (s - self.s) * (s - self.s)) / (self.r * self.r);
        if rho2 < 1.0 {
            self.height * (1.0 - rho2).sqrt()
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone)]
struct Hole {
    t: f32,
    s: f32,
    r: f32,
    /// Amplitude and phase of the 2nd, 3rd and 5th outline harmonics.
    harm: [[f32; 2]; 3],
    /// Distance (mm) behind the plate of the surface seen through the hole; None = no return.
    far: Option<f32>,
    /// Share of the reinforcement lost at the rim, and sag below the plate at the rim (mm).
    sag: f32,
    sink: f32,
}

impl Hole {
    /// Distance from the centre over the outline radius in that direction (< 1: in the hole).
    fn rr(&self, t: f32, s: f32) -> f32 {
        let (dt, ds) = (t - self.t, s - self.s);
        let th = libm::atan2f(ds, dt);
        let mut k = 1.0;
        for (m, [a, ph]) in [2.0, 3.0, 5.0].into_iter().zip(self.harm) {
            k += a * libm::cosf(m * th + ph);
        }
        (dt * dt + ds * ds).sqrt() / (self.r * k)
    }

    fn max_r(&self) -> f32 {
        self.r * (1.0 + self.harm.iter().map(|h| h[0]).sum::<f32>())
    }
}

#[derive(Debug, Clone)]
enum Defect {
    Pore(Pore),
    Undercut(Groove),
    Spatter(Droplet),
    BurnThrough(Hole),
}

/// Light in the bead frame (t, s, plate normal).
#[derive(Debug, Clone)]
struct Light {
    v: [f32; 3],
    /// Horizontal unit direction toward the light, and tan(elevation).
    dir: [f32; 2],
    tan_el: f32,
}

/// Colours (8-bit units), shading and camera response of one frame.
#[derive(Debug, Clone)]
struct Look {
    plate: [f32; 3],
    bead: [f32; 3],
    spatter: [f32; 3],
    ambient: f32,
    ks_plate: f32,
    ks_bead: f32,
    tint_strength: [f32; 2],
    tint_extent: [f32; 2],
    brush: [f32; 2],
    exposure: f32,
    vignette: f32,
    noise_sigma: f32,
    tex_seed: u32,
    rgb_seed: u64,
}

/// Stereo-sensor behaviour of one frame.
#[derive(Debug, Clone)]
struct Sensor {
    band_px: usize,
    blob_frac: f32,
    bias_mm: f32,
    bias_cell_px: f32,
    depth_seed: u64,
}

/// Pinhole camera above the tilted plate plane; camera frame, mm.
#[derive(Debug, Clone)]
struct Camera {
    w: usize,
    h: usize,
    fx: f32,
    fy: f32,
    cx: f32,
    cy: f32,
    /// Distance to the plate along the optical axis.
    dist: f32,
    tilt_deg: f32,
    cos_tilt: f32,
    /// Plate normal (toward the camera) and in-plane axes.
    n: [f32; 3],
    e1: [f32; 3],
    e2: [f32; 3],
}

/// Smallest defect size in pixels at the farthest plate depth in view (module docs).
const MIN_DEFECT_PX: f32 = 2.0;
/// The smallest upper bound of any class's smallest dimension (undercut groove width, mm);
/// the camera distance is limited by it for every class, so distance never hints at class.
const SMALLEST_UPPER_MM: f32 = 1.6;

impl Camera {
    /// Distance 100-250 mm, plate tilted 0-12 deg about a random axis; returns the camera and
    /// the size (mm) that is `MIN_DEFECT_PX` across at the farthest plate point in view.
    fn sample(rng: &mut ChaCha8Rng, cfg: &SynthConfig) -> (Camera, f32) {
        let k = cfg.intrinsics();
        let dist = uni(rng, 100.0, 250.0);
        let tilt = uni(rng, 0.0, 12.0).to_radians();
        let axis_az = uni(rng, 0.0, TAU);
        let axis = [libm::cosf(axis_az), libm::sinf(axis_az), 0.0];
        let mut cam = Camera {
            w: cfg.width as usize,
            h: cfg.height as usize,
            fx: k.fx as f32,
            fy: k.fy as f32,
            cx: k.cx as f32,
            cy: k.cy as f32,
            dist,
            tilt_deg: tilt.to_degrees(),
            cos_tilt: libm::cosf(tilt),
            n: rotate([0.0, 0.0, -1.0], axis, tilt),
            e1: rotate([1.0, 0.0, 0.0], axis, tilt),
            e2: rotate([0.0, 1.0, 0.0], axis, tilt),
        };
        // The farthest plate point in view is at a corner (1/z is affine in pixels).
        let (wf, hf) = ((cam.w - 1) as f32, (cam.h - 1) as f32);
        let far_per_mm = [(0.0, 0.0), (wf, 0.0), (0.0, hf), (wf, hf)]
            .into_iter()
            .map(|(x, y)| cam.plane_depth(x, y) / dist)
            .fold(0.0f32, f32::max);
        let min_mm = |d: f32| MIN_DEFECT_PX * d * far_per_mm / cam.fx.min(cam.fy);
        if min_mm(dist) > 0.75 * SMALLEST_UPPER_MM {
            // Closer, so that the size range keeps a quarter of its width above 2 px.
            cam.dist *= 0.75 * SMALLEST_UPPER_MM / min_mm(dist);
        }
        (cam.clone(), min_mm(cam.dist))
    }

    /// Depth (mm) of the plate plane along the ray of pixel (x, y).
    fn plane_depth(&self, x: f32, y: f32) -> f32 {
        let r = [(x - self.cx) / self.fx, (y - self.cy) / self.fy, 1.0];
        self.n[2] * self.dist / dot3(self.n, r)
    }

    /// Plate coordinates (mm) of the plate point seen at pixel (x, y).
    fn unproject(&self, x: f32, y: f32) -> [f32; 2] {
        let r = [(x - self.cx) / self.fx, (y - self.cy) / self.fy, 1.0];
        let l = self.plane_depth(x, y);
        let d = [l * r[0], l * r[1], l - self.dist];
        [dot3(d, self.e1), dot3(d, self.e2)]
    }

    /// Pixel position of plate point `uv`, `h` mm above the plate.
    fn project(&self, uv: [f32; 2], h: f32) -> [f32; 2] {
        let p = [0, 1, 2].map(|i| uv[0] * self.e1[i] + uv[1] * self.e2[i] + h * self.n[i]);
        let z = p[2] + self.dist;
        [self.fx * p[0] / z + self.cx, self.fy * p[1] / z + self.cy]
    }

    fn inside(&self, p: [f32; 2], margin: f32) -> bool {
        p[0] >= margin
            && p[1] >= margin
            && p[0] <= self.w as f32 - 1.0 - margin
            && p[1] <= self.h as f32 - 1.0 - margin
    }
}

impl Bead {
    /// A bead through a pixel in the central 40 % of the image, any orientation; returns it
    /// with its truth.
    fn sample(rng: &mut ChaCha8Rng, cam: &Camera) -> (Bead, BeadTruth) {
        let (w, h) = (cam.w as f32, cam.h as f32);
        let centre = [uni(rng, 0.3 * w, 0.7 * w), uni(rng, 0.3 * h, 0.7 * h)];
        let angle = uni(rng, 0.0, 180.0);
        let (ca, sa) = (
            libm::cosf(angle.to_radians()),
            libm::sinf(angle.to_radians()),
        );
        let c = cam.unproject(centre[0], centre[1]);
        let c2 = cam.unproject(centre[0] + 20.0 * ca, centre[1] + 20.0 * sa);
        let d = [c2[0] - c[0], c2[1] - c[1]];
        let dl = (d[0] * d[0] + d[1] * d[1]).sqrt().max(1e-9);
        let dir = [d[0] / dl, d[1] / dl];
        let width = uni(rng, 5.0, 12.0);
        let height = uni(rng, 1.0, 3.0);
        // Ripples finer than ~2 px alias in a real camera's pixels; fade them out (2..4 px).
        let pitch = uni(rng, 0.8, 2.0);
        let pitch_px = pitch * cam.fx / cam.dist;
        let mut bead = Bead {
            c,
            dir,
            perp: [-dir[1], dir[0]],
            hw: width / 2.0,
            height,
            p: uni(rng, 0.5, 1.0),
            kq: 4.0 * uni(rng, 0.2, 0.6) / width, // toe fillet 0.2-0.6 mm wide
            width_var: uni(rng, 0.05, 0.08),
            height_var: uni(rng, 0.02, 0.06),
            var_scale: uni(rng, 10.0, 25.0),
            curv: uni(rng, -1.0, 1.0) / 2500.0, // radius >= 2.5 m: 1 mm off over 70 mm
            wobble: uni(rng, 0.0, 0.4),
            wobble_scale: uni(rng, 15.0, 40.0),
            ripple_amp: uni(rng, 0.03, 0.12) * smoothstep(2.0, 4.0, pitch_px),
            ripple_pitch: pitch,
            // Chevron: the ripple at the toes trails the centre by 0.8-3 mm.
            chevron: uni(rng, 0.8, 3.0) / (width * width / 4.0)
                * if rng.random::<bool>() { 1.0 } else { -1.0 },
            seed: rng.next_u32(),
            along_lut: Vec::new(),
            along_t0: 0.0,
            along_inv_step: 1.0,
            pow_lut: Vec::new(),
        };
        // Tables over every t in view plus 60 mm for defects and shadows reaching outside.
        let ts: Vec<f32> = [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.0, 0.5)]
            .into_iter()
            .chain([(1.0, 0.5), (0.0, 1.0), (0.5, 1.0), (1.0, 1.0)])
            .map(|(a, b)| bead.plate_to_bead(cam.unproject(a * (w - 1.0), b * (h - 1.0)))[0])
            .collect();
        let t_lo = ts.iter().copied().fold(f32::MAX, f32::min) - 60.0;
        let t_hi = ts.iter().copied().fold(f32::MIN, f32::max) + 60.0;
        bead.build_tables(t_lo, t_hi);
        let truth = BeadTruth {
            width_mm: width,
            height_mm: height,
            angle_deg: angle,
            centre_px: centre,
        };
        (bead, truth)
    }

    /// Bead coordinates (t, s) of plate point `uv`.
    fn plate_to_bead(&self, uv: [f32; 2]) -> [f32; 2] {
        let (du, dv) = (uv[0] - self.c[0], uv[1] - self.c[1]);
        let t = du * self.dir[0] + dv * self.dir[1];
        [t, du * self.perp[0] + dv * self.perp[1] - self.offset(t)]
    }

    /// Plate point of bead coordinates (t, s).
    fn bead_to_plate(&self, t: f32, s: f32) -> [f32; 2] {
        let o = s + self.offset(t);
        [
            self.c[0] + t * self.dir[0] + o * self.perp[0],
            self.c[1] + t * self.dir[1] + o * self.perp[1],
        ]
    }
}

impl Light {
    /// 30-60 deg above the plate, any azimuth.
    fn sample(rng: &mut ChaCha8Rng) -> Light {
        let (az, el) = (uni(rng, 0.0, TAU), uni(rng, 30.0, 60.0).to_radians());
        let (ce, se) = (libm::cosf(el), libm::sinf(el));
        Light {
            v: [ce * libm::cosf(az), ce * libm::sinf(az), se],
            dir: [libm::cosf(az), libm::sinf(az)],
            tan_el: se / ce,
        }
    }
}

impl Look {
    fn sample(rng: &mut ChaCha8Rng) -> Look {
        let base = uni(rng, 120.0, 180.0); // steel grey, 8-bit
        let plate = [0; 3].map(|_: i32| base * (1.0 + uni(rng, -0.04, 0.04)));
        let dark = uni(rng, 0.55, 0.8); // weld metal is darker than the rolled plate
        let bead_tint = [uni(rng, -0.04, 0.05), 0.0, uni(rng, -0.05, 0.03)];
        let sp = uni(rng, 1.05, 1.3); // spatter: bright, slightly bluish
        let brush = uni(rng, 0.0, PI);
        Look {
            plate,
            bead: [0, 1, 2].map(|i| plate[i] * dark * (1.0 + bead_tint[i])),
            spatter: [0.97, 1.0, 1.08].map(|k| (base * sp * k).min(250.0)),
            ambient: uni(rng, 0.25, 0.45),
            ks_plate: uni(rng, 0.04, 0.12),
            ks_bead: uni(rng, 0.25, 0.5),
            tint_strength: [uni(rng, 0.1, 0.9), uni(rng, 0.1, 0.9)],
            tint_extent: [uni(rng, 5.0, 15.0), uni(rng, 5.0, 15.0)],
            brush: [libm::cosf(brush), libm::sinf(brush)],
            exposure: uni(rng, 0.85, 1.15),
            vignette: uni(rng, 0.05, 0.2), // light loss in the corners
            noise_sigma: uni(rng, 1.5, 5.0),
            tex_seed: rng.next_u32(),
            rgb_seed: rng.next_u64(),
        }
    }
}

impl Sensor {
    fn sample(rng: &mut ChaCha8Rng, width: usize) -> Sensor {
        let scale = width as f32 / 640.0; // artefact sizes are given for 640 px width
        let band = uni(rng, 1.0, 20.0) * scale;
        Sensor {
            band_px: if rng.random::<bool>() {
                band as usize
            } else {
                0
            },
            blob_frac: uni(rng, 0.0, 0.03),
            bias_mm: uni(rng, 0.01, 0.05),
            bias_cell_px: 64.0 * scale,
            depth_seed: rng.next_u64(),
        }
    }
}

#[derive(Debug, Clone)]
struct Scene {
    cam: Camera,
    unit_mm: f32,
    bead: Bead,
    light: Light,
    /// (t, s) of the plate point below the camera and the camera's height above the plate (mm).
    foot: [f32; 2],
    cam_height: f32,
    /// Plate waviness: seed and amplitude (mm).
    plate_seed: u32,
    plate_wave: f32,
    look: Look,
    sensor: Sensor,
    defects: Vec<Defect>,
    truth: GroundTruth,
}

impl Scene {
    fn sample(class: SynthClass, seed: u64, cfg: &SynthConfig) -> Scene {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (cam, min_mm) = Camera::sample(&mut rng, cfg);
        let (bead, bead_truth) = Bead::sample(&mut rng, &cam);
        let light = Light::sample(&mut rng);
        // Plate point straight below the camera, for per-pixel view vectors.
        let n = cam.n;
        let foot3 = [0, 1, 2].map(|i| cam.dist * n[2] * n[i] - if i == 2 { cam.dist } else { 0.0 });
        let foot = bead.plate_to_bead([dot3(foot3, cam.e1), dot3(foot3, cam.e2)]);
        let mut sc = Scene {
            unit_mm: cfg.depth_unit_mm,
            foot,
            cam_height: cam.dist * cam.cos_tilt,
            plate_seed: rng.next_u32(),
            plate_wave: uni(&mut rng, 0.01, 0.05),
            look: Look::sample(&mut rng),
            sensor: Sensor::sample(&mut rng, cam.w),
            defects: Vec::new(),
            truth: GroundTruth {
                class,
                defects: Vec::new(),
                bead: bead_truth,
                camera_distance_mm: cam.dist,
                tilt_deg: cam.tilt_deg,
            },
            cam,
            bead,
            light,
        };
        sc.sample_defects(class, &mut rng, min_mm);
        sc
    }

    /// Pixel position of the point at bead coordinates (t, s), `h` mm above the plate.
    fn project(&self, t: f32, s: f32, h: f32) -> [f32; 2] {
        self.cam.project(self.bead.bead_to_plate(t, s), h)
    }

    /// Pixel extent of the projected points: inclusive (x0, y0, x1, y1), None when off-image.
    fn extent(&self, pts: &[[f32; 2]]) -> Option<[usize; 4]> {
        let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
        for p in pts {
            (x0, y0, x1, y1) = (x0.min(p[0]), y0.min(p[1]), x1.max(p[0]), y1.max(p[1]));
        }
        let (x0, y0) = ((x0 + 0.5).floor(), (y0 + 0.5).floor());
        let (x1, y1) = ((x1 + 0.5).floor(), (y1 + 0.5).floor());
        if x1 < 0.0 || y1 < 0.0 || x0 > (self.cam.w - 1) as f32 || y0 > (self.cam.h - 1) as f32 {
            return None;
        }
        let clip = |v: f32, max: usize| v.clamp(0.0, (max - 1) as f32) as usize;
        Some([
            clip(x0, self.cam.w),
            clip(y0, self.cam.h),
            clip(x1, self.cam.w),
            clip(y1, self.cam.h),
        ])
    }

    /// Projections of 12 points on a circle of radius `r` mm around (t, s), `h` mm up.
    fn circle(&self, t: f32, s: f32, r: f32, h: f32) -> Vec<[f32; 2]> {
        (0..12)
            .map(|k| {
                let a = k as f32 * TAU / 12.0;
                self.project(t + r * libm::cosf(a), s + r * libm::sinf(a), h)
            })
            .collect()
    }

    /// Bead height (mm) without defects at (t, s).
    fn bead_height(&self, t: f32, s: f32) -> f32 {
        let b = &self.bead;
        b.profile(s, b.half_width(t), b.height_at(t)).0
    }

    /// Range of `t` (mm) over which the bead axis is in view, 3 px inside the image edges.
    fn visible_t(&self) -> (f32, f32) {
        let ok = |t: f32| self.cam.inside(self.project(t, 0.0, 0.0), 3.0);
        let walk = |sign: f32| {
            let mut t = 0.0f32;
            while t.abs() < 2000.0 && ok(t + sign * 0.5) {
                t += sign * 0.5;
            }
            t
        };
        (walk(-1.0), walk(1.0))
    }

    /// Adds a defect with its truth, both only when its projected extent is in the image.
    fn push(
        &mut self,
        d: Defect,
        kind: FindingKind,
        pts: &[[f32; 2]],
        size_mm: f32,
        depth_mm: f32,
    ) {
        if let Some([x0, y0, x1, y1]) = self.extent(pts) {
            let bbox = [
                x0 as u32,
                y0 as u32,
                (x1 - x0 + 1) as u32,
                (y1 - y0 + 1) as u32,
            ];
            self.truth.defects.push(DefectTruth {
                kind,
                bbox,
                size_mm,
                depth_mm,
            });
            self.defects.push(d);
        }
    }

    /// Places the defects of `class` on the visible part of the bead. `min_mm` is the 2 px size.
    fn sample_defects(&mut self, class: SynthClass, rng: &mut ChaCha8Rng, min_mm: f32) {
        let (tlo, thi) = self.visible_t();
        let t_in = |rng: &mut ChaCha8Rng, margin: f32| {
            if thi - tlo > 2.0 * margin {
                uni(rng, tlo + margin, thi - margin)
            } else {
                0.0
            }
        };
        let sign = |rng: &mut ChaCha8Rng| if rng.random::<bool>() { 1.0f32 } else { -1.0 };
        match class {
            SynthClass::Good => {}
            SynthClass::Porosity => {
                let count = rng.random_range(1..=6u32) as usize;
                let mut pores: Vec<Pore> = Vec::new();
                for attempt in 0..300 {
                    if pores.len() == count {
                        break;
                    }
                    let q = uni(rng, 0.8, 1.0); // minor / major axis
                    let lo = (0.8f32).max(min_mm / q.sqrt()).min(3.0);
                    let d = uni(rng, lo, 3.0); // equal-area diameter, mm
                    let (ra, rb) = (d / 2.0 / q.sqrt(), d / 2.0 * q.sqrt());
                    let last = attempt == 299 && pores.is_empty();
                    let t = if last { 0.0 } else { t_in(rng, ra) };
                    let hw = self.bead.half_width(t);
                    let smax = (0.7 * hw).min(hw - 0.8 * ra).max(0.0); // |s| < 0.35 W
                    let s = if last { 0.0 } else { uni(rng, -smax, smax) };
                    let free = pores.iter().all(|p| {
                        (p.t - t) * (p.t - t) + (p.s - s) * (p.s - s)
                            > (p.ra + ra + 0.2) * (p.ra + ra + 0.2)
                    });
                    let local = self.bead_height(t, s);
                    let seen = self.cam.inside(self.project(t, s, local), 1.0);
                    if !(last || free && seen) {
                        continue;
                    }
                    let depth = uni(rng, 0.3, (0.8 * local).clamp(0.3, 1.5)).min(0.8 * local);
                    let a = uni(rng, 0.0, PI);
                    pores.push(Pore {
                        t,
                        s,
                        ra,
                        rb,
                        rot: [libm::cosf(a), libm::sinf(a)],
                        depth,
                    });
                }
                for p in pores {
                    let pts = self.circle(p.t, p.s, p.ra, self.bead_height(p.t, p.s));
                    let (d, depth) = (2.0 * (p.ra * p.rb).sqrt(), p.depth);
                    self.push(Defect::Pore(p), FindingKind::Pore, &pts, d, depth);
                }
            }
            SynthClass::Undercut => {
                let first = sign(rng);
                let both = rng.random::<f32>() < 0.25; // both toes in a quarter of the frames
                let sides: &[f32] = if both { &[1.0, -1.0] } else { &[first] };
                for &want in sides {
                    let g = uni(rng, (0.6f32).max(min_mm).min(1.6), 1.6);
                    let depth = uni(rng, 0.3, 1.2);
                    let len = uni(rng, 8.0, 40.0).min(thi - tlo).max(1.0);
                    // Random segments of the visible bead; a lone groove may move to the other
                    // toe when this one is out of view; last, the segment around the centre.
                    let tries = (0..60).map(|k| {
                        let side = if k >= 30 && !both { -want } else { want };
                        let t0 = if thi - tlo > len {
                            uni(rng, tlo, thi - len)
                        } else {
                            tlo
                        };
                        (t0, side)
                    });
                    let centre = [(-len / 2.0, want), (-len / 2.0, -want)];
                    let seen = tries.chain(centre).find(|&(t0, side)| {
                        let mid = t0 + len / 2.0;
                        let s = side * (self.bead.half_width(mid) + g / 2.0);
                        self.cam.inside(self.project(mid, s, 0.0), 1.0)
                    });
                    let Some((t0, side)) = seen else { continue };
                    let pts: Vec<[f32; 2]> = (0..=16)
                        .flat_map(|k| {
                            let t = t0 + len * k as f32 / 16.0;
                            let hw = self.bead.half_width(t);
                            [
                                self.project(t, side * hw, 0.0),
                                self.project(t, side * (hw + g), 0.0),
                            ]
                        })
                        .collect();
                    let groove = Groove {
                        side,
                        t0,
                        t1: t0 + len,
                        g,
                        depth,
                    };
                    self.push(
                        Defect::Undercut(groove),
                        FindingKind::Undercut,
                        &pts,
                        len,
                        depth,
                    );
                }
            }
            SynthClass::Spatter => {
                let count = rng.random_range(3..=20u32) as usize;
                let mut drops: Vec<Droplet> = Vec::new();
                for attempt in 0..600u32 {
                    if drops.len() >= count || (attempt >= 500 && drops.len() >= 3) {
                        break;
                    }
                    let d = uni(rng, (0.4f32).max(min_mm).min(2.0), 2.0);
                    let r = d / 2.0;
                    let height = d * uni(rng, 0.4, 0.6);
                    // After 500 tries (a tiny view) walk out from the centre, close to the toes.
                    let k = attempt.saturating_sub(500) as f32;
                    let t = if attempt < 500 {
                        t_in(rng, 0.0)
                    } else {
                        (k / 2.0).floor() * 2.5
                    };
                    let off = if attempt < 500 {
                        uni(rng, 1.0 + r, 20.0)
                    } else {
                        1.0 + r
                    };
                    let side = if attempt < 500 {
                        sign(rng)
                    } else {
                        1.0 - 2.0 * (k % 2.0)
                    };
                    let s = side * (self.bead.half_width(t) + off);
                    let free = drops.iter().all(|o| {
                        (o.t - t) * (o.t - t) + (o.s - s) * (o.s - s)
                            > (o.r + r + 0.1) * (o.r + r + 0.1)
                    });
                    if free && self.cam.inside(self.project(t, s, 0.0), 1.0) {
                        drops.push(Droplet { t, s, r, height });
                    }
                }
                for dr in drops {
                    let pts = self.circle(dr.t, dr.s, dr.r, 0.0);
                    let (size, height) = (2.0 * dr.r, dr.height);
                    self.push(
                        Defect::Spatter(dr),
                        FindingKind::Spatter,
                        &pts,
                        size,
                        height,
                    );
                }
            }
            SynthClass::BurnThrough => {
                let d = uni(rng, (2.0f32).max(min_mm).min(7.0), 7.0);
                let r = d / 2.0;
                let (mut t, mut s) = (0.0, 0.0);
                for _ in 0..50 {
                    let (ct, cs) = (t_in(rng, r), uni(rng, -0.3, 0.3) * self.bead.hw);
                    if self.cam.inside(
                        self.project(ct, cs, 0.0),
                        1.0 + r * self.cam.fx / self.cam.dist / 2.0,
                    ) {
                        (t, s) = (ct, cs);
                        break;
                    }
                }
                let harm = [
                    uni(rng, 0.0, 0.15),
                    uni(rng, 0.0, 0.08),
                    uni(rng, 0.0, 0.05),
                ]
                .map(|a| [a, uni(rng, 0.0, TAU)]);
                let far = if rng.random::<f32>() < 0.4 {
                    Some(uni(rng, 20.0, 80.0))
                } else {
                    None
                };
                let hole = Hole {
                    t,
                    s,
                    r,
                    harm,
                    far,
                    sag: uni(rng, 0.5, 0.9),
                    sink: uni(rng, 0.1, 0.5),
                };
                let pts = self.circle(t, s, hole.max_r(), 0.0);
                let depth = far.unwrap_or(f32::INFINITY);
                self.push(
                    Defect::BurnThrough(hole),
                    FindingKind::BurnThrough,
                    &pts,
                    d,
                    depth,
                );
            }
        }
    }
}

// --------------------------------------------------------------------------- height map

/// Per-pixel bead coordinates (mm) of the plate point in view.
struct Geometry {
    t: Vec<f32>,
    s: Vec<f32>,
}

impl Geometry {
    fn new(sc: &Scene) -> Geometry {
        let n = sc.cam.w * sc.cam.h;
        let mut g = Geometry {
            t: Vec::with_capacity(n),
            s: Vec::with_capacity(n),
        };
        let b = &sc.bead;
        for y in 0..sc.cam.h {
            let ry = (y as f32 - sc.cam.cy) / sc.cam.fy;
            for x in 0..sc.cam.w {
                let r = [(x as f32 - sc.cam.cx) / sc.cam.fx, ry, 1.0];
                let l = sc.cam.n[2] * sc.cam.dist / dot3(sc.cam.n, r);
                let d = [l * r[0], l * r[1], l - sc.cam.dist];
                let (du, dv) = (dot3(d, sc.cam.e1) - b.c[0], dot3(d, sc.cam.e2) - b.c[1]);
                let t = du * b.dir[0] + dv * b.dir[1];
                g.t.push(t);
                g.s.push(du * b.perp[0] + dv * b.perp[1] - b.offset(t));
            }
        }
        g
    }
}

const MAT_PLATE: u8 = 0;
const MAT_SPATTER: u8 = 1;
const MAT_HOLE: u8 = 2;

/// Height above the plate plane (mm), material, ambient occlusion (0 = none, 255 = black) and
/// direct light (0 = cast shadow, 255 = lit) of every pixel.
struct Surface {
    h: Vec<f32>,
    mat: Vec<u8>,
    occ: Vec<u8>,
    sun: Vec<u8>,
}

/// 0..1 to the 8-bit scale of `Surface::occ` and `Surface::sun`.
fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// 0 where the local height field `f` (of plate coordinates t, s) blocks the light between the
/// point (t, s) at height `h0` and `reach` mm toward the light, else 1.
fn lit(f: impl Fn(f32, f32) -> f32, light: &Light, t: f32, s: f32, h0: f32, reach: f32) -> f32 {
    const STEPS: usize = 8;
    for k in 1..=STEPS {
        let d = reach * k as f32 / STEPS as f32;
        if f(t + light.dir[0] * d, s + light.dir[1] * d) > h0 + d * light.tan_el + 0.01 {
            return 0.0;
        }
    }
    1.0
}

impl Surface {
    fn new(sc: &Scene, geo: &Geometry) -> Surface {
        let n = sc.cam.w * sc.cam.h;
        let mut sf = Surface {
            h: Vec::with_capacity(n),
            mat: vec![MAT_PLATE; n],
            occ: vec![0; n],
            sun: vec![255; n],
        };
        let b = &sc.bead;
        // Plate waviness: < 0.05 mm over cells of 37 x 29 mm.
        let wave = Coarse::new(sc.cam.w, sc.cam.h, |x, y| {
            let [t, s] = sc.bead.plate_to_bead(sc.cam.unproject(x, y));
            sc.plate_wave * noise2(sc.plate_seed, t / 37.0, s / 29.0)
        });
        for y in 0..sc.cam.h {
            for x in 0..sc.cam.w {
                let (t, s) = (geo.t[y * sc.cam.w + x], geo.s[y * sc.cam.w + x]);
                let al = b.along(t);
                let (cap, q) = b.profile(s, al[1], al[2]);
                sf.h.push(wave.at(x, y) + cap + b.ripple(t, s, q, al[3]));
            }
        }
        let light = &sc.light;
        for defect in &sc.defects {
            match defect {
                Defect::Pore(p) => {
                    let pts = sc.circle(p.t, p.s, p.ra * 1.2, sc.bead_height(p.t, p.s));
                    let pit = |t: f32, s: f32| -p.depth * (1.0 - p.rho2(t, s)).max(0.0);
                    sc.for_pixels(&pts, |i| {
                        let (t, s) = (geo.t[i], geo.s[i]);
                        let rho2 = p.rho2(t, s);
                        if rho2 < 1.0 {
                            sf.h[i] -= p.depth * (1.0 - rho2);
                            // A gas pore opens into a cavity that little light leaves: dark
                            // inside, more so when deep for its width; the rim stays lit.
                            let k = 0.45 + 0.4 * (p.depth / p.rb).min(1.0);
                            sf.occ[i] = sf.occ[i].max(to_u8(k * (1.0 - rho2).sqrt()));
                            let l = lit(pit, light, t, s, pit(t, s), 2.0 * p.ra);
                            sf.sun[i] = sf.sun[i].min(to_u8(l));
                        }
                    });
                }
                Defect::Undercut(gr) => {
                    let pts: Vec<[f32; 2]> = (0..=32)
                        .flat_map(|k| {
                            let t = gr.t0 + (gr.t1 - gr.t0) * k as f32 / 32.0;
                            let hw = b.half_width(t);
                            [
                                sc.project(t, gr.side * hw, 0.0),
                                sc.project(t, gr.side * (hw + gr.g), 0.0),
                            ]
                        })
                        .collect();
                    sc.for_pixels(&pts, |i| {
                        let (t, s) = (geo.t[i], geo.s[i]);
                        let hw = b.half_width(t);
                        let share = gr.share(t, s, hw);
                        if share > 0.0 {
                            sf.h[i] -= gr.depth * share;
                            let ao = 0.5 * share * (gr.depth / gr.g).min(1.0);
                            sf.occ[i] = sf.occ[i].max(to_u8(ao));
                            let f = |t2: f32, s2: f32| -gr.depth * gr.share(t2, s2, hw);
                            let l = lit(f, light, t, s, -gr.depth * share, 2.0 * gr.g);
                            sf.sun[i] = sf.sun[i].min(to_u8(l));
                        }
                    });
                }
                Defect::Spatter(dr) => {
                    let reach = dr.r + dr.height / light.tan_el;
                    let pts = sc.circle(dr.t, dr.s, dr.r + reach, 0.0);
                    sc.for_pixels(&pts, |i| {
                        let (t, s) = (geo.t[i], geo.s[i]);
                        let dh = dr.height_at(t, s);
                        if dh > 0.0 {
                            sf.h[i] += dh;
                            sf.mat[i] = MAT_SPATTER;
                        } else {
                            let l = lit(|a, b| dr.height_at(a, b), light, t, s, 0.0, 2.0 * reach);
                            sf.sun[i] = sf.sun[i].min(to_u8(l));
                            // Contact occlusion within 0.4 radii of the droplet's foot.
                            let ring = (((t - dr.t) * (t - dr.t) + (s - dr.s) * (s - dr.s)).sqrt()
                                - dr.r)
                                / dr.r;
                            sf.occ[i] = sf.occ[i].max(to_u8(0.35 * (1.0 - ring / 0.4)));
                        }
                    });
                }
                Defect::BurnThrough(hole) => {
                    let pts = sc.circle(hole.t, hole.s, 2.2 * hole.max_r(), 0.0);
                    sc.for_pixels(&pts, |i| {
                        let rr = hole.rr(geo.t[i], geo.s[i]);
                        // Sagged, concave bead over about one hole radius around the hole.
                        let w = if rr < 1.0 {
                            1.0
                        } else {
                            (2.0 - rr).clamp(0.0, 1.0) * (2.0 - rr).clamp(0.0, 1.0)
                        };
                        sf.h[i] = sf.h[i] * (1.0 - hole.sag * w) - hole.sink * w;
                        if rr < 1.0 {
                            sf.mat[i] = MAT_HOLE;
                        }
                    });
                }
            }
        }
        sf
    }
}

impl Scene {
    /// Calls `f` with the index of every pixel in the extent of `pts`, padded by 2 px.
    fn for_pixels(&self, pts: &[[f32; 2]], mut f: impl FnMut(usize)) {
        if let Some([x0, y0, x1, y1]) = self.extent(pts) {
            let (x0, y0) = (x0.saturating_sub(2), y0.saturating_sub(2));
            let (x1, y1) = ((x1 + 2).min(self.cam.w - 1), (y1 + 2).min(self.cam.h - 1));
            for y in y0..=y1 {
                for x in x0..=x1 {
                    f(y * self.cam.w + x);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------ RGB and depth

/// Oxide colours (8-bit, for a plate of brightness 150) by distance from the toe over the
/// tint extent: straw, gold, brown, purple, blue, then pale blue-grey.
const TINT_RAMP: [(f32, [f32; 3]); 6] = [
    (0.0, [215.0, 195.0, 140.0]),
    (0.15, [205.0, 155.0, 70.0]),
    (0.32, [140.0, 85.0, 50.0]),
    (0.5, [115.0, 70.0, 120.0]),
    (0.68, [70.0, 95.0, 155.0]),
    (0.85, [125.0, 138.0, 158.0]),
];

fn tint_colour(x: f32) -> [f32; 3] {
    let mut prev = TINT_RAMP[0];
    for stop in TINT_RAMP {
        if x <= stop.0 {
            let k = if stop.0 > prev.0 {
                (x - prev.0) / (stop.0 - prev.0)
            } else {
                0.0
            };
            return [0, 1, 2].map(|c| prev.1[c] + (stop.1[c] - prev.1[c]) * k);
        }
        prev = stop;
    }
    prev.1
}

/// Shadow the bead ridge casts on its lee side, as direct light (0..1) by lateral position on
/// the undisturbed surface (1-D, because the bead is a ridge along t). Defects cast their
/// own shadows (`lit`), so a pit on the lit flank is not mistaken for the bead's shadow.
struct BeadShadow {
    sign: f32,
    start: f32,
    inv_step: f32,
    light: Vec<f32>,
}

impl BeadShadow {
    fn new(sc: &Scene) -> Option<BeadShadow> {
        let b = &sc.bead;
        let across = sc.light.dir[1]; // horizontal light component across the bead
        if across.abs() < 0.05 {
            return None; // light along the bead: no cast shadow beside it
        }
        let kl = sc.light.tan_el / across.abs(); // ray rise per mm of lateral travel
        let (start, end) = (-1.3 * b.hw, 1.3 * b.hw + 1.2 * b.height / kl);
        const N: usize = 512;
        const LAG: usize = 3; // samples; keeps lit convex surfaces clear of their own ray
        let step = (end - start) / N as f32;
        // Lateral position sigma = sign * s has the light coming from -sigma.
        let sign = -across.signum();
        let prof: Vec<f32> = (0..N)
            .map(|k| b.profile(start + k as f32 * step, b.hw, b.height).0)
            .collect();
        let mut best = f32::MIN; // highest (profile + kl sigma) seen toward the light
        let mut light = vec![1.0; N];
        for k in LAG..N {
            best = best.max(prof[k - LAG] + kl * (start + (k - LAG) as f32 * step));
            let ray = best - kl * (start + k as f32 * step);
            light[k] = smoothstep(-0.06, 0.02, prof[k] - ray); // mm: soft penumbra
        }
        Some(BeadShadow {
            sign,
            start,
            inv_step: 1.0 / step,
            light,
        })
    }

    /// Direct light at lateral `s`, scaled to the nominal width by `width_ratio`.
    fn light(&self, s: f32, width_ratio: f32) -> f32 {
        let k = (self.sign * s / width_ratio - self.start) * self.inv_step;
        if k < 0.0 || k >= self.light.len() as f32 {
            return 1.0;
        }
        self.light[k as usize]
    }
}

/// Everything the per-pixel shading needs that is fixed for the frame.
struct Shader<'a> {
    sc: &'a Scene,
    geo: &'a Geometry,
    sf: &'a Surface,
    shadow: Option<BeadShadow>,
    /// Plate brightness relative to 150, for the absolute tint colours.
    bright: f32,
    hole: Option<(&'a Hole, [usize; 4])>,
    hole_floor: f32,
}

impl Shader<'_> {
    /// Linear colour (8-bit units, before exposure), cosine between normal and view, and
    /// specular glint strength (0..1) on shiny metal, of pixel `i` at (x, y).
    fn pixel(&self, x: usize, y: usize, i: usize, scratch: f32) -> ([f32; 3], f32, f32) {
        let (sc, geo, sf) = (self.sc, self.geo, self.sf);
        let (lk, lv) = (&sc.look, sc.light.v);
        let (w, h) = (sc.cam.w, sc.cam.h);
        if sf.mat[i] == MAT_HOLE {
            return (lk.plate.map(|c| c * self.hole_floor), 0.0, 0.0);
        }
        let (t, s) = (geo.t[i], geo.s[i]);
        let hw = sc.bead.half_width(t);
        // Surface gradient in the bead frame from pixel differences (2x2 Jacobian solve).
        let (il, ir) = (
            if x > 0 { i - 1 } else { i },
            if x + 1 < w { i + 1 } else { i },
        );
        let (iu, id) = (
            if y > 0 { i - w } else { i },
            if y + 1 < h { i + w } else { i },
        );
        let (tx, sx, hx) = (
            geo.t[ir] - geo.t[il],
            geo.s[ir] - geo.s[il],
            sf.h[ir] - sf.h[il],
        );
        let (ty, sy, hy) = (
            geo.t[id] - geo.t[iu],
            geo.s[id] - geo.s[iu],
            sf.h[id] - sf.h[iu],
        );
        let det = tx * sy - sx * ty;
        let (gt, gs) = if det.abs() > 1e-12 {
            ((hx * sy - sx * hy) / det, (tx * hy - hx * ty) / det)
        } else {
            (0.0, 0.0)
        };
        let nrm = normalize3([-gt, -gs, 1.0]);
        let view = normalize3([sc.foot[0] - t, sc.foot[1] - s, sc.cam_height - sf.h[i]]);
        let half = normalize3([lv[0] + view[0], lv[1] + view[1], lv[2] + view[2]]);
        let mut sun = f32::from(sf.sun[i]) / 255.0;
        if let Some(bs) = &self.shadow {
            sun = sun.min(bs.light(s, hw / sc.bead.hw));
        }
        let occ = f32::from(sf.occ[i]) / 255.0;
        let diffuse = dot3(nrm, lv).max(0.0) / lv[2]; // 1 on the flat plate
        let shade = (lk.ambient + (1.0 - lk.ambient) * diffuse * sun) * (1.0 - occ);
        let mut nh = dot3(nrm, half).max(0.0);
        for _ in 0..5 {
            nh *= nh; // Blinn-Phong exponent 32
        }
        // Albedo: brushed plate with heat tint, darker bead, bright spatter.
        let toe = s.abs() - hw;
        let wb = 1.0 - smoothstep(-0.4, 0.3, toe); // share of bead metal, mm from the toe
        let (along, across) = (
            t * lk.brush[0] + s * lk.brush[1],
            s * lk.brush[0] - t * lk.brush[1],
        );
        // Brushing: streaks 0.25 mm across and 8 mm along, plus grain in 0.07 x 3 mm cells
        // (below a pixel across, so one hash per cell is enough).
        let brushed = 0.05 * noise2(lk.tex_seed, across * 4.0, along * 0.125)
            + 0.04
                * lattice(
                    lk.tex_seed ^ 1,
                    floor_i(across * 14.0),
                    floor_i(along * 0.33),
                );
        let mut alb = lk.plate.map(|c| c * (1.0 + brushed) * scratch);
        let side = usize::from(s > 0.0);
        if toe < lk.tint_extent[side] + 1.0 {
            // Ragged tint edges: +-0.8 mm over ~4 mm along the bead.
            let xt = (toe + 0.8 * noise1(lk.tex_seed ^ 2, t * 0.25)) / lk.tint_extent[side];
            let k = lk.tint_strength[side] * (1.0 - smoothstep(0.75, 1.0, xt));
            if k > 0.0 {
                let tc = tint_colour(xt.max(0.0));
                alb = [0, 1, 2].map(|c| alb[c] + (tc[c] * self.bright - alb[c]) * k);
            }
        }
        if wb > 0.0 {
            // Bead metal, mottled over ~0.6 mm.
            let mottle = 1.0 + 0.06 * noise2(lk.tex_seed ^ 3, t * 1.6, s * 1.6);
            alb = [0, 1, 2].map(|c| alb[c] + (lk.bead[c] * mottle - alb[c]) * wb);
        }
        if let Some((hole, [x0, y0, x1, y1])) = self.hole
            && (x0..=x1).contains(&x)
            && (y0..=y1).contains(&y)
        {
            // Dark oxidised ring, then an orange-brown heat tint out to ~2.3 hole radii.
            let rr = hole.rr(t, s);
            let heat = 0.6 * (1.0 - smoothstep(1.3, 2.3, rr)) * smoothstep(1.0, 1.3, rr);
            let oxide = 1.0 - 0.75 * (1.0 - smoothstep(1.0, 1.4, rr));
            let tint = [150.0, 80.0, 35.0].map(|c| c * self.bright);
            alb = [0, 1, 2].map(|c| (alb[c] + (tint[c] - alb[c]) * heat) * oxide);
        }
        let spatter = sf.mat[i] == MAT_SPATTER;
        let (alb, ks) = if spatter {
            (lk.spatter, 0.9) // polished droplet: strong highlight
        } else {
            (alb, lk.ks_plate + (lk.ks_bead - lk.ks_plate) * wb)
        };
        let spec = ks * nh * sun;
        let glint = nh * sun * if spatter { 1.0 } else { wb };
        (
            alb.map(|c| c * shade + 255.0 * spec),
            dot3(nrm, view),
            glint,
        )
    }
}

/// Pixel index and albedo factor of the scratches on the plate (0..6 straight lines,
/// 5-60 mm long, 1 px wide), sorted by pixel index.
fn scratches(sc: &Scene, geo: &Geometry) -> Vec<(usize, f32)> {
    let mut out = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(sc.look.rgb_seed ^ 0x5C);
    for _ in 0..rng.random_range(0..=6u32) {
        let i = rng.random_range(0..(sc.cam.w * sc.cam.h) as u32) as usize;
        let (len, a) = (uni(&mut rng, 5.0, 60.0), uni(&mut rng, 0.0, PI));
        let k = 1.0 + uni(&mut rng, -0.15, 0.12); // darker or brighter than the plate
        let (dt, ds) = (0.5 * len * libm::cosf(a), 0.5 * len * libm::sinf(a));
        let p0 = sc.project(geo.t[i] - dt, geo.s[i] - ds, 0.0);
        let p1 = sc.project(geo.t[i] + dt, geo.s[i] + ds, 0.0);
        let steps = (p1[0] - p0[0])
            .abs()
            .max((p1[1] - p0[1]).abs())
            .ceil()
            .min(20_000.0) as usize;
        for j in 0..=steps {
            let u = j as f32 / steps.max(1) as f32;
            let p = [p0[0] + (p1[0] - p0[0]) * u, p0[1] + (p1[1] - p0[1]) * u];
            if sc.cam.inside(p, 0.0) {
                out.push(((p[1] + 0.5) as usize * sc.cam.w + (p[0] + 0.5) as usize, k));
            }
        }
    }
    out.sort_by_key(|e| e.0); // stable: where scratches cross, the later one wins
    out
}

/// Stereo matching failures: ragged blobs covering 0-3 % of the pixels.
fn dropout_blobs(sc: &Scene, rng: &mut ChaCha8Rng) -> Vec<bool> {
    let (w, h) = (sc.cam.w, sc.cam.h);
    let mut dropped = vec![false; w * h];
    let (mut area, target) = (0.0, sc.sensor.blob_frac * (w * h) as f32);
    let scale = w as f32 / 640.0; // blob radii 2-14 px at 640 px width
    while area < target {
        let (bx, by) = (uni(rng, 0.0, w as f32), uni(rng, 0.0, h as f32));
        let (ra, rb) = (uni(rng, 2.0, 14.0) * scale, uni(rng, 2.0, 14.0) * scale);
        let seed = rng.next_u32();
        area += PI * ra * rb;
        let (x0, x1) = (
            (bx - ra * 1.3).max(0.0) as usize,
            ((bx + ra * 1.3) as usize).min(w - 1),
        );
        let (y0, y1) = (
            (by - rb * 1.3).max(0.0) as usize,
            ((by + rb * 1.3) as usize).min(h - 1),
        );
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (dx, dy) = ((x as f32 - bx) / ra, (y as f32 - by) / rb);
                let edge =
                    1.0 + 0.3 * noise2(seed, x as f32 / (3.0 * scale), y as f32 / (3.0 * scale));
                if dx * dx + dy * dy < edge * edge {
                    dropped[y * w + x] = true;
                }
            }
        }
    }
    dropped
}

/// Shades every pixel and runs both sensors over it: the colour camera (exposure, vignetting,
/// noise, 8 bits) and the stereo depth (noise, bias, dropouts, 16 bits).
fn render(sc: &Scene, geo: &Geometry, sf: &Surface) -> (RgbImage, DepthImage) {
    let (w, h) = (sc.cam.w, sc.cam.h);
    let (lk, sn) = (&sc.look, &sc.sensor);
    let hole = sc.defects.iter().find_map(|d| match d {
        Defect::BurnThrough(hole) => Some(hole),
        _ => None,
    });
    let shader = Shader {
        sc,
        geo,
        sf,
        shadow: BeadShadow::new(sc),
        bright: lk.plate[1] / 150.0,
        hole: hole.and_then(|hl| {
            Some((
                hl,
                sc.extent(&sc.circle(hl.t, hl.s, 2.4 * hl.max_r(), 0.0))?,
            ))
        }),
        // The floor seen through the hole is dimly lit; with no return it is out of reach.
        hole_floor: if hole.is_some_and(|hl| hl.far.is_some()) {
            0.06
        } else {
            0.02
        },
    };
    let far = hole.and_then(|hl| hl.far);
    let scratches = scratches(sc, geo);
    let mut scratch_at = scratches.iter().peekable();
    let mut rgb_rng = ChaCha8Rng::seed_from_u64(lk.rgb_seed);
    let mut depth_rng = ChaCha8Rng::seed_from_u64(sn.depth_seed);
    let dropped = dropout_blobs(sc, &mut depth_rng);
    // Slow depth bias of up to +-0.05 mm over cells of 64 px (at 640 px width).
    let cell = 1.0 / sn.bias_cell_px;
    let bias = Coarse::new(w, h, |x, y| {
        sn.bias_mm * noise2(sn.depth_seed as u32, x * cell, y * cell)
    });
    let vignette = lk.vignette / (sc.cam.cx * sc.cam.cx + sc.cam.cy * sc.cam.cy);
    let mut rgb = RgbImage::new(w as u32, h as u32);
    let mut depth = DepthImage::new(w as u32, h as u32);
    let (rgb_out, depth_out): (&mut [u8], &mut [u16]) = (&mut rgb, &mut depth);
    let mut noise = [0.0f32; 6];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let mut scratch = 1.0;
            while let Some(&&(j, k)) = scratch_at.peek() {
                if j > i {
                    break;
                }
                scratch = k;
                scratch_at.next();
            }
            let (colour, ndv, glint) = shader.pixel(x, y, i, scratch);
            // Colour camera; three draws give the channel noise of two pixels.
            if x % 2 == 0 {
                let [a, b, c] = [0; 3].map(|_| gauss2(&mut rgb_rng));
                noise = [a[0], a[1], b[0], b[1], c[0], c[1]];
            }
            let (dx, dy) = (x as f32 - sc.cam.cx, y as f32 - sc.cam.cy);
            let gain = lk.exposure * (1.0 - vignette * (dx * dx + dy * dy));
            for c in 0..3 {
                let v = colour[c] * gain + lk.noise_sigma * noise[3 * (x % 2) + c];
                rgb_out[3 * i + c] = (v.clamp(0.0, 255.0) + 0.5) as u8; // round half up
            }
            // Depth: one draw per pixel gives the noise (Irwin-Hall as in gauss2) and the
            // dropout lottery (24-bit uniform).
            let r = depth_rng.next_u64();
            let g =
                ((r & 0xFF) + ((r >> 8) & 0xFF) + ((r >> 16) & 0xFF) + ((r >> 24) & 0xFF)) as f32;
            let g = (g - 510.0) / 147.800_54;
            let u = (r >> 40) as f32 / 16_777_216.0;
            let zp = sc.cam.plane_depth(x as f32, y as f32);
            let z = match (sf.mat[i] == MAT_HOLE, far) {
                (true, Some(f)) => zp + f,
                (true, None) => 0.0, // nothing within range behind the hole
                (false, _) => zp - sf.h[i] * sc.cam.cos_tilt,
            };
            // Drop probability rises on slopes past ~63 deg from the view and in glints.
            let p_slope = ((0.45 - ndv) / 0.3).clamp(0.0, 1.0) * 0.9;
            let p_glint = ((glint - 0.5) / 0.5).clamp(0.0, 1.0) * 0.8;
            let lost = dropped[i] || x < sn.band_px || u < p_slope.max(p_glint);
            depth_out[i] = if z <= 0.0 || (lost && sf.mat[i] != MAT_HOLE) {
                0
            } else {
                // D405-like noise: sigma = 0.02 mm + 0.0004 z, plus the slow bias.
                let zn = z + bias.at(x, y) + (0.02 + 0.0004 * z) * g;
                ((zn / sc.unit_mm).clamp(1.0, 65_535.0) + 0.5) as u16 // round half up
            };
        }
    }
    (rgb, depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SynthConfig {
        SynthConfig::new(320, 240)
    }

    /// Depth in mm per pixel, 0 where there is none.
    fn depth_mm(f: &Frame) -> Vec<f32> {
        let d = f.depth().unwrap();
        d.values
            .as_raw()
            .iter()
            .map(|&v| f32::from(v) * d.unit_mm)
            .collect()
    }

    fn median(mut v: Vec<f32>) -> Option<f32> {
        v.sort_by(f32::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    }

    /// Least-squares plane 1/z = a + b x + c y (exact for a plane seen by a pinhole camera)
    /// through the valid pixels where `keep` holds; returns the plane's depth per pixel.
    fn plate_fit(z: &[f32], w: usize, keep: impl Fn(usize) -> bool) -> Vec<f32> {
        let mut m = [[0.0f64; 4]; 3];
        for (i, &v) in z.iter().enumerate() {
            if v > 0.0 && keep(i) {
                let r = [1.0, (i % w) as f64, (i / w) as f64];
                for a in 0..3 {
                    for b in 0..3 {
                        m[a][b] += r[a] * r[b];
                    }
                    m[a][3] += r[a] / f64::from(v);
                }
            }
        }
        for c in 0..3 {
            let p = m[c][c];
            m[c].iter_mut().for_each(|v| *v /= p);
            for r in 0..3 {
                if r != c {
                    let f = m[r][c];
                    let row = m[c];
                    m[r].iter_mut().zip(row).for_each(|(v, cv)| *v -= f * cv);
                }
            }
        }
        (0..z.len())
            .map(|i| (1.0 / (m[0][3] + m[1][3] * (i % w) as f64 + m[2][3] * (i / w) as f64)) as f32)
            .collect()
    }

    /// Scene, per-pixel bead coordinates, depth (mm) and the plate plane fitted away from the
    /// bead and the defects.
    fn measured(class: SynthClass, seed: u64) -> (Scene, Geometry, Vec<f32>, Vec<f32>) {
        let c = cfg();
        let sc = Scene::sample(class, seed, &c);
        let geo = Geometry::new(&sc);
        let z = depth_mm(&generate(class, seed, &c).unwrap().frame);
        let b = &sc.bead;
        let plate = plate_fit(&z, sc.cam.w, |i| {
            let (t, s) = (geo.t[i], geo.s[i]);
            s.abs() > b.half_width(t) + 4.0
                && sc.defects.iter().all(|d| match d {
                    Defect::Spatter(dr) => (t - dr.t).hypot(s - dr.s) > dr.r + 1.0,
                    Defect::Undercut(_) | Defect::Pore(_) | Defect::BurnThrough(_) => true,
                })
        });
        (sc, geo, z, plate)
    }

    #[test]
    fn same_seed_gives_the_same_bytes_and_other_seeds_differ() {
        for class in SynthClass::ALL {
            let a = generate(class, 42, &cfg()).unwrap();
            let b = generate(class, 42, &cfg()).unwrap();
            assert_eq!(a.frame.rgb().as_raw(), b.frame.rgb().as_raw(), "{class:?}");
            assert_eq!(
                a.frame.depth().unwrap().values,
                b.frame.depth().unwrap().values
            );
            assert_eq!(a.truth, b.truth);
            assert_eq!((a.frame.ts, a.frame.seq), (b.frame.ts, 0));
            let c = generate(class, 43, &cfg()).unwrap();
            assert_ne!(a.frame.rgb().as_raw(), c.frame.rgb().as_raw(), "{class:?}");
            assert_ne!(
                a.frame.depth().unwrap().values,
                c.frame.depth().unwrap().values
            );
        }
    }

    #[test]
    fn truth_matches_the_class_and_stays_in_range() {
        let c = cfg();
        for class in SynthClass::ALL {
            for seed in 0..20 {
                let s = generate(class, frame_seed(9, class as usize, seed), &c).unwrap();
                let (t, f) = (&s.truth, &s.frame);
                assert_eq!(t.class, class);
                assert_eq!(f.intrinsics, Some(c.intrinsics()));
                assert_eq!(f.depth().unwrap().unit_mm, c.depth_unit_mm);
                let n = t.defects.len();
                let ok = match class {
                    SynthClass::Good => n == 0,
                    SynthClass::Porosity => (1..=6).contains(&n),
                    SynthClass::Undercut => (1..=2).contains(&n),
                    SynthClass::Spatter => (3..=20).contains(&n),
                    SynthClass::BurnThrough => n == 1,
                };
                assert!(ok, "{class:?} seed {seed}: {n} defects");
                for d in &t.defects {
                    assert_eq!(Some(d.kind), class.finding_kind());
                    let [x, y, w, h] = d.bbox;
                    assert!(
                        w >= 1 && h >= 1 && x + w <= c.width && y + h <= c.height,
                        "{d:?}"
                    );
                    let (sz, dp) = (d.size_mm, d.depth_mm);
                    let ok = match d.kind {
                        FindingKind::Pore => (0.8..=3.0).contains(&sz) && (0.2..=1.5).contains(&dp),
                        FindingKind::Undercut => sz <= 40.0 && (0.3..=1.2).contains(&dp),
                        FindingKind::Spatter => {
                            (0.4..=2.0).contains(&sz) && (0.4 * sz..=0.6 * sz).contains(&dp)
                        }
                        FindingKind::BurnThrough => {
                            (2.0..=7.0).contains(&sz)
                                && (dp.is_infinite() || (20.0..=80.0).contains(&dp))
                        }
                    };
                    assert!(ok, "{class:?} seed {seed}: {d:?}");
                    if d.kind != FindingKind::Undercut {
                        assert!(w.min(h) >= 2, "{class:?} seed {seed}: under 2 px: {d:?}");
                    }
                }
                let b = &t.bead;
                assert!((5.0..=12.0).contains(&b.width_mm) && (1.0..=3.0).contains(&b.height_mm));
                assert!((0.0..180.0).contains(&b.angle_deg), "{b:?}");
                let [cx, cy] = b.centre_px;
                assert!((0.3 * 320.0..=0.7 * 320.0).contains(&cx) && (72.0..=168.0).contains(&cy));
                assert!(t.camera_distance_mm > 50.0 && t.camera_distance_mm <= 250.0);
                assert!((0.0..=12.0).contains(&t.tilt_deg));
            }
        }
    }

    #[test]
    fn pores_are_deeper_than_the_bead_beside_them() {
        // Beside = along the bead at the same lateral offset, where the crown's curvature does
        // not matter; the two sides are averaged so the plate tilt cancels.
        let mut diffs = Vec::new();
        for seed in 0..20 {
            let (sc, geo, z, _) = measured(SynthClass::Porosity, seed);
            for p in sc.defects.iter().filter_map(|d| {
                if let Defect::Pore(p) = d {
                    Some(p)
                } else {
                    None
                }
            }) {
                let (mut core, mut before, mut after) = (Vec::new(), Vec::new(), Vec::new());
                for i in (0..z.len()).filter(|&i| z[i] > 0.0) {
                    let (t, s) = (geo.t[i], geo.s[i]);
                    let free = sc
                        .defects
                        .iter()
                        .all(|d| !matches!(d, Defect::Pore(o) if o.rho2(t, s) < 2.0));
                    if p.rho2(t, s) < 0.25 {
                        core.push(z[i]);
                    } else if free && (s - p.s).abs() < 0.5 * p.rb && (t - p.t).abs() < 3.0 * p.ra {
                        if t < p.t {
                            before.push(z[i])
                        } else {
                            after.push(z[i])
                        }
                    }
                }
                if let (Some(c), Some(b), Some(a)) = (median(core), median(before), median(after)) {
                    diffs.push((c - (a + b) / 2.0, p.depth));
                }
            }
        }
        let deeper = diffs.iter().filter(|(d, _)| *d > 0.0).count();
        assert!(
            diffs.len() >= 20 && deeper * 10 >= diffs.len() * 9,
            "{diffs:?}"
        );
        let med = median(diffs.iter().map(|d| d.0 / d.1).collect()).unwrap();
        assert!(
            med > 0.5,
            "median measured / true pore depth {med}: {diffs:?}"
        );
    }

    #[test]
    fn undercut_lies_behind_the_fitted_plate() {
        for seed in 0..20 {
            let (sc, geo, z, plate) = measured(SynthClass::Undercut, seed);
            for gr in sc.defects.iter().filter_map(|d| {
                if let Defect::Undercut(g) = d {
                    Some(g)
                } else {
                    None
                }
            }) {
                let res: Vec<f32> = (0..z.len())
                    .filter(|&i| z[i] > 0.0)
                    .filter(|&i| gr.share(geo.t[i], geo.s[i], sc.bead.half_width(geo.t[i])) > 0.7)
                    .map(|i| z[i] - plate[i])
                    .collect();
                let n = res.len();
                let med = median(res).unwrap_or(f32::NAN);
                assert!(
                    n >= 3 && med > 0.5 * gr.depth,
                    "seed {seed}: {n} px, median {med} mm, true {}",
                    gr.depth
                );
            }
            // The plate away from the bead fits its plane to well under the smallest groove.
            let off: Vec<f32> = (0..z.len())
                .filter(|&i| z[i] > 0.0 && geo.s[i].abs() > sc.bead.half_width(geo.t[i]) + 4.0)
                .map(|i| z[i] - plate[i])
                .collect();
            assert!(median(off).unwrap().abs() < 0.05, "seed {seed}");
        }
    }

    #[test]
    fn spatter_stands_in_front_of_the_fitted_plate() {
        let mut res = Vec::new();
        for seed in 0..20 {
            let (sc, geo, z, plate) = measured(SynthClass::Spatter, seed);
            for dr in sc.defects.iter().filter_map(|d| {
                if let Defect::Spatter(s) = d {
                    Some(s)
                } else {
                    None
                }
            }) {
                let core: Vec<f32> = (0..z.len())
                    .filter(|&i| {
                        z[i] > 0.0 && (geo.t[i] - dr.t).hypot(geo.s[i] - dr.s) < 0.5 * dr.r
                    })
                    .map(|i| z[i] - plate[i])
                    .collect();
                if let Some(m) = median(core) {
                    res.push((m, dr.height));
                }
            }
        }
        let nearer = res.iter().filter(|(m, h)| *m < -0.5 * h).count();
        assert!(res.len() >= 50 && nearer * 10 >= res.len() * 9, "{res:?}");
    }

    #[test]
    fn burn_through_shows_no_depth_or_far_depth() {
        for seed in 0..20 {
            let (sc, geo, z, plate) = measured(SynthClass::BurnThrough, seed);
            let Some(Defect::BurnThrough(hole)) = sc.defects.first() else {
                panic!("no hole")
            };
            let inside: Vec<usize> = (0..z.len())
                .filter(|&i| hole.rr(geo.t[i], geo.s[i]) < 0.8)
                .collect();
            let through = inside
                .iter()
                .filter(|&&i| z[i] == 0.0 || z[i] > plate[i] + 10.0)
                .count();
            assert!(
                !inside.is_empty() && through == inside.len(),
                "seed {seed}: {through}/{}",
                inside.len()
            );
        }
    }

    #[test]
    fn frame_seeds_differ_and_stay_fixed() {
        let mut seen = std::collections::BTreeSet::new();
        for c in 0..5 {
            for i in 0..200 {
                assert!(seen.insert(frame_seed(7, c, i)));
            }
        }
        assert_ne!(frame_seed(7, 0, 0), frame_seed(8, 0, 0));
        assert_eq!(
            frame_seed(7, 1, 2),
            1_650_069_959_653_123_811,
            "the seed mixing changed"
        );
    }

    #[test]
    fn config_errors_name_the_bad_value() {
        let bad = |f: fn(&mut SynthConfig)| {
            let mut c = SynthConfig::default();
            f(&mut c);
            generate(SynthClass::Good, 1, &c).unwrap_err().to_string()
        };
        let e = bad(|c| c.width = 0);
        assert!(e.contains("width 0") && e.contains("64..=8192"), "{e}");
        let e = bad(|c| c.height = 9000);
        assert!(e.contains("height 9000") && e.contains("48..=8192"), "{e}");
        let e = bad(|c| c.hfov_deg = 150.0);
        assert!(e.contains("150") && e.contains("20..=120"), "{e}");
        let e = bad(|c| c.depth_unit_mm = -1.0);
        assert!(e.contains("-1") && e.contains("0.01..=1"), "{e}");
        assert!(bad(|c| c.depth_unit_mm = f32::NAN).contains("NaN"));
        let e = bad(|c| (c.width, c.height) = (8192, 64));
        assert!(e.contains("8192x64") && e.contains("10..=120"), "{e}");
        assert!(SynthConfig::new(64, 48).validate().is_ok());
    }

    #[test]
    fn extreme_configs_still_give_visible_defects() {
        for c in [
            SynthConfig::new(64, 48),
            SynthConfig {
                hfov_deg: 120.0,
                ..cfg()
            },
            SynthConfig {
                hfov_deg: 20.0,
                ..SynthConfig::new(1280, 720)
            },
            SynthConfig::new(300, 400),
        ] {
            for class in SynthClass::ALL {
                for seed in 0..3 {
                    let s = generate(class, seed, &c).unwrap();
                    assert_eq!(
                        s.truth.defects.is_empty(),
                        class == SynthClass::Good,
                        "{c:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn camera_and_bead_do_not_depend_on_the_class() {
        // Drawn before the defects, so one seed gives the same scene in every class: a detector
        // cannot learn the class from distance, tilt or bead size.
        for c in [cfg(), SynthConfig::new(640, 480)] {
            for seed in 0..5 {
                let base = generate(SynthClass::Good, seed, &c).unwrap().truth;
                for class in SynthClass::ALL {
                    let t = generate(class, seed, &c).unwrap().truth;
                    assert_eq!(
                        (t.camera_distance_mm, t.tilt_deg),
                        (base.camera_distance_mm, base.tilt_deg)
                    );
                    assert_eq!(t.bead, base.bead);
                }
            }
        }
    }

    #[test]
    fn class_names_round_trip() {
        for (i, c) in SynthClass::ALL.into_iter().enumerate() {
            assert_eq!(c.name(), DEFAULT_CLASSES[i]);
            assert_eq!(SynthClass::from_name(c.name()), Some(c));
        }
        assert_eq!(SynthClass::from_name("Porosity"), None);
    }
}
