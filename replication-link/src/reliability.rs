//! Pure reliability state of one session direction: the sender's retransmit buffer and the
//! receiver's reorder buffer. No I/O, no clock: the session drives it under its lock.
//!
//! Sequence numbers start at 1. The sender keeps every message until a cumulative ack covers
//! it; the receiver delivers in sequence order, drops duplicates, and acknowledges what the
//! application has taken (so an application that stops reading stops the sender: flow
//! control without unbounded queues).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::de::DeserializeOwned;

/// Errors of this module: the peer broke the protocol; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ReliabilityError {
    #[error("peer acknowledged message {up_to} but the last one sent is {last_sent}")]
    AckBeyondSent { up_to: u64, last_sent: u64 },
    #[error(
        "peer sent message {seq} beyond the receive window ({consumed} taken, {window} allowed)"
    )]
    BeyondWindow {
        seq: u64,
        consumed: u64,
        window: usize,
    },
    #[error("peer exceeded the receive window of {window_bytes} bytes")]
    WindowBytes { window_bytes: usize },
}

/// Limits of a window: messages and bytes (application headers + payloads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
}

/// A message delivered to the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Session sequence number (1, 2, 3, ... in send order).
    pub seq: u64,
    /// The application's header, as given to `send`.
    pub app_header: Vec<u8>,
    pub payload: Vec<u8>,
    /// The CRC32C of `payload`, checked against it on arrival: an application that carries
    /// its own checksum of the data (computed where the data was read) compares it with this
    /// one instead of hashing the payload again.
    pub payload_crc32c: u32,
}

impl Message {
    /// Decodes `app_header` as postcard (see [`crate::Session::send_typed`]).
    pub fn header<H: DeserializeOwned>(&self) -> Result<H, postcard::Error> {
        postcard::from_bytes(&self.app_header)
    }

    fn size_bytes(&self) -> usize {
        self.app_header.len() + self.payload.len()
    }
}

/// A message waiting for its ack.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) seq: u64,
    pub(crate) app_header: Vec<u8>,
    pub(crate) payload: Vec<u8>,
    pub(crate) payload_crc32c: u32,
}

impl Outgoing {
    pub(crate) fn size_bytes(&self) -> usize {
        self.app_header.len() + self.payload.len()
    }
}

/// One message handed to a link's writer.
pub(crate) struct Transmission {
    pub(crate) message: Arc<Outgoing>,
    pub(crate) retransmit: bool,
}

struct Unacked {
    message: Arc<Outgoing>,
    /// The connection it was last handed to, if it is not waiting for (re)transmission.
    sent_on: Option<u64>,
    transmissions: u32,
}

/// The sender's side: numbering, retransmit buffer, transmission queue.
pub(crate) struct SendWindow {
    next_seq: u64,
    acked_up_to: u64,
    /// Exactly the messages `acked_up_to + 1 .. next_seq`.
    unacked: BTreeMap<u64, Unacked>,
    unacked_bytes: usize,
    /// Messages waiting for a writer: new ones and those of lost connections.
    pending: BTreeSet<u64>,
}

impl SendWindow {
    pub(crate) fn new() -> SendWindow {
        SendWindow {
            next_seq: 1,
            acked_up_to: 0,
            unacked: BTreeMap::new(),
            unacked_bytes: 0,
            pending: BTreeSet::new(),
        }
    }

    /// True when a message of `size_bytes` fits in `window` now. An empty window takes any
    /// message, so a message larger than the byte window still goes through alone.
    pub(crate) fn has_room(&self, size_bytes: usize, window: Window) -> bool {
        self.unacked.is_empty()
            || (self.unacked.len() < window.messages
                && self.unacked_bytes + size_bytes <= window.bytes)
    }

