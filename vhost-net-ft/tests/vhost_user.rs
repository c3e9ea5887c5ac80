//! In-process tests with a real vhost-user frontend (`vhost-user-blk-load`'s session and
//! split rings), no VM: the daemon runs on a TAP in a throwaway network namespace, the test
//! plays QEMU and the guest driver. The kernel on the TAP side answers ARP, which gives a
//! full TX → TAP → kernel → TAP → RX round trip. Root only (namespaces and TAPs).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{status, Netns};
use daemon_util::test_support::{control, control_json, poll_until, Process, Wait, TIMEOUT};
use vhost::VringConfigData;
use vhost_user_blk_load::device::{negotiate, DeviceOptions};
use vhost_user_blk_load::queue::QueueSetup;
use vhost_user_blk_load::ring::RingLayout;
use vhost_user_blk_load::{BlkQueue, Descriptor, DirtyLog, GuestRam, Session};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const GUEST_IP: [u8; 4] = [10, 79, 0, 2];
const HOST_IP: [u8; 4] = [10, 79, 0, 1];
const TAP: &str = "vnft0";
const QUEUE_SIZE: u16 = 64;
const MEMORY_BYTES: u64 = 16 << 20;
const GUEST_BASE: u64 = 1 << 30;
const WAIT: Duration = Duration::from_secs(10);
const RX_BUFFER_BYTES: u32 = 2048;

// Feature bits the test driver accepts.
const F_CSUM: u64 = 1 << 0;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_EVENT_IDX: u64 = 1 << 29;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;

/// A daemon on a TAP in its own namespace, and a driver with RX (queue 0) and TX (queue 1).
struct Nic {
    rx: BlkQueue,
    tx: BlkQueue,
    memory: Arc<GuestRam>,
    /// The migration log, when the test asked for one.
    log: Option<DirtyLog>,
    session: Session,
    control: PathBuf,
    _daemon: Process,
    netns: Netns,
    _dir: tempfile::TempDir,
}

impl Nic {
    fn start() -> Nic {
        Nic::start_with(&[], false)
    }

    /// [`Nic::start`] with `extra` daemon arguments, and with LOG_ALL and a migration log
    /// (`SET_LOG_BASE`) if `dirty_log`.
    fn start_with(extra: &[&str], dirty_log: bool) -> Nic {
        Nic::start_full(extra, dirty_log, true)
    }

