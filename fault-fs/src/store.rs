//! The files the file system serves: one flat directory of regular files in the backing
//! directory, each with its [`Overlay`] of unsynced data, and the cap on dirty bytes.
//!
//! Names, modes, owners and times go to the backing directory at once (metadata is
//! synchronous, as with `dirsync`); file data and sizes wait in the overlays for a sync.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileTimes, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use log::warn;
use serde::Serialize;

use crate::overlay::{Ledger, Overlay};
use crate::sys::{file_system_stats, FileSystemStats};

/// The inode of the directory.
pub const ROOT_INODE: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File,
}

/// What `stat` shows of a file or the directory.
#[derive(Debug, Clone, Copy)]
pub struct Attributes {
    pub inode: u64,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte blocks the backing file holds.
    pub blocks: u64,
    pub accessed: SystemTime,
    pub modified: SystemTime,
    pub changed: SystemTime,
    /// Permission bits (no file type).
    pub permissions: u32,
    pub uid: u32,
    pub gid: u32,
    pub links: u32,
}

/// What the store did since it started.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StoreCounts {
    /// Dirty bytes written to the backing files because the dirty cap was reached.
    pub writeback_bytes: u64,
    /// Dirty bytes dropped by power losses.
    pub lost_bytes: u64,
    pub power_losses: u64,
}

struct Node {
    name: OsString,
    /// False once unlinked or replaced by a rename: still readable through open handles.
    linked: bool,
    file: File,
    overlay: Overlay,
}

