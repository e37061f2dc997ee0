//! Writing ONNX graphs in Rust: the exporter and the quantizer build their models here, with
//! the protobuf types tract-onnx generates (`tract_onnx::pb`) and `prost` to encode them.
//!
//! Written by hand because no maintained Rust crate writes ONNX; this is only a thin layer over
//! the generated types: named initializers, nodes with attributes, and the model wrapper
//! (opset 17, IR version 8).

use tract_onnx::pb;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;

/// The opset every exported model declares.
pub const OPSET: i64 = 17;
/// IR version 8 goes with opset 17 (ONNX's Versioning.md).
pub const IR_VERSION: i64 = 8;
/// The input and output names of every exported classifier.
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "logits";

/// Writes `bytes` to a hidden temporary file in `out`'s folder (made if missing), to be
/// checked before `persist(out)` puts it in place: a model that fails its check is not left
/// behind, and the rename stays on one file system.
pub fn write_beside_unchecked(
    out: &std::path::Path,
    bytes: &[u8],
) -> anyhow::Result<tempfile::NamedTempFile> {
    use anyhow::Context;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".unchecked-")
        .suffix(".onnx")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::fs::write(tmp.path(), bytes)
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    Ok(tmp)
}

/// An attribute value of a node.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// A graph being built: nodes in topological order and their constant inputs.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
}

/// Element types of initializers.
pub trait Element: Copy {
    const DATA_TYPE: DataType;
    fn extend_le(self, out: &mut Vec<u8>);
}

macro_rules! element {
    ($t:ty, $dt:expr) => {
        impl Element for $t {
            const DATA_TYPE: DataType = $dt;
            fn extend_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
element!(f32, DataType::Float);
element!(i8, DataType::Int8);
element!(u8, DataType::Uint8);
element!(i32, DataType::Int32);
element!(i64, DataType::Int64);

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds a constant tensor `name` of shape `dims` (row-major `data`); returns its name.
    pub fn constant<T: Element>(&mut self, name: &str, dims: &[usize], data: &[T]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len(), "{name}");
        let mut raw = Vec::with_capacity(std::mem::size_of_val(data));
        for v in data {
            v.extend_le(&mut raw);
        }
        self.initializers.push(pb::TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: T::DATA_TYPE as i32,
            raw_data: raw,
            ..Default::default()
        });
        name.to_string()
    }

    /// Adds a node `op` named `name` reading `inputs`; its one output is `name` itself.
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
    ) -> String {
        let attribute = attrs
            .iter()
            .map(|(n, a)| {
                let mut p = pb::AttributeProto {
                    name: n.to_string(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(i) => {
                        p.r#type = AttributeType::Int as i32;
                        p.i = *i;
                    }
                    Attr::Ints(v) => {
                        p.r#type = AttributeType::Ints as i32;
                        p.ints = v.clone();
                    }
                    Attr::Float(f) => {
                        p.r#type = AttributeType::Float as i32;
                        p.f = *f;
                    }
                }
                p
            })
            .collect();
        self.nodes.push(pb::NodeProto {
            op_type: op.to_string(),
            name: name.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.to_string()],
            attribute,
            ..Default::default()
        });
        name.to_string()
    }

    /// Adds a node as it is (copied from another graph).
    pub fn push(&mut self, node: pb::NodeProto) {
        self.nodes.push(node);
    }

    /// A 2-D convolution with square `kernel`, symmetric padding and a bias.
    #[allow(clippy::too_many_arguments)] // one argument per Conv attribute
    pub fn conv(
        &mut self,
        name: &str,
        x: &str,
        weight: &str,
        bias: &str,
        kernel: usize,
        stride: usize,
        pad: usize,
        group: usize,
    ) -> String {
        let (k, s, p) = (kernel as i64, stride as i64, pad as i64);
        self.node(
            "Conv",
            name,
            &[x, weight, bias],
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![s, s])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
                ("dilations", Attr::Ints(vec![1, 1])),
                ("group", Attr::Int(group as i64)),
            ],
        )
    }

    /// `min(max(x, 0), 6)`: `Clip` with constant bounds (opset 11+ takes them as inputs).
    pub fn relu6(&mut self, name: &str, x: &str) -> String {
        let lo = self.shared_scalar("clip.min", 0.0);
        let hi = self.shared_scalar("clip.max", 6.0);
        self.node("Clip", name, &[x, &lo, &hi], &[])
    }

    /// A scalar f32 constant shared by every node that names it.
    fn shared_scalar(&mut self, name: &str, v: f32) -> String {
        if !self.initializers.iter().any(|t| t.name == name) {
            self.constant(name, &[], &[v]);
        }
        name.to_string()
    }

    /// The model around the graph: one f32 input [`INPUT`] `[batch, c, h, w]` (batch
    /// symbolic) and one output [`OUTPUT`] `[batch, classes]`, which the caller's last node
    /// must be named.
    pub fn model(
        self,
        (c, h, w): (usize, usize, usize),
        classes: usize,
        doc: &str,
    ) -> pb::ModelProto {
        let nodes = self.nodes;
        let input = value_info(
            INPUT,
            DataType::Float,
            &[Dim::Sym("batch"), Dim::N(c), Dim::N(h), Dim::N(w)],
        );
        let out = value_info(
            OUTPUT,
            DataType::Float,
            &[Dim::Sym("batch"), Dim::N(classes)],
        );
        pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "weld-trainer".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.to_string(),
            graph: Some(pb::GraphProto {
                name: "weld-classifier".into(),
                node: nodes,
                initializer: self.initializers,
                input: vec![input],
                output: vec![out],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// One dimension of a graph input or output.
enum Dim {
    N(usize),
    Sym(&'static str),
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Dim::N(n) => Value::DimValue(*n as i64),
                                Dim::Sym(s) => Value::DimParam(s.to_string()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
