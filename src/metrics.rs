//! `--metrics-addr`: the server's numbers in the Prometheus text exposition
//! format (version 0.0.4), served over HTTP from one std thread.
//!
//! Three parts:
//! - [`Histogram`]: fixed buckets of atomic counters, observed from any
//!   thread without a lock.
//! - [`MetricsText`]: the encoder. It groups samples by metric family, so
//!   each family gets one `# HELP` and one `# TYPE` line before all its
//!   samples however the calls were ordered, escapes HELP text and label
//!   values, and writes numbers the way Prometheus parses them (`+Inf`,
//!   integers without a decimal point). [`MetricsSnapshot::render`] uses it
//!   for the metrics below, so the server only fills in numbers.
//! - [`serve_metrics`]: the HTTP endpoint. `GET /metrics` (or `HEAD`, any
//!   query string ignored, as Prometheus's `params` adds one) gets the text;
//!   another path 404, another method 405, anything unparseable 400. Every
//!   response closes the connection. Every waiting scraper's request is
//!   read as its bytes come, so a silent one holds up nobody; each has
//!   [`SCRAPE_DEADLINE`] for the whole exchange and [`MAX_REQUEST_BYTES`]
//!   for its request, and serving clients never wait on any of them.
//!
//! The encoder is hand-written because the format is a few lines of text
//! per metric and the server's numbers already live in its own atomics: the
//! `prometheus-client` crate would add a registry and a second copy of each
//! counter for no gain (it needs no async runtime, but brings its own types
//! to keep in step with ours).
//!
//! # Metrics
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `prompt_server_connections_accepted_total` | counter | connections `accept` returned |
//! | `prompt_server_connections_total{outcome}` | counter | how connections ended: `replied`, `truncated`, `timed_out`, `no_reply`, `failed`, `denied`, `busy`, `rate_limited`, `shutdown` |
//! | `prompt_server_reply_bytes_total` | counter | reply bytes logged |
//! | `prompt_server_accept_errors_total{kind}` | counter | `accept` failures: `connection` (about one connection, skipped), `descriptors` (EMFILE, ENFILE), `memory` (ENOBUFS, ENOMEM), `other` |
//! | `prompt_server_log_lines_dropped_total` | counter | housekeeping log lines the full log queue dropped |
//! | `prompt_server_log_write_errors_total{kind}` | counter | failed writes and syncs of the log, by errno: `ENOSPC`, `EDQUOT`, `EFBIG`, `EIO`, `EPIPE`, `other` |
//! | `prompt_server_connections_open` | gauge | connections open now |
//! | `prompt_server_threads{state}` | gauge | connection threads alive: `serving` a client, or `parked` in the thread cache |
//! | `prompt_server_max_connections` | gauge | the effective connection cap (after any lowering at start-up) |
//! | `prompt_server_rate_limit_networks` | gauge | client networks the rate limit holds a bucket for; refilled ones are dropped at the next sweep (absent without `--max-rate-per-ip`) |
//! | `process_open_fds` | gauge | entries of `/proc/self/fd` (absent where it cannot be read) |
//! | `process_start_time_seconds` | gauge | when the process started, in seconds since the Unix epoch |
//! | `prompt_server_session_duration_seconds` | histogram | accept to log line, per connection |
//! | `prompt_server_reply_size_bytes` | histogram | size of each logged reply |

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::logging::event;

/// The whole time one scraper may take: reading its request and taking the
/// response. A silent scraper is dropped after this.
pub(crate) const SCRAPE_DEADLINE: Duration = Duration::from_secs(2);
/// The largest request read; a bigger one gets a 431 and is closed.
pub(crate) const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How often the idle metrics thread checks whether the server is stopping.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the metrics thread looks at scrapers while some are waiting.
const PENDING_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// The most scrapes whose requests are read at once.
pub(crate) const MAX_PENDING_SCRAPES: usize = 16;
/// The metrics thread reads a request and formats a few kilobytes of text.
const METRICS_THREAD_STACK: usize = 256 * 1024;
/// The media type of the text format, version 0.0.4.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds for `prompt_server_session_duration_seconds`: 1 ms to the
/// default reply deadline (60 s) and beyond.
pub(crate) const SESSION_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Bucket bounds for `prompt_server_reply_size_bytes`: powers of four around
/// the default 1024-byte reply cap.
pub(crate) const REPLY_SIZE_BUCKETS: &[f64] = &[
    16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
];

