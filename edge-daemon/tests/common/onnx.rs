//! Small ONNX graphs written with `tract_onnx::pb`, for tests of refusals and of models whose
//! outputs can be worked out by hand.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb;

/// ONNX `TensorProto.DataType.FLOAT`.
pub const FLOAT: i32 = 1;

pub fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: FLOAT,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(Value::DimValue(*d)),
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

pub fn node(domain: &str, op_type: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op_type.into(),
        domain: domain.into(),
        name: format!("{op_type}_0"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Writes a model `x [in_dims] -> nodes -> y [out_dims]` with opset 17 plus `extra_domains`
/// (version 1) to a temp dir.
pub fn write_model(
    dir: &Path,
    nodes: Vec<pb::NodeProto>,
    in_dims: &[i64],
    out_dims: &[i64],
    extra_domains: &[&str],
) -> PathBuf {
    let mut opset_import = vec![pb::OperatorSetIdProto {
        domain: String::new(),
        version: 17,
    }];
    opset_import.extend(extra_domains.iter().map(|d| pb::OperatorSetIdProto {
        domain: d.to_string(),
        version: 1,
    }));
    let model = pb::ModelProto {
        // IR version 8 goes with opset 17 (onnx/docs/Versioning.md).
        ir_version: 8,
        opset_import,
        producer_name: "weld-edge tests".into(),
        graph: Some(pb::GraphProto {
            name: "test".into(),
            node: nodes,
            input: vec![value_info("x", in_dims)],
            output: vec![value_info("y", out_dims)],
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = dir.join("model.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

/// `x [1,C,H,W] -> GlobalAveragePool -> Flatten -> y [1,C]`: a "classifier" whose logits are
/// the channel means, so its predictions can be worked out by hand.
pub fn channel_mean_model(dir: &Path, c: i64, size: i64) -> PathBuf {
    write_model(
        dir,
        vec![
            node("", "GlobalAveragePool", &["x"], &["pooled"]),
            node("", "Flatten", &["pooled"], &["y"]),
        ],
        &[1, c, size, size],
        &[1, c],
        &[],
    )
}
