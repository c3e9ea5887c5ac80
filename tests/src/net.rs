//! Network helpers for guest NIC tests: talking to a guest from a test host's namespace.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::guest::GuestConfig;
use crate::wait::{poll_for, Wait};

/// The TCP port of [`echo_guest`]'s echo server.
pub const ECHO_PORT: u16 = 7000;

/// A guest that brings `eth0` up at `ip`/24, prints `NET-UP <its MAC>` on its console, then
/// serves TCP echo (`nc -ll -e cat`) on [`ECHO_PORT`] until it is stopped.
pub fn echo_guest(name: &str, ip: &str) -> GuestConfig {
    let script = format!(
        "ip link set eth0 up\n\
         ip addr add {ip}/24 dev eth0\n\
         echo \"NET-UP $(cat /sys/class/net/eth0/address)\"\n\
         nc -ll -p {ECHO_PORT} -e cat\n"
    );
    let mut guest = GuestConfig::new(name, &script);
    guest.memory_mb = 256;
    guest
}

/// Pause between two rounds of [`Rounds`], so that the TCG guest is not flooded.
const ROUND_PAUSE: Duration = Duration::from_millis(10);

/// Opens a TCP connection from inside network namespace `namespace`, retrying for up to
/// `patience`: a thread joins the namespace and connects; the socket stays in that
/// namespace for its whole life. `None` if it never connected.
pub fn try_connect_in(namespace: &str, address: &str, patience: Duration) -> Option<TcpStream> {
    let path = format!("/run/netns/{namespace}");
    let address = address.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).ok()?;
        // SAFETY: setns on a namespace file we hold open; it affects only this thread,
        // which ends right after connecting.
        let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if joined != 0 {
            return None;
        }
        let target = address.parse().ok()?;
        Wait::up_to(patience)
            .every(Duration::from_millis(100))
            .poll(|| TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok())
    })
    .join()
    .ok()
    .flatten()
}

/// Like [`try_connect_in`] with 30 s of patience; panics if it never connects.
pub fn connect_in(namespace: &str, address: &str) -> TcpStream {
    try_connect_in(namespace, address, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("cannot connect to {address} from {namespace}"))
}

/// Sends `rounds` lines on `stream` and checks each comes back (an echo server); returns
/// the round-trip times.
pub fn echo_rounds(stream: TcpStream, rounds: u32) -> Vec<Duration> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut latencies = Vec::new();
    for round in 0..rounds {
        let filler = "x".repeat(if round % 10 == 0 { 6000 } else { 40 });
        let request = format!("request {round} {filler}\n");
        let started = Instant::now();
        writer.write_all(request.as_bytes()).expect("send request");
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("read reply");
        latencies.push(started.elapsed());
        assert_eq!(reply, request, "round {round}: the echo differs");
    }
    latencies
}

/// Request/response rounds on one TCP connection to the guest's echo server, run by a
/// thread until dropped; the completion time of each round is recorded.
pub struct Rounds {
    completed: Arc<Mutex<Vec<Instant>>>,
    failure: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
}

