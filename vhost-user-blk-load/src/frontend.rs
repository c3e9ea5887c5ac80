//! The vhost-user control plane: one `Session` per connection to a backend socket, wrapping
//! rust-vmm's `vhost::vhost_user::Frontend` with a deadline on every request.
//!
//! The vhost crate reads replies with blocking `recvmsg` and retries on EAGAIN, so a socket read
//! timeout would spin forever. Instead each request runs beside a watchdog thread that shuts the
//! socket down when the deadline passes; the blocked read then fails and the session is marked
//! broken.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::memory::DirtyLog;

/// How often `connect` retries while the socket does not exist or refuses.
const CONNECT_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// VHOST_USER_SET_LOG_BASE.
const SET_LOG_BASE: u32 = 6;
/// Header flags: version 1.
const HEADER_VERSION: u32 = 0x1;
/// Header flags: this is a reply.
const HEADER_REPLY: u32 = 0x4;
/// Largest reply body we accept for SET_LOG_BASE.
const LOG_BASE_REPLY_MAX_BYTES: u32 = 64;

/// Errors of a vhost-user session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{request} failed")]
    Request {
        request: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("{request} got no answer within {timeout_ms} ms")]
    Timeout {
        request: &'static str,
        timeout_ms: u64,
    },
    #[error("the session was broken by an earlier timeout")]
    Broken,
    #[error("socket I/O failed during {request}")]
    Io {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("bad reply to {request}: {detail}")]
    BadReply {
        request: &'static str,
        detail: String,
    },
}

type Result<T> = std::result::Result<T, SessionError>;

/// One vhost-user connection, frontend side.
pub struct Session {
    frontend: Frontend,
    stream: UnixStream,
    timeout: Duration,
    broken: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Session")
            .field("timeout", &self.timeout)
            .field("broken", &self.broken)
            .finish()
    }
}

