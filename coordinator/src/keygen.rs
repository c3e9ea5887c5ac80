//! `ftvm keygen`: the pre-shared keys of a host pair and its witness, made in one directory
//! with the modes they need, and what to copy where.
//!
//! A key file is 64 hexadecimal digits (32 random bytes) and a newline, which
//! `replication_link::Psk::from_file` reads as a secret of 64 bytes.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::witness_store::{valid_name, MAX_VM_NAME};

/// The pair's key, the same on both hosts (`[peer] psk_file`).
pub const PAIR_KEY: &str = "pair.psk";
/// The key of the control API over TCP (`[host] api_key_file` on both hosts, and on the
/// host of the web console `ftvm-web`).
pub const API_KEY: &str = "api.psk";
/// The folder of the witness's keys, one `HOST.psk` per host (`ftvm-witness --psk-dir`).
pub const WITNESS_KEYS: &str = "witness-keys";
/// A drop-in for `ftvm-witness.service` that hands it each host's key as a credential.
pub const WITNESS_DROP_IN: &str = "ftvm-witness-keys.conf";
/// Where the witness's keys go on the witness host.
pub const WITNESS_KEY_DIR: &str = "/etc/ftvm-witness/keys";
/// Random bytes per key.
const KEY_BYTES: usize = 32;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("needs exactly two different host names (give --host twice), got {0:?}")]
    Hosts(Vec<String>),
    #[error("host name {0:?} must be 1 to {MAX_VM_NAME} letters, digits, '.', '_' or '-'")]
    HostName(String),
    #[error("{0} exists: keep it, or give --force to replace every key (both hosts and the witness then need the new ones)")]
    Exists(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw random bytes: {0}")]
    Random(String),
}

/// The files one `keygen` made.
#[derive(Debug)]
pub struct Keys {
    pub pair: PathBuf,
    /// The control API's key.
    pub api: PathBuf,
    /// Each host's name and its witness key.
    pub witness: Vec<(String, PathBuf)>,
    pub drop_in: PathBuf,
}

/// Makes the pair key and one witness key per host under `dir` (created mode 0700 where
/// missing; files mode 0600). An existing key is an error unless `force`; then every file
/// is made anew (never written through, so its mode is 0600 whatever it was).
pub fn generate(dir: &Path, hosts: &[String], force: bool) -> Result<Keys, KeygenError> {
    if hosts.len() != 2 || hosts[0] == hosts[1] {
        return Err(KeygenError::Hosts(hosts.to_vec()));
    }
    if let Some(bad) = hosts.iter().find(|host| !valid_name(host)) {
        return Err(KeygenError::HostName(bad.clone()));
    }
    let keys = Keys {
        pair: dir.join(PAIR_KEY),
        api: dir.join(API_KEY),
        witness: hosts
            .iter()
            .map(|host| {
                (
                    host.clone(),
                    dir.join(WITNESS_KEYS).join(format!("{host}.psk")),
                )
            })
            .collect(),
        drop_in: dir.join(WITNESS_DROP_IN),
    };
    let files: Vec<&Path> = [keys.pair.as_path(), keys.api.as_path()]
        .into_iter()
        .chain(keys.witness.iter().map(|(_, path)| path.as_path()))
        .collect();
    if !force {
        if let Some(existing) = files.iter().find(|path| path.exists()) {
            return Err(KeygenError::Exists(existing.to_path_buf()));
        }
    }
    for folder in [dir.to_path_buf(), dir.join(WITNESS_KEYS)] {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&folder)
            .map_err(|source| KeygenError::Write {
                path: folder.clone(),
                source,
            })?;
    }
    for path in files {
        write_new(path, &random_key()?)?;
    }
    write_new(&keys.drop_in, witness_drop_in(hosts).as_bytes())?;
    Ok(keys)
}

/// The `[Service]` drop-in that loads each host's key into the witness's credentials
/// directory, which `ftvm-witness.service` gives as `--psk-dir` (a `DynamicUser` cannot
/// read the root-only key directory itself).
pub fn witness_drop_in(hosts: &[String]) -> String {
    let mut text = String::from(
        "# /etc/systemd/system/ftvm-witness.service.d/keys.conf, made by ftvm keygen\n[Service]\n",
    );
    for host in hosts {
        text.push_str(&format!(
            "LoadCredential={host}.psk:{WITNESS_KEY_DIR}/{host}.psk\n"
        ));
    }
    text
}

