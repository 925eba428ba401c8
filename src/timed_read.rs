//! One read under a deadline: the step that both the PROXY header and the
//! reply are read with, so that a client that trickles bytes can never keep
//! a connection thread past its deadline.
//!
//! The deadline is turned into the socket's read timeout for each read (the
//! time left), so a read blocks in the kernel and costs no polling.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A byte stream whose read timeout can be set before each read: what
/// [`read_before`] needs to read under a deadline.
///
/// Implemented for [`TcpStream`]; the trait exists so that the property
/// tests can drive the very same readers with any chunking of the bytes.
pub(crate) trait DeadlineRead: Read {
    /// Makes the next read give up after `timeout`.
    fn set_read_timeout_for_next_read(&mut self, timeout: Duration) -> io::Result<()>;
}

impl DeadlineRead for &TcpStream {
    fn set_read_timeout_for_next_read(&mut self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// Bytes already read (after a PROXY header) served first, then the stream.
pub(crate) struct Prefixed<'a, S> {
    prefix: &'a [u8],
    stream: &'a mut S,
}

impl<'a, S> Prefixed<'a, S> {
    pub(crate) fn new(prefix: &'a [u8], stream: &'a mut S) -> Self {
        Prefixed { prefix, stream }
    }
}

impl<S: Read> Read for Prefixed<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.prefix.is_empty() {
            return self.stream.read(out);
        }
        let n = self.prefix.len().min(out.len());
        out[..n].copy_from_slice(&self.prefix[..n]);
        self.prefix = &self.prefix[n..];
        Ok(n)
    }
}

impl<S: DeadlineRead> DeadlineRead for Prefixed<'_, S> {
    fn set_read_timeout_for_next_read(&mut self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout_for_next_read(timeout)
    }
}

/// What one read under a deadline gave.
#[derive(Debug)]
pub(crate) enum ReadStep {
    Data(usize),
    /// The client closed its side.
    Closed,
    /// The deadline passed, before or during the read.
    TimedOut,
    Failed(io::Error),
}

/// Reads once into `buf`, giving up at `deadline`. With `set_timeout`, the
/// socket's read timeout is first set to the time left; without, the caller
/// knows it already stands at about that.
pub(crate) fn read_before<S: DeadlineRead>(
    source: &mut S,
    buf: &mut [u8],
    deadline: Option<Instant>,
    set_timeout: bool,
) -> ReadStep {
    if let Some(deadline) = deadline {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return ReadStep::TimedOut;
        }
        if set_timeout && let Err(e) = source.set_read_timeout_for_next_read(remaining) {
            return ReadStep::Failed(e);
        }
    }
    loop {
        return match source.read(buf) {
            Ok(0) => ReadStep::Closed,
            Ok(n) => ReadStep::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ReadStep::TimedOut
            }
            Err(e) => ReadStep::Failed(e),
        };
    }
}
