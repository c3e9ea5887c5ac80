//! A qemu-storage-daemon export on a temporary raw image, stopped by PID and removed on drop
//! (fields drop in order: the daemon first, then the directory with image and socket).

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use vhost_user_blk_load::daemon::{Daemon, QSD_PATH};

/// How long qemu-storage-daemon may take to create its socket.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct QsdFixture {
    pub daemon: Daemon,
    pub directory: TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
}

impl QsdFixture {
    /// A sparse raw image of `size_bytes` exported with `num_queues` queues.
    pub fn start(size_bytes: u64, num_queues: u16) -> Self {
        let directory = tempfile::tempdir().expect("temp dir");
        let image = directory.path().join("disk.raw");
        File::create(&image)
            .and_then(|file| file.set_len(size_bytes))
            .expect("create image");
        let socket = directory.path().join("qsd.sock");
        let log = directory.path().join("qsd.log");
        let mut daemon =
            Daemon::qemu_storage_daemon(Path::new(QSD_PATH), &image, &socket, num_queues, &log)
                .expect("start qemu-storage-daemon");
        daemon
            .wait_for_socket(STARTUP_TIMEOUT)
            .expect("qemu-storage-daemon socket");
        Self {
            daemon,
            directory,
            image,
            socket,
        }
    }
}
