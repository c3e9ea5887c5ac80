//! Snapshots of a copy's image: reflinks (`FICLONE`) of the whole image into
//! `IMAGE.snapshots/NAME`, next to it, and back over it for a revert.
//!
//! A reflink shares the image's extents instead of copying them, so it takes a few
//! milliseconds whatever the disk's size; later writes to either file get new blocks. Only
//! file systems with reflinks can do it (XFS made with `reflink=1`, the default since
//! xfsprogs 5.1, and btrfs); elsewhere a snapshot is refused up front, before the mirror
//! pauses anything, with the file system's name in the reason.
//!
//! The mirror decides *when* (`mirror/primary/snapshot.rs`: at the same point of the write
//! stream on both copies); this module only does the file work, and is the one place with
//! the `FICLONE`, `FIEMAP` and `fstatfs` ioctls.
//!
//! An application-consistent snapshot (the guest's file systems were frozen by its agent)
//! carries the extended attribute `user.ftvm.consistency` = `application` on its file; a
//! snapshot without it is crash-consistent.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use control_protocol::disk::{Consistency, ImageKind, SnapshotInfo, SnapshotName, Snapshots};

use crate::image::Image;

/// The most snapshots one image keeps (each is a file; a list must stay short).
pub const MAX_SNAPSHOTS: usize = 256;

/// `FICLONE` = `_IOW(0x94, 9, int)`: the destination file becomes a reflink of the source.
const FICLONE: libc::c_ulong = 0x4004_9409;
/// `FS_IOC_FIEMAP` = `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Extents asked for per `FIEMAP` call.
const FIEMAP_BATCH: usize = 128;
/// The extended attribute that marks an application-consistent snapshot.
const CONSISTENCY_ATTRIBUTE: &std::ffi::CStr = c"user.ftvm.consistency";
const APPLICATION: &[u8] = b"application";

/// Where an image's snapshots live: `IMAGE.snapshots/`, a directory next to it (next to
/// the file itself when `image` is a symbolic link: the reflinks must be on its file
/// system).
pub fn directory(image: &Path) -> PathBuf {
    let mut name = real_path(image).into_os_string();
    name.push(".snapshots");
    PathBuf::from(name)
}

/// `path` with symbolic links resolved (as given when that fails).
fn real_path(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

fn path_of(image: &Path, name: &SnapshotName) -> PathBuf {
    directory(image).join(name.as_str())
}

/// Whether snapshot `name` of `image` exists.
pub fn exists(image: &Path, name: &SnapshotName) -> bool {
    path_of(image, name).is_file()
}

/// Checks, without touching the image, that a snapshot of it can be made: an image file
/// (not a block device) on a file system with reflinks. Clones a small probe file next to
/// the image and removes it. The error names the file system.
pub fn check_reflinks(image: &Image) -> Result<(), String> {
    if image.kind() == ImageKind::BlockDevice {
        return Err(format!(
            "snapshots need an image file on a file system with reflinks (XFS, btrfs); {} is \
             a block device",
            image.path().display()
        ));
    }
    let real = real_path(image.path());
    let directory = real.parent().unwrap_or(Path::new("."));
    let probe = |suffix: &str| {
        directory.join(format!(
            ".ftvm-reflink-probe-{}{suffix}",
            std::process::id()
        ))
    };
    let (source_path, clone_path) = (probe(""), probe(".clone"));
    let result = (|| {
        let source = create_new(&source_path)?;
        std::os::unix::fs::FileExt::write_all_at(&source, &[0x5a; 4096], 0)?;
        let clone = create_new(&clone_path)?;
        ficlone(&clone, &source)
    })();
    let _ = fs::remove_file(&source_path);
    let _ = fs::remove_file(&clone_path);
    result.map_err(|error| refusal(image.path(), &error))
}

/// The reason a reflink failed, naming the file system when it has none.
fn refusal(image: &Path, error: &io::Error) -> String {
    let no_reflinks = matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    );
    if no_reflinks {
        format!(
            "snapshots need a file system with reflinks (XFS, btrfs); {} is on {}",
            image.display(),
            file_system_name(image)
        )
    } else {
        format!("cannot make a reflink next to {}: {error}", image.display())
    }
}