impl Rounds {
    pub fn start(stream: TcpStream) -> Rounds {
        // The tests' own waits (`wait_for`) decide what is too slow; a read gives up only
        // when no reply came for as long as they wait. (30 s failed a Level 3 test once on
        // a machine loaded far beyond CI's, while the connection was still sound: its
        // guest rewrote 64 MiB without pause, and each checkpoint took seconds.)
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("read timeout");
        let completed = Arc::new(Mutex::new(Vec::new()));
        let failure = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stream = stream.try_clone().expect("clone stream");
            let (completed, failure, stop) = (completed.clone(), failure.clone(), stop.clone());
            std::thread::spawn(move || {
                if let Err(error) = run_rounds(stream, &completed, &stop) {
                    if !stop.load(Ordering::Relaxed) {
                        *failure.lock().expect("failure lock") = Some(error);
                    }
                }
            })
        };
        Rounds {
            completed,
            failure,
            stop,
            stream,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> usize {
        self.completed.lock().expect("rounds lock").len()
    }

    /// Panics if the connection failed.
    pub fn check(&self) {
        if let Some(error) = self.failure.lock().expect("failure lock").as_ref() {
            panic!("the TCP connection to the guest failed: {error}");
        }
    }

    /// Waits until `more` further rounds have completed.
    pub fn wait_for(&self, more: usize, timeout: Duration, what: &str) {
        let target = self.count() + more;
        let what = format!("{more} more rounds ({what})");
        poll_for(
            timeout,
            &what,
            || {
                self.check();
                Some(self.count())
            },
            |&count| count >= target,
        );
        self.check();
    }

    /// The longest time without a completed round, from the last round before `since` to
    /// the newest one.
    pub fn longest_gap_since(&self, since: Instant) -> Duration {
        let completed = self.completed.lock().expect("rounds lock");
        let first = completed
            .iter()
            .rposition(|&at| at < since)
            .unwrap_or_default();
        completed[first..]
            .windows(2)
            .map(|pair| pair[1].duration_since(pair[0]))
            .max()
            .unwrap_or_default()
    }
}

impl Drop for Rounds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_rounds(
    stream: TcpStream,
    completed: &Mutex<Vec<Instant>>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut writer = stream.try_clone().map_err(|error| error.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Every tenth request spans several segments.
        let filler = "x".repeat(if round.is_multiple_of(10) { 6000 } else { 40 });
        let request = format!("request {round} {filler}\n");
        writer
            .write_all(request.as_bytes())
            .map_err(|error| format!("round {round}: send: {error}"))?;
        let mut reply = String::new();
        match reader.read_line(&mut reply) {
            Ok(0) => return Err(format!("round {round}: the guest closed the connection")),
            Ok(_) if reply == request => {}
            Ok(_) => return Err(format!("round {round}: the echo differs")),
            Err(error) => return Err(format!("round {round}: read: {error}")),
        }
        completed.lock().expect("rounds lock").push(Instant::now());
        round += 1;
        std::thread::sleep(ROUND_PAUSE);
    }
    Ok(())
}

/// Runs `work` on a thread that joined network namespace `namespace` (sockets it opens stay
/// in that namespace); `None` if the namespace cannot be joined.
pub fn spawn_in_namespace<T: Send + 'static>(
    namespace: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Option<T>> {
    let path = format!("/run/netns/{namespace}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).ok()?;
        // SAFETY: setns on a namespace file we hold open; it affects only this thread.
        let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        (joined == 0).then(work)
    })
}

/// An ICMP echo request seen by [`EchoCapture`]: when, from whom, its identifier and
/// sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoRequest {
    pub at: Instant,
    pub source: std::net::Ipv4Addr,
    pub id: u16,
    pub sequence: u16,
}

/// Records the ICMP echo requests that reach a namespace (a raw ICMP socket there sees a
/// copy of each), until dropped.
pub struct EchoCapture {
    seen: Arc<Mutex<Vec<EchoRequest>>>,
    _capture: RawCapture,
}

impl EchoCapture {
    /// Starts capturing in `namespace`; panics if the raw socket cannot be opened.
    pub fn start(namespace: &str) -> EchoCapture {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let capture = RawCapture::start(namespace, raw_icmp_socket, 2048, move |packet| {
            if let Some(request) = parse_echo_request(packet) {
                sink.lock().expect("capture").push(request);
            }
        });
        EchoCapture {
            seen,
            _capture: capture,
        }
    }

    /// The echo requests from `source` seen so far, in arrival order.
    pub fn from(&self, source: &str) -> Vec<EchoRequest> {
        let source: std::net::Ipv4Addr = source.parse().expect("an IPv4 address");
        self.seen
            .lock()
            .expect("capture")
            .iter()
            .filter(|request| request.source == source)
            .copied()
            .collect()
    }
}

/// Every frame that crosses any interface of a namespace, both ways, as the wire carries it
/// (a raw packet socket there sees a copy of each), up to a limit, until dropped: what an
/// eavesdropper on the host's links would read.
pub struct PacketCapture {
    bytes: Arc<Mutex<Vec<u8>>>,
    _capture: RawCapture,
}