    /// [`Nic::start_with`], offering EVENT_IDX or not.
    fn start_full(extra: &[&str], dirty_log: bool, event_idx: bool) -> Nic {
        let netns = Netns::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("n.sock");
        let control_path = dir.path().join("n.ctl");
        let mut args = vec![
            "--socket",
            socket.to_str().expect("utf-8"),
            "--tap",
            TAP,
            "--control",
            control_path.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let daemon = netns.start_daemon(&args);
        poll_until(TIMEOUT, "control socket", || {
            control(&control_path, "status").is_some()
        });
        netns.exec_ok(&["ip", "addr", "add", "10.79.0.1/24", "dev", TAP]);

        let mut session = Session::connect(&socket, WAIT).expect("connect");
        let mut wanted_features = F_VERSION_1 | F_MRG_RXBUF | F_CSUM | F_PROTOCOL_FEATURES;
        if event_idx {
            wanted_features |= F_EVENT_IDX;
        }
        let mut options = DeviceOptions {
            wanted_features,
            ..DeviceOptions::default()
        };
        if dirty_log {
            options = options.with_dirty_log();
        }
        let negotiated = negotiate(&mut session, &options).expect("negotiate");
        session
            .set_features(negotiated.acked_features)
            .expect("set features");
        let memory = Arc::new(GuestRam::new(GUEST_BASE, MEMORY_BYTES).expect("guest RAM"));
        session
            .set_mem_table(&[memory.region_info().expect("region")])
            .expect("mem table");
        let log = dirty_log.then(|| {
            let log = DirtyLog::new(memory.end_address()).expect("dirty log");
            session.set_log_base(&log).expect("set log base");
            log
        });
        let event_idx = negotiated.acked_features & F_EVENT_IDX != 0;
        let rx = start_queue(&mut session, &memory, 0, event_idx);
        let tx = start_queue(&mut session, &memory, 1, event_idx);
        session.set_vring_enable(0, true).expect("enable rx");
        session.set_vring_enable(1, true).expect("enable tx");
        Nic {
            rx,
            tx,
            memory,
            log,
            session,
            control: control_path,
            _daemon: daemon,
            netns,
            _dir: dir,
        }
    }

    fn status(&self) -> serde_json::Value {
        status(&self.control)
    }

    /// Sends `frame` with a zero virtio-net header, split into header and frame descriptors;
    /// waits until the device returned the chain.
    fn send(&mut self, frame: &[u8]) {
        let header = self.tx.alloc_buffer(4096).expect("header buffer");
        let data = self.tx.alloc_buffer(4096).expect("frame buffer");
        self.memory.write(header, &[0u8; 12]).expect("write header");
        self.memory.write(data, frame).expect("write frame");
        self.send_raw(&[
            Descriptor::readable(header, 12),
            Descriptor::readable(data, frame.len() as u32),
        ]);
    }

    /// Posts any chain on the TX queue and waits until the device returned it.
    fn send_raw(&mut self, chain: &[Descriptor]) {
        let id = self.tx.submit_raw(chain).expect("submit");
        let done = self.tx.wait(id, WAIT).expect("TX chain returned");
        assert_eq!(done.used_len, 0, "TX chains come back empty");
    }

    /// Posts `count` receive buffers; returns their addresses by request id.
    fn post_rx_buffers(&mut self, count: usize) -> Vec<(u64, u64)> {
        (0..count)
            .map(|_| {
                let address = self
                    .rx
                    .alloc_buffer(u64::from(RX_BUFFER_BYTES))
                    .expect("rx buffer");
                let id = self
                    .rx
                    .submit_raw(&[Descriptor::writable(address, RX_BUFFER_BYTES)])
                    .expect("post rx buffer");
                (id, address)
            })
            .collect()
    }

    /// Waits for the next received frame whose EtherType is ARP; returns header and frame.
    fn receive_arp(&mut self, buffers: &[(u64, u64)]) -> (Vec<u8>, Vec<u8>) {
        loop {
            let done = self.rx.reap(1, WAIT).expect("a received frame");
            for completion in done {
                let address = buffers
                    .iter()
                    .find(|(id, _)| *id == completion.id)
                    .map(|(_, address)| *address)
                    .expect("a posted buffer");
                let bytes = self
                    .memory
                    .read_vec(address, completion.used_len as usize)
                    .expect("read buffer");
                let (header, frame) = bytes.split_at(12);
                if frame.get(12..14) == Some(&[0x08, 0x06]) {
                    return (header.to_vec(), frame.to_vec());
                }
            }
        }
    }
}

fn start_queue(
    session: &mut Session,
    memory: &Arc<GuestRam>,
    index: u16,
    event_idx: bool,
) -> BlkQueue {
    let share = MEMORY_BYTES / 2;
    let start = GUEST_BASE + u64::from(index) * share;
    let layout = RingLayout::at(start, QUEUE_SIZE);
    let ring_bytes = RingLayout::bytes_needed(QUEUE_SIZE);
    let setup = QueueSetup {
        index,
        layout,
        arena_start: start + ring_bytes,
        arena_len: share - ring_bytes,
        event_idx,
        indirect: false,
        timeout: WAIT,
    };
    let socket = session.socket_clone().expect("socket clone");
    let queue = BlkQueue::new(memory.clone(), setup, socket).expect("queue");
    let queue_index = usize::from(index);
    set_up_vring(session, memory, index, 0);
    session
        .set_vring_call(queue_index, queue.call_eventfd())
        .expect("vring call");
    session
        .set_vring_kick(queue_index, queue.kick_eventfd())
        .expect("vring kick");
    queue
}

/// SET_VRING_NUM, SET_VRING_BASE (`base`) and SET_VRING_ADDR of queue `index` (its ring at
/// the place [`start_queue`] gives it).
fn set_up_vring(session: &mut Session, memory: &Arc<GuestRam>, index: u16, base: u16) {
    let share = MEMORY_BYTES / 2;
    let layout = RingLayout::at(GUEST_BASE + u64::from(index) * share, QUEUE_SIZE);
    let queue_index = usize::from(index);
    session
        .set_vring_num(queue_index, QUEUE_SIZE)
        .expect("vring num");
    session
        .set_vring_base(queue_index, base)
        .expect("vring base");
    let config = VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: QUEUE_SIZE,
        flags: 0,
        desc_table_addr: memory.host_address(layout.descriptors).expect("desc"),
        used_ring_addr: memory.host_address(layout.used).expect("used"),
        avail_ring_addr: memory.host_address(layout.avail).expect("avail"),
        log_addr: None,
    };
    session
        .set_vring_addr(queue_index, &config)
        .expect("vring addr");
}

