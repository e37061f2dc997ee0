//! The MQTT outbox: results waiting for the broker's acknowledgement, oldest first.
//!
//! Key: a `u64` sequence number, big-endian, given by [`Outbox::push`] and one above the largest
//! key found on open, so sled's key order is the order results were pushed, whatever the wall
//! clock did (boards without a real-time clock start in 1970 until NTP answers). Value: the
//! payload exactly as it is published (the result JSON of DESIGN.md). The topic is not stored:
//! it is built when the message is sent, so a changed topic prefix applies to the backlog too.
//!
//! # Acknowledge and crash rules
//!
//! - **Written before sent.** [`Outbox::push`] inserts without waiting for the disk;
//!   [`Outbox::flush`] makes every pushed entry durable and advances [`Outbox::durable_seq`].
//!   The publisher sends only entries at or below `durable_seq`, so one `fsync` covers every
//!   result pushed since the last one (group commit: thousands per second cost one flush
//!   each batch, not one each).
//! - **Removed when acknowledged.** An entry leaves only by [`Outbox::ack`] (the broker's PUBACK
//!   for it) or by the overflow policy below. Removals are not flushed: a crash that loses one
//!   sends the entry again, a duplicate with the same result `id`, never a loss.
//! - **What a crash can lose.** Entries pushed after the last flush were never sent to anyone.
//!   The MQTT sink is the first sink, so in sled's single log an entry precedes its result's
//!   history record; sled recovers a prefix of its log, so a result found in the history after a
//!   restart was also in the outbox (or had been acknowledged).
//! - **After a restart** the entries are sent again from the oldest key: in order, and at
//!   least once.
//! - **Overflow:** the outbox holds at most `max_results` entries and `max_bytes` of payload.
//!   When a push goes past either, the *oldest* entries are dropped and counted
//!   ([`OutboxDepth::overflowed`], logged): on a line whose broker has been gone for long,
//!   the freshest results are worth most, and the dropped ones stay in the results history,
//!   which keeps far more (`GET /api/v1/results?after=ID`).

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{Limits, StoreError, Totals, len64, sled_err, trim};

/// Smallest accepted `store.outbox.max_bytes`: 1 MiB holds ~1500 typical results and any single
/// result with many findings.
const MIN_OUTBOX_BYTES: u64 = 1024 * 1024;

/// Bounds of the MQTT outbox (`[store.outbox]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// Most results waiting for the broker; past it the oldest are dropped (and counted).
    /// At least 1. Default 200000 (55 min at 60 results/s).
    pub max_results: usize,
    /// Most bytes of waiting payload; past it the oldest are dropped. At least 1048576.
    /// Default 134217728 (128 MiB, about 200000 results).
    pub max_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> OutboxConfig {
        OutboxConfig {
            max_results: 200_000,
            max_bytes: 128 * 1024 * 1024,
        }
    }
}

impl OutboxConfig {
    /// Every invalid value, naming its key (`store.outbox.max_results`, ...); empty when valid.
    pub fn problems(&self) -> Vec<String> {
        super::limit_problems(
            "outbox",
            "max_results",
            self.max_results,
            self.max_bytes,
            (MIN_OUTBOX_BYTES, "1 MiB"),
        )
    }

    fn limits(&self) -> Limits {
        Limits {
            max_len: len64(self.max_results),
            max_bytes: self.max_bytes,
        }
    }
}

/// How full the outbox is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxDepth {
    /// Entries waiting.
    pub len: u64,
    /// Payload bytes waiting.
    pub bytes: u64,
    /// Entries dropped by the overflow policy since the daemon started.
    pub overflowed: u64,
}

/// Counters and the next key, under one lock that also serialises writers.
#[derive(Debug)]
struct State {
    totals: Totals,
    next_seq: u64,
}

