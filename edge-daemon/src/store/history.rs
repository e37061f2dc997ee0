//! The results history: every [`Inspection`] the pipeline produced, oldest removed first.
//!
//! Key: the result id's 16 UUIDv7 bytes (time order, see the [store](super) docs). Value: the
//! result JSON of DESIGN.md exactly as `serde_json` writes it, so the HTTP API could serve it as
//! is. Byte total: the sum of the values' lengths.

use std::ops::Bound;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use weld_core::Inspection;

use super::{
    HISTORY_TREE, Limits, StoreError, Totals, capped, decode_or_skip, encode_checked, id_key,
    len64, lock, ms_range, sled_err, trim, unix_ms,
};

/// Smallest accepted `store.history.max_bytes`: 64 KiB holds ~100 typical results (~600 B each)
/// and any single result with many findings; below it retention would thrash.
const MIN_HISTORY_BYTES: u64 = 64 * 1024;

/// Retention of the results history (`[store.history]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Most results kept; the oldest are removed first. At least 1. Default 500000 (about 2.3 h
    /// at 60 results/s, a day at 6/s).
    pub max_results: usize,
    /// Most bytes of result JSON kept (sled's files are larger); the oldest are removed first.
    /// At least 65536. Default 268435456 (256 MiB, about 400000 results).
    pub max_bytes: u64,
}

impl Default for HistoryConfig {
    fn default() -> HistoryConfig {
        HistoryConfig {
            max_results: 500_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl HistoryConfig {
    /// Every invalid value, naming its key (`store.history.max_results`, ...); empty when valid.
    pub fn problems(&self) -> Vec<String> {
        super::limit_problems(
            "history",
            "max_results",
            self.max_results,
            self.max_bytes,
            (MIN_HISTORY_BYTES, "64 KiB"),
        )
    }

    fn limits(&self) -> Limits {
        Limits {
            max_len: len64(self.max_results),
            max_bytes: self.max_bytes,
        }
    }
}

/// Handle to the results history. Clones share the tree and the counters.
#[derive(Debug, Clone)]
pub struct History {
    tree: sled::Tree,
    limits: Limits,
    /// Count and bytes of the tree; the lock also serialises writers so the counters follow the
    /// tree exactly.
    totals: Arc<Mutex<Totals>>,
}

impl History {
    /// Counts the tree with one scan (sizes only, nothing is decoded) and trims it to `config`.
    pub(super) fn open(tree: sled::Tree, config: &HistoryConfig) -> Result<History, StoreError> {
        let mut totals = Totals::default();
        for item in tree.iter() {
            let (_, value) = item.map_err(sled_err("history count on open"))?;
            totals.add(len64(value.len()));
        }
        let history = History {
            tree,
            limits: config.limits(),
            totals: Arc::new(Mutex::new(totals)),
        };
        history.trim_locked(&mut lock(&history.totals))?;
        Ok(history)
    }

    /// Stores a result, replacing one with the same id, then removes the oldest results while
    /// over either limit. Not flushed: see the crash rules in the [store](super) docs.
    ///
    /// Refuses ids that are not UUIDv7, results that would not read back (a NaN written as
    /// `null`), and a result larger than `max_bytes` on its own.
    pub fn insert(&self, result: &Inspection) -> Result<(), StoreError> {
        let key = id_key(result.id)?;
        let value = encode_checked(result.id, result)?;
        let size = len64(value.len());
        if size > self.limits.max_bytes {
            return Err(StoreError::TooLarge {
                what: "result",
                id: result.id,
                bytes: size,
                key: "store.history.max_bytes",
                max_bytes: self.limits.max_bytes,
            });
        }
        let mut totals = lock(&self.totals);
        let old = self
            .tree
            .insert(key, value)
            .map_err(sled_err("history insert"))?;
        if let Some(old) = old {
            totals.sub(len64(old.len()));
        }
        totals.add(size);
        self.trim_locked(&mut totals)
    }

    fn trim_locked(&self, totals: &mut Totals) -> Result<(), StoreError> {
        trim(totals, self.limits, || {
            let popped = self.tree.pop_min().map_err(sled_err("history retention"))?;
            Ok(popped.map(|(_, v)| len64(v.len())))
        })
        .map(|_| ())
    }

    /// Results strictly after `id` (from the oldest when `None`), oldest first, at most
    /// `limit` capped at [`MAX_QUERY_LIMIT`](super::MAX_QUERY_LIMIT). `id` need not be stored.
    /// Records that do not decode are skipped (and warned about), not counted.
    pub fn after(&self, id: Option<Uuid>, limit: usize) -> Result<Vec<Inspection>, StoreError> {
        // Any 16 bytes order correctly against the keys, so `id` needs no UUIDv7 check here.
        let start = match id {
            Some(id) => Bound::Excluded(*id.as_bytes()),
            None => Bound::Unbounded,
        };
        let iter = self.tree.range::<[u8; 16], _>((start, Bound::Unbounded));
        collect(iter, capped(limit))
    }

    /// The newest result that decodes, if any.
    pub fn latest(&self) -> Result<Option<Inspection>, StoreError> {
        for item in self.tree.iter().rev() {
            let (k, v) = item.map_err(sled_err("history read"))?;
            if let Some(r) = decode_or_skip(HISTORY_TREE, &k, &v) {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Results whose id time (when the result was made, to the millisecond) is in
    /// `from..=to`, oldest first, at most `limit` capped at
    /// [`MAX_QUERY_LIMIT`](super::MAX_QUERY_LIMIT). Sub-millisecond parts of `from` and `to`
    /// are ignored; `from > to` gives nothing.
    pub fn between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Inspection>, StoreError> {
        let (from_ms, to_ms) = (unix_ms(from), unix_ms(to));
        // Compared in ms, not as times: `from` 0.6 ms into the millisecond of `to` is no gap.
        if from_ms > to_ms {
            return Ok(Vec::new());
        }
        collect(self.tree.range(ms_range(from_ms, to_ms)), capped(limit))
    }

    /// Number of results stored (including any that no longer decode).
    pub fn len(&self) -> usize {
        usize::try_from(lock(&self.totals).len).unwrap_or(usize::MAX)
    }

    /// True when no result is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of result JSON stored (the quantity `max_bytes` limits).
    pub fn bytes(&self) -> u64 {
        lock(&self.totals).bytes
    }
}

fn collect(
    iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    limit: usize,
) -> Result<Vec<Inspection>, StoreError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    for item in iter {
        let (k, v) = item.map_err(sled_err("history read"))?;
        if let Some(r) = decode_or_skip(HISTORY_TREE, &k, &v) {
            out.push(r);
            if out.len() == limit {
                break;
            }
        }
    }
    Ok(out)
}
