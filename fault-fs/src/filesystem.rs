//! The FUSE glue (the only module that knows `fuser`): kernel requests to the [`Store`],
//! through the faults. Every file is opened with `FOPEN_DIRECT_IO`, so the kernel's page
//! cache never holds this file system's data (a write lost by a power loss must not stay
//! visible there), and attributes and names are never cached.
//!
//! [`Store`]: crate::store::Store

use std::ffi::OsStr;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use daemon_util::lock;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use log::{debug, info, warn};

use crate::control::Shared;
use crate::faults::{Access, InjectedErrno};
use crate::store::{Attributes, Kind, ROOT_INODE};

/// How long the kernel may cache names and attributes: not at all, as a power loss changes
/// sizes behind its back.
const TTL: Duration = Duration::ZERO;

/// The fallocate modes served; any other is refused with EOPNOTSUPP.
const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
/// Most bytes one read returns (the kernel asks for far less; this bounds the buffer).
const MAX_READ_BYTES: u64 = 16 << 20;

#[derive(Debug)]
pub struct FaultFileSystem {
    shared: Arc<Shared>,
}

fn errno(error: io::Error) -> Errno {
    Errno::from(error)
}

fn injected(errno: InjectedErrno) -> Errno {
    Errno::from_i32(errno.raw())
}

