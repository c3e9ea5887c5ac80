//! Rotating the pair key without a restart (issue 12): two hosts with `ftvmd`, a witness,
//! a Level 2 VM whose guest writes flushed records all the time. The pair key is rotated
//! on hostA, then on hostB (`ftvm key rotate`), then the old key is retired on both
//! (`ftvm key retire`), as docs/OPERATIONS.md says. Sampled all along: the VM stays
//! Protected on hostA at one generation, never paused, hostB its secondary, and no A-link
//! stays down for the link timeout; afterwards every acknowledged record is on both
//! images, no write failed, and a host that offers only the retired key is refused.
//! Then hostA's witness key rotates as docs/OPERATIONS.md says: `ftvm key rotate
//! --witness`, the new key copied to the witness's key directory, the witness restarted,
//! `ftvm key retire --witness`; the VM notices nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS};
use ftvm_tests::records::{
    assert_cluster_records_in_image, assert_no_write_failed, cluster_writer, last_ack, wait_acks,
};
use ftvm_tests::wait::Wait;
use serde_json::Value;

const A: usize = 0;
const B: usize = 1;
/// More records than the test waits for: the guest writes until the end.
const RECORDS: u32 = 100_000;
/// How long the test watches the pair after each step.
const SETTLE: Duration = Duration::from_secs(3);

/// Gives each host its own pair key file (a copy of the cluster's), as real hosts have:
/// the rotation changes one host's file at a time.
fn own_pair_keys(cluster: &Cluster) -> [PathBuf; 2] {
    [A, B].map(|host| own_key_file(cluster, host, "pair.psk", "pair.psk"))
}

/// Points `host`'s configuration at its own copy of the cluster's key file `shared`
/// (relative to the cluster's directory), `HOST/own`, and returns that copy's path.
fn own_key_file(cluster: &Cluster, host: usize, shared: &str, own: &str) -> PathBuf {
    let root = cluster.dir.path();
    let shared = root.join(shared);
    let own = root.join(HOSTS[host]).join(own);
    std::fs::copy(&shared, &own).expect("copy the key");
    let config = cluster.config_path(host);
    let text = std::fs::read_to_string(&config).expect("read config");
    let from = format!("psk_file = \"{}\"", shared.display());
    assert!(text.contains(&from), "{from} not in {}", config.display());
    let text = text.replace(&from, &format!("psk_file = \"{}\"", own.display()));
    std::fs::write(&config, text).expect("write config");
    own
}

fn witness_key(cluster: &Cluster, host: usize) -> Value {
    cluster
        .status(host)
        .map(|status| status["witness_key"].clone())
        .unwrap_or(Value::Null)
}

