//! The MQTT connection: one task that owns the decisions (what to send, what an
//! acknowledgement removes, what to answer) and one that only drives rumqttc's event loop and
//! reconnects with backoff. They talk over a channel, so rumqttc's `poll` is never cancelled
//! half-way through a write (it is not cancel-safe), and a slow disk flush never stalls pings.
//!
//! A lost connection is a handshake between the two, so that nothing handed to rumqttc for the
//! old connection goes out on the new one (it would break the packet-id bookkeeping of the
//! [`Ledger`] and the outbox order): the poll task reports the loss and waits; the decision task
//! forgets the connection, stops handing publishes over and answers; only then does the poll
//! task empty rumqttc's request queue and buffered events (`EventLoop::clean`, `pending`,
//! `state.events`) and reconnect. The new connection starts from the oldest outbox entry.
//!
//! Per connection: subscribe to `…/cmd/+`, publish the retained status, then send the outbox
//! from its oldest entry, at most `inflight` unacknowledged at once ([`Ledger`]). Entries are
//! sent only once on disk ([`Outbox::flush`] first: group commit). The status is re-published
//! when it changes, stats every `stats_every`. On stop: give the outbox a moment to drain,
//! publish `offline` (retained), disconnect.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use weld_core::messages::{CommandReply, DeviceState};

use super::commands;
use super::config::{BrokerAddr, MqttSettings};
use super::ledger::{Ledger, Sent};
use super::status::{self, Health};
use crate::pipeline::{Identity, Shared};
use crate::source::Backoff;
use crate::store::Outbox;

/// The link's state and counters, for stats, the HTTP API and tests.
#[derive(Debug, Default)]
pub struct Link {
    pub connected: AtomicBool,
    /// Successful connections since start.
    pub connects: AtomicU64,
    /// Outbox entries handed to the broker (re-sends included).
    pub sent: AtomicU64,
    /// Outbox entries the broker acknowledged.
    pub acked: AtomicU64,
    /// Outbox flushes (each covers every entry pushed before it).
    pub flushes: AtomicU64,
    /// Time spent in those flushes, µs.
    pub flush_us: AtomicU64,
    /// The last connection error.
    pub last_error: Mutex<Option<String>>,
}

/// How long a stop waits for the outbox to drain; whatever is left is sent after the next
/// start.
const DRAIN_ON_STOP: Duration = Duration::from_secs(2);
/// How long a stop then waits for the `offline` status and the DISCONNECT to be written.
const GOODBYE: Duration = Duration::from_secs(1);
/// How often the status is re-assessed (and published when it changed).
const STATUS_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Largest message the client sends or accepts (rumqttc's default is 10 KB, less than a result
/// with many findings).
const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// A running MQTT connection.
#[derive(Debug)]
pub struct MqttClient {
    pub link: Arc<Link>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttClient {
    /// Drains briefly, publishes `offline`, disconnects and waits for the task to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the MQTT task failed");
        }
    }
}

/// Starts the connection tasks on the current tokio runtime. `wake` is notified by the sink
/// after each push.
pub fn spawn(
    settings: MqttSettings,
    outbox: Outbox,
    shared: Arc<Shared>,
    identity: Identity,
    wake: Arc<Notify>,
    deployer: Option<Arc<crate::deploy::Deployer>>,
) -> MqttClient {
    let link = Arc::new(Link::default());
    let (replies_tx, replies) = mpsc::channel(16);
    let (stop, stop_rx) = watch::channel(false);
    let ctx = Ctx {
        ledger: Ledger::new(usize::from(settings.inflight)),
        settings,
        outbox,
        shared,
        identity,
        wake,
        link: link.clone(),
        started: Instant::now(),
        deployer,
        replies_tx,
    };
    let task = tokio::spawn(ctx.run(stop_rx, replies));
    MqttClient { link, stop, task }
}

/// rumqttc options from the settings: clean session (the outbox, not the broker, keeps what
/// is unsent), the `offline` last will, credentials, TLS.
fn options(settings: &MqttSettings, will: Vec<u8>) -> MqttOptions {
    let (host, port) = match &settings.broker {
        BrokerAddr::External { host, port } => (host.clone(), *port),
        BrokerAddr::Embedded(addr) => {
            let ip = if addr.ip().is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                addr.ip()
            };
            (ip.to_string(), addr.port())
        }
    };
    let mut o = MqttOptions::new(settings.client_id.clone(), host, port);
    o.set_keep_alive(settings.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        // A few more than the outbox window: status, stats and replies share the packet ids.
        .set_inflight(settings.inflight.saturating_add(32))
        .set_last_will(LastWill::new(
            settings.topics.status(),
            will,
            QoS::AtLeastOnce,
            true,
        ));
    if let Some((user, password)) = &settings.credentials {
        o.set_credentials(user.clone(), password.expose());
    }
    if let Some(tls) = &settings.tls {
        // Checked when the config was loaded; an error here would be a bug, reported as one.
        match super::tls::client_config(tls) {
            Ok(c) => {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(c),
                ));
            }
            Err(e) => tracing::error!(error = %e, "TLS configuration"),
        }
    }
    o
}

