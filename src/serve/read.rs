//! Where client bytes are read and the prompt is written, each under a
//! deadline, so that a client that trickles bytes (or takes the prompt a
//! byte at a time) can never keep a connection thread past its budget.
//!
//! - [`read_before`]: one read under a deadline, the step the PROXY header
//!   and the reply are read with;
//! - [`read_reply`]: one reply line, where the size cap and the whole-reply
//!   deadline are enforced. A reply is the bytes up to the first `\n`, with
//!   `\n` or `\r\n` stripped (telnet sends `\r\n`); TCP may deliver it in
//!   any number of pieces, and whatever arrived is kept, however reading
//!   stopped;
//! - [`write_before`]: the whole prompt under one deadline.
//!
//! A deadline becomes the socket's timeout for each call (the time left),
//! so a call blocks in the kernel and costs no polling.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use log::trace;

use crate::logging::event;
use crate::record::ReplyEnd;

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

/// Writes all of `bytes` by `deadline`: the socket's write timeout is the
/// time left before each write, so a client that takes a byte at a time
/// still has one budget for the whole prompt. The first write relies on the
/// timeout the socket inherited from the listener (the whole budget).
pub(crate) fn write_before(
    mut stream: &TcpStream,
    mut bytes: &[u8],
    deadline: &mut Deadline,
) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if !std::mem::replace(&mut deadline.timeout_set, false) {
            stream.set_write_timeout(Some(left))?;
        }
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Most bytes asked of the socket in one read. Reads land in a buffer of
/// this size on the stack, and the reply's heap buffer is only allocated
/// once bytes arrive, so a client that connects and stays silent costs no
/// heap memory (it matters with thousands of idle clients). It holds a
/// default-cap reply with its "\r\n" in one read.
const READ_CHUNK: usize = 1026;

/// One client's reply: the bytes that arrived (at most the cap) and why
/// reading stopped.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The reply, without its line terminator, never longer than the cap.
    pub(crate) bytes: Vec<u8>,
    /// Why reading stopped.
    pub(crate) end: ReplyEnd,
}

/// Reads one reply line from `source`, keeping at most `max_reply_bytes` of
/// it, and giving up at `deadline` (if any) however the bytes trickle in.
///
/// `peer` only labels the trace lines that show each read.
pub(crate) fn read_reply<S: DeadlineRead>(
    source: &mut S,
    peer: SocketAddr,
    max_reply_bytes: usize,
    mut deadline: Option<Deadline>,
) -> Reply {
    // Room for a full-length reply and its "\r\n": only past that is a reply
    // known to be too long.
    let limit = max_reply_bytes.saturating_add(2);
    let mut chunk = [0u8; READ_CHUNK];
    let mut buf = Vec::new();
    loop {
        let want = (limit - buf.len()).min(READ_CHUNK);
        let n = match read_before(source, &mut chunk[..want], deadline.as_mut()) {
            ReadStep::Data(n) => n,
            ReadStep::Closed => return finish(buf, max_reply_bytes, ReplyEnd::Closed),
            ReadStep::TimedOut => {
                let after = deadline.map(|d| d.budget()).unwrap_or_default();
                return finish(buf, max_reply_bytes, ReplyEnd::TimedOut { after });
            }
            ReadStep::Failed(e) => return finish(buf, max_reply_bytes, ReplyEnd::Failed(e)),
        };
        trace!(event = event::READ, peer:% = peer, bytes = n; "{peer}: read {n} bytes");
        let start = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(newline) = buf[start..].iter().position(|&b| b == b'\n') {
            buf.truncate(start + newline);
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return finish(buf, max_reply_bytes, ReplyEnd::Line);
        }
        if buf.len() >= limit {
            return finish(buf, max_reply_bytes, ReplyEnd::Truncated);
        }
    }
}

