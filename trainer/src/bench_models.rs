//! `weld-trainer bench-models`: the figures that decide which model and backend a line runs,
//! measured in one run on one machine: per model (f32, int8 forms) and per backend, latency
//! with one caller thread and with several (the daemon's workers each run one inference at a
//! time), accuracy on held-out frames, agreement with the first model, and file size; with
//! `--profile`, where tract's time goes, per operator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ndarray::Array4;
use rayon::prelude::*;
use serde::Serialize;
use weld_core::dataset::Sample;
use weld_edge::backend::{self, Backend};

use crate::card::ModelCard;
use crate::quantize::{argmax, tensors};
use crate::versions::{self, Split};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub dataset: PathBuf,
    /// Judge on the split's held-out part; without one, on every labelled frame.
    pub split: Option<PathBuf>,
    /// At most this many judged frames (the first ones, in dataset order).
    pub frames: usize,
    pub backends: Vec<String>,
    /// Caller thread counts to time (1 = one inference at a time).
    pub threads: Vec<usize>,
    /// Timed inferences per caller thread.
    pub runs: usize,
    /// Also time every node of tract's plan (the `profile` of each result).
    pub profile: bool,
}

/// Latency with `threads` callers running inferences back to back.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub threads: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    /// Inferences per second, all callers together.
    pub per_second: f64,
}

