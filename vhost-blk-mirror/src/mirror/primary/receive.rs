//! The primary's receiver: answers from the secondary, and the peer's reachability.

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::epochs::marker_message;
use super::{InFlight, Kind, LocalDisk, Marker, Mode, Primary, POLL_INTERVAL};
use crate::metadata::DataState;
use crate::mirror::protocol::MAX_SUSPECT_RANGES;
use crate::mirror::protocol::{Message, Payload, Received, Refusal};
use crate::request::Status;

/// How often a degraded primary asks a secondary whose disk failed whether it is back.
const HELLO_RETRY: Duration = Duration::from_secs(2);

impl Primary {
    pub(super) fn receive_loop(self: Arc<Self>) {
        let mut hello_sent_to: Option<usize> = None;
        let mut hello_sent_at = Instant::now();
        loop {
            let transport = self.transport();
            let identity = Arc::as_ptr(&transport) as *const () as usize;
            // A secondary whose disk failed is asked again now and then: once the operator
            // repaired it, it welcomes us and protection resumes with a resync.
            // Only while it is reachable: Hellos must not pile up in the link's queue.
            let ask_again = {
                let state = self.lock();
                state.peer_disk_failed.is_some()
                    && state.mode == Mode::Degraded
                    && hello_sent_at.elapsed() >= HELLO_RETRY
            } && transport.peer_reachable();
            if hello_sent_to != Some(identity) || ask_again {
                self.lock().welcomed = false;
                self.send_hello();
                hello_sent_to = Some(identity);
                hello_sent_at = Instant::now();
            }
            match transport.recv(POLL_INTERVAL) {
                Ok(Some(Received::Message(message, payload))) => self.handle(message, payload),
                Ok(Some(Received::PeerRestarted)) => {
                    warn!("the secondary restarted; starting over with it");
                    self.lock().welcomed = false;
                    self.send_hello();
                    self.resend_in_flight();
                }
                Ok(None) => {}
                Err(error) => {
                    log::debug!("replication receive: {error}");
                    std::thread::sleep(POLL_INTERVAL);
                }
            }
            self.update_reachability(transport.peer_reachable());
        }
    }

    fn send_hello(&self) {
        let generation = self.generation();
        let message = Message::Hello {
            generation,
            size_bytes: self.image.size_bytes(),
        };
        self.send_or_hold(&message, Vec::new());
    }

    /// After the secondary restarted, every request it had not answered is sent again: its
    /// range is still locked, so the local image holds exactly the data to send. At Level 3
    /// each goes after an `EpochStart` of the epoch it was sent in (the new session starts
    /// at Level 2), and the link ends in the current epoch.
    fn resend_in_flight(&self) {
        let (pending, current) = {
            let state = self.lock();
            let mut pending: Vec<_> = state
                .in_flight
                .iter()
                .map(|(id, entry)| (*id, entry.offset, entry.len, entry.kind, entry.epoch))
                .collect();
            pending.sort_unstable_by_key(|entry| entry.0);
            (pending, state.epoch)
        };
        let generation = self.generation();
        // Where the resent stream is: `Some(epoch)` after an `EpochStart` or `EpochEnd`.
        let mut link_epoch: Option<u64> = None;
        let start_epoch = |link_epoch: &mut Option<u64>, epoch: u64| {
            if *link_epoch != Some(epoch) {
                // Untracked (id 0): the secondary's answer completes nothing.
                let start = Message::EpochStart {
                    id: 0,
                    generation,
                    epoch,
                    resumed: true,
                };
                self.send_or_hold(&start, Vec::new());
                *link_epoch = Some(epoch);
            }
        };
        for (id, offset, len, kind, epoch) in pending {
            match (kind, epoch) {
                (Kind::Marker(Marker::End(ended)), _) => {
                    start_epoch(&mut link_epoch, ended);
                    link_epoch = ended.checked_add(1);
                }
                (Kind::Marker(Marker::Start(started)), _) => link_epoch = Some(started),
                (Kind::Marker(Marker::Off), _) => link_epoch = None,
                (Kind::Control | Kind::Read | Kind::Snapshot, _) => {}
                (_, Some(epoch)) => start_epoch(&mut link_epoch, epoch),
                (_, None) => {}
            }
            let message = match kind {
                Kind::Flush => Message::Flush { id, generation },
                Kind::Read => Message::Read { id, offset, len },
                // A barrier's waiter gives up on it (the secondary restarted meanwhile).
                Kind::Control | Kind::Snapshot => continue,
                Kind::Marker(marker) => marker_message(id, generation, marker, true),
                Kind::Write | Kind::Resync { .. } => {
                    let mut data = vec![0u8; len as usize];
                    if let Err(error) = self.image.read_at(&mut data, offset) {
                        error!("cannot re-read {len} bytes at {offset} to resend: {error}");
                        continue;
                    }
                    self.send_block(id, generation, offset, data);
                    continue;
                }
            };
            self.send_or_hold(&message, Vec::new());
        }
        if let Some(epoch) = current {
            start_epoch(&mut link_epoch, epoch);
        }
    }

