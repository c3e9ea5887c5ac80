//! `vhost-blk-mirror`: a vhost-user-blk daemon serving a guest disk from a local image.
//!
//! Layers, each knowing only its neighbours: [`request`] parses guest requests (pure),
//! [`image`] does I/O on the image, [`execute`] runs one descriptor chain against the image,
//! [`guest_io`] lets the image read into and write from a request's guest memory directly,
//! [`backend`] is the vhost-user glue, [`daemon`] the process life cycle, [`control`] the
//! operator's socket.

pub mod backend;
pub mod config;
pub mod control;
pub mod daemon;
pub mod execute;
pub mod guest_io;
pub mod image;
pub mod link;
pub mod metadata;
pub mod metrics;
pub mod mirror;
pub mod replication;
pub mod request;
pub mod snapshot;
pub mod ticket;

pub use daemon::{run, Config, DaemonError};