/// A Prometheus histogram with fixed bucket bounds.
#[derive(Debug)]
pub(crate) struct Histogram {
    /// Upper bounds, strictly ascending and finite; `+Inf` is implied.
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative: `counts[i]` holds those
    /// above `bounds[i - 1]` and at most `bounds[i]`; the last one those
    /// above every bound.
    counts: Box<[AtomicU64]>,
    /// The sum of the observations, as `f64` bits.
    sum_bits: AtomicU64,
}

/// What a [`Histogram`] holds at one moment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HistogramSnapshot {
    /// `(upper bound, observations at or below it)`, the last bound `+Inf`.
    pub(crate) cumulative: Vec<(f64, u64)>,
    pub(crate) sum: f64,
}

impl HistogramSnapshot {
    /// Observations in all: the `+Inf` bucket.
    pub(crate) fn count(&self) -> u64 {
        self.cumulative.last().map_or(0, |&(_, count)| count)
    }
}

impl Histogram {
    /// An empty histogram with these bucket bounds.
    ///
    /// # Panics
    ///
    /// If `bounds` are not finite and strictly ascending: they are
    /// constants, so that is a programming error.
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        assert!(
            bounds.iter().all(|b| b.is_finite()) && bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bounds must be finite and strictly ascending: {bounds:?}"
        );
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0.0f64.to_bits()),
        }
    }

    /// Counts one observation; NaN is ignored.
    pub(crate) fn observe(&self, value: f64) {
        if value.is_nan() {
            return;
        }
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let add = |bits: u64| Some((f64::from_bits(bits) + value).to_bits());
        // `add` never returns None, so this never fails.
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, add);
    }

    /// The counts now. The `+Inf` bucket (the count) is the total of the
    /// buckets read, so the buckets are always consistent with it; the sum
    /// may include an observation made while reading (as in the official
    /// clients, which accept the same race).
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let bounds = self.bounds.iter().copied().chain([f64::INFINITY]);
        let cumulative = bounds
            .zip(self.counts.iter())
            .map(|(bound, count)| {
                total += count.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

/// A Prometheus text exposition (version 0.0.4) being written.
///
/// Metric and label names are the server's constants, not client data; a
/// malformed one, or one name used with two types, is a programming error
/// caught by debug assertions (a release build drops such a sample rather
/// than write invalid text).
#[derive(Debug, Default)]
pub(crate) struct MetricsText {
    /// In order of first use.
    families: Vec<Family>,
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    /// Sample lines, each ending in `\n`.
    samples: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

impl MetricsText {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A counter sample. `name` must end in `_total`; samples with the same
    /// name and other labels join the same family.
    pub(crate) fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: u64,
    ) -> &mut Self {
        debug_assert!(
            name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        if let Some(samples) = self.family(name, help, Kind::Counter) {
            write_sample(samples, name, labels, &value.to_string());
        }
        self
    }

    /// A gauge sample.
    pub(crate) fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) -> &mut Self {
        if let Some(samples) = self.family(name, help, Kind::Gauge) {
            write_sample(samples, name, labels, &format_value(value));
        }
        self
    }

    /// A histogram: its `_bucket` samples (cumulative, `le` ascending, the
    /// last `+Inf`), `_sum` and `_count`.
    pub(crate) fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) -> &mut Self {
        let snapshot = histogram.snapshot();
        let Some(samples) = self.family(name, help, Kind::Histogram) else {
            return self;
        };
        let bucket = format!("{name}_bucket");
        for &(bound, count) in &snapshot.cumulative {
            let le = format_value(bound);
            write_sample(samples, &bucket, &[("le", &le)], &count.to_string());
        }
        let sum = format_value(snapshot.sum);
        write_sample(samples, &format!("{name}_sum"), &[], &sum);
        let count = snapshot.count().to_string();
        write_sample(samples, &format!("{name}_count"), &[], &count);
        self
    }

    /// The exposition text: each family's HELP, TYPE and samples, families
    /// in the order they were first written.
    pub(crate) fn finish(self) -> String {
        let mut text = String::new();
        for family in self.families {
            let help = escape(&family.help, false);
            // Writing to a String cannot fail.
            let _ = writeln!(text, "# HELP {} {help}", family.name);
            let _ = writeln!(text, "# TYPE {} {}", family.name, family.kind.name());
            text.push_str(&family.samples);
        }
        text
    }

    /// Where the samples of the family `name` go, created on first use;
    /// `None` if `name` already is a family of another type.
    fn family(&mut self, name: &str, help: &str, kind: Kind) -> Option<&mut String> {
        debug_assert!(is_metric_name(name), "bad metric name {name:?}");
        let index = match self.families.iter().position(|f| f.name == name) {
            Some(index) => index,
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    help: help.to_string(),
                    kind,
                    samples: String::new(),
                });
                self.families.len() - 1
            }
        };
        let family = &mut self.families[index];
        debug_assert_eq!(family.kind, kind, "{name} written as two types");
        (family.kind == kind).then_some(&mut family.samples)
    }
}

