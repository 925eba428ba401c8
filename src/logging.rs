//! Logger set-up, and the escaping that keeps client bytes from forging or
//! breaking a log line.
//!
//! The `log` facade passes messages through untouched, so every client byte
//! that reaches a text log line goes through `Escaped`: control characters
//! (CR, LF, ESC, ...), quotes, backslashes and invalid UTF-8 all come out as
//! visible escapes, and one log record stays one line.
//!
//! Every log call also carries structured fields (`event`, `peer`, `reply`,
//! `bytes`, `duration_ms`, ...) as `log` key-values. The text format shows
//! only the message; the JSON format ([`LogFormat::Json`]) writes one object
//! per line with `ts`, `level`, the fields and the message, and lets
//! serde_json do the escaping, which handles any string.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::panic;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::kv::{self, Key, Value, VisitSource};
use log::{error, warn};
use serde_json::{Map, Value as Json};

use crate::log_sink::{Class, Delivery, LogSink};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `[2026-11-25T12:41:26Z INFO  prompt_server::connection] 127.0.0.1:50312 said: "yes"`
    #[default]
    Text,
    /// `{"ts":"2026-11-25T12:41:26.123Z","level":"info","event":"reply",...}`
    Json,
}

/// The target of the `listening on ADDR` line. It is logged at info whatever
/// `RUST_LOG` says (unless `RUST_LOG` names this target itself), since it is
/// the only place that says which port `--port 0` got.
pub(crate) const LISTENING_TARGET: &str = "prompt_server::listening";

/// Lines the log queue holds while the sink is slow: enough for a burst
/// of replies, small enough that a stalled sink is noticed soon.
const LOG_QUEUE_LINES: usize = 1024;

/// The queue in front of stderr; set once by [`init`].
static SINK: OnceLock<LogSink<io::Stderr>> = OnceLock::new();

thread_local! {
    /// What became of the last reply line this thread logged.
    static REPLY_DELIVERY: Cell<Delivery> = const { Cell::new(Delivery::Written) };
}

/// Starts logging to stderr at level info, unless `RUST_LOG` says
/// otherwise, writing `format`, through a queue of at most 1,024 waiting
/// lines (see the `log_sink` module).
///
/// `env_logger` filters and formats each record on the calling thread; the
/// formatted line then goes through the queue instead of straight to
/// stderr, so that a stalled sink never blocks the accept loop or the
/// signal thread.
///
/// # Errors
///
/// Fails if a logger is already installed, or the thread that writes the
/// log cannot be started.
pub fn init(format: LogFormat) -> io::Result<()> {
    let mut builder = env_logger::Builder::new();
    // Before RUST_LOG is read, so that a RUST_LOG directive for this very
    // target replaces it; any other directive is less specific and loses.
    builder.filter_module(LISTENING_TARGET, log::LevelFilter::Info);
    builder.parse_env(env_logger::Env::default().default_filter_or("info"));
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
    let format = builder.build();
    let sink = SINK.get_or_init(|| LogSink::new(LOG_QUEUE_LINES, io::stderr()));
    LogSink::start_writer(sink, |dropped| {
        warn!(
            event = event::LOG_DROPPED, dropped = dropped;
            "{dropped} log lines about turned-away clients and errors were dropped while the log was stalled"
        )
    })?;
    log::set_max_level(format.filter());
    log::set_boxed_logger(Box::new(QueuedLogger { format, sink }))
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Waits up to `timeout` for every queued log line to reach stderr, and
/// returns how many did not (0 without [`init`]).
pub(crate) fn flush(timeout: Duration) -> u64 {
    SINK.get().map_or(0, |sink| sink.flush(timeout))
}

/// Housekeeping log lines dropped because the log queue was full (0
/// without [`init`]).
pub(crate) fn lines_dropped() -> u64 {
    SINK.get().map_or(0, LogSink::dropped_total)
}

/// Makes callers that wait for their reply line to be written stop
/// waiting: a stopping server gives up on a stalled log.
pub(crate) fn stop_waiting_for_the_log() {
    if let Some(sink) = SINK.get() {
        sink.stop_waiting();
    }
}

/// Whether the last reply line this thread logged reached the log sink
/// (true when logging is not set up through [`init`], or the line was
/// filtered out by `RUST_LOG`).
pub(crate) fn reply_was_logged() -> bool {
    REPLY_DELIVERY.with(|delivery| delivery.replace(Delivery::Written)) == Delivery::Written
}

/// The logger [`init`] installs: `env_logger` filters and formats, the
/// queue delivers.
struct QueuedLogger {
    format: env_logger::Logger,
    sink: &'static LogSink<io::Stderr>,
}

thread_local! {
    /// The line `env_logger` just formatted on this thread.
    static FORMATTED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `env_logger`'s target: keeps the formatted line for [`QueuedLogger`].
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
        self.format.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.format.matches(record) {
            return;
        }
        let class = class_of(record);
        if self.sink.would_drop(class) {
            self.sink.count_dropped();
            return;
        }
        self.format.log(record);
        let line = FORMATTED.with(|line| std::mem::take(&mut *line.borrow_mut()));
        if line.is_empty() {
            return;
        }
        let delivery = self.sink.push(line, class);
        if class == Class::Reply {
            REPLY_DELIVERY.with(|last| last.set(delivery));
        }
    }

    fn flush(&self) {}
}

