//! Automatic failover with `ftvmd` and `ftvm-witness` on namespace hosts, QEMU TCG guests.

use std::time::{Duration, Instant};

use ftvm_tests::cluster::{metric_value, Cluster, ClusterOptions, HOSTS};
use ftvm_tests::records::{cluster_writer, last_ack, wait_acks, wait_found};
use ftvm_tests::wait::{poll_until, Wait};

const A: usize = 0;
const B: usize = 1;
/// Records a writer may write (block `i` holds record `i`; block 0 is the boot marker).
const RECORDS: u32 = 16_000;

/// Starts witness and both hosts; waits until the VM runs on hostA, mirrored and in sync.
fn protected_cluster(name: &str) -> Cluster {
    let mut cluster = Cluster::new(name, &cluster_writer(RECORDS), &ClusterOptions::default());
    cluster.start_all();
    cluster.wait_vm(A, Duration::from_secs(60), "Protected on hostA", |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    cluster
}

#[test]
fn host_loss_fails_over_to_the_peer_with_every_acknowledged_record() {
    let mut cluster = protected_cluster("failover-host-loss");
    wait_acks(&cluster, A, 30);
    // What a Prometheus scraping both hosts sees before: hostA primary, Protected.
    let scrape = cluster.scrape_metrics(A);
    let vm = [("vm", "vm1")];
    assert_eq!(metric_value(&scrape, "ftvm_vm_primary", &vm), Some(1.0));
    assert_eq!(
        metric_value(
            &scrape,
            "ftvm_vm_state",
            &[("vm", "vm1"), ("state", "Protected")]
        ),
        Some(1.0)
    );
    assert_eq!(metric_value(&scrape, "ftvm_vm_running", &vm), Some(1.0));
    assert!(
        metric_value(&scrape, "ftvm_disk_written_bytes_total", &vm) > Some(0.0),
        "no bytes written in hostA's metrics"
    );
    // Every mirrored write's latency is counted, and they take under a second each.
    let mirrored = metric_value(
        &scrape,
        "ftvm_disk_mirrored_write_latency_seconds_count",
        &vm,
    )
    .expect("hostA's mirrored write latency");
    let seconds = metric_value(&scrape, "ftvm_disk_mirrored_write_latency_seconds_sum", &vm)
        .expect("the latency's sum");
    println!(
        "hostA: {mirrored} mirrored writes, {:.2} ms each on average",
        seconds / mirrored * 1000.0
    );
    assert!(
        mirrored > 0.0 && seconds / mirrored < 1.0,
        "{mirrored} writes, {seconds} s"
    );
    assert_eq!(
        metric_value(&cluster.scrape_metrics(B), "ftvm_vm_primary", &vm),
        Some(0.0)
    );
    let killed_at = cluster.kill_host(A);
    let acknowledged = last_ack(&cluster.console(A));
    let promoted = cluster.wait_vm(B, Duration::from_secs(30), "primary on hostB", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    let to_qemu = killed_at.elapsed();
    println!(
        "host loss: QEMU running on hostB {:.2} s after hostA was killed (peer timeout 1.0 s, \
         claim delay 0.5 s); generation {}",
        to_qemu.as_secs_f64(),
        promoted["generation"]
    );
    let found = wait_found(&cluster, B);
    assert!(
        found >= acknowledged,
        "the restarted guest found records up to {found}, but {acknowledged} were acknowledged"
    );
    println!("acknowledged {acknowledged} records before the loss; hostB's guest found {found}");
    let record = cluster.witness_record();
    assert_eq!(record["holder"], HOSTS[B], "witness record: {record}");
    // … and after: hostB primary, running alone (Degraded) at a newer generation, its
    // peer unreachable.
    let scrape = cluster.scrape_metrics(B);
    assert_eq!(metric_value(&scrape, "ftvm_vm_primary", &vm), Some(1.0));
    assert_eq!(
        metric_value(
            &scrape,
            "ftvm_vm_state",
            &[("vm", "vm1"), ("state", "Degraded")]
        ),
        Some(1.0),
        "hostB's metrics after the failover: {:?}",
        scrape.samples
    );
    assert!(metric_value(&scrape, "ftvm_vm_generation", &vm) >= Some(2.0));
    assert_eq!(metric_value(&scrape, "ftvm_peer_reachable", &[]), Some(0.0));
    // One takeover, timed from hostA's last heartbeat: at least the peer timeout.
    assert_eq!(
        metric_value(&scrape, "ftvm_vm_takeovers_total", &vm),
        Some(1.0)
    );
    let took = metric_value(&scrape, "ftvm_vm_last_takeover_duration_seconds", &vm)
        .expect("the takeover's duration");
    println!("hostB's takeover took {took:.2} s by its /metrics");
    assert!((1.0..30.0).contains(&took), "takeover of {took} s");
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[B]]);

    // hostA comes back: with no command typed, it becomes hostB's secondary and a delta
    // resync (not a full one) makes the VM Protected again.
    cluster.set_links(A, &["alink1", "alink2", "lan0"], true);
    cluster.start_ftvmd(A);
    let secondary = cluster.wait_vm(A, Duration::from_secs(60), "secondary of hostB", |vm| {
        vm["role"] == "Secondary" && vm["primary"] == HOSTS[B]
    });
    assert!(
        secondary["vm_pid"].is_null(),
        "no VM may run on the secondary"
    );
    let protected = cluster.wait_vm(B, Duration::from_secs(60), "Protected again", |vm| {
        vm["state"] == "Protected"
            && vm["disks"][0]["replication"]["resync"]["bytes_total"].as_u64() > Some(0)
    });
    let resynced = protected["disks"][0]["replication"]["resync"]["bytes_total"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let disk = ClusterOptions::default().disk_bytes;
    println!("re-protection: delta resync of {resynced} bytes of a {disk}-byte disk");
    assert!(
        resynced < disk / 4,
        "re-protection resynced {resynced} of {disk} bytes: not a delta resync"
    );
    cluster.wait_vm(A, Duration::from_secs(30), "UpToDate secondary", |vm| {
        vm["disks"][0]["replication"]["disk_state"] == "UpToDate"
    });
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[B]]);
    // The lost redundancy was one condition on hostB (an alert and its clearing, with
    // [[alert]] agents): raised when it ran alone, cleared once Protected again.
    let mut changes = Vec::new();
    poll_until(
        Duration::from_secs(5),
        "vm-unprotected cleared on hostB",
        || {
            changes = condition_changes(&cluster, B, "vm-unprotected");
            changes.len() >= 2
        },
    );
    assert_eq!(changes, ["raised", "cleared"], "{}", events(&cluster, B));
    // The restarted guest has finished (it only read), so the copies must be identical.
    let (image_a, image_b) = (
        std::fs::read(cluster.image(A)).expect("read hostA image"),
        std::fs::read(cluster.image(B)).expect("read hostB image"),
    );
    assert!(
        image_a == image_b,
        "after re-protection the two copies differ"
    );
}

