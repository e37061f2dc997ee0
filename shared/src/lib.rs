//! `weld-core`: the parts of the weld inspection system that the edge daemon and the trainer
//! share. No async, no inference runtime, no storage engine: frames, the dataset format,
//! preprocessing, result and manifest types, signed model bundles, and the synthetic RGB-D weld generator.
//! See ARCHITECTURE.md for the crate map.

pub mod bundle;
pub mod dataset;
pub mod frame;
pub mod fsutil;
pub mod manifest;
pub mod messages;
pub mod metrics;
pub mod plane;
pub mod preprocess;
pub mod result;
pub mod rules;
pub mod synth;
pub mod viz;

pub use frame::{DepthImage, DepthMap, Frame, FrameError, Intrinsics};
pub use result::{DecidedBy, Finding, FindingKind, Inspection, Measurements, RulesNote};
