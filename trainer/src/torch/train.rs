//! `weld-trainer train`: fine-tunes MobileNetV2 or ResNet50 on a dataset split.
//!
//! Files in the output folder:
//! - `best.safetensors` + `best.json`: the weights of the epoch with the best validation
//!   macro-F1 and what they are (architecture, classes, input spec, dataset version, config);
//! - `last.safetensors` + `last.optim.safetensors` + `last.json`: the last finished epoch,
//!   what `--resume` continues from;
//! - `metrics.jsonl`: one line of figures per epoch; `split.json`, the split it trained on.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use weld_core::dataset::Dataset;
use weld_core::fsutil::write_atomic;
use weld_core::manifest::InputSpec;
use weld_core::metrics::ConfusionMatrix;

use crate::data::{Augment, EpochOptions, Source};
use crate::datasets::refuse_problems;
use crate::torch::models::{Architecture, Net, load_weights};
use crate::torch::optim::{Optimizer, OptimizerKind, cosine_lr};
use crate::versions::{self, Part, Split};

/// Format tag of checkpoint descriptions.
pub const CHECKPOINT_FORMAT: &str = "weld-trainer-checkpoint/1";

/// Everything that decides what a run learns; recorded in checkpoints and bundle lineage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub architecture: Architecture,
    pub epochs: u64,
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub label_smoothing: f64,
    /// Weight each class by N / (K * n_class) in the loss.
    pub class_weights: bool,
    /// Stop after this many epochs without a better validation macro-F1 (0: never).
    pub patience: u64,
    pub seed: u64,
    pub augment: Augment,
    /// bf16 mixed precision (CUDA only).
    pub bf16: bool,
    /// Weights the run started from (safetensors), if any.
    pub init: Option<String>,
    pub distill: Option<Distill>,
}

/// Knowledge distillation from a trained teacher checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Distill {
    /// The teacher's checkpoint (`.json` or `.safetensors`).
    pub teacher: String,
    /// Share of the loss from the teacher (the rest from the labels).
    pub alpha: f64,
    pub temperature: f64,
}

/// Figures of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub val_macro_f1: f64,
    /// Training images per second, data loading included.
    pub train_images_per_s: f64,
    pub seconds: f64,
}

/// What a checkpoint's weights are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub format: String,
    pub architecture: Architecture,
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub dataset_version: String,
    pub config: TrainConfig,
    /// Epochs finished.
    pub epoch: u64,
    pub step: i64,
    pub best_epoch: u64,
    pub best_macro_f1: f64,
    pub metrics: Option<EpochMetrics>,
}

impl Checkpoint {
    /// Reads a checkpoint from its `.json` or its `.safetensors` path; returns it and the
    /// weights' path.
    pub fn load(path: &Path) -> Result<(Checkpoint, PathBuf)> {
        let json = path.with_extension("json");
        let weights = path.with_extension("safetensors");
        let text = fs::read_to_string(&json)
            .with_context(|| format!("reading the checkpoint description {}", json.display()))?;
        let c: Checkpoint = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a checkpoint description", json.display()))?;
        if c.format != CHECKPOINT_FORMAT {
            bail!(
                "{}: format {:?}, this trainer reads {CHECKPOINT_FORMAT:?}",
                json.display(),
                c.format
            );
        }
        if !weights.is_file() {
            bail!(
                "{}: the checkpoint's weights are missing",
                weights.display()
            );
        }
        Ok((c, weights))
    }

    fn save(&self, vs: &nn::VarStore, stem: &Path) -> Result<()> {
        // Weights first: a description never names weights that are not there.
        let weights = stem.with_extension("safetensors");
        // The extension tells tch the format: the temporary file keeps `.safetensors`.
        let tmp = stem.with_extension("tmp.safetensors");
        vs.save(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &weights)?;
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        write_atomic(&stem.with_extension("json"), text.as_bytes())?;
        Ok(())
    }
}

/// How `train` runs (not what it learns: that is [`TrainConfig`]).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub dataset: PathBuf,
    pub split: Option<PathBuf>,
    pub out: PathBuf,
    /// `rgb`, `rgb-height` or `rgb-height-relief` and the square input size.
    pub input: InputSpec,
    pub resume: bool,
    pub device: String,
    pub workers: usize,
    pub cache_mb: u64,
    pub allow_mixed_sizes: bool,
    /// Stop each epoch after this many batches (throughput measurements).
    pub max_batches: Option<usize>,
    pub progress: bool,
}