fn connect_with_retry(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                thread::sleep(CONNECT_POLL_INTERVAL);
            }
            Err(source) => {
                return Err(SessionError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

impl Session {
    /// Connects to the backend's socket at `path`, retrying until `timeout` while it does not
    /// exist yet or refuses; every later request is bounded by `timeout` as well.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let stream = connect_with_retry(path, timeout)?;
        let kept = stream.try_clone().map_err(|source| SessionError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            frontend: Frontend::from_stream(stream, 1),
            stream: kept,
            timeout,
            broken: false,
        })
    }

    /// The per-request deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A duplicate of the socket: keeps the connection open and lets a queue notice a hangup.
    pub fn socket_clone(&self) -> io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Runs one request with the watchdog armed.
    fn call<T>(
        &mut self,
        request: &'static str,
        operation: impl FnOnce(&mut Frontend, &UnixStream) -> Result<T>,
    ) -> Result<T> {
        if self.broken {
            return Err(SessionError::Broken);
        }
        let timeout = self.timeout;
        let stream = &self.stream;
        let frontend = &mut self.frontend;
        let (done_sender, done_receiver) = mpsc::channel::<()>();
        let (result, expired) = thread::scope(|scope| {
            let watchdog = scope.spawn(move || {
                let expired = matches!(
                    done_receiver.recv_timeout(timeout),
                    Err(RecvTimeoutError::Timeout)
                );
                if expired {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                expired
            });
            let result = operation(frontend, stream);
            drop(done_sender);
            (result, watchdog.join().unwrap_or(true))
        });
        if expired {
            self.broken = true;
            return Err(SessionError::Timeout {
                request,
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        result
    }

    fn vhost<T>(
        &mut self,
        request: &'static str,
        operation: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        self.call(request, |frontend, _| {
            operation(frontend).map_err(|source| SessionError::Request { request, source })
        })
    }

    /// VHOST_USER_SET_OWNER.
    pub fn set_owner(&mut self) -> Result<()> {
        self.vhost("SET_OWNER", |frontend| frontend.set_owner())
    }

    /// VHOST_USER_GET_FEATURES: the virtio feature bits the backend offers.
    pub fn get_features(&mut self) -> Result<u64> {
        self.vhost("GET_FEATURES", |frontend| frontend.get_features())
    }

    /// VHOST_USER_SET_FEATURES.
    pub fn set_features(&mut self, features: u64) -> Result<()> {
        self.vhost("SET_FEATURES", |frontend| frontend.set_features(features))
    }

    /// VHOST_USER_GET_PROTOCOL_FEATURES (needs bit 30 offered).
    pub fn get_protocol_features(&mut self) -> Result<u64> {
        self.vhost("GET_PROTOCOL_FEATURES", |frontend| {
            frontend
                .get_protocol_features()
                .map(|features| features.bits())
        })
    }

    /// VHOST_USER_SET_PROTOCOL_FEATURES (unknown bits are dropped). With REPLY_ACK, every later
    /// request asks for an acknowledgement, so a refused request is an error right away.
    pub fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        let features = VhostUserProtocolFeatures::from_bits_truncate(features);
        self.vhost("SET_PROTOCOL_FEATURES", |frontend| {
            frontend.set_protocol_features(features)
        })?;
        if features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        Ok(())
    }

    /// VHOST_USER_GET_QUEUE_NUM (needs MQ).
    pub fn get_queue_num(&mut self) -> Result<u64> {
        self.vhost("GET_QUEUE_NUM", |frontend| frontend.get_queue_num())
    }

    /// VHOST_USER_GET_CONFIG of `len` bytes at `offset` of the device config space.
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>> {
        let buffer = vec![0; len as usize];
        self.vhost("GET_CONFIG", |frontend| {
            frontend
                .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buffer)
                .map(|(_, payload)| payload)
        })
    }

    /// VHOST_USER_SET_MEM_TABLE.
    pub fn set_mem_table(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<()> {
        self.vhost("SET_MEM_TABLE", |frontend| {
            frontend.set_mem_table(regions).map(|_| ())
        })
    }

    /// VHOST_USER_SET_LOG_BASE with the log memfd (needs LOG_SHMFD).
    ///
    /// Sent by hand: the vhost crate expects a 16-byte reply, but libvhost-user (QEMU's
    /// qemu-storage-daemon) answers with 8 bytes; we accept any short reply.
    pub fn set_log_base(&mut self, log: &DirtyLog) -> Result<()> {
        let request = "SET_LOG_BASE";
        self.call(request, |_, stream| {
            let io_error = |source| SessionError::Io { request, source };
            let mut message = Vec::with_capacity(28);
            message.extend_from_slice(&SET_LOG_BASE.to_le_bytes());
            message.extend_from_slice(&HEADER_VERSION.to_le_bytes());
            message.extend_from_slice(&16_u32.to_le_bytes());
            message.extend_from_slice(&log.size_bytes().to_le_bytes());
            message.extend_from_slice(&0_u64.to_le_bytes());
            let sent = stream
                .send_with_fd(&message[..], log.raw_fd())
                .map_err(|error| io_error(io::Error::from_raw_os_error(error.errno())))?;
            if sent != message.len() {
                return Err(io_error(io::Error::from(io::ErrorKind::WriteZero)));
            }
            read_log_base_reply(stream).map_err(|error| match error {
                LogBaseReply::Io(source) => io_error(source),
                LogBaseReply::Bad(detail) => SessionError::BadReply { request, detail },
            })
        })
    }

    /// VHOST_USER_SET_VRING_NUM.
    pub fn set_vring_num(&mut self, queue: usize, size: u16) -> Result<()> {
        self.vhost("SET_VRING_NUM", |frontend| {
            frontend.set_vring_num(queue, size)
        })
    }

    /// VHOST_USER_SET_VRING_BASE.
    pub fn set_vring_base(&mut self, queue: usize, base: u16) -> Result<()> {
        self.vhost("SET_VRING_BASE", |frontend| {
            frontend.set_vring_base(queue, base)
        })
    }

    /// VHOST_USER_SET_VRING_ADDR (addresses in our virtual address space, log address a guest
    /// physical address).
    pub fn set_vring_addr(&mut self, queue: usize, config: &VringConfigData) -> Result<()> {
        self.vhost("SET_VRING_ADDR", |frontend| {
            frontend.set_vring_addr(queue, config)
        })
    }

    /// VHOST_USER_SET_VRING_KICK.
    pub fn set_vring_kick(&mut self, queue: usize, kick: &EventFd) -> Result<()> {
        self.vhost("SET_VRING_KICK", |frontend| {
            frontend.set_vring_kick(queue, kick)
        })
    }

    /// VHOST_USER_SET_VRING_CALL.
    pub fn set_vring_call(&mut self, queue: usize, call: &EventFd) -> Result<()> {
        self.vhost("SET_VRING_CALL", |frontend| {
            frontend.set_vring_call(queue, call)
        })
    }

    /// VHOST_USER_SET_VRING_ENABLE (needs bit 30 acked).
    pub fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<()> {
        self.vhost("SET_VRING_ENABLE", |frontend| {
            frontend.set_vring_enable(queue, enable)
        })
    }

    /// VHOST_USER_GET_VRING_BASE: stops the ring and returns its next avail index.
    pub fn get_vring_base(&mut self, queue: usize) -> Result<u32> {
        self.vhost("GET_VRING_BASE", |frontend| frontend.get_vring_base(queue))
    }
}

enum LogBaseReply {
    Io(io::Error),
    Bad(String),
}

fn read_log_base_reply(mut stream: &UnixStream) -> std::result::Result<(), LogBaseReply> {
    let mut header = [0; 12];
    stream.read_exact(&mut header).map_err(LogBaseReply::Io)?;
    let field = |index: usize| {
        u32::from_le_bytes([
            header[index],
            header[index + 1],
            header[index + 2],
            header[index + 3],
        ])
    };
    let (code, flags, size) = (field(0), field(4), field(8));
    if code != SET_LOG_BASE || flags & HEADER_REPLY == 0 {
        return Err(LogBaseReply::Bad(format!(
            "request {code} flags {flags:#x} instead of a SET_LOG_BASE reply"
        )));
    }
    if size > LOG_BASE_REPLY_MAX_BYTES {
        return Err(LogBaseReply::Bad(format!("{size}-byte body")));
    }
    let mut body = vec![0; size as usize];
    stream.read_exact(&mut body).map_err(LogBaseReply::Io)
}
