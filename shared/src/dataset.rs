//! The dataset on disk (DESIGN.md): `dataset.toml`, one folder per class, `unlabeled/`.
//!
//! ```text
//! DATASET/
//!   dataset.toml          classes = [...]; depth_unit_mm = 0.05; optional [intrinsics]
//!   good/STEM.png         RGB, 8 bit (also .jpg/.jpeg; grayscale is converted to RGB)
//!   good/STEM.depth.png   optional 16-bit depth of the same size
//!   unlabeled/...         frames without a label
//! ```
//! Files whose name starts with `.` are ignored (temporary files of atomic writes). Other files
//! at the top level are left alone (notes, split lists); folders must be a class or `unlabeled`.
//!
//! Optional `groups.csv` (`stem,group`) puts frames that show the same weld (a run, a seam, a
//! part) into one group, so that a split never puts one weld on both sides; a frame it does
//! not name is a group of its own. A dataset's version is the hash of its content
//! ([`Dataset::version`]): any change to a frame, a label, a group or `dataset.toml` changes it.
//!
//! [`Dataset::open`] reads the layout and notes every structural problem; [`Dataset::validate`]
//! also reads each image header (size, pixel format) and returns every problem found at once.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use image::ImageDecoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::frame::{self, DEPTH_SUFFIX, Frame, FrameError, Intrinsics};
use crate::fsutil::write_atomic;

/// Name of the dataset description file.
pub const DATASET_FILE: &str = "dataset.toml";
/// Folder of frames without a label.
pub const UNLABELED: &str = "unlabeled";
/// Name of the optional file that groups frames of one weld (`stem,group` per line).
pub const GROUPS_FILE: &str = "groups.csv";
/// Extensions accepted for RGB files (lower case; matched case-insensitively).
pub const RGB_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// `dataset.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Class names in label order; each is also the name of its folder.
    pub classes: Vec<String>,
    /// Millimetres per raw depth unit; required when any frame has depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth_unit_mm: Option<f32>,
    /// Camera intrinsics shared by all frames, in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intrinsics: Option<Intrinsics>,
}

impl DatasetSpec {
    /// Every problem with the spec, each naming the key.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.classes.is_empty() {
            out.push("classes is empty; list at least one class".to_string());
        }
        for (i, c) in self.classes.iter().enumerate() {
            if let Some(why) = class_name_problem(c) {
                out.push(format!("classes[{i}] {c:?} {why}"));
            } else if self.classes[..i].contains(c) {
                out.push(format!("classes lists {c:?} twice"));
            }
        }
        if let Some(u) = self.depth_unit_mm
            && !(u.is_finite() && u > 0.0)
        {
            out.push(format!(
                "depth_unit_mm must be a positive number of mm, got {u}"
            ));
        }
        if let Some(i) = &self.intrinsics {
            out.extend(i.problems());
        }
        out
    }

    /// Reads and parses `root/dataset.toml` (its values are checked by [`DatasetSpec::problems`]).
    pub fn load(root: &Path) -> Result<DatasetSpec, DatasetError> {
        let spec_path = root.join(DATASET_FILE);
        if !spec_path.is_file() {
            return Err(DatasetError::NotADataset(root.to_path_buf()));
        }
        let text = fs::read_to_string(&spec_path).map_err(io_err(&spec_path))?;
        toml::from_str(&text).map_err(|e| DatasetError::BadSpec {
            path: spec_path,
            message: e.to_string(),
        })
    }

    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.classes.iter().position(|c| c == name)
    }
}

/// Why a class name cannot be a folder name, if it cannot.
fn class_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name == UNLABELED {
        Some("is reserved for frames without a label")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        Some("may only use letters, digits, '_' and '-'")
    } else {
        None
    }
}

/// One frame of the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// File name without extension; unique within its folder.
    pub stem: String,
    /// Index into `classes`; `None` for `unlabeled/`.
    pub label: Option<usize>,
    pub rgb: PathBuf,
    pub depth: Option<PathBuf>,
}

