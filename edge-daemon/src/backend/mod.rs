//! Inference backends behind one trait, chosen by name in [`load`] (the one registry).
//!
//! A backend runs an ONNX classifier on an NCHW f32 tensor and returns the logits. It is
//! loaded, shape-fixed and optimised once; `infer` takes `&self` so the pipeline's worker
//! threads share one instance.
//!
//! Adding a backend is one new file (a `load` function returning a type that implements
//! [`Backend`]) and one arm in [`load_with`] plus its name in [`available`].
//!
//! Before any runtime sees a model, [`OnnxInfo`] reads its graph: the declared input shape
//! (so [`crate::model`] can compare it with the input spec) and every operator with its domain
//! (so a refusal names the operator instead of surfacing a runtime's internal error).

pub mod tract;

#[cfg(feature = "ort")]
pub mod ort;

use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView4};
use thiserror::Error;
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

/// Everything that can go wrong loading or running a model in a backend.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The configured backend name is not one this build knows.
    #[error("unknown inference backend {kind:?}; this build has: {}", available().join(", "))]
    Unknown {
        /// The name asked for.
        kind: String,
    },
    /// The backend exists but this binary was built without its cargo feature.
    #[error(
        "the {kind:?} inference backend is not in this build of weld-edge; rebuild it with \
         `--features {feature}` (this build has: {})",
        available().join(", ")
    )]
    NotCompiled {
        /// The backend asked for.
        kind: &'static str,
        /// The cargo feature that adds it.
        feature: &'static str,
    },
    /// The options make no sense (zero threads, an empty shape).
    #[error("invalid backend options: {0}")]
    Options(String),
    /// The model file could not be read.
    #[error("cannot read ONNX model {}: {source}", path.display())]
    Read {
        /// The model file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a usable ONNX model (not protobuf, no graph, wrong inputs).
    #[error("{} is not a usable ONNX classifier: {detail}", path.display())]
    Invalid {
        /// The model file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The model uses operators the backend does not implement.
    #[error(
        "{backend} cannot run {}: unsupported operator{} {}{}",
        path.display(),
        if ops.len() == 1 { "" } else { "s" },
        ops.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
    )]
    UnsupportedOps {
        /// `tract` or `ort`.
        backend: &'static str,
        /// The model file.
        path: PathBuf,
        /// The operators refused, each once.
        ops: Vec<OpType>,
        /// The runtime's own message, when it gave one.
        detail: Option<String>,
    },
    /// The runtime refused the model for another reason.
    #[error("{backend} could not load {}: {detail}", path.display())]
    Load {
        /// `tract` or `ort`.
        backend: &'static str,
        /// The model file.
        path: PathBuf,
        /// The runtime's error chain.
        detail: String,
    },
    /// No ONNX Runtime library was configured.
    #[error(
        "the ort backend needs the ONNX Runtime shared library: set the config's ort library \
         path or the ORT_DYLIB_PATH environment variable; {ORT_INSTALL_HINT}"
    )]
    OrtLibraryUnset,
    /// The configured ONNX Runtime library does not exist.
    #[error("ONNX Runtime library {} (from {origin}) does not exist; {ORT_INSTALL_HINT}", path.display())]
    OrtLibraryMissing {
        /// The path looked at.
        path: PathBuf,
        /// Where the path came from (config or environment variable).
        origin: &'static str,
    },
    /// The ONNX Runtime library exists but could not be initialised.
    #[error("ONNX Runtime library {} could not be loaded: {detail}", path.display())]
    OrtLibrary {
        /// The library file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// `infer` was given a tensor of another shape than the one the backend was loaded for.
    #[error("input tensor has shape {got:?}, the model was loaded for {expected:?} (NCHW)")]
    InputShape {
        /// The shape fixed at load.
        expected: [usize; 4],
        /// The shape given.
        got: Vec<usize>,
    },
    /// The model's output is not `[batch, classes]` f32.
    #[error("model output has shape {shape:?}; a classifier must output [batch, classes] f32")]
    OutputShape {
        /// The shape the model produced.
        shape: Vec<usize>,
    },
    /// The runtime failed while running the model.
    #[error("{backend} inference failed: {detail}")]
    Inference {
        /// `tract` or `ort`.
        backend: &'static str,
        /// The runtime's error chain.
        detail: String,
    },
}

