//! The keys a host holds for its peer, and their rotation without a restart.
//!
//! A [`KeyRing`] holds one to [`MAX_KEYS`] pre-shared keys, the preferred first. A client
//! offers the ids of all of them in its `Hello`; the server answers with the first offered
//! id it holds too, and both prove and derive the connection's keys with that key (see
//! [`crate::handshake`]). So two hosts that share any key connect, whichever of them took
//! a new key first.
//!
//! A ring read from a file ([`KeyRing::from_file`]) holds the key of `FILE` and, while it
//! exists, the key of `FILE.previous` ([`previous_key_path`]). It follows the files while the
//! process runs: every handshake looks at them first (two `stat` calls) and reads them again
//! when either changed, and every connection looks at least every [`RECHECK_INTERVAL`]
//! whether its key is still held; a connection whose key is gone ends (its session
//! reconnects with a key still held and sends its messages again). A file that cannot be
//! read or holds no valid key leaves the ring as it was, with a warning: a half-done edit
//! never leaves a host without its keys.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::psk::{KeyId, Psk, PskError};

/// Most keys in a ring (and ids offered in a `Hello`).
pub const MAX_KEYS: usize = 4;
/// What [`previous_key_path`] appends to a key file's name.
pub const PREVIOUS_KEY_SUFFIX: &str = ".previous";
/// How often a running connection checks that its key is still held.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The file of the previous key that a ring read from `path` also accepts: `path` with
/// [`PREVIOUS_KEY_SUFFIX`] appended (`/etc/ftvm/pair.psk.previous`).
pub fn previous_key_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(PREVIOUS_KEY_SUFFIX);
    PathBuf::from(name)
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("a key ring needs 1 to {MAX_KEYS} keys, got {count}")]
    Count { count: usize },
    #[error(transparent)]
    Key(#[from] PskError),
}

/// The keys of a host pair, shared by every session and listener made from one
/// [`crate::LinkConfig`] (clones share it). `Debug` shows only the keys' ids.
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Inner>,
}

struct Inner {
    /// The current key's file, if the ring follows files.
    file: Option<PathBuf>,
    state: Mutex<State>,
}

struct State {
    keys: Arc<[Psk]>,
    /// What the current and the previous key file looked like when last read.
    stamps: [Option<FileStamp>; 2],
    checked: Instant,
}

/// Enough of a file's metadata to notice that it was replaced or rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    size: u64,
    modified_ns: i128,
    changed_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let metadata = std::fs::metadata(path).ok()?;
        let nanoseconds =
            |seconds: i64, nanos: i64| i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
        Some(FileStamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            modified_ns: nanoseconds(metadata.mtime(), metadata.mtime_nsec()),
            changed_ns: nanoseconds(metadata.ctime(), metadata.ctime_nsec()),
        })
    }
}

impl KeyRing {
    /// A ring of fixed keys, the preferred first (duplicates dropped).
    pub fn new(keys: Vec<Psk>) -> Result<KeyRing, KeyRingError> {
        let keys = distinct(keys)?;
        Ok(KeyRing::with_state(None, keys, [None, None]))
    }

    /// A ring that follows `path` (the preferred key) and `path.previous` (accepted too,
    /// while it exists): see the module's documentation.
    pub fn from_file(path: &Path) -> Result<KeyRing, KeyRingError> {
        let stamps = stamps(path);
        let keys = read_keys(path)?;
        Ok(KeyRing::with_state(Some(path.to_path_buf()), keys, stamps))
    }

    fn with_state(file: Option<PathBuf>, keys: Vec<Psk>, stamps: [Option<FileStamp>; 2]) -> Self {
        KeyRing {
            inner: Arc::new(Inner {
                file,
                state: Mutex::new(State {
                    keys: keys.into(),
                    stamps,
                    checked: Instant::now(),
                }),
            }),
        }
    }

    /// The keys now, the preferred first; a ring that follows files looks at them first.
    pub fn keys(&self) -> Arc<[Psk]> {
        let mut state = self.lock();
        self.refresh(&mut state);
        Arc::clone(&state.keys)
    }