    pub(super) fn handle(&self, message: Message, payload: Payload) {
        match message {
            Message::ReadData { id, crc32c } => {
                let data = if payload.matches(crc32c) {
                    Ok(payload.bytes)
                } else {
                    Err(std::io::Error::other(
                        "the peer's read data failed its CRC32C",
                    ))
                };
                self.deliver_read(id, data);
            }
            Message::Welcome {
                disk_failed: true, ..
            } => self.peer_copy_failed(None, "its disk failed and awaits `repair`".into()),
            Message::Welcome {
                generation,
                data_state,
                lost_unflushed,
                suspect_listed,
                disk_failed: false,
            } => {
                if lost_unflushed {
                    match self.metadata.activity_to_out_of_sync() {
                        Ok(extents) => warn!(
                            "the secondary's host restarted under it: {extents} recently \
                             written extent(s) will be resynced"
                        ),
                        Err(error) => error!("cannot mark recent writes for resync: {error}"),
                    }
                }
                let suspect = if suspect_listed {
                    postcard::from_bytes::<Vec<(u64, u64)>>(&payload)
                        .ok()
                        .filter(|ranges| ranges.len() <= MAX_SUSPECT_RANGES)
                } else {
                    None
                };
                self.welcome(generation, data_state, suspect, lost_unflushed)
            }
            Message::Done { id } => self.complete(id, Status::Ok),
            Message::Sealed { id, epoch } => self.sealed(id, epoch),
            Message::Differs { id } => self.send_differing_chunk(id),
            Message::Failed { id, reason } => self.failed(id, reason),
            Message::SnapshotFailed { id, reason } => self.snapshot_answered(id, Err(reason)),
            other => warn!("unexpected message from the secondary: {other:?}"),
        }
    }

