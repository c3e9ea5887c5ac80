//! The secondary's engine loop: takes the checkpoint stream from a `replication-link`
//! session, stages each epoch and applies it to the [`Replica`], answering `Ack` or
//! `Refused` ([`crate::wire`]).
//!
//! [`Secondary::handle`] is the whole state machine on one message (pure but for the replica
//! files), so hostile input is tested without a link; [`Secondary::serve`] drives it from a
//! session. One epoch is staged at a time; an `EpochStart` while another is staged drops the
//! older one. After a refusal the rest of that epoch's messages are ignored silently, so the
//! primary gets one `Refused` per epoch.
//!
//! [`EpochHooks`] join the epoch with the disk on this host (`docs/LEVEL3.md`, "Commit, and
//! how the replica waits for the disk"), for checkpoints only (epochs with a device state;
//! a full copy taken while the guest ran has no disk epoch): `before_apply(N)` runs once N is complete and its
//! checksum matches, before the replica changes (wait until the disk daemon sealed N; an
//! error refuses N and the replica stays at N-1); `committed(N)` runs once N is durable,
//! before its `Ack` is sent (tell the disk daemon `commit N`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{debug, info, warn};
use replication_link::{CloseReason, Session, SessionError};

use crate::delta::PAGE_BYTES;
use crate::replica::{EpochHeader, Replica, StagedEpoch};
use crate::wire::{bounded_text, BatchEntries, Message, Refusal, WireError, PROTOCOL_VERSION};

/// How often `serve` looks at its stop flag: a `freeze` (a failover, or the restore that
/// ends `ftvm migrate`) waits up to this long. At 100 ms it was 82 ms of each move's
/// downtime (`docs/BENCHMARKS.md`, live migration); 10 wake-ups a second more cost nothing.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Errors of the loop: the link failed (refusals are answers, not errors).
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    #[error("cannot encode a reply")]
    Encode(#[source] WireError),
    #[error("replication link failed")]
    Link(#[source] SessionError),
}

/// Why `serve` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeEnd {
    /// The session closed (the primary went away, or a new session replaced it).
    Closed(CloseReason),
    /// The stop flag was set.
    Stopped,
}

/// What the engine does around each commit on this host.
pub trait EpochHooks: Send {
    /// Epoch `epoch` is complete and checked; the replica has not changed yet. An error
    /// refuses the epoch (its text goes to the primary).
    fn before_apply(&mut self, epoch: u64) -> Result<(), String>;
    /// Epoch `epoch` is durable in `replica` (its `Ack` follows).
    fn committed(&mut self, epoch: u64, replica: &Replica);
}

/// No hooks: RAM only.
#[derive(Debug, Default)]
pub struct NoHooks;

impl EpochHooks for NoHooks {
    fn before_apply(&mut self, _epoch: u64) -> Result<(), String> {
        Ok(())
    }

    fn committed(&mut self, _epoch: u64, _replica: &Replica) {}
}

/// The primary of the current session, as its `Hello` said.
#[derive(Clone, Copy, Debug)]
struct Peer {
    generation: u64,
    stream: u64,
}

/// The secondary's side of the checkpoint stream.
pub struct Secondary {
    replica: Replica,
    hooks: Box<dyn EpochHooks>,
    peer: Option<Peer>,
    staged: Option<StagedEpoch>,
    /// An epoch refused: its remaining messages are dropped without another answer.
    ignoring: Option<u64>,
}

impl std::fmt::Debug for Secondary {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Secondary")
            .field("replica", &self.replica)
            .field("staged", &self.staged.as_ref().map(StagedEpoch::epoch))
            .finish_non_exhaustive()
    }
}

impl Secondary {
    /// A secondary without hooks (RAM only).
    pub fn new(replica: Replica) -> Secondary {
        Secondary::with_hooks(replica, Box::new(NoHooks))
    }

