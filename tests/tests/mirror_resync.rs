//! Resync modes without a guest: the compare mode sends only the chunks that differ; link
//! encryption must be set alike on both daemons.

use std::time::Duration;

use ftvm_tests::mirror::MirrorPair;

const TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE_BYTES: usize = 16 << 20;
const CHUNK_BYTES: usize = 64 << 10;

#[test]
fn compare_mode_sends_only_differing_chunks() {
    let mut pair = MirrorPair::new("resync-compare", IMAGE_BYTES as u64, 1);
    // Both copies hold the same data, except three chunks of the secondary's.
    let data: Vec<u8> = (0..IMAGE_BYTES)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2])
        .collect();
    std::fs::write(&pair.primary_options.image, &data).expect("write primary");
    let mut stale = data.clone();
    for chunk in [3usize, 100, 255] {
        stale[chunk * CHUNK_BYTES + 17] ^= 0xff;
    }
    std::fs::write(&pair.secondary_options.image, &stale).expect("write secondary");
    pair.primary_options
        .extra_args
        .push("--resync-compare".into());

    // A new secondary is Inconsistent: a full resync, which compare mode makes cheap.
    pair.start_secondary();
    pair.start_primary();
    let synced = pair.wait_in_sync(TIMEOUT);
    let resync = &synced["replication"]["resync"];
    assert_eq!(resync["bytes_done"], IMAGE_BYTES as u64, "{synced}");
    assert_eq!(
        resync["bytes_sent"],
        3 * CHUNK_BYTES as u64,
        "only the three differing chunks travel: {synced}"
    );
    pair.assert_images_identical();
}

/// Waits until `daemon` is an in-sync primary.
fn wait_primary_in_sync(daemon: &ftvm_tests::blk::BlkDaemon) -> serde_json::Value {
    daemon.wait_replication(TIMEOUT, "an in-sync primary", |r| {
        r["role"] == "primary"
            && r["disk_state"] == "UpToDate"
            && r["in_flight_requests"] == 0
            && r["out_of_sync_bytes"] == 0
    })
}

/// Each side can take the other role: the primary listens once demoted, the secondary
/// knows where to reach the old primary once promoted.
fn allow_role_swap(pair: &mut MirrorPair) {
    for address in ["10.77.1.1:7400", "10.77.2.1:7400"] {
        pair.primary_options
            .extra_args
            .extend(["--listen".into(), address.into()]);
        pair.secondary_options
            .extra_args
            .extend(["--peer".into(), address.into()]);
    }
}

#[test]
fn planned_role_swap_keeps_the_data_and_bumps_the_generation() {
    use vhost_user_blk_load::{BlkDevice, DeviceOptions};

    let mut pair = MirrorPair::new("role-swap", IMAGE_BYTES as u64, 1);
    allow_role_swap(&mut pair);
    pair.start_secondary();
    let refused = pair.secondary().command("promote");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("Inconsistent")),
        "an Inconsistent copy must never be promoted: {refused}"
    );
    pair.start_primary();
    pair.wait_in_sync(TIMEOUT);

    let first: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut device = BlkDevice::open(&pair.primary_options.socket, &DeviceOptions::default())
        .expect("connect to the primary");
    assert_eq!(device.write(0, &first).expect("write").status, 0);
    assert_eq!(device.flush().expect("flush").status, 0);
    drop(device);

    let demoted = pair.primary().command("demote");
    assert_eq!(demoted["ok"], true, "{demoted}");
    let promoted = pair.secondary().command("promote");
    assert_eq!(promoted["ok"], true, "{promoted}");

    let new_primary = pair.secondary();
    let synced = wait_primary_in_sync(new_primary);
    assert_eq!(synced["replication"]["generation"], 2, "{synced}");
    pair.primary()
        .wait_replication(TIMEOUT, "old primary is an UpToDate secondary", |r| {
            r["role"] == "secondary" && r["disk_state"] == "UpToDate" && r["generation"] == 2
        });

    let mut device = BlkDevice::open(&pair.secondary_options.socket, &DeviceOptions::default())
        .expect("connect to the new primary");
    assert_eq!(device.read(0, 1 << 20).expect("read").data, first);
    let second = vec![0x5au8; 1 << 20];
    assert_eq!(device.write(4096, &second).expect("write").status, 0);
    assert_eq!(device.flush().expect("flush").status, 0);
    drop(device);
    wait_primary_in_sync(new_primary);
    pair.assert_images_identical();
}

#[test]
fn resync_rate_limit_holds_the_copy_back() {
    let mut pair = MirrorPair::new("resync-limit", IMAGE_BYTES as u64, 1);
    pair.primary_options
        .extra_args
        .extend(["--resync-rate-limit".into(), "8M".into()]);
    pair.start_secondary();
    let started = std::time::Instant::now();
    pair.start_primary();
    let synced = pair.wait_in_sync(TIMEOUT);
    let elapsed = started.elapsed();
    // 16 MiB at 8 MiB/s cannot take less than 2 s (a lower bound: slow machines only add).
    assert!(
        elapsed >= Duration::from_millis(1900),
        "a 16 MiB resync limited to 8 MiB/s took {elapsed:?}: {synced}"
    );
    let rate = synced["replication"]["resync"]["rate_bytes_per_second"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        rate <= 9 << 20,
        "resync rate {rate} B/s exceeds the 8 MiB/s limit"
    );
}

