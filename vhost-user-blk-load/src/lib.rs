//! A vhost-user-blk frontend without a VM: it plays QEMU's part against any vhost-user-blk
//! backend socket (our `vhost-blk-mirror`, `qemu-storage-daemon`, …).
//!
//! - [`BlkDevice::open`] connects, negotiates features, reads the config space, shares a memfd
//!   as guest RAM and sets up split virtqueues with kick/call eventfds.
//! - [`BlkQueue`] sends typed virtio-blk requests (`read`, `write`, `flush`, …), keeps many in
//!   flight (`enqueue`/`kick`/`reap`), or posts raw, possibly malformed, descriptor chains.
//! - [`DirtyLog`] reads the pages the backend logged with VHOST_F_LOG_ALL.
//! - [`bench`] and [`compare`] are the library side of the `ftvm-blk-bench` tool.
//!
//! Every wait has a deadline: a dead or hung backend is an error, never a hang.

pub mod arena;
pub mod bench;
pub mod blk;
pub mod compare;
pub mod daemon;
pub mod device;
pub mod frontend;
pub mod histogram;
pub mod memory;
pub mod queue;
pub mod ring;

pub use blk::{BlkConfig, Request, Response};
pub use device::{BlkDevice, DeviceError, DeviceOptions, Negotiated};
pub use frontend::{Session, SessionError};
pub use memory::{DirtyLog, GuestRam};
pub use queue::{BlkQueue, Completion, QueueError};
pub use ring::{Descriptor, Next};
