//! `ftvm key rotate` and `ftvm key retire`: a new pre-shared key without a restart.
//!
//! Every ftvm process follows its key file `FILE` and `FILE.previous` while it runs
//! ([`replication_link::KeyRing`]): it dials offering both, the preferred (`FILE`) first, and
//! accepts either. `rotate` moves the current key to `FILE.previous` and writes the new one
//! to `FILE`; `retire` removes `FILE.previous`, after which the old key is refused and
//! connections still under it end and reconnect under the new one. Files are replaced by
//! renaming a synced temporary file of mode 0600, so a reader never sees half a key.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use replication_link::key_ring::previous_key_path;
use replication_link::{KeyId, Psk};

use crate::daemon::control::KeyStatus;
use crate::keygen::random_key;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum KeyRotationError {
    #[error("cannot read the key {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no valid key")]
    Invalid {
        path: PathBuf,
        #[source]
        source: replication_link::PskError,
    },
    #[error("{0} exists: a rotation is under way; finish it with `ftvm key retire` (on both hosts) before the next one")]
    RotationUnderWay(PathBuf),
    #[error("the new key {0} is the key already in use")]
    SameKey(PathBuf),
    #[error("{0} does not exist: no previous key to retire")]
    NothingToRetire(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a new key: {0}")]
    Random(String),
}

/// What `rotate` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Rotated {
    /// The key now preferred.
    pub new: KeyId,
    /// The key still accepted, in `FILE.previous`.
    pub previous: KeyId,
}

/// Makes the key of `new_key_file` (or a new random key) the preferred key of `file`, and
/// keeps the current one accepted as `FILE.previous`. Refused while `FILE.previous` exists
/// (the last rotation is not finished) and when the new key is the current one.
pub fn rotate(file: &Path, new_key_file: Option<&Path>) -> Result<Rotated, KeyRotationError> {
    let previous_file = previous_key_path(file);
    if previous_file.exists() {
        return Err(KeyRotationError::RotationUnderWay(previous_file));
    }
    let (current_secret, current) = read_key(file)?;
    let (new_secret, new) = match new_key_file {
        Some(path) => read_key(path)?,
        None => {
            let secret =
                random_key().map_err(|error| KeyRotationError::Random(error.to_string()))?;
            let key = key_of(&secret, file)?;
            (secret, key)
        }
    };
    if new == current {
        return Err(KeyRotationError::SameKey(
            new_key_file.unwrap_or(file).to_path_buf(),
        ));
    }
    // The old key is accepted before the new one is preferred: no moment holds neither.
    replace(&previous_file, &current_secret)?;
    replace(file, &new_secret)?;
    Ok(Rotated {
        new: new.id(),
        previous: current.id(),
    })
}

/// Stops accepting the previous key of `file`: removes `FILE.previous`. Returns its id.
pub fn retire(file: &Path) -> Result<KeyId, KeyRotationError> {
    let previous_file = previous_key_path(file);
    if !previous_file.exists() {
        return Err(KeyRotationError::NothingToRetire(previous_file));
    }
    let (_, previous) = read_key(&previous_file)?;
    std::fs::remove_file(&previous_file).map_err(|source| KeyRotationError::Write {
        path: previous_file.clone(),
        source,
    })?;
    sync_parent(&previous_file)?;
    Ok(previous.id())
}

/// Whether retiring the previous key now keeps the links up, from ftvmd's view of the key
/// (`witness`: the key with the witness). The pair: the peer said in its last heartbeat
/// that it holds this host's preferred key. The witness: the link to it is up under that
/// key. `Err` says what to do first.
pub fn check_retire(status: &KeyStatus, witness: bool) -> Result<(), String> {
    let Some(preferred) = status.held.first() else {
        return Err("ftvmd holds no key".into());
    };
    if status.held.len() < 2 {
        return Err(format!(
            "ftvmd holds only the key {preferred}: nothing to retire (was {} made by `ftvm key rotate`?)",
            previous_key_path(&status.file).display()
        ));
    }
    if witness {
        if status.in_use.iter().any(|key| key == preferred) {
            return Ok(());
        }
        return Err(format!(
            "the link to the witness does not use the new key {preferred} yet (uses {:?}): give the witness its new key and restart it first",
            status.in_use
        ));
    }
    match &status.peer_holds {
        Some(peer) if peer.contains(preferred) => Ok(()),
        Some(peer) => Err(format!(
            "the peer holds the keys {peer:?}, not the new key {preferred}: run `ftvm key rotate --new FILE` there first"
        )),
        None => Err("no heartbeat from the peer yet: cannot tell whether it holds the new key".into()),
    }
}

