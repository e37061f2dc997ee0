//! Which outbox entry each in-flight MQTT packet id stands for: a plain state machine, apart
//! from any I/O, fed with what the client did and what rumqttc reported.
//!
//! rumqttc gives a QoS 1 publish its packet id inside its event loop and reports it as
//! `Outgoing::Publish(pkid)`, in the order the requests were handed to it; the broker's
//! `PubAck(pkid)` then names that id. So every publish handed over is queued here (an outbox
//! entry, or something else such as a status message), each `Outgoing::Publish` takes the front
//! of that queue and binds its packet id, and a `PubAck` returns the outbox entry to remove.
//! A collision (`Outgoing::AwaitAck`) is not a send: the same publish goes out later under the
//! same id and is reported then, still in order.
//!
//! The connection is the unit of truth: the client uses clean sessions, so when a connection
//! ends rumqttc forgets what it had not sent or not seen acknowledged, and so does the ledger
//! ([`Ledger::reset`]); the next connection starts again from the oldest entry still in the
//! outbox. An entry whose PUBACK was lost is therefore sent twice (the same result id), never
//! skipped, and entries go out in outbox order on every connection.

use std::collections::{HashMap, VecDeque};

/// What a publish handed to rumqttc was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// An outbox entry (its sequence number).
    Outbox(u64),
    /// Anything else (status, stats, a command reply): nothing to remove on acknowledgement.
    Other,
}

/// The in-flight bookkeeping of one connection.
#[derive(Debug)]
pub struct Ledger {
    /// Handed to rumqttc, not yet reported as sent.
    queued: VecDeque<Sent>,
    /// Packet id → outbox entry, sent and not yet acknowledged.
    inflight: HashMap<u16, u64>,
    /// Outbox entries handed over and not acknowledged (queued or in flight).
    outstanding: usize,
    /// Highest outbox sequence number handed over on this connection (0: none).
    last_handed: u64,
    window: usize,
}

impl Ledger {
    /// At most `window` outbox entries outstanding at once.
    pub fn new(window: usize) -> Ledger {
        Ledger {
            queued: VecDeque::new(),
            inflight: HashMap::new(),
            outstanding: 0,
            last_handed: 0,
            window: window.max(1),
        }
    }

    /// Forgets the connection: nothing is in flight, the next send starts from the oldest
    /// outbox entry.
    pub fn reset(&mut self) {
        self.queued.clear();
        self.inflight.clear();
        self.outstanding = 0;
        self.last_handed = 0;
    }

    /// How many more outbox entries may be handed over now.
    pub fn room(&self) -> usize {
        self.window.saturating_sub(self.outstanding)
    }

    /// The outbox entries to send next are those above this sequence number.
    pub fn next_after(&self) -> u64 {
        self.last_handed
    }

    /// A publish was handed to rumqttc.
    pub fn handed(&mut self, sent: Sent) {
        if let Sent::Outbox(seq) = sent {
            self.outstanding += 1;
            self.last_handed = self.last_handed.max(seq);
        }
        self.queued.push_back(sent);
    }

    /// rumqttc reported `Outgoing::Publish(pkid)` (pkid 0 for QoS 0).
    pub fn on_sent(&mut self, pkid: u16) {
        match self.queued.pop_front() {
            Some(Sent::Outbox(seq)) if pkid != 0 => {
                self.inflight.insert(pkid, seq);
            }
            Some(Sent::Outbox(seq)) => {
                // Outbox entries are always QoS 1; without a packet id there will be no
                // acknowledgement, so stop counting it rather than stall the window.
                tracing::warn!(seq, "an outbox entry went out without a packet id");
                self.outstanding = self.outstanding.saturating_sub(1);
            }
            Some(Sent::Other) => {}
            None => tracing::warn!(pkid, "rumqttc sent a publish the ledger did not hand over"),
        }
    }

    /// The broker acknowledged `pkid`; returns the outbox entry to remove, if it was one.
    pub fn on_ack(&mut self, pkid: u16) -> Option<u64> {
        let seq = self.inflight.remove(&pkid)?;
        self.outstanding = self.outstanding.saturating_sub(1);
        Some(seq)
    }

    /// Outbox entries outstanding (handed over, not acknowledged).
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_map_back_to_outbox_entries_through_packet_ids() {
        let mut l = Ledger::new(3);
        l.handed(Sent::Outbox(10));
        l.handed(Sent::Other);
        l.handed(Sent::Outbox(11));
        assert_eq!(l.room(), 1);
        assert_eq!(l.next_after(), 11);
        l.on_sent(1);
        l.on_sent(2);
        l.on_sent(3);
        // The broker may acknowledge out of order; each id finds its own entry.
        assert_eq!(l.on_ack(3), Some(11));
        assert_eq!(l.on_ack(2), None, "a status message has nothing to remove");
        assert_eq!(l.on_ack(1), Some(10));
        assert_eq!(l.on_ack(1), None, "a second ack of the same id is ignored");
        assert_eq!(l.room(), 3);
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn qos0_sends_keep_the_queue_in_step() {
        let mut l = Ledger::new(4);
        l.handed(Sent::Other); // stats, QoS 0
        l.handed(Sent::Outbox(1));
        l.on_sent(0);
        l.on_sent(7);
        assert_eq!(l.on_ack(7), Some(1));
    }

    #[test]
    fn a_packet_id_reused_after_its_ack_maps_to_the_new_entry() {
        let mut l = Ledger::new(2);
        l.handed(Sent::Outbox(1));
        l.on_sent(5);
        assert_eq!(l.on_ack(5), Some(1));
        l.handed(Sent::Outbox(2));
        l.on_sent(5);
        assert_eq!(l.on_ack(5), Some(2));
    }

    #[test]
    fn reset_forgets_the_connection_and_restarts_from_the_oldest() {
        let mut l = Ledger::new(2);
        l.handed(Sent::Outbox(4));
        l.handed(Sent::Outbox(5));
        l.on_sent(1);
        assert_eq!(l.room(), 0);
        l.reset();
        assert_eq!((l.room(), l.next_after(), l.outstanding()), (2, 0, 0));
        // An ack from the old connection cannot arrive on the new one; if one did, it would
        // find nothing.
        assert_eq!(l.on_ack(1), None);
    }
}
