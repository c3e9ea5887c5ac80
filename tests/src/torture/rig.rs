//! One torture run's test bed: a [`MirrorPair`] (images on `ftvm-fault-fs` where the row
//! needs it), the guest writing the plan, a monitor that samples both daemons, and the
//! coordinator's part played by the test (`continue-degraded GEN`, `repair`) as
//! `tests/tests/mirror_faults.rs` does. Everything is ended and removed on drop, pass or fail.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::monitor::Monitor;
use super::workload::{self, Plan, Workload};
use crate::blk::{status_json, BlkDaemon};
use crate::fault_fs::FaultFs;
use crate::guest::{Disk, Guest, GuestConfig};
use crate::mirror::{MirrorPair, REPLICATION_PORT};

/// The A-link addresses of hostA (see `ci/hosts.sh`).
const HOST_A_LINKS: [&str; 2] = ["10.77.1.1", "10.77.2.1"];
use crate::wait::poll_until;

/// The disk: 8192 blocks of 4 KiB, 8 activity extents of 4 MiB.
pub const IMAGE_BYTES: u64 = 32 << 20;
/// Syncs, resyncs, rebuilds, state changes: all well under this.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Guest boot and the whole plan, on a loaded machine under TCG.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a primary may hold (or connect) with no peer before the test, playing the
/// coordinator, grants it the next generation: the peer timeout (1 s) and some.
const HOLD_GRACE: Duration = Duration::from_millis(1500);

/// Which copies live on a fault-injecting file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout {
    pub primary_on_fault_fs: bool,
    pub secondary_on_fault_fs: bool,
}

/// A host's boot id file (`--boot-id-file`): a new id = the host rebooted.
#[derive(Debug)]
struct BootId {
    path: PathBuf,
    boot: u32,
}

impl BootId {
    fn new(path: PathBuf) -> BootId {
        let boot_id = BootId { path, boot: 1 };
        boot_id.write();
        boot_id
    }

    fn write(&self) {
        let text = format!("{:08x}-1b2c-4d5e-8f90-a1b2c3d4e5f6\n", self.boot);
        std::fs::write(&self.path, text).expect("write boot id");
    }

    fn reboot(&mut self) {
        self.boot += 1;
        self.write();
    }
}

/// The test bed. Fields drop in order: guest, monitor, daemons and hosts, file systems.
#[derive(Debug)]
pub struct Rig {
    pub guest: Option<Guest>,
    /// What the guest runs (set when it boots).
    pub workload: Workload,
    /// The console of a guest that was killed (with its host).
    kept_console: Vec<String>,
    monitor: Monitor,
    pub pair: MirrorPair,
    pub primary_fs: Option<FaultFs>,
    pub secondary_fs: Option<FaultFs>,
    primary_boot: Option<BootId>,
    secondary_boot: Option<BootId>,
    /// The highest generation granted so far (the witness's counter).
    pub generation: u64,
    started: Instant,
    /// What happened, with times since the start: printed, and kept in the result.
    pub timeline: Vec<String>,
}

