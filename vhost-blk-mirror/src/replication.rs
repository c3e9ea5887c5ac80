//! How the daemon takes part in replication: its role and the link settings, checked before
//! anything starts, and the construction of the [`Mirror`] for that role.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::image::Image;
use crate::link::{self, LinkSettings};
use crate::metadata::{DataState, Metadata, MetadataError};
use crate::mirror::epochs::EpochOptions;
use crate::mirror::primary::{Primary, ResyncOptions};
use crate::mirror::secondary::Secondary;
use crate::mirror::{ListenerFactory, Mirror, Role, RoleChanges};

/// Most A-links between two hosts.
pub const MAX_LINKS: usize = 2;

/// The role given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleKind {
    /// Serve the local image alone (no peer).
    Standalone,
    /// Serve the guest and mirror every write to the secondary (`--peer`).
    Primary,
    /// Apply the primary's writes (`--listen`); serve a guest only after `promote`.
    Secondary,
}

/// `--link-encryption`: whether the A-link frames are encrypted (the default) or only
/// authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkEncryption {
    /// AES-256-GCM over every frame: confidential and authenticated.
    On,
    /// The disk data in clear on the A-links, frames still authenticated: for measurements
    /// and trusted links only.
    Off,
}

impl LinkEncryption {
    pub fn protection(self) -> replication_link::FrameProtection {
        match self {
            LinkEncryption::On => replication_link::FrameProtection::Encrypted,
            LinkEncryption::Off => replication_link::FrameProtection::AuthenticatedOnly,
        }
    }
}

/// Replication settings from the command line.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    pub role: RoleKind,
    pub peers: Vec<SocketAddr>,
    pub listen: Vec<SocketAddr>,
    pub psk_file: Option<PathBuf>,
    /// `--link-encryption` (on unless asked otherwise).
    pub link_encryption: LinkEncryption,
    pub metadata: Option<PathBuf>,
    /// Rate limit and compare mode of the background resync.
    pub resync: ResyncOptions,
    /// This host's name on the link (default: the kernel host name).
    pub host_id: String,
    /// What the link session is for, e.g. `blk:vm1-disk0`.
    pub service: String,
    /// The file that identifies this boot of the host (`--boot-id-file`).
    pub boot_id_file: PathBuf,
    /// Level 3: `--epoch-journal` (default: beside the image), `--epoch-journal-bytes`,
    /// `--epoch-memory-bytes`.
    pub epoch_journal: Option<PathBuf>,
    pub epoch_journal_bytes: u64,
    pub epoch_memory_bytes: u64,
}

