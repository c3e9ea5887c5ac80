//! The replica and the secondary's state machine on hand-made messages: round trips, hostile
//! input (every refusal leaves both files byte for byte as they were), crash and reopen.

use std::path::Path;

use super::*;
use crate::delta::{Encoder, Encoding};
use crate::secondary::Secondary;
use crate::state_delta::{StateEncoder, StateEncoding};
use crate::wire::{BatchBuilder, Message, PROTOCOL_VERSION};

const VM: &str = "vm1";
const PAGES: u64 = 64;
const RAM_BYTES: u64 = PAGES * PAGE_BYTES as u64;
const GENERATION: u64 = 5;
const STREAM: u64 = 0x5eed;

type Wire = (Vec<u8>, Vec<u8>);

fn config(directory: &Path) -> ReplicaConfig {
    ReplicaConfig {
        vm: VM.into(),
        ram_bytes: RAM_BYTES,
        ram_path: directory.join("vm1.ram"),
        record_path: directory.join("vm1.committed"),
    }
}

fn open(directory: &Path) -> Replica {
    Replica::open(config(directory)).expect("open replica")
}

/// Both files as they are on disk.
fn files(directory: &Path) -> (Vec<u8>, Option<Vec<u8>>) {
    let config = config(directory);
    (
        fs::read(&config.ram_path).expect("read RAM file"),
        fs::read(&config.record_path).ok(),
    )
}

fn wire(message: &Message, payload: Vec<u8>) -> Wire {
    (message.encode().expect("encode"), payload)
}

fn hello(generation: u64, stream: u64) -> Wire {
    wire(
        &Message::Hello {
            protocol: PROTOCOL_VERSION,
            vm: VM.into(),
            generation,
            stream,
            ram_bytes: RAM_BYTES,
            page_bytes: PAGE_BYTES as u32,
        },
        Vec::new(),
    )
}

/// A page whose bytes depend on `seed` (0: the zero page).
fn page(seed: u64) -> Box<Page> {
    let mut page = Box::new([0u8; PAGE_BYTES]);
    if seed != 0 {
        for (position, byte) in page.iter_mut().enumerate() {
            if position % 64 < 16 {
                *byte = (seed as usize * 31 + position / 64) as u8;
            }
        }
    }
    page
}

/// The primary's side in miniature: a RAM image and its shadow.
struct Primary {
    ram: Vec<u8>,
    shadow: Vec<u8>,
    generation: u64,
    stream: u64,
    /// The last epoch's device state: the next one goes as a delta against it.
    state_base: Option<(u64, Vec<u8>)>,
}

impl Primary {
    fn new() -> Primary {
        Primary {
            ram: vec![0; RAM_BYTES as usize],
            shadow: vec![0; RAM_BYTES as usize],
            generation: GENERATION,
            stream: STREAM,
            state_base: None,
        }
    }

    fn write(&mut self, index: u64, content: &Page) {
        let start = index as usize * PAGE_BYTES;
        self.ram[start..start + PAGE_BYTES].copy_from_slice(content);
    }

    fn page(bytes: &[u8], index: u64) -> &Page {
        let start = index as usize * PAGE_BYTES;
        bytes[start..start + PAGE_BYTES].try_into().expect("page")
    }

