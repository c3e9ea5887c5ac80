//! Shared helpers of the integration tests, beyond the workspace's test framework
//! (`daemon_util::test_support`): the daemon on a fresh image in a temporary directory,
//! with `vhost-user-blk-load` playing QEMU.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use daemon_util::test_support::{control, poll_until, status_json, Process, TIMEOUT};
use vhost_user_blk_load::{BlkDevice, DeviceOptions};

pub const BINARY: &str = env!("CARGO_BIN_EXE_vhost-blk-mirror");
pub const IMAGE_BYTES: u64 = 16 << 20;

/// A running daemon (`disk.sock`, `disk.ctl` in its directory), ended by PID when dropped,
/// its log printed if the test fails. Fields drop in order: the daemon, then the directory.
pub struct Fixture {
    pub process: Process,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// The daemon on a fresh `disk.img` of [`IMAGE_BYTES`], with `extra` arguments.
    pub fn start(extra: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(IMAGE_BYTES))
            .expect("image");
        Fixture::start_on(dir, &image, extra)
    }

    /// The daemon on `image` (a file or a block device), its sockets in `dir`.
    pub fn start_on(dir: tempfile::TempDir, image: &Path, extra: &[&str]) -> Fixture {
        let mut command = Command::new(BINARY);
        command
            .arg("--socket")
            .arg(dir.path().join("disk.sock"))
            .arg("--image")
            .arg(image)
            .arg("--control")
            .arg(dir.path().join("disk.ctl"))
            .args(extra);
        let mut fixture = Fixture {
            process: Process::start("vhost-blk-mirror", command),
            dir,
        };
        let control = fixture.path("disk.ctl");
        let process = &mut fixture.process;
        poll_until(TIMEOUT, "the daemon to start", || {
            process.assert_running();
            status_json(&control).is_some()
        });
        fixture
    }

    /// A file in the daemon's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("disk.sock")
    }

    pub fn image(&self) -> PathBuf {
        self.path("disk.img")
    }

    /// Sends a control command; `None` if the daemon does not answer.
    pub fn control(&self, command: &str) -> Option<String> {
        control(&self.path("disk.ctl"), command)
    }

    /// `status`; `None` if the daemon does not answer.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        status_json(&self.path("disk.ctl"))
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status().expect("status answers JSON")
    }

    pub fn connect(&self, options: &DeviceOptions) -> BlkDevice {
        BlkDevice::open(&self.socket(), options).expect("connect frontend")
    }

    /// Panics, with the log, if the daemon died.
    pub fn assert_alive(&mut self) {
        self.process.assert_running();
    }
}

/// `len` bytes of the image at `path` from `offset`.
pub fn read_image(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).expect("read image")[offset..offset + len].to_vec()
}