    /// The secondary's answer to our `Hello`: decides between a delta and a full resync.
    ///
    /// A delta suffices when the secondary's copy is UpToDate at a generation no older
    /// than our base generation (where both copies last agreed): then the copies differ
    /// only in our out-of-sync chunks (our writes since) and in the secondary's suspect
    /// regions (writes it made as a primary that we never saw, or had in flight).
    fn welcome(
        &self,
        peer_generation: u64,
        data_state: DataState,
        suspect: Option<Vec<(u64, u64)>>,
        lost_unflushed: bool,
    ) {
        let ours = self.generation();
        if peer_generation > ours {
            error!(
                "the secondary has generation {peer_generation}, newer than ours ({ours}): \
                 another primary exists; fencing this one"
            );
            self.fence();
            return;
        }
        if self.lock().local != LocalDisk::Healthy {
            // Our own copy failed: the peer's must hold everything acknowledged, or no copy
            // does. Degraded writes always run at a generation the peer never had.
            let complete = data_state == DataState::UpToDate
                && peer_generation == ours
                && !lost_unflushed
                && suspect.as_ref().is_some_and(Vec::is_empty);
            if !complete {
                error!(
                    "this host's copy failed and the peer's is not complete ({data_state:?} at \
                     generation {peer_generation}, ours {ours}, lost unflushed writes: \
                     {lost_unflushed}): no copy holds every acknowledged write; holding \
                     writes and failing reads"
                );
                let mut state = self.lock();
                state.no_complete_copy = true;
                state.welcomed = false;
                if state.mode == Mode::Mirrored {
                    state.mode = Mode::Holding;
                }
                self.changed.notify_all();
                return;
            }
        }
        // No degraded write is under way from here until the mode below says Mirrored: the
        // resync then starts from a bitmap and an image that every such write reached.
        let _gate = self.leaving_degraded();
        let base = self.metadata.header().base_generation;
        let delta = data_state == DataState::UpToDate && peer_generation >= base;
        let marked = match (delta, suspect) {
            (true, Some(ranges)) => {
                let size = self.image.size_bytes();
                let regions = ranges.len();
                let mut result = Ok(());
                for (offset, len) in ranges {
                    let end = offset.saturating_add(len).min(size);
                    if offset < end {
                        result = result.and(self.metadata.mark_out_of_sync(offset, end - offset));
                    }
                }
                info!(
                    "secondary is UpToDate at generation {peer_generation} (ours {ours}, \
                     copies last agreed at {base}): delta resync, including {regions} \
                     region(s) it reports"
                );
                result
            }
            _ => {
                info!(
                    "secondary is {data_state:?} at generation {peer_generation} (ours {ours}, \
                     copies last agreed at {base}): full resync"
                );
                self.metadata.mark_all_out_of_sync()
            }
        };
        if let Err(error) = marked {
            error!("cannot mark the disk out of sync: {error}");
            return;
        }
        let out_of_sync = self.metadata.out_of_sync_bytes();
        let mut state = self.lock();
        state.no_complete_copy = false;
        if state.peer_disk_failed.take().is_some() {
            info!("the secondary's disk works again: protection resumes with a resync");
        }
        state.welcomed = true;
        // A secondary behind our generation, or one that lost unflushed writes in a crash
        // (durably Inconsistent since), stays Inconsistent until a resync ends, even one
        // with nothing to copy.
        state.resync_forced = peer_generation < ours || lost_unflushed;
        if matches!(
            state.mode,
            Mode::Connecting | Mode::Holding | Mode::Degraded
        ) {
            info!("secondary connected; mirroring ({out_of_sync} bytes to resync)");
            state.mode = Mode::Mirrored;
        }
        self.changed.notify_all();
    }

    /// Finishes an in-flight request.
    pub(super) fn complete(&self, id: u64, status: Status) {
        // A resynced chunk is cleared before its entry goes, and only on the secondary's
        // success: whoever sees the resync drained must also see the chunk in sync, or it
        // would be copied twice.
        let kind = self.lock().in_flight.get(&id).map(|entry| entry.kind);
        if let (Some(Kind::Resync { chunk, chunks }), Status::Ok) = (kind, status) {
            if let Err(error) = self.metadata.clear_out_of_sync_chunks(chunk, chunks) {
                warn!("cannot clear resynced chunks {chunk}..+{chunks}: {error}");
            }
        }
        let entry = {
            let mut state = self.lock();
            let entry = state.in_flight.remove(&id);
            match entry.as_ref().map(|entry| entry.kind) {
                Some(Kind::Control) => {
                    state.control_results.insert(id, status);
                }
                Some(Kind::Snapshot) => {
                    state.snapshot_results.insert(id, Ok(()));
                }
                _ => {}
            }
            if let Some(InFlight {
                kind: Kind::Resync { .. },
                len,
                ..
            }) = &entry
            {
                state.resync.bytes_done += len;
            }
            if state.completion_waiters > 0 {
                self.changed.notify_all();
            }
            entry
        };
        if let Some(entry) = &entry {
            if entry.kind == Kind::Write && status == Status::Ok {
                self.write_latency.observe(entry.created.elapsed());
            }
        }
        if let Some(ticket) = entry.and_then(|entry| entry.ticket) {
            ticket.complete_part(status);
        }
    }

