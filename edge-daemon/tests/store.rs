//! The sled store through its public API: retention against an in-memory model (proptest),
//! exact query results, captures round trips and caps, corrupt records, reopen and lock errors.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use image::RgbImage;
use proptest::prelude::*;
use uuid::Uuid;
use weld_core::result::{LatencyMs, ModelVerdict, RESULT_VERSION, RulesVerdict};
use weld_core::synth::{SynthClass, SynthConfig, generate};
use weld_core::{DecidedBy, Finding, FindingKind, Frame, Inspection, Measurements};
use weld_edge::store::{
    CaptureConfig, HistoryConfig, MAX_QUERY_LIMIT, Store, StoreConfig, StoreError,
};

/// 2023-11-14T22:13:20Z in Unix ms: any fixed time works; this one is easy to recognise.
const T0_MS: u64 = 1_700_000_000_000;

/// A UUIDv7 at `ms` whose counter bytes are `n`, so ids in one millisecond sort by `n`.
fn id_at(ms: u64, n: u16) -> Uuid {
    let mut rest = [0u8; 10];
    rest[..2].copy_from_slice(&n.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(ms, &rest).into_uuid()
}

fn time_of(ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(i64::try_from(ms).unwrap()).unwrap()
}

/// A result with `pad` bytes of device name, so its JSON size is under the test's control.
fn result(id: Uuid, pad: usize) -> Inspection {
    let b = id.as_bytes();
    let ms = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
    Inspection {
        v: RESULT_VERSION,
        id,
        seq: ms % 1000,
        device: "d".repeat(pad),
        line: "L2".into(),
        ts: time_of(ms),
        class: "porosity".into(),
        confidence: 0.75,
        decided_by: DecidedBy::Both,
        uncertain: true,
        rules: Some(RulesVerdict {
            class: "porosity".into(),
            confidence: 0.6,
            note: None,
        }),
        model: Some(ModelVerdict {
            class: "good".into(),
            confidence: 0.55,
            version: "mbv2-test".into(),
        }),
        findings: vec![Finding::new(FindingKind::Pore, [1, 2, 3, 4])],
        measurements: Measurements {
            pore_count: Some(1),
            ..Measurements::default()
        },
        latency_ms: LatencyMs {
            rules: 1.5,
            model: 2.25,
            total: 4.0,
        },
        path: None,
    }
}

fn json_len(r: &Inspection) -> u64 {
    serde_json::to_vec(r).unwrap().len() as u64
}

fn config(max_results: usize, max_bytes: u64) -> StoreConfig {
    StoreConfig {
        history: HistoryConfig {
            max_results,
            max_bytes,
        },
        captures: CaptureConfig::default(),
        ..StoreConfig::default()
    }
}

fn ids(rs: &[Inspection]) -> Vec<Uuid> {
    rs.iter().map(|r| r.id).collect()
}

// ------------------------------------------------------------------ history against a model

/// The history as the module docs describe it: sorted by id, oldest removed first while over
/// either limit, a same-id insert replaces.
#[derive(Debug, Default)]
struct Model {
    items: VecDeque<Inspection>,
    max_results: usize,
    max_bytes: u64,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.items.iter().map(json_len).sum()
    }

    fn insert(&mut self, r: Inspection) {
        match self.items.binary_search_by_key(&r.id, |x| x.id) {
            Ok(i) => self.items[i] = r,
            Err(i) => self.items.insert(i, r),
        }
        self.trim();
    }

    fn trim(&mut self) {
        while self.items.len() > self.max_results || self.bytes() > self.max_bytes {
            self.items.pop_front();
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A result `dt_ms` from the newest id so far (negative: out of order), counter `n`
    /// (a repeated (ms, n) replaces), with `pad` bytes of padding.
    Insert { dt_ms: i64, n: u16, pad: usize },
    /// `after(model[idx % len] or None, limit)`.
    After { idx: Option<usize>, limit: usize },
    /// Drop the store and open it again, maybe with other limits.
    Reopen { limits: Option<(usize, u64)> },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (-3i64..=3, 0u16..4, 0usize..20_000)
            .prop_map(|(dt_ms, n, pad)| Op::Insert { dt_ms, n, pad }),
        2 => (proptest::option::of(0usize..64), 0usize..16)
            .prop_map(|(idx, limit)| Op::After { idx, limit }),
        1 => proptest::option::of(limits()).prop_map(|limits| Op::Reopen { limits }),
    ]
}

/// Up to 12 results and 64..160 KiB: with 0..20 KB results both limits take turns binding.
fn limits() -> impl Strategy<Value = (usize, u64)> {
    (1usize..=12, 64u64 * 1024..=160 * 1024)
}

fn check_against_model(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    let h = store.history();
    prop_assert_eq!(h.len(), model.items.len());
    prop_assert_eq!(h.bytes(), model.bytes());
    let all = h.after(None, usize::MAX).unwrap();
    prop_assert_eq!(&all, &Vec::from(model.items.clone()));
    let latest = h.latest().unwrap();
    prop_assert_eq!(latest.as_ref(), model.items.back());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn history_matches_the_model(start in limits(), ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), &config(start.0, start.1)).unwrap();
        let mut model = Model { max_results: start.0, max_bytes: start.1, ..Model::default() };
        let mut newest_ms = T0_MS;
        for op in ops {
            match op {
                Op::Insert { dt_ms, n, pad } => {
                    let ms = newest_ms.saturating_add_signed(dt_ms);
                    newest_ms = newest_ms.max(ms);
                    let r = result(id_at(ms, n), pad);
                    store.history().insert(&r).unwrap();
                    model.insert(r);
                }
                Op::After { idx, limit } => {
                    let after = idx
                        .filter(|_| !model.items.is_empty())
                        .map(|i| model.items[i % model.items.len()].id);
                    let got = store.history().after(after, limit).unwrap();
                    let want: Vec<Uuid> = model
                        .items
                        .iter()
                        .filter(|r| after.is_none_or(|a| r.id > a))
                        .take(limit)
                        .map(|r| r.id)
                        .collect();
                    prop_assert_eq!(ids(&got), want);
                }
                Op::Reopen { limits } => {
                    if let Some((max_results, max_bytes)) = limits {
                        model.max_results = max_results;
                        model.max_bytes = max_bytes;
                        model.trim();
                    }
                    drop(store);
                    store = Store::open(dir.path(), &config(model.max_results, model.max_bytes))
                        .unwrap();
                }
            }
            check_against_model(&store, &model)?;
        }
    }
}

