//! `vhost-net-ft`'s Level 3 parts with a real QEMU guest (TCG) on hostA's VM bridge and a
//! LAN peer (the `client` namespace): output commit holds the guest's frames until their
//! epoch commits, then releases them in order; `dirty-pages` reports the guest pages the
//! daemon wrote (the RX buffers it filled).

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ftvm_tests::blk::status_json;
use ftvm_tests::guest::{Guest, GuestConfig, Nic};
use ftvm_tests::hosts::Hosts;
use ftvm_tests::net::{connect_in, EchoCapture, EchoRequest, ECHO_PORT};
use ftvm_tests::nic_daemon::{GUEST_IP, GUEST_MAC};
use ftvm_tests::paths;
use ftvm_tests::process::Process;
use ftvm_tests::qmp::Qmp;
use ftvm_tests::scratch_dir;
use ftvm_tests::wait::{poll_until, TIMEOUT};
use serde_json::Value;

/// The client namespace's LAN address (`ci/hosts.sh`).
const CLIENT_IP: &str = "10.77.0.4";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const PATIENCE: Duration = Duration::from_secs(60);
/// The guest's TCP port whose program never reads (`sleep`).
const SILENT_PORT: u16 = 7001;
/// Bytes sent to it.
const STREAM_BYTES: usize = 28_000;

/// The NIC daemon on hostA's bridge, with its control socket.
fn start_daemon(hosts: &Hosts, dir: &Path) -> (Process, PathBuf) {
    let socket = dir.join("net.sock");
    let control = dir.join("net.ctl");
    let mut command = hosts.command("hostA", paths::binary("vhost-net-ft"));
    command
        .arg("--socket")
        .arg(&socket)
        .args(["--bridge", "vmbr0", "--mac", GUEST_MAC, "--control"])
        .arg(&control)
        .args(["--output-buffer-bytes", "4194304"]);
    let daemon = Process::spawn("vhost-net-ft", command, &dir.join("net.log"));
    poll_until(TIMEOUT, "vhost-net-ft's sockets", || {
        socket.exists() && control.exists()
    });
    (daemon, control)
}

/// A guest on hostA with `script` after its NIC is up (it prints `NET-UP` first).
fn guest_config(hosts: &Hosts, dir: &Path, name: &str, script: &str) -> GuestConfig {
    let script = format!(
        "ip link set eth0 up\n\
         ip addr add {GUEST_IP}/24 dev eth0\n\
         echo \"NET-UP $(cat /sys/class/net/eth0/address)\"\n\
         {script}"
    );
    let mut config = GuestConfig::new(name, &script);
    config.memory_mb = 256;
    config.netns = Some(hosts.namespace("hostA"));
    config.nics.push(Nic {
        socket: dir.join("net.sock"),
        mac: GUEST_MAC.into(),
        queues: 1,
    });
    config
}

/// A control command's answer (a refusal is `{"error": …}`).
fn command(control: &Path, line: &str) -> Value {
    daemon_util::test_support::control_json(control, line)
        .unwrap_or_else(|| panic!("vhost-net-ft does not answer {line:?}"))
}

fn output_commit(control: &Path) -> Value {
    let status = status_json(control).expect("vhost-net-ft answers status");
    status["output_commit"].clone()
}

/// Waits until at least `frames` frames are held.
fn wait_held(control: &Path, frames: u64) -> Value {
    let mut last = Value::Null;
    let held = ftvm_tests::wait::Wait::up_to(PATIENCE).poll(|| {
        last = output_commit(control);
        (last["held_frames"].as_u64() >= Some(frames)).then(|| last.clone())
    });
    held.unwrap_or_else(|| panic!("never {frames} frames held: {last}"))
}

/// Waits until the capture holds more than `count` of the guest's echo requests; their
/// number.
fn poll_for_more(capture: &EchoCapture, count: usize) -> usize {
    let mut seen = 0;
    poll_until(PATIENCE, "more of the guest's pings at the client", || {
        seen = capture.from(GUEST_IP).len();
        seen > count
    });
    seen
}

fn refused(control: &Path, line: &str, reason: &str) {
    let reply = command(control, line);
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "{line}: {reply}");
}

/// Each request's sequence number is one more than the previous one's: none lost, none
/// reordered, none twice.
fn assert_consecutive(requests: &[EchoRequest]) {
    for pair in requests.windows(2) {
        assert_eq!(
            pair[1].sequence,
            pair[0].sequence.wrapping_add(1),
            "echo requests out of order or lost: {requests:?}"
        );
    }
}

