//! The device status and the stats message, built from the pipeline's shared state. The rules
//! of `online` / `degraded` live in [`assess`], a plain function.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use hdrhistogram::Histogram;
use weld_core::messages::{
    DeviceState, FrameCounts, MESSAGE_VERSION, OutboxStats, Quantiles, ShadowStats, Stats, Status,
};

use crate::pipeline::{Identity, Shared};
use crate::source::CameraState;
use crate::store::OutboxDepth;

/// What the status is judged on, sampled once per check.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub camera: CameraState,
    /// Why the configured model is not running.
    pub model_error: Option<String>,
    /// Model failures since the previous check.
    pub new_model_failures: u64,
}

/// `online` when the camera delivers and nothing failed; otherwise `degraded`, one reason per
/// problem. A replay that ended is degraded too: no more results will come.
pub fn assess(h: &Health) -> (DeviceState, Vec<String>) {
    let mut reasons = Vec::new();
    match &h.camera {
        CameraState::Ok => {}
        CameraState::Starting => reasons.push("camera starting: no frame yet".to_string()),
        CameraState::Reconnecting { last_error, .. } => {
            reasons.push(format!("camera lost, reconnecting: {last_error}"));
        }
        CameraState::Ended => reasons.push("the source ended: no more frames".to_string()),
        CameraState::Failed(why) => reasons.push(format!("capture stopped: {why}")),
    }
    if let Some(e) = &h.model_error {
        reasons.push(e.clone());
    }
    if h.new_model_failures > 0 {
        reasons.push(
            "the model is failing at run time (see frames.model_failures in stats)".to_string(),
        );
    }
    let state = if reasons.is_empty() {
        DeviceState::Online
    } else {
        DeviceState::Degraded
    };
    (state, reasons)
}

/// The camera state as one word.
pub fn camera_word(c: &CameraState) -> &'static str {
    match c {
        CameraState::Starting => "starting",
        CameraState::Ok => "ok",
        CameraState::Reconnecting { .. } => "reconnecting",
        CameraState::Ended => "ended",
        CameraState::Failed(_) => "failed",
    }
}

/// The status message for `state` (also `offline` for the last will and a clean stop).
pub fn status(id: &Identity, shared: &Shared, state: DeviceState, reasons: Vec<String>) -> Status {
    Status {
        v: MESSAGE_VERSION,
        state,
        device: id.device.clone(),
        line: id.line.clone(),
        ts: Utc::now(),
        reasons,
        camera: camera_word(&shared.stats.camera()).to_string(),
        model: shared
            .model
            .load()
            .as_ref()
            .map(|m| m.version().to_string()),
        policy: shared.policy.load().kind.to_string(),
        software: env!("CARGO_PKG_VERSION").to_string(),
    }
}

fn quantiles(h: &Histogram<u64>) -> Quantiles {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Quantiles::default();
    }
    Quantiles {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

/// The stats message: counters since start, `fps` over the last interval.
pub fn stats(
    id: &Identity,
    shared: &Shared,
    uptime: Duration,
    fps: f64,
    outbox: OutboxDepth,
    acked: u64,
) -> Stats {
    let s = &shared.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Stats {
        v: MESSAGE_VERSION,
        device: id.device.clone(),
        line: id.line.clone(),
        ts: Utc::now(),
        uptime_s: uptime.as_secs_f64(),
        fps,
        frames: FrameCounts {
            captured: n(&s.captured),
            processed: n(&s.processed),
            dropped: n(&s.dropped),
            uncertain: n(&s.uncertain),
            model_runs: n(&s.model_runs),
            model_failures: n(&s.model_failures),
        },
        decided_by: s
            .decided_by()
            .into_iter()
            .map(|(k, v)| (k.as_str().to_string(), v))
            .collect(),
        classes: s.classes(),
        latency_ms: s
            .latencies()
            .stages()
            .into_iter()
            .map(|(name, h)| (name.to_string(), quantiles(h)))
            .collect(),
        outbox: OutboxStats {
            depth: outbox.len,
            bytes: outbox.bytes,
            overflowed: outbox.overflowed,
            acked,
        },
        camera: camera_word(&s.camera()).to_string(),
        shadow: shadow_stats(shared),
    }
}

/// The shadow model's figures, when one runs.
pub fn shadow_stats(shared: &Shared) -> Option<ShadowStats> {
    let shadow = shared.shadow.load_full()?;
    let t = shadow.tally();
    Some(ShadowStats {
        version: shadow.version.clone(),
        every: shadow.every,
        frames: t.compared,
        agreed: t.agreed,
        agreement: if t.compared == 0 {
            0.0
        } else {
            t.agreed as f64 / t.compared as f64
        },
        failures: t.failures,
        latency_ms: quantiles(&t.latency),
        active_latency_ms: quantiles(&t.active_latency),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Health {
        Health {
            camera: CameraState::Ok,
            model_error: None,
            new_model_failures: 0,
        }
    }

    #[test]
    fn online_only_when_nothing_is_wrong() {
        assert_eq!(assess(&healthy()), (DeviceState::Online, vec![]));
        let cases = [
            Health {
                camera: CameraState::Reconnecting {
                    attempt: 2,
                    last_error: "USB gone".into(),
                },
                ..healthy()
            },
            Health {
                model_error: Some("the model failed to load: bad file".into()),
                ..healthy()
            },
            Health {
                new_model_failures: 3,
                ..healthy()
            },
            Health {
                camera: CameraState::Failed("no such device".into()),
                ..healthy()
            },
        ];
        for h in cases {
            let (state, reasons) = assess(&h);
            assert_eq!(state, DeviceState::Degraded, "{h:?}");
            assert_eq!(reasons.len(), 1, "{reasons:?}");
        }
        let (_, r) = assess(&Health {
            camera: CameraState::Reconnecting {
                attempt: 1,
                last_error: "USB gone".into(),
            },
            model_error: Some("the model failed to load: x".into()),
            new_model_failures: 0,
        });
        assert!(
            r[0].contains("USB gone") && r[1].contains("failed to load"),
            "{r:?}"
        );
    }

    #[test]
    fn quantiles_are_in_milliseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in [1000, 2000, 3000, 100_000] {
            h.record(us).unwrap();
        }
        let q = quantiles(&h);
        assert_eq!(q.count, 4);
        assert!((q.p50 - 2.0).abs() < 0.01, "{q:?}");
        assert!((q.max - 100.0).abs() < 0.1, "{q:?}");
        assert_eq!(quantiles(&Histogram::new(3).unwrap()), Quantiles::default());
    }
}
