//! How a log line looks: a record's text, JSON lines, the `event` names, and
//! the escaping that keeps client bytes from forging or breaking a line:
//! [`Escaped`] in text (`log` escapes nothing), [`escape_line_breakers`] in JSON.

use std::fmt;

use log::Level;
use log::kv::{self, Key, Value, VisitSource};
use serde_json::{Map, Value as Json};

use super::queue::Class;
use super::{Record, ReplyEnd};
use crate::error::describe_io_error;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `[2026-11-25T12:41:26Z INFO  prompt_server::connection] 127.0.0.1:50312 said: "yes"`
    #[default]
    Text,
    /// `{"ts":"2026-11-25T12:41:26.123Z","level":"info","event":"reply",...}`
    Json,
}

/// Defines [`event`] and [`class_of`] from one list, each name once.
macro_rules! events {
    ($($name:ident = $text:literal $(, $class:ident)?;)*) => {
        /// The `event` field of every log line (the README lists them).
        pub(crate) mod event {
            $(pub(crate) const $name: &str = $text;)*
        }

        /// The queue class of a diagnostic's `event`: housekeeping unless marked.
        pub(super) fn class_of(event: Option<&str>) -> Class {
            match event {
                $($(Some($text) => Class::$class,)?)*
                _ => Class::Housekeeping,
            }
        }
    };
}

events! {
    ACCEPT_ERROR = "accept_error";
    ACCEPT_RESUMED = "accept_resumed";
    BUSY = "busy";
    CAPACITY = "capacity", Lifecycle;
    CONNECTED = "connected";
    COUNTERS = "counters", Lifecycle;
    CUT_OFF = "cut_off";
    DENIED = "denied";
    DISCONNECTED = "disconnected";
    FD_LIMIT = "fd_limit", Lifecycle;
    INHERITED = "inherited", Lifecycle;
    LISTENING = "listening", Lifecycle;
    LOG_DROPPED = "log_dropped", Lifecycle;
    LOG_RECOVERED = "log_recovered", Lifecycle;
    LOG_REOPENED = "log_reopened";
    LOG_REOPEN_FAILED = "log_reopen_failed", Lifecycle;
    METRICS = "metrics", Lifecycle;
    METRICS_SCRAPE_FAILED = "metrics_scrape_failed";
    NO_REPLY = "no_reply";
    NOTIFY_FAILED = "notify_failed", Lifecycle;
    NOT_RECORDED = "not_recorded";
    PANIC = "panic", Lifecycle;
    PROMPT_FAILED = "prompt_failed";
    PROXY_HEADER = "proxy_header";
    RATE_LIMITED = "rate_limited";
    READ = "read";
    READ_ERROR = "read_error";
    REPLY = "reply";
    SHUTDOWN = "shutdown", Lifecycle;
    SIGNAL = "signal", Lifecycle;
    SPAWN_FAILED = "spawn_failed";
    STOPPED = "stopped", Lifecycle;
    THREAD_PARKED = "thread_parked";
    TIMEOUT = "timeout";
    TLS_HANDSHAKE = "tls_handshake";
    TLS_RELOADED = "tls_reloaded", Lifecycle;
    TLS_RELOAD_FAILED = "tls_reload_failed", Lifecycle;
    TRUNCATED = "truncated";
    WAKE_FAILED = "wake_failed", Lifecycle;
}

/// A record's message, `127.0.0.1:50312 said: "yes"`, its level and `event`.
pub(crate) struct RecordText<'a>(pub(crate) &'a Record<'a>);

impl RecordText<'_> {
    pub(crate) fn level_and_event(&self) -> (Level, &'static str) {
        match self.0.end {
            ReplyEnd::Closed if self.0.reply.is_empty() => (Level::Info, event::NO_REPLY),
            ReplyEnd::Line | ReplyEnd::Closed => (Level::Info, event::REPLY),
            ReplyEnd::Truncated => (Level::Warn, event::TRUNCATED),
            ReplyEnd::TimedOut { .. } => (Level::Warn, event::TIMEOUT),
            ReplyEnd::CutOff => (Level::Warn, event::CUT_OFF),
            ReplyEnd::Failed(_) => (Level::Warn, event::READ_ERROR),
        }
    }
}

