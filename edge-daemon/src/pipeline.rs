//! The always-on pipeline: frames in, decisions out, never stalling, never growing.
//!
//! ```text
//!  capture thread ──► drop-oldest queue (bounded) ──► worker threads ──► fan-out thread ──► sinks
//!  source.next_frame    full: the oldest frame is       rules, model        reorder by dispatch
//!  (reconnects with     dropped and counted             when the policy     order, smoothing,
//!   backoff)                                            asks, decision      stats, store/stdout/...
//! ```
//!
//! - The queue is the only place frames wait; when inference falls behind, the camera never
//!   blocks and the newest frames win (a late result is worth less than a fresh one).
//! - Workers take frames in order and tag each with a gapless dispatch number; the fan-out
//!   thread releases results in that order, so smoothing and sinks see frames in capture order
//!   whatever the number of workers.
//! - Every dispatched frame produces exactly one result, even when the model fails or a stage
//!   panics (then the result says `unknown`, uncertain), so the fan-out never waits forever.
//! - Shutdown: the capture thread stops at the shutdown flag or the end of a replay and drops
//!   the queue's sender; workers finish what was queued, then the fan-out flushes the sinks.

use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use hdrhistogram::Histogram;
use thiserror::Error;
use weld_core::result::{LatencyMs, ModelVerdict, RESULT_VERSION};
use weld_core::rules::{Detector, RulesOutcome, UNKNOWN_CLASS};
use weld_core::{DecidedBy, Frame, Inspection, RulesNote};

use crate::model::Model;
use crate::policy::{ModelStage, Policy, Smoother};
use crate::source::{CameraState, Next, Source, SourceError};

/// A consumer of results: the store, stdout, MQTT, HTTP. Called on the fan-out thread in
/// capture order; must not block for long (a slow sink slows every sink after it).
pub trait Sink: Send {
    /// For logs and error counts.
    fn name(&self) -> &'static str;
    /// Takes one result and the frame it was made from.
    fn accept(&mut self, result: &Inspection, frame: &Frame) -> Result<(), SinkError>;
    /// Called once when the pipeline stops.
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A sink's failure; logged and counted, never fatal to the pipeline.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// A bounded MPMC queue that makes room by dropping its oldest item. crossbeam's bounded
/// channel blocks or refuses when full; keeping one of its receivers on the sending side lets
/// the sender take the oldest item out itself, so the drop policy needs no lock of its own.
#[derive(Debug)]
pub struct DropOldest<T> {
    tx: Sender<T>,
    oldest: Receiver<T>,
}

impl<T> DropOldest<T> {
    /// A queue of `capacity` (at least 1) items and a receiver for the consumers.
    pub fn new(capacity: usize) -> (DropOldest<T>, Receiver<T>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        (
            DropOldest {
                tx,
                oldest: rx.clone(),
            },
            rx,
        )
    }

    /// Queues `item`; returns how many older items were dropped to make room (0 or 1 in
    /// practice; more only if consumers race the sender).
    pub fn push(&self, mut item: T) -> u64 {
        let mut dropped = 0;
        loop {
            match self.tx.try_send(item) {
                Ok(()) => return dropped,
                Err(TrySendError::Full(back)) => {
                    item = back;
                    if self.oldest.try_recv().is_ok() {
                        dropped += 1;
                    }
                }
                // No consumer is left: the pipeline is stopping, the frame goes nowhere.
                Err(TrySendError::Disconnected(_)) => return dropped + 1,
            }
        }
    }
}

/// Latency histograms in microseconds, 1 µs to 60 s at 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Time the source took to deliver the frame.
    pub capture: Histogram<u64>,
    /// Time the frame waited in the queue.
    pub queue: Histogram<u64>,
    pub rules: Histogram<u64>,
    /// Frame to model input (only frames the model ran on).
    pub preprocess: Histogram<u64>,
    /// Model inference (only frames the model ran on).
    pub model: Histogram<u64>,
    /// From the frame leaving the source to the decision.
    pub total: Histogram<u64>,
}

