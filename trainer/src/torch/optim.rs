//! AdamW and SGD with momentum over a `VarStore`, with their state saved beside checkpoints.
//!
//! Written here rather than using tch's `nn::Optimizer` because that wraps libtorch's C++
//! optimizers without access to their moment buffers: a `--resume` would restart the moments
//! and change the run. The update rules are PyTorch's (`torch.optim.AdamW`, `torch.optim.SGD`),
//! and weight decay skips biases and batch-norm parameters (one-dimensional tensors).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, TchError, Tensor};

/// The optimizer and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum OptimizerKind {
    Adamw { beta1: f64, beta2: f64, eps: f64 },
    Sgd { momentum: f64, nesterov: bool },
}

/// An optimizer over the trainable variables of a var store, by name.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    params: Vec<(String, Tensor)>,
    /// Per parameter: AdamW's first and second moments, or SGD's momentum buffer (first only).
    state: BTreeMap<String, (Tensor, Option<Tensor>)>,
    pub step: i64,
}

impl Optimizer {
    pub fn new(vs: &VarStore, kind: OptimizerKind, weight_decay: f64) -> Optimizer {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let state = params
            .iter()
            .map(|(n, p)| {
                let m = p.zeros_like();
                let v = matches!(kind, OptimizerKind::Adamw { .. }).then(|| p.zeros_like());
                (n.clone(), (m, v))
            })
            .collect();
        Optimizer {
            kind,
            weight_decay,
            params,
            state,
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update with learning rate `lr`, from the gradients of the last backward pass.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        tch::no_grad(|| {
            for (name, p) in &mut self.params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let Some((m, v)) = self.state.get_mut(name) else {
                    continue;
                };
                let decay = if p.dim() > 1 { self.weight_decay } else { 0.0 };
                match self.kind {
                    OptimizerKind::Adamw { beta1, beta2, eps } => {
                        if decay > 0.0 {
                            let _ = p.g_mul_scalar_(1.0 - lr * decay);
                        }
                        let _ = m.lerp_(&g, 1.0 - beta1);
                        if let Some(v) = v {
                            let _ = v.g_mul_scalar_(beta2);
                            let _ = v.addcmul_(&(&g * (1.0 - beta2)), &g);
                            let bc1 = 1.0 - beta1.powf(t);
                            let bc2 = 1.0 - beta2.powf(t);
                            let denom = (v.sqrt() / bc2.sqrt()) + eps;
                            let _ = p.addcdiv_(&(&*m * (-lr / bc1)), &denom);
                        }
                    }
                    OptimizerKind::Sgd { momentum, nesterov } => {
                        let g = if decay > 0.0 { &g + &*p * decay } else { g };
                        let d = if momentum > 0.0 {
                            if self.step == 1 {
                                m.copy_(&g);
                            } else {
                                let _ = m.g_mul_scalar_(momentum);
                                let _ = m.g_add_(&g);
                            }
                            if nesterov {
                                &g + &*m * momentum
                            } else {
                                m.shallow_clone()
                            }
                        } else {
                            g
                        };
                        let _ = p.g_add_(&(d * -lr));
                    }
                }
            }
        });
    }

    /// Writes the moment buffers and the step count (safetensors).
    pub fn save(&self, path: &Path) -> Result<(), TchError> {
        let mut named: Vec<(String, Tensor)> = vec![(
            "step".into(),
            Tensor::from_slice(&[self.step]).to_kind(Kind::Int64),
        )];
        for (n, (m, v)) in &self.state {
            named.push((format!("m.{n}"), m.shallow_clone()));
            if let Some(v) = v {
                named.push((format!("v.{n}"), v.shallow_clone()));
            }
        }
        // Written beside and renamed over: a kill leaves the old state or the new one.
        let tmp = path.with_extension("tmp.safetensors");
        Tensor::write_safetensors(&named, &tmp)?;
        std::fs::rename(&tmp, path).map_err(TchError::from)
    }