/// The `event` field of every log line, each name once, so that a call
/// and [`class_of`] cannot disagree on its spelling.
pub(crate) mod event {
    /// An `accept` failed (rate-limited).
    pub(crate) const ACCEPT_ERROR: &str = "accept_error";
    /// `accept` works again after failures.
    pub(crate) const ACCEPT_RESUMED: &str = "accept_resumed";
    /// A client turned away: no connection slot, or its address holds `--max-per-ip`.
    pub(crate) const BUSY: &str = "busy";
    /// `--max-connections` lowered at start-up to what the process can hold.
    pub(crate) const CAPACITY: &str = "capacity";
    /// A client connected (debug).
    pub(crate) const CONNECTED: &str = "connected";
    /// A client cut off at the shutdown deadline, with what it had sent.
    pub(crate) const CUT_OFF: &str = "cut_off";
    /// A client refused by the access rules, or not a trusted proxy.
    pub(crate) const DENIED: &str = "denied";
    /// A client's connection closed (debug).
    pub(crate) const DISCONNECTED: &str = "disconnected";
    /// The descriptor limit could not be raised.
    pub(crate) const FD_LIMIT: &str = "fd_limit";
    /// A socket passed down by the service manager is served.
    pub(crate) const INHERITED: &str = "inherited";
    /// The address a listener is bound to.
    pub(crate) const LISTENING: &str = "listening";
    /// How many housekeeping lines the full log queue dropped.
    pub(crate) const LOG_DROPPED: &str = "log_dropped";
    /// Where the metrics endpoint listens.
    pub(crate) const METRICS: &str = "metrics";
    /// A metrics scrape failed (debug).
    pub(crate) const METRICS_SCRAPE_FAILED: &str = "metrics_scrape_failed";
    /// A client closed without replying.
    pub(crate) const NO_REPLY: &str = "no_reply";
    /// The service manager could not be notified.
    pub(crate) const NOTIFY_FAILED: &str = "notify_failed";
    /// A thread panicked.
    pub(crate) const PANIC: &str = "panic";
    /// The prompt could not be sent.
    pub(crate) const PROMPT_FAILED: &str = "prompt_failed";
    /// A bad PROXY protocol header.
    pub(crate) const PROXY_HEADER: &str = "proxy_header";
    /// A client turned away by `--max-rate-per-ip`.
    pub(crate) const RATE_LIMITED: &str = "rate_limited";
    /// Bytes read from a client (trace).
    pub(crate) const READ: &str = "read";
    /// Reading a reply failed.
    pub(crate) const READ_ERROR: &str = "read_error";
    /// A client's reply.
    pub(crate) const REPLY: &str = "reply";
    /// A stop began, or reached its deadline.
    pub(crate) const SHUTDOWN: &str = "shutdown";
    /// SIGINT or SIGTERM received.
    pub(crate) const SIGNAL: &str = "signal";
    /// No thread could be started for a client.
    pub(crate) const SPAWN_FAILED: &str = "spawn_failed";
    /// The summary at the end of a stop.
    pub(crate) const STOPPED: &str = "stopped";
    /// A finished connection thread parked (trace).
    pub(crate) const THREAD_PARKED: &str = "thread_parked";
    /// A reply not complete by its deadline.
    pub(crate) const TIMEOUT: &str = "timeout";
    /// A reply cut at `--max-reply-bytes`.
    pub(crate) const TRUNCATED: &str = "truncated";
    /// A stop could not wake an accept loop.
    pub(crate) const WAKE_FAILED: &str = "wake_failed";
}

