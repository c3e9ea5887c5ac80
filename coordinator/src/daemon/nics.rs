//! A VM's NIC daemons on this host (`vhost-net-ft`, one per `[[vm.nic]]`): started,
//! supervised, asked for their status, stopped.
//!
//! A NIC without a redundant uplink has its daemon only where the VM runs: started just
//! before QEMU, stopped with it. A NIC with one (Level 2: `uplink` and `link_port`) has its
//! daemon on both hosts for as long as the VM is protected. Where the VM runs it serves
//! QEMU; on the other host it waits in standby, holding no guest, and relays the peer
//! guest's frames through its own TAP while the peer's uplink is down. After a failover
//! QEMU connects to the daemon already running on its new host; after a fence, demotion or
//! handover the old host's daemon stays, now in standby.

use std::io;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::events::Events;
use super::processes::{control_command, disk_order, start_nic, NicSpec, Supervised};

/// How often the NIC daemons are asked for their status.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long one status question may take: the main loop waits for it.
const POLL_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a NIC daemon that did not answer in time is left alone before it is asked again.
const SILENT_BACKOFF: Duration = Duration::from_secs(5);
/// How long the VM's start waits for its NIC daemons to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two restarts of NIC daemons that ended.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// Which NIC daemons the VM needs on this host now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The VM runs here (or is about to): every NIC's daemon.
    Vm,
    /// The VM is protected and does not run here: the standby daemons of the NICs with a
    /// redundant uplink.
    Standby,
    /// None (the VM is unprotected and not here, or `ftvmd` stops).
    Nothing,
}

/// One NIC in `ftvm status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStatus {
    pub mac: String,
    /// The bridge port watched for the redundant uplink (`null`: the NIC has none).
    pub uplink: Option<String>,
    /// The NIC daemon's process id while it runs here.
    pub pid: Option<u32>,
    /// The daemon answered the last status question (asked every 0.5 s).
    pub answering: bool,
    /// Where the guest's frames leave this host's daemon: "local" (this host's uplink) or
    /// "peer" (through the peer's bridge). `null`: unknown (no daemon here, or no answer).
    pub path: Option<String>,
    /// This host's uplink has its link (`null`: unknown, or no redundant uplink).
    pub uplink_up: Option<bool>,
    /// The peer's daemon for this NIC is connected (`null`: unknown, or no redundant uplink).
    pub peer_reachable: Option<bool>,
    /// This host's daemon relays the peer guest's frames (the peer's uplink is down).
    pub relaying_for_peer: Option<bool>,
    /// QEMU is connected to this host's daemon.
    pub guest_attached: Option<bool>,
}

/// Whether the NIC daemons are ready for QEMU ([`Nics::start_for_vm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Started, not answering yet: ask again at the next step.
    Waiting,
    /// One could not start or did not come up (reported).
    Failed,
}

/// The NIC daemons of one VM, one slot per NIC.
#[derive(Debug)]
pub struct Nics {
    /// Since when [`Nics::start_for_vm`] waits for daemons to answer.
    waiting_since: Option<Instant>,
    /// A daemon ended meanwhile (its exit status): the start fails.
    ended_while_waiting: Option<String>,
    vm: String,
    specs: Vec<NicSpec>,
    processes: Vec<Option<Supervised>>,
    /// Each running daemon's last answer to `status`.
    status: Vec<Option<serde_json::Value>>,
    /// A daemon that did not answer in time is not asked again before this.
    silent_until: Vec<Option<Instant>>,
    last_poll: Option<Instant>,
    last_start: Option<Instant>,
}

impl Nics {
    pub fn new(vm: &str, specs: Vec<NicSpec>) -> Nics {
        Nics {
            waiting_since: None,
            ended_while_waiting: None,
            vm: vm.to_owned(),
            processes: specs.iter().map(|_| None).collect(),
            status: specs.iter().map(|_| None).collect(),
            silent_until: specs.iter().map(|_| None).collect(),
            specs,
            last_poll: None,
            last_start: None,
        }
    }

