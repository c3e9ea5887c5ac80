//! The primary's side of the checkpoint stream: encodes each epoch against the *shadow* (its
//! copy of the replica's RAM) and sends it over a `replication-link` session
//! ([`crate::wire`]).
//!
//! The shadow is what the replica will hold once every epoch sent so far commits: each page
//! is encoded against the shadow's copy and then written into it. It is trusted only while
//! the replica keeps up: a refusal, a link error during a send, or a `Welcome` whose
//! committed epoch is not the last epoch sent invalidates it, and the next epoch must be a
//! full copy ([`Sender::needs_full_copy`]), encoded against zero pages.
//!
//! The device state goes as a delta against the device state of the previous epoch sent
//! ([`crate::state_delta`]), which the replica holds as its committed state whenever it
//! accepts the epoch at all (an incremental epoch builds only on the one before it); the
//! delta names that epoch, and the replica refuses it if its committed state is another.
//! A full copy and the first epoch after a handshake send their state whole.
//!
//! Pipelining: `send_*` only queues the epoch on the session (which blocks only when the
//! link's send window is full), so epoch N+1 may be sent before N's `Ack`; acks arrive in
//! order and [`Sender::wait_ack`] takes them one at a time. If N is refused, the replica
//! refuses N+1 too (it no longer follows), and both are lost: the next epoch is a full copy.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use log::{info, warn};
use replication_link::{Session, SessionError};

use crate::delta::{Encoder, Encoding, Page, PAGE_BYTES, ZERO_PAGE};
use crate::state_delta::{StateEncoder, StateEncoding};
use crate::wire::{
    BatchBuilder, Message, Refusal, WireError, MAX_DEVICE_STATE_BYTES, MAX_RAM_BYTES,
    MAX_STATE_CHUNK_BYTES, MAX_VM_NAME_BYTES, PROTOCOL_VERSION,
};

/// Errors of the sender.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error(
        "RAM size {ram_bytes} is not a non-zero multiple of {PAGE_BYTES} up to {MAX_RAM_BYTES}"
    )]
    RamSize { ram_bytes: u64 },
    #[error("VM name must be 1 to {MAX_VM_NAME_BYTES} bytes")]
    VmName,
    #[error("the RAM given is {length} bytes, not {ram_bytes}")]
    RamLength { length: usize, ram_bytes: u64 },
    #[error("page {index} is beyond the RAM's {ram_pages} pages")]
    PageOutOfRange { index: u64, ram_pages: u64 },
    #[error("page {index} given twice in one epoch")]
    DuplicatePage { index: u64 },
    #[error("device state of {length} bytes exceeds {MAX_DEVICE_STATE_BYTES}")]
    DeviceStateTooLarge { length: usize },
    #[error("the replica needs a full copy first")]
    NeedFullCopy,
    #[error("no Welcome from the secondary within {timeout_ms} ms")]
    NoWelcome { timeout_ms: u64 },
    #[error("the secondary speaks checkpoint protocol {theirs}, not {ours}")]
    ProtocolVersion { ours: u32, theirs: u32 },
    #[error("the secondary replicates VM {vm:?} with {ram_bytes} bytes of RAM")]
    Mismatch { vm: String, ram_bytes: u64 },
    #[error("the replica is at generation {theirs}, above ours ({ours}): a newer primary exists")]
    Fenced { ours: u64, theirs: u64 },
    #[error("the secondary refused epoch {epoch}: {reason:?}")]
    Refused { epoch: u64, reason: Refusal },
    #[error("unexpected message from the secondary: {0}")]
    Protocol(String),
    #[error("bad message from the secondary")]
    Wire(#[source] WireError),
    #[error("replication link failed")]
    Link(#[source] SessionError),
}

/// What the primary replicates.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    pub vm: String,
    /// This primary's generation (fencing token).
    pub generation: u64,
    pub ram_bytes: u64,
}

/// The replica's state, as its `Welcome` said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaState {
    pub generation: u64,
    pub committed_epoch: u64,
    pub full_copy_complete: bool,
}

