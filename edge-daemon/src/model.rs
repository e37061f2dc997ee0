//! A classifier ready for the line: a loaded [`Backend`], its class names and the input spec
//! that turns a [`Frame`] into its input.
//!
//! A [`Model`] only exists once it has passed a smoke inference: loading runs the backend once
//! on a zero tensor and checks that the output has one logit per class, and that the spec's
//! channels and size match what the ONNX graph declares. A model that would misclassify
//! because its class list or input spec belongs to another model is refused at load, not
//! discovered on the line.
//!
//! Sources of a model: [`Model::from_bundle`] (a signed bundle, DESIGN.md "Model bundle":
//! signature and hashes verified, then [`Model::from_onnx`] with the manifest's classes,
//! input, name and version, then the bundle's golden check), [`Model::from_onnx`] (a plain
//! `.onnx` plus classes and spec, for development and tests) and [`Model::from_backend`]
//! (anything already loaded).
//!
//! A bundle's golden check is what lets a device choose its backend: with backend `auto`,
//! every backend this build has loads the model, runs the golden inputs, and the fastest one
//! that reproduces the bundle's logits within its tolerance runs the line. A backend that
//! cannot prove itself is never chosen; a bundle without golden inputs runs on tract, the
//! backend the trainer checks every model in.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array4;
use thiserror::Error;
use weld_core::Frame;
use weld_core::manifest::InputSpec;
use weld_core::preprocess::{PreprocessError, preprocess};

use weld_core::bundle::{self, Bundle, BundleError};
use weld_core::manifest::Golden;

use crate::backend::{self, Backend, BackendError, BackendOptions, OnnxInfo};

/// The backend name that lets the golden check choose ([`Model::from_bundle`]).
pub const AUTO_BACKEND: &str = "auto";

/// The default model: a MobileNetV2 that `weld-trainer` trained on synthetic frames, exported,
/// and signed (`models/default/README.md` has the commands that remake it). With the
/// `builtin-model` feature (on by default) it is built in, so that the demo has a model without
/// any file to install.
#[cfg(feature = "builtin-model")]
pub const BUILTIN_BUNDLE: &[u8] = include_bytes!("../../models/default/weld-default.bundle");
/// Where a build without the `builtin-model` feature reads the default bundle instead: the
/// board's package installs it there, which keeps its 3 MB out of the binary (and out of the
/// daemon's resident memory once it is loaded). `WELD_EDGE_BUILTIN_BUNDLE` at build time moves
/// it. The key it must be signed with, [`BUILTIN_KEY`], is built in either way.
#[cfg(not(feature = "builtin-model"))]
pub const BUILTIN_BUNDLE_PATH: &str = match option_env!("WELD_EDGE_BUILTIN_BUNDLE") {
    Some(path) => path,
    None => "/usr/share/weld-edge/weld-default.bundle",
};
/// The public key the built-in bundle is signed with (hex); trusted for that bundle only.
pub const BUILTIN_KEY: &str = include_str!("../../models/default/weld-default.pub");
/// How logs and errors name the built-in bundle.
pub const BUILTIN_NAME: &str = "(built-in default model)";

