//! The daemon as an operator meets it: flags, errors, the control socket, SIGTERM.

use std::path::Path;
use std::process::{Command, Output};

use daemon_util::test_support::{control, one_line_error, poll_until, Process, TIMEOUT};

const BINARY: &str = env!("CARGO_BIN_EXE_vhost-blk-mirror");

fn run(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run vhost-blk-mirror")
}

fn start(args: &[&str]) -> Process {
    let mut command = Command::new(BINARY);
    command.args(args);
    Process::start("vhost-blk-mirror", command)
}

fn image(dir: &Path, size: u64) -> String {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .and_then(|file| file.set_len(size))
        .expect("create image");
    path.display().to_string()
}

#[test]
fn missing_image_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let output = run(&[
        "--socket",
        socket.to_str().expect("utf-8"),
        "--image",
        "/nonexistent/disk.img",
    ]);
    let stderr = one_line_error(&output);
    assert!(
        stderr.contains("cannot open image /nonexistent/disk.img"),
        "{stderr}"
    );
    assert!(stderr.contains("No such file"), "{stderr}");
    assert!(!socket.exists(), "no socket is left behind");
}

#[test]
fn bad_queue_count_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image(dir.path(), 1 << 20);
    let socket = dir.path().join("s.sock");
    let output = run(&[
        "--socket",
        socket.to_str().expect("utf-8"),
        "--image",
        &image,
        "--queues",
        "0",
    ]);
    let stderr = one_line_error(&output);
    assert!(
        stderr.contains("--queues must be between 1 and 16"),
        "{stderr}"
    );
}

#[test]
fn unknown_flag_fails_with_usage() {
    let output = run(&["--socket", "/tmp/x", "--image", "/tmp/y", "--frobnicate"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--frobnicate"));
}

#[test]
fn socket_in_use_is_refused_and_status_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image(dir.path(), 8 << 20);
    let socket = dir.path().join("s.sock");
    let control_path = dir.path().join("c.sock");
    let socket_arg = socket.to_str().expect("utf-8");
    let control_arg = control_path.to_str().expect("utf-8");
    let _first = start(&[
        "--socket",
        socket_arg,
        "--image",
        &image,
        "--control",
        control_arg,
        "--serial",
        "d1",
    ]);
    poll_until(TIMEOUT, "control socket", || {
        control(&control_path, "status").is_some()
    });
    let status: serde_json::Value =
        serde_json::from_str(&control(&control_path, "status").expect("status")).expect("json");
    assert_eq!(status["size_bytes"], 8 << 20);
    assert_eq!(status["serial"], "d1");
    assert_eq!(status["queues"], 1);
    assert_eq!(status["connected"], false);
    assert_eq!(status["image_kind"], "file");
    let unknown = control(&control_path, "bogus").expect("reply");
    assert!(unknown.contains("unknown command"), "{unknown}");

    let output = run(&["--socket", socket_arg, "--image", &image]);
    let stderr = one_line_error(&output);
    assert!(stderr.contains("is in use"), "{stderr}");
    assert!(socket.exists(), "the first daemon's socket is untouched");
}

#[test]
fn sigterm_stops_cleanly_and_removes_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image(dir.path(), 1 << 20);
    let socket = dir.path().join("s.sock");
    let control_path = dir.path().join("c.sock");
    let mut daemon = start(&[
        "--socket",
        socket.to_str().expect("utf-8"),
        "--image",
        &image,
        "--control",
        control_path.to_str().expect("utf-8"),
    ]);
    poll_until(TIMEOUT, "control socket", || {
        control(&control_path, "status").is_some()
    });
    assert!(daemon.terminate().expect("the daemon ran").success());
    assert!(
        !socket.exists() && !control_path.exists(),
        "sockets removed"
    );
}