#[test]
fn a_refused_promotion_changes_nothing() {
    let mut pair = MirrorPair::new("promote-refused", IMAGE_BYTES as u64, 1);
    pair.start_secondary();
    pair.start_primary();
    pair.wait_in_sync(TIMEOUT);
    // This secondary was not told where the old primary would be (--peer).
    let refused = pair.secondary().command("promote");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("--peer")),
        "{refused}"
    );
    let status = pair.secondary().status();
    assert_eq!(status["replication"]["role"], "secondary", "{status}");
    assert_eq!(status["replication"]["generation"], 1, "{status}");
    // And it still mirrors.
    pair.wait_in_sync(TIMEOUT);
}

/// `--link-encryption off` on one daemon only: the pair never connects, and the primary's
/// status names both settings; off on both: the pair syncs (in clear), and each daemon has
/// warned in its log.
#[test]
fn link_encryption_off_must_be_set_on_both_daemons() {
    let mut pair = MirrorPair::new("link-encryption", 4 << 20, 1);
    let off = ["--link-encryption".to_string(), "off".to_string()];
    pair.secondary_options.extra_args.extend(off.clone());
    pair.start_secondary();
    pair.start_primary();
    let expected = "peer has link encryption off (authenticated only), this side encryption \
                    on: configure both hosts alike";
    pair.primary()
        .wait_replication(TIMEOUT, "the refusal named", |r| {
            r.to_string().contains(expected)
        });
    let secondary = pair.secondary().status();
    assert_ne!(
        secondary["replication"]["disk_state"], "UpToDate",
        "{secondary}"
    );

    pair.kill_primary();
    pair.primary_options.extra_args.extend(off);
    pair.start_primary();
    pair.wait_in_sync(TIMEOUT);
    pair.assert_images_identical();
    for name in ["primary", "secondary"] {
        let log = std::fs::read_to_string(pair.dir.path().join(format!("{name}.log")))
            .expect("read the log");
        assert!(
            log.contains("LINK ENCRYPTION IS OFF"),
            "{name} did not warn:\n{log}"
        );
    }
}

/// A frontend that connects to a secondary (as a destination QEMU started ahead of a move
/// does, `-incoming defer`) gets its negotiation answered, but a request it places before
/// the copy is promoted is neither applied nor completed, not even with an error; once the
/// copy is promoted the next kick serves it.
#[test]
fn a_frontend_on_the_secondary_is_held_until_promotion() {
    use vhost_user_blk_load::{BlkDevice, DeviceOptions, QueueError, Request};

    let mut pair = MirrorPair::new("held-frontend", IMAGE_BYTES as u64, 1);
    allow_role_swap(&mut pair);
    pair.start_in_sync(TIMEOUT);
    let before = pair.secondary_image();

    // The whole vhost-user setup, rings and all (more than QEMU does before `cont`).
    let mut device = BlkDevice::open(&pair.secondary_options.socket, &DeviceOptions::default())
        .expect("a secondary answers a frontend's negotiation");
    let data = vec![0xa5u8; 64 << 10];
    let queue = device.queue(0).expect("queue 0");
    let write = queue
        .submit(&Request::Write {
            sector: 8,
            data: data.clone(),
        })
        .expect("submit a write");
    let read = queue
        .submit(&Request::Read {
            sector: 0,
            len: 4096,
        })
        .expect("submit a read");
    // A negative can only be shown by waiting: a served request completes in milliseconds.
    match queue.wait(write, Duration::from_secs(1)) {
        Err(QueueError::Timeout { .. }) => {}
        other => panic!("a secondary completed a guest write: {other:?}"),
    }
    let status = pair.secondary().status();
    assert!(
        status["held_kicks"].as_u64().unwrap_or(0) >= 1,
        "the kicks were not counted as held: {status}"
    );
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["write_requests"], 0, "{status}");
    assert_eq!(status["read_requests"], 0, "{status}");
    assert_eq!(status["replication"]["role"], "secondary", "{status}");
    assert!(
        pair.secondary_image() == before,
        "the secondary's image changed"
    );

    // Promoted, the copy serves the frontend that waited: the next kick pops both.
    let demoted = pair.primary().command("demote");
    assert_eq!(demoted["ok"], true, "{demoted}");
    let promoted = pair.secondary().command("promote");
    assert_eq!(promoted["ok"], true, "{promoted}");
    let queue = device.queue(0).expect("queue 0");
    let flush = queue.submit(&Request::Flush).expect("submit a flush");
    for id in [write, read, flush] {
        let done = queue.wait(id, TIMEOUT).expect("served once promoted");
        assert_eq!(done.status(), Some(0), "request {id}: {done:?}");
    }
    assert_eq!(device.read(8, 64 << 10).expect("read back").data, data);
    drop(device);
    wait_primary_in_sync(pair.secondary());
}