/// How to get the ONNX Runtime library that `ort` (built with `load-dynamic`) loads; the
/// version is the one `ort 2.0.0-rc.15` with `api-31` is tested against (NOTES-toolchain.md).
pub const ORT_INSTALL_HINT: &str = "get it with `pip install --no-deps --target DIR \
     onnxruntime==1.32.0`; the library is DIR/onnxruntime/capi/libonnxruntime.so.1.32.0";

/// One loaded model in one runtime.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// `tract` or `ort`.
    fn name(&self) -> &'static str;
    /// The NCHW input shape fixed at load; [`Backend::infer`] accepts only this shape.
    fn input_shape(&self) -> [usize; 4];
    /// Logits `[batch, classes]` for an input of the shape given at load time.
    fn infer(&self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>, BackendError>;
}

/// How to load a model: everything but the backend's name and the model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    /// NCHW input shape the model is fixed to (batch first; the daemon uses batch 1).
    pub shape: [usize; 4],
    /// How many threads may call `infer` at the same time (the pipeline's workers). tract
    /// shares one plan whatever the number; ort keeps one session per thread.
    pub threads: usize,
    /// The ONNX Runtime shared library for the `ort` backend; `None` reads `ORT_DYLIB_PATH`.
    /// Ignored by other backends.
    pub ort_library: Option<PathBuf>,
}

impl BackendOptions {
    /// Options for `shape` and `threads`, with the ONNX Runtime library from the environment.
    pub fn new(shape: [usize; 4], threads: usize) -> BackendOptions {
        BackendOptions {
            shape,
            threads,
            ort_library: None,
        }
    }
}

/// The error for an input of another shape than the backend was loaded for, if so.
pub(crate) fn check_input(
    expected: [usize; 4],
    input: &ArrayView4<'_, f32>,
) -> Result<(), BackendError> {
    if input.shape() == expected {
        Ok(())
    } else {
        Err(BackendError::InputShape {
            expected,
            got: input.shape().to_vec(),
        })
    }
}

/// The logits `[batch, classes]` from a backend's first output, or why there are none: the
/// one reading of a classifier's output that every backend shares.
pub(crate) fn logits(
    backend: &'static str,
    first: Option<ndarray::ArrayViewD<'_, f32>>,
) -> Result<Array2<f32>, BackendError> {
    let view = first.ok_or_else(|| BackendError::Inference {
        backend,
        detail: "the model produced no output".into(),
    })?;
    let shape = view.shape().to_vec();
    view.into_dimensionality::<ndarray::Ix2>()
        .map(|v| v.to_owned())
        .map_err(|_| BackendError::OutputShape { shape })
}

/// The backends this build has, by config name.
pub fn available() -> &'static [&'static str] {
    #[cfg(feature = "ort")]
    {
        &["tract", "ort"]
    }
    #[cfg(not(feature = "ort"))]
    {
        &["tract"]
    }
}

/// Loads `onnx` for input shape `shape` (NCHW) in the backend named `kind`, for `threads`
/// concurrent callers; the ONNX Runtime library (backend `ort`) comes from `ORT_DYLIB_PATH`.
pub fn load(
    kind: &str,
    onnx: &Path,
    shape: [usize; 4],
    threads: usize,
) -> Result<Box<dyn Backend>, BackendError> {
    load_with(kind, onnx, &BackendOptions::new(shape, threads))
}

/// Loads `onnx` in the backend named `kind` with all options spelled out.
pub fn load_with(
    kind: &str,
    onnx: &Path,
    options: &BackendOptions,
) -> Result<Box<dyn Backend>, BackendError> {
    if options.shape.contains(&0) {
        return Err(BackendError::Options(format!(
            "input shape {:?} has a zero dimension",
            options.shape
        )));
    }
    if options.threads == 0 {
        return Err(BackendError::Options("threads must be at least 1".into()));
    }
    match kind {
        "tract" => Ok(Box::new(tract::TractBackend::load(onnx, options)?)),
        #[cfg(feature = "ort")]
        "ort" => Ok(Box::new(ort::OrtBackend::load(onnx, options)?)),
        #[cfg(not(feature = "ort"))]
        "ort" => Err(BackendError::NotCompiled {
            kind: "ort",
            feature: "ort",
        }),
        other => Err(BackendError::Unknown { kind: other.into() }),
    }
}

