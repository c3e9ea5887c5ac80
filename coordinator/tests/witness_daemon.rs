//! `ftvm-witness` as a process: real sockets, a real crash (SIGKILL), its files.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use coordinator::witness::{Claim, Grant, Verdict};
use coordinator::witness_daemon::{HostPair, WitnessReply, WitnessRequest};
use daemon_util::test_support::{poll_until, Process, Wait, TIMEOUT};
use replication_link::{LinkConfig, Psk, Session};

const BINARY: &str = env!("CARGO_BIN_EXE_ftvm-witness");
const KEY: &[u8] = b"witness test key 0123456789abcdef";

fn free_port() -> SocketAddr {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.local_addr().expect("addr")
}

fn start(address: SocketAddr, dir: &std::path::Path) -> Process {
    let psk = dir.join("witness.psk");
    std::fs::write(&psk, KEY).expect("psk");
    start_with(address, dir, &["--psk-file".as_ref(), psk.as_os_str()])
}

fn start_with(address: SocketAddr, dir: &std::path::Path, keys: &[&std::ffi::OsStr]) -> Process {
    let mut command = Command::new(BINARY);
    command
        .arg("--listen")
        .arg(address.to_string())
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(keys);
    Process::start("ftvm-witness", command)
}

fn ask(session: &Session, request: &WitnessRequest) -> WitnessReply {
    session.send_typed(request, Vec::new()).expect("send");
    // Each look blocks in `recv` for up to 100 ms: no pause between looks.
    let message = Wait::up_to(TIMEOUT)
        .every(Duration::ZERO)
        .poll(|| session.recv(Duration::from_millis(100)).expect("recv"))
        .expect("an answer from the witness");
    message.header().expect("reply")
}

fn connect(address: SocketAddr, host: &str) -> Session {
    connect_with(address, host, KEY)
}

fn connect_with(address: SocketAddr, host: &str, key: &[u8]) -> Session {
    let config = LinkConfig::new(Psk::from_bytes(key).expect("key"), host);
    Session::connect(vec![address], "witness", config).expect("connect")
}

/// Registers vm1 of the pair hostA+hostB, hostA holding generation 1.
fn register(session: &Session) {
    let registered = ask(
        session,
        &WitnessRequest::Register {
            pair: HostPair::new("hostA", "hostB"),
            vm: "vm1".into(),
            grant: Grant {
                generation: 1,
                holder: "hostA".into(),
            },
        },
    );
    assert!(
        matches!(registered, WitnessReply::Grant { grant: Some(_), .. }),
        "{registered:?}"
    );
}

fn assert_granted(reply: &WitnessReply, generation: u64) {
    assert!(
        matches!(reply, WitnessReply::Verdict { verdict: Verdict::Granted { generation: granted }, .. } if *granted == generation),
        "{reply:?}"
    );
}

fn claim(host: &str) -> WitnessRequest {
    WitnessRequest::Claim {
        pair: HostPair::new("hostA", "hostB"),
        vm: "vm1".into(),
        claim: Claim {
            host: host.into(),
            generation: 2,
            data_generation: 1,
        },
    }
}

#[test]
fn grants_survive_a_witness_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let address = free_port();
    let mut witness = start(address, dir.path());
    let host_b = connect(address, "hostB");
    register(&host_b);
    assert_granted(&ask(&host_b, &claim("hostB")), 2);
    drop(host_b);

    witness.kill();
    let _witness = start(address, dir.path());
    let host_a = connect(address, "hostA");
    let refused = ask(&host_a, &claim("hostA"));
    assert!(
        matches!(
            refused,
            WitnessReply::Verdict {
                verdict: Verdict::Refused { current: 2, .. },
                ..
            }
        ),
        "the grant survived the crash: {refused:?}"
    );
    let state = std::fs::read_to_string(dir.path().join("state/hostA+hostB/vm1.grant.json"))
        .expect("state");
    assert!(
        state.contains("\"holder\": \"hostB\""),
        "readable state: {state}"
    );
}

#[test]
fn with_a_key_per_host_no_host_can_claim_under_another_ones_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("key dir");
    let key_a = b"hostA's witness key, 0123456789abcdef";
    let key_c = b"hostC's witness key, 0123456789abcdef";
    std::fs::write(keys.join("hostA.psk"), key_a).expect("key");
    std::fs::write(keys.join("hostC.psk"), key_c).expect("key");
    let address = free_port();
    let _witness = start_with(
        address,
        dir.path(),
        &["--psk-dir".as_ref(), keys.as_os_str()],
    );

    // hostC (of another pair) holds a valid key, but not hostA's.
    let impostor = connect_with(address, "hostA", key_c);
    impostor
        .send_typed(&claim("hostA"), Vec::new())
        .expect("queued");
    poll_until(TIMEOUT, "the impostor to be refused", || {
        impostor.stats().links[0].auth_failures > 0
    });
    assert!(!impostor.peer_reachable());
    drop(impostor);

    let host_a = connect_with(address, "hostA", key_a);
    register(&host_a);
    // Nothing was granted to the impostor: generation 2 is still free for hostA.
    assert_granted(&ask(&host_a, &claim("hostA")), 2);
}

#[test]
fn an_empty_key_directory_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:1", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--psk-dir")
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("has no HOST.psk file"), "{stderr}");
}

#[test]
fn bad_flags_are_a_one_line_error() {
    let output = Command::new(BINARY)
        .args([
            "--listen",
            "127.0.0.1:1",
            "--state-dir",
            "/tmp/x",
            "--psk-file",
            "/nonexistent",
        ])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("pre-shared key"), "{stderr}");
}