    pub fn with_hooks(replica: Replica, hooks: Box<dyn EpochHooks>) -> Secondary {
        Secondary {
            replica,
            hooks,
            peer: None,
            staged: None,
            ignoring: None,
        }
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// See [`Replica::take_for_restore`].
    pub fn take_for_restore(&mut self) -> Result<Option<Vec<u8>>, crate::replica::ReplicaError> {
        self.replica.take_for_restore()
    }

    pub fn into_replica(self) -> Replica {
        self.replica
    }

    /// Serves one session until it closes or `stop` is set. Call again with the next
    /// session: what the previous one left staged is dropped.
    pub fn serve(
        &mut self,
        session: &Session,
        stop: &AtomicBool,
    ) -> Result<ServeEnd, SecondaryError> {
        self.reset();
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(ServeEnd::Stopped);
            }
            let message = match session.recv(POLL_INTERVAL) {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(SessionError::Closed { reason }) => {
                    self.reset();
                    return Ok(ServeEnd::Closed(reason));
                }
                Err(error) => return Err(SecondaryError::Link(error)),
            };
            if let Some(reply) = self.handle(&message.app_header, &message.payload) {
                let header = reply.encode().map_err(SecondaryError::Encode)?;
                match session.send(&header, Vec::new()) {
                    Ok(_) => {}
                    Err(SessionError::Closed { reason }) => {
                        self.reset();
                        return Ok(ServeEnd::Closed(reason));
                    }
                    Err(error) => return Err(SecondaryError::Link(error)),
                }
            }
        }
    }

    fn reset(&mut self) {
        self.peer = None;
        self.staged = None;
        self.ignoring = None;
    }

    /// Takes one message (link header and payload); returns the reply to send, if any.
    pub fn handle(&mut self, header: &[u8], payload: &[u8]) -> Option<Message> {
        let message = match Message::decode(header, payload) {
            Ok(message) => message,
            Err(error) => {
                let epoch = self.staged.as_ref().map_or(0, StagedEpoch::epoch);
                return self.refuse(epoch, Refusal::malformed(&error));
            }
        };
        match message {
            Message::Hello {
                protocol,
                vm,
                generation,
                stream,
                ram_bytes,
                page_bytes,
            } => {
                if protocol != PROTOCOL_VERSION {
                    self.reset();
                    return self.refuse(
                        0,
                        Refusal::Protocol {
                            ours: PROTOCOL_VERSION,
                        },
                    );
                }
                self.hello(&vm, generation, stream, ram_bytes, page_bytes)
            }
            Message::EpochStart {
                epoch,
                generation,
                full,
                pages,
                state_len,
                state_encoding,
                state_wire_len,
            } => {
                let Some(peer) = self.peer else {
                    return self.refuse(epoch, Refusal::Malformed("no Hello".into()));
                };
                if generation != peer.generation {
                    return self.refuse(
                        epoch,
                        Refusal::Malformed(format!(
                            "epoch of generation {generation} in a session of {}",
                            peer.generation
                        )),
                    );
                }
                let header = EpochHeader {
                    epoch,
                    generation,
                    stream: peer.stream,
                    full,
                    pages,
                    state_len,
                    state_encoding,
                    state_wire_len,
                };
                if let Some(dropped) = self.staged.take() {
                    warn!(
                        "epoch {} dropped unfinished: epoch {epoch} started",
                        dropped.epoch()
                    );
                }
                self.ignoring = None;
                match StagedEpoch::new(&self.replica, header) {
                    Ok(staged) => {
                        self.staged = Some(staged);
                        None
                    }
                    Err(reason) => self.refuse(epoch, reason),
                }
            }
            Message::PageBatch { epoch, entries } => {
                if let Err(reply) = self.current(epoch) {
                    return reply;
                }
                let staged = self.staged.as_mut()?;
                let batch = BatchEntries::new(payload, entries, self.replica.ram_pages());
                match staged.add_batch(&self.replica, batch) {
                    Ok(()) => None,
                    Err(reason) => self.refuse(epoch, reason),
                }
            }
            Message::DeviceState { epoch, offset } => {
                if let Err(reply) = self.current(epoch) {
                    return reply;
                }
                let staged = self.staged.as_mut()?;
                match staged.add_state(&self.replica, offset, payload) {
                    Ok(()) => None,
                    Err(reason) => self.refuse(epoch, reason),
                }
            }
            Message::EpochEnd { epoch, crc32c } => {
                if let Err(reply) = self.current(epoch) {
                    return reply;
                }
                let staged = self.staged.take()?;
                let pages = staged.header().pages;
                // Only a checkpoint (an epoch with a device state) has a disk epoch of
                // its own; a full copy taken while the guest ran has none.
                let checkpoint = staged.header().state_len > 0;
                if let Err(reason) = staged.check_complete(crc32c) {
                    return self.refuse(epoch, reason);
                }
                if checkpoint {
                    if let Err(text) = self.hooks.before_apply(epoch) {
                        return self.refuse(epoch, Refusal::NotReady(bounded_text(&text)));
                    }
                }
                match self.replica.apply(staged, crc32c) {
                    Ok(()) => {
                        debug!("epoch {epoch} committed ({pages} pages)");
                        if checkpoint {
                            self.hooks.committed(epoch, &self.replica);
                        }
                        Some(Message::Ack { epoch })
                    }
                    Err(reason) => self.refuse(epoch, reason),
                }
            }
            Message::Welcome { .. } | Message::Ack { .. } | Message::Refused { .. } => {
                let epoch = self.staged.as_ref().map_or(0, StagedEpoch::epoch);
                self.refuse(
                    epoch,
                    Refusal::Malformed("a secondary's message sent to the secondary".into()),
                )
            }
        }
    }

    fn hello(
        &mut self,
        vm: &str,
        generation: u64,
        stream: u64,
        ram_bytes: u64,
        page_bytes: u32,
    ) -> Option<Message> {
        self.reset();
        let replica = &self.replica;
        if vm != replica.vm()
            || ram_bytes != replica.ram_bytes()
            || page_bytes as usize != PAGE_BYTES
        {
            return self.refuse(
                0,
                Refusal::Mismatch {
                    ours_vm: replica.vm().to_string(),
                    ours_ram_bytes: replica.ram_bytes(),
                },
            );
        }
        self.peer = Some(Peer { generation, stream });
        let committed = replica.committed();
        info!(
            "primary of generation {generation} (stream {stream:016x}) connected; replica at epoch {} of generation {}, full copy {}",
            committed.epoch,
            committed.generation,
            if committed.full_copy_complete { "complete" } else { "needed" }
        );
        Some(Message::Welcome {
            vm: replica.vm().to_string(),
            generation: committed.generation,
            stream: committed.stream,
            committed_epoch: committed.epoch,
            full_copy_complete: committed.full_copy_complete,
            ram_bytes: replica.ram_bytes(),
            page_bytes: PAGE_BYTES as u32,
        })
    }

    /// The staged epoch if it is `epoch`; otherwise the reply (nothing for an epoch being
    /// ignored, a refusal for anything else).
    fn current(&mut self, epoch: u64) -> Result<&mut StagedEpoch, Option<Message>> {
        if self.ignoring == Some(epoch) {
            return Err(None);
        }
        let matches = self.staged.as_ref().map(StagedEpoch::epoch) == Some(epoch);
        if !matches {
            let expected = self.staged.as_ref().map(StagedEpoch::epoch);
            let text = match expected {
                Some(current) => format!("message of epoch {epoch} during epoch {current}"),
                None => format!("message of epoch {epoch} without its EpochStart"),
            };
            return Err(self.refuse(epoch, Refusal::Malformed(text)));
        }
        self.staged.as_mut().ok_or(None)
    }

    fn refuse(&mut self, epoch: u64, reason: Refusal) -> Option<Message> {
        warn!("epoch {epoch} refused: {reason:?}");
        self.staged = None;
        self.ignoring = Some(epoch);
        Some(Message::Refused { epoch, reason })
    }
}
