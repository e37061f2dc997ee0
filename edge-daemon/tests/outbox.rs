//! The MQTT outbox through its public API (`Store::outbox`): every operation checked against an
//! in-memory model (proptest), plus the overflow, in-flight ack and range rules of
//! `store/outbox.rs` on fixed sequences.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::collections::VecDeque;
use std::path::Path;

use proptest::prelude::*;
use weld_edge::store::{OutboxConfig, OutboxDepth, Store, StoreConfig, StoreError};

const MIB: u64 = 1024 * 1024;

fn config(max_results: usize, max_bytes: u64) -> StoreConfig {
    StoreConfig {
        outbox: OutboxConfig {
            max_results,
            max_bytes,
        },
        ..StoreConfig::default()
    }
}

fn open(dir: &Path, max_results: usize, max_bytes: u64) -> Store {
    Store::open(dir, &config(max_results, max_bytes)).unwrap()
}

/// `len` bytes that depend on `seed`, so two payloads of one length differ.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8).wrapping_mul(31))
        .collect()
}

/// Everything in the outbox, oldest first.
fn all(store: &Store) -> Vec<(u64, Vec<u8>)> {
    store.outbox().range(0, u64::MAX, usize::MAX).unwrap()
}

fn seqs(entries: &[(u64, Vec<u8>)]) -> Vec<u64> {
    entries.iter().map(|(s, _)| *s).collect()
}

// ------------------------------------------------------------------ the outbox against a model

/// The outbox as `store/outbox.rs` describes it.
#[derive(Debug)]
struct Model {
    /// Entries waiting, oldest (smallest seq) first.
    entries: VecDeque<(u64, Vec<u8>)>,
    /// Entries dropped by the overflow policy since the store was (re)opened, including those
    /// dropped by the trim on open.
    overflowed: u64,
    /// The seq the next push gets.
    next_seq: u64,
    /// What `durable_seq` must say: advanced to the last pushed seq by a flush, and set to the
    /// largest key found on open (before the trim on open).
    durable: u64,
    max_results: usize,
    max_bytes: u64,
    /// Every seq handed out by this test case, acknowledged and dropped ones included.
    handed_out: Vec<u64>,
}

impl Model {
    fn new(max_results: usize, max_bytes: u64) -> Model {
        Model {
            entries: VecDeque::new(),
            overflowed: 0,
            next_seq: 1,
            durable: 0,
            max_results,
            max_bytes,
            handed_out: Vec::new(),
        }
    }

    fn bytes(&self) -> u64 {
        self.entries.iter().map(|(_, p)| p.len() as u64).sum()
    }

    fn push(&mut self, p: Vec<u8>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back((seq, p));
        self.handed_out.push(seq);
        self.trim();
        seq
    }

    fn trim(&mut self) {
        while self.entries.len() > self.max_results || self.bytes() > self.max_bytes {
            self.entries.pop_front();
            self.overflowed += 1;
        }
    }

    fn flush(&mut self) {
        self.durable = self.durable.max(self.next_seq - 1);
    }

