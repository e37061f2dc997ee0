//! Interop tests of the inference backends and the model wrapper against the reference models
//! in `tests/reference-models/` (a copy of `../shared/reference-models/`; see its ORIGIN.md),
//! plus small ONNX graphs built here with `tract_onnx::pb` to test refusals.
//!
//! The reference models are found through `WELD_REFERENCE_MODELS`, default
//! `tests/reference-models` of the repository; a missing folder fails the tests.
//! With `--features ort` the same parity tests run in ONNX Runtime, whose library comes from
//! `ORT_DYLIB_PATH` (a missing library fails them too).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

mod common;

use image::{Rgb, RgbImage};
use ndarray::{Array2, Array4};
use weld_core::Frame;
use weld_core::manifest::InputSpec;
use weld_edge::backend::{self, Backend, BackendError};
use weld_edge::model::{Model, ModelError, ModelOptions};

use common::F32_MODEL;
use common::onnx::{channel_mean_model, node, write_model};
const QDQ_MODEL: &str = "mobilenetv2_rgb_3cls_int8_qdq.onnx";
const SHAPE: [usize; 4] = [1, 3, 224, 224];
/// f32 runtimes agree with PyTorch to ~1e-8 on this model (NOTES-toolchain.md).
const F32_TOLERANCE: f32 = 1e-4;
/// Int8 kernels differ by about 1e-3 between CPUs (reference-models/README.md).
const INT8_TOLERANCE: f32 = 2e-3;

fn models_dir() -> PathBuf {
    common::models_dir()
}

fn reference_input() -> Array4<f32> {
    ndarray_npy::read_npy(models_dir().join("mobilenetv2_rgb_3cls_f32.input.npy")).unwrap()
}

fn reference_logits(name: &str) -> Array2<f32> {
    ndarray_npy::read_npy(models_dir().join(name)).unwrap()
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_parity(kind: &str, model: &str, logits: &str, tolerance: f32) {
    let b = backend::load(kind, &models_dir().join(model), SHAPE, 1)
        .unwrap_or_else(|e| panic!("{kind} could not load {model}: {e}"));
    assert_eq!(b.name(), kind);
    let got = b.infer(reference_input().view()).unwrap();
    let expect = reference_logits(logits);
    let diff = max_abs_diff(&got, &expect);
    assert!(
        diff <= tolerance,
        "{kind} {model}: max |diff| {diff} > {tolerance}\n got {got}\n expected {expect}"
    );
}

#[test]
fn tract_f32_matches_pytorch() {
    assert_parity(
        "tract",
        F32_MODEL,
        "mobilenetv2_rgb_3cls_f32.logits.npy",
        F32_TOLERANCE,
    );
}

#[test]
fn tract_int8_qdq_matches_onnx_runtime() {
    // Regression: with a fixed input fact, the quantizer's value_info made tract fail with
    // "Impossible to unify Sym(batch) with Val(1)".
    assert_parity(
        "tract",
        QDQ_MODEL,
        "mobilenetv2_rgb_3cls_int8_qdq.logits.npy",
        INT8_TOLERANCE,
    );
}

#[cfg(feature = "ort")]
#[test]
fn ort_f32_matches_pytorch() {
    assert_parity(
        "ort",
        F32_MODEL,
        "mobilenetv2_rgb_3cls_f32.logits.npy",
        F32_TOLERANCE,
    );
}

#[cfg(feature = "ort")]
#[test]
fn ort_int8_qdq_matches_onnx_runtime() {
    assert_parity(
        "ort",
        QDQ_MODEL,
        "mobilenetv2_rgb_3cls_int8_qdq.logits.npy",
        INT8_TOLERANCE,
    );
}

fn infer_from_two_threads(kind: &str) {
    // threads = 2: for ort, two sessions, so the calls really overlap.
    let b = backend::load(kind, &models_dir().join(F32_MODEL), SHAPE, 2).unwrap();
    let input = reference_input();
    let b: &dyn Backend = b.as_ref();
    let barrier = std::sync::Barrier::new(2);
    let results: Vec<Array2<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    (0..3)
                        .map(|_| b.infer(input.view()).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(results.len(), 6);
    for r in &results[1..] {
        assert_eq!(r, &results[0], "{kind}: concurrent calls disagree");
    }
    let expect = reference_logits("mobilenetv2_rgb_3cls_f32.logits.npy");
    assert!(max_abs_diff(&results[0], &expect) <= F32_TOLERANCE);
}

#[test]
fn tract_infer_from_two_threads_gives_identical_logits() {
    infer_from_two_threads("tract");
}

#[cfg(feature = "ort")]
#[test]
fn ort_infer_from_two_threads_gives_identical_logits() {
    infer_from_two_threads("ort");
}

#[test]
fn wrong_input_shape_is_an_error_not_a_panic() {
    let b = backend::load("tract", &models_dir().join(F32_MODEL), SHAPE, 1).unwrap();
    let err = b.infer(Array4::zeros((1, 3, 112, 112)).view()).unwrap_err();
    assert!(matches!(err, BackendError::InputShape { .. }), "{err}");
}

// ---- small graphs built here: common/onnx.rs ---------------------------------------------

fn assert_refused_naming(kind: &str, path: &Path, shape: [usize; 4], op: &str) {
    let err = backend::load(kind, path, shape, 1).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, BackendError::UnsupportedOps { .. }),
        "{kind}: expected an unsupported-operator error, got: {text}"
    );
    assert!(text.contains(op), "{kind}: {op} not named in: {text}");
}