/// An operator as a model names it: domain plus type.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpType {
    /// The operator's domain; empty for the standard `ai.onnx` domain.
    pub domain: String,
    /// The operator's type, e.g. `Conv` or `QLinearAdd`.
    pub op_type: String,
}

impl OpType {
    /// True for the standard ONNX domain (written as `""` or `"ai.onnx"`).
    pub fn is_standard(&self) -> bool {
        self.domain.is_empty() || self.domain == "ai.onnx"
    }
}

impl fmt::Display for OpType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_standard() {
            write!(f, "{}", self.op_type)
        } else {
            write!(f, "{}::{}", self.domain, self.op_type)
        }
    }
}

/// A dimension of a declared ONNX tensor shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named symbol (e.g. `batch`) or an unnamed unknown.
    Symbolic(String),
}

/// What the ONNX graph declares, read without any runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxInfo {
    /// Name of the one graph input.
    pub input_name: String,
    /// Its declared element type (ONNX `TensorProto.DataType`, 1 = float).
    pub input_elem_type: i32,
    /// Its declared shape; empty when the model declares none.
    pub input_dims: Vec<Dim>,
    /// Every operator used, in the main graph, subgraphs and local functions, sorted, each
    /// once.
    pub ops: Vec<OpType>,
}

/// ONNX `TensorProto.DataType.FLOAT` (onnx.proto).
const ONNX_FLOAT: i32 = 1;

impl OnnxInfo {
    /// Reads and decodes `path`.
    pub fn read(path: &Path) -> Result<(pb::ModelProto, OnnxInfo), BackendError> {
        let bytes = std::fs::read(path).map_err(|source| BackendError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |detail: String| BackendError::Invalid {
            path: path.to_owned(),
            detail,
        };
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| invalid(format!("not an ONNX protobuf: {e:#}")))?;
        let info = OnnxInfo::from_proto(&proto).map_err(invalid)?;
        Ok((proto, info))
    }

