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
//!
//! Each daemon has an agent thread ([`Agent`]) that starts, stops and asks it; the
//! deciding thread only queues jobs and reads their reports, so a daemon that hangs costs
//! it nothing.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::agent::Agent;
use super::events::Events;
use super::wake;
use control_protocol::nic;

use super::control_client::{nic_announce, nic_status, AskError};
use super::processes::{start_nic, NicSpec, Supervised};

/// How often the NIC daemons are asked for their status.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long one status question may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
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
    pub path: Option<nic::Path>,
    /// This host's uplink has its link (`null`: unknown, or no redundant uplink).
    pub uplink_up: Option<bool>,
    /// The peer's daemon for this NIC is connected (`null`: unknown, or no redundant uplink).
    pub peer_reachable: Option<bool>,
    /// This host's daemon relays the peer guest's frames (the peer's uplink is down).
    pub relaying_for_peer: Option<bool>,
    /// QEMU is connected to this host's daemon.
    pub guest_attached: Option<bool>,
    /// The daemon's frame counters through the peer (`null`: no answer).
    pub relay: Option<NicRelay>,
}

/// Frames a NIC daemon moved through the peer host, since it started (`/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRelay {
    /// The guest's frames sent to the peer's bridge (this host's uplink is down).
    pub to_peer_frames: u64,
    /// Frames from the peer's bridge put on the guest's receive queue.
    pub from_peer_frames: u64,
    /// Guest frames for the peer dropped (its link's window full or closed).
    pub to_peer_dropped_frames: u64,
    /// Relaying for the peer's guest: its frames written to this host's LAN.
    pub relayed_to_lan_frames: u64,
    /// Relaying for the peer's guest: frames for it read from this host's LAN.
    pub relayed_to_peer_frames: u64,
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

/// Why a NIC daemon's status is missing.
#[derive(Debug)]
struct PollError {
    error: String,
    /// It took the question and did not answer in time.
    timed_out: bool,
    /// It answered something that is not the protocol's status.
    not_understood: bool,
}

/// What one job of a NIC daemon's agent did.
#[derive(Debug)]
enum Done {
    Started(Result<(), String>),
    /// The status, or why not: the error, whether it timed out, whether it answered
    /// something that is not understood.
    Polled(Result<Box<nic::Status>, PollError>),
    Announced(Result<nic::Announced, String>),
    Stopped,
    Ended(String),
}

#[derive(Debug)]
struct NicReport {
    index: usize,
    /// The daemon's pid after the job (`None`: none runs).
    pid: Option<u32>,
    done: Done,
}

/// The NIC daemons of one VM, one slot per NIC.
#[derive(Debug)]
pub struct Nics {
    /// Since when [`Nics::start_for_vm`] waits for daemons to answer.
    waiting_since: Option<Instant>,
    /// A daemon ended or could not start meanwhile: the start fails.
    ended_while_waiting: Option<String>,
    vm: String,
    specs: Vec<NicSpec>,
    agents: Vec<Agent<Supervised, NicReport>>,
    results: Receiver<NicReport>,
    /// Each daemon's pid as last reported.
    pids: Vec<Option<u32>>,
    /// A start is queued and not reported yet.
    starting: Vec<bool>,
    /// Each running daemon's last answer to `status`.
    status: Vec<Option<nic::Status>>,
    /// When each daemon last answered `status`.
    answered: Vec<Option<Instant>>,
    /// Reported as not answering in time (until it answers again).
    silent: Vec<bool>,
    /// Reported as answering a status that is not understood (until one is).
    not_understood: Vec<bool>,
    last_poll: Option<Instant>,
    last_start: Option<Instant>,
}

