//! The daemon's sled store: the results history, the captured uncertain frames, the MQTT
//! outbox and the installed models, in one sled database that [`Store::open`] owns; each part
//! gets its own typed handle ([`Store::history`], [`Store::captures`], [`Store::outbox`],
//! [`Store::models`]).
//!
//! # Trees and record layouts
//!
//! Every history and capture record is keyed by its inspection id, a UUIDv7, as its 16 bytes in big-endian order
//! (`Uuid::as_bytes`). UUIDv7 starts with the 48-bit Unix time in milliseconds, big-endian, so
//! sled's byte order of keys is time order, and a time range is a key range:
//!
//! ```text
//! key:  | unix_ms: u48 BE (bytes 0..6) | version 7, counter / random (bytes 6..16) |
//! ```
//!
//! | tree | value |
//! | --- | --- |
//! | `history` | the result JSON of DESIGN.md (`serde_json` of [`weld_core::Inspection`]), as is |
//! | `captures` | JSON metadata: the result, the frame's time, sequence, size, depth unit and intrinsics, and the PNG sizes (layout in `store/captures.rs`) |
//! | `outbox` | key: a `u64` push sequence number, big-endian; value: the MQTT payload (rules in `store/outbox.rs`) |
//! | `models` | key: a bundle's version; value: its [`InstalledModel`] JSON (rules in `store/models.rs`) |
//! | default tree | `weld-edge.layout` = [`LAYOUT_VERSION`] as ASCII, checked on open; `weld-edge.active-model` = the [`Activation`] JSON |
//!
//! The captured images are files beside the database, not sled values:
//! `DIR/captures/ID.png` (8-bit RGB) and `DIR/captures/ID.depth.png` (16-bit depth), the
//! dataset format of DESIGN.md, so a folder of captures is the `unlabeled/` of a dataset as it
//! stands. Kept in sled, megabyte values stayed in its page cache and log buffers: resident
//! memory grew by ~10 MB/s with 15 captures per second (`weld-edge bench`).
//!
//! Ids that are not UUIDv7 are refused: their bytes are not in time order.
//!
//! # Retention
//!
//! History, captures and the outbox are each capped by a record count and a byte total (the sum of the
//! stored values' lengths; keys and sled's own overhead are not counted, and sled's files on disk
//! are larger, as its log keeps old versions until it reclaims a segment). After every insert the
//! oldest records (smallest keys) are removed until both limits hold; a record older than all
//! kept ones may therefore leave at once. The count and the byte total are kept in memory, so
//! retention costs O(records removed), not a scan per insert. They are not stored:
//! [`Store::open`] recounts them by reading each tree once (O(n), sizes only, nothing decoded:
//! 20000 results took 53 ms on a desktop; expect seconds for the default 256 MiB on an eMMC),
//! which also makes them right after a crash by construction. If the limits in the config shrank
//! since the last run, the excess is removed on open.
//!
//! Writers are serialised per tree by the lock around the counters; readers take no lock.
//! Queries are not snapshots (sled's iterators are not): one that races inserts returns, in key
//! order, records that each existed at some moment during it.
//!
//! # Crash rules
//!
//! - Nothing here flushes per write. sled writes its log to disk in the background every
//!   [`FLUSH_EVERY_MS`] ms, so a crash or power cut loses at most the history and captures of the
//!   last ~0.5 s. That is acceptable for history (the MQTT outbox is the record of delivery) and
//!   for captures, but NOT for the outbox, whose entries are sent only once [`Outbox::flush`]
//!   has put them on disk.
//! - sled recovers each write whole or not at all. A capture's image files are written first
//!   (each to a temporary name, then renamed) and its record after; retention removes the
//!   record first and the files after. A crash in between leaves files without a record, which
//!   [`Store::open`] deletes, never a record without its files.
//! - The counters are never stored, so there is nothing to disagree with the trees after a crash.
//! - A clean shutdown calls [`Store::flush`]; dropping the last handle also flushes (sled's
//!   `Drop for TreeInner`), but a shutdown should not rely on drop order.
//! - A record that fails to decode (disk corruption, a foreign writer) is skipped with a
//!   `tracing::warn!` naming its tree and key; it still counts towards the limits and leaves with
//!   retention like any other.

mod captures;
mod history;
mod models;
mod outbox;

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

pub use captures::{Capture, CaptureConfig, CaptureMeta, Captures};
pub use history::{History, HistoryConfig};
pub use models::{Activation, InstalledModel, MODELS_DIR, MODELS_TREE, Models, check_version};
pub use outbox::{Outbox, OutboxConfig, OutboxDepth};

