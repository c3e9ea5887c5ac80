//! Level 3 output commit: the frames the guest sends in epoch N are held until checkpoint N
//! has committed on the secondary, then released in the order the guest sent them
//! (`docs/LEVEL3.md`, "Interfaces"). Received frames never wait.
//!
//! [`EpochBuffer`] is the pure part (epochs, the FIFO of held frames, the refusals);
//! [`OutputCommit`] shares one buffer between the queue pairs' workers (which hold frames)
//! and the control socket (which ends epochs and commits them), with one byte limit for all
//! queues.
//!
//! **A full buffer is backpressure, not loss.** A queue pair takes the next chain from the
//! guest's TX ring only while the held bytes are below the limit; at or above it, the
//! guest's frames stay in its ring (its driver stops its queue when the ring is full, as on
//! a slow link) and the worker is woken when a commit frees room. Nothing is dropped, RX and
//! the control socket never wait for room. Since each pair checks before it takes a chain,
//! the held bytes exceed the limit by at most one frame per queue pair.
//!
//! Order: frames are kept in one FIFO in the order the workers handed them over, so epochs
//! are never mixed and each queue's frames leave in the guest's order. Releasing happens
//! under the buffer's lock, so a frame sent after `output-commit off` never overtakes a
//! held one.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use control_protocol::nic::{self, Epoch};
use daemon_util::lock;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::sink::TxFrame;

/// The default `--output-buffer-bytes`: 64 MiB.
pub const DEFAULT_BUFFER_BYTES: usize = 64 << 20;

/// The smallest `--output-buffer-bytes`: 1 MiB (several of the largest frames).
pub const MIN_BUFFER_BYTES: usize = 1 << 20;

/// A command that does not fit the buffer's state.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EpochError {
    #[error("output commit is off (turn it on with \"output-commit on EPOCH\")")]
    Off,
    #[error("output commit is already on at epoch {current}; turn it off first")]
    AlreadyOn { current: Epoch },
    #[error("epoch {asked} is not the current epoch (the current one is {current})")]
    NotCurrent { asked: Epoch, current: Epoch },
    #[error("epoch {asked} has not ended (the current epoch is {current}: only epochs before it can commit)")]
    NotEnded { asked: Epoch, current: Epoch },
    #[error("epoch {current} is the last epoch there can be")]
    LastEpoch { current: Epoch },
}

/// A held frame: its epoch and queue pair.
#[derive(Debug)]
pub struct HeldFrame {
    pub epoch: Epoch,
    pub queue: usize,
    pub frame: TxFrame,
}

/// Epochs and held frames, without locking or sending (the caller sends what it returns).
#[derive(Debug, Default)]
pub struct EpochBuffer {
    /// `None` while off.
    current: Option<Epoch>,
    committed: Option<Epoch>,
    frames: VecDeque<HeldFrame>,
    bytes: usize,
}

impl EpochBuffer {
    pub fn new() -> EpochBuffer {
        EpochBuffer::default()
    }

    pub fn enabled(&self) -> bool {
        self.current.is_some()
    }

    pub fn current(&self) -> Option<Epoch> {
        self.current
    }

    pub fn committed(&self) -> Option<Epoch> {
        self.committed
    }

    pub fn held_frames(&self) -> usize {
        self.frames.len()
    }

    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// `output-commit on EPOCH`. Again with the current epoch: nothing changes (a retried
    /// command); with another while on: refused.
    pub fn start(&mut self, epoch: Epoch) -> Result<(), EpochError> {
        match self.current {
            None => {
                self.current = Some(epoch);
                self.committed = None;
                Ok(())
            }
            Some(current) if current == epoch => Ok(()),
            Some(current) => Err(EpochError::AlreadyOn { current }),
        }
    }

    /// Holds `frame` in the current epoch; gives it back when output commit is off.
    pub fn hold(&mut self, queue: usize, frame: TxFrame) -> Result<(), TxFrame> {
        let Some(epoch) = self.current else {
            return Err(frame);
        };
        // Ours to keep: the FIFO is in epoch order, which `commit` relies on.
        assert!(
            self.frames.back().is_none_or(|last| last.epoch <= epoch),
            "held frames out of epoch order"
        );
        self.bytes = self.bytes.saturating_add(frame.bytes().len());
        self.frames.push_back(HeldFrame {
            epoch,
            queue,
            frame,
        });
        Ok(())
    }