impl Nics {
    pub fn new(vm: &str, specs: Vec<NicSpec>) -> Result<Nics, String> {
        let (sender, results) = wake::channel();
        let agents = (0..specs.len())
            .map(|index| {
                Agent::start(
                    &format!("{vm}-nic{index}"),
                    sender.clone(),
                    move |_, status| NicReport {
                        index,
                        pid: None,
                        done: Done::Ended(status),
                    },
                )
                .map_err(|error| format!("cannot start a thread: {error}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Nics {
            waiting_since: None,
            ended_while_waiting: None,
            vm: vm.to_owned(),
            agents,
            results,
            pids: specs.iter().map(|_| None).collect(),
            starting: specs.iter().map(|_| false).collect(),
            status: specs.iter().map(|_| None).collect(),
            answered: specs.iter().map(|_| None).collect(),
            silent: specs.iter().map(|_| false).collect(),
            not_understood: specs.iter().map(|_| false).collect(),
            specs,
            last_poll: None,
            last_start: None,
        })
    }

    /// The MAC of a NIC with a redundant uplink, if the VM has one.
    pub fn redundant_uplink(&self) -> Option<&str> {
        self.specs
            .iter()
            .find(|spec| spec.redundancy.is_some())
            .map(|spec| spec.mac.as_str())
    }

    pub fn any_running(&self) -> bool {
        (0..self.specs.len()).any(|index| self.running(index))
    }

    fn running(&self, index: usize) -> bool {
        self.pids[index].is_some() || self.starting[index]
    }

    fn wanted(&self, index: usize, need: Need) -> bool {
        match need {
            Need::Vm => true,
            Need::Standby => self.specs[index].redundancy.is_some(),
            Need::Nothing => false,
        }
    }

    /// Takes the agents' reports: pids, status answers, daemons that ended.
    fn take_reports(&mut self, events: &mut Events) {
        while let Ok(report) = self.results.try_recv() {
            let index = report.index;
            self.pids[index] = report.pid;
            let spec = &self.specs[index];
            match report.done {
                Done::Started(result) => {
                    self.starting[index] = false;
                    self.status[index] = None;
                    match (result, report.pid) {
                        (Ok(()), Some(pid)) => {
                            let redundancy = match &spec.redundancy {
                                Some(redundancy) => {
                                    format!(", redundant uplink {} via the peer", redundancy.uplink)
                                }
                                None => String::new(),
                            };
                            events.info(
                                &self.vm,
                                format!(
                                    "NIC daemon for {} started on bridge {}{redundancy} \
                                     (pid {pid})",
                                    spec.mac, spec.bridge
                                ),
                            );
                        }
                        (Ok(()), None) => {}
                        (Err(error), _) => {
                            events.error(
                                &self.vm,
                                format!("cannot start the NIC daemon for {}: {error}", spec.mac),
                                "check bin_dir in the configuration",
                            );
                            if self.waiting_since.is_some() {
                                self.ended_while_waiting.get_or_insert(error);
                            }
                        }
                    }
                }
                Done::Polled(Ok(status)) => {
                    self.status[index] = Some(*status);
                    if std::mem::take(&mut self.not_understood[index]) {
                        events.info(
                            &self.vm,
                            format!(
                                "the NIC daemon for {}: its status is understood again",
                                spec.mac
                            ),
                        );
                    }
                    self.answered[index] = Some(Instant::now());
                    if std::mem::take(&mut self.silent[index]) {
                        events.info(
                            &self.vm,
                            format!("the NIC daemon for {} answers again", spec.mac),
                        );
                    }
                }
                Done::Polled(Err(PollError {
                    error,
                    not_understood: true,
                    ..
                })) => {
                    self.status[index] = None;
                    if !std::mem::replace(&mut self.not_understood[index], true) {
                        events.error(
                            &self.vm,
                            format!(
                                "the NIC daemon for {} answers a status ftvmd does not \
                                 understand ({error}): its state counts as unknown",
                                spec.mac
                            ),
                            &format!(
                                "run the vhost-net-ft of the same build as ftvmd ({})",
                                spec.binary.display()
                            ),
                        );
                    }
                }
                Done::Polled(Err(PollError {
                    error,
                    timed_out: slow,
                    not_understood: false,
                })) => {
                    self.status[index] = None;
                    if slow && report.pid.is_some() && !self.silent[index] {
                        self.silent[index] = true;
                        events.warn(
                            &self.vm,
                            format!(
                                "the NIC daemon for {} (pid {}) does not answer its control \
                                 socket in {} ms ({error})",
                                spec.mac,
                                report.pid.unwrap_or_default(),
                                POLL_TIMEOUT.as_millis()
                            ),
                            &format!("see {}", spec.log.display()),
                        );
                    }
                }
                Done::Announced(Err(error)) => {
                    log::warn!("{}: announce of {}: {error}", self.vm, spec.mac);
                }
                Done::Announced(Ok(_)) => {}
                Done::Stopped => self.status[index] = None,
                Done::Ended(status) => {
                    self.status[index] = None;
                    events.error(
                        &self.vm,
                        format!("NIC daemon for {} ended: {status}", spec.mac),
                        &format!("see {}", spec.log.display()),
                    );
                    // Ended while QEMU waits for it: that start fails (not respawned every
                    // step).
                    if self.waiting_since.is_some() {
                        self.ended_while_waiting.get_or_insert(status);
                    }
                }
            }
        }
    }

    /// Reports the daemons that ended, stops those `need` does not want, and restarts the
    /// missing ones it wants (at most once a second).
    pub fn supervise(&mut self, need: Need, events: &mut Events) {
        self.take_reports(events);
        self.stop_unwanted(need);
        let missing =
            (0..self.specs.len()).any(|index| !self.running(index) && self.wanted(index, need));
        if missing
            && self
                .last_start
                .is_none_or(|last| last.elapsed() >= RESTART_BACKOFF)
        {
            self.start_missing(need);
        }
    }

    /// Queues the start of the daemons `need` wants that do not run.
    fn start_missing(&mut self, need: Need) {
        self.last_start = Some(Instant::now());
        for index in 0..self.specs.len() {
            if self.running(index) || !self.wanted(index, need) {
                continue;
            }
            self.starting[index] = true;
            self.status[index] = None;
            self.silent[index] = false;
            let spec = self.specs[index].clone();
            self.agents[index].run("start", move |child| {
                let result = match child {
                    Some(_) => Ok(()),
                    None => start_nic(&spec)
                        .map(|process| *child = Some(process))
                        .map_err(|error| error.to_string()),
                };
                NicReport {
                    index,
                    pid: child.as_ref().map(Supervised::pid),
                    done: Done::Started(result),
                }
            });
        }
    }

    /// Before QEMU starts here: every NIC's daemon runs (standby ones already do) and has
    /// answered on its control socket since the start began. Never waits: until then this
    /// answers [`Readiness::Waiting`]; a daemon that ends or cannot start, or no answer
    /// for 10 s, fails the start, with the error reported, and those that did not answer
    /// are stopped (supervision restarts the standby ones).
    pub fn start_for_vm(&mut self, events: &mut Events) -> Readiness {
        self.take_reports(events);
        if let Some(status) = self.ended_while_waiting.take() {
            self.cancel_start();
            events.error(
                &self.vm,
                format!("a NIC daemon did not come up ({status}); the VM is not started"),
                "see nic*.log in the VM's state directory (is the bridge there?)",
            );
            return Readiness::Failed;
        }
        // Started once per attempt: a daemon that ends is reported, not respawned.
        if self.waiting_since.is_none() {
            self.start_missing(Need::Vm);
        }
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let silent: Vec<usize> = (0..self.specs.len())
            .filter(|&index| self.answered[index].is_none_or(|answered| answered < since))
            .collect();
        if silent.is_empty() {
            self.waiting_since = None;
            return Readiness::Ready;
        }
        if since.elapsed() < READY_TIMEOUT {
            for &index in &silent {
                self.ask_status(index);
            }
            return Readiness::Waiting;
        }
        self.cancel_start();
        events.error(
            &self.vm,
            format!(
                "a NIC daemon did not come up (no answer in {} s); the VM is not started",
                READY_TIMEOUT.as_secs()
            ),
            "see nic*.log in the VM's state directory (is the bridge there?)",
        );
        for index in silent {
            self.stop(index);
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
            if !self.wanted(index, need) && self.running(index) {
                self.stop(index);
            }
        }
    }

    fn stop(&mut self, index: usize) {
        self.pids[index] = None;
        self.starting[index] = false;
        self.status[index] = None;
        self.agents[index].run("stop", move |child| {
            if let Some(mut process) = child.take() {
                process.stop();
            }
            NicReport {
                index,
                pid: None,
                done: Done::Stopped,
            }
        });
    }

    /// Has each NIC daemon announce the guest's MAC on the LAN (the VM runs here now).
    pub fn announce(&self) {
        for (index, spec) in self.specs.iter().enumerate() {
            let control = spec.control.clone();
            self.agents[index].run("announce", move |child| NicReport {
                index,
                pid: child.as_ref().map(Supervised::pid),
                done: Done::Announced(nic_announce(&control)),
            });
        }
    }

    /// Takes the reports and asks the running daemons for their status, at most once per
    /// poll interval and never while a daemon's agent is still busy (a daemon that hangs
    /// gets no pile of questions).
    pub fn poll(&mut self, events: &mut Events) {
        self.take_reports(events);
        if self
            .last_poll
            .is_some_and(|last| last.elapsed() < POLL_INTERVAL)
        {
            return;
        }
        self.last_poll = Some(Instant::now());
        for index in 0..self.specs.len() {
            if self.pids[index].is_none() {
                self.status[index] = None;
                continue;
            }
            self.ask_status(index);
        }
    }

    fn ask_status(&self, index: usize) {
        let agent = &self.agents[index];
        if !agent.idle() {
            return;
        }
        let control = self.specs[index].control.clone();
        agent.run("status", move |child| {
            let result = match child {
                None => Err(PollError {
                    error: "the daemon does not run".to_owned(),
                    timed_out: false,
                    not_understood: false,
                }),
                Some(_) => nic_status(&control, POLL_TIMEOUT)
                    .map(Box::new)
                    .map_err(|error| PollError {
                        error: error.describe(),
                        timed_out: error.timed_out(),
                        not_understood: matches!(error, AskError::NotUnderstood { .. }),
                    }),
            };
            NicReport {
                index,
                pid: child.as_ref().map(Supervised::pid),
                done: Done::Polled(result),
            }
        });
    }

    /// Waits for the queued jobs, stops the daemons and ends their agents (ftvmd stops).
    pub fn finish(self) {
        for agent in self.agents {
            agent.finish();
        }
    }

    /// Each NIC's line in `ftvm status`, from the daemons' last answers.
    pub fn status(&self) -> Vec<NicStatus> {
        self.specs
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let daemon = self.status[index].as_ref();
                let redundancy = daemon.map(|status| &status.redundancy);
                NicStatus {
                    mac: spec.mac.clone(),
                    uplink: spec
                        .redundancy
                        .as_ref()
                        .map(|redundancy| redundancy.uplink.clone()),
                    pid: self.pids[index],
                    answering: daemon.is_some(),
                    path: redundancy.map(|redundancy| redundancy.path),
                    uplink_up: redundancy.and_then(|redundancy| redundancy.uplink_up),
                    peer_reachable: redundancy.map(|redundancy| redundancy.peer_reachable),
                    relaying_for_peer: redundancy.map(|redundancy| redundancy.relaying_for_peer),
                    // A frontend that acked no features is held (a QEMU waiting for an incoming
                    // migration): the daemon is in standby for it.
                    guest_attached: daemon.map(|status| {
                        status.link.frontend_connected && status.features.acked != "0x0"
                    }),
                    relay: daemon.map(|status| NicRelay {
                        to_peer_frames: status.peer_tx_packets,
                        from_peer_frames: status.peer_rx_packets,
                        to_peer_dropped_frames: status.peer_tx_dropped,
                        relayed_to_lan_frames: status.relay_to_lan_packets,
                        relayed_to_peer_frames: status.relay_to_peer_packets,
                    }),
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
        )
        .expect("nics");
        assert!(nics.wanted(0, Need::Vm) && nics.wanted(1, Need::Vm));
        assert!(!nics.wanted(0, Need::Standby) && nics.wanted(1, Need::Standby));
        assert!(!nics.wanted(0, Need::Nothing) && !nics.wanted(1, Need::Nothing));
        assert_eq!(nics.redundant_uplink(), Some(MAC));
        let plain = Nics::new("vm1", vec![spec(dir.path(), 0, false)]).expect("nics");
        assert_eq!(plain.redundant_uplink(), None);
    }

    /// A NIC daemon's status with `redundancy`.
    fn daemon_status(redundancy: nic::Redundancy) -> nic::Status {
        nic::Status {
            mac: MAC.into(),
            tap: "ftvm-tap0".into(),
            bridge: Some("vmbr0".into()),
            queues: 1,
            link: nic::Link {
                frontend_connected: true,
                guest_link_up: true,
                announce_pending: false,
                tap_up: true,
                tap_carrier: true,
                tap_master: Some("vmbr0".into()),
            },
            features: nic::Features {
                offered: "0x0".into(),
                acked: "0x130000000".into(),
                acked_names: Vec::new(),
                tap_offloads: "0x0".into(),
                header_len_bytes: 12,
            },
            redundancy,
            output_commit: nic::OutputCommit {
                enabled: false,
                current_epoch: None,
                committed_epoch: None,
                held_frames: 0,
                held_bytes: 0,
                buffer_limit_bytes: 0,
                buffer_full_waits: 0,
                released_frames: 0,
            },
            rx_packets: 0,
            rx_bytes: 0,
            rx_dropped_no_buffers: 0,
            rx_waits_for_buffers: 0,
            interrupts_deferred: 0,
            rx_bad_buffers: 0,
            tap_read_errors: 0,
            tx_packets: 0,
            tx_bytes: 0,
            tx_dropped_malformed: 0,
            tap_write_errors: 0,
            ctrl_commands: 0,
            announcements: 0,
            connections: 1,
            connected: true,
            peer_tx_packets: 0,
            peer_tx_messages: 0,
            peer_tx_dropped: 0,
            peer_rx_packets: 0,
            peer_rx_dropped: 0,
            relay_to_lan_packets: 0,
            relay_to_peer_packets: 0,
            handover_relayed_packets: 0,
            handover_relay_dropped: 0,
            handover_rx_packets: 0,
            handover_rx_dropped: 0,
        }
    }

    fn redundancy(path: nic::Path, uplink: Option<&str>) -> nic::Redundancy {
        nic::Redundancy {
            path,
            uplink: uplink.map(str::to_owned),
            uplink_up: uplink.map(|_| false),
            peer_configured: uplink.is_some(),
            peer_reachable: uplink.is_some(),
            peer_uplink_up: uplink.map(|_| true),
            peer_guest_attached: false,
            relaying_for_peer: false,
            path_switches: 1,
            frames_queued_for_guest: 0,
            handover_relaying: false,
            handover_frames_queued: 0,
            peer_session: None,
        }
    }

    #[test]
    fn the_status_shows_the_path_the_daemon_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nics = Nics::new("vm1", vec![spec(dir.path(), 0, true)]).expect("nics");
        nics.status[0] = Some(daemon_status(redundancy(nic::Path::Peer, Some("uplink"))));
        let status = &nics.status()[0];
        assert!(status.answering);
        assert_eq!(status.uplink.as_deref(), Some("uplink"));
        assert_eq!(status.path, Some(nic::Path::Peer));
        assert_eq!(status.uplink_up, Some(false));
        assert_eq!(status.peer_reachable, Some(true));
        assert_eq!(status.relaying_for_peer, Some(false));
        assert_eq!(status.guest_attached, Some(true));
        // Connected without acked features: a held frontend, the daemon stands by.
        if let Some(daemon) = nics.status[0].as_mut() {
            daemon.features.acked = "0x0".into();
        }
        assert_eq!(nics.status()[0].guest_attached, Some(false));
        nics.status[0] = None;
        let status = &nics.status()[0];
        assert!(!status.answering);
        assert_eq!(
            (status.path, status.uplink_up, status.peer_reachable),
            (None, None, None),
            "no answer: unknown"
        );
    }

    #[test]
    fn a_daemon_without_a_redundant_uplink_is_on_the_local_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nics = Nics::new("vm1", vec![spec(dir.path(), 0, false)]).expect("nics");
        nics.status[0] = Some(daemon_status(redundancy(nic::Path::Local, None)));
        let status = &nics.status()[0];
        assert_eq!(status.path, Some(nic::Path::Local));
        assert_eq!((status.uplink.as_deref(), status.uplink_up), (None, None));
    }

