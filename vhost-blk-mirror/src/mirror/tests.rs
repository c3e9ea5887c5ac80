//! The mirror protocol between a real [`Primary`] and a real [`Secondary`] in one process,
//! joined by an in-memory transport that can drop or count messages: the honest-state rules
//! of issue 10 (a copy that failed is never UpToDate, nothing is cleared before both copies
//! made it durable) checked without a network or a VM.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::epochs::{EpochOptions, DEFAULT_MEMORY_BYTES};
use super::journal::MIN_JOURNAL_BYTES;
use super::primary::{Connector, Mode, Primary, ResyncOptions};
use super::protocol::{Message, Payload, Received, Transport};
use super::secondary::Secondary;
use super::{Mirror, MirrorOptions, Role, RoleChanges};
use crate::image::{Image, WriteSource};
use crate::metadata::{DataState, Metadata};
use crate::request::Status;
use crate::ticket::{Outcome, Waker};

const DISK_BYTES: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(20);

type Filter = Box<dyn Fn(&Message) -> bool + Send>;
type Mutation = Box<dyn Fn(&mut Message) + Send>;

/// Both directions of the in-memory link.
#[derive(Default)]
struct Board {
    inner: Mutex<Queues>,
    arrived: Condvar,
}

#[derive(Default)]
struct Queues {
    to_secondary: VecDeque<(Message, Vec<u8>)>,
    to_primary: VecDeque<(Message, Vec<u8>)>,
    /// Messages to the secondary this returns true for are held back (in order) until
    /// the filter is removed, like a link that delays but never loses them.
    hold_to_secondary: Option<Filter>,
    held: VecDeque<(Message, Vec<u8>)>,
    /// Changes messages to the secondary on their way (a fault the secondary must catch).
    mutate_to_secondary: Option<Mutation>,
    /// Every message the secondary received, in order.
    delivered: Vec<Message>,
    /// The primary's next receive reports that the secondary's process restarted.
    restarted: bool,
}

impl Board {
    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_mutation(&self, mutation: Option<Mutation>) {
        self.queues().mutate_to_secondary = mutation;
    }

    fn set_filter(&self, filter: Option<Filter>) {
        let mut queues = self.queues();
        if filter.is_none() {
            let held = std::mem::take(&mut queues.held);
            for (message, payload) in held {
                queues.delivered.push(message.clone());
                queues.to_secondary.push_back((message, payload));
            }
            self.arrived.notify_all();
        }
        queues.hold_to_secondary = filter;
    }

    fn delivered(&self) -> Vec<Message> {
        self.queues().delivered.clone()
    }

    /// The secondary's process restarted: the primary hears so, as from the link.
    fn signal_restart(&self) {
        self.queues().restarted = true;
        self.arrived.notify_all();
    }
}

/// One end of the link.
struct End {
    board: Arc<Board>,
    primary_side: bool,
}

impl Transport for End {
    fn send(&self, message: &Message, payload: Vec<u8>) -> std::io::Result<()> {
        let mut queues = self.board.queues();
        if self.primary_side {
            let mut message = message.clone();
            if let Some(mutate) = &queues.mutate_to_secondary {
                mutate(&mut message);
            }
            let message = &message;
            let held = queues
                .hold_to_secondary
                .as_ref()
                .is_some_and(|filter| filter(message));
            if held {
                queues.held.push_back((message.clone(), payload));
            } else {
                queues.delivered.push(message.clone());
                queues.to_secondary.push_back((message.clone(), payload));
            }
        } else {
            queues.to_primary.push_back((message.clone(), payload));
        }
        self.board.arrived.notify_all();
        Ok(())
    }

    /// The secondary answers flushes from its flusher thread, as on a real link.
    fn session_replier(&self) -> Option<super::protocol::Replier> {
        if self.primary_side {
            return None;
        }
        let end = End {
            board: Arc::clone(&self.board),
            primary_side: false,
        };
        Some(Box::new(move |message: &Message| {
            end.send(message, Vec::new())
        }))
    }