#[derive(Debug, Error)]
pub enum ReplicationError {
    #[error("--role {role} needs {what}")]
    Missing {
        role: &'static str,
        what: &'static str,
    },
    #[error("{what} is only for --role {role}")]
    NotFor {
        what: &'static str,
        role: &'static str,
    },
    #[error("at most {MAX_LINKS} {what} addresses (one per A-link), not {count}")]
    TooManyLinks { what: &'static str, count: usize },
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Link(#[from] link::LinkSetupError),
    #[error("cannot start replication")]
    Start(#[source] std::io::Error),
}

impl ReplicationConfig {
    /// Checks that the flags fit the role.
    pub fn validate(&self) -> Result<(), ReplicationError> {
        for (what, count) in [
            ("--peer", self.peers.len()),
            ("--listen", self.listen.len()),
        ] {
            if count > MAX_LINKS {
                return Err(ReplicationError::TooManyLinks { what, count });
            }
        }
        let missing = |role, what| Err(ReplicationError::Missing { role, what });
        match self.role {
            RoleKind::Standalone => {
                if !self.peers.is_empty()
                    || !self.listen.is_empty()
                    || self.psk_file.is_some()
                    || self.link_encryption != LinkEncryption::On
                {
                    return Err(ReplicationError::NotFor {
                        what: "--peer, --listen, --psk-file and --link-encryption",
                        role: "primary or secondary",
                    });
                }
            }
            RoleKind::Primary => {
                if self.peers.is_empty() {
                    return missing("primary", "--peer ADDR (the secondary's --listen address)");
                }
            }
            RoleKind::Secondary => {
                if self.listen.is_empty() {
                    return missing("secondary", "--listen ADDR");
                }
            }
        }
        if self.role != RoleKind::Standalone && self.psk_file.is_none() {
            return missing(
                if self.role == RoleKind::Primary {
                    "primary"
                } else {
                    "secondary"
                },
                "--psk-file FILE (the pre-shared key of this host pair)",
            );
        }
        Ok(())
    }

    /// The epoch journal: `--epoch-journal`, or the image's path with `.ftvm-journal`
    /// appended.
    pub fn journal_path(&self, image: &Path) -> PathBuf {
        self.epoch_journal.clone().unwrap_or_else(|| {
            let mut path = image.as_os_str().to_owned();
            path.push(".ftvm-journal");
            PathBuf::from(path)
        })
    }

    /// The metadata file: `--meta`, or the image's path with `.ftvm-meta` appended.
    pub fn metadata_path(&self, image: &Path) -> PathBuf {
        self.metadata.clone().unwrap_or_else(|| {
            let mut path = image.as_os_str().to_owned();
            path.push(".ftvm-meta");
            PathBuf::from(path)
        })
    }
}

/// Builds the disk for the configured role; standalone needs no metadata.
pub fn build_mirror(image: Image, config: &ReplicationConfig) -> Result<Mirror, ReplicationError> {
    config.validate()?;
    if config.role == RoleKind::Standalone {
        return Ok(Mirror::standalone(image));
    }
    let initial_state = match config.role {
        RoleKind::Secondary => DataState::Inconsistent,
        _ => DataState::UpToDate,
    };
    let metadata = Metadata::open_or_create(
        &config.metadata_path(image.path()),
        image.size_bytes(),
        initial_state,
    )?;
    let settings = LinkSettings::from_config(config)?;
    let role = config.role;
    let resync = config.resync;
    let listener_settings = settings.clone();
    let role_changes = RoleChanges {
        promote_connector: (!config.peers.is_empty()).then(|| Arc::new(link::connector(&settings))),
        demote_listener: (!config.listen.is_empty())
            .then(|| Arc::new(move || link::listen(&listener_settings)) as ListenerFactory),
    };
    let boot_id_file = config.boot_id_file.clone();
    let epochs = EpochOptions {
        journal_path: config.journal_path(image.path()),
        journal_bytes: config.epoch_journal_bytes,
        memory_bytes: config.epoch_memory_bytes,
    };
    let secondary_epochs = epochs.clone();
    let start = move |image: Arc<Image>, metadata: Arc<Metadata>| match role {
        RoleKind::Primary => {
            let connector = link::connector(&settings);
            let primary = Primary::start(image, metadata, connector, resync, &boot_id_file)?;
            Ok(Role::Primary(primary))
        }
        _ => {
            let transport = link::listen(&settings)?;
            Ok(Role::Secondary(Secondary::start(
                image,
                metadata,
                transport,
                &boot_id_file,
                secondary_epochs,
            )?))
        }
    };
    let options = crate::mirror::MirrorOptions {
        resync,
        boot_id_file: config.boot_id_file.clone(),
        epochs,
    };
    Mirror::replicated(image, metadata, options, start, role_changes)
        .map_err(ReplicationError::Start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(role: RoleKind) -> ReplicationConfig {
        ReplicationConfig {
            role,
            peers: Vec::new(),
            listen: Vec::new(),
            psk_file: None,
            link_encryption: LinkEncryption::On,
            metadata: None,
            resync: ResyncOptions::default(),
            host_id: "test".into(),
            service: "blk:test".into(),
            boot_id_file: crate::mirror::secondary::KERNEL_BOOT_ID.into(),
            epoch_journal: None,
            epoch_journal_bytes: crate::mirror::epochs::DEFAULT_JOURNAL_BYTES,
            epoch_memory_bytes: crate::mirror::epochs::DEFAULT_MEMORY_BYTES,
        }
    }

    #[test]
    fn flags_must_fit_the_role() {
        assert!(config(RoleKind::Standalone).validate().is_ok());
        let standalone_off = ReplicationConfig {
            link_encryption: LinkEncryption::Off,
            ..config(RoleKind::Standalone)
        };
        assert!(matches!(
            standalone_off.validate(),
            Err(ReplicationError::NotFor { .. })
        ));
        let mut primary = config(RoleKind::Primary);
        assert!(matches!(
            primary.validate(),
            Err(ReplicationError::Missing { .. })
        ));
        primary.peers.push("127.0.0.1:7000".parse().expect("addr"));
        assert!(matches!(
            primary.validate(),
            Err(ReplicationError::Missing { .. })
        ));
        primary.psk_file = Some("/etc/ftvm/psk".into());
        assert!(primary.validate().is_ok());
        let extra: SocketAddr = "127.0.0.1:7001".parse().expect("addr");
        primary.peers.extend([extra, extra]);
        assert!(matches!(
            primary.validate(),
            Err(ReplicationError::TooManyLinks { count: 3, .. })
        ));
        let mut standalone = config(RoleKind::Standalone);
        standalone
            .listen
            .push("127.0.0.1:7000".parse().expect("addr"));
        assert!(matches!(
            standalone.validate(),
            Err(ReplicationError::NotFor { .. })
        ));
    }

    #[test]
    fn metadata_defaults_beside_the_image() {
        let config = config(RoleKind::Primary);
        assert_eq!(
            config.metadata_path(Path::new("/var/lib/ftvm/vm1.img")),
            PathBuf::from("/var/lib/ftvm/vm1.img.ftvm-meta")
        );
    }
}
