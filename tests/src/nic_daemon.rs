//! A `vhost-net-ft` daemon on a test host, paired with its counterpart on the other host
//! over both A-links: the NIC half of the tests that run without `ftvmd`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::blk::status_json;
use crate::hosts::Hosts;
use crate::paths;
use crate::process::Process;
use crate::wait::poll_until;

/// The guest's MAC in these tests.
pub const GUEST_MAC: &str = "52:54:00:77:00:10";
/// The guest's LAN address (the LAN is 10.77.0.0/24, see `ci/hosts.sh`).
pub const GUEST_IP: &str = "10.77.0.10";
/// The NIC daemons' replication port on every A-link address.
pub const LINK_PORT: u16 = 7450;
/// The hosts of a pair, by index.
pub const HOSTS: [&str; 2] = ["hostA", "hostB"];
/// The A-link addresses of hostA (index 0) and hostB (index 1).
pub const ALINKS: [[&str; 2]; 2] = [["10.77.1.1", "10.77.2.1"], ["10.77.1.2", "10.77.2.2"]];

/// A running `vhost-net-ft`, ended by PID when dropped.
#[derive(Debug)]
pub struct NicDaemon {
    _process: Process,
    pub control: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl NicDaemon {
    /// Starts the daemon of host `host` (0 or 1) for [`GUEST_MAC`] on the host's VM bridge
    /// `vmbr0` (uplink port `uplink`), listening on its A-links and reaching the other
    /// host's, with `extra_args` appended. Waits for its sockets.
    pub fn start(
        hosts: &Hosts,
        dir: &Path,
        host: usize,
        psk: &Path,
        extra_args: &[&str],
    ) -> NicDaemon {
        let socket = dir.join(format!("net-{}.sock", HOSTS[host]));
        let control = dir.join(format!("net-{}.ctl", HOSTS[host]));
        let mut command = hosts.command(HOSTS[host], paths::binary("vhost-net-ft"));
        command
            .arg("--socket")
            .arg(&socket)
            .args([
                "--bridge", "vmbr0", "--mac", GUEST_MAC, "--uplink", "uplink",
            ])
            .arg("--control")
            .arg(&control)
            .arg("--psk-file")
            .arg(psk)
            .args(["--host-id", HOSTS[host]])
            .args(extra_args);
        for address in ALINKS[host] {
            command
                .arg("--listen")
                .arg(format!("{address}:{LINK_PORT}"));
        }
        for address in ALINKS[1 - host] {
            command.arg("--peer").arg(format!("{address}:{LINK_PORT}"));
        }
        let log = dir.join(format!("net-{}.log", HOSTS[host]));
        let process = Process::spawn("vhost-net-ft", command, &log);
        poll_until(Duration::from_secs(10), "vhost-net-ft's sockets", || {
            socket.exists() && control.exists()
        });
        NicDaemon {
            _process: process,
            control,
            socket,
            log,
        }
    }

    pub fn log_has(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(text))
    }

    /// The daemon's status (panics if it does not answer).
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.control).expect("vhost-net-ft answers status")
    }
}
