//! One connection's life on its own thread, from the thread taking it to
//! parking again: identify the client (its PROXY header, behind a balancer),
//! admit it, run the TLS handshake, send the prompt, read one reply, record
//! it, and close: cleanly only once its whole reply is kept. Every socket
//! call, under TLS too, is made by a deadline ([`Timed`]).
//!
//! Steps marked `#[inline(never)]` keep their buffers and log records out
//! of the frame an idle client's thread waits in (each would touch one more
//! page of stack: +4 KiB per idle client, measured).

use std::borrow::Borrow;
use std::io::{self, ErrorKind::TimedOut, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, trace, warn};
use socket2::SockRef;

use super::proxy_protocol::{self, Parsed, ProxyHeader};
use super::tls::{TlsServer, TlsStream};
use crate::config::Config;
use crate::error::describe_io_error;
use crate::limits::rate::RateBuckets;
use crate::limits::{ConnectionLimit, ConnectionSlot, IpSlot, PerIpLimit, Refusal};
use crate::limits::{canonical, refuse};
use crate::logging::{NOT_RECORDED_LINES, ServingPeer, event, log_every};
use crate::record::{Record, ReplyEnd};
use crate::stats::{Outcome, Stats};

/// A lingering close reads and discards at most this much, for at most
/// this long (nginx's `lingering_close`).
const LINGER_MAX_BYTES: usize = 64 * 1024;
const LINGER_MAX_TIME: Duration = Duration::from_secs(1);
/// How long a clean close waits to hand its TLS `close_notify` to the kernel.
const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes asked of the socket in one read: a default-cap reply and its
/// "\r\n". Reads land on the stack; the reply's heap buffer is allocated
/// only once bytes arrive, so a silent client costs no heap.
const READ_CHUNK: usize = 1026;

/// What every connection is served with.
pub(crate) struct Serving {
    pub(crate) config: Config,
    /// The connection cap, whose slots also let a stop cut connections off.
    pub(crate) limit: ConnectionLimit,
    pub(crate) per_ip: PerIpLimit,
    /// Checked here for the client a PROXY header names, by the accept
    /// loop for a direct client.
    pub(crate) rate: Option<RateBuckets>,
    pub(crate) stats: Stats,
    /// `--tls-cert`: every connection speaks TLS.
    pub(crate) tls: Option<Arc<TlsServer>>,
}

/// An admitted connection: what a connection thread serves.
pub(crate) struct Accepted {
    /// Shared with its slot, so that a stopping server can cut it off.
    pub(crate) stream: Arc<TcpStream>,
    pub(crate) peer: SocketAddr,
    pub(crate) accepted_at: Instant,
    /// Held until the connection is closed, however it ends.
    pub(crate) slot: ConnectionSlot,
    /// Its TLS session, once the handshake is done.
    pub(crate) tls: Option<Box<TlsStream<Timed<Arc<TcpStream>>>>>,
}

/// Serves `first`, then each connection `park` hands over, until it hands
/// none. `reserve` runs as each connection closes, just before its client
/// can see the close (so a thread going back to `accept` is counted before
/// that client can connect again); `park` gets its value.
pub(crate) fn run_thread<R>(
    first: Accepted,
    serving: &Serving,
    mut reserve: impl FnMut() -> R,
    mut park: impl FnMut(R) -> Option<Accepted>,
) {
    let mut next = Some(first);
    while let Some(mut accepted) = next {
        let peer = accepted.peer;
        debug!(event = event::CONNECTED, peer:% = peer; "{peer} connected");
        let (outcome, reply_bytes) = match serve(&mut accepted, serving) {
            Ok((outcome, recorded)) => (outcome, Some(recorded)),
            Err(outcome) => (outcome, None),
        };
        let duration = accepted.accepted_at.elapsed();
        serving.stats.record_session(outcome, reply_bytes, duration);
        let reserved = close(accepted, outcome, &mut reserve);
        debug!(event = event::DISCONNECTED, peer:% = peer; "{peer} disconnected");
        next = park(reserved);
    }
}

/// Who is on the other end: the real client (the socket's peer, or the one
/// a PROXY header names), and the balancer that relayed it, if one did.
#[derive(Debug, Clone, Copy)]
struct Client {
    addr: SocketAddr,
    proxy: Option<SocketAddr>,
}

