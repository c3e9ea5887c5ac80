//! The primary's background resync: copies out-of-sync chunks to the secondary while guest
//! writes keep being mirrored. A chunk is read only once no guest write to it is in flight,
//! and guest writes to it wait until its copy is acknowledged, so an older resync block can
//! never overwrite a newer guest write on the secondary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use control_protocol::disk::ResyncProgress;
use log::{info, warn};

use super::{CopyProgress, InFlight, Kind, LocalDisk, Mode, Primary, RESYNC_WINDOW};
use crate::mirror::protocol::Message;
use crate::request::Status;

/// How long the resync waits between looks when there is nothing to do.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Least time between two clears of a mirrored primary's activity bitmap (each costs one
/// flush of the local image); in between it is tried at every idle look.
const ACTIVITY_CLEAR_INTERVAL: Duration = Duration::from_secs(1);

impl Primary {
    pub(super) fn resync_loop(self: Arc<Self>) {
        let mut last_clear = Instant::now();
        loop {
            if !self.resync_wanted() {
                let state = self.lock();
                let mirrored = state.mode == Mode::Mirrored && !state.resync_started;
                drop(self.wait(state, IDLE_WAIT));
                if mirrored
                    && last_clear.elapsed() >= ACTIVITY_CLEAR_INTERVAL
                    && self.clear_idle_activity()
                {
                    last_clear = Instant::now();
                }
                continue;
            }
            if !self.lock().resync_started {
                let sent = self
                    .control_round_trip(|id, generation| Message::ResyncStart { id, generation });
                if !sent {
                    continue;
                }
                let total = self.metadata.out_of_sync_bytes();
                let mut state = self.lock();
                state.resync_started = true;
                state.resync = CopyProgress {
                    bytes_total: total,
                    started: Some(Instant::now()),
                    ..CopyProgress::default()
                };
                info!("resync started: {total} bytes out of sync");
            }
            self.copy_out_of_sync_chunks();
            if self.wait_resync_drained() && self.metadata.out_of_sync_bytes() == 0 {
                self.finish_resync();
            }
        }
    }

    fn resync_wanted(&self) -> bool {
        let state = self.lock();
        state.mode == Mode::Mirrored
            && state.welcomed
            && state.local == LocalDisk::Healthy
            && (state.resync_started
                || state.resync_forced
                || self.metadata.out_of_sync_bytes() > 0)
    }

    fn copy_out_of_sync_chunks(&self) {
        let chunk_bytes = self.metadata.chunk_bytes();
        let size = self.image.size_bytes();
        let started = Instant::now();
        let mut sent_bytes = 0u64;
        for chunk in self.metadata.out_of_sync_chunks() {
            if !self.wait_for_window() {
                return;
            }
            let offset = chunk * chunk_bytes;
            let len = chunk_bytes.min(size.saturating_sub(offset));
            let entry = InFlight::new(Kind::Resync { chunk }, offset, len, None);
            let Ok((id, generation)) = self.register(entry) else {
                return;
            };
            if self.resync_options.compare {
                self.send_resync_compare(id, generation, offset, len);
                continue;
            }
            self.send_resync_block(id, generation, offset, len);
            sent_bytes += len;
            self.throttle(started, sent_bytes);
        }
    }

    /// Reads a locked chunk and sends it; a local read error fails that chunk.
    fn send_resync_block(&self, id: u64, generation: u64, offset: u64, len: u64) {
        let Some(data) = self.read_resync_chunk(id, offset, len) else {
            return;
        };
        self.lock().resync.bytes_sent += len;
        self.send_block(id, generation, offset, data);
    }

    /// Compare mode: sends the chunk's hash; the secondary answers `Done` or `Differs`.
    fn send_resync_compare(&self, id: u64, generation: u64, offset: u64, len: u64) {
        let Some(data) = self.read_resync_chunk(id, offset, len) else {
            return;
        };
        let message = Message::ResyncCompare {
            id,
            generation,
            offset,
            len,
            hash: *blake3::hash(&data).as_bytes(),
        };
        self.send_or_hold(&message, Vec::new());
    }

    fn read_resync_chunk(&self, id: u64, offset: u64, len: u64) -> Option<Vec<u8>> {
        let mut data = vec![0u8; len as usize];
        match self.image.read_at(&mut data, offset) {
            Ok(()) => Some(data),
            Err(error) => {
                warn!("resync cannot read {len} bytes at {offset}: {error}");
                // The chunk stays out of sync; the local disk is not a source any more.
                self.local_failed(&error);
                self.complete(id, Status::IoError);
                None
            }
        }
    }

