//! `weld-trainer`, the desktop companion of the weld inspection system: dataset tools, rules
//! calibration and signed model bundles now; training, evaluation, export, quantization and
//! push as they land.
//! The binary is a thin `main.rs` over [`cli`].

pub mod bench_models;
pub mod bundle_cmd;
pub mod card;
pub mod cli;
pub mod data;
pub mod datasets;
pub mod eval;
pub mod fleet;
pub mod fleet_cmd;
pub mod label;
pub mod onnx;
pub mod quantize;
pub mod report;
pub mod rules_cmd;
#[cfg(feature = "torch")]
pub mod torch;
pub mod versions;
