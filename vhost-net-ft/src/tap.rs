//! The TAP device: open or create it with one file per queue pair, bring it up, enslave it to
//! a bridge, set its virtio-net header size and offloads. The crate's only `unsafe` code
//! (ioctls) lives here.
//!
//! The TAP is never made persistent: the kernel deletes a TAP we created when our last file
//! on it closes, so a daemon that exits, crashes or is killed leaves no device behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use log::{debug, info};
use thiserror::Error;

use crate::frame::VNET_HDR_LEN;

/// `SIOCBRADDIF` from `linux/sockios.h` (add a port to a bridge); libc has it for Android only.
const SIOCBRADDIF: libc::Ioctl = 0x89a2;

/// Longest interface name (`IFNAMSIZ` less the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

#[derive(Debug, Error)]
pub enum TapError {
    #[error(
        "{0:?} is not a valid interface name (1-{MAX_NAME_LEN} bytes, no '/', ':' or whitespace)"
    )]
    BadName(String),
    #[error("bridge {0} does not exist")]
    NoBridge(String),
    #[error("{0} is not a bridge")]
    NotABridge(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach queue {queue} of TAP device {name}{hint}")]
    Attach {
        name: String,
        queue: usize,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} on TAP device {name}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot add TAP device {name} to bridge {bridge}")]
    Enslave {
        name: String,
        bridge: String,
        #[source]
        source: io::Error,
    },
}

/// An open TAP device: one non-blocking file per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    bridge: Option<String>,
    queues: Vec<File>,
    /// Whether each queue is attached (multi-queue TAPs only detach queues).
    attached: Vec<AtomicBool>,
    /// The vnet header length the TAP currently expects (10 or 12).
    header_len: AtomicUsize,
    /// The `TUN_F_*` offloads currently set.
    offloads: AtomicU32,
}

impl Tap {
    /// Opens the TAP device `name`, creating it if it does not exist, and brings it up.
    pub fn open(name: &str, queues: usize) -> Result<Tap, TapError> {
        check_name(name)?;
        let existed = Path::new("/sys/class/net").join(name).exists();
        let tap = Tap::attach(name, queues, None)?;
        tap.set_up()?;
        info!(
            "{} TAP device {name} with {queues} queue(s)",
            if existed { "attached to" } else { "created" }
        );
        Ok(tap)
    }