// ------------------------------------------------------------------ history queries

/// Results at T0, T0 (counter 1), T0+1, T0+5 and T0+10 ms.
fn five(store: &Store) -> Vec<Uuid> {
    let ids = vec![
        id_at(T0_MS, 0),
        id_at(T0_MS, 1),
        id_at(T0_MS + 1, 0),
        id_at(T0_MS + 5, 0),
        id_at(T0_MS + 10, 0),
    ];
    // Inserted out of order on purpose: the key, not the insert order, is the order.
    for &i in &[3, 0, 4, 1, 2] {
        store.history().insert(&result(ids[i], 10)).unwrap();
    }
    ids
}

#[test]
fn after_is_strictly_after_oldest_first_and_limited() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let ids = five(&store);
    let h = store.history();
    assert_eq!(ids_of(h.after(None, 2)), ids[..2]);
    assert_eq!(ids_of(h.after(Some(ids[1]), 100)), ids[2..]);
    assert!(ids_of(h.after(Some(ids[4]), 100)).is_empty());
    assert!(ids_of(h.after(None, 0)).is_empty());
    // An id that is not stored still marks a place in time.
    assert_eq!(ids_of(h.after(Some(id_at(T0_MS + 3, 7)), 100)), ids[3..]);
    assert_eq!(h.latest().unwrap().unwrap(), result(ids[4], 10));
}

fn ids_of(r: Result<Vec<Inspection>, StoreError>) -> Vec<Uuid> {
    ids(&r.unwrap())
}

