//! `libftvm_ram_track.so`, preloaded into QEMU (`LD_PRELOAD`): write-protects the guest RAM
//! mapping with userfaultfd in async mode, inside QEMU, on the checkpoint engine's request,
//! so that the engine can read and re-arm QEMU's written pages from outside with
//! `PAGEMAP_SCAN` on `/proc/<qemu>/pagemap` (see `checkpoint/src/dirty.rs`).
//!
//! On load (an ELF constructor) it reads `FTVM_RAM_TRACK_SOCKET`. Unset: the library does
//! nothing. Set: unless a live process listens at that path already, it removes a stale
//! socket there (only a socket, never another file), listens (mode 0600) and serves from a
//! thread of its own with every signal blocked (QEMU's signals stay with QEMU's threads).
//!
//! The variable stays in the environment: QEMU is often started through a wrapper that
//! execs it (`ip netns exec`, `numactl`, `taskset`, libvirt's helpers), which loads the
//! library first and binds the socket; its listener closes at the exec (close-on-exec) and
//! QEMU's copy of the library finds the socket stale and takes it over. A process QEMU
//! starts finds QEMU's socket live and leaves it alone. The engine registers the RAM file,
//! which only QEMU maps: a wrapper caught before its exec answers that no mapping of the
//! file exists, and the engine asks again. Nothing it does can abort
//! QEMU: every failure is a reply line or one line on stderr, and a panic is caught in the
//! thread that serves the connection.
//!
//! Not with QEMU's `-daemonize`: its fork keeps the main thread only.
//!
//! # Protocol
//!
//! One request per line (UTF-8, at most [`MAX_LINE_BYTES`]); each reply is zero or more
//! `ok …` lines closed by `end`, or one `error TEXT` line. Numbers are hexadecimal with a
//! `0x` prefix.
//!
//! - `register PATH`: every shared mapping of the file PATH names (matched by device and
//!   inode, so `/proc/self/fd/N` works for a memfd) is registered with a new userfaultfd
//!   (`UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`, mode WP) and write-protected
//!   whole. Reply: `ok START LEN` per mapping (neighbouring areas of one mapping merged),
//!   then `end`. Registering a file again replaces its registration (all pages protected
//!   anew). On error nothing of that file stays registered.
//! - `unregister`: undoes every registration. Reply: `ok unregistered COUNT`, `end`.
//! - `status`: `ok pid PID` (QEMU's, in its own PID namespace), then `ok tracking START LEN
//!   PATH` per registered mapping, then `end`.

mod maps;
mod uffd;

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use maps::{FileId, Span};
use uffd::Userfaultfd;

/// The environment variable naming the socket.
pub const SOCKET_ENV: &str = "FTVM_RAM_TRACK_SOCKET";
/// Longest request line, in bytes, its newline included.
pub const MAX_LINE_BYTES: usize = 4096;
/// Connections served at the same time; more are refused.
const MAX_CONNECTIONS: usize = 4;
/// Pause after a failed `accept`.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = on_load;

extern "C" fn on_load() {
    // A panic must not unwind into the dynamic loader.
    let _ = panic::catch_unwind(start);
}

fn start() {
    let Some(path) = std::env::var_os(SOCKET_ENV) else {
        return;
    };
    // Constructors run before QEMU's main and its threads: changing the umask is safe here.
    let path = PathBuf::from(path);
    let listener = match listen(&path) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "ftvm-ram-track: cannot listen on {}: {error}",
                path.display()
            );
            return;
        }
    };
    let spawned = with_signals_blocked(|| {
        thread::Builder::new()
            .name("ftvm-ram-track".into())
            .spawn(move || serve(listener))
    });
    if let Err(error) = spawned {
        eprintln!("ftvm-ram-track: cannot start the listener thread: {error}");
    }
}

