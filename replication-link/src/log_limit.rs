//! Rate-limited warnings for lines caused by network input (see docs/logging.md: at most
//! 10 lines a second per limiter, with a count of suppressed lines).

use std::error::Error;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

const LINES_PER_SECOND: u32 = 10;

/// Allows a burst of lines per second and counts the rest.
pub(crate) struct LogLimiter {
    target: &'static str,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    window_start: Instant,
    lines: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// `target`: the log target of the lines (the module that reports).
    pub(crate) fn new(target: &'static str) -> LogLimiter {
        LogLimiter {
            target,
            state: Mutex::new(LimiterState {
                window_start: Instant::now(),
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    pub(crate) fn warn(&self, arguments: fmt::Arguments<'_>) {
        let mut state = lock(&self.state);
        if state.window_start.elapsed() >= Duration::from_secs(1) {
            if state.suppressed > 0 {
                log::warn!(target: self.target, "{} similar lines suppressed", state.suppressed);
            }
            state.window_start = Instant::now();
            state.lines = 0;
            state.suppressed = 0;
        }
        if state.lines < LINES_PER_SECOND {
            state.lines += 1;
            drop(state);
            log::warn!(target: self.target, "{arguments}");
        } else {
            state.suppressed += 1;
        }
    }
}

/// Locks a mutex, carrying on after a panic elsewhere (the state stays consistent: every
/// critical section of this crate leaves it valid before anything can panic).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `error: source: source ...` on one line, for logs, `last_error` and the daemons' last
/// words.
pub fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
