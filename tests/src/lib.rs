//! Test rig for the end-to-end tests: real QEMU guests (TCG) booted from the kernel and
//! initramfs that `ci/build-guest.sh` builds, real daemons on real vhost-user sockets, and
//! test hosts made of network namespaces by `ci/hosts.sh`. Everything a test starts is ended
//! by PID and everything it creates is removed, pass or fail.

pub mod blk;
pub mod cluster;
pub mod cpio;
pub mod fault_fs;
pub mod guest;
pub mod hosts;
pub mod mirror;
pub mod net;
pub mod paths;
pub mod process;
pub mod qmp;
pub mod records;
pub mod tmpfs;
pub mod torture;
pub mod wait;

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