    /// The messages of one epoch of `indices` (every page when `full`); the device state
    /// as the sender encodes it (a delta against `state_base` unless `full`).
    fn epoch(&mut self, epoch: u64, full: bool, indices: &[u64], state: &[u8]) -> Vec<Wire> {
        let all: Vec<u64> = (0..PAGES).collect();
        let indices = if full { &all[..] } else { indices };
        let mut state_encoder = StateEncoder::new();
        let base = match (&self.state_base, full) {
            (Some((base_epoch, bytes)), false) => Some((*base_epoch, &bytes[..])),
            _ => None,
        };
        let (state_encoding, state_wire) = state_encoder.encode(state, base);
        let state_wire = state_wire.to_vec();
        self.state_base = (!state.is_empty()).then(|| (epoch, state.to_vec()));
        let mut messages = vec![wire(
            &Message::EpochStart {
                epoch,
                generation: self.generation,
                full,
                pages: indices.len() as u64,
                state_len: state.len() as u64,
                state_encoding,
                state_wire_len: state_wire.len() as u64,
            },
            Vec::new(),
        )];
        let mut encoder = Encoder::new();
        let mut batch = BatchBuilder::new();
        let mut crc = 0;
        for &index in indices {
            let current = *Primary::page(&self.ram, index);
            let base = if full {
                ZERO_PAGE
            } else {
                *Primary::page(&self.shadow, index)
            };
            let encoded = encoder.encode(&current, &base);
            if !batch.has_room(&encoded) {
                let (message, payload) = batch.take(epoch);
                messages.push(wire(&message, payload));
            }
            batch.push(index, &encoded);
            crc = crc32c::crc32c_append(crc, &index.to_le_bytes());
            crc = crc32c::crc32c_append(crc, &current);
            let start = index as usize * PAGE_BYTES;
            self.shadow[start..start + PAGE_BYTES].copy_from_slice(&current);
        }
        if !batch.is_empty() {
            let (message, payload) = batch.take(epoch);
            messages.push(wire(&message, payload));
        }
        if !state_wire.is_empty() {
            messages.push(wire(&Message::DeviceState { epoch, offset: 0 }, state_wire));
        }
        crc = crc32c::crc32c_append(crc, state);
        messages.push(wire(&Message::EpochEnd { epoch, crc32c: crc }, Vec::new()));
        messages
    }
}

/// Feeds messages; returns the replies.
fn feed(secondary: &mut Secondary, messages: &[Wire]) -> Vec<Message> {
    messages
        .iter()
        .filter_map(|(header, payload)| secondary.handle(header, payload))
        .collect()
}

fn welcome_epoch(reply: &[Message]) -> (u64, bool) {
    match reply {
        [Message::Welcome {
            committed_epoch,
            full_copy_complete,
            ..
        }] => (*committed_epoch, *full_copy_complete),
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

/// A secondary with a full copy (epoch 1) and one incremental epoch (2) applied.
fn committed_secondary(directory: &Path, primary: &mut Primary) -> Secondary {
    let mut secondary = Secondary::new(open(directory));
    let reply = feed(&mut secondary, &[hello(primary.generation, primary.stream)]);
    assert_eq!(welcome_epoch(&reply), (0, false));
    for index in 0..PAGES / 2 {
        primary.write(index, &page(index + 1));
    }
    let full = primary.epoch(1, true, &[], b"");
    assert_eq!(feed(&mut secondary, &full), vec![Message::Ack { epoch: 1 }]);
    assert!(!secondary.replica().restorable(), "no device state yet");
    primary.write(3, &page(100));
    primary.write(4, &ZERO_PAGE);
    primary.write(40, &page(101));
    let incremental = primary.epoch(2, false, &[3, 4, 40, 5], b"device state 2");
    assert_eq!(
        feed(&mut secondary, &incremental),
        vec![Message::Ack { epoch: 2 }]
    );
    assert_eq!(secondary.replica().ram(), &primary.ram[..]);
    secondary
}

#[test]
fn full_copy_then_incremental_epochs_apply() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    let secondary = committed_secondary(directory.path(), &mut primary);
    let replica = secondary.replica();
    assert!(replica.restorable());
    assert_eq!(replica.device_state(), Some(&b"device state 2"[..]));
    assert_eq!(
        replica.committed(),
        CommittedState {
            generation: GENERATION,
            stream: STREAM,
            epoch: 2,
            full_copy_complete: true,
        }
    );
    assert_eq!(files(directory.path()).0, primary.ram);
}

#[test]
fn fresh_replica_is_not_restorable() {
    let directory = tempfile::tempdir().expect("tempdir");
    let replica = open(directory.path());
    assert!(matches!(
        Replica::open(config(directory.path())),
        Err(ReplicaError::InUse { .. })
    ));
    assert!(!replica.restorable());
    assert_eq!(replica.device_state(), None);
    assert!(!replica.committed().full_copy_complete);
    assert_eq!(files(directory.path()).0.len() as u64, RAM_BYTES);
}

#[test]
fn reopen_after_commit_keeps_the_committed_state() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    let secondary = committed_secondary(directory.path(), &mut primary);
    let before = secondary.replica().committed();
    drop(secondary);
    let replica = open(directory.path());
    assert_eq!(replica.committed(), before);
    assert!(replica.restorable());
    assert_eq!(replica.device_state(), Some(&b"device state 2"[..]));
    assert_eq!(replica.ram(), &primary.ram[..]);
    // The same stream continues with epoch 3 after the restart.
    let mut secondary = Secondary::new(replica);
    let reply = feed(&mut secondary, &[hello(GENERATION, STREAM)]);
    assert_eq!(welcome_epoch(&reply), (2, true));
    primary.write(7, &page(7777));
    let next = primary.epoch(3, false, &[7], b"state 3");
    assert_eq!(feed(&mut secondary, &next), vec![Message::Ack { epoch: 3 }]);
    assert_eq!(secondary.replica().ram(), &primary.ram[..]);
}

