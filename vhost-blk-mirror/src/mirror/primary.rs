//! The primary side of the mirror: every guest write goes to the local image and to the
//! secondary, and completes only when the secondary has acknowledged its own completed write.
//!
//! Modes (DESIGN.md, "Disk write, Level 2"):
//! - `Connecting`/`Holding`: no peer yet or peer unreachable; writes reach the local image and
//!   the link's send queue, but their completions are **held** until the peer acknowledges
//!   them or the operator/coordinator says `continue-degraded` or `fence`.
//! - `Mirrored`: normal operation; a resync of out-of-sync regions may run alongside.
//! - `Degraded`: running alone; every written region is first marked durably in the
//!   out-of-sync bitmap, then written, then completed.
//! - `Fenced`: another host may be primary; nothing completes any more.
//!
//! Overlapping requests keep their order on both sides: a request waits until no in-flight
//! request overlaps its range (rare for a guest; the resync uses the same rule so that an
//! older resync block can never overwrite a newer guest write on the secondary).

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use log::{error, warn};

use super::protocol::{Message, Transport};
use crate::image::Image;
use crate::metadata::{DataState, Metadata};
use crate::request::Status;
use crate::ticket::{Outcome, Ticket, Waker};

/// Largest block sent in one message; bigger writes are split.
pub const MAX_BLOCK_BYTES: usize = 1 << 20;
/// How often the receiver looks at the link state when no message arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How the background resync runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncOptions {
    /// Bytes per second the resync may use; 0 = unlimited.
    pub rate_limit: u64,
    /// Compare each chunk's BLAKE3 hash with the secondary's first and send only chunks
    /// that differ (saves the link when most of the disk is already the same).
    pub compare: bool,
}

/// Creates a new replication session to the peer (a fresh session id each time).
pub type Connector = Box<dyn Fn() -> io::Result<Arc<dyn Transport>> + Send + Sync>;

/// The primary's mode and the state of its own copy, as its status reports them.
pub use control_protocol::disk::{LocalDisk, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Flush,
    /// A resync block: `chunks` out-of-sync chunks from `chunk` on.
    Resync {
        chunk: u64,
        chunks: u64,
    },
    Control,
    /// A read served by the peer; the requester removes the entry when done with the data.
    Read,
    /// A Level 3 epoch marker.
    Marker(Marker),
    /// A snapshot barrier (`primary/snapshot.rs`); its answer goes to `snapshot_results`.
    Snapshot,
}

/// A Level 3 marker on the link (`docs/LEVEL3.md`, "Tagging writes with epochs").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    Start(u64),
    End(u64),
    Off,
}

/// Where a read's data goes.
type ReadReply = std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>;

#[derive(Debug)]
struct InFlight {
    ticket: Option<Arc<Ticket>>,
    offset: u64,
    len: u64,
    kind: Kind,
    reply: Option<ReadReply>,
    /// A guest write keeps its extents' activity bits from being cleared until it ends.
    activity: Option<ActivityGuard>,
    /// The Level 3 epoch current when it was registered (sent again after a restart of the
    /// secondary, it goes after an `EpochStart` of this epoch).
    epoch: Option<u64>,
    /// When it was made (a guest write's mirroring latency runs from here).
    created: Instant,
}

impl InFlight {
    fn new(kind: Kind, offset: u64, len: u64, ticket: Option<Arc<Ticket>>) -> InFlight {
        InFlight {
            ticket,
            offset,
            len,
            kind,
            reply: None,
            activity: None,
            epoch: None,
            created: Instant::now(),
        }
    }

    fn with_activity(mut self, guard: &ActivityGuard) -> InFlight {
        self.activity = Some(guard.clone());
        self
    }
}

/// Counts a guest write from before it marks its extents active until it has ended; the
/// activity bitmap is only cleared while none is counted.
#[derive(Debug)]
pub(super) struct ActivityGuard(Arc<AtomicU64>);

impl ActivityGuard {
    fn new(counter: &Arc<AtomicU64>) -> ActivityGuard {
        counter.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(Arc::clone(counter))
    }
}

