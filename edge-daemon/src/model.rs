//! A classifier ready for the line: a loaded [`Backend`], its class names and the input spec
//! that turns a [`Frame`] into its input.
//!
//! A [`Model`] only exists once it has passed a smoke inference: loading runs the backend once
//! on a zero tensor and checks that the output has one logit per class, and that the spec's
//! channels and size match what the ONNX graph declares. A model that would misclassify
//! because its class list or input spec belongs to another model is refused at load, not
//! discovered on the line.
//!
//! Sources of a model: [`Model::from_onnx`] (a plain `.onnx` plus classes and spec, for
//! development and tests) and [`Model::from_backend`] (anything already loaded). Signed model
//! bundles (DESIGN.md "Model bundle") will add `Model::from_bundle`: verify the signature and
//! the ONNX sha256, then call [`Model::from_onnx`] with the manifest's classes, input, name and
//! version, so the checks here apply to bundles too.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array4;
use thiserror::Error;
use weld_core::Frame;
use weld_core::manifest::InputSpec;
use weld_core::preprocess::{PreprocessError, preprocess};

use crate::backend::{self, Backend, BackendError, BackendOptions, OnnxInfo};

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
}

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

    /// The logits of the first batch row, checked: one per class, all finite.
    fn logits(&self, tensor: &Array4<f32>) -> Result<Vec<f32>, ModelError> {
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