/// Binds `path` with mode 0600, after removing a stale socket there (one nobody listens on).
fn listen(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "a live process listens there (QEMU, if this process is one it started)",
                ));
            }
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    // SAFETY: umask(2) only swaps an integer of the process; no thread of QEMU runs yet.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(previous) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Runs `spawn` with every signal blocked, so that the thread it creates inherits that mask.
fn with_signals_blocked<T>(spawn: impl FnOnce() -> T) -> T {
    // SAFETY: an all-zero sigset_t is a valid value, filled by sigfillset before use.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigfillset writes only the set it is given, which lives on our stack;
    // pthread_sigmask reads `all` and writes `previous`, both valid for the call.
    let blocked = unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous) == 0
    };
    let result = spawn();
    if blocked {
        // SAFETY: restores the mask read above; `previous` is valid for the call.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    }
    result
}

/// One registered file: its userfaultfd and the spans registered on it.
#[derive(Debug)]
struct Registration {
    path: String,
    file: FileId,
    spans: Vec<Span>,
    userfaultfd: Userfaultfd,
}

impl Drop for Registration {
    fn drop(&mut self) {
        for span in &self.spans {
            // Closing the fd right after unregisters anyway.
            let _ = self.userfaultfd.unregister(span.start, span.len);
        }
    }
}

type State = Arc<Mutex<Vec<Registration>>>;

fn lock(state: &State) -> MutexGuard<'_, Vec<Registration>> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serve(listener: UnixListener) {
    let state: State = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else {
            // Out of fds or memory: do not spin inside QEMU.
            thread::sleep(ACCEPT_RETRY);
            continue;
        };
        if connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            connections.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.write_all(b"error too many connections\n");
            continue;
        }
        let state = state.clone();
        let count = connections.clone();
        let spawned = thread::Builder::new()
            .name("ftvm-ram-track-client".into())
            .spawn(move || {
                let _ = panic::catch_unwind(AssertUnwindSafe(|| serve_client(stream, &state)));
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_client(stream: UnixStream, state: &State) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let reply = match read_line(&mut reader) {
            Ok(Some(line)) => answer(&line, state),
            Ok(None) => return,
            Err(LineError::Io) => return,
            Err(LineError::TooLong) => {
                let _ = writer.write_all(b"error line too long\n");
                return;
            }
            Err(LineError::NotUtf8) => "error not UTF-8\n".to_owned(),
        };
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum LineError {
    Io,
    TooLong,
    NotUtf8,
}

/// Reads one line of at most [`MAX_LINE_BYTES`] without its newline; `None` at the end.
fn read_line(reader: &mut impl BufRead) -> Result<Option<String>, LineError> {
    let mut line = Vec::new();
    loop {
        let buffer = reader.fill_buf().map_err(|_| LineError::Io)?;
        if buffer.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(LineError::Io)
            };
        }
        let (chunk, done) = match buffer.iter().position(|&byte| byte == b'\n') {
            Some(index) => (&buffer[..index], index + 1),
            None => (buffer, buffer.len()),
        };
        let found_newline = chunk.len() < done;
        line.extend_from_slice(chunk);
        reader.consume(done);
        if line.len() >= MAX_LINE_BYTES {
            return Err(LineError::TooLong);
        }
        if found_newline {
            break;
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| LineError::NotUtf8)
}

#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    Register(&'a str),
    Unregister,
    Status,
}

fn parse(line: &str) -> Result<Request<'_>, String> {
    let (command, argument) = match line.split_once(' ') {
        Some((command, argument)) => (command, Some(argument)),
        None => (line, None),
    };
    match (command, argument) {
        ("register", Some(path)) if !path.is_empty() && !path.contains('\0') => {
            Ok(Request::Register(path))
        }
        ("register", _) => Err("usage: register PATH".to_owned()),
        ("unregister", None) => Ok(Request::Unregister),
        ("status", None) => Ok(Request::Status),
        ("unregister" | "status", Some(_)) => Err(format!("{command} takes no argument")),
        _ => Err(format!("unknown command {:?}", truncated(command))),
    }
}

fn truncated(text: &str) -> &str {
    let end = text
        .char_indices()
        .nth(64)
        .map_or(text.len(), |(index, _)| index);
    &text[..end]
}

