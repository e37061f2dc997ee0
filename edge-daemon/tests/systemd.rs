//! The service on the board: `systemd/weld-edge.service` checked by `systemd-analyze verify`,
//! and the daemon's side of the notify protocol (sd_notify(3)) against a local
//! `NOTIFY_SOCKET`, the datagram socket systemd itself would listen on: READY once the
//! pipeline runs, watchdog pings while frames flow and none while they do not, STOPPING on
//! SIGTERM.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/weld-edge.service");

/// `systemd-analyze verify` on `unit` with its `ExecStart` pointed at this build's binary (the
/// tool checks that the program exists): its exit status and everything it printed.
fn verify(dir: &Path, unit: &str) -> (bool, String) {
    let path = dir.join("weld-edge.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/weld-edge", env!("CARGO_BIN_EXE_weld-edge")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (package systemd, installed by tests/run.sh)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(UNIT).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=15s",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/weld-edge",
        "PrivateTmp=yes",
        "DevicePolicy=closed",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "{UNIT} lacks {line}"
        );
    }
    // verify only warns about an unknown key or a bad value and still exits 0: any output
    // at all is a failure.
    let (ok, text) = verify(tmp.path(), &unit);
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    // And it does notice a mistake, so the check above can fail.
    let (_, text) = verify(tmp.path(), &unit.replace("WatchdogSec=", "WatchdgSec="));
    assert!(
        text.contains("WatchdgSec"),
        "a misspelt key went unnoticed: {text}"
    );
}

/// A daemon replaying `frames` at `fps`, looping, with systemd's environment for a watchdog of
/// `watchdog`; the socket it notifies.
fn spawn(tmp: &Path, fps: f64, watchdog: Duration) -> (Child, UnixDatagram) {
    let frames = tmp.join("frames");
    common::synth_dataset(&frames, 160, 120, 2);
    let config = tmp.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[source]
kind = "replay"
path = "{}"
loop = true
fps = {fps}
[store]
dir = "{}"
[http]
port = 0
[mqtt.embedded]
port = 0
"#,
            frames.display(),
            tmp.join("store").display()
        ),
    )
    .unwrap();
    let socket_path = tmp.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // systemd names the process the watchdog is meant for (WATCHDOG_PID); a shell that
    // execs the daemon keeps its PID, so the shell can say it.
    let child = Command::new("sh")
        .args([
            "-c",
            r#"export WATCHDOG_PID=$$; exec "$0" "$@""#,
            env!("CARGO_BIN_EXE_weld-edge"),
            "run",
            "--config",
            config.to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, socket)
}

/// The next notification, or `None` after the socket's 100 ms read timeout.
fn next_message(socket: &UnixDatagram) -> Option<String> {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Whether `message` carries the assignment `line` (a datagram may hold several lines).
fn says(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// Every notification received within `window` after the call, each with when it came.
fn receive(socket: &UnixDatagram, window: Duration) -> Vec<(Duration, String)> {
    let start = Instant::now();
    let mut got = Vec::new();
    while start.elapsed() < window {
        if let Some(m) = next_message(socket) {
            got.push((start.elapsed(), m));
        }
    }
    got
}

/// Waits (bounded) for `READY=1`.
fn wait_ready(socket: &UnixDatagram) {
    let start = Instant::now();
    while !next_message(socket).is_some_and(|m| says(&m, "READY=1")) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no READY=1 within 30 s"
        );
    }
}

/// When each watchdog ping of `got` came.
fn pings(got: &[(Duration, String)]) -> Vec<Duration> {
    got.iter()
        .filter(|(_, m)| says(m, "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect()
}

fn stop(mut child: Child, socket: &UnixDatagram) -> Vec<(Duration, String)> {
    assert!(common::daemon::signal(&child, "-TERM"));
    let got = receive(socket, Duration::from_millis(500));
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("did not stop within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    got
}

#[test]
fn flowing_frames_feed_the_watchdog_and_sigterm_says_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, socket) = spawn(tmp.path(), 20.0, Duration::from_millis(800));
    wait_ready(&socket);
    // Checks every 200 ms; frames every 50 ms: a ping at nearly every check (10 in 2 s; a
    // loaded machine may miss a few).
    let got = receive(&socket, Duration::from_secs(2));
    let times = pings(&got);
    let n = times.len();
    assert!((4..=12).contains(&n), "{n} pings in 2 s: {got:?}");
    assert!(
        times
            .windows(2)
            .all(|w| w[1] - w[0] < Duration::from_millis(800)),
        "a gap as long as the watchdog period: {times:?}"
    );
    let got = stop(child, &socket);
    assert!(
        got.iter().any(|(_, m)| says(m, "STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {got:?}"
    );
}

#[test]
fn frames_that_stop_flowing_stop_the_pings() {
    let tmp = tempfile::tempdir().unwrap();
    // One frame every 5 s against a watchdog of 800 ms: from systemd's side the pipeline has
    // stalled, and it would be restarted.
    let (child, socket) = spawn(tmp.path(), 0.2, Duration::from_millis(800));
    wait_ready(&socket);
    let got = receive(&socket, Duration::from_secs(3));
    // The frame at start can give one ping; then nothing for more than the watchdog period.
    let n = pings(&got).len();
    assert!(n <= 1, "{n} pings in 3 s with no frames: {got:?}");
    stop(child, &socket);
}
