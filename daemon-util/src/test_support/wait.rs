//! Waiting with a deadline: tests wait for conditions, never for fixed durations. Every wait
//! has a timeout and says what it waited for when it gives up; a wait for a value returns
//! the value and, on timeout, shows the last one seen.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// How long a test waits for a daemon to start or answer, unless it says otherwise.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How often a condition is checked, unless a [`Wait`] says otherwise.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A wait: at most `timeout`, looking every `interval`.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    timeout: Duration,
    interval: Duration,
}

impl Wait {
    /// A wait of at most `timeout`, looking every [`POLL_INTERVAL`].
    pub const fn up_to(timeout: Duration) -> Wait {
        Wait {
            timeout,
            interval: POLL_INTERVAL,
        }
    }

    /// Looks every `interval` instead (a costly probe, such as a command per look, or a
    /// fine-grained measurement).
    pub const fn every(self, interval: Duration) -> Wait {
        Wait { interval, ..self }
    }

    /// Calls `step` until it gives a value; `None` once the timeout passed without one.
    pub fn poll<T>(self, mut step: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(value) = step() {
                return Some(value);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep(self.interval.min(deadline - now));
        }
    }

    /// Polls `condition` until it holds; panics naming `what` after the timeout.
    pub fn until(self, what: &str, mut condition: impl FnMut() -> bool) {
        if self.poll(|| condition().then_some(())).is_none() {
            panic!("timed out after {:?} waiting for {what}", self.timeout);
        }
    }

    /// Polls `fetch` until it gives a value that satisfies `check`, and returns that value;
    /// panics naming `what` after the timeout, with the last value fetched.
    pub fn for_value<T: Debug>(
        self,
        what: &str,
        mut fetch: impl FnMut() -> Option<T>,
        check: impl Fn(&T) -> bool,
    ) -> T {
        let mut last = None;
        let found = self.poll(|| match fetch() {
            Some(value) if check(&value) => Some(value),
            other => {
                last = other.or(last.take());
                None
            }
        });
        found.unwrap_or_else(|| {
            let last = last.map_or_else(|| "nothing".to_owned(), |value| format!("{value:#?}"));
            panic!(
                "timed out after {:?} waiting for {what}; last seen: {last}",
                self.timeout
            )
        })
    }

    /// Whether `condition` holds within the timeout, for a test that fails with its own
    /// message or that expects a condition never to hold.
    pub fn holds(self, mut condition: impl FnMut() -> bool) -> bool {
        self.poll(|| condition().then_some(())).is_some()
    }

    /// Calls `sample` every interval until the timeout passes: a watch over a window, whose
    /// `sample` asserts what must hold all along.
    pub fn sample(self, mut sample: impl FnMut()) {
        let _: Option<()> = self.poll(|| {
            sample();
            None
        });
    }
}

/// Polls `condition` every [`POLL_INTERVAL`] until it holds; panics naming `what` after
/// `timeout`.
pub fn poll_until(timeout: Duration, what: &str, condition: impl FnMut() -> bool) {
    Wait::up_to(timeout).until(what, condition);
}

/// Polls `fetch` until it gives a value that satisfies `check`, and returns that value;
/// panics naming `what` after `timeout`, with the last value fetched.
pub fn poll_for<T: Debug>(
    timeout: Duration,
    what: &str,
    fetch: impl FnMut() -> Option<T>,
    check: impl Fn(&T) -> bool,
) -> T {
    Wait::up_to(timeout).for_value(what, fetch, check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_value_returns_the_first_value_that_passes() {
        let mut count = 0;
        let value = poll_for(
            TIMEOUT,
            "a count of 3",
            || {
                count += 1;
                Some(count)
            },
            |count| *count == 3,
        );
        assert_eq!(value, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for nothing; last seen: 7")]
    fn a_timeout_names_the_wait_and_the_last_value() {
        poll_for(Duration::from_millis(30), "nothing", || Some(7), |_| false);
    }

    #[test]
    fn holds_is_false_after_the_timeout() {
        let started = Instant::now();
        assert!(!Wait::up_to(Duration::from_millis(30)).holds(|| false));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(Wait::up_to(Duration::ZERO).holds(|| true));
    }

    #[test]
    fn sample_runs_for_the_whole_window() {
        let started = Instant::now();
        let mut samples = 0;
        Wait::up_to(Duration::from_millis(50))
            .every(Duration::from_millis(10))
            .sample(|| samples += 1);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(samples >= 3, "{samples} samples");
    }
}