/// Sizes of an epoch as sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochSent {
    pub epoch: u64,
    pub pages: u64,
    /// Page bytes on the wire (entries with their fixed part).
    pub page_bytes_sent: u64,
    /// The device state's length, and its bytes on the wire (encoded).
    pub device_state_bytes: u64,
    pub device_state_wire_bytes: u64,
    pub device_state_encoding: Option<StateEncoding>,
}

/// The primary's sender: the shadow, the encoder, the epochs in flight.
pub struct Sender {
    config: SenderConfig,
    stream: u64,
    ram_pages: u64,
    shadow: Vec<u8>,
    shadow_valid: bool,
    encoder: Encoder,
    state_encoder: StateEncoder,
    /// The latest epoch sent and its device state (not empty): the base of the next
    /// epoch's state. Forgotten at each handshake.
    state_base: Option<(u64, Vec<u8>)>,
    /// The latest epoch sent (its pages are in the shadow).
    last_sent: u64,
    acked: u64,
    in_flight: VecDeque<u64>,
    /// One bit per page: given in the epoch being checked.
    seen: Vec<u64>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Sender")
            .field("vm", &self.config.vm)
            .field("stream", &format_args!("{:016x}", self.stream))
            .field("shadow_valid", &self.shadow_valid)
            .field("last_sent", &self.last_sent)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// A sender with an empty shadow (the first epoch is a full copy). Allocates the shadow:
    /// as much memory as the guest's RAM (zero pages stay unbacked until written).
    pub fn new(config: SenderConfig) -> Result<Sender, SenderError> {
        let ram_bytes = config.ram_bytes;
        if ram_bytes == 0
            || !ram_bytes.is_multiple_of(PAGE_BYTES as u64)
            || ram_bytes > MAX_RAM_BYTES
        {
            return Err(SenderError::RamSize { ram_bytes });
        }
        if config.vm.is_empty() || config.vm.len() > MAX_VM_NAME_BYTES {
            return Err(SenderError::VmName);
        }
        let length = usize::try_from(ram_bytes).map_err(|_| SenderError::RamSize { ram_bytes })?;
        let ram_pages = ram_bytes / PAGE_BYTES as u64;
        Ok(Sender {
            config,
            stream: random_stream(),
            ram_pages,
            shadow: vec![0; length],
            shadow_valid: false,
            encoder: Encoder::new(),
            state_encoder: StateEncoder::new(),
            state_base: None,
            last_sent: 0,
            acked: 0,
            in_flight: VecDeque::new(),
            seen: vec![0; ram_pages.div_ceil(64) as usize],
        })
    }

    /// Whether the next epoch must be a full copy.
    pub fn needs_full_copy(&self) -> bool {
        !self.shadow_valid
    }

    /// The latest epoch the secondary acknowledged (0: none).
    pub fn acked_epoch(&self) -> u64 {
        self.acked
    }

    /// Epochs sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The number the next epoch will get.
    pub fn next_epoch(&self) -> u64 {
        self.last_sent + 1
    }

    /// Starts over: the next epoch is a full copy, numbered `at_least` or above (a full
    /// copy may skip numbers, an incremental epoch never does). The engine uses it when an
    /// epoch number was used on the disks but the epoch never reached the replica.
    pub fn start_over(&mut self, at_least: u64) {
        self.shadow_valid = false;
        self.last_sent = self.last_sent.max(at_least.saturating_sub(1));
    }

    /// The shadow: what the replica holds once every epoch sent commits.
    pub fn shadow(&self) -> &[u8] {
        &self.shadow
    }

