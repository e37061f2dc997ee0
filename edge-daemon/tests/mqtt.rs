//! MQTT end to end (DESIGN.md "MQTT"): the real `weld-edge` binary publishing to a real broker
//! (its embedded rumqttd, or mosquitto, plain and with TLS client certificates), read by real
//! subscribers (a rumqttc client, and `mosquitto_sub`). Loopback only; every wait has a
//! deadline and says what it waited for.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{signal, spawn_run};
use common::mosquitto::{Mosquitto, which};
use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::de::DeserializeOwned;
use weld_core::Inspection;
use weld_core::messages::{CommandReply, DeviceState, Stats, Status};
use weld_edge::store::{Store, StoreConfig};

const LINE: &str = "L9";
/// A command token long enough for the daemon (at least 16 characters).
const TOKEN: &str = "test-token-0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// The daemon

/// A `weld-edge run` child: stdout discarded (results go to MQTT), stderr (the log) collected.
struct Daemon {
    name: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(name: &str, config: &Path) -> Daemon {
        let (child, log) = spawn_run(config);
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The first log line containing `needle`, waiting up to `timeout` for it.
    fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{}: exited ({status}) before logging {needle:?}\n--- log ---\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no log line with {needle:?} after {timeout:?}\n--- log ---\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|c| c.try_wait().unwrap()),
            Some(None)
        )
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().unwrap();
        assert!(
            signal(child, sig),
            "{}: kill {sig} {} failed",
            self.name,
            child.id()
        );
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                // Let the log reader catch the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{}: still running {timeout:?} after the signal\n--- log ---\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, like systemd; it must exit successfully within 15 s.
    fn stop(&mut self) {
        self.signal("-TERM");
        let status = self.wait_exit(Duration::from_secs(15));
        assert!(
            status.success(),
            "{}: SIGTERM gave {status}\n--- log ---\n{}",
            self.name,
            self.log()
        );
    }

    /// SIGKILL: no clean disconnect, the kernel closes the socket.
    fn kill(&mut self) {
        self.signal("-KILL");
        self.wait_exit(Duration::from_secs(5));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `dir/{device}.toml`: a synthetic camera (small frames, 20 fps), the store in
/// `dir/store-{device}`, nothing on stdout, and `extra` (the `[mqtt]` sections, `[policy]`).
fn config(dir: &Path, device: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{device}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[device]
id = "{device}"
line = "{LINE}"
[source]
kind = "synthetic"
width = 160
height = 120
fps = 20
[pipeline]
workers = 1
[store]
dir = "{store}"
[output]
stdout_jsonl = false
[http]
port = 0
{extra}
"#,
            store = store_dir(dir, device).display(),
        ),
    )
    .unwrap();
    path
}

fn store_dir(dir: &Path, device: &str) -> PathBuf {
    dir.join(format!("store-{device}"))
}

fn prefix(device: &str) -> String {
    format!("weld/{LINE}/{device}")
}

// ---------------------------------------------------------------------------------------------
// The subscriber

#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

