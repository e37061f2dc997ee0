//! The default backend: tract, pure Rust, no shared library to ship.
//!
//! The model is parsed once, its input fact fixed to the requested NCHW f32 shape, optimised
//! and turned into a runnable plan. A plan is immutable and each `run` spawns its own state,
//! so one plan serves every worker thread without a lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array2, ArrayView4};
use tract_onnx::pb;
use tract_onnx::prelude::{
    DatumType, InferenceFact, InferenceModelExt, IntoRunnable, Tensor, TypedRunnableModel,
    TypedSimpleState, tvec,
};

use super::{Backend, BackendError, BackendOptions, OnnxInfo, OpType};

/// Operator domains whose operators tract may implement. tract looks operators up by type
/// alone, ignoring the domain, so an operator from any other domain that happens to share a
/// standard name (`mydomain::Relu`) would silently run as the standard one: those are refused.
/// `com.microsoft` is here because tract implements some of ONNX Runtime's contrib operators
/// (`Gelu`, `SkipLayerNormalization`, ...) under their own names; the rest of that domain
/// (`QLinearAdd`, `FusedConv`, ...) is not registered and refused by name below.
const TRACT_DOMAINS: [&str; 4] = ["", "ai.onnx", "ai.onnx.ml", "com.microsoft"];

/// A model optimised by tract for one input shape.
pub struct TractBackend {
    plan: Arc<TypedRunnableModel>,
    shape: [usize; 4],
    path: PathBuf,
}

impl std::fmt::Debug for TractBackend {
    // The plan's own Debug prints every node: far too much for a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractBackend")
            .field("path", &self.path)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl TractBackend {
    /// Parses, shape-fixes and optimises `path`. Operators tract lacks are refused by name
    /// before tract starts (its own error for them comes late and names a node, not an op).
    pub fn load(path: &Path, options: &BackendOptions) -> Result<TractBackend, BackendError> {
        let (proto, info) = OnnxInfo::read(path)?;
        TractBackend::from_proto(path, proto, &info, options)
    }

    /// Loads an already decoded model; `path` is for messages and external weight files. The
    /// proto is consumed and dropped as soon as tract has parsed it: its weights would
    /// otherwise stay alive beside tract's own copies while the graph is optimised (~14 MB at
    /// peak for an f32 MobileNetV2).
    pub fn from_proto(
        path: &Path,
        proto: pb::ModelProto,
        info: &OnnxInfo,
        options: &BackendOptions,
    ) -> Result<TractBackend, BackendError> {
        let onnx = tract_onnx::onnx()
            // ORT's quantizer writes value_info with the symbolic batch (`batch`) for every
            // intermediate tensor; with a fixed input fact tract then fails to unify
            // `Sym(batch)` with 1 (NOTES-toolchain.md). value_info is an optional hint in
            // ONNX, and tract infers every shape from the operators anyway.
            .with_ignore_value_info(true);
        let unsupported = unsupported_ops(&info.ops, |op| onnx.op_register.0.contains_key(op));
        if !unsupported.is_empty() {
            return Err(BackendError::UnsupportedOps {
                backend: "tract",
                path: path.to_owned(),
                ops: unsupported,
                detail: None,
            });
        }
        info.check_shape(options.shape)
            .map_err(|detail| BackendError::Invalid {
                path: path.to_owned(),
                detail,
            })?;
        let load_err = |e: anyhow::Error| BackendError::Load {
            backend: "tract",
            path: path.to_owned(),
            // `{:#}` prints the whole chain: tract's outer context names the node and
            // operator that failed, the inner error says why.
            detail: format!("{e:#}"),
        };
        // External weight files are looked up next to the model.
        let dir = path.parent().and_then(Path::to_str);
        let parsed = onnx.parse(&proto, dir).map_err(load_err)?;
        drop(proto);
        if !parsed.unresolved_inputs.is_empty() {
            return Err(BackendError::Invalid {
                path: path.to_owned(),
                detail: format!(
                    "nodes read tensors no node produces: {}",
                    parsed.unresolved_inputs.join(", ")
                ),
            });
        }
        let plan = parsed
            .model
            .with_input_fact(0, InferenceFact::dt_shape(DatumType::F32, options.shape))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(load_err)?;
        Ok(TractBackend {
            plan,
            shape: options.shape,
            path: path.to_owned(),
        })
    }
}

/// Time spent in one node of tract's optimised plan, averaged over the profiled runs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeTime {
    /// The node's name in the optimised plan (tract derives it from the ONNX node's).
    pub node: String,
    /// The operator tract runs there (`Conv`, `EinSum`, `DeconvSum`, ...).
    pub op: String,
    pub ms: f64,
}

