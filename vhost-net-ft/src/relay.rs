//! A vhost-user message relay between QEMU and `vhost_user_backend`, to make QEMU 7.2's
//! vhost-user-net start-up acceptable to vhost 0.18.
//!
//! QEMU's virtio-net sends `VHOST_USER_SET_VRING_ENABLE` as soon as the backend has offered
//! `VHOST_USER_F_PROTOCOL_FEATURES` and protocol features were exchanged, before any
//! `VHOST_USER_SET_FEATURES` (seen with strace: GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
//! GET_QUEUE_NUM, SET_OWNER, GET_FEATURES, SET_VRING_CALL/ERR…, SET_VRING_ENABLE). vhost 0.18
//! refuses SET_VRING_ENABLE until SET_FEATURES acked PROTOCOL_FEATURES, and the refusal ends
//! the connection ("inactive feature: 1073741824"); QEMU then falls back to its userspace
//! virtio-net, which has no backend, and the guest has no network. (vhost-user-blk is not
//! affected: QEMU enables its rings only in `vhost_dev_start`, after SET_FEATURES.)
//!
//! The relay passes every message through unchanged, file descriptors included, with one
//! addition: before the first SET_VRING_ENABLE that precedes SET_FEATURES, it sends the
//! library a `SET_FEATURES` acking only `VHOST_USER_F_PROTOCOL_FEATURES` (no reply asked).
//! Nothing else changes: that bit is what QEMU acks anyway, the rings stay disabled until
//! QEMU enables them, and QEMU's own SET_FEATURES replaces the value before the rings start.
//! Without this, only a single queue without protocol features would work with QEMU.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};

use log::debug;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of a vhost-user message header: request, flags, size (little-endian u32 each).
const HEADER_LEN: usize = 12;
/// Largest message body we relay (vhost 0.18 refuses more than 4 KiB anyway).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most file descriptors one message may carry (vhost's MAX_ATTACHED_FD_ENTRIES).
const MAX_FDS: usize = 32;
/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_RESET_OWNER`.
const RESET_OWNER: u32 = 4;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_RESET_DEVICE`.
const RESET_DEVICE: u32 = 34;
/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 0x1;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// One vhost-user message with the file descriptors that came with it.
#[derive(Debug)]
struct Message {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn set_features(features: u64) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&SET_FEATURES.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        header[8..12].copy_from_slice(&8u32.to_le_bytes());
        Message {
            header,
            body: features.to_le_bytes().to_vec(),
            fds: Vec::new(),
        }
    }
}

