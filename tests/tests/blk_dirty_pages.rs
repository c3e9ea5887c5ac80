//! Level 3: `vhost-blk-mirror`'s `dirty-pages` names every page of guest RAM the daemon
//! wrote, with a real QEMU (TCG) guest whose RAM is a shared file in /dev/shm.
//!
//! The disk holds a random 16-byte marker, repeated, that exists nowhere else: not in the
//! initramfs, not in the test's arguments. The guest reads it with O_DIRECT, so the daemon
//! writes it straight into the reader's buffer and the guest's CPU copies it nowhere. Every
//! page of the RAM file that holds the marker afterwards must then lie in a range the daemon
//! reported, as an offset of that file.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use ftvm_tests::blk::{BlkDaemon, BlkOptions};
use ftvm_tests::guest::{Disk, Guest, GuestConfig};
use ftvm_tests::{create_image, scratch_dir};

const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
const IMAGE_BYTES: u64 = 64 << 20;
const MIB: u64 = 1 << 20;
/// Where the marker is on the disk: away from what the kernel reads at boot (partition
/// tables at the start).
const MARKER_START: u64 = 8 * MIB;
const MARKER_BYTES: u64 = 4 * MIB;
const PAGE: usize = 4096;
const GUEST_MEMORY_MB: u32 = 256;

/// The guest waits for the host's go (the first sector says FTVM-GO, read past the page
/// cache), reads the marker with O_DIRECT and stays up so that its RAM stays as it is.
const SCRIPT: &str = "set -e\n\
    echo READY\n\
    until dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | grep -q FTVM-GO; do\n\
      usleep 50000\n\
    done\n\
    dd if=/dev/vda of=/dev/null bs=1M skip=8 count=4 iflag=direct 2>/dev/null\n\
    echo READ-DONE\n\
    sleep 3600\n";

fn random_marker() -> [u8; 16] {
    let mut marker = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut marker))
        .expect("read /dev/urandom");
    marker
}

/// The byte ranges `dirty-pages` reported for the file `(dev, ino)`.
fn ranges_of(reply: &serde_json::Value, dev: u64, ino: u64) -> Vec<(u64, u64)> {
    assert_eq!(reply["page_size"], 4096, "{reply}");
    let files = reply["files"].as_array().expect("files");
    files
        .iter()
        .filter(|file| file["dev"] == dev && file["ino"] == ino)
        .flat_map(|file| file["ranges"].as_array().expect("ranges").clone())
        .map(|range| {
            let offset = range[0].as_u64().expect("offset");
            let len = range[1].as_u64().expect("len");
            (offset, len)
        })
        .collect()
}

/// Offsets of the pages of `ram` that hold `marker`. The marker lies at 16-byte aligned
/// offsets of the disk, and O_DIRECT places disk data at 512-byte aligned offsets of a
/// page, so an aligned search finds every copy.
fn pages_holding(ram: &[u8], marker: &[u8; 16]) -> Vec<u64> {
    ram.chunks(PAGE)
        .enumerate()
        .filter(|(_, page)| page.chunks_exact(16).any(|chunk| chunk == marker))
        .map(|(index, _)| (index * PAGE) as u64)
        .collect()
}

#[test]
fn dirty_pages_reports_every_page_a_guest_read_landed_in() {
    let dir = scratch_dir("blk-dirty-pages");
    let options = BlkOptions::in_dir(dir.path(), "disk");
    create_image(&options.image, IMAGE_BYTES);
    let marker = random_marker();
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(&options.image)
        .expect("open image");
    let filled: Vec<u8> = marker
        .iter()
        .copied()
        .cycle()
        .take(MARKER_BYTES as usize)
        .collect();
    image.write_all_at(&filled, MARKER_START).expect("marker");
    let daemon = BlkDaemon::start(&options, &dir.path().join("daemon.log"));

    let ram_dir = tempfile::Builder::new()
        .prefix("ftvm-dirty-pages-")
        .tempdir_in("/dev/shm")
        .expect("directory in /dev/shm");
    let ram_path = ram_dir.path().join("guest.ram");
    let mut config = GuestConfig::new("dirty-pages", SCRIPT);
    config.memory_mb = GUEST_MEMORY_MB;
    config.ram_file = Some(ram_path.clone());
    config.disks.push(Disk {
        socket: options.socket.clone(),
        queues: 1,
    });
    let guest = Guest::boot(&config, dir.path());
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "READY");

    // Everything the daemon wrote so far (boot) is read and forgotten.
    let before = daemon.command("dirty-pages");
    assert!(before.get("error").is_none(), "{before}");
    image.write_all_at(b"FTVM-GO", 0).expect("go");
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "READ-DONE");
    let after = daemon.command("dirty-pages");
    assert!(after.get("error").is_none(), "{after}");

    let metadata = std::fs::metadata(&ram_path).expect("RAM file");
    let ranges = ranges_of(&after, metadata.dev(), metadata.ino());
    let ram = std::fs::read(&ram_path).expect("read the RAM file");
    let holding = pages_holding(&ram, &marker);
    // dd's 1 MiB buffer held the marker on each of its 256 pages; the processes started
    // after dd ended (echo, sleep) may have got some of them back, zeroed.
    assert!(
        holding.len() >= 128,
        "only {} page(s) of RAM hold the marker {marker:02x?}",
        holding.len()
    );
    let reported = |page: u64| {
        ranges
            .iter()
            .any(|&(offset, len)| offset <= page && page + PAGE as u64 <= offset + len)
    };
    let missed: Vec<_> = holding.iter().filter(|&&page| !reported(page)).collect();
    assert!(
        missed.is_empty(),
        "{} of {} page(s) holding the marker were not reported, first at file offset \
         {:#x?}; reply: {after}",
        missed.len(),
        holding.len(),
        missed.first()
    );
    // The first call cleared what came before: the second names a small part of RAM only.
    let reported_bytes: u64 = ranges.iter().map(|&(_, len)| len).sum();
    assert!(
        reported_bytes < u64::from(GUEST_MEMORY_MB) * MIB / 4,
        "{reported_bytes} bytes reported after the clear; reply: {after}"
    );
    let status = daemon.status();
    assert_eq!(status["rejected_requests"], 0, "status: {status}");
    drop(guest);
}
