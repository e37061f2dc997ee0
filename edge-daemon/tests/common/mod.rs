//! Fixtures shared by the integration tests.
#![allow(clippy::unwrap_used, dead_code)] // test fixtures; not every test file uses every one

pub mod browser;
pub mod daemon;
pub mod mosquitto;
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
