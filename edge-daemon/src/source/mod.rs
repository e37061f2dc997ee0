//! Frame sources, chosen by name in [`open`] (the one registry): adding a source is one new
//! file, one [`SourceConfig`] variant and one line in [`open`].
//!
//! A source is a blocking iterator of frames run on the capture thread. It paces itself (a
//! camera by its own clock, `synthetic` and `replay` by their configured fps) and reports a
//! lost camera as [`SourceError::Disconnected`]; the capture loop wraps it in [`Reconnecting`],
//! which retries with [`Backoff`] instead of stopping the daemon.
//!
//! | `kind` | file | needs |
//! | --- | --- | --- |
//! | `synthetic` | `synthetic.rs` | nothing (demo and tests) |
//! | `replay` | `replay.rs` | a folder of PNG/JPEG frames or a dataset folder |
//! | `v4l` | `v4l.rs` | cargo feature `v4l`; a V4L2 camera giving YUYV or MJPEG |
//! | `realsense` | `realsense.rs` | cargo feature `realsense`; librealsense2 and a RealSense camera |
//!
//! Every kind's config parses and validates in every build, so a config file written for the
//! board is checked on a laptop; only [`open`] needs the feature.

pub mod realsense;
pub mod replay;
pub mod synthetic;
pub mod v4l;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use weld_core::Frame;

pub use realsense::RealsenseConfig;
pub use replay::{ReplayConfig, ReplaySource};
pub use synthetic::{SyntheticConfig, SyntheticSource};
pub use v4l::V4lConfig;

/// What a source hands back when asked for the next frame.
#[derive(Debug)]
pub enum Next {
    /// A frame (its `seq` and `ts` set by the source).
    Frame(Box<Frame>),
    /// The source is finished (a replay that does not loop; [`Reconnecting`] also answers this
    /// once shutdown has been asked for).
    End,
}

/// Why a source gave no frame.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The camera went away or stopped answering; worth retrying.
    #[error("camera disconnected: {0}")]
    Disconnected(String),
    /// The source cannot work as configured; retrying will not help.
    #[error("{0}")]
    Fatal(String),
}

/// A frame source. `next_frame` blocks until the next frame is due.
pub trait Source: Send {
    /// Short name for logs and status (`synthetic`, `replay`, `v4l`, `realsense`).
    fn name(&self) -> &'static str;
    /// The next frame, [`Next::End`] when the source is finished, or why there is none.
    fn next_frame(&mut self) -> Result<Next, SourceError>;
}

/// The `[source]` table of the daemon's config: which source, and its settings.
///
/// ```toml
/// [source]
/// kind = "v4l"
/// device = "/dev/video0"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    /// Generated welds with known classes (the demo camera).
    Synthetic(SyntheticConfig),
    /// Frames from image files or a dataset folder.
    Replay(ReplayConfig),
    /// A V4L2 camera (USB webcam, MIPI camera through the board's ISP).
    V4l(V4lConfig),
    /// An Intel RealSense RGB-D camera.
    Realsense(RealsenseConfig),
}

impl Default for SourceConfig {
    /// The demo camera: synthetic 640x480 at 30 fps with an even class mix.
    fn default() -> SourceConfig {
        SourceConfig::Synthetic(SyntheticConfig::default())
    }
}

impl SourceConfig {
    /// The `kind` name (`synthetic`, `replay`, `v4l`, `realsense`).
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Synthetic(_) => "synthetic",
            SourceConfig::Replay(_) => "replay",
            SourceConfig::V4l(_) => "v4l",
            SourceConfig::Realsense(_) => "realsense",
        }
    }

    /// Every invalid value, each naming its key (`source.fps`) and the allowed values; empty
    /// when the config is valid. Checks values only: files and devices are looked at by
    /// [`open`].
    pub fn problems(&self) -> Vec<String> {
        match self {
            SourceConfig::Synthetic(c) => c.problems(),
            SourceConfig::Replay(c) => c.problems(),
            SourceConfig::V4l(c) => c.problems(),
            SourceConfig::Realsense(c) => c.problems(),
        }
    }
}