impl Msg {
    fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "{}: not the expected JSON ({e}): {}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

enum Item {
    Msg(Msg),
    SubAck,
    Error(String),
}

/// A rumqttc client on its own thread, subscribed to some filters; what arrives is queued.
struct Sub {
    client: Client,
    rx: Receiver<Item>,
    /// Messages [`Sub::wait`] passed over, oldest first: later waits and [`Sub::next`] see
    /// them first.
    backlog: RefCell<VecDeque<Msg>>,
    name: String,
}

impl Sub {
    /// Connects and subscribes (QoS 1); returns once the broker acknowledged every filter.
    fn connect(port: u16, name: &str, filters: &[&str]) -> Sub {
        let mut o = MqttOptions::new(name, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in connection.iter() {
                let item = match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => Item::Msg(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(Event::Incoming(Packet::SubAck(_))) => Item::SubAck,
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => continue,
                    Err(e) => {
                        std::thread::sleep(Duration::from_millis(100));
                        Item::Error(e.to_string())
                    }
                };
                if tx.send(item).is_err() {
                    return;
                }
            }
        });
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).unwrap();
        }
        let sub = Sub {
            client,
            rx,
            backlog: RefCell::new(VecDeque::new()),
            name: name.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut acked = 0;
        while acked < filters.len() {
            match sub
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Item::SubAck) => acked += 1,
                Ok(Item::Error(e)) => panic!("{name}: cannot connect to 127.0.0.1:{port}: {e}"),
                Ok(Item::Msg(_)) => panic!("{name}: a message before the subscription"),
                Err(_) => panic!("{name}: no SUBACK from 127.0.0.1:{port} within 5 s"),
            }
        }
        sub
    }

    /// The next message before `deadline`.
    fn next(&self, deadline: Instant) -> Option<Msg> {
        if let Some(m) = self.backlog.borrow_mut().pop_front() {
            return Some(m);
        }
        self.recv(deadline)
    }

    /// The next message from the connection before `deadline`.
    fn recv(&self, deadline: Instant) -> Option<Msg> {
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Item::Msg(m)) => return Some(m),
                Ok(Item::SubAck) => {}
                Ok(Item::Error(e)) => panic!("{}: connection failed: {e}", self.name),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => panic!("{}: client thread ended", self.name),
            }
        }
    }

    /// The first message (backlog first) for which `pred` holds, within `timeout`; the others
    /// stay in the backlog.
    fn wait(&self, what: &str, timeout: Duration, mut pred: impl FnMut(&Msg) -> bool) -> Msg {
        {
            let mut backlog = self.backlog.borrow_mut();
            if let Some(i) = backlog.iter().position(&mut pred) {
                return backlog.remove(i).unwrap();
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline) {
                Some(m) if pred(&m) => return m,
                Some(m) => self.backlog.borrow_mut().push_back(m),
                None => {
                    let backlog = self.backlog.borrow();
                    let last: Vec<String> = backlog
                        .iter()
                        .skip(backlog.len().saturating_sub(6))
                        .map(|m| {
                            let p = String::from_utf8_lossy(&m.payload);
                            format!("{} {}", m.topic, p.chars().take(200).collect::<String>())
                        })
                        .collect();
                    panic!(
                        "{}: no {what} within {timeout:?}; {} other messages, the last ones:\n{}",
                        self.name,
                        backlog.len(),
                        last.join("\n")
                    );
                }
            }
        }
    }

    /// Every message that arrives within `d`.
    fn collect(&self, d: Duration) -> Vec<Msg> {
        let deadline = Instant::now() + d;
        std::iter::from_fn(|| self.next(deadline)).collect()
    }

    /// A status message with `state` on `device`'s status topic.
    fn wait_status(&self, device: &str, state: DeviceState, timeout: Duration) -> Status {
        let topic = format!("{}/status", prefix(device));
        self.wait(&format!("{state:?} status on {topic}"), timeout, |m| {
            m.topic == topic && m.json::<Status>().state == state
        })
        .json()
    }

    fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .unwrap();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

/// The retained message a fresh subscriber gets on `topic` within 2 s, if any.
fn retained(port: u16, name: &str, topic: &str) -> Option<Msg> {
    let sub = Sub::connect(port, name, &[topic]);
    let got = sub.collect(Duration::from_secs(2));
    assert!(got.len() <= 1, "{name}: more than one message: {got:?}");
    if let Some(m) = got.first() {
        assert!(m.retain, "{name}: {topic} was not sent as retained: {m:?}");
    }
    got.into_iter().next()
}

// ---------------------------------------------------------------------------------------------
// Programs

/// Runs a command to its end, killing it (and failing) after `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn mosquitto_sub() -> Command {
    Command::new(which("mosquitto_sub"))
}

