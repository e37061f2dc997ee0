//! `weld-edge inspect` end to end through the real binary.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output};

mod common;

use weld_core::synth::{SynthClass, SynthConfig, generate};

fn edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weld-edge"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs a command that must succeed; its JSON lines and its stderr.
fn edge_rows(args: &[&str]) -> (Vec<serde_json::Value>, String) {
    let o = edge(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    let rows = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (rows, err)
}

/// Two synthetic frames per class at 640x480.
fn dataset(root: &Path) {
    common::synth_dataset(root, 640, 480, 2);
}

#[test]
fn dataset_gives_one_result_per_frame_and_a_labelled_summary() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let (lines, err) = edge_rows(&["inspect", "--policy", "rules", dir.path().to_str().unwrap()]);
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

#[test]
fn hybrid_asks_the_model_exactly_about_the_frames_the_rules_are_unsure_of() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let model = common::models_dir().join(common::F32_MODEL);
    let (rows, err) = edge_rows(&[
        "inspect",
        "--policy",
        "hybrid",
        "--model",
        model.to_str().unwrap(),
        "--classes",
        "good,porosity,undercut",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(rows.len(), 10);
    let gate = weld_core::rules::RulesConfig::default().confident_at as f64;
    let mut asked = 0;
    for r in &rows {
        let rules_conf = r["rules"]["confidence"].as_f64().unwrap();
        let rules_sure = rules_conf >= gate && r["rules"].get("note").is_none();
        if rules_sure {
            assert!(r["model"].is_null(), "{r}");
            assert_eq!(r["decided_by"], "rules");
        } else {
            asked += 1;
            assert_eq!(r["decided_by"], "model", "{r}");
            assert_eq!(r["class"], r["model"]["class"]);
            assert_eq!(r["model"]["version"], "mobilenetv2_rgb_3cls_f32");
            assert!(r["latency_ms"]["model"].as_f64().unwrap() > 0.0);
        }
    }
    assert!(
        err.contains(&format!("model ran on {asked} of 10 frames")),
        "{err}"
    );

    let o = edge(&["inspect", "--policy", "model", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--policy model needs --model"));
}

#[test]
fn the_builtin_model_classifies_frames_of_the_synthetic_camera() {
    let dir = tempfile::tempdir().unwrap();
    // Frames the model has never seen (another seed than its training set), 5 per class.
    common::synth_dataset(dir.path(), 640, 480, 5);
    let (rows, err) = edge_rows(&[
        "inspect",
        "--policy",
        "model",
        "--model",
        "builtin",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(rows.len(), 25);
    let mut right = 0;
    for r in &rows {
        assert_eq!(r["decided_by"], "model", "{r}");
        assert_eq!(r["model"]["version"], "synthetic-2026.12.07", "{r}");
        let truth = Path::new(r["path"].as_str().unwrap())
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .unwrap()
            .to_string();
        right += usize::from(r["class"] == truth.as_str());
    }
    // Chance is 5 of 25. The shipped model gets 18 of 25 of these exact frames (tract is
    // deterministic); a broken input pipeline or a model that lost its training falls below.
    assert!(right >= 10, "{right} of 25 right\n{err}");
    assert!(err.contains("model ran on 25 of 25 frames"), "{err}");

    // It brings its own key and classes.
    let o = edge(&[
        "inspect",
        "--model",
        "builtin",
        "--trusted",
        "00",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--model builtin brings its own key"));
}