fn file_attr(attributes: &Attributes) -> FileAttr {
    FileAttr {
        ino: INodeNo(attributes.inode),
        size: attributes.size,
        blocks: attributes.blocks,
        atime: attributes.accessed,
        mtime: attributes.modified,
        ctime: attributes.changed,
        crtime: attributes.modified,
        kind: match attributes.kind {
            Kind::Directory => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: u16::try_from(attributes.permissions & 0o7777).unwrap_or(0),
        nlink: attributes.links,
        uid: attributes.uid,
        gid: attributes.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn system_time(time: TimeOrNow) -> SystemTime {
    match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl FaultFileSystem {
    pub fn new(shared: Arc<Shared>) -> FaultFileSystem {
        FaultFileSystem { shared }
    }

    fn attributes(&self, inode: u64) -> Result<FileAttr, Errno> {
        let attributes = lock(&self.shared.store).attributes(inode).map_err(errno)?;
        Ok(file_attr(&attributes))
    }

    /// Waits the injected delay, then fails the request if a rule says so.
    fn inject(&self, access: Access, inode: u64, offset: u64, len: u64) -> Result<(), Errno> {
        let delay = lock(&self.shared.faults).delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let name = lock(&self.shared.store).name(inode).map_err(errno)?;
        match lock(&self.shared.faults).check(access, &name, offset, len) {
            Some(error) => {
                debug!("injected {error:?} into {access:?} of {name} at {offset}+{len}");
                Err(injected(error))
            }
            None => Ok(()),
        }
    }

    /// Charges a write or allocation to the budget of bytes (see `enospc-after`).
    fn charge(&self, bytes: u64) -> Result<(), Errno> {
        match lock(&self.shared.faults).charge_write(bytes) {
            Some(error) => Err(injected(error)),
            None => Ok(()),
        }
    }

    fn set_attributes(
        &self,
        inode: u64,
        mode: Option<u32>,
        owner: (Option<u32>, Option<u32>),
        size: Option<u64>,
        times: (Option<TimeOrNow>, Option<TimeOrNow>),
    ) -> Result<FileAttr, Errno> {
        let mut store = lock(&self.shared.store);
        if let Some(mode) = mode {
            store.set_permissions(inode, mode).map_err(errno)?;
        }
        if owner.0.is_some() || owner.1.is_some() {
            store.set_owner(inode, owner.0, owner.1).map_err(errno)?;
        }
        if let Some(size) = size {
            if inode == ROOT_INODE {
                return Err(Errno::EISDIR);
            }
            store.set_size(inode, size).map_err(errno)?;
        }
        if times.0.is_some() || times.1.is_some() {
            let accessed = times.0.map(system_time);
            let modified = times.1.map(system_time);
            store.set_times(inode, accessed, modified).map_err(errno)?;
        }
        let attributes = store.attributes(inode).map_err(errno)?;
        Ok(file_attr(&attributes))
    }

    fn create_file(&self, parent: INodeNo, name: &OsStr, mode: u32) -> Result<FileAttr, Errno> {
        if parent.0 != ROOT_INODE {
            return Err(Errno::ENOENT);
        }
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EPERM);
        }
        let mut store = lock(&self.shared.store);
        let inode = store.create(name, mode).map_err(errno)?;
        let attributes = store.attributes(inode).map_err(errno)?;
        Ok(file_attr(&attributes))
    }

    fn allocate(&self, inode: u64, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        if let Some(error) = lock(&self.shared.faults).check_fallocate() {
            return Err(injected(error));
        }
        if mode & !(KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE) != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        self.inject(Access::Write, inode, offset, length)?;
        let keep_size = mode & KEEP_SIZE != 0;
        if mode & (PUNCH_HOLE | ZERO_RANGE) != 0 {
            let mut store = lock(&self.shared.store);
            return store
                .zero_range(inode, offset, length, keep_size)
                .map_err(errno);
        }
        self.charge(length)?;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        let mut store = lock(&self.shared.store);
        if !keep_size && end > store.size(inode).map_err(errno)? {
            store.set_size(inode, end).map_err(errno)?;
        }
        Ok(())
    }
}

impl Filesystem for FaultFileSystem {
    fn destroy(&mut self) {
        match lock(&self.shared.store).sync_all() {
            Ok(()) => info!("unmounted: every file synced"),
            Err(error) => warn!("unmounted, but a file could not be synced: {error}"),
        }
    }

    fn getxattr(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, reply: fuser::ReplyXattr) {
        // No extended attributes: the kernel stops asking after the first ENOSYS.
        reply.error(Errno::ENOSYS);
    }

    fn lookup(&self, _request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT_INODE {
            return reply.error(Errno::ENOENT);
        }
        let inode = lock(&self.shared.store).lookup(name);
        match inode
            .map_err(errno)
            .and_then(|inode| self.attributes(inode))
        {
            Ok(attributes) => reply.entry(&TTL, &attributes, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn getattr(&self, _request: &Request, inode: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        match self.attributes(inode.0) {
            Ok(attributes) => reply.attr(&TTL, &attributes),
            Err(error) => reply.error(error),
        }
    }

    fn setattr(
        &self,
        _request: &Request,
        inode: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _handle: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.set_attributes(inode.0, mode, (uid, gid), size, (atime, mtime)) {
            Ok(attributes) => reply.attr(&TTL, &attributes),
            Err(error) => reply.error(error),
        }
    }

    fn mknod(
        &self,
        _request: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.create_file(parent, name, mode & !umask) {
            Ok(attributes) => reply.entry(&TTL, &attributes, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn unlink(&self, _request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != ROOT_INODE {
            return reply.error(Errno::ENOENT);
        }
        match lock(&self.shared.store).unlink(name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn rename(
        &self,
        _request: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if parent.0 != ROOT_INODE || new_parent.0 != ROOT_INODE {
            return reply.error(Errno::ENOENT);
        }
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        match lock(&self.shared.store).rename(name, new_name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn open(&self, _request: &Request, inode: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.attributes(inode.0) {
            Ok(attributes) if attributes.kind == FileType::Directory => reply.error(Errno::EISDIR),
            Ok(_) => reply.opened(FileHandle(inode.0), FopenFlags::FOPEN_DIRECT_IO),
            Err(error) => reply.error(error),
        }
    }

    fn read(
        &self,
        _request: &Request,
        inode: INodeNo,
        _handle: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = u64::from(size).min(MAX_READ_BYTES);
        let data = self
            .inject(Access::Read, inode.0, offset, len)
            .and_then(|()| {
                let store = lock(&self.shared.store);
                store.read(inode.0, offset, len).map_err(errno)
            });
        match data {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(error),
        }
    }

    fn write(
        &self,
        _request: &Request,
        inode: INodeNo,
        _handle: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let len = data.len() as u64;
        let Ok(written) = u32::try_from(data.len()) else {
            return reply.error(Errno::EINVAL);
        };
        let result = self
            .inject(Access::Write, inode.0, offset, len)
            .and_then(|()| self.charge(len))
            .and_then(|()| {
                let mut store = lock(&self.shared.store);
                store.write(inode.0, offset, data).map_err(errno)
            });
        match result {
            Ok(()) => reply.written(written),
            Err(error) => reply.error(error),
        }
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(
        &self,
        _request: &Request,
        inode: INodeNo,
        _handle: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.inject(Access::Sync, inode.0, 0, 0).and_then(|()| {
            let mut store = lock(&self.shared.store);
            store.sync(inode.0, datasync).map_err(errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn readdir(
        &self,
        _request: &Request,
        inode: INodeNo,
        _handle: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if inode.0 != ROOT_INODE {
            return reply.error(Errno::ENOTDIR);
        }
        let files = lock(&self.shared.store).entries();
        let dots = [
            (ROOT_INODE, FileType::Directory, OsStr::new(".")),
            (ROOT_INODE, FileType::Directory, OsStr::new("..")),
        ];
        let entries = dots.into_iter().chain(
            files
                .iter()
                .map(|(inode, name)| (*inode, FileType::RegularFile, name.as_os_str())),
        );
        for (index, (inode, kind, name)) in entries.enumerate().skip(to_index(offset)) {
            if reply.add(INodeNo(inode), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        // Names are durable at once.
        reply.ok();
    }

    fn statfs(&self, _request: &Request, _inode: INodeNo, reply: ReplyStatfs) {
        match lock(&self.shared.store).file_system_stats() {
            Ok(stats) => reply.statfs(
                stats.blocks,
                stats.blocks_free,
                stats.blocks_available,
                stats.files,
                stats.files_free,
                stats.block_size,
                stats.name_max,
                stats.fragment_size,
            ),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn create(
        &self,
        _request: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_file(parent, name, mode & !umask) {
            Ok(attributes) => reply.created(
                &TTL,
                &attributes,
                Generation(0),
                FileHandle(attributes.ino.0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(error) => reply.error(error),
        }
    }

    fn fallocate(
        &self,
        _request: &Request,
        inode: INodeNo,
        _handle: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.allocate(inode.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }
}

fn to_index(offset: u64) -> usize {
    usize::try_from(offset).unwrap_or(usize::MAX)
}
