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

/// When reading must be done by.
///
/// Before each read the socket's read timeout is set to the time left,
/// except for a first read whose timeout already stands at about that: an
/// accepted socket inherits the whole reply budget from the listener (see
/// `server`), which saves one `setsockopt` per connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    /// The whole time allowed, from the start.
    budget: Duration,
    /// The socket's read timeout stands at about the time left.
    timeout_set: bool,
}

impl Deadline {
    /// A deadline `budget` from now, the socket's timeout to be set for
    /// each read.
    pub(crate) fn after(budget: Duration) -> Self {
        Self::from(Instant::now(), budget)
    }

    /// A deadline at `at`.
    pub(crate) fn at(at: Instant) -> Self {
        Self::from(Instant::now(), at.saturating_duration_since(Instant::now()))
    }

    /// A deadline `budget` after `start`.
    pub(crate) fn from(start: Instant, budget: Duration) -> Self {
        Deadline {
            at: start + budget,
            budget,
            timeout_set: false,
        }
    }

    /// A deadline `budget` from now whose first read relies on the read
    /// timeout the socket already has.
    pub(crate) fn after_with_timeout_already_set(budget: Duration) -> Self {
        Deadline {
            timeout_set: true,
            ..Self::after(budget)
        }
    }

    /// The whole time allowed.
    pub(crate) fn budget(&self) -> Duration {
        self.budget
    }
}

/// Reads once into `buf`, giving up at `deadline` (if any).
pub(crate) fn read_before<S: DeadlineRead>(
    source: &mut S,
    buf: &mut [u8],
    deadline: Option<&mut Deadline>,
) -> ReadStep {
    if let Some(deadline) = deadline {
        let remaining = deadline.at.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return ReadStep::TimedOut;
        }
        // Only the first read can find the timeout already right.
        if !std::mem::replace(&mut deadline.timeout_set, false)
            && let Err(e) = source.set_read_timeout_for_next_read(remaining)
        {
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
