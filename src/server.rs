//! Binding the listener and the accept loop: where connections are admitted
//! or turned away, and the one place where a connection's thread is started.
//!
//! The loop only accepts, checks the connection cap and starts a thread, so
//! no client, however slow, can delay the next one. It survives every
//! `accept` failure: ones about a single connection are skipped, ones about
//! the process (out of descriptors or memory) pause it with a growing backoff
//! instead of spinning, and serving resumes by itself.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use log::{debug, info, warn};
use socket2::SockRef;

use crate::config::{BUSY_MESSAGE, Config};
use crate::connection;
use crate::limits::{ConnectionLimit, ConnectionSlot, PerIpLimit};
use crate::logging::{LISTENING_TARGET, describe_io_error};
use crate::shutdown::Shutdown;
use crate::stats::{Stats, Summary};
use crate::thread_cache::{PARKED_THREAD_IDLE_TIMEOUT, ThreadCache};

/// First pause after an `accept` failure about the process; it doubles with
/// each further failure up to [`MAX_ACCEPT_PAUSE`] (Go's net/http does the same).
const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(5);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);
/// At most one log line per this interval about failing accepts, so that a
/// storm of failures does not become a storm of log lines.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Binds the listening socket, with an error that names the address.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| anyhow::Error::msg(describe_io_error(&e)))
        .with_context(|| format!("cannot listen on {addr}"))
}

/// What every connection thread shares with the accept loop.
struct Shared {
    config: Config,
    stats: Stats,
    /// Finished connection threads waiting for the next connection.
    thread_cache: ThreadCache<Accepted>,
    /// Connections held per client address (`--max-per-ip`).
    per_ip: PerIpLimit,
}

/// An admitted connection: what a connection thread serves.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    /// The socket inherited the listener's read and write timeouts.
    timeouts_inherited: bool,
    /// Held until the connection ends, however it ends.
    slot: ConnectionSlot,
}

/// Serves connections from `listener` until `shutdown` is triggered, then
/// closes the listener, lets connected clients finish for up to
/// `config.shutdown_timeout`, and returns what happened.
///
/// Logs `listening on ADDR` with the address actually bound first, so that a
/// caller who asked for port 0 can find out which port it got.
pub fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> anyhow::Result<Summary> {
    let local_addr = listener
        .local_addr()
        .context("cannot read the address the listener is bound to")?;
    info!(
        target: LISTENING_TARGET, event = "listening", addr:% = local_addr;
        "listening on {local_addr}"
    );
    shutdown.set_wake_addr(local_addr);
    set_connection_timeouts(&listener, &config)?;
    // Known at the first accept: whether accepted sockets carry them.
    let mut timeouts_inherited = None;

    let limit = ConnectionLimit::new(config.max_connections);
    let shared = Arc::new(Shared {
        thread_cache: ThreadCache::new(config.thread_cache, PARKED_THREAD_IDLE_TIMEOUT),
        per_ip: PerIpLimit::new(config.max_per_ip),
        config,
        stats: Stats::default(),
    });
    let mut failures = AcceptFailures::default();
    while !shutdown.is_triggered() {
        match listener.accept() {
            Ok((stream, peer)) => {
                failures.recovered();
                if shutdown.is_triggered() {
                    break;
                }
                let inherited = *timeouts_inherited
                    .get_or_insert_with(|| carries_timeouts(&stream, &shared.config));
                admit(stream, peer, inherited, &limit, &shared);
            }
            // The listener's own read timeout ran out with nobody connecting.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => thread::sleep(failures.record(&e)),
        }
    }
    // Refuse new clients at once rather than leave them in the backlog.
    drop(listener);
    shared.thread_cache.close();

    let timeout = shared.config.shutdown_timeout;
    let connected = limit.active();
    info!(
        event = "shutdown", connected = connected;
        "shutting down: no longer accepting; {connected} still connected, waiting up to {}s for them",
        timeout.as_secs_f64()
    );
    let summary = shared.stats.summary(limit.wait_until_idle(timeout));
    info!(
        event = "stopped", connections = summary.connections, replies = summary.replies,
        truncated = summary.truncated, timed_out = summary.timed_out, no_reply = summary.no_reply,
        failed = summary.failed, rejected_busy = summary.rejected_busy, denied = summary.denied,
        still_connected = summary.still_connected;
        "shutdown complete: {summary}"
    );
    Ok(summary)
}

/// Gives the connection a thread if a slot is free (a parked one if there
/// is one, else a new one), or turns it away.
fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    timeouts_inherited: bool,
    limit: &Arc<ConnectionLimit>,
    shared: &Arc<Shared>,
) {
    let Some(slot) = limit.try_acquire() else {
        turn_away(stream, peer, shared);
        return;
    };
    let accepted = Accepted {
        stream,
        peer,
        timeouts_inherited,
        slot,
    };
    let Err(accepted) = shared.thread_cache.offer(accepted) else {
        shared.stats.record_connection();
        return;
    };
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("conn-{peer}"))
        .spawn(move || connection_thread(accepted, &thread_shared));
    match spawned {
        Ok(_) => shared.stats.record_connection(),
        // The closure, with the socket and the slot, is dropped: the client
        // sees the connection close, and the slot is free again.
        Err(e) => warn!(
            event = "spawn_failed", peer:% = peer;
            "{peer} closed: cannot start a thread for it: {}",
            describe_io_error(&e)
        ),
    }
}