    fn ack(&mut self, seq: u64) -> bool {
        match self.entries.iter().position(|(s, _)| *s == seq) {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }

    /// A reopen with these limits: the keys found on open decide the next seq and the durable
    /// mark, then the excess over the (maybe smaller) limits is dropped and counted afresh.
    fn reopen(&mut self, max_results: usize, max_bytes: u64) {
        let last = self.entries.back().map_or(0, |(s, _)| *s);
        self.next_seq = last + 1;
        self.durable = last;
        self.overflowed = 0;
        self.max_results = max_results;
        self.max_bytes = max_bytes;
        self.trim();
    }
}

#[derive(Debug, Clone)]
enum AckOf {
    /// `entries[i % len]`: one that is waiting.
    Waiting(usize),
    /// `handed_out[i % len]`: any seq pushed so far, maybe acknowledged or dropped already.
    Any(usize),
    /// `last_seq + 1 + k`: never pushed.
    Future(u64),
    /// Seq 0, which push never gives.
    Zero,
}

#[derive(Debug, Clone)]
enum Op {
    Push {
        len: usize,
        seed: u8,
    },
    Flush,
    Ack(AckOf),
    /// Flush, drop the store, open it again with the same limits.
    Reopen,
    /// Flush, drop the store, open it again with limits scaled by these fractions (per mille)
    /// of the current ones: never larger, maybe much smaller.
    ReopenSmaller {
        results_pm: u16,
        bytes_pm: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Small payloads: many fit, so the count limit binds.
        5 => (0usize..=200, any::<u8>()).prop_map(|(len, seed)| Op::Push { len, seed }),
        // Large ones: a few fill 1 MiB, so the byte limit binds.
        3 => (1usize..=300_000, any::<u8>()).prop_map(|(len, seed)| Op::Push { len, seed }),
        2 => Just(Op::Flush),
        2 => any::<usize>().prop_map(|i| Op::Ack(AckOf::Waiting(i))),
        1 => any::<usize>().prop_map(|i| Op::Ack(AckOf::Any(i))),
        1 => prop_oneof![(0u64..3).prop_map(AckOf::Future), Just(AckOf::Zero)].prop_map(Op::Ack),
        1 => Just(Op::Reopen),
        1 => (0u16..=1000, 0u16..=1000)
            .prop_map(|(results_pm, bytes_pm)| Op::ReopenSmaller { results_pm, bytes_pm }),
    ]
}

/// 1..=16 results and 1..=2 MiB: with the payloads of [`op`] both limits take turns binding.
fn limits() -> impl Strategy<Value = (usize, u64)> {
    (1usize..=16, MIB..=2 * MIB)
}

/// The part of `max` that `pm` per mille says, at least `min`.
fn scaled(max: u64, pm: u16, min: u64) -> u64 {
    (max * u64::from(pm) / 1000).max(min)
}

fn check_against_model(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    let o = store.outbox();
    let got = all(store);
    let want: Vec<(u64, Vec<u8>)> = model.entries.iter().cloned().collect();
    // Seqs first, then payloads one by one: a failure must not print megabytes.
    prop_assert_eq!(seqs(&got), seqs(&want));
    for ((seq, g), (_, w)) in got.iter().zip(&want) {
        prop_assert!(
            g == w,
            "payload of seq {} differs: {} bytes stored, {} pushed",
            seq,
            g.len(),
            w.len()
        );
    }
    prop_assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "seqs not increasing: {:?}",
        seqs(&got)
    );
    prop_assert_eq!(
        o.depth(),
        OutboxDepth {
            len: model.entries.len() as u64,
            bytes: model.bytes(),
            overflowed: model.overflowed,
        }
    );
    prop_assert!(model.entries.len() <= model.max_results);
    prop_assert!(model.bytes() <= model.max_bytes);
    prop_assert_eq!(o.last_seq(), model.next_seq - 1);
    prop_assert_eq!(o.durable_seq(), model.durable);
    prop_assert!(o.durable_seq() <= o.last_seq());
    // What the publisher sends: exactly the waiting entries at or below the durable mark.
    let sendable = seqs(&o.range(0, o.durable_seq(), usize::MAX).unwrap());
    let want_sendable: Vec<u64> = seqs(&want)
        .into_iter()
        .filter(|&s| s <= model.durable)
        .collect();
    prop_assert_eq!(sendable, want_sendable);
    Ok(())
}

