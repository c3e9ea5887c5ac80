//! `ftvmd`, the per-host daemon: runs each protected VM's disk daemons (and the standby
//! daemons of its NICs with a redundant uplink) and, on its primary, the VM itself;
//! heartbeats the peer's `ftvmd` over both A-links; asks the witness when the peer is lost;
//! answers the `ftvm` CLI on a root-only unix socket.
//!
//! One thread runs everything that decides (the VMs' state machines, process control);
//! other threads only move bytes between sockets and channels.

pub mod agent;
pub mod alerts;
pub mod asks;
pub mod control;
pub mod control_client;
mod diagnostics;
mod domains;
pub mod events;
pub mod guest_agent;
pub mod libvirt_launcher;
pub mod links;
pub mod metrics;
pub mod nics;
pub mod processes;
pub mod qmp;
pub mod service;
mod stall;
pub mod state;
pub mod vm;
mod wake;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use self::alerts::Alerts;
use self::control::{HostStatus, KeyStatus, Reply, Request};
use self::events::{Condition, Events, Severity};
use self::libvirt_launcher::{DomainSpec, HostLauncher};
use self::links::{link_config, PeerLink, PeerMessage, WitnessLink};
use self::processes::{
    DiskSpec, EngineSpec, NicRedundancy, NicSpec, QemuLauncher, VmLauncher, VmSpec,
};
use self::service::ServiceManager;
use self::vm::{Context, Pair, VmRunner};
use crate::config::{Config, VmSection};
use crate::host::{HostConfig, Role};
use crate::witness_daemon::WitnessReply;
use crate::Millis;

/// Period of the main loop.
const STEP: Duration = Duration::from_millis(10);
/// Period of the main loop while a VM switches over (`VmRunner::switching_over`).
const FAST_STEP: Duration = Duration::from_millis(1);