/// `openssl` with `args`, in `dir`; fails the test with its stderr.
fn openssl(dir: &Path, args: &[&str]) {
    let out = run_bounded(
        Command::new(which("openssl")).args(args).current_dir(dir),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`{name}.crt`, `{name}.key`).
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=weld test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `{name}.crt` (key `{name}.key`) signed by the CA `ca`, with extensions `ext`.
fn make_cert(dir: &Path, name: &str, ca: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn the_embedded_broker_serves_status_results_and_stats_to_real_subscribers() {
    let tmp = tempfile::tempdir().unwrap();
    let device = "emb-01";
    let cfg = config(
        tmp.path(),
        device,
        "[mqtt]\nstats_every_s = 1\n[mqtt.embedded]\nport = 0\n",
    );
    let mut d = Daemon::start(device, &cfg);
    let line = d.wait_log("embedded MQTT broker listening", Duration::from_secs(15));
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("addr in {line:?}: {e}"));
    assert!(addr.ip().is_loopback(), "{line}");
    let port = addr.port();

    let sub = Sub::connect(port, "test-emb", &["weld/#"]);
    let status = sub.wait_status(device, DeviceState::Online, Duration::from_secs(10));
    assert_eq!(
        (status.device.as_str(), status.line.as_str()),
        (device, LINE)
    );
    assert!(status.reasons.is_empty(), "{status:?}");

    let result_topic = format!("{}/result", prefix(device));
    let mut results = Vec::new();
    while results.len() < 3 {
        let m = sub.wait("a result", Duration::from_secs(10), |m| {
            m.topic == result_topic
        });
        let r: Inspection = m.json();
        assert_eq!(
            (r.device.as_str(), r.line.as_str()),
            (device, LINE),
            "{r:?}"
        );
        results.push(r);
    }
    let stats_topic = format!("{}/stats", prefix(device));
    let stats: Stats = sub
        .wait("stats with processed frames", Duration::from_secs(5), |m| {
            m.topic == stats_topic && m.json::<Stats>().frames.processed > 0
        })
        .json();
    assert_eq!((stats.device.as_str(), stats.line.as_str()), (device, LINE));
    assert!(stats.frames.captured >= stats.frames.processed, "{stats:?}");

    // A second, independent subscriber: the mosquitto command-line client.
    let out = run_bounded(
        mosquitto_sub().args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "weld/#",
            "-v",
            "-C",
            "3",
            "-W",
            "10",
        ]),
        Duration::from_secs(15),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mosquitto_sub: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let want = format!("{}/", prefix(device));
    for l in &lines {
        assert!(l.starts_with(&want), "not a {want}… line: {l}");
        let (_, payload) = l.split_once(' ').unwrap();
        serde_json::from_str::<serde_json::Value>(payload).unwrap();
    }
    // A new subscriber gets the retained status at once.
    let status_line = format!("{}/status ", prefix(device));
    assert!(lines.iter().any(|l| l.starts_with(&status_line)), "{text}");

    // A fresh subscriber gets the status as a retained message.
    let s = retained(
        port,
        "test-emb-retained",
        &format!("{}/status", prefix(device)),
    )
    .expect("no retained status on the embedded broker");
    assert_eq!(s.json::<Status>().state, DeviceState::Online);

    drop(sub);
    d.stop();
}

