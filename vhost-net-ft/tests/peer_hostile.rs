//! Hostile input from the peer host: a standby daemon (no guest) on a TAP in a throwaway
//! network namespace gets, over an authenticated peer session, garbage message headers,
//! frames for a guest it does not have, frames for its LAN nobody asked it to relay, bad
//! and oversized frames, and absurd offloads. It drops and counts each, keeps serving, and
//! still relays the one good frame once asked. Root only (namespaces and TAPs).

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{status, Netns};
use daemon_util::test_support::{control, poll_until, TIMEOUT};
use replication_link::{LinkConfig, Psk, Session};
use vhost_net_ft::frame::{VnetHeader, FLAG_NEEDS_CSUM, GSO_TCPV4, VNET_HDR_LEN};
use vhost_net_ft::peer::{Direction, FrameBatch, PeerMessage, PeerState, LINK_FRAME_BYTES};

const TAP: &str = "vnftp0";
const MAC: &str = "52:54:00:00:00:07";
const KEY: &[u8] = b"peer hostile test key, 32 bytes.";
const DAEMON_LISTEN: &str = "127.0.0.1:7460";
const DAEMON_PEER: &str = "127.0.0.1:7461";

/// Connects a peer session to the daemon from inside `netns` (the session's threads stay
/// there).
fn connect_as_peer(netns: &Netns) -> Session {
    let path = format!("/run/netns/{}", netns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: setns on a namespace file we hold open; it affects this thread only, and
        // the threads the session starts from it.
        let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "setns");
        let mut config = LinkConfig::new(Psk::from_bytes(KEY).expect("key"), "hostA");
        config.max_frame_bytes = LINK_FRAME_BYTES;
        Session::connect(
            vec![DAEMON_LISTEN.parse().expect("address")],
            &format!("net:{MAC}"),
            config,
        )
        .expect("connect")
    })
    .join()
    .expect("connect thread")
}

fn header(message: &PeerMessage) -> Vec<u8> {
    postcard::to_allocvec(message).expect("encode")
}

/// A 12-byte header and an Ethernet broadcast frame of `len` bytes (cut short below 14).
fn frame(header: VnetHeader, len: usize) -> Vec<u8> {
    let mut bytes = header.encode()[..VNET_HDR_LEN].to_vec();
    let mut ethernet = vec![0u8; len.max(14)];
    ethernet[..6].copy_from_slice(&[0xff; 6]);
    ethernet[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 7]);
    ethernet[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental
    ethernet.truncate(len);
    bytes.extend(ethernet);
    bytes
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name}: {status}"))
}

#[test]
fn garbage_and_unwanted_frames_from_the_peer_are_dropped_and_counted() {
    let netns = Netns::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let psk = dir.path().join("pair.psk");
    std::fs::write(&psk, KEY).expect("psk");
    let control_path = dir.path().join("n.ctl");
    let socket = dir.path().join("n.sock");
    let _daemon = netns.start_daemon(&[
        "--socket",
        socket.to_str().expect("utf-8"),
        "--tap",
        TAP,
        "--mac",
        MAC,
        "--control",
        control_path.to_str().expect("utf-8"),
        "--uplink",
        "lo",
        "--listen",
        DAEMON_LISTEN,
        "--peer",
        DAEMON_PEER,
        "--psk-file",
        psk.to_str().expect("utf-8"),
        "--host-id",
        "hostB",
    ]);
    poll_until(TIMEOUT, "the daemon's control socket", || {
        control(&control_path, "status").is_some()
    });
    let peer = connect_as_peer(&netns);
    poll_until(TIMEOUT, "the peer session", || peer.peer_reachable());

    let good = frame(VnetHeader::default(), 60);
    let hostile: Vec<(Vec<u8>, Vec<u8>)> = vec![
        // Not a message at all.
        (vec![0xff, 0xff, 0xff], good.clone()),
        (Vec::new(), good.clone()),
        // For a guest this standby does not have.
        (
            header(&PeerMessage::Frame(Direction::ToGuest)),
            good.clone(),
        ),
        // For the LAN, but nobody asked for a relay.
        (header(&PeerMessage::Frame(Direction::ToLan)), good.clone()),
    ];
    for (app_header, payload) in &hostile {
        peer.send(app_header, payload.clone()).expect("send");
    }
    // Now ask for the relay, with offloads no TAP knows.
    let state = PeerState {
        uplink_up: Some(false),
        guest_attached: true,
        want_relay: true,
        offloads: u32::MAX,
    };
    peer.send(&header(&PeerMessage::State(state)), Vec::new())
        .expect("send");
    let bad_gso = VnetHeader {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 0,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let to_lan = header(&PeerMessage::Frame(Direction::ToLan));
    let bad_frames = vec![
        frame(VnetHeader::default(), 4), // shorter than an Ethernet header
        frame(bad_gso, 3000),            // segmentation with gso_size 0
        frame(VnetHeader::default(), 100_000), // longer than any frame
        vec![1, 2, 3],                   // shorter than the vnet header
    ];
    for bad in &bad_frames {
        peer.send(&to_lan, bad.clone()).expect("send");
    }
    // Batches: a bad frame among good ones costs only itself; a batch cut short delivers
    // the whole frames before the cut and drops the rest.
    let to_lan_batch = header(&PeerMessage::Frames(Direction::ToLan));
    let batch = |frames: &[&Vec<u8>]| {
        let mut batch = FrameBatch::default();
        for frame in frames {
            batch
                .append(frame.len(), |bytes| {
                    bytes.copy_from_slice(frame);
                    Ok::<(), ()>(())
                })
                .expect("append");
        }
        batch.take().0
    };
    let with_a_bad_frame = batch(&[&good, &frame(VnetHeader::default(), 4), &good]);
    let mut cut_short = batch(&[&good]);
    cut_short.extend_from_slice(&1000u32.to_le_bytes());
    cut_short.extend_from_slice(&good[..10]);
    let written_before = netns.statistic(TAP, "rx_packets");
    for payload in [with_a_bad_frame, cut_short] {
        peer.send(&to_lan_batch, payload).expect("send");
    }
    peer.send(&to_lan, good.clone()).expect("send");
    assert!(
        peer.flush(Duration::from_secs(10)).expect("flush"),
        "delivered"
    );

    // The bad frame of the first batch, the cut-short rest of the second.
    let dropped = hostile.len() as u64 + bad_frames.len() as u64 + 2;
    // Two of the first batch, one of the second, the single frame.
    let relayed = 4;
    poll_until(TIMEOUT, "the daemon to handle every message", || {
        let now = status(&control_path);
        counter(&now, "peer_rx_dropped") >= dropped
            && counter(&now, "relay_to_lan_packets") >= relayed
    });
    let end = status(&control_path);
    assert_eq!(counter(&end, "peer_rx_dropped"), dropped, "{end}");
    assert_eq!(counter(&end, "relay_to_lan_packets"), relayed, "{end}");
    assert_eq!(end["redundancy"]["relaying_for_peer"], true, "{end}");
    // Only the offloads a TAP knows were taken from the peer's word.
    let offloads = end["features"]["tap_offloads"].as_str().expect("offloads");
    let offloads = u32::from_str_radix(offloads.trim_start_matches("0x"), 16).expect("hex");
    assert_eq!(offloads & !0x1f, 0, "{end}");
    // The good frames reached the TAP (the kernel counts them as received there).
    poll_until(TIMEOUT, "the relayed frames on the TAP", || {
        netns.statistic(TAP, "rx_packets") >= written_before + relayed
    });
    drop(peer);
    assert!(
        control(&control_path, "status").is_some(),
        "the daemon still serves"
    );
}
