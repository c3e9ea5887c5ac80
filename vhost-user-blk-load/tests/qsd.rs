//! The frontend against a real qemu-storage-daemon vhost-user-blk export on a temporary image.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::QsdFixture;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_blk_load::blk::{
    bit, encode_header, feature, ID_BYTES, SECTOR_BYTES, STATUS_OK, STATUS_UNSUPP,
};
use vhost_user_blk_load::queue::QueueError;
use vhost_user_blk_load::{BlkDevice, Descriptor, DeviceOptions, Next, Request};

const IMAGE_BYTES: u64 = 64 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn open(fixture: &QsdFixture, options: &DeviceOptions) -> BlkDevice {
    BlkDevice::open(&fixture.socket, options).expect("open device")
}

#[test]
fn negotiates_virtio_and_protocol_features() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 2);
    let device = open(&fixture, &DeviceOptions::default());
    let negotiated = device.negotiated();
    assert_ne!(
        negotiated.offered_features & bit(feature::PROTOCOL_FEATURES),
        0
    );
    assert_eq!(negotiated.acked_features & !negotiated.offered_features, 0);
    assert!(negotiated.has_feature(feature::VERSION_1));
    assert!(negotiated.has_feature(feature::PROTOCOL_FEATURES));
    assert!(negotiated.has_feature(feature::FLUSH));
    assert!(
        !negotiated.has_feature(feature::EVENT_IDX),
        "not wanted by default"
    );
    assert!(
        !negotiated.has_feature(feature::LOG_ALL),
        "not wanted by default"
    );
    assert!(negotiated.has_protocol_feature(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    ));
    assert_eq!(negotiated.queue_num, 2);

    drop(device);
    let options = DeviceOptions::default().with_event_idx().with_indirect();
    let device = open(&fixture, &options);
    assert!(device.negotiated().has_feature(feature::EVENT_IDX));
    assert!(device.negotiated().has_feature(feature::INDIRECT_DESC));
}

#[test]
fn config_capacity_matches_the_image() {
    let odd_bytes = 10 * 1024 * 1024 + 7 * SECTOR_BYTES;
    let fixture = QsdFixture::start(odd_bytes, 2);
    let device = open(&fixture, &DeviceOptions::default());
    let config = device.config();
    assert_eq!(config.capacity, odd_bytes / SECTOR_BYTES);
    assert_eq!(device.capacity_bytes(), odd_bytes);
    assert_eq!(config.blk_size, 512);
    assert_eq!(config.num_queues, 2);
    assert!(config.seg_max > 0);
}

#[test]
fn write_then_read_round_trips_and_reaches_the_image() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 1);
    let mut device = open(&fixture, &DeviceOptions::default());
    for (sector, len) in [
        (0_u64, 512_usize),
        (8, 4096),
        (1000, 65536),
        (131_064, 4096),
    ] {
        let data = pattern(len, sector as u8);
        let written = device.write(sector, &data).expect("write");
        assert_eq!(written.status, STATUS_OK, "write at sector {sector}");
        let read = device.read(sector, len as u32).expect("read");
        assert_eq!(read.status, STATUS_OK, "read at sector {sector}");
        assert_eq!(read.data, data, "data at sector {sector}");
        assert_eq!(read.used_len, len as u32 + 1, "data and status byte");
    }
    assert_eq!(device.flush().expect("flush").status, STATUS_OK);
    let mut on_disk = vec![0; 65536];
    File::open(&fixture.image)
        .and_then(|image| image.read_exact_at(&mut on_disk, 1000 * SECTOR_BYTES))
        .expect("read image");
    assert_eq!(on_disk, pattern(65536, 1000_u64 as u8));
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 1);
    let mut device = open(&fixture, &DeviceOptions::default());
    assert_eq!(device.flush().expect("flush").status, STATUS_OK);
    let id = device.get_id().expect("get id");
    assert_eq!(id.status, STATUS_OK);
    assert_eq!(id.data.len(), ID_BYTES as usize);

    device.write(64, &pattern(8192, 3)).expect("write");
    let zeroed = device.write_zeroes(64, 8, false).expect("write zeroes");
    assert_eq!(zeroed.status, STATUS_OK);
    let read = device.read(64, 8192).expect("read");
    assert_eq!(&read.data[..4096], &[0; 4096][..]);
    assert_eq!(&read.data[4096..], &pattern(8192, 3)[4096..]);
    assert_eq!(device.discard(72, 8).expect("discard").status, STATUS_OK);
}

#[test]
fn many_requests_in_flight_complete() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 1);
    let mut device = open(&fixture, &DeviceOptions::default().with_event_idx());
    let queue = device.queue(0).expect("queue 0");
    let mut ids = Vec::new();
    for block in 0..40_u64 {
        let request = Request::Write {
            sector: block * 8,
            data: pattern(4096, block as u8),
        };
        ids.push(queue.enqueue(&request).expect("enqueue"));
    }
    queue.kick().expect("kick");
    assert_eq!(queue.in_flight(), 40);
    let mut completions = Vec::new();
    while completions.len() < ids.len() {
        completions.extend(queue.reap(1, Duration::from_secs(5)).expect("reap"));
    }
    assert!(completions
        .iter()
        .all(|done| done.status() == Some(STATUS_OK)));
    assert_eq!(queue.in_flight(), 0);
    for block in [0_u64, 17, 39] {
        let read = queue.read(block * 8, 4096).expect("read");
        assert_eq!(read.data, pattern(4096, block as u8));
    }
}