#[test]
fn mosquitto_gets_every_result_in_order_then_offline_on_stop_and_the_will_on_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker"));
    let device = "mq-01";
    let cfg = config(
        tmp.path(),
        device,
        &format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n",
            broker.port
        ),
    );
    let sub = Sub::connect(broker.port, "test-mq", &[&format!("{}/#", prefix(device))]);
    let result_topic = format!("{}/result", prefix(device));
    let status_topic = format!("{}/status", prefix(device));

    // Run 1: results while it runs, then SIGTERM.
    let mut d = Daemon::start("run 1", &cfg);
    let mut results: Vec<Inspection> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(12);
    while results.len() < 40 {
        let Some(m) = sub.next(deadline) else {
            panic!(
                "only {} results within 12 s\n--- log ---\n{}",
                results.len(),
                d.log()
            );
        };
        if m.topic == result_topic {
            results.push(m.json());
        }
    }
    d.stop();
    // What was published before the stop, then the `offline` status.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stopped = loop {
        let Some(m) = sub.next(deadline) else {
            panic!("no offline status within 5 s of the exit\n{}", d.log());
        };
        if m.topic == result_topic {
            results.push(m.json());
        } else if m.topic == status_topic {
            let s: Status = m.json();
            if s.state == DeviceState::Offline {
                break s;
            }
        }
    };
    assert_eq!(stopped.reasons, ["stopped"], "{stopped:?}");
    let seqs: Vec<u64> = results.iter().map(|r| r.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "results out of order or with gaps: {seqs:?}"
    );
    // Every result the daemon made (its history) reached the subscriber, once, in order.
    let store = Store::open(&store_dir(tmp.path(), device), &StoreConfig::default()).unwrap();
    let history = store.history().after(None, 1000).unwrap();
    assert_eq!(
        results.iter().map(|r| r.id).collect::<Vec<_>>(),
        history.iter().map(|r| r.id).collect::<Vec<_>>(),
        "MQTT results (seq {:?}..{:?}) differ from the history (seq {:?}..{:?})",
        results.first().map(|r| r.seq),
        results.last().map(|r| r.seq),
        history.first().map(|r| r.seq),
        history.last().map(|r| r.seq),
    );
    assert_eq!(store.outbox().depth().len, 0, "the outbox drained");
    drop(store);
    // After a clean stop nothing more is published: in particular not the last will.
    let after_stop: Vec<String> = sub
        .collect(Duration::from_millis(500))
        .iter()
        .map(|m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload)))
        .collect();
    let retained_after_stop: Status = retained(broker.port, "test-mq-retained-1", &status_topic)
        .expect("no retained status after SIGTERM")
        .json();
    let client_id = format!("weld-edge-{device}");
    let broker_saw: Vec<String> = std::fs::read_to_string(tmp.path().join("broker/mosquitto.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&client_id) && !l.contains("PUBACK") && !l.contains("PUBLISH"))
        .map(String::from)
        .collect();

    // Run 2: online, then SIGKILL; the broker publishes the last will.
    let run2_started = chrono::Utc::now();
    let mut d = Daemon::start("run 2", &cfg);
    sub.wait_status(device, DeviceState::Online, Duration::from_secs(10));
    sub.wait("a result of run 2", Duration::from_secs(5), |m| {
        m.topic == result_topic
    });
    let killed = Instant::now();
    d.kill();
    let will = sub.wait_status(device, DeviceState::Offline, Duration::from_secs(10));
    assert_eq!(will.reasons, ["connection lost"], "{will:?}");
    assert!(will.ts >= run2_started, "not the will of run 2: {will:?}");
    assert_eq!((will.device.as_str(), will.line.as_str()), (device, LINE));
    eprintln!("last will {:?} after SIGKILL", killed.elapsed());
    let s = retained(broker.port, "test-mq-retained-2", &status_topic)
        .expect("no retained status after SIGKILL");
    assert_eq!(s.json::<Status>().reasons, ["connection lost"]);

    // Checked last, so that the will above is checked whatever happens here.
    assert!(
        retained_after_stop.state == DeviceState::Offline
            && retained_after_stop.reasons == ["stopped"]
            && after_stop.is_empty(),
        "after SIGTERM the retained status is {:?} {:?} (want offline, [\"stopped\"]); \
         published after the stop:\n{}\nthe broker's log of the run-1 client:\n{}",
        retained_after_stop.state,
        retained_after_stop.reasons,
        after_stop.join("\n"),
        broker_saw.join("\n")
    );
}

#[test]
fn commands_are_authenticated_validated_and_never_taken_from_retained_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker"));
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mqtt = |extra: &str| {
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\n{extra}\n\
             # Rules alone with a low bar: next to no frame is uncertain, so the captured\n\
             # frames that are not uncertain are exactly the requested ones.\n\
             [policy]\nmode = \"rules\"\nrules_confident_at = 0.01\n",
            broker.port
        )
    };
    let (with, without) = ("cmd-01", "cmd-02");
    let cfg_with = config(
        tmp.path(),
        with,
        &mqtt(&format!(
            "[mqtt.commands]\ntoken_file = \"{}\"",
            token_file.display()
        )),
    );
    let cfg_without = config(tmp.path(), without, &mqtt(""));

    // A retained command waiting on the broker before the daemon connects.
    let capture_topic = format!("{}/cmd/capture", prefix(with));
    let out = run_bounded(
        Command::new(which("mosquitto_pub")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-r",
            "-t",
            &capture_topic,
            "-m",
            &format!(r#"{{"token":"{TOKEN}","frames":5,"request_id":"old"}}"#),
        ]),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{out:?}\nmosquitto on {}: {}",
        broker.port,
        broker.log()
    );

    let sub = Sub::connect(
        broker.port,
        "test-cmd",
        &[
            &format!("weld/{LINE}/+/cmd/+/reply"),
            &format!("weld/{LINE}/+/status"),
            &format!("{}/result", prefix(with)),
        ],
    );
    let mut a = Daemon::start(with, &cfg_with);
    let mut b = Daemon::start(without, &cfg_without);
    let reply_topic = |device: &str, name: &str| format!("{}/cmd/{name}/reply", prefix(device));
    let reply = |device: &str, name: &str, what: &str| -> CommandReply {
        let topic = reply_topic(device, name);
        sub.wait(what, Duration::from_secs(10), |m| m.topic == topic)
            .json()
    };

    let r = reply(with, "capture", "the reply to the retained capture");
    assert!(!r.ok, "a retained command ran: {r:?}");
    assert_eq!(r.error.as_deref(), Some("retained"), "{r:?}");
    // The daemon deleted it: a new subscriber gets nothing retained on the command topic.
    assert!(
        retained(broker.port, "test-cmd-retained", &capture_topic).is_none(),
        "the retained command is still on the broker"
    );
    // Both daemons are subscribed once their first status is out.
    sub.wait_status(without, DeviceState::Online, Duration::from_secs(10));

    sub.publish(
        &capture_topic,
        &format!(r#"{{"token":"{TOKEN}","frames":3,"request_id":"r1"}}"#),
    );
    let r = reply(with, "capture", "the capture reply");
    assert!(r.ok, "{r:?}");
    assert_eq!(r.request_id.as_deref(), Some("r1"));
    assert_eq!(r.result.as_ref().unwrap()["frames_pending"], 3, "{r:?}");

    let thresholds = format!("{}/cmd/thresholds", prefix(with));
    sub.publish(
        &thresholds,
        &format!(r#"{{"token":"{TOKEN}","model_confident_at":1.5,"request_id":"r2"}}"#),
    );
    let r = reply(with, "thresholds", "the invalid thresholds reply");
    assert_eq!(
        (r.ok, r.error.as_deref()),
        (false, Some("invalid")),
        "{r:?}"
    );
    assert_eq!(r.request_id.as_deref(), Some("r2"));
    assert!(
        r.detail.as_deref().unwrap().contains("model_confident_at"),
        "{r:?}"
    );

    sub.publish(
        &thresholds,
        &format!(r#"{{"token":"{TOKEN}","model_confident_at":0.75}}"#),
    );
    let r = reply(with, "thresholds", "the thresholds reply");
    assert!(r.ok, "{r:?}");
    assert_eq!(
        r.result.as_ref().unwrap()["model_confident_at"],
        0.75,
        "{r:?}"
    );

    sub.publish(
        &capture_topic,
        r#"{"token":"not-the-token-0123456789","frames":3,"request_id":"r3"}"#,
    );
    let r = reply(with, "capture", "the wrong-token reply");
    assert_eq!(
        (r.ok, r.error.as_deref()),
        (false, Some("unauthorized")),
        "{r:?}"
    );
    assert_eq!(r.request_id.as_deref(), Some("r3"));

    sub.publish(&capture_topic, "capture 3 frames please");
    let r = reply(with, "capture", "the not-JSON reply");
    assert_eq!(
        (r.ok, r.error.as_deref()),
        (false, Some("malformed")),
        "{r:?}"
    );

    // No token configured: every command is refused.
    for name in ["capture", "thresholds", "deploy"] {
        sub.publish(
            &format!("{}/cmd/{name}", prefix(without)),
            &format!(r#"{{"token":"{TOKEN}","frames":3,"rules_confident_at":0.5}}"#),
        );
        let r = reply(without, name, "the reply of the daemon without a token");
        assert_eq!(
            (r.ok, r.error.as_deref()),
            (false, Some("unauthorized")),
            "{r:?}"
        );
    }

    // A few more results, so the requested frames have gone through the store.
    let result_topic = format!("{}/result", prefix(with));
    for _ in 0..10 {
        sub.wait("a result after the capture", Duration::from_secs(5), |m| {
            m.topic == result_topic
        });
    }
    a.stop();
    b.stop();

    let store = Store::open(&store_dir(tmp.path(), with), &StoreConfig::default()).unwrap();
    let history = store.history().after(None, 1000).unwrap();
    let uncertain = history.iter().filter(|r| r.uncertain).count();
    let captures = store.captures().list(None, 1000).unwrap();
    let requested = captures.iter().filter(|c| !c.uncertain).count();
    eprintln!(
        "{} results, {uncertain} uncertain, {} captures",
        history.len(),
        captures.len()
    );
    assert_eq!(
        requested,
        3,
        "captured frames that were not uncertain: {requested} (of {} captures, {uncertain} \
         uncertain results in {} results); the capture command asked for 3 and the retained \
         one for 5 must not count",
        captures.len(),
        history.len()
    );
    assert_eq!(store.captures().len(), uncertain + 3);
}

/// A retained command published while the daemon is connected reaches it as a live message:
/// in MQTT 3.1.1 the broker clears the retain flag on messages it forwards to existing
/// subscriptions, so the daemon cannot see that it was retained. It runs once; the daemon then
/// deletes the retained copy, so it never runs again on a reconnect or restart.
#[test]
fn a_retained_command_published_while_connected_runs_once_and_is_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker"));
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let device = "cmd-03";
    let cfg = config(
        tmp.path(),
        device,
        &format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\n[mqtt.commands]\ntoken_file = \"{}\"\n",
            broker.port,
            token_file.display()
        ),
    );
    let sub = Sub::connect(
        broker.port,
        "test-cmd-live",
        &[
            &format!("{}/cmd/+/reply", prefix(device)),
            &format!("{}/status", prefix(device)),
        ],
    );
    let mut d = Daemon::start(device, &cfg);
    sub.wait_status(device, DeviceState::Online, Duration::from_secs(10));
    let topic = format!("{}/cmd/capture", prefix(device));
    sub.client
        .publish(
            topic.as_str(),
            QoS::AtLeastOnce,
            true,
            format!(r#"{{"token":"{TOKEN}","frames":2,"request_id":"live"}}"#).into_bytes(),
        )
        .unwrap();
    let reply_topic = format!("{topic}/reply");
    let r: CommandReply = sub
        .wait("the reply", Duration::from_secs(10), |m| {
            m.topic == reply_topic
        })
        .json();
    assert!(r.ok, "{r:?}");
    // The daemon deletes the retained copy right after answering.
    let t = Instant::now();
    while retained(broker.port, "test-cmd-live-retained", &topic).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the retained command is still on the broker"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.stop();

    // A restart finds nothing to run again.
    let mut d = Daemon::start(device, &cfg);
    sub.wait_status(device, DeviceState::Online, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    d.stop();
    let replies = sub
        .collect(Duration::from_millis(300))
        .into_iter()
        .filter(|m| m.topic == reply_topic)
        .count();
    assert_eq!(replies, 0, "the command was answered again after a restart");
    let captures = Store::open(&store_dir(tmp.path(), device), &StoreConfig::default())
        .unwrap()
        .captures()
        .list(None, 1000)
        .unwrap()
        .iter()
        .filter(|c| !c.uncertain)
        .count();
    assert_eq!(captures, 2, "frames captured on request");
}

#[test]
fn tls_with_client_certificates_delivers_and_a_wrong_ca_is_refused_without_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_ca(&pki, "ca");
    make_ca(&pki, "other-ca");
    make_cert(
        &pki,
        "server",
        "ca",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    );
    make_cert(
        &pki,
        "client",
        "ca",
        "weld-edge-test",
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    );
    let p = |f: &str| pki.join(f).display().to_string();
    let mut broker = Mosquitto::start_with(
        &tmp.path().join("broker"),
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            p("ca.crt"),
            p("server.crt"),
            p("server.key")
        ),
    );
    let port = broker.port.to_string();
    let tls_sub = |topic: &str, count: &str, wait_s: &str| {
        let mut c = mosquitto_sub();
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            &p("ca.crt"),
            "--cert",
            &p("client.crt"),
            "--key",
            &p("client.key"),
            "-t",
            topic,
            "-v",
            "-C",
            count,
            "-W",
            wait_s,
        ]);
        c
    };
    let mqtt = |ca: &str| {
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n[mqtt.tls]\nca_file = \"{}\"\n\
             client_cert = \"{}\"\nclient_key = \"{}\"\n",
            p(ca),
            p("client.crt"),
            p("client.key")
        )
    };

    // The right CA and a client certificate: results arrive.
    let good = "tls-01";
    let mut d = Daemon::start(good, &config(tmp.path(), good, &mqtt("ca.crt")));
    let topic = format!("{}/result", prefix(good));
    let out = run_bounded(&mut tls_sub(&topic, "3", "10"), Duration::from_secs(15));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mosquitto_sub over TLS: {:?} {}\n{text}\n--- daemon log ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for l in lines {
        let payload = l
            .strip_prefix(&format!("{topic} "))
            .unwrap_or_else(|| panic!("not a {topic} line: {l}"));
        let r: Inspection = serde_json::from_str(payload).unwrap();
        assert_eq!((r.device.as_str(), r.line.as_str()), (good, LINE));
    }
    d.wait_log("MQTT connected", Duration::from_secs(1));
    d.stop();

    // A CA that did not sign the broker's certificate: nothing is delivered, the daemon says
    // why and keeps running (and retrying) until it is stopped.
    let bad = "tls-02";
    let mut d = Daemon::start(bad, &config(tmp.path(), bad, &mqtt("other-ca.crt")));
    let line = d.wait_log("cannot reach the MQTT broker", Duration::from_secs(10));
    eprintln!("{line}");
    let lower = line.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("issuer") || lower.contains("tls"),
        "the error does not name the TLS problem: {line}"
    );
    let topic = format!("{}/#", prefix(bad));
    let out = run_bounded(&mut tls_sub(&topic, "1", "3"), Duration::from_secs(10));
    assert!(
        out.stdout.is_empty(),
        "delivered through an untrusted broker: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(d.running(), "the daemon died:\n{}", d.log());
    assert!(!d.log().contains("MQTT connected"), "{}", d.log());
    d.stop();
    let log = std::fs::read_to_string(tmp.path().join("broker/mosquitto.log")).unwrap_or_default();
    broker.stop();
    assert!(
        log.contains("OpenSSL Error") || log.contains("unknown ca") || log.contains("alert"),
        "mosquitto saw no TLS failure:\n{log}"
    );
}