/// Watches both hosts for `window`, asserting at every sample that at most one host acts
/// as primary; returns the hosts seen acting.
fn watch_single_primary(cluster: &Cluster, window: Duration, what: &str) -> Vec<&'static str> {
    let mut seen = Vec::new();
    Wait::up_to(window)
        .every(Duration::from_millis(50))
        .sample(|| {
            let acting = cluster.acting_primaries();
            assert!(
                acting.len() <= 1,
                "{what}: two primaries at once: {acting:?}"
            );
            for host in acting {
                if !seen.contains(&host) {
                    seen.push(host);
                }
            }
        });
    seen
}

fn generation(cluster: &Cluster, host: usize) -> Option<u64> {
    cluster
        .vm_status(host)
        .map(|vm| vm["generation"].as_u64().unwrap_or(0))
}

/// How the events of `host` changed `condition` for vm1, in order ("raised", "cleared").
fn condition_changes(cluster: &Cluster, host: usize, condition: &str) -> Vec<String> {
    let (_, text) = cluster.ftvm(host, &["events", "--json"]);
    let events: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    events
        .iter()
        .filter(|event| event["vm"] == "vm1")
        .filter_map(|event| {
            let change = event["change"].as_object()?;
            let (kind, key) = change.iter().next()?;
            (key == condition).then(|| kind.clone())
        })
        .collect()
}

fn events(cluster: &Cluster, host: usize) -> String {
    cluster.ftvm(host, &["events"]).1
}

fn wait_protected(cluster: &Cluster, primary: usize, what: &str) -> serde_json::Value {
    let status = cluster.wait_vm(primary, Duration::from_secs(60), what, |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected"
    });
    cluster.wait_vm(1 - primary, Duration::from_secs(30), what, |vm| {
        vm["role"] == "Secondary" && vm["disks"][0]["replication"]["disk_state"] == "UpToDate"
    });
    status
}

