//! Level 3 disk writes between a real primary and a real secondary (`docs/LEVEL3.md`, "Disk
//! writes at Level 3"): the secondary's image holds exactly the committed epochs.

use std::time::Duration;

use super::super::primary::MAX_BLOCK_BYTES;
use super::*;
use crate::metadata::JournalStart;

const BLOCK: usize = 4096;

impl Pair {
    /// A write of `BLOCK` bytes of `byte`, waited for (acknowledged by the secondary).
    fn write_acknowledged(&self, offset: u64, byte: u8) {
        let outcome = self.write(offset, byte);
        wait_until("the write acknowledged", || outcome.status().is_some());
        assert_eq!(outcome.status(), Some(Status::Ok));
    }

    /// What the secondary's image holds at `offset` (one byte stands for the block).
    fn secondary_block(&self, offset: u64) -> Vec<u8> {
        let reader = Image::open(&self.secondary_image, true).expect("open image");
        let mut data = vec![0u8; BLOCK];
        reader.read_at(&mut data, offset).expect("read");
        data
    }

    fn assert_secondary_holds(&self, offset: u64, byte: u8, why: &str) {
        assert_eq!(
            self.secondary_block(offset),
            vec![byte; BLOCK],
            "at {offset}: {why}"
        );
    }

    /// Kills the secondary's receiver and starts a new one on the same image, metadata and
    /// journal; the primary hears of the restart as from the link.
    fn restart_secondary(&mut self) {
        // Returns once the old receiver stopped: it takes nothing meant for the new one.
        self.secondary.stop_for_test();
        let metadata =
            Metadata::open_or_create(&self.secondary_meta, DISK_BYTES, DataState::UpToDate)
                .expect("reopen metadata");
        let end = Arc::new(End {
            board: self.board.clone(),
            primary_side: false,
        });
        self.secondary = Secondary::start(
            image(&self.secondary_image, false, DISK_BYTES),
            Arc::new(metadata),
            end,
            &self.boot,
            self.epoch_options.clone(),
        )
        .expect("restart secondary");
        self.board.signal_restart();
    }

    fn seal(&self, epoch: u64) {
        self.primary.epoch_end(epoch).expect("epoch-end");
        self.secondary
            .wait_sealed(epoch, TIMEOUT)
            .expect("sealed in time");
    }
}

fn level3_pair(memory_bytes: u64) -> Pair {
    let pair = build_pair(false, false, None, memory_bytes);
    pair.wait_in_sync();
    pair
}

