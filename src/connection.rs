//! One client's life on its own thread: read the PROXY header if the server
//! sits behind a balancer, check who the client is, send the prompt, read
//! one reply, log what happened with the client's address.
//!
//! Everything here may block: for the write timeout, the header and reply
//! deadlines, up to a second more for a lingering close, and, to keep a
//! reply from being lost, for as long as a stalled log takes to write its
//! line (a stopping server stops waiting after its drain timeout). Nothing
//! else waits on this thread.

use std::fmt;
use std::io::Write;
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{Level, log, warn};
use socket2::SockRef;

use crate::access::canonical;
use crate::config::{BUSY_MESSAGE, Config};
use crate::error::describe_io_error;
use crate::limits::{ConnectionSlot, IpSlot, PerIpLimit};
use crate::logging::{
    self, BUSY_LINES, DENIED_LINES, Escaped, RATE_LIMITED_LINES, ServingPeer, event,
    held_back_note, reply_text,
};
use crate::proxy_protocol::{self, ProxyHeader};
use crate::rate_limit::{RateLimit, RateLimited};
use crate::reply::{Reply, ReplyEnd, read_reply};
use crate::shutdown::{OpenConnection, OpenConnections};
use crate::stats::Outcome;
use crate::timed_read::{Deadline, Prefixed, ReadStep, read_before};

/// Most bytes a lingering close reads and throws away before it gives up.
const LINGER_MAX_BYTES: usize = 64 * 1024;
/// Longest a lingering close waits for the client to stop sending.
const LINGER_MAX_TIME: Duration = Duration::from_secs(1);

/// What every connection is served with.
pub(crate) struct Serving {
    pub(crate) config: Config,
    /// Connections held per client address (`--max-per-ip`).
    pub(crate) per_ip: PerIpLimit,
    /// Every open connection, for a stopping server to cut off.
    pub(crate) open: Arc<OpenConnections>,
    /// `--max-rate-per-ip`: checked here for the client a PROXY header
    /// names, and by the accept loop for a direct client.
    pub(crate) rate: Option<RateLimit>,
}

/// How a served connection went: its outcome, and the size of the reply
/// logged (none if it was turned away or failed before reading).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served {
    pub(crate) outcome: Outcome,
    pub(crate) reply_bytes: Option<usize>,
}

impl From<Outcome> for Served {
    fn from(outcome: Outcome) -> Self {
        Served {
            outcome,
            reply_bytes: None,
        }
    }
}

/// Who is on the other end.
#[derive(Debug, Clone, Copy)]
struct Client {
    /// The real client: the socket's peer, or the one a PROXY header names.
    addr: SocketAddr,
    /// The balancer that relayed the connection, if one did.
    proxy: Option<SocketAddr>,
}

impl Client {
    /// The balancer's address as a log field (absent when there is none).
    fn proxy_field(&self) -> Option<String> {
        self.proxy.map(|proxy| proxy.to_string())
    }
}

/// Serves one connection to the end: identify the client, admit it, send
/// the prompt, read the reply, log it. The caller closes the connection.
///
/// The socket carries the listener's options (see `server`): the prompt's
/// write timeout, and the whole reply budget as its read timeout.
pub(crate) fn serve(stream: &TcpStream, peer: SocketAddr, serving: &Serving) -> Served {
    let started = Instant::now();
    let _named_in_panics = ServingPeer::set(peer);
    let config = &serving.config;
    let mut stream = stream;
    let (client, early_bytes) = match identify_client(&mut stream, peer, config, started) {
        Ok(identified) => identified,
        Err(outcome) => return outcome.into(),
    };
    let _ip_slot = match admit_client(&mut stream, client, serving) {
        Ok(ip_slot) => ip_slot,
        Err(outcome) => return outcome.into(),
    };
    if let Err(e) = stream.write_all(&config.prompt) {
        log_prompt_failed(client, &e);
        return Outcome::Failed.into();
    }
    let reply = read_client_reply(&mut stream, &early_bytes, client, config);
    Served {
        outcome: log_reply(client, &reply, config, started, serving.open.cutting_off()),
        reply_bytes: Some(reply.bytes.len()),
    }
}

