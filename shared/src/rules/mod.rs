//! The heuristic detector: the first, fast stage of the hybrid pipeline.
//!
//! With depth, it fits the base-metal plane, finds the bead and its axis, reads cross-section
//! profiles along the bead and looks for the physical signature of each defect:
//! - porosity: compact pits below the local bead surface, inside the bead;
//! - undercut: a groove below the plate just outside a toe, running along the bead;
//! - spatter: small droplets standing on the plate beside the bead;
//! - burn-through: a hole in the joint (no depth return and dark, or depth far behind the plate).
//!
//! Each kind gives an evidence strength (how far its best candidate clears its threshold); a
//! multinomial logistic calibration turns the evidence into class probabilities, and a decision
//! is confident when its probability reaches `confident_at`. Frames without a bead, or with too
//! little depth, are reported as such and never confident. Frames without depth get an answer
//! from image cues alone, with confidence capped below the gate.

mod blobs;
pub mod calibrate;
pub mod config;
mod depth;
mod rgb;

use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::Frame;
use crate::result::{Finding, Measurements, RulesNote, RulesVerdict};

pub use config::{Calibration, ClassNames, DepthRules, RulesConfig};

/// Number of evidence features.
pub const N_FEATURES: usize = 5;

#[derive(Debug, Error)]
pub enum RulesError {
    #[error("rules config: {0}")]
    Config(String),
}

/// How strongly each defect kind shows: 0 = no candidate passed its thresholds, 1 = the best
/// candidate is exactly at its threshold, 2 = twice the threshold, ...
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub pore: f32,
    pub undercut: f32,
    pub spatter: f32,
    pub burn: f32,
    /// Depth noise after smoothing, mm: how much of a small defect the sensor could hide.
    pub noise_mm: f32,
}

impl Evidence {
    /// The calibration's input: `ln(1 + strength)` per kind, so very strong evidence does not
    /// dominate the linear model, and the noise in tenths of a millimetre (absence of evidence
    /// means less on a noisy frame).
    pub fn features(&self) -> [f32; N_FEATURES] {
        let s = [self.pore, self.undercut, self.spatter, self.burn].map(|s| s.max(0.0).ln_1p());
        [s[0], s[1], s[2], s[3], 10.0 * self.noise_mm.max(0.0)]
    }
}

/// Everything the rules found in one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct RulesOutcome {
    /// The class name (from the config's class names), or `"unknown"` when the frame could not
    /// be judged (see `note`).
    pub class: String,
    /// Calibrated probability of `class`.
    pub confidence: f32,
    /// `confidence >= confident_at` and the frame was fully analysed with depth.
    pub confident: bool,
    /// Why the frame was not (fully) judged, if so.
    pub note: Option<RulesNote>,
    /// Probabilities in the order good, porosity, undercut, spatter, burn_through.
    pub probabilities: [f32; 5],
    pub evidence: Evidence,
    pub findings: Vec<Finding>,
    pub measurements: Measurements,
    /// Time spent, ms.
    pub latency_ms: f32,
}

impl RulesOutcome {
    /// The `rules` object of the result JSON.
    pub fn verdict(&self) -> RulesVerdict {
        RulesVerdict {
            class: self.class.clone(),
            confidence: self.confidence,
            note: self.note,
        }
    }
}

/// Class reported when the rules cannot judge a frame.
pub const UNKNOWN_CLASS: &str = "unknown";

/// The detector: a validated config; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Detector {
    cfg: RulesConfig,
}

impl Detector {
    pub fn new(cfg: RulesConfig) -> Result<Detector, RulesError> {
        cfg.validate()
            .map_err(|p| RulesError::Config(p.join("; ")))?;
        Ok(Detector { cfg })
    }

    pub fn config(&self) -> &RulesConfig {
        &self.cfg
    }

    /// Inspects one frame. Never panics on frame content: frames that cannot be judged come
    /// back as `"unknown"` with a note.
    pub fn inspect(&self, frame: &Frame) -> RulesOutcome {
        let start = Instant::now();
        let mut out = match frame.depth() {
            Some(d) => match depth::analyse(frame, d, &self.cfg.depth) {
                depth::DepthOutcome::Analysed {
                    evidence,
                    findings,
                    measurements,
                } => self.decide(evidence, findings, measurements, None),
                depth::DepthOutcome::Unusable(note) => self.unknown(note),
            },
            None => {
                let (evidence, findings) = rgb::analyse(frame, &self.cfg);
                self.decide(
                    evidence,
                    findings,
                    Measurements::default(),
                    Some(RulesNote::RgbOnly),
                )
            }
        };
        out.latency_ms = start.elapsed().as_secs_f32() * 1000.0;
        out
    }

