//! `weld-trainer`, the desktop companion of the weld inspection system: dataset tools now;
//! training, evaluation, export, quantization, bundles and push as they land.
//! The binary is a thin `main.rs` over [`cli`].

pub mod cli;
pub mod datasets;
pub mod rules_cmd;