/// "Who has 10.79.0.1? Tell 10.79.0.2", from the guest, padded to 60 bytes.
fn arp_request() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend(GUEST_MAC);
    frame.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend(GUEST_MAC);
    frame.extend(GUEST_IP);
    frame.extend([0; 6]);
    frame.extend(HOST_IP);
    frame.resize(60, 0);
    frame
}

fn assert_arp_reply(header: &[u8], frame: &[u8]) {
    assert_eq!(header[10..12], [1, 0], "num_buffers is 1");
    assert_eq!(frame[0..6], GUEST_MAC, "addressed to the guest");
    assert_eq!(frame[20..22], [0, 2], "an ARP reply");
    assert_eq!(frame[28..32], HOST_IP, "from the TAP's address");
}

#[test]
fn arp_round_trip_through_the_tap() {
    let mut nic = Nic::start();
    let buffers = nic.post_rx_buffers(8);
    nic.send(&arp_request());
    let (header, frame) = nic.receive_arp(&buffers);
    assert_arp_reply(&header, &frame);
    let status = nic.status();
    assert_eq!(status["connected"], true);
    assert_eq!(status["tx_packets"], 1);
    assert_eq!(status["tx_bytes"], 60);
    assert!(status["rx_packets"].as_u64() >= Some(1), "{status}");
    assert_eq!(status["tx_dropped_malformed"], 0);
    let acked = status["features"]["acked_names"].to_string();
    assert!(
        acked.contains("MRG_RXBUF") && acked.contains("EVENT_IDX"),
        "{acked}"
    );
    assert_eq!(status["features"]["header_len_bytes"], 12);
}

#[test]
fn malformed_tx_chains_are_dropped_counted_and_survived() {
    let mut nic = Nic::start();
    let buffers = nic.post_rx_buffers(8);
    let sent_before = nic.netns.statistic(TAP, "rx_packets");
    let page = nic.tx.alloc_buffer(128 * 1024).expect("buffer");
    let header_at = |flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16| {
        let mut header = vec![flags, gso_type];
        header.extend(hdr_len.to_le_bytes());
        header.extend(gso_size.to_le_bytes());
        header.extend([0u8; 6]);
        header
    };
    // 1. A write-only descriptor in a TX chain.
    nic.memory.write(page, &[0u8; 12]).expect("write");
    nic.memory.write(page + 12, &arp_request()).expect("write");
    nic.send_raw(&[
        Descriptor::readable(page, 12),
        Descriptor::writable(page + 12, 60),
    ]);
    // 2. Shorter than the virtio-net header.
    nic.send_raw(&[Descriptor::readable(page, 8)]);
    // 3. Longer than 64 KiB plus headers.
    nic.send_raw(&[Descriptor::readable(page, 12 + 70_000)]);
    // 4. An unknown gso_type.
    let staging = page + 100_000;
    nic.memory
        .write(staging, &header_at(0, 0x42, 0, 0))
        .expect("write");
    nic.memory
        .write(staging + 12, &arp_request())
        .expect("write");
    nic.send_raw(&[Descriptor::readable(staging, 72)]);
    // 5. TCPv4 segmentation (not negotiated) with hdr_len beyond the frame.
    nic.memory
        .write(staging, &header_at(1, 1, 200, 1448))
        .expect("write");
    nic.send_raw(&[Descriptor::readable(staging, 72)]);
    // 6. A checksum request outside the frame (CSUM is negotiated).
    let mut csum = header_at(1, 0, 0, 0);
    csum[6..8].copy_from_slice(&58u16.to_le_bytes());
    csum[8..10].copy_from_slice(&6u16.to_le_bytes());
    nic.memory.write(staging, &csum).expect("write");
    nic.send_raw(&[Descriptor::readable(staging, 72)]);

    let status = nic.status();
    assert_eq!(status["tx_dropped_malformed"], 6, "{status}");
    assert_eq!(status["tx_packets"], 0);
    assert_eq!(
        nic.netns.statistic(TAP, "rx_packets"),
        sent_before,
        "nothing malformed reached the TAP"
    );
    // The queue and the daemon still work.
    nic.send(&arp_request());
    let (header, frame) = nic.receive_arp(&buffers);
    assert_arp_reply(&header, &frame);
    assert_eq!(nic.status()["tx_packets"], 1);
}

