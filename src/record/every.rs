//! Lines logged at most once per interval about one kind of thing (busy,
//! denied, rate limited, accept failures, replies not recorded), so that a
//! flood is not a flood of log lines; each says how many were held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::info;

use super::format::event;
use crate::lock;

/// At most one line per interval about one kind of thing; what is still
/// held back when the server stops is logged by [`report_held_back`].
#[derive(Debug)]
pub(crate) struct LogEvery {
    pub(crate) event: &'static str,
    interval: Duration,
    /// When a line last went out, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogEvery {
    pub(crate) const fn new(event: &'static str, interval: Duration) -> Self {
        LogEvery {
            event,
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last line)` if a line may go out now;
    /// `None` (and one more held back) otherwise.
    pub(crate) fn due(&self) -> Option<u64> {
        let mut state = lock(&self.state);
        let (last, held_back) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < self.interval) {
            *held_back += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(held_back))
    }

    fn take_held_back(&self) -> u64 {
        std::mem::take(&mut lock(&self.state).1)
    }
}

/// Logs a `$level` line through `$every` ([`LogEvery`]) if one is due:
/// its `event`, the fields in brackets (each followed by a comma), the
/// count held back since the last line, and the message with a note of
/// that count.
macro_rules! log_every {
    ($every:expr, $level:ident, [$($kv:tt)*], $($arg:tt)+) => {
        if let Some(held_back) = $every.due() {
            log::$level!(
                event = $every.event, $($kv)* held_back = held_back;
                "{}{}", format_args!($($arg)+), $crate::logging::held_back_note(held_back)
            );
        }
    };
}
pub(crate) use log_every;

pub(crate) static BUSY_LINES: LogEvery = LogEvery::new(event::BUSY, Duration::from_secs(1));
pub(crate) static RATE_LIMITED_LINES: LogEvery =
    LogEvery::new(event::RATE_LIMITED, Duration::from_secs(1));
pub(crate) static DENIED_LINES: LogEvery = LogEvery::new(event::DENIED, Duration::from_secs(1));
pub(crate) static NOT_RECORDED_LINES: LogEvery =
    LogEvery::new(event::NOT_RECORDED, Duration::from_secs(1));
/// Shared by every accept loop: out of descriptors, all of them fail at once.
pub(crate) static ACCEPT_ERROR_LINES: LogEvery =
    LogEvery::new(event::ACCEPT_ERROR, Duration::from_secs(5));

/// Logs, for each kind of rate-limited line, how many were held back since
/// its last line: a stopping server says them before its summary.
pub(crate) fn report_held_back() {
    for every in [
        &BUSY_LINES,
        &RATE_LIMITED_LINES,
        &DENIED_LINES,
        &NOT_RECORDED_LINES,
        &ACCEPT_ERROR_LINES,
    ] {
        let held_back = every.take_held_back();
        if held_back > 0 {
            info!(
                event = every.event, held_back = held_back;
                "{held_back} more {} lines were held back since the last one",
                every.event
            );
        }
    }
}

/// " (N more since the last report)", or nothing when none were held back.
pub(crate) fn held_back_note(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(" ({held_back} more since the last report)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_every_lets_one_line_through_per_interval_and_counts_the_rest() {
        let every = LogEvery::new("x", Duration::from_secs(3600));
        assert_eq!(every.due(), Some(0));
        assert_eq!(every.due(), None);
        assert_eq!(every.due(), None);
        assert_eq!(every.take_held_back(), 2);
        assert_eq!(every.take_held_back(), 0);
        let now = LogEvery::new("x", Duration::ZERO);
        assert_eq!(now.due(), Some(0));
        assert_eq!(now.due(), Some(0));
        assert_eq!(held_back_note(0), "");
        assert_eq!(held_back_note(2), " (2 more since the last report)");
    }
}
