//! In-process tests with a real vhost-user frontend (`vhost-user-blk-load`), no VM: the
//! daemon runs as a process on a real socket, the test plays QEMU.

mod common;

use std::path::Path;
use std::process::Command;

use common::{read_image, Fixture, IMAGE_BYTES};
use control_protocol::disk::DirtyPages;
use control_protocol::Reply;
use daemon_util::test_support::{require_root, TIMEOUT};
use vhost_user_blk_load::blk::{
    encode_header, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP, STATUS_UNWRITTEN, TYPE_IN, TYPE_OUT,
};
use vhost_user_blk_load::{Descriptor, DeviceOptions, Next};

// virtio feature bits the daemon must offer.
const F_SIZE_MAX: u32 = 1;
const F_SEG_MAX: u32 = 2;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;
const F_TOPOLOGY: u32 = 10;
const F_MQ: u32 = 12;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;
const F_LOG_ALL: u32 = 26;
const F_EVENT_IDX: u32 = 29;
const F_VERSION_1: u32 = 32;

#[test]
fn negotiates_the_advertised_features() {
    let fixture = Fixture::start(&[]);
    let device = fixture.connect(&DeviceOptions::default().with_event_idx());
    let negotiated = device.negotiated();
    for bit in [
        F_SIZE_MAX,
        F_SEG_MAX,
        F_BLK_SIZE,
        F_FLUSH,
        F_TOPOLOGY,
        F_MQ,
        F_DISCARD,
        F_WRITE_ZEROES,
        F_LOG_ALL,
        F_EVENT_IDX,
        F_VERSION_1,
    ] {
        assert!(
            negotiated.offered_features & (1 << bit) != 0,
            "feature bit {bit} missing"
        );
    }
    assert_eq!(negotiated.offered_features & (1 << F_RO), 0);
    assert!(negotiated.has_feature(F_EVENT_IDX));

    let read_only = Fixture::start(&["--read-only"]);
    let device = read_only.connect(&DeviceOptions::default());
    let offered = device.negotiated().offered_features;
    assert!(offered & (1 << F_RO) != 0, "read-only disk offers RO");
    assert_eq!(
        offered & (1 << F_DISCARD),
        0,
        "read-only disk offers no discard"
    );
}

#[test]
fn config_space_describes_the_disk() {
    let fixture = Fixture::start(&["--queues", "2"]);
    let device = fixture.connect(&DeviceOptions {
        queue_count: 2,
        ..DeviceOptions::default()
    });
    let config = device.config();
    assert_eq!(config.capacity, IMAGE_BYTES / 512);
    assert_eq!(config.blk_size, 512);
    assert_eq!(config.seg_max, 126);
    assert_eq!(config.size_max, 128 * 1024);
    assert_eq!(config.num_queues, 2);
    assert_eq!(device.capacity_bytes(), IMAGE_BYTES);
}

#[test]
fn in_out_flush_round_trip_reaches_the_image() {
    let fixture = Fixture::start(&["--serial", "rt-disk"]);
    let mut device = fixture.connect(&DeviceOptions::default().with_event_idx().with_indirect());
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(device.write(16, &data).expect("write").status, STATUS_OK);
    assert_eq!(device.flush().expect("flush").status, STATUS_OK);
    let back = device.read(16, 8192).expect("read");
    assert_eq!(back.status, STATUS_OK);
    assert_eq!(back.data, data);
    assert_eq!(back.used_len, 8193, "used length counts data and status");
    assert_eq!(read_image(&fixture.image(), 16 * 512, 8192), data);

    let id = device.get_id().expect("get_id");
    assert_eq!(id.status, STATUS_OK);
    assert_eq!(&id.data[..8], b"rt-disk\0");

    assert_eq!(device.discard(16, 8).expect("discard").status, STATUS_OK);
    assert_eq!(
        device.write_zeroes(24, 8, false).expect("zeroes").status,
        STATUS_OK
    );
    assert_eq!(
        read_image(&fixture.image(), 16 * 512, 8192),
        vec![0u8; 8192]
    );

    let status = fixture.status();
    assert_eq!(status["written_bytes"], 8192);
    assert_eq!(status["read_bytes"], 8192);
    assert_eq!(status["flush_requests"], 1);
    assert_eq!(status["connected"], true);
}