    /// The MAC of a NIC with a redundant uplink, if the VM has one.
    pub fn redundant_uplink(&self) -> Option<&str> {
        self.specs
            .iter()
            .find(|spec| spec.redundancy.is_some())
            .map(|spec| spec.mac.as_str())
    }

    pub fn any_running(&self) -> bool {
        self.processes.iter().any(Option::is_some)
    }

    fn wanted(&self, index: usize, need: Need) -> bool {
        match need {
            Need::Vm => true,
            Need::Standby => self.specs[index].redundancy.is_some(),
            Need::Nothing => false,
        }
    }

    /// Reports the daemons that ended, stops those `need` does not want, and restarts the
    /// missing ones it wants (at most once a second).
    pub fn supervise(&mut self, need: Need, events: &mut Events) {
        for index in 0..self.specs.len() {
            let Some(process) = self.processes[index].as_mut() else {
                continue;
            };
            let Some(status) = process.exited() else {
                continue;
            };
            self.processes[index] = None;
            self.status[index] = None;
            let spec = &self.specs[index];
            events.error(
                &self.vm,
                format!("NIC daemon for {} ended: {status}", spec.mac),
                &format!("see {}", spec.log.display()),
            );
            // Ended while QEMU waits for it: that start fails (not respawned every step).
            if self.waiting_since.is_some() {
                self.ended_while_waiting.get_or_insert(status);
            }
        }
        self.stop_unwanted(need);
        let missing = (0..self.specs.len())
            .any(|index| self.processes[index].is_none() && self.wanted(index, need));
        if missing
            && self
                .last_start
                .is_none_or(|last| last.elapsed() >= RESTART_BACKOFF)
        {
            self.start_missing(need, events);
        }
    }

    /// Starts the daemons `need` wants that do not run; false if one cannot be started.
    fn start_missing(&mut self, need: Need, events: &mut Events) -> bool {
        self.last_start = Some(Instant::now());
        for index in 0..self.specs.len() {
            if self.processes[index].is_some() || !self.wanted(index, need) {
                continue;
            }
            let spec = &self.specs[index];
            match start_nic(spec) {
                Ok(process) => {
                    let redundancy = match &spec.redundancy {
                        Some(redundancy) => {
                            format!(", redundant uplink {} via the peer", redundancy.uplink)
                        }
                        None => String::new(),
                    };
                    events.info(
                        &self.vm,
                        format!(
                            "NIC daemon for {} started on bridge {}{redundancy} (pid {})",
                            spec.mac,
                            spec.bridge,
                            process.pid()
                        ),
                    );
                    self.processes[index] = Some(process);
                    self.status[index] = None;
                    self.silent_until[index] = None;
                }
                Err(error) => {
                    events.error(
                        &self.vm,
                        format!("cannot start the NIC daemon for {}: {error}", spec.mac),
                        "check bin_dir in the configuration",
                    );
                    return false;
                }
            }
        }
        true
    }

    /// Before QEMU starts here: every NIC's daemon runs (standby ones already do) and
    /// answers on its control socket. Never waits: a daemon that was just started is
    /// asked again at the next step ([`Readiness::Waiting`]); one that ends or gives no
    /// answer for 10 s fails the start, with the error reported, and those that did not
    /// answer are stopped (supervision restarts the standby ones).
    pub fn start_for_vm(&mut self, events: &mut Events) -> Readiness {
        if let Some(status) = self.ended_while_waiting.take() {
            self.cancel_start();
            events.error(
                &self.vm,
                format!("a NIC daemon did not come up ({status}); the VM is not started"),
                "see nic*.log in the VM's state directory (is the bridge there?)",
            );
            return Readiness::Failed;
        }
        // Started once per attempt: a daemon that ends is reported above, not respawned.
        if self.waiting_since.is_none() && !self.start_missing(Need::Vm, events) {
            return Readiness::Failed;
        }
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let silent: Vec<usize> = (0..self.specs.len())
            .filter(|&index| {
                control_command(&self.specs[index].control, "status", POLL_TIMEOUT).is_err()
            })
            .collect();
        if silent.is_empty() {
            self.waiting_since = None;
            return Readiness::Ready;
        }
        let died = self
            .processes
            .iter_mut()
            .flatten()
            .find_map(Supervised::exited);
        let timed_out = || {
            (since.elapsed() >= READY_TIMEOUT)
                .then(|| format!("no answer in {} s", READY_TIMEOUT.as_secs()))
        };
        let Some(failure) = died.or_else(timed_out) else {
            return Readiness::Waiting;
        };
        self.cancel_start();
        events.error(
            &self.vm,
            format!("a NIC daemon did not come up ({failure}); the VM is not started"),
            "see nic*.log in the VM's state directory (is the bridge there?)",
        );
        for index in silent {
            if let Some(mut process) = self.processes[index].take() {
                process.stop();
            }
            self.status[index] = None;
        }
        Readiness::Failed
    }

