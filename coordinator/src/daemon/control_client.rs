//! ftvmd's side of the daemons' control sockets: one command line out, one reply line in,
//! both `control_protocol`'s types. A reply that is not the protocol's (a missing, unknown
//! or mistyped field) is [`AskError::NotUnderstood`], never a default.

use std::fmt::Display;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use control_protocol::{disk, nic, Reply, ReplyError};
use serde::de::DeserializeOwned;
use thiserror::Error;

/// How long an order to a disk daemon, or `announce` to a NIC daemon, may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest reply line read, in bytes.
const MAX_REPLY_BYTES: u64 = 1 << 20;

/// Why a daemon's control socket gave no usable answer.
#[derive(Debug, Error)]
pub enum AskError {
    /// The daemon is gone, or did not answer in time.
    #[error("no answer on {}", path.display())]
    NoAnswer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// It answered, but not with the protocol's reply to the command.
    #[error("the answer on {} is not understood", path.display())]
    NotUnderstood {
        path: PathBuf,
        #[source]
        source: ReplyError,
    },
    /// It refused the command.
    #[error("refused: {0}")]
    Refused(String),
}

impl AskError {
    /// The daemon took the command and did not answer in time (hung or overloaded), rather
    /// than being gone.
    pub fn timed_out(&self) -> bool {
        matches!(self, AskError::NoAnswer { source, .. } if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ))
    }

    /// The message with its causes.
    pub fn describe(&self) -> String {
        crate::error_chain(self)
    }
}

/// Sends `command` and reads the reply as `T`; sending and reading each give up after
/// `timeout`.
pub fn ask<T: DeserializeOwned>(
    control: &Path,
    command: &dyn Display,
    timeout: Duration,
) -> Result<T, AskError> {
    let no_answer = |source| AskError::NoAnswer {
        path: control.to_owned(),
        source,
    };
    let line = exchange(control, &command.to_string(), timeout).map_err(no_answer)?;
    match Reply::<T>::from_line(&line) {
        Ok(Reply::Answer(answer)) => Ok(answer),
        Ok(Reply::Refused(error)) => Err(AskError::Refused(error)),
        Err(source) => Err(AskError::NotUnderstood {
            path: control.to_owned(),
            source,
        }),
    }
}