#[test]
fn crash_during_apply_reopens_not_restorable_until_a_full_copy() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    let secondary = committed_secondary(directory.path(), &mut primary);
    let mut applying = secondary.replica().record.clone();
    drop(secondary);
    // A crash after the "applying 3" mark and part of the copy: what apply leaves behind.
    applying.epoch = 3;
    applying.state = RecordState::Applying;
    applying.full_copy_complete = false;
    applying.device_state.clear();
    let config = config(directory.path());
    write_record(&config.record_path, &applying).expect("write record");
    let mut ram = fs::read(&config.ram_path).expect("read");
    ram[9 * PAGE_BYTES..10 * PAGE_BYTES].fill(0xee);
    fs::write(&config.ram_path, &ram).expect("write");

    let replica = open(directory.path());
    assert!(!replica.restorable());
    assert_eq!(replica.device_state(), None);
    assert!(!replica.committed().full_copy_complete);
    let mut secondary = Secondary::new(replica);
    let reply = feed(&mut secondary, &[hello(GENERATION, STREAM)]);
    assert_eq!(welcome_epoch(&reply), (3, false));
    // An incremental epoch cannot build on it; a full copy (numbered past 3) can.
    let incremental = primary.epoch(4, false, &[1], b"s");
    assert_eq!(
        feed(&mut secondary, &incremental),
        vec![Message::Refused {
            epoch: 4,
            reason: Refusal::NeedFullCopy
        }]
    );
    let full = primary.epoch(4, true, &[], b"state 4");
    assert_eq!(feed(&mut secondary, &full), vec![Message::Ack { epoch: 4 }]);
    assert!(secondary.replica().restorable());
    assert_eq!(secondary.replica().ram(), &primary.ram[..]);
}

#[test]
fn damaged_or_foreign_records_are_refused_at_open() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    drop(committed_secondary(directory.path(), &mut primary));
    let config = config(directory.path());
    let good = fs::read(&config.record_path).expect("read");
    for position in [0, 9, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[position] ^= 0x40;
        fs::write(&config.record_path, &bad).expect("write");
        assert!(matches!(
            Replica::open(config.clone()),
            Err(ReplicaError::BadRecord { .. })
        ));
    }
    fs::write(&config.record_path, &good[..good.len() - 3]).expect("write");
    assert!(Replica::open(config.clone()).is_err());
    fs::write(&config.record_path, &good).expect("write");
    let other = ReplicaConfig {
        vm: "vm2".into(),
        ..config.clone()
    };
    assert!(matches!(
        Replica::open(other),
        Err(ReplicaError::ForeignRecord { .. })
    ));
    let bigger = ReplicaConfig {
        ram_bytes: RAM_BYTES * 2,
        ..config
    };
    assert!(matches!(
        Replica::open(bigger),
        Err(ReplicaError::ForeignRecord { .. })
    ));
}

/// Feeds `messages` to a committed secondary and checks it answers exactly `expected` and
/// that neither file changed.
fn refused_untouched(build: impl FnOnce(&mut Primary) -> Vec<Wire>, expected: Refusal) {
    assert_eq!(refusal_untouched(build), expected);
}