/// 60 s in µs: anything slower is recorded as 60 s.
const LATENCY_MAX_US: u64 = 60_000_000;

/// An empty latency histogram in µs, 1 µs to [`LATENCY_MAX_US`].
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

impl Default for Latencies {
    fn default() -> Self {
        let h = latency_histogram;
        Latencies {
            capture: h(),
            queue: h(),
            rules: h(),
            preprocess: h(),
            model: h(),
            total: h(),
        }
    }
}

impl Latencies {
    /// The stages by name, in pipeline order.
    pub fn stages(&self) -> [(&'static str, &Histogram<u64>); 6] {
        [
            ("capture", &self.capture),
            ("queue", &self.queue),
            ("rules", &self.rules),
            ("preprocess", &self.preprocess),
            ("model", &self.model),
            ("total", &self.total),
        ]
    }
}

fn record_ms(h: &mut Histogram<u64>, ms: f32) {
    let us = (f64::from(ms) * 1000.0)
        .round()
        .clamp(1.0, LATENCY_MAX_US as f64) as u64;
    h.saturating_record(us);
}

/// Counters and histograms of a running pipeline; read by stats, HTTP and MQTT.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames delivered by the source.
    pub captured: AtomicU64,
    /// Frames dropped from the full queue (the oldest).
    pub dropped: AtomicU64,
    /// Results produced.
    pub processed: AtomicU64,
    /// Frames the model ran on.
    pub model_runs: AtomicU64,
    /// Model runs that failed.
    pub model_failures: AtomicU64,
    /// Results the policy marked uncertain.
    pub uncertain: AtomicU64,
    /// Stage panics caught (each still produced an `unknown` result).
    pub panics: AtomicU64,
    /// Sink failures, all sinks.
    pub sink_errors: AtomicU64,
    decided: Mutex<HashMap<DecidedBy, u64>>,
    classes: Mutex<BTreeMap<String, u64>>,
    latencies: Mutex<Latencies>,
    camera: Mutex<Option<CameraState>>,
}

/// A lock that shrugs off poisoning: the data behind these locks are counters, still valid
/// after a panic elsewhere.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Stats {
    /// Results per deciding stage.
    pub fn decided_by(&self) -> HashMap<DecidedBy, u64> {
        lock(&self.decided).clone()
    }
    /// Results per class.
    pub fn classes(&self) -> BTreeMap<String, u64> {
        lock(&self.classes).clone()
    }
    /// A copy of the latency histograms.
    pub fn latencies(&self) -> Latencies {
        lock(&self.latencies).clone()
    }
    pub fn camera(&self) -> CameraState {
        lock(&self.camera).clone().unwrap_or(CameraState::Starting)
    }
    pub fn set_camera(&self, state: CameraState) {
        *lock(&self.camera) = Some(state);
    }
}

/// A candidate model in shadow (`deploy::Deployer::start_shadow`): run on one in `every` of the
/// frames the active model runs on, after it, its class compared with the active model's.
#[derive(Debug)]
pub struct Shadow {
    pub model: Model,
    pub version: String,
    pub every: u64,
    tally: Mutex<ShadowTally>,
}

/// What the shadow did so far.
#[derive(Debug, Clone)]
pub struct ShadowTally {
    /// Frames the active model ran on since the shadow started (the sample is drawn from them).
    pub offered: u64,
    pub compared: u64,
    pub agreed: u64,
    pub failures: u64,
    pub latency: Histogram<u64>,
    pub active_latency: Histogram<u64>,
}

impl Shadow {
    pub fn new(model: Model, version: String, every: u64) -> Shadow {
        Shadow {
            model,
            version,
            every: every.max(1),
            tally: Mutex::new(ShadowTally {
                offered: 0,
                compared: 0,
                agreed: 0,
                failures: 0,
                latency: latency_histogram(),
                active_latency: latency_histogram(),
            }),
        }
    }

