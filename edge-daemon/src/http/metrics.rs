//! `GET /metrics`: the pipeline's counters and histograms in the Prometheus text format
//! (version 0.0.4).
//!
//! Written out by hand rather than through a metrics crate: every figure already lives in the
//! pipeline's atomics and hdrhistogram histograms (which the stats message and the bench read
//! too), so a crate's registry would be a second copy updated on the hot path; rendering the
//! text format from them is a few lines, and the bucket layout below is ours to choose.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;

use super::AppState;
use crate::mqtt::status::camera_word;

/// Histogram bucket bounds in seconds: 0.5 ms (the rules on a small frame) to 5 s (a stalled
/// stage), roughly 1-2-5 steps.
const BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Every camera state, so a dashboard sees each series (1 for the current one, 0 otherwise).
const CAMERA_STATES: [&str; 5] = ["starting", "ok", "reconnecting", "ended", "failed"];

/// A label value with `\`, `"` and newlines escaped as the format asks.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One labelled histogram series from an hdrhistogram in µs.
fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram<u64>) {
    for b in BUCKETS_S {
        let upto_us = (b * 1e6) as u64;
        let n = if h.is_empty() {
            0
        } else {
            h.count_between(0, upto_us)
        };
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.len());
    // hdrhistogram keeps no exact sum; mean x count is exact to its 3 significant digits.
    let sum_s = if h.is_empty() {
        0.0
    } else {
        h.mean() * h.len() as f64 / 1e6
    };
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum_s}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.len());
}