/// What [`watch_guests`] saw, as times since the cut.
struct GuestWatch {
    /// The isolated host's guest first seen paused.
    paused: Duration,
    /// Its QEMU gone (fenced).
    gone: Duration,
    /// The other host's guest first seen running.
    running: Duration,
    /// The longest run of samples in which both guests were running.
    both_running: Duration,
}

/// Samples both guests' run states (QMP `query-status`) after `isolated` was cut off at
/// `cut_at`, until its QEMU is gone and the other's guest runs.
fn watch_guests(cluster: &Cluster, isolated: usize, other: usize, cut_at: Instant) -> GuestWatch {
    let (mut paused, mut gone, mut running) = (None, None, None);
    let mut both_since: Option<Instant> = None;
    let mut both_running = Duration::ZERO;
    let mut states = (None, None);
    let watch = Wait::up_to(Duration::from_secs(30).saturating_sub(cut_at.elapsed()))
        .every(Duration::from_millis(10))
        .poll(|| {
            states = (
                cluster.guest_run_state(isolated),
                cluster.guest_run_state(other),
            );
            let (isolated_state, other_state) = (states.0.as_deref(), states.1.as_deref());
            let now = Instant::now();
            let at = now - cut_at;
            match isolated_state {
                Some("running") => {}
                Some(_) => {
                    paused.get_or_insert(at);
                }
                None => {
                    gone.get_or_insert(at);
                }
            }
            if other_state == Some("running") {
                running.get_or_insert(at);
            }
            if isolated_state == Some("running") && other_state == Some("running") {
                let since = *both_since.get_or_insert(now);
                both_running = both_running.max(now - since);
            } else {
                both_since = None;
            }
            let (gone, running) = (gone?, running?);
            let paused = paused.unwrap_or_else(|| {
                panic!(
                    "{}'s guest was never seen paused before it stopped",
                    HOSTS[isolated]
                )
            });
            Some(GuestWatch {
                paused,
                gone,
                running,
                both_running,
            })
        });
    watch.unwrap_or_else(|| {
        panic!(
            "after the cut: {} {:?} (paused at {paused:?}), {} {:?}",
            HOSTS[isolated], states.0, HOSTS[other], states.1
        )
    })
}

