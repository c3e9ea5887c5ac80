//! Polling with a timeout: tests wait for conditions, never for fixed durations.

use std::time::{Duration, Instant};

/// Interval between two checks of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub fn poll_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `fetch` until it gives a value that satisfies `check`, and returns that value;
/// panics naming `what` after `timeout`, with the last value fetched.
pub fn poll_for<T: std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    mut fetch: impl FnMut() -> Option<T>,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(value) = fetch() {
            if check(&value) {
                return value;
            }
            last = Some(value);
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last:#?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
