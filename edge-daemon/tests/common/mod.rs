//! Fixtures shared by the integration tests.
#![allow(clippy::unwrap_used, dead_code)] // test fixtures; not every test file uses every one

pub mod browser;
pub mod daemon;
pub mod mosquitto;
pub mod onnx;
pub mod output;

use std::path::{Path, PathBuf};

use weld_core::dataset::{Dataset, DatasetSpec};
use weld_core::synth::{DEFAULT_CLASSES, SynthClass, SynthConfig, frame_seed, generate};

/// A labelled dataset of `per_class` synthetic frames per class (seed 99) at `width`x`height`.
pub fn synth_dataset(root: &Path, width: u32, height: u32, per_class: usize) {
    let cfg = SynthConfig::new(width, height);
    let spec = DatasetSpec {
        classes: DEFAULT_CLASSES.map(String::from).to_vec(),
        depth_unit_mm: Some(cfg.depth_unit_mm),
        intrinsics: Some(cfg.intrinsics()),
    };
    let mut ds = Dataset::create(root, spec).unwrap();
    for (ci, class) in SynthClass::ALL.into_iter().enumerate() {
        for i in 0..per_class {
            let s = generate(class, frame_seed(99, ci, i), &cfg).unwrap();
            ds.add_frame(Some(class.name()), &format!("f{i}"), &s.frame)
                .unwrap();
        }
    }
}

/// The f32 reference MobileNetV2 (3 classes, random weights) beside the repository.
pub const F32_MODEL: &str = "mobilenetv2_rgb_3cls_f32.onnx";

/// The folder of the reference models: `WELD_REFERENCE_MODELS`, default the repository's copy
/// in `tests/reference-models` (made by PyTorch and ONNX Runtime; see its ORIGIN.md). A
/// missing folder fails the test.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("WELD_REFERENCE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference-models")
        });
    assert!(
        dir.join(F32_MODEL).is_file(),
        "reference models not found: looked for {F32_MODEL} in {} (set WELD_REFERENCE_MODELS \
         to a folder holding the reference models)",
        dir.display()
    );
    dir
}

/// The built-in model's bundle as read (its ONNX, manifest and golden inputs), to re-sign.
pub fn builtin_bundle() -> weld_core::bundle::Bundle {
    weld_core::bundle::Bundle::from_reader(weld_edge::model::BUILTIN_BUNDLE).unwrap()
}

/// The built-in model re-signed as `version` with the ed25519 key of seed `key`, after `tweak`
/// edits the manifest, the ONNX and the golden inputs; the bundle file's bytes.
pub fn signed_builtin(
    version: &str,
    key: [u8; 32],
    tweak: impl FnOnce(&mut weld_core::manifest::ModelManifest, &mut Vec<u8>, &mut Option<Vec<u8>>),
) -> Vec<u8> {
    let b = builtin_bundle();
    let (mut manifest, mut onnx, mut golden) = (b.manifest, b.onnx, b.golden);
    manifest.version = version.into();
    tweak(&mut manifest, &mut onnx, &mut golden);
    let key = ed25519_dalek::SigningKey::from_bytes(&key);
    weld_core::bundle::Bundle::sign(manifest, onnx, golden, &key)
        .unwrap()
        .to_tar()
        .unwrap()
}

/// The public key of seed `key`, as the 64 hex digits a config's `trusted_keys` takes.
pub fn public_hex(key: [u8; 32]) -> String {
    hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&key)
            .verifying_key()
            .as_bytes(),
    )
}