impl Rig {
    /// Makes the pair, starts both daemons and waits for the initial sync.
    pub fn start(name: &str, layout: Layout, primary_args: &[&str]) -> Rig {
        let primary_fs = layout.primary_on_fault_fs.then(FaultFs::start);
        let secondary_fs = layout.secondary_on_fault_fs.then(FaultFs::start);
        let mut pair = MirrorPair::new(name, IMAGE_BYTES, 1);
        pair.primary_options
            .extra_args
            .extend(primary_args.iter().map(|arg| arg.to_string()));
        let primary_boot = primary_fs.as_ref().map(|fs| {
            place_image(&mut pair.primary_options, fs, "primary.img");
            boot_id_for(
                &mut pair.primary_options,
                pair.dir.path().join("hostA.boot_id"),
            )
        });
        if layout.primary_on_fault_fs {
            // Where a promoted secondary reaches the old primary: makes failover possible
            // when the primary cannot serve (its disk failed and it fenced itself).
            for address in HOST_A_LINKS {
                pair.secondary_options
                    .extra_args
                    .extend(["--peer".to_owned(), format!("{address}:{REPLICATION_PORT}")]);
            }
        }
        let secondary_boot = secondary_fs.as_ref().map(|fs| {
            place_image(&mut pair.secondary_options, fs, "secondary.img");
            boot_id_for(
                &mut pair.secondary_options,
                pair.dir.path().join("hostB.boot_id"),
            )
        });
        pair.start_secondary();
        pair.start_primary();
        let monitor = Monitor::start(
            pair.primary_options.control.clone(),
            pair.secondary_options.control.clone(),
        );
        let mut rig = Rig {
            guest: None,
            workload: Workload::Records,
            kept_console: Vec::new(),
            monitor,
            pair,
            primary_fs,
            secondary_fs,
            primary_boot,
            secondary_boot,
            generation: 0,
            started: Instant::now(),
            timeline: Vec::new(),
        };
        rig.pair.wait_in_sync(SYNC_TIMEOUT);
        rig.generation = rig.primary_replication()["generation"]
            .as_u64()
            .unwrap_or(0);
        rig.note("in sync");
        rig
    }

    /// Records a step of the run.
    pub fn note(&mut self, what: &str) {
        let line = format!("{:7.3}s {what}", self.started.elapsed().as_secs_f64());
        eprintln!("torture: {line}");
        self.timeline.push(line);
    }

    /// Boots the guest on the primary's socket, in hostA, running `plan`.
    pub fn boot_guest(&mut self, name: &str, plan: &Plan) {
        let mut config = GuestConfig::new(name, "");
        config.disks.push(Disk {
            socket: self.pair.primary_options.socket.clone(),
            queues: self.pair.primary_options.queues,
        });
        config.netns = Some(self.pair.hosts.namespace("hostA"));
        workload::add_torture_writer(&mut config, plan);
        self.workload = plan.workload;
        self.guest = Some(Guest::boot(&config, self.pair.dir.path()));
        self.note("guest booted");
    }

    pub fn guest(&self) -> &Guest {
        self.guest.as_ref().expect("the guest runs")
    }

    /// The guest's console so far (or as it was when the guest was killed).
    pub fn console(&self) -> Vec<String> {
        match &self.guest {
            Some(guest) => guest.console(),
            None => self.kept_console.clone(),
        }
    }

    /// QEMU dies (with its host): SIGKILL; its console is kept.
    pub fn kill_guest(&mut self) {
        if let Some(guest) = self.guest.take() {
            self.kept_console = guest.console();
            drop(guest);
            self.note("guest killed");
        }
    }

    /// Waits until the guest acknowledged `count` writes (or finished its plan first).
    pub fn wait_acknowledged(&self, count: u64) {
        let guest = self.guest();
        guest.wait_for_line_while_progressing(GUEST_TIMEOUT, |line| {
            line.starts_with("DONE ")
                || workload::parse_ack(line).is_some_and(|(seq, _)| seq >= count)
        });
    }

    pub fn primary_replication(&self) -> Value {
        self.pair.primary().status()["replication"].clone()
    }

    pub fn secondary_replication(&self) -> Value {
        self.pair.secondary().status()["replication"].clone()
    }

    pub fn wait_primary(&self, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
        self.pair
            .primary()
            .wait_replication(SYNC_TIMEOUT, what, condition)
    }

    /// The next generation, as the witness would grant it.
    pub fn grant(&mut self) -> u64 {
        let primary = status_json(&self.pair.primary_options.control);
        let secondary = status_json(&self.pair.secondary_options.control);
        let seen = [primary, secondary]
            .iter()
            .flatten()
            .filter_map(|status| status["replication"]["generation"].as_u64())
            .max()
            .unwrap_or(0);
        self.generation = self.generation.max(seen) + 1;
        self.generation
    }

    /// The coordinator's answer to a lost peer: `continue-degraded` at a new generation.
    pub fn continue_degraded(&mut self) {
        let generation = self.grant();
        let reply = self
            .pair
            .primary()
            .command(&format!("continue-degraded {generation}"));
        assert_eq!(
            reply["ok"], true,
            "continue-degraded {generation} refused: {reply}"
        );
        self.note(&format!("continue-degraded {generation}"));
    }