impl TractBackend {
    /// Runs `input` `runs` times (after one warm-up run) timing each node of the plan: where
    /// an inference's time goes. The figures include the timer's own cost (well under a
    /// microsecond a node).
    pub fn profile(
        &self,
        input: ArrayView4<'_, f32>,
        runs: usize,
    ) -> Result<Vec<NodeTime>, BackendError> {
        super::check_input(self.shape, &input)?;
        let failed = |e: anyhow::Error| BackendError::Inference {
            backend: "tract",
            detail: format!("{e:#}"),
        };
        let model = self.plan.model();
        let mut total = vec![0.0f64; model.nodes.len()];
        let mut state = TypedSimpleState::new(&self.plan).map_err(failed)?;
        let tensor = Tensor::from(input.as_standard_layout().into_owned());
        for run in 0..=runs.max(1) {
            state
                .run_plan_with_eval(
                    tvec!(tensor.clone().into()),
                    |ctx, op_state, node, inputs| {
                        let start = std::time::Instant::now();
                        let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                        if run > 0 {
                            total[node.id] += start.elapsed().as_secs_f64() * 1e3;
                        }
                        out
                    },
                )
                .map_err(failed)?;
        }
        let runs = runs.max(1) as f64;
        Ok(model
            .nodes
            .iter()
            .map(|n| NodeTime {
                node: n.name.clone(),
                op: n.op.name().to_string(),
                ms: total[n.id] / runs,
            })
            .collect())
    }
}

/// The operators among `ops` that tract cannot run: outside [`TRACT_DOMAINS`], or of a type
/// `registered` does not know.
fn unsupported_ops(ops: &[OpType], registered: impl Fn(&str) -> bool) -> Vec<OpType> {
    ops.iter()
        .filter(|op| !TRACT_DOMAINS.contains(&op.domain.as_str()) || !registered(&op.op_type))
        .cloned()
        .collect()
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn input_shape(&self) -> [usize; 4] {
        self.shape
    }

    fn infer(&self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>, BackendError> {
        super::check_input(self.shape, &input)?;
        let failed = |e: anyhow::Error| BackendError::Inference {
            backend: "tract",
            detail: format!("{e:#}"),
        };
        // tract owns its input tensors: one copy of the 0.6 MB (1x3x224x224 f32) input.
        let tensor = Tensor::from(input.as_standard_layout().into_owned());
        let outputs = self.plan.run(tvec!(tensor.into())).map_err(failed)?;
        let first = outputs
            .first()
            .map(|t| t.to_plain_array_view::<f32>())
            .transpose()
            .map_err(failed)?;
        super::logits("tract", first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(domain: &str, op_type: &str) -> OpType {
        OpType {
            domain: domain.into(),
            op_type: op_type.into(),
        }
    }

    #[test]
    fn unregistered_and_foreign_domain_ops_are_unsupported() {
        let known = |t: &str| ["Conv", "Relu", "Gelu"].contains(&t);
        let ops = [
            op("", "Conv"),
            op("ai.onnx", "Relu"),
            op("com.microsoft", "Gelu"),
            op("com.microsoft", "QLinearAdd"),
            op("com.example", "Relu"),
            op("", "NotAnOp"),
        ];
        assert_eq!(
            unsupported_ops(&ops, known),
            vec![
                op("com.microsoft", "QLinearAdd"),
                op("com.example", "Relu"),
                op("", "NotAnOp")
            ]
        );
    }

    #[test]
    fn tract_registers_none_of_the_ort_quantizer_contrib_ops() {
        // The refusal test of tests/backends.rs relies on this: if tract ever implements
        // QLinearAdd, that test needs another operator.
        let onnx = tract_onnx::onnx();
        assert!(onnx.op_register.0.contains_key("Conv"));
        for op in ["QLinearAdd", "FusedConv", "QLinearGlobalAveragePool"] {
            assert!(!onnx.op_register.0.contains_key(op), "{op}");
        }
    }
}
