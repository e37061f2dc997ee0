//! The rules config (TOML): physical thresholds of the detector and its calibration.
//!
//! Every threshold is in millimetres (or mm²) on the part, or a multiple of the measured depth
//! noise, so one config works for any camera distance and resolution. The calibration turns the
//! detector's evidence into probabilities; `weld-trainer rules calibrate` fits it on a labelled
//! dataset and writes a complete file of this format.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::RulesError;

/// Class names the rules report for each finding kind (the dataset's names may differ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassNames {
    /// A sound weld.
    pub good: String,
    /// Pores in the bead.
    pub porosity: String,
    /// A groove along a toe.
    pub undercut: String,
    /// Droplets beside the bead.
    pub spatter: String,
    /// A hole through the joint.
    pub burn_through: String,
}

impl Default for ClassNames {
    fn default() -> Self {
        ClassNames {
            good: "good".into(),
            porosity: "porosity".into(),
            undercut: "undercut".into(),
            spatter: "spatter".into(),
            burn_through: "burn_through".into(),
        }
    }
}

impl ClassNames {
    /// In the order of the calibration's rows: good, porosity, undercut, spatter, burn_through.
    pub fn in_order(&self) -> [&str; 5] {
        [
            &self.good,
            &self.porosity,
            &self.undercut,
            &self.spatter,
            &self.burn_through,
        ]
    }
}

/// Thresholds of the depth analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DepthRules {
    /// Below this share of pixels with depth the frame is "insufficient depth" (0..1).
    pub min_valid_fraction: f32,
    /// Horizontal field of view assumed when a frame has no intrinsics, degrees.
    pub assumed_hfov_deg: f32,
    /// Smallest crown height that counts as a bead, mm (beads are 1-3 mm high).
    pub bead_min_height_mm: f32,
    /// Smallest bead area above half its minimum height, mm²; smaller ridges are not a bead.
    pub bead_min_area_mm2: f32,
    /// Height at which the bead meets the plate (its toe), mm, or 4 noise sigmas if larger.
    pub toe_level_mm: f32,
    /// A pit deeper than this below the local bead surface is a pore candidate, mm.
    pub pore_min_depth_mm: f32,
    /// Pore diameters accepted, mm (equal-area circle).
    pub pore_diameter_mm: [f32; 2],
    /// Pores are looked for within this share of the bead's half-width from its centre line.
    pub pore_band: f32,
    /// Length of the bead surface used as the reference around a pore, mm (> largest pore).
    pub pore_window_mm: f32,
    /// A groove this far below the plate just outside a toe is undercut, mm.
    pub undercut_min_depth_mm: f32,
    /// How far beyond the toe a groove is looked for, mm.
    pub undercut_search_mm: f32,
    /// Shortest groove that counts as undercut, mm along the bead.
    pub undercut_min_length_mm: f32,
    /// A droplet must stand this high above the plate, mm, or 5 noise sigmas if larger.
    pub spatter_min_height_mm: f32,
    /// Droplet diameters accepted, mm.
    pub spatter_diameter_mm: [f32; 2],
    /// Droplets are looked for this far beyond the toes, mm.
    pub spatter_reach_mm: f32,
    /// Depth this far behind the plate is seen through a hole, mm.
    pub hole_far_mm: f32,
    /// Smallest burn-through area, mm².
    pub burn_min_area_mm2: f32,
    /// A hole without depth returns must be this much darker than the bead (luma ratio).
    pub burn_dark_ratio: f32,
}

impl Default for DepthRules {
    fn default() -> Self {
        DepthRules {
            min_valid_fraction: 0.3,
            assumed_hfov_deg: 70.0,
            bead_min_height_mm: 0.6,
            bead_min_area_mm2: 30.0,
            toe_level_mm: 0.15,
            pore_min_depth_mm: 0.3,
            pore_diameter_mm: [0.5, 4.5],
            pore_band: 0.6,
            pore_window_mm: 8.0,
            undercut_min_depth_mm: 0.18,
            undercut_search_mm: 3.0,
            undercut_min_length_mm: 3.0,
            spatter_min_height_mm: 0.2,
            spatter_diameter_mm: [0.3, 3.5],
            spatter_reach_mm: 25.0,
            hole_far_mm: 3.0,
            burn_min_area_mm2: 2.0,
            burn_dark_ratio: 0.25,
        }
    }
}

