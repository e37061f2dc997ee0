//! Importing folders into datasets, dataset versions, and group-aware stratified splits.
//!
//! A dataset's version is [`weld_core::dataset::Dataset::version`], computed here with the
//! frames hashed in parallel. A split records the version it was made from; training refuses a
//! split whose dataset has changed since, so a model's lineage names exactly the frames it saw.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use weld_core::dataset::{
    DATASET_FILE, Dataset, DatasetSpec, GROUPS_FILE, Problem, Sample, UNLABELED, write_groups,
};
use weld_core::fsutil::write_atomic;

use crate::datasets::refuse_problems;

/// Hashes every frame (in parallel) and returns the hashes in `samples` order.
pub fn frame_hashes(ds: &Dataset) -> Result<Vec<String>> {
    Ok(ds
        .samples
        .par_iter()
        .map(Dataset::frame_hash)
        .collect::<Result<Vec<_>, _>>()?)
}

/// The dataset's version hash.
pub fn version(ds: &Dataset) -> Result<String> {
    Ok(ds.version(&frame_hashes(ds)?)?)
}

/// How `dataset import` reads its source.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Class list in label order; default: the source's `dataset.toml`, else its folder names.
    pub classes: Option<Vec<String>>,
    /// A CSV naming each file's group (weld run, seam, part); default: the source's
    /// `groups.csv`, else its `manifest.csv` when that has a file and a group column.
    pub groups: Option<PathBuf>,
    /// The group column of that CSV; default: the first of `group`, `run_id`, `run`, `weld`,
    /// `seam`, `part`.
    pub group_column: Option<String>,
    /// Millimetres per depth unit, for a source without `dataset.toml` whose frames have depth.
    pub depth_unit_mm: Option<f32>,
}

/// What `dataset import` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub frames: usize,
    /// Byte-identical copies of a frame already imported with the same label: left out.
    pub duplicates: Vec<String>,
    /// Identical frames found under different labels: one copy goes to `unlabeled/`.
    pub conflicts: Vec<String>,
    /// Frames renamed because another class already had their stem.
    pub renamed: Vec<(String, String)>,
    /// Frames with a group from the groups file.
    pub grouped: usize,
    pub groups: usize,
    pub version: String,
}

const GROUP_COLUMNS: [&str; 6] = ["group", "run_id", "run", "weld", "seam", "part"];
const FILE_COLUMNS: [&str; 4] = ["file", "stem", "path", "filename"];

