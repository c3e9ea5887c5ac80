//! Completion tickets: a request whose completion waits on the peer holds a [`Ticket`]; the
//! replication side finishes it from another thread and completes the queue's requests
//! there, or wakes the queue's worker when it is busy.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use vmm_sys_util::eventfd::EventFd;

use crate::request::Status;

const PENDING: u8 = u8::MAX;

/// Completes a queue's finished requests on the calling thread if that needs no waiting
/// (the queue's worker is not busy); true when it did.
pub type Completer = Box<dyn Fn() -> bool + Send + Sync>;

/// Wakes one queue's worker when a ticket of that queue completes.
pub struct Waker {
    eventfd: EventFd,
    /// The queue is being stopped (GET_VRING_BASE): a request of it that waits behind an
    /// overlapping one gives up instead, and the stop rewinds the ring over it.
    stopping: std::sync::atomic::AtomicBool,
    /// Tried first: the completing thread puts the request on the used ring itself, one
    /// thread hand-off fewer than the eventfd.
    completer: OnceLock<Completer>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker")
            .field("stopping", &self.is_stopping())
            .field("completer", &self.completer.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        Ok(Waker {
            eventfd: EventFd::new(libc::EFD_NONBLOCK)?,
            stopping: std::sync::atomic::AtomicBool::new(false),
            completer: OnceLock::new(),
        })
    }

    /// Sets the completer tried before the eventfd (once; later calls change nothing).
    pub fn set_completer(&self, completer: Completer) {
        let _ = self.completer.set(completer);
    }

    pub fn set_stopping(&self, stopping: bool) {
        self.stopping.store(stopping, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn wake(&self) {
        // Completed here: no wake-up, unless the queue is being stopped (its drain waits
        // for the eventfd to look again).
        if self.completer.get().is_some_and(|complete| complete()) && !self.is_stopping() {
            return;
        }
        // A full counter (never reached) or EAGAIN still leaves the fd readable.
        let _ = self.eventfd.write(1);
    }

    /// Consumes pending wake-ups.
    pub fn clear(&self) {
        let _ = self.eventfd.read();
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

/// A request waiting for `parts` acknowledgements. Any failed part fails the request.
#[derive(Debug)]
pub struct Ticket {
    remaining: AtomicU32,
    status: AtomicU8,
    waker: Arc<Waker>,
}

impl Ticket {
    pub fn new(parts: u32, waker: Arc<Waker>) -> Arc<Ticket> {
        Arc::new(Ticket {
            remaining: AtomicU32::new(parts.max(1)),
            status: AtomicU8::new(PENDING),
            waker,
        })
    }

    /// Records one part's outcome; the last part completes the ticket and wakes the queue.
    pub fn complete_part(&self, status: Status) {
        if status != Status::Ok {
            let _ = self.status.compare_exchange(
                PENDING,
                status as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.status.compare_exchange(
                PENDING,
                Status::Ok as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            self.waker.wake();
        }
    }

    /// Whether the request's queue is being stopped (see [`Waker::is_stopping`]).
    pub fn queue_stopping(&self) -> bool {
        self.waker.is_stopping()
    }

    /// The final status, once every part completed. The last part decrements `remaining`
    /// before it records success, so a status still pending means "not yet" (its waker
    /// fires right after), never a failure.
    pub fn status(&self) -> Option<Status> {
        if self.remaining.load(Ordering::Acquire) != 0 {
            return None;
        }
        match self.status.load(Ordering::Acquire) {
            PENDING => None,
            0 => Some(Status::Ok),
            2 => Some(Status::Unsupported),
            _ => Some(Status::IoError),
        }
    }
}

/// How a request ends: now, when its ticket completes, or when all of its parts have.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ready(Status),
    Waiting(Arc<Ticket>),
    All(Vec<Outcome>),
}

impl Outcome {
    /// Combines the outcomes of a request's parts.
    pub fn all(mut parts: Vec<Outcome>) -> Outcome {
        if parts.len() == 1 {
            if let Some(part) = parts.pop() {
                return part;
            }
        }
        Outcome::All(parts)
    }

    /// The final status, once known; the first failure of a multi-part request wins.
    pub fn status(&self) -> Option<Status> {
        match self {
            Outcome::Ready(status) => Some(*status),
            Outcome::Waiting(ticket) => ticket.status(),
            Outcome::All(parts) => {
                let mut worst = Status::Ok;
                for part in parts {
                    match part.status()? {
                        Status::Ok => {}
                        failed if worst == Status::Ok => worst = failed,
                        _ => {}
                    }
                }
                Some(worst)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_part_completes_and_a_failure_sticks() {
        let waker = Arc::new(Waker::new().expect("eventfd"));
        let ticket = Ticket::new(3, waker.clone());
        ticket.complete_part(Status::Ok);
        ticket.complete_part(Status::IoError);
        assert_eq!(ticket.status(), None);
        ticket.complete_part(Status::Ok);
        assert_eq!(ticket.status(), Some(Status::IoError));
        assert_eq!(waker.eventfd().read().expect("woken"), 1);
    }

    #[test]
    fn the_last_part_is_not_reported_before_its_status_is_set() {
        let ticket = Ticket::new(1, Arc::new(Waker::new().expect("eventfd")));
        // What a reader sees between the last part's decrement and its status store.
        ticket.remaining.store(0, Ordering::Release);
        assert_eq!(ticket.status(), None, "a pending status is not a failure");
    }

    #[test]
    fn all_ok_is_ok() {
        let ticket = Ticket::new(1, Arc::new(Waker::new().expect("eventfd")));
        ticket.complete_part(Status::Ok);
        assert_eq!(Outcome::Waiting(ticket).status(), Some(Status::Ok));
    }
}