impl Clone for ActivityGuard {
    fn clone(&self) -> ActivityGuard {
        ActivityGuard::new(&self.0)
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a request part was not registered for mirroring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotRegistered {
    /// Degraded or fenced: see [`Primary::unmirrored`].
    Mode(Mode),
    /// Its queue is being stopped while it waited behind an overlapping request: it never
    /// completes here, and the stop rewinds the ring so that it runs again after `cont`.
    QueueStopping,
}

/// Tracks a copy between the hosts (a resync, or a rebuild after `repair`); its
/// [`CopyProgress::now`] is what `status` shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyProgress {
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Compare mode: bytes whose chunk differed and was sent (the rest was identical).
    pub bytes_sent: u64,
    started: Option<Instant>,
    finished: Option<Instant>,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    generation: u64,
    next_id: u64,
    /// Threads in `wait` (they look again when a request completes); the resync loop's
    /// idle wait is not counted, so a completion wakes nobody when nobody waits for one.
    completion_waiters: usize,
    in_flight: HashMap<u64, InFlight>,
    /// The peer answered `Hello` in the current session.
    welcomed: bool,
    resync: CopyProgress,
    /// A `ResyncStart` was acknowledged and no `ResyncDone` yet.
    resync_started: bool,
    /// A resync must run (and end with `ResyncDone`) even with nothing out of sync: the
    /// secondary is behind our generation and stays Inconsistent until then.
    resync_forced: bool,
    local: LocalDisk,
    rebuild: CopyProgress,
    /// Why the secondary's copy failed (its disk refused a request, or it says so in its
    /// `Welcome`): it counts as lost until it welcomes us with a working disk.
    peer_disk_failed: Option<String>,
    /// Answers to control round trips, by id, until their waiter takes them.
    control_results: HashMap<u64, Status>,
    /// Our copy failed and the peer's last `Welcome` showed its copy incomplete: no copy
    /// holds every acknowledged write, so nothing is read from either.
    no_complete_copy: bool,
    /// Level 3: the epoch writes belong to now (`None`: Level 2).
    epoch: Option<u64>,
    /// Level 3: the last epoch the secondary sealed.
    sealed_epoch: Option<u64>,
    /// Level 3: the highest epoch used since this daemon started (a new `epoch on` must be
    /// above it: the secondary refuses epochs that do not grow).
    last_epoch: Option<u64>,
    /// Why Level 3 ended without `epoch off`.
    epochs_off_reason: Option<String>,
    /// A snapshot barrier is up: no new request is registered until it falls.
    barrier: bool,
    /// The secondary's answers to snapshot barriers, by id, until their waiter takes them.
    snapshot_results: HashMap<u64, Result<(), String>>,
}

/// The primary's replication state; shared by the queue workers and its own threads.
pub struct Primary {
    /// This primary, for the handlers it gives its sessions (`handle_inline`).
    me: Weak<Primary>,
    image: Arc<Image>,
    metadata: Arc<Metadata>,
    connector: Connector,
    transport: Mutex<Arc<dyn Transport>>,
    state: Mutex<State>,
    changed: Condvar,
    resync_options: ResyncOptions,
    /// Guest writes between marking their extents active and their end.
    writes_active: Arc<AtomicU64>,
    /// Held (shared) by a degraded write from its mode check to the end of its local write;
    /// taken (exclusively) by the return to mirroring, so that the resync that follows can
    /// never copy a chunk before a degraded write to it landed and then clear its bit.
    degraded_gate: std::sync::RwLock<()>,
    /// Held from registering an epoch marker until it is sent: markers reach the link in
    /// the order of their ids, and no `Read` overtakes the `EpochOff` of RemoteOnly.
    marker_send: Mutex<()>,
    /// Guest writes, from registration to the secondary's acknowledgement.
    write_latency: latency::WriteLatency,
}

/// What [`Primary::clear_activity_if_idle`] cleared.
enum Cleared {
    Nothing,
    Extents(u64),
}

/// Why the active extents stay marked.
#[derive(Debug, thiserror::Error)]
enum Unsettled {
    #[error("writes are under way")]
    WritesUnderWay,
    #[error("{0}")]
    Failed(&'static str),
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary").finish_non_exhaustive()
    }
}

impl Primary {
    /// Starts replication: folds crash-time activity into the out-of-sync bitmap, connects,
    /// and starts the receiver and resync threads.
    /// `boot_id_file` identifies this boot of the host: a copy last used in another boot
    /// that was never stopped cleanly lost its unflushed writes, so it is not used alone
    /// (it is served from the peer, RemoteOnly, until `repair`).
    pub fn start(
        image: Arc<Image>,
        metadata: Arc<Metadata>,
        connector: Connector,
        resync_options: ResyncOptions,
        boot_id_file: &Path,
    ) -> io::Result<Arc<Primary>> {
        if super::secondary::host_restarted_under(&metadata, boot_id_file)? {
            let generation = metadata.header().generation;
            metadata
                .set_header(generation, DataState::Inconsistent)
                .map_err(io::Error::other)?;
            error!(
                "this host went down while this copy was in use: writes it had not flushed \
                 may be gone, so it is Inconsistent; serving from the peer until `repair`"
            );
        }
        Primary::start_in(image, metadata, connector, resync_options, Mode::Connecting)
    }