/// `name{label="value",...} value\n`, label values escaped.
fn write_sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (label, label_value)) in labels.iter().enumerate() {
            debug_assert!(is_label_name(label), "bad label name {label:?}");
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{label}=\"{}\"", escape(label_value, true));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// The text format's escaping: backslash and newline always, the double
/// quote in label values only.
fn escape(text: &str, quote: bool) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '"' if quote => escaped.push_str("\\\""),
            c => escaped.push(c),
        }
    }
    escaped
}

/// A sample value or `le` bound as Prometheus (Go's `ParseFloat`) reads it:
/// `+Inf`, `-Inf`, `NaN`, whole numbers without a decimal point, others in
/// Rust's shortest round-trip form (`0.005`, `1e-7`).
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:?}")
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with the reserved `__`.
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
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
}

/// `accept` failures by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AcceptErrorCounts {
    pub(crate) connection: u64,
    pub(crate) descriptors: u64,
    pub(crate) memory: u64,
    pub(crate) other: u64,
}

impl AcceptErrorCounts {
    fn labelled(&self) -> [(&'static str, u64); 4] {
        [
            ("connection", self.connection),
            ("descriptors", self.descriptors),
            ("memory", self.memory),
            ("other", self.other),
        ]
    }
}

/// Everything the server exposes, as plain numbers read from its own
/// counters at scrape time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetricsSnapshot<'a> {
    pub(crate) connections_accepted: u64,
    /// Connections ended, by `outcome` label.
    pub(crate) outcomes: &'a [(&'static str, u64)],
    pub(crate) reply_bytes: u64,
    pub(crate) accept_errors: AcceptErrorCounts,
    pub(crate) log_lines_dropped: u64,
    /// Failed writes and syncs of the log, by `kind` label.
    pub(crate) log_write_errors: &'a [(&'static str, u64)],
    pub(crate) connections_open: u64,
    pub(crate) threads_serving: u64,
    pub(crate) threads_parked: u64,
    pub(crate) max_connections: u64,
    /// [`count_open_fds`]; `None` leaves the metric out.
    pub(crate) open_fds: Option<u64>,
    /// Client networks the rate limit holds a bucket for; `None` (no
    /// `--max-rate-per-ip`) leaves the metric out.
    pub(crate) rate_limit_networks: Option<u64>,
    pub(crate) start_time: SystemTime,
    pub(crate) session_duration: &'a Histogram,
    pub(crate) reply_size: &'a Histogram,
}

impl MetricsSnapshot<'_> {
    /// The exposition text of every metric in the module's table.
    pub(crate) fn render(&self) -> String {
        let mut text = MetricsText::new();
        text.counter(
            "prompt_server_connections_accepted_total",
            "Connections accepted.",
            &[],
            self.connections_accepted,
        );
        for &(outcome, count) in self.outcomes {
            text.counter(
                "prompt_server_connections_total",
                "Connections ended, by outcome.",
                &[("outcome", outcome)],
                count,
            );
        }
        text.counter(
            "prompt_server_reply_bytes_total",
            "Reply bytes logged.",
            &[],
            self.reply_bytes,
        );
        for (kind, count) in self.accept_errors.labelled() {
            text.counter(
                "prompt_server_accept_errors_total",
                "Failed accept calls, by kind.",
                &[("kind", kind)],
                count,
            );
        }
        text.counter(
            "prompt_server_log_lines_dropped_total",
            "Housekeeping log lines dropped because the log queue was full.",
            &[],
            self.log_lines_dropped,
        );
        for &(kind, count) in self.log_write_errors {
            text.counter(
                "prompt_server_log_write_errors_total",
                "Failed writes and syncs of the log, by errno.",
                &[("kind", kind)],
                count,
            );
        }
        text.gauge(
            "prompt_server_connections_open",
            "Connections open now.",
            &[],
            self.connections_open as f64,
        );
        for (state, count) in [
            ("serving", self.threads_serving),
            ("parked", self.threads_parked),
        ] {
            text.gauge(
                "prompt_server_threads",
                "Connection threads alive, serving a client or parked in the thread cache.",
                &[("state", state)],
                count as f64,
            );
        }
        text.gauge(
            "prompt_server_max_connections",
            "The effective cap on open connections.",
            &[],
            self.max_connections as f64,
        );
        if let Some(networks) = self.rate_limit_networks {
            text.gauge(
                "prompt_server_rate_limit_networks",
                "Client networks the rate limit holds a bucket for (refilled ones go at the next sweep).",
                &[],
                networks as f64,
            );
        }
        if let Some(open_fds) = self.open_fds {
            text.gauge(
                "process_open_fds",
                "Open file descriptors.",
                &[],
                open_fds as f64,
            );
        }
        text.gauge(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            &[],
            seconds_since_epoch(self.start_time),
        );
        text.histogram(
            "prompt_server_session_duration_seconds",
            "Time from accept to the log line, per connection.",
            self.session_duration,
        );
        text.histogram(
            "prompt_server_reply_size_bytes",
            "Size of each logged reply.",
            self.reply_size,
        );
        text.finish()
    }
}

