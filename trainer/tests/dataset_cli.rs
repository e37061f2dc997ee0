//! `weld-trainer dataset ...` end to end, through the real binary.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Output;

use common::{text, trainer};
use sha2::{Digest, Sha256};

/// sha256 of every file under `root`, by relative path.
fn digest_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, hex::encode(Sha256::digest(fs::read(&p).unwrap())));
            }
        }
    }
    out
}

fn synth(out: &Path, seed: &str) -> Output {
    let out = out.to_str().unwrap();
    trainer(&[
        "dataset",
        "synth",
        "--out",
        out,
        "--per-class",
        "3",
        "--seed",
        seed,
        "--size",
        "160x120",
    ])
}

#[test]
fn same_seed_gives_byte_identical_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    for (p, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let o = synth(p, seed);
        assert!(o.status.success(), "{}", text(&o));
    }
    let (da, db, dc) = (digest_tree(&a), digest_tree(&b), digest_tree(&c));
    // dataset.toml + 5 classes x 3 frames x (RGB + depth).
    assert_eq!(da.len(), 1 + 5 * 3 * 2, "{:?}", da.keys());
    assert_eq!(da, db);
    assert_ne!(da, dc, "another seed must give other frames");

    // A narrower lens gives other frames of the same seed; one outside 20-120 is refused.
    let zoom = dir.path().join("zoom");
    let args = |hfov: &'static str, out: &Path| {
        let out = out.to_str().unwrap().to_string();
        trainer(&[
            "dataset",
            "synth",
            "--out",
            &out,
            "--per-class",
            "3",
            "--seed",
            "7",
            "--size",
            "160x120",
            "--hfov-deg",
            hfov,
        ])
    };
    let o = args("25", &zoom);
    assert!(o.status.success(), "{}", text(&o));
    let frame = "good/good-s7-00000.depth.png";
    assert_ne!(
        digest_tree(&zoom)[frame],
        da[frame],
        "the frame must change, not only intrinsics"
    );
    let o = args("10", &dir.path().join("bad"));
    assert!(!o.status.success());
    assert!(
        text(&o).contains("outside the allowed range 20..=120"),
        "{}",
        text(&o)
    );
}

