//! Live results for HTTP: a broadcast of each result's JSON (the SSE stream and the dashboard)
//! and the latest frame with its result (`frames/latest.jpg`), fed by [`LiveSink`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};
use weld_core::{Frame, Inspection};

use crate::pipeline::{Sink, SinkError};

/// Results kept for a slow stream reader before it skips ahead (it is told how many it missed).
const STREAM_BUFFER: usize = 256;
/// The latest frame is copied at most this often: a 640x480 frame is 1.5 MB of RGB and depth,
/// and a picture that is 0.25 s old is as good as a new one on a dashboard.
const LATEST_FRAME_EVERY: Duration = Duration::from_millis(250);

/// The latest frame and its result.
#[derive(Debug, Clone)]
pub struct LatestFrame {
    pub frame: Frame,
    pub result: Inspection,
}

/// Shared between the sink (pipeline thread) and the handlers.
#[derive(Debug)]
pub struct Live {
    results: broadcast::Sender<Arc<str>>,
    latest: Mutex<Option<(LatestFrame, Instant)>>,
    /// When the results of the last [`FPS_WINDOW`] came.
    recent: Mutex<VecDeque<Instant>>,
    closed: watch::Sender<bool>,
}

/// Frames per second are counted over this window.
const FPS_WINDOW: Duration = Duration::from_secs(2);

impl Default for Live {
    fn default() -> Self {
        Live {
            results: broadcast::channel(STREAM_BUFFER).0,
            latest: Mutex::new(None),
            recent: Mutex::new(VecDeque::new()),
            closed: watch::channel(false).0,
        }
    }
}

impl Live {
    /// A receiver of every result JSON from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.results.subscribe()
    }

    /// Resolves when the server is stopping.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Ends every stream (server shutdown).
    pub fn close(&self) {
        let _ = self.closed.send(true);
    }

    /// Results per second over the last two seconds.
    pub fn fps(&self) -> f64 {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > FPS_WINDOW)
        {
            recent.pop_front();
        }
        recent.len() as f64 / FPS_WINDOW.as_secs_f64()
    }

    pub fn latest(&self) -> Option<LatestFrame> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(l, _)| l.clone())
    }

    fn publish(&self, result: &Inspection, frame: &Frame) -> Result<(), serde_json::Error> {
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > FPS_WINDOW)
            {
                recent.pop_front();
            }
            recent.push_back(now);
        }
        if self.results.receiver_count() > 0 {
            let json: Arc<str> = serde_json::to_string(result)?.into();
            // No receivers left between the check and the send is not an error.
            let _ = self.results.send(json);
        }
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let due = latest
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= LATEST_FRAME_EVERY);
        if due {
            *latest = Some((
                LatestFrame {
                    frame: frame.clone(),
                    result: result.clone(),
                },
                Instant::now(),
            ));
        }
        Ok(())
    }
}

/// The pipeline's HTTP sink.
#[derive(Debug)]
pub struct LiveSink(pub Arc<Live>);

impl Sink for LiveSink {
    fn name(&self) -> &'static str {
        "http"
    }

    fn accept(&mut self, result: &Inspection, frame: &Frame) -> Result<(), SinkError> {
        self.0
            .publish(result, frame)
            .map_err(|e| SinkError(e.to_string()))
    }
}
