//! Level 3 output commit with the real engines (issue 11): a frame the guest sent in an
//! epoch that has not committed never reaches the LAN, and after a failover nothing the
//! LAN client saw is contradicted. The guest sends numbered UDP datagrams all the time
//! (`tests/guest/udpseq.c`: "SEQ n T", T its clock when it made datagram n, so a datagram
//! sent again after a restore differs); a socket in the client namespace records them.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_tests::blk::status_json;
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::guest_tools;
use ftvm_tests::level3::{counters_in_ram, guest_script, Level3Options, Level3Pair};
use ftvm_tests::net::{spawn_in_namespace, PacketCapture};
use ftvm_tests::process::signal;
use ftvm_tests::wait::poll_for;

/// The client namespace's LAN address (`ci/hosts.sh`) and the port the datagrams go to.
const CLIENT_IP: &str = "10.77.0.4";
const UDP_PORT: u16 = 9000;
/// Between two datagrams: about 100 a second under TCG, several per 50 ms epoch.
const PAUSE_US: u32 = 10_000;
const PATIENCE: Duration = Duration::from_secs(120);

/// A datagram the client received: when, its number and its bytes.
#[derive(Debug, Clone)]
struct Datagram {
    at: Instant,
    number: u64,
    payload: String,
}

/// Records every datagram that reaches the client's UDP port, until dropped.
struct UdpCapture {
    seen: Arc<Mutex<Vec<Datagram>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl UdpCapture {
    fn start(namespace: &str) -> UdpCapture {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            spawn_in_namespace(namespace, move || {
                let socket = match UdpSocket::bind(("0.0.0.0", UDP_PORT)) {
                    Ok(socket) => socket,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error.to_string()));
                        return;
                    }
                };
                let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
                // A commit releases every held datagram at once (hundreds after a hung
                // secondary returns): the default receive buffer overflowed on a loaded
                // machine and the kernel dropped two of them here, at the client.
                if let Err(error) = force_receive_buffer(&socket, 16 << 20) {
                    let _ = ready_tx.send(Err(format!("SO_RCVBUFFORCE: {error}")));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                let mut buffer = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(len) = socket.recv(&mut buffer) else {
                        continue;
                    };
                    let at = Instant::now();
                    let payload = String::from_utf8_lossy(&buffer[..len]).into_owned();
                    let number = payload
                        .strip_prefix("SEQ ")
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|number| number.parse().ok());
                    if let Some(number) = number {
                        seen.lock().expect("capture").push(Datagram {
                            at,
                            number,
                            payload,
                        });
                    }
                }
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("cannot bind UDP port {UDP_PORT} in {namespace}: {error}"),
            Err(_) => panic!("cannot join namespace {namespace}"),
        }
        UdpCapture {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn datagrams(&self) -> Vec<Datagram> {
        self.seen.lock().expect("capture").clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("capture").len()
    }

    /// Waits until `more` datagrams beyond the first `count` arrived.
    fn wait_beyond(&self, count: usize, more: usize, what: &str) {
        poll_for(
            PATIENCE,
            &format!("{more} more datagrams at the client ({what})"),
            || Some(self.count()),
            |&seen| seen >= count + more,
        );
    }
}

/// Sets a socket's receive buffer to `bytes`, above the system's limit (root).
fn force_receive_buffer(socket: &UdpSocket, bytes: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we own, with a pointer to a c_int and its size.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for UdpCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A random 64-bit marker for the guest tool's state page.
fn random_magic() -> u64 {
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("urandom"),
        &mut bytes,
    )
    .expect("random bytes");
    u64::from_le_bytes(bytes) | 1
}

/// A guest that sends datagrams to the client from boot on.
fn sender_guest(name: &str, magic: u64) -> GuestConfig {
    let script = guest_script(&format!(
        "/udpseq {CLIENT_IP} {UDP_PORT} {magic:x} {PAUSE_US}\n"
    ));
    let mut config = GuestConfig::new(name, &script);
    config.cpus = 1;
    config.files.push(guest_tools::tool("udpseq"));
    config
}

/// `n` of the guest's `UDP-SENT n` lines: the last one printed.
fn last_sent(console: &[String]) -> Option<u64> {
    console
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("UDP-SENT ")?.trim().parse().ok())
}

