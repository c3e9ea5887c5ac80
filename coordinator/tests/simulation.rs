//! Thousands of seeded runs of the quorum protocol under partitions (heartbeats,
//! replication, or both), loss, reordering, process kills, power losses, disk failures and
//! repairs, and clock skew; a failure prints its seed. Replay one with
//! `FTVM_SIM_SEED=<seed> cargo test -p coordinator --test simulation` (add
//! `FTVM_SIM_TRACE=1` for every decision).
//!
//! The checkers are themselves tested: with each old, broken rule of the disk daemons
//! switched back on, some seed must fail.

use coordinator::sim::{Faults, Outcome, Rules, World};

const RUNS: u64 = 3000;
const SIMULATED_MS: u64 = 30_000;

fn replay_hint(seed: u64) -> String {
    format!(
        "replay: FTVM_SIM_SEED={seed} FTVM_SIM_TRACE=1 cargo test -p coordinator --test simulation"
    )
}

#[test]
fn at_most_one_acknowledger_per_generation_and_no_acknowledged_write_lost() {
    let seeds: Vec<u64> = match std::env::var("FTVM_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("FTVM_SIM_SEED is a number")],
        Err(_) => (1..=RUNS).collect(),
    };
    let mut total = Outcome::default();
    for seed in seeds {
        let outcome = World::new(seed, Faults::default())
            .run(SIMULATED_MS)
            .unwrap_or_else(|violation| panic!("seed {seed}: {violation}\n{}", replay_hint(seed)));
        add(&mut total, &outcome);
    }
    eprintln!("{total:#?}");
    if std::env::var("FTVM_SIM_SEED").is_err() {
        let t = total;
        assert!(
            t.promotions > 100,
            "the runs exercised promotions ({})",
            t.promotions
        );
        assert!(
            t.degraded_continuations > 100,
            "and degraded continuations ({})",
            t.degraded_continuations
        );
        assert!(t.fences > 10, "and fencing ({})", t.fences);
        assert!(t.handovers > 100, "and planned handovers ({})", t.handovers);
        assert!(
            t.acknowledged_writes > 100_000,
            "and acknowledged writes ({})",
            t.acknowledged_writes
        );
        assert!(
            t.power_losses > 100,
            "and power losses ({})",
            t.power_losses
        );
        assert!(
            t.unflushed_blocks_lost > 100,
            "that lost unflushed blocks ({})",
            t.unflushed_blocks_lost
        );
        assert!(
            t.disk_failures > 100,
            "and disk failures ({})",
            t.disk_failures
        );
        assert!(t.repairs > 100, "and repairs ({})", t.repairs);
        assert!(
            t.rebuilds > 10,
            "and rebuilds of a primary's copy ({})",
            t.rebuilds
        );
        assert!(
            t.delta_resyncs > 100,
            "and delta resyncs ({})",
            t.delta_resyncs
        );
        assert!(
            t.full_resyncs > 100,
            "and full resyncs ({})",
            t.full_resyncs
        );
        assert!(
            t.disk_lost_peer > 100,
            "and claims for a disk that lost the peer ({})",
            t.disk_lost_peer
        );
    }
}

fn add(total: &mut Outcome, outcome: &Outcome) {
    total.acknowledged_writes += outcome.acknowledged_writes;
    total.highest_generation = total.highest_generation.max(outcome.highest_generation);
    total.promotions += outcome.promotions;
    total.degraded_continuations += outcome.degraded_continuations;
    total.fences += outcome.fences;
    total.handovers += outcome.handovers;
    total.power_losses += outcome.power_losses;
    total.unflushed_blocks_lost += outcome.unflushed_blocks_lost;
    total.acknowledged_writes_lost_unflushed += outcome.acknowledged_writes_lost_unflushed;
    total.disk_failures += outcome.disk_failures;
    total.repairs += outcome.repairs;
    total.rebuilds += outcome.rebuilds;
    total.delta_resyncs += outcome.delta_resyncs;
    total.full_resyncs += outcome.full_resyncs;
    total.disk_lost_peer += outcome.disk_lost_peer;
}

/// The first of `seeds` whose run the checkers fail under `rules`, with the violation.
fn first_failure(
    rules: Rules,
    faults: Faults,
    seeds: std::ops::RangeInclusive<u64>,
) -> Option<(u64, String)> {
    seeds.into_iter().find_map(|seed| {
        World::with_rules(seed, faults, rules)
            .run(SIMULATED_MS)
            .err()
            .map(|violation| (seed, violation))
    })
}

/// Runs the first seeds under `rules` until one fails; that seed must pass under today's
/// rules. Returns the seed, for the message.
fn old_rule_is_caught(name: &str, rules: Rules) -> u64 {
    let Some((seed, violation)) = first_failure(rules, Faults::default(), 1..=300) else {
        panic!("no seed in 1..=300 fails with the old rule ({name}): the checkers miss it");
    };
    eprintln!("{name}: seed {seed} fails: {violation}");
    World::new(seed, Faults::default())
        .run(SIMULATED_MS)
        .unwrap_or_else(|violation| panic!("seed {seed}: {violation}\n{}", replay_hint(seed)));
    seed
}

/// A failed reply from the secondary completed the write and a failed resync block cleared
/// its chunk; the secondary went on applying: it stays "UpToDate" without those writes.
#[test]
fn the_checkers_catch_completing_on_a_failed_reply() {
    let rules = Rules {
        complete_failed_replies: true,
        ..Rules::default()
    };
    old_rule_is_caught("complete on a failed reply", rules);
}

/// Activity cleared after the primary's own flush: a power loss of the secondary then
/// loses acknowledged writes that the delta resync does not copy back.
#[test]
fn the_checkers_catch_clearing_activity_after_a_local_flush() {
    let rules = Rules {
        clear_activity_after_local_flush: true,
        ..Rules::default()
    };
    old_rule_is_caught("clear activity after a local-only flush", rules);
}

/// A copy restarted after a power loss as if nothing happened.
#[test]
fn the_checkers_catch_ignoring_a_power_loss() {
    let rules = Rules {
        ignore_power_loss: true,
        ..Rules::default()
    };
    old_rule_is_caught("ignore a power loss", rules);
}

/// `continue-degraded` on a primary whose local copy failed after it claimed (RemoteOnly):
/// the held writes complete although neither copy has them. `vhost-blk-mirror`'s
/// `continue_degraded` must refuse while its local copy is not Healthy.
#[test]
fn the_checkers_catch_continuing_degraded_without_a_local_copy() {
    let rules = Rules {
        continue_degraded_without_local_copy: true,
        ..Rules::default()
    };
    old_rule_is_caught("continue degraded without a local copy", rules);
}