/// A problem found in a dataset: the file or folder, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)
    }
}

#[derive(Debug, Error)]
pub enum DatasetError {
    #[error("{}: no {DATASET_FILE} here; is this a dataset folder?", .0.display())]
    NotADataset(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid dataset description: {message}", path.display())]
    BadSpec { path: PathBuf, message: String },
    #[error("{}: refusing to write a dataset into a folder that is not empty", .0.display())]
    NotEmpty(PathBuf),
    #[error("class {0:?} is not in this dataset's classes ({1})")]
    UnknownClass(String, String),
    #[error("{}: a frame named {stem:?} is already there", dir.display())]
    Exists { dir: PathBuf, stem: String },
    #[error("{}: {DATASET_FILE} has no depth_unit_mm but frames have depth", .0.display())]
    MissingDepthUnit(PathBuf),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A dataset folder: its spec, its frames and the structural problems met while reading it.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub spec: DatasetSpec,
    /// Sorted by label (class order, unlabeled last), then stem.
    pub samples: Vec<Sample>,
    /// Layout problems found by [`Dataset::open`]; [`Dataset::validate`] adds the deep ones.
    pub problems: Vec<Problem>,
    /// Group of each frame named in `groups.csv`, by stem.
    pub groups: BTreeMap<String, String>,
}

impl Dataset {
    /// Reads `dataset.toml` and lists the frames. Fails only when the folder is not a dataset
    /// or `dataset.toml` cannot be parsed; everything else is collected in `problems`.
    pub fn open(root: &Path) -> Result<Dataset, DatasetError> {
        let spec = DatasetSpec::load(root)?;
        Dataset::scan(root, spec)
    }

