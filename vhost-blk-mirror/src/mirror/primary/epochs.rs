//! The primary at Level 3 (`docs/LEVEL3.md`, "Tagging writes with epochs"): the checkpoint
//! engine's `epoch on`, `epoch-end` and `epoch off` become markers on the mirror link, in
//! line with the writes, so that the secondary files each write under the epoch whose
//! markers surround it. Writes still complete when the secondary acknowledged them (at
//! Level 3 it does so on receipt, once the write is in its journal).

use control_protocol::disk::PrimaryEpochs;
use log::{info, warn};

use super::{InFlight, Kind, LocalDisk, Marker, Mode, Primary, State};
use crate::mirror::protocol::Message;

impl Primary {
    /// `epoch on EPOCH`: from now on the guest's writes belong to `EPOCH`. Needs a mirrored
    /// disk with a healthy local copy (Level 3 starts from a disk UpToDate at Level 2).
    pub fn epoch_on(&self, epoch: u64) -> Result<String, String> {
        self.send_marker(|state| {
            if let Some(current) = state.epoch {
                return Err(format!("epochs are on already (epoch {current})"));
            }
            if let Some(last) = state.last_epoch.filter(|&last| epoch <= last) {
                return Err(format!(
                    "epochs only grow: {epoch} is not above the last one used, {last}"
                ));
            }
            if state.mode != Mode::Mirrored || state.local != LocalDisk::Healthy {
                return Err(format!(
                    "Level 3 needs a mirrored disk with a healthy local copy (mode {:?}, local \
                     disk {:?})",
                    state.mode, state.local
                ));
            }
            state.epoch = Some(epoch);
            state.last_epoch = Some(epoch);
            state.sealed_epoch = None;
            state.epochs_off_reason = None;
            Ok(Marker::Start(epoch))
        })?;
        info!("Level 3: writes belong to epoch {epoch}");
        Ok(format!("epochs on: writes belong to epoch {epoch}"))
    }

    /// `epoch-end N` (the engine sends it while the VM is stopped): `N` must be the current
    /// epoch; later writes belong to `N + 1`.
    pub fn epoch_end(&self, epoch: u64) -> Result<String, String> {
        let next = epoch
            .checked_add(1)
            .ok_or("the last epoch number cannot end")?;
        self.send_marker(|state| match state.epoch {
            Some(current) if current == epoch => {
                state.epoch = Some(next);
                state.last_epoch = Some(next);
                Ok(Marker::End(epoch))
            }
            Some(current) => Err(format!(
                "epoch {epoch} is not the current epoch ({current})"
            )),
            None => Err("epochs are off".into()),
        })?;
        Ok(format!(
            "epoch {epoch} ended; writes belong to epoch {next}"
        ))
    }

    /// `epoch off`: the secondary applies everything buffered and Level 2 resumes.
    pub fn epoch_off(&self) -> Result<String, String> {
        if self.lock().epoch.is_none() {
            return Ok("epochs are off already".into());
        }
        self.leave_epochs(None);
        Ok("epochs off: the secondary applies everything buffered".into())
    }

    /// Ends Level 3 (for `epoch off`, or because of `reason`: RemoteOnly, degraded): the
    /// secondary is told with `EpochOff` when a link is there. Returns once it is sent, so a
    /// `Read` that follows goes after it.
    pub(super) fn leave_epochs(&self, reason: Option<&str>) {
        let left = self.send_marker(|state| {
            if state.epoch.take().is_none() {
                return Err("off already".into());
            }
            state.epochs_off_reason = reason.map(str::to_owned);
            Ok(Marker::Off)
        });
        if left.is_ok() {
            if let Some(reason) = reason {
                warn!("event: Level 3 ends for this disk ({reason}): epochs off");
            }
        }
    }

    /// Changes the epoch state with `change` and sends the marker it returns, registered
    /// under the same lock (so writes registered after it carry the new epoch). Degraded or
    /// fenced, the state changes and nothing is sent.
    fn send_marker(
        &self,
        change: impl FnOnce(&mut State) -> Result<Marker, String>,
    ) -> Result<(), String> {
        let _sending = self
            .marker_send
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (id, generation, marker) = {
            let mut state = self.lock();
            let marker = change(&mut state)?;
            if matches!(state.mode, Mode::Degraded | Mode::Fenced) {
                return Ok(());
            }
            let id = state.next_id;
            state.next_id += 1;
            let mut entry = InFlight::new(Kind::Marker(marker), 0, 0, None);
            entry.epoch = state.epoch;
            state.in_flight.insert(id, entry);
            (id, state.generation, marker)
        };
        self.send_or_hold(&marker_message(id, generation, marker, false), Vec::new());
        Ok(())
    }

    /// The secondary sealed `epoch` (marker `id`).
    pub(super) fn sealed(&self, id: u64, epoch: u64) {
        {
            let mut state = self.lock();
            let expected = state.in_flight.get(&id).map(|entry| entry.kind);
            if expected != Some(Kind::Marker(Marker::End(epoch))) {
                warn!("the secondary sealed epoch {epoch} for request {id}, which is not its end");
                return;
            }
            state.sealed_epoch = state.sealed_epoch.max(Some(epoch));
        }
        self.complete(id, crate::request::Status::Ok);
    }

    /// Level 3 is over without a message to the peer (degraded: there is no peer; fenced:
    /// nothing is sent any more).
    pub(super) fn drop_epochs(state: &mut State, reason: &str) {
        if state.epoch.take().is_some() {
            warn!("event: Level 3 ends for this disk ({reason}): epochs off");
            state.epochs_off_reason = Some(reason.to_owned());
        }
    }

    pub(super) fn epochs_status(state: &State) -> PrimaryEpochs {
        PrimaryEpochs {
            enabled: state.epoch.is_some(),
            current_epoch: state.epoch,
            sealed_epoch: state.sealed_epoch,
            off_reason: state.epochs_off_reason.clone(),
            last_epoch: state.last_epoch,
        }
    }
}

/// The message of a marker (`resumed`: sent again in a new session).
pub(super) fn marker_message(id: u64, generation: u64, marker: Marker, resumed: bool) -> Message {
    match marker {
        Marker::Start(epoch) => Message::EpochStart {
            id,
            generation,
            epoch,
            resumed,
        },
        Marker::End(epoch) => Message::EpochEnd {
            id,
            generation,
            epoch,
        },
        Marker::Off => Message::EpochOff { id, generation },
    }
}
