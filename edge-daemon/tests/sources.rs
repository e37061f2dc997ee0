//! Frame sources through their public API: synthetic, replay, config parsing and validation.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weld_core::dataset::{Dataset, DatasetSpec};
use weld_core::synth::{SynthClass, SynthConfig, generate};
use weld_core::{DepthImage, DepthMap, Frame};
use weld_edge::source::{
    self, Next, ReplayConfig, Source, SourceConfig, SourceError, SyntheticConfig, SyntheticSource,
};

fn frame_of(next: Result<Next, SourceError>) -> Frame {
    match next.unwrap() {
        Next::Frame(f) => *f,
        Next::End => panic!("unexpected end"),
    }
}

/// Small synthetic frames keep the tests fast; pool 1 renders one scene per class.
fn small(fps: f64) -> SyntheticConfig {
    SyntheticConfig {
        width: 128,
        height: 96,
        fps,
        pool: 1,
        ..SyntheticConfig::default()
    }
}

#[test]
fn synthetic_frames_have_the_size_depth_and_rising_seq() {
    let mut s = source::open(&SourceConfig::Synthetic(small(0.0))).unwrap();
    assert_eq!(s.name(), "synthetic");
    let before = chrono::Utc::now();
    let frames: Vec<Frame> = (0..6).map(|_| frame_of(s.next_frame())).collect();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!((f.width(), f.height()), (128, 96));
        assert_eq!(f.depth().unwrap().values.dimensions(), (128, 96));
        assert!(f.intrinsics.is_some());
        assert_eq!(f.seq, i as u64 + 1);
        assert!(
            f.ts >= before,
            "the time is now, not the generator's fixed time"
        );
    }
}

#[test]
fn synthetic_honours_fps() {
    let mut s = source::open(&SourceConfig::Synthetic(small(50.0))).unwrap();
    frame_of(s.next_frame()); // waits for the pool's first scenes
    let t = Instant::now();
    for _ in 0..10 {
        frame_of(s.next_frame());
    }
    let took = t.elapsed();
    // 10 frames at 50 fps are 10 periods of 20 ms after the first: 200 ms; a loaded machine
    // may be late, never early.
    assert!(
        took >= Duration::from_millis(180),
        "10 frames took {took:?}"
    );
    assert!(took < Duration::from_secs(5), "10 frames took {took:?}");
}

#[test]
fn a_mix_of_one_class_gives_only_that_class() {
    for pool in [0, 2] {
        let cfg = SyntheticConfig {
            mix: [("spatter".to_string(), 1.0), ("good".to_string(), 0.0)].into(),
            pool,
            ..small(0.0)
        };
        let mut s = SyntheticSource::open(&cfg).unwrap();
        assert_eq!(s.last_class(), None);
        for _ in 0..5 {
            frame_of(s.next_frame());
            assert_eq!(s.last_class(), Some(SynthClass::Spatter), "pool {pool}");
            assert!(!s.last_truth().unwrap().defects.is_empty());
        }
    }
}

#[test]
fn pooled_frames_are_the_generators_scenes() {
    let cfg = SyntheticConfig {
        mix: [("porosity".to_string(), 1.0)].into(),
        seed: 42,
        ..small(0.0)
    };
    let mut s = SyntheticSource::open(&cfg).unwrap();
    let f = frame_of(s.next_frame());
    let seed = weld_core::synth::frame_seed(42, SynthClass::Porosity as usize, 0);
    let want = generate(SynthClass::Porosity, seed, &SynthConfig::new(128, 96)).unwrap();
    assert_eq!(f.rgb(), want.frame.rgb());
    assert_eq!(f.depth(), want.frame.depth());
}

/// A dataset with frames good/a, good/b, porosity/c (RGB + depth, 80x60).
fn dataset(root: &Path) -> Vec<String> {
    let cfg = SynthConfig::new(80, 60);
    let spec = DatasetSpec {
        classes: vec!["good".into(), "porosity".into()],
        depth_unit_mm: Some(0.05),
        intrinsics: Some(cfg.intrinsics()),
    };
    let mut ds = Dataset::create(root, spec).unwrap();
    let mut stems = Vec::new();
    for (i, (class, stem)) in [("good", "a"), ("good", "b"), ("porosity", "c")]
        .into_iter()
        .enumerate()
    {
        let c = SynthClass::from_name(class).unwrap();
        let s = generate(c, i as u64, &cfg).unwrap();
        ds.add_frame(Some(class), stem, &s.frame).unwrap();
        stems.push(format!("{class}/{stem}"));
    }
    stems
}

