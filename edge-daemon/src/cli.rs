//! Command line of `weld-edge` (DESIGN.md "Command lines").

use std::io::{self, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use weld_core::rules::{Detector, RulesConfig};

use crate::inspect::{self, Format, Policy};

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
    /// Inspect image files or dataset folders offline: one result per frame on stdout, a
    /// summary (with accuracy and a confusion matrix for labelled frames) on stderr.
    Inspect {
        /// Image files (their STEM.depth.png is read too) or dataset folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Which stages decide.
        #[arg(long, value_enum, default_value_t = Policy::Rules)]
        policy: Policy,
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

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect {
            paths,
            policy: Policy::Rules,
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
            let inputs = inspect::collect(&paths, depth_unit_mm)?;
            let stdout = io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let summary = inspect::run(&inputs, &detector, format, &device, &line, &mut out)?;
            eprint!("{}", summary.report());
            Ok(if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
