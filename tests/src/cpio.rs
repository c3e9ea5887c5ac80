//! A minimal writer of `newc` cpio archives, enough to hand a guest extra files at boot:
//! the kernel unpacks concatenated archives into its initramfs, later ones over earlier ones.

use std::io::{self, Write};

/// One file to put into the archive.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Absolute guest path without the leading slash, e.g. `test.sh`.
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

impl Entry {
    pub fn file(path: &str, data: Vec<u8>) -> Entry {
        Entry {
            path: path.trim_start_matches('/').to_owned(),
            mode: 0o100_644,
            data,
        }
    }

    pub fn executable(path: &str, data: Vec<u8>) -> Entry {
        Entry {
            mode: 0o100_755,
            ..Entry::file(path, data)
        }
    }
}

/// Writes `entries` as an uncompressed newc archive (the kernel accepts it uncompressed after
/// gzipped ones).
pub fn write_archive<W: Write>(out: &mut W, entries: &[Entry]) -> io::Result<()> {
    for (index, entry) in entries.iter().enumerate() {
        write_entry(out, index as u32 + 1, &entry.path, entry.mode, &entry.data)?;
    }
    write_entry(out, 0, "TRAILER!!!", 0, &[])
}

fn write_entry<W: Write>(
    out: &mut W,
    inode: u32,
    name: &str,
    mode: u32,
    data: &[u8],
) -> io::Result<()> {
    let name_len = name.len() + 1;
    let header = format!(
        "070701{inode:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{name_len:08x}{:08x}",
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        data.len(),
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        0, // check
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, header.len() + name_len)?;
    out.write_all(data)?;
    pad4(out, data.len())
}

fn pad4<W: Write>(out: &mut W, len: usize) -> io::Result<()> {
    let padding = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..padding])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_aligned_and_terminated() {
        let mut bytes = Vec::new();
        write_archive(
            &mut bytes,
            &[Entry::executable("test.sh", b"echo hi\n".to_vec())],
        )
        .expect("write");
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("test.sh"));
        assert!(text.contains("TRAILER!!!"));
    }
}