#[test]
fn rx_waits_for_buffers_instead_of_dropping() {
    let mut nic = Nic::start();
    // No receive buffers yet: the ARP reply must wait, not be dropped.
    nic.send(&arp_request());
    poll_until(TIMEOUT, "RX to wait for buffers", || {
        nic.status()["rx_waits_for_buffers"].as_u64() >= Some(1)
    });
    // For 200 ms the frame waits: it is neither delivered nor dropped.
    Wait::up_to(Duration::from_millis(200)).sample(|| {
        let status = nic.status();
        assert_eq!(status["rx_dropped_no_buffers"], 0, "{status}");
    });
    let status = nic.status();
    assert_eq!(status["rx_packets"], 0, "{status}");
    assert_eq!(status["rx_dropped_no_buffers"], 0);
    // Posting buffers (with a kick, as EVENT_IDX asked for) releases the frame.
    let buffers = nic.post_rx_buffers(4);
    let (header, frame) = nic.receive_arp(&buffers);
    assert_arp_reply(&header, &frame);
    assert_eq!(nic.status()["rx_dropped_no_buffers"], 0);
}

/// QEMU's `stop` and `cont` (a Level 3 checkpoint): `GET_VRING_BASE` stops the RX ring and
/// takes its call fd; on `cont` QEMU sets the ring up again and sends its kick before its
/// call fd. The library runs the worker at the kick, which hands the guest the frame that
/// reached the TAP meanwhile at once, with no call fd to interrupt it through: the guest
/// must still be interrupted once the call fd comes (the bug: it was not, and a guest saw
/// such a frame only when a later one interrupted it, e.g. its sender's retransmission).
#[test]
fn a_frame_delivered_before_the_call_fd_is_set_again_still_interrupts_the_guest() {
    // Without EVENT_IDX every used entry asks for an interrupt (the driver never masks).
    let mut nic = Nic::start_full(&[], false, false);
    nic.post_rx_buffers(8);
    // The guest's address is known on the TAP side: a datagram for it goes out at once.
    let guest_mac = GUEST_MAC.map(|byte| format!("{byte:02x}")).join(":");
    nic.netns.exec_ok(&[
        "ip",
        "neigh",
        "replace",
        "10.79.0.2",
        "lladdr",
        &guest_mac,
        "dev",
        TAP,
        "nud",
        "permanent",
    ]);

    // `stop`: the RX ring stops and loses its call fd.
    let base = nic.session.get_vring_base(0).expect("GET_VRING_BASE");
    let delivered_before = nic.status()["rx_packets"].as_u64().expect("rx_packets");
    // (The TAP counts a frame when the daemon reads it: nothing to wait for here. Whenever
    // it arrives, it is delivered before the call fd is set again, which is what counts.)
    nic.netns
        .exec_ok(&["bash", "-c", "echo checkpoint > /dev/udp/10.79.0.2/9"]);

    // `cont`, in QEMU's order: the ring, its kick (the frame is delivered now), its call fd.
    let base = u16::try_from(base).expect("a ring index");
    set_up_vring(&mut nic.session, &nic.memory, 0, base);
    nic.session
        .set_vring_kick(0, nic.rx.kick_eventfd())
        .expect("SET_VRING_KICK");
    poll_until(TIMEOUT, "the waiting frame to be delivered", || {
        nic.status()["rx_packets"].as_u64() > Some(delivered_before)
    });
    // Interrupts from before the stop are of no interest.
    let _ = nic.rx.call_eventfd().read();
    nic.session
        .set_vring_call(0, nic.rx.call_eventfd())
        .expect("SET_VRING_CALL");
    poll_until(TIMEOUT, "the guest to be interrupted for the frame", || {
        nic.rx.call_eventfd().read().is_ok()
    });
    let status = nic.status();
    assert!(
        status["interrupts_deferred"].as_u64() >= Some(1),
        "{status}"
    );
}

