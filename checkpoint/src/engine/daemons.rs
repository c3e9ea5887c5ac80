//! The engine's side of the daemons' control sockets (`docs/LEVEL3.md`, "Interfaces"): the
//! pages of guest RAM each daemon wrote (`dirty-pages`), and the NICs' output commit
//! (`output-commit on|off`, `epoch-end`, `commit`). Typed with `control-protocol`.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use control_protocol::disk::{DirtyPages, Done, EpochOrder};
use control_protocol::nic::{self, OutputCommitted};
use control_protocol::{disk, Reply};
use serde::de::DeserializeOwned;

use crate::dirty::{DirtySet, FileId, PAGE_SIZE};

/// A daemon did not answer, refused, or answered something the engine cannot use.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{socket}: {command}: no answer")]
    Io {
        socket: PathBuf,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{socket}: {command}: refused: {reason}")]
    Refused {
        socket: PathBuf,
        command: String,
        reason: String,
    },
    #[error("{socket}: {command}: answer not understood")]
    Reply {
        socket: PathBuf,
        command: String,
        #[source]
        source: control_protocol::ReplyError,
    },
    #[error("{socket}: dirty-pages: {problem}")]
    Pages { socket: PathBuf, problem: String },
    #[error("output commit: {0}")]
    OutputCommit(String),
}

/// Sends `command` to the daemon at `socket` and reads its typed answer.
fn ask<T: DeserializeOwned>(socket: &Path, command: &impl Display) -> Result<T, DaemonError> {
    let command = command.to_string();
    let line = daemon_util::request(socket, &command).map_err(|source| DaemonError::Io {
        socket: socket.to_owned(),
        command: command.clone(),
        source,
    })?;
    match Reply::<T>::from_line(line.trim()) {
        Ok(Reply::Answer(answer)) => Ok(answer),
        Ok(Reply::Refused(reason)) => Err(DaemonError::Refused {
            socket: socket.to_owned(),
            command,
            reason,
        }),
        Err(source) => Err(DaemonError::Reply {
            socket: socket.to_owned(),
            command,
            source,
        }),
    }
}

/// The daemons that write the VM's guest RAM: its disks and NICs.
#[derive(Debug, Clone)]
pub struct Daemons {
    pub disks: Vec<PathBuf>,
    pub nics: Vec<PathBuf>,
    /// The guest RAM file (every page a daemon reports must be of this file).
    pub ram: FileId,
    pub ram_bytes: u64,
}

impl Daemons {
    /// Adds the pages every daemon wrote since its previous report to `dirty` (and clears
    /// them in the daemons). Call while the guest is stopped.
    pub fn harvest_into(&self, dirty: &mut DirtySet) -> Result<(), DaemonError> {
        for socket in &self.disks {
            let pages: DirtyPages = ask(socket, &disk::Command::DirtyPages)?;
            self.add(socket, &pages, dirty)?;
        }
        for socket in &self.nics {
            let pages: DirtyPages = ask(socket, &nic::Command::DirtyPages)?;
            self.add(socket, &pages, dirty)?;
        }
        Ok(())
    }

    fn add(
        &self,
        socket: &Path,
        pages: &DirtyPages,
        dirty: &mut DirtySet,
    ) -> Result<(), DaemonError> {
        let problem = |problem: String| DaemonError::Pages {
            socket: socket.to_owned(),
            problem,
        };
        if pages.page_size == 0 || !PAGE_SIZE.is_multiple_of(pages.page_size) {
            return Err(problem(format!(
                "page size {} does not divide ours ({PAGE_SIZE})",
                pages.page_size
            )));
        }
        for file in &pages.files {
            // A page of another file is guest memory the engine does not replicate: the
            // checkpoint would miss it, so it is an error, not something to skip.
            if (file.dev, file.ino) != (self.ram.dev, self.ram.inode) {
                return Err(problem(format!(
                    "it wrote guest memory of file dev {} inode {}, not the RAM file (dev {} inode {})",
                    file.dev, file.ino, self.ram.dev, self.ram.inode
                )));
            }
            for &[offset, len] in &file.ranges {
                if offset
                    .checked_add(len)
                    .is_none_or(|end| end > self.ram_bytes)
                {
                    return Err(problem(format!(
                        "range [{offset}, +{len}) is beyond the RAM's {} bytes",
                        self.ram_bytes
                    )));
                }
                dirty
                    .insert_bytes(offset, len)
                    .map_err(|error| problem(error.to_string()))?;
            }
        }
        Ok(())
    }

    fn each_disk(&self, order: EpochOrder) -> Result<(), DaemonError> {
        for socket in &self.disks {
            let _: Done = ask(socket, &disk::Command::Epoch(order))?;
        }
        Ok(())
    }

    /// The highest epoch any disk's primary has used (0: none). A new `epoch on` must be
    /// above it; the replica's record may lag behind it by the epochs in flight when its
    /// last session ended.
    pub fn disk_last_epoch(&self) -> Result<u64, DaemonError> {
        let mut last = 0;
        for socket in &self.disks {
            let status: disk::Status = ask(socket, &disk::Command::Status)?;
            if let disk::Replication::Primary(primary) = status.replication {
                last = last.max(primary.epochs.last_epoch.unwrap_or(0));
            }
        }
        Ok(last)
    }