#[test]
fn between_is_inclusive_to_the_millisecond() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let ids = five(&store);
    let h = store.history();
    let t = |ms: u64| time_of(ms);
    assert_eq!(
        ids_of(h.between(t(T0_MS + 1), t(T0_MS + 5), 100)),
        ids[2..4]
    );
    assert_eq!(ids_of(h.between(t(T0_MS), t(T0_MS), 100)), ids[..2]);
    assert_eq!(ids_of(h.between(t(T0_MS), t(T0_MS + 10), 3)), ids[..3]);
    assert!(ids_of(h.between(t(T0_MS + 2), t(T0_MS + 4), 100)).is_empty());
    assert!(ids_of(h.between(t(T0_MS + 5), t(T0_MS + 1), 100)).is_empty());
    // Sub-millisecond parts are ignored: 0.6 ms into T0+1 still includes T0+1.
    let inside = t(T0_MS + 1) + chrono::Duration::microseconds(600);
    assert_eq!(ids_of(h.between(inside, t(T0_MS + 1), 100)), ids[2..3]);
    // Times outside UUIDv7's range clamp instead of failing.
    let far = DateTime::from_timestamp(i64::from(u32::MAX) * 100, 0).unwrap();
    assert_eq!(ids_of(h.between(DateTime::UNIX_EPOCH, far, 100)), ids);
}

#[test]
fn an_empty_history_answers_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let h = store.history();
    assert!(h.is_empty());
    assert_eq!(h.bytes(), 0);
    assert_eq!(h.latest().unwrap(), None);
    assert!(ids_of(h.after(None, 10)).is_empty());
}

#[test]
fn query_limits_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let n = MAX_QUERY_LIMIT + 5;
    for i in 0..n {
        store
            .history()
            .insert(&result(id_at(T0_MS + i as u64, 0), 0))
            .unwrap();
    }
    assert_eq!(store.history().len(), n);
    let got = store.history().after(None, usize::MAX).unwrap();
    assert_eq!(got.len(), MAX_QUERY_LIMIT);
    assert_eq!(got[0].id, id_at(T0_MS, 0));
    let far = time_of(T0_MS + 10 * n as u64);
    let got = store
        .history()
        .between(time_of(T0_MS), far, usize::MAX)
        .unwrap();
    assert_eq!(got.len(), MAX_QUERY_LIMIT);
}

#[test]
fn refused_results_leave_the_history_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &config(10, 64 * 1024)).unwrap();
    let h = store.history();

    let v4 = uuid::Builder::from_random_bytes([3; 16]).into_uuid();
    let err = h.insert(&result(v4, 0)).unwrap_err();
    assert!(matches!(err, StoreError::NotTimeOrdered { .. }), "{err}");

    let err = h.insert(&result(id_at(T0_MS, 0), 70_000)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{msg}");
    assert!(msg.contains("store.history.max_bytes"), "{msg}");

    // JSON writes NaN as null, which would not read back as a number.
    let mut nan = result(id_at(T0_MS, 1), 0);
    nan.confidence = f32::NAN;
    let err = h.insert(&nan).unwrap_err();
    assert!(matches!(err, StoreError::NotStorable { .. }), "{err}");

    assert!(h.is_empty());
    assert_eq!(h.bytes(), 0);
}

#[test]
fn reopen_keeps_results_and_bytes_and_applies_smaller_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (all, bytes) = {
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        five(&store);
        let h = store.history();
        (h.after(None, 100).unwrap(), h.bytes())
    };
    assert_eq!(bytes, all.iter().map(json_len).sum::<u64>());
    {
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        assert_eq!(store.history().after(None, 100).unwrap(), all);
        assert_eq!(store.history().bytes(), bytes);
        assert_eq!(store.history().len(), 5);
    }
    let store = Store::open(dir.path(), &config(2, 64 * 1024)).unwrap();
    assert_eq!(store.history().after(None, 100).unwrap(), all[3..]);
    assert_eq!(store.history().len(), 2);
    assert_eq!(
        store.history().bytes(),
        all[3..].iter().map(json_len).sum::<u64>()
    );
}

#[test]
fn clones_share_counters_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &config(50, 1024 * 1024)).unwrap();
    let writer = store.history().clone();
    let t = std::thread::spawn(move || {
        for i in 0..200u64 {
            writer.insert(&result(id_at(T0_MS + i, 0), 100)).unwrap();
        }
    });
    // The counters change under one lock with the insert and its retention, so a reader never
    // sees them over the limit. Queries are not snapshots (sled iterators are not), but what
    // they return is always in id order without repeats.
    while !t.is_finished() {
        assert!(store.history().len() <= 50);
        let seen = ids(&store.history().after(None, 1000).unwrap());
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }
    t.join().unwrap();
    assert_eq!(store.history().len(), 50);
    assert_eq!(
        store.history().after(None, 1).unwrap()[0].id,
        id_at(T0_MS + 150, 0)
    );
}