/// Applies the cap to what arrived: a reply over it is cut and reported as
/// truncated, whatever else ended it.
fn finish(mut bytes: Vec<u8>, max_reply_bytes: usize, end: ReplyEnd) -> Reply {
    let end = if bytes.len() > max_reply_bytes {
        bytes.truncate(max_reply_bytes);
        ReplyEnd::Truncated
    } else {
        end
    };
    Reply { bytes, end }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::io::{self, Read};
    use std::time::Duration;

    /// Hands out a byte string in the given pieces, then EOF.
    struct Chunked {
        chunks: VecDeque<Vec<u8>>,
    }

    impl Chunked {
        fn new<I: IntoIterator<Item = Vec<u8>>>(chunks: I) -> Self {
            Chunked {
                chunks: chunks.into_iter().collect(),
            }
        }
    }

    impl Read for Chunked {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let Some(chunk) = self.chunks.front_mut() else {
                return Ok(0);
            };
            let n = chunk.len().min(out.len());
            out[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
            Ok(n)
        }
    }

    impl DeadlineRead for Chunked {
        fn set_read_timeout_for_next_read(&mut self, _: Duration) -> io::Result<()> {
            Ok(())
        }
    }

    fn read(chunks: &[&[u8]], max: usize) -> Reply {
        let peer = "127.0.0.1:9".parse().unwrap();
        let mut source = Chunked::new(chunks.iter().map(|c| c.to_vec()));
        read_reply(&mut source, peer, max, None)
    }

    #[test]
    fn line_terminators_are_stripped() {
        let reply = read(&[b"yes\r\n"], 1024);
        assert_eq!(reply.bytes, b"yes");
        assert!(matches!(reply.end, ReplyEnd::Line));
        assert_eq!(read(&[b"yes\n"], 1024).bytes, b"yes");
        assert_eq!(read(&[b"\n"], 1024).bytes, b"");
    }

    #[test]
    fn split_reply_is_assembled_and_rest_ignored() {
        let reply = read(&[b"y", b"e", b"s\r", b"\nsecond line\n"], 1024);
        assert_eq!(reply.bytes, b"yes");
        assert!(matches!(reply.end, ReplyEnd::Line));
    }

    #[test]
    fn eof_before_newline_keeps_what_came() {
        let reply = read(&[b"may", b"be"], 1024);
        assert_eq!(reply.bytes, b"maybe");
        assert!(matches!(reply.end, ReplyEnd::Closed));
        let nothing = read(&[], 1024);
        assert!(nothing.bytes.is_empty());
        assert!(matches!(nothing.end, ReplyEnd::Closed));
    }

    #[test]
    fn reply_of_exactly_the_cap_is_whole() {
        let reply = read(&[b"abcd\r\n"], 4);
        assert_eq!(reply.bytes, b"abcd");
        assert!(matches!(reply.end, ReplyEnd::Line));
    }

    #[test]
    fn reply_past_the_cap_is_truncated() {
        for input in [&b"abcde\n"[..], b"abcde", b"abcdefghijklmnop"] {
            let reply = read(&[input], 4);
            assert_eq!(reply.bytes, b"abcd", "{input:?}");
            assert!(matches!(reply.end, ReplyEnd::Truncated), "{input:?}");
        }
    }

    #[test]
    fn prefixed_bytes_come_first() {
        let peer = "127.0.0.1:9".parse().unwrap();
        let mut rest = Chunked::new([b"s\n".to_vec()]);
        let reply = read_reply(&mut Prefixed::new(b"ye", &mut rest), peer, 1024, None);
        assert_eq!(reply.bytes, b"yes");
    }

    #[test]
    fn expired_deadline_times_out_without_reading() {
        let peer = "127.0.0.1:9".parse().unwrap();
        let mut source = Chunked::new([b"yes\n".to_vec()]);
        let deadline = Deadline::after_with_timeout_already_set(Duration::ZERO);
        let reply = read_reply(&mut source, peer, 1024, Some(deadline));
        assert!(matches!(reply.end, ReplyEnd::TimedOut { .. }));
        assert!(reply.bytes.is_empty());
    }

    /// Splits `bytes` at the given cut points (taken modulo its length).
    fn split_at(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        points.dedup();
        // An empty piece would read as EOF, which a socket never delivers mid-stream.
        points
            .windows(2)
            .map(|w| bytes[w[0]..w[1]].to_vec())
            .collect()
    }

    proptest! {
        /// However a reply is split into pieces, it reads back as if it had
        /// come in one, and never longer than the cap.
        #[test]
        fn any_chunking_reads_back_identically(
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
            max in 1usize..2000,
        ) {
            let peer = "127.0.0.1:9".parse().unwrap();
            let whole = read_reply(&mut Chunked::new([payload.clone()]), peer, max, None);
            let pieces = read_reply(&mut Chunked::new(split_at(&payload, &cuts)), peer, max, None);
            prop_assert_eq!(&whole.bytes, &pieces.bytes);
            prop_assert_eq!(format!("{:?}", whole.end), format!("{:?}", pieces.end));
            prop_assert!(pieces.bytes.len() <= max);

            // And it is the first line of the payload, cut at the cap.
            let line_end = payload.iter().position(|&b| b == b'\n');
            let mut expected = payload[..line_end.unwrap_or(payload.len())].to_vec();
            if line_end.is_some() && expected.last() == Some(&b'\r') {
                expected.pop();
            }
            let over = expected.len() > max;
            expected.truncate(max);
            prop_assert_eq!(&pieces.bytes, &expected);
            prop_assert_eq!(matches!(pieces.end, ReplyEnd::Truncated), over);
        }
    }
}
