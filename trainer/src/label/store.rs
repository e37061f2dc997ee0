//! What the labelling page works on: the frames of a dataset with what the rules and the model
//! make of each, the queues it offers, moving frame pairs between class folders, and the change
//! log that records every move.
//!
//! A change moves one or more frame pairs (`STEM.png` or `.jpg`, and `STEM.depth.png`). Two
//! renames cannot be one atomic step, so a change is made crash-safe with an intent file: the
//! planned moves are written to [`PENDING_FILE`] (atomically) before the first rename, the
//! change is appended to [`CHANGES_FILE`] after the last, then the intent file is removed.
//! Opening a dataset with an intent file left by a crash finishes the moves it names and logs
//! them, so a frame is never split between two folders and no move goes unrecorded.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use weld_core::dataset::{Dataset, DatasetError, Problem, UNLABELED, stem_taken};
use weld_core::frame::DEPTH_SUFFIX;
use weld_core::fsutil::write_atomic;
use weld_core::result::Finding;

/// The change log in the dataset's root: one JSON object per moved frame.
pub const CHANGES_FILE: &str = "changes.jsonl";
/// A change in progress (see the module's notes).
pub const PENDING_FILE: &str = ".label-pending.json";

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("no frame {0} in the dataset (moved or renamed since the page loaded?)")]
    NoFrame(String),
    #[error("{0:?} is not a class of this dataset (classes: {1})")]
    UnknownClass(String, String),
    #[error("{dir}/ already holds a frame named {stem}; rename one of them first")]
    NameTaken { dir: String, stem: String },
    #[error("no frames given")]
    NoFrames,
    #[error("nothing to undo")]
    NothingToUndo,
    #[error("the queue {0:?} needs a model: start the page with --model")]
    NeedsModel(&'static str),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line}: {message}", path.display())]
    BadLog {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LabelError + '_ {
    move |source| LabelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A class and how sure a judge is of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Opinion {
    pub class: String,
    pub confidence: f32,
}

/// What the rules and the model make of a frame, computed once when the page starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Judgement {
    pub width: u32,
    pub height: u32,
    pub rules: Option<Opinion>,
    /// The heuristic's located defects, pixel boxes in the frame.
    pub findings: Vec<Finding>,
    /// The model's pre-label, when a model was given and could judge the frame.
    pub model: Option<Opinion>,
    /// Why the frame could not be read or judged, if so.
    pub error: Option<String>,
}

/// One frame as the page sees it.
#[derive(Debug, Clone, Serialize)]
pub struct FrameInfo {
    /// `FOLDER/STEM`: the class folder (or `unlabeled`) and the file stem.
    pub id: String,
    pub stem: String,
    /// The class folder, `None` for `unlabeled/`.
    pub label: Option<String>,
    pub has_depth: bool,
    #[serde(flatten)]
    pub judgement: Judgement,
    #[serde(skip)]
    rgb: PathBuf,
    #[serde(skip)]
    depth: Option<PathBuf>,
}

impl FrameInfo {
    pub fn rgb_path(&self) -> &Path {
        &self.rgb
    }
    pub fn depth_path(&self) -> Option<&Path> {
        self.depth.as_deref()
    }
}

/// The order frames are offered in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queue {
    /// Unlabelled frames, by name.
    Unlabeled,
    /// Unlabelled frames, the model's least confident first.
    LeastConfident,
    /// Unlabelled frames where the rules and the model disagree first (the more confident
    /// the two, the earlier), then the rest, least confident first.
    Disagreement,
    /// The frames labelled with this class, the model's least convinced of it first.
    Review(String),
    /// Every frame, by folder and name.
    All,
}

impl Queue {
    /// `unlabeled`, `confidence`, `disagreement`, `all` or `class:NAME`.
    pub fn parse(s: &str) -> Option<Queue> {
        Some(match s {
            "unlabeled" => Queue::Unlabeled,
            "confidence" => Queue::LeastConfident,
            "disagreement" => Queue::Disagreement,
            "all" => Queue::All,
            _ => Queue::Review(s.strip_prefix("class:")?.to_string()),
        })
    }
}