/// Opens the configured source: the one registry of sources.
///
/// An invalid config, or a hardware kind this build was compiled without, is
/// [`SourceError::Fatal`]; a camera that is not there (yet) is [`SourceError::Disconnected`].
pub fn open(cfg: &SourceConfig) -> Result<Box<dyn Source>, SourceError> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(SourceError::Fatal(format!(
            "invalid [source] config: {}",
            problems.join("; ")
        )));
    }
    match cfg {
        SourceConfig::Synthetic(c) => Ok(Box::new(SyntheticSource::open(c)?)),
        SourceConfig::Replay(c) => Ok(Box::new(ReplaySource::open(c)?)),
        #[cfg(feature = "v4l")]
        SourceConfig::V4l(c) => Ok(Box::new(v4l::V4lSource::open(c)?)),
        #[cfg(not(feature = "v4l"))]
        SourceConfig::V4l(_) => Err(not_built("v4l")),
        #[cfg(feature = "realsense")]
        SourceConfig::Realsense(c) => Ok(Box::new(realsense::RealsenseSource::open(c)?)),
        #[cfg(not(feature = "realsense"))]
        SourceConfig::Realsense(_) => Err(not_built("realsense")),
    }
}

#[cfg(any(not(feature = "v4l"), not(feature = "realsense")))]
fn not_built(kind: &str) -> SourceError {
    SourceError::Fatal(format!(
        "this build has no {kind} support; rebuild with --features {kind}"
    ))
}

// ------------------------------------------------------------------ shared config checks

/// Highest frame rate a config may ask for, frames/s: far above any camera we support; a
/// higher value is a typo, not a wish.
const MAX_FPS: f64 = 1000.0;
/// Lowest non-zero frame rate, frames/s: one frame every 10 s, still a usable slide show.
const MIN_FPS: f64 = 0.1;

/// The problem with a software source's `fps` (0 = unpaced), if any.
fn fps_problem(key: &str, fps: f64) -> Option<String> {
    let ok = fps == 0.0 || (fps.is_finite() && (MIN_FPS..=MAX_FPS).contains(&fps));
    (!ok).then(|| {
        format!(
            "{key} is {fps}; allowed: 0 (as fast as frames are taken) or {MIN_FPS}..={MAX_FPS} \
             frames per second"
        )
    })
}

/// The problem with an integer setting outside `lo..=hi`, if any.
fn range_problem(key: &str, value: u32, lo: u32, hi: u32, unit: &str) -> Option<String> {
    (!(lo..=hi).contains(&value)).then(|| format!("{key} is {value}; allowed: {lo}..={hi} {unit}"))
}

/// The problems with a camera mode `[width px, height px, fps]` of a hardware source: each
/// between 1 and its maximum.
fn camera_mode_problems(
    [width, height, fps]: [u32; 3],
    max_side: u32,
    max_fps: u32,
) -> Vec<String> {
    [
        range_problem("source.width", width, 1, max_side, "px"),
        range_problem("source.height", height, 1, max_side, "px"),
        range_problem("source.fps", fps, 1, max_fps, "frames per second"),
    ]
    .into_iter()
    .flatten()
    .collect()
}

// ------------------------------------------------------------------ pacing

/// Paces frames to a rate on an absolute schedule: each frame is due one period after the
/// previous one was due (not after it was delivered), so time spent loading or generating a
/// frame does not slow the rate down. A consumer that falls more than one period behind
/// resynchronises to now instead of receiving a burst of catch-up frames.
#[derive(Debug)]
pub(crate) struct Pacer {
    period: Option<Duration>,
    next_due: Option<Instant>,
}

impl Pacer {
    /// A pacer for `fps` frames per second; 0 (or a value no `Duration` can hold) does not pace.
    pub(crate) fn new(fps: f64) -> Pacer {
        let period = (fps > 0.0)
            .then(|| Duration::try_from_secs_f64(1.0 / fps).ok())
            .flatten();
        Pacer {
            period,
            next_due: None,
        }
    }

    /// Sleeps until the next frame is due. The first frame is due at once.
    pub(crate) fn wait(&mut self) {
        let Some(period) = self.period else { return };
        let now = Instant::now();
        let mut due = self.next_due.unwrap_or(now);
        if now > due + period {
            due = now; // late by more than a period: resync rather than burst
        }
        if due > now {
            std::thread::sleep(due - now);
        }
        self.next_due = Some(due + period);
    }
}

// ------------------------------------------------------------------ reconnecting