/// Multinomial logistic calibration: `logit[k] = bias[k] + Σ_j weights[k][j] · x[j]`, with
/// `x` the evidence vector (`Evidence::features`) and `k` in the order good, porosity,
/// undercut, spatter, burn_through; the confidence is the softmax of the chosen class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub bias: [f32; 5],
    pub weights: [[f32; super::N_FEATURES]; 5],
    /// Where the numbers came from (dataset and its hash, date), for people.
    #[serde(default)]
    pub fitted_on: String,
}

/// The whole rules config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Class names reported by the rules.
    #[serde(default)]
    pub classes: ClassNames,
    /// A decision with at least this confidence is "confident" (the hybrid gate).
    pub confident_at: f32,
    /// Confidences of RGB-only frames (no depth) are capped here: image cues alone never
    /// make a confident decision.
    pub rgb_only_max_confidence: f32,
    #[serde(default)]
    pub depth: DepthRules,
    pub calibration: Calibration,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            classes: ClassNames::default(),
            confident_at: super::DEFAULT_CONFIDENT_AT,
            rgb_only_max_confidence: 0.6,
            depth: DepthRules::default(),
            calibration: super::default_calibration(),
        }
    }
}

impl RulesConfig {
    /// Reads and validates a rules TOML file.
    pub fn load(path: &Path) -> Result<RulesConfig, RulesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RulesError::Config(format!("{}: cannot read: {e}", path.display())))?;
        let cfg: RulesConfig = toml::from_str(&text)
            .map_err(|e| RulesError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()
            .map_err(|p| RulesError::Config(format!("{}: {}", path.display(), p.join("; "))))?;
        Ok(cfg)
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> Result<String, RulesError> {
        toml::to_string_pretty(self).map_err(|e| RulesError::Config(e.to_string()))
    }

    /// Every problem, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        let unit = |name: &str, v: f32, p: &mut Vec<String>| {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                p.push(format!("{name} must be in 0..=1, got {v}"));
            }
        };
        unit("confident_at", self.confident_at, &mut p);
        unit(
            "rgb_only_max_confidence",
            self.rgb_only_max_confidence,
            &mut p,
        );
        let d = &self.depth;
        unit("depth.min_valid_fraction", d.min_valid_fraction, &mut p);
        unit("depth.pore_band", d.pore_band, &mut p);
        unit("depth.burn_dark_ratio", d.burn_dark_ratio, &mut p);
        for (name, v) in [
            ("depth.bead_min_height_mm", d.bead_min_height_mm),
            ("depth.bead_min_area_mm2", d.bead_min_area_mm2),
            ("depth.toe_level_mm", d.toe_level_mm),
            ("depth.pore_min_depth_mm", d.pore_min_depth_mm),
            ("depth.pore_window_mm", d.pore_window_mm),
            ("depth.undercut_min_depth_mm", d.undercut_min_depth_mm),
            ("depth.undercut_search_mm", d.undercut_search_mm),
            ("depth.undercut_min_length_mm", d.undercut_min_length_mm),
            ("depth.spatter_min_height_mm", d.spatter_min_height_mm),
            ("depth.spatter_reach_mm", d.spatter_reach_mm),
            ("depth.hole_far_mm", d.hole_far_mm),
            ("depth.burn_min_area_mm2", d.burn_min_area_mm2),
        ] {
            if !(v.is_finite() && v > 0.0) {
                p.push(format!("{name} must be a positive number, got {v}"));
            }
        }
        if !(d.assumed_hfov_deg.is_finite() && (10.0..=170.0).contains(&d.assumed_hfov_deg)) {
            p.push(format!(
                "depth.assumed_hfov_deg must be in 10..=170, got {}",
                d.assumed_hfov_deg
            ));
        }
        for (name, [lo, hi]) in [
            ("depth.pore_diameter_mm", d.pore_diameter_mm),
            ("depth.spatter_diameter_mm", d.spatter_diameter_mm),
        ] {
            if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo < hi) {
                p.push(format!(
                    "{name} must be [min, max] with 0 < min < max, got [{lo}, {hi}]"
                ));
            }
        }
        let c = &self.calibration;
        if c.bias
            .iter()
            .chain(c.weights.iter().flatten())
            .any(|v| !v.is_finite())
        {
            p.push("calibration values must be finite".into());
        }
        let names = self.classes.in_order();
        for (i, n) in names.iter().enumerate() {
            if n.trim().is_empty() {
                p.push(format!("classes: name {i} is empty"));
            } else if names[..i].contains(n) {
                p.push(format!("classes: {n:?} is used twice"));
            }
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }
}