/// A connection thread's life: serve its connection, then, while the
/// thread cache has room, park and serve the next one handed over.
fn connection_thread(first: Accepted, shared: &Shared) {
    let mut next = Some(first);
    while let Some(Accepted {
        mut stream,
        peer,
        timeouts_inherited,
        slot,
    }) = next
    {
        debug!(event = "connected", peer:% = peer; "{peer} connected");
        let outcome = connection::serve(
            &mut stream,
            peer,
            &shared.config,
            &shared.per_ip,
            timeouts_inherited,
        );
        shared.stats.record(outcome);
        // Free the slot before the client sees the close, so that it can
        // connect again at once.
        drop(slot);
        drop(stream);
        debug!(event = "disconnected", peer:% = peer; "{peer} disconnected");
        next = shared.thread_cache.park();
    }
}

/// Sets the prompt's write timeout and the whole reply budget as the
/// listening socket's timeouts. Linux copies them to every accepted socket,
/// which saves each connection two `setsockopt` calls. (As a side effect an
/// idle `accept` returns `WouldBlock` once per reply timeout; the loop just
/// goes round again.)
fn set_connection_timeouts(listener: &TcpListener, config: &Config) -> anyhow::Result<()> {
    let socket = SockRef::from(listener);
    socket
        .set_read_timeout(config.reply_timeout)
        .and_then(|()| socket.set_write_timeout(Some(config.write_timeout)))
        .context("cannot set timeouts on the listening socket")
}

/// Whether an accepted socket carries the timeouts set on the listener
/// (Linux), or each connection must set its own (elsewhere).
fn carries_timeouts(stream: &TcpStream, config: &Config) -> bool {
    let read = stream.read_timeout().ok().flatten();
    let write = stream.write_timeout().ok().flatten();
    read.is_some() == config.reply_timeout.is_some() && write.is_some()
}

/// Sends the busy line and closes. The socket is made non-blocking first,
/// so that the accept loop can never wait on this client.
fn turn_away(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    warn!(
        event = "busy", peer:% = peer;
        "{peer} turned away: all {} connection slots are taken",
        shared.config.max_connections
    );
    shared.stats.record_busy();
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(BUSY_MESSAGE);
}

/// The accept loop's memory of recent failures: how long to pause, and
/// what has not been logged yet.
#[derive(Default)]
struct AcceptFailures {
    /// Current pause; zero while accepts succeed.
    pause: Duration,
    /// When a failure was last logged.
    last_logged: Option<Instant>,
    /// Failures since the last log line.
    unlogged: u64,
}

impl AcceptFailures {
    /// Notes a failure, logs it if no line went out recently, and says how
    /// long to pause before accepting again.
    fn record(&mut self, error: &io::Error) -> Duration {
        if about_one_connection(error) {
            self.log(error, "skipped that connection");
            return Duration::ZERO;
        }
        self.pause = (self.pause * 2).clamp(FIRST_ACCEPT_PAUSE, MAX_ACCEPT_PAUSE);
        let pause_ms = self.pause.as_millis();
        self.log(error, &format!("pausing accepts for {pause_ms} ms"));
        self.pause
    }

    /// Notes a successful accept, ending any backoff.
    fn recovered(&mut self) {
        if !self.pause.is_zero() {
            info!(event = "accept_resumed"; "accepting connections again");
            self.pause = Duration::ZERO;
        }
    }

    fn log(&mut self, error: &io::Error, action: &str) {
        self.unlogged += 1;
        let due = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL);
        if due {
            warn!(
                event = "accept_error";
                "accept failed: {}; {action} ({} failures since the last report)",
                describe_io_error(error),
                self.unlogged
            );
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        }
    }
}

/// Whether an `accept` error concerns only the connection being accepted
/// (it was aborted, a firewall refused it, its network went away), so that
/// the next accept can go ahead at once. The list is accept(2)'s.
fn about_one_connection(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPERM
                | libc::EPROTO
                | libc::EINTR
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_failures_back_off_up_to_a_second() {
        let mut failures = AcceptFailures::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<Duration> = (0..10).map(|_| failures.record(&emfile)).collect();
        assert_eq!(pauses[0], FIRST_ACCEPT_PAUSE);
        assert_eq!(pauses[1], FIRST_ACCEPT_PAUSE * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), MAX_ACCEPT_PAUSE);
        failures.recovered();
        assert_eq!(failures.record(&emfile), FIRST_ACCEPT_PAUSE);
    }

    #[test]
    fn per_connection_failures_do_not_pause() {
        let mut failures = AcceptFailures::default();
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(failures.record(&aborted), Duration::ZERO);
    }

    #[test]
    fn failures_are_logged_at_most_once_per_interval() {
        let mut failures = AcceptFailures::default();
        let enfile = io::Error::from_raw_os_error(libc::ENFILE);
        failures.record(&enfile);
        assert_eq!(failures.unlogged, 0, "the first failure is logged");
        for _ in 0..100 {
            failures.record(&enfile);
        }
        assert_eq!(failures.unlogged, 100, "later ones wait for the interval");
    }
}
