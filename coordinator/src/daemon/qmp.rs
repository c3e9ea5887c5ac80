//! QEMU's JSON monitor protocol (QMP), spoken natively over the unix socket `ftvmd` gives
//! each QEMU it starts (`-qmp unix:PATH,server=on,wait=off`): enough to pause a guest
//! (`stop`), resume it (`cont`) and read its run state (`query-status`).
//!
//! One short session per command: connect, read the greeting, `qmp_capabilities`, the
//! command, close. Asynchronous events are skipped. Every read and write has a deadline,
//! so a QEMU that hangs holds up only the agent thread that asked.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

/// Longest line accepted from QEMU.
const MAX_LINE_BYTES: u64 = 1 << 20;
/// Interval between connection attempts while QEMU creates its socket.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP socket")]
    Closed,
    #[error("QEMU sent a line that is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("QMP greeting expected, got {0}")]
    Greeting(Value),
    #[error("QMP {command} failed: {error}")]
    Command { command: String, error: Value },
}

/// Runs `command` (no arguments) on the QMP socket at `path` and returns its `return`
/// value. Connecting is retried until `timeout` (QEMU may just be starting); each read
/// and write then gets `timeout` too.
pub fn execute(path: &Path, command: &str, timeout: Duration) -> Result<Value, QmpError> {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match daemon_util::connect_unix(path) {
            Ok(stream) => break stream,
            Err(source) if Instant::now() >= deadline => {
                return Err(QmpError::Connect {
                    path: path.display().to_string(),
                    source,
                })
            }
            Err(_) => std::thread::sleep(CONNECT_RETRY),
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut session = Session {
        reader: BufReader::new(stream.try_clone()?),
        writer: stream,
    };
    let greeting = session.read_message()?;
    if greeting.get("QMP").is_none() {
        return Err(QmpError::Greeting(greeting));
    }
    session.execute("qmp_capabilities")?;
    session.execute(command)
}

/// The guest's run state (`running`, `paused`, `inmigrate`, …).
pub fn run_state(path: &Path, timeout: Duration) -> Result<String, QmpError> {
    let reply = execute(path, "query-status", timeout)?;
    Ok(reply["status"].as_str().unwrap_or_default().to_owned())
}

struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Session {
    fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = json!({ "execute": command }).to_string();
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

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let read = (&mut self.reader)
            .take(MAX_LINE_BYTES)
            .read_line(&mut line)?;
        if read == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(QmpError::NotJson)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A fake QEMU: greets, then answers each command from `replies` in turn, with an
    /// event before each answer.
    fn fake_qemu(path: &Path, replies: Vec<&'static str>) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut writer = stream.try_clone().expect("clone");
            let mut reader = BufReader::new(stream);
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .expect("greet");
            let mut commands = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                commands.push(line.trim().to_owned());
                writer
                    .write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n")
                    .expect("event");
                writer.write_all(reply.as_bytes()).expect("reply");
                writer.write_all(b"\n").expect("newline");
            }
            commands
        })
    }

    #[test]
    fn a_command_skips_events_and_returns_its_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let qemu = fake_qemu(
            &path,
            vec![
                "{\"return\": {}}",
                "{\"return\": {\"status\": \"paused\", \"running\": false}}",
            ],
        );
        let state = run_state(&path, Duration::from_secs(2)).expect("query-status");
        assert_eq!(state, "paused");
        let commands = qemu.join().expect("fake qemu");
        assert_eq!(
            commands,
            vec![
                "{\"execute\":\"qmp_capabilities\"}",
                "{\"execute\":\"query-status\"}"
            ]
        );
    }

    #[test]
    fn an_error_reply_and_a_silent_qemu_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let qemu = fake_qemu(
            &path,
            vec![
                "{\"return\": {}}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}",
            ],
        );
        let error = execute(&path, "cont", Duration::from_secs(2)).expect_err("refused");
        assert!(matches!(error, QmpError::Command { .. }), "{error}");
        qemu.join().expect("fake qemu");
        // A socket that accepts and never greets: the deadline ends the wait.
        let silent = dir.path().join("silent.sock");
        let _listener = UnixListener::bind(&silent).expect("bind");
        let started = Instant::now();
        let error = execute(&silent, "stop", Duration::from_millis(200)).expect_err("silent");
        assert!(matches!(error, QmpError::Io(_)), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let missing = execute(
            &dir.path().join("missing.sock"),
            "stop",
            Duration::from_millis(100),
        );
        assert!(matches!(missing, Err(QmpError::Connect { .. })));
    }
}