/// Feeds `messages` to a committed secondary, checks it answers one refusal and that
/// neither file changed; returns the refusal.
fn refusal_untouched(build: impl FnOnce(&mut Primary) -> Vec<Wire>) -> Refusal {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    let mut secondary = committed_secondary(directory.path(), &mut primary);
    let before = files(directory.path());
    let state_before = secondary.replica().committed();
    let messages = build(&mut primary);
    let replies: Vec<Message> = feed(&mut secondary, &messages)
        .into_iter()
        .filter(|reply| !matches!(reply, Message::Welcome { .. }))
        .collect();
    assert_eq!(replies.len(), 1, "{replies:?}");
    let reason = match &replies[0] {
        Message::Refused { reason, .. } => reason.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(
        files(directory.path()) == before,
        "a refused epoch changed the files"
    );
    assert_eq!(secondary.replica().committed(), state_before);
    assert!(secondary.replica().restorable());
    reason
}

fn change(primary: &mut Primary) {
    primary.write(10, &page(55));
    primary.write(11, &page(56));
}

#[test]
fn bad_checksum_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10, 11], b"state");
            let end = messages.len() - 1;
            messages[end] = wire(
                &Message::EpochEnd {
                    epoch: 3,
                    crc32c: 12345,
                },
                Vec::new(),
            );
            messages
        },
        Refusal::Checksum,
    );
}

#[test]
fn diverged_shadow_is_caught_by_the_checksum() {
    refused_untouched(
        |primary| {
            // The primary believes page 10 holds something the replica does not have.
            let start = 10 * PAGE_BYTES;
            primary.shadow[start..start + PAGE_BYTES].fill(0x77);
            change(primary);
            primary.epoch(3, false, &[10, 11], b"state")
        },
        Refusal::Checksum,
    );
}

#[test]
fn lower_generation_is_refused() {
    refused_untouched(
        |primary| {
            primary.generation = GENERATION - 1;
            change(primary);
            let mut messages = vec![hello(GENERATION - 1, STREAM)];
            messages.extend(primary.epoch(3, true, &[], b"old primary"));
            messages
        },
        Refusal::StaleGeneration { ours: GENERATION },
    );
}

#[test]
fn wrong_epoch_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            primary.epoch(4, false, &[10], b"state")
        },
        Refusal::OutOfOrder { expected: 3 },
    );
}

#[test]
fn repeated_full_epoch_number_is_refused() {
    refused_untouched(
        |primary| primary.epoch(2, true, &[], b"state"),
        Refusal::OutOfOrder { expected: 3 },
    );
}

#[test]
fn another_stream_needs_a_full_copy() {
    refused_untouched(
        |primary| {
            primary.stream = STREAM + 1;
            let mut messages = vec![hello(GENERATION, STREAM + 1)];
            change(primary);
            messages.extend(primary.epoch(3, false, &[10], b"state"));
            messages
        },
        Refusal::NeedFullCopy,
    );
}

#[test]
fn incomplete_epoch_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10, 11], b"state");
            // Drop the page batch: EpochEnd arrives with no pages.
            messages.remove(1);
            messages
        },
        Refusal::Incomplete("0 pages of 2 announced".into()),
    );
}

#[test]
fn missing_device_state_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10], b"state");
            messages.remove(2);
            messages
        },
        Refusal::Incomplete("0 bytes of device state of 5 announced".into()),
    );
}

#[test]
fn truncated_batch_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10, 11], b"state");
            let payload = &mut messages[1].1;
            payload.truncate(payload.len() - 1);
            messages
        },
        Refusal::Malformed("batch entry 1 is truncated".into()),
    );
}

#[test]
fn page_beyond_the_ram_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10], b"state");
            messages[1].1[..8].copy_from_slice(&PAGES.to_le_bytes());
            messages
        },
        Refusal::Malformed(format!("page {PAGES} is beyond the RAM's {PAGES} pages")),
    );
}

#[test]
fn page_twice_in_an_epoch_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10, 11], b"state");
            // Both entries name page 10.
            let payload = &mut messages[1].1;
            let first_length = u16::from_le_bytes([payload[9], payload[10]]) as usize;
            let second = ENTRY + first_length;
            payload[second..second + 8].copy_from_slice(&10u64.to_le_bytes());
            messages
        },
        Refusal::Malformed("page 10 twice in one epoch".into()),
    );
}

const ENTRY: usize = crate::wire::ENTRY_HEADER_BYTES;

