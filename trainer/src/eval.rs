//! `weld-trainer eval`: a model (a signed bundle, or a checkpoint with the `torch` feature) on
//! a dataset split, alone and inside the hybrid policy, judged by the daemon's own code: the
//! same `Model` (preprocessing, backend), `Detector` and `Policy` a device runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use weld_core::dataset::{Dataset, Sample};
use weld_core::metrics::ConfusionMatrix;
use weld_core::result::ModelVerdict;
use weld_core::rules::{Detector, RulesConfig};
use weld_edge::model::Model;
use weld_edge::policy::{ModelStage, Policy, PolicyKind, Thresholds};

use crate::report::{self, HybridScores, Report, Scores};
use crate::versions::{self, Part, Split};

/// Which frames to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PartArg {
    Train,
    Val,
    Test,
    /// Every labelled frame.
    All,
}

/// What `eval` judges and where the report goes.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub dataset: PathBuf,
    pub split: Option<PathBuf>,
    pub part: PartArg,
    /// Rules config (TOML) for the hybrid policy; default: the built-in calibration.
    pub rules: Option<PathBuf>,
    /// Model probability at or above which a model answer is confident (the daemon's
    /// `policy.model_confident_at`).
    pub model_confident_at: f32,
    pub out: PathBuf,
}

/// Judges every selected frame and writes the report; returns it.
pub fn run(model: &Model, curves: &[serde_json::Value], opts: &EvalOptions) -> Result<Report> {
    let ds = Dataset::open(&opts.dataset)?;
    let version = versions::version(&ds)?;
    if model.classes() != ds.spec.classes.as_slice() {
        bail!(
            "the model's classes ({}) disagree with the dataset's ({})",
            model.classes().join(", "),
            ds.spec.classes.join(", ")
        );
    }
    let samples: Vec<&Sample> = match (opts.part, &opts.split) {
        (PartArg::All, _) => ds.samples.iter().filter(|s| s.label.is_some()).collect(),
        (part, Some(p)) => {
            let split = Split::load(p)?;
            let part = match part {
                PartArg::Train => Part::Train,
                PartArg::Val => Part::Val,
                _ => Part::Test,
            };
            split.samples(&ds, &version, part)?
        }
        (_, None) => bail!("--part train, val or test needs --split (or use --part all)"),
    };
    if samples.is_empty() {
        bail!(
            "no labelled frames to evaluate in {}",
            opts.dataset.display()
        );
    }

    let rules_cfg = match &opts.rules {
        Some(p) => RulesConfig::load(p)?,
        None => RulesConfig::default(),
    };
    let detector = Detector::new(rules_cfg)?;
    let policy = Policy {
        kind: PolicyKind::Hybrid,
        thresholds: Thresholds {
            rules_confident_at: detector.config().confident_at,
            model_confident_at: opts.model_confident_at,
        },
    };
    let rule_classes = detector.config().classes.in_order().map(String::from);
    let all_depth = samples.iter().all(|s| s.depth.is_some());
    let rules_note = if !all_depth {
        Some("the frames have no depth; the rules judge the depth profile of the bead".into())
    } else if !rule_classes.iter().all(|c| ds.spec.classes.contains(c)) {
        Some(format!(
            "the rules' classes ({}) are not all classes of the dataset ({})",
            rule_classes.join(", "),
            ds.spec.classes.join(", ")
        ))
    } else {
        None
    };
    let with_rules = rules_note.is_none();

    struct Judged {
        truth: String,
        model: String,
        model_ms: f64,
        rules: Option<(String, String, bool, bool)>, // rules class, hybrid class, asked, confident
    }
    let started = Instant::now();
    let judged: Vec<Result<Judged, String>> = samples
        .par_iter()
        .map(|s| {
            let frame = ds
                .load(s)
                .map_err(|e| format!("{}: {e}", s.rgb.display()))?;
            let truth = ds.label_name(s).unwrap_or_default().to_string();
            let p = model
                .predict(&frame)
                .map_err(|e| format!("{}: {e}", s.rgb.display()))?;
            let rules = with_rules.then(|| {
                let outcome = detector.inspect(&frame);
                let asked = policy.needs_model(&outcome);
                let stage = if asked {
                    ModelStage::Ran(ModelVerdict {
                        class: p.class.clone(),
                        confidence: p.confidence,
                        version: model.version().to_string(),
                    })
                } else {
                    ModelStage::NotRun
                };
                let d = policy.decide(&outcome, &stage);
                (outcome.class, d.class, asked, !d.uncertain)
            });
            Ok(Judged {
                truth,
                model: p.class,
                model_ms: f64::from(p.infer_ms),
                rules,
            })
        })
        .collect();
    let seconds = started.elapsed().as_secs_f64();

    let classes = &ds.spec.classes;
    let (mut m_cm, mut r_cm, mut h_cm) = (
        ConfusionMatrix::new(classes),
        ConfusionMatrix::new(classes),
        ConfusionMatrix::new(classes),
    );
    let (mut asked, mut confident, mut confident_right, mut judged_n) = (0, 0, 0, 0);
    let mut model_ms = 0.0;
    let mut failed = Vec::new();
    for j in judged {
        let j = match j {
            Ok(j) => j,
            Err(e) => {
                failed.push(e);
                continue;
            }
        };
        judged_n += 1;
        model_ms += j.model_ms;
        m_cm.add(&j.truth, &j.model);
        if let Some((rules, hybrid, was_asked, conf)) = &j.rules {
            r_cm.add(&j.truth, rules);
            h_cm.add(&j.truth, hybrid);
            asked += usize::from(*was_asked);
            if *conf {
                confident += 1;
                confident_right += usize::from(*hybrid == j.truth);
            }
        }
    }
    if judged_n == 0 {
        bail!(
            "no frame could be judged; the first problem: {}",
            failed.first().map_or("none", String::as_str)
        );
    }
    let n = judged_n as f64;
    let report = Report {
        created: chrono::Utc::now().to_rfc3339(),
        model: model.name().to_string(),
        model_version: model.version().to_string(),
        backend: model.backend_name().to_string(),
        dataset: opts.dataset.display().to_string(),
        dataset_version: version,
        part: format!("{:?}", opts.part).to_lowercase(),
        frames: judged_n,
        failed,
        model_only: Scores::of(m_cm),
        rules: with_rules.then(|| Scores::of(r_cm)),
        hybrid: with_rules.then(|| HybridScores {
            scores: Scores::of(h_cm),
            share_to_model: asked as f64 / n,
            confident_share: confident as f64 / n,
            confident_accuracy: if confident > 0 {
                confident_right as f64 / confident as f64
            } else {
                0.0
            },
        }),
        rules_note,
        model_ms_mean: model_ms / n,
    };
    report::write(&report, curves, &opts.out)?;
    print_summary(&report, seconds, &opts.out);
    Ok(report)
}

