//! `ftvm-fault-fs` for a test: a FUSE mount whose files live in a backing directory and that
//! fails I/O, runs out of space, adds latency and loses power on command (see
//! `fault-fs/README.md`). Images put in [`FaultFs::path`] lose their unsynced writes on
//! [`FaultFs::power_loss`], as a crashed host's page cache would.
//!
//! Dropping a `FaultFs` stops the daemon (SIGTERM: it unmounts), detaches a mount left
//! behind (`umount -l`, or `fusermount -u -z`), kills the process by PID and removes its
//! directories, pass or fail.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::process::Process;
use crate::wait::poll_until;
use crate::{paths, require_root, scratch_dir};

/// How long the daemon gets to mount and answer, and a command to be answered.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A running `ftvm-fault-fs`. Fields drop in order: the process (after the unmount in
/// `drop`), then the directories.
#[derive(Debug)]
pub struct FaultFs {
    process: Option<Process>,
    mountpoint: PathBuf,
    backing: PathBuf,
    control: PathBuf,
    dir: tempfile::TempDir,
}

impl FaultFs {
    /// Starts the workspace's `ftvm-fault-fs` with the default dirty cap.
    pub fn start() -> FaultFs {
        FaultFs::start_with(&paths::binary("ftvm-fault-fs"), None)
    }

    /// Starts `binary` (a fault-fs's own tests pass `CARGO_BIN_EXE_ftvm-fault-fs`) with an
    /// optional `--max-dirty-bytes`, and waits until the mount is live and the control socket
    /// answers.
    pub fn start_with(binary: &Path, max_dirty_bytes: Option<u64>) -> FaultFs {
        require_root("a FUSE mount");
        let dir = scratch_dir("fault-fs");
        let backing = dir.path().join("backing");
        let mountpoint = dir.path().join("mnt");
        let control = dir.path().join("control.sock");
        std::fs::create_dir(&backing).expect("create backing dir");
        std::fs::create_dir(&mountpoint).expect("create mountpoint");
        // As the mount table shows it.
        let mountpoint = mountpoint.canonicalize().expect("canonical mountpoint");
        let mut command = Command::new(binary);
        command
            .arg("--backing")
            .arg(&backing)
            .arg("--mountpoint")
            .arg(&mountpoint)
            .arg("--control")
            .arg(&control);
        if let Some(bytes) = max_dirty_bytes {
            command.arg("--max-dirty-bytes").arg(bytes.to_string());
        }
        let process = Process::spawn("ftvm-fault-fs", command, &dir.path().join("fault-fs.log"));
        let mut fault_fs = FaultFs {
            process: Some(process),
            mountpoint,
            backing,
            control,
            dir,
        };
        fault_fs.wait_live();
        fault_fs
    }

    fn wait_live(&mut self) {
        let control = self.control.clone();
        let mountpoint = self.mountpoint.clone();
        let process = self.process.as_mut().expect("just started");
        poll_until(TIMEOUT, "ftvm-fault-fs to mount and answer", || {
            process.assert_running();
            is_mounted(&mountpoint)
                && request(&control, "status").is_ok_and(|answer| answer["ok"] == true)
        });
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Where the durable content lives (what is left after a power loss).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// A file in the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// The directory of the mount, the backing directory and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map(Process::pid).unwrap_or(0)
    }

    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.mountpoint)
    }

    /// Sends one control command and returns its JSON answer (`ok` true or false).
    pub fn command(&self, line: &str) -> Value {
        request(&self.control, line)
            .unwrap_or_else(|error| panic!("fault-fs command {line:?} got no answer: {error}"))
    }

    /// Sends a command that must succeed.
    fn expect_ok(&self, line: &str) -> Value {
        let answer = self.command(line);
        assert_eq!(answer["ok"], true, "fault-fs refused {line:?}: {answer}");
        answer
    }

    /// Drops every write not yet synced, in every file; returns the dirty bytes lost.
    pub fn power_loss(&self) -> u64 {
        self.expect_ok("power-loss")["lost_bytes"]
            .as_u64()
            .expect("lost_bytes is a number")
    }

    /// Writes to `file` touching `[offset, offset + len)` fail with EIO.
    pub fn fail_writes(&self, file: &str, offset: u64, len: u64) {
        self.expect_ok(&format!(
            "fail write errno=EIO file={file} offset={offset} len={len}"
        ));
    }

    /// Reads of `file` touching `[offset, offset + len)` fail with EIO.
    pub fn fail_reads(&self, file: &str, offset: u64, len: u64) {
        self.expect_ok(&format!(
            "fail read errno=EIO file={file} offset={offset} len={len}"
        ));
    }

    /// fsync and fdatasync of every file fail with EIO.
    pub fn fail_syncs(&self) {
        self.expect_ok("fail sync errno=EIO");
    }

    /// The file system accepts `bytes` more bytes of writes, then every write fails with
    /// ENOSPC.
    pub fn enospc_after(&self, bytes: u64) {
        self.expect_ok(&format!("enospc-after {bytes}"));
    }

    pub fn delay_ms(&self, milliseconds: u64) {
        self.expect_ok(&format!("delay-ms {milliseconds}"));
    }

    pub fn set_fallocate_supported(&self, supported: bool) {
        let word = if supported {
            "supported"
        } else {
            "unsupported"
        };
        self.expect_ok(&format!("fallocate {word}"));
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.expect_ok("clear");
    }

    pub fn status(&self) -> Value {
        self.expect_ok("status")
    }

    /// Sends SIGTERM and waits for the daemon to exit (it unmounts first).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.process.as_mut().and_then(Process::terminate)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate();
            if std::thread::panicking() {
                eprintln!("---- log of ftvm-fault-fs ----\n{}", process.log());
            }
        }
        if is_mounted(&self.mountpoint) {
            detach(&self.mountpoint);
        }
        // `dir` is removed after this, with nothing mounted in it any more.
    }
}

/// Whether a file system is mounted at `path` (by this process's mount table).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let path = path.to_string_lossy();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mountpoint| mountpoint == path)
}

/// Detaches a mount left behind: `umount -l`, else `fusermount3 -u -z` / `fusermount -u -z`.
fn detach(mountpoint: &Path) {
    let tools: [(&str, &[&str]); 3] = [
        ("umount", &["-l"]),
        ("fusermount3", &["-u", "-z"]),
        ("fusermount", &["-u", "-z"]),
    ];
    for (tool, args) in tools {
        let detached = Command::new(tool)
            .args(args)
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if detached {
            return;
        }
    }
    eprintln!("cannot detach {}", mountpoint.display());
}

/// One control command and its JSON answer line.
fn request(control: &Path, line: &str) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(control)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(line.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}