/// Which queue class a record's `event` puts it in.
fn class_of(record: &log::Record<'_>) -> Class {
    let value = record.key_values().get(Key::from("event"));
    let name = value.as_ref().and_then(Value::to_borrowed_str);
    match name {
        Some(
            event::REPLY
            | event::NO_REPLY
            | event::TRUNCATED
            | event::TIMEOUT
            | event::READ_ERROR
            | event::CUT_OFF
            | event::PROMPT_FAILED
            | event::PROXY_HEADER,
        ) => Class::Reply,
        Some(
            event::LISTENING
            | event::SIGNAL
            | event::SHUTDOWN
            | event::STOPPED
            | event::CAPACITY
            | event::FD_LIMIT
            | event::PANIC
            | event::LOG_DROPPED
            | event::WAKE_FAILED
            | event::METRICS
            | event::INHERITED
            | event::NOTIFY_FAILED,
        ) => Class::Lifecycle,
        _ => Class::Housekeeping,
    }
}

/// One record as a JSON object: `ts`, `level`, `event` (`log` if the call
/// named none), the record's other fields, and `message`.
fn json_line(ts: &str, record: &log::Record<'_>) -> Json {
    let mut object = Map::new();
    object.insert("ts".into(), ts.into());
    object.insert(
        "level".into(),
        record.level().as_str().to_lowercase().into(),
    );
    object.insert("event".into(), "log".into());
    let mut fields = JsonFields(&mut object);
    // Visiting our own fields cannot fail.
    let _ = record.key_values().visit(&mut fields);
    object.insert("message".into(), record.args().to_string().into());
    Json::Object(object)
}

/// JSON needs only C0 controls escaped, and serde_json escapes no more;
/// but DEL, C1 controls (NEL among them) and the Unicode line and paragraph
/// separators end a line for some log tools, or drive terminals. They can
/// only stand inside JSON strings here, where `\uXXXX` means the same.
fn escape_line_breakers(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

struct JsonFields<'a>(&'a mut Map<String, Json>);

/// Tells a null value (a `None` field) apart, so that it can be left out.
struct IsNull(bool);

impl<'v> kv::VisitValue<'v> for IsNull {
    fn visit_any(&mut self, _: Value<'_>) -> Result<(), kv::Error> {
        Ok(())
    }

    fn visit_null(&mut self) -> Result<(), kv::Error> {
        self.0 = true;
        Ok(())
    }
}

impl<'kvs> VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let mut null = IsNull(false);
        value.visit(&mut null)?;
        if null.0 {
            return Ok(());
        }
        let json = if let Some(b) = value.to_bool() {
            Json::from(b)
        } else if let Some(n) = value.to_u64() {
            Json::from(n)
        } else if let Some(n) = value.to_i64() {
            Json::from(n)
        } else if let Some(n) = value.to_f64() {
            Json::from(n)
        } else {
            Json::from(value.to_string())
        };
        self.0.insert(key.as_str().to_string(), json);
        Ok(())
    }
}