    /// Reads what [`Optimizer::save`] wrote; every buffer must be there with its shape.
    pub fn load(&mut self, path: &Path) -> Result<(), String> {
        let file: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .into_iter()
            .collect();
        let step = file
            .get("step")
            .ok_or_else(|| format!("{}: no step count", path.display()))?;
        self.step = step.int64_value(&[0]);
        tch::no_grad(|| {
            for (n, (m, v)) in &mut self.state {
                let bufs = [
                    (format!("m.{n}"), Some(&mut *m)),
                    (format!("v.{n}"), v.as_mut()),
                ];
                for (key, buf) in bufs {
                    let Some(buf) = buf else { continue };
                    let src = file
                        .get(&key)
                        .ok_or_else(|| format!("{}: no {key}", path.display()))?;
                    if src.size() != buf.size() {
                        return Err(format!(
                            "{}: {key} is {:?}, the model needs {:?}",
                            path.display(),
                            src.size(),
                            buf.size()
                        ));
                    }
                    buf.copy_(&src.to_device(buf.device()));
                }
            }
            Ok(())
        })
    }
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps, then cosine to 0.
pub fn cosine_lr(base: f64, step: i64, warmup: i64, total: i64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test
    use super::*;
    use tch::Device;
    use tch::nn;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((cosine_lr(1.0, 0, 10, 110) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(1.0, 9, 10, 110) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(1.0, 110, 10, 110).abs() < 1e-12);
    }

    /// Minimises |W x - t|^2; checks against PyTorch's AdamW numbers for the first step and
    /// that both optimizers converge.
    #[test]
    fn adamw_matches_pytorch_first_step_and_both_converge() {
        for kind in [
            OptimizerKind::Adamw {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let w = vs.root().var("w", &[2, 2], nn::Init::Const(0.5));
            let mut opt = Optimizer::new(&vs, kind, 0.01);
            let x = Tensor::from_slice(&[1.0f32, -1.0]).view([2, 1]);
            let t = Tensor::from_slice(&[2.0f32, 0.0]).view([2, 1]);
            let mut first = None;
            for _ in 0..300 {
                opt.zero_grad();
                let loss = (w.matmul(&x) - &t).pow_tensor_scalar(2).sum(Kind::Float);
                loss.backward();
                opt.step(0.05);
                first.get_or_insert_with(|| w.double_value(&[0, 0]));
            }
            if matches!(kind, OptimizerKind::Adamw { .. }) {
                // torch.optim.AdamW(lr=0.05, weight_decay=0.01): first step takes w[0,0] from
                // 0.5 to 0.5 * (1 - 0.05 * 0.01) + 0.05 = 0.54975 (the step is lr * sign).
                assert!((first.unwrap() - 0.54975).abs() < 1e-6, "{first:?}");
            }
            let loss = (w.matmul(&x) - &t).pow_tensor_scalar(2).sum(Kind::Float);
            assert!(loss.double_value(&[]) < 1e-3, "{kind:?}: {loss:?}");
        }
    }

    #[test]
    fn state_round_trips_and_a_wrong_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let kind = OptimizerKind::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], nn::Init::Const(1.0));
        let mut opt = Optimizer::new(&vs, kind, 0.0);
        opt.zero_grad();
        (&w * &w).sum(Kind::Float).backward();
        opt.step(0.1);
        let f = dir.path().join("o.safetensors");
        opt.save(&f).unwrap();
        let mut again = Optimizer::new(&vs, kind, 0.0);
        again.load(&f).unwrap();
        assert_eq!(again.step, 1);
        assert!(
            again.state["w"]
                .0
                .allclose(&opt.state["w"].0, 0.0, 0.0, false)
        );
        let vs2 = nn::VarStore::new(Device::Cpu);
        let _w2 = vs2.root().var("w", &[4], nn::Init::Const(1.0));
        let err = Optimizer::new(&vs2, kind, 0.0).load(&f).unwrap_err();
        assert!(err.contains("m.w is [3], the model needs [4]"), "{err}");
    }
}
