//! The log: its set-up ([`init`]), the default [`ReplySink`]
//! ([`LogReplies`]), the `log` facade's diagnostic lines, and the reports of
//! a failing output.
//!
//! Records and diagnostics go through one queue to one output (stderr, or
//! `--log-file`), so the log reads in order. Only diagnostics are filtered
//! by `RUST_LOG`: a record is a served connection's data and is always
//! written; its caller waits until it is (and synced, where the output is a
//! file). Diagnostic lines never make anyone wait: lifecycle lines (start,
//! signals, stop) are always queued, housekeeping lines (busy, denied,
//! accept errors, debug) are dropped and counted when the queue is full.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use std::{panic, thread};

use log::kv::{Key, ToValue, Value};
use log::{Level, Log as _, error, warn};

pub(crate) use super::every::{
    ACCEPT_ERROR_LINES, BUSY_LINES, DENIED_LINES, LogEvery, NOT_RECORDED_LINES, RATE_LIMITED_LINES,
    held_back_note, log_every, report_held_back,
};
pub use super::format::LogFormat;
pub(crate) use super::format::event;
use super::format::{Escaped, RecordText, class_of, escape_line_breakers, json_line, reply_text};
use super::output::{ERROR_KINDS, Output, error_kind, stderr_writer};
use super::queue::{self, Class, NotWritten, Observer, Queue};
use super::{Record, ReplyEnd, ReplySink};
use crate::error::describe_io_error;
use crate::lock;

/// The default [`LogSettings::record_timeout`]: long enough to ride out a
/// slow disk or a rotation, short enough that a failing one is noticed by
/// the clients.
pub const DEFAULT_RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// How the log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Text lines, or one JSON object per line.
    pub format: LogFormat,
    /// A file to append to (created if missing) instead of stderr, opened
    /// again on SIGHUP ([`Shutdown::trigger_on_signals`](crate::Shutdown::trigger_on_signals)).
    pub file: Option<PathBuf>,
    /// `fdatasync` a regular file (`file`, or stderr redirected to one) after
    /// each batch with a record, so that it is on disk before its clean close.
    pub sync: bool,
    /// How long a record may wait for the log before it is given up (its
    /// client reset, the reply counted as not recorded).
    pub record_timeout: Duration,
}

impl LogSettings {
    /// Checks the one rule the fields' types cannot express: a record must
    /// be given some time. [`init`] calls it.
    ///
    /// # Errors
    ///
    /// What `record_timeout` must be, when it is zero.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.record_timeout.is_zero() {
            return Err("must be more than 0 seconds");
        }
        Ok(())
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            file: None,
            sync: true,
            record_timeout: DEFAULT_RECORD_TIMEOUT,
        }
    }
}

/// The target of the `listening on ADDR` line. It is logged at info whatever
/// `RUST_LOG` says (unless `RUST_LOG` names this target itself), since it is
/// the only place that says which port `--port 0` got.
pub(crate) const LISTENING_TARGET: &str = "prompt_server::listening";
const RECORD_TARGET: &str = "prompt_server::connection";

/// Lines the log queue holds while the output is slow: enough for a burst
/// of replies, small enough that a stalled output is noticed soon.
const LOG_QUEUE_LINES: usize = 1024;

/// The process's log, made by [`init`] (or, for a sink used without it, on
/// first use with the default settings).
static LOG: OnceLock<&'static Log> = OnceLock::new();

struct Log {
    queue: Queue,
    /// Formats records, unfiltered.
    records: env_logger::Logger,
    record_timeout: Duration,
    health: &'static Health,
}