/// A reply as JSON can carry it: the text, decoded lossily if it is not
/// UTF-8, and whether it had to be.
pub(crate) fn reply_text(bytes: &[u8]) -> (std::borrow::Cow<'_, str>, bool) {
    let text = String::from_utf8_lossy(bytes);
    let lossy = matches!(text, std::borrow::Cow::Owned(_));
    (text, lossy)
}

thread_local! {
    /// The client this thread is serving, for the panic log line; set by a
    /// [`ServingPeer`] guard for as long as the connection lasts.
    static SERVING: Cell<Option<SocketAddr>> = const { Cell::new(None) };
}

/// Names, while it lives, the client the current thread serves in any
/// panic line it logs. Dropped when the connection ends, so a thread
/// parked in the thread cache never reports a client it no longer serves.
#[must_use = "the peer is named only while the guard lives"]
pub(crate) struct ServingPeer(());

impl ServingPeer {
    pub(crate) fn set(peer: SocketAddr) -> Self {
        SERVING.with(|current| current.set(Some(peer)));
        ServingPeer(())
    }
}

impl Drop for ServingPeer {
    fn drop(&mut self) {
        SERVING.with(|current| current.set(None));
    }
}

/// Reports panics as one escaped error line in the log instead of the
/// default multi-line message on bare stderr. A panic ends only the thread it
/// happens on; for a connection thread, that one connection.
pub fn log_panics() {
    panic::set_hook(Box::new(|info| {
        let thread = thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info
            .location()
            .map(|at| format!("{}:{}", at.file(), at.line()))
            .unwrap_or_default();
        match SERVING.with(Cell::get) {
            Some(peer) => error!(
                event = event::PANIC, peer:% = peer;
                "thread {thread} panicked at {location} serving {peer}: {}",
                Escaped(message.as_bytes())
            ),
            None => error!(
                event = event::PANIC;
                "thread {thread} panicked at {location}: {}",
                Escaped(message.as_bytes())
            ),
        }
    }));
}