#[test]
fn partitions_never_give_two_primaries() {
    let mut cluster = protected_cluster("failover-partitions");
    let window = Duration::from_millis(2500);
    wait_acks(&cluster, A, 5);

    // One A-link down: no failover, writes go on.
    let before = last_ack(&cluster.console(A));
    cluster.set_links(A, &["alink1"], false);
    let seen = watch_single_primary(&cluster, window, "one A-link down");
    assert_eq!(seen, vec![HOSTS[A]], "one A-link down must not move the VM");
    assert_eq!(generation(&cluster, A), Some(1));
    assert!(
        last_ack(&cluster.console(A)) > before,
        "writes stopped with one A-link down"
    );
    assert!(
        events(&cluster, A).contains("1 of 2 A-links"),
        "{}",
        events(&cluster, A)
    );
    cluster.set_links(A, &["alink1"], true);

    // Witness down while the peer is fine: nothing changes, both hosts warn.
    cluster.stop_witness();
    let before = last_ack(&cluster.console(A));
    let seen = watch_single_primary(&cluster, window, "witness down");
    assert_eq!(seen, vec![HOSTS[A]]);
    assert_eq!(generation(&cluster, A), Some(1));
    assert!(
        last_ack(&cluster.console(A)) > before,
        "writes stopped with the witness down"
    );
    // Raised once the witness has been away for a peer timeout (the window is longer).
    for host in [A, B] {
        let raised = Wait::up_to(Duration::from_secs(10))
            .every(Duration::from_millis(100))
            .holds(|| events(&cluster, host).contains("witness is unreachable"));
        assert!(raised, "{}: {}", HOSTS[host], events(&cluster, host));
    }
    cluster.start_witness();
    cluster.wait_vm(A, Duration::from_secs(10), "witness back", |_| {
        cluster
            .status(A)
            .is_some_and(|status| status["witness_reachable"] == true)
    });

    // Both A-links cut, witness reachable from both: the primary wins, the secondary is
    // refused; exactly one primary, and the writes go on (degraded).
    cluster.set_links(A, &["alink1", "alink2"], false);
    let seen = watch_single_primary(&cluster, Duration::from_secs(4), "A-links cut");
    assert_eq!(seen, vec![HOSTS[A]]);
    let degraded = cluster.wait_vm(A, Duration::from_secs(10), "degraded", |vm| {
        vm["state"] == "Degraded"
    });
    // Generation 2, or 3 when hostA's disks had already re-mirrored hostB at 2 before
    // they noticed the cut (hostB could then have claimed 3 itself).
    let record = cluster.witness_record();
    assert!(
        matches!(degraded["generation"].as_u64(), Some(2 | 3)),
        "{degraded}"
    );
    assert_eq!(record["generation"], degraded["generation"], "{record}");
    assert_eq!(record["holder"], HOSTS[A]);
    assert_eq!(
        cluster.vm_status(B).expect("hostB status")["role"],
        "Secondary"
    );
    let before = last_ack(&cluster.console(A));
    wait_acks(&cluster, A, before + 3);
    cluster.set_links(A, &["alink1", "alink2"], true);
    wait_protected(&cluster, A, "re-protected after the A-link cut");

    // Flapping A-links: never two primaries, and protection returns.
    for (down, up) in [(600, 400), (1500, 300), (400, 900), (1800, 200)] {
        cluster.set_links(A, &["alink1", "alink2"], false);
        watch_single_primary(&cluster, Duration::from_millis(down), "flapping (down)");
        cluster.set_links(A, &["alink1", "alink2"], true);
        watch_single_primary(&cluster, Duration::from_millis(up), "flapping (up)");
    }
    // Either host may hold the VM now: a flap that hides one host's heartbeats from the
    // other for a whole timeout is a lost peer for that side, and the witness decides.
    let protected = |host: usize| {
        cluster
            .vm_status(host)
            .is_some_and(|vm| vm["role"] == "Primary" && vm["state"] == "Protected")
    };
    let (p, s) = Wait::up_to(Duration::from_secs(60))
        .every(Duration::from_millis(100))
        .for_value(
            "a Protected primary after flapping",
            || {
                [(A, B), (B, A)]
                    .into_iter()
                    .find(|&(host, _)| protected(host))
            },
            |_| true,
        );
    let after_flapping = wait_protected(&cluster, p, "re-protected after flapping");
    let generation_before_isolation = after_flapping["generation"].as_u64().unwrap_or(0);
    let acknowledged_before_isolation = last_ack(&cluster.console(A));

    // The primary isolated from everything: it pauses its guest at once (it holds for the
    // witness), then fences; the other promotes and runs the VM. The two guests, which
    // share a MAC and an IP, must not both run.
    let cut_at = Instant::now();
    cluster.set_links(p, &["alink1", "alink2", "lan0"], false);
    let guests = watch_guests(&cluster, p, s, cut_at);
    println!(
        "isolation of {}: its guest paused {:.2} s after the cut (peer timeout 1.0 s), \
         stopped at {:.2} s; {}'s guest running at {:.2} s; longest window with both \
         guests running: {} ms",
        HOSTS[p],
        guests.paused.as_secs_f64(),
        guests.gone.as_secs_f64(),
        HOSTS[s],
        guests.running.as_secs_f64(),
        guests.both_running.as_millis()
    );
    assert!(
        guests.paused < Duration::from_millis(2500),
        "{}'s guest paused only {:?} after the cut",
        HOSTS[p],
        guests.paused
    );
    assert!(
        guests.both_running < Duration::from_millis(200),
        "both guests ran for {:?}",
        guests.both_running
    );
    cluster.wait_vm(s, Duration::from_secs(20), "promoted", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    let fenced = cluster.wait_vm(p, Duration::from_secs(20), "fenced", |vm| {
        vm["state"] == "Fenced" && vm["vm_pid"].is_null()
    });
    assert_eq!(
        fenced["generation"].as_u64(),
        Some(generation_before_isolation)
    );
    let record = cluster.witness_record();
    assert_eq!(record["holder"], HOSTS[s], "{record}");
    assert_eq!(
        record["generation"].as_u64(),
        Some(generation_before_isolation + 1)
    );
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[s]]);
    // Nothing acknowledged before the isolation is missing from the new primary's copy.
    // (Records are written by the first boot only, on hostA.)
    let found = wait_found(&cluster, s);
    let acknowledged = last_ack(&cluster.console(A));
    assert!(
        found >= acknowledged && acknowledged >= acknowledged_before_isolation,
        "{}'s guest found records up to {found}, {acknowledged} were acknowledged",
        HOSTS[s]
    );
    // The isolated host comes back and follows.
    cluster.set_links(p, &["alink1", "alink2", "lan0"], true);
    wait_protected(&cluster, s, "re-protected after the isolation");
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[s]]);
}

