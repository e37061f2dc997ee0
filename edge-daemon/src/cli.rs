//! Command line of `weld-edge` (DESIGN.md "Command lines").

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "weld-edge",
    version,
    about = "Weld inspection daemon for the production line"
)]
pub struct Cli {}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let _cli = Cli::parse();
    ExitCode::SUCCESS
}