fn replay(cfg: ReplayConfig) -> Box<dyn Source> {
    source::open(&SourceConfig::Replay(cfg)).unwrap()
}

/// Drains a source that ends (at most `limit` frames, so a source that never ends fails).
fn drain(s: &mut dyn Source, limit: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    for _ in 0..limit {
        match s.next_frame().unwrap() {
            Next::Frame(f) => out.push(*f),
            Next::End => return out,
        }
    }
    panic!("no end after {limit} frames");
}

#[test]
fn replay_of_a_dataset_gives_every_frame_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let ds = Dataset::open(dir.path()).unwrap();
    let mut s = replay(ReplayConfig::new(dir.path()));
    let frames = drain(s.as_mut(), 10);
    assert_eq!(frames.len(), 3);
    for (i, (f, sample)) in frames.iter().zip(&ds.samples).enumerate() {
        let want = ds.load(sample).unwrap();
        assert_eq!(f.rgb(), want.rgb(), "frame {i} is {}", sample.rgb.display());
        assert_eq!(f.depth().unwrap().unit_mm, 0.05, "unit from dataset.toml");
        assert_eq!(f.intrinsics, ds.spec.intrinsics);
        assert_eq!(f.seq, i as u64 + 1);
    }
    assert!(matches!(s.next_frame(), Ok(Next::End)), "stays ended");
}

#[test]
fn looping_replay_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let mut s = replay(ReplayConfig {
        looping: true,
        ..ReplayConfig::new(dir.path())
    });
    let frames: Vec<Frame> = (0..7).map(|_| frame_of(s.next_frame())).collect();
    assert_eq!(frames[0].rgb(), frames[3].rgb());
    assert_eq!(frames[2].rgb(), frames[5].rgb());
    assert_ne!(frames[0].rgb(), frames[1].rgb());
    assert_eq!(frames[6].seq, 7, "seq keeps rising across loops");
}

/// Writes frame `n` as `dir/STEM.png` (+ depth).
fn plain(dir: &Path, stem: &str, n: u8, depth: bool) {
    let rgb = image::RgbImage::from_pixel(8, 6, image::Rgb([n, n, n]));
    let d = depth.then(|| DepthMap {
        values: DepthImage::from_pixel(8, 6, image::Luma([1000 + u16::from(n)])),
        unit_mm: 0.1,
    });
    let f = Frame::new(rgb, d).unwrap();
    f.save(
        &dir.join(format!("{stem}.png")),
        &dir.join(format!("{stem}.depth.png")),
    )
    .unwrap();
}

#[test]
fn plain_folder_replays_sorted_and_skips_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    plain(dir.path(), "b", 2, true);
    plain(dir.path(), "a", 1, true);
    plain(dir.path(), "d", 4, true);
    std::fs::write(dir.path().join("c.png"), b"not a png").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    let cfg = ReplayConfig {
        depth_unit_mm: Some(0.1),
        looping: true,
        ..ReplayConfig::new(dir.path())
    };
    let mut s = replay(cfg.clone());
    let values: Vec<u8> = (0..6)
        .map(|_| frame_of(s.next_frame()).rgb().get_pixel(0, 0).0[0])
        .collect();
    assert_eq!(values, [1, 2, 4, 1, 2, 4], "c.png skipped, on every loop");
    let f = frame_of(replay(cfg).next_frame());
    assert_eq!(f.depth().unwrap().mm_at(0, 0), Some(1001.0 * 0.1));
}

#[test]
fn replay_refuses_an_empty_folder_or_depth_without_a_unit() {
    let dir = tempfile::tempdir().unwrap();
    let err = source::open(&SourceConfig::Replay(ReplayConfig::new(dir.path())))
        .err()
        .unwrap();
    let name = dir.path().display().to_string();
    assert!(
        matches!(&err, SourceError::Fatal(m) if m.contains(&name) && m.contains("no image files")),
        "{err}"
    );
    plain(dir.path(), "a", 1, true);
    let err = source::open(&SourceConfig::Replay(ReplayConfig::new(dir.path())))
        .err()
        .unwrap();
    assert!(
        matches!(&err, SourceError::Fatal(m) if m.contains("source.depth_unit_mm")),
        "{err}"
    );
}

