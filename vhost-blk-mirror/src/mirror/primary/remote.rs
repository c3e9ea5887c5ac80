//! ComputeThru: when the local image fails (EIO, ENOSPC, …), the primary serves every
//! request from the peer's copy (RemoteOnly) and the guest sees no error; after `repair`, a
//! reverse resync rebuilds the local copy from the peer while the guest keeps running.

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::{CopyProgress, InFlight, Kind, LocalDisk, Mode, Primary, MAX_BLOCK_BYTES};
use crate::image::{buffer_fault, ReadTarget};
use crate::metadata::DataState;
use crate::mirror::protocol::Message;

/// How long a read from the peer may take before it is retried or failed.
const READ_POLL: Duration = Duration::from_millis(100);

impl Primary {
    /// Fails unless this host's copy can be used on its own (degraded mode needs it).
    pub(super) fn require_local_copy(&self) -> io::Result<()> {
        let local = self.lock().local;
        match local {
            LocalDisk::Healthy => Ok(()),
            LocalDisk::Failed | LocalDisk::Rebuilding => Err(io::Error::other(
                "no usable copy: the local disk failed and the peer is lost",
            )),
        }
    }

    /// Runs a local write unless the local disk has failed; a failure switches to RemoteOnly
    /// instead of failing the request (the peer's copy serves it).
    pub(super) fn write_local(&self, write: impl FnOnce() -> io::Result<()>) {
        if self.lock().local == LocalDisk::Failed {
            return;
        }
        if let Err(error) = write() {
            self.local_failed(&error);
        }
    }

    /// The local image failed: it is recorded durably as Inconsistent (so that no restart
    /// serves or resyncs from it) before any further request completes, then all I/O is
    /// served by the peer. If even that cannot be recorded, this primary fences itself:
    /// a restart must never find the stale copy marked UpToDate.
    pub(super) fn local_failed(&self, cause: &io::Error) {
        let recorded = {
            let mut state = self.lock();
            if state.local == LocalDisk::Failed {
                return;
            }
            // Set first so that no other request uses the local copy meanwhile, and recorded
            // under the lock, so that nobody sees RemoteOnly before it is durable.
            state.local = LocalDisk::Failed;
            let recorded = self
                .metadata
                .set_header(state.generation, DataState::Inconsistent);
            if recorded.is_err() {
                state.mode = Mode::Fenced;
                state.in_flight.clear();
                self.changed.notify_all();
            }
            recorded
        };
        if let Err(error) = recorded {
            let reason = match std::error::Error::source(&error) {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            };
            error!(
                "local disk failed ({cause}) and that cannot be recorded ({reason}): fenced, \
                 so that no restart serves the stale copy; the peer's copy must take over"
            );
            self.transport().close();
            return;
        }
        error!(
            "local disk failed ({cause}): this copy is Inconsistent; serving all I/O from the \
             peer (RemoteOnly); remedy: repair the disk holding {}, then send `repair`",
            self.image.path().display()
        );
        // The peer's image lacks its buffered epochs: it applies them before any read.
        self.leave_epochs(Some("RemoteOnly"));
    }

    /// The local image fails as a real disk error would make it (tests of RemoteOnly).
    #[cfg(test)]
    pub(crate) fn fail_local_for_test(&self) {
        self.local_failed(&io::Error::other("injected by a test"));
    }

