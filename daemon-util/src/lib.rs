//! Pieces the ftvm daemons (`vhost-blk-mirror`, `vhost-net-ft`, and `ftvmd` for its control
//! socket) share: unix sockets that refuse a live one, the root-only control socket and its
//! one-line protocol, stopping on SIGTERM/SIGINT, atomic metrics with a snapshot, a rate
//! limit for log lines caused by guest input, the allocator's settings for large buffers.
//!
//! Nothing here knows vhost-user, except `guest_pages` (feature `guest-memory`): the bitmap
//! both daemons map guest memory with, so that `dirty-pages` can say which pages they wrote.
//! The daemons' glue stays in the daemons.

mod allocator;
mod control;
#[cfg(feature = "guest-memory")]
pub mod guest_pages;
mod metrics;
mod rate_limit;
mod signals;
mod socket;
mod sync;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

pub use allocator::keep_large_buffers;
pub use control::{bind_unix, request, serve_clients, serve_commands, ControlError};
pub use metrics::Counter;
pub use rate_limit::RateLimitedLog;
pub use signals::Stop;
pub use socket::{connect_unix, listen_unix, peer_credentials, remove_socket, ListenError};
pub use sync::{lock, Slot};