    /// Waits until fewer than `RESYNC_WINDOW` resync blocks are in flight; false when the
    /// mode no longer allows resyncing.
    fn wait_for_window(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.mode != Mode::Mirrored || !state.welcomed {
                return false;
            }
            let in_flight = state
                .in_flight
                .values()
                .filter(|entry| matches!(entry.kind, Kind::Resync { .. }))
                .count();
            if in_flight < RESYNC_WINDOW {
                return true;
            }
            state = self.wait(state, IDLE_WAIT);
        }
    }

    fn wait_resync_drained(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.mode != Mode::Mirrored {
                return false;
            }
            let busy = state
                .in_flight
                .values()
                .any(|entry| matches!(entry.kind, Kind::Resync { .. }));
            if !busy {
                return true;
            }
            state = self.wait(state, IDLE_WAIT);
        }
    }

    fn finish_resync(&self) {
        if !self.control_round_trip(|id, generation| Message::ResyncDone { id, generation }) {
            return;
        }
        let mut state = self.lock();
        state.resync_started = false;
        state.resync_forced = false;
        state.resync.finish();
        // Both copies are identical at our generation now.
        if let Err(error) = self.metadata.set_base_generation(state.generation) {
            warn!("cannot record the generation both copies agree at: {error}");
        }
        let progress = state.resync.now();
        info!(
            "resync finished: {} bytes in {:.2} s; the secondary is UpToDate",
            progress.bytes_done, progress.seconds
        );
    }

    /// Sleeps as needed to keep the resync under its rate limit.
    fn throttle(&self, started: Instant, sent_bytes: u64) {
        if self.resync_options.rate_limit == 0 {
            return;
        }
        let due =
            Duration::from_secs_f64(sent_bytes as f64 / self.resync_options.rate_limit as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }

    /// Sends a control message and waits for its answer; true only if the secondary
    /// answered `Done` (false if it failed, or the mode changed first).
    pub(super) fn control_round_trip(&self, make: impl Fn(u64, u64) -> Message) -> bool {
        let Ok((id, generation)) = self.register(InFlight::new(Kind::Control, 0, 0, None)) else {
            return false;
        };
        self.send_or_hold(&make(id, generation), Vec::new());
        let mut state = self.lock();
        loop {
            if let Some(status) = state.control_results.remove(&id) {
                return status == Status::Ok;
            }
            if !state.in_flight.contains_key(&id) {
                // Dropped unanswered (a mode change took it): not a success.
                return false;
            }
            if state.mode != Mode::Mirrored && state.mode != Mode::Holding {
                state.in_flight.remove(&id);
                return false;
            }
            state = self.wait(state, IDLE_WAIT);
        }
    }

    /// Compare mode: the secondary's chunk differs, so send it. The chunk's range is still
    /// locked by the resync entry, so the local data is what the hash was taken of.
    pub(super) fn send_differing_chunk(&self, id: u64) {
        let found = {
            let state = self.lock();
            state
                .in_flight
                .get(&id)
                .map(|entry| (entry.offset, entry.len, state.generation))
        };
        if let Some((offset, len, generation)) = found {
            self.send_resync_block(id, generation, offset, len);
        }
    }
}

impl CopyProgress {
    /// Marks the copy finished: its rate stops changing.
    pub(super) fn finish(&mut self) {
        self.finished = Some(Instant::now());
    }

    /// Progress with rate and ETA computed now (or at the end, once finished).
    pub fn now(&self) -> ResyncProgress {
        let mut progress = ResyncProgress {
            bytes_total: self.bytes_total,
            bytes_done: self.bytes_done,
            bytes_sent: self.bytes_sent,
            ..ResyncProgress::default()
        };
        if let Some(started) = self.started {
            let end = self.finished.unwrap_or_else(Instant::now);
            let seconds = end.duration_since(started).as_secs_f64();
            progress.seconds = seconds;
            if seconds > 0.0 {
                progress.rate_bytes_per_second = (self.bytes_done as f64 / seconds) as u64;
            }
            let remaining = self.bytes_total.saturating_sub(self.bytes_done);
            progress.eta_seconds = (progress.rate_bytes_per_second > 0)
                .then(|| remaining / progress.rate_bytes_per_second);
        }
        progress
    }
}
