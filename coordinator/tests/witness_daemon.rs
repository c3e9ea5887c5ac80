//! `ftvm-witness` as a process: real sockets, a real crash (SIGKILL), its files.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coordinator::witness::{Claim, Grant, Verdict};
use coordinator::witness_daemon::{HostPair, WitnessReply, WitnessRequest};
use replication_link::{LinkConfig, Psk, Session};

const BINARY: &str = env!("CARGO_BIN_EXE_ftvm-witness");
const TIMEOUT: Duration = Duration::from_secs(10);
const KEY: &[u8] = b"witness test key 0123456789abcdef";

struct Witness(Child);

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.local_addr().expect("addr")
}

fn start(address: SocketAddr, dir: &std::path::Path) -> Witness {
    let psk = dir.join("witness.psk");
    std::fs::write(&psk, KEY).expect("psk");
    let child = Command::new(BINARY)
        .arg("--listen")
        .arg(address.to_string())
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--psk-file")
        .arg(&psk)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ftvm-witness");
    Witness(child)
}

fn ask(session: &Session, request: &WitnessRequest) -> WitnessReply {
    session.send_typed(request, Vec::new()).expect("send");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no answer from the witness");
        if let Some(message) = session.recv(Duration::from_millis(100)).expect("recv") {
            return message.header().expect("reply");
        }
    }
}

fn connect(address: SocketAddr, host: &str) -> Session {
    let config = LinkConfig::new(Psk::from_bytes(KEY).expect("key"), host);
    Session::connect(vec![address], "witness", config).expect("connect")
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
    let registered = ask(
        &host_b,
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
    let won = ask(&host_b, &claim("hostB"));
    assert!(
        matches!(
            won,
            WitnessReply::Verdict {
                verdict: Verdict::Granted { generation: 2 },
                ..
            }
        ),
        "{won:?}"
    );
    drop(host_b);

    let _ = witness.0.kill();
    let _ = witness.0.wait();
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
