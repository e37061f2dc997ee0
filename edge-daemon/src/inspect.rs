//! `weld-edge inspect`: offline inspection of image files and dataset folders, one result per
//! frame (the result JSON of DESIGN.md plus `"path"`), and a summary with accuracy and a
//! confusion matrix when the frames carry labels.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use thiserror::Error;
use weld_core::dataset::{DATASET_FILE, Dataset, DatasetSpec, RGB_EXTENSIONS};
use weld_core::frame::{DEPTH_SUFFIX, depth_path_for};
use weld_core::metrics::ConfusionMatrix;
use weld_core::{Frame, Inspection, Intrinsics};

use crate::model::Model;
use crate::pipeline::{Identity, inspect_frame};
use crate::policy::Policy;
use weld_core::rules::Detector;

#[derive(Debug, Error)]
pub enum InspectError {
    #[error("{}: no such file or folder", .0.display())]
    Missing(PathBuf),
    #[error("{}: a folder without {DATASET_FILE}; give image files or a dataset folder", .0.display())]
    NotADataset(PathBuf),
    #[error("{}: not an image file (expected .png, .jpg or .jpeg)", .0.display())]
    NotAnImage(PathBuf),
    #[error(
        "{}: has depth but its unit is unknown; put it in a dataset (dataset.toml has \
         depth_unit_mm) or pass --depth-unit-mm", .0.display()
    )]
    UnknownDepthUnit(PathBuf),
    #[error(transparent)]
    Dataset(#[from] weld_core::dataset::DatasetError),
    #[error(transparent)]
    Frame(#[from] weld_core::FrameError),
    #[error("writing results: {0}")]
    Write(#[from] std::io::Error),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One frame to inspect.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub rgb: PathBuf,
    pub depth: Option<PathBuf>,
    pub depth_unit_mm: Option<f32>,
    pub intrinsics: Option<Intrinsics>,
    /// The label, when the frame sits in a class folder of a dataset.
    pub truth: Option<String>,
}

/// Expands the command line's paths into frames: dataset folders into their frames (with
/// labels), image files into frames with their `STEM.depth.png` when present. Depth files named
/// on the command line are skipped: they are read with their RGB file.
pub fn collect(paths: &[PathBuf], depth_unit_mm: Option<f32>) -> Result<Vec<Input>, InspectError> {
    let mut out = Vec::new();
    let mut specs = HashMap::new();
    for p in paths {
        if p.is_dir() {
            if !p.join(DATASET_FILE).is_file() {
                return Err(InspectError::NotADataset(p.clone()));
            }
            let ds = Dataset::open(p)?;
            for s in &ds.samples {
                out.push(Input {
                    rgb: s.rgb.clone(),
                    depth: s.depth.clone(),
                    depth_unit_mm: depth_unit_mm.or(ds.spec.depth_unit_mm),
                    intrinsics: ds.spec.intrinsics,
                    truth: ds.label_name(s).map(String::from),
                });
            }
        } else if p.is_file() {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if name.ends_with(DEPTH_SUFFIX) {
                continue;
            }
            let ext_ok = p.extension().is_some_and(|e| {
                RGB_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
            });
            if !ext_ok {
                return Err(InspectError::NotAnImage(p.clone()));
            }
            let depth = Some(depth_path_for(p)).filter(|d| d.is_file());
            let (spec, truth) = dataset_context(p, &mut specs);
            out.push(Input {
                rgb: p.clone(),
                depth,
                depth_unit_mm: depth_unit_mm.or(spec.as_ref().and_then(|s| s.depth_unit_mm)),
                intrinsics: spec.as_ref().and_then(|s| s.intrinsics),
                truth,
            });
        } else {
            return Err(InspectError::Missing(p.clone()));
        }
    }
    Ok(out)
}

/// The dataset a file belongs to (`DATASET/CLASS/file`), and its label if `CLASS` is a class.
/// `specs` caches each folder's `dataset.toml` (or its absence), so a shell glob over one
/// dataset reads it once.
fn dataset_context(
    file: &Path,
    specs: &mut HashMap<PathBuf, Option<DatasetSpec>>,
) -> (Option<DatasetSpec>, Option<String>) {
    let Some(class_dir) = file.parent() else {
        return (None, None);
    };
    let Some(root) = class_dir.parent() else {
        return (None, None);
    };
    let spec = specs
        .entry(root.to_path_buf())
        .or_insert_with(|| DatasetSpec::load(root).ok())
        .clone();
    let class = class_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let truth = class.filter(|c| spec.as_ref().is_some_and(|s| s.classes.contains(c)));
    (spec, truth)
}

/// Loads the input's frame.
pub fn load(input: &Input) -> Result<Frame, InspectError> {
    let unit = match (&input.depth, input.depth_unit_mm) {
        (Some(_), None) => return Err(InspectError::UnknownDepthUnit(input.rgb.clone())),
        (_, u) => u.unwrap_or(1.0),
    };
    Ok(Frame::load(&input.rgb, input.depth.as_deref(), unit)?.with_intrinsics(input.intrinsics))
}

/// Output format of the per-frame results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One result JSON per line.
    Jsonl,
    /// One row per frame with the main fields.
    Csv,
}

/// Totals over a run.
#[derive(Debug)]
pub struct Summary {
    pub frames: usize,
    pub failed: usize,
    pub confident: usize,
    /// Frames the model ran on.
    pub model_runs: usize,
    /// Frames the model was asked for and failed on.
    pub model_failures: usize,
    /// Labelled frames the rules were confident about, and how many of them were right.
    pub confident_labelled: usize,
    pub confident_right: usize,
    pub matrix: Option<ConfusionMatrix>,
    pub latencies_ms: Vec<f32>,
}

/// What judges the frames: the same detector, policy and model the daemon runs.
#[derive(Debug)]
pub struct Judge {
    pub detector: Detector,
    pub policy: Policy,
    pub model: Option<Model>,
    pub identity: Identity,
}

/// Inspects every input (in parallel, results in input order), writes one result per frame to
/// `out` and returns the summary. Frames that cannot be read are reported on stderr by path and
/// counted; the others still run.
pub fn run(
    inputs: &[Input],
    judge: &Judge,
    format: Format,
    out: &mut dyn Write,
) -> Result<Summary, InspectError> {
    let detector = &judge.detector;
    let results: Vec<Result<(Inspection, bool, bool), String>> = inputs
        .par_iter()
        .map(|input| {
            let frame = load(input).map_err(|e| e.to_string())?;
            let o = inspect_frame(
                detector,
                &judge.policy,
                judge.model.as_ref(),
                &judge.identity,
                &frame,
            );
            let mut r = o.result;
            r.path = Some(input.rgb.display().to_string());
            Ok((r, o.model_asked, o.model_error.is_some()))
        })
        .collect();

    let classes: Option<Vec<String>> = {
        let names = detector
            .config()
            .classes
            .in_order()
            .map(String::from)
            .to_vec();
        inputs.iter().any(|i| i.truth.is_some()).then_some(names)
    };
    let mut summary = Summary {
        frames: inputs.len(),
        failed: 0,
        confident: 0,
        model_runs: 0,
        model_failures: 0,
        confident_labelled: 0,
        confident_right: 0,
        matrix: classes.as_deref().map(ConfusionMatrix::new),
        latencies_ms: Vec::new(),
    };
    let mut csv = (format == Format::Csv).then(|| csv::Writer::from_writer(Vec::new()));
    if let Some(w) = csv.as_mut() {
        w.write_record([
            "path",
            "truth",
            "class",
            "confidence",
            "uncertain",
            "decided_by",
            "note",
            "pore_count",
            "undercut_depth_mm",
            "spatter_count",
            "burn_through_area_mm2",
            "bead_width_mm",
            "bead_height_mm",
            "rules_ms",
            "model_class",
            "model_confidence",
            "model_ms",
        ])?;
    }
    for (input, r) in inputs.iter().zip(results) {
        let r = match r {
            Ok((r, model_ran, model_failed)) => {
                summary.model_runs += usize::from(model_ran);
                summary.model_failures += usize::from(model_failed);
                r
            }
            Err(e) => {
                eprintln!("error: {e}");
                summary.failed += 1;
                continue;
            }
        };
        summary.latencies_ms.push(r.latency_ms.rules);
        if !r.uncertain {
            summary.confident += 1;
        }
        // Every frame goes into the matrix; confident ones also into the confident accuracy.
        if let (Some(truth), Some(m)) = (&input.truth, summary.matrix.as_mut())
            && m.add(truth, &r.class)
            && !r.uncertain
        {
            summary.confident_labelled += 1;
            summary.confident_right += usize::from(*truth == r.class);
        }
        match csv.as_mut() {
            Some(w) => {
                let opt = |v: Option<f32>| v.map(|v| v.to_string()).unwrap_or_default();
                let m = &r.measurements;
                let note = r.rules.as_ref().and_then(|v| v.note).map(|n| {
                    serde_json::to_value(n)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default()
                });
                w.write_record([
                    r.path.clone().unwrap_or_default(),
                    input.truth.clone().unwrap_or_default(),
                    r.class.clone(),
                    format!("{:.4}", r.confidence),
                    r.uncertain.to_string(),
                    r.decided_by.as_str().to_string(),
                    note.unwrap_or_default(),
                    m.pore_count.map(|v| v.to_string()).unwrap_or_default(),
                    opt(m.undercut_depth_mm),
                    m.spatter_count.map(|v| v.to_string()).unwrap_or_default(),
                    opt(m.burn_through_area_mm2),
                    opt(m.bead_width_mm),
                    opt(m.bead_height_mm),
                    format!("{:.3}", r.latency_ms.rules),
                    r.model
                        .as_ref()
                        .map(|m| m.class.clone())
                        .unwrap_or_default(),
                    r.model
                        .as_ref()
                        .map(|m| format!("{:.4}", m.confidence))
                        .unwrap_or_default(),
                    r.model
                        .as_ref()
                        .map(|_| format!("{:.3}", r.latency_ms.model))
                        .unwrap_or_default(),
                ])?;
            }
            None => {
                serde_json::to_writer(&mut *out, &r)?;
                out.write_all(b"\n")?;
            }
        }
    }
    if let Some(w) = csv {
        out.write_all(
            &w.into_inner()
                .map_err(|e| InspectError::Write(e.into_error()))?,
        )?;
    }
    out.flush()?;
    Ok(summary)
}

impl Summary {
    /// The summary as text for people.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let ok = self.frames - self.failed;
        s.push_str(&format!(
            "inspected {ok} frames ({} could not be read)\n",
            self.failed
        ));
        if ok > 0 {
            s.push_str(&format!(
                "confident: {} of {ok} ({:.1}%)\n",
                self.confident,
                100.0 * self.confident as f64 / ok as f64
            ));
            let mut l = self.latencies_ms.clone();
            l.sort_by(f32::total_cmp);
            let q = |f: f64| l[((l.len() - 1) as f64 * f).round() as usize];
            s.push_str(&format!(
                "rules time per frame: median {:.2} ms, p90 {:.2} ms\n",
                q(0.5),
                q(0.9)
            ));
            if self.model_runs > 0 || self.model_failures > 0 {
                s.push_str(&format!(
                    "model ran on {} of {ok} frames ({:.1}%), {} failed\n",
                    self.model_runs,
                    100.0 * self.model_runs as f64 / ok as f64,
                    self.model_failures
                ));
            }
        }
        if let Some(m) = &self.matrix {
            s.push_str(&format!("{m}\n"));
            s.push_str(&format!(
                "accuracy on confident labelled frames: {:.4} ({} of {})\n",
                self.confident_accuracy(),
                self.confident_right,
                self.confident_labelled
            ));
        }
        s
    }

    /// Accuracy over the labelled frames the rules were confident about (0 when none).
    pub fn confident_accuracy(&self) -> f64 {
        if self.confident_labelled == 0 {
            0.0
        } else {
            self.confident_right as f64 / self.confident_labelled as f64
        }
    }
}
