//! The disk as the queue workers see it: the local image, and, when this daemon is a
//! primary, the peer's copy behind it.
//!
//! Workers call [`Mirror`] with whole requests; it decides whether a request completes now
//! ([`Outcome::Ready`]) or when the peer has acknowledged it ([`Outcome::Waiting`]).

pub mod epochs;
pub mod journal;
pub mod primary;
pub mod protocol;
pub mod secondary;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::{Arc, PoisonError, RwLock};

use control_protocol::disk::{EpochOrder, Order, Replication, SnapshotOrder};

use crate::image::{Image, ReadTarget, WriteSource};
use crate::metadata::Metadata;
use crate::request::Status;
use crate::ticket::{Outcome, Waker};
use primary::{Connector, Primary, ResyncOptions};
use secondary::Secondary;

/// Largest guest request accepted, in bytes. The guest is told `SEG_MAX` × `SIZE_MAX`, which
/// is below this; a chain announcing more is refused rather than buffered.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// What this daemon is for its disk.
#[derive(Debug, Clone)]
pub enum Role {
    /// Serves the local image alone, no replication.
    Standalone,
    /// Serves the guest and mirrors every write to the secondary.
    Primary(Arc<Primary>),
    /// Applies the primary's writes; serves no guest until promoted.
    Secondary(Arc<Secondary>),
}

/// Opens the listening side of the link for a primary that is demoted in place.
pub type ListenerFactory = Arc<dyn Fn() -> io::Result<Arc<dyn protocol::Transport>> + Send + Sync>;

/// What a role change needs: the way to the peer after `promote`, the listener after
/// `demote`. Both stay for the next change: a disk promoted in place can be demoted in
/// place again, and back (`ftvm migrate` swaps the roles at every move).
#[derive(Default)]
pub struct RoleChanges {
    pub promote_connector: Option<Arc<Connector>>,
    pub demote_listener: Option<ListenerFactory>,
}

/// How a replicated disk runs, whatever its role.
#[derive(Clone, Debug, Default)]
pub struct MirrorOptions {
    pub resync: ResyncOptions,
    /// The file that identifies this boot of the host (`--boot-id-file`).
    pub boot_id_file: std::path::PathBuf,
    /// Level 3: the secondary's epoch journal.
    pub epochs: epochs::EpochOptions,
}

/// The local image plus, on a primary, the replication to the peer.
pub struct Mirror {
    image: Arc<Image>,
    metadata: Option<Arc<Metadata>>,
    role: RwLock<Role>,
    /// How to become primary after `promote`, or secondary after `demote`.
    role_changes: std::sync::Mutex<RoleChanges>,
    options: MirrorOptions,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("image", &self.image.path())
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// A disk served from the local image alone.
    pub fn standalone(image: Image) -> Mirror {
        Mirror {
            image: Arc::new(image),
            metadata: None,
            role: RwLock::new(Role::Standalone),
            role_changes: std::sync::Mutex::new(RoleChanges::default()),
            options: MirrorOptions::default(),
        }
    }