fn pair_key(cluster: &Cluster, host: usize) -> Value {
    cluster
        .status(host)
        .map(|status| status["pair_key"].clone())
        .unwrap_or(Value::Null)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// What every sample checks, and the longest time a host saw fewer than all its A-links up.
struct Watch {
    generation: u64,
    links_down_since: [Option<Instant>; 2],
    longest_links_down: Duration,
    samples: u64,
}

impl Watch {
    fn sample(&mut self, cluster: &Cluster) {
        self.samples += 1;
        let statuses = [cluster.status(A), cluster.status(B)];
        for (host, status) in statuses.iter().enumerate() {
            let status = status
                .as_ref()
                .unwrap_or_else(|| panic!("{}'s ftvmd does not answer", HOSTS[host]));
            let vm = &status["vms"][0];
            let role = if host == A { "Primary" } else { "Secondary" };
            assert_eq!(vm["role"], role, "{}: {vm}", HOSTS[host]);
            assert_eq!(vm["state"], "Protected", "{}: {vm}", HOSTS[host]);
            assert_eq!(
                vm["generation"].as_u64(),
                Some(self.generation),
                "{}: {vm}",
                HOSTS[host]
            );
            assert_eq!(vm["vm_paused"], false, "{}: {vm}", HOSTS[host]);
            let all_up = status["links_up"] == status["links"];
            let since = &mut self.links_down_since[host];
            match (all_up, *since) {
                (true, Some(down)) => {
                    self.longest_links_down = self.longest_links_down.max(down.elapsed());
                    *since = None;
                }
                (false, None) => *since = Some(Instant::now()),
                _ => {}
            }
            if let Some(down) = since {
                let link_timeout = Duration::from_millis(1000);
                assert!(
                    down.elapsed() < link_timeout,
                    "{}: an A-link down for {:?}: {status}",
                    HOSTS[host],
                    down.elapsed()
                );
            }
        }
    }

    /// Samples every 50 ms until `condition` holds (at most `timeout`); on a timeout the
    /// panic shows both hosts' status.
    fn until(
        &mut self,
        cluster: &Cluster,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut() -> bool,
    ) {
        let held = Wait::up_to(timeout)
            .every(Duration::from_millis(50))
            .holds(|| {
                self.sample(cluster);
                condition()
            });
        assert!(
            held,
            "timed out after {timeout:?} waiting for {what}; hostA: {:#}; hostB: {:#}",
            cluster.status(A).unwrap_or_default(),
            cluster.status(B).unwrap_or_default()
        );
    }

    /// Samples every 50 ms for `window`.
    fn during(&mut self, cluster: &Cluster, window: Duration) {
        Wait::up_to(window)
            .every(Duration::from_millis(50))
            .sample(|| self.sample(cluster));
    }
}

#[test]
fn the_pair_key_rotates_while_a_guest_writes_and_the_retired_key_is_refused() {
    let mut cluster = Cluster::new(
        "key-rotation",
        &cluster_writer(RECORDS),
        &ClusterOptions::default(),
    );
    let key_files = own_pair_keys(&cluster);
    // hostA's witness key: its own file, and the witness's copy in its key directory.
    let witness_key_file = own_key_file(&cluster, A, "witness-keys/hostA.psk", "witness.psk");
    cluster.start_all();
    let protected = cluster.wait_vm(A, Duration::from_secs(60), "Protected on hostA", |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    wait_acks(&cluster, A, 20);
    let mut watch = Watch {
        generation: protected["generation"].as_u64().expect("generation"),
        links_down_since: [None, None],
        longest_links_down: Duration::ZERO,
        samples: 0,
    };
    let rotation_started_ms = unix_ms();
    let started = Instant::now();
    let old = strings(&pair_key(&cluster, A)["held"]);
    assert_eq!(old.len(), 1, "one key before the rotation: {old:?}");
    let old = old[0].clone();

    // hostA takes a new key; hostB still holds only the old one, which every connection
    // keeps using. Retiring on hostA now would cut hostB off: refused.
    let (ok, text) = cluster.ftvm(A, &["key", "retire"]);
    assert!(!ok && text.contains("nothing to retire"), "{text}");
    let (ok, text) = cluster.ftvm(A, &["key", "rotate"]);
    assert!(ok, "{text}");
    let new = strings(&pair_key(&cluster, A)["held"]);
    assert_eq!(new.len(), 2, "{new:?}");
    assert_eq!(new[1], old);
    let new = new[0].clone();
    watch.until(&cluster, SETTLE, "hostB to hear hostA's keys", || {
        strings(&pair_key(&cluster, B)["peer_holds"]) == [new.clone(), old.clone()]
    });
    let (ok, text) = cluster.ftvm(A, &["key", "retire"]);
    assert!(!ok && text.contains("not retired"), "{text}");
    watch.during(&cluster, SETTLE);

    // hostB takes the same key from a copy of hostA's file.
    let copy = cluster.dir.path().join("new-pair.psk");
    std::fs::copy(&key_files[A], &copy).expect("copy hostA's new key");
    let copy_arg = copy.to_string_lossy().into_owned();
    let (ok, text) = cluster.ftvm(B, &["key", "rotate", "--new", &copy_arg]);
    assert!(ok, "{text}");
    assert_eq!(
        strings(&pair_key(&cluster, B)["held"]),
        [new.clone(), old.clone()]
    );
    watch.until(&cluster, SETTLE, "hostA to hear hostB's keys", || {
        strings(&pair_key(&cluster, A)["peer_holds"]) == [new.clone(), old.clone()]
    });
    watch.during(&cluster, SETTLE);

    // hostA retires the old key: every connection still under it (heartbeats, the disk's
    // mirror link) ends and comes back under the new key.
    let (ok, text) = cluster.ftvm(A, &["key", "retire"]);
    assert!(ok, "{text}");
    let links_new = |host: usize| {
        let key = pair_key(&cluster, host);
        let in_use = strings(&key["in_use"]);
        in_use.len() == 2 && in_use.iter().all(|key| *key == new)
    };
    // The disk's mirror session: hostA's primary dials, hostB's secondary listens.
    let disk_links_new = |host: usize| {
        let Some(vm) = cluster.vm_status(host) else {
            return false;
        };
        let links = &vm["disks"][0]["replication"]["links"];
        let session = if host == A { links } else { &links["session"] };
        let keys: Vec<&Value> = session["links"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|link| link["up"] == true)
            .map(|link| &link["key"])
            .collect();
        !keys.is_empty() && keys.iter().all(|key| key.as_str() == Some(new.as_str()))
    };
    watch.until(
        &cluster,
        SETTLE * 2,
        "the heartbeats' and the disk's A-links under the new key",
        || links_new(A) && links_new(B) && disk_links_new(A) && disk_links_new(B),
    );
    let (ok, text) = cluster.ftvm(B, &["key", "retire"]);
    assert!(ok, "{text}");
    watch.until(
        &cluster,
        SETTLE,
        "both hosts to hold only the new key",
        || {
            strings(&pair_key(&cluster, A)["held"]) == [new.clone()]
                && strings(&pair_key(&cluster, B)["held"]) == [new.clone()]
                && strings(&pair_key(&cluster, A)["peer_holds"]) == [new.clone()]
        },
    );
    watch.during(&cluster, SETTLE);
    let rotation_took = started.elapsed();

    // hostA's witness key, as docs/OPERATIONS.md says: the witness takes its keys at start,
    // so it is restarted with the new one; hostA offers both meanwhile.
    let witness_started = Instant::now();
    let old_witness = strings(&witness_key(&cluster, A)["held"]);
    assert_eq!(old_witness.len(), 1, "{old_witness:?}");
    let (ok, text) = cluster.ftvm(A, &["key", "rotate", "--witness"]);
    assert!(ok, "{text}");
    let held = strings(&witness_key(&cluster, A)["held"]);
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!(held[1], old_witness[0]);
    let new_witness = held[0].clone();
    // Not yet: the witness knows only the old key, which hostA's link still uses.
    let (ok, text) = cluster.ftvm(A, &["key", "retire", "--witness"]);
    assert!(
        !ok,
        "retired while the witness link used the old key: {text}"
    );
    std::fs::copy(
        &witness_key_file,
        cluster.dir.path().join("witness-keys/hostA.psk"),
    )
    .expect("copy hostA's new witness key to the witness");
    cluster.stop_witness();
    cluster.start_witness();
    watch.until(
        &cluster,
        SETTLE * 4,
        "hostA's witness link under the new key, both hosts reaching the witness",
        || {
            let in_use = strings(&witness_key(&cluster, A)["in_use"]);
            !in_use.is_empty()
                && in_use.iter().all(|key| *key == new_witness)
                && [A, B].iter().all(|&host| {
                    cluster
                        .status(host)
                        .is_some_and(|status| status["witness_reachable"] == true)
                })
        },
    );
    let (ok, text) = cluster.ftvm(A, &["key", "retire", "--witness"]);
    assert!(ok, "{text}");
    assert_eq!(
        strings(&witness_key(&cluster, A)["held"]),
        [new_witness.as_str()]
    );
    watch.during(&cluster, SETTLE);
    // The restarted witness kept its record: hostA holds the VM at the same generation.
    let record = cluster.witness_record();
    assert_eq!(
        record["generation"].as_u64(),
        Some(watch.generation),
        "{record}"
    );
    assert_eq!(record["holder"], "hostA", "{record}");
    let witness_took = witness_started.elapsed();

    // The guest kept writing; nothing failed; every acknowledged record is on both copies.
    let before = last_ack(&cluster.console(A));
    let acknowledged = wait_acks(&cluster, A, before + 20);
    assert_no_write_failed(&cluster.console(A));
    for host in [A, B] {
        let image = std::fs::read(cluster.image(host)).expect("read image");
        assert_cluster_records_in_image(&image, acknowledged, HOSTS[host]);
    }
    for host in [A, B] {
        let (_, events) = cluster.ftvm(host, &["events", "--json"]);
        let events: Value = serde_json::from_str(&events).expect("events as JSON");
        let bad: Vec<&Value> = events
            .as_array()
            .into_iter()
            .flatten()
            .filter(|event| event["unix_ms"].as_u64() >= Some(rotation_started_ms))
            .filter(|event| event["severity"] != "Info")
            .collect();
        assert!(
            bad.is_empty(),
            "{}: warnings or errors during the rotation: {bad:?}",
            HOSTS[host]
        );
    }
    println!(
        "key {old} -> {new}: rotated and retired on both hosts in {:.1} s while the guest \
         wrote {} records; {} samples, the longest time a host had an A-link down was {} ms \
         (link timeout 1000 ms); hostA's witness key {} -> {new_witness} rotated with a \
         witness restart in {:.1} s",
        rotation_took.as_secs_f64(),
        acknowledged,
        watch.samples,
        watch.longest_links_down.as_millis(),
        old_witness[0],
        witness_took.as_secs_f64(),
    );

    // A host that offers only the retired key is refused: hostB's file goes back to it.
    let old_secret = std::fs::read(cluster.dir.path().join("pair.psk")).expect("the old key");
    std::fs::write(&key_files[B], old_secret).expect("hostB back to the old key");
    Wait::up_to(Duration::from_secs(20))
        .every(Duration::from_millis(100))
        .until("hostB refused with the retired key", || {
            let (_, events) = cluster.ftvm(B, &["events"]);
            events.contains("authentication with hostA failed")
        });
}