/// Serves one connection up to its close: how it ended and the size of the
/// reply recorded, or how it ended without a record.
fn serve(accepted: &mut Accepted, serving: &Serving) -> Result<(Outcome, usize), Outcome> {
    let _named_in_panics = ServingPeer::set(accepted.peer);
    let config = &serving.config;
    let (client, early) = identify_client(accepted, config)?;
    let _ip_slot = admit_client(&accepted.stream, client, serving)?;
    if let Some(server) = &serving.tls {
        let deadline = config.reply_timeout.map(|t| accepted.accepted_at + t);
        let socket = Timed::new(Arc::clone(&accepted.stream), deadline, false);
        accepted.tls = Some(server.handshake(socket, &early, client.addr)?);
    }
    send_prompt(accepted, client, config)?;
    let reply = read_client_reply(accepted, &early, client, config);
    record(client, reply, accepted, serving)
}

/// The socket's peer, or, behind a balancer, the client its PROXY header
/// names, with any bytes that came after the header. A bad header is
/// logged, and the connection reset without a prompt.
#[inline(never)]
fn identify_client(accepted: &Accepted, config: &Config) -> Result<(Client, Vec<u8>), Outcome> {
    let (stream, peer) = (&*accepted.stream, accepted.peer);
    let direct = Client {
        addr: peer,
        proxy: None,
    };
    let Some(trusted) = &config.proxy_protocol else {
        return Ok((direct, Vec::new()));
    };
    if !trusted.is_empty() && !trusted.contains(peer.ip()) {
        return Err(refuse(stream, peer, None, &Refusal::UntrustedProxy));
    }
    let deadline = config.reply_timeout.map(|t| accepted.accepted_at + t);
    match read_proxy_header(Timed::new(stream, deadline, false)) {
        Ok((ProxyHeader::Proxied { source, .. }, rest)) => {
            let (addr, proxy) = (canonical(source), Some(peer));
            Ok((Client { addr, proxy }, rest))
        }
        Ok((ProxyHeader::Local, rest)) => Ok((direct, rest)),
        Err(e) => {
            warn!(event = event::PROXY_HEADER, peer:% = peer; "{peer} closed: bad PROXY protocol header: {e}");
            Err(Outcome::Failed)
        }
    }
}

/// Reads until a whole PROXY header is in: the header, with whatever bytes
/// followed it in the same reads, or why there is none.
fn read_proxy_header(mut source: impl Read) -> Result<(ProxyHeader, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match proxy_protocol::parse(&buf) {
            Parsed::Complete { header, length } => return Ok((header, buf.split_off(length))),
            Parsed::Invalid(why) => return Err(why.to_string()),
            Parsed::Incomplete => {}
        }
        match source.read(&mut chunk) {
            Ok(0) => return Err("closed before a complete PROXY header".to_string()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == TimedOut => return Err("no complete PROXY header in time".into()),
            Err(e) => return Err(describe_io_error(&e)),
        }
    }
}

/// Checks the access rules and, behind a balancer, the client's rate, and
/// takes its per-address slot; or refuses it.
#[inline(never)]
fn admit_client<'a>(
    stream: &TcpStream,
    client: Client,
    serving: &'a Serving,
) -> Result<IpSlot<'a>, Outcome> {
    let ip = client.addr.ip();
    let admitted = if !serving.config.access.permits(ip) {
        Err(Refusal::Denied)
    } else if let Some(rate) = &serving.rate
        && serving.config.proxy_protocol.is_some()
        && let Err(limited) = rate.try_acquire(ip, Instant::now())
    {
        // A header that names no client (UNKNOWN, LOCAL) leaves the peer.
        Err(Refusal::RateLimited(limited))
    } else {
        serving.per_ip.try_acquire(ip)
    };
    admitted.map_err(|refusal| refuse(stream, client.addr, client.proxy, &refusal))
}

