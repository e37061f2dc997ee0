//! The embedded MQTT broker (rumqttd): started when no plant broker is configured, so that a
//! fresh board (and the demo) has somewhere to publish and `mosquitto_sub -t 'weld/#' -v` shows
//! results at once. MQTT 3.1.1, plain TCP, in memory (nothing survives a restart: the daemon's
//! outbox is what makes delivery reliable, not the broker).
//!
//! Its limit: rumqttd keeps each topic's recent messages in a bounded log (here 2 x 1 MB, about
//! 2600 results) and a subscriber that falls further behind than that skips the oldest. At a
//! line's 30-60 results/s no dashboard falls that far behind, but a burst (the outbox draining
//! thousands of results after the broker was unreachable) can outrun a slow one. Where every
//! result must reach every dashboard, use the plant's broker (`mqtt.host`), e.g. mosquitto with
//! persistent sessions.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BrokerError {
    /// Another process already listens on the address; usually a broker installed on the board
    /// (Debian's mosquitto starts one on 127.0.0.1:1883).
    #[error("{addr} is already in use")]
    InUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the embedded broker: {0}")]
    Start(String),
}

/// Largest message the embedded broker accepts: a result with many findings is a few KB, a
/// command well under 1 KB.
const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// rumqttd keeps each topic's messages in a commit log of segments; its defaults (100 MB x 10)
/// are for a server. A result is ~1 KB, so 1 MB x 2 still holds ~2000 per topic for slow
/// subscribers, and bounds the broker's memory on the board.
const SEGMENT_BYTES: usize = 1024 * 1024;
const SEGMENTS: usize = 2;

/// Starts the broker on `addr` in its own threads and returns the address it listens on once
/// it does (port 0 picks a free port). The threads live as long as the process.
pub fn start(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    // rumqttd binds inside its own thread and only logs a failure; binding here first turns a
    // taken port into an error the daemon can act on (and resolves port 0). The listener is
    // dropped just before rumqttd binds; SO_REUSEADDR (set by tokio) lets it take the port
    // straight away.
    let addr = match TcpListener::bind(addr) {
        Ok(l) => l
            .local_addr()
            .map_err(|source| BrokerError::Bind { addr, source })?,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(BrokerError::InUse { addr });
        }
        Err(source) => return Err(BrokerError::Bind { addr, source }),
    };
    let server = rumqttd::ServerSettings {
        name: "weld-edge-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: MAX_PAYLOAD_BYTES,
            max_inflight_count: 1024,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENTS,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    wait_listening(addr)?;
    Ok(addr)
}

/// Waits (up to 5 s) until a TCP connection to `addr` succeeds.
fn wait_listening(addr: SocketAddr) -> Result<(), BrokerError> {
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(BrokerError::Start(format!(
                    "not listening on {addr} after 5 s: {e}"
                )));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}
