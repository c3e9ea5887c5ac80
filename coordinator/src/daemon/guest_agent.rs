//! The QEMU guest agent (`qemu-ga`) inside a VM, spoken over the virtio-serial channel
//! `org.qemu.guest_agent.0` that ftvmd gives every QEMU it starts (a unix socket in the
//! VM's run directory, QEMU the server): enough to freeze the guest's file systems for an
//! application-consistent snapshot and thaw them again (`docs/OPERATIONS.md`, "Snapshots").
//!
//! The agent is inside the guest, so everything it sends is hostile input: lines are read
//! up to [`MAX_LINE_BYTES`], at most [`MAX_DISCARDED_BYTES`] of stale output are skipped,
//! every read and write has a deadline, and an answer that is not the expected JSON is an
//! error. A guest that does not run the agent accepts nothing on the channel: the first
//! command times out.
//!
//! Each session starts with `guest-sync-delimited` and a fresh id: the agent answers a
//! 0xFF byte and then the id, so whatever an earlier session left unread (a late answer to
//! a command that timed out) is skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

/// The virtio-serial port's name that `qemu-ga` looks for.
pub const CHANNEL_NAME: &str = "org.qemu.guest_agent.0";
/// The longest line accepted from the agent (its answers here are a few dozen bytes).
const MAX_LINE_BYTES: u64 = 64 * 1024;
/// The most bytes skipped before the sync's 0xFF (stale answers of earlier sessions).
const MAX_DISCARDED_BYTES: u64 = 1 << 20;
/// The most lines read while waiting for one answer.
const MAX_LINES: usize = 64;
/// The byte the agent sends before its answer to `guest-sync-delimited`.
const DELIMITER: u8 = 0xFF;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("the VM has no guest agent channel ({path}): is its QEMU started by ftvmd?")]
    NoChannel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the guest agent did not answer {command} within {timeout_ms} ms: is \
         qemu-guest-agent installed and running in the guest?"
    )]
    NoAnswer { command: String, timeout_ms: u128 },
    #[error("guest agent channel I/O failed during {command}")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent closed the channel during {0}")]
    Closed(String),
    #[error("the guest agent sent more than {0} bytes without a line end")]
    TooLong(u64),
    #[error("the guest agent sent too much without answering {0}")]
    Flooded(String),
    #[error("the guest agent's answer to {command} is not JSON")]
    NotJson {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the guest agent refused {command}: {desc}")]
    Refused { command: String, desc: String },
    #[error("the guest agent's answer to {command} is not the one expected: {answer}")]
    Unexpected { command: String, answer: String },
}

impl AgentError {
    /// The agent did not answer in time (none runs, or it hangs).
    pub fn timed_out(&self) -> bool {
        matches!(self, AgentError::NoAnswer { .. })
    }
}

