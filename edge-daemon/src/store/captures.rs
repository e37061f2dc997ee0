//! Captured frames: the uncertain frames (and those a `capture` command asks for), kept with
//! their result for retraining; the oldest are dropped first.
//!
//! - The `captures` tree, keyed by the inspection id's 16 UUIDv7 bytes (time order), holds a
//!   small JSON record, so listing never reads the images:
//!   `{"v":1, "result":{…result JSON…}, "frame":{"width":640, "height":480,
//!   "ts":"…", "seq":7, "depth_unit_mm":0.05|null, "intrinsics":{"fx":…,"fy":…,"cx":…,"cy":…}|null},
//!   "rgb_png_bytes":N, "depth_png_bytes":M}`.
//! - The images are files in the captures folder: `ID.png` (8-bit RGB) and `ID.depth.png`
//!   (16-bit grayscale depth, absent when the frame has none) — the dataset format.
//!
//! Files are written before the record and removed after it (crash rules in the
//! [store](super) docs). The byte total is the record plus both PNGs. On open it is recounted
//! from the records alone (they state the PNG sizes), so opening never reads the images; files
//! that no record names (a crash between the two writes) are deleted.

use std::collections::HashSet;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageEncoder, ImageFormat};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use weld_core::{DecidedBy, DepthMap, Frame, Inspection, Intrinsics};

use super::{
    CAPTURES_TREE, Limits, StoreError, Totals, capped, decode_or_skip, encode_checked, id_key,
    len64, lock, show_key, sled_err, trim,
};

/// Smallest accepted `store.captures.max_bytes`: 1 MiB holds one 640x480 RGB-D capture (about
/// 0.5 MB of RGB PNG and 0.3 MB of depth PNG for a weld scene); below it most puts would fail.
const MIN_CAPTURE_BYTES: u64 = 1024 * 1024;

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
        super::limit_problems(
            "captures",
            "max_frames",
            self.max_frames,
            self.max_bytes,
            (MIN_CAPTURE_BYTES, "1 MiB"),
        )
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
    /// Millimetres per raw unit of the depth PNG (`None` without depth): a dataset that takes
    /// the frame must have the same `depth_unit_mm`.
    pub depth_unit_mm: Option<f32>,
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
    /// Bytes of the image files this record describes.
    fn frames_bytes(&self) -> u64 {
        self.rgb_png_bytes + self.depth_png_bytes
    }
}

/// Handle to the captured frames. Clones share the tree, the folder and the counters.
#[derive(Debug, Clone)]
pub struct Captures {
    meta: sled::Tree,
    /// The folder of the image files.
    dir: PathBuf,
    limits: Limits,
    /// Count and bytes of records and images; the lock also serialises writers.
    totals: Arc<Mutex<Totals>>,
}

/// `ID.png` and `ID.depth.png` in `dir`.
fn image_paths(dir: &Path, id: Uuid) -> (PathBuf, PathBuf) {
    let stem = id.hyphenated().to_string();
    (
        dir.join(format!("{stem}.png")),
        dir.join(format!("{stem}{}", weld_core::frame::DEPTH_SUFFIX)),
    )
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::CaptureFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Removes a file that may already be gone.
fn remove_file(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(file_err(path)(e)),
        _ => Ok(()),
    }
}

