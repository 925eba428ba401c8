//! Counters of what happened to connections, for the summary and the
//! metrics endpoint: `prometheus-client`'s counters and histograms, so both
//! read the very same numbers (each on its own: a reader may see one a
//! moment behind another).

use std::fmt;
use std::io;
use std::time::Duration;

use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};
use prometheus_client::registry::Registry;

use crate::record::{Record, ReplyEnd};

/// How a connection ended: a count in the [`Summary`] (`Busy` is
/// `rejected_busy`) and the metrics' `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Replied,
    Truncated,
    TimedOut,
    NoReply,
    Failed,
    Denied,
    Busy,
    RateLimited,
    CutOff,
    NotRecorded,
    TlsHandshakeFailed,
}

impl Outcome {
    /// The `outcome` label of each variant, in their order.
    const LABELS: [&'static str; 11] = [
        "replied",
        "truncated",
        "timed_out",
        "no_reply",
        "failed",
        "denied",
        "busy",
        "rate_limited",
        "shutdown",
        "not_recorded",
        "tls_handshake_failed",
    ];

    pub(crate) fn of(record: &Record<'_>) -> Outcome {
        match record.end {
            ReplyEnd::Closed if record.reply.is_empty() => Outcome::NoReply,
            ReplyEnd::Line | ReplyEnd::Closed => Outcome::Replied,
            ReplyEnd::Truncated => Outcome::Truncated,
            ReplyEnd::TimedOut { .. } => Outcome::TimedOut,
            ReplyEnd::CutOff => Outcome::CutOff,
            ReplyEnd::Failed(_) => Outcome::Failed,
        }
    }
}

/// Session durations: 1 ms to the default reply deadline (60 s) and beyond.
const SESSION_DURATION_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Reply sizes: powers of four around the default 1024-byte cap.
const REPLY_SIZE_BUCKETS: [f64; 9] = [
    16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
];

/// One label of a metric family, as `[("outcome", "replied")]`.
pub(crate) type Label = [(&'static str, &'static str); 1];

/// Running totals, shared by the accept loops and every connection thread.
#[derive(Debug)]
pub(crate) struct Stats {
    /// Connections `accept` returned (the stop's own wake-up aside).
    accepted: Counter,
    /// By [`Outcome`], every label present from the start.
    outcomes: Family<Label, Counter>,
    reply_bytes: Counter,
    /// By [`AcceptErrorKind`], every label present from the start.
    accept_errors: Family<Label, Counter>,
    /// Accept to log line, per served connection.
    session_duration: Histogram,
    reply_size: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        let stats = Stats {
            accepted: Counter::default(),
            outcomes: Family::default(),
            reply_bytes: Counter::default(),
            accept_errors: Family::default(),
            session_duration: Histogram::new(SESSION_DURATION_BUCKETS),
            reply_size: Histogram::new(REPLY_SIZE_BUCKETS),
        };
        // Every label at 0 from the start, so that `rate()` sees a series.
        for outcome in Outcome::LABELS {
            stats.outcomes.get_or_create_owned(&[("outcome", outcome)]);
        }
        for kind in AcceptErrorKind::LABELS {
            stats.accept_errors.get_or_create_owned(&[("kind", kind)]);
        }
        stats
    }
}

impl Stats {
    /// Registers every metric here under `r` (which adds the prefix).
    pub(crate) fn register(&self, r: &mut Registry) {
        let help = "Connections accepted";
        r.register("connections_accepted", help, self.accepted.clone());
        let help = "Connections ended, by outcome";
        r.register("connections", help, self.outcomes.clone());
        let help = "Reply bytes logged";
        r.register("reply_bytes", help, self.reply_bytes.clone());
        let help = "Failed accept calls, by kind";
        r.register("accept_errors", help, self.accept_errors.clone());
        let help = "Time from accept to the log line, per connection";
        let duration = self.session_duration.clone();
        r.register("session_duration_seconds", help, duration);
        let help = "Size of each logged reply";
        r.register("reply_size_bytes", help, self.reply_size.clone());
    }

    fn outcome(&self, outcome: Outcome) -> Counter {
        let label = Outcome::LABELS[outcome as usize];
        self.outcomes.get_or_create_owned(&[("outcome", label)])
    }

    pub(crate) fn record_accepted(&self) {
        self.accepted.inc();
    }

    /// Counts how a connection ended (served, or turned away).
    pub(crate) fn record(&self, outcome: Outcome) {
        self.outcome(outcome).inc();
    }

    /// Counts a served connection: how it ended, its reply's size (if it
    /// has one), and its time from accept on.
    pub(crate) fn record_session(&self, outcome: Outcome, reply: Option<usize>, took: Duration) {
        self.record(outcome);
        if let Some(bytes) = reply {
            self.reply_bytes.inc_by(bytes as u64);
            self.reply_size.observe(bytes as f64);
        }
        self.session_duration.observe(took.as_secs_f64());
    }

    pub(crate) fn record_accept_error(&self, kind: AcceptErrorKind) {
        let label = AcceptErrorKind::LABELS[kind as usize];
        self.accept_errors.get_or_create(&[("kind", label)]).inc();
    }

    /// The totals now, with `still_connected` clients not yet done.
    pub(crate) fn summary(&self, still_connected: usize) -> Summary {
        let count = |outcome| self.outcome(outcome).get();
        Summary {
            connections: self.accepted.get(),
            replies: count(Outcome::Replied),
            truncated: count(Outcome::Truncated),
            timed_out: count(Outcome::TimedOut),
            no_reply: count(Outcome::NoReply),
            failed: count(Outcome::Failed),
            rejected_busy: count(Outcome::Busy),
            rate_limited: count(Outcome::RateLimited),
            denied: count(Outcome::Denied),
            cut_off: count(Outcome::CutOff),
            not_recorded: count(Outcome::NotRecorded),
            tls_handshake_failed: count(Outcome::TlsHandshakeFailed),
            still_connected,
            unwritten_log_lines: 0,
        }
    }
}