    pub(crate) fn push(&mut self, app_header: Vec<u8>, payload: Vec<u8>, crc: u32) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let message = Arc::new(Outgoing {
            seq,
            app_header,
            payload,
            payload_crc32c: crc,
        });
        self.unacked_bytes += message.size_bytes();
        self.unacked.insert(
            seq,
            Unacked {
                message,
                sent_on: None,
                transmissions: 0,
            },
        );
        self.pending.insert(seq);
        seq
    }

    /// Hands the oldest waiting messages, up to `batch`, to `connection`, never beyond what
    /// the peer's receive window `peer` allows.
    pub(crate) fn take_for(
        &mut self,
        connection: u64,
        batch: Window,
        peer: Window,
    ) -> Vec<Transmission> {
        let mut taken = Vec::new();
        let Some(&first) = self.pending.first() else {
            return taken;
        };
        let within_peer_window =
            self.unacked.len() <= peer.messages && self.unacked_bytes <= peer.bytes;
        let last_allowed = if within_peer_window {
            u64::MAX
        } else {
            self.peer_window_end(peer)
        };
        let mut batch_bytes = 0;
        let mut next = Some(first);
        while let Some(seq) = next.filter(|seq| *seq <= last_allowed) {
            if taken.len() >= batch.messages || batch_bytes >= batch.bytes {
                break;
            }
            self.pending.remove(&seq);
            if let Some(entry) = self.unacked.get_mut(&seq) {
                entry.sent_on = Some(connection);
                entry.transmissions += 1;
                batch_bytes += entry.message.size_bytes();
                taken.push(Transmission {
                    message: Arc::clone(&entry.message),
                    retransmit: entry.transmissions > 1,
                });
            }
            next = self.pending.first().copied();
        }
        taken
    }

    /// Highest sequence number the peer's window allows now.
    fn peer_window_end(&self, peer: Window) -> u64 {
        let mut bytes = 0;
        let mut last = self.acked_up_to;
        for (count, (seq, entry)) in self.unacked.iter().enumerate() {
            bytes += entry.message.size_bytes();
            if count >= peer.messages || (count > 0 && bytes > peer.bytes) {
                break;
            }
            last = *seq;
        }
        last
    }

    /// Applies a cumulative ack; returns how many messages it freed.
    pub(crate) fn on_ack(&mut self, up_to: u64) -> Result<usize, ReliabilityError> {
        let last_sent = self.next_seq - 1;
        if up_to > last_sent {
            return Err(ReliabilityError::AckBeyondSent { up_to, last_sent });
        }
        if up_to <= self.acked_up_to {
            return Ok(0);
        }
        let still_unacked = self.unacked.split_off(&(up_to + 1));
        let freed = std::mem::replace(&mut self.unacked, still_unacked);
        for entry in freed.values() {
            self.unacked_bytes -= entry.message.size_bytes();
        }
        self.pending = self.pending.split_off(&(up_to + 1));
        self.acked_up_to = up_to;
        Ok(freed.len())
    }

    /// Queues again every message last handed to `connection`; returns how many.
    pub(crate) fn on_connection_lost(&mut self, connection: u64) -> usize {
        let mut requeued = 0;
        for (seq, entry) in self.unacked.iter_mut() {
            if entry.sent_on == Some(connection) {
                entry.sent_on = None;
                self.pending.insert(*seq);
                requeued += 1;
            }
        }
        requeued
    }

    /// Queues again every unacknowledged message (the peer lost its state).
    pub(crate) fn requeue_all(&mut self) -> usize {
        for (seq, entry) in self.unacked.iter_mut() {
            entry.sent_on = None;
            self.pending.insert(*seq);
        }
        self.unacked.len()
    }

    /// Messages wait to be sent (first sends or retransmissions).
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(crate) fn acked_up_to(&self) -> u64 {
        self.acked_up_to
    }

    pub(crate) fn sent_count(&self) -> u64 {
        self.next_seq - 1
    }

    pub(crate) fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    pub(crate) fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }
}

/// What became of an arriving message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Stored; `ready` messages became deliverable in order.
    Accepted { ready: usize },
    /// Already received: dropped.
    Duplicate,
}

/// The receiver's side: reorder buffer and in-order queue for the application.
pub(crate) struct ReceiveBuffer {
    /// Every message up to this one is in `ready` or was taken by the application.
    received_up_to: u64,
    /// Every message up to this one was taken by the application (the ack value).
    consumed_up_to: u64,
    reorder: BTreeMap<u64, Message>,
    ready: VecDeque<Message>,
    buffered_bytes: usize,
    window: Window,
    delivered: u64,
}

impl ReceiveBuffer {
    pub(crate) fn new(window: Window) -> ReceiveBuffer {
        ReceiveBuffer {
            received_up_to: 0,
            consumed_up_to: 0,
            reorder: BTreeMap::new(),
            ready: VecDeque::new(),
            buffered_bytes: 0,
            window,
            delivered: 0,
        }
    }