/// Everything that can go wrong loading a model or classifying a frame with it.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The backend could not load or run the model.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The input spec is not valid (it lists every problem).
    #[error("model {model:?}: the input spec is not valid: {}", problems.join("; "))]
    InvalidSpec {
        /// Model name.
        model: String,
        /// Every problem, each naming its key.
        problems: Vec<String>,
    },
    /// The class list is not usable (fewer than 2, empty or repeated names).
    #[error("model {model:?}: {problem}")]
    InvalidClasses {
        /// Model name.
        model: String,
        /// What is wrong.
        problem: String,
    },
    /// The input spec does not describe the input the ONNX graph declares.
    #[error("model {model:?}: {detail}")]
    InputMismatch {
        /// Model name.
        model: String,
        /// Which dimension differs, with both values.
        detail: String,
    },
    /// The model outputs another number of logits than there are class names.
    #[error(
        "model {model:?} outputs {outputs} logits but {classes} class names were given; the \
         class list must be the model's, in logit order"
    )]
    ClassCount {
        /// Model name.
        model: String,
        /// Width of the model's output.
        outputs: usize,
        /// Number of class names.
        classes: usize,
    },
    /// The model's output on the smoke input, or on a frame, is NaN or infinite.
    #[error("model {model:?} produced non-finite logits {logits:?}")]
    NonFinite {
        /// Model name.
        model: String,
        /// The logits.
        logits: Vec<f32>,
    },
    /// The model needs depth and the frame has none.
    #[error(
        "model {model:?} needs a height channel (input channels {channels}) but the frame has \
         no depth: use an RGB-D camera, or a model trained on RGB only"
    )]
    NoDepth {
        /// Model name.
        model: String,
        /// The spec's channels, e.g. `r,g,b,height`.
        channels: String,
    },
    /// Preprocessing refused the frame.
    #[error("model {model:?}: {source}")]
    Preprocess {
        /// Model name.
        model: String,
        /// Why.
        source: PreprocessError,
    },
    /// The bundle is malformed, unsigned, signed by an untrusted key or changed after signing.
    #[error("{}: {source}", path.display())]
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// What is wrong.
        source: BundleError,
    },
    /// A trusted key could not be read.
    #[error("trusted key: {0}")]
    Key(BundleError),
    /// The model's ONNX could not be written where the backends read it.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The model does not reproduce a golden output of its bundle in this backend.
    #[error(
        "model {model:?} on {backend}: golden input {index} gives logits {deviation:.2e} off \
         the bundle's (relative to its largest logit; at most {tolerance:.1e} is accepted): \
         this runtime does not compute what the model was signed with"
    )]
    Golden {
        /// Model name.
        model: String,
        /// The backend that ran it.
        backend: &'static str,
        /// Which golden input.
        index: usize,
        /// The worst relative difference.
        deviation: f32,
        /// The bundle's tolerance.
        tolerance: f32,
    },
    /// An alternative form of the model may not stand in for it.
    #[error("{bundle}: not used as an alternative: {why}")]
    Alternative {
        /// The alternative bundle.
        bundle: String,
        /// Why.
        why: String,
    },
    /// Backend `auto`, and no backend both loaded the model and passed its golden check.
    #[error("model {model:?}: no backend can run it: {}", trials.join("; "))]
    NoBackend {
        /// Model name.
        model: String,
        /// Each backend tried and why it failed.
        trials: Vec<String>,
    },
}

/// How one backend fared on a bundle: loaded, reproduced the golden logits, and how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendTrial {
    /// The bundle's name and version (an alternative refused before any backend: its path).
    pub bundle: String,
    /// `tract` or `ort` (empty when the bundle was refused before any backend).
    pub backend: String,
    /// Median ms of one inference of the first golden input (of a zero input without
    /// golden inputs), or why the backend cannot run the model.
    pub outcome: Result<TrialPass, String>,
}

/// A backend that passed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrialPass {
    /// Median ms of one inference, one caller.
    pub ms: f64,
    /// Worst relative golden deviation (0 without golden inputs).
    pub deviation: f32,
}

/// A model loaded from a bundle (or the fastest of its forms), and how it was chosen.
#[derive(Debug)]
pub struct BundleModel {
    pub model: Model,
    /// The manifest of the bundle that runs.
    pub manifest: weld_core::manifest::ModelManifest,
    /// The key that signed the primary bundle.
    pub signer: String,
    /// Every (bundle, backend) pair tried.
    pub trials: Vec<BackendTrial>,
    /// Which of `trials` runs.
    pub chosen: usize,
}

/// Inferences timed per backend when choosing one (after the golden run, which warms up).
const TRIAL_RUNS: usize = 5;

/// How to load a model from a plain `.onnx` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelOptions {
    /// Backend name, one of [`backend::available`].
    pub backend: String,
    /// Worker threads that call [`Model::predict`] at the same time.
    pub threads: usize,
    /// The ONNX Runtime library for the `ort` backend; `None` reads `ORT_DYLIB_PATH`.
    pub ort_library: Option<PathBuf>,
    /// Name shown in results and logs; defaults to the file stem.
    pub name: Option<String>,
    /// Version shown in results (`model.version` of the result JSON); defaults to the name.
    pub version: Option<String>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            backend: "tract".into(),
            threads: 1,
            ort_library: None,
            name: None,
            version: None,
        }
    }
}

