//! The console's certificate: the supplied one (`certificate`, `key`), or one generated
//! on first start (self-signed, for `listen`'s address, this host's name and
//! `certificate_names`) and kept in `state_dir` (`cert.pem`, `key.pem` mode 0600) so that
//! browsers see the same one after a restart.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// The certificate chain and key, PEM, and where they came from.
#[derive(Debug)]
pub struct Certificate {
    pub chain: Vec<u8>,
    pub key: Vec<u8>,
    pub source: PathBuf,
    pub generated: bool,
}

pub fn load_or_generate(config: &Config) -> Result<Certificate, String> {
    if let (Some(chain), Some(key)) = (&config.certificate, &config.key) {
        return Ok(Certificate {
            chain: read(chain)?,
            key: read(key)?,
            source: chain.clone(),
            generated: false,
        });
    }
    let chain_path = config.state_dir.join("cert.pem");
    let key_path = config.state_dir.join("key.pem");
    if chain_path.exists() && key_path.exists() {
        return Ok(Certificate {
            chain: read(&chain_path)?,
            key: read(&key_path)?,
            source: chain_path,
            generated: false,
        });
    }
    let mut names = vec![config.listen.ip().to_string()];
    if let Some(host) = hostname() {
        names.push(host);
    }
    names.extend(config.certificate_names.iter().cloned());
    names.dedup();
    let certified = rcgen::generate_simple_self_signed(names.clone())
        .map_err(|error| format!("cannot generate a certificate for {names:?}: {error}"))?;
    let chain = certified.cert.pem().into_bytes();
    let key = certified.signing_key.serialize_pem().into_bytes();
    std::fs::DirBuilder::new()
        .recursive(true)
        .create(&config.state_dir)
        .map_err(|error| format!("cannot create {}: {error}", config.state_dir.display()))?;
    write_new(&key_path, &key, 0o600)?;
    write_new(&chain_path, &chain, 0o644)?;
    log::info!(
        "generated a self-signed certificate for {names:?} in {}",
        chain_path.display()
    );
    Ok(Certificate {
        chain,
        key,
        source: chain_path,
        generated: true,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    let error = |error: std::io::Error| format!("cannot write {}: {error}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(error)?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(error)
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}