#[test]
fn both_queues_serve_requests() {
    let fixture = Fixture::start(&["--queues", "2"]);
    let mut device = fixture.connect(&DeviceOptions {
        queue_count: 2,
        ..DeviceOptions::default().with_event_idx()
    });
    for queue in 0..2u16 {
        let data = vec![queue as u8 + 1; 4096];
        let queue_handle = device.queue(queue).expect("queue");
        assert_eq!(
            queue_handle
                .write(u64::from(queue) * 8, &data)
                .expect("write")
                .status,
            STATUS_OK
        );
        assert_eq!(
            queue_handle
                .read(u64::from(queue) * 8, 4096)
                .expect("read")
                .data,
            data
        );
    }
}

#[test]
fn bad_requests_get_the_right_status_and_the_daemon_keeps_serving() {
    let mut fixture = Fixture::start(&[]);
    let mut device = fixture.connect(&DeviceOptions::default());
    let capacity = IMAGE_BYTES / 512;
    // Past the end, and overflowing the sector arithmetic.
    assert_eq!(
        device.read(capacity - 1, 1024).expect("read").status,
        STATUS_IOERR
    );
    assert_eq!(
        device
            .write(u64::MAX - 1, &[1; 1024])
            .expect("write")
            .status,
        STATUS_IOERR
    );
    // Not a whole number of sectors.
    assert_eq!(
        device.write(0, &[1; 100]).expect("write").status,
        STATUS_IOERR
    );
    // Discard segment past the end.
    assert_eq!(
        device.discard(capacity, 8).expect("discard").status,
        STATUS_IOERR
    );

    // Unknown request type.
    let queue = device.queue(0).expect("queue");
    let header = queue.alloc_buffer(16).expect("alloc");
    let status = queue.alloc_buffer(1).expect("alloc");
    queue
        .memory()
        .write(header, &encode_header(99, 0))
        .expect("header");
    queue
        .memory()
        .write(status, &[STATUS_UNWRITTEN])
        .expect("status");
    let id = queue
        .submit_raw(&[
            Descriptor::readable(header, 16),
            Descriptor::writable(status, 1),
        ])
        .expect("submit");
    queue.wait(id, TIMEOUT).expect("completion");
    assert_eq!(
        queue.memory().read_vec(status, 1).expect("status"),
        vec![STATUS_UNSUPP]
    );

    assert_eq!(device.read(0, 512).expect("read").status, STATUS_OK);
    fixture.assert_alive();
    assert_eq!(fixture.status()["rejected_requests"], 5);
}

#[test]
fn writes_to_a_read_only_disk_fail() {
    let fixture = Fixture::start(&["--read-only"]);
    let mut device = fixture.connect(&DeviceOptions::default());
    assert_eq!(
        device.write(0, &[1; 512]).expect("write").status,
        STATUS_IOERR
    );
    assert_eq!(
        device.write_zeroes(0, 8, false).expect("zeroes").status,
        STATUS_IOERR
    );
    assert_eq!(device.read(0, 512).expect("read").status, STATUS_OK);
    assert_eq!(read_image(&fixture.image(), 0, 512), vec![0u8; 512]);
}

