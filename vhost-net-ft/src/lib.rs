//! `vhost-net-ft`: a vhost-user-net daemon that bridges a guest's virtio-net NIC to a TAP.
//!
//! Layers, each knowing only its neighbours: [`frame`] parses and checks virtio-net headers
//! (pure), [`ctrl`] answers control-queue commands (pure), [`config`] holds features, config
//! space and MAC (pure), [`datapath`] moves frames between descriptor chains and buffers,
//! [`sink`] is where guest frames go (the TAP, or Level 3's epoch buffer, [`output`]), [`tap`]
//! owns the TAP device (and the crate's only `unsafe`), [`backend`] is the vhost-user glue,
//! [`device`] the state that outlives connections, [`daemon`] the process life cycle,
//! [`control`] the operator's socket, [`relay`] passes vhost-user messages between QEMU and
//! the library (working around a start-up incompatibility), [`peer`] the redundant uplink
//! through the peer host.

pub mod backend;
pub mod config;
pub mod control;
pub mod ctrl;
pub mod daemon;
pub mod datapath;
pub mod device;
pub mod frame;
pub mod metrics;
pub mod output;
pub mod peer;
pub mod relay;
pub mod sink;
pub mod tap;

pub use daemon::{run, Config, DaemonError, Uplink};