#[test]
fn planned_failover_and_host_maintenance_move_the_vm_with_its_data() {
    let mut cluster = protected_cluster("failover-planned");
    wait_acks(&cluster, A, 10);

    // A planned failover is asked on the primary; elsewhere the error says where.
    let (ok, text) = cluster.ftvm(B, &["failover", "vm1"]);
    assert!(
        !ok && text.contains("run `ftvm failover vm1` on hostA"),
        "{text}"
    );
    let (ok, text) = cluster.ftvm(A, &["failover", "vm9"]);
    assert!(!ok && text.contains("no VM named \"vm9\""), "{text}");
    let (ok, text) = cluster.ftvm(A, &["failover", "vm1"]);
    assert!(ok, "{text}");
    let acknowledged = last_ack(&cluster.console(A));
    cluster.wait_vm(B, Duration::from_secs(30), "primary on hostB", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    cluster.wait_vm(A, Duration::from_secs(30), "hostA secondary", |vm| {
        vm["role"] == "Secondary" && vm["vm_pid"].is_null()
    });
    let found = wait_found(&cluster, B);
    assert!(
        found >= acknowledged,
        "found {found}, acknowledged {acknowledged}"
    );
    wait_protected(&cluster, B, "Protected on hostB after the planned failover");

    // Maintenance of hostB: its VM moves back to hostA, then hostB's daemons stop; hostA
    // runs alone until hostB is enabled again, then protection returns.
    let (ok, text) = cluster.ftvm(B, &["host", "disable", "--timeout", "240"]);
    assert!(ok, "{text}");
    assert!(text.contains("disabled"), "{text}");
    let status = cluster.status(B).expect("hostB status");
    assert_eq!(status["disabled"], true);
    assert!(status["vms"][0]["vm_pid"].is_null());
    cluster.wait_vm(
        A,
        Duration::from_secs(30),
        "hostA runs the VM alone",
        |vm| vm["role"] == "Primary" && vm["vm_pid"].is_u64() && vm["state"] == "Degraded",
    );
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[A]]);
    // A restart of hostB's ftvmd (a reboot during the maintenance) does not end it.
    cluster.stop_ftvmd(B);
    cluster.start_ftvmd(B);
    let status = cluster.status(B).expect("hostB status after its restart");
    assert_eq!(status["disabled"], true, "{status}");
    assert!(status["vms"][0]["vm_pid"].is_null(), "{status}");
    // Not even the secondary's disk daemons: hostA must not resync into hostB meanwhile.
    let disk_pids = status["vms"][0]["disk_pids"].as_array().expect("disk_pids");
    assert!(disk_pids.iter().all(|pid| pid.is_null()), "{status}");
    let (_, events) = cluster.ftvm(B, &["events"]);
    assert!(
        events.contains("host disabled before this restart"),
        "{events}"
    );
    let vm = cluster.vm_status(A).expect("hostA status");
    assert_eq!(vm["state"], "Degraded", "hostB must not rejoin: {vm}");
    let (ok, text) = cluster.ftvm(B, &["host", "enable"]);
    assert!(ok, "{text}");
    wait_protected(&cluster, A, "Protected again after maintenance");
    let table = cluster.ftvm(A, &["status"]).1;
    assert!(
        table.contains("vm1") && table.contains("Protected"),
        "{table}"
    );
}