    /// A copy of the tally.
    pub fn tally(&self) -> ShadowTally {
        lock(&self.tally).clone()
    }

    /// Runs the candidate on `frame` when it is in the sample, `active` being the active
    /// model's verdict and inference time on it.
    fn offer(&self, frame: &Frame, active: &ModelVerdict, active_ms: f32) {
        let n = {
            let mut t = lock(&self.tally);
            t.offered += 1;
            t.offered - 1
        };
        if n % self.every != 0 {
            return;
        }
        let outcome = self.model.predict(frame);
        let mut t = lock(&self.tally);
        match outcome {
            Ok(p) => {
                t.compared += 1;
                t.agreed += u64::from(p.class == active.class);
                record_ms(&mut t.latency, p.infer_ms);
                record_ms(&mut t.active_latency, active_ms);
            }
            Err(e) => {
                t.failures += 1;
                tracing::debug!(version = %self.version, error = %e, "the shadow model failed on a frame");
            }
        }
    }
}

/// What the pipeline shares with the rest of the daemon (status, commands, HTTP).
#[derive(Debug)]
pub struct Shared {
    pub stats: Stats,
    /// The policy and its thresholds; swapped whole by the `thresholds` command.
    pub policy: ArcSwap<Policy>,
    /// The active model, if any; swapped whole on deployment.
    pub model: ArcSwapOption<Model>,
    /// Why the configured model is not running (it failed to load), for the device status.
    pub model_error: ArcSwapOption<String>,
    /// A candidate model compared with the active one, never deciding.
    pub shadow: ArcSwapOption<Shadow>,
    /// Set to start a new part for smoothing (a command or a PLC signal).
    pub reset_part: AtomicBool,
    /// Frames to keep in the capture store whatever their result (the `capture` command).
    pub capture_next: AtomicU64,
    /// Stop capturing; workers finish the queue, then the pipeline ends. An `Arc` of its own
    /// so the source can watch it while it waits to reconnect.
    pub shutdown: Arc<AtomicBool>,
}

