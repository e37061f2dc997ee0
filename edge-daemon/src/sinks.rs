//! The sinks of this stage: the sled store (history, and uncertain frames kept for retraining)
//! and JSON lines on standard output. MQTT and HTTP add their own.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use weld_core::{Frame, Inspection};

use crate::pipeline::{Shared, Sink, SinkError};
use crate::store::Store;

/// Writes every result into the history and keeps the frames worth labelling: every frame
/// the policy is uncertain about, and the next N frames when a `capture` command asks.
#[derive(Debug)]
pub struct StoreSink {
    store: Store,
    /// Holds the count of frames still to capture on request, whatever their result.
    shared: Arc<Shared>,
    /// Uncertain frames captured.
    pub captured: Arc<AtomicU64>,
}

impl StoreSink {
    pub fn new(store: Store, shared: Arc<Shared>) -> StoreSink {
        StoreSink {
            store,
            shared,
            captured: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Sink for StoreSink {
    fn name(&self) -> &'static str {
        "store"
    }

    fn accept(&mut self, result: &Inspection, frame: &Frame) -> Result<(), SinkError> {
        self.store
            .history()
            .insert(result)
            .map_err(|e| SinkError(e.to_string()))?;
        let requested = self
            .shared
            .capture_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if result.uncertain || requested {
            self.store
                .captures()
                .put(frame, result)
                .map_err(|e| SinkError(e.to_string()))?;
            self.captured.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.store
            .flush()
            .map(|_| ())
            .map_err(|e| SinkError(e.to_string()))
    }
}

/// One result JSON per line on a writer (standard output for `run`).
#[derive(Debug)]
pub struct JsonlSink<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> JsonlSink<W> {
    pub fn new(out: W) -> JsonlSink<W> {
        JsonlSink { out }
    }
}

impl<W: Write + Send + std::fmt::Debug> Sink for JsonlSink<W> {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    fn accept(&mut self, result: &Inspection, _frame: &Frame) -> Result<(), SinkError> {
        let mut line = serde_json::to_vec(result).map_err(|e| SinkError(e.to_string()))?;
        line.push(b'\n');
        // Whole lines, flushed per result: a reader piping into jq or a file sees each result
        // as it is made, never half of one.
        self.out
            .write_all(&line)
            .and_then(|()| self.out.flush())
            .map_err(|e| SinkError(format!("writing a result line: {e}")))
    }
}
