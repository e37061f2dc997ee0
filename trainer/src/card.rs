//! The model card: what `export` and `quantize` know about the ONNX file they write, kept
//! beside it (`model.onnx` → `model.json`, as a checkpoint's `best.safetensors` has
//! `best.json`). `bundle` reads it into the signed manifest, so classes, input spec,
//! precision, figures and lineage travel with the model instead of being typed again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use weld_core::manifest::{InputSpec, Lineage, Quantization, class_list_problems};

pub const CARD_FORMAT: &str = "weld-trainer-model-card/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    pub format: String,
    /// The manifest's `architecture` (`mobilenet_v2_0.5`, `resnet50`, ...).
    pub architecture: String,
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub quantization: Quantization,
    /// Figures measured on held-out frames and on this machine (accuracy, latency, ...).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub lineage: Lineage,
}

/// Where the card of `onnx` lives.
pub fn card_path(onnx: &Path) -> PathBuf {
    onnx.with_extension("json")
}

impl ModelCard {
    /// Reads and checks the card beside `onnx`; `Ok(None)` when there is none.
    pub fn read_beside(onnx: &Path) -> Result<Option<ModelCard>> {
        let path = card_path(onnx);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let card: ModelCard = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a model card", path.display()))?;
        if card.format != CARD_FORMAT {
            bail!(
                "{}: format {:?}, this trainer reads {CARD_FORMAT:?}",
                path.display(),
                card.format
            );
        }
        let mut problems = class_list_problems("classes", &card.classes);
        problems.extend(card.input.problems());
        if !problems.is_empty() {
            bail!(
                "{} has problems:\n  - {}",
                path.display(),
                problems.join("\n  - ")
            );
        }
        Ok(Some(card))
    }

    /// Opens the dataset at `path` to judge this model on: its classes must be the model's.
    pub fn open_dataset(&self, path: &Path) -> Result<weld_core::dataset::Dataset> {
        let ds = weld_core::dataset::Dataset::open(path)?;
        if ds.spec.classes != self.classes {
            bail!(
                "the model's classes ({}) disagree with the dataset's ({})",
                self.classes.join(", "),
                ds.spec.classes.join(", ")
            );
        }
        Ok(ds)
    }

    /// Writes the card beside `onnx` (atomically).
    pub fn write_beside(&self, onnx: &Path) -> Result<PathBuf> {
        let path = card_path(onnx);
        let mut text = serde_json::to_vec_pretty(self).context("encoding the model card")?;
        text.push(b'\n');
        weld_core::fsutil::write_atomic(&path, &text)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}
