//! The log: its set-up ([`init`]), the default [`ReplySink`] ([`LogReplies`]),
//! the diagnostics (`RUST_LOG` filters these only), lines at most once per
//! interval (`LogEvery`), and the reports of a failing output. Records and
//! diagnostics share one queue, so the log reads in order; only a record's
//! caller waits for its line.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt::Arguments;
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use std::{panic, thread};

use libc::{EDQUOT, EFBIG, EIO, ENOSPC, EPIPE};
use log::kv::{Key, Source, ToValue, Value};
use log::{Level, LevelFilter, Log as _, error, warn};

pub use super::format::LogFormat;
pub(crate) use super::format::event;
use super::format::{Escaped, RecordText, class_of, escape_line_breakers, json_line};
use super::queue::{Class, Observer, Output, Queue};
use super::{Record, ReplySink};
use crate::error::describe_io_error;
use crate::{helper_thread, lock};

/// The default [`LogSettings::record_timeout`]: long enough to ride out a
/// slow disk or a rotation, short enough that clients notice a failing one.
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
    /// Checks the rule the types cannot express, `record_timeout` above zero
    /// and at most a year ([`init`] calls it); the error says what it must be.
    pub fn validate(&self) -> Result<(), &'static str> {
        match self.record_timeout {
            timeout if timeout.is_zero() => Err("must be more than 0 seconds"),
            timeout if timeout > MAX_DURATION => Err(AT_MOST_A_YEAR),
            _ => Ok(()),
        }
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

/// The longest duration setting, the record's timeout and the `Config`'s:
/// a deadline is an `Instant` plus one, which must not overflow, and a year
/// is no limit at all for a prompt.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
pub(crate) const AT_MOST_A_YEAR: &str = "must be at most 31536000 seconds (a year)";

/// The target of the `listening on ADDR` line, logged at info whatever
/// `RUST_LOG` says unless it names this target: it tells `--port 0`'s port.
pub(crate) const LISTENING_TARGET: &str = "prompt_server::listening";
/// The target of SIGUSR1's counters line, shown at info whatever `RUST_LOG` says.
pub(crate) const COUNTERS_TARGET: &str = "prompt_server::counters";
const RECORD_TARGET: &str = "prompt_server::connection";
/// Lines the queue holds: a burst of replies, few enough that a stall is noticed soon.
const LOG_QUEUE_LINES: usize = 1024;
/// The `kind` label of the log's write errors: these errnos, then "other".
const ERROR_KINDS: [&str; 6] = ["ENOSPC", "EDQUOT", "EFBIG", "EIO", "EPIPE", "other"];
const ERRNOS: [i32; 5] = [ENOSPC, EDQUOT, EFBIG, EIO, EPIPE];

/// The process's log, made by [`init`] or else by the first record.
static LOG: OnceLock<&'static Log> = OnceLock::new();

/// The log: the `log` facade's logger once [`init`] installs it, and where
/// its writer's reports go (counters, the last error, stderr).
struct Log {
    queue: Queue,
    /// Filters and formats diagnostics; the queue delivers them.
    diagnostics: env_logger::Logger,
    /// Formats records, unfiltered.
    records: env_logger::Logger,
    record_timeout: Duration,
    /// The log file's path, `None` for stderr.
    file: Option<String>,
    /// Lines for stderr when the log is a file, dropped if it is behind.
    stderr: Option<SyncSender<String>>,
    /// Failed writes and syncs, by kind.
    errors: [AtomicU64; ERROR_KINDS.len()],
    last_error: Mutex<Option<String>>,
    /// At most one stderr line a second per kind.
    reported: [LogEvery; ERROR_KINDS.len()],
}

impl Log {
    /// A line as `env_logger` formats it, whatever `RUST_LOG` says.
    fn line(&self, level: Level, target: &str, kvs: &dyn Source, args: Arguments) -> Vec<u8> {
        let mut builder = log::Record::builder();
        builder.level(level).target(target).key_values(kvs);
        self.records.log(&builder.args(args).build());
        FORMATTED.take()
    }

    fn to_stderr(&self, line: String) {
        if let Some(lines) = &self.stderr {
            let _ = lines.try_send(line);
        }
    }
}