/// The unit of times in `/proc`: `USER_HZ`, which is 100 on every Linux
/// architecture in use (what `sysconf(_SC_CLK_TCK)` returns).
const PROC_TICKS_PER_SECOND: u64 = 100;

/// When this process started, as Prometheus's own process collector works
/// it out: `/proc/self/stat`'s start time (field 22, in ticks since boot)
/// after `/proc/stat`'s boot time. `None` where they cannot be read.
pub(crate) fn process_start_time() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Field 2, the command name, is in parentheses and may hold spaces:
    // count from after it, where field 3 comes first.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after_name.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let since_boot = Duration::from_millis(ticks.saturating_mul(1000) / PROC_TICKS_PER_SECOND);
    Some(UNIX_EPOCH + Duration::from_secs(boot) + since_boot)
}

/// `time` as seconds since the Unix epoch (negative before it).
pub(crate) fn seconds_since_epoch(time: SystemTime) -> f64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

/// Open descriptors: the entries of `/proc/self/fd`, counting the one used
/// to list them, as the official Go client does; `None` where there is no
/// such directory.
pub(crate) fn count_open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.filter(Result::is_ok).count() as u64)
}

/// Starts the metrics thread: it answers scrapes on `listener` with
/// `render()` until `is_stopping()` returns true, which it checks at least
/// every [`STOP_POLL_INTERVAL`]. Errors only if the thread cannot be started
/// or the listener made non-blocking.
///
/// The thread reads every waiting scrape's request as its bytes come, so a
/// scraper that sends nothing holds up neither the others nor the thread;
/// each is dropped at its own [`SCRAPE_DEADLINE`], and at most
/// [`MAX_PENDING_SCRAPES`] wait at once (the oldest goes first).
pub(crate) fn serve_metrics(
    listener: TcpListener,
    render: impl Fn() -> String + Send + 'static,
    is_stopping: impl Fn() -> bool + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    // A blocking accept could not see the stop; polling costs ten wake-ups
    // a second when idle, and a scrape waits at most one interval.
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("metrics".to_string())
        .stack_size(METRICS_THREAD_STACK)
        .spawn(move || {
            let mut pending = VecDeque::new();
            while !is_stopping() {
                let mut progressed = accept_scrapes(&listener, &mut pending);
                pending.retain_mut(|scrape: &mut PendingScrape| match scrape.advance(&render) {
                    Progress::Waiting => true,
                    Progress::Read => {
                        progressed = true;
                        true
                    }
                    Progress::Done(result) => {
                        if let Err(e) = result {
                            log::debug!(
                                event = event::METRICS_SCRAPE_FAILED;
                                "metrics scrape from {} failed: {e}", scrape.peer
                            );
                        }
                        progressed = true;
                        false
                    }
                });
                if !progressed {
                    thread::sleep(if pending.is_empty() {
                        STOP_POLL_INTERVAL
                    } else {
                        PENDING_POLL_INTERVAL
                    });
                }
            }
        })
}

/// Accepts every scraper waiting on `listener`; true if there was one.
fn accept_scrapes(listener: &TcpListener, pending: &mut VecDeque<PendingScrape>) -> bool {
    let mut accepted = false;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if pending.len() >= MAX_PENDING_SCRAPES {
                    pending.pop_front();
                }
                pending.push_back(PendingScrape {
                    stream,
                    peer,
                    request: Vec::new(),
                    deadline: Instant::now() + SCRAPE_DEADLINE,
                });
                accepted = true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // None waiting, or out of descriptors: try again later.
            Err(_) => return accepted,
        }
    }
}