pub struct Store {
    directory: PathBuf,
    nodes: HashMap<u64, Node>,
    names: BTreeMap<OsString, u64>,
    next_inode: u64,
    ledger: Ledger,
    max_dirty_bytes: u64,
    counts: StoreCounts,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Store")
            .field("directory", &self.directory)
            .field("files", &self.names.len())
            .field("dirty_bytes", &self.ledger.dirty_bytes())
            .finish()
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn times(metadata: &std::fs::Metadata) -> (SystemTime, SystemTime, SystemTime) {
    let at = |seconds: i64, nanoseconds: i64| {
        let since_epoch = std::time::Duration::new(
            u64::try_from(seconds).unwrap_or(0),
            u32::try_from(nanoseconds).unwrap_or(0),
        );
        SystemTime::UNIX_EPOCH + since_epoch
    };
    (
        at(metadata.atime(), metadata.atime_nsec()),
        at(metadata.mtime(), metadata.mtime_nsec()),
        at(metadata.ctime(), metadata.ctime_nsec()),
    )
}

impl Store {
    /// Serves the regular files of `directory` (other entries are not shown).
    pub fn open(directory: &Path, max_dirty_bytes: u64) -> io::Result<Store> {
        let mut store = Store {
            directory: directory.to_owned(),
            nodes: HashMap::new(),
            names: BTreeMap::new(),
            next_inode: ROOT_INODE + 1,
            ledger: Ledger::default(),
            max_dirty_bytes,
            counts: StoreCounts::default(),
        };
        for entry in std::fs::read_dir(directory)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(entry.path())?;
                store.add_node(entry.file_name(), file)?;
            }
        }
        Ok(store)
    }

    fn add_node(&mut self, name: OsString, file: File) -> io::Result<u64> {
        let inode = self.next_inode;
        let overlay = Overlay::open(inode, &file)?;
        self.next_inode += 1;
        self.names.insert(name.clone(), inode);
        self.nodes.insert(
            inode,
            Node {
                name,
                linked: true,
                file,
                overlay,
            },
        );
        Ok(inode)
    }

    fn node(&self, inode: u64) -> io::Result<&Node> {
        self.nodes.get(&inode).ok_or_else(|| errno(libc::ENOENT))
    }

    fn node_mut(&mut self, inode: u64) -> io::Result<&mut Node> {
        self.nodes
            .get_mut(&inode)
            .ok_or_else(|| errno(libc::ENOENT))
    }

    pub fn counts(&self) -> StoreCounts {
        self.counts
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.ledger.dirty_bytes()
    }

    pub fn max_dirty_bytes(&self) -> u64 {
        self.max_dirty_bytes
    }

    pub fn lookup(&self, name: &OsStr) -> io::Result<u64> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| errno(libc::ENOENT))
    }

    /// The file's name, for the failing rules (the last one it had if it was unlinked).
    pub fn name(&self, inode: u64) -> io::Result<String> {
        Ok(self.node(inode)?.name.to_string_lossy().into_owned())
    }

    /// The files, by name.
    pub fn entries(&self) -> Vec<(u64, OsString)> {
        self.names
            .iter()
            .map(|(name, &inode)| (inode, name.clone()))
            .collect()
    }

    pub fn attributes(&self, inode: u64) -> io::Result<Attributes> {
        let (metadata, kind, size, links) = if inode == ROOT_INODE {
            let metadata = std::fs::metadata(&self.directory)?;
            (metadata, Kind::Directory, 4096, 2)
        } else {
            let node = self.node(inode)?;
            let links = u32::from(node.linked);
            (
                node.file.metadata()?,
                Kind::File,
                node.overlay.size(),
                links,
            )
        };
        let (accessed, modified, changed) = times(&metadata);
        Ok(Attributes {
            inode,
            kind,
            size,
            blocks: metadata.blocks(),
            accessed,
            modified,
            changed,
            permissions: metadata.mode() & 0o7777,
            uid: metadata.uid(),
            gid: metadata.gid(),
            links,
        })
    }

    /// Creates an empty file (durable at once, as its name is).
    pub fn create(&mut self, name: &OsStr, permissions: u32) -> io::Result<u64> {
        if self.names.contains_key(name) {
            return Err(errno(libc::EEXIST));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(permissions & 0o7777)
            .open(self.directory.join(name))?;
        self.add_node(name.to_owned(), file)
    }

    pub fn unlink(&mut self, name: &OsStr) -> io::Result<()> {
        let inode = self.lookup(name)?;
        std::fs::remove_file(self.directory.join(name))?;
        self.names.remove(name);
        self.node_mut(inode)?.linked = false;
        Ok(())
    }

    /// Renames `from` to `to`, replacing a file there.
    pub fn rename(&mut self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        let inode = self.lookup(from)?;
        std::fs::rename(self.directory.join(from), self.directory.join(to))?;
        self.names.remove(from);
        if let Some(replaced) = self.names.insert(to.to_owned(), inode) {
            if replaced != inode {
                self.node_mut(replaced)?.linked = false;
            }
        }
        self.node_mut(inode)?.name = to.to_owned();
        Ok(())
    }

    pub fn set_permissions(&mut self, inode: u64, permissions: u32) -> io::Result<()> {
        let permissions = std::fs::Permissions::from_mode(permissions & 0o7777);
        if inode == ROOT_INODE {
            return std::fs::set_permissions(&self.directory, permissions);
        }
        self.node(inode)?.file.set_permissions(permissions)
    }

    pub fn set_owner(&mut self, inode: u64, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        if inode == ROOT_INODE {
            return std::os::unix::fs::chown(&self.directory, uid, gid);
        }
        std::os::unix::fs::fchown(&self.node(inode)?.file, uid, gid)
    }

    pub fn set_times(
        &mut self,
        inode: u64,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> io::Result<()> {
        let mut times = FileTimes::new();
        if let Some(accessed) = accessed {
            times = times.set_accessed(accessed);
        }
        if let Some(modified) = modified {
            times = times.set_modified(modified);
        }
        if inode == ROOT_INODE {
            return File::open(&self.directory)?.set_times(times);
        }
        self.node(inode)?.file.set_times(times)
    }

    pub fn read(&self, inode: u64, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let node = self.node(inode)?;
        node.overlay.read(&node.file, offset, len)
    }

    pub fn write(&mut self, inode: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let node = self
            .nodes
            .get_mut(&inode)
            .ok_or_else(|| errno(libc::ENOENT))?;
        node.overlay
            .write(&node.file, &mut self.ledger, offset, data)?;
        self.enforce_dirty_cap()
    }

    pub fn size(&self, inode: u64) -> io::Result<u64> {
        Ok(self.node(inode)?.overlay.size())
    }

    pub fn set_size(&mut self, inode: u64, size: u64) -> io::Result<()> {
        let node = self
            .nodes
            .get_mut(&inode)
            .ok_or_else(|| errno(libc::ENOENT))?;
        node.overlay.set_size(&mut self.ledger, size);
        Ok(())
    }

    /// Makes a range read as zeros, growing the file to its end unless `keep_size`.
    pub fn zero_range(
        &mut self,
        inode: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| errno(libc::EFBIG))?;
        let node = self
            .nodes
            .get_mut(&inode)
            .ok_or_else(|| errno(libc::ENOENT))?;
        if !keep_size && end > node.overlay.size() {
            node.overlay.set_size(&mut self.ledger, end);
        }
        node.overlay.zero_range(offset, len);
        Ok(())
    }

    /// Syncs one file: its data (and size) or everything.
    pub fn sync(&mut self, inode: u64, data_only: bool) -> io::Result<()> {
        let node = self
            .nodes
            .get_mut(&inode)
            .ok_or_else(|| errno(libc::ENOENT))?;
        node.overlay.sync(&node.file, &mut self.ledger, data_only)
    }

    /// Syncs every file that has unsynced data (a clean shutdown, `sync`); returns the first
    /// error after trying them all.
    pub fn sync_all(&mut self) -> io::Result<()> {
        let mut first_error = None;
        for (inode, node) in &mut self.nodes {
            if node.overlay.is_clean() {
                continue;
            }
            if let Err(error) = node.overlay.sync(&node.file, &mut self.ledger, false) {
                warn!("cannot sync {:?} (inode {inode}): {error}", node.name);
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Drops every unsynced write and size change of every file; returns the bytes dropped.
    pub fn power_loss(&mut self) -> io::Result<u64> {
        let mut lost = 0u64;
        for node in self.nodes.values_mut() {
            lost = lost.saturating_add(node.overlay.power_loss(&node.file, &mut self.ledger)?);
        }
        assert_eq!(
            self.ledger.dirty_bytes(),
            0,
            "dirty pages after a power loss"
        );
        self.counts.power_losses += 1;
        self.counts.lost_bytes = self.counts.lost_bytes.saturating_add(lost);
        Ok(lost)
    }

    pub fn file_system_stats(&self) -> io::Result<FileSystemStats> {
        file_system_stats(&self.directory)
    }

    /// Writes back the oldest dirty pages until the dirty bytes are within the cap.
    fn enforce_dirty_cap(&mut self) -> io::Result<()> {
        while self.ledger.dirty_bytes() > self.max_dirty_bytes {
            let Some(page) = self.ledger.oldest() else {
                break;
            };
            let node = self.nodes.get_mut(&page.file);
            let node = node.expect("every page in the ledger belongs to a node");
            let written = node
                .overlay
                .write_back_page(&node.file, &mut self.ledger, page.index)?;
            self.counts.writeback_bytes = self.counts.writeback_bytes.saturating_add(written);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::PAGE_BYTES;

    #[test]
    fn the_oldest_pages_are_written_back_past_the_cap_and_survive_power_loss() {
        let directory = tempfile::tempdir().expect("directory");
        std::fs::write(directory.path().join("a"), [1; 8192]).expect("file a");
        let mut store = Store::open(directory.path(), 2 * PAGE_BYTES).expect("open");
        let a = store.lookup(OsStr::new("a")).expect("a");
        let b = store.create(OsStr::new("b"), 0o600).expect("create b");
        store.write(a, 0, &[2; 10]).expect("write");
        store.write(b, 0, &[3; 10]).expect("write");
        assert_eq!(store.dirty_bytes(), 2 * PAGE_BYTES);
        store.write(a, 4096, &[4; 10]).expect("write");
        assert_eq!(store.dirty_bytes(), 2 * PAGE_BYTES);
        assert_eq!(store.counts().writeback_bytes, PAGE_BYTES);
        assert_eq!(store.power_loss().expect("power loss"), 2 * PAGE_BYTES);
        let a_page = store.read(a, 0, 4096).expect("read");
        assert_eq!(
            &a_page[..10],
            &[2; 10],
            "written back before the power loss"
        );
        assert_eq!(&store.read(a, 4096, 10).expect("read")[..], &[1; 10]);
        assert_eq!(store.size(b).expect("size"), 0);
    }

    #[test]
    fn names_are_durable_at_once_and_renames_replace() {
        let directory = tempfile::tempdir().expect("directory");
        let mut store = Store::open(directory.path(), 1 << 20).expect("open");
        let a = store.create(OsStr::new("a"), 0o640).expect("create");
        let b = store.create(OsStr::new("b"), 0o600).expect("create");
        let again = store.create(OsStr::new("a"), 0o600).expect_err("exists");
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
        store
            .rename(OsStr::new("a"), OsStr::new("b"))
            .expect("rename");
        assert_eq!(store.lookup(OsStr::new("b")).expect("b"), a);
        assert_eq!(store.attributes(b).expect("attributes").links, 0);
        assert_eq!(store.attributes(a).expect("attributes").permissions, 0o640);
        store.unlink(OsStr::new("b")).expect("unlink");
        assert!(store.entries().is_empty());
        assert!(!directory.path().join("b").exists());
    }
}
