//! The system calls std does not wrap (the only unsafe code of the crate): punching a hole in
//! a backing file, the backing file system's statistics, a lazy unmount. And [`Backing`] for
//! a real backing file.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::overlay::Backing;

/// Zeros written at once where a hole cannot be punched.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// The backing file system's size and free space, for `statfs`.
#[derive(Debug, Clone, Copy)]
pub struct FileSystemStats {
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
    pub name_max: u32,
    pub fragment_size: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// Deallocates `[offset, offset + len)` of `file`, keeping its size.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) takes an open descriptor (`file` is borrowed for the call) and
    // integers; no memory is passed.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), mode, off_t(offset)?, off_t(len)?) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The statistics of the file system that holds `path`.
pub fn file_system_stats(path: &Path) -> io::Result<FileSystemStats> {
    let path = c_path(path)?;
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string alive for the call; `stats` is a valid,
    // writable `statvfs` that statvfs(3) fills.
    let result = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FileSystemStats {
        blocks: stats.f_blocks,
        blocks_free: stats.f_bfree,
        blocks_available: stats.f_bavail,
        files: stats.f_files,
        files_free: stats.f_ffree,
        block_size: u32::try_from(stats.f_bsize).unwrap_or(4096),
        name_max: u32::try_from(stats.f_namemax).unwrap_or(255),
        fragment_size: u32::try_from(stats.f_frsize).unwrap_or(4096),
    })
}

/// Unmounts the file system at `path`; `detach`: at once, the kernel ending it when its last
/// user goes (a lazy unmount).
pub fn unmount(path: &Path, detach: bool) -> io::Result<()> {
    let path = c_path(path)?;
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: `path` is a NUL-terminated string alive for the call; umount2(2) only reads it.
    let result = unsafe { libc::umount2(path.as_ptr(), flags) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Backing for File {
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buffer, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }

    fn length(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match punch_hole(self, offset, len) {
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = vec![0; ZERO_CHUNK_BYTES as usize];
                let end = offset.saturating_add(len);
                let mut at = offset;
                while at < end {
                    let count = (end - at).min(ZERO_CHUNK_BYTES);
                    FileExt::write_all_at(self, &zeros[..count as usize], at)?;
                    at += count;
                }
                Ok(())
            }
            other => other,
        }
    }

    fn sync(&self, data_only: bool) -> io::Result<()> {
        if data_only {
            self.sync_data()
        } else {
            self.sync_all()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_punched_hole_reads_zeros_and_keeps_the_size() {
        let file = tempfile::tempfile().expect("temporary file");
        Backing::write_all_at(&file, &[7; 3 * 4096], 0).expect("write");
        Backing::punch_hole(&file, 4096, 4096).expect("punch");
        assert_eq!(Backing::length(&file).expect("len"), 3 * 4096);
        let mut buffer = vec![1; 3 * 4096];
        FileExt::read_exact_at(&file, &mut buffer, 0).expect("read");
        assert!(buffer[..4096].iter().all(|&byte| byte == 7));
        assert!(buffer[4096..8192].iter().all(|&byte| byte == 0));
        assert!(buffer[8192..].iter().all(|&byte| byte == 7));
    }

    #[test]
    fn the_stats_of_a_directory_are_read() {
        let stats = file_system_stats(Path::new("/")).expect("statvfs");
        assert!(stats.block_size > 0);
        let missing = file_system_stats(Path::new("/no/such/dir")).expect_err("missing");
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    }
}
