//! A small tmpfs mounted for a test: a real kernel source of ENOSPC, unmounted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_root;

/// A tmpfs of a given size on a test's directory.
#[derive(Debug)]
pub struct SmallTmpfs {
    path: PathBuf,
}

impl SmallTmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `512k`, `24m`) on `path`.
    pub fn mount(path: &Path, size: &str) -> SmallTmpfs {
        require_root("a tmpfs mount");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "ftvm-test"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", path.display());
        SmallTmpfs {
            path: path.to_owned(),
        }
    }

    /// Grows (or shrinks) the file system: the repair of a full disk.
    pub fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {}", self.path.display());
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
