//! `weld-edge bench-mqtt`: how fast results get through the outbox to a broker at QoS 1, and
//! what the outbox costs per result. The real parts run: a fresh sled store, the
//! [`MqttSink`](super::MqttSink)'s push, the client with its group-committed flushes and
//! packet-id ledger, and a subscriber on a second connection that counts what the broker
//! delivered (so "delivered" means through the broker, not just acknowledged by it).
//!
//! The results are copies of one real result (the rules on a synthetic porosity frame: a
//! typical payload with findings, ~0.8 KB), each with its own id and sequence number.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::Notify;
use weld_core::Inspection;
use weld_core::rules::{Detector, RulesConfig};
use weld_core::synth::{SynthClass, SynthConfig, generate};

use super::config::{BrokerAddr, MqttSettings, Topics};
use crate::pipeline::{Identity, Shared, inspect_frame};
use crate::policy::{Policy, PolicyKind, Thresholds};
use crate::store::{Store, StoreConfig};

/// The subscriber gives up after this long without a message.
const SUBSCRIBER_IDLE: Duration = Duration::from_secs(3);

/// Figures of one run.
#[derive(Debug, Clone)]
pub struct MqttBenchReport {
    pub results: u64,
    pub payload_bytes: usize,
    /// Time spent in the sink's push (outbox insert), per result, µs.
    pub push_us: f64,
    /// Outbox flushes (each an fsync covering every result pushed before it).
    pub flushes: u64,
    /// Mean time of one flush, µs.
    pub flush_us: f64,
    /// From the first push to the broker's last acknowledgement.
    pub acked_s: f64,
    /// From the first push to the subscriber's last delivery.
    pub delivered_s: f64,
    pub delivered: u64,
    pub duplicates: u64,
}

impl MqttBenchReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        let rate = |secs: f64| self.results as f64 / secs;
        let _ = writeln!(
            s,
            "{} results of {} bytes; outbox push {:.1} µs/result; {} flushes of {:.0} µs each \
             ({:.0} results per flush)",
            self.results,
            self.payload_bytes,
            self.push_us,
            self.flushes,
            self.flush_us,
            self.results as f64 / self.flushes.max(1) as f64
        );
        let _ = writeln!(
            s,
            "acknowledged by the broker (QoS 1): {:.2} s, {:.0} results/s",
            self.acked_s,
            rate(self.acked_s)
        );
        let _ = writeln!(
            s,
            "delivered to a QoS 1 subscriber: {} ({} duplicates) in {:.2} s, {:.0} results/s",
            self.delivered,
            self.duplicates,
            self.delivered_s,
            rate(self.delivered_s)
        );
        if self.delivered < self.results {
            let _ = writeln!(
                s,
                "the broker acknowledged every result but dropped {} on the way to the \
                 subscriber: it queues only so many for a subscriber that falls behind \
                 (mosquitto: max_queued_messages, 1000 by default)",
                self.results - self.delivered
            );
        }
        s
    }
}

/// A typical result: the rules on a synthetic 640x480 porosity frame.
fn sample_result() -> Result<Inspection, String> {
    let detector = Detector::new(RulesConfig::default()).map_err(|e| e.to_string())?;
    let scene = generate(SynthClass::Porosity, 7, &SynthConfig::new(640, 480))
        .map_err(|e| e.to_string())?;
    let policy = Policy {
        kind: PolicyKind::Rules,
        thresholds: Thresholds {
            rules_confident_at: detector.config().confident_at,
            model_confident_at: 0.8,
        },
    };
    let id = Identity {
        device: "bench".into(),
        line: "L0".into(),
    };
    Ok(inspect_frame(&detector, &policy, None, &id, &scene.frame).result)
}

