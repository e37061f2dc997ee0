//! `weld-edge run`: opens the store, loads the model, starts the pipeline and runs until the
//! shutdown future resolves (SIGTERM or ctrl-c in the binary; anything in tests) or the source
//! ends. A model that fails to load does not stop the line: the daemon runs on the rules and
//! says so.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::Notify;
use weld_core::manifest::InputSpec;

use crate::config::{Config, ModelSection};
use crate::model::{Model, ModelError, ModelOptions};
use crate::mqtt::broker::BrokerError;
use crate::mqtt::{self, BrokerAddr, MqttSettings, MqttSink};
use crate::pipeline::{self, Identity, PipelineSettings, Shared, Sink};
use crate::service::{Liveness, Notifier};
use crate::sinks::{JsonlSink, StoreSink};
use crate::store::{Models, Store, StoreError};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("camera: {0}")]
    Source(#[from] crate::source::SourceError),
    /// The source stopped for good while running (the daemon exits non-zero so that a
    /// supervisor restarts it).
    #[error("capture stopped: {0}")]
    CaptureStopped(String),
    #[error("cannot start the pipeline threads: {0}")]
    Threads(io::Error),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

/// What a run did, for the log line at exit and for `bench`.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub elapsed: Duration,
    pub captured: u64,
    pub processed: u64,
    pub dropped: u64,
    pub model_runs: u64,
}

/// Loads the configured model; `Ok(None)` when none is configured. A bundle is verified and
/// golden-checked (with backend `auto`, in every backend this build has, the fastest that
/// passes kept, and the trials logged); a plain ONNX with backend `auto` runs on tract.
pub fn load_model(
    section: Option<&ModelSection>,
    workers: usize,
) -> Result<Option<Model>, ModelError> {
    let Some(m) = section else {
        return Ok(None);
    };
    let mut options = ModelOptions {
        backend: m.backend.clone(),
        threads: workers,
        ort_library: m.ort_library.clone(),
        name: None,
        version: m.version.clone(),
    };
    let loaded = match &m.bundle {
        _ if m.builtin => Some((
            Model::builtin(&options)?,
            crate::model::BUILTIN_NAME.to_string(),
        )),
        Some(bundle) => Some((
            Model::from_bundles(bundle, &m.alternatives, &m.trusted_keys, &options)?,
            bundle.display().to_string(),
        )),
        None => None,
    };
    if let Some((loaded, bundle)) = loaded {
        for (i, t) in loaded.trials.iter().enumerate() {
            match &t.outcome {
                Ok(p) => tracing::info!(
                    bundle = %t.bundle,
                    backend = %t.backend,
                    ms = format!("{:.2}", p.ms),
                    golden_deviation = format!("{:.1e}", p.deviation),
                    chosen = i == loaded.chosen,
                    "backend trial"
                ),
                Err(why) => {
                    tracing::warn!(bundle = %t.bundle, backend = %t.backend, %why, "not usable")
                }
            }
        }
        tracing::info!(
            %bundle,
            signer = %loaded.signer,
            version = %loaded.manifest.version,
            quantization = ?loaded.manifest.quantization,
            backend = loaded.model.backend_name(),
            "bundle verified; running this form"
        );
        return Ok(Some(loaded.model));
    }
    let Some(onnx) = &m.onnx else {
        return Ok(None);
    };
    if options.backend == crate::model::AUTO_BACKEND {
        // A plain ONNX has no golden outputs to prove another runtime equivalent.
        options.backend = "tract".into();
    }
    let input = m.input.clone().unwrap_or_else(|| InputSpec::rgb(224));
    Model::from_onnx(onnx, m.classes.clone(), input, &options).map(Some)
}