    /// Waits for the primary to hold on its lost peer, then continues degraded.
    pub fn hold_then_continue_degraded(&mut self) {
        self.wait_primary("Holding", |r| r["mode"] == "Holding");
        self.note("primary Holding");
        self.continue_degraded();
        self.wait_primary("Degraded", |r| r["mode"] == "Degraded");
    }

    /// `repair` on one side (after its disk was fixed).
    pub fn repair(&mut self, primary: bool) {
        let daemon = if primary {
            self.pair.primary()
        } else {
            self.pair.secondary()
        };
        let reply = daemon.command("repair");
        assert_eq!(reply["ok"], true, "repair refused: {reply}");
        self.note(if primary {
            "repair on the primary"
        } else {
            "repair on the secondary"
        });
    }

    /// SIGKILL of the primary's daemon and a restart in the same role; QEMU reconnects.
    pub fn restart_primary(&mut self) {
        self.pair.kill_primary();
        self.note("primary killed");
        self.pair.start_primary();
        self.note("primary restarted");
    }

    pub fn kill_secondary(&mut self) {
        self.pair.kill_secondary();
        self.note("secondary killed");
    }

    pub fn start_secondary(&mut self) {
        self.pair.start_secondary();
        self.note("secondary started");
    }

    /// The host of one side loses power: its daemon dies, its unsynced writes are lost, it
    /// boots again (a new boot id). The daemon is not started again here.
    pub fn power_loss(&mut self, primary: bool) -> u64 {
        let (fs, boot) = if primary {
            self.pair.kill_primary();
            (self.primary_fs.as_ref(), self.primary_boot.as_mut())
        } else {
            self.pair.kill_secondary();
            (self.secondary_fs.as_ref(), self.secondary_boot.as_mut())
        };
        let lost = fs.expect("the side is on fault-fs").power_loss();
        boot.expect("the side has a boot id").reboot();
        self.note(&format!("power loss: {lost} unsynced bytes dropped"));
        lost
    }

    /// The primary cannot serve (fenced): as `ftvmd` would, stop its VM and promote the
    /// secondary at the next generation. The roles swap: from now on `primary` is hostB's
    /// daemon, `secondary` the old primary (still running, fenced).
    pub fn fail_over(&mut self) {
        self.kill_guest();
        let generation = self.grant();
        let reply = self
            .pair
            .secondary()
            .command(&format!("promote {generation}"));
        assert_eq!(reply["ok"], true, "promote {generation} refused: {reply}");
        self.note(&format!("secondary promoted at generation {generation}"));
        let pair = &mut self.pair;
        std::mem::swap(&mut pair.primary, &mut pair.secondary);
        std::mem::swap(&mut pair.primary_options, &mut pair.secondary_options);
        std::mem::swap(&mut self.primary_fs, &mut self.secondary_fs);
        std::mem::swap(&mut self.primary_boot, &mut self.secondary_boot);
    }

    /// After a failover: the old primary's daemon stops, its disk is fixed (faults
    /// cleared) and it starts again as the new primary's secondary, listening on hostA's
    /// A-links.
    pub fn rejoin_old_primary(&mut self) {
        self.pair.kill_secondary();
        if let Some(fs) = &self.secondary_fs {
            fs.clear();
        }
        let mut args = Vec::new();
        let mut old = self.pair.secondary_options.extra_args.iter();
        while let Some(arg) = old.next() {
            match arg.as_str() {
                "--role" => {
                    old.next();
                    args.extend(["--role".to_owned(), "secondary".to_owned()]);
                }
                "--peer" => {
                    old.next();
                }
                _ => args.push(arg.clone()),
            }
        }
        for address in HOST_A_LINKS {
            args.extend([
                "--listen".to_owned(),
                format!("{address}:{REPLICATION_PORT}"),
            ]);
        }
        self.pair.secondary_options.extra_args = args;
        self.start_secondary();
    }