/// Pushes `n` results through a fresh outbox in `store_dir` to `broker` and waits (at most
/// `timeout`) until all are acknowledged and delivered.
pub async fn run(
    broker: BrokerAddr,
    store_dir: &Path,
    n: u64,
    inflight: u16,
    timeout: Duration,
) -> Result<MqttBenchReport, String> {
    let store = Store::open(store_dir, &StoreConfig::default()).map_err(|e| e.to_string())?;
    let outbox = store.outbox().clone();
    let prefix = format!("weld-bench/{}", std::process::id());
    let settings = MqttSettings {
        broker: broker.clone(),
        client_id: format!("weld-edge-bench-{}", std::process::id()),
        topics: Topics {
            prefix: prefix.clone(),
        },
        credentials: None,
        keep_alive: Duration::from_secs(30),
        stats_every: Duration::from_secs(3600),
        inflight,
        tls: None,
        command_token: None,
    };
    let (host, port) = match &broker {
        BrokerAddr::External { host, port } => (host.clone(), *port),
        BrokerAddr::Embedded(a) => (a.ip().to_string(), a.port()),
    };

    // The subscriber, connected and subscribed before the first push.
    let mut sub_opts =
        MqttOptions::new(format!("weld-bench-sub-{}", std::process::id()), host, port);
    sub_opts
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_keep_alive(Duration::from_secs(30));
    let (sub, mut sub_loop) = AsyncClient::new(sub_opts, 64);
    sub.subscribe(format!("{prefix}/result"), QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let (sub_ready_tx, sub_ready) = tokio::sync::oneshot::channel();
    let subscriber = tokio::spawn(async move {
        let mut ready = Some(sub_ready_tx);
        let mut seen = HashSet::new();
        let (mut delivered, mut duplicates) = (0u64, 0u64);
        let mut last = Instant::now();
        while delivered < n {
            // A broker may drop messages for a subscriber that falls behind (mosquitto's
            // max_queued_messages, 1000 by default; rumqttd's log segments): stop once nothing
            // has come for a while.
            let polled = match tokio::time::timeout(SUBSCRIBER_IDLE, sub_loop.poll()).await {
                Ok(p) => p,
                Err(_) if ready.is_none() => break,
                Err(_) => continue,
            };
            match polled {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let id = serde_json::from_slice::<Inspection>(&p.payload)
                        .map(|r| r.id)
                        .map_err(|e| e.to_string())?;
                    if seen.insert(id) {
                        delivered += 1;
                    } else {
                        duplicates += 1;
                    }
                    last = Instant::now();
                }
                Ok(_) => {}
                Err(e) => return Err(format!("subscriber: {e}")),
            }
        }
        Ok::<_, String>((delivered, duplicates, last))
    });
    tokio::time::timeout(Duration::from_secs(10), sub_ready)
        .await
        .map_err(|_| "the subscriber got no SUBACK in 10 s".to_string())?
        .map_err(|_| "the subscriber stopped".to_string())?;

    let shared = Shared::new(
        Policy {
            kind: PolicyKind::Rules,
            thresholds: Thresholds {
                rules_confident_at: 0.9,
                model_confident_at: 0.8,
            },
        },
        None,
    );
    let wake = Arc::new(Notify::new());
    let identity = Identity {
        device: "bench".into(),
        line: "L0".into(),
    };
    let client = super::spawn(
        settings,
        outbox.clone(),
        shared,
        identity,
        wake.clone(),
        None,
    );

    let mut result = sample_result()?;
    let payload_bytes = serde_json::to_vec(&result)
        .map_err(|e| e.to_string())?
        .len();
    let mut sink = super::MqttSink::new(outbox.clone(), wake);
    // The sink does not look at the frame.
    let frame =
        weld_core::Frame::new(image::RgbImage::new(1, 1), None).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut push = Duration::ZERO;
    for seq in 0..n {
        result.id = Inspection::new_id();
        result.seq = seq;
        let t = Instant::now();
        crate::pipeline::Sink::accept(&mut sink, &result, &frame).map_err(|e| e.to_string())?;
        push += t.elapsed();
        // The pipeline hands results over one by one from its own thread; yield now and then
        // so the client runs beside the pushes, as it does in the daemon.
        if seq % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = started + timeout;
    while client.link.acked.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} results acknowledged in {timeout:?}",
                client.link.acked.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let acked_s = started.elapsed().as_secs_f64();
    let flushes = client.link.flushes.load(Ordering::Relaxed);
    let flush_us = client.link.flush_us.load(Ordering::Relaxed) as f64 / flushes.max(1) as f64;
    let (delivered, duplicates, last) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        subscriber,
    )
    .await
    .map_err(|_| "the subscriber did not finish in time".to_string())?
    .map_err(|e| e.to_string())??;
    client.stop().await;
    Ok(MqttBenchReport {
        results: n,
        payload_bytes,
        push_us: push.as_secs_f64() * 1e6 / n.max(1) as f64,
        flushes,
        flush_us,
        acked_s,
        delivered_s: last.duration_since(started).as_secs_f64(),
        delivered,
        duplicates,
    })
}