#[test]
fn output_commit_holds_the_guests_frames_until_their_epoch_commits() {
    let hosts = Hosts::up();
    let dir = scratch_dir("net-output-commit");
    let (_daemon, control) = start_daemon(&hosts, dir.path());
    let capture = EchoCapture::start(&hosts.namespace("client"));
    let config = guest_config(
        &hosts,
        dir.path(),
        "net-output-commit",
        &format!(
            "ping -q -i 0.2 {CLIENT_IP} >/dev/null &\n\
             nc -ll -p {ECHO_PORT} -e cat\n"
        ),
    );
    let guest = Guest::boot(&config, dir.path());
    guest.wait_for_line(BOOT_TIMEOUT, |line| line.starts_with("NET-UP"));
    poll_until(PATIENCE, "the guest's pings reach the client", || {
        capture.from(GUEST_IP).len() >= 3
    });

    let on = command(&control, "output-commit on 1");
    assert_eq!(on["output_commit"]["current_epoch"], 1, "{on}");
    // Once frames are held, whatever left before `on` has arrived.
    wait_held(&control, 3);
    let before = capture.from(GUEST_IP).len();
    let held = wait_held(&control, 6);
    assert_eq!(
        capture.from(GUEST_IP).len(),
        before,
        "held frames left: {held}"
    );

    let ended = command(&control, "epoch-end 1");
    assert_eq!(ended["output_commit"]["current_epoch"], 2, "{ended}");
    let epoch_1 = ended["output_commit"]["held_frames"]
        .as_u64()
        .expect("held_frames");
    refused(&control, "commit 2", "has not ended");
    refused(&control, "epoch-end 1", "not the current epoch");
    refused(&control, "epoch-end 3", "not the current epoch");
    refused(&control, "output-commit on 7", "already on");
    wait_held(&control, epoch_1 + 2);
    assert_eq!(
        capture.from(GUEST_IP).len(),
        before,
        "epoch 1 left uncommitted"
    );

    let commit_1_at = Instant::now();
    let committed = command(&control, "commit 1");
    assert_eq!(committed["released_frames"], epoch_1, "{committed}");
    assert_eq!(committed["output_commit"]["committed_epoch"], 1);
    assert!(
        committed["output_commit"]["held_frames"].as_u64() >= Some(2),
        "epoch 2's frames stay held: {committed}"
    );
    poll_until(PATIENCE, "epoch 1's pings reach the client", || {
        capture.from(GUEST_IP).len() > before
    });

    command(&control, "epoch-end 2");
    let commit_2_at = Instant::now();
    let committed = command(&control, "commit 2");
    assert!(
        committed["released_frames"].as_u64() >= Some(2),
        "{committed}"
    );
    let after_2 = poll_for_more(&capture, before + 1);

    let off = command(&control, "output-commit off");
    assert_eq!(off["output_commit"]["enabled"], false, "{off}");
    assert_eq!(off["output_commit"]["held_frames"], 0, "{off}");
    poll_for_more(&capture, after_2 + 3);

    // Arrival times are taken when the capture thread reads a request, so they can only be
    // late: "not before its commit" holds whatever the load.
    let requests = capture.from(GUEST_IP);
    assert_consecutive(&requests);
    let held = &requests[before..];
    assert!(
        held.iter().all(|request| request.at >= commit_1_at),
        "a held frame left before its epoch's commit"
    );
    let before_commit_2 = held
        .iter()
        .filter(|request| request.at < commit_2_at)
        .count() as u64;
    assert!(
        before_commit_2 <= epoch_1,
        "{before_commit_2} echo requests arrived before commit 2, epoch 1 had {epoch_1} frames"
    );
    let status = status_json(&control).expect("status");
    assert_eq!(status["output_commit"]["buffer_full_waits"], 0, "{status}");
    assert_eq!(status["tap_write_errors"], 0, "{status}");
    drop(guest);
}

/// The 8 byte rotations of `marker` as little-endian words: an 8-aligned word inside a run
/// of repeated `marker` bytes equals one of them, wherever the run starts.
fn rotations(marker: [u8; 8]) -> [u64; 8] {
    let mut words = [0u64; 8];
    for (shift, word) in words.iter_mut().enumerate() {
        let mut bytes = marker;
        bytes.rotate_left(shift);
        *word = u64::from_le_bytes(bytes);
    }
    words
}

/// The guest RAM file QEMU maps (its `memory-backend-memfd`), through `/proc`.
fn ram_file(qemu: u32) -> PathBuf {
    let fds = PathBuf::from(format!("/proc/{qemu}/fd"));
    std::fs::read_dir(&fds)
        .expect("QEMU's fds")
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            std::fs::read_link(path)
                .is_ok_and(|target| target.to_string_lossy().starts_with("/memfd:mem"))
        })
        .expect("QEMU's guest RAM memfd")
}

/// Offsets of the pages of `file` that contain a run of `marker`.
fn pages_with(file: &Path, marker: [u8; 8]) -> Vec<u64> {
    let words = rotations(marker);
    let mut pages = Vec::new();
    let mut reader = std::fs::File::open(file).expect("open guest RAM");
    let mut chunk = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let len = reader.read(&mut chunk).expect("read guest RAM");
        if len == 0 {
            return pages;
        }
        for (index, page) in chunk[..len].chunks(4096).enumerate() {
            let found = page.chunks_exact(8).any(|word| {
                let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                word != 0 && words.contains(&word)
            });
            if found {
                pages.push(offset + index as u64 * 4096);
            }
        }
        offset += len as u64;
    }
}