/// The name of the file system `path` is on (from `statfs`'s magic number).
pub fn file_system_name(path: &Path) -> String {
    let Ok(file) = File::open(path) else {
        return "an unknown file system".into();
    };
    // SAFETY: `statfs` is plain old data, for which all zeroes is a valid value.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open descriptor for the whole call and `stats` a valid, writable
    // `struct statfs` that the kernel fills in; nothing else is touched.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stats) } != 0 {
        return "an unknown file system".into();
    }
    // The magic numbers of linux/magic.h.
    match stats.f_type as u64 {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "XFS".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "NFS".into(),
        0x2FC1_2FC1 => "ZFS".into(),
        0xF2F5_2010 => "F2FS".into(),
        other => format!("a file system of type {other:#x}"),
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// `destination` becomes a reflink of all of `source`.
fn ficlone(destination: &File, source: &File) -> io::Result<()> {
    // SAFETY: both descriptors are open for the whole call; FICLONE takes the source
    // descriptor as its integer argument and reads no memory of ours.
    let ret = unsafe { libc::ioctl(destination.as_raw_fd(), FICLONE, source.as_raw_fd()) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

/// Marks `file` as an application-consistent snapshot.
fn mark_application_consistent(file: &File) -> io::Result<()> {
    // SAFETY: the descriptor is open for the whole call; the name is a NUL-terminated
    // C string and the value a slice of `APPLICATION.len()` readable bytes, which the
    // kernel only reads.
    let ret = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            CONSISTENCY_ATTRIBUTE.as_ptr(),
            APPLICATION.as_ptr().cast(),
            APPLICATION.len(),
            0,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What `file` records of its consistency: application only with the attribute's exact
/// value, crash otherwise (no attribute, another value, a file system without them).
fn consistency_of(file: &File) -> Consistency {
    let mut value = [0u8; 16];
    // SAFETY: the descriptor is open for the whole call; the name is a NUL-terminated C
    // string; the kernel writes at most `value.len()` bytes into `value` (ERANGE when the
    // value is longer).
    let length = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            CONSISTENCY_ATTRIBUTE.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    match usize::try_from(length)
        .ok()
        .and_then(|length| value.get(..length))
    {
        Some(read) if read == APPLICATION => Consistency::Application,
        _ => Consistency::Crash,
    }
}

/// Takes snapshot `name` of `image`: the image is made durable, reflinked to a temporary
/// file, which is marked with its consistency, synced and renamed into place (a crash
/// leaves no half snapshot under the name). The caller ensures no write is under way.
pub fn create(image: &Image, name: &SnapshotName, consistency: Consistency) -> Result<(), String> {
    let directory = directory(image.path());
    let path = path_of(image.path(), name);
    if path.exists() {
        return Err(format!("a snapshot named {name} exists already"));
    }
    let count = fs::read_dir(&directory).map_or(0, |entries| entries.count());
    if count >= MAX_SNAPSHOTS {
        return Err(format!(
            "{} has {count} snapshots, the most kept: delete some first",
            image.path().display()
        ));
    }
    let partial = directory.join(format!(".{name}.partial"));
    let result = (|| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&directory)?;
        image.flush()?;
        let _ = fs::remove_file(&partial);
        let clone = create_new(&partial)?;
        ficlone(&clone, image.file())?;
        if consistency == Consistency::Application {
            mark_application_consistent(&clone)?;
        }
        clone.sync_all()?;
        fs::rename(&partial, &path)?;
        sync_directory(&directory)
    })();
    result.map_err(|error| {
        let _ = fs::remove_file(&partial);
        match error.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL) => refusal(image.path(), &error),
            _ => format!("cannot take snapshot {name}: {error}"),
        }
    })
}

/// Opens snapshot `name` of `image` for [`revert_from`]: refused, with nothing changed,
/// when it is missing or not of this disk's size.
pub fn open_for_revert(image: &Image, name: &SnapshotName) -> Result<File, String> {
    let snapshot = File::open(path_of(image.path(), name)).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => format!("no snapshot named {name} on this copy"),
        _ => format!("cannot open snapshot {name}: {error}"),
    })?;
    let size = snapshot
        .metadata()
        .map_err(|error| format!("cannot read snapshot {name}: {error}"))?
        .len();
    if size != image.size_bytes() {
        return Err(format!(
            "snapshot {name} has {size} bytes, the disk {}: it is not of this disk",
            image.size_bytes()
        ));
    }
    Ok(snapshot)
}

/// Puts the snapshot's content back into `image` (a reflink over the whole image) and makes
/// it durable. No guest may be using the image, and no write may be under way. An error
/// may leave the image partly reverted: the caller counts the copy as failed.
pub fn revert_from(image: &Image, snapshot: &File) -> io::Result<()> {
    ficlone(image.file(), snapshot).and_then(|()| image.flush())
}

/// Removes snapshot `name` of `image`.
pub fn delete(image: &Path, name: &SnapshotName) -> Result<(), String> {
    let path = path_of(image, name);
    match fs::remove_file(&path) {
        Ok(()) => sync_directory(&directory(image))
            .map_err(|error| format!("snapshot {name} removed, not yet durably: {error}")),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            Err(format!("no snapshot named {name} on this copy"))
        }
        Err(error) => Err(format!("cannot delete snapshot {name}: {error}")),
    }
}