    /// Sets an A-link of hostA up or down.
    pub fn set_link(&mut self, link: &str, state: &str) {
        let namespace = self.pair.hosts.namespace("hostA");
        let status = std::process::Command::new("ip")
            .args(["-n", &namespace, "link", "set", link, state])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip link set {link} {state} failed");
        self.note(&format!("{link} {state}"));
    }

    /// Plays the coordinator until both copies are UpToDate at the same generation and
    /// nothing is out of sync: a primary that holds or connects for longer than
    /// [`HOLD_GRACE`] gets `continue-degraded` at the next generation (once per episode).
    pub fn drive_to_protected(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut holding_since: Option<Instant> = None;
        let mut granted = false;
        loop {
            let primary = status_json(&self.pair.primary_options.control)
                .map(|status| status["replication"].clone())
                .unwrap_or_default();
            let secondary = status_json(&self.pair.secondary_options.control)
                .map(|status| status["replication"].clone())
                .unwrap_or_default();
            if is_protected(&primary, &secondary) {
                return;
            }
            let waiting = primary["mode"] == "Holding" || primary["mode"] == "Connecting";
            match (waiting, holding_since) {
                (true, None) => holding_since = Some(Instant::now()),
                (true, Some(since)) if !granted && since.elapsed() >= HOLD_GRACE => {
                    self.note(&format!("primary {} for {HOLD_GRACE:?}", primary["mode"]));
                    self.continue_degraded();
                    granted = true;
                }
                (false, _) => {
                    holding_since = None;
                    granted = false;
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "not back to Protected within {timeout:?}; primary: {primary:#}\nsecondary: {secondary:#}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the guest's plan to end; `None` if the guest is gone (killed with its
    /// host). Returns its exit code.
    pub fn finish_guest(&mut self) -> Option<i32> {
        let guest = self.guest.as_mut()?;
        // As long as the guest keeps writing: on a loaded machine a plan can take minutes.
        let exit = guest
            .wait_for_line_while_progressing(GUEST_TIMEOUT, |line| line.starts_with("FTVM-EXIT "));
        let code = exit
            .trim_start_matches("FTVM-EXIT ")
            .trim()
            .parse()
            .unwrap_or(-1);
        guest.wait_poweroff(GUEST_TIMEOUT);
        self.kept_console = guest.console();
        self.note(&format!("guest finished (exit {code})"));
        Some(code)
    }

    /// The monitor's findings so far.
    pub fn monitor(&self) -> super::monitor::Findings {
        self.monitor.findings()
    }

    /// The daemon objects, for rows that look at one directly.
    pub fn primary(&self) -> &BlkDaemon {
        self.pair.primary()
    }
}

/// Both copies UpToDate at the same generation, mirrored, nothing out of sync.
pub fn is_protected(primary: &Value, secondary: &Value) -> bool {
    primary["mode"] == "Mirrored"
        && primary["disk_state"] == "UpToDate"
        && primary["local_disk"] == "Healthy"
        && primary["out_of_sync_bytes"] == 0
        && secondary["disk_state"] == "UpToDate"
        && secondary["generation"] == primary["generation"]
}

fn place_image(options: &mut crate::blk::BlkOptions, fs: &FaultFs, name: &str) {
    options.image = fs.path(name);
    crate::create_image(&options.image, IMAGE_BYTES);
}

fn boot_id_for(options: &mut crate::blk::BlkOptions, path: PathBuf) -> BootId {
    options
        .extra_args
        .extend(["--boot-id-file".to_owned(), path.display().to_string()]);
    BootId::new(path)
}

/// Polls `condition` on the primary's replication status; `false` if `timeout` passed.
pub fn primary_reaches(rig: &Rig, timeout: Duration, condition: impl Fn(&Value) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition(&rig.primary_replication()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `what` with the rig's sync timeout (a panic names it).
pub fn wait(what: &str, condition: impl FnMut() -> bool) {
    poll_until(SYNC_TIMEOUT, what, condition);
}
