//! The hybrid decision: which stages run on a frame and what the result says, and the
//! temporal smoothing over a part. Plain synchronous structs: the pipeline's worker threads
//! only move data through them.
//!
//! Policies (DESIGN.md `decided_by`):
//! - `hybrid`: the rules first; the model only when the rules are not confident. A frame the
//!   rules cannot judge fully (no depth, no bead, too little depth) is never "rules-confident".
//! - `rules`: the rules alone; the model never runs.
//! - `model`: the model alone (the rules still run: their measurements and findings are
//!   reported, they do not decide).
//! - `both`: both run on every frame; the result reports both. They decide together: agreement
//!   with at least one stage confident is confident; disagreement is uncertain.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use weld_core::result::ModelVerdict;
use weld_core::rules::{RulesOutcome, UNKNOWN_CLASS};
use weld_core::{DecidedBy, RulesNote};

/// Which stages decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Rules first; the model only when the rules are not confident.
    #[default]
    Hybrid,
    /// The heuristic detector only.
    Rules,
    /// The model only.
    Model,
    /// Both on every frame, reported together.
    Both,
}

impl PolicyKind {
    pub const NAMES: [&'static str; 4] = ["hybrid", "rules", "model", "both"];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Hybrid => "hybrid",
            PolicyKind::Rules => "rules",
            PolicyKind::Model => "model",
            PolicyKind::Both => "both",
        }
    }

    /// Whether this policy can ever need the model.
    pub fn uses_model(self) -> bool {
        self != PolicyKind::Rules
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<PolicyKind, String> {
        match s {
            "hybrid" => Ok(PolicyKind::Hybrid),
            "rules" => Ok(PolicyKind::Rules),
            "model" => Ok(PolicyKind::Model),
            "both" => Ok(PolicyKind::Both),
            other => Err(format!(
                "unknown policy {other:?}; expected one of {}",
                PolicyKind::NAMES.join(", ")
            )),
        }
    }
}

/// The confidence each stage needs for its answer to count as confident. Changed at run time
/// by the `thresholds` command, so it is a value the pipeline swaps, not a constant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Calibrated rules confidence at or above which the rules decide alone, in (0, 1].
    pub rules_confident_at: f32,
    /// Model softmax probability at or above which a model answer is confident, in (0, 1].
    pub model_confident_at: f32,
}

impl Thresholds {
    /// Every invalid value, each naming its key under `prefix` (e.g. `policy`).
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (key, v) in [
            ("rules_confident_at", self.rules_confident_at),
            ("model_confident_at", self.model_confident_at),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                out.push(format!("{prefix}.{key} = {v}: must be in (0, 1]"));
            }
        }
        out
    }
}

/// A threshold key of a change request (HTTP PATCH config, the MQTT `thresholds` command), for
/// `#[serde(default, deserialize_with = "present_threshold")]`: absent is "unchanged", a key
/// that is there must hold a number (serde would read `null` as absent). Kept as sent (f64),
/// so [`change_thresholds`] checks the value the client wrote, not its f32 rounding.
pub fn present_threshold<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    f64::deserialize(d).map(Some)
}

