//! Captured frames: the uncertain frames (and those a `capture` command asks for), kept with
//! their result for retraining; the oldest are dropped first.
//!
//! Two trees, both keyed by the inspection id's 16 UUIDv7 bytes (time order):
//!
//! - `captures`: a small JSON record, so listing never reads the images:
//!   `{"v":1, "result":{…result JSON…}, "frame":{"width":640, "height":480,
//!   "ts":"…", "seq":7, "depth_unit_mm":0.05|null, "intrinsics":{"fx":…,"fy":…,"cx":…,"cy":…}|null},
//!   "rgb_png_bytes":N, "depth_png_bytes":M}`.
//! - `capture_frames`: `rgb_png_len: u32 BE`, the 8-bit RGB PNG, then the 16-bit grayscale depth
//!   PNG (the dataset format's `STEM.depth.png`; empty when the frame has no depth).
//!
//! Both are written and removed in one sled transaction. The byte total is the sum of both
//! values' lengths. On open it is recounted from the `captures` records alone (they state the
//! PNG sizes), so opening never reads the images; only a record that does not decode costs a
//! read of its frame.

use std::ops::Bound;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageEncoder, ImageFormat};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use uuid::Uuid;
use weld_core::{DecidedBy, DepthMap, Frame, Inspection, Intrinsics};

use super::{
    CAPTURES_TREE, Limits, StoreError, Totals, capped, decode_or_skip, encode_checked, id_key,
    len64, lock, show_key, sled_err, trim,
};

/// Smallest accepted `store.captures.max_bytes`: 1 MiB holds one 640x480 RGB-D capture (about
/// 0.5 MB of RGB PNG and 0.3 MB of depth PNG for a weld scene); below it most puts would fail.
const MIN_CAPTURE_BYTES: u64 = 1024 * 1024;

/// Bytes of the RGB length prefix in a `capture_frames` value.
const RGB_LEN_PREFIX: usize = 4;

/// `v` of the `captures` records this code writes.
const RECORD_VERSION: u32 = 1;

/// Retention of the captured frames (`[store.captures]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// Most frames kept; the oldest are dropped first. At least 1. Default 2000.
    pub max_frames: usize,
    /// Most bytes kept (PNGs plus metadata; sled's files are larger); the oldest are dropped
    /// first. At least 1048576 (1 MiB). Default 1073741824 (1 GiB, about 1300 frames at
    /// 640x480).
    pub max_bytes: u64,
}

impl Default for CaptureConfig {
    fn default() -> CaptureConfig {
        CaptureConfig {
            max_frames: 2000,
            max_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl CaptureConfig {
    /// Every invalid value, naming its key (`store.captures.max_frames`, ...); empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_frames == 0 {
            out.push("store.captures.max_frames must be at least 1, got 0".to_string());
        }
        if self.max_bytes < MIN_CAPTURE_BYTES {
            out.push(format!(
                "store.captures.max_bytes must be at least {MIN_CAPTURE_BYTES} (1 MiB), got {}",
                self.max_bytes
            ));
        }
        out
    }

    fn limits(&self) -> Limits {
        Limits {
            max_len: len64(self.max_frames),
            max_bytes: self.max_bytes,
        }
    }
}

/// One capture as listed: what it is and what it costs, without the images.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptureMeta {
    /// The inspection id (also the capture's id).
    pub id: Uuid,
    /// The result's capture time.
    pub ts: DateTime<Utc>,
    /// The decided class.
    pub class: String,
    /// Confidence of `class`, in [0, 1].
    pub confidence: f32,
    /// Which stage decided.
    pub decided_by: DecidedBy,
    /// Whether the result was uncertain.
    pub uncertain: bool,
    /// Frame width in px.
    pub width: u32,
    /// Frame height in px.
    pub height: u32,
    /// Whether a depth image is stored.
    pub has_depth: bool,
    /// Size of the RGB PNG in bytes.
    pub rgb_png_bytes: u64,
    /// Size of the depth PNG in bytes (0 without depth).
    pub depth_png_bytes: u64,
    /// Everything this capture counts against `store.captures.max_bytes`.
    pub bytes: u64,
}

/// A stored capture: the frame as it was inspected and its result.
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    /// RGB, depth with its unit, intrinsics, time and sequence number, as put.
    pub frame: Frame,
    /// The inspection result.
    pub result: Inspection,
}