#[test]
fn indirect_descriptors_and_second_queue_work() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 2);
    let mut options = DeviceOptions::default().with_indirect().with_event_idx();
    options.queue_count = 2;
    let mut device = open(&fixture, &options);
    let queue = device.queue(1).expect("queue 1");
    let data = pattern(12288, 9);
    assert!(queue.write(4096, &data).expect("write").is_ok());
    assert_eq!(queue.read(4096, 12288).expect("read").data, data);
    assert_eq!(
        device.read(4096, 12288).expect("read on queue 0").data,
        data
    );
}

#[test]
fn dirty_log_marks_pages_the_backend_wrote() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 1);
    let mut device = open(&fixture, &DeviceOptions::default().with_dirty_log());
    assert!(device.negotiated().has_feature(feature::LOG_ALL));
    device.write(0, &pattern(8192, 1)).expect("write");
    let log = device.dirty_log().expect("log");
    log.clear();

    let queue = device.queue(0).expect("queue");
    let buffer = queue.alloc_buffer(8192).expect("buffer");
    let status = queue.alloc_buffer(16).expect("status");
    let header = queue.alloc_buffer(16).expect("header");
    queue
        .memory()
        .write(header, &encode_header(0, 0))
        .expect("header");
    let chain = [
        Descriptor::readable(header, 16),
        Descriptor::writable(buffer, 8192),
        Descriptor::writable(status, 1),
    ];
    let id = queue.submit_raw(&chain).expect("submit");
    queue.wait(id, Duration::from_secs(5)).expect("complete");
    let dirty = device.dirty_log().expect("log").dirty_pages();
    for page in [buffer, buffer + 4096, status] {
        assert!(dirty.contains(&page), "page {page:#x} not in {dirty:x?}");
    }
    assert!(!dirty.contains(&header), "the header page was only read");
}

#[test]
fn raw_chains_get_a_status_byte() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 1);
    let mut device = open(&fixture, &DeviceOptions::default());
    let queue = device.queue(0).expect("queue");
    let header = queue.alloc_buffer(16).expect("header");
    let status = queue.alloc_buffer(1).expect("status");
    let memory = queue.memory();
    memory
        .write(header, &encode_header(0xdead, 0))
        .expect("header");
    memory.write(status, &[0xff]).expect("status");
    let chain = [
        Descriptor::readable(header, 16),
        Descriptor::writable(status, 1),
    ];
    let id = queue.submit_raw(&chain).expect("submit");
    let completion = queue.wait(id, Duration::from_secs(5)).expect("complete");
    assert_eq!(completion.response, None);
    assert_eq!(
        queue.memory().read_vec(status, 1).expect("status"),
        [STATUS_UNSUPP]
    );
}

#[test]
fn a_request_the_backend_drops_times_out_and_the_queue_goes_on() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 1);
    let mut device = open(&fixture, &DeviceOptions::default());
    let queue = device.queue(0).expect("queue");
    let header = queue.alloc_buffer(16).expect("header");
    queue
        .memory()
        .write(header, &encode_header(0, 0))
        .expect("header");
    // Only a header: qemu-storage-daemon logs "missing headers" and never completes it.
    let id = queue
        .submit_raw(&[Descriptor::readable(header, 16)])
        .expect("submit");
    let started = Instant::now();
    let error = queue
        .wait(id, Duration::from_millis(300))
        .expect_err("no completion");
    assert!(matches!(error, QueueError::Timeout { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(queue.read(0, 512).expect("still serving").is_ok());
}

#[test]
fn a_dead_backend_is_an_error_not_a_hang() {
    let mut fixture = QsdFixture::start(IMAGE_BYTES, 1);
    let options = DeviceOptions {
        timeout_ms: 20_000,
        ..DeviceOptions::default()
    };
    let mut device = open(&fixture, &options);
    assert!(device.read(0, 512).expect("read").is_ok());
    let pid = fixture.daemon.pid();
    fixture.daemon.stop();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let started = Instant::now();
    assert!(device.read(0, 512).is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "noticed the hangup only after {:?}",
        started.elapsed()
    );
}

#[test]
fn connecting_to_a_missing_socket_times_out() {
    let directory = tempfile::tempdir().expect("tempdir");
    let options = DeviceOptions {
        timeout_ms: 200,
        ..DeviceOptions::default()
    };
    let started = Instant::now();
    let result = BlkDevice::open(&directory.path().join("nobody.sock"), &options);
    assert!(result.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn malformed_rings_make_qemu_storage_daemon_hang_up_and_we_notice() {
    let fixture = QsdFixture::start(IMAGE_BYTES, 1);
    let mut device = open(&fixture, &DeviceOptions::default());
    let queue = device.queue(0).expect("queue");
    let header = queue.alloc_buffer(16).expect("header");
    queue
        .memory()
        .write(header, &encode_header(0, 0))
        .expect("header");
    let looped = [
        Descriptor::readable(header, 16),
        Descriptor::writable(header + 64, 1).with_next(Next::Position(0)),
    ];
    let id = queue.submit_raw(&looped).expect("submit");
    let started = Instant::now();
    // qemu-storage-daemon: "vu_panic: Incorrect order for descriptors", then it drops us.
    let error = queue
        .wait(id, Duration::from_secs(10))
        .expect_err("no completion for a loop");
    assert!(matches!(error, QueueError::BackendGone), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(device);

    let mut device = open(&fixture, &DeviceOptions::default());
    device
        .queue(0)
        .expect("queue")
        .publish_raw_head(500)
        .expect("publish");
    assert!(matches!(
        device.queue(0).expect("queue").read(0, 512),
        Err(QueueError::BackendGone)
    ));
    drop(device);
    let mut device = open(&fixture, &DeviceOptions::default());
    assert!(device.read(0, 512).expect("a new session works").is_ok());
}
