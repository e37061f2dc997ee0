//! The HTTP API (DESIGN.md "HTTP API"), the live dashboard and `/metrics`, on axum.
//!
//! - Reads (`status`, `stats`, `results`, the stream, the latest frame, the dashboard,
//!   `/metrics`) are open to whoever can reach the listener; it binds 127.0.0.1 unless
//!   `[http] bind` says otherwise.
//! - Calls that change state, `inspect` (it takes the line's CPU) and captures (plant images)
//!   need `Authorization: Bearer <token>`, the token read from `[http] token_file` or
//!   `token_env`, compared in constant time. With no token configured they are refused (403),
//!   never open.
//! - Every error is JSON `{"error", "detail"}` with a fitting status, also for unknown routes,
//!   wrong methods, oversized bodies (413) and timeouts (408).
//! - The OpenAPI document is generated from the handlers (utoipa) at `/api/v1/openapi.json`.

pub mod api;
pub mod dashboard;
pub mod live;
pub mod metrics;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weld_core::rules::Detector;

use crate::mqtt::Link;
use crate::mqtt::config::{Secret, read_secret};
use crate::pipeline::{Identity, Shared};
use crate::store::Store;

pub use live::{Live, LiveSink};

/// `[http]`: the API, the dashboard and `/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// `false` turns the HTTP server off.
    pub enabled: bool,
    /// Address to listen on. Default 127.0.0.1 (this board only); `0.0.0.0` opens the reads and
    /// the dashboard to the network (calls that change state still need the token).
    pub bind: IpAddr,
    /// Port, default 8080; 0 picks a free one (logged).
    pub port: u16,
    /// File holding the API token (first line).
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the API token.
    pub token_env: Option<String>,
    /// Largest request body in bytes (uploads to `inspect`), 1024..=268435456. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Seconds a request may take before it is answered 408, 1..=600. Default 30.
    pub request_timeout_s: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            enabled: true,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8080,
            token_file: None,
            token_env: None,
            max_body_bytes: 16 * 1024 * 1024,
            request_timeout_s: 30,
        }
    }
}

/// The checked `[http]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub addr: SocketAddr,
    /// `None`: state-changing calls are refused.
    pub token: Option<Secret>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

/// Shortest accepted API token.
const MIN_TOKEN_LEN: usize = 16;

impl HttpSection {
    /// Every problem, each naming its `http.` key; `Ok(None)` when HTTP is off.
    pub fn resolve(&self) -> Result<Option<HttpSettings>, Vec<String>> {
        if !self.enabled {
            return Ok(None);
        }
        let mut problems = Vec::new();
        let token = read_secret(
            "http.token",
            self.token_file.as_deref(),
            self.token_env.as_deref(),
            &mut problems,
        );
        if token
            .as_ref()
            .is_some_and(|t| t.expose().len() < MIN_TOKEN_LEN)
        {
            problems.push(format!(
                "http token is shorter than {MIN_TOKEN_LEN} characters; use a long random one \
                 (e.g. `openssl rand -hex 32`)"
            ));
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.max_body_bytes) {
            problems.push(format!(
                "http.max_body_bytes = {}: must be 1024..=268435456",
                self.max_body_bytes
            ));
        }
        if !(1..=600).contains(&self.request_timeout_s) {
            problems.push(format!(
                "http.request_timeout_s = {}: must be 1..=600",
                self.request_timeout_s
            ));
        }
        if problems.is_empty() {
            Ok(Some(HttpSettings {
                addr: SocketAddr::new(self.bind, self.port),
                token,
                max_body_bytes: self.max_body_bytes,
                request_timeout: Duration::from_secs(self.request_timeout_s),
            }))
        } else {
            Err(problems)
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub store: Store,
    pub identity: Identity,
    /// The MQTT link, when MQTT is on.
    pub mqtt: Option<Arc<Link>>,
    pub live: Arc<Live>,
    /// The detector of the running config, for `inspect`.
    pub detector: Detector,
    pub token: Option<Secret>,
    /// Installs and switches models (the `models` routes).
    pub deployer: Arc<crate::deploy::Deployer>,
    pub started: Instant,
    /// The config file as loaded (paths, no secrets), for `GET config`.
    pub config: serde_json::Value,
}

/// A running server.
#[derive(Debug)]
pub struct HttpServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl HttpServer {
    /// Stops accepting, lets requests in flight finish (streams end), and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            tracing::warn!("the HTTP server did not stop within 5 s");
        }
    }
}

/// Binds `settings.addr` and serves the API on the current runtime.
pub async fn serve(settings: &HttpSettings, state: AppState) -> std::io::Result<HttpServer> {
    let listener = tokio::net::TcpListener::bind(settings.addr).await?;
    let addr = listener.local_addr()?;
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let live = state.live.clone();
    let app = api::router(Arc::new(state), settings);
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop_rx.changed().await;
            // Ends the open result streams so graceful shutdown does not wait on them.
            live.close();
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    });
    tracing::info!(%addr, "HTTP API listening");
    Ok(HttpServer { addr, task, stop })
}