// ------------------------------------------------------------------ corrupt records

/// A subscriber that writes log lines into a buffer the test can read.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

/// The store's sled database opened directly. sled frees its lock from a background thread a
/// moment after a handle is dropped, so this tries for up to 1 s, like `Store::open` does.
fn raw_db(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(e.to_string().contains("could not acquire lock"), "{e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Writes `value` under `key` into a tree of the store's database, as a foreign writer or a
/// damaged disk would, with the store closed.
fn poke(dir: &Path, tree: &str, key: &[u8], value: &[u8]) {
    let db = raw_db(dir);
    db.open_tree(tree).unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

#[test]
fn corrupt_history_records_are_skipped_with_a_warning_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = {
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        five(&store)
    };
    let bad = id_at(T0_MS + 7, 0);
    let newest_bad = id_at(T0_MS + 99, 0);
    poke(dir.path(), "history", bad.as_bytes(), b"\xff\x00 not json");
    poke(dir.path(), "history", newest_bad.as_bytes(), b"{\"v\":1}");
    poke(dir.path(), "history", b"short", b"{}");

    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let h = store.history();
    // Undecodable records still occupy space, so they count until retention removes them.
    assert_eq!(h.len(), 8);
    let ((all, latest, between), logs) = with_logs(|| {
        (
            h.after(None, 100).unwrap(),
            h.latest().unwrap(),
            h.between(time_of(T0_MS + 5), time_of(T0_MS + 99), 100)
                .unwrap(),
        )
    });
    assert_eq!(ids(&all), good);
    assert_eq!(latest.unwrap().id, good[4]);
    assert_eq!(ids(&between), good[3..]);
    assert!(logs.contains(&bad.to_string()), "{logs}");
    assert!(logs.contains(&newest_bad.to_string()), "{logs}");
    assert!(logs.contains("73686f7274"), "hex of b\"short\": {logs}");

    // Retention removes them like any other record, oldest first ("short" sorts before all):
    // the newest three are bad (T0+7), good[4] (T0+10) and newest_bad (T0+99).
    drop(store);
    let store = Store::open(dir.path(), &config(3, 64 * 1024)).unwrap();
    assert_eq!(store.history().len(), 3);
    assert_eq!(ids_of(store.history().after(None, 100)), good[4..]);
}

// ------------------------------------------------------------------ captures

fn synth_frame(seed: u64) -> Frame {
    generate(SynthClass::Porosity, seed, &SynthConfig::new(160, 120))
        .unwrap()
        .frame
        .with_time(time_of(T0_MS + seed), seed)
}

/// A frame of noise, which PNG cannot compress: about `w * h * 3` bytes stored.
fn noise_frame(w: u32, h: u32, seed: u32) -> Frame {
    let mut x = seed | 1;
    let rgb = RgbImage::from_fn(w, h, |_, _| {
        // xorshift32 (Marsaglia 2003): fast, deterministic, incompressible enough.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
    });
    Frame::new(rgb, None).unwrap()
}

fn capture_config(max_frames: usize, max_bytes: u64) -> StoreConfig {
    StoreConfig {
        history: HistoryConfig::default(),
        captures: CaptureConfig {
            max_frames,
            max_bytes,
        },
        ..StoreConfig::default()
    }
}

#[test]
fn a_synthetic_capture_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let frame = synth_frame(7);
    let r = result(id_at(T0_MS, 0), 0);
    store.captures().put(&frame, &r).unwrap();

    let back = store.captures().get(r.id).unwrap().unwrap();
    assert_eq!(back.result, r);
    assert_eq!(back.frame.rgb(), frame.rgb(), "RGB pixels");
    let (d0, d1) = (frame.depth().unwrap(), back.frame.depth().unwrap());
    assert_eq!(d1.values, d0.values, "depth values");
    assert_eq!(d1.unit_mm.to_bits(), d0.unit_mm.to_bits(), "depth unit");
    assert_eq!(back.frame.intrinsics, frame.intrinsics);
    assert_eq!((back.frame.ts, back.frame.seq), (frame.ts, frame.seq));
    assert_eq!(back.frame, frame);

    let list = store.captures().list(None, 10).unwrap();
    assert_eq!(list.len(), 1);
    let m = &list[0];
    assert_eq!((m.id, m.ts, m.class.as_str()), (r.id, r.ts, "porosity"));
    assert_eq!((m.width, m.height, m.has_depth), (160, 120, true));
    assert!(m.rgb_png_bytes > 0 && m.depth_png_bytes > 0);
    assert_eq!(m.bytes, store.captures().bytes());
    assert!(m.bytes > m.rgb_png_bytes + m.depth_png_bytes);
    assert_eq!(store.captures().get(id_at(T0_MS, 1)).unwrap(), None);
}

#[test]
fn a_frame_without_depth_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let frame = noise_frame(33, 17, 5).with_time(time_of(T0_MS), 3);
    let r = result(id_at(T0_MS, 0), 0);
    store.captures().put(&frame, &r).unwrap();
    let back = store.captures().get(r.id).unwrap().unwrap();
    assert_eq!(back.frame, frame);
    let m = &store.captures().list(None, 10).unwrap()[0];
    assert_eq!((m.has_depth, m.depth_png_bytes), (false, 0));
}

