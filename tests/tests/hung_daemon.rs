//! A daemon that hangs never stalls `ftvmd`'s heartbeats: hostA's disk daemon is stopped
//! with SIGSTOP (its control socket still accepts connections, nothing answers) for
//! longer than three peer timeouts. ftvmd names the daemon in an event, and nothing fails
//! over; after SIGCONT the VM is Protected again.

use std::time::{Duration, Instant};

use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::process::signal;
use ftvm_tests::records::{last_ack, wait_acks};
use ftvm_tests::wait::Wait;

const A: usize = 0;
const B: usize = 1;

/// Writes numbered blocks, each flushed, and reports `ACK n` after each.
fn writer_guest() -> GuestConfig {
    let script = "\
i=1
while [ $i -le 100000 ]; do
  echo \"ftvm-record $i\" | dd of=/dev/vda bs=4096 seek=$((i % 4096)) conv=sync,fsync 2>/dev/null || { echo \"WRITE-FAILED $i\"; exit 1; }
  echo \"ACK $i\"
  i=$((i + 1))
  usleep 20000
done
";
    let mut guest = GuestConfig::new("ftvm-hung", script);
    guest.memory_mb = 256;
    guest
}

fn events(cluster: &Cluster, host: usize) -> String {
    cluster.ftvm(host, &["events"]).1
}

/// Continues the stopped process on drop (SIGCONT), also when the test fails.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

#[test]
fn a_hung_disk_daemon_is_reported_and_fails_nothing_over() {
    let options = ClusterOptions::default();
    let peer_timeout = Duration::from_millis(options.peer_timeout_ms);
    let mut cluster = Cluster::new("hung-disk-daemon", &writer_guest(), &options);
    cluster.start_all();
    let protected = cluster.wait_vm(A, Duration::from_secs(60), "Protected on hostA", |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    let generation = protected["generation"].as_u64().expect("generation");
    wait_acks(&cluster, A, 20);
    let pid = protected["disk_pids"][0]
        .as_u64()
        .expect("hostA's disk daemon runs") as u32;

    signal(pid, libc::SIGSTOP);
    let stopped = Stopped(pid);
    let stopped_at = Instant::now();
    let hold = peer_timeout * 3 + Duration::from_secs(1);
    let mut slowest_status = Duration::ZERO;
    let mut reported_after = None;
    Wait::up_to(hold)
        .every(Duration::from_millis(50))
        .sample(|| {
            // ftvmd's main loop answers `ftvm status`: it is not waiting on the daemon.
            let asked = Instant::now();
            let a = cluster.vm_status(A).expect("hostA's ftvmd answers");
            slowest_status = slowest_status.max(asked.elapsed());
            let b = cluster.vm_status(B).expect("hostB's ftvmd answers");
            assert_eq!(
                (a["role"].as_str(), a["generation"].as_u64()),
                (Some("Primary"), Some(generation)),
                "hostA: {a}"
            );
            assert!(a["vm_pid"].is_u64(), "hostA's VM must keep running: {a}");
            assert_eq!(
                (b["role"].as_str(), b["generation"].as_u64()),
                (Some("Secondary"), Some(generation)),
                "hostB: {b}"
            );
            assert!(b["vm_pid"].is_null(), "a VM started on hostB: {b}");
            let record = cluster.witness_record();
            assert_eq!(
                (record["holder"].as_str(), record["generation"].as_u64()),
                (Some(HOSTS[A]), Some(generation)),
                "the witness moved the VM: {record}"
            );
            if reported_after.is_none() && events(&cluster, A).contains("disk daemon vm1-disk0") {
                let text = events(&cluster, A);
                if text.contains("does not answer") {
                    reported_after = Some(stopped_at.elapsed());
                }
            }
        });
    let reported_after = reported_after.unwrap_or_else(|| {
        panic!(
            "no event names the hung daemon; events:\n{}",
            events(&cluster, A)
        )
    });
    let events_a = events(&cluster, A);
    assert!(
        events_a.contains(&format!("(pid {pid}) does not answer")),
        "{events_a}"
    );
    let events_b = events(&cluster, B);
    assert!(
        !events_b.contains("granted") && !events_b.contains("taking over"),
        "hostB tried to take over: {events_b}"
    );
    println!(
        "disk daemon stopped for {:.1} s (peer timeout {} ms): event after {:.2} s, no \
         failover; slowest `ftvm status` on hostA {} ms",
        stopped_at.elapsed().as_secs_f64(),
        peer_timeout.as_millis(),
        reported_after.as_secs_f64(),
        slowest_status.as_millis()
    );

    drop(stopped);
    let resumed_at = Instant::now();
    let before = last_ack(&cluster.console(A));
    let back = cluster.wait_vm(A, Duration::from_secs(60), "Protected again", |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    wait_acks(&cluster, A, before + 10);
    println!(
        "after SIGCONT: Protected again and writing in {:.2} s, generation {} (was {generation})",
        resumed_at.elapsed().as_secs_f64(),
        back["generation"]
    );
    let b = cluster.vm_status(B).expect("hostB status");
    assert_eq!(b["role"], "Secondary", "{b}");
    assert_eq!(
        back["disk_pids"][0].as_u64(),
        Some(u64::from(pid)),
        "{back}"
    );
    let events_a = events(&cluster, A);
    assert!(
        events_a.contains("disk daemon vm1-disk0 answers again"),
        "{events_a}"
    );
}
