//! `weld-trainer rules calibrate`: fit the rules' calibration on a labelled dataset.
//!
//! The detector runs on every labelled frame; a stratified split (seeded) keeps `holdout` of
//! each class aside; a multinomial logistic regression from the detector's evidence to the five
//! classes is fitted on the rest, with the confidence gate set to the lowest confidence at which
//! the fitted decisions reach the target accuracy on the fitting part. The held-out figures are
//! printed, and the complete rules config is written.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use weld_core::dataset::Dataset;
use weld_core::metrics::ConfusionMatrix;
use weld_core::rules::calibrate::{fit, gate_for_accuracy};
use weld_core::rules::{
    Detector, N_FEATURES, RulesConfig, UNKNOWN_CLASS, best_class, probabilities,
};

/// Settings of one calibration run.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Share of each class held out for the report, 0..1.
    pub holdout: f64,
    pub seed: u64,
    /// Accuracy the confident decisions must reach on the fitting part.
    pub target_accuracy: f64,
    /// L2 penalty on the weights.
    pub l2: f32,
}

/// One labelled frame as the calibration sees it.
struct Row {
    label: usize,
    features: Option<[f32; N_FEATURES]>,
}

pub fn calibrate(
    dataset: &Path,
    base: RulesConfig,
    out: &Path,
    opts: &CalibrateOptions,
) -> Result<()> {
    if !(0.0..1.0).contains(&opts.holdout) {
        bail!("--holdout must be in 0..1, got {}", opts.holdout);
    }
    let ds = Dataset::open(dataset)?;
    let names = base.classes.in_order().map(String::from);
    let index_of: Vec<Option<usize>> = ds
        .spec
        .classes
        .iter()
        .map(|c| names.iter().position(|n| n == c))
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !ds.spec.classes.contains(n))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: the rules report {} but the dataset's classes ({}) lack {:?}; set [classes] in \
             the rules config to the dataset's names",
            dataset.display(),
            names.join(", "),
            ds.spec.classes.join(", "),
            missing
        );
    }
    let detector = Detector::new(base.clone())?;
    let samples: Vec<_> = ds
        .samples
        .iter()
        .filter_map(|s| s.label.and_then(|l| index_of[l]).map(|k| (s, k)))
        .collect();
    if samples.is_empty() {
        bail!(
            "{}: no labelled frames of the rules' classes",
            dataset.display()
        );
    }
    let rows: Vec<Row> = samples
        .par_iter()
        .map(|(s, k)| -> Result<Row> {
            let frame = ds
                .load(s)
                .with_context(|| format!("loading {}", s.rgb.display()))?;
            let o = detector.inspect(&frame);
            // Frames the rules cannot judge (no bead, no depth) carry no evidence to fit.
            let features = o.note.is_none().then(|| o.evidence.features());
            Ok(Row {
                label: *k,
                features,
            })
        })
        .collect::<Result<_>>()?;

    // Stratified split: shuffle each class with the seed, hold out the first `holdout` share.
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut held = vec![false; rows.len()];
    for k in 0..names.len() {
        let mut idx: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].label == k).collect();
        idx.shuffle(&mut rng);
        let n_hold = (idx.len() as f64 * opts.holdout).round() as usize;
        for &i in &idx[..n_hold] {
            held[i] = true;
        }
    }
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (r, h) in rows.iter().zip(&held) {
        if let (false, Some(x)) = (h, r.features) {
            xs.push(x);
            ys.push(r.label);
        }
    }
    if xs.is_empty() {
        bail!("no frame to fit on: every frame was held out or could not be judged");
    }
    let mut cal = fit(&xs, &ys, opts.l2);
    let train_pairs: Vec<(f32, bool)> = xs
        .iter()
        .zip(&ys)
        .map(|(x, &y)| {
            let (best, p) = best_class(&probabilities(&cal, x));
            (p, best == y)
        })
        .collect();
    let gate = gate_for_accuracy(&train_pairs, opts.target_accuracy, 0.5);
    cal.fitted_on = format!(
        "{} ({} frames fitted, {} held out, split seed {})",
        dataset.display(),
        xs.len(),
        held.iter().filter(|h| **h).count(),
        opts.seed
    );
    let cfg = RulesConfig {
        calibration: cal,
        confident_at: gate,
        ..base
    };

    // Held-out report with the fitted config.
    let mut m = ConfusionMatrix::new(&names);
    let (mut confident, mut confident_right, mut n) = (0usize, 0usize, 0usize);
    for (r, _) in rows.iter().zip(&held).filter(|(_, h)| **h) {
        n += 1;
        let (class, conf) = match r.features {
            Some(x) => {
                let (best, p) = best_class(&probabilities(&cfg.calibration, &x));
                (names[best].as_str(), p)
            }
            None => (UNKNOWN_CLASS, 0.0),
        };
        m.add(&names[r.label], class);
        if conf >= cfg.confident_at {
            confident += 1;
            confident_right += usize::from(class == names[r.label]);
        }
    }
    println!(
        "fitted on {} frames; confidence gate {:.3}",
        xs.len(),
        cfg.confident_at
    );
    println!("held-out ({n} frames):\n{m}");
    if n > 0 {
        println!(
            "confident: {confident} of {n} ({:.1}%), accuracy on confident {:.4}",
            100.0 * confident as f64 / n as f64,
            if confident > 0 {
                confident_right as f64 / confident as f64
            } else {
                0.0
            }
        );
    }
    let text = format!(
        "# Rules config written by `weld-trainer rules calibrate`; see the detector's docs.\n{}",
        cfg.to_toml()?
    );
    weld_core::fsutil::write_atomic(out, text.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
