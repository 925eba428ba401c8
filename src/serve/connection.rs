//! One connection's life on its own thread, from the thread taking it to
//! parking again: identify the client (its PROXY header, behind a balancer),
//! admit it (access rules, per-address cap, a proxied client's rate), send
//! the prompt, read one reply, record it, and close: cleanly only once its
//! whole reply is kept. Everything here may block (the prompt, header and
//! reply deadlines, a lingering close's second, the reply sink until
//! `--record-timeout`); nothing else waits on this thread.
//!
//! Steps marked `#[inline(never)]` keep their buffers and log records out
//! of the frames an idle client's thread holds while it waits: each would
//! touch one more page of stack (+4 KiB per client, measured with 3,000
//! and 10,000 idle clients).

use std::io::Read;
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use socket2::SockRef;

use super::proxy_protocol::{self, ProxyHeader};
use super::read::{Deadline, ReadStep, Reply, read_before, read_reply, write_before};
use crate::config::Config;
use crate::error::describe_io_error;
use crate::limits::rate::RateBuckets;
use crate::limits::{ConnectionLimit, ConnectionSlot, IpSlot, PerIpLimit, Refusal};
use crate::limits::{canonical, refuse};
use crate::logging::{NOT_RECORDED_LINES, ServingPeer, event, log_every};
use crate::record::{Record, ReplyEnd};
use crate::stats::{Outcome, Stats};

const LINGER_MAX_BYTES: usize = 64 * 1024;
const LINGER_MAX_TIME: Duration = Duration::from_secs(1);

/// What every connection is served with.
pub(crate) struct Serving {
    pub(crate) config: Config,
    /// The connection cap, whose slots also let a stop cut connections off.
    pub(crate) limit: ConnectionLimit,
    /// `--max-per-ip`.
    pub(crate) per_ip: PerIpLimit,
    /// `--max-rate-per-ip`: checked here for the client a PROXY header
    /// names, and by the accept loop for a direct client.
    pub(crate) rate: Option<RateBuckets>,
    pub(crate) stats: Stats,
}

/// An admitted connection: what a connection thread serves.
pub(crate) struct Accepted {
    /// Shared with its slot, so that a stopping server can cut it off.
    pub(crate) stream: Arc<TcpStream>,
    pub(crate) peer: SocketAddr,
    pub(crate) accepted_at: Instant,
    /// Held until the connection is closed, however it ends.
    pub(crate) slot: ConnectionSlot,
}

/// Serves `first`, then each connection that `park` hands over until it
/// hands none. `reserve` is called as each connection closes, just before
/// its client can see the close (so that a thread going back to wait in
/// `accept` is counted before that client can connect again), and its
/// value is what `park` gets.
pub(crate) fn run_thread<R>(
    first: Accepted,
    serving: &Serving,
    mut reserve: impl FnMut() -> R,
    mut park: impl FnMut(R) -> Option<Accepted>,
) {
    let mut next = Some(first);
    while let Some(accepted) = next {
        let peer = accepted.peer;
        debug!(event = event::CONNECTED, peer:% = peer; "{peer} connected");
        let (outcome, reply_bytes, drained) = match serve(&accepted, serving) {
            Ok((outcome, recorded, drained)) => (outcome, Some(recorded), drained),
            Err(outcome) => (outcome, None, false),
        };
        let duration = accepted.accepted_at.elapsed();
        serving.stats.record_session(outcome, reply_bytes, duration);
        let reserved = close(accepted, outcome, drained, &mut reserve);
        debug!(event = event::DISCONNECTED, peer:% = peer; "{peer} disconnected");
        next = park(reserved);
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

/// Serves one connection to the end: identify the client, admit it, send
/// the prompt, read the reply, record it. Returns how it ended, the size of
/// the reply recorded and whether its last read drained the socket, or how
/// it ended without one.
fn serve(accepted: &Accepted, serving: &Serving) -> Result<(Outcome, usize, bool), Outcome> {
    let _named_in_panics = ServingPeer::set(accepted.peer);
    let (stream, config) = (&*accepted.stream, &serving.config);
    let (client, early_bytes) = identify_client(accepted, config)?;
    let _ip_slot = admit_client(stream, client, serving)?;
    send_prompt(stream, client, config)?;
    let reply = read_client_reply(stream, &early_bytes, client, config);
    record(client, reply, accepted.accepted_at, serving)
}

/// Who the client is: the socket's peer, or, behind a balancer, the client
/// its PROXY header names, with any bytes that came after the header. A bad
/// header is logged, and the connection reset without a prompt.
#[inline(never)]
fn identify_client(accepted: &Accepted, config: &Config) -> Result<(Client, Vec<u8>), Outcome> {
    let (mut stream, peer) = (&*accepted.stream, accepted.peer);
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
    let deadline = config
        .reply_timeout
        .map(|timeout| Deadline::from(accepted.accepted_at, timeout));
    match proxy_protocol::read_header(&mut stream, deadline) {
        Ok((ProxyHeader::Proxied { source, .. }, rest)) => {
            let proxied = Client {
                addr: canonical(source),
                proxy: Some(peer),
            };
            Ok((proxied, rest))
        }
        Ok((ProxyHeader::Local, rest)) => Ok((direct, rest)),
        Err(e) => {
            warn!(event = event::PROXY_HEADER, peer:% = peer; "{peer} closed: bad PROXY protocol header: {e}");
            Err(Outcome::Failed)
        }
    }
}

/// Checks the access rules, the rate limit for a client behind a balancer,
/// and takes the client's per-address slot, or refuses it.
#[inline(never)]
fn admit_client<'a>(
    stream: &TcpStream,
    client: Client,
    serving: &'a Serving,
) -> Result<IpSlot<'a>, Outcome> {
    let ip = client.addr.ip();
    let refusal = if !serving.config.access.permits(ip) {
        Refusal::Denied
    } else if let Some(rate) = &serving.rate
        && serving.config.proxy_protocol.is_some()
        && let Err(limited) = rate.try_acquire(ip, Instant::now())
    {
        // Behind a balancer the accept loop could not know the client yet;
        // a header that names none (UNKNOWN, LOCAL) leaves the TCP peer.
        Refusal::RateLimited(limited, rate)
    } else if let Some(ip_slot) = serving.per_ip.try_acquire(ip) {
        return Ok(ip_slot);
    } else {
        let max = serving.config.max_per_ip.map_or(0, |max| max.get());
        Refusal::PerIp { max }
    };
    Err(refuse(stream, client.addr, client.proxy, &refusal))
}