    #[test]
    fn a_daemon_that_does_not_answer_costs_the_main_loop_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = spec(dir.path(), 0, true);
        // A "daemon" that runs and never answers: connections queue on its socket.
        let script = dir.path().join("hung-daemon");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").expect("script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        spec.binary = script;
        let _listener = UnixListener::bind(&spec.control).expect("bind");
        let mut nics = Nics::new("vm1", vec![spec]).expect("nics");
        let mut events = Events::default();
        nics.supervise(Need::Standby, &mut events);
        let deadline = Instant::now() + Duration::from_secs(5);
        while nics.pids[0].is_none() {
            assert!(Instant::now() < deadline, "not started: {:?}", events.all());
            std::thread::sleep(Duration::from_millis(10));
            nics.poll(&mut events);
        }
        let deadline = Instant::now() + POLL_TIMEOUT * 4;
        let mut longest = Duration::ZERO;
        while !events
            .all()
            .iter()
            .any(|event| event.what.contains("does not answer"))
        {
            assert!(Instant::now() < deadline, "no event: {:?}", events.all());
            nics.last_poll = None;
            let step = Instant::now();
            nics.poll(&mut events);
            assert!(nics.start_for_vm(&mut events) != Readiness::Ready);
            longest = longest.max(step.elapsed());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            longest < Duration::from_millis(50),
            "a step took {longest:?}"
        );
        assert!(!nics.status()[0].answering);
        nics.stop_unwanted(Need::Nothing);
        assert!(!nics.any_running());
        nics.finish();
    }
}