#[test]
fn malformed_chains_are_refused_and_the_daemon_keeps_serving() {
    let mut fixture = Fixture::start(&[]);
    let mut device = fixture.connect(&DeviceOptions::default());
    let queue = device.queue(0).expect("queue");
    let header = queue.alloc_buffer(16).expect("alloc");
    let data = queue.alloc_buffer(4096).expect("alloc");
    let status = queue.alloc_buffer(1).expect("alloc");
    queue
        .memory()
        .write(header, &encode_header(TYPE_OUT, 0))
        .expect("header");
    let outside = 1u64 << 40;
    let chains: Vec<(&str, Vec<Descriptor>, Option<u8>)> = vec![
        (
            "no status byte",
            vec![Descriptor::readable(header, 16)],
            None,
        ),
        (
            "status outside guest memory",
            vec![
                Descriptor::readable(header, 16),
                Descriptor::writable(outside, 1),
            ],
            None,
        ),
        (
            "data outside guest memory",
            vec![
                Descriptor::readable(header, 16),
                Descriptor::readable(outside, 4096),
                Descriptor::writable(status, 1),
            ],
            Some(STATUS_IOERR),
        ),
        (
            "descriptor loop",
            vec![
                Descriptor::readable(header, 16),
                Descriptor::readable(data, 4096).with_next(Next::Position(0)),
            ],
            None,
        ),
        (
            "next index past the queue",
            vec![Descriptor::readable(header, 16).with_next(Next::Index(5000))],
            None,
        ),
        (
            "short header",
            vec![
                Descriptor::readable(header, 8),
                Descriptor::writable(status, 1),
            ],
            Some(STATUS_IOERR),
        ),
        (
            "valid one-sector write",
            vec![
                Descriptor::readable(header, 16),
                Descriptor::readable(data, 512),
                Descriptor::writable(status, 1),
            ],
            Some(STATUS_OK),
        ),
    ];
    for (what, chain, expected) in chains {
        queue
            .memory()
            .write(status, &[STATUS_UNWRITTEN])
            .expect("reset status");
        let id = queue.submit_raw(&chain).expect("submit");
        let completion = queue
            .wait(id, TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = queue.memory().read_vec(status, 1).expect("status")[0];
        match expected {
            Some(expected) => assert_eq!(got, expected, "{what}"),
            None => assert_eq!(completion.used_len, 0, "{what}: nothing written back"),
        }
    }
    // The last case is a write of 512 readable bytes, which is valid; prove a read still works.
    queue
        .memory()
        .write(header, &encode_header(TYPE_IN, 0))
        .expect("header");
    assert_eq!(device.read(0, 4096).expect("read").status, STATUS_OK);
    fixture.assert_alive();
    assert!(fixture.status()["rejected_requests"].as_u64() >= Some(6));
}

#[test]
fn dirty_log_marks_pages_the_daemon_wrote_into_guest_memory() {
    let fixture = Fixture::start(&[]);
    let mut device = fixture.connect(&DeviceOptions::default().with_dirty_log());
    assert!(device.negotiated().has_feature(F_LOG_ALL));
    assert_eq!(
        device.write(0, &[0x5a; 8192]).expect("write").status,
        STATUS_OK
    );
    device.dirty_log().expect("dirty log").clear();

    let queue = device.queue(0).expect("queue");
    let header = queue.alloc_buffer(16).expect("alloc");
    let data = queue.alloc_buffer(8192).expect("alloc");
    let status = queue.alloc_buffer(1).expect("alloc");
    queue
        .memory()
        .write(header, &encode_header(TYPE_IN, 0))
        .expect("header");
    let id = queue
        .submit_raw(&[
            Descriptor::readable(header, 16),
            Descriptor::writable(data, 8192),
            Descriptor::writable(status, 1),
        ])
        .expect("submit");
    queue.wait(id, TIMEOUT).expect("completion");
    assert_eq!(
        queue.memory().read_vec(data, 8192).expect("data"),
        vec![0x5a; 8192]
    );
    let log = device.dirty_log().expect("dirty log");
    for page in [data, data + 4096, status] {
        assert!(
            log.is_dirty(page),
            "page {page:#x} written by the daemon is not logged"
        );
    }
    assert!(
        !log.is_dirty(header) || header / 4096 == status / 4096,
        "read-only header logged"
    );
}

/// `dirty-pages` (Level 3) reports what the daemon wrote as offsets of the RAM file, while
/// QEMU's migration log keeps being marked too.
#[test]
fn dirty_pages_reports_the_pages_the_daemon_wrote_and_clears_them() {
    let fixture = Fixture::start(&[]);
    let mut device = fixture.connect(&DeviceOptions::default().with_dirty_log());
    assert_eq!(
        device.write(0, &[0x5a; 8192]).expect("write").status,
        STATUS_OK
    );
    let dirty_pages = || -> DirtyPages {
        let line = fixture.control("dirty-pages").expect("dirty-pages answers");
        Reply::<DirtyPages>::from_line(&line)
            .expect("a dirty-pages reply")
            .into_result()
            .expect("dirty-pages not refused")
    };
    let before = dirty_pages();
    assert_eq!(before.page_size, 4096);
    assert_eq!(
        before.files.len(),
        1,
        "the used ring was written: {before:?}"
    );
    device.dirty_log().expect("dirty log").clear();

    let queue = device.queue(0).expect("queue");
    let base = queue.memory().base_address();
    let header = queue.alloc_buffer(16).expect("alloc");
    let data = queue.alloc_buffer(8192).expect("alloc");
    let status = queue.alloc_buffer(1).expect("alloc");
    queue
        .memory()
        .write(header, &encode_header(TYPE_IN, 0))
        .expect("header");
    let id = queue
        .submit_raw(&[
            Descriptor::readable(header, 16),
            Descriptor::writable(data, 8192),
            Descriptor::writable(status, 1),
        ])
        .expect("submit");
    queue.wait(id, TIMEOUT).expect("completion");
    let written = dirty_pages();
    let [file] = &written.files[..] else {
        panic!("one RAM file expected: {written:?}");
    };
    assert!(file.dev != 0 || file.ino != 0, "{written:?}");
    let reported = |address: u64| {
        let offset = address - base;
        file.ranges
            .iter()
            .any(|&[start, len]| start <= offset && offset < start + len)
    };
    for page in [data, data + 4096, status] {
        assert!(reported(page), "page {page:#x} not reported: {written:?}");
    }
    assert!(
        !reported(header) || header / 4096 == status / 4096,
        "read-only header reported: {written:?}"
    );
    for pair in file.ranges.windows(2) {
        assert!(pair[0][0] + pair[0][1] < pair[1][0], "{written:?}");
    }
    assert!(file
        .ranges
        .iter()
        .all(|[start, len]| start % 4096 == 0 && len % 4096 == 0));
    let log = device.dirty_log().expect("dirty log");
    assert!(log.is_dirty(data) && log.is_dirty(status), "migration log");
    assert_eq!(dirty_pages().files, vec![], "cleared by the previous call");
}

/// A read is done straight into guest memory (`preadv`, no bounce buffer): the kernel's
/// writes pass neither vm-memory nor its dirty bitmaps, so the daemon marks them itself.
/// Proven here for a read over several descriptors, one of them across a page boundary
/// and one over two pages: `dirty-pages` and QEMU's migration log name every page the data
/// landed in, and only those.
#[test]
fn a_vectored_read_marks_every_page_it_lands_in() {
    let fixture = Fixture::start(&[]);
    let mut device = fixture.connect(&DeviceOptions::default().with_dirty_log());
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 251) as u8).collect();
    assert_eq!(device.write(8, &data).expect("write").status, STATUS_OK);
    let queue = device.queue(0).expect("queue");
    let base = queue.memory().base_address();
    let header = queue.alloc_buffer(16).expect("alloc");
    // Three pages each, page-aligned: what lies around the descriptors stays untouched.
    let first = queue.alloc_buffer(3 * 4096).expect("alloc");
    let second = queue.alloc_buffer(3 * 4096).expect("alloc");
    let third = queue.alloc_buffer(3 * 4096).expect("alloc");
    let status = queue.alloc_buffer(1).expect("alloc");
    queue
        .memory()
        .write(header, &encode_header(TYPE_IN, 8))
        .expect("header");
    // 1 KiB across the boundary of `first`'s first two pages; 4.5 KiB from the start of
    // `second`'s middle page into its last; 512 bytes inside `third`'s middle page.
    let pieces = [
        (first + 4096 - 512, 1024u32),
        (second + 4096, 4608),
        (third + 4096 + 1024, 512),
    ];
    let mut chain = vec![Descriptor::readable(header, 16)];
    chain.extend(
        pieces
            .iter()
            .map(|&(address, len)| Descriptor::writable(address, len)),
    );
    chain.push(Descriptor::writable(status, 1));
    let dirty_pages = || -> DirtyPages {
        let line = fixture.control("dirty-pages").expect("dirty-pages answers");
        Reply::<DirtyPages>::from_line(&line)
            .expect("a dirty-pages reply")
            .into_result()
            .expect("dirty-pages not refused")
    };
    dirty_pages();
    device.dirty_log().expect("dirty log").clear();

    let queue = device.queue(0).expect("queue");
    let id = queue.submit_raw(&chain).expect("submit");
    let completion = queue.wait(id, TIMEOUT).expect("completion");
    assert_eq!(completion.used_len, 6144 + 1);
    assert_eq!(
        queue.memory().read_vec(status, 1).expect("status"),
        [STATUS_OK]
    );
    let mut landed = Vec::new();
    for &(address, len) in &pieces {
        landed.extend(
            queue
                .memory()
                .read_vec(address, len as usize)
                .expect("data"),
        );
    }
    assert_eq!(landed, data[..6144], "the data landed in order");

    let written = dirty_pages();
    let [file] = &written.files[..] else {
        panic!("one RAM file expected: {written:?}");
    };
    let reported = |address: u64| {
        let offset = address - base;
        file.ranges
            .iter()
            .any(|&[start, len]| start <= offset && offset < start + len)
    };
    let log = device.dirty_log().expect("dirty log");
    let landed_in = [
        first,
        first + 4096,
        second + 4096,
        second + 8192,
        third + 4096,
    ];
    for page in landed_in {
        assert!(reported(page), "page {page:#x} not reported: {written:?}");
        assert!(
            log.is_dirty(page),
            "page {page:#x} not in the migration log"
        );
    }
    for page in [first + 8192, second, third, third + 8192] {
        assert!(!reported(page), "page {page:#x} reported, never written");
        assert!(!log.is_dirty(page), "page {page:#x} logged, never written");
    }
}