#[test]
fn writes_of_an_uncommitted_epoch_stay_out_of_the_image_and_commit_applies_them_in_order() {
    let pair = level3_pair(DEFAULT_MEMORY_BYTES);
    assert!(
        pair.primary.epoch_end(1).is_err(),
        "epoch-end before epoch on"
    );
    pair.primary.epoch_on(1).expect("epoch on");
    assert!(pair.primary.epoch_on(2).is_err(), "epoch on twice");
    // Epoch 1: two writes to the same block (their order decides the result), and another.
    pair.write_acknowledged(0, 0xa1);
    pair.write_acknowledged(0, 0xa2);
    pair.write_acknowledged(4096, 0xa3);
    let flush = pair.primary.flush(&pair.waker).expect("flush");
    wait_until("a FLUSH within the epoch", || flush.status().is_some());
    pair.assert_secondary_holds(0, 0, "acknowledged, but epoch 1 is not committed");
    pair.assert_secondary_holds(4096, 0, "acknowledged, but epoch 1 is not committed");
    assert!(
        pair.primary.epoch_end(2).is_err(),
        "epoch-end of a future epoch"
    );
    pair.seal(1);
    // Epoch 2 runs; it is not sealed, so it cannot be committed.
    pair.write_acknowledged(8192, 0xb1);
    pair.write_acknowledged(0, 0xb2);
    assert!(pair
        .secondary
        .wait_sealed(2, Duration::from_millis(200))
        .is_err());
    assert!(
        pair.secondary.commit(2).is_err(),
        "commit of an unsealed epoch"
    );
    pair.assert_secondary_holds(0, 0, "a refused commit applied something");
    let status = pair.secondary.status().epochs;
    assert_eq!(
        (
            status.sealed_epoch,
            status.applied_epoch,
            status.receiving_epoch
        ),
        (Some(1), None, Some(2))
    );
    assert_eq!(
        status.buffered_records, 6,
        "3 writes + end of 1, 2 writes of 2"
    );
    pair.secondary.commit(1).expect("commit 1");
    pair.assert_secondary_holds(0, 0xa2, "epoch 1's last write to the block");
    pair.assert_secondary_holds(4096, 0xa3, "epoch 1");
    pair.assert_secondary_holds(8192, 0, "epoch 2 is not committed");
    let status = pair.secondary.status().epochs;
    assert_eq!(
        (status.applied_epoch, status.buffered_records),
        (Some(1), 2)
    );
    let metadata = Metadata::open_or_create(&pair.secondary_meta, DISK_BYTES, DataState::UpToDate)
        .expect("reopen");
    assert_eq!(metadata.header().applied_epoch, Some(1), "recorded durably");
    pair.seal(2);
    wait_until("the primary hears epoch 2 sealed", || {
        pair.primary.status().epochs.sealed_epoch == Some(2)
    });
    pair.secondary.commit(2).expect("commit 2");
    pair.assert_secondary_holds(0, 0xb2, "epoch 2 after epoch 1");
    pair.assert_secondary_holds(8192, 0xb1, "epoch 2");
    assert!(
        pair.secondary.commit(1).is_ok(),
        "an old commit is answered, changes nothing"
    );
    pair.assert_secondary_holds(0, 0xb2, "an old commit changed the image");
    // Level 2 again: `epoch off` applies the rest and writes are applied on arrival.
    pair.write_acknowledged(12288, 0xc1);
    pair.primary.epoch_off().expect("epoch off");
    wait_until("the secondary applies everything at EpochOff", || {
        pair.secondary_block(12288) == vec![0xc1; BLOCK]
    });
    pair.write_acknowledged(16384, 0xd1);
    pair.assert_secondary_holds(16384, 0xd1, "Level 2: applied on arrival");
    assert!(!pair.secondary.status().epochs.enabled);
    // Epochs start again only above every epoch used before.
    assert!(pair.primary.epoch_on(3).is_err(), "epochs only grow");
    pair.primary.epoch_on(4).expect("epoch on again");
    pair.write_acknowledged(20480, 0xe1);
    pair.assert_secondary_holds(20480, 0, "epoch 4 is buffered");
    assert!(
        pair.secondary.commit_in_background(4).is_err(),
        "the control socket's commit of an unsealed epoch"
    );
    pair.seal(4);
    // The control socket's `commit`: answered at once, applied by the epoch applier.
    pair.secondary
        .commit_in_background(4)
        .expect("commit 4 in the background");
    wait_until("epoch 4 applied in the background", || {
        pair.secondary.status().epochs.applied_epoch == Some(4)
    });
    pair.assert_secondary_holds(20480, 0xe1, "epoch 4");
}

/// A takeover without a restorable replica boots the VM from its disk: every write the
/// primary acknowledged counts, sealed epochs or not.
#[test]
fn a_plain_promotion_with_epochs_buffered_applies_every_acknowledged_write() {
    let pair = level3_pair(DEFAULT_MEMORY_BYTES);
    pair.primary.epoch_on(1).expect("epoch on");
    pair.write_acknowledged(0, 0xa1);
    pair.seal(1);
    pair.write_acknowledged(4096, 0xb1); // epoch 2: never sealed
    pair.assert_secondary_holds(4096, 0, "epoch 2 is buffered");
    let generation = pair.secondary.status().generation + 1;
    pair.secondary
        .promote(Some(generation))
        .expect("a plain promotion");
    pair.assert_secondary_holds(0, 0xa1, "the sealed epoch");
    pair.assert_secondary_holds(4096, 0xb1, "the unsealed tail");
    let header =
        Metadata::open_or_create(&pair.secondary_meta, DISK_BYTES, DataState::Inconsistent)
            .expect("reopen")
            .header();
    assert_eq!(header.generation, generation);
    assert_eq!(header.data_state, DataState::UpToDate);
}

