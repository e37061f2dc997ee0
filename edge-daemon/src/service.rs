//! The daemon's side of systemd's service protocol (sd_notify(3), `Type=notify` in
//! `systemd/weld-edge.service`): `READY=1` once the pipeline runs, `STOPPING=1` when a stop
//! begins, a `STATUS=` line with the frame rate, and watchdog pings only while frames are really
//! being decided, so that systemd restarts a pipeline that has stalled.
//!
//! Started by anything but systemd (no `NOTIFY_SOCKET` in the environment) every call does
//! nothing, and without `WATCHDOG_USEC` there is no watchdog to ping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::source::CameraState;

/// What a watchdog check found since the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Frames were decided.
    Flowing,
    /// No frames, because the camera is lost and capture is reconnecting it. A restart would not
    /// bring the camera back, and the loss is already reported (stats, MQTT, HTTP): pinged.
    CameraLost,
    /// No frames and no known reason: capture, the workers or the sinks are stuck. Not pinged,
    /// so systemd restarts the service once the watchdog period runs out.
    Stalled,
}

/// Decides, check by check, whether the pipeline is alive: a plain struct so the rule is tested
/// without a service manager.
#[derive(Debug, Default)]
pub struct Liveness {
    processed: u64,
}

impl Liveness {
    /// `processed`: frames decided so far (the pipeline's counter); `camera`: the camera's state
    /// now.
    pub fn check(&mut self, processed: u64, camera: &CameraState) -> Health {
        let advanced = processed > self.processed;
        self.processed = processed;
        if advanced {
            Health::Flowing
        } else if matches!(camera, CameraState::Reconnecting { .. }) {
            Health::CameraLost
        } else {
            Health::Stalled
        }
    }
}

/// The link to the service manager, read once from the environment at start-up.
#[derive(Debug)]
pub struct Notifier {
    watchdog: Option<Duration>,
    /// A failed send is logged once, not on every check.
    failed: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (a watchdog meant for another
    /// process is not ours). The variables are left in place: the daemon starts no children.
    pub fn from_env() -> Notifier {
        let mut usec = 0;
        let watchdog = (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
            .then(|| Duration::from_micros(usec));
        if let Some(period) = watchdog {
            tracing::info!(
                period_s = period.as_secs_f64(),
                "systemd watchdog: pinged while frames are decided"
            );
        }
        Notifier::with_watchdog(watchdog)
    }

    /// A notifier for a given watchdog period (`None`: no watchdog).
    pub fn with_watchdog(watchdog: Option<Duration>) -> Notifier {
        Notifier {
            watchdog,
            failed: AtomicBool::new(false),
        }
    }

    /// How often to check the pipeline and ping: a quarter of the watchdog period, so a
    /// pipeline that flows is pinged about four times per period and one late check does not
    /// restart it. `None` when systemd asked for no watchdog.
    pub fn check_every(&self) -> Option<Duration> {
        self.watchdog
            .map(|period| (period / 4).max(Duration::from_millis(10)))
    }

    /// The pipeline runs: the model is loaded and the servers are listening.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// A stop has begun (SIGTERM or ctrl-c); queued frames are being finished.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// One line for `systemctl status`.
    pub fn status(&self, line: &str) {
        self.send(&[NotifyState::Status(line)]);
    }

    /// Pings the watchdog unless the pipeline has stalled.
    pub fn watchdog(&self, health: Health) {
        match health {
            Health::Flowing | Health::CameraLost => self.send(&[NotifyState::Watchdog]),
            Health::Stalled => tracing::warn!(
                "no frame decided since the last watchdog check and the camera is not being \
                 reconnected: the watchdog is not pinged, systemd restarts a stalled pipeline"
            ),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        // Without NOTIFY_SOCKET this returns Ok and sends nothing.
        if let Err(e) = sd_notify::notify(false, states)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_feed_the_watchdog_and_a_stall_does_not() {
        let mut l = Liveness::default();
        assert_eq!(l.check(0, &CameraState::Starting), Health::Stalled);
        assert_eq!(l.check(3, &CameraState::Ok), Health::Flowing);
        assert_eq!(l.check(9, &CameraState::Ok), Health::Flowing);
        // Capture delivers nothing though the camera says it is fine: stuck.
        assert_eq!(l.check(9, &CameraState::Ok), Health::Stalled);
        assert_eq!(l.check(10, &CameraState::Ok), Health::Flowing);
    }

    #[test]
    fn a_camera_being_reconnected_keeps_the_watchdog_fed() {
        let mut l = Liveness::default();
        assert_eq!(l.check(5, &CameraState::Ok), Health::Flowing);
        let lost = CameraState::Reconnecting {
            attempt: 2,
            last_error: "no device".into(),
        };
        assert_eq!(l.check(5, &lost), Health::CameraLost);
        assert_eq!(l.check(5, &lost), Health::CameraLost);
        // A source that ended or failed stops the daemon by itself; until then it is no frames
        // for no reason the watchdog can accept.
        assert_eq!(l.check(5, &CameraState::Ended), Health::Stalled);
        assert_eq!(
            l.check(5, &CameraState::Failed("gone".into())),
            Health::Stalled
        );
    }

    #[test]
    fn checks_come_four_times_per_watchdog_period() {
        let n = Notifier::with_watchdog(Some(Duration::from_secs(15)));
        assert_eq!(n.check_every(), Some(Duration::from_millis(3750)));
        assert_eq!(Notifier::with_watchdog(None).check_every(), None);
    }
}