#[test]
fn tract_refuses_com_microsoft_qlinearadd_by_name() {
    // The ORT quantizer's QOperator format uses QLinearAdd (NOTES-toolchain.md).
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        vec![node(
            "com.microsoft",
            "QLinearAdd",
            &["x", "s", "z", "x", "s", "z", "s", "z"],
            &["y"],
        )],
        &[1, 3, 4, 4],
        &[1, 3, 4, 4],
        &["com.microsoft"],
    );
    assert_refused_naming("tract", &path, [1, 3, 4, 4], "com.microsoft::QLinearAdd");
}

#[test]
fn foreign_domain_op_is_refused_even_with_a_standard_name() {
    // tract looks operators up by type alone: without the domain check this would run as
    // the standard Relu.
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        vec![node("com.example.weld", "Relu", &["x"], &["y"])],
        &[1, 3, 4, 4],
        &[1, 3, 4, 4],
        &["com.example.weld"],
    );
    assert_refused_naming("tract", &path, [1, 3, 4, 4], "com.example.weld::Relu");
}

/// An operator no runtime has, in a domain no runtime registers.
fn unknown_op_model(dir: &Path) -> PathBuf {
    write_model(
        dir,
        vec![node("com.example.weld", "WeldMagic", &["x"], &["y"])],
        &[1, 3, 4, 4],
        &[1, 3, 4, 4],
        &["com.example.weld"],
    )
}

#[test]
fn tract_refuses_an_unknown_op_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = unknown_op_model(dir.path());
    assert_refused_naming("tract", &path, [1, 3, 4, 4], "WeldMagic");
}

#[cfg(feature = "ort")]
#[test]
fn ort_refuses_an_unknown_op_by_name() {
    // ORT implements QLinearAdd and FusedConv itself: only an op it lacks tests its refusal.
    let dir = tempfile::tempdir().unwrap();
    let path = unknown_op_model(dir.path());
    assert_refused_naming("ort", &path, [1, 3, 4, 4], "WeldMagic");
}

#[test]
fn a_file_that_is_not_onnx_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, b"not a protobuf \xff\xff\xff").unwrap();
    let err = backend::load("tract", &path, [1, 3, 4, 4], 1).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, BackendError::Invalid { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

// ---- the model wrapper -------------------------------------------------------------------

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn model_rejects_a_class_list_of_the_wrong_length() {
    let err = Model::from_onnx(
        &models_dir().join(F32_MODEL),
        names(&["good", "porosity", "undercut", "spatter", "burn_through"]),
        InputSpec::rgb(224),
        &ModelOptions::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ModelError::ClassCount {
                outputs: 3,
                classes: 5,
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains('3') && text.contains('5'), "{text}");
}

#[test]
fn model_rejects_a_spec_with_other_channels_than_the_model() {
    let err = Model::from_onnx(
        &models_dir().join(F32_MODEL),
        names(&["good", "porosity", "undercut"]),
        InputSpec::rgb_height(224),
        &ModelOptions::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ModelError::InputMismatch { .. }), "{text}");
    assert!(
        text.contains("3 input channels") && text.contains('4'),
        "{text}"
    );
}

#[test]
fn reference_model_predicts_a_frame() {
    let model = Model::from_onnx(
        &models_dir().join(F32_MODEL),
        names(&["good", "porosity", "undercut"]),
        InputSpec::rgb(224),
        &ModelOptions::default(),
    )
    .unwrap();
    assert_eq!(model.name(), "mobilenetv2_rgb_3cls_f32");
    assert_eq!(model.backend_name(), "tract");
    let frame = Frame::new(RgbImage::from_pixel(320, 240, Rgb([120, 90, 60])), None).unwrap();
    let p = model.predict(&frame).unwrap();
    assert_eq!(p.probabilities.len(), 3);
    assert!((p.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    let best = p
        .probabilities
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(p.confidence, best);
    assert!(model.classes().contains(&p.class));
    assert!(p.preprocess_ms >= 0.0 && p.infer_ms > 0.0, "{p:?}");
}

#[test]
fn model_prediction_follows_the_logits() {
    // Channel-mean model with a plain [0,1] spec: a pure green frame has logits (0, 1, 0).
    let dir = tempfile::tempdir().unwrap();
    let path = channel_mean_model(dir.path(), 3, 8);
    let mut spec = InputSpec::rgb(8);
    spec.mean = vec![0.0; 3];
    spec.std = vec![1.0; 3];
    let model = Model::from_onnx(
        &path,
        names(&["red", "green", "blue"]),
        spec,
        &ModelOptions::default(),
    )
    .unwrap();
    let frame = Frame::new(RgbImage::from_pixel(8, 8, Rgb([0, 255, 0])), None).unwrap();
    let p = model.predict(&frame).unwrap();
    assert_eq!(p.class, "green");
    // softmax(0, 1, 0)[1] = e / (e + 2).
    let e = std::f32::consts::E;
    assert!((p.confidence - e / (e + 2.0)).abs() < 1e-5, "{p:?}");
}

#[test]
fn height_model_on_a_frame_without_depth_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = channel_mean_model(dir.path(), 4, 8);
    let model = Model::from_onnx(
        &path,
        names(&["a", "b", "c", "d"]),
        InputSpec::rgb_height(8),
        &ModelOptions::default(),
    )
    .unwrap();
    let frame = Frame::new(RgbImage::new(8, 8), None).unwrap();
    let err = model.predict(&frame).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ModelError::NoDepth { .. }), "{text}");
    assert!(
        text.contains("no depth") && text.contains("height"),
        "{text}"
    );
}

