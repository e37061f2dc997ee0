//! The MQTT payloads besides the result (DESIGN.md "MQTT"): the retained device status, the
//! periodic stats and the replies to commands. The daemon writes them; dashboards, the trainer's
//! fleet tools and the tests read them with these same types.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::result::{ts_millis, ts_parse};

/// Format version of every message here.
pub const MESSAGE_VERSION: u32 = 1;

/// The device's state on `…/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Inspecting as configured.
    Online,
    /// Running, but something is wrong (each reason is listed): results may be missing or less
    /// trustworthy.
    Degraded,
    /// Not running: stopped, or its broker connection was lost (the last will).
    Offline,
}

/// `…/status`, retained: what a dashboard shows as the device's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    pub v: u32,
    pub state: DeviceState,
    pub device: String,
    pub line: String,
    #[serde(serialize_with = "ts_millis", deserialize_with = "ts_parse")]
    pub ts: DateTime<Utc>,
    /// Why the state is not `online`, one line each; empty when online.
    pub reasons: Vec<String>,
    /// Camera state: `starting`, `ok`, `reconnecting`, `ended` or `failed`.
    pub camera: String,
    /// Active model version, if a model is loaded.
    pub model: Option<String>,
    /// `hybrid`, `rules`, `model` or `both`.
    pub policy: String,
    /// The daemon's software version.
    pub software: String,
}

/// Quantiles of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Quantiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Frame counters since the daemon started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FrameCounts {
    /// Delivered by the camera.
    pub captured: u64,
    /// Results produced.
    pub processed: u64,
    /// Dropped from the full queue (the oldest waiting frame).
    pub dropped: u64,
    /// Results the policy marked uncertain.
    pub uncertain: u64,
    pub model_runs: u64,
    pub model_failures: u64,
}

/// The MQTT outbox: results waiting for the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutboxStats {
    /// Results waiting.
    pub depth: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Results dropped because the outbox was full (oldest first).
    pub overflowed: u64,
    /// Results the broker acknowledged since the daemon started.
    pub acked: u64,
}

/// `…/stats`, every few seconds (QoS 0): counters since start and current rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stats {
    pub v: u32,
    pub device: String,
    pub line: String,
    #[serde(serialize_with = "ts_millis", deserialize_with = "ts_parse")]
    pub ts: DateTime<Utc>,
    pub uptime_s: f64,
    /// Results per second over the last stats interval.
    pub fps: f64,
    pub frames: FrameCounts,
    /// Results per deciding stage (`rules`, `model`, `both`).
    pub decided_by: BTreeMap<String, u64>,
    /// Results per class.
    pub classes: BTreeMap<String, u64>,
    /// Per pipeline stage (`capture`, `queue`, `rules`, `preprocess`, `model`, `total`).
    pub latency_ms: BTreeMap<String, Quantiles>,
    pub outbox: OutboxStats,
    pub camera: String,
    /// The candidate model running in shadow, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStats>,
}

/// A candidate model run beside the active one on a sample of the frames the active model
/// decides: how often it agrees, and how fast it is. Its answers are never used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShadowStats {
    /// The candidate's version (installed on the device).
    pub version: String,
    /// It runs on one in `every` of the frames the active model runs on.
    pub every: u64,
    /// Frames both models classified.
    pub frames: u64,
    /// Of those, frames where both gave the same class.
    pub agreed: u64,
    /// `agreed / frames` (0 before any frame).
    pub agreement: f64,
    /// Frames the candidate failed on.
    pub failures: u64,
    /// The candidate's inference time, ms.
    pub latency_ms: Quantiles,
    /// The active model's inference time on the same frames, ms.
    pub active_latency_ms: Quantiles,
}

/// `…/cmd/<name>/reply`: the answer to one command. `ok` false comes with `error` (a short
/// code: `malformed`, `unauthorized`, `invalid`, `unknown_command`, `unsupported`, `retained`)
/// and `detail` (what exactly is wrong), and means nothing was changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CommandReply {
    pub v: u32,
    pub command: String,
    /// Echoed from the command, to match replies to requests.
    pub request_id: Option<String>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_with_lowercase_state() {
        let s = Status {
            v: MESSAGE_VERSION,
            state: DeviceState::Degraded,
            device: "rdk-07".into(),
            line: "L2".into(),
            ts: DateTime::from_timestamp(1_700_000_000, 123_000_000).unwrap(),
            reasons: vec!["camera reconnecting".into()],
            camera: "reconnecting".into(),
            model: None,
            policy: "hybrid".into(),
            software: "0.1.0".into(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""state":"degraded""#), "{json}");
        assert!(
            json.contains(r#""ts":"2023-11-14T22:13:20.123Z""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
    }

    #[test]
    fn a_successful_reply_has_no_error_fields() {
        let r = CommandReply {
            v: MESSAGE_VERSION,
            command: "capture".into(),
            request_id: Some("42".into()),
            ok: true,
            result: Some(serde_json::json!({"frames_pending": 5})),
            error: None,
            detail: None,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            !json.contains("error") && !json.contains("detail"),
            "{json}"
        );
    }
}