/// Writes the whole prompt within `--write-timeout`.
#[inline(never)]
fn send_prompt(accepted: &mut Accepted, client: Client, config: &Config) -> Result<(), Outcome> {
    let deadline = Some(Instant::now() + config.write_timeout);
    let written = match &mut accepted.tls {
        Some(tls) => {
            tls.io.deadline = deadline;
            tls.send(&config.prompt)
        }
        None => Timed::new(&*accepted.stream, deadline, true).write_all(&config.prompt),
    };
    let Err(e) = written else {
        return Ok(());
    };
    let (addr, proxy) = (client.addr, client.proxy.map(|proxy| proxy.to_string()));
    warn!(
        event = event::PROMPT_FAILED, peer:% = addr, proxy = proxy.as_deref();
        "{addr} could not be sent the prompt: {}", describe_io_error(&e)
    );
    Err(Outcome::Failed)
}

/// Reads the reply within `--reply-timeout`, after the bytes that came
/// with a PROXY header. The socket's read timeout stands at that budget
/// (inherited from the listener) unless a header or a handshake set its own.
#[inline(never)]
fn read_client_reply(acc: &mut Accepted, early: &[u8], client: Client, config: &Config) -> Reply {
    let (budget, max) = (config.reply_timeout, config.max_reply_bytes.get());
    let deadline = budget.map(|budget| Instant::now() + budget);
    match &mut acc.tls {
        Some(tls) => {
            tls.io.deadline = deadline;
            read_reply(&mut **tls, client.addr, max, budget)
        }
        None => {
            let socket = Timed::new(&*acc.stream, deadline, config.proxy_protocol.is_none());
            read_reply(&mut early.chain(socket), client.addr, max, budget)
        }
    }
}

/// Hands the reply to the reply sink: its outcome and size if the sink
/// kept it. A sink that panics has not kept it.
#[inline(never)]
fn record(
    client: Client,
    mut reply: Reply,
    accepted: &Accepted,
    serving: &Serving,
) -> Result<(Outcome, usize), Outcome> {
    // The server shut the read side down at the stop's deadline (under TLS, an error).
    if matches!(reply.end, ReplyEnd::Closed | ReplyEnd::Failed(_)) && serving.limit.cutting_off() {
        reply.end = ReplyEnd::CutOff;
    }
    let tls = accepted.tls.as_deref().map(TlsStream::session);
    let record = Record {
        peer: client.addr,
        proxy: client.proxy,
        reply: &reply.bytes,
        end: &reply.end,
        duration: accepted.accepted_at.elapsed(),
        tls: tls.as_ref(),
    };
    let sink = &serving.config.reply_sink;
    let recorded = panic::catch_unwind(AssertUnwindSafe(|| sink.record(&record)))
        .unwrap_or_else(|_| Err(io::Error::other("the reply sink panicked")));
    let Err(e) = recorded else {
        return Ok((Outcome::of(&record), reply.bytes.len()));
    };
    let addr = client.addr;
    log_every!(
        NOT_RECORDED_LINES, warn, [peer:% = addr,],
        "{addr} reset: its reply was not recorded: {}", describe_io_error(&e)
    );
    Err(Outcome::NotRecorded)
}

/// Ends a connection so that its client can tell how it ended. The slot is
/// released after any lingering (lingering threads never outnumber the
/// cap) but before the close (a client that sees the close can connect
/// again at once).
fn close<R>(accepted: Accepted, outcome: Outcome, reserve: impl FnOnce() -> R) -> R {
    let (stream, slot, tls) = (accepted.stream, accepted.slot, accepted.tls);
    // An end of stream only if the whole reply is recorded or the client was
    // told in words (the busy line) that it is not served; else a reset (the
    // zero linger time every socket inherits).
    if let Outcome::Replied | Outcome::NoReply | Outcome::Busy | Outcome::RateLimited = outcome {
        if let Some(mut tls) = tls {
            tls.io.deadline = Some(Instant::now() + CLOSE_NOTIFY_TIMEOUT);
            tls.close_notify();
        }
        let _ = SockRef::from(&*stream).set_linger(None);
        linger_if_bytes_wait(&stream);
    }
    let reserved = reserve();
    drop(slot);
    drop(stream);
    reserved
}

