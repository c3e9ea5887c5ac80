//! Network helpers for guest NIC tests: talking to a guest from a test host's namespace.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Opens a TCP connection from inside network namespace `namespace`, retrying for up to
/// `patience`: a thread joins the namespace and connects; the socket stays in that
/// namespace for its whole life. `None` if it never connected.
pub fn try_connect_in(namespace: &str, address: &str, patience: Duration) -> Option<TcpStream> {
    let path = format!("/run/netns/{namespace}");
    let address = address.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).ok()?;
        // SAFETY: setns on a namespace file we hold open; it affects only this thread,
        // which ends right after connecting.
        let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if joined != 0 {
            return None;
        }
        let deadline = Instant::now() + patience;
        loop {
            let target = address.parse().ok()?;
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(stream) => return Some(stream),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(_) => return None,
            }
        }
    })
    .join()
    .ok()
    .flatten()
}

/// Like [`try_connect_in`] with 30 s of patience; panics if it never connects.
pub fn connect_in(namespace: &str, address: &str) -> TcpStream {
    try_connect_in(namespace, address, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("cannot connect to {address} from {namespace}"))
}

/// Sends `rounds` lines on `stream` and checks each comes back (an echo server); returns
/// the round-trip times.
pub fn echo_rounds(stream: TcpStream, rounds: u32) -> Vec<Duration> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut latencies = Vec::new();
    for round in 0..rounds {
        let filler = "x".repeat(if round % 10 == 0 { 6000 } else { 40 });
        let request = format!("request {round} {filler}\n");
        let started = Instant::now();
        writer.write_all(request.as_bytes()).expect("send request");
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("read reply");
        latencies.push(started.elapsed());
        assert_eq!(reply, request, "round {round}: the echo differs");
    }
    latencies
}