/// The snapshots of `image`, sorted by name, with the space each holds alone.
pub fn list(image: &Path) -> Result<Snapshots, String> {
    let mut snapshots = Vec::new();
    let entries = match fs::read_dir(directory(image)) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Ok(Snapshots {
                image: image.display().to_string(),
                snapshots,
            })
        }
        Err(error) => return Err(format!("cannot list the snapshots: {error}")),
    };
    for entry in entries.take(MAX_SNAPSHOTS * 2).flatten() {
        // Names that are not valid snapshot names (the partial files) are not snapshots.
        let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(|name| SnapshotName::new(name).ok())
        else {
            continue;
        };
        let Ok(file) = File::open(entry.path()) else {
            continue;
        };
        let Ok(metadata) = file.metadata() else {
            continue;
        };
        let created_unix_s = metadata
            .modified()
            .ok()
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_secs());
        snapshots.push(SnapshotInfo {
            name,
            created_unix_s,
            size_bytes: metadata.len(),
            unshared_bytes: unshared_bytes(&file).unwrap_or(metadata_bytes(&metadata)),
            consistency: consistency_of(&file),
        });
    }
    snapshots.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Snapshots {
        image: image.display().to_string(),
        snapshots,
    })
}

/// Allocated bytes (when `FIEMAP` is not available: an upper bound).
fn metadata_bytes(metadata: &fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(metadata).saturating_mul(512)
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// The bytes of `file`'s extents that the file system does not mark shared (`FIEMAP`
/// without `FIEMAP_EXTENT_SHARED`): what the file holds alone.
fn unshared_bytes(file: &File) -> io::Result<u64> {
    let mut total = 0u64;
    let mut start = 0u64;
    // Bounded: a file of a million extents is counted as far as that.
    for _ in 0..(1 << 20) / FIEMAP_BATCH {
        let mut map = Box::new(Fiemap {
            start,
            length: u64::MAX - start,
            flags: 0,
            mapped_extents: 0,
            extent_count: FIEMAP_BATCH as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); FIEMAP_BATCH],
        });
        // SAFETY: `map` is a `struct fiemap` followed by room for `extent_count` extents,
        // laid out as linux/fiemap.h says (repr(C), same field types); the kernel writes
        // at most `extent_count` extents into it, and `file` is open for the whole call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        let mapped = (map.mapped_extents as usize).min(FIEMAP_BATCH);
        let Some(extents) = map.extents.get(..mapped) else {
            break;
        };
        for extent in extents {
            if extent.flags & FIEMAP_EXTENT_SHARED == 0 {
                total = total.saturating_add(extent.length);
            }
        }
        match extents.last() {
            Some(last) if last.flags & FIEMAP_EXTENT_LAST == 0 => {
                start = last.logical.saturating_add(last.length);
            }
            _ => break,
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mark is read back as written; a file without it, or with another value, is
    /// crash-consistent. (The test directory's file system has user attributes: ext4 and
    /// tmpfs do.)
    #[test]
    fn the_consistency_mark_reads_back_and_anything_else_is_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot");
        let file = create_new(&path).expect("file");
        assert_eq!(consistency_of(&file), Consistency::Crash);
        mark_application_consistent(&file).expect("set the attribute");
        assert_eq!(consistency_of(&file), Consistency::Application);
        let other = b"application-and-more-than-sixteen-bytes";
        // SAFETY: as in `mark_application_consistent`, with `other`'s bytes.
        let ret = unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                CONSISTENCY_ATTRIBUTE.as_ptr(),
                other.as_ptr().cast(),
                other.len(),
                0,
            )
        };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        assert_eq!(consistency_of(&file), Consistency::Crash);
    }

    fn name(text: &str) -> SnapshotName {
        SnapshotName::new(text).expect("valid name")
    }

    #[test]
    fn snapshots_live_next_to_the_image() {
        assert_eq!(
            directory(Path::new("/var/lib/ftvm/vm1/disk0.img")),
            PathBuf::from("/var/lib/ftvm/vm1/disk0.img.snapshots")
        );
        assert_eq!(
            path_of(Path::new("/d/disk0.img"), &name("s1")),
            PathBuf::from("/d/disk0.img.snapshots/s1")
        );
    }

    /// The test directory is not on XFS or btrfs here (ext4 or tmpfs): the refusal comes
    /// before anything is made, names the file system and leaves no probe behind.
    #[test]
    fn a_file_system_without_reflinks_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        fs::write(&path, vec![0u8; 1 << 16]).expect("image");
        let image = Image::open(&path, false).expect("open");
        let fs_name = file_system_name(&path);
        if fs_name == "XFS" || fs_name == "btrfs" {
            eprintln!("skipped: the temporary directory is on {fs_name}, which has reflinks");
            return;
        }
        let error = check_reflinks(&image).expect_err("no reflinks");
        assert!(
            error.contains("need a file system with reflinks"),
            "{error}"
        );
        assert!(error.contains(&fs_name), "{error}");
        let error = create(&image, &name("s1"), Consistency::Crash).expect_err("no reflinks");
        assert!(error.contains(&fs_name), "{error}");
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .flatten()
            .map(|entry| entry.file_name())
            .filter(|name| name.to_string_lossy().starts_with(".ftvm"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(list(&path).expect("list").snapshots.is_empty());
        let error = delete(&path, &name("s1")).expect_err("none");
        assert!(error.contains("no snapshot named s1"), "{error}");
        let error = open_for_revert(&image, &name("s1")).expect_err("none");
        assert!(error.contains("no snapshot named s1"), "{error}");
    }
}