/// A session with the agent: connected and synchronised.
pub struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Session {
    /// Connects to the channel at `path` and synchronises with `guest-sync-delimited`
    /// within `timeout`: a guest that runs no agent fails here.
    pub fn open(path: &Path, timeout: Duration) -> Result<Session, AgentError> {
        let stream = daemon_util::connect_unix(path).map_err(|source| AgentError::NoChannel {
            path: path.display().to_string(),
            source,
        })?;
        let reader = stream.try_clone().map_err(|source| AgentError::Io {
            command: "connect".into(),
            source,
        })?;
        let mut session = Session {
            reader: BufReader::new(reader),
            writer: stream,
        };
        session.sync(timeout)?;
        Ok(session)
    }

    /// `guest-sync-delimited` with a fresh id: skips whatever the agent sent before.
    fn sync(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let command = "guest-sync-delimited";
        let id = sync_id();
        let deadline = Deadline::after(timeout);
        self.send(
            &json!({ "execute": command, "arguments": { "id": id } }),
            command,
            deadline,
        )?;
        self.skip_to_delimiter(command, deadline)?;
        let answer = self.answer(command, deadline)?;
        if answer.as_u64() == Some(id) {
            Ok(())
        } else {
            Err(AgentError::Unexpected {
                command: command.into(),
                answer: short(&answer),
            })
        }
    }

    /// Runs `command` (no arguments) and returns its `return` value within `timeout`.
    pub fn execute(&mut self, command: &str, timeout: Duration) -> Result<Value, AgentError> {
        self.execute_with(command, None, timeout)
    }

    /// Runs `command` with `arguments` and returns its `return` value within `timeout`.
    pub fn execute_with(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let deadline = Deadline::after(timeout);
        let message = match arguments {
            Some(arguments) => json!({ "execute": command, "arguments": arguments }),
            None => json!({ "execute": command }),
        };
        self.send(&message, command, deadline)?;
        self.answer(command, deadline)
    }

    /// `guest-fsfreeze-status`: `frozen` or `thawed`.
    pub fn freeze_status(&mut self, timeout: Duration) -> Result<String, AgentError> {
        let command = "guest-fsfreeze-status";
        let answer = self.execute(command, timeout)?;
        match answer.as_str() {
            Some(status @ ("frozen" | "thawed")) => Ok(status.to_owned()),
            _ => Err(AgentError::Unexpected {
                command: command.into(),
                answer: short(&answer),
            }),
        }
    }

    /// A command that answers a count (`guest-fsfreeze-freeze`, `guest-fsfreeze-thaw`).
    pub fn execute_count(&mut self, command: &str, timeout: Duration) -> Result<u64, AgentError> {
        let answer = self.execute(command, timeout)?;
        answer.as_u64().ok_or_else(|| AgentError::Unexpected {
            command: command.into(),
            answer: short(&answer),
        })
    }

    fn send(
        &mut self,
        message: &Value,
        command: &str,
        deadline: Deadline,
    ) -> Result<(), AgentError> {
        let mut line = message.to_string();
        line.push('\n');
        let remaining = remaining(deadline, command)?;
        self.writer
            .set_write_timeout(Some(remaining))
            .and_then(|()| self.writer.write_all(line.as_bytes()))
            .map_err(|source| io_error(command, source, deadline))
    }

    fn set_deadline(&mut self, command: &str, deadline: Deadline) -> Result<(), AgentError> {
        let remaining = remaining(deadline, command)?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(remaining))
            .map_err(|source| io_error(command, source, deadline))
    }

    /// Skips bytes up to and including the sync's 0xFF.
    fn skip_to_delimiter(&mut self, command: &str, deadline: Deadline) -> Result<(), AgentError> {
        let mut skipped = 0u64;
        loop {
            self.set_deadline(command, deadline)?;
            let buffer = self
                .reader
                .fill_buf()
                .map_err(|source| io_error(command, source, deadline))?;
            if buffer.is_empty() {
                return Err(AgentError::Closed(command.into()));
            }
            if let Some(at) = buffer.iter().position(|&byte| byte == DELIMITER) {
                self.reader.consume(at + 1);
                return Ok(());
            }
            let length = buffer.len();
            self.reader.consume(length);
            skipped = skipped.saturating_add(length as u64);
            if skipped > MAX_DISCARDED_BYTES {
                return Err(AgentError::Flooded(command.into()));
            }
        }
    }

    /// The `return` value of the next answer (events and empty lines are skipped), or the
    /// agent's refusal.
    fn answer(&mut self, command: &str, deadline: Deadline) -> Result<Value, AgentError> {
        for _ in 0..MAX_LINES {
            let line = self.read_line(command, deadline)?;
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            let mut message: Value =
                serde_json::from_slice(text).map_err(|source| AgentError::NotJson {
                    command: command.into(),
                    source,
                })?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(error) = message.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .map_or_else(|| short(error), |desc| desc.chars().take(200).collect());
                return Err(AgentError::Refused {
                    command: command.into(),
                    desc,
                });
            }
            return match message.get_mut("return") {
                Some(value) => Ok(value.take()),
                None => Err(AgentError::Unexpected {
                    command: command.into(),
                    answer: short(&message),
                }),
            };
        }
        Err(AgentError::Flooded(command.into()))
    }

    fn read_line(&mut self, command: &str, deadline: Deadline) -> Result<Vec<u8>, AgentError> {
        let mut line = Vec::new();
        loop {
            self.set_deadline(command, deadline)?;
            let limit = MAX_LINE_BYTES.saturating_sub(line.len() as u64);
            let read = (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut line)
                .map_err(|source| io_error(command, source, deadline))?;
            if line.last() == Some(&b'\n') {
                return Ok(line);
            }
            if read == 0 && line.len() as u64 >= MAX_LINE_BYTES {
                return Err(AgentError::TooLong(MAX_LINE_BYTES));
            }
            if read == 0 {
                return Err(AgentError::Closed(command.into()));
            }
        }
    }
}

