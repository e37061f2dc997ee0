//! MQTT (DESIGN.md "MQTT"): every result on `…/result` through a persistent outbox, the
//! retained `…/status` with an `offline` last will, `…/stats` every few seconds, and commands on
//! `…/cmd/<name>` answered on `…/cmd/<name>/reply`.
//!
//! - [`MqttSink`] is the pipeline's side: it pushes each result into the outbox (sled) and wakes
//!   the client. It never waits for the network.
//! - [`client`] sends the outbox in order, removes what the broker acknowledged, reconnects with
//!   backoff, publishes status and stats, and answers [`commands`].
//! - [`broker`] is the embedded broker, started when no plant broker is configured.
//!
//! The outbox's crash and acknowledge rules are in `store/outbox.rs`; the packet-id bookkeeping
//! in [`ledger`].

pub mod bench;
pub mod broker;
pub mod client;
pub mod commands;
pub mod config;
pub mod ledger;
pub mod status;
mod tls;

use std::sync::Arc;

use tokio::sync::Notify;
use weld_core::{Frame, Inspection};

use crate::pipeline::{Sink, SinkError};
use crate::store::Outbox;

pub use client::{Link, MqttClient, spawn};
pub use config::{BrokerAddr, MqttSection, MqttSettings, Topics};

/// Puts every result into the outbox and wakes the client.
#[derive(Debug)]
pub struct MqttSink {
    outbox: Outbox,
    wake: Arc<Notify>,
}

impl MqttSink {
    pub fn new(outbox: Outbox, wake: Arc<Notify>) -> MqttSink {
        MqttSink { outbox, wake }
    }
}

impl Sink for MqttSink {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn accept(&mut self, result: &Inspection, _frame: &Frame) -> Result<(), SinkError> {
        let payload = serde_json::to_vec(result).map_err(|e| SinkError(e.to_string()))?;
        self.outbox
            .push(&payload)
            .map_err(|e| SinkError(e.to_string()))?;
        self.wake.notify_one();
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.outbox.flush().map_err(|e| SinkError(e.to_string()))?;
        self.wake.notify_one();
        Ok(())
    }
}