#[test]
fn promotion_at_an_epoch_applies_the_epochs_up_to_it_and_drops_every_later_one() {
    for (promote_at, expected) in [(2, [0xb1, 0xb2, 0]), (1, [0xa1, 0, 0])] {
        let pair = level3_pair(DEFAULT_MEMORY_BYTES);
        pair.primary.epoch_on(1).expect("epoch on");
        pair.write_acknowledged(0, 0xa1);
        pair.seal(1);
        pair.write_acknowledged(0, 0xb1);
        pair.write_acknowledged(4096, 0xb2);
        pair.seal(2);
        pair.write_acknowledged(8192, 0xc1); // epoch 3: never sealed
        pair.secondary.commit(1).expect("commit 1");
        let generation = pair.secondary.status().generation + 1;
        assert!(
            pair.secondary.promote_at(generation, 3).is_err(),
            "epoch 3 is not sealed here"
        );
        pair.assert_secondary_holds(4096, 0, "a refused promotion applied something");
        pair.secondary
            .promote_at(generation, promote_at)
            .expect("promote");
        for (index, byte) in expected.into_iter().enumerate() {
            pair.assert_secondary_holds(
                index as u64 * 4096,
                byte,
                &format!("promoted at epoch {promote_at}"),
            );
        }
        let header =
            Metadata::open_or_create(&pair.secondary_meta, DISK_BYTES, DataState::Inconsistent)
                .expect("reopen")
                .header();
        assert_eq!(header.applied_epoch, Some(promote_at));
        assert_eq!(header.generation, generation);
        // What was dropped is on the old primary's image: out of sync here, so that its
        // return as secondary resyncs it.
        let metadata =
            Metadata::open_or_create(&pair.secondary_meta, DISK_BYTES, DataState::Inconsistent)
                .expect("reopen");
        let dropped: &[u64] = if promote_at == 2 {
            &[8192]
        } else {
            &[0, 4096, 8192]
        };
        for &offset in dropped {
            assert!(
                metadata.is_out_of_sync(offset, 4096),
                "the dropped write at {offset} is not marked out of sync (promoted at {promote_at})"
            );
        }

        assert_eq!(header.data_state, DataState::UpToDate);
        // The journal is empty from where it starts now: a restart finds nothing to apply.
        let start = header.journal_start.expect("journal start");
        let (_, found) = super::super::journal::Journal::open(
            &pair.epoch_options.journal_path,
            start.position,
            start.sequence,
        )
        .expect("open journal");
        assert!(found.is_empty(), "{found:?}");
    }
}

#[test]
fn a_restarted_secondary_keeps_sealed_epochs_and_applies_a_committed_one_again() {
    // Little memory: the restarted secondary, and this one beyond 8 KiB, read data back
    // from the journal.
    let mut pair = level3_pair(8192);
    pair.primary.epoch_on(1).expect("epoch on");
    pair.write_acknowledged(0, 0xa1);
    pair.write_acknowledged(4096, 0xa2);
    pair.write_acknowledged(8192, 0xa3);
    pair.seal(1);
    pair.write_acknowledged(0, 0xb1);
    pair.seal(2);
    pair.write_acknowledged(4096, 0xc1); // epoch 3, unsealed
    let before_commit = pair.secondary_header();
    pair.secondary.commit(1).expect("commit 1");
    pair.assert_secondary_holds(0, 0xa1, "epoch 1");
    // A crash after the image was written and before "applied 1" was recorded: the
    // metadata still says what it said before the commit.
    pair.secondary.stop_for_test();
    Metadata::open_or_create(&pair.secondary_meta, DISK_BYTES, DataState::UpToDate)
        .expect("reopen")
        .set_applied_epoch(before_commit.applied_epoch, before_commit.journal_start)
        .expect("rewind the record");
    pair.restart_secondary();
    let status = pair.secondary.status().epochs;
    assert_eq!(
        (
            status.sealed_epoch,
            status.applied_epoch,
            status.receiving_epoch
        ),
        (Some(2), None, Some(3)),
        "{status:?}"
    );
    assert_eq!(
        status.buffered_records, 7,
        "epochs 1 and 2 sealed, 3's write kept"
    );
    // The primary starts a new session and goes on in epoch 3.
    wait_until("the new session in epoch 3", || {
        pair.board
            .delivered()
            .iter()
            .any(|message| matches!(message, Message::EpochStart { epoch: 3, .. }))
    });
    pair.write_acknowledged(12288, 0xc2);
    pair.secondary
        .commit(2)
        .expect("commit 2 applies 1 again, then 2");
    pair.assert_secondary_holds(0, 0xb1, "epoch 2 over epoch 1, in order");
    pair.assert_secondary_holds(4096, 0xa2, "epoch 3 is not committed");
    pair.assert_secondary_holds(8192, 0xa3, "epoch 1");
    pair.seal(3);
    pair.secondary.commit(3).expect("commit 3");
    pair.assert_secondary_holds(4096, 0xc1, "epoch 3's write from before the restart");
    pair.assert_secondary_holds(12288, 0xc2, "epoch 3's write after it");
}

