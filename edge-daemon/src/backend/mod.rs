//! Inference backends behind one trait, chosen by name in [`load`] (the one registry).
//!
//! A backend runs an ONNX classifier on an NCHW f32 tensor and returns the logits. It is
//! loaded, shape-fixed and optimised once; `infer` takes `&self` so the pipeline's worker
//! threads share one instance.

use std::path::Path;

use ndarray::{Array2, ArrayView4};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {}

/// One loaded model in one runtime.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// `tract` or `ort`.
    fn name(&self) -> &'static str;
    /// Logits `[batch, classes]` for an input of the shape given at load time.
    fn infer(&self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>, BackendError>;
}

/// The backends this build has, by config name.
pub fn available() -> &'static [&'static str] {
    &["tract"]
}

/// Loads `onnx` for input shape `shape` (NCHW) in the backend named `kind`.
pub fn load(
    _kind: &str,
    _onnx: &Path,
    _shape: [usize; 4],
    _threads: usize,
) -> Result<Box<dyn Backend>, BackendError> {
    todo!()
}