    /// The disks' writes from now on belong to `epoch` (the secondaries buffer them until
    /// their checkpoint commits).
    pub fn disk_epoch_on(&self, epoch: u64) -> Result<(), DaemonError> {
        self.each_disk(EpochOrder::On(epoch))
    }

    /// Ends the disks' epoch `epoch` (call while the guest is stopped).
    pub fn disk_epoch_end(&self, epoch: u64) -> Result<(), DaemonError> {
        self.each_disk(EpochOrder::End(epoch))
    }

    /// The disks' secondaries apply everything buffered and apply on arrival again. Tries
    /// every disk.
    pub fn disk_epoch_off(&self) -> Result<(), DaemonError> {
        let mut first_error = None;
        for socket in &self.disks {
            if let Err(error) = ask::<Done>(socket, &disk::Command::Epoch(EpochOrder::Off)) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn each_nic(&self, command: nic::Command) -> Result<(), DaemonError> {
        for socket in &self.nics {
            let _: OutputCommitted = ask(socket, &command)?;
        }
        Ok(())
    }

    /// Holds the NICs' output from now on, as frames of `epoch`.
    pub fn output_commit_on(&self, epoch: u64) -> Result<(), DaemonError> {
        self.each_nic(nic::Command::OutputCommitOn(epoch))
    }

    /// The NIC epoch whose frames the NICs hold now, where an engine before this one was
    /// killed with output commit on (taken over: its frames stay held, their cause is in
    /// memory no checkpoint carried yet, and go out with this engine's first commit; never
    /// without one, since the secondary may still restore an older checkpoint), or `None`
    /// when they hold nothing.
    pub fn output_commit_held(&self) -> Result<Option<u64>, DaemonError> {
        let mut current = Vec::new();
        for socket in &self.nics {
            let status: nic::Status = ask(socket, &nic::Command::Status)?;
            current.push(
                status
                    .output_commit
                    .current_epoch
                    .filter(|_| status.output_commit.enabled),
            );
        }
        match current.first().copied().flatten() {
            None if current.iter().all(Option::is_none) => Ok(None),
            Some(epoch) if current.iter().all(|other| *other == Some(epoch)) => Ok(Some(epoch)),
            _ => Err(DaemonError::OutputCommit(format!(
                "the NICs hold output at different epochs ({current:?}), left by an engine that \
                 was killed: stop the VM (or restart its NIC daemons) first"
            ))),
        }
    }

    /// Ends NIC epoch `epoch` (call while the guest is stopped).
    pub fn epoch_end(&self, epoch: u64) -> Result<(), DaemonError> {
        self.each_nic(nic::Command::EpochEnd(epoch))
    }

    /// Releases the NICs' frames of every epoch up to `epoch`.
    pub fn commit(&self, epoch: u64) -> Result<(), DaemonError> {
        self.each_nic(nic::Command::Commit(epoch))
    }

    /// `handover on|off` to every NIC (`ftvm migrate`): while the guest stays stopped here
    /// after its final checkpoint, the frames for it go to the peer's NIC daemon, which
    /// hands them to the guest once it runs there. Tries every NIC; a NIC without a link
    /// to its peer's daemon (no redundant uplink) refuses, and its frames wait in the TAP
    /// as before (the LAN's senders retransmit them).
    pub fn nic_handover(&self, on: bool) {
        for socket in &self.nics {
            match ask::<nic::Handover>(socket, &nic::Command::Handover(on)) {
                Ok(_) => {}
                Err(error) => {
                    log::info!("no relay of the guest's frames at the switchover: {error}")
                }
            }
        }
    }

    /// Releases everything held and stops holding (Level 3 ends). Tries every NIC.
    pub fn output_commit_off(&self) -> Result<(), DaemonError> {
        let mut first_error = None;
        for socket in &self.nics {
            if let Err(error) = ask::<OutputCommitted>(socket, &nic::Command::OutputCommitOff) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The secondary host's disk daemons, as the secondary engine joins each checkpoint with
/// them (`docs/LEVEL3.md`, "Commit, and how the replica waits for the disk").
#[derive(Debug, Clone, Default)]
pub struct SecondaryDisks {
    pub disks: Vec<PathBuf>,
}

impl SecondaryDisks {
    /// Waits until every disk sealed `epoch` (for up to `attempts` times the daemon's
    /// longest wait), in short asks: the daemon answers one client at a time, and `ftvmd`'s
    /// `status` must not wait behind a whole second of ours.
    pub fn wait_sealed(&self, epoch: u64, attempts: u32) -> Result<(), DaemonError> {
        const ASK_MS: u64 = 100;
        let asks = attempts.max(1) as u64 * (EpochOrder::MAX_WAIT_MS / ASK_MS);
        for socket in &self.disks {
            let mut last = None;
            for _ in 0..asks {
                let order = EpochOrder::WaitSealed {
                    epoch,
                    timeout_ms: ASK_MS,
                };
                match ask::<Done>(socket, &disk::Command::Epoch(order)) {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(error) => last = Some(error),
                }
            }
            if let Some(error) = last {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Tells every disk that `epoch` committed (each applies its epochs up to it).
    pub fn commit(&self, epoch: u64) -> Result<(), DaemonError> {
        for socket in &self.disks {
            let _: Done = ask(socket, &disk::Command::Epoch(EpochOrder::Commit(epoch)))?;
        }
        Ok(())
    }
}
