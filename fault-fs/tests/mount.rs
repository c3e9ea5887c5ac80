//! `ftvm-fault-fs` mounted for real (root, `/dev/fuse`), driven through its control socket by
//! the test rig's `FaultFs`, which unmounts, kills and removes everything, pass or fail.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use ftvm_tests::fault_fs::FaultFs;

const PAGE: usize = 4096;

fn start() -> FaultFs {
    FaultFs::start_with(Path::new(env!("CARGO_BIN_EXE_ftvm-fault-fs")), None)
}

fn open(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()))
}

fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|error| panic!("open {} with O_DIRECT: {error}", path.display()))
}

fn content(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

fn errno_of(result: io::Result<()>) -> Option<i32> {
    result.err().and_then(|error| error.raw_os_error())
}

/// A copy of `data` at a 4 KiB aligned address, as O_DIRECT needs.
struct Aligned {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(data: &[u8]) -> Aligned {
        let mut bytes = vec![0; data.len() + PAGE];
        let start = bytes.as_ptr().align_offset(PAGE);
        bytes[start..start + data.len()].copy_from_slice(data);
        Aligned {
            bytes,
            start,
            len: data.len(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).expect("offset fits");
    let len = libc::off_t::try_from(len).expect("len fits");
    // SAFETY: fallocate(2) takes an open descriptor (`file` is borrowed for the call) and
    // integers; no memory is passed.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn unsynced_writes_are_lost_on_power_loss_and_fsynced_ones_survive() {
    let fs = start();
    let path = fs.path("disk.img");
    let file = open(&path);
    file.write_all_at(&[1; 2 * PAGE], 0).expect("write");
    file.sync_all().expect("fsync");
    file.write_all_at(&[2; 100], 10).expect("write");
    file.write_all_at(&[3; PAGE], 2 * PAGE as u64)
        .expect("write past the end");
    assert_eq!(content(&path).len(), 3 * PAGE);
    assert_eq!(fs.status()["dirty_bytes"], 2 * PAGE);

    assert_eq!(fs.power_loss(), 2 * PAGE as u64);
    assert_eq!(content(&path), vec![1; 2 * PAGE]);
    assert_eq!(file.metadata().expect("stat").len(), 2 * PAGE as u64);
    assert_eq!(content(&fs.backing().join("disk.img")), vec![1; 2 * PAGE]);
    // The host is back: the same open file keeps working.
    file.write_all_at(&[4; 10], 0)
        .expect("write after the power loss");
    file.sync_data().expect("fdatasync");
    fs.power_loss();
    assert_eq!(&content(&path)[..11], &[4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1]);
    assert_eq!(fs.status()["power_losses"], 2);
}

#[test]
fn o_direct_writes_and_a_size_extension_are_lost_unless_synced() {
    let fs = start();
    let path = fs.path("direct.img");
    let file = open_direct(&path);
    file.write_all_at(Aligned::new(&[5; 2 * PAGE]).as_slice(), 0)
        .expect("O_DIRECT write");
    file.sync_data().expect("fdatasync");
    file.write_all_at(Aligned::new(&[6; 2 * PAGE]).as_slice(), 2 * PAGE as u64)
        .expect("O_DIRECT write past the end");
    let mut read_back = Aligned::new(&[0; 4 * PAGE]);
    file.read_exact_at(read_back.as_mut_slice(), 0)
        .expect("O_DIRECT read");
    assert_eq!(&read_back.as_slice()[2 * PAGE..], &[6; 2 * PAGE][..]);

    fs.power_loss();
    assert_eq!(file.metadata().expect("stat").len(), 2 * PAGE as u64);
    assert_eq!(content(&path), vec![5; 2 * PAGE]);

    // An extension that is synced survives.
    file.set_len(10 * PAGE as u64).expect("grow");
    file.sync_all().expect("fsync");
    fs.power_loss();
    assert_eq!(file.metadata().expect("stat").len(), 10 * PAGE as u64);
}

#[test]
fn fdatasync_covers_only_its_own_file() {
    let fs = start();
    let synced = open(&fs.path("synced"));
    let unsynced = open(&fs.path("unsynced"));
    synced.write_all_at(b"kept", 0).expect("write");
    unsynced.write_all_at(b"lost", 0).expect("write");
    synced.sync_data().expect("fdatasync");
    fs.power_loss();
    assert_eq!(content(&fs.path("synced")), b"kept");
    // The names are durable at once; the data was not synced.
    assert_eq!(content(&fs.path("unsynced")), b"");
}

#[test]
fn eio_fails_exactly_the_range_it_names() {
    let fs = start();
    let path = fs.path("disk.img");
    let file = open(&path);
    file.write_all_at(&[1; 3 * PAGE], 0).expect("write");
    fs.fail_writes("disk.img", PAGE as u64, PAGE as u64);
    fs.fail_reads("disk.img", 2 * PAGE as u64, 1);
    assert_eq!(errno_of(file.write_all_at(&[2; PAGE], 0)), None);
    assert_eq!(
        errno_of(file.write_all_at(&[2; 2], PAGE as u64 - 1)),
        Some(libc::EIO)
    );
    assert_eq!(
        errno_of(file.write_all_at(&[2; 1], 2 * PAGE as u64 - 1)),
        Some(libc::EIO)
    );
    assert_eq!(
        errno_of(file.write_all_at(&[2; PAGE], 2 * PAGE as u64)),
        None
    );
    let mut page = [0; PAGE];
    assert_eq!(errno_of(file.read_exact_at(&mut page, PAGE as u64)), None);
    assert_eq!(page, [1; PAGE], "the failed writes changed nothing");
    assert_eq!(
        errno_of(file.read_exact_at(&mut page[..1], 2 * PAGE as u64)),
        Some(libc::EIO)
    );
    // Another file is not touched by the rules.
    let other = open(&fs.path("other"));
    assert_eq!(errno_of(other.write_all_at(&[2; 2], PAGE as u64 - 1)), None);
    fs.fail_syncs();
    assert_eq!(errno_of(file.sync_data()), Some(libc::EIO));
    let status = fs.status();
    assert_eq!(status["injected"]["eio"], 4, "{status}");
    fs.clear();
    file.write_all_at(&[2; 2], PAGE as u64 - 1)
        .expect("no fault after clear");
    file.sync_data().expect("fdatasync after clear");
}

#[test]
fn enospc_comes_after_the_byte_budget_and_past_an_offset() {
    let fs = start();
    let file = open(&fs.path("disk.img"));
    fs.enospc_after(2 * PAGE as u64);
    file.write_all_at(&[1; PAGE], 0).expect("within the budget");
    file.write_all_at(&[1; PAGE], 0)
        .expect("within the budget (overwrites count too)");
    assert_eq!(errno_of(file.write_all_at(&[1; 1], 0)), Some(libc::ENOSPC));
    assert_eq!(errno_of(file.write_all_at(&[1; 1], 0)), Some(libc::ENOSPC));
    assert_eq!(fs.status()["full"], true);
    fs.clear();
    file.write_all_at(&[1; PAGE], 0)
        .expect("space again after clear");

    fs.command("fail write errno=ENOSPC offset=65536");
    file.write_all_at(&[2; PAGE], 65536 - PAGE as u64)
        .expect("below the offset");
    assert_eq!(
        errno_of(file.write_all_at(&[2; 2], 65535)),
        Some(libc::ENOSPC)
    );
    assert_eq!(
        errno_of(file.write_all_at(&[2; 1], 1 << 30)),
        Some(libc::ENOSPC)
    );
    assert_eq!(fs.status()["injected"]["enospc"], 4);
}

#[test]
fn fallocate_punches_and_zeroes_in_the_overlay_until_synced() {
    let fs = start();
    let path = fs.path("disk.img");
    let file = open(&path);
    file.write_all_at(&[0xaa; 3 * PAGE], 0).expect("write");
    file.sync_all().expect("fsync");
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fallocate(&file, punch, PAGE as u64, PAGE as u64).expect("punch a hole");
    fallocate(&file, libc::FALLOC_FL_ZERO_RANGE, 100, 100).expect("zero a range");
    let mut expected = vec![0xaa; 3 * PAGE];
    expected[PAGE..2 * PAGE].fill(0);
    expected[100..200].fill(0);
    assert_eq!(content(&path), expected);

    fs.power_loss();
    assert_eq!(
        content(&path),
        vec![0xaa; 3 * PAGE],
        "an unsynced punch is lost"
    );

    fallocate(&file, punch, PAGE as u64, PAGE as u64).expect("punch a hole");
    fallocate(&file, 0, 0, 5 * PAGE as u64).expect("allocate and grow");
    file.sync_data().expect("fdatasync");
    fs.power_loss();
    let mut expected = vec![0xaa; 3 * PAGE];
    expected[PAGE..2 * PAGE].fill(0);
    expected.resize(5 * PAGE, 0);
    assert_eq!(content(&path), expected);
}

#[test]
fn fallocate_can_be_made_unsupported() {
    let fs = start();
    let file = open(&fs.path("disk.img"));
    fs.set_fallocate_supported(false);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        errno_of(fallocate(&file, punch, 0, 4096)),
        Some(libc::EOPNOTSUPP)
    );
    assert_eq!(
        errno_of(fallocate(&file, 0, 0, 4096)),
        Some(libc::EOPNOTSUPP)
    );
    assert_eq!(fs.status()["injected"]["eopnotsupp"], 2);
    fs.set_fallocate_supported(true);
    fallocate(&file, 0, 0, 4096).expect("supported again");
}

#[test]
fn bad_control_commands_are_answered_with_errors() {
    let fs = start();
    for line in [
        "",
        "reboot",
        "fail",
        "fail write errno=EPERM",
        "fail write offset=x",
        "enospc-after -5",
        "delay-ms 99999999",
        "fallocate perhaps",
        &"x".repeat(3000),
    ] {
        let answer = fs.command(line);
        assert_eq!(answer["ok"], false, "{line:?}: {answer}");
        assert!(answer["error"]
            .as_str()
            .is_some_and(|error| !error.is_empty()));
    }
    assert_eq!(fs.status()["rules"], serde_json::json!([]));
}

#[test]
fn an_injected_delay_holds_each_request() {
    let fs = start();
    let file = open(&fs.path("disk.img"));
    file.write_all_at(&[1; 10], 0).expect("write");
    fs.delay_ms(100);
    let started = Instant::now();
    let mut byte = [0; 1];
    file.read_exact_at(&mut byte, 0).expect("read");
    assert!(started.elapsed() >= Duration::from_millis(100));
    fs.delay_ms(0);
}

#[test]
fn past_the_dirty_cap_the_oldest_pages_are_written_back_and_survive() {
    let fs = FaultFs::start_with(
        Path::new(env!("CARGO_BIN_EXE_ftvm-fault-fs")),
        Some(2 * PAGE as u64),
    );
    let path = fs.path("disk.img");
    let file = open(&path);
    for page in 0..4u8 {
        file.write_all_at(&[page + 1; PAGE], u64::from(page) * PAGE as u64)
            .expect("write");
    }
    let status = fs.status();
    assert_eq!(status["dirty_bytes"], 2 * PAGE, "{status}");
    assert_eq!(status["writeback_bytes"], 2 * PAGE, "{status}");
    fs.power_loss();
    let mut expected = vec![1; PAGE];
    expected.extend([2; PAGE]);
    assert_eq!(content(&path), expected);
}

#[test]
fn sigterm_unmounts_and_syncs_every_file() {
    let mut fs = start();
    let file = open(&fs.path("disk.img"));
    file.write_all_at(b"written before the stop", 0)
        .expect("write");
    drop(file);
    let status = fs.terminate().expect("the daemon was running");
    assert!(status.success(), "{status}: {}", fs.log());
    assert!(!fs.is_mounted());
    assert_eq!(
        content(&fs.backing().join("disk.img")),
        b"written before the stop"
    );
}

#[test]
fn sigterm_with_a_file_still_open_detaches_the_mount_and_syncs() {
    let mut fs = start();
    let file = open(&fs.path("busy.img"));
    file.write_all_at(b"still open", 0).expect("write");
    let status = fs.terminate().expect("the daemon was running");
    assert!(status.success(), "{status}: {}", fs.log());
    assert!(!fs.is_mounted());
    assert_eq!(content(&fs.backing().join("busy.img")), b"still open");
    let mut byte = [0; 1];
    assert!(
        file.read_exact_at(&mut byte, 0).is_err(),
        "the mount is gone"
    );
}

#[test]
fn a_killed_daemon_leaves_nothing_behind_once_the_rig_drops_it() {
    let fs = start();
    let dir = fs.dir().to_owned();
    let mountpoint = fs.mountpoint().to_owned();
    let pid = libc::pid_t::try_from(fs.pid()).expect("pid");
    // SAFETY: kill(2) takes integers only; `pid` is the rig's child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(fs);
    assert!(!ftvm_tests::fault_fs::is_mounted(&mountpoint));
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn a_sparse_image_of_several_gib_keeps_its_size_and_synced_data() {
    let fs = start();
    let path = fs.path("big.img");
    let file = open(&path);
    let size: u64 = 6 << 30;
    file.set_len(size).expect("grow to 6 GiB");
    file.write_all_at(b"far out", size - 4096)
        .expect("write near the end");
    file.sync_data().expect("fdatasync");
    file.write_all_at(b"lost", 5 << 30).expect("write");
    file.set_len(size + 4096).expect("grow again, unsynced");
    fs.power_loss();
    assert_eq!(file.metadata().expect("stat").len(), size);
    let mut buffer = [0; 7];
    file.read_exact_at(&mut buffer, size - 4096).expect("read");
    assert_eq!(&buffer, b"far out");
    file.read_exact_at(&mut buffer[..4], 5 << 30).expect("read");
    assert_eq!(&buffer[..4], &[0; 4]);
}
