//! The checkpoint stream end to end in one process: a real `replication-link` pair on
//! 127.0.0.1, a [`Sender`] on a primary RAM file and a [`Secondary`] on a replica, checked
//! byte for byte.

use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use replication_link::{LinkConfig, LinkListener, ListenerEvent, Psk, Session};

use crate::delta::tests::random_bytes;
use crate::delta::{Page, PAGE_BYTES};
use crate::mapped_file::MappedFile;
use crate::replica::{Replica, ReplicaConfig};
use crate::secondary::Secondary;
use crate::sender::{EpochSent, Sender, SenderConfig, SenderError};
use crate::state_delta::StateEncoding;
use crate::wire::service_name;

const VM: &str = "vm-stream";
/// 4 MiB: a full copy needs several batches.
const PAGES: u64 = 1024;
const RAM_BYTES: u64 = PAGES * PAGE_BYTES as u64;
const LONG: Duration = Duration::from_secs(20);

fn link_config(local_id: &str) -> LinkConfig {
    let _ = env_logger::builder().is_test(true).try_init();
    let psk = Psk::from_bytes(b"checkpoint stream test key, 32 b").expect("psk");
    let mut config = LinkConfig::new(psk, local_id);
    config.heartbeat_interval_ms = 20;
    config.link_timeout_ms = 500;
    config.reconnect_min_ms = 5;
    config.reconnect_max_ms = 50;
    config
}

fn replica_config(directory: &Path) -> ReplicaConfig {
    ReplicaConfig {
        vm: VM.into(),
        ram_bytes: RAM_BYTES,
        ram_path: directory.join("replica.ram"),
        record_path: directory.join("replica.committed"),
    }
}

/// The secondary host: a listener and a thread serving its sessions until stopped.
struct SecondaryHost {
    addresses: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Secondary, LinkListener)>,
}

impl SecondaryHost {
    fn start(listener: LinkListener, replica: Replica) -> SecondaryHost {
        let addresses = listener.local_addrs().to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut secondary = Secondary::new(replica);
            while !thread_stop.load(Ordering::Relaxed) {
                let session = match listener.next_event(Duration::from_millis(50)) {
                    Some(ListenerEvent::NewSession(session)) => session,
                    Some(ListenerEvent::PeerRestarted { session, .. }) => session,
                    None => continue,
                };
                secondary.serve(&session, &thread_stop).expect("serve");
            }
            (secondary, listener)
        });
        SecondaryHost {
            addresses,
            stop,
            thread,
        }
    }

    fn bind(directory: &Path) -> SecondaryHost {
        let mut config = link_config("host-b");
        config.allowed_services = Some(vec![service_name(VM)]);
        let listener =
            LinkListener::bind(vec![SocketAddr::from(([127, 0, 0, 1], 0))], config).expect("bind");
        let replica = Replica::open(replica_config(directory)).expect("open replica");
        SecondaryHost::start(listener, replica)
    }

    fn stop(self) -> (Secondary, LinkListener) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("secondary thread")
    }

    fn connect(&self) -> Session {
        Session::connect(
            self.addresses.clone(),
            &service_name(VM),
            link_config("host-a"),
        )
        .expect("connect")
    }
}

/// The primary's guest RAM: a shared file, as QEMU's `memory-backend-file`.
fn primary_ram(directory: &Path) -> MappedFile {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(directory.join("primary.ram"))
        .expect("create RAM file");
    file.set_len(RAM_BYTES).expect("size");
    let mut ram = MappedFile::map(file, RAM_BYTES as usize).expect("map");
    // A guest's mix: text, zeros, random bytes, repeated patterns.
    for (index, page) in ram.as_mut_slice().chunks_exact_mut(PAGE_BYTES).enumerate() {
        match index % 4 {
            0 => page.copy_from_slice(&text_page(index as u64)),
            1 => {}
            2 => random_bytes(index as u64, page),
            _ => page.fill(index as u8),
        }
    }
    ram
}

fn text_page(seed: u64) -> Page {
    let mut page = [0u8; PAGE_BYTES];
    let line = format!("line {seed}: the quick brown fox jumps over the lazy dog\n");
    for (byte, source) in page.iter_mut().zip(line.bytes().cycle()) {
        *byte = source;
    }
    page
}