/// Version of the record layouts above; bumped when an old daemon could not read new records.
pub const LAYOUT_VERSION: u32 = 1;

/// Most records one query returns; larger limits are capped to this so one HTTP request cannot
/// make the daemon decode the whole history (1000 results are ~0.6 MB of JSON).
pub const MAX_QUERY_LIMIT: usize = 1000;

/// sled's background flush interval in ms (its default, written down because the crash rules
/// depend on it).
pub const FLUSH_EVERY_MS: u64 = 500;

/// Tree name of the results history.
pub const HISTORY_TREE: &str = "history";
/// Tree name of the capture metadata.
pub const CAPTURES_TREE: &str = "captures";
/// Folder of the captured images inside the data directory.
pub const CAPTURES_DIR: &str = "captures";
/// Tree name of the MQTT outbox.
pub const OUTBOX_TREE: &str = "outbox";

/// sled's page cache by default, in bytes (`[store] cache_mib`). sled's own default is 1 GiB,
/// too much for an edge board with a few GB of RAM, and the whole daemon aims at 80 MB
/// resident. sled counts the bytes of the records it holds, and every record written stays in
/// its cache until the cache is full, so this is memory the daemon grows into over its first
/// minutes: at 16 MiB the hybrid bench peaked at 100.7 MB after 240 s, at 4 MiB at 83.6 MB
/// (docs/PERFORMANCE.md, "Memory"). 4 MiB still holds the newest ~6000 results, the ones the
/// API and the dashboard read back; older ones come from disk.
pub const DEFAULT_CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Accepted cache sizes (`store.cache_mib` 1..=1024).
const CACHE_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024 * 1024..=1024 * 1024 * 1024;

/// Key in the default tree that records [`LAYOUT_VERSION`].
const LAYOUT_KEY: &[u8] = b"weld-edge.layout";

/// Limits of the whole store: sled's cache, `[store.history]`, `[store.captures]` and
/// `[store.outbox]` in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// sled's page cache in bytes (`store.cache_mib` in the config).
    pub cache_bytes: u64,
    /// Results history retention.
    pub history: HistoryConfig,
    /// Captured (uncertain) frames retention.
    pub captures: CaptureConfig,
    /// Bounds of the MQTT outbox.
    pub outbox: OutboxConfig,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            cache_bytes: DEFAULT_CACHE_BYTES,
            history: HistoryConfig::default(),
            captures: CaptureConfig::default(),
            outbox: OutboxConfig::default(),
        }
    }
}

impl StoreConfig {
    /// Every invalid value, each naming its key (`store.history.max_results`, ...); empty when
    /// valid.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mib = |b: u64| b / (1024 * 1024);
        if !CACHE_BYTES_RANGE.contains(&self.cache_bytes) {
            out.push(format!(
                "store.cache_mib = {}: must be {}..={}",
                mib(self.cache_bytes),
                mib(*CACHE_BYTES_RANGE.start()),
                mib(*CACHE_BYTES_RANGE.end())
            ));
        }
        out.extend(self.history.problems());
        out.extend(self.captures.problems());
        out.extend(self.outbox.problems());
        out
    }
}