    /// Starts a session: `Hello`, then the secondary's `Welcome`. Keeps the shadow only if
    /// the replica committed exactly the last epoch sent, from this sender.
    pub fn handshake(
        &mut self,
        session: &Session,
        timeout: Duration,
    ) -> Result<ReplicaState, SenderError> {
        self.in_flight.clear();
        // The first state of a session goes whole, whatever the replica says it holds.
        self.state_base = None;
        let hello = Message::Hello {
            protocol: PROTOCOL_VERSION,
            vm: self.config.vm.clone(),
            generation: self.config.generation,
            stream: self.stream,
            ram_bytes: self.config.ram_bytes,
            page_bytes: PAGE_BYTES as u32,
        };
        self.send(session, &hello, Vec::new())?;
        let deadline = Instant::now() + timeout;
        let welcome = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Some(message) = session.recv(remaining).map_err(SenderError::Link)? else {
                return Err(SenderError::NoWelcome {
                    timeout_ms: timeout.as_millis() as u64,
                });
            };
            match Message::decode(&message.app_header, &message.payload)
                .map_err(SenderError::Wire)?
            {
                welcome @ Message::Welcome { .. } => break welcome,
                Message::Refused {
                    reason:
                        Refusal::Mismatch {
                            ours_vm,
                            ours_ram_bytes,
                        },
                    ..
                } => {
                    return Err(SenderError::Mismatch {
                        vm: ours_vm,
                        ram_bytes: ours_ram_bytes,
                    })
                }
                Message::Refused {
                    reason: Refusal::Protocol { ours },
                    ..
                } => {
                    return Err(SenderError::ProtocolVersion {
                        ours: PROTOCOL_VERSION,
                        theirs: ours,
                    })
                }
                // Answers to a previous session's epochs.
                Message::Ack { .. } | Message::Refused { .. } => continue,
                other => return Err(SenderError::Protocol(format!("{other:?}"))),
            }
        };
        self.welcome(welcome)
    }

    fn welcome(&mut self, welcome: Message) -> Result<ReplicaState, SenderError> {
        let Message::Welcome {
            vm,
            generation,
            stream,
            committed_epoch,
            full_copy_complete,
            ram_bytes,
            page_bytes,
        } = welcome
        else {
            return Err(SenderError::Protocol("not a Welcome".into()));
        };
        if vm != self.config.vm
            || ram_bytes != self.config.ram_bytes
            || page_bytes as usize != PAGE_BYTES
        {
            return Err(SenderError::Mismatch { vm, ram_bytes });
        }
        if generation > self.config.generation {
            return Err(SenderError::Fenced {
                ours: self.config.generation,
                theirs: generation,
            });
        }
        let continues = self.shadow_valid
            && full_copy_complete
            && stream == self.stream
            && generation == self.config.generation
            && committed_epoch == self.last_sent;
        if continues {
            self.acked = committed_epoch;
        } else if self.shadow_valid {
            warn!(
                "replica at epoch {committed_epoch} (full copy {full_copy_complete}), last sent {}: next epoch is a full copy",
                self.last_sent
            );
        }
        self.shadow_valid = continues;
        self.last_sent = self.last_sent.max(committed_epoch);
        info!(
            "secondary at epoch {committed_epoch} of generation {generation}; next epoch {} ({})",
            self.last_sent + 1,
            if continues {
                "incremental"
            } else {
                "full copy"
            }
        );
        Ok(ReplicaState {
            generation,
            committed_epoch,
            full_copy_complete,
        })
    }

    /// Sends a full copy of `ram` (the whole guest RAM, which may change meanwhile: each
    /// page is copied once and that copy is encoded, checksummed and kept in the shadow).
    pub fn send_full(
        &mut self,
        session: &Session,
        ram: &[u8],
        device_state: &[u8],
    ) -> Result<EpochSent, SenderError> {
        if ram.len() as u64 != self.config.ram_bytes {
            return Err(SenderError::RamLength {
                length: ram.len(),
                ram_bytes: self.config.ram_bytes,
            });
        }
        check_device_state(device_state)?;
        let state = self.encode_state(true, device_state);
        let mut snapshot: Box<Page> = Box::new([0; PAGE_BYTES]);
        let mut epoch = self.begin(session, true, self.ram_pages, &state)?;
        for (index, page) in ram.chunks_exact(PAGE_BYTES).enumerate() {
            snapshot.copy_from_slice(page);
            self.add_page(session, &mut epoch, index as u64, &snapshot)?;
        }
        self.finish(session, epoch, &state)
    }

    /// Sends an incremental epoch: `pages` (each index once) and the device state.
    pub fn send_incremental(
        &mut self,
        session: &Session,
        pages: &[(u64, &Page)],
        device_state: &[u8],
    ) -> Result<EpochSent, SenderError> {
        if !self.shadow_valid {
            return Err(SenderError::NeedFullCopy);
        }
        check_device_state(device_state)?;
        self.check_pages(pages)?;
        let state = self.encode_state(false, device_state);
        let mut epoch = self.begin(session, false, pages.len() as u64, &state)?;
        for (index, page) in pages {
            self.add_page(session, &mut epoch, *index, page)?;
        }
        self.finish(session, epoch, &state)
    }

    /// Encodes an epoch's device state: against the previous epoch's, when it is not a
    /// full copy and that state is known (see the module documentation).
    fn encode_state<'a>(&mut self, full: bool, state: &'a [u8]) -> EncodedState<'a> {
        let base = match (&self.state_base, full) {
            (Some((epoch, bytes)), false) => Some((*epoch, &bytes[..])),
            _ => None,
        };
        let (encoding, wire) = self.state_encoder.encode(state, base);
        let wire = match encoding {
            StateEncoding::Raw => Cow::Borrowed(state),
            StateEncoding::Lz4 | StateEncoding::XorLz4 { .. } => Cow::Owned(wire.to_vec()),
        };
        EncodedState {
            state,
            encoding,
            wire,
        }
    }

    /// Every index in range and given once; the bitmap is clean again afterwards.
    fn check_pages(&mut self, pages: &[(u64, &Page)]) -> Result<(), SenderError> {
        let mut result = Ok(());
        let mut marked = 0;
        for (index, _) in pages {
            if *index >= self.ram_pages {
                result = Err(SenderError::PageOutOfRange {
                    index: *index,
                    ram_pages: self.ram_pages,
                });
                break;
            }
            let bit = 1u64 << (index % 64);
            let word = &mut self.seen[(index / 64) as usize];
            if *word & bit != 0 {
                result = Err(SenderError::DuplicatePage { index: *index });
                break;
            }
            *word |= bit;
            marked += 1;
        }
        for (index, _) in &pages[..marked] {
            self.seen[(index / 64) as usize] = 0;
        }
        result
    }

    /// Waits up to `timeout` for the next acknowledgement: `Some(epoch)` when the oldest
    /// epoch in flight committed, `None` on timeout, an error when it was refused (the next
    /// epoch is then a full copy).
    pub fn wait_ack(
        &mut self,
        session: &Session,
        timeout: Duration,
    ) -> Result<Option<u64>, SenderError> {
        let Some(message) = session.recv(timeout).map_err(SenderError::Link)? else {
            return Ok(None);
        };
        let message =
            Message::decode(&message.app_header, &message.payload).map_err(SenderError::Wire)?;
        match message {
            Message::Ack { epoch } if self.in_flight.front() == Some(&epoch) => {
                self.in_flight.pop_front();
                self.acked = epoch;
                Ok(Some(epoch))
            }
            Message::Refused { epoch, reason } => {
                self.shadow_valid = false;
                self.in_flight.clear();
                Err(SenderError::Refused { epoch, reason })
            }
            other => {
                self.shadow_valid = false;
                self.in_flight.clear();
                Err(SenderError::Protocol(format!("{other:?}")))
            }
        }
    }

    fn begin(
        &mut self,
        session: &Session,
        full: bool,
        pages: u64,
        state: &EncodedState<'_>,
    ) -> Result<EpochInProgress, SenderError> {
        // The shadow changes from here on: until the epoch is queued whole it matches
        // nothing the replica will hold.
        self.shadow_valid = false;
        let epoch = self.last_sent + 1;
        let start = Message::EpochStart {
            epoch,
            generation: self.config.generation,
            full,
            pages,
            state_len: state.state.len() as u64,
            state_encoding: state.encoding,
            state_wire_len: state.wire.len() as u64,
        };
        self.send(session, &start, Vec::new())?;
        Ok(EpochInProgress {
            sent: EpochSent {
                epoch,
                pages,
                ..EpochSent::default()
            },
            batch: BatchBuilder::new(),
            crc: 0,
            full,
        })
    }

    /// Encodes one page against its base (the zero page in a full copy, else the shadow's),
    /// batches it and writes it into the shadow. `index` is in range (checked before).
    fn add_page(
        &mut self,
        session: &Session,
        epoch: &mut EpochInProgress,
        index: u64,
        page: &Page,
    ) -> Result<(), SenderError> {
        let start = index as usize * PAGE_BYTES;
        let shadow_page =
            self.shadow
                .get_mut(start..start + PAGE_BYTES)
                .ok_or(SenderError::PageOutOfRange {
                    index,
                    ram_pages: self.ram_pages,
                })?;
        let base: &Page = if epoch.full {
            &ZERO_PAGE
        } else {
            (&*shadow_page).try_into().unwrap_or(&ZERO_PAGE)
        };
        let encoded = self.encoder.encode(page, base);
        let changed = encoded.encoding != Encoding::Same;
        if !epoch.batch.has_room(&encoded) {
            let (message, payload) = epoch.batch.take(epoch.sent.epoch);
            epoch.sent.page_bytes_sent += payload.len() as u64;
            send(session, &message, payload)?;
        }
        epoch.batch.push(index, &encoded);
        epoch.crc = crc32c::crc32c_append(epoch.crc, &index.to_le_bytes());
        epoch.crc = crc32c::crc32c_append(epoch.crc, page);
        // A full copy's `Same` means "zero", which the shadow may not hold.
        if changed || epoch.full {
            shadow_page.copy_from_slice(page);
        }
        Ok(())
    }

    fn finish(
        &mut self,
        session: &Session,
        mut epoch: EpochInProgress,
        state: &EncodedState<'_>,
    ) -> Result<EpochSent, SenderError> {
        let number = epoch.sent.epoch;
        if !epoch.batch.is_empty() {
            let (message, payload) = epoch.batch.take(number);
            epoch.sent.page_bytes_sent += payload.len() as u64;
            self.send(session, &message, payload)?;
        }
        let mut offset = 0u64;
        for chunk in state.wire.chunks(MAX_STATE_CHUNK_BYTES) {
            let message = Message::DeviceState {
                epoch: number,
                offset,
            };
            self.send(session, &message, chunk.to_vec())?;
            offset += chunk.len() as u64;
        }
        epoch.sent.device_state_bytes = state.state.len() as u64;
        epoch.sent.device_state_wire_bytes = offset;
        epoch.sent.device_state_encoding = Some(state.encoding);
        let crc32c = crc32c::crc32c_append(epoch.crc, state.state);
        self.send(
            session,
            &Message::EpochEnd {
                epoch: number,
                crc32c,
            },
            Vec::new(),
        )?;
        self.last_sent = number;
        self.in_flight.push_back(number);
        self.shadow_valid = true;
        let mut base = self
            .state_base
            .take()
            .map(|(_, bytes)| bytes)
            .unwrap_or_default();
        base.clear();
        base.extend_from_slice(state.state);
        self.state_base = (!base.is_empty()).then_some((number, base));
        Ok(epoch.sent)
    }

    fn send(
        &mut self,
        session: &Session,
        message: &Message,
        payload: Vec<u8>,
    ) -> Result<(), SenderError> {
        let result = send(session, message, payload);
        if result.is_err() {
            self.shadow_valid = false;
        }
        result
    }
}

fn send(session: &Session, message: &Message, payload: Vec<u8>) -> Result<(), SenderError> {
    let header = message.encode().map_err(SenderError::Wire)?;
    session
        .send(&header, payload)
        .map(|_| ())
        .map_err(SenderError::Link)
}

fn check_device_state(device_state: &[u8]) -> Result<(), SenderError> {
    if device_state.len() as u64 > MAX_DEVICE_STATE_BYTES {
        return Err(SenderError::DeviceStateTooLarge {
            length: device_state.len(),
        });
    }
    Ok(())
}

/// An epoch's device state and how it goes on the wire.
struct EncodedState<'a> {
    state: &'a [u8],
    encoding: StateEncoding,
    wire: Cow<'a, [u8]>,
}

/// An epoch being sent.
struct EpochInProgress {
    sent: EpochSent,
    batch: BatchBuilder,
    crc: u32,
    full: bool,
}

/// A random stream id (not a secret: it tells this sender's copies from another's).
fn random_stream() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(elapsed) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(elapsed.as_nanos());
    }
    hasher.finish().max(1)
}