#[test]
fn corrupt_lz4_page_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10], b"state");
            let payload = &mut messages[1].1;
            // A block of literals only: decodes to fewer than 4096 bytes.
            payload.truncate(ENTRY);
            payload[8] = Encoding::XorLz4.as_byte();
            payload[9..11].copy_from_slice(&3u16.to_le_bytes());
            payload.extend_from_slice(&[0x20, 1, 2]);
            messages
        },
        Refusal::Malformed("LZ4 block decodes to 2 bytes instead of a page".into()),
    );
}

#[test]
fn oversized_device_state_is_refused() {
    refused_untouched(
        |primary| {
            vec![wire(
                &Message::EpochStart {
                    epoch: 3,
                    generation: primary.generation,
                    full: false,
                    pages: 0,
                    state_len: MAX_DEVICE_STATE_BYTES + 1,
                    state_encoding: StateEncoding::Raw,
                    state_wire_len: MAX_DEVICE_STATE_BYTES + 1,
                },
                Vec::new(),
            )]
        },
        Refusal::Incomplete(format!(
            "device state of {} bytes exceeds {MAX_DEVICE_STATE_BYTES}",
            MAX_DEVICE_STATE_BYTES + 1
        )),
    );
}

#[test]
fn device_state_beyond_its_announced_length_is_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10], b"state");
            messages[2].1.push(b'!');
            messages
        },
        Refusal::Incomplete("device state beyond the 5 bytes announced".into()),
    );
}

#[test]
fn more_pages_than_announced_are_refused() {
    refused_untouched(
        |primary| {
            change(primary);
            let mut messages = primary.epoch(3, false, &[10, 11], b"state");
            messages[0] = wire(
                &Message::EpochStart {
                    epoch: 3,
                    generation: GENERATION,
                    full: false,
                    pages: 1,
                    state_len: 5,
                    state_encoding: StateEncoding::Raw,
                    state_wire_len: 5,
                },
                Vec::new(),
            );
            messages
        },
        Refusal::Incomplete("more than the 1 pages announced".into()),
    );
}

#[test]
fn garbage_and_misplaced_messages_are_refused() {
    refused_untouched(
        |_| vec![(vec![0xff, 0xff, 0xff], Vec::new())],
        Refusal::Malformed("header does not decode".into()),
    );
    refused_untouched(
        |_| vec![wire(&Message::Ack { epoch: 1 }, Vec::new())],
        Refusal::Malformed("a secondary's message sent to the secondary".into()),
    );
    refused_untouched(
        |_| {
            vec![wire(
                &Message::PageBatch {
                    epoch: 3,
                    entries: 0,
                },
                Vec::new(),
            )]
        },
        Refusal::Malformed("message of epoch 3 without its EpochStart".into()),
    );
}

#[test]
fn epochs_before_hello_are_refused() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut secondary = Secondary::new(open(directory.path()));
    let mut primary = Primary::new();
    let replies = feed(&mut secondary, &primary.epoch(1, true, &[], b""));
    assert_eq!(
        replies,
        vec![Message::Refused {
            epoch: 1,
            reason: Refusal::Malformed("no Hello".into())
        }]
    );
    assert!(!secondary.replica().restorable());
}

#[test]
fn hello_for_another_vm_is_refused() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut secondary = Secondary::new(open(directory.path()));
    let hello = wire(
        &Message::Hello {
            protocol: PROTOCOL_VERSION,
            vm: VM.into(),
            generation: 1,
            stream: 1,
            ram_bytes: RAM_BYTES + PAGE_BYTES as u64,
            page_bytes: PAGE_BYTES as u32,
        },
        Vec::new(),
    );
    assert!(matches!(
        feed(&mut secondary, &[hello]).as_slice(),
        [Message::Refused {
            reason: Refusal::Mismatch { .. },
            ..
        }]
    ));
}

/// Records the hook calls; refuses `before_apply` for the epochs in `not_sealed`.
struct RecordingHooks {
    calls: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    not_sealed: Vec<u64>,
}

impl crate::secondary::EpochHooks for RecordingHooks {
    fn before_apply(&mut self, epoch: u64) -> Result<(), String> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("before {epoch}"));
        if self.not_sealed.contains(&epoch) {
            return Err(format!("disk has not sealed epoch {epoch}"));
        }
        Ok(())
    }

    fn committed(&mut self, epoch: u64, _replica: &Replica) {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("committed {epoch}"));
    }
}

