//! The live dashboard in a real browser: the `weld-edge` binary with a synthetic camera, and
//! Debian's headless Chromium (`tests/run.sh` installs it) driven over the DevTools protocol
//! (`common/browser.rs`).
//!
//! Checks that results stream into the table and the counters move, that the frame, the class
//! bars and the latency chart are drawn, that the page says "disconnected" while the daemon is
//! down and goes live again by itself when it is back, and that no script error or CSP
//! violation happened. Saves screenshots to `target/dashboard.png` (live, 1366x900),
//! `target/dashboard-laptop.png` (1366x657), `target/dashboard-tablet.png` (800x1280) and
//! `target/dashboard-disconnected.png`.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use common::browser::{Browser, Cdp, wait_for, when};
use common::daemon::{signal, spawn_run};

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

// ------------------------------------------------------------------ child processes

/// The daemon, killed when dropped.
struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let (child, log) = spawn_run(config);
        let d = Daemon { child, log };
        wait_for("the daemon's HTTP API", || {
            let log = d.log();
            when(log.contains("HTTP API listening addr="), (), || log)
        });
        d
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, as systemd stops it, and wait for it to exit.
    fn stop(mut self) {
        assert!(signal(&self.child, "-TERM"));
        let log = self.log.clone();
        let child = &mut self.child;
        wait_for("the daemon to stop after SIGTERM", || {
            child
                .try_wait()
                .unwrap()
                .ok_or_else(|| log.lock().unwrap().clone())
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the page

/// What the page shows, read from its elements (ids and `data-value` are the page's contract
/// with this test).
const SNAPSHOT: &str = r##"(() => {
  const $ = (id) => document.getElementById(id);
  if (!$("latency-chart")) return { loading: document.URL };
  const text = (id) => ($(id) ? $(id).textContent.trim() : null);
  const num = (id) => ($(id) && $(id).dataset.value !== undefined ? Number($(id).dataset.value) : null);
  const rows = [...document.querySelectorAll("#results tr[data-id]")];
  const img = $("frame");
  const canvas = $("latency-chart");
  let chart = 0;
  if (canvas.width && canvas.height) {
    const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    // Pixels of the p50 line (#38bdf8).
    for (let i = 0; i < px.length; i += 4) {
      if (Math.abs(px[i] - 56) < 30 && Math.abs(px[i + 1] - 189) < 30 && Math.abs(px[i + 2] - 248) < 30 && px[i + 3] > 128) chart++;
    }
  }
  return {
    rows: rows.length,
    newest: rows.length ? rows[0].dataset.id : null,
    first_row: rows.length ? rows[0].innerText : null,
    processed: num("processed"),
    fps: num("fps"),
    classes: [...document.querySelectorAll("#classes .class-count")].map((e) => Number(e.dataset.value)),
    rules: num("decided-rules"),
    conn: text("conn"),
    state: text("state"),
    camera: text("camera"),
    mqtt: text("mqtt"),
    model: text("model"),
    device: text("device"),
    frame: img.hidden ? 0 : img.naturalWidth,
    chart,
  };
})()"##;

fn snapshot(tab: &mut Cdp) -> Value {
    tab.eval(SNAPSHOT)
}

fn config(dir: &Path, http_port: u16) -> PathBuf {
    let path = dir.join("edge.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[device]
id = "dash-07"
line = "L4"
[source]
kind = "synthetic"
width = 320
height = 240
fps = 10
[store]
dir = "{}"
[http]
port = {http_port}
[mqtt.embedded]
port = 0
"#,
            dir.join("store").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn the_dashboard_shows_live_results_and_survives_a_daemon_restart() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    // A fixed port, so the restarted daemon is where the open page looks for it.
    let port = common::mosquitto::free_port();
    let config = config(tmp.path(), port);
    let daemon = Daemon::start(&config);

    let browser = Browser::start();
    let mut tab = browser.tab();
    tab.call("Runtime.enable", json!({}));
    tab.call("Log.enable", json!({}));
    let url = format!("http://127.0.0.1:{port}/");
    tab.call("Page.navigate", json!({ "url": url }));

    // Live: results in the table, counts, the frame, the chart, the device's state.
    let first = wait_for(
        "results, counts, the frame and the chart on the page",
        || {
            let s = snapshot(&mut tab);
            let ok = s["rows"].as_u64() >= Some(3)
                && s["processed"].as_f64() > Some(0.0)
                && s["classes"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|n| n.as_f64() > Some(0.0)))
                && s["conn"] == "live"
                && s["frame"].as_u64() == Some(320)
                && s["chart"].as_u64() > Some(0);
            when(ok, s.clone(), || {
                format!("page: {s}\ndaemon:\n{}", daemon.log())
            })
        },
    );
    eprintln!("first: {first}");
    assert_eq!(first["state"], "online", "{first}");
    assert_eq!(first["camera"], "ok", "{first}");
    assert_eq!(first["mqtt"], "connected", "{first}");
    assert_eq!(first["device"], "dash-07", "{first}");
    assert!(
        first["model"].as_str().unwrap().starts_with("none"),
        "{first}"
    );
    assert!(first["rules"].as_f64() > Some(0.0), "{first}");
    let row = first["first_row"].as_str().unwrap();
    assert!(row.contains("rules") && row.contains('%'), "{row}");

    // The counters and the table move on by themselves.
    let second = wait_for("the counters to move", || {
        std::thread::sleep(Duration::from_millis(500));
        let s = snapshot(&mut tab);
        let moved =
            s["processed"].as_f64() > first["processed"].as_f64() && s["newest"] != first["newest"];
        when(moved, s.clone(), || format!("page: {s}"))
    });
    eprintln!("second: {second}");
    assert!(second["fps"].as_f64() > Some(0.0), "{second}");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    // Let a few seconds of the chart accumulate for the picture.
    std::thread::sleep(Duration::from_secs(3));
    tab.screenshot(&target.join("dashboard.png"));
    // A 1366x768 laptop's browser window, and a tablet held upright.
    for (name, width, height) in [("laptop", 1366, 657), ("tablet", 800, 1280)] {
        tab.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        std::thread::sleep(Duration::from_millis(600));
        tab.screenshot(&target.join(format!("dashboard-{name}.png")));
    }
    tab.call("Emulation.clearDeviceMetricsOverride", json!({}));

    // The daemon goes away: the page says so.
    daemon.stop();
    let down = wait_for("the disconnected badge", || {
        let s = snapshot(&mut tab);
        let down = s["conn"]
            .as_str()
            .is_some_and(|c| c.contains("disconnected"));
        when(down, s.clone(), || format!("page: {s}"))
    });
    eprintln!("down: {down}");
    tab.screenshot(&target.join("dashboard-disconnected.png"));

    // It comes back on the same port: the stream reconnects, new results arrive.
    let daemon = Daemon::start(&config);
    let back = wait_for("the page to go live again with new results", || {
        let s = snapshot(&mut tab);
        let newer = s["newest"].as_str() > down["newest"].as_str();
        when(s["conn"] == "live" && newer, s.clone(), || {
            format!("page: {s}\ndaemon:\n{}", daemon.log())
        })
    });
    eprintln!("back: {back}");

    assert!(
        tab.page_errors.is_empty(),
        "errors on the page: {:#?}\nbrowser:\n{}",
        tab.page_errors,
        browser.log()
    );
    eprintln!("dashboard test took {:?}", started.elapsed());
}

#[test]
fn the_dashboard_shows_a_shadow_models_agreement() {
    const KEY: [u8; 32] = [41; 32];
    const TOKEN: &str = "dashboard-test-token-0123456789";
    let tmp = tempfile::tempdir().unwrap();
    let port = common::mosquitto::free_port();
    let config = config(tmp.path(), port);
    let token = tmp.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    // The model decides every frame, so the shadow has frames to compare at once.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "[http]\n",
        &format!("[http]\ntoken_file = \"{}\"\n", token.display()),
    );
    text += &format!(
        "[policy]\nmode = \"model\"\n[model]\nbuiltin = true\n[deploy]\ntrusted_keys = [\"{}\"]\n",
        common::public_hex(KEY)
    );
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start(&config);
    let api = |method: &str, path: &str, body: Vec<u8>, content_type: &str| {
        let url = format!("http://127.0.0.1:{port}{path}");
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(url)
            .header("Authorization", format!("Bearer {TOKEN}"))
            .header("Content-Type", content_type)
            .body(body)
            .unwrap();
        match ureq::run(req) {
            Ok(r) => r.status().as_u16(),
            Err(e) => panic!("{method} {path}: {e}\ndaemon:\n{}", daemon.log()),
        }
    };
    let bundle = common::signed_builtin("dash-candidate", KEY, |_, _, _| {});
    assert_eq!(
        api(
            "POST",
            "/api/v1/models?activate=false",
            bundle,
            "application/x-tar"
        ),
        201
    );
    assert_eq!(
        api(
            "POST",
            "/api/v1/shadow",
            br#"{"version":"dash-candidate","sample":1}"#.to_vec(),
            "application/json"
        ),
        200
    );

    let browser = Browser::start();
    let mut tab = browser.tab();
    tab.call("Runtime.enable", json!({}));
    tab.call(
        "Page.navigate",
        json!({ "url": format!("http://127.0.0.1:{port}/") }),
    );
    let line = wait_for("the shadow line on the page", || {
        let v = tab.eval(
            r#"(() => { const e = document.getElementById("shadow");
                 return e && !e.hidden ? e.textContent : null; })()"#,
        );
        let text = v.as_str().unwrap_or("").to_string();
        when(text.contains("agrees on 100.0% of"), text.clone(), || {
            format!("shadow line: {v}\ndaemon:\n{}", daemon.log())
        })
    });
    eprintln!("{line}");
    assert!(
        line.starts_with("shadow dash-candidate: agrees on 100.0% of"),
        "{line}"
    );
    assert!(line.contains("ms (active"), "{line}");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    tab.screenshot(&target.join("dashboard-shadow.png"));
    assert!(tab.page_errors.is_empty(), "{:#?}", tab.page_errors);
}
