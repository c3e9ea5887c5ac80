//! `GET_VRING_BASE` with requests in flight, as QEMU's `stop` sends it, with
//! `vhost-user-blk-load` playing QEMU and no VM: when the reply arrives, every request the
//! daemon popped is either completed (used ring and status byte) or rewound (the base points
//! at it); nothing happens on the stopped ring; after the ring is set up again (`cont`),
//! exactly the rewound requests run.

mod common;

use std::sync::atomic::Ordering;
use std::time::Instant;

use common::{read_image, Fixture};
use daemon_util::test_support::{poll_until, TIMEOUT};
use vhost::VringConfigData;
use vhost_user_blk_load::blk::STATUS_OK;
use vhost_user_blk_load::{BlkDevice, BlkQueue, DeviceOptions, Request};

/// Stop/start rounds of the race test; each stops the ring right after a kick.
const ROUNDS: u8 = 200;
/// Writes posted before each stop.
const BATCH: u64 = 32;

/// A frontend with one queue and EVENT_IDX, connected to `daemon`.
fn connect(daemon: &Fixture) -> (BlkDevice, BlkQueue) {
    let mut device = daemon.connect(&DeviceOptions::default().with_event_idx());
    let queue = device.take_queues().pop().expect("queue 0");
    (device, queue)
}

/// What QEMU's `stop` sends for a queue; returns the base.
fn stop_ring(device: &mut BlkDevice) -> u16 {
    let session = device.session();
    session
        .set_vring_enable(0, false)
        .expect("SET_VRING_ENABLE 0");
    let base = session.get_vring_base(0).expect("GET_VRING_BASE");
    u16::try_from(base).expect("a split ring's base fits 16 bits")
}

/// What QEMU's `cont` sends for a queue. Like QEMU's fresh kick notifier, the kick fd starts
/// readable, so the daemon looks at the ring at once.
fn start_ring(device: &mut BlkDevice, queue: &BlkQueue, base: u16) {
    let memory = device.memory().clone();
    let layout = queue.layout();
    let address = |guest: u64| memory.host_address(guest).expect("ring in guest RAM");
    let session = device.session();
    session
        .set_vring_num(0, layout.size)
        .expect("SET_VRING_NUM");
    session.set_vring_base(0, base).expect("SET_VRING_BASE");
    let config = VringConfigData {
        queue_max_size: layout.size,
        queue_size: layout.size,
        flags: 0,
        desc_table_addr: address(layout.descriptors),
        used_ring_addr: address(layout.used),
        avail_ring_addr: address(layout.avail),
        log_addr: None,
    };
    session.set_vring_addr(0, &config).expect("SET_VRING_ADDR");
    session
        .set_vring_call(0, queue.call_eventfd())
        .expect("SET_VRING_CALL");
    queue.kick_eventfd().write(1).expect("kick");
    session
        .set_vring_kick(0, queue.kick_eventfd())
        .expect("SET_VRING_KICK");
    session
        .set_vring_enable(0, true)
        .expect("SET_VRING_ENABLE 1");
}

/// The used index as the device last published it.
fn used_index(device: &BlkDevice, queue: &BlkQueue) -> u16 {
    device
        .memory()
        .load::<u16>(queue.layout().used + 2, Ordering::Acquire)
        .expect("used index")
}

fn write(sector: u64, fill: u8) -> Request {
    Request::Write {
        sector,
        data: vec![fill; 4096],
    }
}

#[test]
fn stop_right_after_a_kick_leaves_no_popped_request_uncompleted() {
    let daemon = Fixture::start(&[]);
    let (mut device, mut queue) = connect(&daemon);
    for round in 0..ROUNDS {
        for index in 0..BATCH {
            queue.enqueue(&write(index * 8, round)).expect("enqueue");
        }
        queue.kick_eventfd().write(1).expect("kick");
        let base = stop_ring(&mut device);
        assert_eq!(
            used_index(&device, &queue),
            base,
            "round {round}: GET_VRING_BASE answered while popped requests were not completed"
        );
        start_ring(&mut device, &queue, base);
        let completions = queue
            .reap(BATCH as usize, TIMEOUT)
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert_eq!(completions.len(), BATCH as usize, "round {round}");
        for completion in completions {
            assert_eq!(completion.status(), Some(STATUS_OK), "round {round}");
        }
    }
    let last = ROUNDS - 1;
    assert_eq!(
        read_image(&daemon.path("disk.img"), 0, 4096),
        vec![last; 4096]
    );
}

#[test]
fn writes_held_for_the_peer_are_rewound_at_stop_and_run_again_after_start() {
    // A primary whose secondary never answers holds every write (mode Connecting).
    let psk = tempfile::NamedTempFile::new().expect("psk");
    std::fs::write(psk.path(), "stop-vring test key 0123456789abcdef\n").expect("write psk");
    let psk_path = psk.path().display().to_string();
    let daemon = Fixture::start(&[
        "--role",
        "primary",
        "--peer",
        "127.0.0.1:9",
        "--psk-file",
        &psk_path,
        "--host-id",
        "primary",
    ]);
    let (mut device, mut queue) = connect(&daemon);
    for index in 0..4 {
        queue.enqueue(&write(index * 8, 0x5a)).expect("enqueue");
    }
    queue.kick().expect("kick");
    poll_until(TIMEOUT, "four held writes", || {
        daemon.status()["replication"]["in_flight_requests"] == 4
    });

    let stopping = Instant::now();
    let base = stop_ring(&mut device);
    let stopped_in = stopping.elapsed();
    assert_eq!(base, 0, "the held writes were rewound");
    assert_eq!(used_index(&device, &queue), 0, "nothing was completed");
    assert!(stopped_in < TIMEOUT, "the stop took {stopped_in:?}");

    // The held writes now complete inside the daemon; the stopped ring must not see them.
    let reply = daemon.control("continue-degraded").expect("reply");
    assert!(reply.contains("\"ok\":true"), "continue-degraded: {reply}");
    poll_until(TIMEOUT, "the held writes to end", || {
        daemon.status()["replication"]["in_flight_requests"] == 0
    });
    assert_eq!(used_index(&device, &queue), 0, "a stopped ring was touched");

    start_ring(&mut device, &queue, base);
    let completions = queue
        .reap(4, TIMEOUT)
        .expect("the rewound writes run again");
    assert_eq!(completions.len(), 4);
    for completion in completions {
        assert_eq!(completion.status(), Some(STATUS_OK));
    }
    assert_eq!(
        used_index(&device, &queue),
        4,
        "each request completed once"
    );
    assert_eq!(
        read_image(&daemon.path("disk.img"), 0, 4 * 8 * 512),
        vec![0x5a; 4 * 8 * 512]
    );
}
