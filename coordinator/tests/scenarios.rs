//! Scripted scenarios of the quorum protocol: the cases the random simulation reaches
//! rarely, written out step by step.

use coordinator::host::{Action, DiskCommand, DiskView, Heartbeat, Host, HostConfig, Role};
use coordinator::witness::{Claim, Grant, Verdict, Witness};
use coordinator::HostId;

const IN_SYNC_AT_1: DiskView = DiskView {
    consistent: true,
    data_generation: 1,
};

fn claims(actions: &[Action]) -> Vec<Claim> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::AskWitness(claim) => Some(*claim),
            _ => None,
        })
        .collect()
}

fn connected_pair() -> (Host, Host) {
    let config = HostConfig::default();
    let mut a = Host::start(HostId::A, config, Role::Primary, 1, 0);
    let b = Host::start(HostId::B, config, Role::Secondary, 1, 0);
    a.on_heartbeat(
        0,
        Heartbeat {
            from: HostId::B,
            role: Role::Secondary,
            generation: 1,
        },
    );
    (a, b)
}

/// The primary wins the next generation and acknowledges writes alone; the secondary
/// learns the new generation number but not the data; then the primary dies. The
/// secondary must not be able to take over: it would serve a disk without those writes.
#[test]
fn an_outdated_secondary_cannot_take_over() {
    let (mut a, mut b) = connected_pair();
    let mut witness = Witness::new(Grant {
        generation: 1,
        holder: HostId::A,
    });

    // The A-links fail: A holds, then claims generation 2 at once, and wins.
    let actions = a.tick(2000, IN_SYNC_AT_1);
    assert!(actions.contains(&Action::Disk(DiskCommand::Hold)));
    let claim = claims(&actions)[0];
    assert_eq!(
        claim,
        Claim {
            host: HostId::A,
            generation: 2,
            data_generation: 1
        }
    );
    let verdict = witness.decide(claim);
    assert_eq!(
        a.on_verdict(verdict),
        vec![Action::Disk(DiskCommand::ContinueDegraded {
            generation: 2
        })]
    );

    // A heartbeat of A at generation 2 reaches B just before the links fail for good:
    // B knows the number, its disk still holds generation 1's data only.
    assert!(b
        .on_heartbeat(
            2100,
            Heartbeat {
                from: HostId::A,
                role: Role::Primary,
                generation: 2
            }
        )
        .is_empty());
    assert_eq!(b.generation(), 2);

    // A dies. B, after the timeout and its extra delay, claims generation 3.
    let actions = b.tick(10_000, IN_SYNC_AT_1);
    let claim = claims(&actions)[0];
    assert_eq!(
        claim,
        Claim {
            host: HostId::B,
            generation: 3,
            data_generation: 1
        }
    );
    let verdict = witness.decide(claim);
    assert!(
        matches!(
            verdict,
            Verdict::Refused {
                current: 2,
                holder: HostId::A
            }
        ),
        "{verdict:?}"
    );
    assert!(b.on_verdict(verdict).is_empty(), "B stays secondary");
    assert_eq!(b.role(), Role::Secondary);
}

/// Both hosts lose each other with the witness reachable: exactly one goes on.
#[test]
fn a_split_gives_one_primary_and_the_other_fences_or_stays() {
    let (mut a, mut b) = connected_pair();
    let mut witness = Witness::new(Grant {
        generation: 1,
        holder: HostId::A,
    });
    // B claims first (its claim overtook A's on the network): B wins, A is refused.
    let b_claim = claims(&b.tick(10_000, IN_SYNC_AT_1))[0];
    let a_claim = claims(&a.tick(2000, IN_SYNC_AT_1))[0];
    let b_verdict = witness.decide(b_claim);
    let a_verdict = witness.decide(a_claim);
    assert_eq!(
        b.on_verdict(b_verdict),
        vec![Action::Disk(DiskCommand::Promote { generation: 2 })]
    );
    assert_eq!(
        a.on_verdict(a_verdict),
        vec![Action::Disk(DiskCommand::Fence)]
    );
    // When the links return, the fenced old primary follows the new one.
    let actions = a.on_heartbeat(
        20_000,
        Heartbeat {
            from: HostId::B,
            role: Role::Primary,
            generation: 2,
        },
    );
    assert_eq!(
        actions,
        vec![Action::Disk(DiskCommand::Demote { generation: 2 })]
    );
    assert_eq!(a.role(), Role::Secondary);
}

/// A host that hears neither its peer nor the witness never acknowledges a write again.
#[test]
fn an_isolated_primary_holds_forever() {
    let (mut a, _) = connected_pair();
    let mut held = false;
    for now in (1000..60_000).step_by(100) {
        for action in a.tick(now, IN_SYNC_AT_1) {
            match action {
                Action::Disk(DiskCommand::Hold) => held = true,
                Action::Disk(other) => panic!("isolated primary did {other:?}"),
                _ => {}
            }
        }
    }
    assert!(held);
}

/// The disk's replication path fails while the heartbeats still flow (or the secondary's
/// disk failed a write): `ftvmd` calls `on_disk_lost_peer` after a peer timeout of
/// holding, and the primary claims at once, without waiting for silence.
#[test]
fn a_disk_that_lost_the_peer_under_live_heartbeats_claims_the_next_generation() {
    let (mut a, _) = connected_pair();
    let heartbeat = Heartbeat {
        from: HostId::B,
        role: Role::Secondary,
        generation: 1,
    };
    a.on_heartbeat(1500, heartbeat);
    assert!(
        claims(&a.tick(1550, IN_SYNC_AT_1)).is_empty(),
        "the peer is heard"
    );
    assert_eq!(a.on_disk_lost_peer(), vec![Action::Disk(DiskCommand::Hold)]);
    // Heartbeats keep arriving; they do not resume a disk that lost the peer.
    assert!(a.on_heartbeat(1600, heartbeat).is_empty());
    let claim = claims(&a.tick(1650, IN_SYNC_AT_1))[0];
    assert_eq!(
        claim,
        Claim {
            host: HostId::A,
            generation: 2,
            data_generation: 1
        }
    );
    assert_eq!(
        a.on_verdict(Verdict::Granted { generation: 2 }),
        vec![Action::Disk(DiskCommand::ContinueDegraded {
            generation: 2
        })]
    );
}

/// A primary whose local copy failed (RemoteOnly: its disk view is Inconsistent, data
/// generation 0) and that lost its peer claims nothing: it has no copy to run alone on.
/// (The witness would grant a repeated claim of the holder of the current generation.)
#[test]
fn a_primary_without_a_usable_copy_never_claims() {
    let (mut a, _) = connected_pair();
    let failed = DiskView {
        consistent: false,
        data_generation: 0,
    };
    for now in (1000..20_000).step_by(100) {
        assert!(claims(&a.tick(now, failed)).is_empty(), "claimed at {now}");
    }
}
