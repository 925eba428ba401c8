//! Where client bytes are read and the prompt is written, each under a
//! deadline, so that a client that trickles bytes (or takes the prompt a
//! byte at a time) can never keep a connection thread past its budget. A
//! deadline becomes the socket's timeout for each call (the time left), so
//! a call blocks in the kernel and costs no polling.
//!
//! A reply is the bytes up to the first `\n`, with `\n` or `\r\n` stripped
//! (telnet sends `\r\n`), at most the cap; TCP may deliver it in any number
//! of pieces, and whatever arrived is kept, however reading stopped.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use log::trace;

use crate::logging::event;
use crate::record::ReplyEnd;

/// A byte stream whose read timeout can be set before each read; a trait so
/// that the property tests can drive the very same readers with any chunking.
pub(crate) trait DeadlineRead: Read {
    fn set_read_timeout_for_next_read(&mut self, timeout: Duration) -> io::Result<()>;
}

impl DeadlineRead for &TcpStream {
    fn set_read_timeout_for_next_read(&mut self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// Bytes already read (after a PROXY header) first, then the stream.
impl<S: DeadlineRead> DeadlineRead for io::Chain<&[u8], S> {
    fn set_read_timeout_for_next_read(&mut self, timeout: Duration) -> io::Result<()> {
        self.get_mut().1.set_read_timeout_for_next_read(timeout)
    }
}

/// What one read under a deadline gave.
#[derive(Debug)]
pub(crate) enum ReadStep {
    Data(usize),
    Closed,
    /// The deadline passed, before or during the read.
    TimedOut,
    Failed(io::Error),
}

/// When reading (or writing) must be done by.
///
/// Before each call the socket's timeout is set to the time left, except
/// for a first call whose timeout already stands at about that: an accepted
/// socket inherits the whole budget from the listener, which saves one
/// `setsockopt` per connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    /// The whole time allowed, from the start.
    budget: Duration,
    timeout_set: bool,
}

impl Deadline {
    pub(crate) fn after(budget: Duration) -> Self {
        Self::from(Instant::now(), budget)
    }

    pub(crate) fn at(at: Instant) -> Self {
        Self::from(Instant::now(), at.saturating_duration_since(Instant::now()))
    }

    pub(crate) fn from(start: Instant, budget: Duration) -> Self {
        Deadline {
            at: start + budget,
            budget,
            timeout_set: false,
        }
    }

    /// A deadline `budget` from now whose first call relies on the timeout
    /// the socket already has.
    pub(crate) fn after_with_timeout_already_set(budget: Duration) -> Self {
        Deadline {
            timeout_set: true,
            ..Self::after(budget)
        }
    }
}

/// Reads once into `buf`, giving up at `deadline` (if any).
pub(crate) fn read_before<S: DeadlineRead>(
    source: &mut S,
    buf: &mut [u8],
    deadline: Option<&mut Deadline>,
) -> ReadStep {
    if let Some(deadline) = deadline {
        let left = deadline.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ReadStep::TimedOut;
        }
        // Only the first read can find the timeout already right.
        if !std::mem::replace(&mut deadline.timeout_set, false)
            && let Err(e) = source.set_read_timeout_for_next_read(left)
        {
            return ReadStep::Failed(e);
        }
    }
    loop {
        return match source.read(buf) {
            Ok(0) => ReadStep::Closed,
            Ok(n) => ReadStep::Data(n),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ReadStep::TimedOut,
                _ => ReadStep::Failed(e),
            },
        };
    }
}

/// Writes all of `bytes` by `deadline`, so that a client that takes a byte
/// at a time still has one budget for the whole prompt.
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

/// Most bytes asked of the socket in one read: enough for a default-cap
/// reply and its "\r\n". Reads land in a buffer on the stack, and the
/// reply's heap buffer is only allocated once bytes arrive, so a silent
/// client costs no heap memory (it matters with thousands of idle clients).
const READ_CHUNK: usize = 1026;

/// One client's reply and why reading stopped.
#[derive(Debug)]
pub(crate) struct Reply {
    /// Without its line terminator, never longer than the cap.
    pub(crate) bytes: Vec<u8>,
    pub(crate) end: ReplyEnd,
    /// The last read took less than it asked for: nothing more was waiting
    /// then (a close need not look for unread bytes).
    pub(crate) drained: bool,
}

/// Reads one reply line from `source`, keeping at most `max_reply_bytes` of
/// it (a reply over the cap is cut and reported as truncated, whatever else
/// ended it), giving up at `deadline` however the bytes trickle in. `peer`
/// labels the trace line of each read.
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
    let mut bytes = Vec::new();
    let mut drained = false;
    let end = loop {
        let want = (limit - bytes.len()).min(READ_CHUNK);
        let n = match read_before(source, &mut chunk[..want], deadline.as_mut()) {
            ReadStep::Data(n) => n,
            ReadStep::Closed => {
                drained = true;
                break ReplyEnd::Closed;
            }
            ReadStep::TimedOut => {
                let after = deadline.map(|d| d.budget).unwrap_or_default();
                break ReplyEnd::TimedOut { after };
            }
            ReadStep::Failed(e) => break ReplyEnd::Failed(e),
        };
        trace!(event = event::READ, peer:% = peer, bytes = n; "{peer}: read {n} bytes");
        drained = n < want;
        let start = bytes.len();
        bytes.extend_from_slice(&chunk[..n]);
        if let Some(newline) = bytes[start..].iter().position(|&b| b == b'\n') {
            bytes.truncate(start + newline);
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            break ReplyEnd::Line;
        }
        if bytes.len() >= limit {
            break ReplyEnd::Truncated;
        }
    };
    let end = if bytes.len() > max_reply_bytes {
        bytes.truncate(max_reply_bytes);
        ReplyEnd::Truncated
    } else {
        end
    };
    Reply {
        bytes,
        end,
        drained,
    }
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
        let rest = Chunked::new([b"s\n".to_vec()]);
        let reply = read_reply(&mut (&b"ye"[..]).chain(rest), peer, 1024, None);
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