/// Guest activity of one epoch: changes pages, returns the dirty ones (sorted, unique).
fn run_guest(ram: &mut MappedFile, epoch: u64) -> Vec<u64> {
    let mut dirty: Vec<u64> = (0..40).map(|n| (epoch * 97 + n * 13) % PAGES).collect();
    dirty.sort_unstable();
    dirty.dedup();
    let bytes = ram.as_mut_slice();
    for (n, index) in dirty.iter().enumerate() {
        let start = *index as usize * PAGE_BYTES;
        let page = &mut bytes[start..start + PAGE_BYTES];
        match n % 5 {
            0 => {
                page[(epoch as usize * 8) % PAGE_BYTES..][..8].copy_from_slice(&epoch.to_le_bytes())
            }
            1 => page.fill(0),
            2 => random_bytes(epoch * 1000 + n as u64, page),
            3 => page.copy_from_slice(&text_page(epoch)),
            // Dirty but rewritten with the same bytes.
            _ => {}
        }
    }
    dirty
}

/// Stages the dirty pages (copies, as the engine's staging buffer) and sends them.
fn send_epoch(
    sender: &mut Sender,
    session: &Session,
    ram: &MappedFile,
    dirty: &[u64],
    state: &[u8],
) -> EpochSent {
    let staged: Vec<(u64, Box<Page>)> = dirty
        .iter()
        .map(|index| {
            let start = *index as usize * PAGE_BYTES;
            let page: Page = ram.as_slice()[start..start + PAGE_BYTES]
                .try_into()
                .expect("page");
            (*index, Box::new(page))
        })
        .collect();
    let pages: Vec<(u64, &Page)> = staged
        .iter()
        .map(|(index, page)| (*index, &**page))
        .collect();
    sender
        .send_incremental(session, &pages, state)
        .expect("send epoch")
}

/// A secondary host, the primary's RAM, and a sender of `generation` connected to the host
/// (handshake done).
fn connected(directory: &Path, generation: u64) -> (SecondaryHost, MappedFile, Session, Sender) {
    let host = SecondaryHost::bind(directory);
    let ram = primary_ram(directory);
    let session = host.connect();
    let mut sender = new_sender(generation);
    sender.handshake(&session, LONG).expect("handshake");
    (host, ram, session, sender)
}

fn ack(sender: &mut Sender, session: &Session) -> u64 {
    sender
        .wait_ack(session, LONG)
        .expect("ack")
        .expect("an ack within 20 s")
}

fn new_sender(generation: u64) -> Sender {
    Sender::new(SenderConfig {
        vm: VM.into(),
        generation,
        ram_bytes: RAM_BYTES,
    })
    .expect("sender")
}

fn assert_files_equal(directory: &Path) {
    let primary = fs::read(directory.join("primary.ram")).expect("read primary");
    let replica = fs::read(directory.join("replica.ram")).expect("read replica");
    assert!(
        primary == replica,
        "replica file differs from the primary's RAM file"
    );
}

#[test]
fn full_copy_and_epochs_over_the_link_match_byte_for_byte() {
    let directory = tempfile::tempdir().expect("tempdir");
    let host = SecondaryHost::bind(directory.path());
    let mut ram = primary_ram(directory.path());
    let session = host.connect();
    let mut sender = new_sender(7);
    let state = sender.handshake(&session, LONG).expect("handshake");
    assert!(!state.full_copy_complete);
    assert!(sender.needs_full_copy());
    let full = sender
        .send_full(&session, ram.as_slice(), b"")
        .expect("full copy");
    assert_eq!((full.epoch, full.pages), (1, PAGES));
    assert!(full.page_bytes_sent < RAM_BYTES, "{full:?}");
    assert_eq!(ack(&mut sender, &session), 1);
    assert_files_equal(directory.path());

    // Pipelined: two epochs in flight before their acks.
    for round in 0..3u64 {
        let first = 2 + 2 * round;
        let dirty = run_guest(&mut ram, first);
        let state = format!("device state {first}").into_bytes();
        assert_eq!(
            send_epoch(&mut sender, &session, &ram, &dirty, &state).epoch,
            first
        );
        let dirty = run_guest(&mut ram, first + 1);
        let state = vec![first as u8; 2_500_000];
        assert_eq!(
            send_epoch(&mut sender, &session, &ram, &dirty, &state).epoch,
            first + 1
        );
        assert_eq!(sender.in_flight(), 2);
        assert_eq!(ack(&mut sender, &session), first);
        assert_eq!(ack(&mut sender, &session), first + 1);
        assert_files_equal(directory.path());
    }
    assert_eq!(sender.acked_epoch(), 7);
    assert_eq!(sender.shadow(), ram.as_slice());
    drop(session);
    let (secondary, _listener) = host.stop();
    let replica = secondary.replica();
    assert!(replica.restorable());
    assert_eq!(replica.committed().epoch, 7);
    assert_eq!(replica.device_state(), Some(&vec![6u8; 2_500_000][..]));
}