/// Flushes, drops the store and opens it again from `dir`; checks that every flushed entry came
/// back, in order and with its seq.
fn reopen(
    store: Store,
    dir: &Path,
    model: &mut Model,
    max_results: usize,
    max_bytes: u64,
) -> Result<Store, TestCaseError> {
    store.outbox().flush().unwrap();
    model.flush();
    let before = all(&store);
    drop(store);
    let store = open(dir, max_results, max_bytes);
    let after = all(&store);
    // Nothing lost but the oldest ones that the new limits leave no room for.
    prop_assert!(after.len() <= before.len(), "a reopen added entries");
    let dropped = before.len() - after.len();
    prop_assert_eq!(&seqs(&after), &seqs(&before[dropped..]));
    prop_assert!(
        after == before[dropped..],
        "payloads changed across a reopen"
    );
    model.reopen(max_results, max_bytes);
    prop_assert_eq!(dropped as u64, model.overflowed);
    Ok(store)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn outbox_matches_the_model(
        start in limits(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), start.0, start.1);
        let mut model = Model::new(start.0, start.1);
        check_against_model(&store, &model)?;
        for op in ops {
            match op {
                Op::Push { len, seed } => {
                    let p = payload(len, seed);
                    let before = store.outbox().last_seq();
                    let seq = store.outbox().push(&p).unwrap();
                    prop_assert!(seq > before, "push gave {} after last_seq {}", seq, before);
                    prop_assert_eq!(seq, model.push(p));
                }
                Op::Flush => {
                    store.outbox().flush().unwrap();
                    model.flush();
                }
                Op::Ack(of) => {
                    let seq = match of {
                        AckOf::Waiting(i) if !model.entries.is_empty() => {
                            model.entries[i % model.entries.len()].0
                        }
                        AckOf::Any(i) if !model.handed_out.is_empty() => {
                            model.handed_out[i % model.handed_out.len()]
                        }
                        AckOf::Waiting(_) | AckOf::Any(_) | AckOf::Zero => 0,
                        AckOf::Future(k) => model.next_seq + k,
                    };
                    let got = store.outbox().ack(seq).unwrap();
                    prop_assert_eq!(got, model.ack(seq), "ack({})", seq);
                }
                Op::Reopen => {
                    let (r, b) = (model.max_results, model.max_bytes);
                    store = reopen(store, dir.path(), &mut model, r, b)?;
                }
                Op::ReopenSmaller { results_pm, bytes_pm } => {
                    let r = scaled(model.max_results as u64, results_pm, 1) as usize;
                    let b = scaled(model.max_bytes, bytes_pm, MIB);
                    store = reopen(store, dir.path(), &mut model, r, b)?;
                }
            }
            check_against_model(&store, &model)?;
        }
    }
}

// ------------------------------------------------------------------ fixed sequences

#[test]
fn overflow_drops_the_oldest_entries_and_counts_them() {
    // The count limit.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 3, MIB);
    let o = store.outbox();
    for i in 1..=5u8 {
        assert_eq!(o.push(&[i]).unwrap(), u64::from(i));
    }
    assert_eq!(
        all(&store),
        vec![(3, vec![3]), (4, vec![4]), (5, vec![5])],
        "the newest three stay"
    );
    assert_eq!(
        o.depth(),
        OutboxDepth {
            len: 3,
            bytes: 3,
            overflowed: 2
        }
    );
    drop(store);

    // The byte limit: 3 x 400 KB is over 1 MiB, so the first leaves; a 1 MiB payload alone
    // fills the outbox, so every older one leaves.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100, MIB);
    let o = store.outbox();
    let (a, b, c) = (
        payload(400_000, 1),
        payload(400_000, 2),
        payload(400_000, 3),
    );
    o.push(&a).unwrap();
    o.push(&b).unwrap();
    assert_eq!(o.depth().overflowed, 0);
    o.push(&c).unwrap();
    assert_eq!(all(&store), vec![(2, b), (3, c)]);
    assert_eq!(
        o.depth(),
        OutboxDepth {
            len: 2,
            bytes: 800_000,
            overflowed: 1
        }
    );
    let full = payload(MIB as usize, 4);
    assert_eq!(o.push(&full).unwrap(), 4);
    assert_eq!(all(&store), vec![(4, full)]);
    assert_eq!(
        o.depth(),
        OutboxDepth {
            len: 1,
            bytes: MIB,
            overflowed: 3
        }
    );
    // Larger than the whole outbox: refused, and nothing is dropped for it.
    let err = o.push(&payload(MIB as usize + 1, 5)).unwrap_err();
    assert!(matches!(err, StoreError::TooLargeForOutbox { .. }), "{err}");
    assert_eq!(seqs(&all(&store)), vec![4]);
    assert_eq!(o.depth().overflowed, 3);
    assert_eq!(o.last_seq(), 4, "a refused push takes no seq");
}