#[inline(never)]
fn send_prompt(stream: &TcpStream, client: Client, config: &Config) -> Result<(), Outcome> {
    let mut deadline = Deadline::after_with_timeout_already_set(config.write_timeout);
    let Err(e) = write_before(stream, &config.prompt, &mut deadline) else {
        return Ok(());
    };
    let (addr, proxy) = (client.addr, client.proxy.map(|proxy| proxy.to_string()));
    warn!(
        event = event::PROMPT_FAILED, peer:% = addr, proxy = proxy.as_deref();
        "{addr} could not be sent the prompt: {}",
        describe_io_error(&e)
    );
    Err(Outcome::Failed)
}

/// Reads the reply, after any bytes that came with the PROXY header.
#[inline(never)]
fn read_client_reply(
    stream: &TcpStream,
    early_bytes: &[u8],
    client: Client,
    config: &Config,
) -> Reply {
    // The socket's read timeout is the whole budget, inherited from the
    // listener, unless reading a PROXY header has set its own.
    let deadline = config
        .reply_timeout
        .map(|timeout| match config.proxy_protocol {
            Some(_) => Deadline::after(timeout),
            None => Deadline::after_with_timeout_already_set(timeout),
        });
    let source = &mut early_bytes.chain(stream);
    read_reply(source, client.addr, config.max_reply_bytes.get(), deadline)
}

/// Hands the reply to the reply sink: its outcome and size if the sink
/// kept it.
#[inline(never)]
fn record(
    client: Client,
    mut reply: Reply,
    accepted_at: Instant,
    serving: &Serving,
) -> Result<(Outcome, usize, bool), Outcome> {
    // The server shut the read side down itself at the stop's deadline.
    if matches!(reply.end, ReplyEnd::Closed) && serving.limit.cutting_off() {
        reply.end = ReplyEnd::CutOff;
    }
    let record = Record {
        peer: client.addr,
        proxy: client.proxy,
        reply: &reply.bytes,
        end: &reply.end,
        duration: accepted_at.elapsed(),
    };
    match serving.config.reply_sink.record(&record) {
        Ok(()) => Ok((Outcome::of(&record), reply.bytes.len(), reply.drained)),
        Err(e) => {
            let addr = client.addr;
            log_every!(
                NOT_RECORDED_LINES, warn, [peer:% = addr,],
                "{addr} reset: its reply was not recorded: {}", describe_io_error(&e)
            );
            Err(Outcome::NotRecorded)
        }
    }
}

/// Ends a connection so that its client can tell how it ended. The slot is
/// released after any lingering (so that lingering threads never outnumber
/// the cap) but before the close (so that a client that sees its connection
/// close can connect again at once).
fn close<R>(accepted: Accepted, outcome: Outcome, drained: bool, reserve: impl FnOnce() -> R) -> R {
    let Accepted { stream, slot, .. } = accepted;
    let socket = SockRef::from(&*stream);
    match outcome {
        // An end of stream: its whole reply is recorded, or it was told in
        // words (the busy line) that it is not served.
        Outcome::Replied | Outcome::NoReply | Outcome::Busy | Outcome::RateLimited => {
            let _ = socket.set_linger(None);
            if !drained {
                linger_if_bytes_wait(&stream);
            }
        }
        // Refused before the prompt, with nothing of it read: the kernel's
        // plain close, an end of stream if it sent nothing (nothing is
        // lost), a reset if bytes of it are waiting unread.
        Outcome::Denied => {
            let _ = socket.set_linger(None);
        }
        // A reset (the zero linger time every socket has): nothing it sent
        // after the server stopped reading is recorded, or its reply is not
        // recorded at all.
        Outcome::Truncated
        | Outcome::TimedOut
        | Outcome::Failed
        | Outcome::CutOff
        | Outcome::NotRecorded => {}
    }
    let reserved = reserve();
    drop(slot);
    drop(stream);
    reserved
}

/// Linux answers a close with unread bytes in the receive queue (anything
/// sent after the reply line) with a reset; so when bytes are waiting, the
/// close lingers as nginx's `lingering_close` does: shut down the write
/// side (the client sees the end of stream), read and discard for at most
/// [`LINGER_MAX_TIME`] or [`LINGER_MAX_BYTES`], then close.
#[inline(never)]
fn linger_if_bytes_wait(mut stream: &TcpStream) {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    let waiting = SockRef::from(stream)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        .is_ok_and(|n| n > 0);
    if !waiting || stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let mut deadline = Deadline::after(LINGER_MAX_TIME);
    let mut discard = [0u8; 2048];
    let mut discarded = 0;
    while discarded < LINGER_MAX_BYTES
        && let ReadStep::Data(n) = read_before(&mut stream, &mut discard, Some(&mut deadline))
    {
        discarded += n;
    }
}