#[test]
fn replay_paces_to_its_fps() {
    let dir = tempfile::tempdir().unwrap();
    plain(dir.path(), "a", 1, false);
    let mut s = replay(ReplayConfig {
        looping: true,
        fps: 100.0,
        ..ReplayConfig::new(dir.path())
    });
    let t = Instant::now();
    for _ in 0..6 {
        frame_of(s.next_frame());
    }
    assert!(
        t.elapsed() >= Duration::from_millis(45),
        "{:?}",
        t.elapsed()
    );
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Daemon {
    source: SourceConfig,
}

fn parse(toml_text: &str) -> Result<SourceConfig, String> {
    toml::from_str::<Daemon>(toml_text)
        .map(|d| d.source)
        .map_err(|e| e.to_string())
}

const EXAMPLES: [&str; 5] = [
    "[source]\nkind = \"synthetic\"\nwidth = 320\nheight = 240\nfps = 60\nseed = 7\npool = 4\n\
     mix = { good = 0.6, porosity = 0.1, undercut = 0.1, spatter = 0.1, burn_through = 0.1 }\n",
    "[source]\nkind = \"replay\"\npath = \"/var/lib/weld-edge/replay\"\nloop = true\nfps = 10\n\
     depth_unit_mm = 0.05\n",
    "[source]\nkind = \"v4l\"\ndevice = \"/dev/video2\"\nwidth = 1280\nheight = 720\nfps = 30\n\
     fourcc = [\"YUYV\"]\n",
    "[source]\nkind = \"realsense\"\nserial = \"123622270300\"\nwidth = 848\nheight = 480\n\
     fps = 60\n",
    "[source]\nkind = \"synthetic\"\n",
];

#[test]
fn toml_examples_parse_validate_and_round_trip() {
    for text in EXAMPLES {
        let cfg = parse(text).unwrap();
        assert!(cfg.problems().is_empty(), "{text}: {:?}", cfg.problems());
        let back = toml::to_string(&Daemon {
            source: cfg.clone(),
        })
        .unwrap();
        assert_eq!(parse(&back).unwrap(), cfg, "{back}");
    }
    assert_eq!(parse(EXAMPLES[4]).unwrap(), SourceConfig::default());
    match parse(EXAMPLES[1]).unwrap() {
        SourceConfig::Replay(r) => assert!(r.looping && r.fps == 10.0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_keys_and_kinds_are_rejected_by_name() {
    let err = parse("[source]\nkind = \"synthetic\"\ncolour = 1\n").unwrap_err();
    assert!(err.contains("colour"), "{err}");
    let err = parse("[source]\nkind = \"gige\"\n").unwrap_err();
    assert!(err.contains("gige"), "{err}");
    let err = parse("[source]\nkind = \"replay\"\n").unwrap_err();
    assert!(err.contains("path"), "{err}");
}

#[test]
fn validation_lists_every_problem_at_once() {
    let cfg = parse(
        "[source]\nkind = \"synthetic\"\nwidth = 10\nheight = 100000\nfps = -3\npool = 1000\n\
         mix = { good = -1, crack = 2 }\n",
    )
    .unwrap();
    let p = cfg.problems();
    for key in [
        "source.width",
        "source.height",
        "source.fps",
        "source.pool",
        "source.mix.good",
        "source.mix.crack",
        "source.mix gives no class",
    ] {
        assert!(
            p.iter().any(|m| m.starts_with(key)),
            "{key} missing in {p:#?}"
        );
    }
    assert_eq!(p.len(), 7, "{p:#?}");
    let err = source::open(&cfg).err().unwrap().to_string();
    assert!(
        err.contains("source.width") && err.contains("source.pool"),
        "{err}"
    );
    // Hardware kinds validate in every build, with or without their feature.
    let p = parse("[source]\nkind = \"v4l\"\nfps = 0\nfourcc = [\"H264\"]\n")
        .unwrap()
        .problems();
    assert_eq!(p.len(), 2, "{p:?}");
}