fn read_key(path: &Path) -> Result<(Vec<u8>, Psk), KeyRotationError> {
    let secret = std::fs::read(path).map_err(|source| KeyRotationError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let key = key_of(&secret, path)?;
    Ok((secret, key))
}

fn key_of(secret: &[u8], path: &Path) -> Result<Psk, KeyRotationError> {
    Psk::from_bytes(secret).map_err(|source| KeyRotationError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces `path` with `contents`: a temporary file of mode 0600, synced, renamed over it,
/// and the folder synced.
fn replace(path: &Path, contents: &[u8]) -> Result<(), KeyRotationError> {
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let write_error = |source| KeyRotationError::Write {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(write_error(error)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    std::fs::rename(&temporary, path).map_err(write_error)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<(), KeyRotationError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|folder| folder.sync_all())
        .map_err(|source| KeyRotationError::Write {
            path: parent.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use replication_link::KeyRing;

    const OLD: &[u8] = b"an old pair key of 32 bytes.....\n";

    fn key_file(dir: &Path) -> PathBuf {
        let file = dir.join("pair.psk");
        std::fs::write(&file, OLD).expect("write");
        file
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    /// A rotation keeps the old key accepted until it is retired, and a ring reading the
    /// files (as every ftvm process does) follows each step.
    #[test]
    fn rotate_keeps_the_old_key_until_retire() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = key_file(dir.path());
        let ring = KeyRing::from_file(&file).expect("ring");
        let old = Psk::from_bytes(OLD).expect("key").id();

        let rotated = rotate(&file, None).expect("rotate");
        assert_eq!(rotated.previous, old);
        assert_ne!(rotated.new, old);
        assert_eq!(ring.ids(), vec![rotated.new, old]);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&previous_key_path(&file)), 0o600);
        assert_eq!(std::fs::read(previous_key_path(&file)).expect("read"), OLD);

        let again = rotate(&file, None).expect_err("a rotation is under way");
        assert!(
            matches!(again, KeyRotationError::RotationUnderWay(_)),
            "{again}"
        );

        assert_eq!(retire(&file).expect("retire"), old);
        assert_eq!(ring.ids(), vec![rotated.new]);
        let nothing = retire(&file).expect_err("nothing left to retire");
        assert!(
            matches!(nothing, KeyRotationError::NothingToRetire(_)),
            "{nothing}"
        );
    }

    /// The second host takes the first one's new key from a copy of its file.
    #[test]
    fn rotate_takes_a_given_key_and_refuses_bad_or_same_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = key_file(dir.path());
        let same = dir.path().join("same.psk");
        std::fs::write(&same, OLD).expect("write");
        let error = rotate(&file, Some(&same)).expect_err("same key");
        assert!(matches!(error, KeyRotationError::SameKey(_)), "{error}");
        let short = dir.path().join("short.psk");
        std::fs::write(&short, b"short\n").expect("write");
        let error = rotate(&file, Some(&short)).expect_err("short key");
        assert!(matches!(error, KeyRotationError::Invalid { .. }), "{error}");
        let missing = rotate(&file, Some(&dir.path().join("missing"))).expect_err("missing");
        assert!(
            matches!(missing, KeyRotationError::Read { .. }),
            "{missing}"
        );
        assert!(
            !previous_key_path(&file).exists(),
            "a refusal changes nothing"
        );
        assert_eq!(std::fs::read(&file).expect("read"), OLD);

        let new = dir.path().join("new.psk");
        std::fs::write(&new, b"the other host's new key........\n").expect("write");
        let rotated = rotate(&file, Some(&new)).expect("rotate");
        assert_eq!(
            rotated.new,
            Psk::from_bytes(b"the other host's new key........")
                .expect("key")
                .id()
        );
    }

    #[test]
    fn retire_waits_until_the_peer_or_the_witness_holds_the_new_key() {
        let status = |held: &[&str], in_use: &[&str], peer: Option<&[&str]>| KeyStatus {
            file: "/etc/ftvm/pair.psk".into(),
            held: held.iter().map(ToString::to_string).collect(),
            in_use: in_use.iter().map(ToString::to_string).collect(),
            peer_holds: peer.map(|keys| keys.iter().map(ToString::to_string).collect()),
        };
        let rotating = &["new", "old"];
        assert!(check_retire(&status(rotating, &["old"], Some(&["old"])), false).is_err());
        assert!(check_retire(&status(rotating, &["old"], None), false).is_err());
        assert!(check_retire(&status(rotating, &["old"], Some(&["new", "old"])), false).is_ok());
        assert!(check_retire(&status(&["new"], &["new"], Some(&["new"])), false).is_err());
        assert!(check_retire(&status(rotating, &["old"], None), true).is_err());
        assert!(check_retire(&status(rotating, &["new"], None), true).is_ok());
    }
}