/// In arrival order, each number is above the previous one: no datagram twice, none the
/// guest sent again after a restore with other content, none overtaken.
fn assert_increasing(datagrams: &[Datagram]) {
    for pair in datagrams.windows(2) {
        if pair[1].number <= pair[0].number {
            let earlier: Vec<&str> = datagrams
                .iter()
                .filter(|datagram| datagram.number == pair[1].number)
                .map(|datagram| datagram.payload.as_str())
                .collect();
            panic!(
                "datagram {} arrived after {}: the client saw {:?}",
                pair[1].number, pair[0].number, earlier
            );
        }
    }
}

fn held_frames(pair: &Level3Pair) -> u64 {
    let nic = pair.nic_a.as_ref().expect("hostA's NIC daemon");
    status_json(&nic.control).expect("hostA's NIC daemon answers")["output_commit"]["held_frames"]
        .as_u64()
        .expect("held_frames")
}

/// The engine keeps the guest's frames of an epoch until the secondary committed it: the
/// client sees every number at most once and in order, and none that the checkpoint
/// restored on hostB says the guest had not sent yet (so none from an epoch that never
/// committed). The restored guest goes on from there.
#[test]
fn no_frame_of_an_uncommitted_epoch_reaches_the_lan_and_a_failover_contradicts_nothing() {
    let magic = random_magic();
    let config = sender_guest("l3-output-failover", magic);
    let options = Level3Options {
        interval_ms: 50,
        disk_bytes: None,
    };
    let mut pair = Level3Pair::start_unprotected("l3-output-failover", config, options);
    let capture = UdpCapture::start(&pair.hosts().namespace("client"));
    // Everything that crosses hostB's interfaces from the engine's start: the checkpoint
    // stream rides the same encrypted link as disks and NICs (issue 12, item 4).
    let capture_limit = 1 << 30;
    let link_capture = PacketCapture::start(&pair.hosts().namespace("hostB"), capture_limit);
    pair.start_primary_engine();
    pair.wait_committed(3);
    capture.wait_beyond(capture.count(), 100, "through output commit on hostA");
    pair.wait_committed(10);

    // The loss comes while frames of an uncommitted epoch are held (most of the time some
    // are; a commit may still release them before the links go down).
    poll_for(
        PATIENCE,
        "frames held on hostA",
        || Some(held_frames(&pair)),
        |&held| held >= 2,
    );
    pair.kill_host_a();
    let seen_before = capture.datagrams();
    let epoch = pair.freeze_and_promote_on_b();
    // What the checkpoint to be restored says the guest had sent: every datagram the
    // client saw came from a committed epoch, so from one at or before this checkpoint.
    let counters = counters_in_ram(pair.replica_ram(), magic);
    let [sent_at_checkpoint] = counters[..] else {
        panic!(
            "udpseq's state page found {} times in the replica",
            counters.len()
        );
    };
    // udpseq's state page (its first 16 bytes are the marker) crossed the A-links in the
    // first checkpoint, a full copy, where a page is encoded against zeros: unencrypted it
    // would show as it is. The capture kept everything (under its limit) and holds the
    // link's handshake, in clear, so it saw the link from its start.
    let marker: Vec<u8> = [magic, magic.rotate_left(17)]
        .iter()
        .flat_map(|word| word.to_le_bytes())
        .collect();
    let captured = link_capture.captured_bytes();
    eprintln!("captured {captured} bytes on hostB's interfaces");
    assert!(captured < capture_limit, "captured {captured} bytes");
    assert!(
        link_capture.contains(b"checkpoint:"),
        "the checkpoint link's handshake, in clear, is in the capture"
    );
    assert!(
        !link_capture.contains(&marker),
        "a page of the guest's RAM crossed the A-links in clear"
    );
    drop(link_capture);
    let highest_seen = seen_before.iter().map(|datagram| datagram.number).max();
    // hostA's guest went on past the checkpoint; what it sent since was held and is lost.
    let sent_on_a = counters_in_ram(pair.primary_ram(), magic);
    eprintln!(
        "checkpoint {epoch}: the guest had sent {sent_at_checkpoint}; the client saw up to {highest_seen:?}; hostA's guest had sent {sent_on_a:?} when it died"
    );
    assert!(
        highest_seen.is_some_and(|highest| highest <= sent_at_checkpoint),
        "the client saw datagram {highest_seen:?}, which the guest had not sent at checkpoint {epoch} ({sent_at_checkpoint}): a frame of an uncommitted epoch reached the LAN"
    );

    let answer = pair.restore_on_b();
    eprintln!("restored: {answer}");
    capture.wait_beyond(seen_before.len(), 100, "from hostB after the failover");
    let datagrams = capture.datagrams();
    assert_increasing(&datagrams);
    let after: Vec<&Datagram> = datagrams[seen_before.len()..].iter().collect();
    // The restored guest goes on from the checkpoint: its first datagram is the next one
    // (or one it had queued and not yet sent then).
    let first_after = after[0].number;
    assert!(
        first_after <= sent_at_checkpoint + 1,
        "the restored guest's first datagram is {first_after}, the checkpoint had {sent_at_checkpoint} sent"
    );
    let gaps_from: Vec<u64> = datagrams
        .windows(2)
        .filter(|pair| pair[1].number != pair[0].number + 1)
        .map(|pair| pair[0].number + 1)
        .collect();
    eprintln!(
        "{} datagrams before the kill, {} after, first after {first_after}; gaps from: {gaps_from:?}; restored console: {:?}",
        seen_before.len(),
        after.len(),
        pair.guest().console().iter().rev().take(3).collect::<Vec<_>>()
    );
}