/// Runs until SIGTERM or SIGINT; returns a one-line error if it cannot start.
pub fn run(config: Config, launcher: Box<dyn VmLauncher>) -> Result<(), String> {
    let state_dir = &config.host.state_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|error| format!("cannot create state_dir {}: {error}", state_dir.display()))?;
    let _lock = lock(&state_dir.join("ftvmd.lock"))?;
    let (requester, requests) = control::serve(&config.host.control_socket)?;
    if let Some(key_file) = &config.host.api_key_file {
        crate::api::serve(
            config.host.api_listen.clone(),
            key_file,
            &config.host.name,
            requester.clone(),
        )?;
    }
    if let Some(listen) = config.host.metrics_listen {
        metrics::serve(listen, requester)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .map_err(|error| format!("cannot handle signals: {error}"))?;
    }
    // Heartbeat sessions come back fast after a link flap (the default backoff grows to
    // 1 s, long enough for the peer to hear nothing while we hear it).
    let mut peer_link = link_config(&config.peer.psk_file, &config.host.name)?;
    peer_link.reconnect_max_ms = (config.timing.heartbeat_interval_ms * 2).max(50);
    let peer = PeerLink::start(
        config.peer.addresses.clone(),
        config.peer.listen.clone(),
        peer_link,
    )?;
    let witness = WitnessLink::start(
        config.witness.addresses.clone(),
        link_config(&config.witness.psk_file, &config.host.name)?,
    )?;
    let events = if config.alert.is_empty() {
        Events::default()
    } else {
        Events::with_alerts(Alerts::start(&config.alert, &config.host.name)?)
    };
    let mut daemon = Daemon {
        started: Instant::now(),
        io: Io {
            events,
            peer,
            witness,
            launcher: Arc::from(launcher),
        },
        vms: Vec::new(),
        disabled: false,
        last_beat: None,
        last_links: (usize::MAX, 0),
        last_auth: (0, 0),
        witness_lost_at: None,
        heartbeat: Duration::from_millis(config.timing.heartbeat_interval_ms),
        instance: random_instance()?,
        beat_sequence: 0,
        peer_seen: None,
        peer_keys: None,
        service: ServiceManager::from_env(),
        asks: asks::Asks::new(&config.peer.name),
        config,
    };
    let marker = daemon.disabled_marker();
    let disabled = marker.try_exists().map_err(|error| {
        format!(
            "cannot tell whether this host is disabled ({}: {error}); fix the state directory",
            marker.display()
        )
    })?;
    daemon.start_vms()?;
    if disabled {
        daemon.disabled = true;
        daemon.io.events.warn(
            "",
            "host disabled before this restart: no VM runs here".into(),
            "`ftvm host enable` when the maintenance is over",
        );
    }
    info!(
        "ftvmd {} running: peer {}, {} VM(s), control socket {}",
        daemon.config.host.name,
        daemon.config.peer.name,
        daemon.vms.len(),
        daemon.config.host.control_socket.display()
    );
    let ready = format!(
        "{} VM(s), peer {}",
        daemon.vms.len(),
        daemon.config.peer.name
    );
    daemon.service.ready(&ready);
    // A quarter of the peer timeout: a stall this long is worth a line in the log.
    let stall_limit = Duration::from_millis(daemon.config.timing.peer_timeout_ms / 4);
    if let Err(error) = stall::watch_scheduling(stall_limit) {
        warn!("cannot start the stall watch thread: {error}");
    }
    while !stop.load(Ordering::Relaxed) {
        let mut clock = stall::StepClock::start();
        daemon.step(&mut clock);
        while let Ok((request, answer)) = requests.try_recv() {
            match request {
                // Answered once the disk daemons have (a revert also stops and starts the
                // VM): the VM keeps the answer channel.
                Request::Snapshot { vm, snapshot } => daemon.snapshot(&vm, snapshot, answer),
                // Answered by a thread once every agent has run.
                Request::AlertTest => match daemon.io.events.alerts() {
                    Some(alerts) => alerts.test(answer),
                    None => {
                        let _ = answer.send(Reply::Error(
                            "no alert agents configured: add [[alert]] sections to ftvmd's \
                             configuration (docs/OPERATIONS.md, \"Alerts\") and restart ftvmd"
                                .into(),
                        ));
                    }
                },
                // Answered once the VM's processes have stopped and the original domain
                // is back.
                Request::Unprotect { vm } if daemon.is_domain(&vm) => {
                    daemon.unprotect_domain(&vm, answer)
                }
                // Answered once the facts (and the peer's) are in.
                Request::Check { vm, peer } => daemon.check(vm, peer, answer),
                Request::CollectLogs => daemon.collect_logs(answer),
                Request::Protect { vm, level, peer } => {
                    daemon.protect_after_check(vm, level, peer, answer);
                }
                request => {
                    let reply = daemon.handle(request);
                    let _ = answer.send(reply);
                }
            }
        }
        clock.lap("control requests", "");
        if let Some(report) = clock.slow(stall_limit) {
            warn!("{report}; heartbeats to the peer wait meanwhile");
        }
        // The next turn comes after a step, or as soon as something arrives for the loop
        // (a peer's message, a witness reply, an agent's answer: `wake`).
        let switching = daemon.vms.iter().any(VmRunner::switching_over);
        wake::wait(if switching { FAST_STEP } else { STEP });
    }
    info!("stopping: the VMs and disk daemons of this host stop too");
    daemon.service.stopping();
    let mut events = Events::default();
    for vm in &mut daemon.vms {
        vm.shutdown(&mut events);
    }
    // The agents stop the processes; wait for them, all VMs at once.
    for vm in daemon.vms {
        vm.finish();
    }
    let _ = std::fs::remove_file(&daemon.config.host.control_socket);
    Ok(())
}

fn random_instance() -> Result<u64, String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|error| format!("cannot draw random bytes: {error}"))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Takes `path`'s exclusive lock for the daemon's lifetime, or names who holds it.
fn lock(path: &Path) -> Result<File, String> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(format!(
            "another ftvmd (pid {}) is running with this state_dir ({}); stop it first",
            holder.trim(),
            path.display()
        ));
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

/// What the VMs act through: the event list, the sessions, the launcher.
struct Io {
    events: Events,
    peer: PeerLink,
    witness: WitnessLink,
    launcher: Arc<dyn VmLauncher>,
}

impl Io {
    fn context(&mut self, now: Millis) -> Context<'_> {
        Context {
            now,
            events: &mut self.events,
            peer: &self.peer,
            witness: &self.witness,
            launcher: &self.launcher,
        }
    }
}