/// Who the client is: the socket's peer, or, behind a balancer, the client
/// its PROXY header names, with any bytes that came after the header.
fn identify_client(
    stream: &mut &TcpStream,
    peer: SocketAddr,
    config: &Config,
    started: Instant,
) -> Result<(Client, Vec<u8>), Outcome> {
    if config.proxy_protocol {
        return read_proxy_header(stream, peer, config, started);
    }
    let client = Client {
        addr: peer,
        proxy: None,
    };
    Ok((client, Vec::new()))
}

/// Reads the reply, after any bytes that came with the PROXY header, by
/// the reply deadline.
///
/// Not inlined, for the reason given at [`read_proxy_header`]: its read
/// buffer would otherwise sit in `serve`'s frame, under the log line's
/// formatting, and every client's thread would touch one more page of
/// stack (+4 KiB each, measured with 3,000 idle clients).
#[inline(never)]
fn read_client_reply(
    stream: &mut &TcpStream,
    early_bytes: &[u8],
    client: Client,
    config: &Config,
) -> Reply {
    let deadline = config.reply_timeout.map(|timeout| {
        let at = Instant::now() + timeout;
        // The socket's read timeout is the whole budget, inherited from the
        // listener, unless reading a PROXY header has set its own.
        if config.proxy_protocol {
            Deadline::new(at)
        } else {
            Deadline::with_timeout_already_set(at)
        }
    });
    let mut source = Prefixed::new(early_bytes, stream);
    read_reply(&mut source, client.addr, config.max_reply_bytes, deadline)
}

/// Checks the access rules, the rate limit for a client behind a balancer,
/// and takes the client's per-address slot, or turns it away. Not inlined, for the reason given at [`read_proxy_header`].
#[inline(never)]
fn admit_client<'a>(
    stream: &mut &TcpStream,
    client: Client,
    serving: &'a Serving,
) -> Result<IpSlot<'a>, Outcome> {
    let addr = client.addr;
    let proxy = client.proxy_field();
    let proxy = proxy.as_deref();
    if !serving.config.access.permits(addr.ip()) {
        if let Some(held_back) = DENIED_LINES.due() {
            warn!(
                event = event::DENIED, reason = "access_rules", peer:% = addr, proxy = proxy,
                held_back = held_back;
                "{addr} refused by the access rules{}", held_back_note(held_back)
            );
        }
        return Err(Outcome::Denied);
    }
    // Behind a balancer the accept loop could not know the client yet; a
    // header that names none (UNKNOWN, LOCAL) leaves the TCP peer to count.
    if let Some(rate) = &serving.rate
        && serving.config.proxy_protocol
        && let Err(limited) = rate.try_acquire(addr.ip(), Instant::now())
    {
        log_rate_limited(addr, proxy, &limited, rate);
        let _ = stream.write(BUSY_MESSAGE);
        return Err(Outcome::RateLimited);
    }
    let Some(ip_slot) = serving.per_ip.try_acquire(addr.ip()) else {
        if let Some(held_back) = BUSY_LINES.due() {
            warn!(
                event = event::BUSY, reason = "max_per_ip", peer:% = addr, proxy = proxy,
                held_back = held_back;
                "{addr} turned away: already {} connections from {}{}",
                serving.config.max_per_ip.unwrap_or_default(),
                addr.ip(),
                held_back_note(held_back)
            );
        }
        let _ = stream.write(BUSY_MESSAGE);
        return Err(Outcome::Busy);
    };
    Ok(ip_slot)
}

