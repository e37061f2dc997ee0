//! The model manifest (`manifest.json` of a model bundle, DESIGN.md) and the model's input spec.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Memory layout of the model input. Only NCHW is produced by our exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    #[serde(rename = "NCHW")]
    Nchw,
}

/// One input channel of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    R,
    G,
    B,
    /// Height above the base-metal surface, from depth (see [`DepthNormalisation`]).
    Height,
    /// Local relief of that height: how far each spot stands out of (or sinks into) its
    /// surroundings, with the strongest deviation in each input pixel kept, so pores, grooves,
    /// droplets and holes a few camera pixels across survive shrinking to the input size
    /// (`preprocess::relief_channel`).
    Relief,
}

impl Channel {
    /// Whether the channel is computed from depth (`height`, `relief`).
    pub fn from_depth(self) -> bool {
        matches!(self, Channel::Height | Channel::Relief)
    }
}

/// What the height channel is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeightReference {
    /// A robust plane fitted to the frame's depth: the base metal, tilted or not.
    Plane,
    /// The median depth of the frame (cheaper; wrong on strongly tilted plates).
    Median,
}

/// How depth becomes the height channel:
/// `height_mm = reference_depth_mm - depth_mm` (positive toward the camera), clipped to
/// `[-range_mm, range_mm]` and divided by `range_mm`, so the channel is in [-1, 1] before the
/// channel's mean/std apply. Pixels without depth get `missing_mm` (before clipping).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepthNormalisation {
    pub reference: HeightReference,
    /// Half-range of heights kept, mm (e.g. 4.0: a 3 mm bead and a 1 mm undercut both fit).
    pub range_mm: f32,
    /// Height in mm given to pixels without depth; 0 = "on the base metal".
    #[serde(default)]
    pub missing_mm: f32,
}

impl Default for DepthNormalisation {
    fn default() -> Self {
        DepthNormalisation {
            reference: HeightReference::Plane,
            range_mm: 4.0,
            missing_mm: 0.0,
        }
    }
}

/// How the frame becomes the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Scale each axis to the input size (aspect ratio not kept), bilinear with antialiasing.
    /// JSON `"stretch"`.
    #[default]
    Stretch,
    /// A strip of plate along the weld bead, found in the depth (the rules' bead axis): the
    /// input's rows run across the bead, `across_mm` of plate over the input's height, and its
    /// columns along it at the same mm per pixel, centred on the bead. Every frame then shows
    /// its bead level through the middle at one scale, whatever its angle and the camera's
    /// distance. Needs depth. JSON `{"bead_strip": {"across_mm": 52.0}}`.
    BeadStrip {
        /// Plate across the bead covered by the input's height, mm (10-1000).
        across_mm: f32,
    },
}

/// Everything needed to turn a frame into the model's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub layout: Layout,
    /// Channel order of the tensor, e.g. `["r","g","b"]` or `["r","g","b","height"]`.
    pub channels: Vec<Channel>,
    /// `[width, height]` in pixels.
    pub size: [u32; 2],
    /// Per channel, subtracted after scaling to [0, 1] (colour) or [-1, 1] (height).
    pub mean: Vec<f32>,
    /// Per channel, divides after the mean is subtracted.
    pub std: Vec<f32>,
    /// Required when `channels` has `height`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<DepthNormalisation>,
    #[serde(default)]
    pub resize: ResizeMode,
}

