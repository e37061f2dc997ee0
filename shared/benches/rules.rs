//! Time of the heuristic detector per frame on synthetic 640x480 and 1280x720 frames of every
//! class (one thread). `cargo bench -p weld-core --bench rules`; figures in
//! docs/PERFORMANCE.md.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use weld_core::rules::{Detector, RulesConfig};
use weld_core::synth::{SynthClass, SynthConfig, frame_seed, generate};

fn detector(c: &mut Criterion) {
    let det = match Detector::new(RulesConfig::default()) {
        Ok(d) => d,
        Err(e) => panic!("default rules config is invalid: {e}"),
    };
    for (w, h) in [(640, 480), (1280, 720)] {
        let cfg = SynthConfig::new(w, h);
        // Two frames per class, so the figure is a mix of what the line sees.
        let frames: Vec<_> = SynthClass::ALL
            .iter()
            .enumerate()
            .flat_map(|(ci, &class)| (0..2).map(move |i| (ci, class, i)))
            .filter_map(|(ci, class, i)| generate(class, frame_seed(77, ci, i), &cfg).ok())
            .map(|s| s.frame)
            .collect();
        let mut group = c.benchmark_group(format!("rules_{w}x{h}"));
        group.sample_size(30);
        group.bench_function("mixed_frame", |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) % frames.len();
                black_box(det.inspect(black_box(&frames[k])))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, detector);
criterion_main!(benches);