    fn recv(&self, timeout: Duration) -> std::io::Result<Option<Received>> {
        let deadline = Instant::now() + timeout;
        let mut queues = self.board.queues();
        loop {
            if self.primary_side && std::mem::take(&mut queues.restarted) {
                return Ok(Some(Received::PeerRestarted));
            }
            let next = if self.primary_side {
                queues.to_primary.pop_front()
            } else {
                queues.to_secondary.pop_front()
            };
            if let Some((message, payload)) = next {
                return Ok(Some(Received::Message(
                    message,
                    Payload::unchecked(payload),
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            queues = match self.board.arrived.wait_timeout(queues, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn peer_reachable(&self) -> bool {
        true
    }

    fn links(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn close(&self) {}
}

struct Pair {
    _dir: tempfile::TempDir,
    board: Arc<Board>,
    primary: Arc<Primary>,
    secondary: Arc<Secondary>,
    secondary_meta: PathBuf,
    secondary_image: PathBuf,
    boot: PathBuf,
    epoch_options: EpochOptions,
    waker: Arc<Waker>,
}

fn image(path: &Path, read_only: bool, size_bytes: u64) -> Arc<Image> {
    if !path.exists() {
        std::fs::File::create(path)
            .and_then(|file| file.set_len(size_bytes))
            .expect("create image");
    }
    Arc::new(Image::open(path, read_only).expect("open image"))
}

fn boot_id_file(dir: &Path) -> PathBuf {
    let path = dir.join("boot_id");
    std::fs::write(&path, "0f4e3c7a-1b2c-4d5e-8f90-a1b2c3d4e5f6\n").expect("boot id");
    path
}

/// A primary and a secondary on fresh images; the secondary's image is opened read-only
/// (every write to it fails) when `secondary_fails`.
fn pair(secondary_fails: bool, filter: Option<Filter>) -> Pair {
    pair_with(false, secondary_fails, filter)
}

/// As [`pair`], with the primary's image read-only too when `primary_fails`.
fn pair_with(primary_fails: bool, secondary_fails: bool, filter: Option<Filter>) -> Pair {
    build_pair(primary_fails, secondary_fails, filter, DEFAULT_MEMORY_BYTES)
}

/// A pair whose secondary keeps at most `memory_bytes` of buffered epochs in memory (its
/// journal is the smallest allowed).
fn build_pair(
    primary_fails: bool,
    secondary_fails: bool,
    filter: Option<Filter>,
    memory_bytes: u64,
) -> Pair {
    let fails = (primary_fails, secondary_fails);
    build_pair_sized(fails, filter, memory_bytes, DISK_BYTES)
}

/// As [`build_pair`] with disks of `disk_bytes`; `fails`: (primary's, secondary's).
fn build_pair_sized(
    (primary_fails, secondary_fails): (bool, bool),
    filter: Option<Filter>,
    memory_bytes: u64,
    disk_bytes: u64,
) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let epoch_options = EpochOptions {
        journal_path: dir.path().join("secondary.journal"),
        journal_bytes: MIN_JOURNAL_BYTES,
        memory_bytes,
    };
    let secondary_image = dir.path().join("secondary.img");
    let boot = boot_id_file(dir.path());
    let board = Arc::new(Board::default());
    board.set_filter(filter);
    let secondary_meta = dir.path().join("secondary.meta");
    let metadata = Metadata::open_or_create(&secondary_meta, disk_bytes, DataState::Inconsistent)
        .expect("secondary metadata");
    let end = Arc::new(End {
        board: board.clone(),
        primary_side: false,
    });
    let secondary = Secondary::start(
        image(&secondary_image, secondary_fails, disk_bytes),
        Arc::new(metadata),
        end,
        &boot,
        epoch_options.clone(),
    )
    .expect("start secondary");
    let metadata = Metadata::open_or_create(
        &dir.path().join("primary.meta"),
        disk_bytes,
        DataState::UpToDate,
    )
    .expect("primary metadata");
    let connector_board = board.clone();
    let connector: Connector = Box::new(move || {
        Ok(Arc::new(End {
            board: connector_board.clone(),
            primary_side: true,
        }) as Arc<dyn Transport>)
    });
    let primary = Primary::start(
        image(&dir.path().join("primary.img"), primary_fails, disk_bytes),
        Arc::new(metadata),
        connector,
        ResyncOptions::default(),
        &boot,
    )
    .expect("start primary");
    Pair {
        _dir: dir,
        board,
        primary,
        secondary,
        secondary_meta,
        secondary_image,
        boot,
        epoch_options,
        waker: Arc::new(Waker::new().expect("eventfd")),
    }
}

fn wait_until(what: &str, done: impl FnMut() -> bool) {
    daemon_util::test_support::poll_until(TIMEOUT, what, done);
}

impl Pair {
    fn wait_in_sync(&self) {
        wait_until("the pair in sync", || {
            let status = self.primary.status();
            status.disk_state == control_protocol::disk::PrimaryDiskState::UpToDate
                && status.in_flight_requests == 0
        });
        assert_eq!(
            self.secondary.status().disk_state,
            control_protocol::disk::SecondaryDiskState::UpToDate
        );
    }

    fn write(&self, offset: u64, byte: u8) -> Outcome {
        self.primary
            .write(offset, vec![byte; 4096], &self.waker)
            .expect("write")
    }
}

#[test]
fn a_secondary_whose_disk_fails_is_never_up_to_date_and_the_primary_holds() {
    // The secondary's disk refuses every write: the first protection's resync fails.
    let pair = pair(true, None);
    wait_until("the primary to hold for the failed copy", || {
        let status = pair.primary.status();
        status.mode == Mode::Holding && status.peer_disk_failed.is_some()
    });
    let secondary = pair.secondary.status();
    assert_eq!(
        secondary.disk_state,
        control_protocol::disk::SecondaryDiskState::Failed
    );
    assert!(secondary.disk_failed.is_some(), "{secondary:?}");
    assert!(
        !pair
            .board
            .delivered()
            .iter()
            .any(|message| matches!(message, Message::ResyncDone { .. })),
        "a resync whose blocks failed must never be declared done"
    );
    // Durably: a restarted daemon would read Inconsistent from the metadata.
    let metadata = Metadata::open_or_create(&pair.secondary_meta, DISK_BYTES, DataState::UpToDate)
        .expect("reopen");
    assert_eq!(metadata.header().data_state, DataState::Inconsistent);
    assert!(
        pair.secondary.promote(None).is_err(),
        "a failed copy promoted"
    );

    // A guest write is held, not completed, until the coordinator moves on without it (it
    // may wait behind the held resync blocks of its range, as a queue worker would).
    let (sender, receiver) = std::sync::mpsc::channel();
    let primary = pair.primary.clone();
    let waker = pair.waker.clone();
    std::thread::spawn(move || {
        let _ = sender.send(primary.write(8192, vec![0x5a; 4096], &waker));
    });
    let early = receiver.recv_timeout(Duration::from_millis(100));
    if let Ok(outcome) = &early {
        let status = outcome.as_ref().map(Outcome::status).expect("write");
        assert_eq!(status, None, "completed while the copy is failed");
    }
    let generation = pair.primary.generation() + 1;
    pair.primary
        .continue_degraded(Some(generation))
        .expect("continue degraded");
    let outcome = match early {
        Ok(outcome) => outcome,
        Err(_) => receiver.recv_timeout(TIMEOUT).expect("the write returns"),
    }
    .expect("write");
    wait_until("the held write", || outcome.status().is_some());
    assert_eq!(outcome.status(), Some(Status::Ok));
    // The secondary still says its disk failed when the primary asks again: degraded.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(pair.primary.mode(), Mode::Degraded);
    assert!(pair.primary.status().out_of_sync_bytes > 0);
}

/// Write data as a queue worker hands it over: guest memory, which the guest may change at
/// any moment, so every read of it may give other bytes.
struct GuestMemoryLike;

impl WriteSource for GuestMemoryLike {
    fn len(&self) -> usize {
        4096
    }

    fn write_to(&self, _image: &Image, _offset: u64) -> std::io::Result<()> {
        panic!("a primary wrote its image straight from guest memory")
    }

    fn into_bytes(self) -> Vec<u8> {
        vec![0x77; 4096]
    }
}

/// A primary takes a write's bytes out of guest memory once and writes, checksums and sends
/// that one buffer, never the guest's memory itself: the two copies cannot differ, whatever
/// the guest does to its buffer meanwhile.
#[test]
fn a_primary_writes_and_sends_one_copy_of_the_guest_data() {
    let pair = pair(false, None);
    pair.wait_in_sync();
    let directory = pair._dir.path();
    let primary_image = directory.join("primary.img");
    let metadata = Metadata::open_or_create(
        &directory.join("mirror.meta"),
        DISK_BYTES,
        DataState::UpToDate,
    )
    .expect("metadata");
    let primary = pair.primary.clone();
    let mirror = Mirror::replicated(
        Image::open(&primary_image, false).expect("image"),
        metadata,
        MirrorOptions::default(),
        move |_, _| Ok(Role::Primary(primary)),
        RoleChanges::default(),
    )
    .expect("mirror");
    let outcome = mirror
        .write(8192, GuestMemoryLike, &pair.waker)
        .expect("write");
    wait_until("the mirrored write", || outcome.status().is_some());
    assert_eq!(outcome.status(), Some(Status::Ok));
    pair.wait_in_sync();
    for path in [&primary_image, &pair.secondary_image] {
        let bytes = std::fs::read(path).expect("image");
        assert_eq!(bytes[8192..12288], [0x77; 4096], "{}", path.display());
    }
}

#[test]
fn activity_is_cleared_only_after_the_secondary_flushed() {
    // Flushes to the secondary are held back: the primary's active extents must stay, since
    // the secondary's copy of those writes may be only in its page cache.
    let no_flush: Filter = Box::new(|message| matches!(message, Message::Flush { .. }));
    let pair = pair(false, Some(no_flush));
    pair.wait_in_sync();
    let write = pair.write(4096, 7);
    wait_until("the write", || write.status().is_some());
    assert_eq!(pair.primary.status().active_extents, 1);
    // Longer than the clearing interval (1 s): still active.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        pair.primary.status().active_extents,
        1,
        "cleared without a flush on the secondary"
    );
    // The flush arrives: the extent is cleared after that round trip.
    pair.board.set_filter(None);
    wait_until("the activity cleared", || {
        pair.primary.status().active_extents == 0
    });
    assert!(pair
        .board
        .delivered()
        .iter()
        .any(|message| matches!(message, Message::Flush { .. })));
}

#[test]
fn zero_length_requests_complete_at_once() {
    let pair = pair(false, None);
    pair.wait_in_sync();
    let outcome = pair
        .primary
        .write(0, Vec::new(), &pair.waker)
        .expect("empty write");
    assert_eq!(
        outcome.status(),
        Some(Status::Ok),
        "an empty write must not wait"
    );
    let outcome = pair
        .primary
        .zero(0, 0, true, &pair.waker)
        .expect("empty discard");
    assert_eq!(outcome.status(), Some(Status::Ok));
}

#[test]
fn with_both_copies_failed_no_write_is_acknowledged() {
    // The primary's image refuses writes: its first write fails locally (RemoteOnly), so
    // the write lives on the peer's copy alone.
    let pair = pair_with(true, false, None);
    pair.wait_in_sync();
    let first = pair.write(0, 1);
    wait_until("the write on the peer alone", || first.status().is_some());
    assert_eq!(first.status(), Some(Status::Ok));
    assert_eq!(
        pair.primary.status().disk_state,
        control_protocol::disk::PrimaryDiskState::RemoteOnly
    );
    // Then the peer's copy fails a write too (one it cannot place, as a failing disk
    // cannot). Going on alone would acknowledge data that no usable copy holds.
    pair.board
        .set_mutation(Some(Box::new(|message: &mut Message| {
            if let Message::Write { offset, .. } = message {
                *offset = DISK_BYTES;
            }
        })));
    let second = pair.write(8192, 2);
    wait_until("the peer's failure", || {
        pair.primary.status().peer_disk_failed.is_some()
    });
    let refused = pair
        .primary
        .continue_degraded(Some(pair.primary.generation() + 1));
    assert!(refused.is_err(), "{refused:?}");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        second.status(),
        None,
        "a write on no usable copy was acknowledged"
    );
}

#[test]
fn with_a_failed_copy_an_incomplete_peer_is_never_read_from() {
    let pair = pair_with(true, false, None);
    pair.wait_in_sync();
    let write = pair.write(0, 1);
    wait_until("the write on the peer alone", || write.status().is_some());
    assert_eq!(
        pair.primary.status().disk_state,
        control_protocol::disk::PrimaryDiskState::RemoteOnly
    );
    // The peer comes back (say after a power loss) with a copy that misses writes.
    pair.primary.receive_for_test(
        Message::Welcome {
            generation: pair.primary.generation(),
            data_state: DataState::UpToDate,
            lost_unflushed: true,
            suspect_listed: true,
            disk_failed: false,
        },
        postcard::to_allocvec(&Vec::<(u64, u64)>::new()).expect("encode"),
    );
    assert_eq!(pair.primary.mode(), Mode::Holding);
    let mut buf = vec![0u8; 4096];
    assert!(
        pair.primary.read(0, &mut buf).is_err(),
        "read from a copy that misses acknowledged writes"
    );
    // A complete peer (UpToDate at our generation, nothing lost) serves again.
    pair.primary.receive_for_test(
        Message::Welcome {
            generation: pair.primary.generation(),
            data_state: DataState::UpToDate,
            lost_unflushed: false,
            suspect_listed: true,
            disk_failed: false,
        },
        postcard::to_allocvec(&Vec::<(u64, u64)>::new()).expect("encode"),
    );
    pair.primary
        .read(0, &mut buf)
        .expect("read from the complete peer");
    assert!(buf.iter().all(|&byte| byte == 1));
}

mod level3;
mod snapshot;

/// A busy guest slows the resync, never the other way round: with the resync's blocks held
/// on the link (never answered), the resync stops at its window, and guest writes elsewhere
/// on the disk still complete one after another; while they are in flight the resync adds
/// nothing.
#[test]
fn guest_writes_complete_while_the_resync_fills_its_window() {
    const DISK: u64 = 64 << 20;
    let resync_blocks: Filter = Box::new(|message| matches!(message, Message::ResyncBlock { .. }));
    let pair = build_pair_sized(
        (false, false),
        Some(resync_blocks),
        DEFAULT_MEMORY_BYTES,
        DISK,
    );
    let held_bytes = |pair: &Pair| -> usize {
        let queues = pair.board.queues();
        queues.held.iter().map(|(_, payload)| payload.len()).sum()
    };
    wait_until("the resync's window filled", || {
        held_bytes(&pair) >= 4 * super::primary::MAX_BLOCK_BYTES
    });
    for index in 0..32u64 {
        // The last MiB of the disk: far from the blocks in flight.
        let outcome = pair.write(DISK - (1 << 20) + index * 4096, index as u8);
        wait_until("a guest write completed during the resync", || {
            outcome.status().is_some()
        });
        assert_eq!(outcome.status(), Some(Status::Ok));
    }
    assert_eq!(
        held_bytes(&pair),
        4 * super::primary::MAX_BLOCK_BYTES,
        "the resync keeps its window (4 MiB with no rate measured yet), no more"
    );
    // Released, the resync finishes and both copies end equal.
    pair.board.set_filter(None);
    pair.wait_in_sync();
}