/// What to copy where, for the operator.
pub fn instructions(keys: &Keys) -> String {
    let mut text = format!(
        "{} -> /etc/ftvm/pair.psk on both hosts ([peer] psk_file)\n",
        keys.pair.display()
    );
    text.push_str(&format!(
        "{} -> /etc/ftvm/api.psk on both hosts ([host] api_key_file, with api_listen) and on the web console's host, only if you serve the API\n",
        keys.api.display()
    ));
    for (host, path) in &keys.witness {
        text.push_str(&format!(
            "{} -> /etc/ftvm/witness.psk on {host} ([witness] psk_file) and {WITNESS_KEY_DIR}/{host}.psk on the witness\n",
            path.display()
        ));
    }
    text.push_str(&format!(
        "{} -> /etc/systemd/system/ftvm-witness.service.d/keys.conf on the witness, then `systemctl daemon-reload`\n\
         Copy with modes kept (`install -m 0600`, scp -p), keep the keys root-only, and delete this folder afterwards.\n",
        keys.drop_in.display()
    ));
    text
}

pub(crate) fn random_key() -> Result<Vec<u8>, KeygenError> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|error| KeygenError::Random(error.to_string()))?;
    let mut text: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    text.push('\n');
    Ok(text.into_bytes())
}

/// Writes `contents` to a new file of mode 0600, replacing any file at `path`.
fn write_new(path: &Path, contents: &[u8]) -> Result<(), KeygenError> {
    let write_error = |source| KeygenError::Write {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(write_error(error)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;

    use replication_link::Psk;

    fn hosts() -> Vec<String> {
        vec!["hostA".into(), "hostB".into()]
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn keys_are_readable_by_the_link_and_private() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().join("keys");
        let keys = generate(&dir, &hosts(), false).expect("generate");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(WITNESS_KEYS)), 0o700);
        let pair = Psk::from_file(&keys.pair).expect("pair key");
        for (_, path) in &keys.witness {
            assert_eq!(mode(path), 0o600);
            let witness = Psk::from_file(path).expect("witness key");
            assert!(witness != pair, "each key is drawn on its own");
        }
        assert_eq!(mode(&keys.pair), 0o600);
        assert_eq!(mode(&keys.api), 0o600);
        let api = Psk::from_file(&keys.api).expect("API key");
        assert!(api != pair, "the API key is drawn on its own");
        assert_eq!(keys.witness[0].1, dir.join("witness-keys/hostA.psk"));
    }

    #[test]
    fn an_existing_key_is_kept_unless_forced() {
        let temp = tempfile::tempdir().expect("tempdir");
        let keys = generate(temp.path(), &hosts(), false).expect("generate");
        let before = std::fs::read(&keys.pair).expect("read");
        let error = generate(temp.path(), &hosts(), false).expect_err("refused");
        assert!(matches!(error, KeygenError::Exists(_)), "{error}");
        assert_eq!(std::fs::read(&keys.pair).expect("read"), before);
        std::fs::set_permissions(&keys.pair, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let keys = generate(temp.path(), &hosts(), true).expect("forced");
        assert_ne!(std::fs::read(&keys.pair).expect("read"), before);
        assert_eq!(mode(&keys.pair), 0o600, "a replaced key is private again");
    }

    #[test]
    fn host_names_are_checked() {
        let temp = tempfile::tempdir().expect("tempdir");
        let one = vec!["hostA".to_owned()];
        assert!(matches!(
            generate(temp.path(), &one, false),
            Err(KeygenError::Hosts(_))
        ));
        let same = vec!["hostA".to_owned(), "hostA".to_owned()];
        assert!(matches!(
            generate(temp.path(), &same, false),
            Err(KeygenError::Hosts(_))
        ));
        let bad = vec!["hostA".to_owned(), "../etc".to_owned()];
        assert!(matches!(
            generate(temp.path(), &bad, false),
            Err(KeygenError::HostName(_))
        ));
        assert!(!temp.path().join(PAIR_KEY).exists(), "nothing made");
    }

    #[test]
    fn the_drop_in_and_instructions_name_every_host() {
        let temp = tempfile::tempdir().expect("tempdir");
        let keys = generate(temp.path(), &hosts(), false).expect("generate");
        let drop_in = std::fs::read_to_string(&keys.drop_in).expect("drop-in");
        assert!(drop_in.contains("LoadCredential=hostB.psk:/etc/ftvm-witness/keys/hostB.psk"));
        let text = instructions(&keys);
        assert!(text.contains("/etc/ftvm/pair.psk on both hosts"));
        assert!(text.contains("/etc/ftvm/api.psk on both hosts"));
        assert!(text.contains("/etc/ftvm/witness.psk on hostA"));
        assert!(text.contains("/etc/ftvm-witness/keys/hostB.psk on the witness"));
    }
}