/// A write whose header shares a descriptor with the first data bytes, and whose data goes on
/// over descriptors of odd lengths, reaches the image whole (`pwritev` from guest memory).
#[test]
fn a_vectored_write_takes_every_byte_after_the_header() {
    let fixture = Fixture::start(&[]);
    let mut device = fixture.connect(&DeviceOptions::default());
    let queue = device.queue(0).expect("queue");
    let first = queue.alloc_buffer(4096).expect("alloc");
    let second = queue.alloc_buffer(4096).expect("alloc");
    let status = queue.alloc_buffer(1).expect("alloc");
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 253) as u8).collect();
    let mut head = encode_header(TYPE_OUT, 4).to_vec();
    head.extend_from_slice(&data[..1000]);
    queue.memory().write(first, &head).expect("header and data");
    queue
        .memory()
        .write(second, &data[1000..])
        .expect("rest of the data");
    let id = queue
        .submit_raw(&[
            Descriptor::readable(first, 16 + 1000),
            Descriptor::readable(second, 1),
            Descriptor::readable(second + 1, 1047),
            Descriptor::writable(status, 1),
        ])
        .expect("submit");
    queue.wait(id, TIMEOUT).expect("completion");
    assert_eq!(
        queue.memory().read_vec(status, 1).expect("status"),
        [STATUS_OK]
    );
    assert_eq!(read_image(&fixture.image(), 4 * 512, 2048), data);
}