pub fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!(
                    "--device cuda: no CUDA device found (is the binary built with --features \
                     cuda, and is libtorch_cuda and the NVIDIA driver there?)"
                );
            }
            Device::Cuda(0)
        }
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) if (i as i64) < tch::Cuda::device_count() => Device::Cuda(i),
            _ => bail!("--device {other:?}: expected auto, cpu, cuda or cuda:N of a present GPU"),
        },
    })
}

/// Checks the dataset before anything trains: problems, classes without training frames,
/// depth for a height input, and frames of different shapes.
fn check_dataset(
    ds: &Dataset,
    train: &[&weld_core::dataset::Sample],
    val: &[&weld_core::dataset::Sample],
    input: &InputSpec,
    allow_mixed_sizes: bool,
) -> Result<()> {
    let mut problems: Vec<String> = ds.validate().iter().map(ToString::to_string).collect();
    for (i, class) in ds.spec.classes.iter().enumerate() {
        if !train.iter().any(|s| s.label == Some(i)) {
            problems.push(format!(
                "class {class:?} has no training frames (add frames to {class}/ or remove it \
                 from dataset.toml)"
            ));
        }
    }
    if val.is_empty() {
        problems.push("the split has no validation frames".into());
    }
    if input.needs_depth() {
        let no_depth: Vec<&str> = train
            .iter()
            .chain(val)
            .filter(|s| s.depth.is_none())
            .map(|s| s.stem.as_str())
            .collect();
        if !no_depth.is_empty() {
            problems.push(format!(
                "--input with height or relief needs depth, but {} frames have none (e.g. {}); train with \
                 --input rgb",
                no_depth.len(),
                no_depth[0]
            ));
        }
    }
    if problems.is_empty() && !allow_mixed_sizes {
        let mut sizes: BTreeMap<(u32, u32), usize> = BTreeMap::new();
        for s in train.iter().chain(val) {
            let (w, h) = image::image_dimensions(&s.rgb)
                .with_context(|| format!("reading {}", s.rgb.display()))?;
            *sizes.entry((w, h)).or_default() += 1;
        }
        let aspects: Vec<f64> = sizes
            .keys()
            .map(|(w, h)| f64::from(*w) / f64::from(*h))
            .collect();
        let (lo, hi) = aspects
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), a| (lo.min(*a), hi.max(*a)));
        if hi / lo > 1.05 {
            let list: Vec<String> = sizes
                .iter()
                .map(|((w, h), n)| format!("{n} of {w}x{h}"))
                .collect();
            problems.push(format!(
                "frames of different shapes ({}): stretched to one input size they would be \
                 distorted differently; crop them to one shape, or pass --allow-mixed-sizes",
                list.join(", ")
            ));
        }
    }
    refuse_problems(
        &problems,
        &format!("with {}; nothing was trained", ds.root.display()),
    )
}

/// Makes an `[n, C, H, W]` input tensor on the device (channels-last on CUDA, bf16 when asked).
fn to_input(x: &[f32], n: usize, spec: &InputSpec, dev: Device, bf16: bool) -> Tensor {
    let [w, h] = spec.size;
    let t = Tensor::from_slice(x)
        .view([
            n as i64,
            spec.channels.len() as i64,
            i64::from(h),
            i64::from(w),
        ])
        .to_device(dev);
    let t = if bf16 { t.to_kind(Kind::BFloat16) } else { t };
    if dev.is_cuda() { channels_last(&t) } else { t }
}