    /// Summarises a decoded model; the error says what makes it unusable as a classifier.
    pub fn from_proto(proto: &pb::ModelProto) -> Result<OnnxInfo, String> {
        let graph = proto.graph.as_ref().ok_or("the model has no graph")?;
        // Old exporters list initializers among the inputs: those are weights, not inputs.
        let inputs: Vec<&pb::ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(format!(
                "a classifier has exactly one input, this model has {} ({})",
                inputs.len(),
                inputs
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if graph.output.is_empty() {
            return Err("the graph has no output".into());
        }
        let tensor = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => t,
            _ => return Err(format!("input {:?} is not a tensor", input.name)),
        };
        if tensor.elem_type != ONNX_FLOAT {
            return Err(format!(
                "input {:?} has ONNX element type {}; the backends feed float32 (type {ONNX_FLOAT})",
                input.name, tensor.elem_type
            ));
        }
        let input_dims = tensor
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| {
                        use pb::tensor_shape_proto::dimension::Value;
                        match &d.value {
                            Some(Value::DimValue(v)) => Dim::Fixed(*v),
                            Some(Value::DimParam(p)) => Dim::Symbolic(p.clone()),
                            None => Dim::Symbolic(String::new()),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut ops = Vec::new();
        collect_ops(&graph.node, &mut ops);
        for function in &proto.functions {
            collect_ops(&function.node, &mut ops);
        }
        ops.sort();
        ops.dedup();
        Ok(OnnxInfo {
            input_name: input.name.clone(),
            input_elem_type: tensor.elem_type,
            input_dims,
            ops,
        })
    }

    /// The declared channel count (dimension 1 of NCHW), when it is fixed.
    pub fn channels(&self) -> Option<usize> {
        match self.input_dims.get(1) {
            Some(Dim::Fixed(c)) => usize::try_from(*c).ok(),
            _ => None,
        }
    }

    /// Checks `shape` against the declared input shape: rank, and every fixed dimension.
    pub fn check_shape(&self, shape: [usize; 4]) -> Result<(), String> {
        if self.input_dims.is_empty() {
            return Ok(());
        }
        if self.input_dims.len() != 4 {
            return Err(format!(
                "input {:?} has rank {}; an NCHW image input has rank 4",
                self.input_name,
                self.input_dims.len()
            ));
        }
        for (axis, (dim, want)) in self.input_dims.iter().zip(shape).enumerate() {
            if let Dim::Fixed(d) = dim
                && usize::try_from(*d).ok() != Some(want)
            {
                return Err(format!(
                    "input {:?} declares {} = {d} but the input spec asks for {want} \
                     (requested NCHW shape {shape:?})",
                    self.input_name,
                    ["batch", "channels", "height", "width"][axis]
                ));
            }
        }
        Ok(())
    }
}

/// Adds the operators of `nodes` and of every subgraph in their attributes (If/Loop/Scan).
fn collect_ops(nodes: &[pb::NodeProto], out: &mut Vec<OpType>) {
    for node in nodes {
        out.push(OpType {
            domain: node.domain.clone(),
            op_type: node.op_type.clone(),
        });
        for attr in &node.attribute {
            for g in attr.g.iter().chain(&attr.graphs) {
                collect_ops(&g.node, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tract_is_always_available() {
        assert!(available().contains(&"tract"));
    }

    #[test]
    fn unknown_backend_names_the_choices() {
        let err = load("tensorrt", Path::new("model.onnx"), [1, 3, 8, 8], 1).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, BackendError::Unknown { .. }), "{text}");
        assert!(
            text.contains("tensorrt") && text.contains("tract"),
            "{text}"
        );
    }

    #[cfg(not(feature = "ort"))]
    #[test]
    fn ort_without_the_feature_says_how_to_get_it() {
        assert!(!available().contains(&"ort"));
        let err = load("ort", Path::new("model.onnx"), [1, 3, 8, 8], 1).unwrap_err();
        assert!(err.to_string().contains("--features ort"), "{err}");
    }

    #[cfg(feature = "ort")]
    #[test]
    fn missing_ort_library_is_an_error_naming_the_path_not_a_panic() {
        assert!(available().contains(&"ort"));
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libonnxruntime.so.1.32.0");
        let options = BackendOptions {
            ort_library: Some(lib.clone()),
            ..BackendOptions::new([1, 3, 8, 8], 1)
        };
        let err = load_with("ort", Path::new("model.onnx"), &options).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, BackendError::OrtLibraryMissing { .. }),
            "{text}"
        );
        assert!(text.contains(&lib.display().to_string()), "{text}");
        assert!(text.contains("pip install --no-deps"), "{text}");
    }

    #[test]
    fn zero_threads_and_empty_shapes_are_refused() {
        let err = load("tract", Path::new("model.onnx"), [1, 3, 8, 8], 0).unwrap_err();
        assert!(matches!(err, BackendError::Options(_)), "{err}");
        let err = load("tract", Path::new("model.onnx"), [1, 0, 8, 8], 1).unwrap_err();
        assert!(matches!(err, BackendError::Options(_)), "{err}");
    }

    #[test]
    fn op_types_print_their_domain_unless_standard() {
        let op = |domain: &str, op_type: &str| OpType {
            domain: domain.into(),
            op_type: op_type.into(),
        };
        assert_eq!(op("", "Conv").to_string(), "Conv");
        assert_eq!(op("ai.onnx", "Conv").to_string(), "Conv");
        assert_eq!(
            op("com.microsoft", "QLinearAdd").to_string(),
            "com.microsoft::QLinearAdd"
        );
    }

    #[test]
    fn declared_shape_is_checked_on_fixed_dims_only() {
        let info = OnnxInfo {
            input_name: "input".into(),
            input_elem_type: ONNX_FLOAT,
            input_dims: vec![
                Dim::Symbolic("batch".into()),
                Dim::Fixed(3),
                Dim::Fixed(224),
                Dim::Fixed(224),
            ],
            ops: vec![],
        };
        assert_eq!(info.channels(), Some(3));
        assert!(info.check_shape([1, 3, 224, 224]).is_ok());
        assert!(info.check_shape([4, 3, 224, 224]).is_ok());
        let err = info.check_shape([1, 4, 224, 224]).unwrap_err();
        assert!(err.contains("channels = 3") && err.contains('4'), "{err}");
    }
}
