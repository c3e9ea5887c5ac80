//! QEMU's machine protocol (QMP), spoken natively over QEMU's unix socket
//! (`-qmp unix:PATH,server=on,wait=off`): the session the checkpoint engine keeps with the
//! QEMU it protects.
//!
//! QMP is line-oriented JSON: a greeting, `qmp_capabilities`, then one reply (`return` or
//! `error`) per command. Asynchronous events (`STOP`, `RESUME`, `MIGRATION`, …) can arrive
//! anywhere, also between a command and its reply; they are kept in a bounded queue of their
//! own ([`Qmp::take_events`], [`Qmp::wait_event`]) and never taken for a reply. Every command
//! carries an `id`, so a late reply to a command that timed out is recognised and dropped.
//!
//! QEMU's output is treated as hostile input: lines are capped at [`MAX_LINE_BYTES`], a line
//! that is not a JSON object, a reply of the wrong shape or a greeting that is not one is an
//! error, never a panic. After an I/O error, a closed socket or an overlong line the session
//! is unusable ([`QmpError::Broken`]); connect again.
//!
//! File descriptors go to QEMU with `getfd`: the descriptor travels as `SCM_RIGHTS`
//! ancillary data on the same `sendmsg` as the command's bytes.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use thiserror::Error;

/// Longest line accepted from QEMU (`query-qmp-schema`, the largest reply, is ~200 KB).
pub const MAX_LINE_BYTES: usize = 4 << 20;
/// Events kept until someone takes them; the oldest go first.
pub const MAX_BUFFERED_EVENTS: usize = 1024;
/// How long a command may take to answer unless the session says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between two connection attempts while QEMU creates its socket.
const CONNECT_RETRY: Duration = Duration::from_millis(10);
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Characters of a hostile message kept in an error.
const QUOTE_CHARS: usize = 200;

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP socket I/O failed")]
    Io(#[from] io::Error),
    #[error("QEMU closed the QMP socket")]
    Closed,
    #[error("the QMP session is unusable after an earlier error")]
    Broken,
    #[error("no reply to {command} within {timeout_ms} ms")]
    Timeout { command: String, timeout_ms: u128 },
    #[error("QEMU sent a line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("QEMU sent a line that is not JSON: {line}")]
    NotJson { line: String },
    #[error("QEMU sent a message that is neither a reply nor an event: {message}")]
    Unexpected { message: String },
    #[error("QMP greeting expected, got {message}")]
    Greeting { message: String },
    #[error("{command} failed: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("{command} returned a reply of the wrong shape: {reply}")]
    BadReply { command: String, reply: String },
}

impl QmpError {
    /// QEMU's `desc` of a refused command.
    pub fn desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

/// An asynchronous event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `STOP`, `RESUME`, `MIGRATION`, …
    pub name: String,
    /// The event's `data` (`Value::Null` without one).
    pub data: Value,
    /// QEMU's timestamp, since the Unix epoch.
    pub timestamp: Option<Duration>,
}

impl Event {
    /// The `status` of a `MIGRATION` event (`setup`, `active`, `device`, `completed`, …).
    pub fn migration_status(&self) -> Option<&str> {
        if self.name != "MIGRATION" {
            return None;
        }
        self.data.get("status").and_then(Value::as_str)
    }
}

/// What `query-migrate` says, the parts the engine reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    /// `None` before the first migration.
    pub status: Option<String>,
    pub error_desc: Option<String>,
}

/// One QMP session, past capabilities negotiation.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    /// Bytes read and not yet split into lines.
    pending: Vec<u8>,
    /// Bytes of `pending` known to hold no newline.
    scanned: usize,
    events: VecDeque<Event>,
    events_dropped: u64,
    timeout: Duration,
    next_id: u64,
    broken: bool,
    /// Migration capabilities this session set, in order (QEMU keeps them per process).
    capabilities: Vec<(String, bool)>,
}

