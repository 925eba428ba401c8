//! Logger set-up, and the escaping that keeps client bytes from forging or
//! breaking a log line.
//!
//! The `log` facade passes messages through untouched, so every client byte
//! that reaches a log line goes through [`Escaped`]: control characters
//! (CR, LF, ESC, ...), quotes, backslashes and invalid UTF-8 all come out as
//! visible escapes, and one log record stays one line.

use std::fmt;
use std::io;
use std::panic;
use std::thread;

use log::error;

/// Starts `env_logger` on stderr at level info, unless `RUST_LOG` says
/// otherwise.
pub fn init() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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
        error!(
            "thread {thread} panicked at {location}: {}",
            Escaped(message.as_bytes())
        );
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

    #[test]
    fn io_errors_read_as_a_phrase() {
        let error = io::Error::from_raw_os_error(98);
        assert_eq!(describe_io_error(&error), "address already in use");
        let custom = io::Error::other("Something odd");
        assert_eq!(describe_io_error(&custom), "something odd");
    }
}