#[test]
fn stats_counts_classes_and_reports_problems_with_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    assert!(synth(&ds, "3").status.success());
    let o = trainer(&["dataset", "stats", ds.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for class in ["good", "porosity", "undercut", "spatter", "burn_through"] {
        assert!(
            t.contains(&format!("{class:<16}      3 frames  (3 with depth)")),
            "{t}"
        );
    }
    assert!(t.contains("problems: none"), "{t}");

    // Break it in two ways; both problems are reported at once and nothing is changed.
    let victim = ds.join("spatter/spatter-s3-00001.depth.png");
    fs::write(&victim, b"\x89PNG truncated").unwrap();
    fs::create_dir(ds.join("crack")).unwrap();
    let before = digest_tree(&ds);
    let o = trainer(&["dataset", "stats", ds.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("problems (2)"), "{t}");
    assert!(
        t.contains("spatter-s3-00001.depth.png: not a readable image"),
        "{t}"
    );
    assert!(t.contains("crack: folder is not a class"), "{t}");
    assert_eq!(digest_tree(&ds), before);
}

#[test]
fn synth_refuses_a_folder_in_use_and_keeps_its_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("keep.txt"), "precious").unwrap();
    let o = synth(dir.path(), "1");
    assert!(!o.status.success());
    assert!(text(&o).contains("not empty"), "{}", text(&o));
    assert_eq!(
        fs::read_to_string(dir.path().join("keep.txt")).unwrap(),
        "precious"
    );
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn stats_of_a_folder_that_is_not_a_dataset_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let o = trainer(&["dataset", "stats", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no dataset.toml"), "{}", text(&o));
}

#[test]
fn preview_writes_a_contact_sheet() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    assert!(synth(&ds, "5").status.success());
    let png = dir.path().join("sheet.png");
    let o = trainer(&[
        "dataset",
        "preview",
        ds.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--per-class",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let sheet = image::open(&png).unwrap();
    // 2 tiles of 640 px + gutters wide; each tile is a 320x120 RGB|depth pair scaled to
    // 640x240; 5 rows (one per class) + gutters.
    assert_eq!((sheet.width(), sheet.height()), (2 * 644 + 4, 5 * 244 + 4));
}

/// The real photos: 120 JPGs of 24 weld runs, grouped by `manifest.csv`.
fn intel_photos() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/intel-weld-photos")
}

#[test]
fn import_of_the_real_photos_groups_runs_and_splits_by_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("intel");
    let o = trainer(&[
        "dataset",
        "import",
        intel_photos().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("imported 120 frames"), "{t}");
    assert!(t.contains("groups: 24 (120 frames grouped)"), "{t}");
    // The version the import reports (from the hashes it made while checking) is the one
    // `dataset stats` computes from the files written.
    let version_line = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("version "))
            .unwrap()
            .to_string()
    };
    let stats = trainer(&["dataset", "stats", out.to_str().unwrap()]);
    assert!(stats.status.success(), "{}", text(&stats));
    assert_eq!(version_line(&t), version_line(&text(&stats)));
    // The files are the source's bytes.
    let src = digest_tree(&intel_photos());
    let dst = digest_tree(&out);
    for (rel, h) in &src {
        if rel.ends_with(".jpg") {
            assert_eq!(dst.get(rel), Some(h), "{rel}");
        }
    }
    let o = trainer(&["dataset", "split", out.to_str().unwrap(), "--val", "0.2"]);
    assert!(o.status.success(), "{}", text(&o));
    let split: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("split.json")).unwrap()).unwrap();
    // No run sits on both sides: runs are named in the source's manifest.csv.
    let manifest = fs::read_to_string(intel_photos().join("manifest.csv")).unwrap();
    let run_of: BTreeMap<String, String> = manifest
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (format!("{}/{}", f[0], f[1]), f[3].to_string())
        })
        .collect();
    let runs = |part: &str| -> Vec<String> {
        split[part]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| run_of[p.as_str().unwrap()].clone())
            .collect()
    };
    let (train, val) = (runs("train"), runs("val"));
    assert_eq!(train.len() + val.len(), 120);
    assert!(
        val.iter().all(|r| !train.contains(r)),
        "a run on both sides"
    );
    // Every class, even those of two runs, is on both sides.
    for class in ["burn_through", "good_weld", "lack_of_fusion", "overlap"] {
        let has = |part: &str| {
            split[part]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_str().unwrap().starts_with(class))
        };
        assert!(has("train") && has("val"), "{class}");
    }
    // A second split does not silently replace the first.
    let o = trainer(&["dataset", "split", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--force"), "{}", text(&o));
}

#[test]
fn import_leaves_out_copies_flags_conflicts_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for class in ["good", "porosity"] {
        fs::create_dir_all(src.join(class)).unwrap();
    }
    let img = |seed: u8| image::RgbImage::from_pixel(8, 6, image::Rgb([seed, 2, 3]));
    img(1).save(src.join("good/a.png")).unwrap();
    img(1).save(src.join("good/a-copy.png")).unwrap(); // a duplicate
    img(2).save(src.join("good/b.png")).unwrap();
    img(2).save(src.join("porosity/b2.png")).unwrap(); // same image, other label
    img(3).save(src.join("porosity/a.png")).unwrap(); // stem taken by good/a
    let out = dir.path().join("ds");
    let o = trainer(&[
        "dataset",
        "import",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("imported 3 frames"), "{t}");
    assert!(t.contains("good/a-copy.png"), "{t}");
    assert!(t.contains("good/b.png (labelled good and porosity)"), "{t}");
    assert!(t.contains("porosity/a.png -> a-porosity"), "{t}");
    let files: Vec<String> = digest_tree(&out).into_keys().collect();
    assert_eq!(
        files,
        [
            "dataset.toml",
            "good/a.png",
            "porosity/a-porosity.png",
            "unlabeled/b.png"
        ]
    );

    // An unreadable image: every problem is named and nothing is written.
    fs::write(src.join("good/broken.png"), b"not a png").unwrap();
    fs::write(src.join("porosity/notes.txt"), b"hi").unwrap();
    let out2 = dir.path().join("ds2");
    let o = trainer(&[
        "dataset",
        "import",
        src.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("2 problem(s)") && t.contains("nothing was imported"),
        "{t}"
    );
    assert!(t.contains("broken.png: not a readable image"), "{t}");
    assert!(t.contains("notes.txt: not a frame file"), "{t}");
    assert!(!out2.exists());
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
