//! `weld-trainer push` and `devices status` against real daemons: twenty `weld-edge` daemons
//! run in this process (the library's `daemon::run`, each with its own data dir, synthetic
//! camera and HTTP port on 127.0.0.1), and the trainer's binary talks to them over HTTP.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weld_core::bundle::Bundle;

mod common;

const TOKEN: &str = "fleet-test-token-0123456789abcdef";
const KEY: [u8; 32] = [21; 32];
const OTHER_KEY: [u8; 32] = [22; 32];

/// Daemons on one tokio runtime; stopped (and their stores flushed) on drop.
struct Devices {
    _turn: std::sync::MutexGuard<'static, ()>,
    runtime: tokio::runtime::Runtime,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ports: Vec<u16>,
    dir: tempfile::TempDir,
}

/// `n` distinct free loopback ports: all held open until all are chosen, so none repeats.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The tests run one at a time: a port one test chose and let go could otherwise be taken by
/// the other's daemons before its own daemon binds it.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn public_hex(seed: [u8; 32]) -> String {
    hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .as_bytes(),
    )
}

impl Devices {
    fn start(n: usize) -> Devices {
        Devices::start_with(n, "")
    }

    /// `n` daemons with `extra` TOML in their config.
    fn start_with(n: usize, extra: &str) -> Devices {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        let ports = free_ports(n + 1);
        for (i, &port) in ports[..n].iter().enumerate() {
            let d = dir.path().join(format!("dev-{i:02}"));
            std::fs::create_dir_all(&d).unwrap();
            let config = d.join("edge.toml");
            std::fs::write(
                &config,
                format!(
                    r#"
[device]
id = "dev-{i:02}"
[source]
kind = "synthetic"
width = 160
height = 120
fps = 5
[pipeline]
workers = 1
[model]
builtin = true
[deploy]
trusted_keys = ["{key}"]
[store]
dir = "{store}"
[output]
stdout_jsonl = false
[mqtt]
enabled = false
[http]
port = {port}
token_file = "{token}"
{extra}
"#,
                    key = public_hex(KEY),
                    store = d.join("store").display(),
                    token = dir.path().join("token").display(),
                ),
            )
            .unwrap();
            let cfg = weld_edge::config::Config::load(Some(&config)).unwrap();
            let mut rx = rx.clone();
            tasks.push(runtime.spawn(async move {
                let stopped = async move {
                    let _ = rx.changed().await;
                };
                if let Err(e) = weld_edge::daemon::run(cfg, stopped).await {
                    panic!("daemon {i} failed: {e}");
                }
            }));
        }
        let devices = Devices {
            _turn: turn,
            runtime,
            stop,
            tasks,
            ports,
            dir,
        };
        for port in &devices.ports[..n] {
            devices.wait_healthy(*port);
        }
        devices
    }