    /// A guest read: the local image, or the peer's copy when the local one is unusable.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_into(offset, buf)
    }

    /// [`Primary::read`] into any target (guest memory, read into directly). A target whose
    /// own memory faulted is the guest's error, not the local disk's.
    pub fn read_into(
        &self,
        offset: u64,
        target: &mut (impl ReadTarget + ?Sized),
    ) -> io::Result<()> {
        if self.lock().local == LocalDisk::Healthy {
            match target.read_from(&self.image, offset) {
                Ok(()) => return Ok(()),
                Err(error) if buffer_fault(&error) => return Err(error),
                Err(error) => self.local_failed(&error),
            }
        }
        if self.lock().no_complete_copy {
            // Stale data would be worse than an error the guest can see.
            return Err(io::Error::other(
                "no copy holds every acknowledged write: the local disk failed and the \
                 peer's copy is incomplete",
            ));
        }
        let len = target.len();
        for start in (0..len).step_by(MAX_BLOCK_BYTES) {
            let part_len = (len - start).min(MAX_BLOCK_BYTES);
            let (id, data) = self.read_remote(offset + start as u64, part_len as u64)?;
            self.finish(id);
            target.fill_at(start, &data)?;
        }
        Ok(())
    }

    /// Reads a range from the peer. The range stays locked (no overlapping write can start)
    /// until the caller calls [`Primary::finish`] with the returned id.
    fn read_remote(&self, offset: u64, len: u64) -> io::Result<(u64, Vec<u8>)> {
        // No read goes before the `EpochOff` that makes the peer apply what it buffered.
        self.leave_epochs(Some("RemoteOnly"));
        let (sender, receiver) = mpsc::sync_channel(1);
        let mut entry = InFlight::new(Kind::Read, offset, len, None);
        entry.reply = Some(sender);
        let (id, _) = self.register(entry).map_err(|reason| {
            io::Error::other(format!("the peer's copy is unavailable ({reason:?})"))
        })?;
        self.send_or_hold(&Message::Read { id, offset, len }, Vec::new());
        loop {
            match receiver.recv_timeout(READ_POLL) {
                Ok(Ok(data)) if data.len() as u64 == len => return Ok((id, data)),
                Ok(Ok(data)) => {
                    self.finish(id);
                    return Err(io::Error::other(format!(
                        "the peer returned {} bytes for a read of {len}",
                        data.len()
                    )));
                }
                Ok(Err(error)) => {
                    self.finish(id);
                    return Err(error);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other("the read from the peer was abandoned"));
                }
            }
        }
    }

    /// Releases a read's range.
    pub(super) fn finish(&self, id: u64) {
        let mut state = self.lock();
        state.in_flight.remove(&id);
        self.changed.notify_all();
    }

    /// Hands a read's data (or failure) to the thread waiting for it.
    pub(super) fn deliver_read(&self, id: u64, data: io::Result<Vec<u8>>) {
        let reply = self
            .lock()
            .in_flight
            .get(&id)
            .and_then(|entry| entry.reply.clone());
        if let Some(reply) = reply {
            let _ = reply.try_send(data);
        }
    }

    /// The local disk is usable again: rebuild it from the peer in the background.
    pub fn repair(self: &Arc<Self>) -> Result<&'static str, String> {
        {
            let mut state = self.lock();
            match state.local {
                LocalDisk::Healthy => return Ok("the local disk is healthy; nothing to repair"),
                LocalDisk::Rebuilding => return Ok("already rebuilding"),
                LocalDisk::Failed => {}
            }
            match state.mode {
                Mode::Fenced => {
                    return Err("this primary is fenced (it could not record its disk's \
                                failure): the peer's copy takes over; restart this daemon as \
                                its secondary once the disk is fixed"
                        .into())
                }
                Mode::Degraded => {
                    return Err("the peer's copy is not available to rebuild from".into())
                }
                Mode::Connecting | Mode::Mirrored | Mode::Holding => {}
            }
            state.local = LocalDisk::Rebuilding;
            state.rebuild = CopyProgress {
                bytes_total: self.image.size_bytes(),
                started: Some(Instant::now()),
                ..CopyProgress::default()
            };
        }
        info!("repair: rebuilding the local disk from the peer");
        let primary = self.clone();
        std::thread::Builder::new()
            .name("mirror-rebuild".into())
            .spawn(move || primary.rebuild())
            .map_err(|error| error.to_string())?;
        Ok("rebuilding the local disk from the peer")
    }

    /// Copies the whole disk from the peer, chunk by chunk, each chunk locked against
    /// overlapping guest writes (which go to both copies meanwhile).
    fn rebuild(&self) {
        let chunk_bytes = self.metadata.chunk_bytes().max(MAX_BLOCK_BYTES as u64);
        let size = self.image.size_bytes();
        let mut offset = 0;
        while offset < size {
            let len = chunk_bytes.min(size - offset);
            let result = self.read_remote(offset, len).and_then(|(id, data)| {
                let written = self.image.write_at(&data, offset);
                self.finish(id);
                written
            });
            if let Err(error) = result {
                warn!("rebuild stopped at byte {offset}: {error}");
                self.local_failed(&error);
                return;
            }
            offset += len;
            self.lock().rebuild.bytes_done = offset;
        }
        if let Err(error) = self.image.flush() {
            self.local_failed(&error);
            return;
        }
        let generation = self.generation();
        if let Err(error) = self.metadata.set_header(generation, DataState::UpToDate) {
            error!("repair: cannot record the rebuilt copy as UpToDate: {error}");
            self.local_failed(&io::Error::other(error));
            return;
        }
        let mut state = self.lock();
        if state.local == LocalDisk::Rebuilding {
            state.local = LocalDisk::Healthy;
            state.rebuild.finish();
            info!("repair: the local disk is rebuilt ({size} bytes) and serves I/O again");
        }
    }
}
