//! Logger set-up, and the escaping that keeps client bytes from forging or
//! breaking a log line.
//!
//! The `log` facade passes messages through untouched, so every client byte
//! that reaches a text log line goes through [`Escaped`]: control characters
//! (CR, LF, ESC, ...), quotes, backslashes and invalid UTF-8 all come out as
//! visible escapes, and one log record stays one line.
//!
//! Every log call also carries structured fields (`event`, `peer`, `reply`,
//! `bytes`, `duration_ms`, ...) as `log` key-values. The text format shows
//! only the message; the JSON format ([`LogFormat::Json`]) writes one object
//! per line with `ts`, `level`, the fields and the message, and lets
//! serde_json do the escaping, which handles any string.

use std::fmt;
use std::io::{self, Write};
use std::panic;
use std::thread;

use log::error;
use log::kv::{self, Key, Value, VisitSource};
use serde_json::{Map, Value as Json};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `[2026-11-25T12:41:26Z INFO  prompt_server::connection] 127.0.0.1:50312 said: "yes"`
    Text,
    /// `{"ts":"2026-11-25T12:41:26.123Z","level":"info","event":"reply",...}`
    Json,
}

/// The target of the `listening on ADDR` line. It is logged at info whatever
/// `RUST_LOG` says (unless `RUST_LOG` names this target itself), since it is
/// the only place that says which port `--port 0` got.
pub const LISTENING_TARGET: &str = "prompt_server::listening";

/// Starts `env_logger` on stderr at level info, unless `RUST_LOG` says
/// otherwise, writing `format`.
pub fn init(format: LogFormat) {
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
    builder.init();
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
pub fn reply_text(bytes: &[u8]) -> (std::borrow::Cow<'_, str>, bool) {
    let text = String::from_utf8_lossy(bytes);
    let lossy = matches!(text, std::borrow::Cow::Owned(_));
    (text, lossy)
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
        match crate::connection::serving_peer() {
            Some(peer) => error!(
                event = "panic", peer:% = peer;
                "thread {thread} panicked at {location} serving {peer}: {}",
                Escaped(message.as_bytes())
            ),
            None => error!(
                event = "panic";
                "thread {thread} panicked at {location}: {}",
                Escaped(message.as_bytes())
            ),
        }
    }));
}

/// Client bytes shown in double quotes with Rust-style escapes, for example
/// `"yes\r\u{1b}[31m\xFF"`: valid UTF-8 text stays readable, everything that
/// could affect a terminal or a log parser becomes visible.
pub struct Escaped<'a>(pub &'a [u8]);

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

/// The OS's description of an I/O error, in lower case and without the
/// "(os error N)" suffix, to read well after a colon in a message:
/// "cannot listen on 0.0.0.0:1337: address already in use".
pub fn describe_io_error(error: &io::Error) -> String {
    let text = error.to_string();
    let text = match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => &text[..at],
        _ => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
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
    fn io_errors_read_as_a_phrase() {
        let error = io::Error::from_raw_os_error(98);
        assert_eq!(describe_io_error(&error), "address already in use");
        let custom = io::Error::other("Something odd");
        assert_eq!(describe_io_error(&custom), "something odd");
    }
}