    /// Creates a TAP named `ftvm-<pid>-<n>`, brings it up and makes it a port of `bridge`.
    pub fn create_on_bridge(bridge: &str, queues: usize) -> Result<Tap, TapError> {
        check_bridge(bridge)?;
        static CREATED: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ftvm-{}-{}",
            std::process::id(),
            CREATED.fetch_add(1, Ordering::Relaxed)
        );
        check_name(&name)?;
        let tap = Tap::attach(&name, queues, Some(bridge.to_owned()))?;
        tap.enslave(bridge)?;
        tap.set_up()?;
        info!("created TAP device {name} with {queues} queue(s) on bridge {bridge}");
        Ok(tap)
    }

    fn attach(name: &str, queues: usize, bridge: Option<String>) -> Result<Tap, TapError> {
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut files = Vec::with_capacity(queues);
        for queue in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut request = InterfaceRequest::new(name);
            request.set_flags(flags as libc::c_short);
            // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `request` is a
            // `#[repr(C)]` struct of the same size and layout, alive for the call, and `file`
            // is an open /dev/net/tun descriptor.
            let result = unsafe { ioctl_pointer(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
            result.map_err(|source| TapError::Attach {
                name: name.to_owned(),
                queue,
                hint: attach_hint(&source, queues),
                source,
            })?;
            files.push(file);
        }
        let tap = Tap {
            name: name.to_owned(),
            bridge,
            attached: files.iter().map(|_| AtomicBool::new(true)).collect(),
            queues: files,
            header_len: AtomicUsize::new(0),
            offloads: AtomicU32::new(u32::MAX),
        };
        tap.set_header_len(VNET_HDR_LEN)?;
        tap.set_offloads(0)?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bridge the TAP was created on (`--bridge`).
    pub fn bridge(&self) -> Option<&str> {
        self.bridge.as_deref()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The file of queue pair `index`, registered in that pair's event loop.
    pub fn queue(&self, index: usize) -> Option<&File> {
        self.queues.get(index)
    }

    pub fn header_len(&self) -> usize {
        self.header_len.load(Ordering::Relaxed)
    }

    pub fn offloads(&self) -> u32 {
        self.offloads.load(Ordering::Relaxed)
    }

    /// Sets the virtio-net header length the TAP reads and writes (`TUNSETVNETHDRSZ`).
    pub fn set_header_len(&self, len: usize) -> Result<(), TapError> {
        if self.header_len.load(Ordering::Relaxed) == len {
            return Ok(());
        }
        let mut value = len as libc::c_int;
        let fd = self.first_fd();
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points to
        // `value`, alive for the call; `fd` is an attached TAP queue.
        let result = unsafe { ioctl_pointer(fd, libc::TUNSETVNETHDRSZ, &mut value) };
        result.map_err(|source| self.configure_error("set the vnet header size", source))?;
        self.header_len.store(len, Ordering::Relaxed);
        debug!("{}: vnet header length {len}", self.name);
        Ok(())
    }

    /// Sets the offloads the TAP may hand us (`TUNSETOFFLOAD`, `TUN_F_*`).
    pub fn set_offloads(&self, offloads: u32) -> Result<(), TapError> {
        if self.offloads.load(Ordering::Relaxed) == offloads {
            return Ok(());
        }
        let fd = self.first_fd();
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours;
        // `fd` is an attached TAP queue.
        let result = unsafe { ioctl_value(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(offloads)) };
        result.map_err(|source| self.configure_error("set offloads", source))?;
        self.offloads.store(offloads, Ordering::Relaxed);
        debug!("{}: offloads {offloads:#x}", self.name);
        Ok(())
    }

    /// Attaches or detaches queue `index` of a multi-queue TAP (`TUNSETQUEUE`). The kernel
    /// spreads frames over attached queues only, so a queue pair the guest does not use must
    /// be detached or the frames steered to it are lost. Queue 0 always stays attached.
    pub fn set_attached(&self, index: usize, attached: bool) -> Result<(), TapError> {
        let (Some(file), Some(state)) = (self.queues.get(index), self.attached.get(index)) else {
            return Ok(());
        };
        if index == 0 || self.queues.len() < 2 || state.load(Ordering::Relaxed) == attached {
            return Ok(());
        }
        let mut request = InterfaceRequest::new(&self.name);
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        request.set_flags(flag as libc::c_short);
        // SAFETY: TUNSETQUEUE reads the flags of the `struct ifreq` `request` points to (same
        // size and layout, alive for the call); `file` is a queue of this multi-queue TAP.
        unsafe { ioctl_pointer(file.as_raw_fd(), libc::TUNSETQUEUE, &mut request) }.map_err(
            |source| {
                self.configure_error(
                    if attached {
                        "attach a queue"
                    } else {
                        "detach a queue"
                    },
                    source,
                )
            },
        )?;
        state.store(attached, Ordering::Relaxed);
        debug!(
            "{}: queue {index} {}",
            self.name,
            if attached { "attached" } else { "detached" }
        );
        Ok(())
    }

    pub fn is_attached(&self, index: usize) -> bool {
        self.attached
            .get(index)
            .is_some_and(|state| state.load(Ordering::Relaxed))
    }

    /// Whether the TAP is administratively up (IFF_UP).
    pub fn is_up(&self) -> bool {
        self.read_sys("flags")
            .and_then(|flags| i64::from_str_radix(flags.trim_start_matches("0x"), 16).ok())
            .is_some_and(|flags| flags & i64::from(libc::IFF_UP) != 0)
    }

    /// Whether the TAP has carrier (the kernel gives it carrier while a queue is attached).
    pub fn has_carrier(&self) -> bool {
        self.read_sys("carrier")
            .is_some_and(|carrier| carrier == "1")
    }

    /// The bridge the TAP is a port of now, if any (it may have been moved or removed).
    pub fn master(&self) -> Option<String> {
        let link =
            std::fs::read_link(Path::new("/sys/class/net").join(&self.name).join("master")).ok()?;
        link.file_name()
            .map(|name| name.to_string_lossy().into_owned())
    }

    fn read_sys(&self, attribute: &str) -> Option<String> {
        std::fs::read_to_string(Path::new("/sys/class/net").join(&self.name).join(attribute))
            .ok()
            .map(|value| value.trim().to_owned())
    }

    /// Reads one frame (vnet header first) from queue `index`; `WouldBlock` when none waits.
    pub fn read_frame(&self, index: usize, buffer: &mut [u8]) -> io::Result<usize> {
        let mut file = self.queue(index).ok_or_else(no_queue)?;
        file.read(buffer)
    }

    /// Writes one frame (vnet header first) to queue `index`: one write is one packet.
    pub fn write_frame(&self, index: usize, frame: &[u8]) -> io::Result<()> {
        let mut file = self.queue(index).ok_or_else(no_queue)?;
        let written = file.write(frame)?;
        if written != frame.len() {
            return Err(io::Error::other(format!(
                "short write to the TAP: {written} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }

    fn first_fd(&self) -> RawFd {
        self.queues.first().map_or(-1, AsRawFd::as_raw_fd)
    }

    fn configure_error(&self, what: &'static str, source: io::Error) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source,
        }
    }

    /// Sets IFF_UP, like `ip link set dev NAME up`.
    fn set_up(&self) -> Result<(), TapError> {
        let socket = control_socket().map_err(|source| self.configure_error("bring up", source))?;
        let mut request = InterfaceRequest::new(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the flags of the `struct ifreq` `request` points to (same
        // size and layout, alive for the call); `socket` is an open socket.
        unsafe { ioctl_pointer(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) }
            .map_err(|source| self.configure_error("read the flags", source))?;
        let flags = request.flags() | libc::IFF_UP as libc::c_short;
        request.set_flags(flags);
        // SAFETY: as above; SIOCSIFFLAGS only reads the request.
        unsafe { ioctl_pointer(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut request) }
            .map_err(|source| self.configure_error("bring up", source))
    }

    /// Makes the TAP a port of `bridge`, like `ip link set dev NAME master BRIDGE`.
    fn enslave(&self, bridge: &str) -> Result<(), TapError> {
        let enslave_error = |source| TapError::Enslave {
            name: self.name.clone(),
            bridge: bridge.to_owned(),
            source,
        };
        let socket = control_socket().map_err(enslave_error)?;
        let mut request = InterfaceRequest::new(&self.name);
        // SAFETY: SIOCGIFINDEX fills the index of the `struct ifreq` `request` points to
        // (same size and layout, alive for the call); `socket` is an open socket.
        unsafe { ioctl_pointer(socket.as_raw_fd(), libc::SIOCGIFINDEX, &mut request) }
            .map_err(enslave_error)?;
        let index = request.index();
        let mut request = InterfaceRequest::new(bridge);
        request.set_index(index);
        // SAFETY: SIOCBRADDIF reads the bridge name and port index from the `struct ifreq`
        // `request` points to (same layout, alive for the call).
        unsafe { ioctl_pointer(socket.as_raw_fd(), SIOCBRADDIF, &mut request) }
            .map_err(enslave_error)
    }
}

/// Whether the interface `name` (of this network namespace) is up and operational:
/// `IFF_UP` and `IFF_RUNNING`, which the kernel sets only with carrier and an operational
/// state of up. A cable pulled, a peer veth down or `ip link set NAME down` all clear it.
pub fn interface_running(name: &str) -> io::Result<bool> {
    check_name(name).map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let socket = control_socket()?;
    let mut request = InterfaceRequest::new(name);
    // SAFETY: SIOCGIFFLAGS fills the flags of the `struct ifreq` `request` points to (same
    // size and layout, alive for the call); `socket` is an open socket.
    unsafe { ioctl_pointer(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) }?;
    let flags = request.flags();
    let wanted = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    Ok(flags & wanted == wanted)
}

/// A netlink socket subscribed to the link changes of this network namespace
/// (`RTMGRP_LINK`): it becomes readable whenever an interface changes state, so a watcher
/// can check at once instead of at its next tick. The messages are not parsed; the state is
/// read with [`interface_running`].
#[derive(Debug)]
pub struct LinkEvents {
    socket: OwnedFd,
}

impl LinkEvents {
    pub fn open() -> io::Result<LinkEvents> {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2), is open and owned by nobody else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero `sockaddr_nl` is valid (family set below, pid 0: the kernel
        // picks it).
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        address.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: bind(2) reads `size_of::<sockaddr_nl>()` bytes from `address`, alive for
        // the call; `socket` is an open netlink socket.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::addr_of!(address).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinkEvents { socket })
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Reads and drops what is waiting (the watcher only needs the wake-up).
    pub fn drain(&self) {
        let mut buffer = [0u8; 8192];
        for _ in 0..64 {
            // SAFETY: recv(2) writes at most `buffer.len()` bytes into `buffer`, alive and
            // exclusively borrowed for the call; `socket` is open.
            let read = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if read <= 0 {
                return;
            }
        }
    }
}

/// poll(2) on `fds` for up to `timeout_ms`: the number of ready descriptors, 0 on timeout,
/// negative on error (EINTR included; callers poll again).
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> libc::c_int {
    let count = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: `fds` is a valid, exclusively borrowed array of `count` pollfd structs, which
    // poll(2) reads and whose `revents` it writes, during the call only.
    unsafe { libc::poll(fds.as_mut_ptr(), count, timeout_ms) }
}

fn no_queue() -> io::Error {
    io::Error::other("no such TAP queue")
}

fn attach_hint(error: &io::Error, queues: usize) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EINVAL) if queues > 1 => {
            " (an existing TAP must be multi-queue for --queues > 1)"
        }
        Some(libc::EINVAL) => " (an existing TAP must be single-queue for --queues 1)",
        Some(libc::EPERM) => " (needs CAP_NET_ADMIN, or a TAP owned by this user)",
        Some(libc::EBUSY) => " (another process holds it)",
        _ => "",
    }
}

/// Refuses names the kernel would refuse or mangle.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
    if valid {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_owned()))
    }
}

/// Checks that `bridge` names an existing Linux bridge.
pub fn check_bridge(bridge: &str) -> Result<(), TapError> {
    if check_name(bridge).is_err() {
        return Err(TapError::NoBridge(bridge.to_owned()));
    }
    let device = Path::new("/sys/class/net").join(bridge);
    if !device.exists() {
        return Err(TapError::NoBridge(bridge.to_owned()));
    }
    if !device.join("bridge").is_dir() {
        return Err(TapError::NotABridge(bridge.to_owned()));
    }
    Ok(())
}

/// `struct ifreq`: a 16-byte name, then a 24-byte union of which we use `short flags` and
/// `int ifindex` (both at its start).
#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    union: [u8; 24],
}

const _: () =
    assert!(std::mem::size_of::<InterfaceRequest>() == std::mem::size_of::<libc::ifreq>());

impl InterfaceRequest {
    /// `name` must have passed [`check_name`] (at most 15 bytes: the NUL fits).
    fn new(name: &str) -> InterfaceRequest {
        let mut request = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            union: [0; 24],
        };
        let len = name.len().min(MAX_NAME_LEN);
        request.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        request
    }

    fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.union[0], self.union[1]])
    }

    fn set_flags(&mut self, flags: libc::c_short) {
        self.union[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn index(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.union[0], self.union[1], self.union[2], self.union[3]])
    }

    fn set_index(&mut self, index: libc::c_int) {
        self.union[..4].copy_from_slice(&index.to_ne_bytes());
    }
}

