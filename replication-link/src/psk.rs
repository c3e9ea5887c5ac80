//! Pre-shared keys: one secret per host pair, read from a file.
//!
//! The file holds at least [`MIN_PSK_BYTES`] bytes of secret (a trailing newline is ignored);
//! the key is `blake3::derive_key("ftvm replication psk v1", contents)`.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Context string of the key derivation (never change: both hosts must agree).
const PSK_CONTEXT: &str = "ftvm replication psk v1";
/// Context string of a key's public id (never change: both hosts must agree).
const KEY_ID_CONTEXT: &str = "ftvm replication key id v1";
/// Shortest secret accepted, in bytes.
pub const MIN_PSK_BYTES: usize = 16;
/// Largest key file read, in bytes.
const MAX_PSK_FILE_BYTES: u64 = 64 * 1024;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    #[error("cannot read pre-shared key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pre-shared key is {length} bytes, needs at least {MIN_PSK_BYTES}")]
    TooShort { length: usize },
    #[error("pre-shared key file {path} is larger than {MAX_PSK_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
}

/// A derived pre-shared key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk {
    key: [u8; 32],
}

impl Psk {
    /// Reads the secret from `path`. Warns (log) when the file is readable by group or others.
    pub fn from_file(path: &Path) -> Result<Psk, PskError> {
        let read_error = |source| PskError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        warn_if_readable_by_others(path, &file);
        let mut contents = Vec::new();
        file.take(MAX_PSK_FILE_BYTES + 1)
            .read_to_end(&mut contents)
            .map_err(read_error)?;
        if contents.len() as u64 > MAX_PSK_FILE_BYTES {
            return Err(PskError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Psk::from_bytes(&contents)
    }

    /// Derives the key from the secret's bytes (trailing `\n` / `\r\n` ignored).
    pub fn from_bytes(contents: &[u8]) -> Result<Psk, PskError> {
        let mut secret = contents;
        while let Some((last, rest)) = secret.split_last() {
            if *last == b'\n' || *last == b'\r' {
                secret = rest;
            } else {
                break;
            }
        }
        if secret.len() < MIN_PSK_BYTES {
            return Err(PskError::TooShort {
                length: secret.len(),
            });
        }
        Ok(Psk {
            key: blake3::derive_key(PSK_CONTEXT, secret),
        })
    }

    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// The key's public id: a one-way hash of it that names the key in the handshake (a
    /// client offers the ids of the keys it holds, the server answers with the one it
    /// chose) and in logs and status, without revealing the key.
    pub fn id(&self) -> KeyId {
        let hash = blake3::derive_key(KEY_ID_CONTEXT, &self.key);
        let mut id = [0u8; KEY_ID_BYTES];
        id.copy_from_slice(&hash[..KEY_ID_BYTES]);
        KeyId(id)
    }
}

/// Size of a [`KeyId`].
pub const KEY_ID_BYTES: usize = 8;

/// A key's public id ([`Psk::id`]), shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KeyId(pub [u8; KEY_ID_BYTES]);

impl fmt::Display for KeyId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0
            .iter()
            .try_for_each(|byte| write!(formatter, "{byte:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "KeyId({self})")
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Psk(<redacted>)")
    }
}

fn warn_if_readable_by_others(path: &Path, file: &File) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = file.metadata() {
        if metadata.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "pre-shared key file {} is accessible by group or others (chmod 600 it)",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn trailing_newline_is_ignored() {
        let plain = Psk::from_bytes(b"0123456789abcdef").expect("key");
        let with_newline = Psk::from_bytes(b"0123456789abcdef\n").expect("key");
        let with_crlf = Psk::from_bytes(b"0123456789abcdef\r\n").expect("key");
        assert_eq!(plain, with_newline);
        assert_eq!(plain, with_crlf);
        assert_ne!(plain, Psk::from_bytes(b"0123456789abcdeF").expect("key"));
    }

    #[test]
    fn short_secret_is_refused() {
        let error = Psk::from_bytes(b"short\n").expect_err("too short");
        assert!(matches!(error, PskError::TooShort { length: 5 }));
        assert_eq!(
            error.to_string(),
            "pre-shared key is 5 bytes, needs at least 16"
        );
    }

    #[test]
    fn from_file_reads_and_checks() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(b"a long enough secret\n").expect("write");
        let key = Psk::from_file(file.path()).expect("key");
        assert_eq!(key, Psk::from_bytes(b"a long enough secret").expect("key"));
        assert!(format!("{key:?}").contains("redacted"));
        assert_eq!(key.id().to_string().len(), 16);
        assert_ne!(
            key.id(),
            Psk::from_bytes(b"another long secret").expect("key").id()
        );

        let missing = Psk::from_file(Path::new("/nonexistent/ftvm.psk")).expect_err("missing");
        assert!(matches!(missing, PskError::Read { .. }));
    }
}