    fn unknown(&self, note: RulesNote) -> RulesOutcome {
        RulesOutcome {
            class: UNKNOWN_CLASS.to_string(),
            confidence: 0.0,
            confident: false,
            note: Some(note),
            probabilities: [0.0; 5],
            evidence: Evidence::default(),
            findings: Vec::new(),
            measurements: Measurements::default(),
            latency_ms: 0.0,
        }
    }

    fn decide(
        &self,
        evidence: Evidence,
        findings: Vec<Finding>,
        measurements: Measurements,
        note: Option<RulesNote>,
    ) -> RulesOutcome {
        let probabilities = probabilities(&self.cfg.calibration, &evidence.features());
        let (best, p) = best_class(&probabilities);
        let confidence = if note == Some(RulesNote::RgbOnly) {
            p.min(self.cfg.rgb_only_max_confidence)
        } else {
            p
        };
        RulesOutcome {
            class: self.cfg.classes.in_order()[best].to_string(),
            confidence,
            confident: note.is_none() && confidence >= self.cfg.confident_at,
            note,
            probabilities,
            evidence,
            findings,
            measurements,
            latency_ms: 0.0,
        }
    }
}

/// Focal length in pixels: the frame's intrinsics, else what a camera with the assumed
/// horizontal field of view would have.
/// Where the weld bead runs through a frame: the axis the rules' analysis reads along.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeadAxis {
    /// A point on the axis (the centroid of the bead), px.
    pub centre: [f32; 2],
    /// Unit vector along the bead, with x >= 0 (one of the two directions, always the same
    /// one for a given line).
    pub dir: [f32; 2],
    /// Size of a pixel on the plate at the image centre, mm.
    pub mm_per_px: f32,
}

/// The bead axis of a frame with depth, found as the depth analysis finds it (default
/// [`DepthRules`], full resolution); `None` without depth, with too little depth, or without a
/// long, narrow bead.
pub fn bead_axis(frame: &Frame) -> Option<BeadAxis> {
    let depth = frame.depth()?;
    let fit = depth::find_bead(frame, depth, &DepthRules::default()).ok()?;
    let dir = if fit.dir[0] < 0.0 || (fit.dir[0] == 0.0 && fit.dir[1] < 0.0) {
        [-fit.dir[0], -fit.dir[1]]
    } else {
        fit.dir
    };
    Some(BeadAxis {
        centre: [fit.mx, fit.my],
        dir,
        mm_per_px: fit.centre_mm,
    })
}

pub(crate) fn focal_px(frame: &Frame, assumed_hfov_deg: f32) -> f32 {
    match frame.intrinsics {
        Some(i) => i.fx as f32,
        None => frame.width() as f32 / (2.0 * (assumed_hfov_deg.to_radians() / 2.0).tan()),
    }
}

/// The most probable class (index in the calibration's order) and its probability.
pub fn best_class(p: &[f32; 5]) -> (usize, f32) {
    p.iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 0.0))
}

/// Softmax of the calibrated logits.
pub fn probabilities(cal: &Calibration, x: &[f32; N_FEATURES]) -> [f32; 5] {
    let mut logits = [0.0f32; 5];
    for (k, l) in logits.iter_mut().enumerate() {
        *l = cal.bias[k]
            + cal.weights[k]
                .iter()
                .zip(x)
                .map(|(w, v)| w * v)
                .sum::<f32>();
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p = logits.map(|l| (l - m).exp());
    let s: f32 = p.iter().sum();
    for v in &mut p {
        *v /= s;
    }
    p
}

/// The shipped calibration: fitted with `weld-trainer rules calibrate --holdout 0.2
/// --target-accuracy 0.998` on 1,500
/// synthetic 640x480 frames (`dataset synth --per-class 300 --seed 1001`); its figures are in
/// `docs/PERFORMANCE.md`. Refit on the plant's own labelled frames for a real line.
pub(crate) fn default_calibration() -> Calibration {
    Calibration {
        bias: [3.259, 0.080, -0.812, -1.571, -0.956],
        weights: [
            [-2.138, -1.842, -2.167, -2.593, -0.439],
            [3.338, -0.768, -1.328, -1.318, 0.315],
            [-0.601, 3.352, -0.640, -0.449, 0.069],
            [-0.633, -0.252, 3.970, -0.450, 0.059],
            [0.035, -0.490, 0.165, 4.810, -0.003],
        ],
        fitted_on: "synthetic 640x480, dataset synth --per-class 300 --seed 1001".into(),
    }
}

/// The confidence gate fitted with the shipped calibration: the lowest confidence at which the
/// decisions were 99.8 % right on the frames it was fitted on (99.5 % on its hold-out).
pub(crate) const DEFAULT_CONFIDENT_AT: f32 = 0.914;