/// When one command's time is up, and how long it was given.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    fn no_answer(self, command: &str) -> AgentError {
        AgentError::NoAnswer {
            command: command.into(),
            timeout_ms: self.timeout.as_millis(),
        }
    }
}

/// The time left until `deadline`; none left is the agent's failure to answer.
fn remaining(deadline: Deadline, command: &str) -> Result<Duration, AgentError> {
    let left = deadline.at.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(deadline.no_answer(command));
    }
    Ok(left)
}

/// A read or write error: a timeout is the agent not answering.
fn io_error(command: &str, source: std::io::Error, deadline: Deadline) -> AgentError {
    let timed_out = matches!(
        source.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) || Instant::now() >= deadline.at;
    if timed_out {
        deadline.no_answer(command)
    } else {
        AgentError::Io {
            command: command.into(),
            source,
        }
    }
}

/// A fresh id for `guest-sync-delimited` (below 2^53: JSON numbers stay exact).
fn sync_id() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_nanos() as u64);
        bytes = nanos.to_le_bytes();
    }
    u64::from_le_bytes(bytes) & ((1 << 53) - 1)
}

/// At most 200 characters of `value`, for an error message.
fn short(value: &Value) -> String {
    value.to_string().chars().take(200).collect()
}

/// What [`freeze`] did: the file systems frozen, and the status the agent then reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    pub file_systems: u64,
    pub status: String,
}

/// The time limits of the agent's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting and `guest-sync-delimited`: how long a guest may take to show it runs
    /// an agent.
    pub ping: Duration,
    /// `guest-fsfreeze-freeze` (it writes back every dirty page first) and
    /// `guest-fsfreeze-thaw`.
    pub freeze: Duration,
}

/// Why a freeze failed, and whether the guest's file systems may be frozen now (a thaw is
/// then due).
#[derive(Debug)]
pub struct FreezeFailed {
    pub error: AgentError,
    pub maybe_frozen: bool,
}

/// Freezes the guest's file systems: sync with the agent, check none is frozen already
/// (someone else's freeze is not ours to end), `guest-fsfreeze-freeze`, and the status
/// after it, which must be `frozen`.
pub fn freeze(path: &Path, timeouts: Timeouts) -> Result<Frozen, FreezeFailed> {
    let not_frozen = |error| FreezeFailed {
        error,
        maybe_frozen: false,
    };
    let mut session = Session::open(path, timeouts.ping).map_err(not_frozen)?;
    let before = session.freeze_status(timeouts.ping).map_err(not_frozen)?;
    if before == "frozen" {
        return Err(not_frozen(AgentError::Refused {
            command: "guest-fsfreeze-freeze".into(),
            desc: "the guest's file systems are frozen already (not by this snapshot): \
                   thaw them first"
                .into(),
        }));
    }
    let frozen = |error| FreezeFailed {
        error,
        maybe_frozen: true,
    };
    let file_systems = session
        .execute_count("guest-fsfreeze-freeze", timeouts.freeze)
        .map_err(frozen)?;
    let status = session.freeze_status(timeouts.ping).map_err(frozen)?;
    if status != "frozen" {
        return Err(frozen(AgentError::Unexpected {
            command: "guest-fsfreeze-status".into(),
            answer: format!("{status} right after the freeze"),
        }));
    }
    Ok(Frozen {
        file_systems,
        status,
    })
}

/// Thaws the guest's file systems; returns how many were thawed and the status after
/// (`thawed`).
pub fn thaw(path: &Path, timeouts: Timeouts) -> Result<(u64, String), AgentError> {
    let mut session = Session::open(path, timeouts.freeze)?;
    let thawed = session.execute_count("guest-fsfreeze-thaw", timeouts.freeze)?;
    let status = session.freeze_status(timeouts.ping)?;
    if status != "thawed" {
        return Err(AgentError::Unexpected {
            command: "guest-fsfreeze-status".into(),
            answer: format!("{status} right after the thaw"),
        });
    }
    Ok((thawed, status))
}

#[cfg(test)]
mod tests;