impl Qmp {
    /// Connects (retrying until `timeout` while QEMU starts; a QEMU whose accept queue is
    /// full is retried too, never waited on), reads the greeting and leaves capabilities
    /// negotiation. Commands then get `timeout` each.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match daemon_util::connect_unix(path) {
                Ok(stream) => break stream,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_owned(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(CONNECT_RETRY),
            }
        };
        Qmp::from_stream(stream, timeout)
    }

    /// Starts a session on a connected socket: greeting, `qmp_capabilities`.
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            stream,
            pending: Vec::new(),
            scanned: 0,
            events: VecDeque::new(),
            events_dropped: 0,
            timeout,
            next_id: 1,
            broken: false,
            capabilities: Vec::new(),
        };
        let deadline = Instant::now() + timeout;
        let Some(greeting) = qmp.read_message(deadline)? else {
            return Err(QmpError::Timeout {
                command: "the greeting".into(),
                timeout_ms: timeout.as_millis(),
            });
        };
        if !greeting.get("QMP").is_some_and(Value::is_object) {
            qmp.broken = true;
            return Err(QmpError::Greeting {
                message: quote(&greeting),
            });
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// How long each command may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `command` with `arguments` (a JSON object, or none) and returns its `return`
    /// value; QEMU's refusal is [`QmpError::Command`] with its `desc`.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.request(command, arguments, None)
    }

    /// Pauses the guest's vCPUs and devices (vhost-user rings: `GET_VRING_BASE`).
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes a paused guest.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// The run state: `running`, `paused`, `finish-migrate`, `postmigrate`, `inmigrate`, …
    pub fn query_status(&mut self) -> Result<String, QmpError> {
        let reply = self.execute("query-status", None)?;
        match reply.get("status").and_then(Value::as_str) {
            Some(status) => Ok(status.to_owned()),
            None => Err(bad_reply("query-status", &reply)),
        }
    }

    /// Hands `fd` to QEMU under `name` (`getfd`); QEMU keeps its own duplicate, so the
    /// caller may close its copy once this returns.
    pub fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let arguments = serde_json::json!({ "fdname": name });
        self.request("getfd", Some(arguments), Some(fd)).map(drop)
    }

    /// Closes a descriptor QEMU holds under `name` and did not use.
    pub fn closefd(&mut self, name: &str) -> Result<(), QmpError> {
        let arguments = serde_json::json!({ "fdname": name });
        self.execute("closefd", Some(arguments)).map(drop)
    }

    /// Sets migration capabilities (`x-ignore-shared`, `events`, …) and remembers them.
    pub fn migrate_set_capabilities(
        &mut self,
        capabilities: &[(&str, bool)],
    ) -> Result<(), QmpError> {
        let list: Vec<Value> = capabilities
            .iter()
            .map(|(name, state)| serde_json::json!({ "capability": name, "state": state }))
            .collect();
        let arguments = serde_json::json!({ "capabilities": list });
        self.execute("migrate-set-capabilities", Some(arguments))?;
        for (name, state) in capabilities {
            self.capabilities.retain(|(known, _)| known != name);
            self.capabilities.push(((*name).to_owned(), *state));
        }
        Ok(())
    }

    /// A migration capability as this session set it (`None`: never set here).
    pub fn capability(&self, name: &str) -> Option<bool> {
        self.capabilities
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, state)| *state)
    }

    /// Starts an outgoing migration to `uri` (`fd:NAME` for a descriptor given by `getfd`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        let arguments = serde_json::json!({ "uri": uri });
        self.execute("migrate", Some(arguments)).map(drop)
    }

    /// Starts the incoming migration of a QEMU started with `-incoming defer`.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        let arguments = serde_json::json!({ "uri": uri });
        self.execute("migrate-incoming", Some(arguments)).map(drop)
    }

    /// The current or last migration's status and error.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let reply = self.execute("query-migrate", None)?;
        if !reply.is_object() {
            return Err(bad_reply("query-migrate", &reply));
        }
        let text = |key: &str| reply.get(key).and_then(Value::as_str).map(str::to_owned);
        Ok(MigrationInfo {
            status: text("status"),
            error_desc: text("error-desc"),
        })
    }

    /// Every buffered event, oldest first; the buffer is emptied.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Removes and returns the buffered events that `matches`, oldest first; the others
    /// stay buffered.
    pub fn take_events_matching(&mut self, matches: impl Fn(&Event) -> bool) -> Vec<Event> {
        let (taken, kept): (Vec<Event>, Vec<Event>) =
            self.events.drain(..).partition(|event| matches(event));
        self.events = kept.into();
        taken
    }

    /// Events dropped because nobody took them ([`MAX_BUFFERED_EVENTS`]).
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    /// Removes and returns the first buffered event that `matches`, reading the socket until
    /// one arrives or `timeout` passes (`Ok(None)`). Other events stay buffered.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        matches: impl Fn(&Event) -> bool,
    ) -> Result<Option<Event>, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(index) = self.events.iter().position(&matches) {
                return Ok(self.events.remove(index));
            }
            let Some(message) = self.read_message(deadline)? else {
                return Ok(None);
            };
            if !self.keep_if_event(&message)? {
                // A late reply to a command that timed out.
                continue;
            }
        }
    }

    fn request(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        if self.broken {
            return Err(QmpError::Broken);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut message = Map::new();
        message.insert("execute".into(), Value::from(command));
        if let Some(arguments) = arguments {
            message.insert("arguments".into(), arguments);
        }
        message.insert("id".into(), Value::from(id));
        let mut line = Value::Object(message).to_string();
        line.push('\n');
        let sent = match fd {
            Some(fd) => send_with_fd(&self.stream, line.as_bytes(), fd),
            None => self.stream.write_all(line.as_bytes()),
        };
        if let Err(error) = sent {
            self.broken = true;
            return Err(QmpError::Io(error));
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(mut message) = self.read_message(deadline)? else {
                return Err(QmpError::Timeout {
                    command: command.to_owned(),
                    timeout_ms: self.timeout.as_millis(),
                });
            };
            if self.keep_if_event(&message)? {
                continue;
            }
            // No id: QEMU's answer to input it could not parse, which can only be ours.
            if message
                .get("id")
                .is_some_and(|echoed| echoed != &Value::from(id))
            {
                continue;
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
        }
    }

    /// Buffers `message` if it is an event (`true`); `false` for a reply; an error for
    /// anything else.
    fn keep_if_event(&mut self, message: &Value) -> Result<bool, QmpError> {
        if message.get("return").is_some() || message.get("error").is_some() {
            return Ok(false);
        }
        let Some(name) = message.get("event").and_then(Value::as_str) else {
            return Err(QmpError::Unexpected {
                message: quote(message),
            });
        };
        let timestamp = message.get("timestamp").and_then(|stamp| {
            let seconds = stamp.get("seconds")?.as_u64()?;
            let micros = stamp.get("microseconds")?.as_u64()?;
            Some(Duration::from_secs(seconds) + Duration::from_micros(micros))
        });
        if self.events.len() >= MAX_BUFFERED_EVENTS {
            self.events.pop_front();
            self.events_dropped += 1;
        }
        self.events.push_back(Event {
            name: name.to_owned(),
            data: message.get("data").cloned().unwrap_or(Value::Null),
            timestamp,
        });
        Ok(true)
    }

    /// The next JSON object from QEMU, or `None` once `deadline` passed.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Value>, QmpError> {
        if self.broken {
            return Err(QmpError::Broken);
        }
        loop {
            if let Some(line) = self.next_line() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return match serde_json::from_slice::<Value>(&line) {
                    Ok(value) if value.is_object() => Ok(Some(value)),
                    _ => Err(QmpError::NotJson {
                        line: String::from_utf8_lossy(&line)
                            .chars()
                            .take(QUOTE_CHARS)
                            .collect(),
                    }),
                };
            }
            if self.pending.len() > MAX_LINE_BYTES {
                self.broken = true;
                return Err(QmpError::LineTooLong {
                    limit: MAX_LINE_BYTES,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // A zero timeout would mean "block forever".
            let wait = (deadline - now).max(Duration::from_millis(1));
            match self.fill(wait) {
                Ok(()) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    self.broken = true;
                    return Err(QmpError::Closed);
                }
                Err(error) => {
                    self.broken = true;
                    return Err(QmpError::Io(error));
                }
            }
        }
    }

    /// Takes one complete line (without its newline) from the bytes read so far.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        let offset = self.pending[self.scanned..]
            .iter()
            .position(|&byte| byte == b'\n');
        match offset {
            Some(offset) => {
                let end = self.scanned + offset;
                let rest = self.pending.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.pending, rest);
                line.truncate(end);
                self.scanned = 0;
                Some(line)
            }
            None => {
                self.scanned = self.pending.len();
                None
            }
        }
    }

    /// Reads what the socket has, waiting at most `wait`.
    fn fill(&mut self, wait: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(wait))?;
        let start = self.pending.len();
        self.pending.resize(start + READ_CHUNK_BYTES, 0);
        let read = self.stream.read(&mut self.pending[start..]);
        let length = *read.as_ref().unwrap_or(&0);
        self.pending.truncate(start + length);
        match read {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => Ok(()),
            Err(error) => Err(error),
        }
    }
}