/// The same values with NHWC strides: what cuDNN's fastest kernels want.
fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Cross-entropy with label smoothing and per-class weights (PyTorch's definition).
fn loss_fn(logits: &Tensor, y: &Tensor, weights: &Tensor, smoothing: f64) -> Tensor {
    let logp = logits.log_softmax(-1, Kind::Float);
    let nll = -logp.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
    let smooth = -logp.mean_dim(-1, false, Kind::Float);
    let per = nll * (1.0 - smoothing) + smooth * smoothing;
    let w = weights.index_select(0, y);
    (per * &w).sum(Kind::Float) / w.sum(Kind::Float)
}

/// KL divergence of the student from the teacher at temperature `t`, times t² (Hinton et al.).
fn distill_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Tensor {
    let s = (student / t).log_softmax(-1, Kind::Float);
    let tl = (teacher / t).log_softmax(-1, Kind::Float);
    (tl.exp() * (tl - s))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
        * (t * t)
}

/// Training frames whose statistics set batch norm before each validation.
const PRECISE_BN_IMAGES: usize = 512;

/// Batch-norm momentum of every layer (tch's default, which the networks use).
const BN_MOMENTUM: f64 = 0.1;

/// Recomputes every batch norm's running statistics for the current weights ("precise BN",
/// Wu & Johnson 2021): the mean of the per-batch statistics over up to `images` training
/// frames, without augmentation, instead of the moving average the updates leave behind.
///
/// Early in training, and in short runs, the weights move faster than the moving average
/// follows, and the network in evaluation mode is a different network from the one trained
/// (measured here: 99% in training mode and 50% in evaluation mode on the same frames after
/// 50 steps). The per-batch statistics are recovered from the moving-average update
/// `r' = (1 - m) r + m b` that libtorch applies.
pub fn precise_bn(
    net: &Net,
    vs: &nn::VarStore,
    src: &Arc<Source>,
    images: usize,
    batch_size: usize,
    workers: usize,
) -> Result<()> {
    let mut stats: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.ends_with(".running_mean") || n.ends_with(".running_var"))
        .collect();
    if stats.is_empty() || src.is_empty() {
        return Ok(());
    }
    stats.sort_by(|a, b| a.0.cmp(&b.0));
    let mut sums: Vec<Tensor> = stats.iter().map(|(_, t)| t.zeros_like()).collect();
    let batch_size = batch_size.min(src.len()).max(2);
    let batches = src.epoch(EpochOptions {
        epoch: 0,
        seed: 0x5eed,
        batch_size,
        shuffle: true,
        drop_last: true,
        augment: None,
        workers,
        prefetch: 2,
    });
    let wanted = images.div_ceil(batch_size).max(1);
    let mut n = 0;
    tch::no_grad(|| -> Result<()> {
        for b in batches.take(wanted) {
            let b = b?;
            let before: Vec<Tensor> = stats.iter().map(|(_, t)| t.copy()).collect();
            let x = to_input(&b.x, b.n, src.spec(), vs.device(), false);
            let _ = net.forward_t(&x, true);
            for ((sum, (_, now)), old) in sums.iter_mut().zip(&stats).zip(&before) {
                let batch = (now - old * (1.0 - BN_MOMENTUM)) / BN_MOMENTUM;
                *sum += batch;
            }
            n += 1;
        }
        for (sum, (_, t)) in sums.iter().zip(stats.iter_mut()) {
            t.copy_(&(sum / n as f64));
        }
        Ok(())
    })
}

/// Runs the network over a source without augmentation: the confusion matrix and mean loss.
pub fn evaluate(
    net: &Net,
    src: &Arc<Source>,
    classes: &[String],
    dev: Device,
    bf16: bool,
    batch_size: usize,
    workers: usize,
) -> Result<(ConfusionMatrix, f64)> {
    let mut cm = ConfusionMatrix::new(classes);
    let mut loss_sum = 0.0;
    let ones = Tensor::ones([classes.len() as i64], (Kind::Float, dev));
    let batches = src.epoch(EpochOptions {
        epoch: 0,
        seed: 0,
        batch_size,
        shuffle: false,
        drop_last: false,
        augment: None,
        workers,
        prefetch: 2,
    });
    tch::no_grad(|| -> Result<()> {
        for b in batches {
            let b = b?;
            let x = to_input(&b.x, b.n, src.spec(), dev, bf16);
            let y = Tensor::from_slice(&b.y).to_device(dev);
            let logits = net.forward_t(&x, false).to_kind(Kind::Float);
            loss_sum += loss_fn(&logits, &y, &ones, 0.0).double_value(&[]) * b.n as f64;
            let pred = logits.argmax(-1, false).to_device(Device::Cpu);
            for (i, &truth) in b.y.iter().enumerate() {
                let k = pred.int64_value(&[i as i64]) as usize;
                cm.add(&classes[truth as usize], &classes[k]);
            }
        }
        Ok(())
    })?;
    let n = cm.total().max(1) as f64;
    Ok((cm, loss_sum / n))
}