/// The reported ranges of file (`dev`, `ino`), checked to be page-aligned, sorted and merged.
fn reported_ranges(reply: &Value, dev: u64, ino: u64) -> Vec<(u64, u64)> {
    assert_eq!(reply["page_size"], 4096, "{reply}");
    let files = reply["files"].as_array().expect("files");
    let file = files
        .iter()
        .find(|file| file["dev"] == dev && file["ino"] == ino)
        .unwrap_or_else(|| panic!("the RAM file ({dev}, {ino}) is not in {reply}"));
    let ranges: Vec<(u64, u64)> = file["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|range| {
            (
                range[0].as_u64().expect("offset"),
                range[1].as_u64().expect("length"),
            )
        })
        .collect();
    for &(offset, len) in &ranges {
        assert!(
            offset.is_multiple_of(4096) && len.is_multiple_of(4096) && len > 0,
            "{ranges:?}"
        );
    }
    for pair in ranges.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 < pair[1].0,
            "not sorted and merged: {ranges:?}"
        );
    }
    ranges
}

#[test]
fn dirty_pages_cover_every_rx_buffer_the_daemon_filled() {
    let hosts = Hosts::up();
    let dir = scratch_dir("net-dirty-pages");
    let (_daemon, control) = start_daemon(&hosts, dir.path());
    let mut config = guest_config(
        &hosts,
        dir.path(),
        "net-dirty-pages",
        &format!(
            "nc -ll -p {SILENT_PORT} -e sleep 3600 &\n\
             nc -ll -p {ECHO_PORT} -e cat\n"
        ),
    );
    let qmp_path = dir.path().join("qmp.sock");
    config.qmp = Some(qmp_path.clone());
    let guest = Guest::boot(&config, dir.path());
    guest.wait_for_line(BOOT_TIMEOUT, |line| line.starts_with("NET-UP"));
    let mut qmp = Qmp::connect(&qmp_path, TIMEOUT).expect("QMP");

    let ram = ram_file(guest.pid());
    let metadata = std::fs::metadata(&ram).expect("stat guest RAM");
    let (dev, ino) = (metadata.dev(), metadata.ino());
    // The first call reports everything since the daemon mapped guest RAM (at least the
    // rings it wrote) and clears it.
    let first = command(&control, "dirty-pages");
    assert!(!reported_ranges(&first, dev, ino).is_empty(), "{first}");

    // A TCP stream of a random 8-byte marker to a guest program that never reads it: the
    // guest keeps the data in its socket's receive queue, in the RX buffers the daemon
    // filled (a freed buffer would be reused and zeroed), and copies it nowhere.
    let mut marker = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut marker))
        .expect("random marker");
    marker.iter_mut().for_each(|byte| *byte |= 1);
    let data: Vec<u8> = (0..STREAM_BYTES).map(|index| marker[index % 8]).collect();
    let rx_before = status_json(&control).expect("status")["rx_bytes"]
        .as_u64()
        .expect("rx_bytes");
    let mut stream = connect_in(
        &hosts.namespace("client"),
        &format!("{GUEST_IP}:{SILENT_PORT}"),
    );
    stream.write_all(&data).expect("send the stream");
    poll_until(PATIENCE, "the stream to reach the guest", || {
        status_json(&control).expect("status")["rx_bytes"].as_u64()
            >= Some(rx_before + STREAM_BYTES as u64)
    });
    qmp.stop().expect("QMP stop");

    let reply = command(&control, "dirty-pages");
    let ranges = reported_ranges(&reply, dev, ino);
    let pages = pages_with(&ram, marker);
    assert!(
        !pages.is_empty(),
        "no RX buffer with the marker left in guest RAM"
    );
    for page in &pages {
        assert!(
            ranges
                .iter()
                .any(|&(offset, len)| (offset..offset + len).contains(page)),
            "page {page:#x} holds received data but is not reported: {ranges:?}"
        );
    }
    let reported_bytes: u64 = ranges.iter().map(|range| range.1).sum();
    assert!(
        reported_bytes < metadata.len() / 4,
        "{reported_bytes} bytes reported: far more than the daemon wrote"
    );
    // Read and cleared: with the VM stopped, the daemon writes nothing more.
    let again = command(&control, "dirty-pages");
    assert_eq!(again["files"], serde_json::json!([]), "{again}");
    drop(stream);
    println!(
        "{} marked page(s) found, all among {} reported range(s) ({reported_bytes} bytes)",
        pages.len(),
        ranges.len()
    );
    drop(guest);
}
