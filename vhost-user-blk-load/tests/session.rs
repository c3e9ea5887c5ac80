//! Control-plane deadlines against fake backends that misbehave.

use std::os::unix::net::UnixListener;
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_blk_load::device::DeviceError;
use vhost_user_blk_load::{BlkDevice, DeviceOptions, Session, SessionError};

fn options(timeout_ms: u64) -> DeviceOptions {
    DeviceOptions {
        timeout_ms,
        ..DeviceOptions::default()
    }
}

#[test]
fn a_backend_that_never_answers_times_out() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("silent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let holder = thread::spawn(move || {
        // Accept, then keep the connection open without answering until the client hangs up.
        let (stream, _) = listener.accept().expect("accept");
        let mut byte = [0; 1];
        let _ = std::io::Read::read(&mut &stream, &mut byte);
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &stream, &mut rest);
    });
    let started = Instant::now();
    let error = BlkDevice::open(&path, &options(300)).expect_err("no answer");
    assert!(
        matches!(
            error,
            DeviceError::Session(SessionError::Timeout {
                request: "GET_FEATURES",
                ..
            })
        ),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    holder.join().expect("holder thread");
}

#[test]
fn a_backend_that_hangs_up_is_an_error() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("rude.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let closer = thread::spawn(move || drop(listener.accept().expect("accept")));
    let mut session = Session::connect(&path, Duration::from_secs(5)).expect("connect");
    closer.join().expect("closer thread");
    let started = Instant::now();
    assert!(session
        .set_owner()
        .and_then(|()| session.get_features())
        .is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}