/// One line of [`CHANGES_FILE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// Number of the change; the frames of one bulk change share it.
    pub change: u64,
    pub ts: String,
    pub user: String,
    /// `label`, or `undo` (moves back what change `undoes` moved).
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undoes: Option<u64>,
    pub stem: String,
    /// Folder before and after: a class or `unlabeled`.
    pub from: String,
    pub to: String,
    /// sha256 of the RGB file, so the frame is known even if renamed later.
    pub rgb_sha256: String,
}

/// A file rename of a planned change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileMove {
    from: PathBuf,
    to: PathBuf,
}

/// [`PENDING_FILE`]: the records to log and the renames that make them true.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    records: Vec<ChangeRecord>,
    moves: Vec<FileMove>,
}

/// What a change did, for the page.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub change: u64,
    /// `(old id, new id)` of each frame moved; frames already in the target folder are left
    /// out.
    pub moved: Vec<(String, String)>,
}

/// The frames of a dataset and its change log.
#[derive(Debug)]
pub struct LabelStore {
    root: PathBuf,
    classes: Vec<String>,
    depth_unit_mm: Option<f32>,
    /// Layout problems found when the dataset was opened.
    problems: Vec<Problem>,
    frames: Vec<FrameInfo>,
    by_id: HashMap<String, usize>,
    /// Changes that can still be undone, oldest first: their records.
    undo_stack: Vec<Vec<ChangeRecord>>,
    next_change: u64,
}

fn folder_name(label: Option<&str>) -> &str {
    label.unwrap_or(UNLABELED)
}

/// A frame's id: `FOLDER/STEM`.
fn frame_id(label: Option<&str>, stem: &str) -> String {
    format!("{}/{stem}", folder_name(label))
}

fn sha256_file(path: &Path) -> Result<String, LabelError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

