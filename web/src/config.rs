//! `ftvm-web`'s configuration file (TOML). Every mistake is reported with what is wrong,
//! before anything starts.
//!
//! ```toml
//! listen = "192.0.2.10:8443"
//! state_dir = "/var/lib/ftvm-web"        # the generated certificate lives here
//! audit_log = "/var/log/ftvm-web/audit.log"
//! # certificate = "/etc/ftvm-web/cert.pem"   # a supplied one (with `key`), instead
//! # key = "/etc/ftvm-web/key.pem"
//! client_id = "ftvm-web"                 # the name the hosts' logs show for this console
//! session_minutes = 480
//!
//! [[user]]
//! name = "admin"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # `ftvm-web hash-password`
//!
//! [[pair]]
//! name = "rack1"
//! [[pair.host]]
//! name = "hostA"
//! api = ["10.77.0.1:7700"]               # the host's [host] api_listen
//! api_key_file = "/etc/ftvm/api.psk"     # its [host] api_key_file
//! [[pair.host]]
//! name = "hostB"
//! control_socket = "/run/ftvm/ftvmd.sock"   # the console's own host: its control socket
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use coordinator::config::ConfigError;
use coordinator::config::{load_toml, parse_toml};
use serde::Deserialize;

/// Most pairs, hosts per pair, users: a console page, not a fleet manager.
const MAX_PAIRS: usize = 64;
const MAX_USERS: usize = 64;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    /// A supplied certificate chain (PEM); without it one is generated in `state_dir`.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// The supplied certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Names the generated certificate is made for, besides `listen`'s address.
    #[serde(default)]
    pub certificate_names: Vec<String>,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// A login lasts this long.
    #[serde(default = "default_session_minutes")]
    pub session_minutes: u64,
    #[serde(rename = "user")]
    pub users: Vec<User>,
    #[serde(rename = "pair")]
    pub pairs: Vec<Pair>,
}

fn default_client_id() -> String {
    "ftvm-web".into()
}

fn default_session_minutes() -> u64 {
    480
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// An argon2 PHC string (`ftvm-web hash-password`).
    pub password_hash: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    pub name: String,
    #[serde(rename = "host")]
    pub hosts: Vec<Host>,
}

/// How the console reaches one host's ftvmd.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The host's `[host] name`.
    pub name: String,
    /// Its `[host] api_listen` (1 or 2 addresses).
    #[serde(default)]
    pub api: Vec<SocketAddr>,
    /// Its `[host] api_key_file`.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Instead of `api`: the control socket of the host the console runs on.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        load_toml(path, Config::validate)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse_toml(text, path, Config::validate)
    }

    fn validate(&self) -> Result<(), String> {
        if self.users.is_empty() || self.users.len() > MAX_USERS {
            return Err(format!(
                "needs 1 to {MAX_USERS} [[user]] sections (name, password_hash from \
                 `ftvm-web hash-password`), has {}",
                self.users.len()
            ));
        }
        let mut names = BTreeSet::new();
        for user in &self.users {
            if !names.insert(user.name.as_str()) || !valid_name(&user.name) {
                return Err(format!(
                    "user {:?}: names are 1 to 64 letters, digits, '.', '_' or '-', each once",
                    user.name
                ));
            }
            argon2::PasswordHash::new(&user.password_hash).map_err(|error| {
                format!(
                    "user {:?}: password_hash is not an argon2 hash ({error}); make one with \
                     `ftvm-web hash-password`",
                    user.name
                )
            })?;
        }
        if self.pairs.is_empty() || self.pairs.len() > MAX_PAIRS {
            return Err(format!(
                "needs 1 to {MAX_PAIRS} [[pair]] sections, has {}",
                self.pairs.len()
            ));
        }
        let mut pairs = BTreeSet::new();
        for pair in &self.pairs {
            if !pairs.insert(pair.name.as_str()) || !valid_name(&pair.name) {
                return Err(format!(
                    "pair {:?}: names are 1 to 64 letters, digits, '.', '_' or '-', each once",
                    pair.name
                ));
            }
            if pair.hosts.len() != 2 || pair.hosts[0].name == pair.hosts[1].name {
                return Err(format!(
                    "pair {:?} needs exactly two [[pair.host]] with different names",
                    pair.name
                ));
            }
            for host in &pair.hosts {
                host.validate().map_err(|what| {
                    format!("pair {:?}, host {:?}: {what}", pair.name, host.name)
                })?;
            }
        }
        if self.certificate.is_some() != self.key.is_some() {
            return Err("certificate and key go together (both PEM files), or neither".into());
        }
        if !valid_name(&self.client_id) {
            return Err(format!(
                "client_id {:?} is not a valid name",
                self.client_id
            ));
        }
        if self.session_minutes == 0 || self.session_minutes > 7 * 24 * 60 {
            return Err("session_minutes must be 1 to 10080 (a week)".into());
        }
        Ok(())
    }
}

impl Host {
    fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err("names are 1 to 64 letters, digits, '.', '_' or '-'".into());
        }
        match (&self.control_socket, self.api.len(), &self.api_key_file) {
            (Some(_), 0, None) => Ok(()),
            (None, 1 | 2, Some(_)) => Ok(()),
            (Some(_), _, _) => Err("either control_socket or api (with api_key_file)".into()),
            (None, 1 | 2, None) => Err("api needs api_key_file (the hosts' api.psk)".into()),
            (None, _, _) => Err(
                "needs api (1 or 2 addresses, the host's api_listen) and api_key_file, or \
                 control_socket for the console's own host"
                    .into(),
            ),
        }
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
        Q0tG3tXWQz0bqpn3mAqBPZO9mD3RMw8b/qhsFLW6Ids";

    fn good() -> String {
        format!(
            r#"
listen = "127.0.0.1:8443"
state_dir = "/var/lib/ftvm-web"
audit_log = "/var/log/ftvm-web/audit.log"
[[user]]
name = "admin"
password_hash = "{HASH}"
[[pair]]
name = "rack1"
[[pair.host]]
name = "hostA"
api = ["10.77.0.1:7700"]
api_key_file = "/etc/ftvm/api.psk"
[[pair.host]]
name = "hostB"
control_socket = "/run/ftvm/ftvmd.sock"
"#
        )
    }

    fn error_of(text: &str) -> String {
        let error = Config::parse(text, Path::new("web.toml")).expect_err("invalid");
        coordinator::error_chain(&error)
    }

    #[test]
    fn a_good_file_parses_with_defaults() {
        let config = Config::parse(&good(), Path::new("web.toml")).expect("valid");
        assert_eq!(config.client_id, "ftvm-web");
        assert_eq!(config.session_minutes, 480);
        assert_eq!(config.pairs[0].hosts.len(), 2);
    }

    #[test]
    fn mistakes_are_named() {
        let keyless = error_of(&good().replace("api_key_file = \"/etc/ftvm/api.psk\"", ""));
        assert!(keyless.contains("api needs api_key_file"), "{keyless}");
        let plain = error_of(&good().replace(HASH, "secret"));
        assert!(plain.contains("not an argon2 hash"), "{plain}");
        let lone = error_of(&good().replace("name = \"hostB\"", "name = \"hostA\""));
        assert!(lone.contains("exactly two"), "{lone}");
        let half = error_of(&good().replace("[[user]]", "key = \"/k.pem\"\n[[user]]"));
        assert!(half.contains("certificate and key go together"), "{half}");
        let typo = error_of(&good().replace("audit_log", "audit_file"));
        assert!(typo.contains("audit_file"), "{typo}");
    }
}