/// A 1514-byte frame from the guest to a MAC nobody has (the kernel counts and drops it).
fn bulk_frame() -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01];
    frame.extend(GUEST_MAC);
    frame.extend([0x88, 0xb5]);
    frame.resize(1514, 0);
    frame
}

#[test]
fn a_full_output_buffer_leaves_frames_in_the_tx_ring_until_a_commit() {
    const LIMIT_BYTES: u64 = 1 << 20;
    const FRAME_BYTES: u64 = 12 + 1514;
    let mut nic = Nic::start_with(&["--output-buffer-bytes", "1048576"], false);
    let on = control_json(&nic.control, "output-commit on 0").expect("answer");
    assert_eq!(on["output_commit"]["enabled"], true, "{on}");
    let on_tap_before = nic.netns.statistic(TAP, "rx_packets");

    // The guest sends until the daemon stops taking frames: the buffer is full and the
    // rest stays in the TX ring.
    let buffer = nic.tx.alloc_buffer(4096).expect("frame buffer");
    nic.memory.write(buffer, &[0u8; 12]).expect("header");
    nic.memory.write(buffer + 12, &bulk_frame()).expect("frame");
    let chain = [Descriptor::readable(buffer, FRAME_BYTES as u32)];
    let mut returned = 0u64;
    poll_until(WAIT, "the output buffer to fill", || {
        while nic.tx.free_descriptors() > 0 {
            nic.tx.submit_raw(&chain).expect("submit");
        }
        returned += nic.tx.reap(0, Duration::ZERO).expect("reap").len() as u64;
        nic.status()["output_commit"]["buffer_full_waits"].as_u64() >= Some(1)
    });
    returned += nic.tx.reap(0, Duration::ZERO).expect("reap").len() as u64;
    let status = nic.status();
    let output = &status["output_commit"];
    let held = output["held_frames"].as_u64().expect("held_frames");
    let held_bytes = output["held_bytes"].as_u64().expect("held_bytes");
    assert_eq!(held, returned, "every returned chain is held: {status}");
    assert!(
        (LIMIT_BYTES..LIMIT_BYTES + FRAME_BYTES).contains(&held_bytes),
        "at most one frame over the limit: {status}"
    );
    let waiting = nic.tx.in_flight() as u64;
    assert!(waiting > 0, "frames wait in the guest's ring: {status}");
    assert_eq!(nic.netns.statistic(TAP, "rx_packets"), on_tap_before);
    // While full, the daemon takes nothing more and drops nothing.
    Wait::up_to(Duration::from_millis(200)).sample(|| {
        assert_eq!(nic.tx.reap(0, Duration::ZERO).expect("reap").len(), 0);
        assert_eq!(nic.netns.statistic(TAP, "rx_packets"), on_tap_before);
    });

    // The commit releases epoch 0 in one go and wakes the queue: the waiting frames are
    // taken (into epoch 1).
    control_json(&nic.control, "epoch-end 0").expect("epoch-end");
    let committed = control_json(&nic.control, "commit 0").expect("commit");
    assert_eq!(committed["released_frames"], held, "{committed}");
    let rest = nic
        .tx
        .reap(waiting as usize, WAIT)
        .expect("the waiting frames are taken after the commit");
    assert_eq!(rest.len() as u64, waiting);
    poll_until(WAIT, "epoch 0 on the TAP", || {
        nic.netns.statistic(TAP, "rx_packets") >= on_tap_before + held
    });
    let status = nic.status();
    assert_eq!(status["output_commit"]["held_frames"], waiting, "{status}");
    assert_eq!(status["output_commit"]["current_epoch"], 1, "{status}");

    let off = control_json(&nic.control, "output-commit off").expect("off");
    assert_eq!(off["released_frames"], waiting, "{off}");
    poll_until(WAIT, "everything on the TAP", || {
        nic.netns.statistic(TAP, "rx_packets") >= on_tap_before + held + waiting
    });
    let status = nic.status();
    assert_eq!(status["output_commit"]["buffer_full_waits"], 1, "{status}");
    assert_eq!(status["output_commit"]["held_bytes"], 0, "{status}");
    assert_eq!(status["tx_packets"], held + waiting, "{status}");
    assert_eq!(status["tap_write_errors"], 0, "{status}");
}