    /// The ids of [`KeyRing::keys`], in their order.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys().iter().map(Psk::id).collect()
    }

    /// Whether the ring still holds the key `id`; looks at the files at most every
    /// [`RECHECK_INTERVAL`] (called by every running connection).
    pub(crate) fn holds(&self, id: KeyId) -> bool {
        let mut state = self.lock();
        if state.checked.elapsed() >= RECHECK_INTERVAL {
            self.refresh(&mut state);
        }
        state.keys.iter().any(|key| key.id() == id)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the files again if either changed since they were last read.
    fn refresh(&self, state: &mut State) {
        let Some(path) = &self.inner.file else {
            return;
        };
        state.checked = Instant::now();
        let now = stamps(path);
        if now == state.stamps {
            return;
        }
        state.stamps = now;
        match read_keys(path) {
            Ok(keys) => {
                let ids: Vec<String> = keys.iter().map(|key| key.id().to_string()).collect();
                log::info!(
                    "keys of {} read again: {} (the first is preferred)",
                    path.display(),
                    ids.join(", ")
                );
                state.keys = keys.into();
            }
            Err(error) => log::warn!(
                "keys of {} not changed: {} (fix the file; the keys read before stay in use)",
                path.display(),
                crate::error_chain(&error)
            ),
        }
    }
}

impl From<Psk> for KeyRing {
    fn from(psk: Psk) -> KeyRing {
        KeyRing::with_state(None, vec![psk], [None, None])
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        let ids: Vec<KeyId> = state.keys.iter().map(Psk::id).collect();
        formatter
            .debug_struct("KeyRing")
            .field("file", &self.inner.file)
            .field("ids", &ids)
            .finish()
    }
}

fn stamps(path: &Path) -> [Option<FileStamp>; 2] {
    [FileStamp::of(path), FileStamp::of(&previous_key_path(path))]
}

/// The key of `path`, then that of `path.previous` if that file exists.
fn read_keys(path: &Path) -> Result<Vec<Psk>, KeyRingError> {
    let mut keys = vec![Psk::from_file(path)?];
    let previous = previous_key_path(path);
    match Psk::from_file(&previous) {
        Ok(key) => keys.push(key),
        Err(PskError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error.into()),
    }
    distinct(keys)
}

fn distinct(keys: Vec<Psk>) -> Result<Vec<Psk>, KeyRingError> {
    let mut unique: Vec<Psk> = Vec::with_capacity(keys.len());
    for key in keys {
        if !unique.contains(&key) {
            unique.push(key);
        }
    }
    if unique.is_empty() || unique.len() > MAX_KEYS {
        return Err(KeyRingError::Count {
            count: unique.len(),
        });
    }
    Ok(unique)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> Psk {
        Psk::from_bytes(text.as_bytes()).expect("key")
    }

    #[test]
    fn a_fixed_ring_keeps_its_order_and_drops_duplicates() {
        let ring = KeyRing::new(vec![
            key("new key, 16 bytes"),
            key("old key, 16 bytes"),
            key("new key, 16 bytes"),
        ])
        .expect("ring");
        assert_eq!(
            ring.ids(),
            vec![key("new key, 16 bytes").id(), key("old key, 16 bytes").id()]
        );
        assert!(matches!(
            KeyRing::new(Vec::new()),
            Err(KeyRingError::Count { count: 0 })
        ));
        assert!(format!("{ring:?}").contains("KeyId("));
    }

    /// The ring follows its files: a previous key is accepted while its file exists, a new
    /// current key is preferred at once, and a file that cannot be read changes nothing.
    #[test]
    fn a_ring_from_a_file_follows_the_current_and_previous_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pair.psk");
        let previous = previous_key_path(&path);
        assert_eq!(previous, dir.path().join("pair.psk.previous"));
        std::fs::write(&path, "old key, 16 bytes\n").expect("write");
        let ring = KeyRing::from_file(&path).expect("ring");
        let (old, new) = (key("old key, 16 bytes"), key("new key, 16 bytes"));
        assert_eq!(ring.ids(), vec![old.id()]);

        std::fs::rename(&path, &previous).expect("keep the old key");
        std::fs::write(&path, "new key, 16 bytes\n").expect("write");
        assert_eq!(ring.ids(), vec![new.id(), old.id()]);

        std::fs::write(&path, "short\n").expect("write");
        assert_eq!(
            ring.ids(),
            vec![new.id(), old.id()],
            "a bad file changes nothing"
        );
        std::fs::write(&path, "new key, 16 bytes\n").expect("write");

        std::fs::remove_file(&previous).expect("retire");
        assert_eq!(ring.ids(), vec![new.id()]);
        assert!(ring.holds(new.id()));
        assert!(!ring.holds(old.id()));

        std::fs::remove_file(&path).expect("remove");
        assert_eq!(ring.ids(), vec![new.id()], "a missing file changes nothing");
        assert!(
            KeyRing::from_file(&path).is_err(),
            "but is an error at start"
        );
    }
}
