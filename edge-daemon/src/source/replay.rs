//! `kind = "replay"`: frames from a folder of image files or from a dataset folder, in a stable
//! sorted order, once or in a loop.
//!
//! Files are found and read by `weld-edge inspect`'s own [`crate::inspect::collect`] and
//! [`crate::inspect::load`], so a frame replays exactly as `inspect` reads it. A plain folder
//! holds `STEM.png` (or `.jpg`, `.jpeg`) with an optional `STEM.depth.png`, in file name order;
//! a dataset folder (it has `dataset.toml`) is read in its own order (class, then name) with the
//! depth unit and intrinsics of its `dataset.toml`. A file that cannot be read is skipped with a
//! warning naming it, and not tried again on the next loop.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weld_core::dataset::{DATASET_FILE, RGB_EXTENSIONS};
use weld_core::frame::DEPTH_SUFFIX;

use super::{Next, Pacer, Source, SourceError, fps_problem};
use crate::inspect::{self, Input};

/// `[source]` with `kind = "replay"`.
///
/// ```toml
/// [source]
/// kind = "replay"
/// path = "/var/lib/weld-edge/replay"
/// loop = true
/// fps = 10
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// The folder to replay: image files (`STEM.png` + optional `STEM.depth.png`), or a
    /// dataset folder with `dataset.toml`. Subfolders of a plain folder are not read.
    pub path: PathBuf,
    /// Start again from the first frame after the last one (default false: the source ends).
    #[serde(default, rename = "loop")]
    pub looping: bool,
    /// Frames per second, 0.1..=1000, or 0 for as fast as the pipeline takes them (default 0).
    #[serde(default)]
    pub fps: f64,
    /// Millimetres per raw depth unit of the `STEM.depth.png` files, > 0 and <= 100. Needed for
    /// a plain folder with depth files; for a dataset it replaces `dataset.toml`'s value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth_unit_mm: Option<f32>,
}

/// Largest depth unit accepted, mm: 100 mm per unit is already coarser than any depth camera.
const MAX_DEPTH_UNIT_MM: f32 = 100.0;

impl ReplayConfig {
    /// A config replaying `path` once, unpaced.
    pub fn new(path: impl Into<PathBuf>) -> ReplayConfig {
        ReplayConfig {
            path: path.into(),
            looping: false,
            fps: 0.0,
            depth_unit_mm: None,
        }
    }

    /// Every invalid value, each naming its key and the allowed values. Whether the folder
    /// exists is checked when the source is opened.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.path.as_os_str().is_empty() {
            out.push("source.path is empty; give the folder to replay".to_string());
        }
        out.extend(fps_problem("source.fps", self.fps));
        if let Some(u) = self.depth_unit_mm
            && !(u.is_finite() && u > 0.0 && u <= MAX_DEPTH_UNIT_MM)
        {
            out.push(format!(
                "source.depth_unit_mm is {u}; allowed: > 0 and <= {MAX_DEPTH_UNIT_MM} mm"
            ));
        }
        out
    }
}

/// The replay camera (see the module docs).
#[derive(Debug)]
pub struct ReplaySource {
    folder: PathBuf,
    inputs: Vec<Input>,
    next: usize,
    looping: bool,
    pacer: Pacer,
    seq: u64,
}

impl ReplaySource {
    /// Lists the frames to replay. A missing or empty folder, or depth files without a known
    /// depth unit, are fatal: no retry would change them.
    pub fn open(cfg: &ReplayConfig) -> Result<ReplaySource, SourceError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(SourceError::Fatal(format!(
                "invalid [source] config: {}",
                problems.join("; ")
            )));
        }
        let folder = cfg.path.clone();
        let fatal = |what: String| SourceError::Fatal(format!("{}: {what}", folder.display()));
        if !folder.is_dir() {
            return Err(fatal("no such folder (source.path)".into()));
        }
        let paths = if folder.join(DATASET_FILE).is_file() {
            vec![folder.clone()]
        } else {
            image_files(&folder).map_err(|e| fatal(format!("cannot list: {e}")))?
        };
        let inputs = inspect::collect(&paths, cfg.depth_unit_mm)
            .map_err(|e| SourceError::Fatal(e.to_string()))?;
        if inputs.is_empty() {
            return Err(fatal(format!(
                "no image files to replay (.{})",
                RGB_EXTENSIONS.join(", .")
            )));
        }
        if let Some(i) = inputs
            .iter()
            .find(|i| i.depth.is_some() && i.depth_unit_mm.is_none())
        {
            return Err(fatal(format!(
                "{} has depth but its unit is unknown; set source.depth_unit_mm (or \
                 depth_unit_mm in dataset.toml)",
                i.rgb.display()
            )));
        }
        tracing::info!(folder = %folder.display(), frames = inputs.len(), "replay opened");
        Ok(ReplaySource {
            folder,
            inputs,
            next: 0,
            looping: cfg.looping,
            pacer: Pacer::new(cfg.fps),
            seq: 0,
        })
    }

    /// The frames left to replay (unreadable ones are dropped as they are met).
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// True when no readable frame is left.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }
}

/// The RGB image files directly in `dir`, sorted by name: not depth files, not hidden files
/// (the temporary files of atomic writes start with `.`), not folders.
fn image_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let is_rgb = RGB_EXTENSIONS
            .iter()
            .any(|e| name.ends_with(&format!(".{e}")));
        if path.is_file() && is_rgb && !name.starts_with('.') && !name.ends_with(DEPTH_SUFFIX) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

impl Source for ReplaySource {
    fn name(&self) -> &'static str {
        "replay"
    }

    fn next_frame(&mut self) -> Result<Next, SourceError> {
        loop {
            if self.inputs.is_empty() {
                return Err(SourceError::Fatal(format!(
                    "{}: none of its image files could be read",
                    self.folder.display()
                )));
            }
            if self.next >= self.inputs.len() {
                if !self.looping {
                    return Ok(Next::End);
                }
                self.next = 0;
            }
            match inspect::load(&self.inputs[self.next]) {
                Ok(frame) => {
                    self.next += 1;
                    self.pacer.wait();
                    self.seq += 1;
                    // Delivered now: the file's modification time would put results out of
                    // order with the rest of the device's history.
                    let frame = frame.with_time(chrono::Utc::now(), self.seq);
                    return Ok(Next::Frame(Box::new(frame)));
                }
                Err(e) => {
                    let bad = self.inputs.remove(self.next);
                    tracing::warn!(file = %bad.rgb.display(), "replay skips an unreadable frame: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_every_key() {
        let cfg = ReplayConfig {
            path: PathBuf::new(),
            looping: true,
            fps: 5000.0,
            depth_unit_mm: Some(0.0),
        };
        let p = cfg.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        for key in ["source.path", "source.fps", "source.depth_unit_mm"] {
            assert!(
                p.iter().any(|m| m.starts_with(key)),
                "{key} missing in {p:?}"
            );
        }
        assert!(ReplayConfig::new("/x").problems().is_empty());
    }

    #[test]
    fn missing_folder_is_fatal_and_named() {
        let err = ReplaySource::open(&ReplayConfig::new("/nonexistent/replay-dir")).unwrap_err();
        assert!(
            matches!(&err, SourceError::Fatal(m) if m.contains("/nonexistent/replay-dir")),
            "{err}"
        );
    }
}
