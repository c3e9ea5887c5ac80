//! Guest tests of `vhost-blk-mirror` on its own: real QEMU (TCG) guests on the daemon's
//! vhost-user socket.

use std::time::Duration;

use ftvm_tests::blk::{BlkDaemon, BlkOptions};
use ftvm_tests::cpio::Entry;
use ftvm_tests::guest::{Disk, Guest, GuestConfig};
use ftvm_tests::hosts::Hosts;
use ftvm_tests::{create_image, records, scratch_dir};

/// Boot plus a short script under TCG; generous because CI machines are slow and shared.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
const IMAGE_BYTES: u64 = 64 << 20;
const MIB: usize = 1 << 20;

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn disk_for(daemon: &BlkDaemon) -> Disk {
    Disk {
        socket: daemon.options.socket.clone(),
        queues: daemon.options.queues,
    }
}

#[test]
fn guest_sees_disk_and_pattern_is_byte_identical_across_qemu_restart() {
    let dir = scratch_dir("blk-pattern");
    let mut options = BlkOptions::in_dir(dir.path(), "disk");
    options.serial = Some("ftvm-disk-7".into());
    create_image(&options.image, IMAGE_BYTES);
    let daemon = BlkDaemon::start(&options, &dir.path().join("daemon.log"));
    let data = pattern(4 * MIB, 7);

    let mut write = GuestConfig::new(
        "writer",
        "set -e\n\
         echo \"SIZE $(cat /sys/block/vda/size)\"\n\
         echo \"SERIAL $(cat /sys/block/vda/serial)\"\n\
         dd if=/pattern.bin of=/dev/vda bs=1M seek=1 conv=fsync 2>/dev/null\n\
         echo WROTE\n",
    );
    write.disks.push(disk_for(&daemon));
    write.files.push(Entry::file("pattern.bin", data.clone()));
    let mut guest = Guest::boot(&write, dir.path());
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "writer script failed"
    );
    let console = guest.console();
    assert!(console.contains(&format!("SIZE {}", IMAGE_BYTES / 512)));
    assert!(console.contains(&"SERIAL ftvm-disk-7".to_owned()));
    guest.wait_poweroff(GUEST_TIMEOUT);

    let image = std::fs::read(&options.image).expect("read image");
    assert!(
        image[MIB..5 * MIB] == data[..],
        "image differs from the pattern the guest wrote"
    );
    assert!(
        image[..MIB].iter().all(|&b| b == 0),
        "write landed at the wrong offset"
    );

    // A second QEMU on the same daemon: the daemon serves a new connection and the guest
    // reads back what the first one wrote.
    let mut read = GuestConfig::new(
        "reader",
        "set -e\n\
         dd if=/dev/vda of=/tmp/back bs=1M skip=1 count=4 2>/dev/null\n\
         cmp /tmp/back /pattern.bin\n\
         echo READBACK-OK\n",
    );
    read.disks.push(disk_for(&daemon));
    read.files.push(Entry::file("pattern.bin", data));
    let mut guest = Guest::boot(&read, dir.path());
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "reader script failed"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);

    let status = daemon.status();
    assert_eq!(status["connections"], 2, "status: {status}");
    assert!(
        status["written_bytes"].as_u64() >= Some(4 * MIB as u64),
        "status: {status}"
    );
    assert_eq!(status["rejected_requests"], 0, "status: {status}");
    assert_eq!(status["io_errors"], 0, "status: {status}");
}

fn fio_verify(queues: u16) {
    let dir = scratch_dir("blk-fio");
    let mut options = BlkOptions::in_dir(dir.path(), "disk");
    options.queues = queues;
    create_image(&options.image, IMAGE_BYTES);
    let daemon = BlkDaemon::start(&options, &dir.path().join("daemon.log"));
    let script = format!(
        "fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=8 \
         --ioengine=libaio --direct=1 --size=16M --numjobs={queues} --offset_increment=16M \
         --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting\n"
    );
    let mut config = GuestConfig::new(&format!("fio{queues}"), &script);
    config.disks.push(disk_for(&daemon));
    config.cpus = u32::from(queues);
    config.with_fio = true;
    let mut guest = Guest::boot(&config, dir.path());
    assert_eq!(guest.wait_test_exit(GUEST_TIMEOUT), 0, "fio verify failed");
    guest.wait_poweroff(GUEST_TIMEOUT);
    let status = daemon.status();
    assert_eq!(status["rejected_requests"], 0, "status: {status}");
    assert!(status["write_requests"].as_u64() >= Some(4096 * u64::from(queues)));
}

#[test]
fn fio_crc32c_verify_passes_one_queue() {
    fio_verify(1);
}

#[test]
fn fio_crc32c_verify_passes_two_queues() {
    fio_verify(2);
}

/// Records per writer; each is one 4 KiB block written and flushed on its own.
const RECORDS: u32 = 40;
/// The daemon is killed once a writer has this many acknowledged records.
const KILL_AFTER: u32 = 8;

fn daemon_restart_loses_no_acknowledged_write(queues: u16) {
    let hosts = Hosts::up();
    let host_a = hosts.namespace("hostA");
    let dir = scratch_dir("blk-restart");
    let mut options = BlkOptions::in_dir(dir.path(), "disk");
    options.queues = queues;
    options.netns = Some(host_a.clone());
    create_image(&options.image, IMAGE_BYTES);
    let log = dir.path().join("daemon.log");
    let mut daemon = BlkDaemon::start(&options, &log);

    let mut config = GuestConfig::new(&format!("records{queues}"), "");
    records::add_writers(&mut config, queues, RECORDS);
    config.disks.push(disk_for(&daemon));
    config.netns = Some(host_a);
    let mut guest = Guest::boot(&config, dir.path());
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == format!("ACK 0 {KILL_AFTER}"));
    daemon.process.kill();
    let daemon = BlkDaemon::start(&options, &log);
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "records lost or writes failed"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);

    let image = std::fs::read(&options.image).expect("read image");
    let acknowledged = records::acknowledged(&guest.console());
    assert_eq!(acknowledged.len(), (RECORDS * u32::from(queues)) as usize);
    records::assert_in_image(&image, &acknowledged, "daemon's");
    let status = daemon.status();
    assert_eq!(
        status["connections"], 1,
        "the restarted daemon saw QEMU reconnect: {status}"
    );
}

#[test]
fn daemon_restart_loses_no_acknowledged_write_one_queue() {
    daemon_restart_loses_no_acknowledged_write(1);
}

#[test]
fn daemon_restart_loses_no_acknowledged_write_two_queues() {
    daemon_restart_loses_no_acknowledged_write(2);
}
