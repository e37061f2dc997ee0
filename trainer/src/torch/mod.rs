//! Everything that needs libtorch (the `torch` feature): the networks, the optimizer and the
//! training loop.

pub mod backend;
pub mod export;
pub mod models;
pub mod optim;
pub mod train;

use anyhow::Result;

use crate::cli::{Precision, TrainArgs};
use crate::data::Augment;
use models::Architecture;
use optim::OptimizerKind;
use train::{Distill, RunOptions, TrainConfig};

/// `weld-trainer train`: the command line turned into a config and run.
pub fn train_cmd(a: &TrainArgs) -> Result<()> {
    let architecture = Architecture::parse(&a.arch, a.width)?;
    let (optimizer, lr, wd) = match a.optimizer.as_str() {
        "adamw" => (
            OptimizerKind::Adamw {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            a.lr.unwrap_or(1e-3),
            a.weight_decay.unwrap_or(0.05),
        ),
        "sgd" => (
            OptimizerKind::Sgd {
                momentum: a.momentum,
                nesterov: true,
            },
            a.lr.unwrap_or(0.05),
            a.weight_decay.unwrap_or(1e-4),
        ),
        other => anyhow::bail!("--optimizer {other:?}: expected adamw or sgd"),
    };
    let dev = train::device(&a.device)?;
    let bf16 = match a.precision {
        Precision::Auto => dev.is_cuda(),
        Precision::F32 => false,
        Precision::Bf16 => true,
    };
    let cfg = TrainConfig {
        architecture,
        epochs: a.epochs,
        batch_size: a.batch_size,
        optimizer,
        lr,
        weight_decay: wd,
        warmup_epochs: a.warmup_epochs,
        label_smoothing: a.label_smoothing,
        class_weights: !a.no_class_weights,
        patience: a.patience,
        seed: a.seed,
        augment: if a.no_augment {
            Augment::none()
        } else {
            Augment::default()
        },
        bf16,
        init: a.init.as_ref().map(|p| p.display().to_string()),
        distill: a.teacher.as_ref().map(|t| Distill {
            teacher: t.display().to_string(),
            alpha: a.distill_alpha,
            temperature: a.distill_temperature,
        }),
    };
    let run = RunOptions {
        dataset: a.dataset.clone(),
        split: a.split.clone(),
        out: a.out.clone(),
        input: {
            let mut spec = a.input.spec(a.size);
            if let Some(across_mm) = a.strip_mm {
                spec.resize = weld_core::manifest::ResizeMode::BeadStrip { across_mm };
            }
            spec
        },
        resume: a.resume,
        device: a.device.clone(),
        workers: a
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get().min(8))),
        cache_mb: a.cache_mb,
        allow_mixed_sizes: a.allow_mixed_sizes,
        max_batches: a.max_batches,
        progress: true,
    };
    train::train(cfg, &run)?;
    Ok(())
}