/// What the `captures` tree stores per frame.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    v: u32,
    result: Inspection,
    frame: FrameInfo,
    rgb_png_bytes: u64,
    depth_png_bytes: u64,
}

/// Everything of a [`Frame`] but its pixels.
#[derive(Debug, Serialize, Deserialize)]
struct FrameInfo {
    width: u32,
    height: u32,
    ts: DateTime<Utc>,
    seq: u64,
    /// Millimetres per raw depth unit; `None` when the frame has no depth.
    depth_unit_mm: Option<f32>,
    intrinsics: Option<Intrinsics>,
}

impl Record {
    /// Bytes of the `capture_frames` value this record describes.
    fn frames_bytes(&self) -> u64 {
        len64(RGB_LEN_PREFIX) + self.rgb_png_bytes + self.depth_png_bytes
    }
}

/// Handle to the captured frames. Clones share the trees and the counters.
#[derive(Debug, Clone)]
pub struct Captures {
    meta: sled::Tree,
    frames: sled::Tree,
    limits: Limits,
    /// Count and bytes of both trees; the lock also serialises writers.
    totals: Arc<Mutex<Totals>>,
}

/// Maps a transaction's error; the transactions here never abort on their own.
fn tx_err(
    op: &'static str,
) -> impl FnOnce(TransactionError<std::convert::Infallible>) -> StoreError {
    move |e| match e {
        TransactionError::Storage(source) => StoreError::Sled { op, source },
        TransactionError::Abort(never) => match never {},
    }
}

impl Captures {
    /// Counts the captures from their metadata records and trims them to `config`.
    pub(super) fn open(
        meta: sled::Tree,
        frames: sled::Tree,
        config: &CaptureConfig,
    ) -> Result<Captures, StoreError> {
        let mut totals = Totals::default();
        for item in meta.iter() {
            let (k, v) = item.map_err(sled_err("captures count on open"))?;
            let frames_bytes = match decode_or_skip::<Record>(CAPTURES_TREE, &k, &v) {
                Some(r) => r.frames_bytes(),
                // The record cannot say how big its frame is; ask the frame itself.
                None => frames
                    .get(&k)
                    .map_err(sled_err("captures count on open"))?
                    .map_or(0, |f| len64(f.len())),
            };
            totals.add(len64(v.len()) + frames_bytes);
        }
        let captures = Captures {
            meta,
            frames,
            limits: config.limits(),
            totals: Arc::new(Mutex::new(totals)),
        };
        captures.trim_locked(&mut lock(&captures.totals))?;
        Ok(captures)
    }

    /// Stores `frame` (RGB as PNG, depth as 16-bit PNG) with its `result`, keyed by the result's
    /// id, replacing a capture with the same id; then drops the oldest captures while over
    /// either limit. The PNGs are encoded in the caller's thread before any lock is taken. Not
    /// flushed: see the crash rules in the [store](super) docs.
    pub fn put(&self, frame: &Frame, result: &Inspection) -> Result<(), StoreError> {
        let id = result.id;
        let key = id_key(id)?;
        let rgb = png(
            id,
            frame.rgb().as_raw(),
            frame.width(),
            frame.height(),
            false,
        )?;
        let depth = match frame.depth() {
            // The encoder takes 16-bit samples in native byte order and writes PNG's big-endian.
            Some(d) => {
                let raw: Vec<u8> = d
                    .values
                    .as_raw()
                    .iter()
                    .flat_map(|v| v.to_ne_bytes())
                    .collect();
                png(id, &raw, frame.width(), frame.height(), true)?
            }
            None => Vec::new(),
        };
        let record = Record {
            v: RECORD_VERSION,
            result: result.clone(),
            frame: FrameInfo {
                width: frame.width(),
                height: frame.height(),
                ts: frame.ts,
                seq: frame.seq,
                depth_unit_mm: frame.depth().map(|d| d.unit_mm),
                intrinsics: frame.intrinsics,
            },
            rgb_png_bytes: len64(rgb.len()),
            depth_png_bytes: len64(depth.len()),
        };
        let meta_value = encode_checked(id, &record)?;
        let rgb_len = u32::try_from(rgb.len()).map_err(|_| StoreError::TooLarge {
            what: "capture",
            id,
            bytes: len64(rgb.len()),
            key: "the RGB PNG size limit of 4 GiB (u32 length prefix)",
            max_bytes: u64::from(u32::MAX),
        })?;
        let mut frames_value = Vec::with_capacity(RGB_LEN_PREFIX + rgb.len() + depth.len());
        frames_value.extend_from_slice(&rgb_len.to_be_bytes());
        frames_value.extend_from_slice(&rgb);
        frames_value.extend_from_slice(&depth);
        let size = len64(meta_value.len()) + len64(frames_value.len());
        if size > self.limits.max_bytes {
            return Err(StoreError::TooLarge {
                what: "capture",
                id,
                bytes: size,
                key: "store.captures.max_bytes",
                max_bytes: self.limits.max_bytes,
            });
        }

        let mut totals = lock(&self.totals);
        let old = (&self.meta, &self.frames)
            .transaction(|(m, f)| {
                let old_meta = m.insert(&key, meta_value.as_slice())?;
                let old_frames = f.insert(&key, frames_value.as_slice())?;
                Ok::<_, ConflictableTransactionError<std::convert::Infallible>>(
                    old_meta.map(|om| len64(om.len()) + old_frames.map_or(0, |of| len64(of.len()))),
                )
            })
            .map_err(tx_err("captures put"))?;
        if let Some(old_bytes) = old {
            totals.sub(old_bytes);
        }
        totals.add(size);
        self.trim_locked(&mut totals)
    }

