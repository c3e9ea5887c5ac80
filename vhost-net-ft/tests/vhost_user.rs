//! In-process tests with a real vhost-user frontend (`vhost-user-blk-load`'s session and
//! split rings), no VM: the daemon runs on a TAP in a throwaway network namespace, the test
//! plays QEMU and the guest driver. The kernel on the TAP side answers ARP, which gives a
//! full TX → TAP → kernel → TAP → RX round trip. Root only (namespaces and TAPs).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{status, Netns};
use daemon_util::test_support::{control, poll_until, Process, Wait, TIMEOUT};
use vhost::VringConfigData;
use vhost_user_blk_load::device::{negotiate, DeviceOptions};
use vhost_user_blk_load::queue::QueueSetup;
use vhost_user_blk_load::ring::RingLayout;
use vhost_user_blk_load::{BlkQueue, Descriptor, GuestRam, Session};

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
    _session: Session,
    control: PathBuf,
    _daemon: Process,
    netns: Netns,
    _dir: tempfile::TempDir,
}

impl Nic {
    fn start() -> Nic {
        let netns = Netns::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("n.sock");
        let control_path = dir.path().join("n.ctl");
        let daemon = netns.start_daemon(&[
            "--socket",
            socket.to_str().expect("utf-8"),
            "--tap",
            TAP,
            "--control",
            control_path.to_str().expect("utf-8"),
        ]);
        poll_until(TIMEOUT, "control socket", || {
            control(&control_path, "status").is_some()
        });
        netns.exec_ok(&["ip", "addr", "add", "10.79.0.1/24", "dev", TAP]);

        let mut session = Session::connect(&socket, WAIT).expect("connect");
        let options = DeviceOptions {
            wanted_features: F_VERSION_1 | F_MRG_RXBUF | F_EVENT_IDX | F_CSUM | F_PROTOCOL_FEATURES,
            ..DeviceOptions::default()
        };
        let negotiated = negotiate(&mut session, &options).expect("negotiate");
        session
            .set_features(negotiated.acked_features)
            .expect("set features");
        let memory = Arc::new(GuestRam::new(GUEST_BASE, MEMORY_BYTES).expect("guest RAM"));
        session
            .set_mem_table(&[memory.region_info().expect("region")])
            .expect("mem table");
        let event_idx = negotiated.acked_features & F_EVENT_IDX != 0;
        let rx = start_queue(&mut session, &memory, 0, event_idx);
        let tx = start_queue(&mut session, &memory, 1, event_idx);
        session.set_vring_enable(0, true).expect("enable rx");
        session.set_vring_enable(1, true).expect("enable tx");
        Nic {
            rx,
            tx,
            memory,
            _session: session,
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
    session
        .set_vring_num(queue_index, QUEUE_SIZE)
        .expect("vring num");
    session.set_vring_base(queue_index, 0).expect("vring base");
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
    session
        .set_vring_call(queue_index, queue.call_eventfd())
        .expect("vring call");
    session
        .set_vring_kick(queue_index, queue.kick_eventfd())
        .expect("vring kick");
    queue
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