#[test]
fn restarts_of_either_side_continue_or_start_over() {
    let directory = tempfile::tempdir().expect("tempdir");
    let (host, mut ram, session, mut sender) = connected(directory.path(), 3);
    sender
        .send_full(&session, ram.as_slice(), b"s1")
        .expect("full copy");
    assert_eq!(ack(&mut sender, &session), 1);
    let dirty = run_guest(&mut ram, 2);
    send_epoch(&mut sender, &session, &ram, &dirty, b"s2");
    assert_eq!(ack(&mut sender, &session), 2);
    drop(session);

    // The secondary's engine restarts: the replica reopens from its files, and the same
    // sender continues incrementally.
    let (secondary, listener) = host.stop();
    drop(secondary);
    let replica = Replica::open(replica_config(directory.path())).expect("reopen");
    assert!(replica.restorable());
    let host = SecondaryHost::start(listener, replica);
    let session = host.connect();
    let state = sender.handshake(&session, LONG).expect("handshake");
    assert_eq!((state.committed_epoch, state.full_copy_complete), (2, true));
    assert!(!sender.needs_full_copy());
    let dirty = run_guest(&mut ram, 3);
    assert_eq!(
        send_epoch(&mut sender, &session, &ram, &dirty, b"s3").epoch,
        3
    );
    assert_eq!(ack(&mut sender, &session), 3);
    assert_files_equal(directory.path());
    drop(session);

    // The primary's engine restarts (same generation): no shadow, so a full copy, numbered
    // after the replica's epoch.
    let mut restarted = new_sender(3);
    let session = host.connect();
    restarted.handshake(&session, LONG).expect("handshake");
    assert!(restarted.needs_full_copy());
    let dirty = run_guest(&mut ram, 4);
    assert!(!dirty.is_empty());
    let full = restarted
        .send_full(&session, ram.as_slice(), b"s4")
        .expect("full copy");
    assert_eq!(full.epoch, 4);
    assert_eq!(ack(&mut restarted, &session), 4);
    assert_files_equal(directory.path());
    drop(session);

    // A primary of an older generation is fenced and changes nothing.
    let before = fs::read(directory.path().join("replica.ram")).expect("read");
    let mut stale = new_sender(2);
    let session = host.connect();
    assert!(matches!(
        stale.handshake(&session, LONG),
        Err(SenderError::Fenced { ours: 2, theirs: 3 })
    ));
    drop(session);
    let (secondary, _listener) = host.stop();
    assert_eq!(secondary.replica().committed().epoch, 4);
    assert!(secondary.replica().ram() == &before[..]);
}