/// Starts the log as `settings` say and installs it as the `log` facade's
/// logger (diagnostics at info unless `RUST_LOG` says otherwise). Lines are
/// formatted by the caller and queued: a stalled output blocks no logger.
///
/// # Errors
///
/// Invalid settings, a log file that cannot be opened, a logger already
/// installed, or a log thread that cannot be started.
pub fn init(settings: &LogSettings) -> io::Result<()> {
    if let Err(rule) = settings.validate() {
        let why = format!("record_timeout {rule}");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    }
    let log = install(settings)?;
    log::set_max_level(log.diagnostics.filter());
    log::set_logger(log).map_err(|e| io::Error::other(e.to_string()))
}

/// An `env_logger` builder for `settings`: lines land in [`FORMATTED`], coloured for a terminal.
fn builder(settings: &LogSettings) -> env_logger::Builder {
    let mut builder = env_logger::Builder::new();
    if settings.format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = json_line(&buf.timestamp_millis().to_string(), record);
            writeln!(buf, "{}", escape_line_breakers(&line.to_string()))
        });
    }
    let terminal = settings.file.is_none() && io::stderr().is_terminal();
    if std::env::var_os("RUST_LOG_STYLE").is_none() && terminal {
        builder.write_style(env_logger::WriteStyle::Always);
    }
    builder.target(env_logger::Target::Pipe(Box::new(Captured)));
    builder
}

/// Makes the process's log with `settings`; fails if it exists already.
fn install(settings: &LogSettings) -> io::Result<&'static Log> {
    let mut diagnostics = builder(settings);
    // Before RUST_LOG is read, so that a RUST_LOG directive for this very
    // target replaces it; any other directive is less specific and loses.
    diagnostics.filter_module(LISTENING_TARGET, LevelFilter::Info);
    diagnostics.filter_module(COUNTERS_TARGET, LevelFilter::Info);
    diagnostics.parse_env(env_logger::Env::default().default_filter_or("info"));
    let output = Output::open(settings.file.as_deref(), settings.sync)?;
    let log: &'static Log = Box::leak(Box::new(Log {
        queue: Queue::new(LOG_QUEUE_LINES, output),
        diagnostics: diagnostics.build(),
        records: builder(settings).filter_level(LevelFilter::Trace).build(),
        record_timeout: settings.record_timeout,
        file: settings.file.as_deref().map(|p| p.display().to_string()),
        stderr: settings.file.is_some().then(stderr_writer).transpose()?,
        errors: Default::default(),
        last_error: Mutex::new(None),
        reported: ERROR_KINDS.map(|kind| LogEvery::new(kind, SECOND)),
    }));
    LOG.set(log)
        .map_err(|_| io::Error::new(io::ErrorKind::AlreadyExists, "the log is set up already"))?;
    log.queue.start_writer(log)?;
    Ok(log)
}

/// A thread that writes the lines sent to it on stderr: a stalled stderr holds up no log file.
fn stderr_writer() -> io::Result<SyncSender<String>> {
    let (send, receive) = mpsc::sync_channel::<String>(16);
    helper_thread("log-reports").spawn(move || {
        for line in receive {
            let _ = io::stderr().write_all(line.as_bytes());
        }
    })?;
    Ok(send)
}

/// The default [`ReplySink`]: each record is a line in the log, written (and
/// synced, where the log is a file) before its clean close, whatever
/// `RUST_LOG` says; without [`init`], on stderr with the default settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogReplies;

impl ReplySink for LogReplies {
    fn record(&self, record: &Record<'_>) -> io::Result<()> {
        let default = || install(&LogSettings::default()).or_else(|e| LOG.get().copied().ok_or(e));
        let log = LOG.get().copied().map_or_else(default, Ok)?;
        let text = RecordText(record);
        let (level, event) = text.level_and_event();
        let reply = String::from_utf8_lossy(record.reply);
        let tls = record.tls;
        let fields: [(&str, &dyn ToValue); 11] = [
            ("event", &event),
            ("peer", &Value::from_display(&record.peer)),
            ("proxy", &record.proxy.map(|proxy| proxy.to_string())),
            ("reply", &Value::from(&*reply)),
            ("reply_lossy", &matches!(reply, Cow::Owned(_))),
            ("bytes", &record.reply.len()),
            ("duration_ms", &(record.duration.as_millis() as u64)),
            ("tls_version", &tls.map(|s| s.version)),
            ("tls_cipher", &tls.map(|s| s.cipher_suite)),
            ("tls_sni", &tls.and_then(|s| s.server_name.as_deref())),
            ("tls_client", &tls.and_then(|s| s.client_subject.as_deref())),
        ];
        let line = log.line(level, RECORD_TARGET, &fields, format_args!("{text}"));
        log.queue.push_and_wait(line, log.record_timeout)
    }
}

