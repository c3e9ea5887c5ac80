//! The disk-level rows of the fault matrix: each injects its fault at the moment the run's
//! seed chose, plays the coordinator's part until a copy serves again, and says which copy
//! serves and how the row repairs.

use std::time::{Duration, Instant};

use super::random::Random;
use super::rig::{primary_reaches, Layout, Rig};
use crate::wait::poll_until;

/// A row of the fault matrix at the level of a mirrored pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    SecondaryEio,
    SecondaryEnospc,
    PrimaryEio,
    PrimaryEnospc,
    SecondaryPowerLoss,
    PrimaryPowerLoss,
    KillSyncing,
    KillProtected,
    KillDegraded,
    KillRemoteOnly,
    KillHolding,
    OneLinkCut,
    BothLinksCut,
}

impl Row {
    pub const ALL: [Row; 13] = [
        Row::SecondaryEio,
        Row::SecondaryEnospc,
        Row::PrimaryEio,
        Row::PrimaryEnospc,
        Row::SecondaryPowerLoss,
        Row::PrimaryPowerLoss,
        Row::KillSyncing,
        Row::KillProtected,
        Row::KillDegraded,
        Row::KillRemoteOnly,
        Row::KillHolding,
        Row::OneLinkCut,
        Row::BothLinksCut,
    ];

    /// The row's name in `ci/torture.sh --rows` and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Row::SecondaryEio => "secondary-eio",
            Row::SecondaryEnospc => "secondary-enospc",
            Row::PrimaryEio => "primary-eio",
            Row::PrimaryEnospc => "primary-enospc",
            Row::SecondaryPowerLoss => "secondary-power-loss",
            Row::PrimaryPowerLoss => "primary-power-loss",
            Row::KillSyncing => "kill-syncing",
            Row::KillProtected => "kill-protected",
            Row::KillDegraded => "kill-degraded",
            Row::KillRemoteOnly => "kill-remote-only",
            Row::KillHolding => "kill-holding",
            Row::OneLinkCut => "one-link-cut",
            Row::BothLinksCut => "both-links-cut",
        }
    }

    pub fn from_name(name: &str) -> Option<Row> {
        Row::ALL.into_iter().find(|row| row.name() == name)
    }

    /// What the row does, for `docs/RELIABILITY.md`.
    pub fn description(self) -> &'static str {
        match self {
            Row::SecondaryEio => "ftvm-fault-fs fails every write to the secondary's image with EIO. The primary holds; the test grants the next generation (`continue-degraded GEN`). Repair: faults cleared, `repair` on the secondary, resync.",
            Row::SecondaryEnospc => "ftvm-fault-fs gives the secondary's file system a random write budget (0–512 KiB, `enospc-after`), then ENOSPC on every write, metadata included. Handled and repaired as secondary EIO.",
            Row::PrimaryEio => "ftvm-fault-fs fails every write to the primary's image with EIO: the primary serves from the peer (RemoteOnly). Repair: faults cleared, `repair` on the primary, rebuild.",
            Row::PrimaryEnospc => "The primary's file system gets a random write budget (0–512 KiB), then ENOSPC on every write, metadata included. A primary that can record its disk's failure serves from the peer (RemoteOnly; repaired as primary EIO); one that cannot fences itself, and the test fails over as `ftvmd` would: the guest is stopped, `promote GEN` on the secondary, and the old primary, its disk fixed, rejoins as the new primary's secondary (full resync).",
            Row::SecondaryPowerLoss => "The secondary's daemon is killed, ftvm-fault-fs drops every unsynced write (power loss), the host gets a new boot id and the daemon starts again. The test continues degraded if the primary holds over 1.5 s.",
            Row::PrimaryPowerLoss => "The primary's host loses power: QEMU and the daemon die, unsynced writes are dropped, a new boot id; the daemon restarts in place and must not trust its copy (RemoteOnly expected, data served by the secondary). Repair: `repair`, rebuild. The acknowledged records checked are those the guest acknowledged before its host died.",
            Row::KillSyncing => "Secondary killed, primary continues degraded, the guest writes on; the secondary returns behind a 20 ms ftvm-fault-fs delay so the delta resync lasts; the primary's daemon is SIGKILLed at a random point of the resync and restarted (QEMU reconnects).",
            Row::KillProtected => "SIGKILL of the primary's daemon while both copies are UpToDate under the guest's writes; restarted at once (QEMU reconnects).",
            Row::KillDegraded => "Secondary killed, primary continues degraded; after more writes the primary's daemon is SIGKILLed and restarted, the test grants a new generation (`continue-degraded GEN`); repair: the secondary starts again (delta resync).",
            Row::KillRemoteOnly => "The primary's image fails writes (EIO) so it serves from the peer; after more writes its daemon is SIGKILLed and restarted: it must still be RemoteOnly. Repair: faults cleared, `repair`, rebuild.",
            Row::KillHolding => "Secondary killed; while the primary holds a write for it, the primary's daemon is SIGKILLed and restarted; repair: the secondary starts again.",
            Row::OneLinkCut => "One A-link (chosen by the seed) is cut in hostA: writes go on over the other. Repair: the link comes back.",
            Row::BothLinksCut => "Both A-links cut: the primary holds; the test grants the next generation (`continue-degraded GEN`). Repair: the links come back, delta resync.",
        }
    }

    /// Which copies need ftvm-fault-fs, and extra primary flags.
    pub fn layout(self) -> Layout {
        match self {
            Row::SecondaryEio
            | Row::SecondaryEnospc
            | Row::SecondaryPowerLoss
            | Row::KillSyncing => Layout {
                primary_on_fault_fs: false,
                secondary_on_fault_fs: true,
            },
            Row::PrimaryEio | Row::PrimaryEnospc | Row::PrimaryPowerLoss | Row::KillRemoteOnly => {
                Layout {
                    primary_on_fault_fs: true,
                    secondary_on_fault_fs: false,
                }
            }
            Row::KillProtected
            | Row::KillDegraded
            | Row::KillHolding
            | Row::OneLinkCut
            | Row::BothLinksCut => Layout::default(),
        }
    }
}