struct Ctx {
    settings: MqttSettings,
    outbox: Outbox,
    shared: Arc<Shared>,
    identity: Identity,
    wake: Arc<Notify>,
    link: Arc<Link>,
    ledger: Ledger,
    started: Instant,
    /// Runs `deploy` commands; `None` in a process that installs no models (`bench-mqtt`).
    deployer: Option<Arc<crate::deploy::Deployer>>,
    /// Replies of commands that ran off this task (`deploy`), to publish from it.
    replies_tx: mpsc::Sender<CommandReply>,
}

/// Per-connection state of the decision task.
struct Conn {
    connected: bool,
    /// The status last published on this connection.
    published: Option<(DeviceState, Vec<String>)>,
    model_failures_seen: u64,
    /// Results processed at the previous stats message, and when.
    last_stats: (Instant, u64),
}

impl Ctx {
    async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut replies: mpsc::Receiver<CommandReply>,
    ) {
        let options = options(&self.settings, self.will());
        let cap = usize::from(self.settings.inflight) + 64;
        let (client, eventloop) = AsyncClient::new(options, cap);
        let (events_tx, mut events) = mpsc::channel(1024);
        let wake = self.wake.clone();
        let (shared, identity) = (self.shared.clone(), self.identity.clone());
        let will_topic = self.settings.topics.status();
        let will = move || {
            let s = status::status(
                &identity,
                &shared,
                DeviceState::Offline,
                vec!["connection lost".into()],
            );
            LastWill::new(
                will_topic.clone(),
                serde_json::to_vec(&s).unwrap_or_default(),
                QoS::AtLeastOnce,
                true,
            )
        };
        let poller = tokio::spawn(poll_loop(eventloop, events_tx, will));
        let mut conn = Conn {
            connected: false,
            published: None,
            model_failures_seen: self.shared.stats.model_failures.load(Ordering::Relaxed),
            last_stats: (Instant::now(), 0),
        };
        let mut stats_tick = tokio::time::interval(self.settings.stats_every);
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_tick = tokio::time::interval(STATUS_CHECK_EVERY);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev, &client, &mut conn).await,
                    None => break,
                },
                () = wake.notified(), if conn.connected => self.pump(&client).await,
                Some(reply) = replies.recv() => self.publish_reply(&client, &reply),
                _ = stats_tick.tick(), if conn.connected => self.publish_stats(&client, &mut conn),
                _ = status_tick.tick(), if conn.connected => self.publish_status(&client, &mut conn, false),
                _ = stop.changed() => break,
            }
        }
        self.finish(&client, &mut conn, &mut events).await;
        poller.abort();
    }

    async fn finish(
        &mut self,
        client: &AsyncClient,
        conn: &mut Conn,
        events: &mut mpsc::Receiver<Polled>,
    ) {
        if !conn.connected {
            return;
        }
        let deadline = tokio::time::Instant::now() + DRAIN_ON_STOP;
        // Whatever the pipeline pushed last.
        self.pump(client).await;
        while self.ledger.outstanding() > 0 || self.outbox.depth().len > 0 {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(ev)) => self.on_event(ev, client, conn).await,
                _ => break,
            }
            if !conn.connected {
                return;
            }
        }
        // Goodbye: the retained `offline`, then DISCONNECT (so the broker drops the last will).
        // rumqttc writes requests in order and reports the DISCONNECT only once it is flushed
        // to the socket, so seeing it means the status went out before it.
        let deadline = tokio::time::Instant::now() + GOODBYE;
        let offline = self.status_json(DeviceState::Offline, vec!["stopped".into()]);
        if client
            .try_publish(
                self.settings.topics.status(),
                QoS::AtLeastOnce,
                true,
                offline,
            )
            .is_ok()
        {
            self.ledger.handed(Sent::Other);
        }
        if client.try_disconnect().is_ok() {
            while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.recv()).await {
                match ev {
                    Polled::Event(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Polled::Event(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        self.ledger.on_sent(pkid);
                    }
                    Polled::Event(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = self.ledger.on_ack(ack.pkid)
                            && self.outbox.ack(seq).is_ok()
                        {
                            self.link.acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Polled::Lost { ack, .. } => {
                        let _ = ack.send(());
                        break;
                    }
                    Polled::Event(_) => {}
                }
            }
        }
        let left = self.outbox.depth().len;
        tracing::info!(
            left,
            "MQTT stopped; results left in the outbox are sent after the next start"
        );
    }

    async fn on_event(&mut self, ev: Polled, client: &AsyncClient, conn: &mut Conn) {
        let ev = match ev {
            Polled::Event(ev) => ev,
            Polled::Lost { error, ack } => {
                self.on_lost(error, conn);
                // The poll task waits for this before it clears rumqttc's queues.
                let _ = ack.send(());
                return;
            }
        };
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                conn.connected = true;
                conn.published = None;
                *self
                    .link
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                self.ledger.reset();
                self.link.connected.store(true, Ordering::Relaxed);
                let n = self.link.connects.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(
                    broker = ?self.settings.broker,
                    connects = n,
                    backlog = self.outbox.depth().len,
                    "MQTT connected"
                );
                if let Err(e) =
                    client.try_subscribe(self.settings.topics.commands(), QoS::AtLeastOnce)
                {
                    tracing::error!(error = %e, "cannot subscribe to commands");
                }
                self.publish_status(client, conn, true);
                self.pump(client).await;
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => self.ledger.on_sent(pkid),
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(seq) = self.ledger.on_ack(ack.pkid) {
                    match self.outbox.ack(seq) {
                        Ok(_) => {
                            self.link.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, seq, "cannot remove an acknowledged result")
                        }
                    }
                    self.pump(client).await;
                }
            }
            Event::Incoming(Packet::Publish(p)) => self.on_command(client, &p),
            _ => {}
        }
    }

    /// The connection is gone: forget it; nothing is handed over until the next ConnAck.
    fn on_lost(&mut self, e: String, conn: &mut Conn) {
        let mut last = self
            .link
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if conn.connected {
            tracing::warn!(error = %e, "MQTT connection lost; results wait in the outbox");
        } else if last.is_none() {
            // The first failed attempt is worth a warning; the retries that follow are not.
            tracing::warn!(error = %e, broker = ?self.settings.broker, "cannot reach the MQTT broker; retrying with backoff");
        } else {
            tracing::debug!(error = %e, "MQTT connection attempt failed");
        }
        *last = Some(e);
        drop(last);
        conn.connected = false;
        self.link.connected.store(false, Ordering::Relaxed);
        self.ledger.reset();
    }

    /// Hands the next durable outbox entries to rumqttc, as many as the window allows.
    async fn pump(&mut self, client: &AsyncClient) {
        let topic = self.settings.topics.result();
        loop {
            let room = self.ledger.room();
            let after = self.ledger.next_after();
            if room == 0 || self.outbox.last_seq() <= after {
                return;
            }
            if self.outbox.durable_seq() <= after {
                // Written before sent: one flush covers everything pushed so far.
                let outbox = self.outbox.clone();
                let t = Instant::now();
                match tokio::task::spawn_blocking(move || outbox.flush()).await {
                    Ok(Ok(())) => {
                        self.link.flushes.fetch_add(1, Ordering::Relaxed);
                        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                        self.link.flush_us.fetch_add(us, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot flush the MQTT outbox; not sending");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the outbox flush failed");
                        return;
                    }
                }
            }
            let entries = match self.outbox.range(after, self.outbox.durable_seq(), room) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the MQTT outbox");
                    return;
                }
            };
            if entries.is_empty() {
                return;
            }
            for (seq, payload) in entries {
                if client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .is_err()
                {
                    // rumqttc's request queue is full (it is sized for the window, so only a
                    // burst of replies does this); the next acknowledgement pumps again.
                    return;
                }
                self.ledger.handed(Sent::Outbox(seq));
                self.link.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_command(&mut self, client: &AsyncClient, p: &rumqttc::Publish) {
        let Some(name) = self.settings.topics.command_name(&p.topic) else {
            return;
        };
        let Some(handled) = commands::handle(
            name,
            &p.payload,
            p.retain,
            self.settings.command_token.as_ref(),
            &self.shared,
        ) else {
            return;
        };
        {
            // Delete any retained copy so it never comes back on a reconnect. Done for every
            // command, not only those flagged retained: an MQTT 3.1.1 broker clears the flag on
            // messages it forwards live, so a command published retained while this device is
            // connected arrives looking like any other (and runs, once).
            if client
                .try_publish(p.topic.clone(), QoS::AtLeastOnce, true, Vec::new())
                .is_ok()
            {
                self.ledger.handed(Sent::Other);
            }
        }
        match handled {
            commands::Handled::Reply(reply) => self.publish_reply(client, &reply),
            commands::Handled::Deploy(job) => {
                let Some(deployer) = self.deployer.clone() else {
                    let reply = commands::not_installing(job);
                    self.publish_reply(client, &reply);
                    return;
                };
                tracing::info!(url = %job.url, "deploy command: fetching the bundle");
                let tx = self.replies_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let reply = commands::deploy(job, &deployer);
                    if tx.blocking_send(reply).is_err() {
                        tracing::warn!(
                            "the deploy command finished after MQTT stopped; no reply sent"
                        );
                    }
                });
            }
        }
    }

    /// Publishes a command's reply on `…/cmd/<name>/reply`.
    fn publish_reply(&mut self, client: &AsyncClient, reply: &CommandReply) {
        match serde_json::to_vec(reply) {
            Ok(json) => {
                if client
                    .try_publish(
                        self.settings.topics.reply(&reply.command),
                        QoS::AtLeastOnce,
                        false,
                        json,
                    )
                    .is_ok()
                {
                    self.ledger.handed(Sent::Other);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a command reply"),
        }
    }

    /// The last will: `offline`, "connection lost", as of now.
    fn will(&self) -> Vec<u8> {
        self.status_json(DeviceState::Offline, vec!["connection lost".into()])
    }

    fn status_json(&self, state: DeviceState, reasons: Vec<String>) -> Vec<u8> {
        let s = status::status(&self.identity, &self.shared, state, reasons);
        serde_json::to_vec(&s).unwrap_or_default()
    }

    /// Publishes the status when it changed since the last one on this connection (or always
    /// with `force`).
    fn publish_status(&mut self, client: &AsyncClient, conn: &mut Conn, force: bool) {
        let failures = self.shared.stats.model_failures.load(Ordering::Relaxed);
        let health = Health {
            camera: self.shared.stats.camera(),
            model_error: self.shared.model_error.load().as_deref().cloned(),
            new_model_failures: failures - conn.model_failures_seen.min(failures),
        };
        conn.model_failures_seen = failures;
        let assessed = status::assess(&health);
        if !force && conn.published.as_ref() == Some(&assessed) {
            return;
        }
        let json = self.status_json(assessed.0, assessed.1.clone());
        if client
            .try_publish(self.settings.topics.status(), QoS::AtLeastOnce, true, json)
            .is_ok()
        {
            self.ledger.handed(Sent::Other);
            if conn.published.as_ref().map(|p| p.0) != Some(assessed.0) {
                tracing::info!(state = ?assessed.0, reasons = ?assessed.1, "device status");
            }
            conn.published = Some(assessed);
        }
    }

    fn publish_stats(&mut self, client: &AsyncClient, conn: &mut Conn) {
        let processed = self.shared.stats.processed.load(Ordering::Relaxed);
        let (t, n) = conn.last_stats;
        let secs = t.elapsed().as_secs_f64();
        let fps = if secs > 0.0 {
            processed.saturating_sub(n) as f64 / secs
        } else {
            0.0
        };
        conn.last_stats = (Instant::now(), processed);
        let stats = status::stats(
            &self.identity,
            &self.shared,
            self.started.elapsed(),
            fps,
            self.outbox.depth(),
            self.link.acked.load(Ordering::Relaxed),
        );
        match serde_json::to_vec(&stats) {
            Ok(json) => {
                if client
                    .try_publish(self.settings.topics.stats(), QoS::AtMostOnce, false, json)
                    .is_ok()
                {
                    self.ledger.handed(Sent::Other);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode stats"),
        }
    }
}

/// What the poll task reports.
enum Polled {
    Event(Event),
    /// The connection failed or was lost; answer on `ack` once nothing more will be handed
    /// over for it.
    Lost {
        error: String,
        ack: oneshot::Sender<()>,
    },
}

/// Drives rumqttc's event loop: every event and error goes to the decision task; after an
/// error it waits per backoff (0.5 s doubling to 30 s, reset by a successful connection) with
/// jitter, so that many boards do not reconnect to a restarted broker in the same instant.
///
/// The last will is renewed before each reconnection (`will`), so its time and camera state
/// are those of the connection it belongs to, not of the daemon's start.
async fn poll_loop(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Polled>,
    will: impl Fn() -> LastWill,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let jitter = RandomState::new();
    let mut attempt = 0u64;
    loop {
        match eventloop.poll().await {
            Ok(ev) => {
                if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                    backoff.reset();
                }
                if events.send(Polled::Event(ev)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let (ack, acked) = oneshot::channel();
                let lost = Polled::Lost {
                    error: e.to_string(),
                    ack,
                };
                if events.send(lost).await.is_err() || acked.await.is_err() {
                    return;
                }
                // Requests handed over before the decision task heard of the loss, and events
                // rumqttc buffered for the dead connection, belong to it: drop them all, so the
                // next connection starts clean (see the module docs).
                eventloop.clean();
                eventloop.pending.clear();
                eventloop.state.events.clear();
                attempt += 1;
                // 50-100 % of the backoff delay.
                let frac = 0.5 + (jitter.hash_one(attempt) % 1000) as f64 / 2000.0;
                tokio::time::sleep(backoff.next_delay().mul_f64(frac)).await;
                eventloop.mqtt_options.set_last_will(will());
            }
        }
    }
}
