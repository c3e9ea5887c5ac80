//! The daemon as an operator meets it: flags, errors, the control socket, SIGTERM.
//! Tests that need a TAP run the daemon in a throwaway network namespace (root only).

mod common;

use std::path::Path;

use common::{run, status, Netns};
use daemon_util::test_support::{control, one_line_error, poll_until, TIMEOUT};

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A socket path of its own for each daemon run: tests run in parallel, and a daemon that
/// binds a shared path would make another one fail with "in use".
fn unused_socket() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "/tmp/vnft-cli-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[test]
fn missing_bridge_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("n.sock");
    let output = run(&["--socket", path_arg(&socket), "--bridge", "no-such-br9"]);
    let stderr = one_line_error(&output);
    assert_eq!(
        stderr.trim(),
        "vhost-net-ft: bridge no-such-br9 does not exist"
    );
    assert!(!socket.exists(), "no socket is left behind");
}

#[test]
fn a_device_that_is_not_a_bridge_is_refused() {
    let output = run(&["--socket", unused_socket().as_str(), "--bridge", "lo"]);
    let stderr = one_line_error(&output);
    assert!(stderr.contains("lo is not a bridge"), "{stderr}");
}

#[test]
fn bad_queue_count_is_a_one_line_error() {
    for queues in ["0", "17"] {
        let output = run(&[
            "--socket",
            unused_socket().as_str(),
            "--tap",
            "tap0",
            "--queues",
            queues,
        ]);
        let stderr = one_line_error(&output);
        assert!(
            stderr.contains(&format!("--queues must be between 1 and 16, not {queues}")),
            "{stderr}"
        );
    }
}