    /// A replicated disk; `start` builds the role from the shared image and metadata.
    pub fn replicated(
        image: Image,
        metadata: Metadata,
        options: MirrorOptions,
        start: impl FnOnce(Arc<Image>, Arc<Metadata>) -> io::Result<Role>,
        role_changes: RoleChanges,
    ) -> io::Result<Mirror> {
        let image = Arc::new(image);
        let metadata = Arc::new(metadata);
        let role = start(image.clone(), metadata.clone())?;
        Ok(Mirror {
            image,
            metadata: Some(metadata),
            role: RwLock::new(role),
            role_changes: std::sync::Mutex::new(role_changes),
            options,
        })
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub fn role(&self) -> Role {
        match self.role.read() {
            Ok(role) => role.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether requests waiting for the peer can be expected to complete soon: false while
    /// a primary holds for a lost peer, connects, or is fenced.
    pub fn acknowledging(&self) -> bool {
        match self.role() {
            Role::Primary(primary) => matches!(
                primary.mode(),
                primary::Mode::Mirrored | primary::Mode::Degraded
            ),
            Role::Standalone | Role::Secondary(_) => true,
        }
    }

    /// Whether a guest may be served now (not while secondary).
    pub fn serves_guest(&self) -> bool {
        !matches!(self.role(), Role::Secondary(_))
    }

    /// A guest read, straight into `target` (guest memory) from the local image; a primary
    /// whose local copy failed fills it from the peer's.
    pub fn read(&self, offset: u64, target: &mut (impl ReadTarget + ?Sized)) -> io::Result<()> {
        match self.role() {
            Role::Primary(primary) => primary.read_into(offset, target),
            Role::Standalone => target.read_from(&self.image, offset),
            Role::Secondary(_) => Err(not_serving()),
        }
    }

    /// A guest write. Standalone, the image writes straight from `data` (guest memory: a
    /// guest changing it meanwhile only changes its own data). A primary takes the bytes
    /// once ([`WriteSource::into_bytes`]) and writes, checksums and sends that one buffer,
    /// so that the two copies cannot differ.
    pub fn write(
        &self,
        offset: u64,
        data: impl WriteSource,
        waker: &Arc<Waker>,
    ) -> io::Result<Outcome> {
        if data.is_empty() {
            // Nothing to write anywhere: it completes at once, never waits on the peer.
            return Ok(Outcome::Ready(Status::Ok));
        }
        match self.role() {
            Role::Primary(primary) => primary.write(offset, data.into_bytes(), waker),
            Role::Standalone => {
                data.write_to(&self.image, offset)?;
                Ok(Outcome::Ready(Status::Ok))
            }
            Role::Secondary(_) => Err(not_serving()),
        }
    }

    pub fn flush(&self, waker: &Arc<Waker>) -> io::Result<Outcome> {
        match self.role() {
            Role::Primary(primary) => primary.flush(waker),
            Role::Standalone => {
                self.image.flush()?;
                Ok(Outcome::Ready(Status::Ok))
            }
            Role::Secondary(_) => Err(not_serving()),
        }
    }

    pub fn discard(&self, offset: u64, len: u64, waker: &Arc<Waker>) -> io::Result<Outcome> {
        if len == 0 {
            return Ok(Outcome::Ready(Status::Ok));
        }
        match self.role() {
            Role::Primary(primary) => primary.zero(offset, len, true, waker),
            Role::Standalone => {
                self.image.discard(offset, len)?;
                Ok(Outcome::Ready(Status::Ok))
            }
            Role::Secondary(_) => Err(not_serving()),
        }
    }

    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        waker: &Arc<Waker>,
    ) -> io::Result<Outcome> {
        if len == 0 {
            return Ok(Outcome::Ready(Status::Ok));
        }
        match self.role() {
            // Zeroing by deallocation is only allowed when the guest allows unmapping.
            Role::Primary(primary) => primary.zero(offset, len, unmap, waker),
            Role::Standalone => {
                self.image.write_zeroes(offset, len, unmap)?;
                Ok(Outcome::Ready(Status::Ok))
            }
            Role::Secondary(_) => Err(not_serving()),
        }
    }

    /// Carries out an order from the control socket; returns a one-line result.
    /// `promote` and `continue-degraded` take an optional generation: the one the witness
    /// granted (without it, `promote` takes the next one and `continue-degraded` keeps its).
    pub fn command(&self, order: Order) -> Result<String, String> {
        match (order, self.role()) {
            (Order::ContinueDegraded(generation), Role::Primary(primary)) => {
                primary.continue_degraded(generation).map(str::to_owned)
            }
            (Order::Fence, Role::Primary(primary)) => {
                primary.fence();
                Ok("fenced".into())
            }
            (Order::Promote(generation), Role::Secondary(secondary)) => {
                // Check before anything changes: a refused promotion leaves all as it was.
                if self.role_changes().promote_connector.is_none() {
                    return Err(
                        "promote needs --peer: where to reach the old primary once it \
                                returns as secondary"
                            .into(),
                    );
                }
                secondary.promote(generation)?;
                self.become_primary()
            }
            (Order::PromoteAtEpoch { generation, epoch }, Role::Secondary(secondary)) => {
                if self.role_changes().promote_connector.is_none() {
                    return Err(
                        "promote needs --peer: where to reach the old primary once it \
                                returns as secondary"
                            .into(),
                    );
                }
                secondary.promote_at(generation, epoch)?;
                self.become_primary()
            }
            (Order::Promote(_) | Order::PromoteAtEpoch { .. }, Role::Primary(_)) => {
                Ok("already primary".into())
            }
            (Order::Repair, Role::Primary(primary)) => primary.repair().map(str::to_owned),
            (Order::Repair, Role::Secondary(secondary)) => secondary.repair().map(str::to_owned),
            (Order::Demote, Role::Primary(primary)) => self.become_secondary(&primary),
            (Order::Demote, Role::Secondary(_)) => Ok("already secondary".into()),
            (Order::Settle, Role::Primary(primary)) => primary.settle(),
            (
                Order::ContinueDegraded(_) | Order::Fence | Order::Settle,
                role @ (Role::Standalone | Role::Secondary(_)),
            )
            | (
                Order::Promote(_) | Order::PromoteAtEpoch { .. } | Order::Repair | Order::Demote,
                role @ Role::Standalone,
            ) => Err(format!(
                "{:?} does not apply to a {} disk",
                order.name(),
                role_name(&role)
            )),
        }
    }

    /// Carries out a Level 3 command: `epoch on|off` and `epoch-end` on a primary, `commit`
    /// and `wait-sealed` on a secondary.
    pub fn epoch_command(&self, order: EpochOrder) -> Result<String, String> {
        match (order, self.role()) {
            (EpochOrder::On(epoch), Role::Primary(primary)) => primary.epoch_on(epoch),
            (EpochOrder::End(epoch), Role::Primary(primary)) => primary.epoch_end(epoch),
            (EpochOrder::Off, Role::Primary(primary)) => primary.epoch_off(),
            (EpochOrder::Commit(epoch), Role::Secondary(secondary)) => {
                secondary.commit_in_background(epoch)
            }
            (EpochOrder::WaitSealed { epoch, timeout_ms }, Role::Secondary(secondary)) => {
                secondary.wait_sealed(epoch, std::time::Duration::from_millis(timeout_ms))
            }
            (
                EpochOrder::On(_) | EpochOrder::End(_) | EpochOrder::Off,
                role @ (Role::Standalone | Role::Secondary(_)),
            )
            | (
                EpochOrder::Commit(_) | EpochOrder::WaitSealed { .. },
                role @ (Role::Standalone | Role::Primary(_)),
            ) => Err(format!(
                "{:?} does not apply to a {} disk",
                order.name(),
                role_name(&role)
            )),
        }
    }

    /// Carries out `snapshot create|delete|revert NAME` on both copies (a primary's
    /// command); `guest_attached`: a revert is refused while a guest uses the disk.
    pub fn snapshot_command(
        &self,
        order: &SnapshotOrder,
        guest_attached: bool,
    ) -> Result<String, String> {
        use protocol::SnapshotAction;
        let (name, action) = match order {
            SnapshotOrder::Create(name, consistency) => {
                (name, SnapshotAction::Create(*consistency))
            }
            SnapshotOrder::Delete(name) => (name, SnapshotAction::Delete),
            SnapshotOrder::Revert(name) => (name, SnapshotAction::Revert),
            SnapshotOrder::List => {
                return Err("`snapshot list` is answered by the control socket".into())
            }
        };
        if action == SnapshotAction::Revert && guest_attached {
            return Err(format!(
                "{}: stop the VM before a revert (`ftvm snapshot revert` stops and restarts \
                 it)",
                control_protocol::disk::GUEST_ATTACHED
            ));
        }
        match self.role() {
            Role::Primary(primary) => primary.snapshot(name, action),
            Role::Secondary(_) => Err(
                "snapshots are commanded on the primary; its disk daemon takes this copy's \
                 at the same point of the write stream"
                    .into(),
            ),
            Role::Standalone => Err(
                "snapshots are of a replicated disk's two copies; this disk is standalone".into(),
            ),
        }
    }

    /// After a promotion: serve the guest as a primary that runs degraded until the old
    /// primary comes back as secondary.
    fn become_primary(&self) -> Result<String, String> {
        let metadata = self.metadata.clone().ok_or("no metadata")?;
        let shared = self
            .role_changes()
            .promote_connector
            .clone()
            .ok_or("promoted without a way to reach the peer (--peer)")?;
        let connector: Connector = Box::new(move || shared());
        let primary =
            Primary::start_degraded(self.image.clone(), metadata, connector, self.options.resync)
                .map_err(|error| error.to_string())?;
        let generation = primary.generation();
        match self.role.write() {
            Ok(mut role) => *role = Role::Primary(primary),
            Err(poisoned) => *poisoned.into_inner() = Role::Primary(primary),
        }
        Ok(format!(
            "promoted: primary at generation {generation}, degraded"
        ))
    }

    fn role_changes(&self) -> std::sync::MutexGuard<'_, RoleChanges> {
        self.role_changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Demotion: this host stops acknowledging anything (fence), then accepts the new
    /// primary on `--listen`. Our generation is older than the new primary's, so it will
    /// resync this copy in full: it may hold writes the new primary never saw.
    fn become_secondary(&self, primary: &Arc<Primary>) -> Result<String, String> {
        let listener = self.role_changes().demote_listener.clone().ok_or(
            "demote needs --listen (where to accept the new primary); without it, stop \
                    the daemon and start it again with --role secondary",
        )?;
        primary.fence();
        let metadata = self.metadata.clone().ok_or("no metadata")?;
        let transport = listener().map_err(|error| error.to_string())?;
        let secondary = Secondary::start(
            self.image.clone(),
            metadata,
            transport,
            &self.options.boot_id_file,
            self.options.epochs.clone(),
        )
        .map_err(|error| error.to_string())?;
        match self.role.write() {
            Ok(mut role) => *role = Role::Secondary(secondary),
            Err(poisoned) => *poisoned.into_inner() = Role::Secondary(secondary),
        }
        Ok("demoted: fenced, now secondary".into())
    }

    /// A clean stop of the daemon.
    pub fn shutdown(&self) {
        match self.role() {
            Role::Secondary(secondary) => secondary.shutdown(),
            Role::Primary(primary) => primary.shutdown(),
            Role::Standalone => {}
        }
    }

    /// The role-specific part of `status`.
    pub fn status(&self) -> Replication {
        match self.role() {
            Role::Standalone => Replication::Standalone {},
            Role::Primary(primary) => Replication::Primary(primary.status()),
            Role::Secondary(secondary) => Replication::Secondary(secondary.status()),
        }
    }
}

fn role_name(role: &Role) -> &'static str {
    match role {
        Role::Standalone => "standalone",
        Role::Primary(_) => "primary",
        Role::Secondary(_) => "secondary",
    }
}

fn not_serving() -> io::Error {
    io::Error::other("a secondary serves no guest")
}