/// One classification of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The most probable class.
    pub class: String,
    /// Its probability in [0, 1].
    pub confidence: f32,
    /// Softmax of the logits, in the model's class order.
    pub probabilities: Vec<f32>,
    /// Wall time of [`preprocess`], ms.
    pub preprocess_ms: f32,
    /// Wall time of the backend's inference, ms.
    pub infer_ms: f32,
}

/// A loaded, checked classifier. `predict` takes `&self`: share one across worker threads.
#[derive(Debug)]
pub struct Model {
    backend: Box<dyn Backend>,
    classes: Vec<String>,
    input: InputSpec,
    name: String,
    version: String,
}

impl Model {
    /// Loads a plain `.onnx` whose outputs are `classes` (in logit order) and whose input is
    /// made by `input`.
    pub fn from_onnx(
        onnx: &Path,
        classes: Vec<String>,
        input: InputSpec,
        options: &ModelOptions,
    ) -> Result<Model, ModelError> {
        let name = options.name.clone().unwrap_or_else(|| {
            onnx.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let version = options.version.clone().unwrap_or_else(|| name.clone());
        check_spec(&name, &input)?;
        check_classes(&name, &classes)?;
        let shape = input_shape(&input);
        // Compare with the graph's declared input before a runtime sees it: a 4-channel model
        // with an RGB spec otherwise fails deep inside the runtime with a shape error that
        // names neither the spec nor the channels.
        let (_, info) = OnnxInfo::read(onnx)?;
        if let Some(c) = info.channels()
            && c != input.channels.len()
        {
            return Err(ModelError::InputMismatch {
                model: name,
                detail: format!(
                    "the model takes {c} input channels but the input spec lists {} ({})",
                    input.channels.len(),
                    channel_names(&input)
                ),
            });
        }
        info.check_shape(shape)
            .map_err(|detail| ModelError::InputMismatch {
                model: name.clone(),
                detail,
            })?;
        let backend = backend::load_with(
            &options.backend,
            onnx,
            &BackendOptions {
                shape,
                threads: options.threads,
                ort_library: options.ort_library.clone(),
            },
        )?;
        Model::from_backend(backend, classes, input, name, version)
    }

    /// Wraps a loaded backend after the smoke inference and the checks of the module doc.
    pub fn from_backend(
        backend: Box<dyn Backend>,
        classes: Vec<String>,
        input: InputSpec,
        name: String,
        version: String,
    ) -> Result<Model, ModelError> {
        check_spec(&name, &input)?;
        check_classes(&name, &classes)?;
        let shape = input_shape(&input);
        let loaded = backend.input_shape();
        if loaded != shape {
            return Err(ModelError::InputMismatch {
                model: name,
                detail: format!(
                    "the backend was loaded for input {loaded:?} (NCHW, {} channels) but the \
                     input spec makes {shape:?} ({} channels: {})",
                    loaded[1],
                    shape[1],
                    channel_names(&input)
                ),
            });
        }
        let model = Model {
            backend,
            classes,
            input,
            name,
            version,
        };
        // Warm-up: the first run allocates the plan's buffers; it also proves the model
        // runs and has the right width before the model is put on the line.
        model.logits(&Array4::zeros(shape))?;
        Ok(model)
    }

    /// Loads a signed bundle as a device installs it: the layout, the signature against
    /// `trusted` (`.pub` files or hex keys), the hashes, then the model in `options.backend`
    /// with the manifest's classes, input, name and version, then the golden check. With
    /// backend [`AUTO_BACKEND`], every available backend is tried and the fastest that passes
    /// is kept. `options.name` and `options.version` are ignored: the manifest's are used.
    pub fn from_bundle(
        path: &Path,
        trusted: &[String],
        options: &ModelOptions,
    ) -> Result<BundleModel, ModelError> {
        Model::from_bundles(path, &[], trusted, options)
    }

    /// [`Model::from_bundle`] over `primary` and other forms of the same model
    /// (`alternatives`, e.g. its int8 bundle): every (bundle, backend) pair that passes runs
    /// its golden inputs, and the fastest is kept. An alternative is considered only when
    /// [`alternative_problem`] finds nothing wrong with it: same classes and input, made from
    /// `primary`'s ONNX, and within [`MAX_ACCURACY_DROP`] of its held-out accuracy as
    /// measured by the trainer. An alternative that fails is reported in the trials, never
    /// fatal; `primary` failing everywhere is.
    pub fn from_bundles(
        primary: &Path,
        alternatives: &[PathBuf],
        trusted: &[String],
        options: &ModelOptions,
    ) -> Result<BundleModel, ModelError> {
        let keys = trusted
            .iter()
            .map(|t| bundle::read_verifying_key(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ModelError::Key)?;
        let first = read_verified(primary, &keys)?;
        Model::choose(first, alternatives, &keys, options)
    }

    /// The default model (`BUILTIN_BUNDLE` in this binary, or the file at
    /// `BUILTIN_BUNDLE_PATH` in a build without the `builtin-model` feature), checked as any
    /// bundle is: its signature against [`BUILTIN_KEY`], its hashes, and its golden outputs in
    /// each backend (the fastest that passes runs). `weld-edge run` without a config runs it.
    pub fn builtin(options: &ModelOptions) -> Result<BundleModel, ModelError> {
        let key = bundle::read_verifying_key(BUILTIN_KEY.trim()).map_err(ModelError::Key)?;
        #[cfg(feature = "builtin-model")]
        let verified = {
            let bad = |source| ModelError::Bundle {
                path: PathBuf::from(BUILTIN_NAME),
                source,
            };
            let b = Bundle::from_reader(BUILTIN_BUNDLE).map_err(bad)?;
            let signer = b.verify(&[key]).map_err(bad)?;
            (b, bundle::key_id(&signer))
        };
        #[cfg(not(feature = "builtin-model"))]
        let verified = read_verified(Path::new(BUILTIN_BUNDLE_PATH), &[key])?;
        Model::choose(verified, &[], &[key], options)
    }

    /// The fastest (bundle, backend) pair of a verified primary bundle and its alternatives.
    fn choose(
        (first, signer): (Bundle, String),
        alternatives: &[PathBuf],
        keys: &[bundle::VerifyingKey],
        options: &ModelOptions,
    ) -> Result<BundleModel, ModelError> {
        let read = |path: &Path| read_verified(path, keys);
        let mut trials = Vec::new();
        let mut best: Option<Best> = None;
        let mut last_error = None;
        let mut manifests = vec![first.manifest.clone()];
        try_bundle(&first, 0, options, &mut trials, &mut best, &mut last_error)?;
        let primary_trials = trials.len();
        for (i, path) in alternatives.iter().enumerate() {
            let name = path.display().to_string();
            let checked = read(path).and_then(|(b, _)| {
                match alternative_problem(&first.manifest, &b.manifest) {
                    Some(why) => Err(ModelError::Alternative {
                        bundle: name.clone(),
                        why,
                    }),
                    None => Ok(b),
                }
            });
            match checked {
                Ok(b) => {
                    manifests.push(b.manifest.clone());
                    try_bundle(&b, i + 1, options, &mut trials, &mut best, &mut None)?;
                }
                Err(e) => trials.push(BackendTrial {
                    bundle: name,
                    backend: String::new(),
                    outcome: Err(e.to_string()),
                }),
            }
        }
        let best = match (best, last_error) {
            (Some(best), _) => best,
            // One backend asked for by name: its own error.
            (None, Some(e)) if primary_trials == 1 => return Err(e),
            (None, _) => {
                return Err(ModelError::NoBackend {
                    model: first.manifest.name.clone(),
                    trials: trials
                        .iter()
                        .map(|t| match &t.outcome {
                            Err(why) => format!("{} on {}: {why}", t.bundle, t.backend),
                            Ok(_) => format!("{} on {}", t.bundle, t.backend),
                        })
                        .collect(),
                });
            }
        };
        Ok(BundleModel {
            model: best.model,
            manifest: manifests.swap_remove(best.bundle),
            signer,
            trials,
            chosen: best.trial,
        })
    }

    /// Runs every golden input and compares with the bundle's logits; returns the worst
    /// relative deviation, or the first input that is off by more than the tolerance.
    pub fn check_golden(&self, golden: &Golden, inputs: &Array4<f32>) -> Result<f32, ModelError> {
        let mut worst = 0.0f32;
        for i in 0..inputs.shape()[0] {
            let x = inputs.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
            let got = self.logits(&x)?;
            let deviation = golden.deviation(i, &got).unwrap_or(f32::INFINITY);
            if deviation > golden.tolerance {
                return Err(ModelError::Golden {
                    model: self.name.clone(),
                    backend: self.backend.name(),
                    index: i,
                    deviation,
                    tolerance: golden.tolerance,
                });
            }
            worst = worst.max(deviation);
        }
        Ok(worst)
    }

    /// Median ms of `runs` inferences of `input`.
    fn median_ms(&self, input: &Array4<f32>, runs: usize) -> Result<f64, ModelError> {
        let mut t = (0..runs.max(1))
            .map(|_| {
                let start = Instant::now();
                self.logits(input)
                    .map(|_| start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<Vec<f64>, _>>()?;
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }

    /// Classifies one frame.
    pub fn predict(&self, frame: &Frame) -> Result<Prediction, ModelError> {
        if self.input.needs_depth() && frame.depth().is_none() {
            return Err(ModelError::NoDepth {
                model: self.name.clone(),
                channels: channel_names(&self.input),
            });
        }
        let t0 = Instant::now();
        let tensor = preprocess(frame, &self.input).map_err(|source| ModelError::Preprocess {
            model: self.name.clone(),
            source,
        })?;
        let preprocess_ms = ms_since(t0);
        let t1 = Instant::now();
        let logits = self.logits(&tensor)?;
        let infer_ms = ms_since(t1);
        let probabilities = softmax(&logits);
        // `logits` checked every value finite, so there is a maximum.
        let best = argmax(&probabilities).unwrap_or(0);
        Ok(Prediction {
            class: self.classes[best].clone(),
            confidence: probabilities[best],
            probabilities,
            preprocess_ms,
            infer_ms,
        })
    }

    /// The logits of the first batch row of `tensor` (the model's input shape), checked: one
    /// per class, all finite.
    pub fn logits(&self, tensor: &Array4<f32>) -> Result<Vec<f32>, ModelError> {
        let out = self.backend.infer(tensor.view())?;
        if out.ncols() != self.classes.len() || out.nrows() == 0 {
            return Err(ModelError::ClassCount {
                model: self.name.clone(),
                outputs: out.ncols(),
                classes: self.classes.len(),
            });
        }
        let row: Vec<f32> = out.row(0).to_vec();
        if row.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                model: self.name.clone(),
                logits: row,
            });
        }
        Ok(row)
    }

    /// Class names in logit order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The spec that makes the model's input from a frame.
    pub fn input(&self) -> &InputSpec {
        &self.input
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's version, as results report it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The backend that runs it (`tract` or `ort`).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
}

/// The fastest passing model so far: its time, its bundle's place in the list, its trial.
/// Reads a bundle file and checks its signature against `keys` (and its hashes); returns it
/// with the id of the key that signed it.
fn read_verified(
    path: &Path,
    keys: &[bundle::VerifyingKey],
) -> Result<(Bundle, String), ModelError> {
    let bad = |source| ModelError::Bundle {
        path: path.to_owned(),
        source,
    };
    let b = Bundle::read(path).map_err(bad)?;
    let signer = b.verify(keys).map_err(bad)?;
    Ok((b, bundle::key_id(&signer)))
}

struct Best {
    model: Model,
    ms: f64,
    bundle: usize,
    trial: usize,
}

/// Tries `b` on each candidate backend of `options`, recording a trial per backend and keeping
/// the fastest model that passes in `best` (with `index`, the bundle's place in the list).
/// Only a bundle that cannot even be unpacked is an error here.
fn try_bundle(
    b: &Bundle,
    index: usize,
    options: &ModelOptions,
    trials: &mut Vec<BackendTrial>,
    best: &mut Option<Best>,
    last_error: &mut Option<ModelError>,
) -> Result<(), ModelError> {
    let m = &b.manifest;
    let golden = m.golden.as_ref().zip(b.golden_inputs());
    // Backends read the ONNX from a file; the bundle's copy lives as long as the loading.
    let dir = tempfile::tempdir().map_err(|source| ModelError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let onnx = dir.path().join(bundle::MODEL_FILE);
    std::fs::write(&onnx, &b.onnx).map_err(|source| ModelError::Io {
        path: onnx.clone(),
        source,
    })?;
    let candidates: Vec<&str> = if options.backend == AUTO_BACKEND {
        if golden.is_some() {
            backend::available().to_vec()
        } else {
            vec!["tract"]
        }
    } else {
        vec![options.backend.as_str()]
    };
    for kind in candidates {
        let opts = ModelOptions {
            backend: kind.to_string(),
            name: Some(m.name.clone()),
            version: Some(m.version.clone()),
            ..options.clone()
        };
        let tried =
            Model::from_onnx(&onnx, m.classes.clone(), m.input.clone(), &opts).and_then(|model| {
                let deviation = match &golden {
                    Some((g, x)) => model.check_golden(g, x)?,
                    None => 0.0,
                };
                let probe = match &golden {
                    Some((_, x)) => x.slice(ndarray::s![0..1, .., .., ..]).to_owned(),
                    None => Array4::zeros(input_shape(&m.input)),
                };
                let ms = model.median_ms(&probe, TRIAL_RUNS)?;
                Ok((model, TrialPass { ms, deviation }))
            });
        let bundle = format!("{} {}", m.name, m.version);
        match tried {
            Ok((model, pass)) => {
                trials.push(BackendTrial {
                    bundle,
                    backend: kind.to_string(),
                    outcome: Ok(pass),
                });
                if best.as_ref().is_none_or(|b| pass.ms < b.ms) {
                    *best = Some(Best {
                        model,
                        ms: pass.ms,
                        bundle: index,
                        trial: trials.len() - 1,
                    });
                }
            }
            Err(e) => {
                trials.push(BackendTrial {
                    bundle,
                    backend: kind.to_string(),
                    outcome: Err(e.to_string()),
                });
                *last_error = Some(e);
            }
        }
    }
    Ok(())
}

/// Held-out accuracy an alternative form may lose against the model it was made from.
pub const MAX_ACCURACY_DROP: f64 = 0.01;

/// Why `alt` may not stand in for `primary`, if anything: other classes or input, not made
/// from `primary`'s ONNX (its lineage, written by `weld-trainer quantize`, names the sha256 of
/// the f32 model it came from), or no held-out accuracy figures, or more than
/// [`MAX_ACCURACY_DROP`] lost by them.
pub fn alternative_problem(
    primary: &weld_core::manifest::ModelManifest,
    alt: &weld_core::manifest::ModelManifest,
) -> Option<String> {
    if alt.classes != primary.classes {
        return Some(format!(
            "its classes ({}) are not the model's ({})",
            alt.classes.join(", "),
            primary.classes.join(", ")
        ));
    }
    if alt.input != primary.input {
        return Some("its input spec is not the model's".into());
    }
    let from = alt
        .lineage
        .training_config
        .pointer("/quantization/from_onnx_sha256")
        .and_then(|v| v.as_str());
    if !from.is_some_and(|f| f.eq_ignore_ascii_case(&primary.onnx_sha256)) {
        return Some(format!(
            "it was not made from this model's ONNX (sha256 {}; its lineage names {})",
            primary.onnx_sha256,
            from.unwrap_or("none")
        ));
    }
    let figure = |k: &str| alt.metrics.get(k).copied();
    match (
        figure("held_out_accuracy_f32"),
        figure("held_out_accuracy_int8"),
    ) {
        (Some(f32_acc), Some(int8_acc)) if f32_acc - int8_acc <= MAX_ACCURACY_DROP => None,
        (Some(f32_acc), Some(int8_acc)) => Some(format!(
            "it loses {:.1} points of held-out accuracy ({:.1} % against {:.1} %), more than \
             the {:.0} allowed",
            100.0 * (f32_acc - int8_acc),
            100.0 * int8_acc,
            100.0 * f32_acc,
            100.0 * MAX_ACCURACY_DROP
        )),
        _ => Some(
            "its manifest has no held-out accuracy figures (held_out_accuracy_f32 and \
             held_out_accuracy_int8, from `weld-trainer quantize --split`)"
                .into(),
        ),
    }
}

/// `[1, C, H, W]` for a spec whose `size` is `[W, H]`.
fn input_shape(spec: &InputSpec) -> [usize; 4] {
    let [w, h] = spec.size;
    [1, spec.channels.len(), h as usize, w as usize]
}

fn channel_names(spec: &InputSpec) -> String {
    spec.channels
        .iter()
        .map(|c| format!("{c:?}").to_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

fn check_spec(model: &str, input: &InputSpec) -> Result<(), ModelError> {
    let problems = input.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ModelError::InvalidSpec {
            model: model.into(),
            problems,
        })
    }
}

fn check_classes(model: &str, classes: &[String]) -> Result<(), ModelError> {
    let problems = weld_core::manifest::class_list_problems("classes", classes);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ModelError::InvalidClasses {
            model: model.into(),
            problem: problems.join("; "),
        })
    }
}

fn ms_since(t: Instant) -> f32 {
    t.elapsed().as_secs_f32() * 1000.0
}

/// Probabilities from logits. Subtracting the maximum first keeps `exp` from overflowing on
/// large logits (`exp(89)` is already infinite in f32) without changing the result.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Index of the largest value; the first one on ties; `None` when empty or all NaN.
pub fn argmax(values: &[f32]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_bundle_verifies_and_reproduces_its_golden_outputs_on_tract() {
        let options = ModelOptions {
            backend: "tract".into(),
            ..ModelOptions::default()
        };
        let loaded = Model::builtin(&options).unwrap();
        assert_eq!(loaded.model.classes(), weld_core::synth::DEFAULT_CLASSES);
        assert_eq!(loaded.model.name(), "weld-default");
        assert!(matches!(
            loaded.model.input().resize,
            weld_core::manifest::ResizeMode::BeadStrip { .. }
        ));
        assert!(loaded.manifest.golden.is_some());
        assert_eq!(loaded.trials.len(), 1);
        assert!(loaded.trials[0].outcome.is_ok(), "{:?}", loaded.trials);
        // Signed by the key built in beside it.
        assert_eq!(
            loaded.signer,
            bundle::key_id(&bundle::read_verifying_key(BUILTIN_KEY.trim()).unwrap())
        );
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{p:?}");
        assert!(p[0] < p[1] && p[1] < p[2], "{p:?}");
        // By hand: e^-2, e^-1, 1 over their sum 1.503214724.
        let expect = [0.090_030_57, 0.244_728_48, 0.665_240_94];
        for (a, b) in p.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn softmax_is_stable_on_huge_logits() {
        // exp(1000) overflows f32: a naive softmax gives inf/inf = NaN.
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!(p.iter().all(|v| v.is_finite()), "{p:?}");
        assert!(
            (p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-6,
            "{p:?}"
        );
        assert_eq!(p[2], 0.0);
    }

    #[test]
    fn softmax_is_shift_invariant() {
        let a = softmax(&[0.5, -1.0, 2.0]);
        let b = softmax(&[100.5, 99.0, 102.0]);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} {b:?}");
        }
    }

    #[test]
    fn argmax_picks_the_largest_and_the_first_on_ties() {
        assert_eq!(argmax(&[0.1, 0.7, 0.2]), Some(1));
        assert_eq!(argmax(&[0.4, 0.4, 0.2]), Some(0));
        assert_eq!(argmax(&[-3.0, -1.0, -2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, 0.1, 0.3]), Some(2));
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn class_lists_are_checked() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_classes("m", &names(&["good", "porosity"])).is_ok());
        for bad in [vec!["good"], vec!["good", "good"], vec!["good", " "]] {
            let err = check_classes("m", &names(&bad)).unwrap_err();
            assert!(matches!(err, ModelError::InvalidClasses { .. }), "{err}");
        }
    }

    #[test]
    fn input_shape_is_nchw_from_width_height() {
        let mut spec = InputSpec::rgb_height(224);
        spec.size = [320, 240];
        assert_eq!(input_shape(&spec), [1, 4, 240, 320]);
    }
}