/// The (rate-limited) line about a client turned away by
/// `--max-rate-per-ip`, at the accept loop or after its PROXY header.
pub(crate) fn log_rate_limited(
    addr: SocketAddr,
    proxy: Option<&str>,
    limited: &RateLimited,
    rate: &RateLimit,
) {
    if let Some(held_back) = RATE_LIMITED_LINES.due() {
        warn!(
            event = event::RATE_LIMITED, peer:% = addr, proxy = proxy,
            network:% = limited.network, held_back = held_back;
            "{addr} turned away: its network {}/{} connects faster than {} \
             (next connection in {:.2}s){}",
            limited.network,
            rate.prefixes().length_of(limited.network),
            rate.rate(),
            limited.retry_after.as_secs_f64(),
            held_back_note(held_back)
        );
    }
}

#[inline(never)]
fn log_prompt_failed(client: Client, error: &std::io::Error) {
    let addr = client.addr;
    let proxy = client.proxy_field();
    warn!(
        event = event::PROMPT_FAILED, peer:% = addr, proxy = proxy.as_deref();
        "{addr} could not be sent the prompt: {}",
        describe_io_error(error)
    );
}

/// Reads the PROXY header, if the peer may send one at all. On failure the
/// connection is logged and must be closed without a prompt.
///
/// Not inlined, like [`log_reply`]: their buffers and log records would
/// otherwise widen `serve`'s stack frame, and every idle client's thread
/// would touch one more page of stack while it waits (+4 KiB each,
/// measured with 10,000 idle clients).
#[inline(never)]
fn read_proxy_header(
    stream: &mut &TcpStream,
    peer: SocketAddr,
    config: &Config,
    started: Instant,
) -> Result<(Client, Vec<u8>), Outcome> {
    let trusted = &config.trusted_proxies;
    if !trusted.is_empty() && !trusted.contains(peer.ip()) {
        if let Some(held_back) = DENIED_LINES.due() {
            warn!(
                event = event::DENIED, reason = "untrusted_proxy", peer:% = peer,
                held_back = held_back;
                "{peer} refused: not a trusted proxy{}", held_back_note(held_back)
            );
        }
        return Err(Outcome::Denied);
    }
    let deadline = config.reply_timeout.map(|timeout| started + timeout);
    match proxy_protocol::read_header(stream, deadline) {
        Ok((ProxyHeader::Proxied { source, .. }, rest)) => Ok((
            Client {
                addr: canonical(source),
                proxy: Some(peer),
            },
            rest,
        )),
        Ok((ProxyHeader::Local, rest)) => Ok((
            Client {
                addr: peer,
                proxy: None,
            },
            rest,
        )),
        Err(e) => {
            warn!(event = event::PROXY_HEADER, peer:% = peer; "{peer} closed: bad PROXY protocol header: {e}");
            Err(Outcome::Failed)
        }
    }
}

/// The one log line that says how a client's reply went; returns how the
/// connection ended, for the summary.
#[inline(never)]
fn log_reply(
    client: Client,
    reply: &Reply,
    config: &Config,
    started: Instant,
    cut_off: bool,
) -> Outcome {
    let (level, event, outcome) = judge(reply, cut_off);
    let proxy = client.proxy_field();
    let (text, lossy) = reply_text(&reply.bytes);
    let text: &str = &text;
    let message = ReplyMessage {
        addr: client.addr,
        reply,
        outcome,
        config,
    };
    log!(
        level,
        event = event, peer:% = client.addr, proxy = proxy.as_deref(), reply = text,
        reply_lossy = lossy, bytes = reply.bytes.len(),
        duration_ms = started.elapsed().as_millis() as u64;
        "{message}"
    );
    outcome
}