    pub(crate) fn on_data(&mut self, message: Message) -> Result<Arrival, ReliabilityError> {
        let seq = message.seq;
        if seq <= self.received_up_to || self.reorder.contains_key(&seq) {
            return Ok(Arrival::Duplicate);
        }
        let window_end = self
            .consumed_up_to
            .saturating_add(self.window.messages as u64);
        if seq > window_end {
            return Err(ReliabilityError::BeyondWindow {
                seq,
                consumed: self.consumed_up_to,
                window: self.window.messages,
            });
        }
        let size = message.size_bytes();
        if self.buffered_bytes > 0 && self.buffered_bytes + size > self.window.bytes {
            return Err(ReliabilityError::WindowBytes {
                window_bytes: self.window.bytes,
            });
        }
        self.buffered_bytes += size;
        self.reorder.insert(seq, message);
        let mut ready = 0;
        while let Some(next) = self.reorder.remove(&(self.received_up_to + 1)) {
            self.received_up_to += 1;
            self.ready.push_back(next);
            ready += 1;
        }
        Ok(Arrival::Accepted { ready })
    }

    /// Takes the next message in order, if it has arrived.
    pub(crate) fn pop(&mut self) -> Option<Message> {
        let message = self.ready.pop_front()?;
        self.consumed_up_to = message.seq;
        self.buffered_bytes -= message.size_bytes();
        self.delivered += 1;
        Some(message)
    }

    /// Starts again after `base` (the peer restarted); drops what was not taken and returns
    /// how many messages that was.
    pub(crate) fn reset(&mut self, base: u64) -> usize {
        let dropped = self.ready.len() + self.reorder.len();
        self.ready.clear();
        self.reorder.clear();
        self.buffered_bytes = 0;
        self.received_up_to = base;
        self.consumed_up_to = base;
        dropped
    }

    pub(crate) fn consumed_up_to(&self) -> u64 {
        self.consumed_up_to
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    pub(crate) fn delivered(&self) -> u64 {
        self.delivered
    }

    pub(crate) fn buffered_messages(&self) -> usize {
        self.ready.len() + self.reorder.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIDE: Window = Window {
        messages: 1000,
        bytes: 1 << 20,
    };

    fn message(seq: u64) -> Message {
        let payload = vec![seq as u8; 10];
        Message {
            seq,
            app_header: vec![],
            payload_crc32c: crc32c::crc32c(&payload),
            payload,
        }
    }

    fn seqs(taken: &[Transmission]) -> Vec<u64> {
        taken.iter().map(|t| t.message.seq).collect()
    }

    #[test]
    fn lost_connection_requeues_only_its_messages() {
        let mut send = SendWindow::new();
        for _ in 0..6 {
            send.push(vec![], vec![0; 10], 0);
        }
        let batch = Window {
            messages: 3,
            bytes: 1 << 20,
        };
        assert_eq!(seqs(&send.take_for(1, batch, WIDE)), vec![1, 2, 3]);
        assert_eq!(seqs(&send.take_for(2, batch, WIDE)), vec![4, 5, 6]);
        assert!(send.take_for(2, batch, WIDE).is_empty());
        assert_eq!(send.on_ack(1).expect("ack"), 1);
        assert_eq!(send.on_connection_lost(1), 2);
        let again = send.take_for(2, batch, WIDE);
        assert_eq!(seqs(&again), vec![2, 3]);
        assert!(again.iter().all(|t| t.retransmit));
        assert_eq!(send.on_ack(6).expect("ack"), 5);
        assert_eq!(send.unacked_count(), 0);
        assert_eq!(send.unacked_bytes(), 0);
        assert!(send.on_ack(7).is_err());
        assert_eq!(send.on_ack(3).expect("stale ack"), 0);
    }

    #[test]
    fn window_limits_room_and_transmission() {
        let mut send = SendWindow::new();
        let window = Window {
            messages: 2,
            bytes: 25,
        };
        assert!(send.has_room(100, window), "an empty window takes anything");
        send.push(vec![], vec![0; 10], 0);
        assert!(send.has_room(10, window));
        assert!(!send.has_room(20, window));
        send.push(vec![], vec![0; 10], 0);
        assert!(!send.has_room(1, window));
        send.push(vec![], vec![0; 10], 0);
        // The peer allows two messages: the third waits for an ack.
        let taken = send.take_for(1, WIDE, window);
        assert_eq!(seqs(&taken), vec![1, 2]);
        send.on_ack(1).expect("ack");
        assert_eq!(seqs(&send.take_for(1, WIDE, window)), vec![3]);
    }

    #[test]
    fn receiver_orders_and_drops_duplicates() {
        let mut receive = ReceiveBuffer::new(WIDE);
        assert_eq!(
            receive.on_data(message(2)).expect("2"),
            Arrival::Accepted { ready: 0 }
        );
        assert_eq!(receive.on_data(message(2)).expect("2"), Arrival::Duplicate);
        assert_eq!(
            receive.on_data(message(3)).expect("3"),
            Arrival::Accepted { ready: 0 }
        );
        assert_eq!(
            receive.on_data(message(1)).expect("1"),
            Arrival::Accepted { ready: 3 }
        );
        assert_eq!(receive.on_data(message(1)).expect("1"), Arrival::Duplicate);
        let order: Vec<u64> = std::iter::from_fn(|| receive.pop())
            .map(|m| m.seq)
            .collect();
        assert_eq!(order, vec![1, 2, 3]);
        assert_eq!(receive.consumed_up_to(), 3);
        assert_eq!(receive.on_data(message(3)).expect("3"), Arrival::Duplicate);
        assert_eq!(receive.delivered(), 3);
    }

    #[test]
    fn receiver_enforces_its_window() {
        let mut receive = ReceiveBuffer::new(Window {
            messages: 4,
            bytes: 25,
        });
        assert!(matches!(
            receive.on_data(message(5)),
            Err(ReliabilityError::BeyondWindow { seq: 5, .. })
        ));
        receive.on_data(message(2)).expect("2");
        receive.on_data(message(3)).expect("3");
        assert!(matches!(
            receive.on_data(message(4)),
            Err(ReliabilityError::WindowBytes { .. })
        ));
        assert_eq!(receive.reset(10), 2);
        receive.on_data(message(11)).expect("after reset");
        assert_eq!(receive.pop().map(|m| m.seq), Some(11));
    }

    /// A tiny seeded generator, so that a failing simulation names its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % bound
        }
    }

