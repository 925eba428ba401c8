//! One client's life on its own thread: read the PROXY header if the server
//! sits behind a balancer, check who the client is, send the prompt, read
//! one reply, log what happened with the client's address.
//!
//! Everything here may block, but never for longer than the write timeout
//! plus the header and reply deadlines, and nothing else waits on this thread.

use std::cell::Cell;
use std::io::Write;
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use socket2::SockRef;

use crate::access::canonical;
use crate::config::{BUSY_MESSAGE, Config};
use crate::limits::{ConnectionSlot, IpSlot, PerIpLimit};
use crate::logging::{
    self, BUSY_LINES, DENIED_LINES, Escaped, describe_io_error, held_back_note, reply_text,
};
use crate::proxy_protocol::{self, ProxyHeader};
use crate::reply::{Prefixed, ReadStep, Reply, ReplyDeadline, ReplyEnd, read_before, read_reply};
use crate::shutdown::{OpenConnection, OpenConnections};

/// Most bytes a lingering close reads and throws away before it gives up.
const LINGER_MAX_BYTES: usize = 64 * 1024;
/// Longest a lingering close waits for the client to stop sending.
const LINGER_MAX_TIME: Duration = Duration::from_secs(1);

/// How a connection ended, for the shutdown summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A reply was logged whole.
    Replied,
    /// A reply was logged cut at the cap.
    Truncated,
    /// The reply deadline passed.
    TimedOut,
    /// The client closed without sending anything.
    NoReply,
    /// Writing the prompt, reading, or the PROXY header failed.
    Failed,
    /// Refused by the access rules, or not a trusted proxy.
    Denied,
    /// Turned away with the busy line (`--max-per-ip`).
    Busy,
    /// Still connected at the shutdown deadline: cut off, and logged with
    /// what it had sent.
    CutOff,
}

/// What every connection is served with.
pub(crate) struct Serving {
    pub(crate) config: Config,
    /// Connections held per client address (`--max-per-ip`).
    pub(crate) per_ip: PerIpLimit,
    /// Every open connection, for a stopping server to cut off.
    pub(crate) open: Arc<OpenConnections>,
}

thread_local! {
    /// The peer this thread is serving, for the panic log line: a thread
    /// from the thread cache keeps the name of its first peer.
    static SERVING: Cell<Option<SocketAddr>> = const { Cell::new(None) };
}