/// Waits up to `timeout` for the queued lines; returns how many are not written.
pub(crate) fn flush(timeout: Duration) -> u64 {
    LOG.get().map_or(0, |log| log.queue.flush(timeout))
}

/// A stopping server gives up on a log that does not take its records.
pub(crate) fn stop_waiting_for_the_log() {
    if let Some(log) = LOG.get() {
        log.queue.stop_waiting();
    }
}

/// Reopens the log file (SIGHUP, logrotate) with a first line that says so; false for stderr.
pub(crate) fn reopen() -> bool {
    let Some(log) = LOG.get().filter(|log| log.file.is_some()) else {
        return false;
    };
    let event = [("event", event::LOG_REOPENED)];
    let why = "the lines before this one are in the file it was renamed to";
    let message = format_args!("log file reopened (SIGHUP): {why}");
    let line = log.line(Level::Info, "prompt_server::logging", &event, message);
    log.queue.reopen(line);
    true
}

/// Housekeeping log lines dropped because the log queue was full.
pub(crate) fn lines_dropped() -> u64 {
    LOG.get().map_or(0, |log| log.queue.dropped_total())
}

/// Failed writes and syncs of the log, by kind (`ENOSPC`, `EIO`, ...).
pub(crate) fn write_errors() -> Vec<(&'static str, u64)> {
    let counts = LOG.get().into_iter().flat_map(|log| &log.errors);
    let counts = counts.map(|n| n.load(Ordering::Relaxed));
    ERROR_KINDS.into_iter().zip(counts).collect()
}

/// What is wrong with the log now, for the service manager's status:
/// "log failing: no space left on device", or `None` while it works.
pub(crate) fn failure() -> Option<String> {
    let log = LOG.get()?;
    let waiting = log.queue.failing()?;
    let why = lock(&log.last_error).clone()?;
    Some(format!("log failing: {why} ({waiting} lines waiting)"))
}

impl Observer for Log {
    fn failed(&self, error: &io::Error) {
        let errno = ERRNOS.iter().position(|&e| Some(e) == error.raw_os_error());
        let kind = errno.unwrap_or(ERRNOS.len());
        self.errors[kind].fetch_add(1, Ordering::Relaxed);
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
        let what = format!("takes writes again after {failures} failed {attempts} ({why})");
        let path = self.file.as_deref().unwrap_or_default();
        self.to_stderr(format!("prompt-server: the log file {path} {what}\n"));
        warn!(event = event::LOG_RECOVERED, failures = failures; "the log {what}");
    }

    fn reopen_failed(&self, error: &io::Error) {
        let path = self.file.as_deref().unwrap_or_default();
        let why = describe_io_error(error);
        let what = format!(
            "cannot reopen the log file {path}: {why}; still writing to the file it was renamed to"
        );
        self.to_stderr(format!("prompt-server: {what}\n"));
        warn!(event = event::LOG_REOPEN_FAILED; "{what}");
    }

    fn dropped(&self, count: u64) {
        warn!(
            event = event::LOG_DROPPED, dropped = count;
            "{count} log lines about turned-away clients and errors were dropped while the log was stalled"
        );
    }
}

thread_local! {
    /// The line `env_logger` just formatted on this thread.
    static FORMATTED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The client this thread is serving, for the panic log line.
    static SERVING: Cell<Option<SocketAddr>> = const { Cell::new(None) };
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

impl log::Log for Log {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.diagnostics.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.diagnostics.matches(record) {
            return;
        }
        let event = record.key_values().get(Key::from("event"));
        let class = class_of(event.as_ref().and_then(Value::to_borrowed_str));
        if class == Class::Housekeeping && self.queue.drops_housekeeping() {
            return;
        }
        self.diagnostics.log(record);
        let line = FORMATTED.take();
        // With a log file, stderr (a terminal, the journal) still says
        // where the server listens: `--port 0` is found out there.
        if record.target() == LISTENING_TARGET {
            let line = String::from_utf8_lossy(&line).into_owned();
            self.to_stderr(line);
        }
        self.queue.push(line, class);
    }

    fn flush(&self) {}
}

