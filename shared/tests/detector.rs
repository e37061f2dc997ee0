//! The heuristic detector against the synthetic camera's ground truth, on frames it cannot
//! judge, and on random frames (it must never panic).
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use image::{Luma, RgbImage};
use proptest::prelude::*;
use weld_core::result::RulesNote;
use weld_core::rules::{Detector, RulesConfig, UNKNOWN_CLASS};
use weld_core::synth::{SynthClass, SynthConfig, frame_seed, generate};
use weld_core::{DepthImage, DepthMap, FindingKind, Frame};

/// A seed never used to tune or calibrate the detector.
const TEST_SEED: u64 = 4242;

fn overlaps(a: [u32; 4], b: [u32; 4], slack: u32) -> bool {
    a[0] <= b[0] + b[2] + slack
        && b[0] <= a[0] + a[2] + slack
        && a[1] <= b[1] + b[3] + slack
        && b[1] <= a[1] + a[3] + slack
}

#[test]
fn each_class_is_recognised_and_located_on_synthetic_frames() {
    let det = Detector::new(RulesConfig::default()).unwrap();
    let cfg = SynthConfig::new(640, 480);
    for (ci, class) in SynthClass::ALL.into_iter().enumerate() {
        let mut right = 0;
        for i in 0..8 {
            let s = generate(class, frame_seed(TEST_SEED, ci, i), &cfg).unwrap();
            let out = det.inspect(&s.frame);
            assert!(out.note.is_none(), "{class:?} {i}: {:?}", out.note);
            if out.class == class.name() {
                right += 1;
                // The finding that made the call sits on a defect of the truth.
                if let Some(kind) = class.finding_kind() {
                    let located = out
                        .findings
                        .iter()
                        .filter(|f| f.kind == kind)
                        .any(|f| s.truth.defects.iter().any(|d| overlaps(f.bbox, d.bbox, 4)));
                    assert!(
                        located,
                        "{class:?} {i}: {:?} vs {:?}",
                        out.findings, s.truth.defects
                    );
                }
            }
            // Bead measurements within a fifth of what was generated (the width varies
            // +-8 % along the bead and the toe is a fillet, not a corner).
            if class == SynthClass::Good {
                let w = out.measurements.bead_width_mm.unwrap();
                let h = out.measurements.bead_height_mm.unwrap();
                let (tw, th) = (s.truth.bead.width_mm, s.truth.bead.height_mm);
                assert!(
                    (w - tw).abs() < 0.2 * tw,
                    "{class:?} {i}: width {w} vs {tw}"
                );
                assert!(
                    (h - th).abs() < 0.2 * th,
                    "{class:?} {i}: height {h} vs {th}"
                );
            }
        }
        assert!(right >= 7, "{class:?}: {right} of 8 right");
    }
}

#[test]
fn fine_1280x720_frames_are_binned_and_boxes_map_back() {
    let det = Detector::new(RulesConfig::default()).unwrap();
    let cfg = SynthConfig::new(1280, 720);
    let mut right = 0;
    for (ci, class) in SynthClass::ALL.into_iter().enumerate() {
        for i in 0..2 {
            let s = generate(class, frame_seed(TEST_SEED, ci, 100 + i), &cfg).unwrap();
            let out = det.inspect(&s.frame);
            right += usize::from(out.class == class.name());
            for f in &out.findings {
                assert!(
                    f.bbox[0] + f.bbox[2] <= 1280 && f.bbox[1] + f.bbox[3] <= 720,
                    "{f:?}"
                );
            }
            if let (Some(kind), true) = (class.finding_kind(), out.class == class.name()) {
                let located = out
                    .findings
                    .iter()
                    .filter(|f| f.kind == kind)
                    .any(|f| s.truth.defects.iter().any(|d| overlaps(f.bbox, d.bbox, 8)));
                assert!(
                    located,
                    "{class:?} {i}: {:?} vs {:?}",
                    out.findings, s.truth.defects
                );
            }
        }
    }
    assert!(right >= 9, "{right} of 10 right");
}

