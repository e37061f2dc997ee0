//! `kind = "realsense"`: an Intel RealSense RGB-D camera (D405 and the other D400 models)
//! through librealsense2: colour and depth streams, depth aligned to colour by librealsense's
//! align block, the depth unit read from the device and the intrinsics from the colour stream.
//!
//! The config is compiled in every build; the device needs the cargo feature `realsense` and
//! librealsense2 (found through `pkg-config`, version 2.x) at build and run time.
//!
//! librealsense's pipeline and align block are not `Send` (realsense-rust marks only the
//! pipeline), and this crate allows no `unsafe`, so they live on a capture thread of their own;
//! the source receives finished frames from it through a channel of one frame.

use serde::{Deserialize, Serialize};

use super::camera_mode_problems;

/// Largest frame side asked of the camera, px: D400 colour modes end at 1920x1080.
const MAX_SIDE_PX: u32 = 4096;
/// Highest frame rate asked of the camera, frames/s: D400 depth modes end at 300.
const MAX_CAMERA_FPS: u32 = 300;

/// `[source]` with `kind = "realsense"`.
///
/// ```toml
/// [source]
/// kind = "realsense"
/// width = 848
/// height = 480
/// fps = 30
/// serial = "123622270300"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealsenseConfig {
    /// Serial number of the camera to use (printed on it, and by `rs-enumerate-devices`);
    /// leave out to use the first camera found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Width of the colour and depth streams, px, 1..=4096 (default 640); must be a mode the
    /// camera has for both (e.g. 640x480, 848x480, 1280x720).
    pub width: u32,
    /// Height of both streams, px, 1..=4096 (default 480).
    pub height: u32,
    /// Frame rate of both streams, 1..=300 frames/s (default 30); must be a rate the camera
    /// has for that size (typically 5, 15, 30, 60, 90).
    pub fps: u32,
}

impl Default for RealsenseConfig {
    fn default() -> RealsenseConfig {
        RealsenseConfig {
            serial: None,
            width: 640,
            height: 480,
            fps: 30,
        }
    }
}

impl RealsenseConfig {
    /// Every invalid value, each naming its key and the allowed values.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = &self.serial
            && (s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            out.push(format!(
                "source.serial is {s:?}; allowed: the camera's serial number (letters and \
                 digits), or leave it out for the first camera"
            ));
        }
        out.extend(camera_mode_problems(
            [self.width, self.height, self.fps],
            MAX_SIDE_PX,
            MAX_CAMERA_FPS,
        ));
        out
    }
}

#[cfg(feature = "realsense")]
pub use device::RealsenseSource;

#[cfg(feature = "realsense")]
mod device {
    use std::collections::HashSet;
    use std::ffi::CString;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use image::RgbImage;
    use realsense_rust::config::Config;
    use realsense_rust::context::Context;
    use realsense_rust::frame::{ColorFrame, CompositeFrame, DepthFrame, PixelKind};
    use realsense_rust::kind::{Rs2Format, Rs2Option, Rs2StreamKind};
    use realsense_rust::pipeline::{ActivePipeline, InactivePipeline};
    use realsense_rust::processing_blocks::align::Align;
    use weld_core::{DepthImage, DepthMap, Frame, Intrinsics};

    use super::RealsenseConfig;
    use crate::source::{Next, Source, SourceError};

    /// How long one wait for frames blocks, so the thread sees a stop request this often.
    const WAIT: Duration = Duration::from_millis(500);
    /// A camera that delivers nothing for this long is lost (60 periods at 30 fps; the first
    /// frames after start take up to a second while auto exposure settles).
    const LOST_AFTER: Duration = Duration::from_secs(3);
    /// How long `open` waits for the thread to start the pipeline: librealsense takes 1-3 s to
    /// load a D400's calibration and start both streams.
    const START_TIMEOUT: Duration = Duration::from_secs(15);
    /// librealsense reports the depth unit in metres.
    const MM_PER_M: f32 = 1000.0;

    type Delivery = Result<Frame, SourceError>;

    /// A RealSense camera, run on its own capture thread (see the module docs).
    pub struct RealsenseSource {
        frames: Option<Receiver<Delivery>>,
        stop: Arc<AtomicBool>,
        worker: Option<JoinHandle<()>>,
        seq: u64,
    }