/// Changes the running policy's thresholds: the ones given replace the current ones, both
/// are checked, and nothing changes unless all is valid. `prefix` names the keys in the
/// errors (`policy` for HTTP, `thresholds` for the MQTT command). A value is checked as sent
/// and again as the f32 the policy keeps (`1.0000000000000002` is above 1 even though it
/// rounds to 1; `1e-300` is above 0 but rounds to 0). Returns the new thresholds, or every
/// problem found.
pub fn change_thresholds(
    policy: &arc_swap::ArcSwap<Policy>,
    rules_confident_at: Option<f64>,
    model_confident_at: Option<f64>,
    prefix: &str,
) -> Result<Thresholds, String> {
    if rules_confident_at.is_none() && model_confident_at.is_none() {
        return Err(format!(
            "give {prefix}.rules_confident_at and/or {prefix}.model_confident_at"
        ));
    }
    let as_sent: Vec<String> = [
        ("rules_confident_at", rules_confident_at),
        ("model_confident_at", model_confident_at),
    ]
    .into_iter()
    .filter_map(|(key, v)| Some((key, v?)))
    .filter(|&(_, v)| !(v > 0.0 && v <= 1.0))
    .map(|(key, v)| format!("{prefix}.{key} = {v}: must be in (0, 1]"))
    .collect();
    if !as_sent.is_empty() {
        return Err(as_sent.join("; "));
    }
    let current = policy.load();
    // Narrowed to the f32 the policy keeps; a value that rounds to 0 is refused below.
    let thresholds = Thresholds {
        rules_confident_at: rules_confident_at
            .map_or(current.thresholds.rules_confident_at, |v| v as f32),
        model_confident_at: model_confident_at
            .map_or(current.thresholds.model_confident_at, |v| v as f32),
    };
    let problems = thresholds.problems(prefix);
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    policy.store(std::sync::Arc::new(Policy {
        kind: current.kind,
        thresholds,
    }));
    Ok(thresholds)
}

/// What the model stage produced for a frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelStage {
    /// The policy did not need the model for this frame.
    NotRun,
    /// No model is loaded (none configured, or it failed to load).
    Unavailable,
    /// The model ran and answered.
    Ran(ModelVerdict),
    /// The model was asked and failed on this frame (the message says why).
    Failed(String),
}

impl ModelStage {
    /// The `model` object of the result: present only when the model answered.
    pub fn verdict(&self) -> Option<&ModelVerdict> {
        match self {
            ModelStage::Ran(v) => Some(v),
            _ => None,
        }
    }
}

/// The decision for one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub class: String,
    pub confidence: f32,
    pub decided_by: DecidedBy,
    pub uncertain: bool,
}

/// A policy with its thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub thresholds: Thresholds,
}

impl Policy {
    /// Whether the rules alone are confident about this frame.
    pub fn rules_confident(&self, rules: &RulesOutcome) -> bool {
        rules.note.is_none()
            && rules.class != UNKNOWN_CLASS
            && rules.confidence >= self.thresholds.rules_confident_at
    }

    /// Whether the model must run on a frame the rules judged like this.
    pub fn needs_model(&self, rules: &RulesOutcome) -> bool {
        match self.kind {
            PolicyKind::Rules => false,
            PolicyKind::Model | PolicyKind::Both => true,
            PolicyKind::Hybrid => !self.rules_confident(rules),
        }
    }

    /// The decision from the rules' outcome and what the model stage gave.
    pub fn decide(&self, rules: &RulesOutcome, model: &ModelStage) -> Decision {
        let rules_confident = self.rules_confident(rules);
        let from_rules = |uncertain: bool| Decision {
            class: rules.class.clone(),
            confidence: rules.confidence,
            decided_by: DecidedBy::Rules,
            uncertain,
        };
        let from_model = |m: &ModelVerdict| Decision {
            class: m.class.clone(),
            confidence: m.confidence,
            decided_by: DecidedBy::Model,
            uncertain: m.confidence < self.thresholds.model_confident_at,
        };
        match (self.kind, model.verdict()) {
            (PolicyKind::Rules, _) => from_rules(!rules_confident),
            (PolicyKind::Hybrid, _) if rules_confident => from_rules(false),
            (PolicyKind::Hybrid | PolicyKind::Model, Some(m)) => from_model(m),
            // The model was needed but gave nothing: the rules' answer, flagged uncertain so
            // that the frame is kept for review rather than trusted.
            (PolicyKind::Hybrid, None) => from_rules(true),
            (PolicyKind::Model, None) => Decision {
                class: UNKNOWN_CLASS.to_string(),
                confidence: 0.0,
                decided_by: DecidedBy::Model,
                uncertain: true,
            },
            (PolicyKind::Both, None) => from_rules(true),
            (PolicyKind::Both, Some(m)) => {
                let model_confident = m.confidence >= self.thresholds.model_confident_at;
                if m.class == rules.class {
                    Decision {
                        class: m.class.clone(),
                        confidence: m.confidence.max(rules.confidence),
                        decided_by: DecidedBy::Both,
                        uncertain: !(rules_confident || model_confident),
                    }
                } else {
                    // They disagree: report the more confident one, never as confident.
                    let (class, confidence) = if m.confidence >= rules.confidence {
                        (m.class.clone(), m.confidence)
                    } else {
                        (rules.class.clone(), rules.confidence)
                    };
                    Decision {
                        class,
                        confidence,
                        decided_by: DecidedBy::Both,
                        uncertain: true,
                    }
                }
            }
        }
    }

