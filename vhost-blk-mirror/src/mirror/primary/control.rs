//! The primary's answers to the coordinator's commands, and its status.

use control_protocol::disk::{PrimaryDiskState, PrimaryStatus};
use log::{error, info, warn};

use super::{Kind, LocalDisk, Mode, Primary, State};
use crate::request::Status;

impl Primary {
    /// Stops waiting for the lost peer: every held request is recorded as out of sync and
    /// completed, and from now on writes complete on the local image alone, at
    /// `generation` if given (the one the witness granted; never lower than ours), else at
    /// the next one: writes acknowledged on this copy alone always carry a generation the
    /// peer's copy never had.
    pub fn continue_degraded(&self, generation: Option<u64>) -> Result<&'static str, String> {
        let held = {
            let mut state = self.lock();
            let generation = match (generation, state.mode) {
                (None, Mode::Connecting | Mode::Holding) => Some(state.generation + 1),
                (given, _) => given,
            };
            if let Some(generation) = generation {
                if generation < state.generation {
                    return Err(format!(
                        "generation {generation} is below ours ({})",
                        state.generation
                    ));
                }
            }
            match state.mode {
                Mode::Degraded => {
                    self.raise_generation(&mut state, generation)?;
                    return Ok("already degraded");
                }
                Mode::Fenced => return Err("this primary is fenced; it cannot continue".into()),
                // The witness granted a generation while the peer is (again) reachable:
                // adopt it, and have the secondary confirm it holds everything at it
                // (an empty resync round, after which it is UpToDate at the new one).
                Mode::Mirrored if generation.is_some_and(|g| g > state.generation) => {
                    self.raise_generation(&mut state, generation)?;
                    state.resync_forced = true;
                    self.changed.notify_all();
                    return Ok("the peer is reachable: generation raised, still mirrored");
                }
                Mode::Mirrored => {
                    return Err(
                        "the peer is reachable: continue-degraded is for a lost peer".into(),
                    )
                }
                Mode::Connecting | Mode::Holding => {}
            }
            if state.local != LocalDisk::Healthy {
                // The held writes may be on the peer's copy alone: completing them without
                // it would acknowledge data that no usable copy holds.
                return Err(format!(
                    "this host's copy is not usable alone ({:?}): it cannot continue without \
                     the peer; the held requests stay held",
                    state.local
                ));
            }
            self.raise_generation(&mut state, generation)?;
            Primary::drop_epochs(&mut state, "degraded");
            state.mode = Mode::Degraded;
            state.welcomed = false;
            state.resync_started = false;
            state.resync_forced = false;
            self.changed.notify_all();
            std::mem::take(&mut state.in_flight)
        };
        let count = held.len();
        for entry in held.into_values() {
            if matches!(entry.kind, Kind::Write) {
                self.mark_out_of_sync(entry.offset, entry.len);
            }
            if let Some(ticket) = entry.ticket {
                ticket.complete_part(Status::Ok);
            }
        }
        warn!("continuing degraded: {count} held request(s) completed; writes are recorded for resync");
        self.reconnect();
        Ok("degraded")
    }

    /// Records a generation the witness granted, durably, before any write carries it.
    fn raise_generation(&self, state: &mut State, generation: Option<u64>) -> Result<(), String> {
        let Some(generation) = generation.filter(|&generation| generation > state.generation)
        else {
            return Ok(());
        };
        // The copy's state is kept: a failed copy does not become UpToDate by a grant.
        let data_state = self.metadata.header().data_state;
        self.metadata
            .set_header(generation, data_state)
            .map_err(|error| format!("cannot record generation {generation}: {error}"))?;
        info!("generation {generation} granted: writes now carry it");
        state.generation = generation;
        Ok(())
    }

    /// Never completes another request: another host is (or may become) primary.
    pub fn fence(&self) {
        let mut state = self.lock();
        if state.mode != Mode::Fenced {
            error!("fenced: no request will complete any more");
        }
        state.mode = Mode::Fenced;
        state.in_flight.clear();
        Primary::drop_epochs(&mut state, "fenced");
        self.changed.notify_all();
        drop(state);
        self.transport().close();
    }

    /// Replaces the session to the peer with a fresh one, so that a returning peer starts
    /// with `Hello` and a resync rather than with the lost session's backlog.
    fn reconnect(&self) {
        self.transport().close();
        match (self.connector)() {
            Ok(fresh) => {
                self.handle_inline(&fresh);
                if let Ok(mut slot) = self.transport.lock() {
                    *slot = fresh;
                }
                info!("waiting for the peer to return");
            }
            Err(error) => error!("cannot open a new replication session: {error}"),
        }
    }

    /// The primary's part of `status`.
    pub fn status(&self) -> PrimaryStatus {
        let transport = self.transport();
        let state = self.lock();
        let out_of_sync_bytes = self.metadata.out_of_sync_bytes();
        let disk_state = match (state.local, state.mode) {
            (_, Mode::Fenced) => PrimaryDiskState::Fenced,
            (LocalDisk::Failed, _) => PrimaryDiskState::RemoteOnly,
            (LocalDisk::Rebuilding, _) => PrimaryDiskState::Rebuilding,
            (LocalDisk::Healthy, mode) => {
                healthy_disk_state(mode, state.resync_started, out_of_sync_bytes)
            }
        };
        PrimaryStatus {
            mode: state.mode,
            disk_state,
            local_disk: state.local,
            rebuild: state.rebuild.now(),
            generation: state.generation,
            peer_reachable: transport.peer_reachable(),
            links: transport.links(),
            in_flight_requests: state.in_flight.len(),
            out_of_sync_bytes,
            active_extents: self.metadata.active_extents(),
            writes_active: self.writes_active.load(std::sync::atomic::Ordering::SeqCst),
            resync: state.resync.now(),
            peer_disk_failed: state.peer_disk_failed.clone(),
            epochs: Primary::epochs_status(&state),
            write_latency: self.write_latency.histogram(),
        }
    }

    /// A clean stop: the local image is flushed and the copy marked closed, so the next
    /// start knows no write was lost with this host's page cache.
    pub fn shutdown(&self) {
        if self.lock().local != LocalDisk::Healthy {
            return;
        }
        match self.image.flush() {
            Ok(()) => {
                if let Err(error) = self.metadata.mark_open(None) {
                    warn!("unclean stop of the primary: {error}");
                }
            }
            Err(error) => warn!("unclean stop of the primary: cannot flush: {error}"),
        }
    }
}

fn healthy_disk_state(
    mode: Mode,
    resync_started: bool,
    out_of_sync_bytes: u64,
) -> PrimaryDiskState {
    match mode {
        Mode::Mirrored if resync_started || out_of_sync_bytes > 0 => PrimaryDiskState::SyncSource,
        Mode::Mirrored => PrimaryDiskState::UpToDate,
        Mode::Connecting | Mode::Holding => PrimaryDiskState::Holding,
        Mode::Degraded => PrimaryDiskState::Degraded,
        Mode::Fenced => PrimaryDiskState::Fenced,
    }
}
