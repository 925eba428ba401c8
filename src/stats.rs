//! Counters of what happened to connections, for the summary line at
//! shutdown. Plain relaxed atomics: they are only read once, at the end.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::connection::Outcome;

/// Running totals, shared by the accept loop and every connection thread.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    connections: AtomicU64,
    replies: AtomicU64,
    truncated: AtomicU64,
    timed_out: AtomicU64,
    no_reply: AtomicU64,
    failed: AtomicU64,
    rejected_busy: AtomicU64,
    denied: AtomicU64,
    cut_off: AtomicU64,
}

impl Stats {
    /// Counts a connection that got a thread of its own.
    pub(crate) fn record_connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection turned away because the server was full.
    pub(crate) fn record_busy(&self) {
        self.rejected_busy.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts how a served connection ended.
    pub(crate) fn record(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Replied => &self.replies,
            Outcome::Truncated => &self.truncated,
            Outcome::TimedOut => &self.timed_out,
            Outcome::NoReply => &self.no_reply,
            Outcome::Failed => &self.failed,
            Outcome::Busy => &self.rejected_busy,
            Outcome::Denied => &self.denied,
            Outcome::CutOff => &self.cut_off,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The totals now, with `still_connected` clients not yet done.
    pub(crate) fn summary(&self, still_connected: usize) -> Summary {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Summary {
            connections: get(&self.connections),
            replies: get(&self.replies),
            truncated: get(&self.truncated),
            timed_out: get(&self.timed_out),
            no_reply: get(&self.no_reply),
            failed: get(&self.failed),
            rejected_busy: get(&self.rejected_busy),
            denied: get(&self.denied),
            cut_off: get(&self.cut_off),
            still_connected,
            unwritten_log_lines: 0,
        }
    }
}

/// What a server did over its life, returned by [`run`](crate::run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connections given a thread (not counting those turned away busy by
    /// `--max-connections`).
    pub connections: u64,
    /// Replies logged whole (a line, or what came before the client closed).
    pub replies: u64,
    /// Replies cut at `--max-reply-bytes`.
    pub truncated: u64,
    /// Clients closed at the reply deadline.
    pub timed_out: u64,
    /// Clients that closed without sending anything.
    pub no_reply: u64,
    /// Connections that ended in a socket error.
    pub failed: u64,
    /// Connections turned away with the busy line.
    pub rejected_busy: u64,
    /// Connections refused by the access rules or as untrusted proxies.
    pub denied: u64,
    /// Clients still connected at the shutdown deadline, cut off by the
    /// server and logged with what they had sent.
    pub cut_off: u64,
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
             {} failed, {} rejected busy, {} denied, {} cut off by shutdown, {} still connected",
            self.connections,
            plural(self.connections, "connection", "connections"),
            self.replies,
            plural(self.replies, "reply", "replies"),
            self.truncated,
            self.timed_out,
            self.no_reply,
            self.failed,
            self.rejected_busy,
            self.denied,
            self.cut_off,
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
             0 failed, 0 rejected busy, 0 denied, 0 cut off by shutdown, 0 still connected"
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