    fn failed(&self, id: u64, reason: Refusal) {
        match reason {
            Refusal::StaleGeneration { ours } => {
                error!(
                    "the secondary refused our generation (it has {ours}): another primary \
                     exists; fencing this one"
                );
                self.fence();
            }
            other if self.lock().in_flight.get(&id).map(|e| e.kind) == Some(Kind::Read) => {
                let error = std::io::Error::other(format!("the peer could not read: {other:?}"));
                self.deliver_read(id, Err(error));
            }
            Refusal::Checksum => self.retransmit(id),
            other => self.peer_copy_failed(Some(id), format!("{other:?}")),
        }
    }

    /// The block of request `id` arrived damaged: send it again from the local image (its
    /// range is still locked, so the image holds exactly the data to send). Without a
    /// local copy to read it from, the secondary's copy is missing it for good.
    fn retransmit(&self, id: u64) {
        let found = {
            let state = self.lock();
            state
                .in_flight
                .get(&id)
                .map(|entry| (entry.kind, entry.offset, entry.len, state.generation))
        };
        let Some((Kind::Write | Kind::Resync { .. }, offset, len, generation)) = found else {
            return;
        };
        warn!("the secondary got request {id} damaged (CRC32C); sending it again");
        let mut data = vec![0u8; len as usize];
        if self.lock().local != LocalDisk::Healthy || self.image.read_at(&mut data, offset).is_err()
        {
            self.peer_copy_failed(
                Some(id),
                "a damaged block with no local copy to resend".into(),
            );
            return;
        }
        self.send_block(id, generation, offset, data);
    }

    /// The secondary's copy missed a change (its disk failed it, or it says its disk
    /// failed): it is Inconsistent, and we treat it like a lost secondary. The change's
    /// range is recorded as out of sync (durably), request `id` is held rather than
    /// completed, and the mode goes to Holding: the coordinator claims the next generation
    /// from the witness (which that copy does not hold) and says `continue-degraded`.
    pub(super) fn peer_copy_failed(&self, id: Option<u64>, reason: String) {
        let range = id.and_then(|id| {
            let state = self.lock();
            let entry = state.in_flight.get(&id)?;
            matches!(entry.kind, Kind::Write | Kind::Resync { .. })
                .then_some((entry.offset, entry.len))
        });
        if let Some((offset, len)) = range {
            self.mark_out_of_sync(offset, len);
        }
        let mut state = self.lock();
        if state.peer_disk_failed.is_none() {
            error!(
                "the secondary's copy failed ({reason}): it is Inconsistent; holding \
                 completions until `continue-degraded` at a new generation; remedy: repair \
                 the secondary host's disk and send `repair` to its disk daemon"
            );
            state.peer_disk_failed = Some(reason);
        }
        state.welcomed = false;
        if matches!(state.mode, Mode::Mirrored | Mode::Connecting) {
            state.mode = Mode::Holding;
        }
        self.changed.notify_all();
    }

    /// Hands `message` to the receiver as if the peer had sent it (tests of its rules).
    #[cfg(test)]
    pub(crate) fn receive_for_test(&self, message: Message, payload: Vec<u8>) {
        self.handle(message, Payload::unchecked(payload));
    }

    fn update_reachability(&self, reachable: bool) {
        let mut state = self.lock();
        match (state.mode, reachable) {
            (Mode::Mirrored, false) => {
                warn!(
                    "peer unreachable on every link: holding completions until it returns, \
                     or until `continue-degraded` or `fence`"
                );
                state.mode = Mode::Holding;
            }
            (Mode::Holding, true) if state.welcomed && state.peer_disk_failed.is_none() => {
                info!("peer reachable again: mirroring resumes");
                state.mode = Mode::Mirrored;
                self.changed.notify_all();
            }
            _ => {}
        }
    }
}
