//! Test rig for the end-to-end tests: real QEMU guests (TCG) booted from the kernel and
//! initramfs that `ci/build-guest.sh` builds, real daemons on real vhost-user sockets, and
//! test hosts made of network namespaces by `ci/hosts.sh`. Everything a test starts is ended
//! by PID and everything it creates is removed, pass or fail.
//!
//! Processes, waits, namespaces and the root check are the workspace's one test framework,
//! `daemon_util::test_support`, re-exported here as [`process`], [`wait`], [`netns`] and
//! [`require_root`]; this crate adds the hosts, guests, daemons, clusters and their
//! configuration files.

pub mod blk;
pub mod browser;
pub mod cluster;
pub mod console_watch;
pub mod cpio;
pub mod fault_fs;
pub mod guest;
pub mod guest_tools;
pub mod hosts;
pub mod level3;
pub mod libvirt;
pub mod mirror;
pub mod net;
pub mod nic_daemon;
pub mod paths;
pub mod plain_migration;
pub mod qmp;
pub mod records;
pub mod tmpfs;
pub mod torture;
pub mod xfs;

pub use daemon_util::test_support::{netns, process, require_root, wait};

use std::path::Path;

/// A scratch directory under the target directory, removed when dropped.
pub fn scratch_dir(name: &str) -> tempfile::TempDir {
    let parent = paths::target_dir().join("tmp");
    std::fs::create_dir_all(&parent).expect("create target/tmp");
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(parent)
        .expect("create scratch dir")
}

/// Creates a zero-filled image of `size_bytes`.
pub fn create_image(path: &Path, size_bytes: u64) {
    let file = std::fs::File::create(path).expect("create image");
    file.set_len(size_bytes).expect("size image");
}