/// The whole exposition.
pub fn render(state: &AppState) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let s = &state.shared.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let id = format!(
        "device=\"{}\",line=\"{}\"",
        label(&state.identity.device),
        label(&state.identity.line)
    );

    header(
        &mut out,
        "weld_frames_total",
        "counter",
        "Frames by what happened to them: captured (delivered by the camera), processed \
         (a result was made), dropped (the oldest waiting frame, queue full), uncertain \
         (results no stage was confident about).",
    );
    for (what, v) in [
        ("captured", n(&s.captured)),
        ("processed", n(&s.processed)),
        ("dropped", n(&s.dropped)),
        ("uncertain", n(&s.uncertain)),
    ] {
        let _ = writeln!(out, "weld_frames_total{{{id},what=\"{what}\"}} {v}");
    }
    header(
        &mut out,
        "weld_model_runs_total",
        "counter",
        "Frames the model ran on, and how many of those runs failed.",
    );
    let _ = writeln!(
        out,
        "weld_model_runs_total{{{id},outcome=\"ok\"}} {}",
        n(&s.model_runs).saturating_sub(n(&s.model_failures))
    );
    let _ = writeln!(
        out,
        "weld_model_runs_total{{{id},outcome=\"failed\"}} {}",
        n(&s.model_failures)
    );

    header(
        &mut out,
        "weld_results_decided_by_total",
        "counter",
        "Results by the stage that decided them.",
    );
    let decided = s.decided_by();
    for by in [
        weld_core::DecidedBy::Rules,
        weld_core::DecidedBy::Model,
        weld_core::DecidedBy::Both,
    ] {
        let _ = writeln!(
            out,
            "weld_results_decided_by_total{{{id},by=\"{}\"}} {}",
            by.as_str(),
            decided.get(&by).copied().unwrap_or(0)
        );
    }
    header(
        &mut out,
        "weld_results_class_total",
        "counter",
        "Results by decided class.",
    );
    for (class, v) in s.classes() {
        let _ = writeln!(
            out,
            "weld_results_class_total{{{id},class=\"{}\"}} {v}",
            label(&class)
        );
    }

    header(
        &mut out,
        "weld_stage_latency_seconds",
        "histogram",
        "Time per pipeline stage: capture, queue, rules, preprocess and model (frames the \
         model ran on), total (camera to decision).",
    );
    let lat = s.latencies();
    for (stage, h) in lat.stages() {
        histogram(
            &mut out,
            "weld_stage_latency_seconds",
            &format!("{id},stage=\"{stage}\""),
            h,
        );
    }

    header(
        &mut out,
        "weld_results_per_second",
        "gauge",
        "Results per second over the last two seconds.",
    );
    let _ = writeln!(out, "weld_results_per_second{{{id}}} {}", state.live.fps());

    let depth = state.store.outbox().depth();
    header(
        &mut out,
        "weld_outbox_results",
        "gauge",
        "Results waiting in the MQTT outbox for the broker's acknowledgement.",
    );
    let _ = writeln!(out, "weld_outbox_results{{{id}}} {}", depth.len);
    header(
        &mut out,
        "weld_outbox_bytes",
        "gauge",
        "Bytes of results waiting in the MQTT outbox.",
    );
    let _ = writeln!(out, "weld_outbox_bytes{{{id}}} {}", depth.bytes);
    header(
        &mut out,
        "weld_outbox_overflowed_total",
        "counter",
        "Results dropped from the full MQTT outbox (the oldest first; they stay in the history).",
    );
    let _ = writeln!(
        out,
        "weld_outbox_overflowed_total{{{id}}} {}",
        depth.overflowed
    );
    if let Some(link) = &state.mqtt {
        header(
            &mut out,
            "weld_mqtt_connected",
            "gauge",
            "1 while connected to the MQTT broker.",
        );
        let _ = writeln!(
            out,
            "weld_mqtt_connected{{{id}}} {}",
            u8::from(link.connected.load(Ordering::Relaxed))
        );
        header(
            &mut out,
            "weld_mqtt_acked_total",
            "counter",
            "Results the MQTT broker acknowledged.",
        );
        let _ = writeln!(
            out,
            "weld_mqtt_acked_total{{{id}}} {}",
            link.acked.load(Ordering::Relaxed)
        );
    }

    header(
        &mut out,
        "weld_model_info",
        "gauge",
        "The active model (1), by name, version and backend; absent without a model.",
    );
    if let Some(m) = state.shared.model.load().as_ref() {
        let _ = writeln!(
            out,
            "weld_model_info{{{id},name=\"{}\",version=\"{}\",backend=\"{}\"}} 1",
            label(m.name()),
            label(m.version()),
            m.backend_name()
        );
    }
    header(
        &mut out,
        "weld_camera_state",
        "gauge",
        "1 for the camera's current state, 0 for the others.",
    );
    let now = camera_word(&s.camera());
    for c in CAMERA_STATES {
        let _ = writeln!(
            out,
            "weld_camera_state{{{id},state=\"{c}\"}} {}",
            u8::from(c == now)
        );
    }
    header(
        &mut out,
        "weld_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    let _ = writeln!(
        out,
        "weld_uptime_seconds{{{id}}} {}",
        state.started.elapsed().as_secs_f64()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("x\ny"), "x\\ny");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in [300, 800, 1_500, 40_000, 3_000_000] {
            h.record(us).unwrap();
        }
        let mut out = String::new();
        histogram(&mut out, "x", "stage=\"t\"", &h);
        let bucket = |le: &str| -> u64 {
            out.lines()
                .find(|l| l.starts_with(&format!("x_bucket{{stage=\"t\",le=\"{le}\"}}")))
                .and_then(|l| l.rsplit(' ').next())
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(bucket("0.0005"), 1);
        assert_eq!(bucket("0.001"), 2);
        assert_eq!(bucket("0.002"), 3);
        assert_eq!(bucket("0.05"), 4);
        assert_eq!(bucket("5"), 5);
        assert_eq!(bucket("+Inf"), 5);
        assert!(out.contains("x_count{stage=\"t\"} 5"), "{out}");
        let sum: f64 = out
            .lines()
            .find(|l| l.starts_with("x_sum"))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 3.0426).abs() < 0.01, "{sum}");
    }
}