/// What can go wrong in the store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The config has invalid values; every problem names its key.
    #[error("invalid store configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The database is held by another process (or another handle in this one).
    #[error(
        "{}: the store is locked; is another weld-edge running with the same data dir?",
        dir.display()
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// sled could not open the database.
    #[error("{}: cannot open the store: {source}", dir.display())]
    Open {
        /// The data directory.
        dir: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// The database was written with another record layout.
    #[error(
        "{}: the store has record layout {found}, this weld-edge reads layout {LAYOUT_VERSION}; \
         use a matching weld-edge or another data dir",
        dir.display()
    )]
    Layout {
        /// The data directory.
        dir: PathBuf,
        /// The layout found on disk.
        found: String,
    },
    /// A read or write of the database failed.
    #[error("store: {op}: {source}")]
    Sled {
        /// What the store was doing (`"history insert"`, ...).
        op: &'static str,
        /// sled's error.
        source: sled::Error,
    },
    /// The id is not a UUIDv7, so its bytes would not sort in time order.
    #[error(
        "result id {id} is not a UUIDv7 (version {version}); the store orders by the time in the id"
    )]
    NotTimeOrdered {
        /// The id.
        id: Uuid,
        /// Its UUID version number.
        version: usize,
    },
    /// One record alone is bigger than the byte limit, so keeping it would empty the tree.
    #[error("{what} {id} is {bytes} bytes, more than {key} = {max_bytes}")]
    TooLarge {
        /// `"result"` or `"capture"`.
        what: &'static str,
        /// The record's id.
        id: Uuid,
        /// Its size in bytes.
        bytes: u64,
        /// The config key of the limit.
        key: &'static str,
        /// The limit in bytes.
        max_bytes: u64,
    },
    /// One payload alone is bigger than the outbox may hold.
    #[error("an MQTT message of {bytes} bytes is more than store.outbox.max_bytes = {max_bytes}")]
    TooLargeForOutbox {
        /// The payload's size.
        bytes: u64,
        /// The limit in bytes.
        max_bytes: u64,
    },
    /// The result would not read back (JSON writes a NaN or infinite number as `null`), so it is
    /// refused rather than stored unreadable.
    #[error("result {id} cannot be stored: it would not read back: {reason}")]
    NotStorable {
        /// The result's id.
        id: Uuid,
        /// Why it does not round-trip.
        reason: String,
    },
    /// A capture's image file could not be written, read or removed.
    #[error("capture file {}: {source}", path.display())]
    CaptureFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An installed model's bundle file could not be written, moved or removed.
    #[error("model file {}: {source}", path.display())]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A frame could not be encoded as PNG.
    #[error("capture {id}: cannot encode the frame as PNG: {source}")]
    Png {
        /// The capture's id.
        id: Uuid,
        /// The encoder's error.
        source: image::ImageError,
    },
    /// A record asked for by id does not decode.
    #[error("store: {tree} record {key} is corrupt: {reason}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// The key as a UUID, or hex when it is not 16 bytes.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The daemon's database: one sled `Db` and typed handles to its trees. Cloning is cheap and
/// clones share the database and the retention counters, so a clone can move to another thread.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    dir: PathBuf,
    history: History,
    captures: Captures,
    outbox: Outbox,
    models: Models,
}

impl Store {
    /// Opens (or creates) the store in `dir`, recounts each tree and applies the retention limits
    /// of `config` (removing the oldest records if the limits shrank).
    ///
    /// Errors name `dir` and the cause; a directory held by another process is
    /// [`StoreError::Locked`].
    pub fn open(dir: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StoreError::Config(problems));
        }
        let open_err = |source: sled::Error| open_error(dir, source);
        let sled_config = sled::Config::new()
            .path(dir)
            .cache_capacity(config.cache_bytes)
            .flush_every_ms(Some(FLUSH_EVERY_MS));
        // sled makes its metrics on the first open; see `malloc::with_large_blocks_mapped`.
        let db = crate::malloc::with_large_blocks_mapped(|| {
            open_waiting_for_lock(|| sled_config.open().map_err(open_err))
        })?;
        check_layout(&db, dir)?;
        let history = History::open(
            db.open_tree(HISTORY_TREE).map_err(open_err)?,
            &config.history,
        )?;
        let captures = Captures::open(
            db.open_tree(CAPTURES_TREE).map_err(open_err)?,
            &dir.join(CAPTURES_DIR),
            &config.captures,
        )?;
        let outbox = Outbox::open(db.open_tree(OUTBOX_TREE).map_err(open_err)?, &config.outbox)?;
        let models = Models::open(
            &db,
            db.open_tree(MODELS_TREE).map_err(open_err)?,
            &dir.join(MODELS_DIR),
        )?;
        Ok(Store {
            db,
            dir: dir.to_path_buf(),
            history,
            captures,
            outbox,
            models,
        })
    }

    /// The results history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The captured frames.
    pub fn captures(&self) -> &Captures {
        &self.captures
    }

    /// The MQTT outbox.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The installed model bundles and which one runs.
    pub fn models(&self) -> &Models {
        &self.models
    }

    /// The data directory this store was opened in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes everything to disk and waits for it (for shutdown, and for the outbox's
    /// durability). Returns the number of bytes flushed.
    pub fn flush(&self) -> Result<usize, StoreError> {
        self.db.flush().map_err(|source| StoreError::Sled {
            op: "flush",
            source,
        })
    }
}

