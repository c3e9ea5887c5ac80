//! The primary's background resync: copies out-of-sync chunks to the secondary while guest
//! writes keep being mirrored. A chunk is read only once no guest write to it is in flight,
//! and guest writes to it wait until its copy is acknowledged, so an older resync block can
//! never overwrite a newer guest write on the secondary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use control_protocol::disk::ResyncProgress;
use log::{info, warn};

use super::{CopyProgress, InFlight, Kind, LocalDisk, Mode, Primary, MAX_BLOCK_BYTES};
use crate::mirror::protocol::Message;
use crate::request::Status;

/// How long the resync waits between looks when there is nothing to do.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Least resync bytes in flight: the next block is read and sent while three travel.
const MIN_WINDOW_BYTES: u64 = 4 * MAX_BLOCK_BYTES as u64;
/// Most resync bytes in flight: a quarter of the link's default send window (64 MiB), so
/// that guest writes always find room in it.
const MAX_WINDOW_BYTES: u64 = 16 * MAX_BLOCK_BYTES as u64;
/// How long an idle resync sleeps before it looks again (the receiver wakes it sooner).
const WINDOW_WAIT: Duration = Duration::from_millis(20);
/// Least time between two clears of a mirrored primary's activity bitmap (each costs a
/// flush of both images); in between it is tried at every idle look.
const ACTIVITY_CLEAR_INTERVAL: Duration = Duration::from_secs(1);
/// An active extent stays active until no write marked it for this long. A write into an
/// active extent costs no metadata sync, so the extents a guest keeps writing stay marked
/// (DRBD's activity log keeps its hot extents the same way): clearing them at every idle
/// moment made every 4th write of a 1 MiB sequential stream wait for a sync, and the
/// clears' image flushes stalled the secondary's acknowledgements for up to 240 ms. The
/// price: a crash resyncs the extents written in the last few seconds.
pub(super) const ACTIVITY_IDLE: Duration = Duration::from_secs(5);

impl Primary {
    pub(super) fn resync_loop(self: Arc<Self>) {
        let mut last_clear = Instant::now();
        loop {
            if !self.resync_wanted() {
                let state = self.lock();
                let mirrored = state.mode == Mode::Mirrored && !state.resync_started;
                drop(self.wait_for_change(state, IDLE_WAIT));
                if mirrored
                    && last_clear.elapsed() >= ACTIVITY_CLEAR_INTERVAL
                    && self.clear_idle_activity(ACTIVITY_IDLE)
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
        // Runs of adjacent out-of-sync chunks go as one block of up to MAX_BLOCK_BYTES
        // (compare mode hashes and answers chunk by chunk, so that it sends only those
        // that differ).
        let per_block = if self.resync_options.compare {
            1
        } else {
            (MAX_BLOCK_BYTES as u64 / chunk_bytes.max(1)).max(1)
        };
        for (chunk, chunks) in chunk_runs(&self.metadata.out_of_sync_chunks(), per_block) {
            let offset = chunk * chunk_bytes;
            let len = (chunks * chunk_bytes).min(size.saturating_sub(offset));
            if !self.wait_for_window(len) {
                return;
            }
            let entry = InFlight::new(Kind::Resync { chunk, chunks }, offset, len, None);
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

    /// Waits until a block of `len` bytes fits in the resync's window; false when the mode
    /// no longer allows resyncing. The window is the bandwidth-delay product of the link as
    /// the resync sees it (its own rate times the round trip the link measures), twice
    /// over, between `MIN_WINDOW_BYTES` and `MAX_WINDOW_BYTES`; while guest writes are in
    /// flight it is one block: a busy guest slows the resync, never the other way round.
    fn wait_for_window(&self, len: u64) -> bool {
        let rtt = self.link_rtt();
        let mut state = self.lock();
        loop {
            if state.mode != Mode::Mirrored || !state.welcomed {
                return false;
            }
            let mut resync_bytes = 0;
            let mut guest_writes = false;
            for entry in state.in_flight.values() {
                match entry.kind {
                    Kind::Resync { .. } => resync_bytes += entry.len,
                    Kind::Write => guest_writes = true,
                    _ => {}
                }
            }
            let window = if guest_writes {
                MAX_BLOCK_BYTES as u64
            } else {
                window_bytes(state.resync.now().rate_bytes_per_second, rtt)
            };
            if resync_bytes == 0 || resync_bytes + len <= window {
                return true;
            }
            state = self.wait(state, WINDOW_WAIT);
        }
    }

    /// The shortest round trip of the links that are up, as the replication link measures
    /// it (heartbeats), if any.
    fn link_rtt(&self) -> Option<Duration> {
        let links = self.transport().links();
        links["links"]
            .as_array()?
            .iter()
            .filter(|link| link["up"].as_bool() == Some(true))
            .filter_map(|link| link["rtt_us"].as_u64())
            .min()
            .map(Duration::from_micros)
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

/// The resync's window in bytes: twice the bandwidth-delay product of `rate` (bytes per
/// second) and `rtt`, between `MIN_WINDOW_BYTES` and `MAX_WINDOW_BYTES`.
fn window_bytes(rate: u64, rtt: Option<Duration>) -> u64 {
    let delay = rtt.map_or(0.0, |rtt| rtt.as_secs_f64());
    let product = (2.0 * rate as f64 * delay) as u64;
    product.clamp(MIN_WINDOW_BYTES, MAX_WINDOW_BYTES)
}

/// Groups sorted chunk numbers into runs of adjacent ones, each at most `per_block` long:
/// `(first chunk, count)`.
fn chunk_runs(chunks: &[u64], per_block: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &chunk in chunks {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == chunk && *count < per_block => *count += 1,
            _ => runs.push((chunk, 1)),
        }
    }
    runs
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_chunks_go_in_blocks_of_at_most_the_limit() {
        assert_eq!(chunk_runs(&[], 16), vec![]);
        assert_eq!(
            chunk_runs(&[0, 1, 2, 5, 6, 9], 16),
            vec![(0, 3), (5, 2), (9, 1)]
        );
        let all: Vec<u64> = (0..40).collect();
        assert_eq!(chunk_runs(&all, 16), vec![(0, 16), (16, 16), (32, 8)]);
        assert_eq!(chunk_runs(&[3, 4], 1), vec![(3, 1), (4, 1)]);
    }

    #[test]
    fn the_window_follows_the_bandwidth_delay_product_within_its_bounds() {
        // A LAN (100 µs at 1 GB/s: 200 KB) and no measurement yet: the least window.
        let lan = window_bytes(1_000_000_000, Some(Duration::from_micros(100)));
        assert_eq!(lan, MIN_WINDOW_BYTES);
        assert_eq!(window_bytes(0, None), MIN_WINDOW_BYTES);
        // 5 ms at 1 GB/s: twice 5 MB.
        let far = window_bytes(1_000_000_000, Some(Duration::from_millis(5)));
        assert_eq!(far, 10_000_000);
        // 50 ms: capped, guest writes keep room in the link's window.
        let very_far = window_bytes(1_000_000_000, Some(Duration::from_millis(50)));
        assert_eq!(very_far, MAX_WINDOW_BYTES);
    }
}
