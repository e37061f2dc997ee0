//! Command line of `weld-edge` (DESIGN.md "Command lines").

use std::io::{self, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use weld_core::rules::{Detector, RulesConfig};

use crate::bench;
use crate::config::{Config, ModelSection};
use crate::daemon;
use crate::inspect::{self, Format, Judge};
use crate::mqtt::BrokerAddr;
use crate::pipeline::Identity;
use crate::policy::{Policy, PolicyKind, Thresholds};

/// `inspect --model builtin`: the default model built into weld-edge (a file of that name wins).
const BUILTIN_ARG: &str = "builtin";

#[derive(Debug, Parser)]
#[command(
    name = "weld-edge",
    version,
    about = "Weld inspection daemon for the production line"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon. With no config: the demo (synthetic camera, hybrid policy, store in
    /// ./weld-edge-data, results as JSON lines on stdout).
    Run {
        /// Config file (TOML); see firmware-config/ for examples.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the configured pipeline for a while and print per-stage latency quantiles, frames
    /// per second, drops, the model share and peak memory.
    Bench {
        /// Config file (TOML); the demo defaults when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// How long to run, seconds.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Store directory for the run (default: a fresh temporary directory, removed after).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Measure MQTT delivery: push results through a fresh outbox to a broker at QoS 1 and
    /// count them at a subscriber; prints the outbox's cost per result and results per second.
    BenchMqtt {
        /// The broker, HOST:PORT; default: the embedded broker on a free loopback port.
        #[arg(long)]
        broker: Option<String>,
        /// How many results.
        #[arg(long, default_value_t = 20_000)]
        results: u64,
        /// Results sent and not yet acknowledged at most (`mqtt.inflight`).
        #[arg(long, default_value_t = 128)]
        inflight: u16,
        /// Store directory (default: a fresh temporary directory, removed after).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Inspect image files or dataset folders offline: one result per frame on stdout, a
    /// summary (with accuracy and a confusion matrix for labelled frames) on stderr.
    Inspect {
        /// Image files (their STEM.depth.png is read too) or dataset folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Which stages decide: `hybrid` needs --model to ask the model about frames the
        /// rules are unsure of (without one they are reported uncertain).
        #[arg(long, value_enum, default_value_t = PolicyKind::Rules)]
        policy: PolicyKind,
        /// The model: a signed bundle (with --trusted), a plain ONNX file (with --classes), or
        /// `builtin` for the default model built into weld-edge.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A public key the bundle may be signed by: a `.pub` file or 64 hex digits
        /// (repeatable).
        #[arg(long)]
        trusted: Vec<String>,
        /// The model's classes in logit order, comma-separated (for a plain .onnx).
        #[arg(long, value_delimiter = ',')]
        classes: Vec<String>,
        /// Inference backend: `auto` (for a bundle, the fastest that reproduces its golden
        /// outputs; tract for a plain ONNX), `tract` or `ort`.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Model probability needed for a confident model answer.
        #[arg(long, default_value_t = 0.8)]
        model_confident_at: f32,
        /// Output format of the per-frame results.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Rules config (TOML); the built-in defaults when absent.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// Millimetres per depth unit for files outside a dataset (a dataset's
        /// dataset.toml gives its own).
        #[arg(long)]
        depth_unit_mm: Option<f32>,
        /// Device name written into the results.
        #[arg(long, default_value = "offline")]
        device: String,
        /// Line name written into the results.
        #[arg(long, default_value = "offline")]
        line: String,
    },
}

/// Parses the command line and runs it; prints the error chain on failure.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (stdout carries results); `RUST_LOG` filters, `info` by default.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rumqttd (the embedded broker) logs every connection, and every ordinary disconnect as
        // an ERROR; its failures that matter reach the daemon's own log. `RUST_LOG=rumqttd=info`
        // shows them.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            init_logging();
            let cfg = Config::load(config.as_deref())?;
            if config.is_none() {
                tracing::info!(
                    "no --config: running the demo (synthetic camera, hybrid policy, store in {})",
                    cfg.store_dir.display()
                );
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(daemon::run(cfg, daemon::shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            config,
            seconds,
            store,
        } => {
            init_logging();
            let mut cfg = Config::load(config.as_deref())?;
            let tmp;
            cfg.store_dir = match store {
                Some(dir) => dir,
                None => {
                    tmp = tempfile::tempdir().context("creating a temporary store")?;
                    tmp.path().to_path_buf()
                }
            };
            if !(seconds.is_finite() && seconds > 0.0) {
                anyhow::bail!("--seconds must be a positive number of seconds, got {seconds}");
            }
            let report = bench::run(&cfg, Duration::from_secs_f64(seconds))?;
            print!("{}", report.text());
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchMqtt {
            broker,
            results,
            inflight,
            store,
        } => {
            init_logging();
            if results == 0 || inflight == 0 {
                anyhow::bail!("--results and --inflight must be at least 1");
            }
            let broker = match broker {
                Some(b) => {
                    let (host, port) = b
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                        .with_context(|| format!("--broker {b:?}: expected HOST:PORT"))?;
                    BrokerAddr::External { host, port }
                }
                None => BrokerAddr::Embedded(
                    crate::mqtt::broker::start(([127, 0, 0, 1], 0).into())
                        .context("starting the embedded broker")?,
                ),
            };
            let tmp = tempfile::tempdir().context("creating a temporary store")?;
            let dir = store.unwrap_or_else(|| tmp.path().to_path_buf());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let report = rt
                .block_on(crate::mqtt::bench::run(
                    broker,
                    &dir,
                    results,
                    inflight,
                    Duration::from_secs(300),
                ))
                .map_err(anyhow::Error::msg)?;
            print!("{}", report.text());
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            paths,
            policy,
            model,
            trusted,
            classes,
            backend,
            model_confident_at,
            format,
            rules,
            depth_unit_mm,
            device,
            line,
        } => {
            let cfg = match &rules {
                Some(p) => RulesConfig::load(p)?,
                None => RulesConfig::default(),
            };
            let detector = Detector::new(cfg)?;
            let model = match model {
                None => {
                    if policy == PolicyKind::Model || policy == PolicyKind::Both {
                        anyhow::bail!("--policy {policy} needs --model");
                    }
                    None
                }
                Some(path) if path.as_os_str() == BUILTIN_ARG && !path.exists() => {
                    if !trusted.is_empty() || !classes.is_empty() {
                        anyhow::bail!(
                            "--model builtin brings its own key and classes: give no --trusted \
                             or --classes with it"
                        );
                    }
                    let section = ModelSection {
                        backend,
                        ..ModelSection::builtin()
                    };
                    daemon::load_model(Some(&section), rayon::current_num_threads())?
                }
                Some(path) => {
                    let plain = !classes.is_empty();
                    if !plain && trusted.is_empty() {
                        anyhow::bail!(
                            "--model {}: give --trusted KEY for a signed bundle, or --classes \
                             good,porosity,... for a plain ONNX file",
                            path.display()
                        );
                    }
                    let (bundle, onnx) = if plain {
                        (None, Some(path))
                    } else {
                        (Some(path), None)
                    };
                    let section = ModelSection {
                        builtin: false,
                        bundle,
                        trusted_keys: trusted,
                        alternatives: Vec::new(),
                        onnx,
                        classes,
                        version: None,
                        backend,
                        ort_library: None,
                        input: None,
                    };
                    daemon::load_model(Some(&section), rayon::current_num_threads())?
                }
            };
            let policy = Policy {
                kind: policy,
                thresholds: Thresholds {
                    rules_confident_at: detector.config().confident_at,
                    model_confident_at,
                },
            };
            let problems = policy.thresholds.problems("--");
            if !problems.is_empty() {
                anyhow::bail!("{}", problems.join("; "));
            }
            let judge = Judge {
                detector,
                policy,
                model,
                identity: Identity { device, line },
            };
            let inputs = inspect::collect(&paths, depth_unit_mm)?;
            let stdout = io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let summary = inspect::run(&inputs, &judge, format, &mut out)?;
            eprint!("{}", summary.report());
            Ok(if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
