//! Stopping cleanly on SIGTERM and SIGINT.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::sync::lock;

/// A daemon's stop request, set by the first SIGTERM or SIGINT, and the connection it breaks:
/// `H` is the handle that shuts the current frontend connection down.
pub struct Stop<H> {
    requested: AtomicBool,
    connection: Mutex<Option<H>>,
}

impl<H: Send + 'static> Stop<H> {
    /// Installs handlers for SIGTERM and SIGINT (from now on they no longer kill the
    /// process) and watches for them on a thread named `signals`. On the first: marks the stop
    /// as requested, breaks the current connection with `shutdown`, and wakes a blocked
    /// `accept` by connecting to the daemon's own `socket`.
    pub fn on_signals<F>(socket: &Path, shutdown: F) -> io::Result<Arc<Stop<H>>>
    where
        F: Fn(&H) + Send + 'static,
    {
        let stop = Arc::new(Stop {
            requested: AtomicBool::new(false),
            connection: Mutex::new(None),
        });
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let socket = socket.to_owned();
        let watched = stop.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    info!("signal {signal} received, stopping");
                    watched.requested.store(true, Ordering::SeqCst);
                    if let Some(handle) = lock(&watched.connection).as_ref() {
                        shutdown(handle);
                    }
                    let _ = UnixStream::connect(&socket);
                }
            })?;
        Ok(stop)
    }
}

impl<H> Stop<H> {
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Sets the connection a stop breaks: the current one's handle, `None` between them.
    pub fn set_connection(&self, handle: Option<H>) {
        *lock(&self.connection) = handle;
    }
}