/// The shared state and the pipeline settings for `cfg`, with the model loaded (or the reason
/// it is missing logged): the active model installed in `models` when it passes its checks,
/// else the configured one (`deploy::startup_model`).
pub fn prepare(cfg: &Config, models: &Models) -> (Arc<Shared>, PipelineSettings) {
    let mut model_error = None;
    let loaded = crate::deploy::startup_model(models, cfg.model.as_ref(), &cfg.deploy, cfg.workers);
    let model = match loaded {
        Ok(Some(m)) => {
            tracing::info!(
                model = m.name(),
                version = m.version(),
                backend = m.backend_name(),
                "model loaded"
            );
            Some(Arc::new(m))
        }
        Ok(None) => {
            if cfg.policy.kind.uses_model() {
                tracing::warn!(
                    "no model configured: frames the rules are unsure of are reported as \
                     uncertain and kept for labelling"
                );
            }
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "the model failed to load; running on the rules alone");
            model_error = Some(Arc::new(format!("the model failed to load: {e}")));
            None
        }
    };
    let shared = Shared::new(cfg.policy, model);
    shared.model_error.store(model_error);
    let settings = PipelineSettings {
        identity: Identity {
            device: cfg.device.clone(),
            line: cfg.line.clone(),
        },
        queue: cfg.queue,
        workers: cfg.workers,
        detector: cfg.detector.clone(),
        smoothing_window: cfg.smoothing_window,
        part_gap: cfg.part_gap,
    };
    (shared, settings)
}