/// Delays between reconnection attempts: doubling from `initial` up to `max`, back to
/// `initial` after a good frame. No jitter: each device has one camera, so there is no crowd of
/// clients to spread out.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Default for Backoff {
    /// 0.5 s doubling to 30 s: a replugged USB camera enumerates in about a second, and 30 s
    /// keeps a missing camera from flooding the log (two lines a minute).
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    /// Delays from `initial`, doubling, capped at `max` (at least `initial`).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay before the next attempt; each call doubles the one after it, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = d.saturating_mul(2).min(self.max);
        d
    }

    /// Starts again from `initial` (after a good frame).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// The camera as the capture loop sees it, for status and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum CameraState {
    /// Not opened yet, or opened and no frame delivered yet.
    Starting,
    /// Delivering frames.
    Ok,
    /// Lost (or never found); waiting before reconnection attempt `attempt` (1, 2, ...).
    Reconnecting {
        /// The attempt about to be made, counting from 1 since the last good frame.
        attempt: u32,
        /// Why the last attempt or the last frame failed.
        last_error: String,
    },
    /// The source finished (a replay that does not loop).
    Ended,
    /// The source cannot work as configured (the reason); capture has stopped.
    Failed(String),
}

/// Opens a source; [`Reconnecting`] calls it for the first open and every reconnection.
pub type Opener = Box<dyn FnMut() -> Result<Box<dyn Source>, SourceError> + Send>;
/// Told every change of [`CameraState`] as it happens (also while waiting to reconnect).
pub type StateCallback = Box<dyn FnMut(&CameraState) + Send>;

/// How often a backoff sleep looks at the shutdown flag: a stop never waits longer than this.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// A source that survives its camera: on [`SourceError::Disconnected`] it drops the source
/// (releasing the device), reports [`CameraState::Reconnecting`], waits per [`Backoff`] and
/// reopens through the registry, until a frame comes or shutdown is asked for. Fatal errors
/// pass through. After shutdown, `next_frame` answers [`Next::End`].
pub struct Reconnecting {
    name: &'static str,
    opener: Opener,
    source: Option<Box<dyn Source>>,
    backoff: Backoff,
    state: CameraState,
    on_state: Option<StateCallback>,
    shutdown: Arc<AtomicBool>,
}

