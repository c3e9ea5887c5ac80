//! What `ftvmd` tells systemd (`Type=notify`, sd_notify(3)): `READY=1` once its VMs are
//! started, `WATCHDOG=1` from the deciding thread's heartbeat path (so a stuck loop stops
//! the pings and systemd restarts it), `STOPPING=1` at shutdown. Without `NOTIFY_SOCKET`
//! (not under systemd, as in the tests) every call does nothing; without `WATCHDOG_USEC`
//! (or with a `WATCHDOG_PID` that is not ours) no watchdog pings are sent.

use std::time::{Duration, Instant};

use log::warn;
use sd_notify::NotifyState;

/// The service manager's side of `ftvmd`.
#[derive(Debug)]
pub struct ServiceManager {
    /// How often to ping the watchdog: half its timeout, as sd_watchdog_enabled(3) advises.
    ping_every: Option<Duration>,
    last_ping: Option<Instant>,
    /// A failed notification is logged once, not at every heartbeat.
    warned: bool,
}

impl ServiceManager {
    /// Reads `WATCHDOG_USEC` and `WATCHDOG_PID` (systemd sets them with `WatchdogSec=`).
    pub fn from_env() -> ServiceManager {
        ServiceManager {
            ping_every: ping_interval(sd_notify::watchdog_enabled()),
            last_ping: None,
            warned: false,
        }
    }

    /// The VMs are started and the control socket answers.
    pub fn ready(&mut self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// The deciding thread made progress: pings the watchdog when due.
    pub fn alive(&mut self) {
        let Some(every) = self.ping_every else {
            return;
        };
        if self.last_ping.is_some_and(|last| last.elapsed() < every) {
            return;
        }
        self.last_ping = Some(Instant::now());
        self.send(&[NotifyState::Watchdog]);
    }

    /// Shutting down: the VMs of this host are being stopped.
    pub fn stopping(&mut self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping the VMs of this host"),
        ]);
    }

    fn send(&mut self, states: &[NotifyState]) {
        if let Err(error) = sd_notify::notify(states) {
            if !self.warned {
                warn!("cannot notify systemd (NOTIFY_SOCKET): {error}");
                self.warned = true;
            }
        }
    }
}

/// Half the watchdog's timeout; none for no watchdog or a zero timeout.
fn ping_interval(timeout: Option<Duration>) -> Option<Duration> {
    timeout
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| timeout / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout() {
        assert_eq!(ping_interval(None), None);
        assert_eq!(ping_interval(Some(Duration::ZERO)), None);
        assert_eq!(
            ping_interval(Some(Duration::from_secs(10))),
            Some(Duration::from_secs(5))
        );
    }
}