/// A loop block device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        require_root("a loop device");
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup (util-linux)");
        assert!(output.status.success(), "losetup: {output:?}");
        LoopDevice(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn serves_a_block_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .and_then(|file| file.set_len(IMAGE_BYTES))
        .expect("backing file");
    let device_path = LoopDevice::attach(&backing);
    let fixture = Fixture::start_on(dir, Path::new(&device_path.0), &[]);
    assert_eq!(fixture.status()["image_kind"], "block_device");
    let mut device = fixture.connect(&DeviceOptions::default());
    assert_eq!(device.capacity_bytes(), IMAGE_BYTES);
    let data = vec![0xc3u8; 8192];
    assert_eq!(device.write(64, &data).expect("write").status, STATUS_OK);
    assert_eq!(device.flush().expect("flush").status, STATUS_OK);
    assert_eq!(device.read(64, 8192).expect("read").data, data);
    assert_eq!(read_image(&backing, 64 * 512, 8192), data);
    assert_eq!(
        device.write_zeroes(64, 8, false).expect("zeroes").status,
        STATUS_OK
    );
    assert_eq!(device.discard(72, 8).expect("discard").status, STATUS_OK);
    assert_eq!(device.read(64, 8192).expect("read").data, vec![0u8; 8192]);
    drop(fixture);
}
