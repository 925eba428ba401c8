//! Counters of what happened to connections: for the summary line at
//! shutdown, and for the metrics endpoint while the server runs. They are
//! `prometheus-client`'s counters and histograms, so the summary and a
//! scrape read the very same numbers; each is a count on its own, and a
//! scrape or the summary may see one a moment behind another.
//!
//! Adding a counter: a field, its line in `Default` and in
//! [`Stats::register`], and a `record_*` method; a labelled one is a
//! `Family` of a label struct such as [`KindLabel`].

use std::fmt;
use std::io;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::record::{Record, ReplyEnd};
/// How a connection ended: one count each in the summary, and the
/// metrics' `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A reply was logged whole.
    Replied,
    /// A reply was logged cut at the cap.
    Truncated,
    /// The reply deadline passed.
    TimedOut,
    /// The client closed without sending anything.
    NoReply,
    /// Writing the prompt, reading, or the PROXY header failed.
    Failed,
    /// Refused by the access rules, or not a trusted proxy.
    Denied,
    /// Turned away with the busy line (`--max-connections`, `--max-per-ip`).
    Busy,
    /// Turned away with the busy line: its network connected faster than
    /// `--max-rate-per-ip`.
    RateLimited,
    /// Still connected at the shutdown deadline: cut off, and logged with
    /// what it had sent.
    CutOff,
    /// The reply sink did not take its record: the client was reset.
    NotRecorded,
}

impl Outcome {
    /// Every outcome, in the order of the metrics.
    pub(crate) const ALL: [Outcome; 10] = [
        Outcome::Replied,
        Outcome::Truncated,
        Outcome::TimedOut,
        Outcome::NoReply,
        Outcome::Failed,
        Outcome::Denied,
        Outcome::Busy,
        Outcome::RateLimited,
        Outcome::CutOff,
        Outcome::NotRecorded,
    ];

    /// How a recorded connection ended.
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

    /// Its value of the metrics' `outcome` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Replied => "replied",
            Outcome::Truncated => "truncated",
            Outcome::TimedOut => "timed_out",
            Outcome::NoReply => "no_reply",
            Outcome::Failed => "failed",
            Outcome::Denied => "denied",
            Outcome::Busy => "busy",
            Outcome::RateLimited => "rate_limited",
            Outcome::CutOff => "shutdown",
            Outcome::NotRecorded => "not_recorded",
        }
    }
}

/// Bucket bounds for `prompt_server_session_duration_seconds`: 1 ms to the
/// default reply deadline (60 s) and beyond.
const SESSION_DURATION_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Bucket bounds for `prompt_server_reply_size_bytes`: powers of four around
/// the default 1024-byte reply cap.
const REPLY_SIZE_BUCKETS: [f64; 9] = [
    16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
];

/// The `outcome` label of `prompt_server_connections_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// A `kind` label, as of `prompt_server_accept_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub(crate) kind: &'static str,
}

/// Running totals, shared by the accept loops and every connection thread.
#[derive(Debug)]
pub(crate) struct Stats {
    /// Connections `accept` returned (the stop's own wake-up aside).
    accepted: Counter,
    /// How connections ended, every [`Outcome`] present from the start.
    outcomes: Family<OutcomeLabel, Counter>,
    reply_bytes: Counter,
    /// `accept` failures, every [`AcceptErrorKind`] present from the start.
    accept_errors: Family<KindLabel, Counter>,
    /// Accept to log line, per served connection.
    session_duration: Histogram,
    /// Bytes of each logged reply.
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
        // Every label value is exposed at 0 until it happens, so that
        // `rate()` and alerts see a series from the start.
        for outcome in Outcome::ALL {
            stats.outcome(outcome);
        }
        for kind in AcceptErrorKind::ALL {
            stats.accept_error(kind);
        }
        stats
    }
}