/// Mean and std of ImageNet, the statistics the torchvision backbones were trained with
/// (torchvision `transforms.Normalize` documentation).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl InputSpec {
    /// 224x224 RGB with ImageNet statistics.
    pub fn rgb(size: u32) -> InputSpec {
        InputSpec {
            layout: Layout::Nchw,
            channels: vec![Channel::R, Channel::G, Channel::B],
            size: [size, size],
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
            depth: None,
            resize: ResizeMode::Stretch,
        }
    }

    /// RGB plus a plane-referenced height channel (mean 0, std 0.5 on the [-1, 1] scale).
    pub fn rgb_height(size: u32) -> InputSpec {
        let mut spec = InputSpec::rgb(size);
        spec.channels.push(Channel::Height);
        spec.mean.push(0.0);
        spec.std.push(0.5);
        spec.depth = Some(DepthNormalisation::default());
        spec
    }

    /// [`InputSpec::rgb_height`] plus the relief channel (mean 0, std 0.1 on the [-1, 1] scale:
    /// a 0.4 mm pit is -1 with the default 4 mm range).
    pub fn rgb_height_relief(size: u32) -> InputSpec {
        let mut spec = InputSpec::rgb_height(size);
        spec.channels.push(Channel::Relief);
        spec.mean.push(0.0);
        spec.std.push(0.1);
        spec
    }

    /// Whether the frame must have depth: a channel computed from it, or the bead strip.
    pub fn needs_depth(&self) -> bool {
        self.depth_channels() || matches!(self.resize, ResizeMode::BeadStrip { .. })
    }

    /// Whether any channel is computed from depth.
    pub fn depth_channels(&self) -> bool {
        self.channels.iter().any(|c| c.from_depth())
    }

    /// Every problem with the spec, each naming the key (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let n = self.channels.len();
        if n == 0 {
            out.push("input.channels is empty; expected e.g. [\"r\",\"g\",\"b\"]".into());
        }
        for (i, c) in self.channels.iter().enumerate() {
            if self.channels[..i].contains(c) {
                out.push(format!("input.channels lists {c:?} twice"));
            }
        }
        if self.size[0] == 0 || self.size[1] == 0 || self.size[0] > 4096 || self.size[1] > 4096 {
            out.push(format!(
                "input.size {:?} must be 1..=4096 pixels on each side",
                self.size
            ));
        }
        if self.mean.len() != n {
            out.push(format!(
                "input.mean has {} values for {n} channels",
                self.mean.len()
            ));
        }
        if self.std.len() != n {
            out.push(format!(
                "input.std has {} values for {n} channels",
                self.std.len()
            ));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            out.push("input.mean values must be finite".into());
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            out.push("input.std values must be positive and finite".into());
        }
        if let ResizeMode::BeadStrip { across_mm } = self.resize
            && !(10.0..=1000.0).contains(&across_mm)
        {
            out.push(format!(
                "input.resize.bead_strip.across_mm must be 10..=1000 mm, got {across_mm}"
            ));
        }
        match (&self.depth, self.depth_channels()) {
            (None, true) => {
                out.push("input.depth is required when channels include height or relief".into())
            }
            (Some(d), _) => {
                if !(d.range_mm.is_finite() && d.range_mm > 0.0) {
                    out.push(format!(
                        "input.depth.range_mm must be > 0, got {}",
                        d.range_mm
                    ));
                }
                if !d.missing_mm.is_finite() {
                    out.push("input.depth.missing_mm must be finite".into());
                }
            }
            (None, false) => {}
        }
        out
    }
}

/// Numeric precision of the ONNX model's weights and arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    F32,
    F16,
    Int8,
}

/// The manifest's names (`f32`, `f16`, `int8`), for command lines.
impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Quantization, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("{s:?} is not a quantization; expected f32, f16 or int8"))
    }
}

/// Every problem with a classifier's output classes: at least 2 names, none empty, none twice.
/// Each message names `key` (e.g. `classes`, `model.classes`); empty when the list is usable.
pub fn class_list_problems(key: &str, classes: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if classes.len() < 2 {
        out.push(format!(
            "{key} must list at least 2 classes, got {}",
            classes.len()
        ));
    }
    for (i, c) in classes.iter().enumerate() {
        if c.trim().is_empty() {
            out.push(format!("{key}[{i}] is empty"));
        } else if classes[..i].contains(c) {
            out.push(format!("{key}[{i}] = {c:?} is listed twice"));
        }
    }
    out
}

/// Where a model came from, so that it can be reproduced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// Content hash of the dataset version it was trained on.
    pub dataset_hash: String,
    /// The training configuration as the trainer wrote it.
    #[serde(default)]
    pub training_config: serde_json::Value,
}

/// `manifest.json` of a model bundle.
///
/// Unknown top-level fields are accepted (a newer trainer may add information a device can
/// ignore); the input spec is strict, since misreading it would feed the model wrong pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub name: String,
    pub version: String,
    pub created: DateTime<Utc>,
    /// e.g. `mobilenet_v2`, `resnet50`.
    pub architecture: String,
    /// Output classes in logit order.
    pub classes: Vec<String>,
    pub input: InputSpec,
    /// Hex sha256 of `model.onnx`.
    pub onnx_sha256: String,
    pub quantization: Quantization,
    /// Evaluation figures on the held-out set (e.g. `accuracy`, `macro_f1`).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub lineage: Lineage,
    /// Inputs carried in the bundle (`golden.bin`) with the logits they must give: a device
    /// runs them before a model goes live, in each backend it could use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden: Option<Golden>,
}

/// The golden check of a bundle: `count` preprocessed inputs in `golden.bin` and their logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// Hex sha256 of `golden.bin`: `count` NCHW f32 tensors of the input spec's shape,
    /// little-endian, one after the other.
    pub sha256: String,
    pub count: usize,
    /// The logits of each input, as the signing machine's `backend` computed them.
    pub logits: Vec<Vec<f32>>,
    /// The backend that computed `logits` (`tract`).
    pub backend: String,
    /// The largest |logit difference| accepted, as a share of max(1, the largest |logit|):
    /// runtimes differ in summation order and, for int8, in rounding.
    pub tolerance: f32,
}

