//! The disk as the queue workers see it: the local image, and, when this daemon is a
//! primary, the peer's copy behind it.
//!
//! Workers call [`Mirror`] with whole requests; it decides whether a request completes now
//! ([`Outcome::Ready`]) or when the peer has acknowledged it ([`Outcome::Waiting`]).

pub mod primary;
pub mod protocol;
pub mod secondary;

use std::io;
use std::sync::{Arc, RwLock};

use serde_json::json;

use crate::image::Image;
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

/// The local image plus, on a primary, the replication to the peer.
pub struct Mirror {
    image: Arc<Image>,
    metadata: Option<Arc<Metadata>>,
    role: RwLock<Role>,
    /// Opens sessions to the peer once a promoted secondary becomes primary.
    promoted_connector: std::sync::Mutex<Option<Connector>>,
    resync_options: ResyncOptions,
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
            promoted_connector: std::sync::Mutex::new(None),
            resync_options: ResyncOptions::default(),
        }
    }

    /// A replicated disk; `start` builds the role from the shared image and metadata.
    pub fn replicated(
        image: Image,
        metadata: Metadata,
        resync_options: ResyncOptions,
        start: impl FnOnce(Arc<Image>, Arc<Metadata>) -> io::Result<Role>,
        promoted_connector: Option<Connector>,
    ) -> io::Result<Mirror> {
        let image = Arc::new(image);
        let metadata = Arc::new(metadata);
        let role = start(image.clone(), metadata.clone())?;
        Ok(Mirror {
            image,
            metadata: Some(metadata),
            role: RwLock::new(role),
            promoted_connector: std::sync::Mutex::new(promoted_connector),
            resync_options,
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

    /// Whether a guest may be served now (not while secondary).
    pub fn serves_guest(&self) -> bool {
        !matches!(self.role(), Role::Secondary(_))
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.role() {
            Role::Primary(primary) => primary.read(offset, buf),
            Role::Standalone => self.image.read_at(buf, offset),
            Role::Secondary(_) => Err(not_serving()),
        }
    }

    pub fn write(&self, offset: u64, data: Vec<u8>, waker: &Arc<Waker>) -> io::Result<Outcome> {
        match self.role() {
            Role::Primary(primary) => primary.write(offset, data, waker),
            Role::Standalone => {
                self.image.write_at(&data, offset)?;
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

    /// Runs a coordinator command from the control socket; returns a one-line result.
    pub fn command(&self, command: &str) -> Result<String, String> {
        match (command, self.role()) {
            ("continue-degraded", Role::Primary(primary)) => {
                primary.continue_degraded().map(str::to_owned)
            }
            ("fence", Role::Primary(primary)) => {
                primary.fence();
                Ok("fenced".into())
            }
            ("promote", Role::Secondary(secondary)) => {
                secondary.promote()?;
                self.become_primary()
            }
            ("promote", Role::Primary(_)) => Ok("already primary".into()),
            ("repair", Role::Primary(primary)) => primary.repair().map(str::to_owned),
            ("demote", _) => Err(
                "demote is not implemented yet: stop the daemon and start it \
                                  again with --role secondary"
                    .into(),
            ),
            (other, role) => Err(format!(
                "{other:?} does not apply to a {} disk",
                role_name(&role)
            )),
        }
    }

    /// After a promotion: serve the guest as a primary that runs degraded until the old
    /// primary comes back as secondary.
    fn become_primary(&self) -> Result<String, String> {
        let metadata = self.metadata.clone().ok_or("no metadata")?;
        let connector = match self.promoted_connector.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
        .ok_or("promoted without a way to reach the peer (--peer)")?;
        let primary =
            Primary::start_degraded(self.image.clone(), metadata, connector, self.resync_options)
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

    /// The role-specific part of `status`.
    pub fn status(&self) -> serde_json::Value {
        match self.role() {
            Role::Standalone => json!({ "role": "standalone" }),
            Role::Primary(primary) => {
                let mut value = serde_json::to_value(primary.status()).unwrap_or_default();
                value["role"] = json!("primary");
                value
            }
            Role::Secondary(secondary) => {
                let mut value = serde_json::to_value(secondary.status()).unwrap_or_default();
                value["role"] = json!("secondary");
                value
            }
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