/// Handle to the outbox. Clones share the tree, the counters and the durable mark.
#[derive(Debug, Clone)]
pub struct Outbox {
    tree: sled::Tree,
    limits: Limits,
    state: Arc<Mutex<State>>,
    /// Largest sequence number known to be on disk (0: none).
    durable: Arc<AtomicU64>,
    overflowed: Arc<AtomicU64>,
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn key_seq(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

impl Outbox {
    /// Counts the tree (sizes only), finds the next sequence number and trims to `config`.
    /// Everything found on open is on disk, so it is all durable.
    pub(super) fn open(tree: sled::Tree, config: &OutboxConfig) -> Result<Outbox, StoreError> {
        let mut totals = Totals::default();
        for item in tree.iter() {
            let (key, value) = item.map_err(sled_err("outbox count on open"))?;
            if key_seq(&key).is_none() {
                tracing::warn!(key = ?key, "removing an outbox entry whose key is not 8 bytes");
                tree.remove(&key)
                    .map_err(sled_err("outbox cleanup on open"))?;
                continue;
            }
            totals.add(len64(value.len()));
        }
        let last = tree
            .last()
            .map_err(sled_err("outbox last key"))?
            .and_then(|(k, _)| key_seq(&k))
            .unwrap_or(0);
        let outbox = Outbox {
            tree,
            limits: config.limits(),
            state: Arc::new(Mutex::new(State {
                totals,
                next_seq: last + 1,
            })),
            durable: Arc::new(AtomicU64::new(last)),
            overflowed: Arc::new(AtomicU64::new(0)),
        };
        outbox.trim_locked(&mut lock_state(&outbox.state))?;
        Ok(outbox)
    }

    /// Appends `payload`; returns its sequence number. Not durable until [`Outbox::flush`].
    /// When the outbox is over its limits afterwards, the oldest entries are dropped.
    pub fn push(&self, payload: &[u8]) -> Result<u64, StoreError> {
        let bytes = len64(payload.len());
        if bytes > self.limits.max_bytes {
            return Err(StoreError::TooLargeForOutbox {
                bytes,
                max_bytes: self.limits.max_bytes,
            });
        }
        let mut state = lock_state(&self.state);
        let seq = state.next_seq;
        self.tree
            .insert(seq_key(seq), payload)
            .map_err(sled_err("outbox push"))?;
        state.next_seq += 1;
        state.totals.add(bytes);
        self.trim_locked(&mut state)?;
        Ok(seq)
    }

    fn trim_locked(&self, state: &mut State) -> Result<(), StoreError> {
        let tree = &self.tree;
        let dropped = trim(&mut state.totals, self.limits, || {
            Ok(tree
                .pop_min()
                .map_err(sled_err("outbox overflow"))?
                .map(|(_, v)| len64(v.len())))
        })?;
        if dropped > 0 {
            let total = self.overflowed.fetch_add(dropped, Ordering::Relaxed) + dropped;
            tracing::warn!(
                dropped,
                total,
                "the MQTT outbox is full: the oldest unsent results were dropped (they stay in \
                 the history)"
            );
        }
        Ok(())
    }

    /// Writes every pushed entry to disk and waits for it; afterwards [`Outbox::durable_seq`]
    /// covers them. One call covers any number of pushes (group commit).
    pub fn flush(&self) -> Result<(), StoreError> {
        // Entries pushed after this read may or may not be covered; only claim those before.
        let upto = lock_state(&self.state).next_seq - 1;
        self.tree.flush().map_err(sled_err("outbox flush"))?;
        self.durable.fetch_max(upto, Ordering::Release);
        Ok(())
    }

    /// Largest sequence number that is on disk.
    pub fn durable_seq(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Largest sequence number pushed so far (0: none).
    pub fn last_seq(&self) -> u64 {
        lock_state(&self.state).next_seq - 1
    }

    /// Removes an acknowledged entry; `false` when it was already gone (acknowledged twice, or
    /// dropped by the overflow policy while in flight).
    pub fn ack(&self, seq: u64) -> Result<bool, StoreError> {
        let mut state = lock_state(&self.state);
        match self
            .tree
            .remove(seq_key(seq))
            .map_err(sled_err("outbox ack"))?
        {
            Some(v) => {
                state.totals.sub(len64(v.len()));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Up to `limit` entries with a sequence number above `after` and at most `upto`, oldest
    /// first.
    pub fn range(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let range = (
            Bound::Excluded(seq_key(after)),
            Bound::Included(seq_key(upto)),
        );
        for item in self.tree.range(range).take(limit) {
            let (k, v) = item.map_err(sled_err("outbox read"))?;
            if let Some(seq) = key_seq(&k) {
                out.push((seq, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Entries, bytes and the overflow count.
    pub fn depth(&self) -> OutboxDepth {
        let t = lock_state(&self.state).totals;
        OutboxDepth {
            len: t.len,
            bytes: t.bytes,
            overflowed: self.overflowed.load(Ordering::Relaxed),
        }
    }
}

fn lock_state(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, db)
    }

    #[test]
    fn keys_sort_in_push_order() {
        assert!(seq_key(255) < seq_key(256));
        assert_eq!(key_seq(&seq_key(77)), Some(77));
        assert_eq!(key_seq(b"short"), None);
    }

    #[test]
    fn only_flushed_entries_are_durable() {
        let (_d, db) = tree();
        let o = Outbox::open(db.open_tree("o").unwrap(), &OutboxConfig::default()).unwrap();
        assert_eq!(o.push(b"a").unwrap(), 1);
        assert_eq!(o.push(b"b").unwrap(), 2);
        assert_eq!(o.durable_seq(), 0);
        o.flush().unwrap();
        assert_eq!(o.durable_seq(), 2);
        assert_eq!(o.range(0, o.durable_seq(), 10).unwrap().len(), 2);
        assert_eq!(o.range(1, 2, 10).unwrap(), vec![(2, b"b".to_vec())]);
    }

    #[test]
    fn a_payload_larger_than_the_outbox_is_refused() {
        let (_d, db) = tree();
        let cfg = OutboxConfig {
            max_results: 10,
            max_bytes: MIN_OUTBOX_BYTES,
        };
        let o = Outbox::open(db.open_tree("o").unwrap(), &cfg).unwrap();
        let big = vec![b'x'; MIN_OUTBOX_BYTES as usize + 1];
        let err = o.push(&big).unwrap_err().to_string();
        assert!(err.contains("store.outbox.max_bytes"), "{err}");
        assert_eq!(o.depth(), OutboxDepth::default());
    }
}