    /// The threshold that applies to a decision made by `by`.
    pub fn threshold_for(&self, by: DecidedBy) -> f32 {
        match by {
            DecidedBy::Rules => self.thresholds.rules_confident_at,
            DecidedBy::Model => self.thresholds.model_confident_at,
            DecidedBy::Both => self
                .thresholds
                .rules_confident_at
                .min(self.thresholds.model_confident_at),
        }
    }
}

/// Temporal smoothing over the last `window` frames of one part (seam).
///
/// Each frame votes for its class with its confidence; the smoothed class is the one with the
/// largest summed confidence, and the smoothed confidence is that sum over the frames in the
/// window (a class seen in every frame at 0.9 keeps 0.9; one frame of it among four falls to
/// about 0.2). The window restarts at a part boundary: a frame where the rules see no bead
/// (the part has left the view), a pause longer than `gap` between frames (the line stopped or
/// changed parts), or an explicit [`Smoother::reset`] (a command). Frames that could not be
/// judged (class `unknown`) are passed through and not counted.
#[derive(Debug, Clone)]
pub struct Smoother {
    window: usize,
    gap: Duration,
    recent: VecDeque<(String, f32)>,
    last_ts: Option<DateTime<Utc>>,
}

impl Smoother {
    /// `window` of 0 or 1 turns smoothing off.
    pub fn new(window: usize, gap: Duration) -> Smoother {
        Smoother {
            window,
            gap,
            recent: VecDeque::with_capacity(window),
            last_ts: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.window > 1
    }

    /// Starts a new part.
    pub fn reset(&mut self) {
        self.recent.clear();
    }

    /// Frames counted in the current window.
    pub fn len(&self) -> usize {
        self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
    }

    /// Adds a frame's decision and returns the smoothed one (the decision itself when
    /// smoothing is off or the frame cannot vote).
    pub fn push(
        &mut self,
        ts: DateTime<Utc>,
        note: Option<RulesNote>,
        decision: Decision,
        policy: &Policy,
    ) -> Decision {
        if !self.enabled() {
            return decision;
        }
        let paused = self
            .last_ts
            .is_some_and(|last| (ts - last).to_std().is_ok_and(|elapsed| elapsed > self.gap));
        self.last_ts = Some(ts);
        if paused || note == Some(RulesNote::NoBead) {
            self.reset();
        }
        if decision.class == UNKNOWN_CLASS {
            return decision;
        }
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent
            .push_back((decision.class.clone(), decision.confidence));

        let mut best: Option<(&str, f32)> = None;
        for (class, _) in &self.recent {
            let sum: f32 = self
                .recent
                .iter()
                .filter(|(c, _)| c == class)
                .map(|(_, p)| p)
                .sum();
            if best.is_none_or(|(_, s)| sum > s) {
                best = Some((class, sum));
            }
        }
        let Some((class, sum)) = best else {
            return decision;
        };
        let confidence = sum / self.recent.len() as f32;
        Decision {
            class: class.to_string(),
            confidence,
            uncertain: confidence < policy.threshold_for(decision.decided_by),
            decided_by: decision.decided_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weld_core::Measurements;
    use weld_core::rules::Evidence;

    fn rules(class: &str, confidence: f32, note: Option<RulesNote>) -> RulesOutcome {
        RulesOutcome {
            class: class.to_string(),
            confidence,
            confident: false,
            note,
            probabilities: [0.0; 5],
            evidence: Evidence::default(),
            findings: Vec::new(),
            measurements: Measurements::default(),
            latency_ms: 0.0,
        }
    }

    fn model(class: &str, confidence: f32) -> ModelStage {
        ModelStage::Ran(ModelVerdict {
            class: class.to_string(),
            confidence,
            version: "m1".to_string(),
        })
    }

    fn policy(kind: PolicyKind) -> Policy {
        Policy {
            kind,
            thresholds: Thresholds {
                rules_confident_at: 0.9,
                model_confident_at: 0.8,
            },
        }
    }

    #[test]
    fn hybrid_trusts_confident_rules_and_skips_the_model() {
        let p = policy(PolicyKind::Hybrid);
        let r = rules("porosity", 0.95, None);
        assert!(!p.needs_model(&r));
        let d = p.decide(&r, &ModelStage::NotRun);
        assert_eq!(d.class, "porosity");
        assert_eq!(d.decided_by, DecidedBy::Rules);
        assert!(!d.uncertain);
    }

    #[test]
    fn hybrid_asks_the_model_below_the_threshold_and_for_unjudged_frames() {
        let p = policy(PolicyKind::Hybrid);
        assert!(p.needs_model(&rules("good", 0.89, None)));
        // High confidence but RGB only: the rules did not see depth, so they do not decide.
        assert!(p.needs_model(&rules("good", 0.99, Some(RulesNote::RgbOnly))));
        assert!(p.needs_model(&rules(UNKNOWN_CLASS, 0.0, Some(RulesNote::NoBead))));

        let d = p.decide(&rules("good", 0.6, None), &model("undercut", 0.85));
        assert_eq!(
            (d.class.as_str(), d.decided_by),
            ("undercut", DecidedBy::Model)
        );
        assert!(!d.uncertain);
        let d = p.decide(&rules("good", 0.6, None), &model("undercut", 0.7));
        assert!(
            d.uncertain,
            "a model answer under its threshold is uncertain"
        );
    }

    #[test]
    fn hybrid_without_a_model_gives_the_rules_answer_as_uncertain() {
        let p = policy(PolicyKind::Hybrid);
        for stage in [ModelStage::Unavailable, ModelStage::Failed("boom".into())] {
            let d = p.decide(&rules("spatter", 0.7, None), &stage);
            assert_eq!(d.class, "spatter");
            assert_eq!(d.decided_by, DecidedBy::Rules);
            assert!(d.uncertain);
        }
    }

    #[test]
    fn rules_policy_never_needs_the_model() {
        let p = policy(PolicyKind::Rules);
        assert!(!p.needs_model(&rules("good", 0.1, None)));
        let d = p.decide(&rules("good", 0.1, None), &ModelStage::NotRun);
        assert!(d.uncertain);
        assert_eq!(d.decided_by, DecidedBy::Rules);
        assert!(
            !p.decide(&rules("good", 0.9, None), &ModelStage::NotRun)
                .uncertain
        );
    }

    #[test]
    fn model_policy_always_runs_the_model_and_reports_unknown_without_one() {
        let p = policy(PolicyKind::Model);
        assert!(p.needs_model(&rules("good", 0.99, None)));
        let d = p.decide(&rules("good", 0.99, None), &model("porosity", 0.9));
        assert_eq!(
            (d.class.as_str(), d.decided_by),
            ("porosity", DecidedBy::Model)
        );
        let d = p.decide(&rules("good", 0.99, None), &ModelStage::Unavailable);
        assert_eq!(d.class, UNKNOWN_CLASS);
        assert!(d.uncertain);
    }

    #[test]
    fn both_is_confident_only_when_the_stages_agree() {
        let p = policy(PolicyKind::Both);
        let d = p.decide(&rules("good", 0.95, None), &model("good", 0.5));
        assert_eq!((d.class.as_str(), d.decided_by), ("good", DecidedBy::Both));
        assert!(!d.uncertain);
        assert_eq!(d.confidence, 0.95);
        let d = p.decide(&rules("good", 0.5, None), &model("good", 0.5));
        assert!(d.uncertain, "agreeing but neither confident");
        let d = p.decide(&rules("good", 0.95, None), &model("porosity", 0.97));
        assert_eq!(d.class, "porosity");
        assert!(d.uncertain, "disagreement is never confident");
    }

    #[test]
    fn thresholds_name_bad_keys() {
        let t = Thresholds {
            rules_confident_at: 0.0,
            model_confident_at: 1.5,
        };
        let p = t.problems("policy");
        assert_eq!(p.len(), 2);
        assert!(p[0].contains("policy.rules_confident_at"));
        assert!(p[1].contains("policy.model_confident_at"));
        assert!(
            policy(PolicyKind::Both)
                .thresholds
                .problems("policy")
                .is_empty()
        );
    }

    fn decision(class: &str, confidence: f32) -> Decision {
        Decision {
            class: class.to_string(),
            confidence,
            decided_by: DecidedBy::Rules,
            uncertain: confidence < 0.9,
        }
    }

    #[test]
    fn smoothing_off_passes_decisions_through() {
        let p = policy(PolicyKind::Rules);
        let mut s = Smoother::new(1, Duration::from_secs(2));
        let d = decision("porosity", 0.5);
        assert_eq!(s.push(Utc::now(), None, d.clone(), &p), d);
        assert!(s.is_empty());
    }

    #[test]
    fn smoothing_outvotes_a_single_odd_frame() {
        let p = policy(PolicyKind::Rules);
        let mut s = Smoother::new(5, Duration::from_secs(2));
        let t0 = Utc::now();
        let ms = |n: i64| t0 + chrono::Duration::milliseconds(n * 33);
        for i in 0..4 {
            let d = s.push(ms(i), None, decision("good", 0.95), &p);
            assert_eq!(d.class, "good");
        }
        let d = s.push(ms(4), None, decision("spatter", 0.97), &p);
        assert_eq!(d.class, "good");
        assert!((d.confidence - 0.76).abs() < 1e-6, "4 x 0.95 / 5");
        assert!(
            d.uncertain,
            "an outvoted window is below the rules threshold"
        );
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn smoothing_restarts_on_no_bead_and_on_a_pause() {
        let p = policy(PolicyKind::Rules);
        let mut s = Smoother::new(5, Duration::from_secs(2));
        let t0 = Utc::now();
        for i in 0..3 {
            s.push(
                t0 + chrono::Duration::milliseconds(i * 33),
                None,
                decision("good", 0.95),
                &p,
            );
        }
        assert_eq!(s.len(), 3);
        let unknown = Decision {
            class: UNKNOWN_CLASS.to_string(),
            confidence: 0.0,
            decided_by: DecidedBy::Rules,
            uncertain: true,
        };
        let d = s.push(t0, Some(RulesNote::NoBead), unknown.clone(), &p);
        assert_eq!(d, unknown);
        assert!(s.is_empty(), "no bead in view: the part has left");

        s.push(t0, None, decision("good", 0.95), &p);
        let d = s.push(
            t0 + chrono::Duration::seconds(10),
            None,
            decision("porosity", 0.92),
            &p,
        );
        assert_eq!(
            d.class, "porosity",
            "after a 10 s pause the old part no longer votes"
        );
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn policy_names_parse_and_print() {
        for n in PolicyKind::NAMES {
            assert_eq!(n.parse::<PolicyKind>().unwrap().as_str(), n);
        }
        assert!("fast".parse::<PolicyKind>().unwrap_err().contains("hybrid"));
    }
}