#[test]
fn hooks_gate_the_apply_and_hear_the_commit() {
    let directory = tempfile::tempdir().expect("tempdir");
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let hooks = RecordingHooks {
        calls: std::sync::Arc::clone(&calls),
        not_sealed: vec![2],
    };
    let mut secondary = Secondary::with_hooks(open(directory.path()), Box::new(hooks));
    let mut primary = Primary::new();
    feed(&mut secondary, &[hello(GENERATION, STREAM)]);
    primary.write(1, &page(1));
    let full = primary.epoch(1, true, &[], b"state 1");
    assert_eq!(feed(&mut secondary, &full), vec![Message::Ack { epoch: 1 }]);
    let before = files(directory.path());
    // A bad checksum never reaches the hook.
    let mut bad = primary.epoch(2, false, &[1], b"x");
    let end = bad.len() - 1;
    bad[end] = wire(
        &Message::EpochEnd {
            epoch: 2,
            crc32c: 1,
        },
        Vec::new(),
    );
    assert!(matches!(
        feed(&mut secondary, &bad).as_slice(),
        [Message::Refused {
            reason: Refusal::Checksum,
            ..
        }]
    ));
    // The disk has not sealed epoch 2: refused, nothing changed.
    assert_eq!(
        feed(&mut secondary, &primary.epoch(2, false, &[1], b"x")),
        vec![Message::Refused {
            epoch: 2,
            reason: Refusal::NotReady("disk has not sealed epoch 2".into())
        }]
    );
    assert!(files(directory.path()) == before);
    assert_eq!(secondary.replica().committed().epoch, 1);
    assert_eq!(
        *calls.lock().expect("lock"),
        vec!["before 1", "committed 1", "before 2"]
    );
}

#[test]
fn a_full_copy_without_a_device_state_has_no_disk_epoch_to_wait_for() {
    let directory = tempfile::tempdir().expect("tempdir");
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let hooks = RecordingHooks {
        calls: std::sync::Arc::clone(&calls),
        not_sealed: vec![1],
    };
    let mut secondary = Secondary::with_hooks(open(directory.path()), Box::new(hooks));
    let mut primary = Primary::new();
    feed(&mut secondary, &[hello(GENERATION, STREAM)]);
    primary.write(1, &page(1));
    let full = primary.epoch(1, true, &[], b"");
    assert_eq!(feed(&mut secondary, &full), vec![Message::Ack { epoch: 1 }]);
    assert!(!secondary.replica().restorable());
    assert!(calls.lock().expect("lock").is_empty());
}

#[test]
fn a_missing_ram_file_makes_the_record_not_restorable() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    drop(committed_secondary(directory.path(), &mut primary));
    fs::remove_file(config(directory.path()).ram_path).expect("remove RAM file");
    let replica = open(directory.path());
    assert!(!replica.restorable());
    assert_eq!(replica.device_state(), None);
    assert_eq!(replica.committed().epoch, 2);
    assert_eq!(replica.committed().generation, GENERATION);
    drop(replica);
    // Durably so: the record now says so, whatever the RAM file holds.
    let replica = open(directory.path());
    assert!(!replica.restorable());
    assert!(!replica.committed().full_copy_complete);
}

mod device_state;

/// A restore takes the device state and leaves a record that claims nothing: the restored
/// VM runs on the RAM file, so neither this replica nor one opened later on the same files
/// may call that memory a checkpoint (a failover before the next full copy would restore
/// it). The Welcome of a later session asks for a full copy.
#[test]
fn a_replica_handed_to_a_restore_is_never_restorable_again() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    let mut secondary = committed_secondary(directory.path(), &mut primary);
    let state = secondary.take_for_restore().expect("record written");
    assert_eq!(state.as_deref(), Some(&b"device state 2"[..]));
    assert!(!secondary.replica().restorable());
    assert_eq!(
        secondary.take_for_restore().expect("no record change"),
        None
    );
    drop(secondary);

    let mut secondary = Secondary::new(open(directory.path()));
    assert!(!secondary.replica().restorable(), "reopened as restorable");
    let reply = feed(&mut secondary, &[hello(primary.generation, primary.stream)]);
    assert!(!welcome_epoch(&reply).1, "a Welcome claims a complete copy");
}