impl LabelStore {
    /// Opens a dataset: finishes a change a crash interrupted, reads the change log and lists
    /// the frames; `judge` tells what the rules and model make of each (called in parallel).
    pub fn open(
        root: &Path,
        judge: impl Fn(&Dataset, &weld_core::dataset::Sample) -> Judgement + Sync,
    ) -> Result<LabelStore, LabelError> {
        finish_pending(root)?;
        let (undo_stack, next_change) = read_log(&root.join(CHANGES_FILE))?;
        let ds = Dataset::open(root)?;
        use rayon::prelude::*;
        let frames: Vec<FrameInfo> = ds
            .samples
            .par_iter()
            .map(|s| {
                let label = ds.label_name(s).map(String::from);
                FrameInfo {
                    id: frame_id(label.as_deref(), &s.stem),
                    stem: s.stem.clone(),
                    label,
                    has_depth: s.depth.is_some(),
                    judgement: judge(&ds, s),
                    rgb: s.rgb.clone(),
                    depth: s.depth.clone(),
                }
            })
            .collect();
        let by_id = frames
            .iter()
            .enumerate()
            .map(|(i, f)| (f.id.clone(), i))
            .collect();
        Ok(LabelStore {
            root: root.to_path_buf(),
            classes: ds.spec.classes.clone(),
            depth_unit_mm: ds.spec.depth_unit_mm,
            problems: ds.problems.clone(),
            frames,
            by_id,
            undo_stack,
            next_change,
        })
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// `dataset.toml`'s depth unit.
    pub fn depth_unit_mm(&self) -> Option<f32> {
        self.depth_unit_mm
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn frames(&self) -> &[FrameInfo] {
        &self.frames
    }

    pub fn frame(&self, id: &str) -> Option<&FrameInfo> {
        self.by_id.get(id).map(|&i| &self.frames[i])
    }

    /// How many changes can be undone.
    pub fn undoable(&self) -> usize {
        self.undo_stack.len()
    }

    /// Frames per folder: each class in order, then `unlabeled`.
    pub fn counts(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .classes
            .iter()
            .chain(std::iter::once(&UNLABELED.to_string()))
            .map(|c| (c.clone(), 0))
            .collect();
        for f in &self.frames {
            let i = match &f.label {
                Some(l) => self.classes.iter().position(|c| c == l),
                None => Some(self.classes.len()),
            };
            if let Some(i) = i {
                out[i].1 += 1;
            }
        }
        out
    }

    /// The ids of a queue, in order. `has_model` says whether pre-labels exist.
    pub fn queue(&self, queue: &Queue, has_model: bool) -> Result<Vec<String>, LabelError> {
        let unlabeled = || self.frames.iter().filter(|f| f.label.is_none());
        let model_conf = |f: &FrameInfo| f.judgement.model.as_ref().map_or(0.0, |m| m.confidence);
        let picked: Vec<&FrameInfo> = match queue {
            Queue::Unlabeled => unlabeled().collect(),
            Queue::All => self.frames.iter().collect(),
            Queue::LeastConfident => {
                if !has_model {
                    return Err(LabelError::NeedsModel("confidence"));
                }
                let mut v: Vec<_> = unlabeled().collect();
                v.sort_by(|a, b| model_conf(a).total_cmp(&model_conf(b)));
                v
            }
            Queue::Disagreement => {
                if !has_model {
                    return Err(LabelError::NeedsModel("disagreement"));
                }
                // Disagreeing frames first, surest-of-both first (a confident model against
                // confident rules is the most informative label); then the rest as in
                // `LeastConfident`.
                let key = |f: &FrameInfo| {
                    let j = &f.judgement;
                    match (&j.rules, &j.model) {
                        (Some(r), Some(m)) if r.class != m.class => {
                            (0, -(r.confidence.min(m.confidence)))
                        }
                        _ => (1, model_conf(f)),
                    }
                };
                let mut v: Vec<_> = unlabeled().collect();
                v.sort_by(|a, b| {
                    let (ka, kb) = (key(a), key(b));
                    ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
                });
                v
            }
            Queue::Review(class) => {
                if !self.classes.contains(class) {
                    return Err(LabelError::UnknownClass(
                        class.clone(),
                        self.classes.join(", "),
                    ));
                }
                // The model's probability of the given label is not kept, only its top class:
                // frames where it names another class come first, then its least sure.
                let key = |f: &FrameInfo| match &f.judgement.model {
                    Some(m) if &m.class != class => (0, -m.confidence),
                    Some(m) => (1, m.confidence),
                    None => (1, 0.0),
                };
                let mut v: Vec<_> = self
                    .frames
                    .iter()
                    .filter(|f| f.label.as_ref() == Some(class))
                    .collect();
                v.sort_by(|a, b| {
                    let (ka, kb) = (key(a), key(b));
                    ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
                });
                v
            }
        };
        Ok(picked.into_iter().map(|f| f.id.clone()).collect())
    }

    /// Moves the frames `ids` into the folder of `to` (`None`: `unlabeled/`) as one change
    /// by `user`. Everything is checked before anything moves; frames already there are left
    /// alone. An empty result (`moved` empty) logged nothing.
    pub fn relabel(
        &mut self,
        ids: &[String],
        to: Option<&str>,
        user: &str,
    ) -> Result<Applied, LabelError> {
        if ids.is_empty() {
            return Err(LabelError::NoFrames);
        }
        if let Some(c) = to
            && !self.classes.iter().any(|k| k == c)
        {
            return Err(LabelError::UnknownClass(
                c.to_string(),
                self.classes.join(", "),
            ));
        }
        let mut plan = Vec::new();
        for id in ids {
            let i = *self
                .by_id
                .get(id)
                .ok_or_else(|| LabelError::NoFrame(id.clone()))?;
            if self.frames[i].label.as_deref() != to {
                plan.push((i, to.map(String::from)));
            }
        }
        plan.sort();
        plan.dedup();
        self.apply(plan, "label", None, user)
    }

    /// Reverts the last change not yet undone, as a new change by `user`.
    pub fn undo(&mut self, user: &str) -> Result<Applied, LabelError> {
        let last = self.undo_stack.last().ok_or(LabelError::NothingToUndo)?;
        let undoes = last.first().map(|r| r.change);
        let mut plan = Vec::new();
        for r in last {
            let id = frame_id(Some(&r.to), &r.stem);
            let i = *self.by_id.get(&id).ok_or(LabelError::NoFrame(id))?;
            let back = (r.from != UNLABELED).then(|| r.from.clone());
            plan.push((i, back));
        }
        let applied = self.apply(plan, "undo", undoes, user)?;
        self.undo_stack.pop();
        Ok(applied)
    }

    /// Carries out a plan of (frame index, new label): checks, intent file, renames, log.
    fn apply(
        &mut self,
        plan: Vec<(usize, Option<String>)>,
        action: &str,
        undoes: Option<u64>,
        user: &str,
    ) -> Result<Applied, LabelError> {
        let change = self.next_change;
        if plan.is_empty() {
            return Ok(Applied {
                change,
                moved: Vec::new(),
            });
        }
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut records = Vec::new();
        let mut moves = Vec::new();
        // Where each frame's RGB and depth files go, in plan order.
        let mut targets: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
        for (i, to) in &plan {
            let f = &self.frames[*i];
            let to_dir = folder_name(to.as_deref());
            let dir = self.root.join(to_dir);
            let ext = f
                .rgb
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_else(|| "png".into());
            let rgb_to = dir.join(format!("{}.{ext}", f.stem));
            let depth_to = f
                .depth
                .as_ref()
                .map(|_| dir.join(format!("{}{DEPTH_SUFFIX}", f.stem)));
            if stem_taken(&dir, &f.stem) || targets.iter().any(|(r, _)| *r == rgb_to) {
                return Err(LabelError::NameTaken {
                    dir: to_dir.to_string(),
                    stem: f.stem.clone(),
                });
            }
            records.push(ChangeRecord {
                change,
                ts: ts.clone(),
                user: user.to_string(),
                action: action.to_string(),
                undoes,
                stem: f.stem.clone(),
                from: folder_name(f.label.as_deref()).to_string(),
                to: to_dir.to_string(),
                rgb_sha256: sha256_file(&f.rgb)?,
            });
            // Depth first: until the RGB file moves, the frame is where it was.
            if let (Some(from), Some(to)) = (&f.depth, &depth_to) {
                moves.push(FileMove {
                    from: from.clone(),
                    to: to.clone(),
                });
            }
            moves.push(FileMove {
                from: f.rgb.clone(),
                to: rgb_to.clone(),
            });
            targets.push((rgb_to, depth_to));
        }
        for (_, to) in &plan {
            let dir = self.root.join(folder_name(to.as_deref()));
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }

        let pending_path = self.root.join(PENDING_FILE);
        let pending = Pending { records, moves };
        let text = serde_json::to_vec(&pending).map_err(|e| LabelError::Io {
            path: pending_path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&pending_path, &text).map_err(io_err(&pending_path))?;
        // A failed rename undoes the ones made and drops the intent: nothing changed.
        for (k, m) in pending.moves.iter().enumerate() {
            if let Err(e) = fs::rename(&m.from, &m.to) {
                for done in pending.moves[..k].iter().rev() {
                    let _ = fs::rename(&done.to, &done.from);
                }
                let _ = fs::remove_file(&pending_path);
                return Err(LabelError::Io {
                    path: m.from.clone(),
                    source: e,
                });
            }
        }
        // From here the moves are made; the intent file finishes the log should this fail.
        append_log(&self.root.join(CHANGES_FILE), &pending.records)?;
        fs::remove_file(&pending_path).map_err(io_err(&pending_path))?;

        let mut moved = Vec::new();
        for ((i, to), (rgb, depth)) in plan.into_iter().zip(targets) {
            let f = &mut self.frames[i];
            let old = std::mem::replace(&mut f.id, frame_id(to.as_deref(), &f.stem));
            f.rgb = rgb;
            f.depth = depth;
            f.label = to;
            self.by_id.remove(&old);
            self.by_id.insert(f.id.clone(), i);
            moved.push((old, f.id.clone()));
        }
        self.next_change += 1;
        if action == "label" {
            self.undo_stack.push(pending.records);
        }
        Ok(Applied { change, moved })
    }
}

fn append_log(path: &Path, records: &[ChangeRecord]) -> Result<(), LabelError> {
    let mut text = String::new();
    for r in records {
        let line = serde_json::to_string(r).map_err(|e| LabelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Replays the change log: the changes that can still be undone, and the next change number.
fn read_log(path: &Path) -> Result<(Vec<Vec<ChangeRecord>>, u64), LabelError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 1)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut stack: Vec<Vec<ChangeRecord>> = Vec::new();
    let mut next = 1;
    let mut current: Option<ChangeRecord> = None;
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: ChangeRecord = serde_json::from_str(&line).map_err(|e| LabelError::BadLog {
            path: path.to_path_buf(),
            line: n + 1,
            message: e.to_string(),
        })?;
        next = next.max(r.change + 1);
        let same = current.as_ref().is_some_and(|c| c.change == r.change);
        if r.action == "undo" {
            if !same && let Some(u) = r.undoes {
                stack.retain(|c| c.first().map(|x| x.change) != Some(u));
            }
        } else if same {
            if let Some(top) = stack.last_mut() {
                top.push(r.clone());
            }
        } else {
            stack.push(vec![r.clone()]);
        }
        current = Some(r);
    }
    Ok((stack, next))
}

/// Finishes a change that a crash interrupted: makes the renames that are not made yet, logs
/// the change if the log does not have it, removes the intent file.
fn finish_pending(root: &Path) -> Result<(), LabelError> {
    let path = root.join(PENDING_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let pending: Pending = serde_json::from_slice(&bytes).map_err(|e| LabelError::BadLog {
        path: path.clone(),
        line: 1,
        message: e.to_string(),
    })?;
    for m in &pending.moves {
        if m.from.exists() && !m.to.exists() {
            fs::rename(&m.from, &m.to).map_err(io_err(&m.from))?;
        }
    }
    let log = root.join(CHANGES_FILE);
    let (_, next) = read_log(&log)?;
    let change = pending.records.first().map_or(0, |r| r.change);
    if change >= next {
        append_log(&log, &pending.records)?;
    }
    eprintln!(
        "finished labelling change {change} ({} frames), which was interrupted",
        pending.records.len()
    );
    fs::remove_file(&path).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use weld_core::dataset::DatasetSpec;
    use weld_core::synth::{DEFAULT_CLASSES, SynthClass, SynthConfig, generate};

    /// A dataset with `unlabeled` frames u0.. and one labelled good frame g0, 64x48.
    fn dataset(root: &Path, unlabeled: usize) {
        let cfg = SynthConfig::new(64, 48);
        let spec = DatasetSpec {
            classes: DEFAULT_CLASSES.map(String::from).to_vec(),
            depth_unit_mm: Some(cfg.depth_unit_mm),
            intrinsics: Some(cfg.intrinsics()),
        };
        let mut ds = Dataset::create(root, spec).unwrap();
        for i in 0..unlabeled {
            let s = generate(SynthClass::ALL[i % 5], i as u64, &cfg).unwrap();
            ds.add_frame(None, &format!("u{i}"), &s.frame).unwrap();
        }
        let s = generate(SynthClass::Good, 99, &cfg).unwrap();
        ds.add_frame(Some("good"), "g0", &s.frame).unwrap();
    }

    fn plain(root: &Path) -> LabelStore {
        LabelStore::open(root, |_, _| Judgement::default()).unwrap()
    }

    fn files(root: &Path, folder: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root.join(folder))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn log(root: &Path) -> Vec<ChangeRecord> {
        fs::read_to_string(root.join(CHANGES_FILE))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_label_moves_the_pair_and_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        dataset(dir.path(), 2);
        let mut s = plain(dir.path());
        let rgb_hash = sha256_file(&dir.path().join("unlabeled/u1.png")).unwrap();
        let a = s
            .relabel(&["unlabeled/u1".into()], Some("porosity"), "ann")
            .unwrap();
        assert_eq!(a.moved, vec![("unlabeled/u1".into(), "porosity/u1".into())]);
        assert_eq!(files(dir.path(), "porosity"), ["u1.depth.png", "u1.png"]);
        assert_eq!(files(dir.path(), "unlabeled"), ["u0.depth.png", "u0.png"]);
        assert!(s.frame("unlabeled/u1").is_none());
        assert_eq!(
            s.frame("porosity/u1").unwrap().label.as_deref(),
            Some("porosity")
        );
        let l = log(dir.path());
        assert_eq!(l.len(), 1);
        assert_eq!(
            (l[0].user.as_str(), l[0].from.as_str(), l[0].to.as_str()),
            ("ann", "unlabeled", "porosity")
        );
        assert_eq!(l[0].rgb_sha256, rgb_hash);
        assert!(!dir.path().join(PENDING_FILE).exists());
        // The dataset reads the frame in its new class.
        let ds = Dataset::open(dir.path()).unwrap();
        assert!(ds.problems.is_empty(), "{:?}", ds.problems);
        let moved = ds.samples.iter().find(|x| x.stem == "u1").unwrap();
        assert_eq!(ds.label_name(moved), Some("porosity"));
        assert!(moved.depth.is_some());
        // Labelling a frame with the class it has is no change.
        let again = s
            .relabel(&["porosity/u1".into()], Some("porosity"), "ann")
            .unwrap();
        assert!(again.moved.is_empty());
        assert_eq!(log(dir.path()).len(), 1);
    }

    #[test]
    fn bad_requests_name_the_problem_and_move_nothing() {
        let dir = tempfile::tempdir().unwrap();
        dataset(dir.path(), 2);
        // A frame of that name already in the target class.
        let cfg = SynthConfig::new(64, 48);
        let f = generate(SynthClass::Good, 5, &cfg).unwrap().frame;
        let mut ds = Dataset::open(dir.path()).unwrap();
        ds.add_frame(Some("good"), "u0", &f).unwrap();
        let mut s = plain(dir.path());
        let before = (files(dir.path(), "unlabeled"), files(dir.path(), "good"));
        let e = s
            .relabel(
                &["unlabeled/u1".into(), "unlabeled/u0".into()],
                Some("good"),
                "ann",
            )
            .unwrap_err();
        assert!(
            matches!(&e, LabelError::NameTaken { dir, stem } if dir == "good" && stem == "u0"),
            "{e}"
        );
        let e = s
            .relabel(&["unlabeled/u1".into()], Some("cracks"), "ann")
            .unwrap_err();
        assert!(e.to_string().contains("\"cracks\" is not a class"), "{e}");
        let e = s
            .relabel(&["unlabeled/nope".into()], Some("good"), "ann")
            .unwrap_err();
        assert!(e.to_string().contains("no frame unlabeled/nope"), "{e}");
        assert!(matches!(
            s.relabel(&[], Some("good"), "ann"),
            Err(LabelError::NoFrames)
        ));
        assert!(matches!(s.undo("ann"), Err(LabelError::NothingToUndo)));
        assert_eq!(
            (files(dir.path(), "unlabeled"), files(dir.path(), "good")),
            before
        );
        assert!(log(dir.path()).is_empty());
    }

    #[test]
    fn undo_reverts_the_last_change_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        dataset(dir.path(), 3);
        let mut s = plain(dir.path());
        s.relabel(&["unlabeled/u0".into()], Some("spatter"), "ann")
            .unwrap();
        // A bulk change of two frames is one change.
        let bulk = s
            .relabel(
                &["unlabeled/u1".into(), "unlabeled/u2".into()],
                Some("undercut"),
                "bob",
            )
            .unwrap();
        assert_eq!(bulk.moved.len(), 2);
        assert_eq!(s.undoable(), 2);
        drop(s);

        let mut s = plain(dir.path());
        assert_eq!(s.undoable(), 2);
        let u = s.undo("cy").unwrap();
        assert_eq!(u.moved.len(), 2);
        assert_eq!(files(dir.path(), "undercut"), Vec::<String>::new());
        assert_eq!(files(dir.path(), "unlabeled").len(), 4);
        let u = s.undo("cy").unwrap();
        assert_eq!(u.moved, vec![("spatter/u0".into(), "unlabeled/u0".into())]);
        assert!(matches!(s.undo("cy"), Err(LabelError::NothingToUndo)));
        drop(s);
        // The log keeps all of it: 3 moves and 3 moves back, each undo naming its change.
        let l = log(dir.path());
        assert_eq!(l.len(), 6);
        assert_eq!(l[3].action, "undo");
        assert_eq!(l[3].undoes, Some(bulk.change));
        assert_eq!(
            (l[3].from.as_str(), l[3].to.as_str()),
            ("undercut", "unlabeled")
        );
        assert_eq!(l[5].undoes, Some(l[0].change));
        assert_eq!(plain(dir.path()).undoable(), 0);
    }

    #[test]
    fn a_change_interrupted_between_its_renames_is_finished_on_open() {
        let dir = tempfile::tempdir().unwrap();
        dataset(dir.path(), 1);
        let root = dir.path();
        // What a crash after the depth file's rename leaves.
        let (depth_from, depth_to) = (
            root.join("unlabeled/u0.depth.png"),
            root.join("burn_through/u0.depth.png"),
        );
        let (rgb_from, rgb_to) = (
            root.join("unlabeled/u0.png"),
            root.join("burn_through/u0.png"),
        );
        let pending = Pending {
            records: vec![ChangeRecord {
                change: 1,
                ts: "2026-12-07T10:00:00.000Z".into(),
                user: "ann".into(),
                action: "label".into(),
                undoes: None,
                stem: "u0".into(),
                from: "unlabeled".into(),
                to: "burn_through".into(),
                rgb_sha256: sha256_file(&rgb_from).unwrap(),
            }],
            moves: vec![
                FileMove {
                    from: depth_from.clone(),
                    to: depth_to.clone(),
                },
                FileMove {
                    from: rgb_from.clone(),
                    to: rgb_to.clone(),
                },
            ],
        };
        fs::write(
            root.join(PENDING_FILE),
            serde_json::to_vec(&pending).unwrap(),
        )
        .unwrap();
        fs::rename(&depth_from, &depth_to).unwrap();

        let s = plain(root);
        assert!(rgb_to.exists() && depth_to.exists());
        assert!(!rgb_from.exists() && !depth_from.exists());
        assert!(!root.join(PENDING_FILE).exists());
        assert_eq!(
            s.frame("burn_through/u0").unwrap().label.as_deref(),
            Some("burn_through")
        );
        assert_eq!(log(root), pending.records);
        assert_eq!(s.undoable(), 1);
        drop(s);
        // Opening again changes nothing more.
        plain(root);
        assert_eq!(log(root).len(), 1);
    }

    #[test]
    fn queues_order_the_frames_that_teach_the_most_first() {
        let dir = tempfile::tempdir().unwrap();
        dataset(dir.path(), 4);
        let op = |class: &str, confidence: f32| {
            Some(Opinion {
                class: class.into(),
                confidence,
            })
        };
        // (rules, model) per stem.
        let judged = |stem: &str| match stem {
            "u0" => (op("good", 0.9), op("good", 0.95)),
            "u1" => (op("good", 0.9), op("porosity", 0.6)),
            "u2" => (op("spatter", 0.7), op("spatter", 0.4)),
            "u3" => (op("undercut", 0.95), op("good", 0.9)),
            _ => (op("good", 0.9), op("porosity", 0.7)),
        };
        let s = LabelStore::open(dir.path(), |_, sample| {
            let (rules, model) = judged(&sample.stem);
            Judgement {
                rules,
                model,
                ..Judgement::default()
            }
        })
        .unwrap();
        let ids = |q: Queue| s.queue(&q, true).unwrap();
        assert_eq!(
            ids(Queue::Unlabeled),
            [
                "unlabeled/u0",
                "unlabeled/u1",
                "unlabeled/u2",
                "unlabeled/u3"
            ]
        );
        assert_eq!(
            ids(Queue::LeastConfident),
            [
                "unlabeled/u2",
                "unlabeled/u1",
                "unlabeled/u3",
                "unlabeled/u0"
            ]
        );
        assert_eq!(
            ids(Queue::Disagreement),
            [
                "unlabeled/u3",
                "unlabeled/u1",
                "unlabeled/u2",
                "unlabeled/u0"
            ]
        );
        assert_eq!(ids(Queue::Review("good".into())), ["good/g0"]);
        assert_eq!(ids(Queue::All).len(), 5);
        assert!(matches!(
            s.queue(&Queue::Disagreement, false),
            Err(LabelError::NeedsModel(_))
        ));
        assert!(s.queue(&Queue::Review("cracks".into()), true).is_err());
        assert_eq!(
            Queue::parse("class:spatter"),
            Some(Queue::Review("spatter".into()))
        );
        assert_eq!(Queue::parse("sideways"), None);
        assert_eq!(
            s.counts(),
            [
                ("good", 1),
                ("porosity", 0),
                ("undercut", 0),
                ("spatter", 0),
                ("burn_through", 0),
                ("unlabeled", 4)
            ]
            .map(|(c, n)| (c.to_string(), n))
        );
    }
}