impl Shared {
    pub fn new(policy: Policy, model: Option<Arc<Model>>) -> Arc<Shared> {
        Arc::new(Shared {
            stats: Stats::default(),
            policy: ArcSwap::from_pointee(policy),
            model: ArcSwapOption::new(model),
            model_error: ArcSwapOption::empty(),
            shadow: ArcSwapOption::empty(),
            reset_part: AtomicBool::new(false),
            capture_next: AtomicU64::new(0),
            shutdown: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// Identity written into results.
#[derive(Debug, Clone)]
pub struct Identity {
    pub device: String,
    pub line: String,
}

/// Fixed settings of a pipeline run.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub identity: Identity,
    pub queue: usize,
    pub workers: usize,
    pub detector: Detector,
    pub smoothing_window: usize,
    pub part_gap: Duration,
}

/// A frame on its way through the pipeline.
struct Queued {
    frame: Frame,
    /// When the source delivered it.
    captured_at: Instant,
    capture_ms: f32,
}

/// A worker's output for one dispatched frame.
struct Processed {
    dispatch: u64,
    frame: Frame,
    result: Inspection,
    note: Option<RulesNote>,
    queue_ms: f32,
    capture_ms: f32,
    preprocess_ms: Option<f32>,
}

/// A running pipeline.
#[derive(Debug)]
pub struct Running {
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    /// True once every thread has ended (the source finished or shutdown was asked).
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Waits for every thread to finish (after the shutdown flag or the end of the source).
    pub fn join(self) {
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!("a pipeline thread panicked");
            }
        }
    }
}

/// Opens the configured source, reconnecting on its own after a camera is lost (watching
/// `shared`'s shutdown flag), with its camera state reported into `shared`'s stats.
pub fn open_source(
    cfg: &crate::source::SourceConfig,
    shared: &Arc<Shared>,
) -> Result<Box<dyn Source>, SourceError> {
    let sh = shared.clone();
    let source = crate::source::Reconnecting::open(cfg, shared.shutdown.clone())?
        .on_state(Box::new(move |state| sh.stats.set_camera(state.clone())));
    shared.stats.set_camera(source.state().clone());
    Ok(Box::new(source))
}

/// Starts the capture thread, the workers and the fan-out thread. `source` is read until it
/// ends or shutdown is asked; give it reconnection ([`open_source`]) if its camera can go away.
pub fn start(
    settings: PipelineSettings,
    shared: Arc<Shared>,
    source: Box<dyn Source>,
    sinks: Vec<Box<dyn Sink>>,
) -> std::io::Result<Running> {
    let (queue, frames) = DropOldest::<Queued>::new(settings.queue);
    // Bounded so that a stalled sink backs up into the workers and from there into the
    // drop-oldest queue, instead of growing memory; two per worker is enough to keep the
    // workers busy while the fan-out writes (each item holds a frame: 1.5 MB at 640x480).
    let (results_tx, results_rx) =
        crossbeam_channel::bounded::<Processed>(2 * settings.workers.max(1));
    let dispatch = Arc::new(Mutex::new((frames, 0u64)));
    let mut threads = Vec::new();

    let sh = shared.clone();
    threads.push(
        thread::Builder::new()
            .name("capture".into())
            .spawn(move || capture_loop(source, queue, &sh))?,
    );
    for i in 0..settings.workers {
        let sh = shared.clone();
        let dispatch = dispatch.clone();
        let tx = results_tx.clone();
        let settings = settings.clone();
        threads.push(
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || worker_loop(&settings, &sh, &dispatch, &tx))?,
        );
    }
    drop(results_tx);
    let sh = shared;
    threads.push(
        thread::Builder::new()
            .name("fan-out".into())
            .spawn(move || fan_out_loop(&settings, &sh, results_rx, sinks))?,
    );
    Ok(Running { threads })
}

