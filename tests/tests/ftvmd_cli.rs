//! `ftvmd` and `ftvm` facing operator mistakes: bad configuration files, a second daemon,
//! wrong keys, an unreachable peer, bad commands and non-root users. No guest boots here
//! (the VM's primary never gets the go-ahead), so these run fast.

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use ftvm_tests::cluster::{Cluster, ClusterOptions};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::paths;
use ftvm_tests::wait::Wait;

const A: usize = 0;
const B: usize = 1;

fn cluster(name: &str) -> Cluster {
    let mut guest = GuestConfig::new("ftvm-cli", "true\n");
    guest.memory_mb = 128;
    Cluster::new(name, &guest, &ClusterOptions::default())
}

fn ftvmd(args: &[&str]) -> (i32, String) {
    let output = Command::new(paths::binary("ftvmd"))
        .args(args)
        .output()
        .expect("run ftvmd");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

fn wait_event(cluster: &Cluster, host: usize, needle: &str) -> String {
    Wait::up_to(Duration::from_secs(15))
        .every(Duration::from_millis(100))
        .for_value(
            &format!("an event containing {needle:?}"),
            || Some(cluster.ftvm(host, &["events"]).1),
            |events| events.contains(needle),
        )
}

#[test]
fn bad_configuration_files_are_one_line_errors() {
    let dir = ftvm_tests::scratch_dir("ftvmd-config");
    let (code, text) = ftvmd(&["--config", "/nonexistent/ftvmd.toml"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("cannot read /nonexistent/ftvmd.toml"),
        "{text}"
    );
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    let cases = [
        (
            "[host]\nname = \"a\"\nstate_dir = \"/x\"\ncontrol_sock = \"/y\"\n",
            "control_sock",
        ),
        ("[host\n", "line 1"),
        ("", "missing field"),
    ];
    for (index, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{index}.toml"));
        std::fs::write(&path, text).expect("write config");
        let (code, output) = ftvmd(&["--config", path.to_str().expect("utf-8")]);
        assert_eq!(code, 1, "{output}");
        assert!(
            output.contains(expected),
            "expected {expected:?} in: {output}"
        );
        assert!(!output.contains("panicked"), "{output}");
    }
    let (code, text) = ftvmd(&["--bogus"]);
    assert_eq!(code, 2, "{text}");
}

#[test]
fn a_good_file_checks_and_a_second_daemon_is_refused() {
    let mut cluster = cluster("ftvmd-second");
    let config = cluster.config_path(A);
    let (code, text) = ftvmd(&["--config", config.to_str().expect("utf-8"), "--check"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("valid (1 VM(s), peer hostB)"), "{text}");
    cluster.start_ftvmd(A);
    let (code, text) = ftvmd(&["--config", config.to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("in use: another ftvmd is running") || text.contains("another ftvmd (pid"),
        "{text}"
    );
    // The first one is unharmed.
    assert!(cluster.status(A).is_some());
}

#[test]
fn unreachable_peer_and_witness_are_reported_and_the_primary_waits() {
    let mut cluster = cluster("ftvmd-alone");
    cluster.start_ftvmd(A);
    wait_event(&cluster, A, "A-link(s) to hostB are down");
    wait_event(&cluster, A, "witness is unreachable");
    let status = cluster.status(A).expect("status");
    assert_eq!(status["peer_reachable"], false);
    assert_eq!(status["witness_reachable"], false);
    let vm = &status["vms"][0];
    assert_eq!(vm["state"], "Waiting", "{vm}");
    assert!(
        vm["vm_pid"].is_null(),
        "no VM may start without peer or witness: {vm}"
    );
    let table = cluster.ftvm(A, &["status"]).1;
    assert!(
        table.contains("UNREACHABLE") && table.contains("0/2"),
        "{table}"
    );
}

#[test]
fn wrong_keys_are_named_and_nothing_starts() {
    let mut cluster = cluster("ftvmd-keys");
    // hostB gets another pair key, and hostA's witness key: a valid key, but not its own.
    let path = cluster.dir.path().join("pair-b.psk");
    std::fs::write(&path, "another pair key 0123456789").expect("write key");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let config_b = cluster.config_path(B);
    let text = std::fs::read_to_string(&config_b)
        .expect("read config")
        .replace("/pair.psk", "/pair-b.psk")
        .replace("/witness-keys/hostB.psk", "/witness-keys/hostA.psk");
    std::fs::write(&config_b, text).expect("write config");
    cluster.start_all();
    wait_event(&cluster, A, "authentication with hostB failed");
    wait_event(&cluster, B, "authentication with the witness failed");
    let vm = cluster.vm_status(A).expect("status");
    assert_eq!(vm["state"], "Waiting", "{vm}");
    assert!(vm["vm_pid"].is_null());
}

#[test]
fn the_cli_explains_its_errors() {
    let mut cluster = cluster("ftvm-cli");
    let (ok, text) = cluster.ftvm(A, &["status"]);
    assert!(!ok && text.contains("is ftvmd running"), "{text}");
    cluster.start_ftvmd(A);
    let (ok, text) = cluster.ftvm(A, &["protect", "vm1", "--level", "2", "--peer", "hostC"]);
    assert!(
        !ok && text.contains("\"hostC\" is not this host's peer"),
        "{text}"
    );
    let (ok, text) = cluster.ftvm(A, &["protect", "vm7", "--level", "1", "--peer", "hostB"]);
    assert!(!ok && text.contains("no VM named \"vm7\""), "{text}");
    let (ok, text) = cluster.ftvm(A, &["protect", "vm1", "--level", "2", "--peer", "hostB"]);
    assert!(
        ok && text.contains("already protected at level 2"),
        "{text}"
    );
    let (ok, text) = cluster.ftvm(A, &["protect", "vm1", "--level", "4", "--peer", "hostB"]);
    assert!(!ok && text.contains("4"), "{text}");
    let (ok, text) = cluster.ftvm(A, &["failover", "vm1"]);
    assert!(!ok && text.contains("needs both copies in sync"), "{text}");
    // Only root may use the control socket.
    let output = Command::new(paths::binary("ftvm"))
        .arg("--socket")
        .arg(cluster.socket(A))
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run ftvm as nobody");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        text.contains("permission denied") || text.contains("Permission denied"),
        "{text}"
    );
}

/// The datagrams sent to a NOTIFY_SOCKET until `until` holds for them or 15 s pass, each
/// with its arrival time.
fn notifications(
    socket: &UnixDatagram,
    until: impl Fn(&[(Instant, String)]) -> bool,
) -> Vec<(Instant, String)> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !until(&received) && Instant::now() < deadline {
        if let Ok(length) = socket.recv(&mut buffer) {
            let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
            received.push((Instant::now(), text));
        }
    }
    received
}

/// A datagram socket in the cluster's folder, as systemd's NOTIFY_SOCKET, and its path.
fn notify_socket(cluster: &Cluster) -> (UnixDatagram, String) {
    let path = cluster.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    (socket, path.to_str().expect("utf-8").to_owned())
}

fn count(received: &[(Instant, String)], line: &str) -> usize {
    received
        .iter()
        .filter(|(_, text)| text.lines().any(|each| each == line))
        .count()
}

#[test]
fn under_systemd_it_says_ready_pings_the_watchdog_at_half_its_timeout_and_says_stopping() {
    let mut cluster = cluster("ftvmd-notify");
    let (socket, path) = notify_socket(&cluster);
    // A 600 ms watchdog: a ping every 300 ms, while heartbeats go every 100 ms.
    cluster.start_ftvmd_with_env(A, &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "600000")]);
    let received = notifications(&socket, |received| count(received, "WATCHDOG=1") >= 5);
    let texts: Vec<&str> = received.iter().map(|(_, text)| text.as_str()).collect();
    assert!(
        texts
            .first()
            .is_some_and(|first| first.starts_with("READY=1\nSTATUS=1 VM(s), peer hostB")),
        "READY=1 first: {texts:?}"
    );
    assert_eq!(count(&received, "WATCHDOG=1"), 5, "{texts:?}");
    let pings: Vec<Instant> = received
        .iter()
        .filter(|(_, text)| text == "WATCHDOG=1\n")
        .map(|(time, _)| *time)
        .collect();
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(250) && gap < Duration::from_millis(600),
            "pings every half timeout, not every heartbeat: {gap:?}"
        );
    }
    cluster.stop_ftvmd(A);
    let received = notifications(&socket, |received| count(received, "STOPPING=1") == 1);
    assert_eq!(count(&received, "STOPPING=1"), 1, "{received:?}");
}

#[test]
fn a_watchdog_meant_for_another_process_is_never_pinged() {
    let mut cluster = cluster("ftvmd-notify-pid");
    let (socket, path) = notify_socket(&cluster);
    // WATCHDOG_PID names another process (systemd sets it to the main pid): not ours.
    cluster.start_ftvmd_with_env(
        A,
        &[
            ("NOTIFY_SOCKET", &path),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    let received = notifications(&socket, |received| {
        received
            .first()
            .is_some_and(|(time, _)| time.elapsed() > Duration::from_secs(1))
    });
    assert_eq!(count(&received, "READY=1"), 1, "{received:?}");
    assert_eq!(count(&received, "WATCHDOG=1"), 0, "{received:?}");
}