/// Time of one operator kind summed over the plan's nodes.
#[derive(Debug, Clone, Serialize)]
pub struct OpShare {
    pub op: String,
    pub nodes: usize,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelResult {
    pub model: PathBuf,
    pub quantization: String,
    pub bytes: u64,
    pub backend: String,
    pub accuracy: f64,
    /// Share of judged frames where this model picks the class the first model (under the
    /// first backend) picks.
    pub agreement: f64,
    /// Largest |logit difference| from the first model on the judged frames.
    pub max_abs_diff: f32,
    pub timings: Vec<Timing>,
    /// tract only, with `--profile`: time per operator kind, largest first.
    pub profile: Vec<OpShare>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub judged_frames: usize,
    pub input_shape: [usize; 4],
    pub results: Vec<ModelResult>,
}

/// Median and 90th percentile of `t` (sorted in place).
fn quantiles(t: &mut [f64]) -> (f64, f64) {
    t.sort_by(f64::total_cmp);
    let at = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

/// `threads` callers each run `runs` inferences of `x` back to back (after one warm-up each).
fn time(b: &dyn Backend, x: &Array4<f32>, threads: usize, runs: usize) -> Result<Timing> {
    let start = Instant::now();
    let per_thread: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<Vec<f64>> {
                    b.infer(x.view())?;
                    (0..runs)
                        .map(|_| {
                            let t = Instant::now();
                            b.infer(x.view())?;
                            Ok(t.elapsed().as_secs_f64() * 1e3)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a timing thread panicked"))?
            })
            .collect::<Result<_>>()
    })?;
    let wall = start.elapsed().as_secs_f64();
    let mut all: Vec<f64> = per_thread.into_iter().flatten().collect();
    let (median_ms, p90_ms) = quantiles(&mut all);
    Ok(Timing {
        threads,
        median_ms,
        p90_ms,
        // The warm-up runs are inside the wall time: a slight underestimate.
        per_second: (threads * (runs + 1)) as f64 / wall,
    })
}

/// tract's per-node times summed per operator kind, largest first.
fn profile(model: &Path, shape: [usize; 4], x: &Array4<f32>, runs: usize) -> Result<Vec<OpShare>> {
    let b = backend::tract::TractBackend::load(model, &backend::BackendOptions::new(shape, 1))?;
    let nodes = b.profile(x.view(), runs)?;
    let mut by_op: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for n in nodes {
        let e = by_op.entry(n.op).or_default();
        e.0 += 1;
        e.1 += n.ms;
    }
    let mut out: Vec<OpShare> = by_op
        .into_iter()
        .map(|(op, (nodes, ms))| OpShare { op, nodes, ms })
        .collect();
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(out)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, {}", std::env::consts::ARCH)
}

/// Benchmarks `models` (ONNX files with their model cards beside them; the first is the
/// reference for agreement) under every backend of `opts`.
pub fn run(models: &[PathBuf], opts: &BenchOptions) -> Result<BenchReport> {
    let first = models.first().context("no models to benchmark")?;
    if opts.threads.contains(&0) || opts.runs == 0 {
        bail!("--threads and --runs must be at least 1");
    }
    let cards: Vec<ModelCard> = models
        .iter()
        .map(|m| {
            ModelCard::read_beside(m)?.with_context(|| {
                format!(
                    "{} has no model card beside it: benchmark models written by `export` or \
                     `quantize`",
                    m.display()
                )
            })
        })
        .collect::<Result<_>>()?;
    for (m, c) in models.iter().zip(&cards).skip(1) {
        if c.classes != cards[0].classes || c.input != cards[0].input {
            bail!(
                "{} has other classes or another input than {}: models are compared on the \
                 same frames",
                m.display(),
                first.display()
            );
        }
    }
    let card = &cards[0];
    let ds = card.open_dataset(&opts.dataset)?;
    let mut judged: Vec<&Sample> = match &opts.split {
        Some(p) => Split::load(p)?.held_out(&ds, &versions::version(&ds)?)?,
        None => ds.samples.iter().filter(|s| s.label.is_some()).collect(),
    };
    judged.truncate(opts.frames.max(1));
    if judged.is_empty() {
        bail!("{}: no labelled frames to judge", opts.dataset.display());
    }
    let xs = tensors(&ds, &judged, card)?;
    let truth: Vec<usize> = judged
        .iter()
        .map(|s| s.label.unwrap_or(usize::MAX))
        .collect();
    let [w, h] = card.input.size;
    let shape = [1, card.input.channels.len(), h as usize, w as usize];

    let mut reference: Option<Vec<Vec<f32>>> = None;
    let mut results = Vec::new();
    for (model, card) in models.iter().zip(&cards) {
        let bytes = std::fs::metadata(model)
            .with_context(|| format!("reading {}", model.display()))?
            .len();
        for kind in &opts.backends {
            let threads = opts.threads.iter().copied().max().unwrap_or(1);
            let b = backend::load(kind, model, shape, threads)
                .with_context(|| format!("{} in {kind}", model.display()))?;
            let logits: Vec<Vec<f32>> = xs
                .par_iter()
                .map(|x| Ok(b.infer(x.view())?.iter().copied().collect()))
                .collect::<Result<_>>()?;
            let reference = reference.get_or_insert_with(|| logits.clone());
            let picks: Vec<usize> = logits.iter().map(|l| argmax(l)).collect();
            let n = picks.len() as f64;
            let accuracy = picks.iter().zip(&truth).filter(|(p, t)| p == t).count() as f64 / n;
            let agreement = picks
                .iter()
                .zip(reference.iter())
                .filter(|(p, r)| **p == argmax(r))
                .count() as f64
                / n;
            let max_abs_diff = logits
                .iter()
                .zip(reference.iter())
                .flat_map(|(a, r)| a.iter().zip(r).map(|(a, r)| (a - r).abs()))
                .fold(0.0f32, f32::max);
            let timings = opts
                .threads
                .iter()
                .map(|&t| time(b.as_ref(), &xs[0], t, opts.runs))
                .collect::<Result<_>>()?;
            let profile = if opts.profile && kind == "tract" {
                profile(model, shape, &xs[0], opts.runs)?
            } else {
                Vec::new()
            };
            results.push(ModelResult {
                model: model.clone(),
                quantization: format!("{:?}", card.quantization).to_lowercase(),
                bytes,
                backend: kind.clone(),
                accuracy,
                agreement,
                max_abs_diff,
                timings,
                profile,
            });
        }
    }
    Ok(BenchReport {
        machine: machine(),
        judged_frames: xs.len(),
        input_shape: shape,
        results,
    })
}

/// The report as Markdown: one table of every model and backend, then the profiles.
pub fn markdown(r: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let threads: Vec<usize> = r
        .results
        .first()
        .map(|m| m.timings.iter().map(|t| t.threads).collect())
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "Machine: {}. Input {:?}; {} judged frames.\n",
        r.machine, r.input_shape, r.judged_frames
    );
    let mut head = "| model | precision | size | backend |".to_string();
    let mut rule = "| --- | --- | --- | --- |".to_string();
    for t in &threads {
        let _ = write!(head, " {t} thread{}: median / p90 ms, img/s |", plural(*t));
        rule.push_str(" --- |");
    }
    head.push_str(" accuracy | agreement with the first | max abs logit diff |");
    rule.push_str(" --- | --- | --- |");
    let _ = writeln!(s, "{head}\n{rule}");
    for m in &r.results {
        let name = m.model.file_name().map_or_else(
            || m.model.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        let _ = write!(
            s,
            "| {name} | {} | {:.1} MB | {} |",
            m.quantization,
            m.bytes as f64 / 1e6,
            m.backend
        );
        for t in &m.timings {
            let _ = write!(
                s,
                " {:.2} / {:.2}, {:.0} |",
                t.median_ms, t.p90_ms, t.per_second
            );
        }
        let _ = writeln!(
            s,
            " {:.2} % | {:.2} % | {:.2e} |",
            100.0 * m.accuracy,
            100.0 * m.agreement,
            m.max_abs_diff
        );
    }
    for m in r.results.iter().filter(|m| !m.profile.is_empty()) {
        let total: f64 = m.profile.iter().map(|p| p.ms).sum();
        let _ = writeln!(
            s,
            "\nProfile of {} in {} (one thread, {:.2} ms in nodes):\n\n| operator | nodes | ms | share |\n| --- | --- | --- | --- |",
            m.model.display(),
            m.backend,
            total
        );
        for p in m.profile.iter().filter(|p| p.ms >= 0.005 * total) {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.1} % |",
                p.op,
                p.nodes,
                p.ms,
                100.0 * p.ms / total
            );
        }
    }
    s
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
