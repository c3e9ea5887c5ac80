//! Level 3 of ftvm: continuous checkpoints of a running VM to the peer host (see
//! `docs/LEVEL3.md`).
//!
//! - [`qmp`]: QEMU's machine protocol, spoken natively (stop, cont, getfd, the device-state
//!   migration to an fd, restore with `migrate-incoming`).
//! - [`dirty`]: which guest pages changed in an epoch: QEMU's writes through
//!   `PAGEMAP_SCAN` on the write-protected RAM mapping the preload library set up, and the
//!   daemons' writes they report.
//! - [`delta`]: a page as sent: XOR with the replica's copy, then LZ4, or raw.
//! - [`state_delta`]: QEMU's device state as sent: XOR with the last committed one, then
//!   LZ4, or raw.
//! - [`wire`]: the checkpoint stream between the primary's and the secondary's engines.
//! - [`replica`]: the secondary's replica RAM file, staged epochs, the committed state.
//! - [`epoch`]: one checkpoint's device state over QMP, and the restore.
//! - [`sender`] / [`secondary`]: the two ends of the stream; [`guest_ram`]: the primary's
//!   read-only view of guest RAM; [`stats`]: the engine's figures.
//! - [`engine`]: the `ftvm-checkpoint` daemon that joins them with QEMU and the disk and
//!   NIC daemons.

pub mod delta;
pub mod dirty;
pub mod engine;
pub mod epoch;
pub mod guest_ram;
pub mod mapped_file;
pub mod qmp;
pub mod replica;
pub mod secondary;
pub mod sender;
pub mod state_delta;
pub mod stats;
#[cfg(test)]
mod stream_tests;
pub mod wire;