#[test]
fn captures_are_capped_by_count_oldest_first_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = capture_config(3, 64 * 1024 * 1024);
    let ids: Vec<Uuid> = (0..5).map(|i| id_at(T0_MS + i, 0)).collect();
    let bytes = {
        let store = Store::open(dir.path(), &cfg).unwrap();
        for (i, id) in ids.iter().enumerate() {
            store
                .captures()
                .put(&synth_frame(i as u64), &result(*id, 0))
                .unwrap();
        }
        let c = store.captures();
        assert_eq!(c.len(), 3);
        let listed: Vec<Uuid> = c.list(None, 10).unwrap().iter().map(|m| m.id).collect();
        assert_eq!(listed, ids[2..]);
        assert_eq!(c.get(ids[0]).unwrap(), None);
        let after: Vec<Uuid> = c
            .list(Some(ids[2]), 1)
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(after, ids[3..4]);
        let sum: u64 = c.list(None, 10).unwrap().iter().map(|m| m.bytes).sum();
        assert_eq!(c.bytes(), sum);
        sum
    };
    let store = Store::open(dir.path(), &cfg).unwrap();
    assert_eq!(
        (store.captures().len(), store.captures().bytes()),
        (3, bytes)
    );
    assert_eq!(
        store.captures().get(ids[4]).unwrap().unwrap().frame,
        synth_frame(4)
    );
}

#[test]
fn captures_are_capped_by_bytes_and_one_too_large_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let one_mib = 1024 * 1024;
    let store = Store::open(dir.path(), &capture_config(100, one_mib)).unwrap();
    let c = store.captures();
    // 380x360 noise is ~410 KB of PNG: two fit in 1 MiB, three do not.
    let ids: Vec<Uuid> = (0..4).map(|i| id_at(T0_MS + i, 0)).collect();
    for (i, id) in ids.iter().enumerate() {
        c.put(&noise_frame(380, 360, i as u32), &result(*id, 0))
            .unwrap();
        assert!(c.bytes() <= one_mib);
    }
    let listed = c.list(None, 10).unwrap();
    assert_eq!(listed.iter().map(|m| m.id).collect::<Vec<_>>(), ids[2..]);
    assert!(listed.iter().all(|m| m.bytes > 400_000), "{listed:?}");
    assert_eq!(c.bytes(), listed.iter().map(|m| m.bytes).sum::<u64>());

    // 700x600 noise is ~1.26 MB: more than the whole cap, refused, nothing dropped for it.
    let err = c
        .put(&noise_frame(700, 600, 9), &result(id_at(T0_MS + 9, 0), 0))
        .unwrap_err();
    assert!(
        err.to_string().contains("store.captures.max_bytes"),
        "{err}"
    );
    assert_eq!(c.len(), 2);
}

#[test]
fn a_capture_put_twice_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let r = result(id_at(T0_MS, 0), 0);
    store.captures().put(&synth_frame(1), &r).unwrap();
    store.captures().put(&synth_frame(2), &r).unwrap();
    assert_eq!(store.captures().len(), 1);
    let m = &store.captures().list(None, 10).unwrap()[0];
    assert_eq!(store.captures().bytes(), m.bytes);
    assert_eq!(
        store.captures().get(r.id).unwrap().unwrap().frame,
        synth_frame(2)
    );
}

