//! An XFS file system on a loop device, made for a test (snapshots need reflinks, which
//! the test directories' ext4 does not have): unmounted and detached when dropped, pass or
//! fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_root;

/// The smallest XFS that mkfs.xfs (xfsprogs ≥ 5.19) makes; the backing file is sparse.
pub const SIZE_BYTES: u64 = 320 << 20;

/// A mounted XFS on a loop device over a sparse file in a scratch directory.
#[derive(Debug)]
pub struct XfsMount {
    mount_point: PathBuf,
    loop_device: Option<String>,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl XfsMount {
    /// Makes and mounts it (with reflinks, xfsprogs' default); panics with the reason
    /// when it cannot (no root, no mkfs.xfs: `ci/install-deps.sh` installs xfsprogs).
    pub fn new(name: &str) -> XfsMount {
        require_root("an XFS loop mount");
        let dir = crate::scratch_dir(&format!("{name}-xfs"));
        let backing = dir.path().join("xfs.img");
        crate::create_image(&backing, SIZE_BYTES);
        let mut mount = XfsMount {
            mount_point: dir.path().join("mnt"),
            loop_device: None,
            mounted: false,
            _dir: dir,
        };
        std::fs::create_dir(&mount.mount_point).expect("create the mount point");
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .expect("run losetup");
        assert!(
            output.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        mount.loop_device = Some(device.clone());
        let mkfs = Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1", &device])
            .output()
            .expect("run mkfs.xfs (xfsprogs; ci/install-deps.sh installs it)");
        assert!(
            mkfs.status.success(),
            "mkfs.xfs: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        let status = Command::new("mount")
            .args(["-t", "xfs", &device])
            .arg(&mount.mount_point)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount {device}");
        mount.mounted = true;
        mount
    }

    pub fn path(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        if self.mounted {
            let unmounted = Command::new("umount")
                .arg(&self.mount_point)
                .status()
                .is_ok_and(|status| status.success());
            if !unmounted {
                // Something still holds a file open: detach it, it goes once released.
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mount_point)
                    .status();
            }
        }
        if let Some(device) = &self.loop_device {
            let _ = Command::new("losetup").args(["-d", device]).status();
        }
    }
}