impl Golden {
    /// How far `got` (the logits of input `i`) is from the expected ones, as a share of
    /// max(1, the largest expected |logit|); `None` when the widths differ.
    pub fn deviation(&self, i: usize, got: &[f32]) -> Option<f32> {
        let want = self.logits.get(i)?;
        if want.len() != got.len() {
            return None;
        }
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        // A NaN or infinite logit never passes (`f32::max` would skip a NaN difference).
        if got.iter().any(|v| !v.is_finite()) {
            return Some(f32::INFINITY);
        }
        let worst = want
            .iter()
            .zip(got)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        Some(worst / scale)
    }

    /// Bytes `golden.bin` must have for `input`.
    pub fn expected_bytes(&self, input: &InputSpec) -> u64 {
        let [w, h] = input.size;
        self.count as u64 * input.channels.len() as u64 * u64::from(w) * u64::from(h) * 4
    }

    fn problems(&self, classes: usize) -> Vec<String> {
        let mut out = Vec::new();
        if !is_sha256_hex(&self.sha256) {
            out.push(format!(
                "golden.sha256 {:?} is not 64 hex digits",
                self.sha256
            ));
        }
        if self.count == 0 {
            out.push("golden.count is 0".into());
        }
        if self.logits.len() != self.count {
            out.push(format!(
                "golden.logits has {} rows for {} inputs",
                self.logits.len(),
                self.count
            ));
        }
        if let Some((i, row)) = self
            .logits
            .iter()
            .enumerate()
            .find(|(_, r)| r.len() != classes || r.iter().any(|v| !v.is_finite()))
        {
            out.push(format!(
                "golden.logits[{i}] has {} values (there are {classes} classes) or a                  non-finite one",
                row.len()
            ));
        }
        if !(self.tolerance.is_finite() && self.tolerance > 0.0 && self.tolerance < 1.0) {
            out.push(format!(
                "golden.tolerance {} is not in (0, 1)",
                self.tolerance
            ));
        }
        out
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest.json is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("manifest.json has problems:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl ModelManifest {
    /// Parses and validates manifest bytes.
    pub fn from_json(bytes: &[u8]) -> Result<ModelManifest, ManifestError> {
        let m: ModelManifest = serde_json::from_slice(bytes)?;
        let problems = m.problems();
        if problems.is_empty() {
            Ok(m)
        } else {
            Err(ManifestError::Invalid(problems))
        }
    }

    /// Every problem with the manifest (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.name.trim().is_empty() {
            out.push("name is empty".into());
        }
        if self.version.trim().is_empty() {
            out.push("version is empty".into());
        }
        out.extend(class_list_problems("classes", &self.classes));
        if !is_sha256_hex(&self.onnx_sha256) {
            out.push(format!(
                "onnx_sha256 {:?} is not 64 hex digits",
                self.onnx_sha256
            ));
        }
        out.extend(self.input.problems());
        if let Some(g) = &self.golden {
            out.extend(g.problems(self.classes.len()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_parses_the_manifest_names() {
        for q in [Quantization::F32, Quantization::F16, Quantization::Int8] {
            let name = serde_json::to_value(q).unwrap();
            assert_eq!(name.as_str().unwrap().parse::<Quantization>(), Ok(q));
        }
        let e = "int4".parse::<Quantization>().unwrap_err();
        assert!(e.contains("int4") && e.contains("int8"), "{e}");
    }

    fn manifest() -> ModelManifest {
        ModelManifest {
            name: "weld-mbv2".into(),
            version: "mbv2-2026-11-22.1".into(),
            created: "2026-11-22T10:00:00Z".parse().unwrap(),
            architecture: "mobilenet_v2".into(),
            classes: ["good", "porosity", "undercut", "spatter", "burn_through"]
                .map(String::from)
                .to_vec(),
            input: InputSpec::rgb_height(224),
            onnx_sha256: "ab".repeat(32),
            quantization: Quantization::Int8,
            metrics: BTreeMap::from([("accuracy".to_string(), 0.97)]),
            lineage: Lineage::default(),
            golden: None,
        }
    }

    #[test]
    fn round_trips_through_json() {
        let m = manifest();
        let json = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(ModelManifest::from_json(&json).unwrap(), m);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            v["input"]["channels"],
            serde_json::json!(["r", "g", "b", "height"])
        );
        assert_eq!(v["input"]["layout"], "NCHW");
        assert_eq!(v["quantization"], "int8");
    }

    #[test]
    fn lists_every_problem_at_once() {
        let mut m = manifest();
        m.classes = vec!["good".into(), "good".into()];
        m.onnx_sha256 = "xyz".into();
        m.input.std[1] = 0.0;
        m.input.mean.pop();
        m.input.depth = None;
        let problems = m.problems();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        let err = ModelManifest::from_json(&serde_json::to_vec(&m).unwrap()).unwrap_err();
        let text = err.to_string();
        for needle in [
            "twice",
            "onnx_sha256",
            "input.std",
            "input.mean",
            "input.depth",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn unknown_input_keys_are_rejected() {
        let mut v = serde_json::to_value(manifest()).unwrap();
        v["input"]["gamma"] = serde_json::json!(2.2);
        let err = ModelManifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("gamma"), "{err}");
    }
}
