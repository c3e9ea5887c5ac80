//! The witness's durable state: one small JSON file per VM, readable by an operator
//! (`cat /var/lib/ftvm-witness/vm1.grant.json`), replaced atomically and synced (file and
//! directory) before the witness answers a claim.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::witness::Grant;
use crate::Generation;

/// Longest VM name, in bytes.
pub const MAX_VM_NAME: usize = 64;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("name {0:?} is not 1 to {MAX_VM_NAME} letters, digits, '.', '_' or '-'")]
    BadName(String),
    #[error("cannot use the witness state directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a witness grant file")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A VM or host name: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'
/// (safe as a file name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_VM_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A grant as stored: the VM's name with it, so a file explains itself.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    vm: String,
    generation: Generation,
    holder: String,
    /// The holder runs the VM unprotected (`ftvm unprotect`): no other host may claim it.
    #[serde(default)]
    standalone: bool,
}

/// The directory of grant files.
#[derive(Debug)]
pub struct WitnessStore {
    dir: PathBuf,
}

impl WitnessStore {
    /// Opens (and creates, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<WitnessStore, StoreError> {
        let directory_error = |source| StoreError::Directory {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(directory_error)?;
        let mut permissions = fs::metadata(dir).map_err(directory_error)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o700);
        fs::set_permissions(dir, permissions).map_err(directory_error)?;
        Ok(WitnessStore {
            dir: dir.to_owned(),
        })
    }

    /// The store of one host pair: the subdirectory `FIRST+SECOND` (host names in order),
    /// so that two pairs may each protect a VM of the same name.
    pub fn for_pair(&self, first: &str, second: &str) -> Result<WitnessStore, StoreError> {
        for name in [first, second] {
            if !valid_name(name) {
                return Err(StoreError::BadName(name.to_owned()));
            }
        }
        WitnessStore::open(&self.dir.join(format!("{first}+{second}")))
    }

    fn path(&self, vm: &str) -> Result<PathBuf, StoreError> {
        if !valid_name(vm) {
            return Err(StoreError::BadName(vm.to_owned()));
        }
        Ok(self.dir.join(format!("{vm}.grant.json")))
    }

    /// The VM's grant, if it was ever registered.
    pub fn load(&self, vm: &str) -> Result<Option<Grant<String>>, StoreError> {
        Ok(self.load_entry(vm)?.map(|(grant, _)| grant))
    }

    /// The VM's grant and whether its holder runs it unprotected.
    pub fn load_entry(&self, vm: &str) -> Result<Option<(Grant<String>, bool)>, StoreError> {
        let path = self.path(vm)?;
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let record: Record = serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        Ok(Some((
            Grant {
                generation: record.generation,
                holder: record.holder,
            },
            record.standalone,
        )))
    }

    /// Durably records the VM's grant (protected).
    pub fn save(&self, vm: &str, grant: &Grant<String>) -> Result<(), StoreError> {
        self.save_entry(vm, grant, false)
    }

    /// Durably records the VM's grant and mode: written to a temporary file, synced,
    /// renamed over the old one, and the directory synced, so a crash leaves the old or the
    /// new grant.
    pub fn save_entry(
        &self,
        vm: &str,
        grant: &Grant<String>,
        standalone: bool,
    ) -> Result<(), StoreError> {
        let path = self.path(vm)?;
        let record = Record {
            vm: vm.to_owned(),
            generation: grant.generation,
            holder: grant.holder.clone(),
            standalone,
        };
        let io_error = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut text = serde_json::to_string_pretty(&record)
            .map_err(io::Error::other)
            .map_err(io_error)?;
        text.push('\n');
        let temporary = path.with_extension("json.tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(io_error)?;
        file.write_all(text.as_bytes()).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        fs::rename(&temporary, &path).map_err(io_error)?;
        File::open(&self.dir)
            .and_then(|directory| directory.sync_all())
            .map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(generation: Generation, holder: &str) -> Grant<String> {
        Grant {
            generation,
            holder: holder.to_owned(),
        }
    }

    #[test]
    fn grants_survive_reopening_and_are_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = WitnessStore::open(dir.path()).expect("open");
        assert_eq!(store.load("vm1").expect("load"), None);
        store.save("vm1", &grant(3, "hostB")).expect("save");
        let reopened = WitnessStore::open(dir.path()).expect("reopen");
        assert_eq!(reopened.load("vm1").expect("load"), Some(grant(3, "hostB")));
        let text = fs::read_to_string(dir.path().join("vm1.grant.json")).expect("read");
        assert!(text.contains("\"holder\": \"hostB\""), "{text}");
    }

    #[test]
    fn hostile_names_and_garbage_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = WitnessStore::open(dir.path()).expect("open");
        for name in ["", "../etc/passwd", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(
                matches!(store.load(name), Err(StoreError::BadName(_))),
                "{name:?}"
            );
        }
        fs::write(dir.path().join("vm2.grant.json"), "{not json").expect("write");
        assert!(matches!(store.load("vm2"), Err(StoreError::Corrupt { .. })));
    }
}