/// At most one line per interval about one kind of thing (busy, denied, ...),
/// so that a flood is not a flood of log lines; each says how many it held back.
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

    /// `Some(held back since the last line)` if a line may go out now.
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
}

/// Logs a `$level` line through `$every` ([`LogEvery`]) if one is due: its
/// `event`, the fields in brackets (each followed by a comma), `held_back`,
/// and the message with [`held_back_note`].
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

const SECOND: Duration = Duration::from_secs(1);
pub(crate) static BUSY_LINES: LogEvery = LogEvery::new(event::BUSY, SECOND);
pub(crate) static RATE_LIMITED_LINES: LogEvery = LogEvery::new(event::RATE_LIMITED, SECOND);
pub(crate) static DENIED_LINES: LogEvery = LogEvery::new(event::DENIED, SECOND);
pub(crate) static NOT_RECORDED_LINES: LogEvery = LogEvery::new(event::NOT_RECORDED, SECOND);
pub(crate) static TLS_HANDSHAKE_LINES: LogEvery = LogEvery::new(event::TLS_HANDSHAKE, SECOND);
/// Shared by every accept loop: out of descriptors, all of them fail at once.
pub(crate) static ACCEPT_ERROR_LINES: LogEvery =
    LogEvery::new(event::ACCEPT_ERROR, Duration::from_secs(5));

/// Logs how many lines of each kind are held back: a stopping server's last word.
pub(crate) fn report_held_back() {
    for every in [
        &BUSY_LINES,
        &RATE_LIMITED_LINES,
        &DENIED_LINES,
        &NOT_RECORDED_LINES,
        &TLS_HANDSHAKE_LINES,
        &ACCEPT_ERROR_LINES,
    ] {
        let n = std::mem::take(&mut lock(&every.state).1);
        let lines = if n == 1 { "line was" } else { "lines were" };
        if n > 0 {
            warn!(
                event = every.event, held_back = n;
                "{n} more {} {lines} held back since the last one", every.event
            );
        }
    }
}

/// " (N more since the last report)", or nothing when none were held back.
pub(crate) fn held_back_note(held_back: u64) -> String {
    match held_back {
        0 => String::new(),
        n => format!(" ({n} more since the last report)"),
    }
}

/// Names, while it lives, the client its thread serves in a panic line.
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

/// Reports panics as one escaped error line in the log instead of the default
/// message on bare stderr. A panic ends only its thread (one connection).
pub fn log_panics() {
    panic::set_hook(Box::new(|info| {
        let thread = thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let payload = info.payload();
        let message = (payload.downcast_ref::<&str>().copied())
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let message = Escaped(message.as_bytes());
        let at = info.location();
        let location = at.map_or(String::new(), |at| format!("{}:{}", at.file(), at.line()));
        let peer = SERVING.get();
        let serving = peer.map(|p| format!(" serving {p}")).unwrap_or_default();
        error!(
            event = event::PANIC, peer = peer.map(|peer| peer.to_string());
            "thread {thread} panicked at {location}{serving}: {message}"
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_duration_rule_names_the_bound_it_checks() {
        let bound = MAX_DURATION.as_secs().to_string();
        assert!(AT_MOST_A_YEAR.contains(&format!(" {bound} seconds")));
        let over = MAX_DURATION + Duration::from_secs(1);
        let settings = |record_timeout| LogSettings {
            record_timeout,
            ..LogSettings::default()
        };
        assert_eq!(settings(over).validate(), Err(AT_MOST_A_YEAR));
        assert_eq!(settings(MAX_DURATION).validate(), Ok(()));
    }

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

    #[test]
    fn log_every_lets_one_line_through_per_interval_and_counts_the_rest() {
        let every = LogEvery::new("x", Duration::from_secs(3600));
        assert_eq!(every.due(), Some(0));
        assert_eq!(every.due(), None);
        assert_eq!(every.due(), None);
        assert_eq!(std::mem::take(&mut lock(&every.state).1), 2);
        assert_eq!(std::mem::take(&mut lock(&every.state).1), 0);
        let now = LogEvery::new("x", Duration::ZERO);
        assert_eq!(now.due(), Some(0));
        assert_eq!(now.due(), Some(0));
        assert_eq!(held_back_note(0), "");
        assert_eq!(held_back_note(2), " (2 more since the last report)");
    }
}