impl Log {
    /// A line as `env_logger` formats it, whatever `RUST_LOG` says.
    fn line(
        &self,
        level: Level,
        target: &str,
        fields: &[(&str, Value<'_>)],
        message: fmt::Arguments<'_>,
    ) -> Vec<u8> {
        self.records.log(
            &log::Record::builder()
                .args(message)
                .level(level)
                .target(target)
                .key_values(&fields)
                .build(),
        );
        FORMATTED.take()
    }
}

/// Starts the log as `settings` say and installs it as the `log` facade's
/// logger: diagnostics at level info unless `RUST_LOG` says otherwise,
/// records always. Each line is filtered and formatted on the calling
/// thread, then queued, so that a stalled output never blocks the accept
/// loop or the signal thread.
///
/// # Errors
///
/// Fails if the settings are invalid, the log file cannot be opened, a
/// logger is already installed, or a thread that writes the log cannot be
/// started.
pub fn init(settings: &LogSettings) -> io::Result<()> {
    settings.validate().map_err(|rule| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("record_timeout {rule}"),
        )
    })?;
    let mut diagnostics = builder(settings.format);
    // Before RUST_LOG is read, so that a RUST_LOG directive for this very
    // target replaces it; any other directive is less specific and loses.
    diagnostics.filter_module(LISTENING_TARGET, log::LevelFilter::Info);
    diagnostics.parse_env(env_logger::Env::default().default_filter_or("info"));
    let diagnostics = diagnostics.build();
    let log = install(settings)?;
    log::set_max_level(diagnostics.filter());
    log::set_boxed_logger(Box::new(QueuedLogger { diagnostics, log }))
        .map_err(|e| io::Error::other(e.to_string()))
}

/// An `env_logger` builder for `format` whose lines land in [`FORMATTED`].
fn builder(format: LogFormat) -> env_logger::Builder {
    let mut builder = env_logger::Builder::new();
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = json_line(&buf.timestamp_millis().to_string(), record);
            writeln!(buf, "{}", escape_line_breakers(&line.to_string()))
        });
    }
    if std::env::var_os("RUST_LOG_STYLE").is_none() && io::stderr().is_terminal() {
        builder.write_style(env_logger::WriteStyle::Always);
    }
    builder.target(env_logger::Target::Pipe(Box::new(Captured)));
    builder
}

/// Makes the process's log with `settings`; fails if it exists already.
fn install(settings: &LogSettings) -> io::Result<&'static Log> {
    let output = match &settings.file {
        Some(path) => Output::file(path, settings.sync).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open {}: {}", path.display(), describe_io_error(&e)),
            )
        })?,
        None => Output::stderr(settings.sync)?,
    };
    let file = settings
        .file
        .as_ref()
        .map(|path| path.display().to_string());
    let health: &'static Health = Box::leak(Box::new(Health {
        file,
        counts: Default::default(),
        last_error: Mutex::new(None),
        reported: ERROR_KINDS.map(|(kind, _)| LogEvery::new(kind, Duration::from_secs(1))),
        stderr: settings.file.is_some().then(stderr_writer).transpose()?,
    }));
    let mut records = builder(settings.format);
    records.filter_level(log::LevelFilter::Trace);
    let log: &'static Log = Box::leak(Box::new(Log {
        queue: Queue::new(LOG_QUEUE_LINES, output, Box::new(health)),
        records: records.build(),
        record_timeout: settings.record_timeout,
        health,
    }));
    LOG.set(log)
        .map_err(|_| io::Error::new(io::ErrorKind::AlreadyExists, "the log is set up already"))?;
    queue::start_writer(&log.queue)?;
    Ok(log)
}

/// The process's log: the one [`init`] made, or else one on stderr with the
/// default settings, made now.
fn log() -> io::Result<&'static Log> {
    match LOG.get() {
        Some(log) => Ok(log),
        None => install(&LogSettings::default()).or_else(|e| LOG.get().copied().ok_or(e)),
    }
}

/// The default [`ReplySink`]: each record is a line in the log, written
/// (and synced, where the log is a file) before the client sees its clean
/// close, whatever `RUST_LOG` says. Without [`init`], the log is stderr
/// with the default [`LogSettings`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LogReplies;

impl ReplySink for LogReplies {
    fn record(&self, record: &Record<'_>) -> io::Result<()> {
        let log = log()?;
        let (level, event) = level_and_event(record);
        let proxy = record.proxy.map(|proxy| proxy.to_string());
        let proxy = proxy.as_deref();
        let (text, lossy) = reply_text(record.reply);
        let duration_ms = record.duration.as_millis() as u64;
        let fields = [
            ("event", Value::from(event)),
            ("peer", Value::from_display(&record.peer)),
            ("proxy", proxy.to_value()),
            ("reply", Value::from(&*text)),
            ("reply_lossy", Value::from(lossy)),
            ("bytes", Value::from(record.reply.len())),
            ("duration_ms", Value::from(duration_ms)),
        ];
        let message = format_args!("{}", RecordText(record));
        let line = log.line(level, RECORD_TARGET, &fields, message);
        let timeout = log.record_timeout.as_secs_f64();
        let written = log
            .queue
            .push_and_wait(line, Instant::now() + log.record_timeout);
        written.map_err(|why| match why {
            NotWritten::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the log did not take it within {timeout}s"),
            ),
            NotWritten::Abandoned => io::Error::other("the server stopped waiting for the log"),
        })
    }
}

