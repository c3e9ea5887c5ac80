//! The switchover of a move (`ftvm migrate`): no frame for the guest is lost while neither
//! host runs it.
//!
//! The source's guest stops at the final checkpoint; the destination's runs only once it
//! claimed the VM from the witness, promoted its disks and restored the checkpoint; the
//! LAN's switches learn the MAC on the destination only from its announcement after that.
//! Until then every frame for the guest reaches the source's TAP, where no guest reads it:
//! a lost TCP segment costs the client its retransmission timeout (200 ms at least).
//!
//! - **Source** (`handover on`, sent by the checkpoint engine once the final checkpoint
//!   committed): the `uplink` thread reads the TAP although a (stopped) guest is attached,
//!   and sends the frames addressed to the guest's MAC to the peer's daemon
//!   ([`super::Direction::Handover`]); other frames are dropped, as a daemon in standby
//!   does (a broadcast also reaches the destination's own TAP, which hands it to the guest
//!   once it runs: relayed too it would arrive twice). The relay ends when a frame from the
//!   guest's MAC comes back over the TAP (the destination's announcement: the LAN moved
//!   the MAC), on `handover off`, when a guest starts here again (its frontend acks
//!   features, or a queue worker finds its receive ring running: a move that did not
//!   happen, the guest resumes here), or after [`RELAY_LIMIT`]. Each frame read is either
//!   relayed or left to the guest, never both.
//! - **Destination**: relayed frames wait in a [`HandoverQueue`] (bounded in frames and
//!   bytes, the oldest dropped first, each counted) until the guest's frontend has started
//!   the device; queue pair 0's worker then delivers them, in order, before anything from
//!   its own TAP, each checked again against the offloads the guest negotiated. A frame
//!   older than [`QUEUE_AGE`] is dropped instead: the sender has retransmitted it already,
//!   and a move that did not happen leaves nothing for a guest started here later.
//!
//! Level 2 is untouched: its relay for a peer whose uplink is down uses the other
//! directions, and only `handover on` makes a daemon send this one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use daemon_util::lock;

/// The longest a source relays after `handover on` (the destination then runs the guest,
/// or the move failed and the guest resumed here).
pub const RELAY_LIMIT: Duration = Duration::from_secs(10);
/// Frames the destination queues for a guest that does not run yet; the oldest go first.
pub const QUEUE_FRAMES: usize = 1024;
/// Bytes the destination queues (headers included); the oldest frames go first.
pub const QUEUE_BYTES: usize = 4 << 20;
/// A queued frame older than this is dropped instead of delivered.
pub const QUEUE_AGE: Duration = Duration::from_secs(2);

/// The source's side: until when it relays.
#[derive(Debug, Default)]
pub struct HandoverRelay {
    until: Mutex<Option<Instant>>,
    /// `until` is set: lets the queue workers' hot path skip the lock.
    started: AtomicBool,
}

impl HandoverRelay {
    /// Relays from `now` for [`RELAY_LIMIT`].
    pub fn start(&self, now: Instant) {
        let mut until = lock(&self.until);
        *until = Some(now + RELAY_LIMIT);
        self.started.store(true, Ordering::Release);
    }

    /// Stops relaying; true if it was relaying.
    pub fn stop(&self) -> bool {
        if !self.started.load(Ordering::Acquire) {
            return false;
        }
        let mut until = lock(&self.until);
        self.started.store(false, Ordering::Release);
        until.take().is_some()
    }

    /// Relaying now (the limit not passed).
    pub fn active(&self, now: Instant) -> bool {
        self.started.load(Ordering::Acquire) && lock(&self.until).is_some_and(|until| now < until)
    }

    /// Ends a relay whose limit passed; true if it did.
    pub fn expire(&self, now: Instant) -> bool {
        let mut until = lock(&self.until);
        if until.is_some_and(|until| now >= until) {
            *until = None;
            self.started.store(false, Ordering::Release);
            return true;
        }
        false
    }
}