/// How long [`Store::open`] waits for sled's lock, and how often it tries. sled releases the lock
/// on its `db` file from a background thread a moment after the last handle is dropped (sled
/// issues #1234 and #1289: "do not rapidly open and close"), so an immediate reopen in the same
/// process, or a restart right after the old process exited, can find it still held. A daemon
/// that really holds the directory holds it for its whole life, far longer than this.
const LOCK_WAIT: Duration = Duration::from_secs(1);
const LOCK_RETRY_EVERY: Duration = Duration::from_millis(20);

/// Runs `open` until it returns anything but [`StoreError::Locked`], for at most [`LOCK_WAIT`].
fn open_waiting_for_lock<T>(
    mut open: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match open() {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(LOCK_RETRY_EVERY);
            }
            other => return other,
        }
    }
}

/// Maps sled's open error, recognising the lock sled takes on its `db` file: sled reports a
/// failed `try_lock_exclusive` as an `io::Error` of kind `Other` whose text says
/// "could not acquire lock" (sled 0.34 `config.rs`), and has no error kind of its own for it.
fn open_error(dir: &Path, source: sled::Error) -> StoreError {
    match &source {
        sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
            StoreError::Locked {
                dir: dir.to_path_buf(),
            }
        }
        _ => StoreError::Open {
            dir: dir.to_path_buf(),
            source,
        },
    }
}

/// Writes [`LAYOUT_VERSION`] into a new database and refuses one written with another layout.
fn check_layout(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    let open_err = |source: sled::Error| open_error(dir, source);
    let want = LAYOUT_VERSION.to_string();
    match db.get(LAYOUT_KEY).map_err(open_err)? {
        Some(found) if found.as_ref() == want.as_bytes() => Ok(()),
        Some(found) => Err(StoreError::Layout {
            dir: dir.to_path_buf(),
            found: String::from_utf8_lossy(&found).into_owned(),
        }),
        None => {
            db.insert(LAYOUT_KEY, want.as_bytes()).map_err(open_err)?;
            Ok(())
        }
    }
}

// ------------------------------------------------------------------ keys

/// Largest value of UUIDv7's 48-bit millisecond field.
const MAX_UNIX_MS: u64 = (1 << 48) - 1;

/// The key of a record: the id's 16 bytes, refused unless the id is a UUIDv7.
fn id_key(id: Uuid) -> Result<[u8; 16], StoreError> {
    // Version 7 is "Unix Epoch time-based" (RFC 9562 section 5.7).
    const UUID_V7: usize = 7;
    match id.get_version_num() {
        UUID_V7 => Ok(*id.as_bytes()),
        version => Err(StoreError::NotTimeOrdered { id, version }),
    }
}

/// The key range of every id whose millisecond field is in `from_ms..=to_ms`.
fn ms_range(from_ms: u64, to_ms: u64) -> (Bound<[u8; 16]>, Bound<[u8; 16]>) {
    let key = |ms: u64, fill: u8| {
        let mut k = [fill; 16];
        // The low 6 bytes of the big-endian u64 are the 48-bit field.
        k[..6].copy_from_slice(&ms.min(MAX_UNIX_MS).to_be_bytes()[2..]);
        k
    };
    (
        Bound::Included(key(from_ms, 0x00)),
        Bound::Included(key(to_ms, 0xFF)),
    )
}

/// Milliseconds since the Unix epoch clamped to UUIDv7's range (times before 1970 become 0).
fn unix_ms(t: chrono::DateTime<chrono::Utc>) -> u64 {
    u64::try_from(t.timestamp_millis()).map_or(0, |ms| ms.min(MAX_UNIX_MS))
}

/// A key for messages: the UUID when it is 16 bytes, hex otherwise.
fn show_key(key: &[u8]) -> String {
    match Uuid::from_slice(key) {
        Ok(id) => id.to_string(),
        Err(_) => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// Decodes a JSON record, or warns naming the tree and key and returns `None`: one bad record
/// must not make the history unreadable.
fn decode_or_skip<T: DeserializeOwned>(tree: &'static str, key: &[u8], value: &[u8]) -> Option<T> {
    if key.len() != 16 {
        tracing::warn!(tree, key = %show_key(key), "skipping a record whose key is not 16 bytes");
        return None;
    }
    match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(tree, key = %show_key(key), error = %e, "skipping a record that does not decode");
            None
        }
    }
}

/// Maps a sled error, saying what the store was doing.
fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Sled { op, source }
}