impl fmt::Display for RecordText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reply = self.0.reply;
        let (bytes, len) = (Escaped(reply), reply.len());
        write!(f, "{} ", self.0.peer)?;
        match &self.0.end {
            ReplyEnd::Line => write!(f, "said: {bytes}"),
            ReplyEnd::Closed if reply.is_empty() => write!(f, "closed without replying"),
            ReplyEnd::Closed => write!(f, "said: {bytes} (closed before newline)"),
            ReplyEnd::Truncated => write!(f, "said: {bytes} (truncated at {len} bytes)"),
            ReplyEnd::TimedOut { after } => {
                write!(f, "timed out after {}s ", after.as_secs_f64())?;
                write!(f, "without a full reply; got {bytes}")
            }
            ReplyEnd::CutOff => write!(f, "cut off by shutdown before a full reply; got {bytes}"),
            ReplyEnd::Failed(e) => write!(f, "read error: {}; got {bytes}", describe_io_error(e)),
        }?;
        // ` over TLSv1_3 TLS13_AES_256_GCM_SHA384, SNI "localhost", client "CN=alice"`
        let Some(tls) = self.0.tls else { return Ok(()) };
        write!(f, " over {} {}", tls.version, tls.cipher_suite)?;
        for (what, text) in [("SNI", &tls.server_name), ("client", &tls.client_subject)] {
            let Some(text) = text else { continue };
            write!(f, ", {what} {}", Escaped(text.as_bytes()))?;
        }
        Ok(())
    }
}

/// One line as a JSON object: `ts`, `level`, `event` (`log` if the call
/// named none), the other fields (a `None` one left out), and `message`.
pub(crate) fn json_line(ts: &str, record: &log::Record<'_>) -> Json {
    let mut object = Map::new();
    object.insert("ts".into(), ts.into());
    let level = record.level().as_str().to_lowercase();
    object.insert("level".into(), level.into());
    object.insert("event".into(), "log".into());
    // Visiting our own fields cannot fail.
    let _ = record.key_values().visit(&mut JsonFields(&mut object));
    object.insert("message".into(), record.args().to_string().into());
    Json::Object(object)
}

/// Escapes in JSON strings what serde_json leaves (it escapes only C0 controls) but
/// ends a line for some log tools, drives terminals or hides text: DEL, C1 controls
/// (NEL too), U+2028, U+2029, the invisible and bidirectional format characters.
pub(crate) fn escape_line_breakers(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        let hidden = matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}')
            || matches!(c, '\u{2060}'..='\u{2069}' | '\u{FEFF}');
        if c.is_control() || hidden {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

struct JsonFields<'a>(&'a mut Map<String, Json>);

impl<'kvs> VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let json = serde_json::to_value(value).map_err(kv::Error::boxed)?;
        if !json.is_null() {
            self.0.insert(key.as_str().into(), json);
        }
        Ok(())
    }
}

/// Client bytes in double quotes with Rust-style escapes (`"yes\r\u{1b}[31m\xFF"`): text
/// stays readable, whatever could affect a terminal or a log parser becomes visible.
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
    use std::net::SocketAddr;

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
                (
                    "peer",
                    Value::from_display(&"127.0.0.1:5".parse::<SocketAddr>().unwrap()),
                ),
                ("reply", Value::from("a\n\u{1b}[31m\"b")),
                ("bytes", Value::from(9u64)),
                ("reply_lossy", Value::from(false)),
            ],
        );
        assert_eq!(json["ts"], "2026-11-25T12:00:00.000Z");
        assert_eq!(json["level"], "warn");
        assert_eq!(json["event"], "reply");
        assert_eq!(json["peer"], "127.0.0.1:5");
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
            &[(
                "reply",
                Value::from("a\u{85}b\u{2028}c\u{7f}d\u{202e}e\u{200b}"),
            )],
        );
        let line = escape_line_breakers(&json.to_string());
        let hidden = ['\u{2028}', '\u{202e}', '\u{200b}'];
        assert!(
            !line.chars().any(|c| c.is_control() || hidden.contains(&c)),
            "{line}"
        );
        let back: Json = serde_json::from_str(&line).unwrap();
        assert_eq!(back["reply"], "a\u{85}b\u{2028}c\u{7f}d\u{202e}e\u{200b}");
    }

    #[test]
    fn json_event_defaults_to_log() {
        assert_eq!(record_json(format_args!("plain"), &[])["event"], "log");
    }
}
