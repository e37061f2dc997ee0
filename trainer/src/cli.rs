//! Command line of `weld-trainer` (DESIGN.md "Command lines").

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use weld_core::manifest::{InputSpec, Quantization};
use weld_core::rules::RulesConfig;

use crate::bundle_cmd::{self, BundleSpec};
use crate::datasets;
use crate::eval::{self, EvalOptions, PartArg};
use crate::rules_cmd::{self, CalibrateOptions};
use crate::versions::ImportOptions;

#[derive(Debug, Parser)]
#[command(
    name = "weld-trainer",
    version,
    about = "Datasets and models for weld inspection"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make, check and look at datasets.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Fine-tune MobileNetV2 or ResNet50 on a dataset (needs the `torch` feature).
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint (torch feature) or a signed bundle on a dataset: the model alone,
    /// the rules and the hybrid policy; writes report.json, report.html and PNG plots.
    Eval(EvalArgs),
    /// Label a dataset's unlabeled/ frames and review its labels on a local web page
    /// (127.0.0.1), keyboard first, with the rules' findings and the model's pre-labels.
    Label(LabelArgs),
    /// Write a checkpoint's network as ONNX (batch norm folded) and its model card beside it
    /// (`model.onnx` -> `model.json`); checked in tract against the checkpoint first (needs
    /// the `torch` feature).
    Export(ExportArgs),
    /// Post-training int8 of an exported f32 model, calibrated on a dataset, in the form tract
    /// runs fastest; checked against the f32 model on held-out frames, figures in its card.
    Quantize(QuantizeArgs),
    /// Measure models side by side on one machine: latency under each backend with one and
    /// more caller threads, held-out accuracy, agreement with the first model, size; with
    /// `--profile`, tract's time per operator.
    BenchModels(BenchModelsArgs),
    /// Tune the heuristic detector.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Signing keys for model bundles.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Sign an ONNX model into a bundle (checked to load and fit first), or `bundle verify`.
    /// Classes, input, architecture, precision, figures and lineage come from the model card
    /// beside the ONNX (written by `export` and `quantize`) or, without one, from the flags.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Bundle {
        #[command(subcommand)]
        command: Option<BundleCommand>,
        #[command(flatten)]
        create: Option<BundleArgs>,
    },
    /// Push a signed bundle to the devices of a fleet file, many at a time: each device checks
    /// it (signature, hashes, golden outputs) before it runs it. Prints one line per device;
    /// exit code 1 when any device did not take it.
    Push(PushArgs),
    /// The devices of a fleet file.
    #[command(subcommand)]
    Devices(DevicesCommand),
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The bundle (`weld-trainer bundle` writes it).
    pub bundle: PathBuf,
    /// The fleet file: `[[device]]` entries with `name`, `url` and a token (README "Fleet").
    #[arg(long)]
    pub devices: PathBuf,
    /// Install only; run it later with the device's `models/{version}/activate`.
    #[arg(long)]
    pub no_activate: bool,
    /// Devices pushed to at the same time (1..=64).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Install on the first device alone and run the bundle there in shadow this many seconds,
    /// on every frame its model decides; push to the rest only if it agreed on at least
    /// --min-agreement of them and failed on none (it is then promoted there first).
    #[arg(long, value_name = "SECONDS")]
    pub canary: Option<u64>,
    /// The canary's agreement needed to go on, 0..=1.
    #[arg(long, default_value_t = 0.9)]
    pub min_agreement: f64,
    /// Also write the per-device report as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// State, running model, installed models, camera and frame rate of every device.
    Status {
        #[arg(long)]
        devices: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new ed25519 key pair: OUT (the secret, readable by its owner only) and OUT with
    /// the extension `.pub` (the public key devices trust).
    New {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Check a bundle as a device would before installing it: layout, manifest, signature,
    /// ONNX hash, and that the model loads and fits its manifest. Exit code 1 names the problem.
    Verify {
        bundle: PathBuf,
        /// A trusted public key: a `.pub` file or 64 hex digits (repeatable).
        #[arg(long, required = true)]
        trusted: Vec<String>,
        /// Inference backend to load the model on; `auto` tries each this build has and
        /// reports which a device would pick.
        #[arg(long, default_value = "auto")]
        backend: String,
    },
}

/// Precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// bf16 mixed precision on CUDA, f32 on the CPU.
    Auto,
    F32,
    Bf16,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The dataset folder.
    pub dataset: PathBuf,
    /// Output folder: checkpoints, metrics.jsonl, split.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Split file (from `dataset split`); default: OUT/split.json, made here if missing
    /// (20% of each class for validation, by group).
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// mobilenet_v2 or resnet50.
    #[arg(long, default_value = "mobilenet_v2")]
    pub arch: String,
    /// MobileNetV2's width multiplier.
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
    #[arg(long, value_enum, default_value = "rgb-height")]
    pub input: InputKind,
    /// Input size in pixels: N (square) or WIDTHxHEIGHT.
    #[arg(long, default_value = "224", value_parser = parse_input_size)]
    pub size: [u32; 2],
    /// Sample a strip of plate along the weld bead, this many mm across it over the input's
    /// height (found in the depth; the same scale along the bead), instead of stretching the
    /// whole frame: every frame shows its bead level through the middle at one scale.
    #[arg(long)]
    pub strip_mm: Option<f32>,
    #[arg(long, default_value_t = 30)]
    pub epochs: u64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// adamw or sgd (Nesterov momentum).
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Peak learning rate (default: 1e-3 for adamw, 0.05 for sgd).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Decoupled weight decay (default: 0.05 for adamw, 1e-4 for sgd); not on biases and
    /// batch norm.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Linear warm-up before the cosine decay, in epochs.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_epochs: f64,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Do not weight classes by their rarity in the loss.
    #[arg(long)]
    pub no_class_weights: bool,
    /// Stop after this many epochs without a better validation macro-F1 (0: never).
    #[arg(long, default_value_t = 8)]
    pub patience: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Train without augmentation.
    #[arg(long)]
    pub no_augment: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: Precision,
    /// Start from these weights (safetensors with torchvision's names).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Distil from this trained checkpoint (e.g. a ResNet50's best.json).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Share of the loss from the teacher.
    #[arg(long, default_value_t = 0.5)]
    pub distill_alpha: f64,
    #[arg(long, default_value_t = 4.0)]
    pub distill_temperature: f64,
    /// Continue the run in OUT from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Data loading threads (default: the CPU count, at most 8).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Keep preprocessed frames in memory when they fit in this many MiB.
    #[arg(long, default_value_t = 2048)]
    pub cache_mb: u64,
    /// Accept frames of different aspect ratios (they are stretched to the input size).
    #[arg(long)]
    pub allow_mixed_sizes: bool,
    /// Stop each epoch after this many batches (for throughput measurements).
    #[arg(long)]
    pub max_batches: Option<usize>,
}