#[test]
fn an_epoch_cut_off_by_a_lost_primary_leaves_the_replica_as_it_was() {
    let directory = tempfile::tempdir().expect("tempdir");
    let (host, mut ram, session, mut sender) = connected(directory.path(), 9);
    sender
        .send_full(&session, ram.as_slice(), b"state 1")
        .expect("full copy");
    assert_eq!(ack(&mut sender, &session), 1);
    let committed = fs::read(directory.path().join("replica.ram")).expect("read");

    // Half an epoch: its start and one batch, then the primary is gone.
    let dirty = run_guest(&mut ram, 2);
    let start = crate::wire::Message::EpochStart {
        epoch: 2,
        generation: 9,
        full: false,
        pages: dirty.len() as u64,
        state_len: 0,
        state_encoding: crate::state_delta::StateEncoding::Raw,
        state_wire_len: 0,
    };
    session
        .send(&start.encode().expect("encode"), Vec::new())
        .expect("send");
    let mut batch = crate::wire::BatchBuilder::new();
    let mut encoder = crate::delta::Encoder::new();
    let first: Page = ram.as_slice()[..PAGE_BYTES].try_into().expect("page");
    batch.push(0, &encoder.encode(&first, &crate::delta::ZERO_PAGE));
    let (message, payload) = batch.take(2);
    session
        .send(&message.encode().expect("encode"), payload)
        .expect("send");
    assert!(
        session.flush(LONG).expect("flush"),
        "the secondary took both"
    );
    drop(session);

    // The next primary (a new engine, so a new stream) finds epoch 1 and nothing of 2.
    let mut next = new_sender(9);
    let session = host.connect();
    let state = next.handshake(&session, LONG).expect("handshake");
    assert_eq!((state.committed_epoch, state.full_copy_complete), (1, true));
    let (secondary, _listener) = host.stop();
    assert!(secondary.replica().ram() == &committed[..]);
    assert_eq!(secondary.replica().device_state(), Some(&b"state 1"[..]));
    drop(session);
}

/// A device state of `length` bytes: mostly zeros, a few fields that `version` changes.
fn device_state(version: u64, length: usize) -> Vec<u8> {
    let mut state = vec![0u8; length];
    random_bytes(5, &mut state[..32_768]);
    for field in (40_000..length.saturating_sub(8)).step_by(50_000) {
        state[field..field + 8].copy_from_slice(&(version ^ field as u64).to_le_bytes());
    }
    state
}

#[test]
fn device_states_go_as_deltas_and_whole_after_a_handshake() {
    let directory = tempfile::tempdir().expect("tempdir");
    let (host, mut ram, session, mut sender) = connected(directory.path(), 4);
    let full = sender
        .send_full(&session, ram.as_slice(), &device_state(1, 616_519))
        .expect("full copy");
    assert_eq!(full.device_state_encoding, Some(StateEncoding::Lz4));
    assert_eq!(ack(&mut sender, &session), 1);
    // The next states go as deltas against the previous one, each a few hundred bytes;
    // pipelined, the base is the epoch sent before (which the replica commits first).
    let mut sent = Vec::new();
    for epoch in 2..=4u64 {
        // The state grows and shrinks: the tail beyond the base goes as it is.
        let length = 616_519 + (epoch as usize % 2) * 3000;
        let dirty = run_guest(&mut ram, epoch);
        let state = device_state(epoch, length);
        sent.push(send_epoch(&mut sender, &session, &ram, &dirty, &state));
    }
    for epoch in 2..=4u64 {
        assert_eq!(ack(&mut sender, &session), epoch);
    }
    for (sent, base_epoch) in sent.iter().zip(1u64..) {
        assert_eq!(
            sent.device_state_encoding,
            Some(StateEncoding::XorLz4 { base_epoch })
        );
        assert!(sent.device_state_wire_bytes < 4_000, "{sent:?}");
    }
    assert_files_equal(directory.path());
    drop(session);

    // A new session with the same sender: the replica follows (no full copy), but the
    // first state goes whole; the next builds on it again.
    let session = host.connect();
    sender.handshake(&session, LONG).expect("handshake");
    assert!(!sender.needs_full_copy());
    let dirty = run_guest(&mut ram, 5);
    let whole = send_epoch(
        &mut sender,
        &session,
        &ram,
        &dirty,
        &device_state(5, 600_000),
    );
    assert_eq!(whole.device_state_encoding, Some(StateEncoding::Lz4));
    assert_eq!(ack(&mut sender, &session), 5);
    let dirty = run_guest(&mut ram, 6);
    let last = device_state(6, 600_000);
    let delta = send_epoch(&mut sender, &session, &ram, &dirty, &last);
    assert_eq!(
        delta.device_state_encoding,
        Some(StateEncoding::XorLz4 { base_epoch: 5 })
    );
    assert!(delta.device_state_wire_bytes < whole.device_state_wire_bytes / 4);
    assert_eq!(ack(&mut sender, &session), 6);
    drop(session);
    let (secondary, _listener) = host.stop();
    assert_eq!(secondary.replica().device_state(), Some(&last[..]));
    assert_eq!(secondary.replica().ram(), ram.as_slice());
}
