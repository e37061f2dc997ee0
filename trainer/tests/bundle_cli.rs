//! `weld-trainer keys new`, `bundle` and `bundle verify` end to end through the real binary,
//! with the reference models made by PyTorch and ONNX Runtime (`tests/reference-models/`), and
//! every kind of bad bundle a device must refuse.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{text, trainer};
use weld_core::bundle::{self, Bundle, MANIFEST_FILE, MODEL_FILE};

fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/reference-models")
        .join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `bundle verify` and returns (success, output).
fn verify(bundle: &Path, trusted: &Path) -> (bool, String) {
    let o = trainer(&["bundle", "verify", s(bundle), "--trusted", s(trusted)]);
    (o.status.success(), text(&o))
}

fn tar_of(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in parts {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, *bytes).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn reference_models_bundle_verify_and_bad_bundles_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("keys/line.key");
    let o = trainer(&["keys", "new", "--out", s(&key)]);
    assert!(o.status.success(), "{}", text(&o));
    let public = dir.path().join("keys/line.pub");
    let other = dir.path().join("other.key");
    assert!(
        trainer(&["keys", "new", "--out", s(&other)])
            .status
            .success()
    );
    let other_pub = dir.path().join("other.pub");
    // A second `keys new` on the same file keeps the first key.
    let before = fs::read(&key).unwrap();
    assert!(!trainer(&["keys", "new", "--out", s(&key)]).status.success());
    assert_eq!(fs::read(&key).unwrap(), before);

    // Both reference models, f32 and ONNX Runtime's QDQ int8, bundle and verify.
    let mut bundles = Vec::new();
    for (model, q) in [
        ("mobilenetv2_rgb_3cls_f32.onnx", "f32"),
        ("mobilenetv2_rgb_3cls_int8_qdq.onnx", "int8"),
    ] {
        let out = dir.path().join(format!("{q}.bundle"));
        let o = trainer(&[
            "bundle",
            "--onnx",
            s(&reference(model)),
            "--key",
            s(&key),
            "--classes",
            "good,porosity,undercut",
            "--name",
            "ref",
            "--version",
            q,
            "--quantization",
            q,
            "--out",
            s(&out),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let (ok, out_text) = verify(&out, &public);
        assert!(ok, "{out_text}");
        // Four golden inputs by default, reproduced on tract (and on ort in builds with it).
        assert!(out_text.contains("4 golden inputs"), "{out_text}");
        assert!(
            out_text.contains("tract: loads, runs, reproduces the golden logits"),
            "{out_text}"
        );
        bundles.push(out);
    }
    let good = Bundle::read(&bundles[0]).unwrap();

    // Refused at `bundle` time, before anything is signed: classes or input that do not fit.
    for (classes, input, want) in [
        ("good,porosity", "rgb", "3 logits but 2 class names"),
        (
            "a,b,c",
            "rgb-height",
            "3 input channels but the input spec lists 4",
        ),
    ] {
        let out = dir.path().join("refused.bundle");
        let o = trainer(&[
            "bundle",
            "--onnx",
            s(&reference("mobilenetv2_rgb_3cls_f32.onnx")),
            "--key",
            s(&key),
            "--classes",
            classes,
            "--input",
            input,
            "--name",
            "x",
            "--version",
            "1",
            "--out",
            s(&out),
        ]);
        assert!(!o.status.success());
        assert!(text(&o).contains(want), "{}", text(&o));
        assert!(!out.exists());
    }

    // Bad bundles a device must refuse, each with its reason.
    let signing = bundle::read_signing_key(&key).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        fs::write(&p, bytes).unwrap();
        p
    };
    let unsigned = write(
        "unsigned.bundle",
        &tar_of(&[
            (MANIFEST_FILE, &good.manifest_bytes),
            (MODEL_FILE, &good.onnx),
        ]),
    );
    let wrong_key = dir.path().join("other-signer.bundle");
    fs::write(
        &wrong_key,
        Bundle::sign(
            good.manifest.clone(),
            good.onnx.clone(),
            good.golden.clone(),
            &bundle::read_signing_key(&other).unwrap(),
        )
        .unwrap()
        .to_tar()
        .unwrap(),
    )
    .unwrap();
    // The int8 model put in place of the signed f32 one, manifest and signature kept.
    let mut swapped = good.clone();
    swapped.onnx = fs::read(reference("mobilenetv2_rgb_3cls_int8_qdq.onnx")).unwrap();
    let tampered = write("tampered.bundle", &swapped.to_tar().unwrap());
    let mut four = good.manifest.clone();
    four.classes.push("spatter".into());
    four.golden = None;
    let wrong_classes = write(
        "wrong-classes.bundle",
        &Bundle::sign(four, good.onnx.clone(), None, &signing)
            .unwrap()
            .to_tar()
            .unwrap(),
    );
    let not_onnx = write(
        "not-onnx.bundle",
        &Bundle::sign(
            good.manifest.clone(),
            b"garbage".to_vec(),
            good.golden.clone(),
            &signing,
        )
        .unwrap()
        .to_tar()
        .unwrap(),
    );
    // Signed properly, but its golden logits are not what the model computes.
    let mut off = good.manifest.clone();
    if let Some(g) = off.golden.as_mut() {
        g.logits[1][0] += 0.5;
    }
    let failing_golden = write(
        "failing-golden.bundle",
        &Bundle::sign(off, good.onnx.clone(), good.golden.clone(), &signing)
            .unwrap()
            .to_tar()
            .unwrap(),
    );
    // The golden inputs changed after signing.
    let mut changed = good.clone();
    if let Some(g) = changed.golden.as_mut() {
        g[100] ^= 0x40;
    }
    let changed_golden = write("changed-golden.bundle", &changed.to_tar().unwrap());
    let full = fs::read(&bundles[0]).unwrap();
    let truncated = write("truncated.bundle", &full[..full.len() - 4096]);
    for (path, trusted, want) in [
        (&unsigned, &public, "no manifest.sig"),
        (&wrong_key, &public, "does not verify with any trusted key"),
        (
            &bundles[0],
            &other_pub,
            "does not verify with any trusted key",
        ),
        (&tampered, &public, "model.onnx does not match the manifest"),
        (&wrong_classes, &public, "3 logits but 4 class names"),
        (&not_onnx, &public, "not an ONNX protobuf"),
        (&failing_golden, &public, "golden input 1 gives logits"),
        (&changed_golden, &public, "golden.bin: its sha256 is"),
        (&truncated, &public, "cut short"),
    ] {
        let (ok, out) = verify(path, trusted);
        assert!(!ok, "{} verified", path.display());
        assert!(out.contains(want), "{}: {out}", path.display());
    }
}

#[test]
fn eval_of_a_bundle_judges_each_frame_as_the_device_model_does() {
    use weld_core::dataset::{Dataset, DatasetSpec};
    use weld_edge::model::{Model, ModelOptions};

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("line.key");
    assert!(trainer(&["keys", "new", "--out", s(&key)]).status.success());
    let public = dir.path().join("line.pub");
    let classes = ["good", "porosity", "undercut"];
    let bundle = dir.path().join("ref.bundle");
    let onnx = reference("mobilenetv2_rgb_3cls_f32.onnx");
    let o = trainer(&[
        "bundle",
        "--onnx",
        s(&onnx),
        "--key",
        s(&key),
        "--classes",
        &classes.join(","),
        "--name",
        "ref",
        "--version",
        "1",
        "--out",
        s(&bundle),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // RGB-only photos, two per class, of different content.
    let root = dir.path().join("ds");
    let spec = DatasetSpec {
        classes: classes.iter().map(|c| c.to_string()).collect(),
        depth_unit_mm: None,
        intrinsics: None,
    };
    let ds = Dataset::create(&root, spec).unwrap();
    for (ci, class) in classes.iter().enumerate() {
        for i in 0..2u32 {
            let img = image::RgbImage::from_fn(64, 48, |x, y| {
                image::Rgb([(x * 4 + i * 50) as u8, (y * 5) as u8, (ci * 90) as u8])
            });
            img.save(ds.root.join(class).join(format!("{class}-{i}.png")))
                .unwrap();
        }
    }
    let out = dir.path().join("eval");
    let o = trainer(&[
        "eval",
        "--bundle",
        s(&bundle),
        "--trusted",
        s(&public),
        "--dataset",
        s(&root),
        "--part",
        "all",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["frames"], 6);
    assert_eq!(report["backend"], "tract");
    assert!(report["rules_note"].as_str().unwrap().contains("no depth"));

    // The confusion matrix is what the daemon's model says about each frame.
    let model = Model::from_onnx(
        &onnx,
        classes.iter().map(|c| c.to_string()).collect(),
        weld_core::manifest::InputSpec::rgb(224),
        &ModelOptions::default(),
    )
    .unwrap();
    let ds = Dataset::open(&root).unwrap();
    let mut want = vec![vec![0u64; 4]; 3];
    for smp in &ds.samples {
        let p = model.predict(&ds.load(smp).unwrap()).unwrap();
        let k = classes.iter().position(|c| *c == p.class).unwrap();
        want[smp.label.unwrap()][k] += 1;
    }
    assert_eq!(
        report["model_only"]["confusion"]["counts"],
        serde_json::json!(want)
    );

    // A bundle from an untrusted signer is refused, as on a device.
    let other = dir.path().join("other.key");
    assert!(
        trainer(&["keys", "new", "--out", s(&other)])
            .status
            .success()
    );
    let o = trainer(&[
        "eval",
        "--bundle",
        s(&bundle),
        "--trusted",
        s(&dir.path().join("other.pub")),
        "--dataset",
        s(&root),
        "--part",
        "all",
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("does not verify with any trusted key"),
        "{}",
        text(&o)
    );
}