/// The JSON of a record, refused when it would not decode again: serde_json writes NaN and
/// infinities as `null`, which does not read back as a number, and a record stored unreadable
/// would be lost silently. Decoding a ~1 KB result costs a few µs, nothing at 60 results/s.
fn encode_checked<T: Serialize + DeserializeOwned>(
    id: Uuid,
    record: &T,
) -> Result<Vec<u8>, StoreError> {
    let not_storable = |e: serde_json::Error| StoreError::NotStorable {
        id,
        reason: e.to_string(),
    };
    let value = serde_json::to_vec(record).map_err(not_storable)?;
    serde_json::from_slice::<T>(&value).map_err(not_storable)?;
    Ok(value)
}

/// The query limit actually used: at most [`MAX_QUERY_LIMIT`].
fn capped(limit: usize) -> usize {
    limit.min(MAX_QUERY_LIMIT)
}

// ------------------------------------------------------------------ retention

/// Record count and byte total of one tree, kept in memory beside it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    len: u64,
    bytes: u64,
}

/// The problems with a tree's retention limits: `[store.TREE] COUNT_KEY` at least 1 and
/// `max_bytes` at least `min_bytes` (`min_label` says it for people, e.g. "1 MiB").
fn limit_problems(
    tree: &str,
    count_key: &str,
    count: usize,
    max_bytes: u64,
    (min_bytes, min_label): (u64, &str),
) -> Vec<String> {
    let mut out = Vec::new();
    if count == 0 {
        out.push(format!(
            "store.{tree}.{count_key} must be at least 1, got 0"
        ));
    }
    if max_bytes < min_bytes {
        out.push(format!(
            "store.{tree}.max_bytes must be at least {min_bytes} ({min_label}), got {max_bytes}"
        ));
    }
    out
}

/// The limits one tree is kept within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    max_len: u64,
    max_bytes: u64,
}

impl Totals {
    fn over(&self, limits: Limits) -> bool {
        self.len > limits.max_len || self.bytes > limits.max_bytes
    }

    fn add(&mut self, bytes: u64) {
        self.len += 1;
        self.bytes += bytes;
    }

