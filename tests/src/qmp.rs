//! A small QMP client: QEMU's JSON monitor protocol spoken natively over a unix socket
//! (`-qmp unix:PATH,server=on,wait=off`), enough to stop and continue a guest, ask for
//! its run state and run a command with arguments (`migrate`).
//!
//! QMP is line-oriented JSON: a greeting, then one reply (`return` or `error`) per command,
//! with asynchronous `event`s interleaved anywhere; they are skipped here.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

/// How long one command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two connection attempts while QEMU creates its socket.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket")]
    Connect(#[source] std::io::Error),
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP socket")]
    Closed,
    #[error("QMP sent a line that is not JSON: {0:?}")]
    NotJson(String),
    #[error("QMP greeting expected, got {0}")]
    Greeting(Value),
    #[error("QMP command {command} failed: {error}")]
    Command { command: String, error: Value },
}

/// One QMP session, past the capabilities negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until `timeout` while QEMU starts), reads the greeting and leaves
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(error) if Instant::now() >= deadline => return Err(QmpError::Connect(error)),
                Err(_) => std::thread::sleep(CONNECT_RETRY),
            }
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting(greeting));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs a command without arguments and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        self.execute_with(command, Value::Null)
    }

    /// Runs a command with `arguments` (a JSON object; `null` for none) and returns its
    /// `return` value.
    pub fn execute_with(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut line = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        }
        .to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let mut message = self.read_message()?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(error) = message.get_mut("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    error: error.take(),
                });
            }
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
        }
    }

    /// Pauses the guest's vCPUs and devices (what `virsh suspend` does).
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop").map(drop)
    }

    /// Resumes a paused guest.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont").map(drop)
    }

    /// The run state: `running`, `paused`, …
    pub fn status(&mut self) -> Result<String, QmpError> {
        let reply = self.execute("query-status")?;
        Ok(reply["status"].as_str().unwrap_or_default().to_owned())
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| QmpError::NotJson(line))
    }
}