    fn trim_locked(&self, totals: &mut Totals) -> Result<(), StoreError> {
        trim(totals, self.limits, || {
            let Some((key, _)) = self.meta.first().map_err(sled_err("captures retention"))? else {
                return Ok(None);
            };
            let removed = (&self.meta, &self.frames)
                .transaction(|(m, f)| {
                    let meta = m.remove(&key)?;
                    let frames = f.remove(&key)?;
                    Ok::<_, ConflictableTransactionError<std::convert::Infallible>>(
                        meta.map_or(0, |v| len64(v.len())) + frames.map_or(0, |v| len64(v.len())),
                    )
                })
                .map_err(tx_err("captures retention"))?;
            Ok(Some(removed))
        })
        .map(|_| ())
    }

    /// Metadata of the captures strictly after `id` (from the oldest when `None`), oldest first,
    /// at most `limit` capped at [`MAX_QUERY_LIMIT`](super::MAX_QUERY_LIMIT). Records that do not
    /// decode are skipped with a warning.
    pub fn list(&self, after: Option<Uuid>, limit: usize) -> Result<Vec<CaptureMeta>, StoreError> {
        let limit = capped(limit);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let start = match after {
            Some(id) => Bound::Excluded(*id.as_bytes()),
            None => Bound::Unbounded,
        };
        for item in self.meta.range::<[u8; 16], _>((start, Bound::Unbounded)) {
            let (k, v) = item.map_err(sled_err("captures list"))?;
            let Some(r) = decode_or_skip::<Record>(CAPTURES_TREE, &k, &v) else {
                continue;
            };
            out.push(CaptureMeta {
                id: r.result.id,
                ts: r.result.ts,
                bytes: len64(v.len()) + r.frames_bytes(),
                class: r.result.class,
                confidence: r.result.confidence,
                decided_by: r.result.decided_by,
                uncertain: r.result.uncertain,
                width: r.frame.width,
                height: r.frame.height,
                has_depth: r.frame.depth_unit_mm.is_some(),
                rgb_png_bytes: r.rgb_png_bytes,
                depth_png_bytes: r.depth_png_bytes,
            });
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// The capture with this id: the frame pixel-identical to the one put, and its result.
    /// `Ok(None)` when there is none; [`StoreError::Corrupt`] when it does not decode.
    pub fn get(&self, id: Uuid) -> Result<Option<Capture>, StoreError> {
        let key = *id.as_bytes();
        let Some(meta) = self.meta.get(key).map_err(sled_err("captures get"))? else {
            return Ok(None);
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: CAPTURES_TREE,
            key: show_key(&key),
            reason,
        };
        let record: Record = serde_json::from_slice(&meta)
            .map_err(|e| corrupt(format!("metadata does not decode: {e}")))?;
        let frames = self
            .frames
            .get(key)
            .map_err(sled_err("captures get"))?
            .ok_or_else(|| corrupt("the frame is missing".to_string()))?;
        let (rgb_png, depth_png) = split_frames(&frames).map_err(corrupt)?;
        let rgb = match decode_png(rgb_png).map_err(&corrupt)? {
            DynamicImage::ImageRgb8(img) => img,
            other => return Err(corrupt(format!("RGB PNG decodes as {:?}", other.color()))),
        };
        let depth = match (record.frame.depth_unit_mm, depth_png.is_empty()) {
            (None, true) => None,
            (Some(unit_mm), false) => match decode_png(depth_png).map_err(&corrupt)? {
                DynamicImage::ImageLuma16(values) => Some(DepthMap { values, unit_mm }),
                other => {
                    return Err(corrupt(format!("depth PNG decodes as {:?}", other.color())));
                }
            },
            (unit, _) => {
                return Err(corrupt(format!(
                    "depth unit {unit:?} but {} bytes of depth PNG",
                    depth_png.len()
                )));
            }
        };
        if rgb.dimensions() != (record.frame.width, record.frame.height) {
            return Err(corrupt(format!(
                "RGB is {}x{} but the record says {}x{}",
                rgb.width(),
                rgb.height(),
                record.frame.width,
                record.frame.height
            )));
        }
        let frame = Frame::new(rgb, depth)
            .map_err(|e| corrupt(e.to_string()))?
            .with_intrinsics(record.frame.intrinsics)
            .with_time(record.frame.ts, record.frame.seq);
        Ok(Some(Capture {
            frame,
            result: record.result,
        }))
    }

    /// Number of captures stored.
    pub fn len(&self) -> usize {
        usize::try_from(lock(&self.totals).len).unwrap_or(usize::MAX)
    }

    /// True when no capture is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes stored (PNGs and metadata; the quantity `max_bytes` limits).
    pub fn bytes(&self) -> u64 {
        lock(&self.totals).bytes
    }
}

/// PNG bytes of 8-bit RGB (`depth16 = false`) or 16-bit native-endian grayscale samples, with
/// the same fast, deterministic settings as `weld_core::Frame::save`: captures are written on
/// the line, where encoding time matters more than a few percent of size.
fn png(
    id: Uuid,
    raw: &[u8],
    width: u32,
    height: u32,
    depth16: bool,
) -> Result<Vec<u8>, StoreError> {
    let color = if depth16 {
        image::ExtendedColorType::L16
    } else {
        image::ExtendedColorType::Rgb8
    };
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(raw, width, height, color)
        .map_err(|source| StoreError::Png { id, source })?;
    Ok(out)
}

fn decode_png(bytes: &[u8]) -> Result<DynamicImage, String> {
    image::load_from_memory_with_format(bytes, ImageFormat::Png).map_err(|e| format!("PNG: {e}"))
}

/// Splits a `capture_frames` value into the RGB PNG and the (possibly empty) depth PNG.
fn split_frames(value: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let Some((prefix, rest)) = value.split_first_chunk::<RGB_LEN_PREFIX>() else {
        return Err(format!(
            "frame record is {} bytes, shorter than its prefix",
            value.len()
        ));
    };
    let rgb_len = usize::try_from(u32::from_be_bytes(*prefix)).unwrap_or(usize::MAX);
    if rgb_len > rest.len() {
        return Err(format!(
            "frame record says {rgb_len} bytes of RGB PNG but holds {}",
            rest.len()
        ));
    }
    Ok(rest.split_at(rgb_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_frames_checks_the_prefix() {
        assert_eq!(
            split_frames(&[0, 0, 0, 2, 7, 8, 9]).unwrap(),
            (&[7u8, 8][..], &[9u8][..])
        );
        assert_eq!(split_frames(&[0, 0, 0, 0]).unwrap(), (&[][..], &[][..]));
        assert!(split_frames(&[0, 0, 0]).unwrap_err().contains("shorter"));
        assert!(
            split_frames(&[0, 0, 0, 9, 1])
                .unwrap_err()
                .contains("9 bytes")
        );
    }

    #[test]
    fn png_round_trips_16_bit_samples() {
        let values: Vec<u16> = vec![0, 1, 255, 256, 40_000, u16::MAX];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let bytes = png(Uuid::nil(), &raw, 3, 2, true).unwrap();
        match decode_png(&bytes).unwrap() {
            DynamicImage::ImageLuma16(img) => assert_eq!(img.as_raw(), &values),
            other => panic!("decoded as {:?}", other.color()),
        }
    }

    #[test]
    fn config_problems_name_their_keys() {
        let c = CaptureConfig {
            max_frames: 0,
            max_bytes: 10,
        };
        let p = c.problems().join("\n");
        assert!(
            p.contains("store.captures.max_frames") && p.contains("store.captures.max_bytes"),
            "{p}"
        );
        assert!(CaptureConfig::default().problems().is_empty());
    }
}