#[test]
fn an_ack_of_an_entry_dropped_in_flight_returns_false_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2, MIB);
    let o = store.outbox();
    o.push(b"one").unwrap();
    o.push(b"two").unwrap();
    o.flush().unwrap();
    // The publisher sends both: they are in flight.
    let in_flight = seqs(&o.range(0, o.durable_seq(), 10).unwrap());
    assert_eq!(in_flight, vec![1, 2]);
    // Before the PUBACKs come, a third result pushes the first out.
    o.push(b"three").unwrap();
    let depth = o.depth();
    assert_eq!(
        depth,
        OutboxDepth {
            len: 2,
            bytes: 8,
            overflowed: 1
        }
    );
    assert!(!o.ack(1).unwrap(), "seq 1 was dropped, not acknowledged");
    assert_eq!(o.depth(), depth);
    assert_eq!(
        all(&store),
        vec![(2, b"two".to_vec()), (3, b"three".to_vec())]
    );
    // The other in-flight one is still there; acknowledging it twice is false the second time.
    assert!(o.ack(2).unwrap());
    assert!(!o.ack(2).unwrap());
    assert_eq!(all(&store), vec![(3, b"three".to_vec())]);
    assert_eq!(
        o.depth(),
        OutboxDepth {
            len: 1,
            bytes: 5,
            overflowed: 1
        }
    );
}

#[test]
fn range_respects_after_upto_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100, MIB);
    let o = store.outbox();
    for i in 1..=10u8 {
        o.push(&[i; 3]).unwrap();
    }
    assert!(o.ack(4).unwrap());
    let r = |after, upto, limit| seqs(&o.range(after, upto, limit).unwrap());
    // after is exclusive, upto inclusive, acknowledged ones are skipped.
    assert_eq!(r(2, 7, 100), vec![3, 5, 6, 7]);
    assert_eq!(r(2, 7, 2), vec![3, 5]);
    assert_eq!(r(3, 5, 100), vec![5]);
    assert_eq!(r(0, 1, 100), vec![1]);
    assert_eq!(r(9, u64::MAX, 100), vec![10]);
    assert_eq!(r(0, u64::MAX, 0), Vec::<u64>::new());
    // Empty and inverted windows.
    assert_eq!(r(7, 7, 100), Vec::<u64>::new());
    assert_eq!(r(8, 3, 100), Vec::<u64>::new());
    assert_eq!(r(0, 0, 100), Vec::<u64>::new());
    assert_eq!(r(10, u64::MAX, 100), Vec::<u64>::new());
    assert_eq!(r(u64::MAX - 1, u64::MAX, 100), Vec::<u64>::new());
    // The payloads come with their seqs, oldest first.
    assert_eq!(
        o.range(4, 6, 100).unwrap(),
        vec![(5, vec![5; 3]), (6, vec![6; 3])]
    );
    // Nothing above durable_seq until a flush.
    assert_eq!(o.durable_seq(), 0);
    assert_eq!(r(0, o.durable_seq(), 100), Vec::<u64>::new());
    o.flush().unwrap();
    assert_eq!(o.durable_seq(), 10);
    assert_eq!(r(0, o.durable_seq(), 100).len(), 9);
}
