//! What `ftvmd` remembers of each VM across restarts: its role on this host and its
//! generation, written atomically and synced before the daemon acts on a change.
//!
//! A change nothing waits for (the level a secondary follows from its primary's heartbeat)
//! is saved on a thread of its own ([`StateFile::save_in_background`]): a sync of the state
//! directory can take over a second while the host writes back a lot of data (ext4 commits
//! its journal with the data it orders), and ftvmd's main loop, which sends the
//! heartbeats, must not wait that long (the peer would take this host for lost). Saves are
//! written in the order they were asked: one asked later is never overwritten by an
//! earlier one still in the background.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::host::Role;
use crate::Generation;

/// The durable part of a VM's state on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub role: Role,
    pub generation: Generation,
    /// `ftvm unprotect` turns it off: the primary runs the VM alone, the secondary
    /// nothing, and the witness refuses every other host's claim.
    #[serde(default = "protected_by_default")]
    pub protected: bool,
    /// The level `ftvm protect --level` set (none: the configuration's).
    #[serde(default)]
    pub level: Option<u8>,
}

fn protected_by_default() -> bool {
    true
}

/// The state file of one VM (`STATE_DIR/VM/state.json`).
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    order: Arc<SaveOrder>,
}

/// The order of the saves: each takes a ticket when asked; the file holds the state of
/// the highest ticket written, and a save whose ticket is lower is dropped.
#[derive(Debug, Default)]
struct SaveOrder {
    asked: AtomicU64,
    /// The ticket of the state in the file (held while one is written).
    written: Mutex<u64>,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            path: dir.join("state.json"),
            order: Arc::new(SaveOrder::default()),
        }
    }

    /// The saved state, or `None` before the first save.
    pub fn load(&self) -> io::Result<Option<VmState>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        serde_json::from_str(&text).map(Some).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {error}", self.path.display()),
            )
        })
    }

    /// Replaces the file (write to a temporary name, sync, rename, sync the directory),
    /// after any save asked before it that is still being written.
    pub fn save(&self, state: &VmState) -> io::Result<()> {
        let ticket = self.order.asked.fetch_add(1, Ordering::SeqCst) + 1;
        save_in_order(&self.path, &self.order, ticket, state)
    }

    /// [`StateFile::save`] on a thread of its own, for a change whose durability nothing
    /// waits for; a failure is logged (the next save writes the whole state again).
    pub fn save_in_background(&self, state: VmState) {
        let ticket = self.order.asked.fetch_add(1, Ordering::SeqCst) + 1;
        let path = self.path.clone();
        let order = Arc::clone(&self.order);
        let spawned = std::thread::Builder::new()
            .name("ftvm-state-save".into())
            .spawn(move || {
                if let Err(error) = save_in_order(&path, &order, ticket, &state) {
                    log::error!("cannot save {}: {error}", path.display());
                }
            });
        if let Err(error) = spawned {
            log::error!("cannot save {}: {error}", self.path.display());
        }
    }
}

/// Writes `state` unless a save asked after it (a higher ticket) is in the file already.
fn save_in_order(path: &Path, order: &SaveOrder, ticket: u64, state: &VmState) -> io::Result<()> {
    let mut written = daemon_util::lock(&order.written);
    if *written > ticket {
        return Ok(());
    }
    write_file(path, state)?;
    *written = ticket;
    Ok(())
}

impl StateFile {
    #[cfg(test)]
    fn wait_for_background_saves(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while *daemon_util::lock(&self.order.written) < self.order.asked.load(Ordering::SeqCst)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Replaces the file at `path` (write to a temporary name, sync, rename, sync the directory).
fn write_file(path: &Path, state: &VmState) -> io::Result<()> {
    let temporary = path.with_extension("json.tmp");
    let mut text = serde_json::to_string_pretty(state).map_err(io::Error::other)?;
    text.push('\n');
    let mut file = File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path());
        assert_eq!(file.load().expect("load"), None);
        let state = VmState {
            role: Role::Secondary,
            generation: 7,
            protected: false,
            level: Some(3),
        };
        file.save(&state).expect("save");
        assert_eq!(file.load().expect("load"), Some(state));
        fs::write(dir.path().join("state.json"), "{not json").expect("write");
        assert!(file.load().is_err());
    }

    #[test]
    fn a_background_save_never_overwrites_a_later_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path());
        let state = |generation, level| VmState {
            role: Role::Secondary,
            generation,
            protected: true,
            level: Some(level),
        };
        for level in 1..=3 {
            file.save_in_background(state(1, level));
        }
        file.save(&state(2, 3)).expect("save");
        file.wait_for_background_saves();
        assert_eq!(file.load().expect("load"), Some(state(2, 3)));
        file.save_in_background(state(2, 2));
        file.wait_for_background_saves();
        assert_eq!(file.load().expect("load"), Some(state(2, 2)));
    }
}