    /// Lists the frames of a class-per-folder tree as [`Dataset::open`] does, with a spec given
    /// instead of read from `dataset.toml` (importing a folder that has none).
    pub fn scan(root: &Path, spec: DatasetSpec) -> Result<Dataset, DatasetError> {
        let spec_path = root.join(DATASET_FILE);
        let mut problems: Vec<Problem> = spec
            .problems()
            .into_iter()
            .map(|what| Problem {
                path: spec_path.clone(),
                what,
            })
            .collect();

        let mut samples = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(root)
            .map_err(io_err(root))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') || !path.is_dir() {
                continue;
            }
            let label = if name == UNLABELED {
                None
            } else if let Some(i) = spec.class_index(&name) {
                Some(i)
            } else {
                problems.push(Problem {
                    path,
                    what: format!(
                        "folder is not a class of {DATASET_FILE} (classes: {}) nor {UNLABELED}/",
                        spec.classes.join(", ")
                    ),
                });
                continue;
            };
            scan_folder(&path, label, &mut samples, &mut problems);
        }
        samples.sort_by(|a, b| {
            (a.label.unwrap_or(usize::MAX), &a.stem).cmp(&(b.label.unwrap_or(usize::MAX), &b.stem))
        });
        if spec.depth_unit_mm.is_none()
            && let Some(depth) = samples.iter().find_map(|s| s.depth.as_deref())
        {
            problems.push(Problem {
                path: spec_path,
                what: format!(
                    "depth_unit_mm is missing but frames have depth (e.g. {})",
                    depth.display()
                ),
            });
        }
        let groups = read_groups(root, &mut problems);
        Ok(Dataset {
            root: root.to_path_buf(),
            spec,
            samples,
            problems,
            groups,
        })
    }

    /// The weld a frame belongs to: its group in `groups.csv`, else its own stem.
    pub fn group_of<'a>(&'a self, sample: &'a Sample) -> &'a str {
        self.groups
            .get(&sample.stem)
            .map_or(&sample.stem, String::as_str)
    }

    /// A sample's path relative to the dataset root, with `/` separators (`good/a.png`).
    pub fn relative(&self, sample: &Sample) -> String {
        let rel = sample.rgb.strip_prefix(&self.root).unwrap_or(&sample.rgb);
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    }

    /// sha256 (hex) of a frame's content: its RGB file's bytes, then its depth file's.
    pub fn frame_hash(sample: &Sample) -> Result<String, DatasetError> {
        let mut h = Sha256::new();
        h.update(fs::read(&sample.rgb).map_err(io_err(&sample.rgb))?);
        if let Some(d) = &sample.depth {
            h.update(b"\0depth\0");
            h.update(fs::read(d).map_err(io_err(d))?);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// The dataset's version: sha256 over `dataset.toml`'s values, then every frame's label,
    /// stem, group and content hash (from [`Dataset::frame_hash`], in `samples` order).
    /// Callers with many frames hash them in parallel and pass the hashes in.
    pub fn version(&self, frame_hashes: &[String]) -> Result<String, DatasetError> {
        if frame_hashes.len() != self.samples.len() {
            return Err(DatasetError::BadSpec {
                path: self.root.clone(),
                message: format!(
                    "{} frame hashes given for {} frames",
                    frame_hashes.len(),
                    self.samples.len()
                ),
            });
        }
        let spec = toml::to_string(&self.spec).map_err(|e| DatasetError::BadSpec {
            path: self.root.join(DATASET_FILE),
            message: e.to_string(),
        })?;
        let mut h = Sha256::new();
        h.update(spec.as_bytes());
        for (s, fh) in self.samples.iter().zip(frame_hashes) {
            let label = self.label_name(s).unwrap_or(UNLABELED);
            h.update(format!("\n{label}\0{}\0{}\0{fh}", s.stem, self.group_of(s)).as_bytes());
        }
        Ok(hex::encode(h.finalize()))
    }

    /// All problems: the layout problems of `open`, plus for every frame an unreadable image,
    /// a depth image that is not 16-bit single-channel, or depth of another size than its RGB.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = self.problems.clone();
        for s in &self.samples {
            let rgb = match header(&s.rgb) {
                Ok(h) => Some(h),
                Err(what) => {
                    out.push(Problem {
                        path: s.rgb.clone(),
                        what,
                    });
                    None
                }
            };
            let Some(dp) = &s.depth else { continue };
            match header(dp) {
                Err(what) => out.push(Problem {
                    path: dp.clone(),
                    what,
                }),
                Ok((_, color)) if color != image::ColorType::L16 => out.push(Problem {
                    path: dp.clone(),
                    what: format!(
                        "depth must be a 16-bit single-channel PNG, found {}",
                        frame::color_name(color)
                    ),
                }),
                Ok((size, _)) => {
                    if let Some((rgb_size, _)) = rgb
                        && size != rgb_size
                    {
                        out.push(Problem {
                            path: dp.clone(),
                            what: format!(
                                "depth is {}x{} but its RGB image is {}x{}",
                                size.0, size.1, rgb_size.0, rgb_size.1
                            ),
                        });
                    }
                }
            }
        }
        out
    }

    /// Loads one frame with the dataset's depth unit and intrinsics.
    pub fn load(&self, sample: &Sample) -> Result<Frame, DatasetError> {
        let unit = match (self.spec.depth_unit_mm, &sample.depth) {
            (Some(u), _) => u,
            (None, None) => 1.0, // unused: the frame has no depth
            (None, Some(_)) => return Err(DatasetError::MissingDepthUnit(self.root.clone())),
        };
        Ok(Frame::load(&sample.rgb, sample.depth.as_deref(), unit)?
            .with_intrinsics(self.spec.intrinsics))
    }

    /// Name of a sample's label (`None` for unlabeled frames).
    pub fn label_name(&self, sample: &Sample) -> Option<&str> {
        sample
            .label
            .and_then(|i| self.spec.classes.get(i))
            .map(String::as_str)
    }

    /// Frames per class, in class order, then the number of unlabeled frames.
    pub fn counts(&self) -> (Vec<(String, usize)>, usize) {
        let mut per = vec![0usize; self.spec.classes.len()];
        let mut unlabeled = 0;
        for s in &self.samples {
            match s.label {
                Some(i) if i < per.len() => per[i] += 1,
                _ => unlabeled += 1,
            }
        }
        (
            self.spec.classes.iter().cloned().zip(per).collect(),
            unlabeled,
        )
    }

    /// Creates a new dataset in `root`, which must be missing or empty: writes `dataset.toml`
    /// and one folder per class.
    pub fn create(root: &Path, spec: DatasetSpec) -> Result<Dataset, DatasetError> {
        let problems = spec.problems();
        if !problems.is_empty() {
            return Err(DatasetError::BadSpec {
                path: root.join(DATASET_FILE),
                message: problems.join("; "),
            });
        }
        if root.exists() {
            let mut it = fs::read_dir(root).map_err(io_err(root))?;
            if it.next().is_some() {
                return Err(DatasetError::NotEmpty(root.to_path_buf()));
            }
        }
        for class in &spec.classes {
            let dir = root.join(class);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let spec_path = root.join(DATASET_FILE);
        let text = toml::to_string(&spec).map_err(|e| DatasetError::BadSpec {
            path: spec_path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&spec_path, text.as_bytes()).map_err(io_err(&spec_path))?;
        Ok(Dataset {
            root: root.to_path_buf(),
            spec,
            samples: Vec::new(),
            problems: Vec::new(),
            groups: BTreeMap::new(),
        })
    }

    /// Where a frame of `class` (`None`: unlabeled) named `stem` is written: the RGB PNG and
    /// the depth PNG paths.
    pub fn paths_for(&self, class: Option<&str>, stem: &str) -> (PathBuf, PathBuf) {
        let dir = self.root.join(class.unwrap_or(UNLABELED));
        (
            dir.join(format!("{stem}.png")),
            dir.join(format!("{stem}{DEPTH_SUFFIX}")),
        )
    }

    /// Writes a frame as `CLASS/STEM.png` (+ `STEM.depth.png`), or into `unlabeled/` when
    /// `class` is `None`. An existing frame of that name is never overwritten.
    pub fn add_frame(
        &mut self,
        class: Option<&str>,
        stem: &str,
        frame: &Frame,
    ) -> Result<&Sample, DatasetError> {
        let label = match class {
            None => None,
            Some(c) => Some(self.spec.class_index(c).ok_or_else(|| {
                DatasetError::UnknownClass(c.to_string(), self.spec.classes.join(", "))
            })?),
        };
        let (rgb, depth) = self.paths_for(class, stem);
        let dir = self.root.join(class.unwrap_or(UNLABELED));
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        if stem_taken(&dir, stem) {
            return Err(DatasetError::Exists {
                dir,
                stem: stem.to_string(),
            });
        }
        frame.save(&rgb, &depth)?;
        let depth = frame.depth().map(|_| depth);
        self.samples.push(Sample {
            stem: stem.to_string(),
            label,
            rgb,
            depth,
        });
        Ok(&self.samples[self.samples.len() - 1])
    }
}

/// Whether the folder `dir` already holds a frame named `stem` (its RGB file in any accepted
/// format, or its depth file).
pub fn stem_taken(dir: &Path, stem: &str) -> bool {
    RGB_EXTENSIONS
        .iter()
        .any(|e| dir.join(format!("{stem}.{e}")).exists())
        || dir.join(format!("{stem}{DEPTH_SUFFIX}")).exists()
}

/// Writes `groups.csv` (`stem,group`, sorted by stem) atomically.
pub fn write_groups(root: &Path, groups: &BTreeMap<String, String>) -> Result<(), DatasetError> {
    let path = root.join(GROUPS_FILE);
    let mut w = csv::Writer::from_writer(Vec::new());
    let rows = std::iter::once(("stem", "group"))
        .chain(groups.iter().map(|(s, g)| (s.as_str(), g.as_str())));
    for row in rows {
        w.write_record([row.0, row.1])
            .map_err(|e| DatasetError::BadSpec {
                path: path.clone(),
                message: e.to_string(),
            })?;
    }
    let bytes = w.into_inner().map_err(|e| DatasetError::BadSpec {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write_atomic(&path, &bytes).map_err(io_err(&path))
}

/// Reads `groups.csv` if there is one; a malformed file or row is a problem, not an error.
fn read_groups(root: &Path, problems: &mut Vec<Problem>) -> BTreeMap<String, String> {
    let path = root.join(GROUPS_FILE);
    let mut out = BTreeMap::new();
    if !path.is_file() {
        return out;
    }
    let mut problem = |what: String| {
        problems.push(Problem {
            path: path.clone(),
            what,
        })
    };
    let mut reader = match csv::Reader::from_path(&path) {
        Ok(r) => r,
        Err(e) => {
            problem(format!("cannot read: {e}"));
            return out;
        }
    };
    match reader.headers() {
        Ok(h) if h.iter().eq(["stem", "group"]) => {}
        Ok(h) => {
            problem(format!(
                "the header must be `stem,group`, found `{}`",
                h.iter().collect::<Vec<_>>().join(",")
            ));
            return out;
        }
        Err(e) => {
            problem(format!("cannot read the header: {e}"));
            return out;
        }
    }
    for (i, row) in reader.records().enumerate() {
        match row {
            Ok(r) if r.len() == 2 && !r[0].is_empty() && !r[1].is_empty() => {
                if let Some(prev) = out.insert(r[0].to_string(), r[1].to_string())
                    && prev != r[1]
                {
                    problem(format!(
                        "line {}: {:?} is in group {prev:?} and {:?}",
                        i + 2,
                        &r[0],
                        &r[1]
                    ));
                }
            }
            Ok(_) => problem(format!("line {}: expected a stem and a group", i + 2)),
            Err(e) => problem(format!("line {}: {e}", i + 2)),
        }
    }
    out
}

/// Lists the frames of one class folder (or `unlabeled/`), noting stray files.
fn scan_folder(
    dir: &Path,
    label: Option<usize>,
    out: &mut Vec<Sample>,
    problems: &mut Vec<Problem>,
) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem {
                path: dir.to_path_buf(),
                what: format!("cannot list: {e}"),
            });
            return;
        }
    };
    let mut rgb: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut depth: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            problems.push(Problem {
                path,
                what: "folders inside a class folder are not part of the dataset format".into(),
            });
            continue;
        }
        let lower = name.to_ascii_lowercase();
        if let Some(stem) = lower
            .strip_suffix(DEPTH_SUFFIX)
            .map(|s| name[..s.len()].to_string())
        {
            depth.insert(stem, path);
        } else if let Some((stem, ext)) = name.rsplit_once('.')
            && RGB_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())
            && !stem.is_empty()
        {
            rgb.entry(stem.to_string()).or_default().push(path);
        } else {
            problems.push(Problem {
                path,
                what: "not a frame file (expected STEM.png, STEM.jpg or STEM.depth.png)".into(),
            });
        }
    }
    for (stem, mut paths) in rgb {
        paths.sort();
        if paths.len() > 1 {
            let names: Vec<String> = paths
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into())
                .collect();
            problems.push(Problem {
                path: dir.join(&stem),
                what: format!(
                    "one frame has several RGB files ({}); keep one",
                    names.join(", ")
                ),
            });
        }
        let depth = depth.remove(&stem);
        out.push(Sample {
            stem,
            label,
            rgb: paths.swap_remove(0),
            depth,
        });
    }
    for (_, path) in depth {
        problems.push(Problem {
            path,
            what: "depth file without its RGB image (STEM.png or STEM.jpg)".into(),
        });
    }
}