impl PacketCapture {
    /// Starts capturing in `namespace`, keeping at most `limit_bytes`; panics if the raw
    /// socket cannot be opened.
    pub fn start(namespace: &str, limit_bytes: usize) -> PacketCapture {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        // Large enough for a segmentation-offload frame of a veth (64 KiB).
        let capture = RawCapture::start(namespace, raw_packet_socket, 256 << 10, move |frame| {
            let mut bytes = sink.lock().expect("capture");
            let room = limit_bytes.saturating_sub(bytes.len());
            bytes.extend_from_slice(frame.get(..room.min(frame.len())).unwrap_or_default());
        });
        PacketCapture {
            bytes,
            _capture: capture,
        }
    }

    /// How many bytes were captured so far.
    pub fn captured_bytes(&self) -> usize {
        self.bytes.lock().expect("capture").len()
    }

    /// Whether `needle` appears in what was captured so far.
    pub fn contains(&self, needle: &[u8]) -> bool {
        let bytes = self.bytes.lock().expect("capture");
        !needle.is_empty() && bytes.windows(needle.len()).any(|window| window == needle)
    }
}

/// A thread in a namespace that hands every packet a raw socket there receives to a closure,
/// until dropped.
struct RawCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl RawCapture {
    /// Opens the socket with `open` on a thread in `namespace` (panics if it cannot) and
    /// reads packets of up to `buffer_bytes` into `on_packet`.
    fn start(
        namespace: &str,
        open: fn() -> std::io::Result<std::os::fd::OwnedFd>,
        buffer_bytes: usize,
        mut on_packet: impl FnMut(&[u8]) + Send + 'static,
    ) -> RawCapture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            spawn_in_namespace(namespace, move || {
                let socket = match open() {
                    Ok(socket) => socket,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut packet = vec![0u8; buffer_bytes];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(len) = recv(&socket, &mut packet) else {
                        continue;
                    };
                    if let Some(received) = packet.get(..len) {
                        on_packet(received);
                    }
                }
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("cannot open a raw socket in {namespace}: {error}"),
            Err(_) => panic!("cannot join namespace {namespace} to capture"),
        }
        RawCapture {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RawCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn raw_icmp_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    raw_socket(libc::AF_INET, libc::IPPROTO_ICMP)
}

/// Every frame of every interface, both directions (`ETH_P_ALL`, in network byte order), with
/// a receive buffer of 256 MiB so that a burst (a resync over a veth) is not dropped.
fn raw_packet_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    let socket = raw_socket(libc::AF_PACKET, i32::from((libc::ETH_P_ALL as u16).to_be()))?;
    let size: libc::c_int = 256 << 20;
    set_socket_option(&socket, libc::SO_RCVBUFFORCE, &size)?;
    Ok(socket)
}

/// A raw socket whose reads time out after 100 ms (so that its reader sees a stop flag).
fn raw_socket(domain: i32, protocol: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket() takes no pointers; a valid descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    set_socket_option(&socket, libc::SO_RCVTIMEO, &timeout)?;
    Ok(socket)
}

/// Sets socket-level option `option` to `value` (a C type the option expects).
fn set_socket_option<T>(
    socket: &std::os::fd::OwnedFd,
    option: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: the option value points at a live `T` of the size passed.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn recv(socket: &std::os::fd::OwnedFd, buffer: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: the buffer is valid for writes of its length for the duration of the call.
    let len = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            0,
        )
    };
    usize::try_from(len).map_err(|_| std::io::Error::last_os_error())
}

/// An IPv4 packet carrying an ICMP echo request.
fn parse_echo_request(packet: &[u8]) -> Option<EchoRequest> {
    let header_len = usize::from(packet.first()? & 0x0f) * 4;
    let source = std::net::Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(header_len..)?;
    if *icmp.first()? != 8 {
        return None;
    }
    Some(EchoRequest {
        at: Instant::now(),
        source,
        id: u16::from_be_bytes([*icmp.get(4)?, *icmp.get(5)?]),
        sequence: u16::from_be_bytes([*icmp.get(6)?, *icmp.get(7)?]),
    })
}