fn print_summary(r: &Report, seconds: f64, out: &Path) {
    println!(
        "{} ({}) on {} [{}]: {} frames in {seconds:.1} s",
        r.model, r.backend, r.dataset, r.part, r.frames
    );
    println!("model alone:\n{}", r.model_only.confusion);
    if let Some(h) = &r.hybrid {
        println!(
            "hybrid: accuracy {:.4}, macro-F1 {:.4}; {:.1}% of frames sent to the model; \
             {:.1}% confident, {:.2}% of those right",
            h.scores.accuracy,
            h.scores.macro_f1,
            100.0 * h.share_to_model,
            100.0 * h.confident_share,
            100.0 * h.confident_accuracy
        );
    }
    if let Some(n) = &r.rules_note {
        println!("no rules/hybrid figures: {n}");
    }
    if !r.failed.is_empty() {
        println!(
            "{} frames could not be judged (see the report)",
            r.failed.len()
        );
    }
    println!("report: {}", out.join("report.html").display());
}

/// The per-epoch metrics beside a checkpoint (its run's `metrics.jsonl`), if there are any.
pub fn training_curves(checkpoint: &Path) -> Vec<serde_json::Value> {
    let file = checkpoint
        .parent()
        .unwrap_or(Path::new("."))
        .join("metrics.jsonl");
    std::fs::read_to_string(file)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Loads a bundle as a device would (signature, hash, fit) and returns its model.
pub fn bundle_model(path: &Path, trusted: &[String], backend: &str) -> Result<Model> {
    crate::bundle_cmd::load_verified(path, trusted, backend)
        .map(|b| b.model)
        .with_context(|| format!("loading the bundle {}", path.display()))
}