/// A broker that wants a user name and password: the daemon's credentials from
/// `username` + `password_file` get its results through; a wrong password is refused by the
/// broker, logged, and the daemon keeps running (its results wait in the outbox).
#[test]
fn username_and_password_from_a_file_are_used_and_a_wrong_one_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let passwd = tmp.path().join("passwd");
    let out = run_bounded(
        Command::new(which("mosquitto_passwd")).args([
            "-b",
            "-c",
            passwd.to_str().unwrap(),
            "line7",
            "s3cret-pass",
        ]),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broker = Mosquitto::start_with(
        &tmp.path().join("broker"),
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            passwd.display()
        ),
    );
    let good = tmp.path().join("good-password");
    std::fs::write(&good, "s3cret-pass\n").unwrap();
    let bad = tmp.path().join("bad-password");
    std::fs::write(&bad, "guess\n").unwrap();
    let mqtt = |device: &str, file: &Path| {
        config(
            tmp.path(),
            device,
            &format!(
                "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nusername = \"line7\"\npassword_file = \"{}\"\n",
                broker.port,
                file.display()
            ),
        )
    };

    let mut d = Daemon::start("auth-01", &mqtt("auth-01", &good));
    let out = run_bounded(
        mosquitto_sub().args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-u",
            "line7",
            "-P",
            "s3cret-pass",
            "-t",
            &format!("{}/result", prefix("auth-01")),
            "-C",
            "2",
            "-W",
            "15",
        ]),
        Duration::from_secs(20),
    );
    d.stop();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}\n{}", d.log());
    for l in text.lines() {
        serde_json::from_str::<Inspection>(l).unwrap();
    }

    let mut d = Daemon::start("auth-02", &mqtt("auth-02", &bad));
    let line = d.wait_log("cannot reach the MQTT broker", Duration::from_secs(10));
    assert!(
        line.contains("BadUserNamePassword") || line.contains("NotAuthorized"),
        "{line}"
    );
    assert!(d.running(), "the daemon stopped on a refused login");
    d.stop();
}

