//! The audit log: one JSON line per login, logout and action (who, when, what, on what,
//! with what result, from where), appended and synced before the answer goes out.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

/// One line of the audit log.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// UTC, RFC 3339.
    pub time: String,
    pub unix_ms: u64,
    pub user: &'a str,
    pub client: IpAddr,
    /// `login`, `logout`, `protect`, `unprotect`, `failover`, `migrate`, `maintenance-on`,
    /// `maintenance-off`.
    pub action: &'a str,
    /// `PAIR/HOST` or `PAIR/HOST/VM`.
    pub target: &'a str,
    /// `ok: …` or `refused: …` / `failed: …`.
    pub result: &'a str,
}

#[derive(Debug)]
pub struct Audit {
    file: Mutex<File>,
}

impl Audit {
    /// Opens (creates, mode 0600) the log for appending.
    pub fn open(path: &Path) -> Result<Audit, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|error| format!("cannot open the audit log {}: {error}", path.display()))?;
        Ok(Audit {
            file: Mutex::new(file),
        })
    }

    /// Appends `record`; an error is logged (the action has happened either way).
    pub fn write(&self, record: &Record<'_>) {
        let mut line = match serde_json::to_string(record) {
            Ok(line) => line,
            Err(error) => {
                log::error!("audit: cannot encode a record: {error}");
                return;
            }
        };
        line.push('\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(error) = file
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
        {
            log::error!("audit: cannot write the audit log: {error}: {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_appended_as_json_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log/audit.log");
        let audit = Audit::open(&path).expect("open");
        for action in ["login", "failover"] {
            audit.write(&Record {
                time: coordinator::daemon::events::utc_time(0),
                unix_ms: 0,
                user: "admin",
                client: "10.0.0.9".parse().expect("address"),
                action,
                target: "rack1/hostA/vm1",
                result: "ok: done",
            });
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["action"], "failover");
        assert_eq!(lines[1]["user"], "admin");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("metadata").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
