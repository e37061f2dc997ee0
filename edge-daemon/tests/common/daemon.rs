//! The `weld-edge run` child of the end-to-end tests: started with a config, its log (stderr,
//! colours stripped) collected in the background so its pipe never fills.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub use super::output::collect;

/// `weld-edge run --config CONFIG` at log level info, stdout discarded; its log.
pub fn spawn_run(config: &Path) -> (Child, Arc<Mutex<String>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weld-edge"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = collect(child.stderr.take().unwrap());
    (child, log)
}

/// Sends `sig` (e.g. `-TERM`, `-KILL`) to `child` as a service manager would, with `kill`;
/// whether it was delivered.
pub fn signal(child: &Child, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success())
}