impl std::fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnecting")
            .field("name", &self.name)
            .field("open", &self.source.is_some())
            .field("backoff", &self.backoff)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Reconnecting {
    /// Opens `cfg` through [`open`] once: a fatal error (bad config, missing feature) is
    /// returned at once; a missing camera is not, it is retried by `next_frame`, so the daemon
    /// starts (and says "reconnecting") when the camera is unplugged at boot.
    pub fn open(
        cfg: &SourceConfig,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Reconnecting, SourceError> {
        let owned = cfg.clone();
        let mut r = Reconnecting::with_opener(cfg.kind(), Box::new(move || open(&owned)), shutdown);
        match (r.opener)() {
            Ok(s) => r.source = Some(s),
            Err(SourceError::Disconnected(why)) => {
                tracing::warn!(source = r.name, "camera not available yet: {why}");
                r.state = CameraState::Reconnecting {
                    attempt: 1,
                    last_error: why,
                };
            }
            Err(fatal) => return Err(fatal),
        }
        Ok(r)
    }

    /// A reconnecting source over any opener (tests use a fake); nothing is opened until the
    /// first `next_frame`.
    pub fn with_opener(
        name: &'static str,
        opener: Opener,
        shutdown: Arc<AtomicBool>,
    ) -> Reconnecting {
        Reconnecting {
            name,
            opener,
            source: None,
            backoff: Backoff::default(),
            state: CameraState::Starting,
            on_state: None,
            shutdown,
        }
    }

    /// Uses these delays instead of [`Backoff::default`].
    pub fn with_backoff(mut self, backoff: Backoff) -> Reconnecting {
        self.backoff = backoff;
        self
    }

    /// Calls `f` on every state change (the pipeline publishes camera status from it).
    pub fn on_state(mut self, f: StateCallback) -> Reconnecting {
        self.on_state = Some(f);
        self
    }

    /// The current camera state.
    pub fn state(&self) -> &CameraState {
        &self.state
    }

    fn set_state(&mut self, state: CameraState) {
        if self.state != state {
            self.state = state;
            if let Some(f) = self.on_state.as_mut() {
                f(&self.state);
            }
        }
    }

    /// Reports the failure and sleeps for the next backoff delay (less when shutdown comes).
    fn wait_before_retry(&mut self, why: String) {
        let attempt = match &self.state {
            CameraState::Reconnecting { attempt, .. } => attempt.saturating_add(1),
            _ => 1,
        };
        let delay = self.backoff.next_delay();
        tracing::warn!(
            source = self.name,
            attempt,
            "camera lost: {why}; reconnecting in {:.1} s",
            delay.as_secs_f64()
        );
        self.set_state(CameraState::Reconnecting {
            attempt,
            last_error: why,
        });
        sleep_unless(&self.shutdown, delay);
    }
}

/// Sleeps for `d`, looking at `shutdown` every [`SHUTDOWN_POLL`] and returning early when it
/// is raised.
fn sleep_unless(shutdown: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    loop {
        let now = Instant::now();
        if shutdown.load(Ordering::Relaxed) || now >= end {
            return;
        }
        std::thread::sleep((end - now).min(SHUTDOWN_POLL));
    }
}

impl Source for Reconnecting {
    fn name(&self) -> &'static str {
        self.name
    }

    fn next_frame(&mut self) -> Result<Next, SourceError> {
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return Ok(Next::End);
            }
            if self.source.is_none() {
                match (self.opener)() {
                    Ok(s) => {
                        tracing::info!(source = self.name, "camera opened");
                        self.source = Some(s);
                    }
                    Err(SourceError::Disconnected(why)) => {
                        self.wait_before_retry(why);
                        continue;
                    }
                    Err(fatal) => return Err(fatal),
                }
            }
            let Some(source) = self.source.as_mut() else {
                continue;
            };
            match source.next_frame() {
                Ok(Next::Frame(f)) => {
                    if matches!(self.state, CameraState::Reconnecting { .. }) {
                        tracing::info!(source = self.name, "camera back");
                    }
                    self.backoff.reset();
                    self.set_state(CameraState::Ok);
                    return Ok(Next::Frame(f));
                }
                Ok(Next::End) => return Ok(Next::End),
                Err(SourceError::Disconnected(why)) => {
                    // Drop it first: a V4L2 or RealSense handle must be released before the
                    // device can be opened again.
                    self.source = None;
                    self.wait_before_retry(why);
                }
                Err(fatal) => return Err(fatal),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let got: Vec<_> = (0..9).map(|_| b.next_delay()).collect();
        let want: Vec<_> = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
            .map(ms)
            .to_vec();
        assert_eq!(got, want);
        b.reset();
        assert_eq!(b.next_delay(), ms(500));
        assert_eq!(
            Backoff::new(ms(10), ms(1)).next_delay(),
            ms(10),
            "max below initial"
        );
    }

    /// A fake camera: each open pops the next script entry; an opened fake delivers `frames`
    /// frames and then reports a disconnect.
    struct Fake {
        frames: u32,
        seq: u64,
    }

    impl Source for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn next_frame(&mut self) -> Result<Next, SourceError> {
            if self.frames == 0 {
                return Err(SourceError::Disconnected("unplugged".into()));
            }
            self.frames -= 1;
            self.seq += 1;
            let rgb = image::RgbImage::new(4, 3);
            let f = Frame::new(rgb, None)
                .map_err(|e| SourceError::Fatal(e.to_string()))?
                .with_time(chrono::Utc::now(), self.seq);
            Ok(Next::Frame(Box::new(f)))
        }
    }

    /// `Ok(n)`: the open succeeds with a fake that gives n frames; `Err`: the open fails.
    type Script = VecDeque<Result<u32, SourceError>>;

    fn scripted(script: Script) -> (Opener, Arc<Mutex<u32>>) {
        let opens = Arc::new(Mutex::new(0));
        let counter = opens.clone();
        let script = Mutex::new(script);
        let opener: Opener = Box::new(move || {
            *counter.lock().unwrap() += 1;
            match script.lock().unwrap().pop_front() {
                Some(Ok(frames)) => Ok(Box::new(Fake { frames, seq: 0 }) as Box<dyn Source>),
                Some(Err(e)) => Err(e),
                None => Err(SourceError::Fatal("script exhausted".into())),
            }
        });
        (opener, opens)
    }

    fn disc(why: &str) -> Result<u32, SourceError> {
        Err(SourceError::Disconnected(why.into()))
    }

    #[test]
    fn reconnects_after_failures_reports_states_and_resets_backoff() {
        // 1 frame, then the camera is lost, 3 failed reopens, then 2 more frames.
        let script: Script = [Ok(1), disc("gone 1"), disc("gone 2"), disc("gone 3"), Ok(2)].into();
        let (opener, opens) = scripted(script);
        let states = Arc::new(Mutex::new(Vec::new()));
        let seen = states.clone();
        let mut r = Reconnecting::with_opener("fake", opener, Arc::new(AtomicBool::new(false)))
            .with_backoff(Backoff::new(ms(1), ms(4)))
            .on_state(Box::new(move |s| seen.lock().unwrap().push(s.clone())));
        assert_eq!(r.state(), &CameraState::Starting);
        let mut seqs = Vec::new();
        for _ in 0..3 {
            match r.next_frame().unwrap() {
                Next::Frame(f) => seqs.push(f.seq),
                Next::End => panic!("unexpected end"),
            }
        }
        assert_eq!(
            seqs,
            [1, 1, 2],
            "frames of the first and the reopened camera"
        );
        assert_eq!(*opens.lock().unwrap(), 5);
        let rec = |attempt, e: &str| CameraState::Reconnecting {
            attempt,
            last_error: e.to_string(),
        };
        assert_eq!(
            *states.lock().unwrap(),
            [
                CameraState::Ok,
                rec(1, "unplugged"),
                rec(2, "gone 1"),
                rec(3, "gone 2"),
                rec(4, "gone 3"),
                CameraState::Ok,
            ]
        );
        // The good frame reset the backoff: the next delay is the initial one again.
        assert_eq!(r.backoff.clone().next_delay(), ms(1));
    }

    #[test]
    fn fatal_errors_pass_through_without_retry() {
        let (opener, opens) = scripted([Err(SourceError::Fatal("bad format".into()))].into());
        let mut r = Reconnecting::with_opener("fake", opener, Arc::new(AtomicBool::new(false)))
            .with_backoff(Backoff::new(ms(1), ms(1)));
        let err = r.next_frame().unwrap_err();
        assert!(
            matches!(err, SourceError::Fatal(ref m) if m == "bad format"),
            "{err}"
        );
        assert_eq!(*opens.lock().unwrap(), 1);
    }

    #[test]
    fn shutdown_interrupts_a_long_backoff() {
        let script: Script = (0..10).map(|_| disc("no camera")).collect();
        let (opener, _) = scripted(script);
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut r = Reconnecting::with_opener("fake", opener, shutdown.clone()).with_backoff(
            Backoff::new(Duration::from_secs(30), Duration::from_secs(30)),
        );
        let flag = shutdown.clone();
        let raiser = std::thread::spawn(move || {
            std::thread::sleep(ms(50));
            flag.store(true, Ordering::Relaxed);
        });
        let t = Instant::now();
        assert!(matches!(r.next_frame(), Ok(Next::End)));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        raiser.join().unwrap();
    }

    #[test]
    fn open_keeps_a_missing_camera_for_retry_but_returns_fatal() {
        let flag = Arc::new(AtomicBool::new(false));
        let bad = SourceConfig::Synthetic(SyntheticConfig {
            fps: -1.0,
            ..SyntheticConfig::default()
        });
        let err = Reconnecting::open(&bad, flag.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("source.fps"), "{err}");
        let ok = Reconnecting::open(&SourceConfig::default(), flag).unwrap();
        assert_eq!(ok.name(), "synthetic");
        assert_eq!(ok.state(), &CameraState::Starting);
    }

    #[test]
    fn pacer_keeps_an_absolute_schedule_and_resyncs_when_late() {
        let mut p = Pacer::new(100.0); // 10 ms period
        let t = Instant::now();
        for _ in 0..6 {
            p.wait();
        }
        let took = t.elapsed();
        assert!(took >= ms(50), "6 frames at 100 fps took {took:?}");
        std::thread::sleep(ms(40)); // 4 periods late
        let t = Instant::now();
        p.wait();
        p.wait();
        // After resync the first frame is immediate and the second one period later, not a
        // burst of 4 catch-up frames.
        assert!(t.elapsed() >= ms(9), "{:?}", t.elapsed());
        let mut unpaced = Pacer::new(0.0);
        let t = Instant::now();
        for _ in 0..1000 {
            unpaced.wait();
        }
        assert!(t.elapsed() < ms(50));
    }

    #[cfg(not(feature = "v4l"))]
    #[test]
    fn hardware_kind_without_its_feature_says_how_to_rebuild() {
        let err = open(&SourceConfig::V4l(V4lConfig::default()))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "this build has no v4l support; rebuild with --features v4l"
        );
    }

    #[cfg(not(feature = "realsense"))]
    #[test]
    fn realsense_without_its_feature_says_how_to_rebuild() {
        let err = open(&SourceConfig::Realsense(RealsenseConfig::default()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("rebuild with --features realsense"), "{err}");
    }
}