struct Daemon {
    config: Config,
    started: Instant,
    io: Io,
    vms: Vec<VmRunner>,
    disabled: bool,
    last_beat: Option<Instant>,
    last_links: (usize, usize),
    /// Authentication failures seen so far: with the peer, with the witness.
    last_auth: (u64, u64),
    /// Since when (ms since start) the witness has been out of reach.
    witness_lost_at: Option<u64>,
    heartbeat: Duration,
    /// This start of the daemon, for the peer to tell our heartbeats from a past run's.
    instance: u64,
    beat_sequence: u64,
    /// The newest heartbeat taken from the peer: its instance and sequence.
    peer_seen: Option<(u64, u64)>,
    /// The ids of the pair keys the peer holds, from its newest heartbeat.
    peer_keys: Option<Vec<String>>,
    /// systemd's side: ready, watchdog, stopping (nothing when not under systemd).
    service: ServiceManager,
    /// `ftvm check` and `ftvm collect-logs` under way, here and for the peer.
    asks: asks::Asks,
}

impl Daemon {
    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    fn start_vms(&mut self) -> Result<(), String> {
        for section in self.config.vm.clone() {
            let runner = self.new_runner(&section, None)?;
            self.vms.push(runner);
        }
        self.start_domains()
    }

    /// A VM's runner: its processes' specifications from its section (and, for a domain
    /// protected with `ftvm protect --domain`, its libvirt side).
    fn new_runner(
        &mut self,
        section: &VmSection,
        domain: Option<DomainSpec>,
    ) -> Result<VmRunner, String> {
        let timing = self.config.timing;
        let host_config = HostConfig {
            heartbeat_interval: timing.heartbeat_interval_ms,
            peer_timeout: timing.peer_timeout_ms,
            secondary_claim_delay: timing.secondary_claim_delay_ms,
            claim_retry: 200,
        };
        let bin_dir = match &self.config.host.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("/usr/bin")),
        };
        let pair = Pair {
            me: self.config.host.name.clone(),
            peer: self.config.peer.name.clone(),
        };
        let now = self.now();
        {
            let dir = self.config.host.state_dir.join(&section.name);
            let with_port = |addresses: &[SocketAddr], port: u16| {
                addresses
                    .iter()
                    .map(|address| SocketAddr::new(address.ip(), port))
                    .collect::<Vec<_>>()
            };
            let disks: Vec<DiskSpec> = section
                .disk
                .iter()
                .enumerate()
                .map(|(index, disk)| DiskSpec {
                    binary: bin_dir.join("vhost-blk-mirror"),
                    image: disk.image.clone(),
                    queues: disk.queues,
                    serial: format!("{}-disk{index}", section.name),
                    socket: dir.join(format!("disk{index}.sock")),
                    control: dir.join(format!("disk{index}.ctl")),
                    log: dir.join(format!("disk{index}.log")),
                    peer: with_port(&self.config.peer.addresses, disk.replication_port),
                    listen: with_port(&self.config.peer.listen, disk.replication_port),
                    psk_file: self.config.peer.psk_file.clone(),
                    host_name: self.config.host.name.clone(),
                    resync_rate_limit: disk.resync_rate_limit.clone(),
                })
                .collect();
            let nics: Vec<NicSpec> = section
                .nic
                .iter()
                .enumerate()
                .map(|(index, nic)| NicSpec {
                    binary: bin_dir.join("vhost-net-ft"),
                    socket: dir.join(format!("nic{index}.sock")),
                    control: dir.join(format!("nic{index}.ctl")),
                    log: dir.join(format!("nic{index}.log")),
                    mac: nic.mac.clone(),
                    bridge: nic.bridge.clone(),
                    queues: nic.queues,
                    redundancy: nic
                        .redundant_uplink()
                        .map(|(uplink, link_port)| NicRedundancy {
                            uplink: uplink.to_owned(),
                            peer: with_port(&self.config.peer.addresses, link_port),
                            listen: with_port(&self.config.peer.listen, link_port),
                            psk_file: self.config.peer.psk_file.clone(),
                            host_name: self.config.host.name.clone(),
                        }),
                })
                .collect();
            let vm_spec = VmSpec {
                name: section.name.clone(),
                memory_mib: section.memory_mib,
                vcpus: section.vcpus,
                accel: section.accel.clone(),
                disks: disks
                    .iter()
                    .map(|disk| (disk.socket.clone(), disk.queues))
                    .collect(),
                nics: nics
                    .iter()
                    .map(|nic| (nic.socket.clone(), nic.mac.clone(), nic.queues))
                    .collect(),
                console: dir.join("console.log"),
                qmp: dir.join("qmp.sock"),
                engine_qmp: dir.join("engine-qmp.sock"),
                guest_agent: dir.join("qga.sock"),
                ram_file: self
                    .config
                    .host
                    .ram_dir
                    .join(format!("{}.ram", section.name)),
                ram_track: Some(bin_dir.join("libftvm_ram_track.so"))
                    .filter(|library| library.exists())
                    .map(|library| (library, dir.join("ram-track.sock"))),
                incoming: false,
                log: dir.join("qemu.log"),
                extra_args: section.qemu_args.clone(),
                domain,
            };
            let engine = EngineSpec {
                binary: bin_dir.join("ftvm-checkpoint"),
                vm: section.name.clone(),
                control: dir.join("checkpoint.ctl"),
                log: dir.join("checkpoint.log"),
                state_dir: dir.join("replica"),
                ram_file: vm_spec.ram_file.clone(),
                ram_mib: section.memory_mib,
                ram_track: dir.join("ram-track.sock"),
                qmp: vm_spec.engine_qmp.clone(),
                disks: disks.iter().map(|disk| disk.control.clone()).collect(),
                nics: nics.iter().map(|nic| nic.control.clone()).collect(),
                port: section.checkpoint_port,
                peer: self.config.peer.addresses.clone(),
                listen: self.config.peer.listen.clone(),
                psk_file: self.config.peer.psk_file.clone(),
                host_name: self.config.host.name.clone(),
                peer_name: self.config.peer.name.clone(),
                interval_ms: section.checkpoint_interval_ms,
            };
            VmRunner::new(
                section.name.clone(),
                section.level,
                section.primary.clone(),
                pair.clone(),
                dir,
                host_config,
                disks,
                nics,
                vm_spec,
                engine,
                now,
                &mut self.io.events,
            )
            .map(|runner| runner.with_snapshot_consistency(section.snapshot_consistency))
        }
    }

    fn step(&mut self, clock: &mut stall::StepClock) {
        let now = self.now();
        let mut domain_messages = Vec::new();
        let mut context = self.io.context(now);
        let mut questions = Vec::new();
        while let Some((message, payload)) = context.peer.try_recv() {
            match message {
                PeerMessage::Ask { id, question } => questions.push((id, question)),
                PeerMessage::Answer { id } => self.asks.answered(id, &payload),
                PeerMessage::Beat {
                    host,
                    instance,
                    sequence,
                    vms,
                    keys,
                } => {
                    let stale = self
                        .peer_seen
                        .is_some_and(|(seen, last)| seen == instance && sequence <= last);
                    if stale {
                        continue;
                    }
                    self.peer_seen = Some((instance, sequence));
                    self.peer_keys = Some(keys);
                    if self.disabled {
                        continue;
                    }
                    if host != self.config.peer.name {
                        context.events.error(
                            "",
                            format!(
                                "heartbeat from {host:?}, but the configured peer is {:?}",
                                self.config.peer.name
                            ),
                            "both hosts' configurations must name each other",
                        );
                        continue;
                    }
                    for beat in vms {
                        if let Some(vm) = self.vms.iter_mut().find(|vm| vm.name == beat.vm) {
                            vm.on_beat(beat, &mut context);
                        }
                    }
                }
                message @ (PeerMessage::DefineDomain | PeerMessage::ForgetDomain { .. }) => {
                    domain_messages.push((message, payload));
                }
                PeerMessage::TakeOver { vm: name, live } => {
                    if self.disabled {
                        continue;
                    }
                    if let Some(vm) = self.vms.iter_mut().find(|vm| vm.name == name) {
                        vm.take_over(live, &mut context);
                    }
                }
            }
        }
        clock.lap("peer messages", "");
        for (message, payload) in domain_messages {
            match message {
                PeerMessage::DefineDomain => {
                    match postcard::from_bytes::<domains::DomainDefinition>(&payload) {
                        Ok(definition) => self.define_from_peer(definition),
                        Err(error) => self.io.events.error(
                            "",
                            format!(
                                "the peer sent a libvirt domain this host cannot read: {error}"
                            ),
                            "both hosts must run the same ftvm version",
                        ),
                    }
                }
                PeerMessage::ForgetDomain { vm } => self.forget_domain(&vm),
                _ => {}
            }
        }
        let mut context = self.io.context(now);
        while let Some(reply) = context.witness.try_recv() {
            match reply {
                WitnessReply::Verdict { vm: name, verdict } => {
                    if let Some(vm) = self.vms.iter_mut().find(|vm| vm.name == name) {
                        vm.on_verdict(verdict, &mut context);
                    }
                }
                WitnessReply::Grant { vm: name, grant } => {
                    if let Some(vm) = self.vms.iter_mut().find(|vm| vm.name == name) {
                        vm.on_registered(grant, &mut context);
                    }
                }
                WitnessReply::Standalone {
                    vm: name,
                    standalone,
                    generation,
                } => {
                    if let Some(vm) = self.vms.iter_mut().find(|vm| vm.name == name) {
                        vm.on_standalone(standalone, generation, &mut context);
                    }
                }
                WitnessReply::Error { vm, message } => context.events.error(
                    &vm,
                    format!("the witness answered: {message}"),
                    "check the witness's log",
                ),
            }
        }
        clock.lap("witness answers", "");
        if !self.disabled {
            for vm in &mut self.vms {
                vm.tick(&mut context);
                clock.lap("tick", &vm.name);
            }
            self.watch_protection();
        }
        self.watch_links(now);
        clock.lap("link watch", "");
        for (id, question) in questions {
            let work = self.answer_work(question);
            self.asks.serve(id, work);
        }
        for finished in self.asks.poll(&self.io.peer) {
            self.finished(finished);
        }
        clock.lap("checks", "");
        let due = self
            .last_beat
            .is_none_or(|last| last.elapsed() >= self.heartbeat);
        if due {
            self.last_beat = Some(Instant::now());
            self.service.alive();
            let vms = if self.disabled {
                Vec::new()
            } else {
                self.vms.iter().map(VmRunner::beat).collect()
            };
            self.beat_sequence += 1;
            self.io.peer.send(
                &PeerMessage::Beat {
                    host: self.config.host.name.clone(),
                    instance: self.instance,
                    sequence: self.beat_sequence,
                    vms,
                    keys: self.io.peer.keys_held(),
                },
                false,
            );
            clock.lap("heartbeat", "");
        }
    }

    fn watch_links(&mut self, now: Millis) {
        // Keys first: a mismatch looks like a dead link otherwise.
        let auth = (
            self.io.peer.auth_failures(),
            self.io.witness.auth_failures(),
        );
        if auth.0 > self.last_auth.0 && self.last_auth.0 == 0 {
            self.io.events.error(
                "",
                format!(
                    "authentication with {} failed: the two hosts hold different keys",
                    self.config.peer.name
                ),
                &format!(
                    "put the same key in [peer] psk_file ({}) on both hosts",
                    self.config.peer.psk_file.display()
                ),
            );
        }
        if auth.1 > self.last_auth.1 && self.last_auth.1 == 0 {
            self.io.events.error(
                "",
                "authentication with the witness failed: wrong key".into(),
                &format!(
                    "[witness] psk_file ({}) must hold the key of ftvm-witness --psk-file",
                    self.config.witness.psk_file.display()
                ),
            );
        }
        self.last_auth = auth;
        // Give the links one peer timeout to come up before judging them.
        if now < self.config.timing.peer_timeout_ms {
            return;
        }
        let links = self.io.peer.links_up();
        if links != self.last_links {
            let (up, total) = links;
            // The peer is back (or heard for the first time): compare what the VMs need.
            if up > 0 && matches!(self.last_links.0, 0 | usize::MAX) {
                self.check_on_rejoin();
            }
            let errors = self.io.peer.link_errors().join("; ");
            let errors = if errors.is_empty() {
                String::new()
            } else {
                format!(" ({errors})")
            };
            if up == 0 {
                self.io.events.raise(
                    Condition::ALinkDown,
                    Severity::Warning,
                    "",
                    format!(
                        "all {total} A-link(s) to {} are down{errors}",
                        self.config.peer.name
                    ),
                    "check the links and that ftvmd runs on the peer; VMs fail over if the \
                     peer host is lost",
                );
            } else if up < total {
                self.io.events.raise(
                    Condition::ALinkDown,
                    Severity::Warning,
                    "",
                    format!(
                        "{up} of {total} A-links to {} up{errors}",
                        self.config.peer.name
                    ),
                    "repair the down link: one more failure cuts the hosts apart",
                );
            } else if self.last_links.0 != usize::MAX {
                self.io.events.clear(
                    Condition::ALinkDown,
                    "",
                    format!("all {total} A-links to {} up", self.config.peer.name),
                );
            }
            self.last_links = links;
        }
        let witness = self.io.witness.reachable();
        self.watch_witness(witness, now);
        // A primary cut from both its peer and the witness stops rather than hold for ever.
        if !witness {
            for vm in &mut self.vms {
                vm.isolated(&mut self.io.context(now));
            }
        }
    }

    /// Raises [`Condition::WitnessUnreachable`] once the witness has been out of reach for
    /// a peer timeout, and clears it when the witness answers again. A restart of the
    /// witness (an upgrade, a key rotation) is back within milliseconds and alerts
    /// nobody; deciding needs no grace, only the alert does (`isolated` acts at once).
    fn watch_witness(&mut self, reachable: bool, now: u64) {
        let raised = self.io.events.is_raised(Condition::WitnessUnreachable, "");
        if reachable {
            if let Some(lost_at) = self.witness_lost_at.take() {
                if raised {
                    self.io.events.clear(
                        Condition::WitnessUnreachable,
                        "",
                        "the witness is reachable again".into(),
                    );
                } else {
                    info!(
                        "the witness was out of reach for {} ms (less than the peer timeout: \
                         no alert)",
                        now.saturating_sub(lost_at)
                    );
                }
            }
            return;
        }
        let lost_at = *self.witness_lost_at.get_or_insert(now);
        if !raised && now.saturating_sub(lost_at) >= self.config.timing.peer_timeout_ms {
            self.io.events.raise(
                Condition::WitnessUnreachable,
                Severity::Warning,
                "",
                "the witness is unreachable: VMs keep running, but no failover can happen \
                 until it returns"
                    .into(),
                "check the witness host and the network to it",
            );
        }
    }

    /// Raises [`Condition::VmUnprotected`] when a protected VM's primary (here) runs on
    /// one copy, and clears it when both copies are in sync again (or protection ends).
    fn watch_protection(&mut self) {
        for vm in &self.vms {
            let beat = vm.beat();
            let raised = self.io.events.is_raised(Condition::VmUnprotected, &vm.name);
            let lost = matches!(
                beat.state.as_str(),
                "Degraded" | "RemoteOnly" | "Rebuilding"
            );
            // A planned failover or move leaves the new primary on one copy until the old
            // one rejoins as secondary: only if that takes longer is redundancy lost.
            if !raised && beat.protected && beat.role == Role::Primary && lost && !vm.planned() {
                let advice = match beat.state.as_str() {
                    "Degraded" => format!(
                        "bring {} back: the copies resync and protection returns by itself",
                        self.config.peer.name
                    ),
                    _ => "repair this host's disk (see the disk daemon's log): the copy is \
                          rebuilt from the peer by itself"
                        .to_owned(),
                };
                self.io.events.raise(
                    Condition::VmUnprotected,
                    Severity::Warning,
                    &vm.name,
                    format!(
                        "no longer protected: its disks are {} on {} (one copy)",
                        beat.state, self.config.host.name
                    ),
                    &advice,
                );
            } else if raised && (beat.state == "Protected" || !beat.protected) {
                let what = if beat.protected {
                    "Protected again: both copies are in sync"
                } else {
                    "protection ended (ftvm unprotect)"
                };
                self.io
                    .events
                    .clear(Condition::VmUnprotected, &vm.name, what.into());
            }
        }
    }

    /// `ftvm snapshot`: handed to the VM, which answers on `answer` when done.
    fn snapshot(
        &mut self,
        name: &str,
        command: control::SnapshotCommand,
        answer: std::sync::mpsc::Sender<Reply>,
    ) {
        let now = self.now();
        let mut context = self.io.context(now);
        match self.vms.iter_mut().find(|vm| vm.name == name) {
            None => {
                let _ = answer.send(Reply::Error(unknown_vm(name, &self.config)));
            }
            Some(vm) => vm.snapshot(command, answer, &mut context),
        }
    }

    fn handle(&mut self, request: Request) -> Reply {
        let now = self.now();
        match request {
            Request::Snapshot { vm, .. } => {
                Reply::Error(format!("snapshot of {vm}: asked without a way to answer"))
            }
            Request::AlertTest => Reply::Error("alert test: asked without a way to answer".into()),
            Request::Check { .. } | Request::CollectLogs => {
                Reply::Error("check or collect-logs: asked without a way to answer".into())
            }
            Request::Status => {
                let (links_up, links) = self.io.peer.links_up();
                Reply::Status(Box::new(HostStatus {
                    host: self.config.host.name.clone(),
                    pair_key: KeyStatus {
                        file: self.config.peer.psk_file.clone(),
                        held: self.io.peer.keys_held(),
                        in_use: self.io.peer.keys_in_use(),
                        peer_holds: self.peer_keys.clone(),
                    },
                    witness_key: KeyStatus {
                        file: self.config.witness.psk_file.clone(),
                        held: self.io.witness.keys_held(),
                        in_use: self.io.witness.keys_in_use(),
                        peer_holds: None,
                    },
                    peer: self.config.peer.name.clone(),
                    peer_reachable: links_up > 0,
                    links_up,
                    links,
                    alinks: self.io.peer.links(),
                    witness_reachable: self.io.witness.reachable(),
                    disabled: self.disabled,
                    vms: self.vms.iter().map(|vm| vm.status(now)).collect(),
                    alerts: self
                        .io
                        .events
                        .alerts()
                        .map(Alerts::status)
                        .unwrap_or_default(),
                    libvirt_uri: Some(self.config.libvirt.uri.clone()),
                }))
            }
            Request::Events => Reply::Events(self.io.events.all()),
            Request::Failover { vm: name } => {
                let mut context = self.io.context(now);
                match self.vms.iter_mut().find(|vm| vm.name == name) {
                    None => Reply::Error(unknown_vm(&name, &self.config)),
                    Some(vm) => match vm.hand_over(&mut context) {
                        Ok(done) => Reply::Done(done),
                        Err(error) => Reply::Error(error),
                    },
                }
            }
            Request::Migrate {
                vm: name,
                cancel,
                timeout_s,
            } => {
                let mut context = self.io.context(now);
                match self.vms.iter_mut().find(|vm| vm.name == name) {
                    None => Reply::Error(unknown_vm(&name, &self.config)),
                    Some(vm) if vm.is_domain() => Reply::Error(format!(
                        "{name} is a libvirt domain: a live move needs Level 3, which protected                          domains do not have yet; `ftvm failover {name}` restarts it on the peer"
                    )),
                    Some(vm) => {
                        let result = if cancel {
                            vm.cancel_migration(&mut context)
                        } else {
                            vm.migrate(Duration::from_secs(timeout_s), &mut context)
                        };
                        match result {
                            Ok(done) => Reply::Done(done),
                            Err(error) => Reply::Error(error),
                        }
                    }
                }
            }
            Request::Protect {
                vm: name,
                level,
                peer,
            } => {
                if peer != self.config.peer.name {
                    return Reply::Error(format!(
                        "{peer:?} is not this host's peer: ftvmd on {} pairs with {} (see \
                         [peer] in its configuration)",
                        self.config.host.name, self.config.peer.name
                    ));
                }
                if !matches!(level, 1..=3) {
                    return Reply::Error(format!(
                        "level {level} is not supported: 1 (restart on the peer), 2 (also \
                         component fault tolerance) or 3 (also the VM's memory and sessions \
                         survive the loss of its host)"
                    ));
                }
                let mut context = self.io.context(now);
                match self.vms.iter_mut().find(|vm| vm.name == name) {
                    None => Reply::Error(format!(
                        "{} not defined: add a [[vm]] section (disks, memory, primary) to \
                         the configuration of both hosts and restart ftvmd",
                        unknown_vm(&name, &self.config)
                    )),
                    Some(vm) if vm.is_domain() && level == 3 => Reply::Error(format!(
                        "{name} is a libvirt domain: protected domains run at level 1 or 2 \
                         (Level 3 needs the VM's RAM in a file, not libvirt's memfd)"
                    )),
                    Some(vm) => match vm.protect(level, &mut context) {
                        Ok(done) => Reply::Done(done),
                        Err(error) => Reply::Error(error),
                    },
                }
            }
            Request::Unprotect { vm: name } => {
                let mut context = self.io.context(now);
                match self.vms.iter_mut().find(|vm| vm.name == name) {
                    None => Reply::Error(unknown_vm(&name, &self.config)),
                    Some(vm) => match vm.unprotect(&mut context) {
                        Ok(done) => Reply::Done(done),
                        Err(error) => Reply::Error(error),
                    },
                }
            }
            Request::ProtectDomain {
                domain,
                xml,
                level,
                peer,
                confirmed,
            } => match self.protect_domain(&domain, &xml, level, &peer, confirmed) {
                Ok(done) => Reply::Done(done),
                Err(error) => Reply::Error(format!("cannot protect domain {domain}: {error}")),
            },
            Request::LibvirtHook { vm, operation } => self.libvirt_hook(&vm, &operation),
            Request::HostDisable { restart } => self.disable(restart, now),
            Request::HostEnable => {
                if !self.disabled {
                    return Reply::Done(format!("{} is already enabled", self.config.host.name));
                }
                if let Err(error) = remove_durably(&self.disabled_marker()) {
                    return Reply::Error(format!(
                        "{} stays disabled: cannot remove {}: {error}",
                        self.config.host.name,
                        self.disabled_marker().display()
                    ));
                }
                self.disabled = false;
                self.io.events.info(
                    "",
                    "host enabled: its VMs rejoin as secondaries and resync".into(),
                );
                Reply::Done(format!("{} enabled", self.config.host.name))
            }
        }
    }

    /// Planned maintenance: every VM this host runs moves to the peer (live, or stopped and
    /// restarted there with `restart` or where it cannot move live), then this host's
    /// daemons for the VMs stop and it leaves the heartbeat, so the peer runs them alone.
    fn disable(&mut self, restart: bool, now: Millis) -> Reply {
        let marker = self.disabled_marker();
        let mut context = self.io.context(now);
        // Done once no VM is primary here and every move has ended (the VM runs on the
        // peer).
        if !self
            .vms
            .iter()
            .any(|vm| vm.beat().role == Role::Primary || vm.migrating())
        {
            // Remembered first: a restarted ftvmd must not rejoin in the middle of the
            // maintenance.
            if let Err(error) = write_durably(&marker, "ftvm host disable\n") {
                return Reply::Error(format!(
                    "host not disabled: cannot write {}: {error}",
                    marker.display()
                ));
            }
            self.disabled = true;
            for vm in &mut self.vms {
                vm.shutdown(context.events);
            }
            context.events.warn(
                "",
                "host disabled: no VM runs here and its disk daemons are stopped".into(),
                "`ftvm host enable` when the maintenance is over",
            );
            return Reply::Done(format!(
                "{} disabled: its VMs run on {} alone until `ftvm host enable`",
                self.config.host.name, self.config.peer.name
            ));
        }
        let mut refused = Vec::new();
        for vm in &mut self.vms {
            if vm.beat().role == Role::Primary && !vm.handing_over() {
                if let Err(error) = vm.move_for_maintenance(restart, &mut context) {
                    refused.push(error);
                }
            }
        }
        if !refused.is_empty() {
            return Reply::Error(format!(
                "host not disabled: {}; retry when every VM is Protected",
                refused.join("; ")
            ));
        }
        Reply::Done(format!("moving primaries to {}", self.config.peer.name))
    }
}

impl Daemon {
    /// Present while the host is disabled (`ftvm host disable`), across restarts.
    fn disabled_marker(&self) -> PathBuf {
        self.config.host.state_dir.join("host-disabled")
    }
}

/// Writes `path` and syncs it and its directory.
fn write_durably(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    sync_parent(path)
}

/// Removes `path` (gone already is fine) and syncs its directory. Once the file is gone
/// the removal stands: a failed sync is only warned about.
fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Err(error) = sync_parent(path) {
                log::warn!(
                    "removed {} but cannot sync its directory: {error}",
                    path.display()
                );
            }
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn unknown_vm(name: &str, config: &Config) -> String {
    let known: Vec<&str> = config.vm.iter().map(|vm| vm.name.as_str()).collect();
    format!("no VM named {name:?} (known: {})", known.join(", "))
}

/// The default launcher: QEMU from the configuration.
pub fn qemu_launcher(config: &Config) -> Box<dyn VmLauncher> {
    Box::new(HostLauncher {
        qemu: QemuLauncher {
            binary: config.host.qemu.clone(),
        },
    })
}