const KEY_SEED: [u8; 32] = [7; 32];

/// Signs reference model `model` into DIR/`file`, with a golden check of the reference input
/// and tract's logits for it at `tolerance` (`None`: no golden check); `tweak` edits the
/// manifest before signing.
fn sign_bundle(
    dir: &Path,
    file: &str,
    model: &str,
    tolerance: Option<f32>,
    tweak: impl FnOnce(&mut weld_core::manifest::ModelManifest),
) -> PathBuf {
    use weld_core::bundle::Bundle;
    use weld_core::manifest::{Golden, ModelManifest, Quantization};
    let onnx = std::fs::read(models_dir().join(model)).unwrap();
    let x = reference_input();
    let tract = backend::load("tract", &models_dir().join(model), SHAPE, 1).unwrap();
    let logits = tract.infer(x.view()).unwrap().row(0).to_vec();
    let golden = tolerance.map(|tolerance| Golden {
        sha256: String::new(),
        count: 1,
        logits: vec![logits],
        backend: "tract".into(),
        tolerance,
    });
    let mut manifest = ModelManifest {
        name: "ref".into(),
        version: file.into(),
        created: chrono::Utc::now(),
        architecture: "mobilenet_v2".into(),
        classes: ["good", "porosity", "undercut"].map(String::from).to_vec(),
        input: InputSpec::rgb(224),
        onnx_sha256: String::new(),
        quantization: Quantization::F32,
        metrics: Default::default(),
        lineage: Default::default(),
        golden,
    };
    tweak(&mut manifest);
    let key = ed25519_dalek::SigningKey::from_bytes(&KEY_SEED);
    let golden_bytes = tolerance.map(|_| Bundle::golden_bytes(&x));
    let b = Bundle::sign(manifest, onnx, golden_bytes, &key).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, b.to_tar().unwrap()).unwrap();
    path
}

fn trusted_key() -> String {
    hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&KEY_SEED)
            .verifying_key()
            .as_bytes(),
    )
}

/// The reference f32 model signed with a golden check at `tolerance`.
fn reference_bundle(dir: &Path, tolerance: Option<f32>) -> (PathBuf, String) {
    (
        sign_bundle(dir, "f32.bundle", F32_MODEL, tolerance, |_| {}),
        trusted_key(),
    )
}

fn auto() -> ModelOptions {
    ModelOptions {
        backend: "auto".into(),
        ..ModelOptions::default()
    }
}

#[test]
fn auto_tries_every_backend_on_the_golden_inputs_and_keeps_the_fastest() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = reference_bundle(dir.path(), Some(1e-3));
    let loaded = Model::from_bundle(&path, &[key], &auto()).unwrap();
    let tried: Vec<&str> = loaded.trials.iter().map(|t| t.backend.as_str()).collect();
    assert_eq!(tried, backend::available(), "{:?}", loaded.trials);
    let passes: Vec<(&str, f64, f32)> = loaded
        .trials
        .iter()
        .map(|t| {
            let p = t
                .outcome
                .as_ref()
                .unwrap_or_else(|e| panic!("{}: {e}", t.backend));
            (t.backend.as_str(), p.ms, p.deviation)
        })
        .collect();
    // tract computed the golden logits: it reproduces them exactly.
    assert_eq!(passes[0].2, 0.0);
    let fastest = passes.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(loaded.model.backend_name(), fastest.0, "{passes:?}");
    assert_eq!(loaded.model.version(), "f32.bundle");
    assert_eq!(loaded.model.classes().len(), 3);
}