#[test]
fn corrupt_captures_are_skipped_in_lists_and_an_error_on_get() {
    let dir = tempfile::tempdir().unwrap();
    let good = id_at(T0_MS, 0);
    let broken_frame = id_at(T0_MS + 1, 0);
    let broken_meta = id_at(T0_MS + 2, 0);
    {
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        for id in [good, broken_frame] {
            store
                .captures()
                .put(&synth_frame(1), &result(id, 0))
                .unwrap();
        }
    }
    std::fs::write(
        dir.path()
            .join("captures")
            .join(format!("{broken_frame}.png")),
        b"junk",
    )
    .unwrap();
    poke(dir.path(), "captures", broken_meta.as_bytes(), b"garbage");

    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let c = store.captures();
    assert_eq!(c.len(), 3);
    let (listed, logs) = with_logs(|| c.list(None, 10).unwrap());
    // The broken frame's metadata is intact, so it is listed; the garbage record is not.
    let listed: Vec<Uuid> = listed.iter().map(|m| m.id).collect();
    assert_eq!(listed, [good, broken_frame]);
    assert!(logs.contains(&broken_meta.to_string()), "{logs}");

    for id in [broken_frame, broken_meta] {
        let err = c.get(id).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&id.to_string()), "{err}");
    }
    assert!(c.get(good).unwrap().is_some());
}

#[test]
fn images_left_by_a_crash_before_their_record_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let kept = id_at(T0_MS, 0);
    {
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        store
            .captures()
            .put(&synth_frame(1), &result(kept, 0))
            .unwrap();
    }
    let folder = dir.path().join("captures");
    let orphan = id_at(T0_MS + 5, 0);
    for name in [
        format!("{orphan}.png"),
        format!("{orphan}.depth.png"),
        format!(".{orphan}.png.tmp-4242"),
    ] {
        std::fs::write(folder.join(name), b"half a frame").unwrap();
    }
    std::fs::write(folder.join("notes.txt"), b"someone else's").unwrap();

    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            format!("{kept}.depth.png"),
            format!("{kept}.png"),
            "notes.txt".to_string()
        ]
    );
    assert_eq!(
        store.captures().get(kept).unwrap().unwrap().frame,
        synth_frame(1)
    );
}

// ------------------------------------------------------------------ opening

#[test]
fn a_second_open_of_the_same_dir_says_it_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let err = Store::open(dir.path(), &StoreConfig::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Locked { .. }), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("is another weld-edge running"), "{msg}");
}

#[test]
fn a_dir_that_is_a_file_is_an_open_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file, &StoreConfig::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Open { .. }), "{msg}");
    assert!(msg.contains("not-a-dir"), "{msg}");
}

#[test]
fn invalid_limits_are_all_reported_before_opening() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(0, 10);
    cfg.captures.max_frames = 0;
    let msg = Store::open(dir.path(), &cfg).unwrap_err().to_string();
    for key in [
        "store.history.max_results",
        "store.history.max_bytes",
        "store.captures.max_frames",
    ] {
        assert!(msg.contains(key), "{key} missing: {msg}");
    }
    assert!(!dir.path().join("db").exists(), "nothing written");
}

#[test]
fn a_store_of_another_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), &StoreConfig::default()).unwrap());
    {
        let db = raw_db(dir.path());
        db.insert(b"weld-edge.layout", b"99").unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(dir.path(), &StoreConfig::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Layout { .. }), "{msg}");
    assert!(msg.contains("layout 99"), "{msg}");
}

#[test]
fn opening_clears_only_the_model_stores_own_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    // A bundle put beside the store by hand, where the board's guide puts it.
    let mine = dir.path().join("models/weld-mbv2.bundle");
    std::fs::create_dir_all(mine.parent().unwrap()).unwrap();
    std::fs::write(&mine, b"the configured bundle").unwrap();
    // What a killed install leaves in the model store: an upload and a file without a record.
    let deployed = dir.path().join(weld_edge::store::MODELS_DIR);
    std::fs::create_dir_all(&deployed).unwrap();
    std::fs::write(deployed.join(".upload-0123"), b"half").unwrap();
    std::fs::write(deployed.join("v9.bundle"), b"no record").unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    assert!(store.models().list().unwrap().is_empty());
    assert_eq!(std::fs::read(&mine).unwrap(), b"the configured bundle");
    assert_eq!(std::fs::read_dir(&deployed).unwrap().count(), 0);
}