    impl std::fmt::Debug for RealsenseSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RealsenseSource")
                .field("seq", &self.seq)
                .finish_non_exhaustive()
        }
    }

    impl RealsenseSource {
        /// Starts the capture thread and waits until the pipeline runs (or fails to).
        pub fn open(cfg: &RealsenseConfig) -> Result<RealsenseSource, SourceError> {
            let (ready_tx, ready_rx) = sync_channel::<Result<(), SourceError>>(1);
            // One frame in flight: a slow consumer makes librealsense drop frames at the
            // camera instead of this queue growing stale.
            let (frame_tx, frame_rx) = sync_channel::<Delivery>(1);
            let stop = Arc::new(AtomicBool::new(false));
            let (cfg, flag) = (cfg.clone(), stop.clone());
            let worker = std::thread::Builder::new()
                .name("realsense".into())
                .spawn(move || capture(&cfg, &flag, &ready_tx, &frame_tx))
                .map_err(|e| SourceError::Fatal(format!("cannot start the capture thread: {e}")))?;
            let mut source = RealsenseSource {
                frames: Some(frame_rx),
                stop,
                worker: Some(worker),
                seq: 0,
            };
            match ready_rx.recv_timeout(START_TIMEOUT) {
                Ok(Ok(())) => Ok(source),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    source.shutdown();
                    Err(SourceError::Disconnected(format!(
                        "the RealSense pipeline did not start within {} s",
                        START_TIMEOUT.as_secs()
                    )))
                }
            }
        }

        fn shutdown(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            // Dropping the receiver unblocks a thread waiting to hand over a frame.
            self.frames = None;
            if let Some(w) = self.worker.take() {
                let _ = w.join(); // at most one WAIT away
            }
        }
    }

    impl Drop for RealsenseSource {
        fn drop(&mut self) {
            self.shutdown();
        }
    }

    impl Source for RealsenseSource {
        fn name(&self) -> &'static str {
            "realsense"
        }

        fn next_frame(&mut self) -> Result<Next, SourceError> {
            let Some(frames) = &self.frames else {
                return Err(SourceError::Disconnected("capture stopped".into()));
            };
            match frames.recv_timeout(LOST_AFTER + WAIT) {
                Ok(Ok(frame)) => {
                    self.seq += 1;
                    let ts = frame.ts;
                    Ok(Next::Frame(Box::new(frame.with_time(ts, self.seq))))
                }
                Ok(Err(e)) => Err(e),
                Err(RecvTimeoutError::Timeout) => Err(SourceError::Disconnected(format!(
                    "no frame for {} s",
                    (LOST_AFTER + WAIT).as_secs_f32()
                ))),
                Err(RecvTimeoutError::Disconnected) => {
                    Err(SourceError::Disconnected("the capture thread ended".into()))
                }
            }
        }
    }

    /// What the running pipeline needs; dropped (device released) when the thread ends.
    struct Running {
        // Field order is drop order: the align block and pipeline before the context.
        align: Align,
        pipeline: ActivePipeline,
        _context: Context,
        unit_mm: f32,
        intrinsics: Option<Intrinsics>,
    }

    fn lost(what: &str, e: impl std::fmt::Display) -> SourceError {
        SourceError::Disconnected(format!("RealSense: {what}: {e}"))
    }

    fn start(cfg: &RealsenseConfig) -> Result<Running, SourceError> {
        let context = Context::new().map_err(|e| lost("cannot create a context", e))?;
        let devices = context.query_devices(HashSet::new());
        if devices.is_empty() {
            return Err(SourceError::Disconnected(
                "no RealSense camera found".into(),
            ));
        }
        let pipeline = InactivePipeline::try_from(&context)
            .map_err(|e| lost("cannot create a pipeline", e))?;
        let mut config = Config::new();
        let bad = |e: &dyn std::fmt::Display| SourceError::Fatal(format!("RealSense config: {e}"));
        if let Some(serial) = &cfg.serial {
            let c = CString::new(serial.as_str()).map_err(|e| bad(&e))?;
            config.enable_device_from_serial(&c).map_err(|e| bad(&e))?;
        }
        let (w, h, fps) = (cfg.width as usize, cfg.height as usize, cfg.fps as usize);
        config
            .enable_stream(Rs2StreamKind::Depth, None, w, h, Rs2Format::Z16, fps)
            .map_err(|e| bad(&e))?;
        config
            .enable_stream(Rs2StreamKind::Color, None, w, h, Rs2Format::Rgb8, fps)
            .map_err(|e| bad(&e))?;
        if !pipeline.can_resolve(&config) {
            // The camera is there (or the serial is wrong) but has no such mode.
            return Err(SourceError::Fatal(format!(
                "RealSense: no camera{} has colour and depth at {}x{} and {} fps; see \
                 rs-enumerate-devices for its modes",
                cfg.serial
                    .as_ref()
                    .map(|s| format!(" with serial {s}"))
                    .unwrap_or_default(),
                cfg.width,
                cfg.height,
                cfg.fps
            )));
        }
        let pipeline = pipeline
            .start(Some(config))
            .map_err(|e| lost("cannot start the pipeline", e))?;
        let unit_m = pipeline
            .profile()
            .device()
            .sensors()
            .iter()
            .find(|s| s.supports_option(Rs2Option::DepthUnits))
            .and_then(|s| s.get_option(Rs2Option::DepthUnits))
            .ok_or_else(|| {
                SourceError::Fatal("RealSense: the camera reports no depth unit".into())
            })?;
        let intrinsics = pipeline
            .profile()
            .streams()
            .iter()
            .find(|s| s.kind() == Rs2StreamKind::Color)
            .and_then(|s| s.intrinsics().ok())
            .map(|i| Intrinsics {
                fx: f64::from(i.fx()),
                fy: f64::from(i.fy()),
                cx: f64::from(i.ppx()),
                cy: f64::from(i.ppy()),
            });
        // Queue of one: the align block works on the latest frameset only.
        let align = Align::new(Rs2StreamKind::Color, 1)
            .map_err(|e| lost("cannot create the align block", e))?;
        Ok(Running {
            align,
            pipeline,
            _context: context,
            unit_mm: unit_m * MM_PER_M,
            intrinsics,
        })
    }

    /// The capture thread: starts the pipeline, reports readiness, then delivers aligned
    /// frames until stopped, the receiver is gone, or the camera is lost.
    fn capture(
        cfg: &RealsenseConfig,
        stop: &AtomicBool,
        ready: &SyncSender<Result<(), SourceError>>,
        out: &SyncSender<Delivery>,
    ) {
        let mut run = match start(cfg) {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        if ready.send(Ok(())).is_err() {
            return;
        }
        let mut waited = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            let frames = match run.pipeline.wait(Some(WAIT)) {
                Ok(f) => f,
                Err(realsense_rust::pipeline::FrameWaitError::DidTimeoutBeforeFrameArrival) => {
                    waited += WAIT;
                    if waited >= LOST_AFTER {
                        let _ = out.send(Err(lost("no frames", format!("{} s", waited.as_secs()))));
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    let _ = out.send(Err(lost("frame wait failed", e)));
                    return;
                }
            };
            waited = Duration::ZERO;
            let ts = chrono::Utc::now();
            let delivery = align(&mut run, frames).map(|f| f.with_time(ts, 0));
            let failed = delivery.is_err();
            if out.send(delivery).is_err() || failed {
                return;
            }
        }
    }

    /// Aligns depth to colour and copies both into a [`Frame`].
    fn align(run: &mut Running, frames: CompositeFrame) -> Result<Frame, SourceError> {
        run.align.queue(frames).map_err(|e| lost("align", e))?;
        let aligned = run.align.wait(WAIT).map_err(|e| lost("align", e))?;
        let color: Vec<ColorFrame> = aligned.frames_of_type();
        let depth: Vec<DepthFrame> = aligned.frames_of_type();
        let (Some(color), Some(depth)) = (color.first(), depth.first()) else {
            return Err(lost("frameset", "without colour or depth"));
        };
        let (w, h) = (color.width(), color.height());
        let mut rgb = Vec::with_capacity(w * h * 3);
        for row in 0..h {
            for col in 0..w {
                match color.get_unchecked(col, row) {
                    PixelKind::Rgb8 { r, g, b } => rgb.extend_from_slice(&[*r, *g, *b]),
                    _ => return Err(SourceError::Fatal("RealSense colour is not RGB8".into())),
                }
            }
        }
        let mut z = Vec::with_capacity(w * h);
        // Aligned to colour, the depth image has the colour image's size.
        for row in 0..h {
            for col in 0..w {
                z.push(match depth.get(col, row) {
                    Some(PixelKind::Z16 { depth }) => *depth,
                    _ => 0, // outside the depth image or no return: no depth
                });
            }
        }
        let bad = |e: &dyn std::fmt::Display| SourceError::Fatal(format!("RealSense frame: {e}"));
        let (w32, h32) = (
            u32::try_from(w).map_err(|e| bad(&e))?,
            u32::try_from(h).map_err(|e| bad(&e))?,
        );
        let rgb = RgbImage::from_raw(w32, h32, rgb).ok_or_else(|| bad(&"colour buffer size"))?;
        let values = DepthImage::from_raw(w32, h32, z).ok_or_else(|| bad(&"depth buffer size"))?;
        Frame::new(
            rgb,
            Some(DepthMap {
                values,
                unit_mm: run.unit_mm,
            }),
        )
        .map(|f| f.with_intrinsics(run.intrinsics))
        .map_err(|e| bad(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_every_key() {
        let cfg = RealsenseConfig {
            serial: Some("12 34".into()),
            width: 0,
            height: 5000,
            fps: 301,
        };
        let p = cfg.problems();
        for key in [
            "source.serial",
            "source.width",
            "source.height",
            "source.fps",
        ] {
            assert!(
                p.iter().any(|m| m.starts_with(key)),
                "{key} missing in {p:?}"
            );
        }
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(RealsenseConfig::default().problems().is_empty());
    }
}
