//! The mappings of one file in `/proc/self/maps`, found by device and inode (robust against
//! symlinks, `/proc/self/fd/N` names of a memfd and " (deleted)" suffixes).

use std::path::Path;

/// A file's identity as `/proc/PID/maps` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub major: u64,
    pub minor: u64,
    pub inode: u64,
}

impl FileId {
    /// The identity of the file `path` names (following symlinks).
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path)?;
        let device = metadata.dev();
        // glibc's gnu_dev_major/gnu_dev_minor.
        Ok(FileId {
            major: ((device >> 8) & 0xfff) | ((device >> 32) & !0xfff),
            minor: (device & 0xff) | ((device >> 12) & !0xff),
            inode: metadata.ino(),
        })
    }
}

/// A virtual address range of this process, `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub len: u64,
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Area {
    start: u64,
    end: u64,
    shared: bool,
    offset: u64,
    file: FileId,
}

/// Parses `START-END PERMS OFFSET MAJOR:MINOR INODE [PATH]`; `None` for anything else.
fn parse_line(line: &str) -> Option<Area> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let permissions = fields.next()?;
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?;
    let area = Area {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        shared: permissions.as_bytes().get(3) == Some(&b's'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        file: FileId {
            major: u64::from_str_radix(major, 16).ok()?,
            minor: u64::from_str_radix(minor, 16).ok()?,
            inode: inode.parse().ok()?,
        },
    };
    (area.start < area.end).then_some(area)
}

/// The shared mappings of `file` in `maps` (the text of `/proc/PID/maps`), neighbouring
/// areas that continue each other in memory and in the file merged into one span (the
/// kernel splits one `mmap` into several areas after `madvise`/`mprotect` on parts).
pub fn shared_mappings(maps: &str, file: FileId) -> Vec<Span> {
    let mut spans: Vec<(Span, u64)> = Vec::new();
    for area in maps.lines().filter_map(parse_line) {
        if !area.shared || area.file != file {
            continue;
        }
        let len = area.end - area.start;
        if let Some((last, last_offset)) = spans.last_mut() {
            let continues = last.start.checked_add(last.len) == Some(area.start)
                && last_offset.checked_add(last.len) == Some(area.offset);
            if continues {
                last.len += len;
                continue;
            }
        }
        spans.push((
            Span {
                start: area.start,
                len,
            },
            area.offset,
        ));
    }
    spans.into_iter().map(|(span, _)| span).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: FileId = FileId {
        major: 0,
        minor: 0x1a,
        inode: 42,
    };

    #[test]
    fn finds_shared_mappings_by_device_and_inode_and_merges_split_areas() {
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0008000000 rw-s 00000000 00:1a 42 /dev/shm/ftvm vm.ram
7f0008000000-7f0010000000 rw-s 08000000 00:1a 42 /dev/shm/ftvm vm.ram
7f0020000000-7f0020001000 rw-p 00000000 00:1a 42 /dev/shm/ftvm vm.ram
7f0030000000-7f0030002000 rw-s 00000000 00:1a 42 /dev/shm/ftvm vm.ram (deleted)
7f0040000000-7f0040001000 rw-s 00000000 00:1a 43 /dev/shm/other
garbage line
";
        assert_eq!(
            shared_mappings(maps, RAM),
            vec![
                Span {
                    start: 0x7f00_0000_0000,
                    len: 0x1000_0000
                },
                Span {
                    start: 0x7f00_3000_0000,
                    len: 0x2000
                },
            ]
        );
    }

    #[test]
    fn hostile_lines_are_skipped() {
        for line in [
            "",
            "-",
            "ffffffffffffffffff-0 rw-s 0 0:0 42",
            "2000-1000 rw-s 0 0:1a 42",
            "1000-2000 rw-s zz 0:1a 42",
            "1000-2000 rw-s 0 0:1a",
            "1000-2000 r 0 0:1a 42",
        ] {
            assert_eq!(shared_mappings(line, RAM), Vec::new(), "{line:?}");
        }
    }
}