/// The destination's side: relayed frames (a 12-byte virtio-net header and an Ethernet
/// frame each) with their arrival time, in order.
#[derive(Debug, Default)]
pub struct HandoverQueue {
    queue: Mutex<Queued>,
}

#[derive(Debug, Default)]
struct Queued {
    frames: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

impl Queued {
    fn pop_front(&mut self) -> Option<(Instant, Vec<u8>)> {
        let front = self.frames.pop_front()?;
        self.bytes = self.bytes.saturating_sub(front.1.len());
        Some(front)
    }
}

impl HandoverQueue {
    /// Queues a frame; returns how many older frames were dropped for room (a frame larger
    /// than [`QUEUE_BYTES`] is dropped itself and counts as one).
    pub fn push(&self, frame: Vec<u8>, now: Instant) -> usize {
        if frame.len() > QUEUE_BYTES {
            return 1;
        }
        let mut queue = lock(&self.queue);
        let mut dropped = 0;
        while queue.frames.len() >= QUEUE_FRAMES || queue.bytes + frame.len() > QUEUE_BYTES {
            if queue.pop_front().is_none() {
                break;
            }
            dropped += 1;
        }
        queue.bytes += frame.len();
        queue.frames.push_back((now, frame));
        dropped
    }

    /// The oldest frame not older than [`QUEUE_AGE`], and how many older ones were dropped
    /// on the way.
    pub fn pop(&self, now: Instant) -> (Option<Vec<u8>>, usize) {
        let mut queue = lock(&self.queue);
        let mut dropped = 0;
        while let Some((at, frame)) = queue.pop_front() {
            if now.saturating_duration_since(at) <= QUEUE_AGE {
                return (Some(frame), dropped);
            }
            dropped += 1;
        }
        (None, dropped)
    }

    pub fn len(&self) -> usize {
        lock(&self.queue).frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_keeps_order_and_drops_the_oldest_for_room_in_frames_and_bytes() {
        let queue = HandoverQueue::default();
        let now = Instant::now();
        for index in 0..QUEUE_FRAMES + 3 {
            let dropped = queue.push(vec![(index % 251) as u8; 60], now);
            assert_eq!(dropped, usize::from(index >= QUEUE_FRAMES), "frame {index}");
        }
        assert_eq!(queue.len(), QUEUE_FRAMES);
        assert_eq!(
            queue.pop(now),
            (Some(vec![3; 60]), 0),
            "the three oldest went"
        );

        let queue = HandoverQueue::default();
        let big = QUEUE_BYTES / 3 + 1;
        assert_eq!(queue.push(vec![1; big], now), 0);
        assert_eq!(queue.push(vec![2; big], now), 0);
        assert_eq!(queue.push(vec![3; big], now), 1, "the first made room");
        assert_eq!(
            queue.push(vec![4; QUEUE_BYTES + 1], now),
            1,
            "too large itself"
        );
        assert_eq!(queue.pop(now).0, Some(vec![2; big]));
        assert_eq!(queue.pop(now).0, Some(vec![3; big]));
        assert_eq!(queue.pop(now), (None, 0));
        assert!(queue.is_empty());
    }

    #[test]
    fn frames_older_than_the_age_limit_are_dropped_not_delivered() {
        let queue = HandoverQueue::default();
        let then = Instant::now();
        queue.push(vec![1; 60], then);
        queue.push(vec![2; 60], then + Duration::from_millis(1500));
        let later = then + QUEUE_AGE + Duration::from_millis(1);
        assert_eq!(queue.pop(later), (Some(vec![2; 60]), 1));
        assert_eq!(queue.pop(later), (None, 0));
    }

    #[test]
    fn the_relay_runs_until_stopped_or_its_limit() {
        let relay = HandoverRelay::default();
        let now = Instant::now();
        assert!(!relay.active(now));
        relay.start(now);
        assert!(relay.active(now + RELAY_LIMIT - Duration::from_millis(1)));
        assert!(!relay.expire(now));
        assert!(relay.expire(now + RELAY_LIMIT));
        assert!(!relay.active(now));
        relay.start(now);
        assert!(relay.stop());
        assert!(!relay.stop());
    }
}