/// At most one log line per interval about one kind of thing (busy,
/// denied, accept failures), so that a flood of turned-away clients does
/// not become a flood of log lines. Each line that does go out says how
/// many were held back since the last one.
#[derive(Debug)]
pub(crate) struct LogEvery {
    interval: Duration,
    /// When a line last went out, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogEvery {
    pub(crate) const fn new(interval: Duration) -> Self {
        LogEvery {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last line)` if a line may go out now;
    /// `None` (and one more held back) otherwise.
    pub(crate) fn due(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, held_back) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < self.interval) {
            *held_back += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(held_back))
    }
}

/// Lines about clients turned away busy (`--max-connections`, `--max-per-ip`).
pub(crate) static BUSY_LINES: LogEvery = LogEvery::new(Duration::from_secs(1));
/// Lines about clients turned away by `--max-rate-per-ip`.
pub(crate) static RATE_LIMITED_LINES: LogEvery = LogEvery::new(Duration::from_secs(1));
/// Lines about clients refused (access rules, untrusted proxies).
pub(crate) static DENIED_LINES: LogEvery = LogEvery::new(Duration::from_secs(1));

/// " (N more since the last report)", or nothing when none were held back.
pub(crate) fn held_back_note(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(" ({held_back} more since the last report)")
    }
}

/// Client bytes shown in double quotes with Rust-style escapes, for example
/// `"yes\r\u{1b}[31m\xFF"`: valid UTF-8 text stays readable, everything that
/// could affect a terminal or a log parser becomes visible.
pub(crate) struct Escaped<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    // Debug-escaping would turn ' into \' inside double quotes.
                    '\'' => f.write_str("'")?,
                    c => write!(f, "{}", c.escape_debug())?,
                }
            }
            for byte in chunk.invalid() {
                write!(f, "\\x{byte:02X}")?;
            }
        }
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(bytes: &[u8]) -> String {
        Escaped(bytes).to_string()
    }

    #[test]
    fn plain_text_is_quoted_as_is() {
        assert_eq!(escaped(b"yes"), r#""yes""#);
        assert_eq!(
            escaped("don't, caf\u{e9}".as_bytes()),
            "\"don't, caf\u{e9}\""
        );
    }

    #[test]
    fn control_characters_and_quotes_are_escaped() {
        assert_eq!(
            escaped(b"a\r\nb\t\x1b[31m\0\"\\"),
            r#""a\r\nb\t\u{1b}[31m\0\"\\""#
        );
        // Right-to-left override, which reorders what a terminal shows.
        assert_eq!(escaped("x\u{202e}y".as_bytes()), r#""x\u{202e}y""#);
    }

    #[test]
    fn invalid_utf8_is_shown_as_hex() {
        assert_eq!(escaped(b"ok\xff\xfe!"), r#""ok\xFF\xFE!""#);
    }

    #[test]
    fn escaped_output_never_holds_a_control_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let text = escaped(&all);
        assert!(!text.chars().any(char::is_control), "{text}");
    }

    fn record_json(args: fmt::Arguments<'_>, fields: &[(&str, Value<'_>)]) -> Json {
        let fields: Vec<(&str, Value<'_>)> = fields.to_vec();
        let record = log::Record::builder()
            .args(args)
            .level(log::Level::Warn)
            .key_values(&fields)
            .build();
        json_line("2026-11-25T12:00:00.000Z", &record)
    }

    #[test]
    fn json_line_has_the_fields_and_stays_one_line() {
        let json = record_json(
            format_args!("line one\nline two"),
            &[
                ("event", Value::from("reply")),
                ("peer", Value::from("127.0.0.1:5")),
                ("reply", Value::from("a\n\u{1b}[31m\"b")),
                ("bytes", Value::from(9u64)),
                ("reply_lossy", Value::from(false)),
            ],
        );
        assert_eq!(json["ts"], "2026-11-25T12:00:00.000Z");
        assert_eq!(json["level"], "warn");
        assert_eq!(json["event"], "reply");
        assert_eq!(json["reply"], "a\n\u{1b}[31m\"b");
        assert_eq!(json["bytes"], 9);
        assert_eq!(json["reply_lossy"], false);
        let line = json.to_string();
        assert!(!line.chars().any(char::is_control), "{line}");
        let back: Json = serde_json::from_str(&line).unwrap();
        assert_eq!(back, json);
    }

    #[test]
    fn json_leaves_out_absent_fields() {
        let none: Option<&str> = None;
        let json = record_json(
            format_args!("x"),
            &[("proxy", log::kv::ToValue::to_value(&none))],
        );
        assert!(json.get("proxy").is_none(), "{json}");
    }

    #[test]
    fn json_lines_escape_every_line_breaker() {
        let json = record_json(
            format_args!("m"),
            &[("reply", Value::from("a\u{85}b\u{2028}c\u{7f}"))],
        );
        let line = escape_line_breakers(&json.to_string());
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{2028}'),
            "{line}"
        );
        let back: Json = serde_json::from_str(&line).unwrap();
        assert_eq!(back["reply"], "a\u{85}b\u{2028}c\u{7f}");
    }

    #[test]
    fn json_event_defaults_to_log() {
        assert_eq!(record_json(format_args!("plain"), &[])["event"], "log");
    }

    #[test]
    fn invalid_utf8_replies_are_flagged_lossy() {
        assert_eq!(reply_text(b"yes"), ("yes".into(), false));
        let (text, lossy) = reply_text(b"y\xffs");
        assert_eq!(text, "y\u{fffd}s");
        assert!(lossy);
    }

    #[test]
    fn log_every_lets_one_line_through_per_interval_and_counts_the_rest() {
        let every = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(every.due(), Some(0));
        assert_eq!(every.due(), None);
        assert_eq!(every.due(), None);
        let now = LogEvery::new(Duration::ZERO);
        assert_eq!(now.due(), Some(0));
        assert_eq!(now.due(), Some(0));
        assert_eq!(held_back_note(0), "");
        assert_eq!(held_back_note(2), " (2 more since the last report)");
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
}