    /// Two connections in flight (TCP: in order each), random writer batches, random
    /// connection losses, lost acks and a slow application: every message must be delivered
    /// exactly once and in order.
    fn simulate(seed: u64) {
        const TOTAL: u64 = 300;
        let window = Window {
            messages: 16,
            bytes: 1 << 20,
        };
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut send = SendWindow::new();
        let mut receive = ReceiveBuffer::new(window);
        let mut in_flight: [VecDeque<Arc<Outgoing>>; 2] = [VecDeque::new(), VecDeque::new()];
        let mut connection_ids = [1u64, 2];
        let mut next_id = 3;
        let mut delivered = Vec::new();
        for _ in 0..200_000 {
            if delivered.len() as u64 == TOTAL {
                break;
            }
            let link = rng.below(2) as usize;
            match rng.below(10) {
                0..=2 if send.sent_count() < TOTAL && send.has_room(10, window) => {
                    send.push(vec![], vec![0; 10], 0);
                }
                3 | 4 => {
                    let batch = Window {
                        messages: 1 + rng.below(8) as usize,
                        bytes: 1 << 20,
                    };
                    let taken = send.take_for(connection_ids[link], batch, window);
                    in_flight[link].extend(taken.into_iter().map(|t| t.message));
                }
                5..=7 => {
                    if let Some(outgoing) = in_flight[link].pop_front() {
                        let message = Message {
                            seq: outgoing.seq,
                            app_header: vec![],
                            payload: outgoing.payload.clone(),
                            payload_crc32c: outgoing.payload_crc32c,
                        };
                        let arrival = receive.on_data(message);
                        assert!(arrival.is_ok(), "seed {seed}: {arrival:?}");
                    }
                }
                8 => {
                    in_flight[link].clear();
                    send.on_connection_lost(connection_ids[link]);
                    connection_ids[link] = next_id;
                    next_id += 1;
                }
                _ => {
                    while let Some(message) = receive.pop() {
                        delivered.push(message.seq);
                    }
                    if rng.below(3) > 0 {
                        send.on_ack(receive.consumed_up_to()).expect("valid ack");
                    }
                }
            }
        }
        let expected: Vec<u64> = (1..=TOTAL).collect();
        assert_eq!(delivered, expected, "seed {seed}");
    }

    #[test]
    fn seeded_simulation_delivers_exactly_once_in_order() {
        for seed in 1..=300 {
            simulate(seed);
        }
    }
}