fn bad_reply(command: &str, reply: &Value) -> QmpError {
    QmpError::BadReply {
        command: command.to_owned(),
        reply: quote(reply),
    }
}

/// The start of a message, for an error.
fn quote(message: &Value) -> String {
    message.to_string().chars().take(QUOTE_CHARS).collect()
}

/// Writes `bytes` to `stream` with `fd` attached to the first byte as `SCM_RIGHTS`.
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let payload_len = std::mem::size_of::<libc::c_int>() as libc::c_uint;
    // Room for one cmsghdr with one descriptor, aligned for cmsghdr (u64 ≥ its alignment).
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE is arithmetic on its argument only.
    let control_len = unsafe { libc::CMSG_SPACE(payload_len) } as usize;
    if control_len > std::mem::size_of_val(&control) {
        return Err(io::Error::other("control buffer too small for SCM_RIGHTS"));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid value (null
    // pointers, zero lengths); the fields used are set below.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = control_len;
    // SAFETY: `message.msg_control` points to `control`, which is at least `control_len`
    // bytes, aligned for cmsghdr and alive for this function; CMSG_FIRSTHDR only reads the
    // msghdr's control fields and returns a pointer into that buffer (or null if it cannot
    // hold a cmsghdr, checked next).
    let header = unsafe { libc::CMSG_FIRSTHDR(&message) };
    if header.is_null() {
        return Err(io::Error::other("no room for the SCM_RIGHTS header"));
    }
    // SAFETY: `header` is non-null and points to the first cmsghdr inside `control`
    // (CMSG_SPACE(payload_len) bytes, checked above), so the header and the
    // `payload_len` data bytes CMSG_DATA points to lie inside the buffer we own exclusively;
    // the descriptor is written unaligned as CMSG_DATA need not be aligned for c_int.
    unsafe {
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(payload_len) as usize;
        std::ptr::write_unaligned(
            libc::CMSG_DATA(header).cast::<libc::c_int>(),
            fd.as_raw_fd(),
        );
    }
    let sent = loop {
        // SAFETY: the socket descriptor is open (we hold `stream`); `message` points to
        // `iov` (describing `bytes`, which sendmsg only reads) and `control`, both alive
        // across the call; `fd` is an open descriptor borrowed for the call.
        let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            break sent as usize;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    };
    // The descriptor went with the first byte; the rest is plain bytes.
    let mut writer = stream;
    writer.write_all(bytes.get(sent..).unwrap_or_default())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A fake QEMU on one end of a socket pair: greets, then for each command line it
    /// reads sends the next script entry verbatim (several lines allowed, `{id}` replaced
    /// by the command's id). Returns the commands it read.
    fn fake_qemu(
        server: UnixStream,
        greeting: &'static str,
        script: Vec<&'static str>,
    ) -> std::thread::JoinHandle<Vec<Value>> {
        std::thread::spawn(move || {
            let mut writer = server.try_clone().expect("clone");
            let mut reader = BufReader::new(server);
            writer.write_all(greeting.as_bytes()).expect("greet");
            let mut commands = Vec::new();
            for reply in script {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let command: Value = serde_json::from_str(&line).expect("command is JSON");
                let id = command["id"].to_string();
                commands.push(command);
                let _ = writer.write_all(reply.replace("{id}", &id).as_bytes());
            }
            commands
        })
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";
    const OK: &str = "{\"return\": {}, \"id\": {id}}\n";

    fn session(
        script: Vec<&'static str>,
    ) -> (Result<Qmp, QmpError>, std::thread::JoinHandle<Vec<Value>>) {
        let (client, server) = UnixStream::pair().expect("socketpair");
        let qemu = fake_qemu(server, GREETING, script);
        (Qmp::from_stream(client, Duration::from_secs(2)), qemu)
    }

    #[test]
    fn events_between_a_command_and_its_reply_are_buffered_apart() {
        let (qmp, qemu) = session(vec![
            OK,
            "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 5, \"microseconds\": 7}}\n\
             {\"return\": {}, \"id\": 999}\n\
             {\"event\": \"MIGRATION\", \"data\": {\"status\": \"completed\"}}\n\
             {\"return\": {\"status\": \"postmigrate\", \"running\": false}, \"id\": {id}}\n",
        ]);
        let mut qmp = qmp.expect("session");
        assert_eq!(qmp.query_status().expect("status"), "postmigrate");
        let events = qmp.take_events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].name, "STOP");
        assert_eq!(events[0].timestamp, Some(Duration::new(5, 7_000)));
        assert_eq!(events[1].migration_status(), Some("completed"));
        assert!(qmp.take_events().is_empty());
        let commands = qemu.join().expect("fake qemu");
        assert_eq!(commands[0]["execute"], "qmp_capabilities");
        assert_eq!(commands[1]["execute"], "query-status");
    }

    #[test]
    fn a_refusal_carries_qemus_desc() {
        let (qmp, qemu) = session(vec![
            OK,
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Migration is not finalized yet\"}, \"id\": {id}}\n",
        ]);
        let mut qmp = qmp.expect("session");
        let error = qmp.cont().expect_err("refused");
        assert_eq!(error.desc(), Some("Migration is not finalized yet"));
        assert!(error.to_string().contains("cont failed"), "{error}");
        qemu.join().expect("fake qemu");
    }

    #[test]
    fn garbled_output_is_an_error_not_a_panic() {
        for garbage in [
            "not json at all\n",
            "[1, 2, 3]\n",
            "{\"neither\": true}\n",
            "{\"return\": 5, \"id\": {id}}\n",
            "\u{0}\u{ff}{\n",
        ] {
            let (qmp, qemu) = session(vec![OK, garbage]);
            let mut qmp = qmp.expect("session");
            let error = qmp.query_status().expect_err(garbage);
            assert!(
                matches!(
                    error,
                    QmpError::NotJson { .. }
                        | QmpError::Unexpected { .. }
                        | QmpError::BadReply { .. }
                ),
                "{garbage:?}: {error}"
            );
            qemu.join().expect("fake qemu");
        }
        let (client, server) = UnixStream::pair().expect("socketpair");
        let qemu = fake_qemu(server, "{\"greeting\": 1}\n", vec![]);
        let error = Qmp::from_stream(client, Duration::from_secs(2)).expect_err("no greeting");
        assert!(matches!(error, QmpError::Greeting { .. }), "{error}");
        qemu.join().expect("fake qemu");
    }

    #[test]
    fn an_endless_line_is_refused_and_breaks_the_session() {
        let (client, mut server) = UnixStream::pair().expect("socketpair");
        let writer = std::thread::spawn(move || {
            let _ = server.write_all(GREETING.as_bytes());
            let chunk = vec![b'x'; 1 << 16];
            // Stops when the client closes its end.
            while server.write_all(&chunk).is_ok() {}
        });
        let mut qmp = Qmp {
            stream: client,
            pending: Vec::new(),
            scanned: 0,
            events: VecDeque::new(),
            events_dropped: 0,
            timeout: Duration::from_secs(5),
            next_id: 1,
            broken: false,
            capabilities: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(qmp.read_message(deadline).expect("greeting").is_some());
        let error = qmp.read_message(deadline).expect_err("too long");
        assert!(matches!(error, QmpError::LineTooLong { .. }), "{error}");
        assert!(matches!(qmp.stop(), Err(QmpError::Broken)));
        drop(qmp);
        writer.join().expect("writer");
    }

    #[test]
    fn a_silent_qemu_times_out_and_a_late_reply_is_skipped() {
        let (client, server) = UnixStream::pair().expect("socketpair");
        let qemu = std::thread::spawn(move || {
            let mut writer = server.try_clone().expect("clone");
            let mut reader = BufReader::new(server);
            writer.write_all(GREETING.as_bytes()).expect("greet");
            let mut line = String::new();
            for reply in ["{\"return\": {}, \"id\": 1}\n", ""] {
                line.clear();
                reader.read_line(&mut line).expect("command");
                writer.write_all(reply.as_bytes()).expect("reply");
            }
            // The third command: first the late reply to the second, then its own.
            line.clear();
            reader.read_line(&mut line).expect("command");
            writer
                .write_all(b"{\"return\": {\"status\": \"late\"}, \"id\": 2}\n{\"return\": {\"status\": \"running\"}, \"id\": 3}\n")
                .expect("reply");
        });
        let mut qmp = Qmp::from_stream(client, Duration::from_millis(200)).expect("session");
        let error = qmp.query_status().expect_err("silent");
        assert!(matches!(error, QmpError::Timeout { .. }), "{error}");
        assert_eq!(qmp.query_status().expect("status"), "running");
        qemu.join().expect("fake qemu");
    }

    #[test]
    fn getfd_passes_the_descriptor_with_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let qemu = std::thread::spawn(move || {
            let (server, _) = listener.accept().expect("accept");
            let mut writer = server.try_clone().expect("clone");
            writer.write_all(GREETING.as_bytes()).expect("greet");
            let mut reader = BufReader::new(server.try_clone().expect("clone"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("capabilities");
            writer.write_all(b"{\"return\": {}}\n").expect("reply");
            let (bytes, fd) = receive_with_fd(&server);
            let command: Value = serde_json::from_slice(&bytes).expect("JSON");
            assert_eq!(command["execute"], "getfd");
            assert_eq!(command["arguments"]["fdname"], "ftvm-state");
            writer.write_all(b"{\"return\": {}}\n").expect("reply");
            let mut file = std::fs::File::from(fd.expect("a descriptor came along"));
            file.write_all(b"through the fd")
                .expect("write to the passed fd");
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(2)).expect("session");
        let (mut read_end, write_end) = std::io::pipe().expect("pipe");
        qmp.getfd("ftvm-state", std::os::fd::AsFd::as_fd(&write_end))
            .expect("getfd");
        drop(write_end);
        qemu.join().expect("fake qemu");
        let mut received = String::new();
        read_end.read_to_string(&mut received).expect("read");
        assert_eq!(received, "through the fd");
    }

    /// The fake QEMU's side of `getfd`: one recvmsg with room for a descriptor; no bytes at
    /// EOF.
    pub(crate) fn receive_with_fd(stream: &UnixStream) -> (Vec<u8>, Option<std::os::fd::OwnedFd>) {
        use std::os::fd::FromRawFd;
        let mut bytes = vec![0u8; 4096];
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: all-zero is a valid msghdr; the pointers are set below.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `message` points to `bytes` and `control`, both alive and writable.
        let received = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut message, 0) };
        if received <= 0 {
            return (Vec::new(), None);
        }
        bytes.truncate(received as usize);
        // SAFETY: `message` was filled by recvmsg; CMSG_FIRSTHDR stays inside `control`.
        let header = unsafe { libc::CMSG_FIRSTHDR(&message) };
        if header.is_null() {
            return (bytes, None);
        }
        // SAFETY: `header` points to a cmsghdr recvmsg wrote into `control`; an
        // SCM_RIGHTS payload holds at least one c_int, a descriptor we now own.
        let fd = unsafe {
            assert_eq!((*header).cmsg_type, libc::SCM_RIGHTS);
            let raw = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>());
            std::os::fd::OwnedFd::from_raw_fd(raw)
        };
        (bytes, Some(fd))
    }
}