/// The two relay threads of one connection.
#[derive(Debug)]
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` (QEMU) and `backend` (the library's end) until either side
    /// closes; then closes both.
    pub fn spawn(frontend: UnixStream, backend: UnixStream) -> io::Result<Relay> {
        let to_backend = (frontend.try_clone()?, backend.try_clone()?);
        let to_frontend = (backend, frontend);
        let forward = thread::Builder::new()
            .name("relay-in".into())
            .spawn(move || run(&to_backend.0, &to_backend.1, true))?;
        let back = thread::Builder::new()
            .name("relay-out".into())
            .spawn(move || run(&to_frontend.0, &to_frontend.1, false))?;
        Ok(Relay {
            threads: vec![forward, back],
        })
    }

    /// Waits for both threads (they end when either side has closed).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Copies messages from `from` to `to` until one side fails, then shuts both down.
fn run(from: &UnixStream, to: &UnixStream, from_frontend: bool) {
    let mut fixer = EarlyEnableFix::default();
    let result = (|| -> io::Result<()> {
        while let Some(message) = read_message(from)? {
            if from_frontend {
                if let Some(extra) = fixer.before(&message) {
                    write_message(to, &extra)?;
                }
            }
            write_message(to, &message)?;
        }
        Ok(())
    })();
    if let Err(error) = result {
        debug!("vhost-user relay: {error}");
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Decides when the library needs the placeholder SET_FEATURES.
#[derive(Debug, Default)]
struct EarlyEnableFix {
    features_acked: bool,
}

impl EarlyEnableFix {
    /// The message to send before `message`, if any.
    fn before(&mut self, message: &Message) -> Option<Message> {
        match message.request() {
            SET_FEATURES => {
                self.features_acked = true;
                None
            }
            RESET_OWNER | RESET_DEVICE => {
                self.features_acked = false;
                None
            }
            SET_VRING_ENABLE if !self.features_acked => {
                self.features_acked = true;
                debug!("SET_VRING_ENABLE before SET_FEATURES: acking PROTOCOL_FEATURES first");
                Some(Message::set_features(PROTOCOL_FEATURES))
            }
            _ => None,
        }
    }
}

/// Reads one message; `None` at a clean end of stream.
fn read_message(stream: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let (received, fds) = receive_with_fds(stream, &mut header)?;
    if received == 0 {
        return Ok(None);
    }
    let mut reader = stream;
    reader.read_exact(&mut header[received..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_BODY_BYTES {
        return Err(io::Error::other(format!(
            "message body of {size} bytes is too long"
        )));
    }
    let mut body = vec![0u8; size];
    reader.read_exact(&mut body)?;
    Ok(Some(Message { header, body, fds }))
}

/// Receives up to `buffer.len()` bytes and the file descriptors sent with them.
fn receive_with_fds(stream: &UnixStream, buffer: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iovecs = [libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    }];
    // SAFETY: the only iovec points to `buffer`, which is valid for writes of its length
    // and mutably borrowed for the call; `raw` has room for MAX_FDS descriptors.
    let (received, count) = unsafe { stream.recv_with_fds(&mut iovecs, &mut raw) }
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    let fds = raw
        .iter()
        .take(count)
        // SAFETY: recvmsg(2) installed these `count` descriptors in our table just now; nothing
        // else owns them, so each is wrapped (and later closed) exactly once.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((received, fds))
}

/// Writes one message, its file descriptors attached to its first byte.
fn write_message(stream: &UnixStream, message: &Message) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + message.body.len());
    bytes.extend_from_slice(&message.header);
    bytes.extend_from_slice(&message.body);
    let fds: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = stream
        .send_with_fds(&[&bytes[..]], &fds)
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    let mut writer = stream;
    writer.write_all(bytes.get(sent..).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Seek;

    fn message(request: u32, body: &[u8]) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message {
            header,
            body: body.to_vec(),
            fds: Vec::new(),
        }
    }

    #[test]
    fn early_enable_gets_a_placeholder_set_features_once() {
        let mut fix = EarlyEnableFix::default();
        assert!(fix.before(&message(1, &[])).is_none());
        let extra = fix
            .before(&message(SET_VRING_ENABLE, &[0; 8]))
            .expect("placeholder");
        assert_eq!(extra.request(), SET_FEATURES);
        assert_eq!(extra.body, PROTOCOL_FEATURES.to_le_bytes());
        assert_eq!(extra.header[4..8], [1, 0, 0, 0], "no reply asked");
        assert!(fix.before(&message(SET_VRING_ENABLE, &[0; 8])).is_none());
    }

    #[test]
    fn enable_after_set_features_passes_unchanged() {
        let mut fix = EarlyEnableFix::default();
        assert!(fix.before(&message(SET_FEATURES, &[0; 8])).is_none());
        assert!(fix.before(&message(SET_VRING_ENABLE, &[0; 8])).is_none());
        // A reset starts over.
        assert!(fix.before(&message(RESET_OWNER, &[])).is_none());
        assert!(fix.before(&message(SET_VRING_ENABLE, &[0; 8])).is_some());
    }

    #[test]
    fn messages_and_fds_cross_the_relay() {
        let (qemu, frontend) = UnixStream::pair().expect("pair");
        let (backend, library) = UnixStream::pair().expect("pair");
        let relay = Relay::spawn(frontend, backend).expect("relay");
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(b"shared").expect("write");
        let mut sent = message(13, &[1, 0, 0, 0, 0, 0, 0, 0]);
        sent.fds
            .push(OwnedFd::from(file.try_clone().expect("clone")));
        write_message(&qemu, &message(SET_VRING_ENABLE, &[0; 8])).expect("send");
        write_message(&qemu, &sent).expect("send");
        let first = read_message(&library).expect("read").expect("message");
        assert_eq!(first.request(), SET_FEATURES, "placeholder first");
        let second = read_message(&library).expect("read").expect("message");
        assert_eq!(second.request(), SET_VRING_ENABLE);
        let third = read_message(&library).expect("read").expect("message");
        assert_eq!(third.request(), 13);
        assert_eq!(third.body, sent.body);
        assert_eq!(third.fds.len(), 1);
        let mut received = File::from(third.fds.into_iter().next().expect("fd"));
        received.rewind().expect("rewind");
        let mut text = String::new();
        received.read_to_string(&mut text).expect("read fd");
        assert_eq!(text, "shared");
        // Replies flow back.
        write_message(&library, &message(1, &[7; 8])).expect("reply");
        let reply = read_message(&qemu).expect("read").expect("reply");
        assert_eq!(reply.body, vec![7; 8]);
        // Closing one side ends both.
        drop(qemu);
        relay.join();
        assert!(read_message(&library).expect("eof").is_none());
    }

    #[test]
    fn oversized_body_ends_the_relay() {
        let (qemu, frontend) = UnixStream::pair().expect("pair");
        let (backend, library) = UnixStream::pair().expect("pair");
        let relay = Relay::spawn(frontend, backend).expect("relay");
        let mut header = message(5, &[]).header;
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        (&qemu).write_all(&header).expect("send");
        relay.join();
        assert!(read_message(&library).expect("eof").is_none());
    }
}