#[test]
fn a_too_small_output_buffer_is_a_one_line_error() {
    let output = run(&[
        "--socket",
        unused_socket().as_str(),
        "--tap",
        "tap0",
        "--output-buffer-bytes",
        "65536",
    ]);
    let stderr = one_line_error(&output);
    assert!(
        stderr.contains("--output-buffer-bytes must be at least 1048576, not 65536"),
        "{stderr}"
    );
    let output = run(&["--socket", "s", "--tap", "t", "--output-buffer-bytes", "-1"]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
}

#[test]
fn bad_tap_name_is_a_one_line_error() {
    let output = run(&[
        "--socket",
        unused_socket().as_str(),
        "--tap",
        "sixteen-chars-xx",
    ]);
    let stderr = one_line_error(&output);
    assert!(
        stderr.contains("\"sixteen-chars-xx\" is not a valid interface name"),
        "{stderr}"
    );
}

#[test]
fn an_uplink_is_required_and_only_one() {
    let neither = run(&["--socket", unused_socket().as_str()]);
    assert_eq!(neither.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&neither.stderr);
    assert!(
        stderr.contains("--tap") && stderr.contains("--bridge"),
        "{stderr}"
    );

    let both = run(&[
        "--socket",
        unused_socket().as_str(),
        "--tap",
        "tap0",
        "--bridge",
        "br0",
    ]);
    assert_eq!(both.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
}

#[test]
fn bad_mac_is_refused_with_the_reason() {
    for (mac, reason) in [
        ("52:54:00:12:34", "is not a MAC address"),
        ("01:00:5e:00:00:01", "is a multicast address"),
    ] {
        let output = run(&[
            "--socket",
            unused_socket().as_str(),
            "--tap",
            "tap0",
            "--mac",
            mac,
        ]);
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(reason), "{stderr}");
    }
}

#[test]
fn unknown_flag_fails_with_usage() {
    let output = run(&["--socket", "/tmp/x", "--tap", "t0", "--frobnicate"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--frobnicate"));
}

#[test]
fn status_answers_and_a_socket_in_use_is_refused() {
    let netns = Netns::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("n.sock");
    let control_path = dir.path().join("n.ctl");
    let _daemon = netns.start_daemon(&[
        "--socket",
        path_arg(&socket),
        "--tap",
        "vnft0",
        "--control",
        path_arg(&control_path),
    ]);
    poll_until(TIMEOUT, "control socket", || {
        control(&control_path, "status").is_some()
    });
    let status = status(&control_path);
    let expected_mac = vhost_net_ft::config::format_mac(vhost_net_ft::config::default_mac(&socket));
    assert_eq!(
        status["mac"],
        expected_mac.as_str(),
        "default MAC from the socket path"
    );
    assert_eq!(status["tap"], "vnft0");
    assert_eq!(status["queues"], 1);
    assert_eq!(status["connected"], false);
    assert_eq!(status["link"]["tap_up"], true);
    assert_eq!(status["link"]["guest_link_up"], true);
    assert_eq!(status["features"]["acked"], "0x0");
    assert_eq!(status["features"]["header_len_bytes"], 12);
    for counter in [
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "rx_dropped_no_buffers",
        "tx_dropped_malformed",
        "tap_write_errors",
    ] {
        assert_eq!(status[counter], 0, "{counter}");
    }
    let unknown = control(&control_path, "bogus").expect("reply");
    assert!(unknown.contains("unknown command"), "{unknown}");

    let output = netns.exec(&[
        common::BINARY,
        "--socket",
        path_arg(&socket),
        "--tap",
        "vnft1",
    ]);
    let stderr = one_line_error(&output);
    assert!(stderr.contains("is in use"), "{stderr}");
    assert!(socket.exists(), "the first daemon's socket is untouched");
}

#[test]
fn announce_sends_a_rarp_from_the_mac() {
    let netns = Netns::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let control_path = dir.path().join("n.ctl");
    let _daemon = netns.start_daemon(&[
        "--socket",
        path_arg(&dir.path().join("n.sock")),
        "--tap",
        "vnft0",
        "--mac",
        "52:54:00:aa:bb:cc",
        "--control",
        path_arg(&control_path),
    ]);
    poll_until(TIMEOUT, "control socket", || {
        control(&control_path, "status").is_some()
    });
    let before = netns.statistic("vnft0", "rx_packets");
    let reply: serde_json::Value =
        serde_json::from_str(&control(&control_path, "announce").expect("reply")).expect("json");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["rarp_sent"], true);
    assert_eq!(
        reply["guest_asked"], false,
        "no guest negotiated GUEST_ANNOUNCE"
    );
    // A frame we write into the TAP is one the host receives from it.
    assert_eq!(netns.statistic("vnft0", "rx_packets"), before + 1);
    assert_eq!(status(&control_path)["announcements"], 1);
}

#[test]
fn sigterm_removes_sockets_and_the_bridge_tap() {
    let netns = Netns::new();
    netns.exec_ok(&["ip", "link", "add", "br-test", "type", "bridge"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("n.sock");
    let control_path = dir.path().join("n.ctl");
    let mut daemon = netns.start_daemon(&[
        "--socket",
        path_arg(&socket),
        "--bridge",
        "br-test",
        "--queues",
        "2",
        "--control",
        path_arg(&control_path),
    ]);
    poll_until(TIMEOUT, "control socket", || {
        control(&control_path, "status").is_some()
    });
    let status = status(&control_path);
    let tap = status["tap"].as_str().expect("tap name").to_owned();
    assert!(tap.starts_with("ftvm-") && tap.len() <= 15, "{tap}");
    assert_eq!(status["bridge"], "br-test");
    assert_eq!(status["link"]["tap_master"], "br-test");
    assert_eq!(status["queues"], 2);
    let ports = netns.exec_ok(&["ls", "/sys/class/net/br-test/brif"]);
    assert_eq!(ports.trim(), tap, "the TAP is a port of the bridge");

    assert!(daemon.terminate().expect("the daemon ran").success());
    assert!(
        !socket.exists() && !control_path.exists(),
        "sockets removed"
    );
    assert!(
        !netns.links().contains(&tap),
        "TAP {tap} deleted: {:?}",
        netns.links()
    );
}

#[test]
fn an_existing_tap_is_attached_and_left_in_place() {
    let netns = Netns::new();
    netns.exec_ok(&["ip", "tuntap", "add", "dev", "vnft9", "mode", "tap"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("n.sock");
    let control_path = dir.path().join("n.ctl");

    // A single-queue TAP cannot serve two queue pairs: one line says why.
    let output = netns.exec(&[
        common::BINARY,
        "--socket",
        path_arg(&socket),
        "--tap",
        "vnft9",
        "--queues",
        "2",
    ]);
    let stderr = one_line_error(&output);
    assert!(
        stderr.contains("cannot attach queue 0 of TAP device vnft9")
            && stderr.contains("must be multi-queue"),
        "{stderr}"
    );
    assert!(!socket.exists(), "no socket is left behind");

    let mut daemon = netns.start_daemon(&[
        "--socket",
        path_arg(&socket),
        "--tap",
        "vnft9",
        "--control",
        path_arg(&control_path),
    ]);
    poll_until(TIMEOUT, "control socket", || {
        control(&control_path, "status").is_some()
    });
    let status = status(&control_path);
    assert_eq!(status["tap"], "vnft9");
    assert_eq!(status["link"]["tap_up"], true, "brought up");
    assert_eq!(status["link"]["tap_carrier"], true, "attached");
    assert!(daemon.terminate().expect("the daemon ran").success());
    assert!(
        netns.links().contains(&"vnft9".to_owned()),
        "the operator's persistent TAP stays"
    );
}
