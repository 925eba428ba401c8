//! Reading one reply line: where the size cap and the whole-reply deadline
//! are enforced (each read goes through `timed_read`).
//!
//! A reply is the bytes up to the first `\n`, with `\n` or `\r\n` stripped
//! (telnet sends `\r\n`). TCP may deliver it in any number of pieces, so the
//! reader keeps reading until the line is complete, the client closes, the cap
//! is passed, the deadline passes, or the socket fails. Whatever happens, the
//! bytes that did arrive are returned so that they can be logged.

use std::net::SocketAddr;

use log::trace;

use crate::logging::event;
use crate::record::ReplyEnd;
use crate::timed_read::{Deadline, DeadlineRead, ReadStep, read_before};

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
    use crate::timed_read::Prefixed;
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
