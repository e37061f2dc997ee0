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