/// Runs the daemon until `shutdown` resolves or the source ends.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, DaemonError> {
    let store = Store::open(&cfg.store_dir, &cfg.store)?;
    tracing::info!(dir = %cfg.store_dir.display(), results = store.history().len(), "store open");
    let (shared, settings) = prepare(&cfg, store.models());
    let deployer = Arc::new(crate::deploy::Deployer::new(
        shared.clone(),
        store.models().clone(),
        cfg.model.clone(),
        &cfg.deploy,
        cfg.workers,
    ));
    // The MQTT sink goes first: a result is in the outbox before anything else sees it (the
    // outbox's crash rules rely on this order).
    let wake = Arc::new(Notify::new());
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if cfg.mqtt.is_some() {
        sinks.push(Box::new(MqttSink::new(
            store.outbox().clone(),
            wake.clone(),
        )));
    }
    let outbox = store.outbox().clone();
    let http_store = store.clone();
    sinks.push(Box::new(StoreSink::new(store, shared.clone())));
    let live = Arc::new(crate::http::Live::default());
    if cfg.http.is_some() {
        sinks.push(Box::new(crate::http::LiveSink(live.clone())));
    }
    if cfg.stdout_jsonl {
        sinks.push(Box::new(JsonlSink::new(io::stdout())));
    }
    let source = pipeline::open_source(&cfg.source, &shared)?;
    let mqtt = cfg.mqtt.clone().map(|m| {
        let m = with_embedded_broker(m);
        mqtt::spawn(
            m,
            outbox,
            shared.clone(),
            settings.identity.clone(),
            wake,
            Some(deployer.clone()),
        )
    });
    let http = match &cfg.http {
        Some(h) => {
            let state = crate::http::AppState {
                shared: shared.clone(),
                store: http_store,
                identity: settings.identity.clone(),
                mqtt: mqtt.as_ref().map(|m| m.link.clone()),
                live,
                detector: settings.detector.clone(),
                token: h.token.clone(),
                deployer: deployer.clone(),
                started: Instant::now(),
                config: cfg.file.clone(),
            };
            Some(
                crate::http::serve(h, state)
                    .await
                    .map_err(|source| DaemonError::Http {
                        addr: h.addr,
                        source,
                    })?,
            )
        }
        None => None,
    };
    let started = Instant::now();
    let running =
        pipeline::start(settings, shared.clone(), source, sinks).map_err(DaemonError::Threads)?;
    tracing::info!(
        device = %cfg.device,
        line = %cfg.line,
        policy = %cfg.policy.kind,
        workers = cfg.workers,
        "pipeline running"
    );
    let service = Notifier::from_env();
    service.ready();

    // The pipeline's threads end by themselves when a replay finishes; wait for that on a
    // blocking thread so the shutdown future and the periodic log keep running.
    let mut done = tokio::task::spawn_blocking(move || running.join());
    let mut tick = tokio::time::interval(STATS_LOG_EVERY);
    tick.tick().await;
    // Without a watchdog the branch below is disabled; the interval is only there to exist.
    let check_every = service.check_every();
    let mut watchdog = tokio::time::interval(check_every.unwrap_or(STATS_LOG_EVERY));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    watchdog.tick().await;
    let mut liveness = Liveness::default();
    let mut trial_tick = tokio::time::interval(TRIAL_CHECK_EVERY);
    trial_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut last = (Instant::now(), 0u64);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = &mut done => break,
            () = &mut shutdown, if !stopping => {
                tracing::info!("shutting down: finishing queued frames");
                service.stopping();
                shared.shutdown.store(true, Ordering::Relaxed);
                stopping = true;
            }
            _ = watchdog.tick(), if check_every.is_some() && !stopping => {
                let processed = shared.stats.processed.load(Ordering::Relaxed);
                service.watchdog(liveness.check(processed, &shared.stats.camera()));
            }
            _ = trial_tick.tick(), if !stopping => {
                // A rollback loads a model: off the async threads.
                let d = deployer.clone();
                tokio::task::spawn_blocking(move || d.check_trial());
            }
            _ = tick.tick() => {
                let processed = shared.stats.processed.load(Ordering::Relaxed);
                let fps = (processed - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), processed);
                let dropped = shared.stats.dropped.load(Ordering::Relaxed);
                let camera = shared.stats.camera();
                service.status(&format!(
                    "{fps:.1} fps, {processed} frames decided, {dropped} dropped, camera {}",
                    crate::mqtt::status::camera_word(&camera)
                ));
                tracing::info!(
                    fps = format!("{fps:.1}"),
                    processed,
                    dropped,
                    model_runs = shared.stats.model_runs.load(Ordering::Relaxed),
                    uncertain = shared.stats.uncertain.load(Ordering::Relaxed),
                    ?camera,
                    "stats"
                );
            }
        }
    }
    if let Some(h) = http {
        h.stop().await;
    }
    if let Some(m) = mqtt {
        m.stop().await;
    }
    let s = &shared.stats;
    let report = RunReport {
        elapsed: started.elapsed(),
        captured: s.captured.load(Ordering::Relaxed),
        processed: s.processed.load(Ordering::Relaxed),
        dropped: s.dropped.load(Ordering::Relaxed),
        model_runs: s.model_runs.load(Ordering::Relaxed),
    };
    tracing::info!(?report, "stopped");
    match shared.stats.camera() {
        crate::source::CameraState::Failed(why) => Err(DaemonError::CaptureStopped(why)),
        _ => Ok(report),
    }
}

/// Starts the embedded broker when the settings ask for it, and points the client at the
/// address it got. A port already taken is most often a broker installed on the board: the
/// client then publishes to that one.
fn with_embedded_broker(mut m: MqttSettings) -> MqttSettings {
    if let BrokerAddr::Embedded(addr) = m.broker {
        match mqtt::broker::start(addr) {
            Ok(bound) => {
                tracing::info!(addr = %bound, "embedded MQTT broker listening");
                m.broker = BrokerAddr::Embedded(bound);
            }
            Err(BrokerError::InUse { addr }) => tracing::warn!(
                %addr,
                "cannot start the embedded MQTT broker: the port is taken; publishing to the \
                 broker already listening there"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "the embedded MQTT broker did not start; results wait in the outbox"
            ),
        }
    }
    m
}

/// How often `run` logs a stats line.
const STATS_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the model on trial is checked (`deploy::Deployer::check_trial`).
const TRIAL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Resolves on ctrl-c or SIGTERM (systemd's stop).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