/// Whose data the guest reads next, right after the fault was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// The primary, from its own image.
    Primary,
    /// The primary in RemoteOnly: every read comes from the secondary's image.
    PrimaryFromPeer,
    /// The primary could not serve (fenced); the secondary was promoted.
    PromotedSecondary,
}

/// The row's repair step, run after the serving copy was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Nothing: the pair heals by itself (with the coordinator's grants).
    Nothing,
    /// Faults cleared on the secondary's file system, `repair` on the secondary.
    Secondary,
    /// Faults cleared on the primary's file system, `repair` on the primary.
    Primary,
    StartSecondary,
    LinksUp(Vec<&'static str>),
    /// After a failover: the old primary, its disk fixed, rejoins as the secondary.
    RejoinOldPrimary,
}

/// A fault, handled.
#[derive(Debug)]
pub struct Fault {
    pub at: Instant,
    /// The primary's `disk_state` just before the fault (the state a kill hit).
    pub state_at_fault: String,
    pub serving: Serving,
    pub repair: Repair,
}

/// Writes the guest acknowledges between two steps of a row, at least.
const STEP_WRITES: (u64, u64) = (10, 30);
/// The largest write budget before ENOSPC.
const ENOSPC_BUDGET_BYTES: u64 = 512 << 10;

/// Injects the row's fault now and handles it.
pub fn inject(row: Row, rig: &mut Rig, random: &mut Random) -> Fault {
    match row {
        Row::SecondaryEio => secondary_disk_fault(rig, "fail write errno=EIO file=secondary.img"),
        Row::SecondaryEnospc => {
            let budget = random.between(0, ENOSPC_BUDGET_BYTES);
            secondary_disk_fault(rig, &format!("enospc-after {budget}"))
        }
        Row::PrimaryEio => primary_disk_fault(rig, "fail write errno=EIO file=primary.img"),
        Row::PrimaryEnospc => {
            let budget = random.between(0, ENOSPC_BUDGET_BYTES);
            primary_disk_fault(rig, &format!("enospc-after {budget}"))
        }
        Row::SecondaryPowerLoss => {
            let fault = start_fault(rig);
            rig.power_loss(false);
            rig.start_secondary();
            handled(fault, Serving::Primary, Repair::Nothing)
        }
        Row::PrimaryPowerLoss => primary_power_loss(rig),
        Row::KillSyncing => kill_syncing(rig, random),
        Row::KillProtected => {
            let fault = start_fault(rig);
            rig.restart_primary();
            handled(fault, Serving::Primary, Repair::Nothing)
        }
        Row::KillDegraded => {
            degrade(rig, random);
            let fault = start_fault(rig);
            rig.restart_primary();
            rig.wait_primary("Connecting", |r| r["mode"] == "Connecting");
            rig.continue_degraded();
            rig.wait_primary("Degraded", |r| r["mode"] == "Degraded");
            handled(fault, Serving::Primary, Repair::StartSecondary)
        }
        Row::KillRemoteOnly => {
            fail_primary_disk(rig, "fail write errno=EIO file=primary.img");
            rig.wait_primary("RemoteOnly", |r| r["disk_state"] == "RemoteOnly");
            more_writes(rig, random);
            let fault = start_fault(rig);
            rig.restart_primary();
            remote_only_or_not(rig, fault)
        }
        Row::KillHolding => {
            rig.kill_secondary();
            rig.wait_primary("a held write", |r| {
                r["mode"] == "Holding" && r["in_flight_requests"] != 0
            });
            let fault = start_fault(rig);
            rig.restart_primary();
            handled(fault, Serving::Primary, Repair::StartSecondary)
        }
        Row::OneLinkCut => {
            let link = if random.between(0, 1) == 0 {
                "alink1"
            } else {
                "alink2"
            };
            let fault = start_fault(rig);
            rig.set_link(link, "down");
            let acknowledged = super::workload::acknowledged_count(&rig.console()) as u64;
            rig.wait_acknowledged(acknowledged + rig.workload.acks_for(STEP_WRITES.0));
            rig.note("writes go on over the other link");
            handled(fault, Serving::Primary, Repair::LinksUp(vec![link]))
        }
        Row::BothLinksCut => {
            let fault = start_fault(rig);
            rig.set_link("alink1", "down");
            rig.set_link("alink2", "down");
            rig.hold_then_continue_degraded();
            handled(
                fault,
                Serving::Primary,
                Repair::LinksUp(vec!["alink1", "alink2"]),
            )
        }
    }
}