    fn wait_healthy(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = ureq::get(format!("http://127.0.0.1:{port}/healthz"))
                .call()
                .is_ok_and(|r| r.status() == 200);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "device on port {port} not up in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A fleet file of the daemons `which`, plus `extra` devices' lines.
    fn fleet(&self, which: std::ops::Range<usize>, extra: &str) -> PathBuf {
        let mut text = "[defaults]\ntoken_file = \"token\"\ntimeout_s = 60\n".to_string();
        for i in which {
            text += &format!(
                "[[device]]\nname = \"dev-{i:02}\"\nurl = \"http://127.0.0.1:{}\"\n",
                self.ports[i]
            );
        }
        text += extra;
        let path = self.dir.path().join("fleet.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn running(&self, i: usize) -> String {
        let mut r = ureq::get(format!("http://127.0.0.1:{}/api/v1/models", self.ports[i]))
            .call()
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        v["running"]["version"].as_str().unwrap_or("").to_string()
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = self.runtime.block_on(t);
        }
    }
}

/// The built-in model re-signed as `version` with key `seed`.
fn bundle(dir: &Path, version: &str, seed: [u8; 32]) -> PathBuf {
    let b = Bundle::from_reader(weld_edge::model::BUILTIN_BUNDLE).unwrap();
    let mut manifest = b.manifest;
    manifest.version = version.into();
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let signed = Bundle::sign(manifest, b.onnx, b.golden, &key).unwrap();
    let path = dir.join(format!("{version}.bundle"));
    std::fs::write(&path, signed.to_tar().unwrap()).unwrap();
    path
}

/// `weld-trainer dataset pull --devices FLEET --out DATASET`.
fn pull(fleet: &Path, dataset: &Path) -> (bool, String, String) {
    trainer(&[
        "dataset",
        "pull",
        "--devices",
        fleet.to_str().unwrap(),
        "--out",
        dataset.to_str().unwrap(),
    ])
}

/// `weld-trainer ARGS`: whether it succeeded, its stdout and its stderr.
fn trainer(args: &[&str]) -> (bool, String, String) {
    let out = common::trainer(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn push_installs_on_twenty_devices_and_status_shows_it() {
    let devices = Devices::start(20);
    let fleet = devices.fleet(0..20, "");
    let b = bundle(devices.dir.path(), "fleet-v1", KEY);
    let report = devices.dir.path().join("report.json");
    let t = Instant::now();
    let (ok, stdout, stderr) = trainer(&[
        "push",
        b.to_str().unwrap(),
        "--devices",
        fleet.to_str().unwrap(),
        "--concurrency",
        "8",
        "--report",
        report.to_str().unwrap(),
    ]);
    let took = t.elapsed();
    assert!(ok, "{stdout}\n{stderr}");
    eprintln!("pushed to 20 devices in {took:?}\n{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let reports = r["devices"].as_array().unwrap();
    assert_eq!(reports.len(), 20);
    for d in reports {
        assert_eq!(d["ok"], true, "{d}");
        assert_eq!(d["outcome"], "installed", "{d}");
    }
    for i in 0..20 {
        assert_eq!(devices.running(i), "fleet-v1", "dev-{i:02}");
    }
    // Pushing it again changes nothing and says so.
    let (ok, stdout, _) = trainer(&[
        "push",
        b.to_str().unwrap(),
        "--devices",
        fleet.to_str().unwrap(),
    ]);
    assert!(ok);
    assert_eq!(stdout.matches("already installed").count(), 20, "{stdout}");

    let (ok, stdout, stderr) = trainer(&[
        "devices",
        "status",
        "--devices",
        fleet.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(all.len(), 20);
    for s in &all {
        assert_eq!(s["model"], "fleet-v1", "{s}");
        assert_eq!(s["installed"], serde_json::json!(["fleet-v1"]), "{s}");
        assert_ne!(s["state"], "unreachable", "{s}");
    }
}

#[test]
fn a_refusing_canary_stops_the_push_and_dead_devices_are_reported() {
    // The model decides every frame, so the canary's shadow has frames to compare.
    let devices = Devices::start_with(3, "[policy]\nmode = \"model\"\n");
    let builtin = devices.running(0);
    // Signed by a key the devices do not trust: the canary refuses, nobody else is asked.
    let untrusted = bundle(devices.dir.path(), "bad-v1", OTHER_KEY);
    let fleet = devices.fleet(0..3, "");
    let (ok, stdout, stderr) = trainer(&[
        "push",
        untrusted.to_str().unwrap(),
        "--devices",
        fleet.to_str().unwrap(),
        "--canary",
        "1",
    ]);
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("refused"), "{stdout}");
    assert!(
        stdout.contains("does not verify with any trusted key"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("not pushed").count(), 2, "{stdout}");
    for i in 0..3 {
        assert_eq!(devices.running(i), builtin);
    }

    // A good bundle with a canary: it runs in shadow on the first device, agrees with what
    // runs there (the same network), is promoted, then the rest get it; a device that is not
    // there is reported, the others still take it.
    let good = bundle(devices.dir.path(), "good-v1", KEY);
    // Chosen with the daemons' ports, so no daemon has it.
    let dead = *devices.ports.last().unwrap();
    let fleet = devices.fleet(
        0..3,
        &format!("[[device]]\nname = \"gone\"\nurl = \"http://127.0.0.1:{dead}\"\n"),
    );
    let (ok, stdout, stderr) = trainer(&[
        "push",
        good.to_str().unwrap(),
        "--devices",
        fleet.to_str().unwrap(),
        "--canary",
        "2",
    ]);
    assert!(!ok, "one device is gone: {stdout}\n{stderr}");
    assert!(
        stdout.contains("canary: good-v1 in shadow on dev-00")
            && stdout.contains("agreed on 100.0%"),
        "{stdout}"
    );
    assert!(stdout.contains("; promoted"), "{stdout}");
    assert!(stdout.contains("unreachable"), "{stdout}");
    assert!(stdout.contains("3 of 4 devices took it"), "{stdout}");
    for i in 0..3 {
        assert_eq!(devices.running(i), "good-v1");
    }
    let (ok, stdout, _) = trainer(&["devices", "status", "--devices", fleet.to_str().unwrap()]);
    assert!(!ok, "a device is unreachable");
    assert!(
        stdout.contains("gone") && stdout.contains("unreachable"),
        "{stdout}"
    );

    // A fleet file with mistakes: every one named, nothing pushed.
    let bad_fleet = devices.dir.path().join("bad-fleet.toml");
    std::fs::write(
        &bad_fleet,
        "[[device]]\nname = \"a\"\nurl = \"https://10.0.0.1:8080\"\ntoken_env = \"NO_SUCH_VAR_HERE\"\n\
         [[device]]\nname = \"a\"\nurl = \"127.0.0.1:8080\"\n",
    )
    .unwrap();
    let (ok, _, stderr) = trainer(&[
        "push",
        good.to_str().unwrap(),
        "--devices",
        bad_fleet.to_str().unwrap(),
    ]);
    assert!(!ok);
    for want in [
        "plain HTTP",
        "NO_SUCH_VAR_HERE",
        "used twice",
        "must start with http://",
        "no token",
    ] {
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
}

#[test]
fn dataset_pull_copies_each_devices_captures_into_unlabeled_once() {
    // Rules alone with an unreachable bar: every frame is uncertain, so every frame is kept.
    let devices = Devices::start_with(2, "[policy]\nmode = \"rules\"\nrules_confident_at = 1.0\n");
    let captures = |i: usize| -> usize {
        let mut r = ureq::get(format!(
            "http://127.0.0.1:{}/api/v1/captures",
            devices.ports[i]
        ))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .call()
        .unwrap();
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        v.len()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..2).any(|i| captures(i) < 3) {
        assert!(
            Instant::now() < deadline,
            "devices captured too few frames in 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let fleet = devices.fleet(0..2, "");
    let dataset = devices.dir.path().join("ds");
    let spec = weld_core::dataset::DatasetSpec {
        classes: ["good", "porosity"].map(String::from).to_vec(),
        depth_unit_mm: Some(weld_core::synth::SynthConfig::new(160, 120).depth_unit_mm),
        intrinsics: None,
    };
    weld_core::dataset::Dataset::create(&dataset, spec).unwrap();
    let (ok, stdout, stderr) = pull(&fleet, &dataset);
    assert!(ok, "{stdout}\n{stderr}");
    let files = |device: &str, suffix: &str| {
        std::fs::read_dir(dataset.join("unlabeled"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(device) && n.ends_with(suffix))
            .count()
    };
    for device in ["dev-00", "dev-01"] {
        let rgb = files(device, ".png") - files(device, ".depth.png");
        assert!(rgb >= 3, "{device}: {rgb} frames\n{stdout}");
        assert_eq!(files(device, ".depth.png"), rgb, "each frame has its depth");
    }
    // The frames read back as a dataset's unlabeled frames.
    let ds = weld_core::dataset::Dataset::open(&dataset).unwrap();
    let unlabeled = ds.samples.iter().filter(|s| s.label.is_none()).count();
    assert!(unlabeled >= 6, "{unlabeled}");
    let frame = ds.load(&ds.samples[0]).unwrap();
    assert!(frame.depth().is_some());

    // Again: only frames captured since are fetched.
    let (ok, stdout, _) = pull(&fleet, &dataset);
    assert!(ok);
    assert!(stdout.contains("already there"), "{stdout}");
    let before = unlabeled;
    let ds = weld_core::dataset::Dataset::open(&dataset).unwrap();
    let after = ds.samples.iter().filter(|s| s.label.is_none()).count();
    assert!(after >= before, "{after} < {before}");

    // A dataset for another camera (another depth unit): nothing copied, the reason named.
    let other = devices.dir.path().join("other-ds");
    let spec = weld_core::dataset::DatasetSpec {
        classes: ["good", "porosity"].map(String::from).to_vec(),
        depth_unit_mm: Some(0.01),
        intrinsics: None,
    };
    weld_core::dataset::Dataset::create(&other, spec).unwrap();
    let (ok, stdout, _) = pull(&fleet, &other);
    assert!(!ok);
    assert!(stdout.contains("depth_unit_mm is 0.01"), "{stdout}");
    assert_eq!(
        std::fs::read_dir(other.join("unlabeled")).unwrap().count(),
        0
    );

    // Not a dataset: refused before anything is fetched.
    let (ok, _, stderr) = pull(&fleet, devices.dir.path());
    assert!(!ok);
    assert!(stderr.contains("is not a dataset"), "{stderr}");
}