    /// Starts as a freshly promoted primary: the peer is lost, so writes run degraded.
    pub fn start_degraded(
        image: Arc<Image>,
        metadata: Arc<Metadata>,
        connector: Connector,
        resync_options: ResyncOptions,
    ) -> io::Result<Arc<Primary>> {
        Primary::start_in(image, metadata, connector, resync_options, Mode::Degraded)
    }

    fn start_in(
        image: Arc<Image>,
        metadata: Arc<Metadata>,
        connector: Connector,
        resync_options: ResyncOptions,
        mode: Mode,
    ) -> io::Result<Arc<Primary>> {
        let folded = metadata
            .activity_to_out_of_sync()
            .map_err(io::Error::other)?;
        if folded > 0 {
            warn!(
                "{folded} extent(s) had writes in flight at the last stop; they will be resynced"
            );
        }
        metadata.clear_activity().map_err(io::Error::other)?;
        let header = metadata.header();
        let generation = header.generation.max(1);
        if generation != header.generation {
            metadata
                .set_header(generation, header.data_state)
                .map_err(io::Error::other)?;
        }
        // A copy that failed (or lost writes in a crash) is never served from, nor resynced
        // from, until `repair` rebuilds it from the peer.
        let local = match header.data_state {
            DataState::UpToDate => LocalDisk::Healthy,
            DataState::Inconsistent => {
                warn!(
                    "this host's copy is Inconsistent (its disk failed, or it lost writes in a \
                     crash): serving all I/O from the peer (RemoteOnly) until `repair`"
                );
                LocalDisk::Failed
            }
        };
        let transport = connector()?;
        let primary = Arc::new_cyclic(|me| Primary {
            me: me.clone(),
            image,
            metadata,
            connector,
            transport: Mutex::new(transport),
            state: Mutex::new(State {
                mode,
                generation,
                next_id: 1,
                completion_waiters: 0,
                in_flight: HashMap::new(),
                welcomed: false,
                resync: CopyProgress::default(),
                resync_started: false,
                resync_forced: false,
                local,
                rebuild: CopyProgress::default(),
                peer_disk_failed: None,
                control_results: HashMap::new(),
                no_complete_copy: false,
                epoch: None,
                sealed_epoch: None,
                last_epoch: None,
                epochs_off_reason: None,
                barrier: false,
                snapshot_results: HashMap::new(),
            }),
            changed: Condvar::new(),
            resync_options,
            writes_active: Arc::new(AtomicU64::new(0)),
            degraded_gate: std::sync::RwLock::new(()),
            marker_send: Mutex::new(()),
            write_latency: latency::WriteLatency::default(),
        });
        primary.handle_inline(&primary.transport());
        let receiver = primary.clone();
        thread::Builder::new()
            .name("mirror-receiver".into())
            .spawn(move || receiver.receive_loop())?;
        let resync = primary.clone();
        thread::Builder::new()
            .name("mirror-resync".into())
            .spawn(move || resync.resync_loop())?;
        Ok(primary)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a change of the state, a completion included.
    fn wait<'a>(
        &self,
        mut guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        guard.completion_waiters += 1;
        let mut guard = self.wait_for_change(guard, timeout);
        guard.completion_waiters -= 1;
        guard
    }

    /// Waits for a change of the state other than a completion (a mode change, a welcome,
    /// new out-of-sync regions), or `timeout`.
    fn wait_for_change<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// The secondary's answers that complete requests (`Done`, `Sealed`, `ReadData`) are
    /// handled on the link's reader threads, saving the receiver thread's wake-up per
    /// write; the rest (welcomes, refusals, resync requests: they may send) still go
    /// through [`Primary::receive_loop`], in order with them.
    fn handle_inline(&self, transport: &Arc<dyn Transport>) {
        let me = self.me.clone();
        transport.set_inline_handler(
            |message| {
                matches!(
                    message,
                    Message::Done { .. } | Message::Sealed { .. } | Message::ReadData { .. }
                )
            },
            Box::new(move |message, payload| {
                if let Some(primary) = me.upgrade() {
                    primary.handle(message, payload);
                }
            }),
        );
    }

