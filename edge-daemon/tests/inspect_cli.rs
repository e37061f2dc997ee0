//! `weld-edge inspect` end to end through the real binary.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output};

use weld_core::dataset::{Dataset, DatasetSpec};
use weld_core::synth::{DEFAULT_CLASSES, SynthClass, SynthConfig, frame_seed, generate};

fn edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weld-edge"))
        .args(args)
        .output()
        .unwrap()
}

/// Two synthetic frames per class at 640x480.
fn dataset(root: &Path) {
    let cfg = SynthConfig::new(640, 480);
    let spec = DatasetSpec {
        classes: DEFAULT_CLASSES.map(String::from).to_vec(),
        depth_unit_mm: Some(cfg.depth_unit_mm),
        intrinsics: Some(cfg.intrinsics()),
    };
    let mut ds = Dataset::create(root, spec).unwrap();
    for (ci, class) in SynthClass::ALL.into_iter().enumerate() {
        for i in 0..2 {
            let s = generate(class, frame_seed(99, ci, i), &cfg).unwrap();
            ds.add_frame(Some(class.name()), &format!("f{i}"), &s.frame)
                .unwrap();
        }
    }
}

#[test]
fn dataset_gives_one_result_per_frame_and_a_labelled_summary() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let o = edge(&["inspect", "--policy", "rules", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    for r in &lines {
        assert_eq!(r["v"], 1);
        assert_eq!(r["decided_by"], "rules");
        assert!(r["model"].is_null());
        assert!(r["path"].as_str().unwrap().ends_with(".png"));
        assert!(r["rules"]["confidence"].as_f64().unwrap() <= 1.0);
    }
    assert!(
        err.contains("inspected 10 frames (0 could not be read)"),
        "{err}"
    );
    assert!(
        err.contains("truth \\ predicted") && err.contains("accuracy"),
        "{err}"
    );
}

#[test]
fn csv_for_files_with_their_depth_and_labels_from_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let a = dir.path().join("spatter/f0.png");
    let depth = dir.path().join("spatter/f0.depth.png");
    // The depth file named on the command line (as a shell glob would) is read with its RGB.
    let o = edge(&[
        "inspect",
        "--format",
        "csv",
        a.to_str().unwrap(),
        depth.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].starts_with("path,truth,class,confidence,uncertain"));
    assert!(rows[1].contains(",spatter,"), "{out}");
}

#[test]
fn bad_paths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let o = edge(&["inspect", dir.path().join("nope.png").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.png: no such file"));
    let o = edge(&["inspect", dir.path().to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("a folder without dataset.toml"));
    // A frame with depth outside any dataset needs its unit.
    let s = generate(SynthClass::Good, 1, &SynthConfig::new(320, 240)).unwrap();
    let rgb = dir.path().join("x.png");
    s.frame.save(&rgb, &dir.path().join("x.depth.png")).unwrap();
    let o = edge(&["inspect", rgb.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("x.png: has depth but its unit is unknown"),
        "{err}"
    );
    let o = edge(&["inspect", "--depth-unit-mm", "0.05", rgb.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