/// What an `accept` failure was about, the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptErrorKind {
    /// About the one connection being accepted; skipped.
    Connection,
    /// Out of file descriptors.
    Descriptors,
    /// Out of kernel memory.
    Memory,
    Other,
}

impl AcceptErrorKind {
    const LABELS: [&'static str; 4] = ["connection", "descriptors", "memory", "other"];

    /// The kind of an error `accept` returned (accept(2)'s list).
    pub(crate) fn of(error: &io::Error) -> Self {
        use libc::{ECONNABORTED, EHOSTDOWN, EHOSTUNREACH, EINTR, EMFILE, ENETDOWN, ENETUNREACH};
        use libc::{ENFILE, ENOBUFS, ENOMEM, ENONET, ENOPROTOOPT, EOPNOTSUPP, EPERM, EPROTO};
        match error.raw_os_error().unwrap_or(0) {
            EMFILE | ENFILE => AcceptErrorKind::Descriptors,
            ENOBUFS | ENOMEM => AcceptErrorKind::Memory,
            // Aborted, interrupted, or refused by a firewall rule.
            ECONNABORTED | EINTR | EPERM => AcceptErrorKind::Connection,
            // Network errors pending on the new socket, to retry as accept(2) says.
            EPROTO | ENETDOWN | ENOPROTOOPT | EHOSTDOWN | ENONET => AcceptErrorKind::Connection,
            EHOSTUNREACH | EOPNOTSUPP | ENETUNREACH => AcceptErrorKind::Connection,
            _ => AcceptErrorKind::Other,
        }
    }
}

/// What a server did over its life, returned by [`run`](crate::run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connections accepted (the stop's own wake-ups aside), whatever became of
    /// them: each counts in one of the fields below or is still connected.
    pub connections: u64,
    /// Replies logged whole (a line, or what came before the client closed).
    pub replies: u64,
    /// Replies cut at `--max-reply-bytes`.
    pub truncated: u64,
    /// Clients closed at the reply deadline.
    pub timed_out: u64,
    /// Clients that closed without sending anything.
    pub no_reply: u64,
    /// Connections ended by a socket error, a bad PROXY header, or a thread that could not start.
    pub failed: u64,
    /// Turned away with the busy line by `--max-connections` or `--max-per-ip`.
    pub rejected_busy: u64,
    /// Turned away with the busy line: their network broke `--max-rate-per-ip`.
    pub rate_limited: u64,
    /// Connections refused by the access rules or as untrusted proxies.
    pub denied: u64,
    /// Clients cut off at the shutdown deadline, logged with what they had sent.
    pub cut_off: u64,
    /// Replies the reply sink did not take (a failing or stalled log): reset.
    pub not_recorded: u64,
    /// TLS handshakes that failed or did not finish in time: reset.
    pub tls_handshake_failed: u64,
    /// Connections whose thread was still busy when the server stopped waiting
    /// for it (only with a stalled log; they are reset).
    pub still_connected: usize,
    /// Log lines the log had not taken when the server stopped waiting for
    /// it (5 s after the shutdown timeout).
    pub unwritten_log_lines: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (connections, replies) = (self.connections, self.replies);
        let s = if connections == 1 { "" } else { "s" };
        let replies_word = if replies == 1 { "reply" } else { "replies" };
        write!(f, "{connections} connection{s}, {replies} {replies_word}")?;
        [
            (self.truncated, "truncated"),
            (self.timed_out, "timed out"),
            (self.no_reply, "without reply"),
            (self.failed, "failed"),
            (self.rejected_busy, "rejected busy"),
            (self.rate_limited, "rate limited"),
            (self.denied, "denied"),
            (self.cut_off, "cut off by shutdown"),
            (self.not_recorded, "not recorded"),
            (self.tls_handshake_failed, "failed TLS handshakes"),
            (self.still_connected as u64, "still connected"),
        ]
        .iter()
        // Only a TLS server fails handshakes: shown once there are any.
        .filter(|(count, what)| *count > 0 || !what.contains("TLS"))
        .try_for_each(|(count, what)| write!(f, ", {count} {what}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_in_the_singular_for_one() {
        let mut summary = Stats::default().summary(0);
        summary.connections = 1;
        summary.replies = 1;
        assert_eq!(
            summary.to_string(),
            "1 connection, 1 reply, 0 truncated, 0 timed out, 0 without reply, \
             0 failed, 0 rejected busy, 0 rate limited, 0 denied, 0 cut off by shutdown, \
             0 not recorded, 0 still connected"
        );
        summary.connections = 2;
        summary.replies = 0;
        assert!(
            summary
                .to_string()
                .starts_with("2 connections, 0 replies, ")
        );
    }

    #[test]
    fn accept_errors_are_classified() {
        let kind = |errno| AcceptErrorKind::of(&io::Error::from_raw_os_error(errno));
        assert_eq!(kind(libc::EMFILE), AcceptErrorKind::Descriptors);
        assert_eq!(kind(libc::ENFILE), AcceptErrorKind::Descriptors);
        assert_eq!(kind(libc::ENOBUFS), AcceptErrorKind::Memory);
        assert_eq!(kind(libc::ECONNABORTED), AcceptErrorKind::Connection);
        assert_eq!(kind(libc::EINVAL), AcceptErrorKind::Other);
    }
}