#[derive(Debug, Args)]
pub struct LabelArgs {
    /// The dataset folder (holding dataset.toml).
    pub dataset: PathBuf,
    /// The model whose pre-labels are shown: a signed bundle (needs --trusted), or `builtin`
    /// for the default model built into weld-edge.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A trusted public key for --model: a `.pub` file or 64 hex digits (repeatable).
    #[arg(long)]
    pub trusted: Vec<String>,
    /// Inference backend for --model: auto, tract, or ort with that feature.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Rules config whose findings are drawn (default: the built-in calibration).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 8090)]
    pub port: u16,
    /// Who the change log names (default: $USER).
    #[arg(long)]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("model").required(true).args(["checkpoint", "bundle"])))]
pub struct EvalArgs {
    /// A checkpoint from `train` (`best.json` or `best.safetensors`).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// A signed bundle, checked as a device would (needs --trusted).
    #[arg(long, requires = "trusted")]
    pub bundle: Option<PathBuf>,
    /// A trusted public key for --bundle: a `.pub` file or 64 hex digits (repeatable).
    #[arg(long)]
    pub trusted: Vec<String>,
    /// Inference backend for --bundle (tract, or ort with that feature).
    #[arg(long, default_value = "tract")]
    pub backend: String,
    /// The dataset folder.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Split file; default for a checkpoint: the split.json of its run.
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// Which frames: train, val, test, or all labelled frames.
    #[arg(long, value_enum, default_value = "val")]
    pub part: PartArg,
    /// Rules config for the hybrid policy (default: the built-in calibration).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Model probability at or above which its answer is confident.
    #[arg(long, default_value_t = 0.8)]
    pub model_confident_at: f32,
    /// auto, cpu, cuda or cuda:N, for a checkpoint.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Folder for the report.
    #[arg(long)]
    pub out: PathBuf,
}

/// The input of a model, as a bundle's manifest names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputKind {
    /// Three colour channels, ImageNet statistics.
    Rgb,
    /// Colour plus height above the plate from depth.
    RgbHeight,
    /// Colour, height, and the height's local relief (small pits, grooves, droplets and holes
    /// kept visible at a small input size).
    RgbHeightRelief,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The checkpoint (`RUN/best.safetensors` or its `.json`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The ONNX file to write; its model card goes beside it with the extension `.json`.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The f32 ONNX written by `export` (its model card beside it).
    #[arg(long)]
    pub model: PathBuf,
    /// The dataset to calibrate on and judge with.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Split file: calibrate on its train part, judge on its test part (val when test is
    /// empty). Without one, every labelled frame serves for both.
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// The int8 ONNX to write; its card goes beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Frames to calibrate on (drawn from the train part).
    #[arg(long, default_value_t = 128)]
    pub calibration_frames: usize,
    /// Activation ranges: `minmax`, or a percentile of |value| such as `99.99` (which of the
    /// two loses less differs by model: docs/PERFORMANCE.md).
    #[arg(long, default_value = "minmax", value_parser = parse_range)]
    pub range: crate::quantize::RangeMethod,
    /// Which convolutions run in int8.
    #[arg(long, value_enum, default_value = "pointwise")]
    pub convs: crate::quantize::ConvSelect,
    /// Weight scales: `per-tensor` (the form tract runs fastest), `per-channel`, or `auto`:
    /// per tensor when it costs at most 1 point of held-out accuracy against f32, else per
    /// channel.
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: crate::quantize::WeightScales,
    /// Zero points of 0 for every activation (ReLU6 as an int8 Clip) instead of -128 for
    /// tensors that are never negative.
    #[arg(long)]
    pub symmetric: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct BenchModelsArgs {
    /// ONNX models with their model cards beside them (from `export` and `quantize`); the
    /// first is the reference for agreement.
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    /// The dataset whose frames are judged (and the first of them timed).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Judge the split's test part (val when test is empty); without one, every labelled frame.
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// At most this many judged frames.
    #[arg(long, default_value_t = 200)]
    pub frames: usize,
    /// Backends, comma-separated (`ort` needs the `ort` feature).
    #[arg(long, value_delimiter = ',', default_value = "tract")]
    pub backends: Vec<String>,
    /// Caller thread counts to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Timed inferences per caller thread.
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    /// Also time each node of tract's plan and print the time per operator.
    #[arg(long)]
    pub profile: bool,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn parse_range(s: &str) -> Result<crate::quantize::RangeMethod, String> {
    use crate::quantize::RangeMethod;
    if s == "minmax" {
        return Ok(RangeMethod::MinMax);
    }
    match s.parse::<f64>() {
        Ok(p) if p > 50.0 && p <= 100.0 => Ok(RangeMethod::Percentile(p)),
        _ => Err(format!(
            "{s:?}: expected minmax or a percentile between 50 and 100 such as 99.99"
        )),
    }
}

#[derive(Debug, Args)]
pub struct BundleArgs {
    /// The ONNX model.
    #[arg(long)]
    pub onnx: PathBuf,
    /// The secret key (from `keys new`).
    #[arg(long)]
    pub key: PathBuf,
    /// Output classes in logit order, comma-separated (without a model card).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// Input channels (without a model card; default rgb).
    #[arg(long, value_enum)]
    pub input: Option<InputKind>,
    /// Input width and height in pixels, square (without a model card; default 224).
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub version: String,
    /// Without a model card; default mobilenet_v2.
    #[arg(long)]
    pub architecture: Option<String>,
    /// Precision of the model: f32, f16 or int8, the manifest's names (without a model card;
    /// default f32).
    #[arg(long)]
    pub quantization: Option<Quantization>,
    /// A JSON object of evaluation figures to record in the manifest.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// The bundle file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Golden inputs to carry (synthetic frames through the input spec), with the logits tract
    /// gives for them; a device runs them in each backend before the model goes live and
    /// picks the fastest that reproduces them. 0: none (devices then use tract only).
    #[arg(long, default_value_t = 4)]
    pub golden: usize,
    /// The golden check's tolerance, relative to the largest logit (default 1e-3 for f32,
    /// 5e-2 for int8).
    #[arg(long)]
    pub golden_tolerance: Option<f32>,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Fit the rules' calibration and confidence gate on a labelled dataset; print held-out
    /// figures; write the complete rules config.
    Calibrate {
        /// A labelled dataset whose classes include the rules' class names.
        dataset: PathBuf,
        /// Where to write the rules config (TOML).
        #[arg(long)]
        out: PathBuf,
        /// Start from this rules config (thresholds, class names) instead of the defaults.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// Share of each class held out for the report.
        #[arg(long, default_value_t = 0.3)]
        holdout: f64,
        /// Seed of the split.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Accuracy the confident decisions must reach on the fitting part.
        #[arg(long, default_value_t = 0.995)]
        target_accuracy: f64,
    },
}

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Write a synthetic RGB-D weld dataset (seeded: the same arguments give the same bytes).
    Synth(SynthArgs),
    /// Import a class-per-folder tree (or another dataset) into a new dataset: every problem
    /// listed before anything is written, byte-identical copies left out, groups read from the
    /// source's `groups.csv` or `manifest.csv`.
    Import(ImportArgs),
    /// Split the labelled frames into train/validation/test, stratified by class and keeping
    /// each group (weld run) on one side; writes a split file tied to the dataset's version.
    Split(SplitArgs),
    /// Copy the frames the devices of a fleet file captured (those they were unsure of, and
    /// those they were asked to keep) into the dataset's unlabeled/, for labelling; frames
    /// pulled before are not fetched again.
    Pull {
        /// The fleet file (README "A fleet").
        #[arg(long)]
        devices: PathBuf,
        /// The dataset folder (holding dataset.toml).
        #[arg(long)]
        out: PathBuf,
    },
    /// Count frames per class and list every problem found (exit code 1 when there are any).
    Stats {
        /// The dataset folder (holding dataset.toml).
        dir: PathBuf,
    },
    /// Write a contact sheet: RGB and false-colour depth side by side, a row per class.
    Preview {
        /// The dataset folder (holding dataset.toml).
        dir: PathBuf,
        /// Output PNG file.
        #[arg(long)]
        out: PathBuf,
        /// Frames shown per class.
        #[arg(long, default_value_t = 3)]
        per_class: usize,
    },
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Folder of class folders (images, optional STEM.depth.png), or a dataset.
    pub src: PathBuf,
    /// New dataset folder; must be missing or empty.
    #[arg(long)]
    pub out: PathBuf,
    /// Class list in label order (default: the source's dataset.toml, else its folder names).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// CSV naming each file's group (default: the source's groups.csv or manifest.csv).
    #[arg(long)]
    pub groups: Option<PathBuf>,
    /// The group column of that CSV (default: group, run_id, run, weld, seam or part).
    #[arg(long)]
    pub group_column: Option<String>,
    /// Millimetres per depth unit, for a source with depth but no dataset.toml.
    #[arg(long)]
    pub depth_unit_mm: Option<f32>,
}

#[derive(Debug, Args)]
pub struct SplitArgs {
    /// The dataset folder.
    pub dir: PathBuf,
    /// Share of each class's frames for validation.
    #[arg(long, default_value_t = 0.2)]
    pub val: f64,
    /// Share of each class's frames held out for the final test.
    #[arg(long, default_value_t = 0.0)]
    pub test: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Split file to write (default: DIR/split.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing split file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder; must be missing or empty.
    #[arg(long)]
    pub out: PathBuf,
    /// Frames per class.
    #[arg(long, default_value_t = 100)]
    pub per_class: usize,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Frame size, WIDTHxHEIGHT.
    #[arg(long, default_value = "640x480", value_parser = parse_size)]
    pub size: (u32, u32),
    /// Horizontal field of view of the simulated camera, degrees (20-120; smaller zooms in).
    #[arg(long, default_value_t = 65.0)]
    pub hfov_deg: f64,
}

/// Parses a model input size: `N` (square) or `WIDTHxHEIGHT`.
pub fn parse_input_size(s: &str) -> Result<[u32; 2], String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err(format!("{s:?} is not a size; expected N or WIDTHxHEIGHT")),
        Ok(n) => Ok([n, n]),
        Err(_) => parse_size(s).map(|(w, h)| [w, h]),
    }
}

/// Parses `WIDTHxHEIGHT`, e.g. `640x480`.
pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?} is not a size; expected WIDTHxHEIGHT such as 640x480");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((w, h))
}

