//! `weld-trainer dataset ...`: make synthetic datasets, count and check datasets, preview them.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use weld_core::dataset::{Dataset, DatasetSpec};
use weld_core::synth::{DEFAULT_CLASSES, SynthClass, SynthConfig, frame_seed, generate};
use weld_core::viz;

use crate::versions::{self, ImportOptions, Split};

/// Writes `per_class` synthetic frames of every default class into a new dataset at `out`.
///
/// Frame `i` of class `c` is generated from `frame_seed(seed, c, i)` alone, so frames are made
/// in parallel and the dataset's bytes depend only on the arguments.
pub fn synth(
    out: &Path,
    per_class: usize,
    seed: u64,
    size: (u32, u32),
    hfov_deg: f64,
) -> Result<()> {
    let mut cfg = SynthConfig::new(size.0, size.1);
    cfg.hfov_deg = hfov_deg;
    cfg.validate()?;
    let spec = DatasetSpec {
        classes: DEFAULT_CLASSES.iter().map(|c| c.to_string()).collect(),
        depth_unit_mm: Some(cfg.depth_unit_mm),
        intrinsics: Some(cfg.intrinsics()),
    };
    let ds = Dataset::create(out, spec)?;
    let jobs: Vec<(usize, SynthClass, usize)> = SynthClass::ALL
        .iter()
        .enumerate()
        .flat_map(|(ci, &class)| (0..per_class).map(move |i| (ci, class, i)))
        .collect();
    let start = Instant::now();
    let bar = progress(jobs.len() as u64, "frames");
    jobs.par_iter()
        .try_for_each(|&(ci, class, i)| -> Result<()> {
            let s = generate(class, frame_seed(seed, ci, i), &cfg)?;
            let stem = format!("{}-s{seed}-{i:05}", class.name());
            let (rgb, depth) = ds.paths_for(Some(class.name()), &stem);
            s.frame.save(&rgb, &depth)?;
            bar.inc(1);
            Ok(())
        })?;
    bar.finish_and_clear();
    println!(
        "wrote {} frames ({per_class} per class, {}x{}, seed {seed}) to {} in {:.1} s",
        jobs.len(),
        size.0,
        size.1,
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints frames per class and every problem; exit code 1 when there are problems.
pub fn stats(dir: &Path) -> Result<ExitCode> {
    let ds = Dataset::open(dir)?;
    let problems = ds.validate();
    let (counts, unlabeled) = ds.counts();
    let with_depth = |label: Option<usize>| {
        ds.samples
            .iter()
            .filter(|s| s.label == label && s.depth.is_some())
            .count()
    };
    println!("dataset {}", dir.display());
    println!(
        "classes ({}): {}",
        ds.spec.classes.len(),
        ds.spec.classes.join(", ")
    );
    for (i, (class, n)) in counts.iter().enumerate() {
        println!(
            "  {class:<16} {n:>6} frames  ({} with depth)",
            with_depth(Some(i))
        );
    }
    println!(
        "  {:<16} {unlabeled:>6} frames  ({} with depth)",
        "unlabeled",
        with_depth(None)
    );
    let total = ds.samples.len();
    let depth_total = ds.samples.iter().filter(|s| s.depth.is_some()).count();
    println!("total {total} frames, {depth_total} with depth");
    match ds.spec.depth_unit_mm {
        Some(u) => println!("depth unit {u} mm"),
        None => println!("depth unit not set (RGB-only dataset)"),
    }
    if let Some(i) = ds.spec.intrinsics {
        println!(
            "intrinsics fx {} fy {} cx {} cy {} px",
            i.fx, i.fy, i.cx, i.cy
        );
    }
    println!("version {}", versions::version(&ds)?);
    if !ds.groups.is_empty() {
        let groups: std::collections::BTreeSet<&String> = ds.groups.values().collect();
        println!(
            "groups {} ({} frames grouped)",
            groups.len(),
            ds.groups.len()
        );
    }
    if problems.is_empty() {
        println!("problems: none");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("problems ({}):", problems.len());
        for p in &problems {
            println!("  - {p}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Writes a contact sheet of the first `per_class` frames of each class (and unlabeled):
/// a row per class, each tile RGB on the left and false-colour depth on the right.
pub fn preview(dir: &Path, out: &Path, per_class: usize) -> Result<()> {
    if per_class == 0 {
        bail!("--per-class must be at least 1");
    }
    let ds = Dataset::open(dir)?;
    let labels = (0..ds.spec.classes.len()).map(Some).chain([None]);
    let mut tiles = Vec::new();
    for label in labels {
        let picked: Vec<_> = ds
            .samples
            .iter()
            .filter(|s| s.label == label)
            .take(per_class)
            .collect();
        if picked.is_empty() {
            continue;
        }
        for s in &picked {
            let frame = ds
                .load(s)
                .with_context(|| format!("loading {}", s.rgb.display()))?;
            tiles.push(viz::rgb_and_depth(&frame));
        }
        // Pad short rows so every class starts a new row.
        let pad = tiles.last().map(|t| t.dimensions()).unwrap_or((2, 1));
        tiles.extend((picked.len()..per_class).map(|_| RgbImage::new(pad.0, pad.1)));
    }
    if tiles.is_empty() {
        bail!("{}: the dataset has no frames to preview", dir.display());
    }
    let sheet = viz::contact_sheet(&tiles, per_class as u32, 640);
    sheet
        .save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {} ({} frames)", out.display(), tiles.len());
    Ok(())
}

/// `dataset import`: imports and prints what was done.
pub fn import(src: &Path, out: &Path, opts: &ImportOptions) -> Result<()> {
    let start = Instant::now();
    let r = versions::import(src, out, opts)?;
    println!(
        "imported {} frames into {} in {:.1} s",
        r.frames,
        out.display(),
        start.elapsed().as_secs_f64()
    );
    let ds = Dataset::open(out)?;
    for (class, n) in ds.counts().0 {
        println!("  {class:<20} {n:>6}");
    }
    if r.groups > 0 {
        println!("groups: {} ({} frames grouped)", r.groups, r.grouped);
    } else {
        println!("groups: none (each frame is its own group)");
    }
    let list = |what: &str, items: &[String]| {
        if !items.is_empty() {
            println!("{what} ({}):", items.len());
            for i in items.iter().take(10) {
                println!("  - {i}");
            }
            if items.len() > 10 {
                println!("  ... and {} more", items.len() - 10);
            }
        }
    };
    list("left out as byte-identical duplicates", &r.duplicates);
    list(
        "same image under different labels, one copy put in unlabeled/",
        &r.conflicts,
    );
    let renamed: Vec<String> = r
        .renamed
        .iter()
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    list("renamed (stem taken by another class)", &renamed);
    println!("version {}", r.version);
    Ok(())
}

/// `dataset split`: makes the split, writes it, prints frames and groups per class and part.
pub fn split(dir: &Path, out: &Path, val: f64, test: f64, seed: u64, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!(
            "{}: a split is already there; models trained on it would be compared with a \
             different one. Pass --force to replace it, or --out for another file",
            out.display()
        );
    }
    let ds = Dataset::open(dir)?;
    refuse_problems(
        &ds.validate(),
        &format!("in {}; fix them before splitting", dir.display()),
    )?;
    let version = versions::version(&ds)?;
    let split = Split::make(&ds, &version, val, test, seed)?;
    split.save(out)?;
    println!(
        "split of {} (version {}), seed {seed}:",
        dir.display(),
        versions::short(&version)
    );
    println!(
        "  {:<20} {:>13} {:>13} {:>13}",
        "class", "train", "val", "test"
    );
    let parts = [&split.train, &split.val, &split.test];
    for class in &ds.spec.classes {
        let prefix = format!("{class}/");
        let cell = |list: &Vec<String>| {
            let frames: Vec<&String> = list.iter().filter(|p| p.starts_with(&prefix)).collect();
            let groups: std::collections::BTreeSet<&str> = frames
                .iter()
                .filter_map(|p| {
                    let stem = p.rsplit('/').next()?.rsplit_once('.')?.0;
                    Some(ds.groups.get(stem).map_or(stem, String::as_str))
                })
                .collect();
            format!("{} ({} gr)", frames.len(), groups.len())
        };
        println!(
            "  {class:<20} {:>13} {:>13} {:>13}",
            cell(parts[0]),
            cell(parts[1]),
            cell(parts[2])
        );
        if !split.val.is_empty() && !split.val.iter().any(|p| p.starts_with(&prefix)) {
            println!("    note: no validation frame of {class} (it has too few groups)");
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// Fails with every problem listed, one per line, when there are any; `what` follows the
/// count (e.g. "in DIR; nothing was imported").
pub fn refuse_problems<P: std::fmt::Display>(problems: &[P], what: &str) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
    bail!("{} problem(s) {what}:\n{}", problems.len(), list.join("\n"))
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})"
    )) {
        bar.set_style(style);
    }
    bar
}