fn level_and_event(record: &Record<'_>) -> (Level, &'static str) {
    match record.end {
        ReplyEnd::Line => (Level::Info, event::REPLY),
        ReplyEnd::Closed if record.reply.is_empty() => (Level::Info, event::NO_REPLY),
        ReplyEnd::Closed => (Level::Info, event::REPLY),
        ReplyEnd::Truncated => (Level::Warn, event::TRUNCATED),
        ReplyEnd::TimedOut { .. } => (Level::Warn, event::TIMEOUT),
        ReplyEnd::CutOff => (Level::Warn, event::CUT_OFF),
        ReplyEnd::Failed(_) => (Level::Warn, event::READ_ERROR),
    }
}

/// Waits up to `timeout` for the queued log lines; returns how many were
/// not written.
pub(crate) fn flush(timeout: Duration) -> u64 {
    LOG.get().map_or(0, |log| log.queue.flush(timeout))
}

/// A stopping server gives up on a log that does not take its records.
pub(crate) fn stop_waiting_for_the_log() {
    if let Some(log) = LOG.get() {
        log.queue.stop_waiting();
    }
}

/// Opens the log file again (SIGHUP, after logrotate renamed it); its first
/// line says so. Returns false when the log is not a file.
pub(crate) fn reopen() -> bool {
    let Some(log) = LOG.get().filter(|log| log.health.file.is_some()) else {
        return false;
    };
    let line = log.line(
        Level::Info,
        "prompt_server::logging",
        &[("event", Value::from(event::LOG_REOPENED))],
        format_args!(
            "log file reopened (SIGHUP): the lines before this one are in the file it was renamed to"
        ),
    );
    log.queue.reopen(line);
    true
}

/// Housekeeping log lines dropped because the log queue was full.
pub(crate) fn lines_dropped() -> u64 {
    LOG.get().map_or(0, |log| log.queue.dropped_total())
}

/// Failed writes and syncs of the log, by kind (`ENOSPC`, `EIO`, ...).
pub(crate) fn write_errors() -> Vec<(&'static str, u64)> {
    let Some(log) = LOG.get() else {
        return Vec::new();
    };
    let counts = log.health.counts.iter().map(|n| n.load(Ordering::Relaxed));
    ERROR_KINDS
        .iter()
        .map(|(kind, _)| *kind)
        .zip(counts)
        .collect()
}

/// What is wrong with the log now, for the service manager's status:
/// "log failing: no space left on device", or `None` while it works.
pub(crate) fn failure() -> Option<String> {
    let log = LOG.get()?;
    let waiting = log.queue.failing()?;
    let why = lock(&log.health.last_error).clone()?;
    Some(format!("log failing: {why} ({waiting} lines waiting)"))
}

/// What the queue's failures are told to: counters by kind, the last error
/// for the status, and, when the log is a file, a line on stderr (a channel
/// that still works) at most once per kind per second.
struct Health {
    /// The log file's path, `None` for stderr.
    file: Option<String>,
    counts: [AtomicU64; ERROR_KINDS.len()],
    last_error: Mutex<Option<String>>,
    reported: [LogEvery; ERROR_KINDS.len()],
    /// Lines for stderr ([`stderr_writer`]) when the log is a file.
    stderr: Option<SyncSender<String>>,
}

impl Health {
    /// Dropped if the stderr thread is behind.
    fn to_stderr(&self, line: String) {
        if let Some(lines) = &self.stderr {
            let _ = lines.try_send(line);
        }
    }
}