impl Stats {
    /// Registers every counter and histogram that is a metric, under the
    /// names the registry gets its prefix (`prompt_server`) and `_total`
    /// added to.
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "connections_accepted",
            "Connections accepted",
            self.accepted.clone(),
        );
        let help = "Connections ended, by outcome";
        r.register("connections", help, self.outcomes.clone());
        r.register(
            "reply_bytes",
            "Reply bytes logged",
            self.reply_bytes.clone(),
        );
        let help = "Failed accept calls, by kind";
        r.register("accept_errors", help, self.accept_errors.clone());
        let help = "Time from accept to the log line, per connection";
        r.register(
            "session_duration_seconds",
            help,
            self.session_duration.clone(),
        );
        let help = "Size of each logged reply";
        r.register("reply_size_bytes", help, self.reply_size.clone());
    }

    fn outcome(&self, outcome: Outcome) -> Counter {
        let outcome = outcome.label();
        self.outcomes.get_or_create_owned(&OutcomeLabel { outcome })
    }

    fn accept_error(&self, kind: AcceptErrorKind) -> Counter {
        let kind = kind.label();
        self.accept_errors.get_or_create_owned(&KindLabel { kind })
    }

    /// Counts a connection `accept` returned.
    pub(crate) fn record_accepted(&self) {
        self.accepted.inc();
    }

    /// Counts how a connection ended (served, or turned away).
    pub(crate) fn record(&self, outcome: Outcome) {
        self.outcome(outcome).inc();
    }

    fn count(&self, outcome: Outcome) -> u64 {
        self.outcome(outcome).get()
    }

    /// Counts a served connection: how it ended, the size of its logged
    /// reply (if it got as far as a reply), and its time from accept on.
    pub(crate) fn record_session(
        &self,
        outcome: Outcome,
        reply_bytes: Option<usize>,
        duration: Duration,
    ) {
        self.record(outcome);
        if let Some(bytes) = reply_bytes {
            self.reply_bytes.inc_by(bytes as u64);
            self.reply_size.observe(bytes as f64);
        }
        self.session_duration.observe(duration.as_secs_f64());
    }

    /// Counts a failed `accept`.
    pub(crate) fn record_accept_error(&self, kind: AcceptErrorKind) {
        self.accept_error(kind).inc();
    }

    /// The totals now, with `still_connected` clients not yet done.
    pub(crate) fn summary(&self, still_connected: usize) -> Summary {
        Summary {
            connections: self.accepted.get(),
            replies: self.count(Outcome::Replied),
            truncated: self.count(Outcome::Truncated),
            timed_out: self.count(Outcome::TimedOut),
            no_reply: self.count(Outcome::NoReply),
            failed: self.count(Outcome::Failed),
            rejected_busy: self.count(Outcome::Busy),
            rate_limited: self.count(Outcome::RateLimited),
            denied: self.count(Outcome::Denied),
            cut_off: self.count(Outcome::CutOff),
            not_recorded: self.count(Outcome::NotRecorded),
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
    /// Out of file descriptors (EMFILE, ENFILE).
    Descriptors,
    /// Out of kernel memory (ENOBUFS, ENOMEM).
    Memory,
    Other,
}

impl AcceptErrorKind {
    const ALL: [AcceptErrorKind; 4] = [
        AcceptErrorKind::Connection,
        AcceptErrorKind::Descriptors,
        AcceptErrorKind::Memory,
        AcceptErrorKind::Other,
    ];

    /// The kind of an error `accept` returned (accept(2)'s list).
    pub(crate) fn of(error: &io::Error) -> Self {
        match error.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => AcceptErrorKind::Descriptors,
            Some(libc::ENOBUFS | libc::ENOMEM) => AcceptErrorKind::Memory,
            Some(
                libc::ECONNABORTED
                | libc::EINTR
                | libc::EPERM
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH,
            ) => AcceptErrorKind::Connection,
            _ => AcceptErrorKind::Other,
        }
    }

    /// Its value of the `kind` label.
    fn label(self) -> &'static str {
        match self {
            AcceptErrorKind::Connection => "connection",
            AcceptErrorKind::Descriptors => "descriptors",
            AcceptErrorKind::Memory => "memory",
            AcceptErrorKind::Other => "other",
        }
    }
}

/// What a server did over its life, returned by [`run`](crate::run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connections accepted, whatever became of them (the stop's own
    /// wake-up connections aside): each counts in one of the fields below
    /// or is still connected.
    pub connections: u64,
    /// Replies logged whole (a line, or what came before the client closed).
    pub replies: u64,
    /// Replies cut at `--max-reply-bytes`.
    pub truncated: u64,
    /// Clients closed at the reply deadline.
    pub timed_out: u64,
    /// Clients that closed without sending anything.
    pub no_reply: u64,
    /// Connections that ended in a socket error, a bad PROXY header, or a
    /// thread that could not be started.
    pub failed: u64,
    /// Connections turned away with the busy line by a cap
    /// (`--max-connections`, `--max-per-ip`).
    pub rejected_busy: u64,
    /// Connections turned away with the busy line because their network
    /// connected faster than `--max-rate-per-ip`.
    pub rate_limited: u64,
    /// Connections refused by the access rules or as untrusted proxies.
    pub denied: u64,
    /// Clients still connected at the shutdown deadline, cut off by the
    /// server and logged with what they had sent.
    pub cut_off: u64,
    /// Replies the reply sink did not take (a failing or stalled log):
    /// their clients were reset.
    pub not_recorded: u64,
    /// Connections whose thread had not finished when the server stopped
    /// waiting for it (only when the log is stalled; they are reset).
    pub still_connected: usize,
    /// Log lines the log had not taken when the server stopped waiting for
    /// it (5 s after
    /// the shutdown timeout).
    pub unwritten_log_lines: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural =
            |n: u64, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        write!(
            f,
            "{} {}, {} {}, {} truncated, {} timed out, {} without reply, \
             {} failed, {} rejected busy, {} rate limited, {} denied, {} cut off by shutdown, \
             {} not recorded, {} still connected",
            self.connections,
            plural(self.connections, "connection", "connections"),
            self.replies,
            plural(self.replies, "reply", "replies"),
            self.truncated,
            self.timed_out,
            self.no_reply,
            self.failed,
            self.rejected_busy,
            self.rate_limited,
            self.denied,
            self.cut_off,
            self.not_recorded,
            self.still_connected
        )
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