/// A hung secondary engine (SIGSTOP, not a crash): the primary counts it lost and goes on
/// running the guest, but holds its output: no datagram reaches the LAN while the guest
/// sends dozens and the NIC's held frames grow. SIGCONT: protected again, and everything
/// held arrives, in order, none lost, none twice.
#[test]
fn a_hung_secondary_holds_the_guests_output_and_its_return_releases_it_in_order() {
    let magic = random_magic();
    let config = sender_guest("l3-output-hung", magic);
    let options = Level3Options {
        interval_ms: 50,
        disk_bytes: None,
    };
    let mut pair = Level3Pair::start_unprotected("l3-output-hung", config, options);
    let capture = UdpCapture::start(&pair.hosts().namespace("client"));
    pair.start_primary_engine();
    pair.wait_committed(3);
    capture.wait_beyond(capture.count(), 50, "through output commit on hostA");
    pair.wait_committed(10);

    let secondary = pair.secondary_pid();
    signal(secondary, libc::SIGSTOP);
    let stopped = Instant::now();
    poll_for(
        PATIENCE,
        "the primary to count the hung secondary lost",
        || Some(pair.primary_status()),
        |status| status["state"] == "peer-lost",
    );
    eprintln!(
        "peer-lost {:?} after SIGSTOP: {}",
        stopped.elapsed(),
        pair.primary_status()
    );
    // At most the epoch in flight at the stop committed: from here on nothing does.
    let arrived = capture.count();
    let highest = capture.datagrams().last().map(|datagram| datagram.number);
    let held_at_loss = held_frames(&pair);
    let sent_at_loss = last_sent(&pair.guest().console()).unwrap_or_default();
    // The guest runs on (its console is not held) and sends 50 more; the NIC holds them.
    poll_for(
        PATIENCE,
        "the guest to send 50 more datagrams, held",
        || Some((last_sent(&pair.guest().console()), held_frames(&pair))),
        |&(sent, held)| {
            sent.is_some_and(|sent| sent >= sent_at_loss + 50) && held >= held_at_loss + 50
        },
    );
    let status = pair.primary_status();
    assert_eq!(
        capture.count(),
        arrived,
        "datagrams reached the LAN while no checkpoint could commit (the last before was {highest:?}): {:?}",
        &capture.datagrams()[arrived..]
    );
    assert_eq!(status["state"], "peer-lost", "{status}");
    let held = held_frames(&pair);
    let sent_while_hung = last_sent(&pair.guest().console()).unwrap_or_default();

    signal(secondary, libc::SIGCONT);
    let continued = Instant::now();
    pair.wait_committed(3);
    let status = pair.primary_status();
    assert_eq!(status["state"], "protected", "{status}");
    eprintln!(
        "protected again {:?} after SIGCONT ({held} frames were held, the guest had sent {sent_while_hung}): {status}",
        continued.elapsed()
    );
    poll_for(
        PATIENCE,
        "the held datagrams at the client",
        || capture.datagrams().last().map(|datagram| datagram.number),
        |&last| last >= sent_while_hung,
    );
    let datagrams = capture.datagrams();
    assert_increasing(&datagrams);
    for pair in datagrams.windows(2) {
        assert_eq!(
            pair[1].number,
            pair[0].number + 1,
            "datagrams {}..{} never arrived",
            pair[0].number + 1,
            pair[1].number
        );
    }
    assert!(
        datagrams[arrived..]
            .iter()
            .all(|datagram| datagram.at >= continued),
        "a held datagram arrived before SIGCONT"
    );
}
