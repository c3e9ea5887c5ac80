//! Hostile peers against a `vhost-blk-mirror` secondary: a primary with the wrong key and
//! garbage on the replication port are refused, nothing is written, the daemon keeps
//! serving. (Tampered, replayed and reordered frames are refused by the link layer's own
//! tests in `replication-link/tests/security.rs`, with a man-in-the-middle relay.)

use std::process::Stdio;
use std::time::Duration;

use ftvm_tests::mirror::{MirrorPair, HOST_B_LINKS, REPLICATION_PORT};
use ftvm_tests::wait::poll_until;

const TIMEOUT: Duration = Duration::from_secs(30);

fn listener_counter(status: &serde_json::Value, counter: &str) -> u64 {
    status["replication"]["links"]["listener"]["addresses"]
        .as_array()
        .map(|addresses| {
            addresses
                .iter()
                .filter_map(|address| address[counter].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// Sends `bytes` to the secondary's first A-link address from hostA with busybox nc.
fn send_raw(pair: &MirrorPair, bytes: &[u8]) {
    let mut child = pair
        .hosts
        .command("hostA", "busybox")
        .args(["nc", "-w", "2", HOST_B_LINKS[0]])
        .arg(REPLICATION_PORT.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run busybox nc");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, bytes);
    }
    let _ = child.wait();
}

#[test]
fn wrong_key_and_garbage_are_refused_and_nothing_is_written() {
    let mut pair = MirrorPair::new("hostile", 16 << 20, 1);
    pair.start_secondary();

    // A primary with another key.
    let wrong_key = pair.dir.path().join("wrong.psk");
    std::fs::write(&wrong_key, "a key this pair does not share 0123456789\n").expect("write");
    let correct_args = pair.primary_options.extra_args.clone();
    pair.primary_options.extra_args = correct_args
        .iter()
        .map(|arg| {
            if arg.ends_with("pair.psk") {
                wrong_key.display().to_string()
            } else {
                arg.clone()
            }
        })
        .collect();
    pair.start_primary();
    poll_until(TIMEOUT, "an authentication failure counted", || {
        listener_counter(&pair.secondary().status(), "auth_failures") > 0
    });
    let impostor = pair.primary().status();
    assert_eq!(
        impostor["replication"]["peer_reachable"], false,
        "{impostor}"
    );
    assert_eq!(impostor["replication"]["mode"], "Connecting", "{impostor}");
    if let Some(mut primary) = pair.primary.take() {
        primary.process.terminate();
    }

    // Garbage, and a length prefix announcing a 4 GiB frame.
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    send_raw(&pair, &garbage);
    send_raw(&pair, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    poll_until(
        TIMEOUT,
        "the garbage counted as two handshake errors",
        || listener_counter(&pair.secondary().status(), "handshake_errors") >= 2,
    );

    let status = pair.secondary().status();
    assert_eq!(
        status["replication"]["generation"], 0,
        "nothing was accepted: {status}"
    );
    assert_eq!(status["replication"]["applied_writes"], 0, "{status}");
    let image = pair.secondary_image();
    assert!(
        image.iter().all(|&b| b == 0),
        "the secondary's image was written"
    );

    // The secondary still serves the real primary.
    pair.primary_options.extra_args = correct_args;
    pair.start_primary();
    pair.wait_in_sync(TIMEOUT);
}