/// A scraper whose request is being read.
struct PendingScrape {
    /// Non-blocking while its request is read.
    stream: TcpStream,
    peer: SocketAddr,
    request: Vec<u8>,
    /// When it is dropped, answered or not.
    deadline: Instant,
}

/// What one look at a pending scrape gave.
enum Progress {
    /// Nothing new from the scraper.
    Waiting,
    /// More of its request arrived.
    Read,
    /// Answered (or dropped): it is finished.
    Done(io::Result<()>),
}

impl PendingScrape {
    /// Reads what the scraper has sent; once the request is whole (or
    /// cannot be), answers it and closes.
    fn advance(&mut self, render: &impl Fn() -> String) -> Progress {
        let mut chunk = [0u8; 1024];
        let mut progress = Progress::Waiting;
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Progress::Done(self.answer(Response::error("400 Bad Request"))),
                Ok(read) => {
                    self.request.extend_from_slice(&chunk[..read]);
                    if let Some(end) = header_end(&self.request) {
                        let response = respond(&self.request[..end], render);
                        return Progress::Done(self.answer(response));
                    }
                    if self.request.len() > MAX_REQUEST_BYTES {
                        let too_large = Response::error("431 Request Header Fields Too Large");
                        return Progress::Done(self.answer(too_large));
                    }
                    progress = Progress::Read;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= self.deadline {
                        let timed_out =
                            io::Error::new(io::ErrorKind::TimedOut, "no request in time");
                        return Progress::Done(Err(timed_out));
                    }
                    return progress;
                }
                Err(e) => return Progress::Done(Err(e)),
            }
        }
    }

    /// Writes `response` within what is left of the deadline, and closes.
    fn answer(&mut self, response: Response) -> io::Result<()> {
        self.stream.set_nonblocking(false)?;
        self.stream
            .set_write_timeout(Some(remaining(self.deadline)?))?;
        self.stream.write_all(&response.to_bytes())?;
        self.stream.shutdown(std::net::Shutdown::Write)
    }
}

/// One HTTP response, before it is written.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: &'static str,
    content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    extra_headers: &'static str,
    body: String,
    /// `HEAD`: the headers of the body, without it.
    head_only: bool,
}

impl Response {
    fn error(status: &'static str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_headers: "",
            body: format!("{status}\n"),
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len(),
            self.extra_headers
        )
        .into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The time left before `deadline`, or a timeout error once it has passed.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "scrape deadline passed",
        ));
    }
    Ok(left)
}

/// Where the blank line ending the headers ends (CRLF or bare LF lines).
fn header_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The response to a whole request: only its request line matters.
fn respond(request: &[u8], render: &impl Fn() -> String) -> Response {
    let line_end = request
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(request.len());
    let Ok(line) = std::str::from_utf8(&request[..line_end]) else {
        return Response::error("400 Bad Request");
    };
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::error("400 Bad Request");
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Response::error("400 Bad Request");
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    if path != "/metrics" {
        return Response::error("404 Not Found");
    }
    match method {
        "GET" | "HEAD" => Response {
            status: "200 OK",
            content_type: CONTENT_TYPE,
            extra_headers: "",
            body: render(),
            head_only: method == "HEAD",
        },
        _ => Response {
            extra_headers: "Allow: GET, HEAD\r\n",
            ..Response::error("405 Method Not Allowed")
        },
    }
}