impl Observer for &'static Health {
    fn failed(&self, error: &io::Error) {
        let kind = error_kind(error);
        self.counts[kind].fetch_add(1, Ordering::Relaxed);
        let why = describe_io_error(error);
        *lock(&self.last_error) = Some(why.clone());
        if let Some(path) = &self.file
            && self.reported[kind].due().is_some()
        {
            self.to_stderr(format!(
                "prompt-server: cannot write the log file {path}: {why}; replies wait and are retried \
                 (a client whose reply is not recorded in time is reset)\n"
            ));
        }
    }

    fn recovered(&self, failures: u64) {
        let why = lock(&self.last_error).take().unwrap_or_default();
        let attempts = if failures == 1 { "attempt" } else { "attempts" };
        if let Some(path) = &self.file {
            self.to_stderr(format!(
                "prompt-server: the log file {path} takes writes again ({failures} failed {attempts}: {why})\n"
            ));
        }
        warn!(
            event = event::LOG_RECOVERED, failures = failures;
            "the log takes writes again after {failures} failed {attempts} ({why})"
        );
    }

    fn reopen_failed(&self, error: &io::Error) {
        let path = self.file.as_deref().unwrap_or_default();
        let why = describe_io_error(error);
        self.to_stderr(format!(
            "prompt-server: cannot reopen the log file {path}: {why}; still writing to the file \
             it was renamed to\n"
        ));
        warn!(
            event = event::LOG_REOPEN_FAILED;
            "cannot reopen the log file {path}: {why}; still writing to this file"
        );
    }

    fn dropped(&self, count: u64) {
        warn!(
            event = event::LOG_DROPPED, dropped = count;
            "{count} log lines about turned-away clients and errors were dropped while the log was stalled"
        );
    }
}

/// The logger [`init`] installs: `env_logger` filters and formats, the
/// queue delivers.
struct QueuedLogger {
    diagnostics: env_logger::Logger,
    log: &'static Log,
}

thread_local! {
    /// The line `env_logger` just formatted on this thread.
    static FORMATTED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `env_logger`'s target: keeps the formatted line for the queue.
struct Captured;

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        FORMATTED.with(|line| line.borrow_mut().extend_from_slice(bytes));
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl log::Log for QueuedLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.diagnostics.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.diagnostics.matches(record) {
            return;
        }
        let event = record.key_values().get(Key::from("event"));
        let class = class_of(event.as_ref().and_then(Value::to_borrowed_str));
        if class == Class::Housekeeping && self.log.queue.drops_housekeeping() {
            return;
        }
        self.diagnostics.log(record);
        let line = FORMATTED.take();
        if line.is_empty() {
            return;
        }
        // With a log file, stderr (a terminal, the journal) still says
        // where the server listens: `--port 0` is found out there.
        if record.target() == LISTENING_TARGET {
            let line = String::from_utf8_lossy(&line).into_owned();
            self.log.health.to_stderr(line);
        }
        self.log.queue.push(line, class);
    }

    fn flush(&self) {}
}

thread_local! {
    /// The client this thread is serving, for the panic log line.
    static SERVING: Cell<Option<SocketAddr>> = const { Cell::new(None) };
}

/// Names, while it lives, the client the current thread serves in any
/// panic line it logs. Dropped when the connection ends, so a thread
/// parked in the thread cache never reports a client it no longer serves.
#[must_use = "the peer is named only while the guard lives"]
pub(crate) struct ServingPeer(());

impl ServingPeer {
    pub(crate) fn set(peer: SocketAddr) -> Self {
        SERVING.set(Some(peer));
        ServingPeer(())
    }
}

impl Drop for ServingPeer {
    fn drop(&mut self) {
        SERVING.set(None);
    }
}

/// Reports panics as one escaped error line in the log instead of the
/// default multi-line message on bare stderr. A panic ends only the thread it
/// happens on; for a connection thread, that one connection.
pub fn log_panics() {
    panic::set_hook(Box::new(|info| {
        let thread = thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let payload = info.payload();
        let message = (payload.downcast_ref::<&str>().copied())
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let message = Escaped(message.as_bytes());
        let location = info
            .location()
            .map(|at| format!("{}:{}", at.file(), at.line()))
            .unwrap_or_default();
        match SERVING.get() {
            Some(peer) => error!(
                event = event::PANIC, peer:% = peer;
                "thread {thread} panicked at {location} serving {peer}: {message}"
            ),
            None => error!(
                event = event::PANIC;
                "thread {thread} panicked at {location}: {message}"
            ),
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_peer_is_named_only_while_the_connection_lasts() {
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        assert_eq!(SERVING.with(Cell::get), None);
        let guard = ServingPeer::set(peer);
        assert_eq!(SERVING.with(Cell::get), Some(peer));
        drop(guard);
        assert_eq!(
            SERVING.with(Cell::get),
            None,
            "a parked thread names nobody"
        );
    }
}
