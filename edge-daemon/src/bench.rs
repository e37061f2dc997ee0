//! `weld-edge bench`: runs the configured pipeline (source, policy, model, store) for a fixed
//! time and prints per-stage latency quantiles, end-to-end frames per second, drops, the share
//! of frames sent to the model and the peak memory of the process.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::config::Config;
use crate::daemon::{self, DaemonError};
use crate::pipeline::{self, Sink};
use crate::sinks::StoreSink;
use crate::store::Store;

/// Figures of one bench run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub seconds: f64,
    pub captured: u64,
    pub processed: u64,
    pub dropped: u64,
    pub model_runs: u64,
    pub uncertain: u64,
    /// (stage, p50, p90, p99, max) in ms, stages with at least one sample.
    pub stages: Vec<(&'static str, f64, f64, f64, f64)>,
    /// Peak resident memory of the process, kB (Linux `VmHWM`), when known.
    pub peak_rss_kb: Option<u64>,
}

impl BenchReport {
    /// Results per second over the run.
    pub fn fps(&self) -> f64 {
        self.processed as f64 / self.seconds
    }

    /// The report as a table for people.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "stage         p50 ms   p90 ms   p99 ms   max ms");
        for (name, p50, p90, p99, max) in &self.stages {
            let _ = writeln!(s, "{name:<10} {p50:>9.2} {p90:>8.2} {p99:>8.2} {max:>8.2}");
        }
        let share = if self.processed == 0 {
            0.0
        } else {
            100.0 * self.model_runs as f64 / self.processed as f64
        };
        let _ = writeln!(
            s,
            "frames: {} captured, {} processed, {} dropped in {:.1} s: {:.1} fps",
            self.captured,
            self.processed,
            self.dropped,
            self.seconds,
            self.fps()
        );
        let _ = writeln!(
            s,
            "model ran on {} frames ({share:.1}%); {} results uncertain",
            self.model_runs, self.uncertain
        );
        match self.peak_rss_kb {
            Some(kb) => {
                let _ = writeln!(s, "peak RSS: {:.1} MB", kb as f64 / 1024.0);
            }
            None => {
                let _ = writeln!(s, "peak RSS: unknown on this system");
            }
        }
        s
    }
}

fn quantiles(name: &'static str, h: &Histogram<u64>) -> Option<(&'static str, f64, f64, f64, f64)> {
    (!h.is_empty()).then(|| {
        let ms = |us: u64| us as f64 / 1000.0;
        (
            name,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
        )
    })
}

/// Peak resident set size of this process in kB, from `/proc/self/status`.
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs the pipeline of `cfg` for `duration` (or until a replay ends) with the store as the
/// only sink, and measures it. The model is loaded and warmed up before the clock starts; the
/// histograms cover every frame.
pub fn run(cfg: &Config, duration: Duration) -> Result<BenchReport, DaemonError> {
    let store = Store::open(&cfg.store_dir, &cfg.store)?;
    let (shared, settings) = daemon::prepare(cfg, store.models());
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(StoreSink::new(store, shared.clone()))];
    let source = pipeline::open_source(&cfg.source, &shared)?;
    let started = Instant::now();
    let running =
        pipeline::start(settings, shared.clone(), source, sinks).map_err(DaemonError::Threads)?;
    while started.elapsed() < duration && !running.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    shared.shutdown.store(true, Ordering::Relaxed);
    running.join();
    let seconds = started.elapsed().as_secs_f64();
    let s = &shared.stats;
    let lat = s.latencies();
    Ok(BenchReport {
        seconds,
        captured: s.captured.load(Ordering::Relaxed),
        processed: s.processed.load(Ordering::Relaxed),
        dropped: s.dropped.load(Ordering::Relaxed),
        model_runs: s.model_runs.load(Ordering::Relaxed),
        uncertain: s.uncertain.load(Ordering::Relaxed),
        stages: lat
            .stages()
            .into_iter()
            .filter_map(|(n, h)| quantiles(n, h))
            .collect(),
        peak_rss_kb: peak_rss_kb(),
    })
}