/// The reply to one request line, newlines included.
fn answer(line: &str, state: &State) -> String {
    let result = parse(line).and_then(|request| match request {
        Request::Register(path) => register(path, state),
        Request::Unregister => {
            let mut registrations = lock(state);
            let count = registrations.len();
            registrations.clear();
            Ok(vec![format!("unregistered {count:#x}")])
        }
        Request::Status => Ok(status(state)),
    });
    match result {
        Ok(lines) => {
            let mut reply = String::new();
            for line in lines {
                reply.push_str("ok ");
                reply.push_str(&line);
                reply.push('\n');
            }
            reply.push_str("end\n");
            reply
        }
        Err(error) => format!("error {}\n", error.replace('\n', " ")),
    }
}

fn status(state: &State) -> Vec<String> {
    let mut lines = vec![format!("pid {:#x}", std::process::id())];
    for registration in lock(state).iter() {
        for span in &registration.spans {
            lines.push(format!(
                "tracking {:#x} {:#x} {}",
                span.start, span.len, registration.path
            ));
        }
    }
    lines
}

fn register(path: &str, state: &State) -> Result<Vec<String>, String> {
    let file = FileId::of(Path::new(path)).map_err(|error| format!("{path}: {error}"))?;
    let mut registrations = lock(state);
    registrations.retain(|registration| registration.file != file);
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|error| format!("/proc/self/maps: {error}"))?;
    let spans = maps::shared_mappings(&maps, file);
    if spans.is_empty() {
        return Err(format!("{path} has no shared mapping in this process"));
    }
    let userfaultfd = Userfaultfd::open()?;
    let mut registration = Registration {
        path: path.to_owned(),
        file,
        spans: Vec::new(),
        userfaultfd,
    };
    for span in &spans {
        registration
            .userfaultfd
            .register(span.start, span.len)
            .map_err(|error| span_error("UFFDIO_REGISTER", span, error))?;
        registration.spans.push(*span);
        registration
            .userfaultfd
            .write_protect(span.start, span.len)
            .map_err(|error| span_error("UFFDIO_WRITEPROTECT", span, error))?;
    }
    let lines = spans
        .iter()
        .map(|span| format!("{:#x} {:#x}", span.start, span.len))
        .collect();
    registrations.push(registration);
    Ok(lines)
}

fn span_error(what: &str, span: &Span, error: io::Error) -> String {
    format!("{what} of {:#x}+{:#x}: {error}", span.start, span.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_hostile_lines_are_errors() {
        assert_eq!(
            parse("register /dev/shm/a b"),
            Ok(Request::Register("/dev/shm/a b"))
        );
        assert_eq!(parse("unregister"), Ok(Request::Unregister));
        assert_eq!(parse("status"), Ok(Request::Status));
        for line in [
            "",
            "register",
            "register ",
            "status x",
            "unregister x",
            "REGISTER /a",
        ] {
            assert!(parse(line).is_err(), "{line:?}");
        }
        let long = "x".repeat(10_000);
        let error = parse(&long).expect_err("unknown");
        assert!(error.len() < 100, "{error}");
        assert!(parse("ä").is_err());
    }

    #[test]
    fn lines_are_bounded() {
        let mut input: &[u8] = b"status\r\nnext\n\xff\xfe\nlast";
        assert_eq!(read_line(&mut input), Ok(Some("status".to_owned())));
        assert_eq!(read_line(&mut input), Ok(Some("next".to_owned())));
        assert_eq!(read_line(&mut input), Err(LineError::NotUtf8));
        assert_eq!(read_line(&mut input), Err(LineError::Io));
        let long = vec![b'a'; MAX_LINE_BYTES * 3];
        let mut input: &[u8] = &long;
        assert_eq!(read_line(&mut input), Err(LineError::TooLong));
        let mut empty: &[u8] = b"";
        assert_eq!(read_line(&mut empty), Ok(None));
    }

    #[test]
    fn errors_are_one_line() {
        let state = State::default();
        let reply = answer("register /nonexistent\nfile", &state);
        assert!(
            reply.starts_with("error ") && reply.ends_with('\n'),
            "{reply}"
        );
        assert_eq!(reply.lines().count(), 1, "{reply}");
        let reply = answer("register /proc/self/exe", &state);
        assert!(reply.contains("no shared mapping"), "{reply}");
        assert_eq!(answer("unregister", &state), "ok unregistered 0x0\nend\n");
    }
}