/// A datagram socket to issue interface ioctls on.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2), is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// # Safety
/// `request` must be an ioctl that reads or writes at most `size_of::<T>()` bytes through its
/// pointer argument, with a layout `T` matches. (`*mut`: the kernel may write through it.)
unsafe fn ioctl_pointer<T>(fd: RawFd, request: libc::Ioctl, argument: *mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees that `request` uses `argument` as a `T`, which is valid
    // for reads and writes for the duration of the call.
    let result = unsafe { libc::ioctl(fd, request, argument) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// # Safety
/// `request` must take its argument by value and not dereference it.
unsafe fn ioctl_value(fd: RawFd, request: libc::Ioctl, argument: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the caller guarantees that `request` does not use `argument` as a pointer.
    let result = unsafe { libc::ioctl(fd, request, argument) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["tap0", "ftvm-4194304-99", "a", "vm1.net0"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", "a:1", ".", "..", "tä"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generated_names_fit() {
        // The largest pid Linux hands out (pid_max 2^22) and a two-digit counter.
        assert!(check_name("ftvm-4194304-99").is_ok());
    }

    #[test]
    fn missing_bridge_is_named() {
        let error = check_bridge("no-such-br0").expect_err("no bridge");
        assert_eq!(error.to_string(), "bridge no-such-br0 does not exist");
        assert_eq!(
            check_bridge("lo").expect_err("not a bridge").to_string(),
            "lo is not a bridge"
        );
    }

    #[test]
    fn interface_request_layout() {
        let mut request = InterfaceRequest::new("tap0");
        assert_eq!(&request.name[..5], b"tap0\0");
        request.set_flags(0x1003);
        assert_eq!(request.flags(), 0x1003);
        request.set_index(42);
        assert_eq!(request.index(), 42);
    }
}
