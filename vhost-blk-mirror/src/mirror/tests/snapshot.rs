//! The snapshot barrier between a real primary and secondary (`primary/snapshot.rs`): the
//! marker follows every write before it, no write passes it, and a refusal by the peer
//! leaves the pair mirrored. (Reflinks themselves need XFS or btrfs: the end-to-end tests
//! make one, `tests/tests/snapshot.rs`.)

use std::sync::Arc;

use control_protocol::disk::SnapshotName;

use super::{pair, wait_until, Pair, DISK_BYTES};
use crate::mirror::primary::Mode;
use crate::mirror::protocol::{Message, SnapshotAction};
use crate::request::Status;
use crate::ticket::Outcome;

fn name(text: &str) -> SnapshotName {
    SnapshotName::new(text).expect("valid name")
}

/// A snapshot file on the primary's copy only (made by hand: no reflinks here).
fn one_sided_snapshot(pair: &Pair, text: &str) {
    let directory = crate::snapshot::directory(&pair.secondary_image.with_file_name("primary.img"));
    std::fs::create_dir_all(&directory).expect("snapshot directory");
    std::fs::write(directory.join(text), vec![0u8; DISK_BYTES as usize]).expect("snapshot");
}

fn completed(outcome: &Outcome) -> bool {
    outcome.status() == Some(Status::Ok)
}

#[test]
fn the_marker_follows_the_writes_in_flight_and_no_write_passes_it() {
    let pair = Arc::new(pair(false, None));
    pair.wait_in_sync();
    one_sided_snapshot(&pair, "s1");
    // Writes to the secondary are held back on the link: a write stays in flight.
    pair.board.set_filter(Some(Box::new(|message| {
        matches!(message, Message::Write { .. })
    })));
    let before = pair.write(0, 7);
    let barrier = {
        let pair = Arc::clone(&pair);
        std::thread::spawn(move || pair.primary.snapshot(&name("s1"), SnapshotAction::Delete))
    };
    // The barrier is up (it waits for the write in flight): a new write waits behind it.
    wait_until("the barrier to go up", || pair.primary.barrier_up());
    assert_eq!(pair.primary.status().in_flight_requests, 1);
    let behind = {
        let pair = Arc::clone(&pair);
        std::thread::spawn(move || pair.write(8192, 9))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !pair
            .board
            .delivered()
            .iter()
            .any(|message| matches!(message, Message::Snapshot { .. })),
        "the marker went before a write in flight was on both copies"
    );
    pair.board.set_filter(None);
    let result = barrier.join().expect("barrier thread");
    // The secondary has no such snapshot: refused there, so the command reports it, and
    // the pair stays mirrored (a refusal is not a failed copy).
    let error = result.expect_err("the peer has no snapshot s1");
    assert!(
        error.contains("deleted here, not on the peer's copy")
            && error.contains("no snapshot named s1"),
        "{error}"
    );
    let behind = behind.join().expect("writer");
    wait_until("both writes complete", || {
        completed(&before) && completed(&behind)
    });
    let status = pair.primary.status();
    assert_eq!(status.mode, Mode::Mirrored, "{status:?}");
    assert!(status.peer_disk_failed.is_none(), "{status:?}");
    // On the link: the first write, the marker, then the write that waited.
    let order: Vec<&'static str> = pair
        .board
        .delivered()
        .iter()
        .filter_map(|message| match message {
            Message::Write { offset: 0, .. } => Some("before"),
            Message::Write { offset: 8192, .. } => Some("behind"),
            Message::Snapshot { .. } => Some("marker"),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["before", "marker", "behind"]);
}

#[test]
fn a_snapshot_without_reflinks_is_refused_before_any_barrier() {
    let pair = pair(false, None);
    pair.wait_in_sync();
    let error = pair
        .primary
        .snapshot(
            &name("s1"),
            SnapshotAction::Create(control_protocol::disk::Consistency::Crash),
        )
        .expect_err("no reflinks in the test directory");
    assert!(
        error.contains("need a file system with reflinks"),
        "{error}"
    );
    let error = pair
        .primary
        .snapshot(&name("s2"), SnapshotAction::Revert)
        .expect_err("no such snapshot");
    assert!(error.contains("no snapshot named s2"), "{error}");
    assert!(!pair
        .board
        .delivered()
        .iter()
        .any(|message| matches!(message, Message::Snapshot { .. })));
    let write = pair.write(0, 1);
    wait_until("a write after the refusals", || completed(&write));
}