/// Linux answers a close over unread bytes (anything sent after the reply
/// line) with a reset; so when bytes wait, shut down the write side (the
/// client sees the end of stream), read and discard within the linger
/// bounds, then close.
#[inline(never)]
fn linger_if_bytes_wait(stream: &TcpStream) {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    let waiting = SockRef::from(stream)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        .is_ok_and(|n| n > 0);
    if !waiting || stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let mut socket = Timed::new(stream, Some(Instant::now() + LINGER_MAX_TIME), false);
    // 2 KiB at a time: a cached thread keeps every stack page it touched.
    let (mut discard, mut left) = ([0u8; 2048], LINGER_MAX_BYTES);
    while let Ok(read @ 1..) = socket.read(&mut discard[..left.min(2048)]) {
        left -= read;
    }
}

/// The socket, each call done by a deadline: before it, the socket's timeout
/// is set to the time left (`TimedOut` once none is), so a client that
/// trickles bytes, or takes the prompt a byte at a time, never outstays its
/// budget. A call the socket's timeout ends is `TimedOut` too.
pub(crate) struct Timed<S> {
    socket: S,
    /// `None`: no deadline of its own.
    pub(crate) deadline: Option<Instant>,
    /// The timeout for the next call stands at the time left already
    /// (inherited from the listener): one `setsockopt` less per connection.
    timeout_set: bool,
}

impl<S: Borrow<TcpStream>> Timed<S> {
    pub(crate) fn new(socket: S, deadline: Option<Instant>, timeout_set: bool) -> Self {
        Timed {
            socket,
            deadline,
            timeout_set,
        }
    }

    /// Makes `call` (again if interrupted), first setting the socket's read
    /// or write timeout (`set`) to the time left.
    fn call<T>(
        &mut self,
        set: fn(&TcpStream, Option<Duration>) -> io::Result<()>,
        mut call: impl FnMut(&TcpStream) -> io::Result<T>,
    ) -> io::Result<T> {
        if let Some(at) = self.deadline {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            if !std::mem::take(&mut self.timeout_set) {
                set(self.socket.borrow(), Some(left))?;
            }
        }
        loop {
            match call(self.socket.borrow()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                result => return result,
            }
        }
    }
}

impl<S: Borrow<TcpStream>> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.call(TcpStream::set_read_timeout, |mut socket| socket.read(buf))
    }
}

impl<S: Borrow<TcpStream>> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// rustls hands over a flight of records at once: one `writev`, not a
    /// segment each (which Nagle's algorithm would hold up).
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.call(TcpStream::set_write_timeout, |mut s| s.write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One client's reply and why reading stopped.
#[derive(Debug)]
pub(crate) struct Reply {
    /// Without its line terminator, never longer than the cap.
    pub(crate) bytes: Vec<u8>,
    pub(crate) end: ReplyEnd,
}

/// Reads one reply line: the bytes up to the first `\n`, without `\n` or
/// `\r\n` (telnet), at most `max_reply_bytes` of it (a longer reply is cut
/// and truncated, whatever else ended it), giving up at `deadline` however
/// the bytes trickle in. Whatever arrived is kept, however reading stopped.
pub(crate) fn read_reply(
    source: &mut impl Read,
    peer: SocketAddr,
    max_reply_bytes: usize,
    budget: Option<Duration>,
) -> Reply {
    // Room for a full-length reply and its "\r\n": only past that is a reply
    // known to be too long.
    let limit = max_reply_bytes.saturating_add(2);
    let mut chunk = [0u8; READ_CHUNK];
    let mut bytes = Vec::new();
    let mut end = loop {
        let want = (limit - bytes.len()).min(READ_CHUNK);
        let n = match source.read(&mut chunk[..want]) {
            Ok(0) => break ReplyEnd::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == TimedOut => {
                let after = budget.unwrap_or_default();
                break ReplyEnd::TimedOut { after };
            }
            Err(e) => break ReplyEnd::Failed(e),
        };
        trace!(event = event::READ, peer:% = peer, bytes = n; "{peer}: read {n} bytes");
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
    if bytes.len() > max_reply_bytes {
        bytes.truncate(max_reply_bytes);
        end = ReplyEnd::Truncated;
    }
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
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(peer).unwrap();
        client.write_all(b"yes\n").unwrap();
        let (server, _) = listener.accept().unwrap();
        let budget = Duration::from_secs(5);
        let mut socket = Timed::new(&server, Some(Instant::now()), true);
        let reply = read_reply(&mut socket, peer, 1024, Some(budget));
        assert!(matches!(reply.end, ReplyEnd::TimedOut { after } if after == budget));
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
