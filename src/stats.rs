//! Counters of what happened to connections: for the summary line at
//! shutdown, and for the metrics endpoint while the server runs. Plain
//! relaxed atomics and lock-free histograms: each is a count on its own,
//! and a scrape or the summary may see one a moment behind another.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::{
    AcceptErrorCounts, AcceptErrorKind, Histogram, REPLY_SIZE_BUCKETS, SESSION_DURATION_BUCKETS,
};
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

/// Running totals, shared by the accept loops and every connection thread.
#[derive(Debug)]
pub(crate) struct Stats {
    /// Connections `accept` returned (the stop's own wake-up aside).
    accepted: AtomicU64,
    /// Connections given a thread.
    connections: AtomicU64,
    /// How connections ended, indexed by [`Outcome`].
    outcomes: [AtomicU64; Outcome::ALL.len()],
    reply_bytes: AtomicU64,
    /// `accept` failures, indexed by [`AcceptErrorKind`].
    accept_errors: [AtomicU64; 4],
    /// Accept to log line, per served connection.
    pub(crate) session_duration: Histogram,
    /// Bytes of each logged reply.
    pub(crate) reply_size: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            accepted: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            outcomes: Default::default(),
            reply_bytes: AtomicU64::new(0),
            accept_errors: Default::default(),
            session_duration: Histogram::new(SESSION_DURATION_BUCKETS),
            reply_size: Histogram::new(REPLY_SIZE_BUCKETS),
        }
    }
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    /// Counts a connection `accept` returned.
    pub(crate) fn record_accepted(&self) {
        add(&self.accepted, 1);
    }

    /// Counts a connection that got a thread of its own.
    pub(crate) fn record_connection(&self) {
        add(&self.connections, 1);
    }

    /// Counts how a connection ended (served, or turned away).
    pub(crate) fn record(&self, outcome: Outcome) {
        add(&self.outcomes[outcome as usize], 1);
    }

    fn count(&self, outcome: Outcome) -> u64 {
        get(&self.outcomes[outcome as usize])
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
            add(&self.reply_bytes, bytes as u64);
            self.reply_size.observe(bytes as f64);
        }
        self.session_duration.observe(duration.as_secs_f64());
    }

    /// Counts a failed `accept`.
    pub(crate) fn record_accept_error(&self, kind: AcceptErrorKind) {
        add(&self.accept_errors[kind as usize], 1);
    }

    pub(crate) fn accepted(&self) -> u64 {
        get(&self.accepted)
    }

    pub(crate) fn reply_bytes(&self) -> u64 {
        get(&self.reply_bytes)
    }

    /// How connections ended so far, by metrics label.
    pub(crate) fn outcomes(&self) -> [(&'static str, u64); Outcome::ALL.len()] {
        Outcome::ALL.map(|outcome| (outcome.label(), self.count(outcome)))
    }

    /// `accept` failures so far, by kind.
    pub(crate) fn accept_errors(&self) -> AcceptErrorCounts {
        let kind = |kind: AcceptErrorKind| get(&self.accept_errors[kind as usize]);
        AcceptErrorCounts {
            connection: kind(AcceptErrorKind::Connection),
            descriptors: kind(AcceptErrorKind::Descriptors),
            memory: kind(AcceptErrorKind::Memory),
            other: kind(AcceptErrorKind::Other),
        }
    }

    /// The totals now, with `still_connected` clients not yet done.
    pub(crate) fn summary(&self, still_connected: usize) -> Summary {
        Summary {
            connections: get(&self.connections),
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

/// What a server did over its life, returned by [`run`](crate::run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connections given a thread (not counting those the accept loop
    /// turned away: busy at `--max-connections`, or a direct client over
    /// `--max-rate-per-ip`).
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
}