    /// Saturating: a count that drifted (a corrupt record whose size was guessed) must not wrap.
    fn sub(&mut self, bytes: u64) {
        self.len = self.len.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// Removes the oldest records until `totals` is within `limits`. `pop_oldest` removes the oldest
/// record and returns its size, or `None` when the tree is empty. Returns how many were removed.
fn trim(
    totals: &mut Totals,
    limits: Limits,
    mut pop_oldest: impl FnMut() -> Result<Option<u64>, StoreError>,
) -> Result<u64, StoreError> {
    let mut removed = 0;
    while totals.over(limits) {
        match pop_oldest()? {
            Some(bytes) => {
                totals.sub(bytes);
                removed += 1;
            }
            None => {
                // The tree is empty, so the counters drifted; empty is the truth.
                tracing::warn!(?totals, "store counters were above an empty tree; reset");
                *totals = Totals::default();
            }
        }
    }
    Ok(removed)
}

/// Locks the counters. A poisoned lock only means another thread panicked between two counter
/// updates; the counters are still the best estimate and are recounted on the next open.
fn lock(totals: &Mutex<Totals>) -> MutexGuard<'_, Totals> {
    totals.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Converts a length to the u64 of the counters (usize is at most 64 bits on our targets).
fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v7(ms: u64, n: u8) -> Uuid {
        uuid::Builder::from_unix_timestamp_millis(ms, &[n; 10]).into_uuid()
    }

    #[test]
    fn key_is_the_uuid_bytes_and_sorts_by_time() {
        let a = v7(1_000, 0xFF);
        let b = v7(1_001, 0x00);
        assert_eq!(id_key(a).unwrap(), *a.as_bytes());
        assert!(id_key(a).unwrap() < id_key(b).unwrap());
        assert_eq!(&id_key(b).unwrap()[..6], &1_001u64.to_be_bytes()[2..]);
    }

    #[test]
    fn non_v7_ids_are_refused() {
        let v4 = uuid::Builder::from_random_bytes([7; 16]).into_uuid();
        let err = id_key(v4).unwrap_err().to_string();
        assert!(
            err.contains("not a UUIDv7") && err.contains("version 4"),
            "{err}"
        );
    }

    #[test]
    fn ms_range_covers_exactly_its_milliseconds() {
        let (lo, hi) = ms_range(1_001, 1_002);
        let inside = |k: [u8; 16]| {
            (match lo {
                Bound::Included(l) => k >= l,
                _ => false,
            }) && (match hi {
                Bound::Included(h) => k <= h,
                _ => false,
            })
        };
        assert!(!inside(*v7(1_000, 0xFF).as_bytes()));
        assert!(inside(*v7(1_001, 0x00).as_bytes()));
        assert!(inside(*v7(1_002, 0xFF).as_bytes()));
        assert!(!inside(*v7(1_003, 0x00).as_bytes()));
    }

    #[test]
    fn times_outside_the_48_bit_field_are_clamped() {
        let before_1970 = chrono::DateTime::from_timestamp(-5, 0).unwrap();
        assert_eq!(unix_ms(before_1970), 0);
        let far = chrono::DateTime::from_timestamp(i64::from(u32::MAX) * 100, 0).unwrap();
        assert_eq!(unix_ms(far), MAX_UNIX_MS);
    }

    #[test]
    fn show_key_is_a_uuid_or_hex() {
        let id = v7(5, 1);
        assert_eq!(show_key(id.as_bytes()), id.to_string());
        assert_eq!(show_key(b"\x01\xab"), "01ab");
    }

    #[test]
    fn open_waits_for_a_lock_that_goes_away_but_not_for_other_errors() {
        let locked = || StoreError::Locked {
            dir: PathBuf::from("/data"),
        };
        let mut tries = 0;
        let r = open_waiting_for_lock(|| {
            tries += 1;
            if tries < 3 { Err(locked()) } else { Ok(tries) }
        });
        assert_eq!(r.unwrap(), 3);

        let mut tries = 0;
        let r: Result<(), _> = open_waiting_for_lock(|| {
            tries += 1;
            Err(StoreError::Config(vec!["x".into()]))
        });
        assert!(matches!(r, Err(StoreError::Config(_))));
        assert_eq!(tries, 1);

        let start = Instant::now();
        let r: Result<(), _> = open_waiting_for_lock(|| Err(locked()));
        assert!(matches!(r, Err(StoreError::Locked { .. })));
        assert!(start.elapsed() >= LOCK_WAIT && start.elapsed() < LOCK_WAIT * 5);
    }

    #[test]
    fn trim_removes_oldest_until_both_limits_hold() {
        let mut sizes = std::collections::VecDeque::from([10u64, 20, 30, 40]);
        let mut totals = Totals { len: 4, bytes: 100 };
        let limits = Limits {
            max_len: 3,
            max_bytes: 75,
        };
        let removed = trim(&mut totals, limits, || Ok(sizes.pop_front())).unwrap();
        // Count alone needs one removal (4 > 3); bytes need two (90 > 75, then 70).
        assert_eq!(removed, 2);
        assert_eq!(totals, Totals { len: 2, bytes: 70 });
        assert_eq!(sizes, [30, 40]);
    }

    #[test]
    fn trim_resets_counters_that_drifted_above_an_empty_tree() {
        let mut totals = Totals { len: 3, bytes: 9 };
        let limits = Limits {
            max_len: 1,
            max_bytes: 1,
        };
        assert_eq!(trim(&mut totals, limits, || Ok(None)).unwrap(), 0);
        assert_eq!(totals, Totals::default());
    }

    #[test]
    fn corrupt_and_short_keys_decode_to_none() {
        let id = v7(9, 9);
        assert_eq!(decode_or_skip::<u32>("t", id.as_bytes(), b"not json"), None);
        assert_eq!(decode_or_skip::<u32>("t", b"short", b"5"), None);
        assert_eq!(decode_or_skip::<u32>("t", id.as_bytes(), b"5"), Some(5));
    }

    #[test]
    fn config_problems_name_their_keys() {
        let mut c = StoreConfig::default();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c.history.max_results = 0;
        c.captures.max_bytes = 1;
        c.cache_bytes = 2048 * 1024 * 1024;
        let p = c.problems().join("\n");
        assert!(
            p.contains("store.cache_mib = 2048: must be 1..=1024"),
            "{p}"
        );
        assert!(p.contains("store.history.max_results"), "{p}");
        assert!(p.contains("store.captures.max_bytes"), "{p}");
    }

    #[test]
    fn config_rejects_unknown_keys_and_fills_defaults() {
        let c: StoreConfig = toml::from_str("[history]\nmax_results = 5\n").unwrap();
        assert_eq!(c.history.max_results, 5);
        assert_eq!(c.captures, CaptureConfig::default());
        let err = toml::from_str::<StoreConfig>("[history]\nmax_result = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_result"), "{err}");
    }
}