/// Imports the class-per-folder tree (or dataset) at `src` into a new dataset at `out`.
///
/// Everything is checked first (every problem listed at once); the dataset is written into a
/// hidden folder beside `out` and renamed into place only when complete, so a failed import
/// leaves nothing behind and never touches an existing `out`.
pub fn import(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ImportReport> {
    if !src.is_dir() {
        bail!("{}: not a folder", src.display());
    }
    if out.exists() && fs::read_dir(out).map(|mut d| d.next().is_some())? {
        bail!(
            "{}: refusing to import into a folder that is not empty",
            out.display()
        );
    }
    let source = open_source(src, opts)?;
    let mut problems = source.validate();
    if source.spec.depth_unit_mm.is_none() && source.samples.iter().any(|s| s.depth.is_some()) {
        problems.push(Problem {
            path: src.to_path_buf(),
            what: "frames have depth but the source has no dataset.toml; give --depth-unit-mm"
                .into(),
        });
    }
    let group_file = read_group_file(src, &source, opts, &mut problems)?;
    refuse_problems(
        &problems,
        &format!("in {}; nothing was imported", src.display()),
    )?;
    if source.samples.is_empty() {
        bail!("{}: no frames found to import", src.display());
    }

    let hashes = frame_hashes(&source)?;
    let mut report = ImportReport {
        frames: 0,
        duplicates: Vec::new(),
        conflicts: Vec::new(),
        renamed: Vec::new(),
        grouped: 0,
        groups: 0,
        version: String::new(),
    };
    // Labels seen per content hash, to tell a duplicate from a conflict.
    let mut labels_of: HashMap<&str, Vec<Option<usize>>> = HashMap::new();
    for (s, h) in source.samples.iter().zip(&hashes) {
        let seen = labels_of.entry(h.as_str()).or_default();
        if !seen.contains(&s.label) {
            seen.push(s.label);
        }
    }
    // Each frame to write: the source sample, its label, its stem, its content hash.
    let mut plan: Vec<(&Sample, Option<usize>, String, &str)> = Vec::new();
    let mut placed: HashSet<&str> = HashSet::new();
    let mut stems: HashSet<String> = HashSet::new();
    for (s, h) in source.samples.iter().zip(&hashes) {
        let rel = source.relative(s);
        let labels = &labels_of[h.as_str()];
        let labelled: Vec<_> = labels.iter().flatten().collect();
        let conflict = labelled.len() > 1;
        if !placed.insert(h.as_str()) {
            if !conflict {
                report.duplicates.push(rel);
            }
            continue;
        }
        let label = if conflict {
            let names: Vec<&str> = labelled
                .iter()
                .map(|&&i| source.spec.classes[i].as_str())
                .collect();
            report
                .conflicts
                .push(format!("{rel} (labelled {})", names.join(" and ")));
            None
        } else {
            // A frame both unlabeled and labelled elsewhere keeps its label.
            labelled.first().map(|&&i| i).or(s.label)
        };
        let mut stem = s.stem.clone();
        if stems.contains(&stem) {
            let class = label.map_or(UNLABELED, |i| source.spec.classes[i].as_str());
            let mut n = 1;
            stem = format!("{}-{class}", s.stem);
            while stems.contains(&stem) {
                n += 1;
                stem = format!("{}-{class}{n}", s.stem);
            }
            report.renamed.push((rel, stem.clone()));
        }
        stems.insert(stem.clone());
        plan.push((s, label, stem, h.as_str()));
    }

    // Write into a hidden sibling, then rename into place.
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a folder name", out.display()))?;
    let tmp = parent.join(format!(
        ".{}.import-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> Result<BTreeMap<String, String>> {
        let ds = Dataset::create(&tmp, source.spec.clone())?;
        let mut groups = BTreeMap::new();
        for (s, label, stem, _) in &plan {
            let class = label.map_or(UNLABELED, |i| source.spec.classes[i].as_str());
            let dir = ds.root.join(class);
            fs::create_dir_all(&dir)?;
            let ext = s
                .rgb
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_else(|| "png".into());
            copy(&s.rgb, &dir.join(format!("{stem}.{ext}")))?;
            if let Some(d) = &s.depth {
                copy(d, &ds.paths_for(Some(class), stem).1)?;
            }
            let group = group_file
                .as_ref()
                .and_then(|g| g.get(&file_key(&s.rgb)))
                .cloned()
                .or_else(|| source.groups.get(&s.stem).cloned());
            if let Some(g) = group {
                groups.insert(stem.clone(), g);
            }
        }
        if !groups.is_empty() {
            write_groups(&ds.root, &groups)?;
        }
        Ok(groups)
    })();
    let groups = match written {
        Ok(g) => g,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e.context(format!("writing the dataset {}", out.display())));
        }
    };
    if out.exists() {
        fs::remove_dir(out).with_context(|| format!("replacing empty {}", out.display()))?;
    }
    fs::rename(&tmp, out).with_context(|| format!("moving the import to {}", out.display()))?;

    let ds = Dataset::open(out)?;
    report.frames = ds.samples.len();
    report.grouped = groups.len();
    report.groups = groups.values().collect::<BTreeSet<_>>().len();
    // The copies have the source's bytes: their hashes are known, by stem (unique here).
    let hash_of: HashMap<&str, &str> = plan.iter().map(|(_, _, st, h)| (st.as_str(), *h)).collect();
    let hashes = ds
        .samples
        .iter()
        .map(|s| {
            hash_of
                .get(s.stem.as_str())
                .map(|h| h.to_string())
                .with_context(|| format!("{}: not a frame this import wrote", s.rgb.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    report.version = ds.version(&hashes)?;
    Ok(report)
}

/// The source as a dataset: its own `dataset.toml` if it has one, else its folders as classes.
fn open_source(src: &Path, opts: &ImportOptions) -> Result<Dataset> {
    let mut spec = if src.join(DATASET_FILE).is_file() {
        DatasetSpec::load(src)?
    } else {
        let mut folders: Vec<String> = fs::read_dir(src)
            .with_context(|| format!("listing {}", src.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && n != UNLABELED)
            .collect();
        folders.sort();
        DatasetSpec {
            classes: folders,
            depth_unit_mm: opts.depth_unit_mm,
            intrinsics: None,
        }
    };
    if let Some(classes) = &opts.classes {
        spec.classes = classes.clone();
    }
    if let Some(u) = opts.depth_unit_mm {
        spec.depth_unit_mm = Some(u);
    }
    if spec.classes.is_empty() {
        bail!(
            "{}: no class folders found (expected one folder of images per class)",
            src.display()
        );
    }
    Ok(Dataset::scan(src, spec)?)
}

/// A file's key in a groups CSV: its name without extension (manifest rows name `x.jpg`).
fn file_key(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads the groups CSV named by the options or found in the source (`manifest.csv`).
/// `Ok(None)` when there is none; bad rows and unknown columns are problems.
fn read_group_file(
    src: &Path,
    source: &Dataset,
    opts: &ImportOptions,
    problems: &mut Vec<Problem>,
) -> Result<Option<HashMap<String, String>>> {
    let (path, explicit) = match &opts.groups {
        Some(p) => (p.clone(), true),
        None => {
            let m = src.join("manifest.csv");
            if !m.is_file() || src.join(GROUPS_FILE).is_file() {
                return Ok(None);
            }
            (m, false)
        }
    };
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
            return Ok(None);
        }
    };
    let headers: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
    let find = |names: &[&str]| headers.iter().position(|h| names.contains(&h.as_str()));
    let file_col = find(&FILE_COLUMNS);
    let group_col = match &opts.group_column {
        Some(c) => find(&[c.as_str()]),
        None => find(&GROUP_COLUMNS),
    };
    let (Some(fc), Some(gc)) = (file_col, group_col) else {
        if explicit || opts.group_column.is_some() {
            problem(format!(
                "needs a file column ({}) and a group column ({}); found {}",
                FILE_COLUMNS.join(", "),
                opts.group_column
                    .clone()
                    .unwrap_or_else(|| GROUP_COLUMNS.join(", ")),
                headers.join(", ")
            ));
        }
        return Ok(None);
    };
    let mut out = HashMap::new();
    for (i, row) in reader.records().enumerate() {
        match row {
            Ok(r) => match (r.get(fc), r.get(gc)) {
                (Some(f), Some(g)) if !f.is_empty() && !g.is_empty() => {
                    out.insert(file_key(Path::new(f)), g.to_string());
                }
                _ => problem(format!("line {}: no file or group", i + 2)),
            },
            Err(e) => problem(format!("line {}: {e}", i + 2)),
        }
    }
    let known = source
        .samples
        .iter()
        .filter(|s| out.contains_key(&file_key(&s.rgb)))
        .count();
    if known == 0 && !out.is_empty() {
        problem(format!(
            "none of its {} file names is a frame of the source",
            out.len()
        ));
    }
    Ok(Some(out))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// A split of a dataset version into train, validation and test frames (relative paths).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// The dataset version (hash) the split was made from.
    pub dataset_version: String,
    pub seed: u64,
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub train: Vec<String>,
    pub val: Vec<String>,
    #[serde(default)]
    pub test: Vec<String>,
}

/// The three parts of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Train,
    Val,
    Test,
}

impl Split {
    /// Splits the labelled frames of `ds` per class (stratified) by group: all frames of one
    /// group land in one part. Within a class, groups are shuffled (seeded) and each goes to
    /// the part furthest below its share of frames, an empty part with a share first, so a
    /// class with two groups still reaches validation.
    pub fn make(ds: &Dataset, version: &str, val: f64, test: f64, seed: u64) -> Result<Split> {
        if !(0.0..1.0).contains(&val) || !(0.0..1.0).contains(&test) || val + test >= 1.0 {
            bail!("--val {val} and --test {test}: each must be in [0, 1) and together below 1");
        }
        // Groups by their majority label; ties go to the lower class index.
        let mut groups: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
        for s in ds.samples.iter().filter(|s| s.label.is_some()) {
            groups.entry(ds.group_of(s)).or_default().push(s);
        }
        let mut per_class: Vec<Vec<&Vec<&Sample>>> = vec![Vec::new(); ds.spec.classes.len()];
        for members in groups.values() {
            let mut votes = vec![0usize; ds.spec.classes.len()];
            for s in members {
                if let Some(l) = s.label {
                    votes[l] += 1;
                }
            }
            let best = (0..votes.len()).max_by_key(|&i| (votes[i], usize::MAX - i));
            if let Some(c) = best {
                per_class[c].push(members);
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut split = Split {
            dataset_version: version.to_string(),
            seed,
            val_fraction: val,
            test_fraction: test,
            train: Vec::new(),
            val: Vec::new(),
            test: Vec::new(),
        };
        for groups in &mut per_class {
            groups.shuffle(&mut rng);
            let n: usize = groups.iter().map(|g| g.len()).sum();
            let share = [1.0 - val - test, val, test];
            let mut have = [0usize; 3];
            for g in groups.iter() {
                let deficit = |p: usize| share[p] * n as f64 - have[p] as f64;
                // Train first; then any part with a share and nothing yet; then the largest gap.
                let p = if have[0] == 0 {
                    0
                } else if let Some(p) = (1..3).find(|&p| share[p] > 0.0 && have[p] == 0) {
                    p
                } else {
                    (0..3)
                        .filter(|&p| share[p] > 0.0)
                        .max_by(|&a, &b| deficit(a).total_cmp(&deficit(b)))
                        .unwrap_or(0)
                };
                have[p] += g.len();
                let list = match p {
                    0 => &mut split.train,
                    1 => &mut split.val,
                    _ => &mut split.test,
                };
                list.extend(g.iter().map(|s| ds.relative(s)));
            }
        }
        for l in [&mut split.train, &mut split.val, &mut split.test] {
            l.sort();
        }
        Ok(split)
    }

    pub fn load(path: &Path) -> Result<Split> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a split file", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
    }

    /// The samples of one part, checked against the dataset: the version must be the split's,
    /// and every listed frame must exist.
    pub fn samples<'a>(
        &self,
        ds: &'a Dataset,
        version: &str,
        part: Part,
    ) -> Result<Vec<&'a Sample>> {
        if version != self.dataset_version {
            bail!(
                "the dataset {} changed since this split was made (split of version {}, the \
                 dataset is now {}): make a new split with `weld-trainer dataset split`",
                ds.root.display(),
                short(&self.dataset_version),
                short(version)
            );
        }
        let by_path: HashMap<String, &Sample> =
            ds.samples.iter().map(|s| (ds.relative(s), s)).collect();
        let list = match part {
            Part::Train => &self.train,
            Part::Val => &self.val,
            Part::Test => &self.test,
        };
        list.iter()
            .map(|p| {
                by_path
                    .get(p)
                    .copied()
                    .with_context(|| format!("the split names {p}, which is not in the dataset"))
            })
            .collect()
    }
}

impl Split {
    /// The frames to judge a finished model on: the test part, or validation when the split
    /// has no test part.
    pub fn held_out<'a>(&self, ds: &'a Dataset, version: &str) -> Result<Vec<&'a Sample>> {
        let part = if self.test.is_empty() {
            Part::Val
        } else {
            Part::Test
        };
        self.samples(ds, version, part)
    }
}