    /// `epoch-end N`: `N` must be the current epoch; the next is `N + 1`.
    pub fn end(&mut self, epoch: Epoch) -> Result<Epoch, EpochError> {
        let current = self.current.ok_or(EpochError::Off)?;
        if epoch != current {
            return Err(EpochError::NotCurrent {
                asked: epoch,
                current,
            });
        }
        let next = current
            .checked_add(1)
            .ok_or(EpochError::LastEpoch { current })?;
        self.current = Some(next);
        Ok(next)
    }

    /// `commit N`: takes, in order, every held frame of the epochs up to `N`, which must have
    /// ended. A commit at or below the last one takes nothing (a retried command).
    pub fn commit(&mut self, epoch: Epoch) -> Result<Vec<HeldFrame>, EpochError> {
        let current = self.current.ok_or(EpochError::Off)?;
        if epoch >= current {
            return Err(EpochError::NotEnded {
                asked: epoch,
                current,
            });
        }
        if self.committed.is_some_and(|committed| committed >= epoch) {
            return Ok(Vec::new());
        }
        self.committed = Some(epoch);
        let count = self
            .frames
            .iter()
            .take_while(|held| held.epoch <= epoch)
            .count();
        Ok(self.take_front(count))
    }

    /// `output-commit off`: takes every held frame, in order, and stops holding.
    pub fn stop(&mut self) -> Vec<HeldFrame> {
        self.current = None;
        self.committed = None;
        let count = self.frames.len();
        self.take_front(count)
    }

    fn take_front(&mut self, count: usize) -> Vec<HeldFrame> {
        let taken: Vec<HeldFrame> = self.frames.drain(..count).collect();
        let bytes: usize = taken.iter().map(|held| held.frame.bytes().len()).sum();
        self.bytes = self.bytes.saturating_sub(bytes);
        taken
    }
}

/// Sends a released frame on its queue pair's current path (and counts it).
pub type Release<'a> = &'a mut dyn FnMut(usize, TxFrame);

/// The NIC's output commit, shared by the queue workers and the control socket.
pub struct OutputCommit {
    buffer: Mutex<EpochBuffer>,
    /// Mirrors "the buffer is on", for the workers' lock-free path while off. Set after the
    /// buffer turned on and cleared only after `off` released everything, under the lock.
    holding: AtomicBool,
    /// Mirrors the held bytes, for [`OutputCommit::has_room`].
    held_bytes: AtomicUsize,
    limit_bytes: usize,
    buffer_full_waits: AtomicU64,
    released_frames: AtomicU64,
    /// One per queue pair: written when a release frees room (see the module's
    /// documentation); registered in the pair's event loop.
    room: Vec<EventFd>,
}

impl fmt::Debug for OutputCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputCommit")
            .field("holding", &self.holding)
            .field("held_bytes", &self.held_bytes)
            .field("limit_bytes", &self.limit_bytes)
            .finish_non_exhaustive()
    }
}

/// What [`OutputCommit::send`] did with a frame.
#[derive(Debug)]
pub enum Passed {
    /// Held until its epoch commits.
    Held,
    /// Output commit is off: sent at once.
    Sent,
}

impl OutputCommit {
    /// Off, for `queue_pairs` pairs, holding at most about `limit_bytes`.
    pub fn new(queue_pairs: usize, limit_bytes: usize) -> std::io::Result<OutputCommit> {
        let room = (0..queue_pairs)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(OutputCommit {
            buffer: Mutex::new(EpochBuffer::new()),
            holding: AtomicBool::new(false),
            held_bytes: AtomicUsize::new(0),
            limit_bytes,
            buffer_full_waits: AtomicU64::new(0),
            released_frames: AtomicU64::new(0),
            room,
        })
    }

    /// The "room freed" eventfd of pair `index`.
    pub fn room_eventfd(&self, index: usize) -> Option<&EventFd> {
        self.room.get(index)
    }