/// Runs the command line; prints the error chain and returns a failure code on error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Dataset(DatasetCommand::Synth(a)) => {
            datasets::synth(&a.out, a.per_class, a.seed, a.size, a.hfov_deg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dataset(DatasetCommand::Stats { dir }) => datasets::stats(&dir),
        Command::Dataset(DatasetCommand::Import(a)) => {
            let opts = ImportOptions {
                classes: a.classes,
                groups: a.groups,
                group_column: a.group_column,
                depth_unit_mm: a.depth_unit_mm,
            };
            datasets::import(&a.src, &a.out, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dataset(DatasetCommand::Split(a)) => {
            let out = a.out.unwrap_or_else(|| a.dir.join("split.json"));
            datasets::split(&a.dir, &out, a.val, a.test, a.seed, a.force)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules(RulesCommand::Calibrate {
            dataset,
            out,
            rules,
            holdout,
            seed,
            target_accuracy,
        }) => {
            let base = match rules {
                Some(p) => RulesConfig::load(&p)?,
                None => RulesConfig::default(),
            };
            let opts = CalibrateOptions {
                holdout,
                seed,
                target_accuracy,
                l2: 1e-3,
            };
            rules_cmd::calibrate(&dataset, base, &out, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(a) => {
            eval_cmd(&a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Label(a) => {
            let user = a
                .user
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "unknown".into());
            crate::label::run(&crate::label::LabelOptions {
                dataset: a.dataset,
                model: a.model,
                trusted: a.trusted,
                backend: a.backend,
                rules: a.rules,
                port: a.port,
                user,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(a) => {
            train(&a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Export(a) => {
            export(&a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Quantize(a) => {
            quantize_cmd(&a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchModels(a) => {
            let opts = crate::bench_models::BenchOptions {
                dataset: a.dataset,
                split: a.split,
                frames: a.frames,
                backends: a.backends,
                threads: a.threads,
                runs: a.runs,
                profile: a.profile,
            };
            let r = crate::bench_models::run(&a.models, &opts)?;
            print!("{}", crate::bench_models::markdown(&r));
            if let Some(p) = a.json {
                let text = serde_json::to_string_pretty(&r)?;
                std::fs::write(&p, text + "\n")
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::New { out }) => {
            bundle_cmd::keys_new(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle {
            command:
                Some(BundleCommand::Verify {
                    bundle,
                    trusted,
                    backend,
                }),
            ..
        } => {
            bundle_cmd::verify(&bundle, &trusted, &backend)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle {
            create: Some(a), ..
        } => {
            let spec = bundle_spec(a.onnx.as_path(), &a)?;
            bundle_cmd::create(&a.onnx, spec, &a.key, &a.out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle { .. } => {
            anyhow::bail!(
                "`bundle` needs --onnx, --key, --name, --version and --out (and --classes when the \
                 ONNX has no model card beside it), or `bundle verify`"
            )
        }
        Command::Push(a) => crate::fleet_cmd::push(&a),
        Command::Dataset(DatasetCommand::Pull { devices, out }) => {
            crate::fleet_cmd::pull(&devices, &out)
        }
        Command::Devices(DevicesCommand::Status { devices, json }) => {
            crate::fleet_cmd::status(&devices, json)
        }
        Command::Dataset(DatasetCommand::Preview {
            dir,
            out,
            per_class,
        }) => {
            datasets::preview(&dir, &out, per_class)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl InputKind {
    /// The spec of this kind at `size` (`[width, height]`), stretched.
    pub fn spec(self, size: [u32; 2]) -> InputSpec {
        let mut spec = match self {
            InputKind::Rgb => InputSpec::rgb(size[0]),
            InputKind::RgbHeight => InputSpec::rgb_height(size[0]),
            InputKind::RgbHeightRelief => InputSpec::rgb_height_relief(size[0]),
        };
        spec.size = size;
        spec
    }
}

fn eval_cmd(a: &EvalArgs) -> Result<()> {
    let mut opts = EvalOptions {
        dataset: a.dataset.clone(),
        split: a.split.clone(),
        part: a.part,
        rules: a.rules.clone(),
        model_confident_at: a.model_confident_at,
        out: a.out.clone(),
    };
    if let Some(b) = &a.bundle {
        let model = eval::bundle_model(b, &a.trusted, &a.backend)?;
        eval::run(&model, &[], &opts)?;
        return Ok(());
    }
    let Some(ckpt) = &a.checkpoint else {
        anyhow::bail!("give --checkpoint or --bundle");
    };
    if opts.split.is_none() && a.part != PartArg::All {
        let beside = ckpt
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("split.json");
        if beside.is_file() {
            opts.split = Some(beside);
        }
    }
    eval_checkpoint(ckpt, &a.device, &opts)
}

#[cfg(feature = "torch")]
fn eval_checkpoint(ckpt: &std::path::Path, device: &str, opts: &EvalOptions) -> Result<()> {
    let dev = crate::torch::train::device(device)?;
    let (_, model) = crate::torch::backend::checkpoint_model(ckpt, dev)?;
    eval::run(&model, &eval::training_curves(ckpt), opts)?;
    Ok(())
}

#[cfg(not(feature = "torch"))]
fn eval_checkpoint(_: &std::path::Path, _: &str, _: &EvalOptions) -> Result<()> {
    anyhow::bail!(
        "evaluating a checkpoint needs libtorch: build weld-trainer with `--features torch` \
         (README \"Training\"), or evaluate a bundle with --bundle"
    )
}

/// The bundle's contents from the model card beside the ONNX, or from the flags without one.
/// With a card, a flag that disagrees with it is an error rather than silently winning.
fn bundle_spec(onnx: &std::path::Path, a: &BundleArgs) -> Result<BundleSpec> {
    let card = crate::card::ModelCard::read_beside(onnx)?;
    let Some(card) = card else {
        let Some(classes) = a.classes.clone() else {
            anyhow::bail!(
                "{} has no model card ({}) beside it: give --classes (and --input, --size, \
                 --architecture, --quantization when not the defaults)",
                onnx.display(),
                crate::card::card_path(onnx).display()
            );
        };
        return Ok(BundleSpec {
            name: a.name.clone(),
            version: a.version.clone(),
            architecture: a.architecture.clone().unwrap_or("mobilenet_v2".into()),
            classes,
            input: a
                .input
                .unwrap_or(InputKind::Rgb)
                .spec([a.size.unwrap_or(224); 2]),
            quantization: a.quantization.unwrap_or(Quantization::F32),
            metrics: a.metrics.clone(),
            card: None,
            golden: a.golden,
            golden_tolerance: a.golden_tolerance,
        });
    };
    let card_file = crate::card::card_path(onnx);
    let mut conflicts = Vec::new();
    if a.classes.as_ref().is_some_and(|c| *c != card.classes) {
        conflicts.push(format!(
            "--classes (the card says {})",
            card.classes.join(",")
        ));
    }
    if a.input
        .is_some_and(|i| i.spec(card.input.size).channels != card.input.channels)
    {
        conflicts.push(format!("--input (the card says {:?})", card.input.channels));
    }
    if a.size.is_some_and(|s| [s, s] != card.input.size) {
        conflicts.push(format!("--size (the card says {:?})", card.input.size));
    }
    if a.architecture
        .as_ref()
        .is_some_and(|x| *x != card.architecture)
    {
        conflicts.push(format!(
            "--architecture (the card says {})",
            card.architecture
        ));
    }
    if a.quantization.is_some_and(|q| q != card.quantization) {
        conflicts.push(format!(
            "--quantization (the card says {:?})",
            card.quantization
        ));
    }
    if !conflicts.is_empty() {
        anyhow::bail!(
            "flags disagree with the model card {}: {}; leave them out (the card is what \
             export or quantize wrote for this ONNX)",
            card_file.display(),
            conflicts.join(", ")
        );
    }
    Ok(BundleSpec {
        name: a.name.clone(),
        version: a.version.clone(),
        architecture: card.architecture.clone(),
        classes: card.classes.clone(),
        input: card.input.clone(),
        quantization: card.quantization,
        metrics: a.metrics.clone(),
        card: Some(card),
        golden: a.golden,
        golden_tolerance: a.golden_tolerance,
    })
}

fn quantize_cmd(a: &QuantizeArgs) -> Result<()> {
    use crate::quantize::{QuantizeOptions, Scheme};
    let opts = QuantizeOptions {
        dataset: a.dataset.clone(),
        split: a.split.clone(),
        calibration_frames: a.calibration_frames,
        range: a.range,
        scheme: Scheme {
            convs: a.convs,
            per_channel: true,
            unsigned_relu: !a.symmetric,
        },
        weights: a.weights,
        seed: a.seed,
    };
    let r = crate::quantize::quantize(&a.model, &a.out, &opts)?;
    println!(
        "wrote {} and its card ({} bytes, weight scales {}; f32 {} bytes)\n  calibrated on {} \
         frames; judged on \
         {} frames: accuracy f32 {:.2}%, int8 {:.2}% ({:+.2} points), same class on {:.2}%\n  \
         tract, one thread: f32 {:.2} ms, int8 {:.2} ms ({:.2}x)",
        a.out.display(),
        r.bytes_int8,
        if r.per_channel {
            "per channel"
        } else {
            "per tensor"
        },
        r.bytes_f32,
        r.calibration_frames,
        r.judged_frames,
        100.0 * r.accuracy_f32,
        100.0 * r.accuracy_int8,
        100.0 * (r.accuracy_int8 - r.accuracy_f32),
        100.0 * r.agreement,
        r.ms_f32,
        r.ms_int8,
        r.ms_f32 / r.ms_int8
    );
    Ok(())
}

#[cfg(feature = "torch")]
fn export(a: &ExportArgs) -> Result<()> {
    let r = crate::torch::export::export(&a.checkpoint, &a.out)?;
    println!(
        "wrote {} ({} nodes, {} bytes) and {}\n  tract vs tch on 4 probe inputs: max |diff| \
         {:.2e} (allowed {:.0e})",
        r.onnx.display(),
        r.nodes,
        r.bytes,
        r.card.display(),
        r.max_abs_diff,
        crate::torch::export::PARITY_TOLERANCE
    );
    Ok(())
}

#[cfg(not(feature = "torch"))]
fn export(_: &ExportArgs) -> Result<()> {
    anyhow::bail!(
        "exporting a checkpoint needs libtorch: build weld-trainer with `--features torch` \
         (README \"Training\")"
    )
}

#[cfg(feature = "torch")]
fn train(a: &TrainArgs) -> Result<()> {
    crate::torch::train_cmd(a)
}

#[cfg(not(feature = "torch"))]
fn train(_: &TrainArgs) -> Result<()> {
    anyhow::bail!(
        "this weld-trainer was built without libtorch; build it with `--features torch` \
         (or `cuda`) as the README's Training section shows"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_size("640x480"), Ok((640, 480)));
        assert_eq!(parse_size("1280X720"), Ok((1280, 720)));
        for bad in ["640", "0x480", "ax4", "640x-1", ""] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("WIDTHxHEIGHT"), "{e}");
        }
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