/// Size and pixel format from an image header, without decoding the pixels.
fn header(path: &Path) -> Result<((u32, u32), image::ColorType), String> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    let decoder = reader
        .into_decoder()
        .map_err(|e| format!("not a readable image: {e}"))?;
    let size = decoder.dimensions();
    if size.0 == 0 || size.1 == 0 {
        return Err(format!("image is empty ({}x{})", size.0, size.1));
    }
    Ok((size, decoder.color_type()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{DepthImage, DepthMap};
    use image::{Luma, Rgb, RgbImage};

    fn spec() -> DatasetSpec {
        DatasetSpec {
            classes: vec!["good".into(), "porosity".into()],
            depth_unit_mm: Some(0.05),
            intrinsics: Some(Intrinsics {
                fx: 500.0,
                fy: 500.0,
                cx: 16.0,
                cy: 12.0,
            }),
        }
    }

    fn frame(seed: u8, depth: bool) -> Frame {
        let rgb = RgbImage::from_fn(32, 24, |x, y| Rgb([seed, x as u8, y as u8]));
        let d = depth.then(|| DepthMap {
            values: DepthImage::from_fn(32, 24, |x, y| {
                Luma([3000 + (x * y) as u16 + u16::from(seed)])
            }),
            unit_mm: 0.05,
        });
        Frame::new(rgb, d).unwrap()
    }

    #[test]
    fn write_read_round_trip_is_pixel_identical() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ds");
        let mut ds = Dataset::create(&root, spec()).unwrap();
        let frames = [frame(1, true), frame(2, false), frame(3, true)];
        ds.add_frame(Some("good"), "a", &frames[0]).unwrap();
        ds.add_frame(Some("porosity"), "b", &frames[1]).unwrap();
        ds.add_frame(None, "c", &frames[2]).unwrap();

        let back = Dataset::open(&root).unwrap();
        assert_eq!(back.spec, spec());
        assert!(back.validate().is_empty(), "{:?}", back.validate());
        assert_eq!(back.samples.len(), 3);
        let (counts, unlabeled) = back.counts();
        assert_eq!(counts, vec![("good".into(), 1), ("porosity".into(), 1)]);
        assert_eq!(unlabeled, 1);
        for (s, f) in back.samples.iter().zip(&frames) {
            let loaded = back.load(s).unwrap();
            assert_eq!(loaded.rgb(), f.rgb());
            assert_eq!(
                loaded.depth().map(|d| &d.values),
                f.depth().map(|d| &d.values)
            );
            assert_eq!(loaded.intrinsics, spec().intrinsics);
        }
        assert_eq!(back.label_name(&back.samples[2]), None);
    }

    #[test]
    fn rgb_only_jpg_dataset_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(DATASET_FILE),
            "classes = [\"good\", \"burn_through\"]\n",
        )
        .unwrap();
        fs::create_dir(dir.path().join("burn_through")).unwrap();
        RgbImage::new(8, 8)
            .save(dir.path().join("burn_through/x.JPG"))
            .unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        assert!(ds.validate().is_empty(), "{:?}", ds.validate());
        assert_eq!(ds.samples[0].label, Some(1));
        assert!(ds.load(&ds.samples[0]).unwrap().depth().is_none());
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(
            root.join(DATASET_FILE),
            "classes = [\"good\", \"good\", \"bad class\"]\ndepth_unit_mm = -1\n",
        )
        .unwrap();
        for d in ["good", "cracks", "unlabeled"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        frame(1, true)
            .save(&root.join("good/a.png"), &root.join("good/a.depth.png"))
            .unwrap();
        // Depth of the wrong size, 8-bit depth, stray files, orphan depth, duplicate stem.
        frame(1, false)
            .save(&root.join("good/b.png"), Path::new(""))
            .unwrap();
        DepthImage::new(5, 5)
            .save(root.join("good/b.depth.png"))
            .unwrap();
        frame(1, false)
            .save(&root.join("good/c.png"), Path::new(""))
            .unwrap();
        image::GrayImage::new(32, 24)
            .save(root.join("good/c.depth.png"))
            .unwrap();
        fs::write(root.join("good/notes.txt"), "hi").unwrap();
        DepthImage::new(5, 5)
            .save(root.join("unlabeled/lonely.depth.png"))
            .unwrap();
        RgbImage::new(4, 4).save(root.join("good/d.png")).unwrap();
        RgbImage::new(4, 4).save(root.join("good/d.jpg")).unwrap();
        fs::write(root.join("good/e.png"), b"garbage").unwrap();
        fs::write(root.join("good/.a.png.tmp-1"), b"ignored").unwrap();

        let ds = Dataset::open(root).unwrap();
        let problems: Vec<String> = ds.validate().iter().map(ToString::to_string).collect();
        let expect = [
            "lists \"good\" twice",
            "\"bad class\" may only use",
            "depth_unit_mm must be a positive",
            "cracks: folder is not a class",
            "b.depth.png: depth is 5x5 but its RGB image is 32x24",
            "c.depth.png: depth must be a 16-bit single-channel PNG, found 8-bit grayscale",
            "notes.txt: not a frame file",
            "lonely.depth.png: depth file without its RGB image",
            "several RGB files (d.jpg, d.png)",
            "e.png: not a readable image",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.contains(e)),
                "missing {e:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    }

    #[test]
    fn missing_or_broken_dataset_toml_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Dataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no dataset.toml"), "{err}");
        fs::write(
            dir.path().join(DATASET_FILE),
            "classes = [\"good\"]\ncolour = 1\n",
        )
        .unwrap();
        let err = Dataset::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("dataset.toml") && err.contains("colour"),
            "{err}"
        );
    }

    #[test]
    fn depth_without_unit_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DATASET_FILE), "classes = [\"good\"]\n").unwrap();
        fs::create_dir(dir.path().join("good")).unwrap();
        let p = dir.path().join("good/a.png");
        frame(1, true).save(&p, &frame::depth_path_for(&p)).unwrap();
        let problems = Dataset::open(dir.path()).unwrap().validate();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].what.contains("depth_unit_mm is missing"),
            "{problems:?}"
        );
    }

    #[test]
    fn writing_never_overwrites_or_fills_a_used_folder() {
        let dir = tempfile::tempdir().unwrap();
        let mut ds = Dataset::create(dir.path(), spec()).unwrap();
        ds.add_frame(Some("good"), "a", &frame(1, true)).unwrap();
        let before = fs::read(dir.path().join("good/a.png")).unwrap();
        assert!(matches!(
            ds.add_frame(Some("good"), "a", &frame(9, true)),
            Err(DatasetError::Exists { .. })
        ));
        assert_eq!(fs::read(dir.path().join("good/a.png")).unwrap(), before);
        assert!(matches!(
            ds.add_frame(Some("crack"), "z", &frame(1, true)),
            Err(DatasetError::UnknownClass(..))
        ));
        assert!(matches!(
            Dataset::create(dir.path(), spec()),
            Err(DatasetError::NotEmpty(_))
        ));
    }

    #[test]
    fn groups_file_groups_frames_and_bad_rows_are_problems() {
        let dir = tempfile::tempdir().unwrap();
        let mut ds = Dataset::create(dir.path(), spec()).unwrap();
        for stem in ["a", "b", "c"] {
            ds.add_frame(Some("good"), stem, &frame(1, false)).unwrap();
        }
        let groups = BTreeMap::from([
            ("a".to_string(), "run-1".to_string()),
            ("b".to_string(), "run-1".to_string()),
        ]);
        write_groups(dir.path(), &groups).unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        assert!(ds.problems.is_empty(), "{:?}", ds.problems);
        let g: Vec<&str> = ds.samples.iter().map(|s| ds.group_of(s)).collect();
        assert_eq!(g, ["run-1", "run-1", "c"]);
        assert_eq!(ds.relative(&ds.samples[2]), "good/c.png");

        fs::write(
            dir.path().join(GROUPS_FILE),
            "stem,group\na,run-1\na,run-2\nb\n",
        )
        .unwrap();
        let problems: Vec<String> = Dataset::open(dir.path())
            .unwrap()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("line 3: \"a\" is in group \"run-1\" and \"run-2\""));
        assert!(problems[1].contains("line 4"), "{problems:?}");
        fs::write(dir.path().join(GROUPS_FILE), "file,run\na,1\n").unwrap();
        let p = Dataset::open(dir.path()).unwrap().problems;
        assert!(p[0].what.contains("must be `stem,group`"), "{p:?}");
    }
}
