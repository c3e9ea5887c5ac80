//! Wakes ftvmd's main loop as soon as something arrives for it.
//!
//! Everything the main loop acts on reaches it through channels: the peer's messages and
//! the witness's replies (the links' receiving threads), the answers of the agent threads
//! (disk and NIC daemons, QEMU, the checkpoint engine, the guest agent) and the control
//! requests. The loop used to sleep a fixed step between turns, so each of these waited up
//! to a step (10 ms) for its turn: during a move the peer's `TakeOver`, the witness's grant
//! and every answer on the way to the restore added that wait to the guest's downtime.
//! Now every sender of those channels is a [`Sender`] here, which also wakes the loop, and
//! the loop waits for the next step or the next arrival, whichever comes first.
//!
//! One waker serves the process: ftvmd has one main loop, and a spurious wake-up (an
//! in-process test running two) costs one turn of the loop, nothing else.

use std::sync::mpsc::{self, Receiver, SendError};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Something arrived since the main loop last looked, and the loop may be waiting.
struct Waker {
    arrived: Mutex<bool>,
    condvar: Condvar,
}

static MAIN_LOOP: Waker = Waker {
    arrived: Mutex::new(false),
    condvar: Condvar::new(),
};

/// Tells the main loop that something arrived for it.
pub fn notify() {
    let mut arrived = MAIN_LOOP
        .arrived
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if !*arrived {
        *arrived = true;
        MAIN_LOOP.condvar.notify_one();
    }
}

/// The main loop's wait between turns: returns after `timeout`, or earlier once something
/// arrived (also when it arrived during the turn just run, so nothing waits for the next).
pub fn wait(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut arrived = MAIN_LOOP
        .arrived
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    while !*arrived {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        arrived = MAIN_LOOP
            .condvar
            .wait_timeout(arrived, remaining)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    *arrived = false;
}

/// The sending half of a channel to the main loop: a send also wakes the loop.
#[derive(Debug)]
pub struct Sender<T>(mpsc::Sender<T>);

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender(self.0.clone())
    }
}

impl<T> Sender<T> {
    /// Sends `value` and wakes the main loop; an error when the receiver is gone.
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        self.0.send(value)?;
        notify();
        Ok(())
    }
}

/// A channel whose messages wake the main loop (its receiver is a plain one: the loop
/// takes from it with `try_recv` on its turn).
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let (sender, receiver) = mpsc::channel();
    (Sender(sender), receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arrival_ends_the_wait_and_one_made_before_it_is_not_lost() {
        let (sender, receiver) = channel::<u32>();
        // Sent before the wait: the wait returns at once instead of sleeping its step.
        sender.send(1).expect("send");
        let started = Instant::now();
        wait(Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(receiver.try_recv().ok(), Some(1));
        // Sent by another thread while the loop waits.
        let thread = std::thread::spawn(move || sender.send(2).expect("send"));
        let started = Instant::now();
        wait(Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(20));
        thread.join().expect("join");
        assert_eq!(receiver.try_recv().ok(), Some(2));
    }

    #[test]
    fn a_send_to_a_receiver_that_is_gone_is_an_error() {
        let (sender, receiver) = channel::<u32>();
        drop(receiver);
        assert!(sender.send(1).is_err());
    }
}