#[test]
fn remote_only_ends_the_epochs_before_its_first_read_from_the_peer() {
    let pair = level3_pair(DEFAULT_MEMORY_BYTES);
    pair.primary.epoch_on(1).expect("epoch on");
    pair.write_acknowledged(0, 0xa1);
    pair.seal(1);
    pair.write_acknowledged(4096, 0xa2); // epoch 2, unsealed
    pair.assert_secondary_holds(0, 0, "buffered");
    pair.primary.fail_local_for_test();
    // The guest reads its own recent writes back from the peer's copy.
    let mut data = vec![0u8; 2 * BLOCK];
    pair.primary.read(0, &mut data).expect("read from the peer");
    assert_eq!(&data[..BLOCK], &[0xa1; BLOCK][..], "epoch 1, sealed");
    assert_eq!(&data[BLOCK..], &[0xa2; BLOCK][..], "epoch 2, not sealed");
    let epochs = pair.primary.status().epochs;
    assert!(!epochs.enabled, "{epochs:?}");
    assert_eq!(epochs.off_reason.as_deref(), Some("RemoteOnly"));
    let epochs = pair.secondary.status().epochs;
    assert!(!epochs.enabled, "{epochs:?}");
    assert_eq!(epochs.buffered_records, 0, "{epochs:?}");
    assert!(
        pair.primary.epoch_on(5).is_err(),
        "Level 3 needs a healthy local copy"
    );
}

/// Fills the journal: epoch 1 (sealed, not committed) takes most of it, then epoch 2's
/// writes go on until one is not acknowledged. Returns the byte of that write and it.
fn fill_the_journal(pair: &Pair) -> (u8, Outcome) {
    pair.primary.epoch_on(1).expect("epoch on");
    let write = |byte: u8| {
        pair.primary
            .write(0, vec![byte; MAX_BLOCK_BYTES], &pair.waker)
            .expect("write")
    };
    // Epoch 1 fills most of the journal (1 MiB records, 32 MiB).
    for index in 0..24u8 {
        let outcome = write(index);
        wait_until("a write of epoch 1", || outcome.status().is_some());
    }
    pair.seal(1);
    for index in 0..24u8 {
        let outcome = write(0x80 | index);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while outcome.status().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if outcome.status().is_none() {
            let status = pair.secondary.status().epochs;
            assert!(status.journal_full, "{status:?}");
            assert_eq!(status.journal_full_waits, 1);
            assert_eq!(
                pair.secondary.status().refused_requests,
                0,
                "nothing refused"
            );
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(
                outcome.status(),
                None,
                "acknowledged while the journal is full"
            );
            return (0x80 | index, outcome);
        }
    }
    panic!("the journal never filled up");
}

#[test]
fn a_full_journal_holds_acknowledgements_until_a_commit_frees_room() {
    let pair = level3_pair(1 << 20);
    let (last, waiting) = fill_the_journal(&pair);
    pair.secondary.commit(1).expect("commit 1 frees room");
    wait_until("the held write acknowledged", || waiting.status().is_some());
    assert_eq!(waiting.status(), Some(Status::Ok));
    assert!(!pair.secondary.status().epochs.journal_full);
    assert_eq!(
        pair.secondary_block(0),
        vec![23; BLOCK],
        "epoch 1's last write"
    );
    pair.seal(2);
    pair.secondary.commit(2).expect("commit 2");
    assert_eq!(
        pair.secondary_block(0),
        vec![last; BLOCK],
        "epoch 2's last write, none dropped"
    );
}

#[test]
fn epoch_off_passes_a_full_journal() {
    // Commits stopped: the engine (ftvmd) ends Level 3, and the `EpochOff` behind the
    // waiting write reaches the secondary all the same.
    let pair = level3_pair(1 << 20);
    let (last, waiting) = fill_the_journal(&pair);
    pair.primary.epoch_off().expect("epoch off");
    wait_until("the held write acknowledged", || waiting.status().is_some());
    assert_eq!(waiting.status(), Some(Status::Ok));
    wait_until("the secondary at Level 2", || {
        !pair.secondary.status().epochs.enabled && pair.primary.status().in_flight_requests == 0
    });
    let delivered: Vec<String> = pair
        .board
        .delivered()
        .iter()
        .rev()
        .take(8)
        .map(|message| format!("{message:?}"))
        .collect();
    assert!(
        pair.secondary_block(0) == vec![last; BLOCK],
        "everything applied in order, the held write ({last:#x}) last; found {:#x}; \
         delivered last: {delivered:#?}",
        pair.secondary_block(0)[0]
    );
    let status = pair.secondary.status().epochs;
    assert!(!status.journal_full, "{status:?}");
    assert_eq!(status.buffered_records, 0, "{status:?}");
    pair.write_acknowledged(4096, 0x11);
    pair.assert_secondary_holds(4096, 0x11, "Level 2: applied on arrival");
}

impl Pair {
    fn secondary_header(&self) -> crate::metadata::Header {
        let header =
            Metadata::open_or_create(&self.secondary_meta, DISK_BYTES, DataState::UpToDate)
                .expect("reopen")
                .header();
        let _: Option<JournalStart> = header.journal_start;
        header
    }
}