/// The ranges `dirty-pages` reports for the file of guest RAM (which starts at its offset 0).
fn dirty_ranges(nic: &Nic) -> Vec<(u64, u64)> {
    let region = nic.memory.region_info().expect("region");
    let ram = std::fs::metadata(format!("/proc/self/fd/{}", region.mmap_handle)).expect("stat");
    let reply = control_json(&nic.control, "dirty-pages").expect("dirty-pages");
    assert_eq!(reply["page_size"], 4096, "{reply}");
    let files = reply["files"].as_array().expect("files");
    assert!(files.len() <= 1, "one RAM file: {reply}");
    files
        .iter()
        .inspect(|file| {
            assert_eq!(file["dev"], ram.dev(), "{reply}");
            assert_eq!(file["ino"], ram.ino(), "{reply}");
        })
        .flat_map(|file| file["ranges"].as_array().expect("ranges").clone())
        .map(|range| {
            (
                range[0].as_u64().expect("offset"),
                range[1].as_u64().expect("length"),
            )
        })
        .collect()
}

fn reported(ranges: &[(u64, u64)], address: u64) -> bool {
    let offset = address - GUEST_BASE;
    ranges
        .iter()
        .any(|&(start, len)| (start..start + len).contains(&offset))
}

#[test]
fn dirty_pages_and_the_migration_log_both_see_what_the_daemon_wrote() {
    let mut nic = Nic::start_with(&[], true);
    let buffers = nic.post_rx_buffers(8);
    // Clears what setting up wrote.
    dirty_ranges(&nic);

    let header = nic.tx.alloc_buffer(4096).expect("header buffer");
    nic.memory
        .write(header, &[0u8; 12])
        .and_then(|()| nic.memory.write(header + 12, &arp_request()))
        .expect("write the request");
    nic.send_raw(&[Descriptor::readable(header, 72)]);
    // Every buffer the daemon filled until the ARP reply.
    let mut filled = Vec::new();
    loop {
        let done = nic.rx.reap(1, WAIT).expect("a received frame");
        let mut arp = false;
        for completion in done {
            let address = buffers
                .iter()
                .find(|(id, _)| *id == completion.id)
                .map(|(_, address)| *address)
                .expect("a posted buffer");
            let bytes = nic
                .memory
                .read_vec(address, completion.used_len as usize)
                .expect("read buffer");
            arp |= bytes.get(24..26) == Some(&[0x08, 0x06]);
            filled.push(address);
        }
        if arp {
            break;
        }
    }

    let ranges = dirty_ranges(&nic);
    let log = nic.log.as_ref().expect("dirty log");
    let written = filled
        .iter()
        .copied()
        .chain([nic.rx.layout().used, nic.tx.layout().used]);
    for address in written {
        assert!(
            reported(&ranges, address),
            "{address:#x} not in dirty-pages: {ranges:?}"
        );
        assert!(
            log.is_dirty(address),
            "{address:#x} not in the migration log"
        );
    }
    // The daemon only read the TX buffer.
    assert!(!reported(&ranges, header), "{ranges:?}");
    assert!(!log.is_dirty(header));
    for pair in ranges.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 < pair[1].0,
            "sorted, merged: {ranges:?}"
        );
    }
}