/// Builds a network and loads a checkpoint's weights into it (for the teacher and `eval`).
pub fn load_checkpoint(path: &Path, dev: Device) -> Result<(Checkpoint, nn::VarStore, Net)> {
    let (c, weights) = Checkpoint::load(path)?;
    let mut vs = nn::VarStore::new(dev);
    let net = Net::new(
        &vs.root(),
        c.architecture,
        c.input.channels.len() as i64,
        c.classes.len() as i64,
    );
    vs.load(&weights)
        .with_context(|| format!("loading {}", weights.display()))?;
    vs.freeze();
    Ok((c, vs, net))
}

/// `weld-trainer train`.
pub fn train(cfg: TrainConfig, run: &RunOptions) -> Result<Checkpoint> {
    let ds = Dataset::open(&run.dataset)?;
    let version = versions::version(&ds)?;
    let classes = ds.spec.classes.clone();
    let last = run.out.join("last");
    let resumed = if run.resume {
        let (c, _) = Checkpoint::load(&last).context("--resume")?;
        if c.classes != classes {
            bail!(
                "--resume: the checkpoint's classes ({}) disagree with the dataset's ({})",
                c.classes.join(", "),
                classes.join(", ")
            );
        }
        if c.dataset_version != version {
            bail!(
                "--resume: the checkpoint was trained on dataset version {}, the dataset is now \
                 {}",
                versions::short(&c.dataset_version),
                versions::short(&version)
            );
        }
        if c.config != cfg || c.input != run.input {
            bail!(
                "--resume: the training settings differ from the checkpoint's ({}); resume \
                 with the same settings",
                last.with_extension("json").display()
            );
        }
        Some(c)
    } else {
        if last.with_extension("json").is_file() {
            bail!(
                "{}: a run is already here; pass --resume to continue it or choose another --out",
                run.out.display()
            );
        }
        None
    };

    let split = match &run.split {
        Some(p) => Split::load(p)?,
        None => {
            let p = run.out.join("split.json");
            if p.is_file() {
                Split::load(&p)?
            } else {
                Split::make(&ds, &version, 0.2, 0.0, cfg.seed)?
            }
        }
    };
    let train_s = split.samples(&ds, &version, Part::Train)?;
    let val_s = split.samples(&ds, &version, Part::Val)?;
    check_dataset(&ds, &train_s, &val_s, &run.input, run.allow_mixed_sizes)?;
    let k = classes.len() as i64;

    let dev = device(&run.device)?;
    let bf16 = cfg.bf16 && dev.is_cuda();
    if cfg.bf16 && !bf16 {
        eprintln!("note: --bf16 applies on CUDA only; training in f32 on the CPU");
    }
    tch::manual_seed(cfg.seed as i64);

    let teacher = match &cfg.distill {
        Some(d) => {
            let (c, _vs, net) = load_checkpoint(Path::new(&d.teacher), dev)
                .with_context(|| format!("loading the teacher {}", d.teacher))?;
            if c.classes != classes {
                bail!(
                    "the teacher's classes ({}) disagree with the dataset's ({})",
                    c.classes.join(", "),
                    classes.join(", ")
                );
            }
            if c.input != run.input {
                bail!("the teacher's input spec differs from the student's (--input, --size)");
            }
            Some((_vs, net))
        }
        None => None,
    };

    fs::create_dir_all(&run.out).with_context(|| format!("creating {}", run.out.display()))?;
    let split_path = run.out.join("split.json");
    // The split goes beside the checkpoints, whichever file it came from: `eval` and a
    // `--resume` find it there.
    if !split_path.is_file() {
        split.save(&split_path)?;
    }

    let mut vs = nn::VarStore::new(dev);
    let net = Net::new(
        &vs.root(),
        cfg.architecture,
        run.input.channels.len() as i64,
        k,
    );
    if let Some(init) = &cfg.init
        && resumed.is_none()
    {
        let r = load_weights(&vs, Path::new(init))?;
        println!(
            "started from {init}: {} tensors loaded, {} widened to 4 channels, {} of another \
             shape kept new, {} not in the file",
            r.loaded,
            r.widened.len(),
            r.skipped.len(),
            r.missing.len()
        );
    }
    // Channels-last weights before the optimizer makes its buffers in their layout.
    if dev.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let cl = channels_last(&v);
                tch::no_grad(|| v.set_data(&cl));
            }
        }
    }
    let mut opt = Optimizer::new(&vs, cfg.optimizer, cfg.weight_decay);
    let (mut start_epoch, mut best_epoch, mut best_f1) = (0, 0, -1.0);
    if let Some(c) = &resumed {
        vs.load(last.with_extension("safetensors"))
            .context("--resume: loading the weights")?;
        opt.load(&run.out.join("last.optim.safetensors"))
            .map_err(anyhow::Error::msg)
            .context("--resume: loading the optimizer state")?;
        if opt.step != c.step {
            bail!(
                "--resume: the optimizer state is of step {} but the checkpoint of step {} (the \
                 run stopped while saving); resume from {} is not possible, start a new run",
                opt.step,
                c.step,
                run.out.display()
            );
        }
        (start_epoch, best_epoch, best_f1) = (c.epoch, c.best_epoch, c.best_macro_f1);
        println!(
            "resuming after epoch {} (best macro-F1 {best_f1:.4} at epoch {best_epoch})",
            c.epoch
        );
    }

    let cache = run.cache_mb * 1024 * 1024;
    let train_src = Arc::new(Source::new(
        ds.clone(),
        train_s,
        run.input.clone(),
        cache / 2,
    ));
    let val_src = Arc::new(Source::new(ds.clone(), val_s, run.input.clone(), cache / 2));
    let mut counts = vec![0usize; classes.len()];
    for l in train_src.labels() {
        counts[l as usize] += 1;
    }
    let weights: Vec<f32> = counts
        .iter()
        .map(|&n| {
            if cfg.class_weights && n > 0 {
                train_src.len() as f32 / (classes.len() as f32 * n as f32)
            } else {
                1.0
            }
        })
        .collect();
    let weights = Tensor::from_slice(&weights).to_device(dev);

    let per_epoch = {
        let full = train_src.len() / cfg.batch_size.max(1);
        let full = if full == 0 { 1 } else { full };
        run.max_batches.map_or(full, |m| m.min(full))
    };
    let total_steps = per_epoch as i64 * cfg.epochs as i64;
    let warmup = (cfg.warmup_epochs * per_epoch as f64).round() as i64;
    println!(
        "training {} on {} ({} train / {} val frames, {} classes, input {}x{}x{}) on {dev:?}{}",
        cfg.architecture.manifest_name(),
        run.dataset.display(),
        train_src.len(),
        val_src.len(),
        k,
        run.input.channels.len(),
        run.input.size[1],
        run.input.size[0],
        if bf16 { ", bf16" } else { "" }
    );
    let metrics_path = run.out.join("metrics.jsonl");
    if resumed.is_some() && metrics_path.is_file() {
        // Epochs after the checkpoint (a run killed between its checkpoint and its metrics
        // line, or metrics of epochs whose checkpoint was lost) are run again: drop them.
        let text = fs::read_to_string(&metrics_path)?;
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<EpochMetrics>(l).is_ok_and(|m| m.epoch <= start_epoch)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&metrics_path, kept.as_bytes())?;
    }
    let mut metrics_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)?;
    let mut checkpoint = resumed.clone();

    for epoch in start_epoch..cfg.epochs {
        let started = Instant::now();
        // libtorch's generator (dropout) restarts from (seed, epoch): a resumed run draws
        // what the straight run drew.
        tch::manual_seed((cfg.seed ^ epoch.wrapping_mul(0x9E37_79B9)) as i64);
        let bar = if run.progress {
            let b = ProgressBar::new(per_epoch as u64);
            if let Ok(style) = ProgressStyle::with_template(
                "epoch {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                b.set_style(style);
            }
            b.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
            b
        } else {
            ProgressBar::hidden()
        };
        let batches = train_src.epoch(EpochOptions {
            epoch,
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            shuffle: true,
            // A last batch of one frame breaks batch norm; drop the remainder when there is
            // more than one batch.
            drop_last: train_src.len() >= cfg.batch_size,
            augment: Some(cfg.augment),
            workers: run.workers,
            prefetch: run.workers * 2,
        });
        let (mut loss_sum, mut right, mut seen) = (0.0f64, 0i64, 0usize);
        let mut lr = cfg.lr;
        let t0 = Instant::now();
        for b in batches.take(per_epoch) {
            let b = b?;
            lr = cosine_lr(cfg.lr, opt.step, warmup, total_steps);
            let x = to_input(&b.x, b.n, &run.input, dev, bf16);
            let y = Tensor::from_slice(&b.y).to_device(dev);
            let logits = net.forward_t(&x, true).to_kind(Kind::Float);
            let mut loss = loss_fn(&logits, &y, &weights, cfg.label_smoothing);
            if let (Some(d), Some((_, t))) = (&cfg.distill, &teacher) {
                let tl = tch::no_grad(|| t.forward_t(&x, false).to_kind(Kind::Float));
                loss = loss * (1.0 - d.alpha) + distill_loss(&logits, &tl, d.temperature) * d.alpha;
            }
            opt.zero_grad();
            loss.backward();
            opt.step(lr);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                bail!(
                    "the loss became {l} at epoch {} step {}: lower --lr (now {})",
                    epoch + 1,
                    opt.step,
                    cfg.lr
                );
            }
            loss_sum += l * b.n as f64;
            right += logits
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            seen += b.n;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.1}%",
                loss_sum / seen as f64,
                100.0 * right as f64 / seen as f64
            ));
        }
        let train_time = t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        precise_bn(
            &net,
            &vs,
            &train_src,
            PRECISE_BN_IMAGES,
            cfg.batch_size,
            run.workers,
        )?;
        let (cm, val_loss) = evaluate(
            &net,
            &val_src,
            &classes,
            dev,
            bf16,
            cfg.batch_size,
            run.workers,
        )?;
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: right as f64 / seen.max(1) as f64,
            val_loss,
            val_accuracy: cm.accuracy(),
            val_macro_f1: cm.macro_f1(),
            train_images_per_s: seen as f64 / train_time.max(1e-9),
            seconds: started.elapsed().as_secs_f64(),
        };
        let improved = m.val_macro_f1 > best_f1;
        if improved {
            best_f1 = m.val_macro_f1;
            best_epoch = epoch + 1;
        }
        let c = Checkpoint {
            format: CHECKPOINT_FORMAT.into(),
            architecture: cfg.architecture,
            classes: classes.clone(),
            input: run.input.clone(),
            dataset_version: version.clone(),
            config: cfg.clone(),
            epoch: epoch + 1,
            step: opt.step,
            best_epoch,
            best_macro_f1: best_f1,
            metrics: Some(m.clone()),
        };
        // Checkpoint first, then the metrics line and the report: what is reported is saved.
        if improved {
            c.save(&vs, &run.out.join("best"))?;
        }
        opt.save(&run.out.join("last.optim.safetensors"))?;
        c.save(&vs, &last)?;
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
        println!(
            "epoch {:>3}/{}: loss {:.4} acc {:.1}% | val loss {:.4} acc {:.1}% macro-F1 {:.4}{} | {:.0} img/s, {:.1} s",
            epoch + 1,
            cfg.epochs,
            m.train_loss,
            100.0 * m.train_accuracy,
            m.val_loss,
            100.0 * m.val_accuracy,
            m.val_macro_f1,
            if improved { " (best)" } else { "" },
            m.train_images_per_s,
            m.seconds
        );
        checkpoint = Some(c);
        if cfg.patience > 0 && epoch + 1 - best_epoch >= cfg.patience {
            println!(
                "stopping early: no better validation macro-F1 for {} epochs (best {best_f1:.4} \
                 at epoch {best_epoch})",
                cfg.patience
            );
            break;
        }
    }
    let c = checkpoint.context("no epoch was run (is --epochs 0, or already reached?)")?;
    println!(
        "best: epoch {best_epoch}, validation macro-F1 {best_f1:.4}; weights in {}",
        run.out.join("best.safetensors").display()
    );
    Ok(c)
}