/// Carries out the repair step.
pub fn repair(rig: &mut Rig, repair: &Repair) {
    match repair {
        Repair::Nothing => {}
        Repair::Secondary => {
            if let Some(fs) = &rig.secondary_fs {
                fs.clear();
            }
            rig.repair(false);
        }
        Repair::Primary => {
            if let Some(fs) = &rig.primary_fs {
                fs.clear();
            }
            rig.repair(true);
        }
        Repair::StartSecondary => rig.start_secondary(),
        Repair::RejoinOldPrimary => rig.rejoin_old_primary(),
        Repair::LinksUp(links) => {
            for link in links {
                rig.set_link(link, "up");
            }
        }
    }
}

/// The moment of the fault, and the state it hit.
struct Started {
    at: Instant,
    state: String,
}

fn start_fault(rig: &mut Rig) -> Started {
    let state = rig.primary_replication()["disk_state"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    rig.note(&format!("fault (primary {state})"));
    Started {
        at: Instant::now(),
        state,
    }
}

fn handled(started: Started, serving: Serving, repair: Repair) -> Fault {
    Fault {
        at: started.at,
        state_at_fault: started.state,
        serving,
        repair,
    }
}

fn more_writes(rig: &Rig, random: &mut Random) {
    let acknowledged = super::workload::acknowledged_count(&rig.console()) as u64;
    let step = random.between(STEP_WRITES.0, STEP_WRITES.1);
    rig.wait_acknowledged(acknowledged + rig.workload.acks_for(step));
}

/// Secondary lost, primary degraded at a new generation, more writes.
fn degrade(rig: &mut Rig, random: &mut Random) {
    rig.kill_secondary();
    rig.hold_then_continue_degraded();
    more_writes(rig, random);
}

fn secondary_disk_fault(rig: &mut Rig, command: &str) -> Fault {
    let fault = start_fault(rig);
    let fs = rig
        .secondary_fs
        .as_ref()
        .expect("the secondary is on fault-fs");
    let answer = fs.command(command);
    assert_eq!(answer["ok"], true, "fault-fs refused {command:?}: {answer}");
    rig.note(command);
    rig.hold_then_continue_degraded();
    let secondary = rig.secondary_replication();
    rig.note(&format!("secondary {}", secondary["disk_state"]));
    assert_ne!(
        secondary["disk_state"], "UpToDate",
        "a copy that failed a write says UpToDate: {secondary}"
    );
    handled(fault, Serving::Primary, Repair::Secondary)
}

fn fail_primary_disk(rig: &mut Rig, command: &str) {
    let fs = rig.primary_fs.as_ref().expect("the primary is on fault-fs");
    let answer = fs.command(command);
    assert_eq!(answer["ok"], true, "fault-fs refused {command:?}: {answer}");
    rig.note(command);
}

fn primary_disk_fault(rig: &mut Rig, command: &str) -> Fault {
    let fault = start_fault(rig);
    fail_primary_disk(rig, command);
    let primary = rig.wait_primary("RemoteOnly or fenced", |r| {
        r["disk_state"] == "RemoteOnly" || r["mode"] == "Fenced"
    });
    let replication = &primary["replication"];
    rig.note(&format!(
        "primary {} (mode {})",
        replication["disk_state"], replication["mode"]
    ));
    if replication["mode"] == "Fenced" {
        rig.fail_over();
        return handled(fault, Serving::PromotedSecondary, Repair::RejoinOldPrimary);
    }
    handled(fault, Serving::PrimaryFromPeer, Repair::Primary)
}

/// After a restart of a primary whose disk failed (or lost writes): it must serve from
/// the peer. If it does not, the check of its own image tells what that costs.
fn remote_only_or_not(rig: &mut Rig, fault: Started) -> Fault {
    let replication = rig.primary_replication();
    let state = replication["disk_state"].clone();
    rig.note(&format!(
        "restarted primary: {state} (mode {})",
        replication["mode"]
    ));
    if replication["mode"] == "Fenced" {
        rig.fail_over();
        return handled(fault, Serving::PromotedSecondary, Repair::RejoinOldPrimary);
    }
    if state == "RemoteOnly" {
        handled(fault, Serving::PrimaryFromPeer, Repair::Primary)
    } else {
        handled(fault, Serving::Primary, Repair::Nothing)
    }
}

fn primary_power_loss(rig: &mut Rig) -> Fault {
    let fault = start_fault(rig);
    let secondary = rig.secondary_replication();
    let primary = rig.primary_replication();
    let promotable =
        secondary["disk_state"] == "UpToDate" && secondary["generation"] == primary["generation"];
    rig.kill_guest();
    rig.power_loss(true);
    rig.note(&format!("secondary promotable at the loss: {promotable}"));
    rig.pair.start_primary();
    rig.note("primary restarted");
    rig.wait_primary("the peer reached", |r| r["mode"] == "Mirrored");
    remote_only_or_not(rig, fault)
}

/// Kills the primary at a random point of a delta resync (made to last by a delay on the
/// secondary's file system).
fn kill_syncing(rig: &mut Rig, random: &mut Random) -> Fault {
    degrade(rig, random);
    let fs = rig
        .secondary_fs
        .as_ref()
        .expect("the secondary is on fault-fs");
    fs.delay_ms(20);
    rig.start_secondary();
    rig.wait_primary("SyncSource", |r| r["disk_state"] == "SyncSource");
    let fraction = random.fraction() * 0.7;
    let reached = primary_reaches(rig, Duration::from_secs(30), |r| {
        let done = r["resync"]["bytes_done"].as_u64().unwrap_or(0) as f64;
        let total = r["resync"]["bytes_total"].as_u64().unwrap_or(0) as f64;
        r["disk_state"] != "SyncSource" || (total > 0.0 && done >= fraction * total)
    });
    assert!(reached, "the resync neither progressed nor ended");
    let fault = start_fault(rig);
    rig.restart_primary();
    if let Some(fs) = &rig.secondary_fs {
        fs.delay_ms(0);
    }
    rig.note(&format!("killed at {:.0}% of the resync", fraction * 100.0));
    poll_until(
        Duration::from_secs(5),
        "the restarted primary answers",
        || crate::blk::status_json(&rig.pair.primary_options.control).is_some(),
    );
    handled(fault, Serving::Primary, Repair::Nothing)
}
