//! What `ftvmd` remembers of each VM across restarts: its role on this host and its
//! generation, written atomically and synced before the daemon acts on a change.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            path: dir.join("state.json"),
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

    /// Replaces the file (write to a temporary name, sync, rename, sync the directory).
    pub fn save(&self, state: &VmState) -> io::Result<()> {
        let temporary = self.path.with_extension("json.tmp");
        let mut text = serde_json::to_string_pretty(state).map_err(io::Error::other)?;
        text.push('\n');
        let mut file = File::create(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temporary, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
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
}