    /// Forgets a start that waited for the daemons (the VM is not to start any more, or
    /// the start failed): the next one waits its own full time.
    pub fn cancel_start(&mut self) {
        self.waiting_since = None;
        self.ended_while_waiting = None;
    }

    /// Stops the daemons `need` does not want.
    pub fn stop_unwanted(&mut self, need: Need) {
        for index in 0..self.specs.len() {
            if self.wanted(index, need) {
                continue;
            }
            if let Some(mut process) = self.processes[index].take() {
                process.stop();
            }
            self.status[index] = None;
        }
    }

    /// Has each NIC daemon announce the guest's MAC on the LAN (the VM runs here now).
    pub fn announce(&self) {
        for spec in &self.specs {
            if let Err(error) = disk_order(&spec.control, "announce") {
                log::warn!("{}: announce of {}: {error}", self.vm, spec.mac);
            }
        }
    }

    /// Asks the running daemons for their status, at most once per poll interval. A daemon
    /// that does not answer in time shows as unknown and is left alone for a while, so that
    /// a stuck daemon costs the main loop little.
    pub fn poll(&mut self) {
        if self
            .last_poll
            .is_some_and(|last| last.elapsed() < POLL_INTERVAL)
        {
            return;
        }
        let now = Instant::now();
        self.last_poll = Some(now);
        for index in 0..self.specs.len() {
            if self.processes[index].is_none() {
                self.status[index] = None;
                continue;
            }
            if self.silent_until[index].is_some_and(|until| now < until) {
                continue;
            }
            let spec = &self.specs[index];
            match control_command(&spec.control, "status", POLL_TIMEOUT) {
                Ok(status) => {
                    self.status[index] = Some(status);
                    self.silent_until[index] = None;
                }
                Err(error) => {
                    self.status[index] = None;
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) {
                        self.silent_until[index] = Some(now + SILENT_BACKOFF);
                        log::warn!(
                            "{}: the NIC daemon for {} does not answer its control socket \
                             in {} ms",
                            self.vm,
                            spec.mac,
                            POLL_TIMEOUT.as_millis()
                        );
                    }
                }
            }
        }
    }

    /// Each NIC's line in `ftvm status`, from the daemons' last answers.
    pub fn status(&self) -> Vec<NicStatus> {
        self.specs
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let daemon = self.status[index].as_ref();
                let redundancy = daemon
                    .map(|status| &status["redundancy"])
                    .filter(|redundancy| redundancy.is_object());
                let flag =
                    |name: &str| redundancy.and_then(|redundancy| redundancy[name].as_bool());
                NicStatus {
                    mac: spec.mac.clone(),
                    uplink: spec
                        .redundancy
                        .as_ref()
                        .map(|redundancy| redundancy.uplink.clone()),
                    pid: self.processes[index].as_ref().map(Supervised::pid),
                    answering: daemon.is_some(),
                    // A daemon without a redundant uplink has only its own.
                    path: daemon.map(|_| {
                        redundancy
                            .and_then(|redundancy| redundancy["path"].as_str())
                            .unwrap_or("local")
                            .to_owned()
                    }),
                    uplink_up: flag("uplink_up"),
                    peer_reachable: flag("peer_reachable"),
                    relaying_for_peer: flag("relaying_for_peer"),
                    guest_attached: daemon
                        .and_then(|status| status["link"]["frontend_connected"].as_bool()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::path::Path;

    use super::*;
    use crate::daemon::processes::NicRedundancy;

    const MAC: &str = "52:54:00:12:34:56";

    /// A NIC whose "daemon" is `true`: it takes a process slot and exits at once.
    fn spec(dir: &Path, index: usize, redundant: bool) -> NicSpec {
        NicSpec {
            binary: "true".into(),
            socket: dir.join(format!("nic{index}.sock")),
            control: dir.join(format!("nic{index}.ctl")),
            log: dir.join(format!("nic{index}.log")),
            mac: MAC.into(),
            bridge: "vmbr0".into(),
            queues: 1,
            redundancy: redundant.then(|| NicRedundancy {
                uplink: "uplink".into(),
                peer: vec!["10.77.1.2:7450".parse().expect("address")],
                listen: vec!["10.77.1.1:7450".parse().expect("address")],
                psk_file: "/etc/ftvm/pair.psk".into(),
                host_name: "hostA".into(),
            }),
        }
    }

    #[test]
    fn only_nics_with_a_redundant_uplink_stand_by() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nics = Nics::new(
            "vm1",
            vec![spec(dir.path(), 0, false), spec(dir.path(), 1, true)],
        );
        assert!(nics.wanted(0, Need::Vm) && nics.wanted(1, Need::Vm));
        assert!(!nics.wanted(0, Need::Standby) && nics.wanted(1, Need::Standby));
        assert!(!nics.wanted(0, Need::Nothing) && !nics.wanted(1, Need::Nothing));
        assert_eq!(nics.redundant_uplink(), Some(MAC));
        let plain = Nics::new("vm1", vec![spec(dir.path(), 0, false)]);
        assert_eq!(plain.redundant_uplink(), None);
    }

    #[test]
    fn the_status_shows_the_path_the_daemon_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nics = Nics::new("vm1", vec![spec(dir.path(), 0, true)]);
        nics.status[0] = Some(serde_json::json!({
            "link": {"frontend_connected": true},
            "redundancy": {"path": "peer", "uplink": "uplink", "uplink_up": false,
                "peer_configured": true, "peer_reachable": true, "peer_uplink_up": true,
                "peer_guest_attached": false, "relaying_for_peer": false, "path_switches": 1},
        }));
        let status = &nics.status()[0];
        assert!(status.answering);
        assert_eq!(status.uplink.as_deref(), Some("uplink"));
        assert_eq!(status.path.as_deref(), Some("peer"));
        assert_eq!(status.uplink_up, Some(false));
        assert_eq!(status.peer_reachable, Some(true));
        assert_eq!(status.relaying_for_peer, Some(false));
        assert_eq!(status.guest_attached, Some(true));
        nics.status[0] = None;
        let status = &nics.status()[0];
        assert!(!status.answering);
        assert_eq!(
            (
                status.path.as_deref(),
                status.uplink_up,
                status.peer_reachable
            ),
            (None, None, None),
            "no answer: unknown"
        );
    }

    #[test]
    fn a_daemon_without_a_redundant_uplink_is_on_the_local_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nics = Nics::new("vm1", vec![spec(dir.path(), 0, false)]);
        nics.status[0] = Some(serde_json::json!({"link": {"frontend_connected": true}}));
        let status = &nics.status()[0];
        assert_eq!(status.path.as_deref(), Some("local"));
        assert_eq!((status.uplink.as_deref(), status.uplink_up), (None, None));
    }

    #[test]
    fn a_daemon_that_does_not_answer_costs_the_main_loop_little() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = spec(dir.path(), 0, true);
        // Connections queue on this socket, and nothing ever answers them.
        let _listener = UnixListener::bind(&spec.control).expect("bind");
        let mut nics = Nics::new("vm1", vec![spec]);
        let mut events = Events::default();
        assert!(nics.start_missing(Need::Standby, &mut events));
        let started = Instant::now();
        nics.poll();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(!nics.status()[0].answering);
        nics.last_poll = None;
        let again = Instant::now();
        nics.poll();
        assert!(
            again.elapsed() < POLL_TIMEOUT,
            "a daemon that did not answer is left alone for a while"
        );
        nics.stop_unwanted(Need::Nothing);
        assert!(!nics.any_running());
    }
}
