//! `weld-edge run` and `weld-edge bench` end to end through the real binary: configs from
//! files, a replay that ends by itself, a synthetic camera stopped by SIGTERM, the store left
//! behind, and config errors that name every bad key.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use weld_core::Inspection;
use weld_edge::store::{Store, StoreConfig};

fn edge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weld-edge"));
    c.env("RUST_LOG", "info");
    c
}

fn dataset(root: &Path, per_class: usize) {
    common::synth_dataset(root, 320, 240, per_class);
}

#[test]
fn a_replay_runs_to_its_end_with_every_result_on_stdout_and_in_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("frames");
    dataset(&data, 3);
    let store = tmp.path().join("store");
    let config = tmp.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[device]
id = "test-07"
line = "L9"
[source]
kind = "replay"
path = "{}"
[pipeline]
queue = 64
workers = 2
[store]
dir = "{}"
# Tests run side by side: free ports, not the defaults.
[http]
port = 0
[mqtt.embedded]
port = 0
"#,
            data.display(),
            store.display()
        ),
    )
    .unwrap();
    let out = edge()
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let results: Vec<Inspection> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 15, "{stderr}");
    assert!(
        results
            .iter()
            .all(|r| r.device == "test-07" && r.line == "L9")
    );
    assert!(results.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(stderr.contains("source finished"), "{stderr}");

    // Everything is in the history; every uncertain frame was captured.
    let store = Store::open(&store, &StoreConfig::default()).unwrap();
    let stored = store.history().after(None, 100).unwrap();
    assert_eq!(stored.len(), 15);
    assert_eq!(
        stored.iter().map(|r| r.id).collect::<Vec<_>>(),
        results.iter().map(|r| r.id).collect::<Vec<_>>()
    );
    let uncertain = results.iter().filter(|r| r.uncertain).count();
    assert_eq!(store.captures().len(), uncertain);
}

#[test]
fn sigterm_stops_the_demo_source_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    // No --config: the demo, with its store in the working directory.
    let mut child = edge()
        .arg("run")
        .current_dir(tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // Wait for the first results (bounded), then stop it like systemd does.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    std::thread::sleep(Duration::from_secs(5));
    assert!(common::daemon::signal(&child, "-TERM"));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    let lines = reader.join().unwrap();
    let n = lines.lines().count();
    assert!(n > 0, "no results in 5 s\n{stderr}");
    // Every line is a whole result: shutdown never cuts one in half.
    let results: Vec<Inspection> = lines
        .lines()
        .map(|l| serde_json::from_str::<Inspection>(l).unwrap())
        .collect();
    // The demo runs the built-in model on the frames the rules are unsure of.
    assert!(
        stderr.contains("(built-in default model)") && stderr.contains("bundle verified"),
        "{stderr}"
    );
    assert!(
        results.iter().any(|r| r.model.is_some()),
        "the model never ran in {n} frames\n{stderr}"
    );
    let store = Store::open(&tmp.path().join("weld-edge-data"), &StoreConfig::default()).unwrap();
    assert_eq!(store.history().len(), n, "each printed result is stored");
}

#[test]
fn a_bad_config_names_every_problem_and_starts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bad.toml");
    std::fs::write(
        &config,
        r#"
[source]
kind = "synthetic"
fps = -3
[pipeline]
workers = 0
[policy]
model_confident_at = 2
[store]
dir = "store"
"#,
    )
    .unwrap();
    let out = edge()
        .args(["run", "--config", config.to_str().unwrap()])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "source.fps",
        "pipeline.workers",
        "policy.model_confident_at",
    ] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
    assert!(!tmp.path().join("store").exists(), "nothing was created");

    std::fs::write(&config, "[pipeline]\nworkers = 2\nqueue_size = 4\n").unwrap();
    let out = edge()
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("queue_size") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn bench_prints_stage_quantiles_and_fps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("frames");
    dataset(&data, 2);
    let config = tmp.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"replay\"\npath = \"{}\"\n[pipeline]\nqueue = 64\n",
            data.display()
        ),
    )
    .unwrap();
    let out = edge()
        .args([
            "bench",
            "--config",
            config.to_str().unwrap(),
            "--seconds",
            "30",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stage in ["capture", "queue", "rules", "total"] {
        assert!(
            text.lines().any(|l| l.starts_with(stage)),
            "{stage} missing:\n{text}"
        );
    }
    assert!(
        text.contains("10 captured, 10 processed, 0 dropped"),
        "{text}"
    );
    assert!(text.contains("fps") && text.contains("peak RSS"), "{text}");
}

#[test]
fn a_replay_that_cannot_be_read_is_refused_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("frames");
    std::fs::create_dir_all(&data).unwrap();
    // Depth files without a unit: the replay cannot read them and says so.
    let frame = weld_core::synth::generate(
        weld_core::synth::SynthClass::Good,
        1,
        &weld_core::synth::SynthConfig::new(160, 120),
    )
    .unwrap()
    .frame;
    frame
        .save(&data.join("a.png"), &data.join("a.depth.png"))
        .unwrap();
    let config = tmp.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"replay\"\npath = \"{}\"\n[store]\ndir = \"{}\"\n\
             [http]\nport = 0\n[mqtt.embedded]\nport = 0\n",
            data.display(),
            tmp.path().join("store").display()
        ),
    )
    .unwrap();
    let out = edge()
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("depth_unit_mm") || err.contains("depth unit"),
        "{err}"
    );
}