/// How a reply went: its log line's level and event, and the outcome.
fn judge(reply: &Reply, cut_off: bool) -> (Level, &'static str, Outcome) {
    match &reply.end {
        // The server shut the read side down itself at the deadline.
        ReplyEnd::Closed if cut_off => (Level::Warn, event::CUT_OFF, Outcome::CutOff),
        ReplyEnd::Closed if reply.bytes.is_empty() => {
            (Level::Info, event::NO_REPLY, Outcome::NoReply)
        }
        ReplyEnd::Line | ReplyEnd::Closed => (Level::Info, event::REPLY, Outcome::Replied),
        ReplyEnd::Truncated => (Level::Warn, event::TRUNCATED, Outcome::Truncated),
        ReplyEnd::TimedOut => (Level::Warn, event::TIMEOUT, Outcome::TimedOut),
        ReplyEnd::Failed(_) => (Level::Warn, event::READ_ERROR, Outcome::Failed),
    }
}

/// The text of a reply's log line, written straight into the log record.
struct ReplyMessage<'a> {
    addr: SocketAddr,
    reply: &'a Reply,
    outcome: Outcome,
    config: &'a Config,
}

impl fmt::Display for ReplyMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = self.addr;
        let bytes = Escaped(&self.reply.bytes);
        match (self.outcome, &self.reply.end) {
            (Outcome::CutOff, _) => write!(
                f,
                "{addr} cut off by shutdown before a full reply; got {bytes}"
            ),
            (Outcome::NoReply, _) => write!(f, "{addr} closed without replying"),
            (Outcome::Replied, ReplyEnd::Closed) => {
                write!(f, "{addr} said: {bytes} (closed before newline)")
            }
            (Outcome::Truncated, _) => {
                let cap = self.config.max_reply_bytes;
                write!(f, "{addr} said: {bytes} (truncated at {cap} bytes)")
            }
            (Outcome::TimedOut, _) => {
                let secs = self.config.reply_timeout.unwrap_or_default().as_secs_f64();
                write!(
                    f,
                    "{addr} timed out after {secs}s without a full reply; got {bytes}"
                )
            }
            (_, ReplyEnd::Failed(e)) => {
                let error = describe_io_error(e);
                write!(f, "{addr} read error: {error}; got {bytes}")
            }
            _ => write!(f, "{addr} said: {bytes}"),
        }
    }
}

/// Ends a served connection so that the client reads a clean end of stream.
///
/// Linux answers a close with unread bytes in the receive queue (the rest of
/// an over-long reply, anything sent after the reply line) with a reset, and
/// the client may lose the close or even the busy line. So when bytes are
/// waiting, the close lingers as nginx's `lingering_close` does: shut down
/// the write side (the client sees the end of stream), read and discard
/// for at most [`LINGER_MAX_TIME`] or [`LINGER_MAX_BYTES`], then close.
///
/// Otherwise the slot (and the rest of `held`) is released before the
/// socket is closed, so that a client that sees its connection close can
/// connect again at once; a lingering connection keeps its slot until it
/// is done, so that lingering threads never outnumber the connection cap.
pub(crate) fn close(stream: Arc<TcpStream>, held: (ConnectionSlot, OpenConnection)) {
    if !logging::reply_was_logged() {
        // The log never took this client's reply (the server is stopping
        // with the log stalled): the zero linger time set on every socket
        // makes the close a reset, so the client knows.
        return;
    }
    // The reply is in the log: close normally from now on.
    let _ = SockRef::from(&*stream).set_linger(None);
    if has_unread_bytes(&stream) {
        linger(&stream);
    }
    drop(held);
    drop(stream);
}

/// Whether client bytes are waiting in the socket, without blocking.
fn has_unread_bytes(stream: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    SockRef::from(stream)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        .is_ok_and(|n| n > 0)
}

#[inline(never)]
fn linger(mut stream: &TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let mut deadline = Deadline::new(Instant::now() + LINGER_MAX_TIME);
    let mut discard = [0u8; 2048];
    let mut discarded = 0;
    while discarded < LINGER_MAX_BYTES {
        match read_before(&mut stream, &mut discard, Some(&mut deadline)) {
            ReadStep::Data(n) => discarded += n,
            ReadStep::Closed | ReadStep::TimedOut | ReadStep::Failed(_) => return,
        }
    }
}