#[test]
fn frames_that_cannot_be_judged_are_unknown_and_never_confident() {
    let det = Detector::new(RulesConfig::default()).unwrap();
    let rgb = RgbImage::from_pixel(320, 240, image::Rgb([120, 120, 120]));
    let depth = |v: u16| DepthMap {
        values: DepthImage::from_pixel(320, 240, Luma([v])),
        unit_mm: 0.05,
    };

    let out = det.inspect(&Frame::new(rgb.clone(), Some(depth(0))).unwrap());
    assert_eq!(out.class, UNKNOWN_CLASS);
    assert_eq!(out.note, Some(RulesNote::InsufficientDepth));
    assert!(!out.confident);

    // A bare plate, 180 mm away: no bead.
    let out = det.inspect(&Frame::new(rgb, Some(depth(3600))).unwrap());
    assert_eq!(out.class, UNKNOWN_CLASS);
    assert_eq!(out.note, Some(RulesNote::NoBead));
    assert!(!out.confident);

    // RGB only: an answer, never confident.
    let s = generate(SynthClass::Good, 3, &SynthConfig::new(640, 480)).unwrap();
    let out = det.inspect(&Frame::new(s.frame.rgb().clone(), None).unwrap());
    assert_eq!(out.note, Some(RulesNote::RgbOnly));
    assert!(!out.confident && out.confidence <= 0.6, "{out:?}");
    assert_ne!(out.class, UNKNOWN_CLASS);
}

#[test]
fn a_dark_hole_in_an_rgb_only_frame_is_a_burn_through() {
    let det = Detector::new(RulesConfig::default()).unwrap();
    let mut rgb = RgbImage::from_pixel(640, 480, image::Rgb([150, 150, 150]));
    for y in 230..250 {
        for x in 310..330 {
            rgb.put_pixel(x, y, image::Rgb([5, 5, 5]));
        }
    }
    let out = det.inspect(&Frame::new(rgb, None).unwrap());
    assert_eq!(out.class, "burn_through");
    assert!(
        out.findings
            .iter()
            .any(|f| f.kind == FindingKind::BurnThrough)
    );
}

#[test]
fn rules_config_round_trips_and_names_bad_keys() {
    let cfg = RulesConfig::default();
    let text = cfg.to_toml().unwrap();
    let back: RulesConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, cfg);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rules.toml");
    std::fs::write(&p, text.replace("confident_at =", "confident_at = 7.0 #")).unwrap();
    let err = RulesConfig::load(&p).unwrap_err().to_string();
    assert!(
        err.contains("confident_at must be in 0..=1, got 7"),
        "{err}"
    );
    std::fs::write(&p, format!("threshold = 3\n{text}")).unwrap();
    let err = RulesConfig::load(&p).unwrap_err().to_string();
    assert!(err.contains("threshold"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any frame, however odd (tiny, all zero, saturated, random), gets an outcome, not a panic.
    #[test]
    fn random_frames_never_panic(
        w in 1u32..96,
        h in 1u32..96,
        kind in 0u8..4,
        seed in any::<u64>(),
        unit in prop_oneof![Just(0.05f32), Just(1e-4f32), Just(10.0f32)],
    ) {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let values = DepthImage::from_fn(w, h, |_, _| Luma([match kind {
            0 => 0,
            1 => u16::MAX,
            2 => (next() % 65536) as u16,
            _ => if next() % 3 == 0 { 0 } else { 3000 + (next() % 200) as u16 },
        }]));
        let rgb = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, (x * y) as u8])
        });
        let det = Detector::new(RulesConfig::default()).unwrap();
        let frame = Frame::new(rgb.clone(), Some(DepthMap { values, unit_mm: unit })).unwrap();
        let out = det.inspect(&frame);
        prop_assert!(out.confidence.is_finite() && (0.0..=1.0).contains(&out.confidence));
        if out.note.is_some() {
            prop_assert!(!out.confident);
        }
        let out = det.inspect(&Frame::new(rgb, None).unwrap());
        prop_assert!(!out.confident);
    }
}