/// Serves `files` (path -> body) over HTTP/1.1 on a free loopback port, one request per
/// connection, for `deploy` commands to fetch; 404 for anything else. Ends with the test.
fn serve_files(files: Vec<(String, Vec<u8>)>) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // The rest of the head.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let head = |status: &str, len: usize| {
                format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
            };
            match files.iter().find(|(p, _)| p == path) {
                Some((_, body)) => {
                    let _ = stream.write_all(head("200 OK", body.len()).as_bytes());
                    let _ = stream.write_all(body);
                }
                None => {
                    let _ = stream.write_all(head("404 Not Found", 0).as_bytes());
                }
            }
        }
    });
    port
}

#[test]
fn a_deploy_command_fetches_checks_and_runs_the_bundle() {
    const KEY: [u8; 32] = [31; 32];
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker"));
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let good = common::signed_builtin("mqtt-v1", KEY, |_, _, _| {});
    let untrusted = common::signed_builtin("mqtt-v2", [32; 32], |_, _, _| {});
    let sha = |b: &[u8]| weld_core::bundle::sha256_hex(b);
    let (good_sha, untrusted_sha) = (sha(&good), sha(&untrusted));
    let files = serve_files(vec![
        ("/good.bundle".into(), good),
        ("/untrusted.bundle".into(), untrusted),
    ]);
    let device = "deploy-01";
    let cfg = config(
        tmp.path(),
        device,
        &format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\n[mqtt.commands]\ntoken_file = \"{}\"\n\
             [model]\nbuiltin = true\n[deploy]\ntrusted_keys = [\"{}\"]\n",
            broker.port,
            token_file.display(),
            common::public_hex(KEY)
        ),
    );
    let sub = Sub::connect(
        broker.port,
        "test-deploy",
        &[
            &format!("{}/cmd/deploy/reply", prefix(device)),
            &format!("{}/result", prefix(device)),
        ],
    );
    let mut d = Daemon::start(device, &cfg);
    sub.wait("a first result", Duration::from_secs(20), |m| {
        m.topic.ends_with("/result")
    });
    let topic = format!("{}/cmd/deploy", prefix(device));
    let deploy = |path: &str, sha256: &str, id: &str| -> CommandReply {
        sub.publish(
            &topic,
            &format!(
                r#"{{"token":"{TOKEN}","url":"http://127.0.0.1:{files}{path}","sha256":"{sha256}","request_id":"{id}"}}"#
            ),
        );
        sub.wait(
            &format!("the reply to {id}"),
            Duration::from_secs(30),
            |m| {
                m.topic.ends_with("/cmd/deploy/reply")
                    && m.json::<CommandReply>().request_id.as_deref() == Some(id)
            },
        )
        .json()
    };

    let r = deploy("/good.bundle", &untrusted_sha, "wrong-sha");
    assert_eq!(r.error.as_deref(), Some("sha256_mismatch"), "{r:?}");
    let r = deploy("/missing.bundle", &good_sha, "missing");
    assert_eq!(r.error.as_deref(), Some("fetch_failed"), "{r:?}");
    assert!(r.detail.as_deref().unwrap_or("").contains("404"), "{r:?}");
    let r = deploy("/untrusted.bundle", &untrusted_sha, "untrusted");
    assert_eq!(r.error.as_deref(), Some("invalid_bundle"), "{r:?}");
    assert!(
        r.detail
            .as_deref()
            .unwrap_or("")
            .contains("does not verify with any trusted key"),
        "{r:?}"
    );

    let r = deploy("/good.bundle", &good_sha, "good");
    assert!(r.ok, "{r:?}\n{}", d.log());
    let result = r.result.unwrap();
    assert_eq!(result["model"]["version"], "mqtt-v1", "{result}");
    assert_eq!(result["active"], true, "{result}");
    // Frames the model decides now carry its version.
    sub.wait(
        "a result decided with the pushed model",
        Duration::from_secs(30),
        |m| {
            m.topic.ends_with("/result")
                && m.json::<serde_json::Value>()["model"]["version"] == "mqtt-v1"
        },
    );
    d.stop();
}
