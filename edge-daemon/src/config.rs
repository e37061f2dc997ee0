//! The daemon's configuration: `weld-edge run --config FILE` (TOML), in two stages. [`ConfigFile`]
//! is what the file says (every key optional, unknown keys refused, each field's doc comment is
//! its user documentation); [`ConfigFile::validate`] turns it into a [`Config`] and reports
//! every problem at once, each naming its key and what is allowed. With no file the embedded
//! defaults are the demo: a synthetic camera, the hybrid policy, a store in `./weld-edge-data`.
//!
//! Example files: `firmware-config/demo.toml`, `firmware-config/rdk-x5-realsense.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use weld_core::manifest::{InputSpec, class_list_problems};
use weld_core::rules::{Detector, RulesConfig};

use crate::deploy::DeploySection;
use crate::http::{HttpSection, HttpSettings};
use crate::mqtt::{MqttSection, MqttSettings};
use crate::policy::{Policy, PolicyKind, Thresholds};
use crate::source::SourceConfig;
use crate::store::{CaptureConfig, HistoryConfig, OutboxConfig, StoreConfig};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("the configuration has {} problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The configuration file as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    /// Who this device is: written into every result and the MQTT topics.
    pub device: DeviceSection,
    /// Where frames come from (`kind` = synthetic, replay, v4l, realsense).
    pub source: SourceConfig,
    /// Queue and worker threads between the camera and the decision.
    pub pipeline: PipelineSection,
    /// Which stages decide, their thresholds and temporal smoothing.
    pub policy: PolicySection,
    /// The heuristic detector.
    pub rules: RulesSection,
    /// The neural network. Absent: no model; the hybrid policy then reports frames the rules
    /// are unsure of as uncertain.
    pub model: Option<ModelSection>,
    /// Local storage: results history and captured uncertain frames.
    pub store: StoreSection,
    /// Results written as JSON lines.
    pub output: OutputSection,
    /// Results, status, stats and commands over MQTT.
    pub mqtt: MqttSection,
    /// The HTTP API, the dashboard and `/metrics`.
    pub http: HttpSection,
    /// Models pushed to this device: trusted keys, how many are kept.
    pub deploy: DeploySection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSection {
    /// Device name, e.g. `rdk-07`: letters, digits, `-`, `_`, `.` (it becomes an MQTT topic level).
    pub id: String,
    /// Production line, e.g. `L2` (same characters).
    pub line: String,
}

impl Default for DeviceSection {
    fn default() -> Self {
        DeviceSection {
            id: "demo".into(),
            line: "L1".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSection {
    /// Frames that may wait between capture and inference, 1..=256. When full, the oldest
    /// waiting frame is dropped (and counted): a late result is worth less than a fresh one.
    pub queue: usize,
    /// Inference worker threads, 1..=64 (each runs the rules and, when needed, the model).
    pub workers: usize,
}

impl Default for PipelineSection {
    fn default() -> Self {
        PipelineSection {
            queue: 4,
            // Two leave the capture thread a core of its own on a 4-core board and use both
            // cores of a 2-core one.
            workers: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySection {
    /// `hybrid` (rules first, the model when they are unsure), `rules`, `model` or `both`.
    pub mode: PolicyKind,
    /// Rules confidence needed to decide without the model, in (0, 1]. Default: the
    /// calibrated `confident_at` of the rules config.
    pub rules_confident_at: Option<f32>,
    /// Model probability needed for a confident model answer, in (0, 1].
    pub model_confident_at: f32,
    /// Frames per smoothing window (majority weighted by confidence), 0 or 1 = off, at most 300.
    pub smoothing_window: usize,
    /// A pause between frames longer than this (ms) starts a new part for smoothing.
    pub part_gap_ms: u64,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            mode: PolicyKind::Hybrid,
            rules_confident_at: None,
            model_confident_at: 0.8,
            smoothing_window: 0,
            // Two seconds: far longer than the 33 ms between frames at 30 fps, shorter than a
            // part change on a line.
            part_gap_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesSection {
    /// A rules config (TOML, e.g. from `weld-trainer rules calibrate`); the built-in
    /// calibration when absent.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The default model built into weld-edge (a MobileNetV2 trained by weld-trainer on
    /// synthetic frames, signed by its own key, which is trusted for it alone). What the demo
    /// runs; for a line, train and bundle a model on its own frames.
    #[serde(default)]
    pub builtin: bool,
    /// A signed model bundle (DESIGN.md "Model bundle"): classes, input, name and version come
    /// from its manifest. Verified against `trusted_keys` and golden-checked before it runs.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// Public keys a bundle may be signed by: `.pub` files or 64 hex digits.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Other forms of the bundle's model (e.g. its int8 bundle from `weld-trainer quantize`):
    /// each is considered only when signed by a trusted key, made from the bundle's ONNX, and
    /// within 1 point of its held-out accuracy; the fastest (bundle, backend) pair that
    /// reproduces its golden outputs runs.
    #[serde(default)]
    pub alternatives: Vec<PathBuf>,
    /// A plain ONNX file instead of a bundle (development): needs `classes`.
    #[serde(default)]
    pub onnx: Option<PathBuf>,
    /// Output classes in logit order (plain ONNX only).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Version reported in results (`model.version`, plain ONNX only); default: the file's
    /// stem.
    #[serde(default)]
    pub version: Option<String>,
    /// Inference backend: `auto` (a bundle: the fastest backend of this build that reproduces
    /// its golden outputs; a plain ONNX: tract), `tract` (built in) or `ort` (needs the `ort`
    /// build feature).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// ONNX Runtime's shared library (backend `ort`); default: the `ORT_DYLIB_PATH` variable.
    #[serde(default)]
    pub ort_library: Option<PathBuf>,
    /// The model's input (channels, size, normalisation; plain ONNX only); default 224x224 RGB
    /// with ImageNet statistics.
    #[serde(default)]
    pub input: Option<InputSpec>,
}

fn default_backend() -> String {
    crate::model::AUTO_BACKEND.into()
}

impl ModelSection {
    /// The built-in default model on the fastest backend that reproduces its golden outputs.
    pub fn builtin() -> ModelSection {
        ModelSection {
            builtin: true,
            bundle: None,
            trusted_keys: Vec::new(),
            alternatives: Vec::new(),
            onnx: None,
            classes: Vec::new(),
            version: None,
            backend: default_backend(),
            ort_library: None,
            input: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// Data directory (created if missing).
    pub dir: PathBuf,
    /// sled's page cache in MiB, 1..=1024. Default 4. Resident memory grows by about this
    /// much (and sled's overhead on it) over the first minutes, as results fill it.
    pub cache_mib: u64,
    /// Results history retention.
    pub history: HistoryConfig,
    /// Uncertain frames kept for retraining.
    pub captures: CaptureConfig,
    /// Results waiting for the MQTT broker's acknowledgement.
    pub outbox: OutboxConfig,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            dir: PathBuf::from("weld-edge-data"),
            cache_mib: crate::store::DEFAULT_CACHE_BYTES / (1024 * 1024),
            history: HistoryConfig::default(),
            captures: CaptureConfig::default(),
            outbox: OutboxConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSection {
    /// Write every result as one JSON line on standard output.
    pub stdout_jsonl: bool,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection { stdout_jsonl: true }
    }
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub device: String,
    pub line: String,
    pub source: SourceConfig,
    pub queue: usize,
    pub workers: usize,
    pub policy: Policy,
    pub smoothing_window: usize,
    pub part_gap: Duration,
    pub detector: Detector,
    pub model: Option<ModelSection>,
    pub store_dir: PathBuf,
    pub store: StoreConfig,
    pub stdout_jsonl: bool,
    /// `None`: MQTT is off.
    pub mqtt: Option<MqttSettings>,
    /// `None`: HTTP is off.
    pub http: Option<HttpSettings>,
    /// Models pushed to this device.
    pub deploy: DeploySection,
    /// The file as loaded (for `GET /api/v1/config`): paths and values, no secrets (they are
    /// never in the file, only the names of the files and variables that hold them).
    pub file: serde_json::Value,
}

/// Limits of the pipeline section: more queued frames only add latency; more workers than
/// this is a typo on any board we target.
const MAX_QUEUE: usize = 256;
const MAX_WORKERS: usize = 64;
/// 300 frames is 10 s at 30 fps, longer than any seam we smooth over.
const MAX_SMOOTHING_WINDOW: usize = 300;

impl ConfigFile {
    /// Reads a config file; syntax errors and unknown keys name the file, line and key.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Checks every value and builds the running config; all problems are reported together.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let file = serde_json::to_value(&self).unwrap_or_default();
        for (key, v) in [
            ("device.id", &self.device.id),
            ("device.line", &self.device.line),
        ] {
            if !is_topic_level(v) {
                problems.push(format!(
                    "{key} = {v:?}: use 1-64 letters, digits, '-', '_' or '.'"
                ));
            }
        }
        problems.extend(self.source.problems());
        if !(1..=MAX_QUEUE).contains(&self.pipeline.queue) {
            problems.push(format!(
                "pipeline.queue = {}: must be 1..={MAX_QUEUE}",
                self.pipeline.queue
            ));
        }
        if !(1..=MAX_WORKERS).contains(&self.pipeline.workers) {
            problems.push(format!(
                "pipeline.workers = {}: must be 1..={MAX_WORKERS}",
                self.pipeline.workers
            ));
        }

        let rules_cfg = match &self.rules.file {
            None => Some(RulesConfig::default()),
            Some(p) => match RulesConfig::load(p) {
                Ok(c) => Some(c),
                Err(e) => {
                    problems.push(format!("rules.file: {e}"));
                    None
                }
            },
        };
        let detector = rules_cfg.and_then(|c| match Detector::new(c) {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(format!("rules.file: {e}"));
                None
            }
        });
        let thresholds = Thresholds {
            rules_confident_at: self
                .policy
                .rules_confident_at
                .unwrap_or_else(|| detector.as_ref().map_or(1.0, |d| d.config().confident_at)),
            model_confident_at: self.policy.model_confident_at,
        };
        problems.extend(thresholds.problems("policy"));
        if self.policy.smoothing_window > MAX_SMOOTHING_WINDOW {
            problems.push(format!(
                "policy.smoothing_window = {}: must be 0..={MAX_SMOOTHING_WINDOW}",
                self.policy.smoothing_window
            ));
        }
        if self.policy.part_gap_ms == 0 {
            problems.push("policy.part_gap_ms = 0: must be at least 1".into());
        }
        if self.policy.mode == PolicyKind::Model && self.model.is_none() {
            problems.push("policy.mode = \"model\" needs a [model] section".into());
        }
        if let Some(m) = &self.model {
            problems.extend(model_problems(m));
        }
        if self.store.dir.as_os_str().is_empty() {
            problems.push("store.dir is empty".into());
        }
        let store = StoreConfig {
            cache_bytes: self.store.cache_mib.saturating_mul(1024 * 1024),
            history: self.store.history,
            captures: self.store.captures,
            outbox: self.store.outbox,
        };
        problems.extend(store.problems());
        let mqtt = match self.mqtt.resolve(&self.device.id, &self.device.line) {
            Ok(m) => m,
            Err(p) => {
                problems.extend(p);
                None
            }
        };

        problems.extend(self.deploy.problems());
        let http = match self.http.resolve() {
            Ok(h) => h,
            Err(p) => {
                problems.extend(p);
                None
            }
        };

        match (problems.is_empty(), detector) {
            (true, Some(detector)) => Ok(Config {
                device: self.device.id,
                line: self.device.line,
                source: self.source,
                queue: self.pipeline.queue,
                workers: self.pipeline.workers,
                policy: Policy {
                    kind: self.policy.mode,
                    thresholds,
                },
                smoothing_window: self.policy.smoothing_window,
                part_gap: Duration::from_millis(self.policy.part_gap_ms),
                detector,
                model: self.model,
                store_dir: self.store.dir,
                store,
                stdout_jsonl: self.output.stdout_jsonl,
                mqtt,
                http,
                deploy: self.deploy,
                file,
            }),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }
}

impl Config {
    /// The config from `path`, or the embedded demo defaults when `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => ConfigFile::load(p)?.validate(),
            // The demo runs the built-in model; a config file without [model] has none.
            None => ConfigFile {
                model: Some(ModelSection::builtin()),
                ..ConfigFile::default()
            }
            .validate(),
        }
    }
}

fn model_problems(m: &ModelSection) -> Vec<String> {
    let mut out = Vec::new();
    match (&m.bundle, &m.onnx) {
        _ if m.builtin => {
            if m.bundle.is_some() || m.onnx.is_some() {
                out.push(
                    "model: builtin = true runs the built-in model; give no bundle or onnx \
                     with it"
                        .into(),
                );
            }
            for (set, key) in [
                (!m.trusted_keys.is_empty(), "trusted_keys"),
                (!m.alternatives.is_empty(), "alternatives"),
                (!m.classes.is_empty(), "classes"),
                (m.input.is_some(), "input"),
                (m.version.is_some(), "version"),
            ] {
                if set {
                    out.push(format!(
                        "model.{key}: not with builtin = true (the built-in bundle brings its \
                         own)"
                    ));
                }
            }
        }
        (Some(_), Some(_)) => out.push(
            "model: give either bundle (a signed bundle) or onnx (a plain ONNX file), not both"
                .into(),
        ),
        (None, None) => out.push(
            "model: give bundle (a signed bundle), onnx, or builtin = true (the built-in \
             default model)"
                .into(),
        ),
        (Some(b), None) => {
            if !b.is_file() {
                out.push(format!(
                    "model.bundle = {:?}: no such file",
                    b.display().to_string()
                ));
            }
            if m.trusted_keys.is_empty() {
                out.push(
                    "model.trusted_keys is empty: a bundle is only run when signed by a \
                     trusted key"
                        .into(),
                );
            }
            for (i, k) in m.trusted_keys.iter().enumerate() {
                if let Err(e) = weld_core::bundle::read_verifying_key(k) {
                    out.push(format!("model.trusted_keys[{i}]: {e}"));
                }
            }
            for (i, a) in m.alternatives.iter().enumerate() {
                if !a.is_file() {
                    out.push(format!(
                        "model.alternatives[{i}] = {:?}: no such file",
                        a.display().to_string()
                    ));
                }
            }
            for (set, key) in [
                (!m.classes.is_empty(), "classes"),
                (m.input.is_some(), "input"),
                (m.version.is_some(), "version"),
            ] {
                if set {
                    out.push(format!(
                        "model.{key}: a bundle's manifest gives it; set it for a plain onnx only"
                    ));
                }
            }
        }
        (None, Some(onnx)) => {
            if !onnx.is_file() {
                out.push(format!(
                    "model.onnx = {:?}: no such file",
                    onnx.display().to_string()
                ));
            }
            out.extend(class_list_problems("model.classes", &m.classes));
            if !m.alternatives.is_empty() {
                out.push("model.alternatives: only with a bundle".into());
            }
        }
    }
    if m.backend != crate::model::AUTO_BACKEND
        && !crate::backend::available().contains(&m.backend.as_str())
    {
        out.push(format!(
            "model.backend = {:?}: this build has auto, {}{}",
            m.backend,
            crate::backend::available().join(", "),
            if m.backend == "ort" {
                " (build with --features ort for ONNX Runtime)"
            } else {
                ""
            }
        ));
    }
    if let Some(input) = &m.input {
        out.extend(
            input
                .problems()
                .into_iter()
                .map(|p| format!("model.input: {p}")),
        );
    }
    out
}

/// An MQTT topic level we are happy to build: no wildcards, separators or spaces.
fn is_topic_level(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_is_the_demo() {
        let c = Config::load(None).unwrap();
        assert_eq!((c.device.as_str(), c.line.as_str()), ("demo", "L1"));
        assert_eq!(c.policy.kind, PolicyKind::Hybrid);
        assert_eq!(
            c.policy.thresholds.rules_confident_at,
            RulesConfig::default().confident_at
        );
        assert_eq!(c.model, Some(ModelSection::builtin()));
        assert!(matches!(c.source, SourceConfig::Synthetic(_)));
        // A config file that leaves the model out has none: the built-in model, trained on
        // synthetic frames, never runs a line unasked.
        let file: ConfigFile = toml::from_str("[device]\nid = \"rdk-1\"\n").unwrap();
        assert_eq!(file.validate().unwrap().model, None);
    }

    #[test]
    fn builtin_excludes_the_other_model_keys() {
        let file: ConfigFile = toml::from_str(
            "[model]\nbuiltin = true\nonnx = \"/nonexistent/m.onnx\"\ntrusted_keys = [\"k.pub\"]\n",
        )
        .unwrap();
        let Err(ConfigError::Invalid(p)) = file.validate() else {
            panic!("accepted");
        };
        assert!(
            p.iter().any(|l| l.contains("give no bundle or onnx")),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("model.trusted_keys: not with builtin")),
            "{p:#?}"
        );
        let file: ConfigFile = toml::from_str("[model]\nbuiltin = true\n").unwrap();
        assert_eq!(
            file.validate().unwrap().model,
            Some(ModelSection::builtin())
        );
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let text = r#"
            [device]
            id = "rdk 07"
            line = "L/2"
            [pipeline]
            queue = 0
            workers = 100
            [policy]
            mode = "model"
            model_confident_at = 1.5
            smoothing_window = 1000
        "#;
        let file: ConfigFile = toml::from_str(text).unwrap();
        let Err(ConfigError::Invalid(p)) = file.validate() else {
            panic!("expected problems")
        };
        for key in [
            "device.id",
            "device.line",
            "pipeline.queue",
            "pipeline.workers",
            "policy.model_confident_at",
            "policy.smoothing_window",
            "needs a [model] section",
        ] {
            assert!(
                p.iter().any(|l| l.contains(key)),
                "{key} missing from {p:#?}"
            );
        }
        assert_eq!(p.len(), 7, "{p:#?}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = toml::from_str::<ConfigFile>("[pipeline]\nqeueu = 3\n").unwrap_err();
        assert!(err.to_string().contains("qeueu"), "{err}");
    }

    #[test]
    fn a_model_section_is_checked() {
        let text = r#"
            [model]
            onnx = "/nonexistent/model.onnx"
            classes = ["good", "good"]
            backend = "magic"
        "#;
        let file: ConfigFile = toml::from_str(text).unwrap();
        let Err(ConfigError::Invalid(p)) = file.validate() else {
            panic!("expected problems")
        };
        assert!(p.iter().any(|l| l.contains("model.onnx")), "{p:#?}");
        assert!(p.iter().any(|l| l.contains("model.classes[1]")), "{p:#?}");
        assert!(p.iter().any(|l| l.contains("model.backend")), "{p:#?}");
    }

    #[test]
    fn a_bundle_section_is_checked() {
        let problems = |text: &str| -> Vec<String> {
            let file: ConfigFile = toml::from_str(text).unwrap();
            match file.validate() {
                Err(ConfigError::Invalid(p)) => p,
                other => panic!("expected problems, got {other:?}"),
            }
        };
        let p = problems(
            r#"
            [model]
            bundle = "/nonexistent/m.bundle"
            classes = ["good", "porosity"]
        "#,
        );
        assert!(p.iter().any(|l| l.contains("model.bundle")), "{p:#?}");
        assert!(
            p.iter().any(|l| l.contains("model.trusted_keys is empty")),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("model.classes: a bundle's manifest")),
            "{p:#?}"
        );
        let p = problems(
            r#"
            [model]
            bundle = "/nonexistent/m.bundle"
            onnx = "/nonexistent/m.onnx"
        "#,
        );
        assert!(p.iter().any(|l| l.contains("not both")), "{p:#?}");
        let p = problems(
            r#"
            [model]
            bundle = "/nonexistent/m.bundle"
            trusted_keys = ["not-a-key"]
            alternatives = ["/nonexistent/int8.bundle"]
        "#,
        );
        assert!(
            p.iter().any(|l| l.contains("model.trusted_keys[0]")),
            "{p:#?}"
        );
        assert!(
            p.iter().any(|l| l.contains("model.alternatives[0]")),
            "{p:#?}"
        );
        let p = problems("[model]\nbackend = \"ort\"\n");
        assert!(p.iter().any(|l| l.contains("give bundle")), "{p:#?}");
    }

    #[test]
    fn the_example_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-config");
        for name in ["demo.toml", "rdk-x5-realsense.toml", "rdk-x5-v4l2.toml"] {
            let mut file = ConfigFile::load(&dir.join(name)).unwrap();
            // The board's model, rules, certificates and secrets exist only on the board;
            // everything else must be valid here, the model's input spec included.
            if let Some(m) = file.model.take() {
                assert!(m.input.is_none_or(|i| i.problems().is_empty()), "{name}");
            }
            file.rules.file = None;
            file.mqtt.tls = None;
            file.mqtt.password_file = None;
            file.mqtt.commands.token_file = None;
            file.http.token_file = None;
            if let Err(e) = file.validate() {
                panic!("{name}: {e}");
            }
        }
    }
}