fn capture_loop(mut source: Box<dyn Source>, queue: DropOldest<Queued>, shared: &Shared) {
    let stats = &shared.stats;
    while !shared.shutdown.load(Ordering::Relaxed) {
        let t = Instant::now();
        match source.next_frame() {
            Ok(Next::Frame(frame)) => {
                let capture_ms = t.elapsed().as_secs_f32() * 1000.0;
                stats.captured.fetch_add(1, Ordering::Relaxed);
                let dropped = queue.push(Queued {
                    frame: *frame,
                    captured_at: Instant::now(),
                    capture_ms,
                });
                stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
            Ok(Next::End) => {
                if !shared.shutdown.load(Ordering::Relaxed) {
                    tracing::info!(source = source.name(), "source finished");
                    stats.set_camera(CameraState::Ended);
                }
                break;
            }
            // A source without reconnection lost its camera, or one that cannot work: either
            // way capture stops here, and the reason is in the camera state.
            Err(e @ (SourceError::Disconnected(_) | SourceError::Fatal(_))) => {
                tracing::error!(source = source.name(), error = %e, "capture stopped");
                stats.set_camera(CameraState::Failed(e.to_string()));
                break;
            }
        }
    }
}

fn worker_loop(
    settings: &PipelineSettings,
    shared: &Shared,
    dispatch: &Mutex<(Receiver<Queued>, u64)>,
    results: &Sender<Processed>,
) {
    loop {
        // Taking the frame and its dispatch number under one lock makes the numbers follow
        // queue order; the lock is held only while a frame is waited for.
        let (item, n) = {
            let mut d = lock(dispatch);
            match d.0.recv_timeout(Duration::from_millis(100)) {
                Ok(item) => {
                    d.1 += 1;
                    (item, d.1 - 1)
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        let queue_ms = item.captured_at.elapsed().as_secs_f32() * 1000.0;
        let processed =
            match catch_unwind(AssertUnwindSafe(|| process(settings, shared, &item.frame))) {
                Ok(o) => (o.result, o.note, o.preprocess_ms),
                Err(_) => {
                    shared.stats.panics.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(seq = item.frame.seq, "a stage panicked on this frame");
                    (panicked_result(settings, &item.frame), None, None)
                }
            };
        let (mut result, note, preprocess_ms) = processed;
        result.latency_ms.total = item.captured_at.elapsed().as_secs_f32() * 1000.0;
        let out = Processed {
            dispatch: n,
            frame: item.frame,
            result,
            note,
            queue_ms,
            capture_ms: item.capture_ms,
            preprocess_ms,
        };
        if results.send(out).is_err() {
            return;
        }
    }
}

/// What one frame gave: the result (its total latency covers only the stages) and what the
/// pipeline counts.
#[derive(Debug, Clone)]
pub struct FrameOutcome {
    pub result: Inspection,
    /// The rules' note (no bead, too little depth, RGB only), for smoothing.
    pub note: Option<RulesNote>,
    /// Preprocessing time, when the model ran.
    pub preprocess_ms: Option<f32>,
    /// The model was asked.
    pub model_asked: bool,
    /// The model was asked and failed (the message).
    pub model_error: Option<String>,
}

/// The one way a frame is judged, online (`run`) and offline (`inspect`): the rules, the
/// model when the policy asks for it, the decision.
pub fn inspect_frame(
    detector: &Detector,
    policy: &Policy,
    model: Option<&Model>,
    identity: &Identity,
    frame: &Frame,
) -> FrameOutcome {
    let rules = detector.inspect(frame);
    let mut model_ms = 0.0;
    let mut preprocess_ms = None;
    let mut model_error = None;
    let model_asked = policy.needs_model(&rules);
    let stage = match (model_asked, model) {
        (false, _) => ModelStage::NotRun,
        (true, None) => ModelStage::Unavailable,
        (true, Some(model)) => match model.predict(frame) {
            Ok(p) => {
                model_ms = p.infer_ms;
                preprocess_ms = Some(p.preprocess_ms);
                ModelStage::Ran(ModelVerdict {
                    class: p.class,
                    confidence: p.confidence,
                    version: model.version().to_string(),
                })
            }
            Err(e) => {
                model_error = Some(e.to_string());
                ModelStage::Failed(e.to_string())
            }
        },
    };
    let decision = policy.decide(&rules, &stage);
    let note = rules.note;
    let mut result = inspection(identity, frame, rules, stage.verdict().cloned(), decision);
    result.latency_ms.model = model_ms;
    result.latency_ms.total = result.latency_ms.rules + preprocess_ms.unwrap_or(0.0) + model_ms;
    FrameOutcome {
        result,
        note,
        preprocess_ms,
        model_asked: model_asked && model.is_some(),
        model_error,
    }
}

/// [`inspect_frame`] with the pipeline's live policy and model, counting model runs.
fn process(settings: &PipelineSettings, shared: &Shared, frame: &Frame) -> FrameOutcome {
    let policy = **shared.policy.load();
    let model = shared.model.load_full();
    let out = inspect_frame(
        &settings.detector,
        &policy,
        model.as_deref(),
        &settings.identity,
        frame,
    );
    if out.model_asked {
        shared.stats.model_runs.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(e) = &out.model_error {
        shared.stats.model_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(seq = frame.seq, error = %e, "model failed on a frame");
    }
    if let (Some(shadow), Some(verdict)) = (shared.shadow.load_full(), &out.result.model) {
        shadow.offer(frame, verdict, out.result.latency_ms.model);
    }
    out
}

/// Builds the result JSON of a frame.
pub fn inspection(
    identity: &Identity,
    frame: &Frame,
    rules: RulesOutcome,
    model: Option<ModelVerdict>,
    decision: crate::policy::Decision,
) -> Inspection {
    Inspection {
        v: RESULT_VERSION,
        id: Inspection::new_id(),
        seq: frame.seq,
        device: identity.device.clone(),
        line: identity.line.clone(),
        ts: frame.ts,
        class: decision.class,
        confidence: decision.confidence,
        decided_by: decision.decided_by,
        uncertain: decision.uncertain,
        rules: Some(rules.verdict()),
        model,
        findings: rules.findings,
        measurements: rules.measurements,
        latency_ms: LatencyMs {
            rules: rules.latency_ms,
            model: 0.0,
            total: rules.latency_ms,
        },
        path: None,
    }
}

fn panicked_result(settings: &PipelineSettings, frame: &Frame) -> Inspection {
    Inspection {
        v: RESULT_VERSION,
        id: Inspection::new_id(),
        seq: frame.seq,
        device: settings.identity.device.clone(),
        line: settings.identity.line.clone(),
        ts: frame.ts,
        class: UNKNOWN_CLASS.to_string(),
        confidence: 0.0,
        decided_by: DecidedBy::Rules,
        uncertain: true,
        rules: None,
        model: None,
        findings: Vec::new(),
        measurements: Default::default(),
        latency_ms: LatencyMs::default(),
        path: None,
    }
}

fn fan_out_loop(
    settings: &PipelineSettings,
    shared: &Shared,
    results: Receiver<Processed>,
    mut sinks: Vec<Box<dyn Sink>>,
) {
    let mut smoother = Smoother::new(settings.smoothing_window, settings.part_gap);
    let mut pending: BTreeMap<u64, Processed> = BTreeMap::new();
    let mut next = 0u64;
    for p in results.iter() {
        pending.insert(p.dispatch, p);
        while let Some(p) = pending.remove(&next) {
            next += 1;
            deliver(shared, &mut smoother, &mut sinks, p);
        }
    }
    // Workers are gone; anything still pending had a gap before it (a worker died mid-frame):
    // deliver it in order rather than lose it.
    for (_, p) in std::mem::take(&mut pending) {
        deliver(shared, &mut smoother, &mut sinks, p);
    }
    for s in &mut sinks {
        if let Err(e) = s.flush() {
            tracing::warn!(sink = s.name(), error = %e, "sink failed to flush");
        }
    }
}

fn deliver(
    shared: &Shared,
    smoother: &mut Smoother,
    sinks: &mut [Box<dyn Sink>],
    mut p: Processed,
) {
    let stats = &shared.stats;
    if shared.reset_part.swap(false, Ordering::Relaxed) {
        smoother.reset();
    }
    if smoother.enabled() {
        let policy = **shared.policy.load();
        let d = smoother.push(
            p.frame.ts,
            p.note,
            crate::policy::Decision {
                class: p.result.class.clone(),
                confidence: p.result.confidence,
                decided_by: p.result.decided_by,
                uncertain: p.result.uncertain,
            },
            &policy,
        );
        p.result.class = d.class;
        p.result.confidence = d.confidence;
        p.result.uncertain = d.uncertain;
    }
    // Ids are time-ordered (UUIDv7) and the history is keyed by them; made here, in capture
    // order, rather than by parallel workers, so "results after ID" follows the line.
    p.result.id = Inspection::new_id();
    let r = &p.result;
    stats.processed.fetch_add(1, Ordering::Relaxed);
    if r.uncertain {
        stats.uncertain.fetch_add(1, Ordering::Relaxed);
    }
    *lock(&stats.decided).entry(r.decided_by).or_default() += 1;
    *lock(&stats.classes).entry(r.class.clone()).or_default() += 1;
    {
        let mut l = lock(&stats.latencies);
        record_ms(&mut l.capture, p.capture_ms);
        record_ms(&mut l.queue, p.queue_ms);
        record_ms(&mut l.rules, r.latency_ms.rules);
        if r.model.is_some() {
            record_ms(&mut l.model, r.latency_ms.model);
        }
        if let Some(ms) = p.preprocess_ms {
            record_ms(&mut l.preprocess, ms);
        }
        record_ms(&mut l.total, r.latency_ms.total);
    }
    for s in sinks.iter_mut() {
        if let Err(e) = s.accept(r, &p.frame) {
            let n = stats.sink_errors.fetch_add(1, Ordering::Relaxed);
            // The first failures and then one in a thousand: a dead disk must not flood the log.
            if n < 10 || n.is_multiple_of(1000) {
                tracing::warn!(sink = s.name(), error = %e, "sink failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyKind, Thresholds};
    use weld_core::rules::RulesConfig;
    use weld_core::synth::{SynthClass, SynthConfig, generate};

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts() {
        let (q, rx) = DropOldest::new(2);
        assert_eq!(q.push(1), 0);
        assert_eq!(q.push(2), 0);
        assert_eq!(q.push(3), 1);
        assert_eq!(q.push(4), 1);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![3, 4]);
        drop(rx);
    }

    /// Frames from the generator, then the given errors in order, then the end.
    struct Scripted {
        frames: Vec<Frame>,
        errors: Vec<SourceError>,
        fail_after: usize,
        sent: usize,
    }

    impl Source for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn next_frame(&mut self) -> Result<Next, SourceError> {
            if self.sent == self.fail_after && !self.errors.is_empty() {
                return Err(self.errors.remove(0));
            }
            match self.frames.get(self.sent) {
                Some(f) => {
                    self.sent += 1;
                    let seq = self.sent as u64;
                    Ok(Next::Frame(Box::new(f.clone().with_time(f.ts, seq))))
                }
                None => Ok(Next::End),
            }
        }
    }

    fn frames(n: usize) -> Vec<Frame> {
        let cfg = SynthConfig::new(160, 120);
        (0..n)
            .map(|i| {
                let class = SynthClass::ALL[i % SynthClass::ALL.len()];
                generate(class, i as u64, &cfg).unwrap().frame
            })
            .collect()
    }

    #[derive(Debug, Default, Clone)]
    struct Collect(Arc<Mutex<Vec<Inspection>>>);

    impl Sink for Collect {
        fn name(&self) -> &'static str {
            "collect"
        }
        fn accept(&mut self, result: &Inspection, _frame: &Frame) -> Result<(), SinkError> {
            lock(&self.0).push(result.clone());
            Ok(())
        }
    }

    fn settings(queue: usize, workers: usize) -> PipelineSettings {
        PipelineSettings {
            identity: Identity {
                device: "d1".into(),
                line: "L1".into(),
            },
            queue,
            workers,
            detector: Detector::new(RulesConfig::default()).unwrap(),
            smoothing_window: 0,
            part_gap: Duration::from_secs(2),
        }
    }

    fn policy() -> Policy {
        Policy {
            kind: PolicyKind::Hybrid,
            thresholds: Thresholds {
                rules_confident_at: 0.9,
                model_confident_at: 0.8,
            },
        }
    }

    #[test]
    fn every_frame_is_either_decided_in_order_or_counted_as_dropped() {
        let shared = Shared::new(policy(), None);
        let sink = Collect::default();
        let source = Box::new(Scripted {
            frames: frames(60),
            errors: Vec::new(),
            fail_after: 0,
            sent: 0,
        });
        // A queue of 2 with a source that never waits: drops are certain.
        let running = start(
            settings(2, 2),
            shared.clone(),
            source,
            vec![Box::new(sink.clone())],
        )
        .unwrap();
        running.join();
        let results = lock(&sink.0).clone();
        let s = &shared.stats;
        assert_eq!(s.captured.load(Ordering::Relaxed), 60);
        assert_eq!(
            results.len() as u64 + s.dropped.load(Ordering::Relaxed),
            60,
            "each frame is decided or dropped"
        );
        assert!(!results.is_empty());
        assert!(
            results.windows(2).all(|w| w[0].seq < w[1].seq),
            "results leave in capture order"
        );
        assert_eq!(s.camera(), CameraState::Ended);
        // No model: every frame the rules were unsure of is uncertain and none ran a model.
        assert_eq!(s.model_runs.load(Ordering::Relaxed), 0);
        assert!(results.iter().all(|r| r.model.is_none()));
        assert!(
            results
                .iter()
                .all(|r| r.uncertain || r.confidence >= 0.9 && r.decided_by == DecidedBy::Rules)
        );
    }

    #[test]
    fn a_lost_camera_is_reopened_and_reported() {
        let shared = Shared::new(policy(), None);
        let sink = Collect::default();
        let opens = Arc::new(AtomicU64::new(0));
        let opens2 = opens.clone();
        let open: crate::source::Opener = Box::new(move || {
            let n = opens2.fetch_add(1, Ordering::Relaxed);
            match n {
                // First camera: 3 frames, then unplugged.
                0 => Ok(Box::new(Scripted {
                    frames: frames(3),
                    errors: vec![SourceError::Disconnected("USB reset".into())],
                    fail_after: 3,
                    sent: 0,
                }) as Box<dyn Source>),
                // Still gone on the first retry.
                1 => Err(SourceError::Disconnected("no device".into())),
                // Back: 2 more frames, then the end.
                _ => Ok(Box::new(Scripted {
                    frames: frames(2),
                    errors: Vec::new(),
                    fail_after: 0,
                    sent: 0,
                })),
            }
        });
        let sh = shared.clone();
        let source =
            crate::source::Reconnecting::with_opener("scripted", open, shared.shutdown.clone())
                .on_state(Box::new(move |s| sh.stats.set_camera(s.clone())));
        let t = Instant::now();
        let running = start(
            settings(8, 1),
            shared.clone(),
            Box::new(source),
            vec![Box::new(sink.clone())],
        )
        .unwrap();
        running.join();
        assert_eq!(opens.load(Ordering::Relaxed), 3);
        let seqs: Vec<u64> = lock(&sink.0).iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            [1, 2, 3, 1, 2],
            "frames of both connections, in order"
        );
        // Two waits: 0.5 s then 1 s.
        assert!(
            t.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(shared.stats.camera(), CameraState::Ended);
    }

    #[test]
    fn a_broken_source_stops_capture_with_its_reason() {
        let shared = Shared::new(policy(), None);
        let source = Box::new(Scripted {
            frames: Vec::new(),
            errors: vec![SourceError::Fatal("no such folder".into())],
            fail_after: 0,
            sent: 0,
        });
        start(settings(2, 1), shared.clone(), source, Vec::new())
            .unwrap()
            .join();
        assert_eq!(
            shared.stats.camera(),
            CameraState::Failed("no such folder".into())
        );
    }

    #[test]
    fn shutdown_stops_an_endless_source() {
        struct Endless(Frame, u64);
        impl Source for Endless {
            fn name(&self) -> &'static str {
                "endless"
            }
            fn next_frame(&mut self) -> Result<Next, SourceError> {
                self.1 += 1;
                thread::sleep(Duration::from_millis(5));
                Ok(Next::Frame(Box::new(
                    self.0.clone().with_time(self.0.ts, self.1),
                )))
            }
        }
        let shared = Shared::new(policy(), None);
        let source = Box::new(Endless(frames(1).remove(0), 0));
        let sink = Collect::default();
        let running = start(
            settings(4, 2),
            shared.clone(),
            source,
            vec![Box::new(sink.clone())],
        )
        .unwrap();
        thread::sleep(Duration::from_millis(200));
        shared.shutdown.store(true, Ordering::Relaxed);
        let t = Instant::now();
        running.join();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let n = lock(&sink.0).len() as u64;
        assert!(n > 0);
        assert_eq!(
            n + shared.stats.dropped.load(Ordering::Relaxed),
            shared.stats.captured.load(Ordering::Relaxed)
        );
    }
}
