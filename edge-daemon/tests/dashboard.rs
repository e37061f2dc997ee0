//! The live dashboard in a real browser: the `weld-edge` binary with a synthetic camera, and
//! Debian's headless Chromium (`tests/run.sh` installs it) driven over the DevTools protocol,
//! through the small WebSocket client below (no extra crates).
//!
//! Checks that results stream into the table and the counters move, that the frame, the class
//! bars and the latency chart are drawn, that the page says "disconnected" while the daemon is
//! down and goes live again by itself when it is back, and that no script error or CSP
//! violation happened. Saves screenshots to `target/dashboard.png` (live, 1366x900),
//! `target/dashboard-laptop.png` (1366x657), `target/dashboard-tablet.png` (800x1280) and
//! `target/dashboard-disconnected.png`.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use common::daemon::{collect, signal, spawn_run};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Every wait in this test is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ child processes

/// Polls `f` until it gives `Ok`, at most [`WAIT`]; panics with `what` and the last `Err` (what
/// was seen instead).
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(seen) => assert!(
                start.elapsed() < WAIT,
                "timed out after {WAIT:?} waiting for {what}; seen:\n{seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `Ok(v)` when `ok`, else `Err(seen)`.
fn when<T>(ok: bool, v: T, seen: impl FnOnce() -> String) -> Result<T, String> {
    if ok { Ok(v) } else { Err(seen()) }
}

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

/// Headless Chromium with a fresh profile, killed when dropped.
struct Browser {
    child: Child,
    log: Arc<Mutex<String>>,
    devtools: String,
    _profile: tempfile::TempDir,
}

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("Chromium is not installed: run tests/run.sh (it installs the chromium package)")
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--mute-audio",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--window-size=1366,900",
                // A page nobody looks at still runs its timers at full speed.
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = collect(child.stderr.take().unwrap());
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let devtools = wait_for("Chromium's DevTools endpoint", || {
            let l = log.lock().unwrap();
            const MARK: &str = "DevTools listening on ws://";
            match l.find(MARK) {
                Some(at) => Ok(l[at + MARK.len()..]
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_string()),
                None => Err(l.clone()),
            }
        });
        Browser {
            child,
            log,
            devtools,
            _profile: profile,
        }
    }

    /// A DevTools session on the browser's first tab.
    fn tab(&self) -> Cdp {
        let list = ureq::get(&format!("http://{}/json/list", self.devtools))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let targets: Vec<Value> = serde_json::from_str(&list).unwrap();
        let page = targets
            .iter()
            .find(|t| t["type"] == "page")
            .unwrap_or_else(|| panic!("no page target in {list}"));
        Cdp::connect(page["webSocketDebuggerUrl"].as_str().unwrap())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ DevTools protocol

/// A DevTools protocol session over a minimal WebSocket client (RFC 6455: masked text frames
/// out; text, continuation, ping and close frames in).
struct Cdp {
    stream: TcpStream,
    next_id: u64,
    /// Script exceptions and security (CSP) or script errors the page logged.
    page_errors: Vec<String>,
}

impl Cdp {
    fn connect(url: &str) -> Cdp {
        let rest = url.strip_prefix("ws://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut stream = TcpStream::connect(host).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
            assert!(head.len() < 16 * 1024, "no end to the handshake");
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "handshake: {head}");
        Cdp {
            stream,
            next_id: 0,
            page_errors: Vec::new(),
        }
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mut frame = vec![0x80 | opcode];
        let n = payload.len();
        if n < 126 {
            frame.push(0x80 | n as u8);
        } else if n <= usize::from(u16::MAX) {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
        let mask = [0x5a, 0x17, 0xc3, 0x8e];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    fn recv(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.stream.read_exact(&mut h).unwrap();
            let (fin, opcode, masked) = (h[0] & 0x80 != 0, h[0] & 0x0f, h[1] & 0x80 != 0);
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.stream.read_exact(&mut b).unwrap();
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.stream.read_exact(&mut b).unwrap();
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            if masked {
                self.stream.read_exact(&mut mask).unwrap();
            }
            let mut data = vec![0u8; usize::try_from(len).unwrap()];
            self.stream.read_exact(&mut data).unwrap();
            if masked {
                data.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b ^= mask[i % 4]);
            }
            match opcode {
                0x8 => panic!("the browser closed the DevTools connection"),
                0x9 => self.send_frame(0xA, &data),
                0xA => {}
                _ => {
                    message.extend_from_slice(&data);
                    if fin {
                        return String::from_utf8(message).unwrap();
                    }
                }
            }
        }
    }

    /// Calls `method` and returns its result; events that arrive meanwhile are checked for
    /// page errors.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.send_frame(0x1, msg.as_bytes());
        loop {
            let msg: Value = serde_json::from_str(&self.recv()).unwrap();
            if msg["id"] == id {
                if let Some(e) = msg.get("error") {
                    panic!("{method}: {e}");
                }
                return msg["result"].clone();
            }
            match msg["method"].as_str() {
                Some("Runtime.exceptionThrown") => self
                    .page_errors
                    .push(msg["params"]["exceptionDetails"].to_string()),
                Some("Log.entryAdded") => {
                    let e = &msg["params"]["entry"];
                    // Network errors are expected while the daemon is down.
                    if e["level"] == "error" && e["source"] != "network" {
                        self.page_errors.push(e.to_string());
                    }
                }
                _ => {}
            }
        }
    }

    /// The value of a JavaScript expression (JSON-serialisable).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64_decode(r["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c) << (18 - 6 * i);
        }
        let n = chunk.len() - 1; // 2 chars: 1 byte, 3: 2, 4: 3
        out.extend_from_slice(&acc.to_be_bytes()[1..=n]);
    }
    out
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
