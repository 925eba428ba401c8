//! The library's [`Error`], and the one place an I/O error is put into
//! words for a log line or an error message.

use std::fmt;
use std::io;

/// Why [`bind`](crate::bind), [`listeners`](crate::listeners) or
/// [`run`](crate::run) failed: what the server was doing and the I/O error
/// that stopped it (match on [`kind`](Error::kind)), reading well after
/// `error:`: "cannot listen on 0.0.0.0:1337: address already in use".
#[derive(Debug)]
pub struct Error {
    doing: String,
    io: io::Error,
}

impl Error {
    pub(crate) fn new(doing: impl Into<String>, io: io::Error) -> Self {
        let doing = doing.into();
        Error { doing, io }
    }

    /// The kind of the I/O error, e.g. [`io::ErrorKind::AddrInUse`].
    pub fn kind(&self) -> io::ErrorKind {
        self.io.kind()
    }

    /// The I/O error itself.
    pub fn io_error(&self) -> &io::Error {
        &self.io
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.doing, describe_io_error(&self.io))
    }
}

/// No `source`: the message already says what the I/O error says, and an
/// error chain printer (anyhow's `{:#}`) would say it twice.
impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(error: Error) -> Self {
        io::Error::new(error.kind(), error.to_string())
    }
}

/// The OS's description of an I/O error, to read well after a colon: without
/// its "(os error N)", and lowered if it starts with a capitalised word (a
/// name such as `NOTIFY_SOCKET` is kept).
pub(crate) fn describe_io_error(error: &io::Error) -> String {
    let text = error.to_string();
    let text = match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => &text[..at],
        _ => &text,
    };
    let mut chars = text.chars();
    match (chars.next(), chars.clone().next()) {
        (Some(first), Some(second)) if first.is_uppercase() && second.is_lowercase() => {
            first.to_lowercase().chain(chars).collect()
        }
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_as_lower_case_text_without_the_number() {
        let error = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(describe_io_error(&error), "address already in use");
        let custom = io::Error::other("Something odd");
        assert_eq!(describe_io_error(&custom), "something odd");
        let named = io::Error::other("NOTIFY_SOCKET=x is neither a path nor @name");
        assert_eq!(
            describe_io_error(&named),
            "NOTIFY_SOCKET=x is neither a path nor @name"
        );
    }

    #[test]
    fn the_message_names_what_failed_and_the_kind_survives() {
        let error = Error::new(
            "cannot listen on 127.0.0.1:1337",
            io::Error::from_raw_os_error(libc::EADDRINUSE),
        );
        assert_eq!(
            error.to_string(),
            "cannot listen on 127.0.0.1:1337: address already in use"
        );
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(io::Error::from(error).kind(), io::ErrorKind::AddrInUse);
    }
}
