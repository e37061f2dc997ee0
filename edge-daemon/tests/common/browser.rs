//! Headless Chromium (Debian's `chromium`, installed by `tests/run.sh`) driven over the
//! DevTools protocol through the small WebSocket client below (no extra crates). Used by the
//! dashboard test here and, through `#[path]`, by weld-trainer's labelling-page test; the
//! including crate declares `output` beside this module.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::output::collect;

/// Every wait of a browser test is bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);

/// Polls `f` until it gives `Ok`, at most [`WAIT`]; panics with `what` and the last `Err` (what
/// was seen instead).
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
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
pub fn when<T>(ok: bool, v: T, seen: impl FnOnce() -> String) -> Result<T, String> {
    if ok { Ok(v) } else { Err(seen()) }
}

/// Headless Chromium with a fresh profile, killed when dropped.
pub struct Browser {
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
    pub fn start() -> Browser {
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
    pub fn tab(&self) -> Cdp {
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

    pub fn log(&self) -> String {
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
pub struct Cdp {
    stream: TcpStream,
    next_id: u64,
    /// Script exceptions and security (CSP) or script errors the page logged.
    pub page_errors: Vec<String>,
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
    pub fn call(&mut self, method: &str, params: Value) -> Value {
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
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    pub fn screenshot(&mut self, path: &Path) {
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