#[test]
fn a_backend_that_does_not_reproduce_the_golden_logits_is_not_chosen() {
    let dir = tempfile::tempdir().unwrap();
    // Tighter than any other runtime's summation order allows: only tract itself passes.
    let (path, key) = reference_bundle(dir.path(), Some(1e-12));
    let loaded = Model::from_bundle(&path, std::slice::from_ref(&key), &auto()).unwrap();
    assert_eq!(loaded.model.backend_name(), "tract");
    for t in loaded.trials.iter().filter(|t| t.backend != "tract") {
        let why = t
            .outcome
            .as_ref()
            .expect_err("ort cannot match tract to 1e-12");
        assert!(why.contains("golden input 0 gives logits"), "{why}");
    }
    // Asked for by name, the failing backend's own error comes back.
    #[cfg(feature = "ort")]
    {
        let options = ModelOptions {
            backend: "ort".into(),
            ..ModelOptions::default()
        };
        let e = Model::from_bundle(&path, &[key], &options).unwrap_err();
        assert!(matches!(e, ModelError::Golden { index: 0, .. }), "{e}");
    }
}

#[test]
fn without_golden_inputs_auto_runs_the_bundle_on_tract_only() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = reference_bundle(dir.path(), None);
    let loaded = Model::from_bundle(&path, std::slice::from_ref(&key), &auto()).unwrap();
    assert_eq!(loaded.trials.len(), 1);
    assert_eq!(loaded.model.backend_name(), "tract");
    // An untrusted key: refused before any backend is tried.
    let other = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&[8; 32])
            .verifying_key()
            .as_bytes(),
    );
    let e = Model::from_bundle(&path, &[other], &auto()).unwrap_err();
    assert!(
        e.to_string()
            .contains("does not verify with any trusted key"),
        "{e}"
    );
}

#[test]
fn an_int8_form_is_used_only_when_made_from_the_model_and_as_accurate() {
    use weld_core::manifest::Quantization;
    let dir = tempfile::tempdir().unwrap();
    let (primary, key) = reference_bundle(dir.path(), Some(1e-3));
    let f32_sha = weld_core::bundle::Bundle::read(&primary)
        .unwrap()
        .manifest
        .onnx_sha256;
    // An int8 form as `weld-trainer quantize` describes one: its lineage names the f32 ONNX,
    // its metrics the held-out accuracy of both.
    let int8 = |file: &str, from: &str, f32_acc: f64, int8_acc: f64| {
        let from = from.to_string();
        sign_bundle(dir.path(), file, QDQ_MODEL, Some(5e-2), move |m| {
            m.quantization = Quantization::Int8;
            m.lineage.training_config =
                serde_json::json!({"quantization": {"from_onnx_sha256": from}});
            m.metrics.insert("held_out_accuracy_f32".into(), f32_acc);
            m.metrics.insert("held_out_accuracy_int8".into(), int8_acc);
        })
    };
    let good = int8("good.bundle", &f32_sha, 0.90, 0.895);
    let worse = int8("worse.bundle", &f32_sha, 0.90, 0.85);
    let foreign = int8("foreign.bundle", &"ab".repeat(32), 0.90, 0.90);
    let loaded = Model::from_bundles(
        &primary,
        &[good, worse.clone(), foreign.clone()],
        &[key],
        &auto(),
    )
    .unwrap();
    let refused = |path: &Path| {
        loaded
            .trials
            .iter()
            .find(|t| t.bundle == path.display().to_string())
            .and_then(|t| t.outcome.clone().err())
            .unwrap_or_else(|| panic!("{} not refused: {:?}", path.display(), loaded.trials))
    };
    assert!(
        refused(&worse).contains("loses 5.0 points"),
        "{}",
        refused(&worse)
    );
    assert!(
        refused(&foreign).contains("not made from this model"),
        "{}",
        refused(&foreign)
    );
    // Both accepted forms ran on every backend; the fastest pair runs.
    let passed: Vec<_> = loaded
        .trials
        .iter()
        .filter_map(|t| t.outcome.as_ref().ok().map(|p| (t, p.ms)))
        .collect();
    assert_eq!(
        passed.len(),
        2 * backend::available().len(),
        "{:?}",
        loaded.trials
    );
    let (fastest, _) = passed.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(&loaded.trials[loaded.chosen], *fastest);
    assert_eq!(fastest.backend, loaded.model.backend_name());
    assert_eq!(
        fastest.bundle,
        format!("{} {}", loaded.manifest.name, loaded.manifest.version)
    );
}