#[test]
fn a_secondary_whose_sync_is_unfinished_never_takes_over() {
    // 64 MiB at 4 MiB/s: the initial sync lasts about 16 s.
    let options = ClusterOptions {
        resync_rate_limit: Some("4M".into()),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("failover-inconsistent", &cluster_writer(RECORDS), &options);
    cluster.start_all();
    cluster.wait_vm(A, Duration::from_secs(30), "syncing", |vm| {
        vm["state"] == "Syncing" && vm["sync_percent"].as_f64() > Some(0.0)
    });
    cluster.kill_host(A);
    let seen = watch_single_primary(&cluster, Duration::from_secs(4), "secondary inconsistent");
    assert!(seen.is_empty(), "an Inconsistent copy took over: {seen:?}");
    let vm = cluster.vm_status(B).expect("hostB status");
    assert_eq!(vm["role"], "Secondary", "{vm}");
    assert!(vm["vm_pid"].is_null());
    let record = cluster.witness_record();
    assert_eq!(
        (record["holder"].as_str(), record["generation"].as_u64()),
        (Some(HOSTS[A]), Some(1))
    );
    let events = events(&cluster, B);
    assert!(
        events.contains("cannot be restarted here without losing data"),
        "{events}"
    );
}

#[test]
fn a_lost_secondary_disk_does_not_stall_the_guest() {
    let cluster = protected_cluster("failover-disk-lost");
    wait_acks(&cluster, A, 10);
    // hostB's disk daemon dies and cannot come back (its image is gone), while hostB's
    // ftvmd still answers heartbeats.
    let image = cluster.image(B);
    let moved = image.with_extension("away");
    std::fs::rename(&image, &moved).expect("move hostB's image away");
    let pid = cluster.vm_status(B).expect("hostB status")["disk_pids"][0]
        .as_u64()
        .expect("hostB's disk daemon runs") as u32;
    ftvm_tests::process::signal(pid, libc::SIGKILL);
    let degraded = cluster.wait_vm(A, Duration::from_secs(20), "degraded", |vm| {
        vm["disks"][0]["replication"]["mode"] == "Degraded"
    });
    assert_eq!(degraded["generation"], 2, "{degraded}");
    let before = last_ack(&cluster.console(A));
    wait_acks(&cluster, A, before + 5);
    assert!(
        events(&cluster, A).contains("lost hostB's copy although its host answers"),
        "{}",
        events(&cluster, A)
    );
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[A]]);
    // The image returns: hostB's ftvmd restarts its disk daemon, and a resync makes the
    // VM Protected again, with no command typed.
    std::fs::rename(&moved, &image).expect("restore hostB's image");
    wait_protected(&cluster, A, "Protected after the secondary disk returned");
    let before = last_ack(&cluster.console(A));
    wait_acks(&cluster, A, before + 5);
}

#[test]
fn unprotect_runs_the_vm_alone_and_protect_brings_the_copy_back() {
    let cluster = protected_cluster("failover-unprotect");
    wait_acks(&cluster, A, 10);
    let (ok, text) = cluster.ftvm(B, &["unprotect", "vm1"]);
    assert!(
        !ok && text.contains("run `ftvm unprotect vm1` on hostA"),
        "{text}"
    );
    let (ok, text) = cluster.ftvm(A, &["unprotect", "vm1"]);
    assert!(ok, "{text}");
    cluster.wait_vm(A, Duration::from_secs(20), "Unprotected", |vm| {
        vm["state"] == "Unprotected" && vm["vm_pid"].is_u64()
    });
    cluster.wait_vm(B, Duration::from_secs(20), "copy stopped", |vm| {
        vm["disk_pids"][0].is_null()
    });
    assert_eq!(cluster.witness_record()["standalone"], true);
    let before = last_ack(&cluster.console(A));
    wait_acks(&cluster, A, before + 20);

    // Unprotected, hostA's loss moves nothing: the witness refuses hostB.
    cluster.set_links(A, &["alink1", "alink2", "lan0"], false);
    let seen = watch_single_primary(&cluster, Duration::from_secs(3), "unprotected, hostA cut");
    assert!(
        !seen.contains(&HOSTS[B]),
        "hostB took over an unprotected VM"
    );
    assert_eq!(cluster.vm_status(B).expect("hostB")["role"], "Secondary");
    cluster.set_links(A, &["alink1", "alink2", "lan0"], true);
    let (ok, text) = cluster.ftvm(A, &["protect", "vm1", "--level", "2", "--peer", "hostB"]);
    assert!(ok || text.contains("the witness is unreachable"), "{text}");
    cluster.wait_vm(A, Duration::from_secs(20), "the witness reachable", |_| {
        cluster
            .status(A)
            .is_some_and(|status| status["witness_reachable"] == true)
    });

    // Protect again: the next generation, a delta resync of what was written alone.
    let (ok, text) = cluster.ftvm(A, &["protect", "vm1", "--level", "2", "--peer", "hostB"]);
    assert!(ok, "{text}");
    let protected = wait_protected(&cluster, A, "protected again");
    assert_eq!(protected["generation"], 2, "{protected}");
    let record = cluster.witness_record();
    assert_eq!(record["standalone"], false, "{record}");
    let resynced = protected["disks"][0]["replication"]["resync"]["bytes_total"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        resynced > 0 && resynced < ClusterOptions::default().disk_bytes / 4,
        "protecting again resynced {resynced} bytes: not a delta"
    );
    let before = last_ack(&cluster.console(A));
    wait_acks(&cluster, A, before + 5);
}