    fn transport(&self) -> Arc<dyn Transport> {
        match self.transport.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Waits until no in-flight request overlaps `[offset, offset + len)`, then registers
    /// one; returns its id and generation, or why it was not registered.
    fn register(&self, mut entry: InFlight) -> Result<(u64, u64), NotRegistered> {
        let (offset, len) = (entry.offset, entry.len);
        let mut state = self.lock();
        loop {
            if matches!(state.mode, Mode::Degraded | Mode::Fenced) {
                return Err(NotRegistered::Mode(state.mode));
            }
            let end = offset.saturating_add(len);
            // A snapshot barrier stands in front of every request.
            let overlaps = state.barrier
                || len > 0
                    && state.in_flight.values().any(|other| {
                        other.len > 0 && other.offset < end && offset < other.offset + other.len
                    });
            if !overlaps {
                break;
            }
            // A guest request must not keep its queue's worker (and so QEMU's `stop`) waiting
            // behind one that only the peer can complete.
            if entry
                .ticket
                .as_ref()
                .is_some_and(|ticket| ticket.queue_stopping())
            {
                return Err(NotRegistered::QueueStopping);
            }
            state = self.wait(state, POLL_INTERVAL);
        }
        let id = state.next_id;
        state.next_id += 1;
        entry.epoch = state.epoch;
        state.in_flight.insert(id, entry);
        Ok((id, state.generation))
    }

    /// A request part that cannot be mirrored because the mode changed under it: degraded,
    /// the range is durably marked out of sync, then `local` runs and the part completes;
    /// fenced, nothing happens and the part never completes. Returns false when the primary
    /// went back to mirroring meanwhile: the part must be mirrored after all.
    fn unmirrored(
        &self,
        mode: Mode,
        ticket: &Ticket,
        range: (u64, u64),
        local: impl Fn() -> io::Result<()>,
    ) -> io::Result<bool> {
        if mode == Mode::Degraded {
            if !self.write_degraded(range, local)? {
                return Ok(false);
            }
            ticket.complete_part(Status::Ok);
        }
        Ok(true)
    }

    /// A change while degraded: the range is durably marked out of sync, then `local` runs,
    /// both under the degraded gate. Returns false (and does nothing) when the primary is
    /// not degraded any more.
    fn write_degraded(
        &self,
        range: (u64, u64),
        local: impl Fn() -> io::Result<()>,
    ) -> io::Result<bool> {
        let _gate = self
            .degraded_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if self.lock().mode != Mode::Degraded {
            return Ok(false);
        }
        self.require_local_copy()?;
        if range.1 > 0 {
            self.metadata
                .mark_out_of_sync(range.0, range.1)
                .map_err(io::Error::other)?;
        }
        local()?;
        Ok(true)
    }

    /// Blocks degraded writes while the mode leaves Degraded (see `degraded_gate`).
    pub(super) fn leaving_degraded(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.degraded_gate
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Handles a change of `[offset, offset + len)` that cannot be mirrored: fenced, it never
    /// completes; degraded, the range is durably marked out of sync, `local` runs, and it
    /// completes. Otherwise marks the range's extents active and returns `None`: mirror it.
    fn unless_mirroring(
        &self,
        offset: u64,
        len: u64,
        waker: &Arc<Waker>,
        local: impl Fn() -> io::Result<()>,
    ) -> io::Result<Result<ActivityGuard, Outcome>> {
        loop {
            // Bind the mode first: a guard in the match scrutinee would live through the arms.
            let mode = self.lock().mode;
            match mode {
                Mode::Fenced => return Ok(Err(Outcome::Waiting(Ticket::new(1, waker.clone())))),
                Mode::Degraded => {
                    if self.write_degraded((offset, len), &local)? {
                        return Ok(Err(Outcome::Ready(Status::Ok)));
                    }
                    // Mirroring again since the look at the mode: mirror it.
                }
                Mode::Connecting | Mode::Mirrored | Mode::Holding => {
                    let guard = ActivityGuard::new(&self.writes_active);
                    self.write_local(|| {
                        self.metadata
                            .mark_active(offset, len)
                            .map_err(io::Error::other)
                    });
                    return Ok(Ok(guard));
                }
            }
        }
    }

    /// Clears the active extents that no write touched since a moment when no write was
    /// under way, after a flush made every earlier write durable on the local image and a
    /// flush round trip made it durable on the secondary: the copies can then only differ
    /// where a later write marks. Runs from the resync thread
    /// while mirrored; cheap when nothing was written.
    /// Returns whether it tried (no write was under way and some extent was marked).
    pub(super) fn clear_idle_activity(&self, idle_for: Duration) -> bool {
        !matches!(
            self.clear_activity_if_idle(idle_for),
            Ok(Cleared::Nothing) | Err(Unsettled::WritesUnderWay)
        )
    }

    /// `settle` (a planned handover: the guest is stopped): the copies are made equal where
    /// this primary marked activity, so the host that takes over resyncs nothing for it.
    pub fn settle(&self) -> Result<String, String> {
        let mode = self.lock().mode;
        if mode != Mode::Mirrored {
            return Err(format!(
                "not mirroring ({mode:?}): the active extents stay marked for the resync"
            ));
        }
        match self.clear_activity_if_idle(Duration::ZERO) {
            Ok(Cleared::Nothing) => Ok("settled: no active extent".into()),
            Ok(Cleared::Extents(extents)) => {
                Ok(format!("settled: {extents} active extent(s) cleared"))
            }
            Err(why) => Err(format!("not settled: {why}")),
        }
    }

    /// Clears the active extents no write marked for `idle_for` (see `ACTIVITY_IDLE`).
    fn clear_activity_if_idle(&self, idle_for: Duration) -> Result<Cleared, Unsettled> {
        // Nothing to clear costs no flush.
        if self.metadata.clearable_extents(idle_for) == 0 {
            return Ok(Cleared::Nothing);
        }
        let idle = || self.writes_active.load(Ordering::SeqCst) == 0;
        let Some(epoch) = self.metadata.activity_snapshot(idle) else {
            return Err(Unsettled::WritesUnderWay);
        };
        if let Err(error) = self.image.flush() {
            warn!("cannot flush the local image before clearing activity: {error}");
            self.local_failed(&error);
            return Err(Unsettled::Failed("the local image's flush failed"));
        }
        // The secondary acknowledged those writes from its page cache: they count as on
        // both copies only once it has flushed too (a power loss there loses the rest).
        if !self.control_round_trip(|id, generation| Message::Flush { id, generation }) {
            return Err(Unsettled::Failed("the secondary did not confirm a flush"));
        }
        match self.metadata.clear_activity_marked_before(epoch, idle_for) {
            Ok(extents) => Ok(Cleared::Extents(extents)),
            Err(error) => {
                warn!("cannot clear the activity bitmap: {error}");
                Err(Unsettled::Failed(
                    "the activity bitmap could not be written",
                ))
            }
        }
    }

    /// A guest write: local image, then the peer; completes when the peer acknowledged.
    pub fn write(&self, offset: u64, data: Vec<u8>, waker: &Arc<Waker>) -> io::Result<Outcome> {
        if data.is_empty() {
            return Ok(Outcome::Ready(Status::Ok));
        }
        let len = data.len() as u64;
        let activity = match self
            .unless_mirroring(offset, len, waker, || self.image.write_at(&data, offset))?
        {
            Ok(guard) => guard,
            Err(outcome) => return Ok(outcome),
        };
        let parts = data.len().div_ceil(MAX_BLOCK_BYTES).max(1);
        let ticket = Ticket::new(parts as u32, waker.clone());
        // A write of one block is sent in the buffer it was read into (no copy); a larger
        // one is split into blocks.
        let blocks: Vec<Vec<u8>> = if parts == 1 {
            vec![data]
        } else {
            data.chunks(MAX_BLOCK_BYTES).map(<[u8]>::to_vec).collect()
        };
        for (index, block) in blocks.into_iter().enumerate() {
            let block_offset = offset + (index * MAX_BLOCK_BYTES) as u64;
            let block_len = block.len() as u64;
            let entry = || {
                InFlight::new(Kind::Write, block_offset, block_len, Some(ticket.clone()))
                    .with_activity(&activity)
            };
            let local = || self.image.write_at(&block, block_offset);
            match self.register_or_handle(entry, &ticket, (block_offset, block_len), local)? {
                None => {}
                Some((id, generation)) => {
                    self.write_local(|| self.image.write_at(&block, block_offset));
                    // The one checksum of the block: the link carries it and the
                    // secondary checks it before its write.
                    let message = Message::Write {
                        id,
                        generation,
                        offset: block_offset,
                        crc32c: crc32c::crc32c(&block),
                    };
                    self.send_or_hold(&message, block);
                }
            }
        }
        Ok(Outcome::Waiting(ticket))
    }

    /// Registers a request part for mirroring; returns its id and generation, or `None`
    /// when it was handled otherwise (degraded: written locally and completed; fenced or
    /// its queue stopping: left to never complete here).
    fn register_or_handle(
        &self,
        entry: impl Fn() -> InFlight,
        ticket: &Ticket,
        range: (u64, u64),
        local: impl Fn() -> io::Result<()>,
    ) -> io::Result<Option<(u64, u64)>> {
        loop {
            match self.register(entry()) {
                Ok(registered) => return Ok(Some(registered)),
                Err(NotRegistered::QueueStopping) => return Ok(None),
                Err(NotRegistered::Mode(mode)) => {
                    if self.unmirrored(mode, ticket, range, &local)? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// A send that fails (session closed by a mode change) leaves the request to the mode
    /// change, which completes or holds it.
    fn send_or_hold(&self, message: &Message, payload: Vec<u8>) {
        if let Err(error) = self.transport().send(message, payload) {
            warn!("replication send failed, request held: {error}");
        }
    }

    /// Sends `data`, read from the local image at `offset` while its range is locked, as
    /// the block of request `id` (a resync chunk, or a write sent again).
    fn send_block(&self, id: u64, generation: u64, offset: u64, data: Vec<u8>) {
        let message = Message::ResyncBlock {
            id,
            generation,
            offset,
            crc32c: crc32c::crc32c(&data),
        };
        self.send_or_hold(&message, data);
    }

    fn mark_out_of_sync(&self, offset: u64, len: u64) {
        if let Err(error) = self.metadata.mark_out_of_sync(offset, len) {
            error!("cannot record out-of-sync region: {error}");
        }
    }

    /// FLUSH: local `fdatasync`, then the peer's.
    pub fn flush(&self, waker: &Arc<Waker>) -> io::Result<Outcome> {
        let ticket = Ticket::new(1, waker.clone());
        if self.lock().mode == Mode::Fenced {
            return Ok(Outcome::Waiting(ticket));
        }
        self.write_local(|| self.image.flush());
        let entry = || InFlight::new(Kind::Flush, 0, 0, Some(ticket.clone()));
        if let Some((id, generation)) =
            self.register_or_handle(entry, &ticket, (0, 0), || Ok(()))?
        {
            self.send_or_hold(&Message::Flush { id, generation }, Vec::new());
        }
        Ok(Outcome::Waiting(ticket))
    }

    /// DISCARD or WRITE_ZEROES of a range, on both sides.
    pub fn zero(
        &self,
        offset: u64,
        len: u64,
        deallocate: bool,
        waker: &Arc<Waker>,
    ) -> io::Result<Outcome> {
        if len == 0 {
            return Ok(Outcome::Ready(Status::Ok));
        }
        let local = || zero_local(&self.image, offset, len, deallocate);
        let activity = match self.unless_mirroring(offset, len, waker, local)? {
            Ok(guard) => guard,
            Err(outcome) => return Ok(outcome),
        };
        let ticket = Ticket::new(1, waker.clone());
        let entry = || {
            InFlight::new(Kind::Write, offset, len, Some(ticket.clone())).with_activity(&activity)
        };
        match self.register_or_handle(entry, &ticket, (offset, len), local)? {
            None => {}
            Some((id, generation)) => {
                self.write_local(|| zero_local(&self.image, offset, len, deallocate));
                let message = Message::Zero {
                    id,
                    generation,
                    offset,
                    len,
                    deallocate,
                };
                self.send_or_hold(&message, Vec::new());
            }
        }
        Ok(Outcome::Waiting(ticket))
    }
}

fn zero_local(image: &Image, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
    if deallocate {
        image.discard(offset, len)
    } else {
        image.write_zeroes(offset, len, false)
    }
}

mod control;
mod epochs;
mod latency;
mod receive;
mod remote;
mod resync;
mod snapshot;