/// The peer the current thread is serving, if it is a connection thread.
pub fn serving_peer() -> Option<SocketAddr> {
    SERVING.with(Cell::get)
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

/// Serves one connection to the end. The caller closes it.
///
/// `timeouts_inherited` says that the socket already carries the write
/// timeout and a read timeout of the whole reply budget (inherited from the
/// listening socket), which saves two system calls per connection.
pub(crate) fn serve(
    stream: &TcpStream,
    peer: SocketAddr,
    serving: &Serving,
    timeouts_inherited: bool,
) -> Outcome {
    let config = &serving.config;
    let mut stream = stream;
    let started = Instant::now();
    SERVING.with(|current| current.set(Some(peer)));
    let mut early_bytes = Vec::new();
    let client = if config.proxy_protocol {
        match read_proxy_header(&mut stream, peer, config, started) {
            Ok((client, rest)) => {
                early_bytes = rest;
                client
            }
            Err(outcome) => return outcome,
        }
    } else {
        Client {
            addr: peer,
            proxy: None,
        }
    };
    let addr = client.addr;
    let _ip_slot = match admit_client(&mut stream, client, serving) {
        Ok(ip_slot) => ip_slot,
        Err(outcome) => return outcome,
    };

    let sent = if timeouts_inherited {
        Ok(())
    } else {
        stream.set_write_timeout(Some(config.write_timeout))
    }
    .and_then(|()| stream.write_all(&config.prompt));
    if let Err(e) = sent {
        log_prompt_failed(client, &e);
        return Outcome::Failed;
    }
    // Reading the header set its own read timeouts on the socket.
    let timeout_still_inherited = timeouts_inherited && !config.proxy_protocol;
    let deadline = config.reply_timeout.map(|timeout| ReplyDeadline {
        at: Instant::now() + timeout,
        first_read_timeout_is_set: timeout_still_inherited,
    });
    let mut source = Prefixed::new(&early_bytes, &mut stream);
    let reply = read_reply(&mut source, addr, config.max_reply_bytes, deadline);
    let cut_off = serving.open.cutting_off();
    log_reply(client, &reply, config, started, cut_off)
}

/// Checks the access rules and takes the client's per-address slot, or
/// turns it away. Not inlined, for the reason given at [`read_proxy_header`].
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
                event = "denied", peer:% = addr, proxy = proxy, held_back = held_back;
                "{addr} refused by the access rules{}", held_back_note(held_back)
            );
        }
        return Err(Outcome::Denied);
    }
    let Some(ip_slot) = serving.per_ip.try_acquire(addr.ip()) else {
        if let Some(held_back) = BUSY_LINES.due() {
            warn!(
                event = "busy", peer:% = addr, proxy = proxy, held_back = held_back;
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

#[inline(never)]
fn log_prompt_failed(client: Client, error: &std::io::Error) {
    let addr = client.addr;
    let proxy = client.proxy_field();
    warn!(
        event = "prompt_failed", peer:% = addr, proxy = proxy.as_deref();
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
                event = "denied", peer:% = peer, held_back = held_back;
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
            warn!(event = "proxy_header", peer:% = peer; "{peer} closed: bad PROXY protocol header: {e}");
            Err(Outcome::Failed)
        }
    }
}

/// The one log line that says how a client's reply went.
#[inline(never)]
fn log_reply(
    client: Client,
    reply: &Reply,
    config: &Config,
    started: Instant,
    cut_off: bool,
) -> Outcome {
    let addr = client.addr;
    let proxy = client.proxy_field();
    let proxy = proxy.as_deref();
    let bytes = Escaped(&reply.bytes);
    let (text, lossy) = reply_text(&reply.bytes);
    let text: &str = &text;
    let size = reply.bytes.len();
    let duration_ms = started.elapsed().as_millis() as u64;
    macro_rules! event {
        ($level:ident, $event:expr, $($message:tt)+) => {
            $level!(
                event = $event, peer:% = addr, proxy = proxy, reply = text,
                reply_lossy = lossy, bytes = size, duration_ms = duration_ms;
                $($message)+
            )
        };
    }
    match &reply.end {
        // The server shut the read side down itself at the deadline.
        ReplyEnd::Closed if cut_off => {
            event!(
                warn,
                "cut_off",
                "{addr} cut off by shutdown before a full reply; got {bytes}"
            );
            Outcome::CutOff
        }
        ReplyEnd::Line => {
            event!(info, "reply", "{addr} said: {bytes}");
            Outcome::Replied
        }
        ReplyEnd::Closed if reply.bytes.is_empty() => {
            event!(info, "no_reply", "{addr} closed without replying");
            Outcome::NoReply
        }
        ReplyEnd::Closed => {
            event!(
                info,
                "reply",
                "{addr} said: {bytes} (closed before newline)"
            );
            Outcome::Replied
        }
        ReplyEnd::Truncated => {
            let cap = config.max_reply_bytes;
            event!(
                warn,
                "truncated",
                "{addr} said: {bytes} (truncated at {cap} bytes)"
            );
            Outcome::Truncated
        }
        ReplyEnd::TimedOut => {
            let secs = config.reply_timeout.unwrap_or_default().as_secs_f64();
            event!(
                warn,
                "timeout",
                "{addr} timed out after {secs}s without a full reply; got {bytes}"
            );
            Outcome::TimedOut
        }
        ReplyEnd::Failed(e) => {
            let error = describe_io_error(e);
            event!(
                warn,
                "read_error",
                "{addr} read error: {error}; got {bytes}"
            );
            Outcome::Failed
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
    let deadline = Instant::now() + LINGER_MAX_TIME;
    let mut discard = [0u8; 2048];
    let mut discarded = 0;
    while discarded < LINGER_MAX_BYTES {
        match read_before(&mut stream, &mut discard, Some(deadline), true) {
            ReadStep::Data(n) => discarded += n,
            ReadStep::Closed | ReadStep::TimedOut | ReadStep::Failed(_) => return,
        }
    }
}
