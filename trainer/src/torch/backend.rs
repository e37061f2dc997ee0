//! A trained checkpoint as an inference backend of the daemon's `Model`, so that `eval` judges
//! a checkpoint through the same preprocessing, rules and hybrid policy as a device does.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Result;
use ndarray::{Array2, ArrayView4};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use weld_edge::backend::{Backend, BackendError};
use weld_edge::model::Model;

use crate::torch::models::Net;
use crate::torch::train::{Checkpoint, load_checkpoint};

/// The network of a checkpoint, in evaluation mode.
#[derive(Debug)]
pub struct TchBackend {
    /// libtorch modules are not `Sync`; one forward at a time.
    net: Mutex<(nn::VarStore, Net)>,
    shape: [usize; 4],
}

impl Backend for TchBackend {
    fn name(&self) -> &'static str {
        "tch"
    }

    fn input_shape(&self) -> [usize; 4] {
        self.shape
    }

    fn infer(&self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>, BackendError> {
        let bad = |detail: String| BackendError::Inference {
            backend: "tch",
            detail,
        };
        if input.shape() != self.shape {
            return Err(BackendError::InputShape {
                expected: self.shape,
                got: input.shape().to_vec(),
            });
        }
        let shape: Vec<i64> = input.shape().iter().map(|&d| d as i64).collect();
        let data: Vec<f32> = input.iter().copied().collect();
        let guard = self
            .net
            .lock()
            .map_err(|_| bad("the model's lock is poisoned".into()))?;
        let (vs, net) = &*guard;
        let x = Tensor::from_slice(&data)
            .view(shape.as_slice())
            .to_device(vs.device());
        let logits = tch::no_grad(|| net.forward_t(&x, false))
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let (n, k) = (logits.size()[0] as usize, logits.size()[1] as usize);
        let v: Vec<f32> =
            Vec::try_from(logits.flatten(0, -1)).map_err(|e: tch::TchError| bad(e.to_string()))?;
        Array2::from_shape_vec((n, k), v).map_err(|e| bad(e.to_string()))
    }
}

/// Loads a checkpoint as a `Model` named after its folder and epoch.
pub fn checkpoint_model(path: &Path, device: Device) -> Result<(Checkpoint, Model)> {
    let (c, vs, net) = load_checkpoint(path, device)?;
    let [w, h] = c.input.size;
    let shape = [1, c.input.channels.len(), h as usize, w as usize];
    let backend = TchBackend {
        net: Mutex::new((vs, net)),
        shape,
    };
    let name = format!(
        "{} ({} epoch {})",
        c.architecture.manifest_name(),
        path.display(),
        c.epoch
    );
    let model = Model::from_backend(
        Box::new(backend),
        c.classes.clone(),
        c.input.clone(),
        name,
        format!("epoch-{}", c.epoch),
    )?;
    Ok((c, model))
}