impl Captures {
    /// Counts the captures from their metadata records, deletes image files no record names
    /// (left by a crash between the two writes) and trims to `config`.
    pub(super) fn open(
        meta: sled::Tree,
        dir: &Path,
        config: &CaptureConfig,
    ) -> Result<Captures, StoreError> {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        let mut totals = Totals::default();
        let mut known = HashSet::new();
        for item in meta.iter() {
            let (k, v) = item.map_err(sled_err("captures count on open"))?;
            let frames_bytes = match decode_or_skip::<Record>(CAPTURES_TREE, &k, &v) {
                Some(r) => r.frames_bytes(),
                // The record cannot say how big its images are: ask the files.
                None => Uuid::from_slice(&k).map_or(0, |id| {
                    let (rgb, depth) = image_paths(dir, id);
                    [rgb, depth]
                        .iter()
                        .filter_map(|p| std::fs::metadata(p).ok())
                        .map(|m| m.len())
                        .sum()
                }),
            };
            if let Ok(id) = Uuid::from_slice(&k) {
                known.insert(id);
            }
            totals.add(len64(v.len()) + frames_bytes);
        }
        for entry in std::fs::read_dir(dir).map_err(file_err(dir))? {
            let path = entry.map_err(file_err(dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let stem = name
                .strip_suffix(weld_core::frame::DEPTH_SUFFIX)
                .or_else(|| name.strip_suffix(".png"))
                .unwrap_or(name);
            let orphan = match Uuid::parse_str(stem) {
                Ok(id) => !known.contains(&id),
                // Not an id: a temporary file of an interrupted write (`.NAME.tmp-PID`, see
                // `weld_core::fsutil::write_atomic`) is removed, anything else left alone.
                Err(_) => name.starts_with('.') && name.contains(".tmp-"),
            };
            if orphan {
                tracing::info!(file = %path.display(), "removing a capture image without a record");
                remove_file(&path)?;
            }
        }
        let captures = Captures {
            meta,
            dir: dir.to_path_buf(),
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
        let size = len64(meta_value.len()) + record.frames_bytes();
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
        // Images first, the record after: a crash in between leaves files that open() removes.
        let (rgb_path, depth_path) = image_paths(&self.dir, id);
        weld_core::fsutil::write_atomic(&rgb_path, &rgb).map_err(file_err(&rgb_path))?;
        if depth.is_empty() {
            remove_file(&depth_path)?;
        } else {
            weld_core::fsutil::write_atomic(&depth_path, &depth).map_err(file_err(&depth_path))?;
        }
        let old = self
            .meta
            .insert(key, meta_value.as_slice())
            .map_err(sled_err("captures put"))?;
        if let Some(old) = old {
            let old_images = serde_json::from_slice::<Record>(&old).map_or(0, |r| r.frames_bytes());
            totals.sub(len64(old.len()) + old_images);
        }
        totals.add(size);
        self.trim_locked(&mut totals)
    }

    fn trim_locked(&self, totals: &mut Totals) -> Result<(), StoreError> {
        trim(totals, self.limits, || {
            let Some((key, _)) = self.meta.first().map_err(sled_err("captures retention"))? else {
                return Ok(None);
            };
            // The record first, the images after (crash rules in the store docs).
            let removed = self
                .meta
                .remove(&key)
                .map_err(sled_err("captures retention"))?;
            let mut bytes = 0;
            if let Some(v) = &removed {
                bytes += len64(v.len());
                match serde_json::from_slice::<Record>(v) {
                    Ok(r) => bytes += r.frames_bytes(),
                    // Counted on open from the files' sizes; count them the same way here.
                    Err(_) => {
                        if let Ok(id) = Uuid::from_slice(&key) {
                            let (rgb, depth) = image_paths(&self.dir, id);
                            bytes += [rgb, depth]
                                .iter()
                                .filter_map(|p| std::fs::metadata(p).ok())
                                .map(|m| m.len())
                                .sum::<u64>();
                        }
                    }
                }
            }
            if let Ok(id) = Uuid::from_slice(&key) {
                let (rgb, depth) = image_paths(&self.dir, id);
                remove_file(&rgb)?;
                remove_file(&depth)?;
            }
            Ok(Some(bytes))
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
                depth_unit_mm: r.frame.depth_unit_mm,
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
        let (rgb_path, depth_path) = image_paths(&self.dir, id);
        let read = |p: &Path| match std::fs::read(p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(file_err(p)(e)),
        };
        let rgb_png = read(&rgb_path)?;
        if rgb_png.is_empty() {
            return Err(corrupt(format!("{} is missing", rgb_path.display())));
        }
        let depth_png = read(&depth_path)?;
        let (rgb_png, depth_png) = (rgb_png.as_slice(), depth_png.as_slice());
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

#[cfg(test)]
mod tests {
    use super::*;

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
