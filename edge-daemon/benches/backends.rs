//! Single-image inference time of each backend on the reference MobileNetV2 (1x3x224x224):
//! tract f32, tract int8 QDQ, and with `--features ort` ONNX Runtime f32 and int8 QDQ.
//!
//! `cargo bench -p weld-edge --bench backends [--features ort]`; the models are found like
//! the interop tests find them (`WELD_REFERENCE_MODELS`, default the repository's copy in
//! `tests/reference-models`), ONNX Runtime through `ORT_DYLIB_PATH`. One caller thread, and one
//! intra-op thread in ORT: the per-worker cost the daemon pays.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ndarray::Array4;
use weld_edge::backend;

#[path = "../tests/common/mod.rs"]
mod common;
use common::models_dir;

fn bench_backends(c: &mut Criterion) {
    let dir = models_dir();
    let input: Array4<f32> =
        ndarray_npy::read_npy(dir.join("mobilenetv2_rgb_3cls_f32.input.npy")).unwrap();
    let shape = [1, 3, 224, 224];
    let mut group = c.benchmark_group("mobilenetv2_224");
    // About 25-50 ms an image in tract (NOTES-toolchain.md): 20 samples in ~10 s per case.
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    for kind in backend::available() {
        for (label, file) in [
            ("f32", "mobilenetv2_rgb_3cls_f32.onnx"),
            ("int8_qdq", "mobilenetv2_rgb_3cls_int8_qdq.onnx"),
        ] {
            let b = backend::load(kind, &dir.join(file), shape, 1).unwrap();
            group.bench_function(format!("{kind}/{label}"), |bench| {
                bench.iter(|| b.infer(input.view()).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_backends);
criterion_main!(benches);
