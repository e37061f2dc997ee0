//! The inspection result: the JSON of DESIGN.md, also the MQTT `…/result` payload.
//!
//! Readers should ignore fields they do not know (new optional fields may appear); a change that
//! breaks readers bumps [`RESULT_VERSION`].

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// The `"v"` of every result this code writes.
pub const RESULT_VERSION: u32 = 1;

/// Which stage made the final decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    Rules,
    Model,
    /// Both ran and the result reports both (policy `both`).
    Both,
}

impl DecidedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Rules => "rules",
            DecidedBy::Model => "model",
            DecidedBy::Both => "both",
        }
    }
}

/// Why the rules could not fully judge a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RulesNote {
    /// No weld bead was found in the depth image.
    NoBead,
    /// Too few pixels carry depth (or they do not form a surface).
    InsufficientDepth,
    /// The frame has no depth: the answer comes from image cues only.
    RgbOnly,
}

/// The heuristic's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RulesVerdict {
    /// A class name, or `"unknown"` when the frame could not be judged (see `note`).
    pub class: String,
    /// Calibrated probability that `class` is right, in [0, 1].
    pub confidence: f32,
    /// Present when the frame was not fully judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<RulesNote>,
}

/// The neural network's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelVerdict {
    pub class: String,
    /// Softmax probability of `class`, in [0, 1].
    pub confidence: f32,
    /// The model bundle's version.
    pub version: String,
}

/// What kind of thing a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A pit in the bead surface (porosity).
    Pore,
    /// A groove melted into the plate along a toe of the bead.
    Undercut,
    /// A droplet of weld metal on the plate beside the bead.
    Spatter,
    /// A hole through the joint.
    BurnThrough,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Pore => "pore",
            FindingKind::Undercut => "undercut",
            FindingKind::Spatter => "spatter",
            FindingKind::BurnThrough => "burn_through",
        }
    }
}

/// One located defect, with what could be measured of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Finding {
    pub kind: FindingKind,
    /// Pixel box `[x, y, w, h]` in the frame.
    pub bbox: [u32; 4],
    /// Depth below the surrounding surface, mm (pores, undercut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth_mm: Option<f32>,
    /// Diameter, mm (pores, spatter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diameter_mm: Option<f32>,
    /// Length along the bead, mm (undercut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_mm: Option<f32>,
    /// Area, mm² (burn-through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_mm2: Option<f32>,
}

impl Finding {
    /// A finding with a box and no measurements yet.
    pub fn new(kind: FindingKind, bbox: [u32; 4]) -> Finding {
        Finding {
            kind,
            bbox,
            depth_mm: None,
            diameter_mm: None,
            length_mm: None,
            area_mm2: None,
        }
    }
}

/// Whole-frame measurements; a field is absent when it could not be measured (e.g. no depth).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Measurements {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bead_width_mm: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bead_height_mm: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pore_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undercut_depth_mm: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spatter_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burn_through_area_mm2: Option<f32>,
}

/// Time spent per stage, milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LatencyMs {
    pub rules: f32,
    pub model: f32,
    pub total: f32,
}

/// One inspection result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Inspection {
    /// Format version, [`RESULT_VERSION`].
    pub v: u32,
    /// Unique and time-ordered (UUIDv7).
    pub id: Uuid,
    pub seq: u64,
    pub device: String,
    pub line: String,
    /// Capture time, UTC, written with milliseconds (`2026-11-22T10:00:00.123Z`).
    #[serde(serialize_with = "ts_millis", deserialize_with = "ts_parse")]
    pub ts: DateTime<Utc>,
    pub class: String,
    pub confidence: f32,
    pub decided_by: DecidedBy,
    /// True when no stage was confident enough; such frames are kept for retraining.
    pub uncertain: bool,
    /// Null when the rules did not run (policy `model`).
    pub rules: Option<RulesVerdict>,
    /// Null when the model did not run.
    pub model: Option<ModelVerdict>,
    pub findings: Vec<Finding>,
    pub measurements: Measurements,
    pub latency_ms: LatencyMs,
    /// The inspected file (offline `weld-edge inspect` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl Inspection {
    /// A fresh, time-ordered result id. UUIDv7 from `Uuid::now_v7` is monotonic within a
    /// process, so ids sort in the order results were made.
    pub fn new_id() -> Uuid {
        Uuid::now_v7()
    }
}

pub(crate) fn ts_millis<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&ts.to_rfc3339_opts(SecondsFormat::Millis, true))
}

pub(crate) fn ts_parse<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let s = String::deserialize(d)?;
    DateTime::parse_from_rfc3339(&s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| serde::de::Error::custom(format!("ts {s:?} is not an RFC 3339 time: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of DESIGN.md, with the placeholders filled in.
    const DESIGN_EXAMPLE: &str = r#"{"v":1, "id":"019a9d7e-6c2b-7000-8000-000000000001", "seq":1234, "device":"rdk-07", "line":"L2",
 "ts":"2026-11-22T10:00:00.123Z", "class":"porosity", "confidence":0.93, "decided_by":"rules",
 "uncertain":false,
 "rules":{"class":"porosity","confidence":0.93},
 "model":{"class":"porosity","confidence":0.88,"version":"mbv2-2026-11-22.1"},
 "findings":[{"kind":"pore","bbox":[10,20,5,6],"depth_mm":0.4,"diameter_mm":1.1}],
 "measurements":{"bead_width_mm":8.2,"bead_height_mm":1.9,"pore_count":3,"undercut_depth_mm":0.0},
 "latency_ms":{"rules":0.9,"model":0.0,"total":1.1}}"#;

    #[test]
    fn design_example_parses_and_writes_back_the_same_json() {
        let r: Inspection = serde_json::from_str(DESIGN_EXAMPLE).unwrap();
        assert_eq!(r.decided_by, DecidedBy::Rules);
        assert_eq!(r.findings[0].kind, FindingKind::Pore);
        assert_eq!(r.measurements.pore_count, Some(3));
        let written: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        let original: serde_json::Value = serde_json::from_str(DESIGN_EXAMPLE).unwrap();
        assert_eq!(written, original);
        assert_eq!(written["ts"], "2026-11-22T10:00:00.123Z");
    }

    #[test]
    fn model_null_and_path_absent_by_default() {
        let mut r: Inspection = serde_json::from_str(DESIGN_EXAMPLE).unwrap();
        r.model = None;
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["model"].is_null());
        assert!(v.get("path").is_none());
    }

    #[test]
    fn bad_timestamp_is_a_clear_error() {
        let bad = DESIGN_EXAMPLE.replace("2026-11-22T10:00:00.123Z", "yesterday");
        let err = serde_json::from_str::<Inspection>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("yesterday"), "{err}");
    }

    #[test]
    fn ids_are_time_ordered() {
        let ids: Vec<Uuid> = (0..1000).map(|_| Inspection::new_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }
}
