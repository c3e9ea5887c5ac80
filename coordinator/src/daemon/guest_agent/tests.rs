//! The client against a fake agent on a unix socket (the real one runs in the guest
//! tests, `tests/tests/ftvmd_snapshot_app.rs`).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;

use super::*;

const QUICK: Timeouts = Timeouts {
    ping: Duration::from_millis(300),
    freeze: Duration::from_millis(600),
};

fn socket(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("{name}.sock"));
    (dir, path)
}

/// A fake agent: each command line gets `answer(command, id)` written back (nothing when
/// it returns `None`); returns the commands it saw.
fn fake_agent(
    path: &Path,
    answer: impl Fn(&str, u64) -> Option<Vec<u8>> + Send + 'static,
) -> JoinHandle<Vec<String>> {
    let listener = UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let Ok((stream, _)) = listener.accept() else {
            return seen;
        };
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return seen;
            }
            let message: Value = serde_json::from_str(&line).expect("client sends JSON");
            let command = message["execute"].as_str().unwrap_or_default().to_owned();
            let id = message["arguments"]["id"].as_u64().unwrap_or(0);
            seen.push(command.clone());
            if let Some(bytes) = answer(&command, id) {
                if writer.write_all(&bytes).is_err() {
                    return seen;
                }
            }
        }
    })
}

/// A well-behaved agent whose file systems start `thawed`, with stale output ahead of
/// its sync answer.
fn good_agent(command: &str, id: u64, frozen: &std::sync::atomic::AtomicBool) -> Vec<u8> {
    use std::sync::atomic::Ordering;
    match command {
        "guest-sync-delimited" => {
            let mut bytes = b"{\"return\": 3}\n{\"return\": \"stale\"}\n".to_vec();
            bytes.push(DELIMITER);
            bytes.extend(format!("{{\"return\": {id}}}\n").into_bytes());
            bytes
        }
        "guest-fsfreeze-status" => {
            let status = if frozen.load(Ordering::SeqCst) {
                "frozen"
            } else {
                "thawed"
            };
            format!("{{\"return\": \"{status}\"}}\n").into_bytes()
        }
        "guest-fsfreeze-freeze" => {
            frozen.store(true, Ordering::SeqCst);
            b"{\"return\": 2}\n".to_vec()
        }
        "guest-fsfreeze-thaw" => {
            frozen.store(false, Ordering::SeqCst);
            b"{\"return\": 2}\n".to_vec()
        }
        _ => b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}}\n".to_vec(),
    }
}

#[test]
fn freeze_skips_stale_output_checks_the_status_and_thaw_ends_it() {
    let (_dir, path) = socket("good");
    let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state = std::sync::Arc::clone(&frozen);
    let agent = fake_agent(&path, move |command, id| {
        Some(good_agent(command, id, &state))
    });
    let done = freeze(&path, QUICK).expect("frozen");
    assert_eq!(
        done,
        Frozen {
            file_systems: 2,
            status: "frozen".into()
        }
    );
    assert_eq!(
        agent.join().expect("agent"),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-status",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-status"
        ]
    );
    std::fs::remove_file(&path).expect("socket");
    let state = std::sync::Arc::clone(&frozen);
    let agent = fake_agent(&path, move |command, id| {
        Some(good_agent(command, id, &state))
    });
    assert_eq!(thaw(&path, QUICK).expect("thawed"), (2, "thawed".into()));
    agent.join().expect("agent");
}

#[test]
fn a_guest_without_an_agent_times_out_and_nothing_is_frozen() {
    let (_dir, path) = socket("silent");
    let agent = fake_agent(&path, |_, _| None);
    let started = Instant::now();
    let failed = freeze(&path, QUICK).expect_err("no agent");
    assert!(failed.error.timed_out(), "{}", failed.error);
    assert!(!failed.maybe_frozen);
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = failed.error.to_string();
    assert!(
        text.contains("did not answer guest-sync-delimited within 300 ms"),
        "{text}"
    );
    drop(failed);
    agent.join().expect("agent");
    // No channel at all: a clear error at once.
    let error = Session::open(&path.with_extension("none"), QUICK.ping)
        .err()
        .expect("no socket");
    assert!(
        error.to_string().contains("no guest agent channel"),
        "{error}"
    );
}

#[test]
fn a_freeze_that_does_not_answer_may_have_frozen() {
    let (_dir, path) = socket("hung");
    let frozen = std::sync::atomic::AtomicBool::new(false);
    let agent = fake_agent(&path, move |command, id| match command {
        "guest-fsfreeze-freeze" => None,
        _ => Some(good_agent(command, id, &frozen)),
    });
    let failed = freeze(&path, QUICK).expect_err("hung");
    assert!(
        failed.maybe_frozen && failed.error.timed_out(),
        "{failed:?}"
    );
    drop(failed);
    agent.join().expect("agent");
}

#[test]
fn file_systems_frozen_by_someone_else_are_refused_and_left_alone() {
    let (_dir, path) = socket("frozen");
    let frozen = std::sync::atomic::AtomicBool::new(true);
    let agent = fake_agent(&path, move |command, id| {
        Some(good_agent(command, id, &frozen))
    });
    let failed = freeze(&path, QUICK).expect_err("frozen already");
    assert!(!failed.maybe_frozen);
    assert!(
        failed.error.to_string().contains("frozen already"),
        "{}",
        failed.error
    );
    drop(failed);
    assert!(!agent
        .join()
        .expect("agent")
        .contains(&"guest-fsfreeze-freeze".to_owned()));
}

/// How a fake agent answers one command.
type Answer = dyn Fn(&str, u64) -> Option<Vec<u8>> + Send;

#[test]
fn hostile_answers_are_errors_not_panics() {
    let sync_then = |rest: &'static [u8]| {
        move |command: &str, id: u64| -> Option<Vec<u8>> {
            if command == "guest-sync-delimited" {
                let mut bytes = vec![DELIMITER];
                bytes.extend(format!("{{\"return\": {id}}}\n").into_bytes());
                Some(bytes)
            } else {
                Some(rest.to_vec())
            }
        }
    };
    let cases: Vec<(&str, Box<Answer>)> = vec![
        ("not JSON", Box::new(sync_then(b"{{{ nonsense\n"))),
        (
            "not the one expected",
            Box::new(sync_then(b"{\"return\": \"lots\"}\n")),
        ),
        (
            "not the one expected",
            Box::new(sync_then(b"{\"something\": 1}\n")),
        ),
        (
            "refused",
            Box::new(sync_then(b"{\"error\": {\"desc\": \"busy\"}}\n")),
        ),
        (
            "not the one expected",
            Box::new(|_: &str, _: u64| {
                let mut bytes = vec![DELIMITER];
                bytes.extend(b"{\"return\": 12345}\n");
                Some(bytes)
            }),
        ),
        (
            "without a line end",
            Box::new(|_: &str, _: u64| {
                let mut bytes = vec![DELIMITER];
                bytes.extend(vec![b'x'; MAX_LINE_BYTES as usize + 10]);
                Some(bytes)
            }),
        ),
        (
            "too much",
            Box::new(|_: &str, _: u64| Some(vec![b'y'; MAX_DISCARDED_BYTES as usize + 10])),
        ),
    ];
    for (index, (expected, answer)) in cases.into_iter().enumerate() {
        let (_dir, path) = socket(&format!("hostile{index}"));
        let agent = fake_agent(&path, answer);
        let failed = freeze(&path, QUICK).expect_err(expected);
        let text = failed.error.to_string();
        assert!(text.contains(expected), "case {index}: {text}");
        drop(failed);
        let _ = agent.join();
    }
}
