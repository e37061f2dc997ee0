//! What the trainer's command-line tests share: running the real binary and reading its output.
#![allow(dead_code)] // not every test file uses every helper

use std::process::{Command, Output};

/// Runs `weld-trainer` with `args` to completion.
pub fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weld-trainer"))
        .args(args)
        .output()
        .expect("run weld-trainer")
}

/// Its stdout and stderr together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