#[cfg(test)]
#[path = "../tests/prometheus_format/mod.rs"]
#[allow(unreachable_pub)] // written for tests/, where `pub` is needed
mod prometheus_format;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::{Shutdown, SocketAddr};
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    /// Every test client's reads and writes give up after this.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

    fn sample_snapshot_text() -> String {
        let session_duration = Histogram::new(SESSION_DURATION_BUCKETS);
        for secs in [0.0004, 0.003, 0.003, 0.2, 59.0, 600.0] {
            session_duration.observe(secs);
        }
        let reply_size = Histogram::new(REPLY_SIZE_BUCKETS);
        reply_size.observe(12.0);
        reply_size.observe(1024.0);
        MetricsSnapshot {
            connections_accepted: 7,
            outcomes: &[
                ("replied", 2),
                ("truncated", 0),
                ("timed_out", 0),
                ("no_reply", 0),
                ("failed", 0),
                ("denied", 0),
                ("busy", 0),
                ("rate_limited", 3),
                ("shutdown", 1),
            ],
            reply_bytes: 1036,
            accept_errors: AcceptErrorCounts {
                descriptors: 4,
                ..AcceptErrorCounts::default()
            },
            log_lines_dropped: 0,
            log_write_errors: &[],
            connections_open: 1,
            threads_serving: 1,
            threads_parked: 3,
            max_connections: 1024,
            open_fds: count_open_fds(),
            rate_limit_networks: Some(2),
            start_time: SystemTime::now(),
            session_duration: &session_duration,
            reply_size: &reply_size,
        }
        .render()
    }

    /// Not a pass/fail test: prints the cost of one render and one
    /// observation, for the README.
    #[test]
    fn render_and_observe_cost() {
        let renders = 200u32;
        let timer = Instant::now();
        let bytes: usize = (0..renders).map(|_| sample_snapshot_text().len()).sum();
        let render = timer.elapsed() / renders;
        let histogram = Histogram::new(SESSION_DURATION_BUCKETS);
        let observations = 1_000_000u32;
        let timer = Instant::now();
        for i in 0..observations {
            histogram.observe(f64::from(i % 1000) * 0.001);
        }
        let observe = timer.elapsed() / observations;
        eprintln!(
            "metrics: {} us per render of {} bytes, {} ns per observe",
            render.as_micros(),
            bytes / renders as usize,
            observe.as_nanos()
        );
    }

    #[test]
    fn histograms_count_cumulatively_with_le_inclusive() {
        let histogram = Histogram::new(&[1.0, 2.0]);
        for value in [0.5, 1.0, 1.5, 2.0, 3.0, f64::NAN] {
            histogram.observe(value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(
            snapshot.cumulative,
            vec![(1.0, 2), (2.0, 4), (f64::INFINITY, 5)]
        );
        assert_eq!(snapshot.count(), 5);
        assert_eq!(snapshot.sum, 8.0);
    }

    #[test]
    fn histograms_are_shared_between_threads() {
        let histogram = Arc::new(Histogram::new(&[1.0]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let histogram = Arc::clone(&histogram);
                thread::spawn(move || (0..10_000).for_each(|_| histogram.observe(0.5)))
            })
            .collect();
        for thread in threads {
            thread.join().expect("observer thread");
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count(), 40_000);
        assert_eq!(snapshot.sum, 20_000.0);
    }

    #[test]
    fn values_are_written_as_prometheus_reads_them() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(-2.0), "-2");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(0.005), "0.005");
        assert_eq!(format_value(2.5), "2.5");
        assert_eq!(format_value(1e-7), "1e-7");
        assert_eq!(format_value(1e20), "1e20");
        assert_eq!(format_value(1_700_000_000.25), "1700000000.25");
    }

    #[test]
    fn families_get_one_help_and_type_however_samples_are_interleaved() {
        let mut text = MetricsText::new();
        text.counter("a_total", "A.", &[("k", "1")], 1);
        text.gauge("b", "B.", &[], 2.0);
        text.counter("a_total", "A.", &[("k", "2")], 3);
        assert_eq!(
            text.finish(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"1\"} 1\na_total{k=\"2\"} 3\n\
             # HELP b B.\n# TYPE b gauge\nb 2\n"
        );
    }

    #[test]
    fn help_and_label_values_are_escaped() {
        let mut text = MetricsText::new();
        text.gauge(
            "g",
            "back\\slash \"quoted\"\nnext",
            &[("path", "C:\\x \"y\"\nz")],
            1.0,
        );
        assert_eq!(
            text.finish(),
            "# HELP g back\\\\slash \"quoted\"\\nnext\n# TYPE g gauge\n\
             g{path=\"C:\\\\x \\\"y\\\"\\nz\"} 1\n"
        );
    }

    #[test]
    fn histograms_are_written_with_buckets_sum_and_count() {
        let histogram = Histogram::new(&[0.5, 1.0]);
        histogram.observe(0.25);
        histogram.observe(2.0);
        let mut text = MetricsText::new();
        text.histogram("h_seconds", "H.", &histogram);
        assert_eq!(
            text.finish(),
            "# HELP h_seconds H.\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{le=\"0.5\"} 1\nh_seconds_bucket{le=\"1\"} 1\n\
             h_seconds_bucket{le=\"+Inf\"} 2\nh_seconds_sum 2.25\nh_seconds_count 2\n"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(is_metric_name("prompt_server:x_total"));
        assert!(!is_metric_name("1x"));
        assert!(!is_metric_name("a-b"));
        assert!(!is_metric_name(""));
        assert!(is_label_name("outcome"));
        assert!(!is_label_name("__name__"));
        assert!(!is_label_name("a:b"));
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

    #[test]
    fn the_server_metrics_pass_the_format_check() {
        let text = sample_snapshot_text();
        let exposition = prometheus_format::check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let value = |name: &str, labels: &[(&str, &str)]| {
            exposition
                .value(name, labels)
                .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
        };
        assert_eq!(value("prompt_server_connections_accepted_total", &[]), 7.0);
        let outcome = |o| value("prompt_server_connections_total", &[("outcome", o)]);
        assert_eq!(outcome("rate_limited"), 3.0);
        assert_eq!(outcome("shutdown"), 1.0);
        assert_eq!(outcome("timed_out"), 0.0);
        assert_eq!(
            value(
                "prompt_server_accept_errors_total",
                &[("kind", "descriptors")]
            ),
            4.0
        );
        assert_eq!(value("prompt_server_threads", &[("state", "parked")]), 3.0);
        assert!(value("process_open_fds", &[]) >= 3.0);
        let count = "prompt_server_session_duration_seconds_count";
        assert_eq!(value(count, &[]), 6.0);
        let bucket = "prompt_server_session_duration_seconds_bucket";
        assert_eq!(value(bucket, &[("le", "0.005")]), 3.0);
        assert_eq!(value(bucket, &[("le", "+Inf")]), 6.0);
        assert_eq!(value("prompt_server_reply_size_bytes_sum", &[]), 1036.0);
        let started = value("process_start_time_seconds", &[]);
        assert!(started > 1.7e9, "{started}");
    }

    #[test]
    fn the_format_check_catches_what_it_should() {
        for (bad, why) in [
            ("x_total 1\n", "before its HELP"),
            ("# HELP x X.\n# TYPE x counter\nx 1\n", "_total"),
            ("# HELP 1x X.\n# TYPE 1x gauge\n1x 1\n", "name"),
            (
                "# HELP a A.\n# TYPE a gauge\na 1\n# HELP b B.\n# TYPE b gauge\nb 1\na{x=\"1\"} 2\n",
                "not together",
            ),
            (
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\n\
                 h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
                "decrease",
            ),
            (
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
                "_count",
            ),
            (
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n",
                "_sum",
            ),
            (
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"2\"} 1\n\
                 h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
                "ascending",
            ),
            ("# HELP g G.\n# TYPE g gauge\ng{a=\"x\\q\"} 1\n", "escape"),
        ] {
            let error = prometheus_format::check(bad).expect_err(bad);
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    /// A running endpoint and how to stop it.
    struct Endpoint {
        addr: SocketAddr,
        stopping: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Endpoint {
        fn start(body: &'static str) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
            let addr = listener.local_addr().expect("local address");
            let stopping = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stopping);
            let thread = serve_metrics(
                listener,
                move || body.to_string(),
                move || flag.load(Ordering::Relaxed),
            )
            .expect("metrics thread");
            Endpoint {
                addr,
                stopping,
                thread: Some(thread),
            }
        }

        fn client(&self) -> TcpStream {
            let stream = TcpStream::connect(self.addr).expect("connect");
            stream
                .set_read_timeout(Some(CLIENT_TIMEOUT))
                .expect("timeout");
            stream
                .set_write_timeout(Some(CLIENT_TIMEOUT))
                .expect("timeout");
            stream
        }

        /// Sends `request` and reads the whole response.
        fn exchange(&self, request: &[u8]) -> String {
            let mut stream = self.client();
            stream.write_all(request).expect("send request");
            let mut response = Vec::new();
            stream.read_to_end(&mut response).expect("read response");
            String::from_utf8(response).expect("a UTF-8 response")
        }
    }

    impl Drop for Endpoint {
        fn drop(&mut self) {
            self.stopping.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// The status line, the header lines, and the body of a response.
    fn split_response(response: &str) -> (&str, HashSet<&str>, &str) {
        let (head, body) = response.split_once("\r\n\r\n").expect("a blank line");
        let mut lines = head.split("\r\n");
        let status = lines.next().expect("a status line");
        (status, lines.collect(), body)
    }

    #[test]
    fn a_scrape_gets_the_text_with_the_format_headers() {
        let endpoint = Endpoint::start("x 1\n");
        for request in [
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
            "GET /metrics HTTP/1.0\r\n\r\n",
            "GET /metrics?target=a HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.0\n\n",
        ] {
            let response = endpoint.exchange(request.as_bytes());
            let (status, headers, body) = split_response(&response);
            assert_eq!(status, "HTTP/1.1 200 OK", "{request:?}");
            assert!(headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"));
            assert!(headers.contains("Content-Length: 4"), "{headers:?}");
            assert!(headers.contains("Connection: close"));
            assert_eq!(body, "x 1\n");
        }
        let response = endpoint.exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        let (status, headers, body) = split_response(&response);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers.contains("Content-Length: 4"));
        assert_eq!(body, "");
    }

    #[test]
    fn other_requests_are_refused_and_closed() {
        let endpoint = Endpoint::start("x 1\n");
        for (request, expected) in [
            ("GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            ("GET /metricsx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (
                "POST /metrics HTTP/1.1\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            ("GET /metrics HTTP/2.0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            ("GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            ("hello\n\n", "HTTP/1.1 400 Bad Request"),
            ("\u{1b}[2J\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ] {
            let response = endpoint.exchange(request.as_bytes());
            let (status, headers, _) = split_response(&response);
            assert_eq!(status, expected, "{request:?}");
            assert!(headers.contains("Connection: close"));
            if expected.contains("405") {
                assert!(headers.contains("Allow: GET, HEAD"));
            }
        }
        // Half a request, then the client closes its side.
        let mut stream = endpoint.client();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .expect("send");
        stream.shutdown(Shutdown::Write).expect("half-close");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        assert!(
            response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{response}"
        );
    }

    #[test]
    fn silent_scrapers_hold_up_nobody_and_are_dropped_at_the_deadline() {
        let endpoint = Endpoint::start("x 1\n");
        let others: Vec<TcpStream> = (0..5).map(|_| endpoint.client()).collect();
        let started = Instant::now();
        let response = endpoint.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        drop(others);
    }

    #[test]
    fn a_silent_scraper_is_dropped_and_the_next_is_served() {
        let endpoint = Endpoint::start("x 1\n");
        let started = Instant::now();
        let mut silent = endpoint.client();
        let second = Mutex::new(None);
        thread::scope(|scope| {
            scope.spawn(|| {
                // Answered while the silent one still waits.
                let response = endpoint.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
                *second.lock().expect("lock") = Some((response, started.elapsed()));
            });
            let mut buffer = [0u8; 16];
            // The silent client is closed with nothing sent.
            let read = silent.read(&mut buffer);
            assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
            let dropped_after = started.elapsed();
            assert!(
                dropped_after >= SCRAPE_DEADLINE - Duration::from_millis(200),
                "{dropped_after:?}"
            );
            assert!(
                dropped_after < SCRAPE_DEADLINE + Duration::from_secs(1),
                "{dropped_after:?}"
            );
        });
        let (response, waited) = second.into_inner().expect("lock").expect("second scrape");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            waited < SCRAPE_DEADLINE + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[test]
    fn a_huge_request_is_cut_short() {
        let endpoint = Endpoint::start("x 1\n");
        let started = Instant::now();
        let mut stream = endpoint.client();
        // Far more than the cap, with no end of headers: the server stops
        // reading at the cap, answers 431 and closes; the rest of the write
        // may then fail with a reset.
        let huge = vec![b'a'; 4 * 1024 * 1024];
        let _ = stream.write_all(&huge);
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        assert!(started.elapsed() < SCRAPE_DEADLINE + Duration::from_secs(1));
        let response = endpoint.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        // Just over the cap, read in full by the client: a 431.
        let mut stream = endpoint.client();
        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        request.extend(std::iter::repeat_n(b'h', MAX_REQUEST_BYTES));
        stream.write_all(&request).expect("send");
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response);
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{response}"
        );
    }

    #[test]
    fn the_thread_stops_when_asked() {
        let mut endpoint = Endpoint::start("x 1\n");
        endpoint.stopping.store(true, Ordering::Relaxed);
        let started = Instant::now();
        if let Some(thread) = endpoint.thread.take() {
            thread.join().expect("metrics thread ends cleanly");
        }
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_process_start_time_is_in_the_recent_past() {
        let started = process_start_time().expect("readable on Linux");
        let age = SystemTime::now()
            .duration_since(started)
            .expect("in the past");
        // This test process started at most a few minutes ago (cargo test
        // may build for a while first, which is not this process).
        assert!(age < Duration::from_secs(600), "{age:?}");
    }
}