fn exchange(control: &Path, command: &str, timeout: Duration) -> io::Result<String> {
    // Never blocks on a daemon that does not accept any more (hung, queue full).
    let mut stream = daemon_util::connect_unix(control)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(command.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut reply = String::new();
    BufReader::new(io::Read::take(&stream, MAX_REPLY_BYTES)).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    Ok(reply)
}

/// A disk daemon's `status`.
pub fn disk_status(control: &Path, timeout: Duration) -> Result<disk::Status, AskError> {
    ask(control, &disk::Command::Status, timeout)
}

/// Carries out `order` on a disk daemon: its result in words, or why not.
pub fn disk_order(control: &Path, order: disk::Order) -> Result<String, String> {
    let command = disk::Command::Order(order);
    match ask::<disk::Done>(control, &command, COMMAND_TIMEOUT) {
        Ok(done) if done.ok => Ok(done.result),
        Ok(done) => Err(format!("{order}: not done ({})", done.result)),
        Err(error) => Err(format!("{order}: {}", error.describe())),
    }
}

/// How long a snapshot command may take: the daemon's barrier waits up to 5 s for the
/// writes in flight and 10 s for the peer's answer.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(20);

/// `snapshot create|delete|revert NAME` on a disk daemon: its result in words, or why not.
pub fn disk_snapshot(control: &Path, order: &disk::SnapshotOrder) -> Result<String, String> {
    let command = disk::Command::Snapshot(order.clone());
    match ask::<disk::Done>(control, &command, SNAPSHOT_TIMEOUT) {
        Ok(done) if done.ok => Ok(done.result),
        Ok(done) => Err(format!("{order}: not done ({})", done.result)),
        Err(AskError::Refused(error)) => Err(error),
        Err(error) => Err(format!("{order}: {}", error.describe())),
    }
}

/// `snapshot list` on a disk daemon.
pub fn disk_snapshots(control: &Path) -> Result<disk::Snapshots, String> {
    let command = disk::Command::Snapshot(disk::SnapshotOrder::List);
    ask::<disk::Snapshots>(control, &command, COMMAND_TIMEOUT)
        .map_err(|error| format!("snapshot list: {}", error.describe()))
}

/// A NIC daemon's `status`.
pub fn nic_status(control: &Path, timeout: Duration) -> Result<nic::Status, AskError> {
    ask(control, &nic::Command::Status, timeout)
}

/// Has a NIC daemon announce the guest's MAC where its frames leave now.
pub fn nic_announce(control: &Path) -> Result<nic::Announced, String> {
    ask(control, &nic::Command::Announce, COMMAND_TIMEOUT)
        .map_err(|error| format!("announce: {}", error.describe()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A "daemon" that answers each of `replies` to one client, and the commands it got.
    fn daemon(dir: &Path, replies: Vec<String>) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(dir.join("ctl")).expect("bind");
        std::thread::spawn(move || {
            let mut commands = Vec::new();
            for reply in replies {
                let (stream, _) = listener.accept().expect("accept");
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).expect("read");
                commands.push(line.trim().to_owned());
                (&stream).write_all(reply.as_bytes()).expect("write");
            }
            commands
        })
    }

    #[test]
    fn an_order_is_sent_as_its_line_and_its_answer_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let daemon = daemon(
            dir.path(),
            vec![
                "{\"ok\":true,\"result\":\"degraded\"}\n".into(),
                "{\"error\":\"this primary is fenced\"}\n".into(),
                "{\"ok\":true}\n".into(),
            ],
        );
        let control = dir.path().join("ctl");
        let order = disk::Order::ContinueDegraded(Some(7));
        assert_eq!(disk_order(&control, order), Ok("degraded".into()));
        let refused = disk_order(&control, order).expect_err("refused");
        assert!(refused.contains("this primary is fenced"), "{refused}");
        let garbled = disk_order(&control, disk::Order::Fence).expect_err("garbled");
        assert!(garbled.contains("not understood"), "{garbled}");
        assert_eq!(
            daemon.join().expect("daemon"),
            ["continue-degraded 7", "continue-degraded 7", "fence"]
        );
    }

    #[test]
    fn a_status_with_a_renamed_field_is_not_understood() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reply = "{\"image\":\"/i\",\"image_kind\":\"file\",\"size_bytes\":1,\
            \"read_only\":false,\"serial\":\"d0\",\"queues\":1,\"read_requests\":0,\
            \"write_requests\":0,\"flush_requests\":0,\"discard_requests\":0,\
            \"write_zeroes_requests\":0,\"get_id_requests\":0,\"read_bytes\":0,\
            \"written_bytes\":0,\"rejected_requests\":0,\"io_errors\":0,\"connections\":0,\
            \"connected\":false,\"held_kicks\":0,\"replication\":{\"role\":\"secondary\",\
            \"disk_state\":\"UpToDate\",\"gen\":9,\"peer_reachable\":true,\"links\":null,\
            \"applied_writes\":0,\"applied_bytes\":0,\"resync_bytes_received\":0,\
            \"refused_requests\":0,\"disk_failed\":null,\"disk_failures\":0,\
            \"epochs\":{\"enabled\":false,\"receiving_epoch\":null,\"sealed_epoch\":null,\
            \"applied_epoch\":null,\"buffered_records\":0,\"buffered_bytes\":0,\
            \"memory_bytes\":0,\"journal_used_bytes\":0,\"journal_size_bytes\":0,\
            \"journal_full\":false,\"journal_full_waits\":0}}}\n";
        let fixed = reply.replace("\"gen\"", "\"generation\"");
        let daemon = daemon(dir.path(), vec![reply.into(), fixed]);
        let control = dir.path().join("ctl");
        let error = disk_status(&control, COMMAND_TIMEOUT).expect_err("renamed");
        assert!(matches!(error, AskError::NotUnderstood { .. }), "{error:?}");
        assert!(!error.timed_out());
        let described = error.describe();
        assert!(described.contains("unknown field `gen`"), "{described}");
        let status = disk_status(&control, COMMAND_TIMEOUT).expect("the right name");
        assert!(matches!(
            status.replication,
            disk::Replication::Secondary(disk::SecondaryStatus { generation: 9, .. })
        ));
        assert_eq!(daemon.join().expect("daemon"), ["status", "status"]);
    }
}