/// The first 12 hex digits of a hash, as messages show it.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test
    use super::*;
    use image::RgbImage;

    /// A dataset with `groups` groups per class of `per_group` frames each.
    fn dataset(dir: &Path, classes: &[&str], groups: usize, per_group: usize) -> Dataset {
        let spec = DatasetSpec {
            classes: classes.iter().map(|c| c.to_string()).collect(),
            depth_unit_mm: None,
            intrinsics: None,
        };
        let ds = Dataset::create(dir, spec).unwrap();
        let mut map = BTreeMap::new();
        for (ci, c) in classes.iter().enumerate() {
            for g in 0..groups {
                for i in 0..per_group {
                    let stem = format!("{c}-{g}-{i}");
                    let px = [ci as u8, g as u8, i as u8];
                    RgbImage::from_pixel(4, 4, image::Rgb(px))
                        .save(ds.root.join(c).join(format!("{stem}.png")))
                        .unwrap();
                    map.insert(stem, format!("{c}-run{g}"));
                }
            }
        }
        write_groups(dir, &map).unwrap();
        Dataset::open(dir).unwrap()
    }

    #[test]
    fn split_keeps_groups_whole_and_every_class_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), &["good", "porosity"], 2, 5);
        let v = version(&ds).unwrap();
        let split = Split::make(&ds, &v, 0.2, 0.0, 3).unwrap();
        assert_eq!(split.train.len() + split.val.len(), 20);
        let group = |p: &String| {
            let stem = p.rsplit('/').next().unwrap().trim_end_matches(".png");
            ds.groups[stem].clone()
        };
        for p in &split.val {
            assert!(
                split.train.iter().all(|t| group(t) != group(p)),
                "{p} shares its group with a training frame"
            );
        }
        for class in ["good/", "porosity/"] {
            assert!(split.train.iter().any(|p| p.starts_with(class)));
            assert!(split.val.iter().any(|p| p.starts_with(class)));
        }
        // The same seed gives the same split; the split checks the version it was made from.
        assert_eq!(Split::make(&ds, &v, 0.2, 0.0, 3).unwrap(), split);
        assert_eq!(split.samples(&ds, &v, Part::Val).unwrap().len(), 10);
        let err = split
            .samples(&ds, "0123456789abcdef", Part::Val)
            .unwrap_err();
        assert!(
            err.to_string().contains("changed since this split"),
            "{err}"
        );
    }

    #[test]
    fn split_shares_follow_the_fractions_with_many_groups() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), &["a", "b", "c"], 20, 3);
        let v = version(&ds).unwrap();
        let s = Split::make(&ds, &v, 0.2, 0.1, 1).unwrap();
        // 60 frames per class: 12 for validation and 6 for test, within one group of 3.
        for class in ["a/", "b/", "c/"] {
            let n = |l: &Vec<String>| l.iter().filter(|p| p.starts_with(class)).count();
            assert!((9..=15).contains(&n(&s.val)), "{class} val {}", n(&s.val));
            assert!((3..=9).contains(&n(&s.test)), "{class} test {}", n(&s.test));
            assert_eq!(n(&s.train) + n(&s.val) + n(&s.test), 60);
        }
        assert!(Split::make(&ds, &v, 0.6, 0.5, 1).is_err());
    }

    #[test]
    fn version_changes_with_content_label_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), &["good", "porosity"], 1, 2);
        let v0 = version(&ds).unwrap();
        assert_eq!(version(&Dataset::open(dir.path()).unwrap()).unwrap(), v0);
        // Relabel: move a frame to the other class.
        fs::rename(
            dir.path().join("good/good-0-0.png"),
            dir.path().join("porosity/good-0-0.png"),
        )
        .unwrap();
        let v1 = version(&Dataset::open(dir.path()).unwrap()).unwrap();
        assert_ne!(v1, v0);
        // Regroup.
        let mut map = Dataset::open(dir.path()).unwrap().groups;
        map.insert("good-0-0".into(), "elsewhere".into());
        write_groups(dir.path(), &map).unwrap();
        let v2 = version(&Dataset::open(dir.path()).unwrap()).unwrap();
        assert_ne!(v2, v1);
        // Change a pixel.
        RgbImage::from_pixel(4, 4, image::Rgb([9, 9, 9]))
            .save(dir.path().join("porosity/good-0-0.png"))
            .unwrap();
        assert_ne!(version(&Dataset::open(dir.path()).unwrap()).unwrap(), v2);
    }
}
