//! The secondary's side of a snapshot barrier (`primary/snapshot.rs`): the stream is
//! applied in order, so when `Snapshot` arrives every write before it is on this copy.

use control_protocol::disk::SnapshotName;
use log::{error, info, warn};

use super::Secondary;
use crate::metadata::DataState;
use crate::mirror::epochs::Receiving;
use crate::mirror::protocol::{Message, Refusal, SnapshotAction};
use crate::snapshot;

impl Secondary {
    /// Carries out barrier `id` on this copy: `Done`, or `SnapshotFailed` with this copy
    /// unchanged. A revert that fails half-way makes the copy failed (durably
    /// Inconsistent) and answers `Failed`, as any failed write does.
    pub(super) fn snapshot(&self, id: u64, name: &SnapshotName, action: SnapshotAction) -> Message {
        let refused = |reason: String| {
            warn!("snapshot {name} ({action:?}) refused: {reason}");
            Message::SnapshotFailed { id, reason }
        };
        let level3 = {
            let epochs = self.lock_epochs();
            epochs.receiving() != Receiving::Off || epochs.buffered()
        };
        if level3 {
            return refused("this copy buffers Level 3 epochs".into());
        }
        let in_sync = self.metadata().header().data_state == DataState::UpToDate;
        if action != SnapshotAction::Delete && (!in_sync || self.resyncing()) {
            return refused("this copy is not in sync (a resync is under way)".into());
        }
        let image = self.image();
        let result = match action {
            SnapshotAction::Create(consistency) => snapshot::check_reflinks(image)
                .and_then(|()| snapshot::create(image, name, consistency)),
            SnapshotAction::Delete => snapshot::delete(image.path(), name),
            SnapshotAction::Revert => {
                let file = match snapshot::open_for_revert(image, name) {
                    Ok(file) => file,
                    Err(reason) => return refused(reason),
                };
                if let Err(cause) = snapshot::revert_from(image, &file) {
                    let cause = format!("revert to snapshot {name} failed: {cause}");
                    error!("{cause}");
                    self.disk_failed(&cause);
                    return Message::Failed {
                        id,
                        reason: Refusal::Io(cause),
                    };
                }
                Ok(())
            }
        };
        match result {
            Ok(()) => {
                info!("snapshot {name}: {action:?} done on this copy");
                Message::Done { id }
            }
            Err(reason) => refused(reason),
        }
    }
}