    /// Output commit is on: frames are held, not sent at once.
    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    /// Whether a worker may take another frame from the guest now.
    pub fn has_room(&self) -> bool {
        !self.holding.load(Ordering::Acquire)
            || self.held_bytes.load(Ordering::Relaxed) < self.limit_bytes
    }

    /// A worker stopped taking frames because the buffer was full.
    pub fn count_full_wait(&self) {
        self.buffer_full_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Holds `frame` (queue pair `queue`) while output commit is on; sends it with `send`
    /// otherwise.
    pub fn send(&self, queue: usize, frame: TxFrame, send: impl FnOnce(TxFrame)) -> Passed {
        if !self.holding.load(Ordering::Acquire) {
            send(frame);
            return Passed::Sent;
        }
        let mut buffer = lock(&self.buffer);
        match buffer.hold(queue, frame) {
            Ok(()) => {
                self.held_bytes
                    .store(buffer.held_bytes(), Ordering::Relaxed);
                Passed::Held
            }
            // Turned off meanwhile: everything held was released before `holding` was
            // cleared, and we still hold the lock, so this frame comes after them.
            Err(frame) => {
                send(frame);
                Passed::Sent
            }
        }
    }

    /// `output-commit on EPOCH`.
    pub fn start(&self, epoch: Epoch) -> Result<nic::OutputCommitted, EpochError> {
        let mut buffer = lock(&self.buffer);
        buffer.start(epoch)?;
        self.holding.store(true, Ordering::Release);
        Ok(self.answer(&buffer, 0))
    }

    /// `epoch-end N`.
    pub fn end(&self, epoch: Epoch) -> Result<nic::OutputCommitted, EpochError> {
        let mut buffer = lock(&self.buffer);
        buffer.end(epoch)?;
        Ok(self.answer(&buffer, 0))
    }

    /// `commit N`: releases the frames of the epochs up to `N` through `release`.
    pub fn commit(
        &self,
        epoch: Epoch,
        release: Release<'_>,
    ) -> Result<nic::OutputCommitted, EpochError> {
        let mut buffer = lock(&self.buffer);
        let frames = buffer.commit(epoch)?;
        let released = self.release(&buffer, frames, release);
        Ok(self.answer(&buffer, released))
    }

    /// `output-commit off`: releases every held frame through `release`, then stops holding.
    pub fn stop(&self, release: Release<'_>) -> nic::OutputCommitted {
        let mut buffer = lock(&self.buffer);
        let frames = buffer.stop();
        let released = self.release(&buffer, frames, release);
        self.holding.store(false, Ordering::Release);
        self.answer(&buffer, released)
    }

    /// Sends `frames` in order (under the buffer's lock, see the module's documentation) and
    /// wakes the workers that may wait for room.
    fn release(&self, buffer: &EpochBuffer, frames: Vec<HeldFrame>, release: Release<'_>) -> u64 {
        let count = frames.len() as u64;
        for held in frames {
            release(held.queue, held.frame);
        }
        self.held_bytes
            .store(buffer.held_bytes(), Ordering::Relaxed);
        if count > 0 {
            self.released_frames.fetch_add(count, Ordering::Relaxed);
            for room in &self.room {
                // A full counter means a wake-up is pending anyway.
                let _ = room.write(1);
            }
        }
        count
    }

    fn answer(&self, buffer: &EpochBuffer, released: u64) -> nic::OutputCommitted {
        nic::OutputCommitted {
            ok: true,
            released_frames: released,
            output_commit: self.state_of(buffer),
        }
    }

    /// The state as `status` shows it.
    pub fn state(&self) -> nic::OutputCommit {
        self.state_of(&lock(&self.buffer))
    }

    fn state_of(&self, buffer: &EpochBuffer) -> nic::OutputCommit {
        nic::OutputCommit {
            enabled: buffer.enabled(),
            current_epoch: buffer.current(),
            committed_epoch: buffer.committed(),
            held_frames: buffer.held_frames() as u64,
            held_bytes: buffer.held_bytes() as u64,
            buffer_limit_bytes: self.limit_bytes as u64,
            buffer_full_waits: self.buffer_full_waits.load(Ordering::Relaxed),
            released_frames: self.released_frames.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests;
