//! Thousands of seeded runs of the quorum protocol under partitions, loss, reordering,
//! crashes and clock skew; a failure prints its seed. Replay one with
//! `FTVM_SIM_SEED=<seed> cargo test -p coordinator --test simulation`.

use coordinator::sim::{Faults, World};

const RUNS: u64 = 3000;
const SIMULATED_MS: u64 = 30_000;

#[test]
fn at_most_one_acknowledger_per_generation_and_no_acknowledged_write_lost() {
    let seeds: Vec<u64> = match std::env::var("FTVM_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("FTVM_SIM_SEED is a number")],
        Err(_) => (1..=RUNS).collect(),
    };
    let mut promotions = 0;
    let mut continuations = 0;
    let mut fences = 0;
    let mut handovers = 0;
    let mut writes = 0;
    for seed in seeds {
        let outcome = World::new(seed, Faults::default())
            .run(SIMULATED_MS)
            .unwrap_or_else(|violation| {
                panic!("seed {seed}: {violation}\nreplay: FTVM_SIM_SEED={seed} cargo test -p coordinator --test simulation")
            });
        promotions += outcome.promotions;
        continuations += outcome.degraded_continuations;
        fences += outcome.fences;
        handovers += outcome.handovers;
        writes += outcome.acknowledged_writes;
    }
    eprintln!(
        "acknowledged writes {writes}, promotions {promotions}, degraded continuations \
         {continuations}, fences {fences}, planned handovers {handovers}"
    );
    if std::env::var("FTVM_SIM_SEED").is_err() {
        assert!(
            promotions > 100,
            "the runs exercised promotions ({promotions})"
        );
        assert!(
            continuations > 100,
            "and degraded continuations ({continuations})"
        );
        assert!(fences > 10, "and fencing ({fences})");
        assert!(handovers > 100, "and planned handovers ({handovers})");
        assert!(writes > 100_000, "and acknowledged writes ({writes})");
    }
}
