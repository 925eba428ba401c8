//! Binding the listener and the accept loop: where connections are admitted
//! or turned away, and the one place where a connection's thread is started.
//!
//! The loop only accepts, checks the connection cap and starts a thread, so
//! no client, however slow, can delay the next one. It survives every
//! `accept` failure: ones about a single connection are skipped, ones about
//! the process (out of descriptors or memory) pause it with a growing backoff
//! instead of spinning, and serving resumes by itself.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::access::canonical;
use crate::activation::{self, InheritedListener};
use crate::capacity;
use crate::config::Config;
use crate::connection::{self, Serving};
use crate::error::{Error, describe_io_error};
use crate::limits::{ConnectionLimit, ConnectionSlot, LiveCount, PerIpLimit};
use crate::logging::{
    self, ACCEPT_ERROR_LINES, BUSY_LINES, LISTENING_TARGET, LogEvery, event, log_every,
};
use crate::metrics::{self, Metrics, ServerState};
use crate::notify::{Heartbeat, Notifier};
use crate::rate_limit::{PrefixLengths, RateBuckets, RateLimited};
use crate::shutdown::{OpenConnection, OpenConnections, Shutdown};
use crate::stats::{AcceptErrorKind, Outcome, Stats, Summary};
use crate::thread_cache::{PARKED_THREAD_IDLE_TIMEOUT, ThreadCache};

/// First pause after an `accept` failure about the process; it doubles with
/// each further failure up to [`MAX_ACCEPT_PAUSE`] (Go's net/http does the same).
const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(5);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// Where the default listen backlog comes from: the most the kernel accepts
/// (`net.core.somaxconn`), as Go does, so that a burst of clients waits in
/// the kernel's queue instead of having its handshakes dropped.
const SOMAXCONN_PATH: &str = "/proc/sys/net/core/somaxconn";
/// The backlog when `SOMAXCONN_PATH` cannot be read: Linux's default
/// `somaxconn` since 5.4.
const FALLBACK_BACKLOG: u32 = 4096;

/// Binds the listening socket for `config.listen_addr`, with
/// `config.backlog` (or the kernel's maximum) as its backlog.
///
/// # Errors
///
/// Fails if the socket cannot be bound or listen, for example because the
/// address is in use ([`std::io::ErrorKind::AddrInUse`]); the message names
/// the address.
pub fn bind(config: &Config) -> Result<TcpListener, Error> {
    let addr = config.listen_addr;
    let backlog = config.backlog.map_or_else(default_backlog, |n| n.get());
    listen(addr, backlog, config.reuse_port)
        .map_err(|e| Error::new(format!("cannot listen on {addr}"), e))
}

/// The sockets to serve: the ones a service manager passed down (socket
/// activation: `LISTEN_PID` is this process and `LISTEN_FDS` is set), each
/// logged with its name, or else one bound by [`bind`]. With inherited
/// sockets, `config.listen_addr` and `config.backlog` play no part.
///
/// Call it before anything else in the process opens descriptors.
///
/// # Errors
///
/// Fails if an inherited descriptor is not a listening TCP socket, or as
/// [`bind`] does.
pub fn listeners(config: &Config) -> Result<Vec<TcpListener>, Error> {
    let Some(inherited) = activation::inherited_listeners()? else {
        return Ok(vec![bind(config)?]);
    };
    for InheritedListener { listener, name } in &inherited {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::new("cannot read the address of an inherited socket", e))?;
        info!(
            event = event::INHERITED, addr:% = addr, name = name.as_deref();
            "serving the socket passed down by the service manager on {addr}{}",
            name.as_ref().map(|name| format!(" (named {name:?})")).unwrap_or_default()
        );
    }
    Ok(inherited
        .into_iter()
        .map(|inherited| inherited.listener)
        .collect())
}

/// What `TcpListener::bind` does (`SO_REUSEADDR`, bind, listen), with a
/// backlog of our choosing instead of std's fixed 128, and `SO_REUSEPORT`
/// if asked for.
fn listen(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// `net.core.somaxconn`, the largest backlog the kernel grants by default.
fn default_backlog() -> u32 {
    std::fs::read_to_string(SOMAXCONN_PATH)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(FALLBACK_BACKLOG)
}

/// How long, after `--shutdown-timeout`, a stopping server waits for the
/// connections it cut off to log what they had, and for the log to drain.
pub(crate) const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// An accept loop only accepts and hands over: a small fixed stack, so that
/// it starts whatever `RUST_MIN_STACK` says for connection threads.
const ACCEPT_THREAD_STACK: usize = 256 * 1024;
/// How long a stopping server still waits for connection threads once it
/// has stopped waiting for the log on their behalf.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// What every connection thread shares with the accept loop.
struct Shared {
    /// What a connection is served with.
    serving: Serving,
    stats: Stats,
    /// Finished connection threads waiting for the next connection.
    thread_cache: ThreadCache<Accepted>,
    /// The connection cap.
    limit: ConnectionLimit,
    /// Connection threads alive, parked ones included: `run` returns only
    /// once they are gone.
    threads: Arc<LiveCount>,
}

impl Shared {
    /// Works out how many connections this process can really hold (one
    /// warn line if fewer than asked), and sets up what is shared.
    fn new(mut config: Config, rate: Option<RateBuckets>, accept_loops: usize) -> Self {
        let cap = capacity::effective_max_connections(config.max_connections.get(), accept_loops);
        config.max_connections = NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN);
        let cap = config.max_connections.get();
        Shared {
            thread_cache: ThreadCache::new(
                config.thread_cache.min(cap),
                PARKED_THREAD_IDLE_TIMEOUT,
            ),
            limit: ConnectionLimit::new(cap),
            threads: LiveCount::new(),
            serving: Serving {
                per_ip: PerIpLimit::new(config.max_per_ip.map(NonZeroUsize::get)),
                open: Arc::new(OpenConnections::default()),
                rate,
                config,
            },
            stats: Stats::default(),
        }
    }
}

/// An admitted connection: what a connection thread serves.
struct Accepted {
    /// Shared with `open`, so that a stopping server can cut it off.
    stream: Arc<TcpStream>,
    peer: SocketAddr,
    /// When `accept` returned it, for the session-duration histogram.
    accepted_at: Instant,
    /// Held until the connection ends, however it ends.
    slot: ConnectionSlot,
    open: OpenConnection,
}

/// Serves connections from `listeners` (one, or several such as the IPv4
/// and IPv6 sockets systemd hands over; each gets its own accept loop, and
/// all share one connection cap) until `shutdown` is triggered. Then serves
/// the clients already queued on the listeners, closes them, lets
/// connected clients finish for up to `config.shutdown_timeout`, cuts off
/// the ones still connected (each is logged with what it had sent), and
/// returns what happened once every connection thread is gone.
///
/// Logs `listening on ADDR` for each listener with the address actually
/// bound first, so that a caller who asked for port 0 can find out which
/// port it got. A single listener is passed as `[listener]`.
///
/// # Errors
///
/// Fails before serving anyone if a listener's address or options cannot
/// be read or set, the metrics address cannot be bound, or `NOTIFY_SOCKET`
/// is unusable; once serving, no error stops it (a failing `accept` is
/// logged and retried).
pub fn run(
    listeners: impl IntoIterator<Item = TcpListener>,
    config: Config,
    shutdown: Shutdown,
) -> Result<Summary, Error> {
    let listeners: Vec<TcpListener> = listeners.into_iter().collect();
    config.validate().map_err(|e| {
        Error::new(
            "invalid configuration",
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    let rate = config.rate_limit.map(|limit| {
        RateBuckets::new(
            limit.rate,
            PrefixLengths::new(limit.prefix_v4, limit.prefix_v6),
        )
    });
    let metrics_listener = config.metrics_addr.map(bind_metrics).transpose()?;
    let notifier = if config.notify_service_manager {
        Notifier::from_env()
            .map_err(|e| Error::new("cannot reach the service manager (NOTIFY_SOCKET)", e))?
    } else {
        Notifier::disabled()
    };
    let listeners = prepare_listeners(listeners, &config, &shutdown)?;
    let shared = Arc::new(Shared::new(config, rate, listeners.len()));
    let metrics = metrics_listener
        .map(|listener| start_metrics(listener, &shared))
        .transpose()?;
    let addrs: Vec<SocketAddr> = listeners.iter().map(|(_, addr)| *addr).collect();
    report_to_service_manager(&notifier, &addrs, &shared);
    let counters = Arc::clone(&shared);
    shutdown.on_counters_request(Some(Arc::new(move || log_counters(&counters))));
    let accepted = accept_on_all(listeners, &shared, &shutdown, &notifier);
    shutdown.on_counters_request(None);
    accepted?;
    // A failure to send is logged by the notifier itself, once.
    let _ = notifier.stopping();
    shared.thread_cache.close();
    let summary = stop(&shared);
    drop(metrics);
    Ok(summary)
}

/// Logs `listening on` for each listener, gives it the options accepted
/// sockets inherit, and registers how a stop wakes its accept loop.
fn prepare_listeners(
    listeners: Vec<TcpListener>,
    config: &Config,
    shutdown: &Shutdown,
) -> Result<Vec<(Arc<TcpListener>, SocketAddr)>, Error> {
    let mut prepared = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::new("cannot read the address the listener is bound to", e))?;
        info!(
            target: LISTENING_TARGET, event = event::LISTENING, addr:% = local_addr;
            "listening on {local_addr}"
        );
        let socket = SockRef::from(&listener);
        set_connection_options(socket, config)
            .map_err(|e| Error::new("cannot set options on the listening socket", e))?;
        let listener = Arc::new(listener);
        // A port shared with other processes (SO_REUSEPORT) could hand the
        // wake-up connection to another process; an inherited socket is
        // never shut down, since the service manager listens on it too.
        if !activation::is_inherited(&listener)
            && SockRef::from(&*listener).reuse_port().unwrap_or(false)
        {
            shutdown.add_listener_to_stop(&listener);
        } else {
            shutdown.add_wake_addr(local_addr);
        }
        prepared.push((listener, local_addr));
    }
    Ok(prepared)
}

/// Runs an accept loop on its own thread for each listener, and returns
/// once every one has stopped.
fn accept_on_all(
    listeners: Vec<(Arc<TcpListener>, SocketAddr)>,
    shared: &Arc<Shared>,
    shutdown: &Shutdown,
    notifier: &Notifier,
) -> Result<(), Error> {
    thread::scope(|scope| {
        for (listener, _) in listeners {
            let heartbeat = notifier.heartbeat();
            let accepting = move || serve_listener(listener, shared, shutdown, &heartbeat);
            if let Err(e) = thread::Builder::new()
                .name("accept".to_string())
                .stack_size(ACCEPT_THREAD_STACK)
                .spawn_scoped(scope, accepting)
            {
                // Nothing accepted yet: stop the loops already started,
                // and report it like any start-up failure.
                shutdown.trigger();
                return Err(Error::new("cannot start an accept loop", e));
            }
        }
        Ok(())
    })
}

/// The `--metrics-addr` listener, with the kernel's largest backlog, so
/// that a client reconnecting in a loop does not fill the queue and have
/// other scrapers' handshakes dropped.
fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, Error> {
    listen(addr, default_backlog(), false)
        .map_err(|e| Error::new(format!("cannot listen for metrics on {addr}"), e))
}

/// Starts the `--metrics-addr` endpoint, which serves until it is dropped
/// once the server has stopped (the drain included, so that it can be
/// watched).
fn start_metrics(listener: TcpListener, shared: &Arc<Shared>) -> Result<metrics::Endpoint, Error> {
    let addr = listener.local_addr().ok();
    let metrics = Metrics::new(&shared.stats, shared.serving.rate.is_some());
    let shared = Arc::clone(shared);
    let endpoint =
        metrics::Endpoint::start(listener, move || metrics.render(&server_state(&shared)))
            .map_err(|e| Error::new("cannot start the metrics endpoint", e))?;
    if let Some(addr) = addr {
        info!(event = event::METRICS, addr:% = addr; "metrics at http://{addr}/metrics");
    }
    Ok(endpoint)
}

/// What the metrics' gauges show, read as a scrape is answered.
fn server_state(shared: &Shared) -> ServerState {
    let alive = shared.threads.get() as u64;
    let parked = shared.thread_cache.parked() as u64;
    ServerState {
        connections_open: shared.limit.active() as u64,
        threads_serving: alive.saturating_sub(parked),
        threads_parked: parked,
        max_connections: shared.serving.config.max_connections.get() as u64,
        rate_limit_networks: shared.serving.rate.as_ref().map(|rate| rate.len() as u64),
        log_lines_dropped: logging::lines_dropped(),
        log_write_errors: logging::write_errors(),
    }
}

/// Tells the service manager (if there is one) that the server is ready,
/// and starts the status reports and watchdog pings. A failure to send is
/// logged by the notifier itself, once; serving goes on either way.
fn report_to_service_manager(notifier: &Notifier, addrs: &[SocketAddr], shared: &Arc<Shared>) {
    let _ = notifier.ready(addrs);
    let shared = Arc::clone(shared);
    if let Err(e) = notifier.start_reporting(move || shared.limit.active()) {
        warn!(
            event = event::NOTIFY_FAILED;
            "cannot start reporting to the service manager: {}", describe_io_error(&e)
        );
    }
}

/// One listener's life: the accept loop, then, once stopped, the clients
/// the kernel still holds for it, then the close.
fn serve_listener(
    listener: Arc<TcpListener>,
    shared: &Arc<Shared>,
    shutdown: &Shutdown,
    heartbeat: &Heartbeat,
) {
    // A connection whose handshake completed before the listener got its
    // options (one queued by systemd before this process started, or by a
    // client quick to connect to a listener bound elsewhere) did not
    // inherit them: it gets its own, once.
    accept_queued(&listener, |stream, peer| {
        if set_connection_options(SockRef::from(&stream), &shared.serving.config).is_ok() {
            accept(stream, peer, shared, shutdown);
        }
    });
    accept_until_stopped(&listener, shared, shutdown, heartbeat);
    // The kernel has completed the handshakes of the clients still queued,
    // and some have sent their reply: serve them too, then refuse new
    // clients at once rather than leave them in the backlog.
    accept_queued(&listener, |stream, peer| {
        accept(stream, peer, shared, shutdown);
    });
}

/// The accept loop: hands each connection on until `shutdown` is triggered.
///
/// Each `accept` goes through `heartbeat`, so that the watchdog pings only
/// while the loop is waiting for clients or handing them on.
fn accept_until_stopped(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    shutdown: &Shutdown,
    heartbeat: &Heartbeat,
) {
    let mut failures = AcceptFailures::default();
    while !shutdown.is_triggered() {
        match heartbeat.accepting(|| listener.accept()) {
            Ok((stream, peer)) => {
                failures.recovered();
                accept(stream, peer, shared, shutdown);
            }
            // The listener's own read timeout ran out with nobody connecting.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // A stop that shut the listener down (`--reuseport`).
            Err(_) if shutdown.is_triggered() => {}
            Err(e) => {
                shared.stats.record_accept_error(AcceptErrorKind::of(&e));
                thread::sleep(failures.record(&e));
            }
        }
    }
}

/// Hands an accepted connection on to [`admit`], unless it is the one a
/// stopping server makes to wake its own accept loop.
fn accept(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>, shutdown: &Shutdown) {
    let peer = canonical(peer);
    if shutdown.is_wake_connection(peer) {
        // A clean close: the waker must not see a reset.
        let _ = SockRef::from(&stream).set_linger(None);
        return;
    }
    shared.stats.record_accepted();
    admit(stream, peer, shared);
}

/// Accepts, without waiting, every connection already queued on `listener`.
/// The listener blocks again afterwards.
fn accept_queued(listener: &TcpListener, mut accept: impl FnMut(TcpStream, SocketAddr)) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    loop {
        match listener.accept() {
            // Linux does not pass the listener's O_NONBLOCK on to accepted
            // sockets: they block as usual.
            Ok((stream, peer)) => accept(stream, peer),
            Err(e) if about_one_connection(&e) => {}
            Err(_) => break,
        }
    }
    let _ = listener.set_nonblocking(false);
}

/// The stop after the accept loop: wait for connected clients up to the
/// shutdown timeout, cut off the rest, wait for every connection thread
/// to log and finish (up to [`LOG_DRAIN_TIMEOUT`]), log the summary, and
/// wait for the log to take it.
fn stop(shared: &Shared) -> Summary {
    let timeout = shared.serving.config.shutdown_timeout;
    let connected = shared.limit.active();
    info!(
        event = event::SHUTDOWN, connected = connected;
        "shutting down: no longer accepting; {connected} still connected, waiting up to {}s for them",
        timeout.as_secs_f64()
    );
    let still_connected = shared.limit.wait_until_idle(Instant::now() + timeout);
    if still_connected > 0 {
        info!(
            event = event::SHUTDOWN, connected = still_connected;
            "shutdown timeout: cutting off {still_connected} still connected"
        );
    }
    shared.serving.open.cut_off_all();
    let drain_deadline = Instant::now() + LOG_DRAIN_TIMEOUT;
    let mut threads_left = shared.threads.wait_until_zero(drain_deadline);
    if threads_left > 0 {
        // The log is stalled: connection threads waiting to have their
        // reply written give up and reset their connection instead of
        // closing it cleanly; their lines stay queued, and unwritten.
        logging::stop_waiting_for_the_log();
        threads_left = shared
            .threads
            .wait_until_zero(Instant::now() + RELEASE_TIMEOUT);
    }
    logging::report_held_back();
    let mut summary = shared.stats.summary(threads_left);
    info!(
        event = event::STOPPED, connections = summary.connections, replies = summary.replies,
        truncated = summary.truncated, timed_out = summary.timed_out, no_reply = summary.no_reply,
        failed = summary.failed, rejected_busy = summary.rejected_busy,
        rate_limited = summary.rate_limited, denied = summary.denied,
        cut_off = summary.cut_off, not_recorded = summary.not_recorded,
        still_connected = summary.still_connected;
        "shutdown complete: {summary}"
    );
    summary.unwritten_log_lines =
        logging::flush(drain_deadline.saturating_duration_since(Instant::now()));
    summary
}

/// The counters so far, as one line (SIGUSR1).
fn log_counters(shared: &Shared) {
    let summary = shared.stats.summary(shared.limit.active());
    info!(
        event = event::COUNTERS, connections = summary.connections, replies = summary.replies,
        truncated = summary.truncated, timed_out = summary.timed_out, no_reply = summary.no_reply,
        failed = summary.failed, rejected_busy = summary.rejected_busy,
        rate_limited = summary.rate_limited, denied = summary.denied,
        cut_off = summary.cut_off, not_recorded = summary.not_recorded,
        connected = summary.still_connected;
        "counters so far: {}", summary.to_string().replace(" still connected", " connected now")
    );
}

/// Gives the connection a thread if a slot is free (a parked one if there
/// is one, else a new one), or turns it away.
///
/// A direct client's rate (`--max-rate-per-ip`) is checked here, before it
/// takes a slot; behind a balancer, the connection thread checks the client
/// the PROXY header names.
fn admit(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let accepted_at = Instant::now();
    let serving = &shared.serving;
    if let Some(rate) = &serving.rate
        && serving.config.proxy_protocol.is_none()
        && let Err(limited) = rate.try_acquire(peer.ip(), accepted_at)
    {
        turn_away(stream, peer, TurnedAway::RateLimited(limited, rate), shared);
        return;
    }
    let Some(slot) = shared.limit.try_acquire() else {
        turn_away(stream, peer, TurnedAway::Full, shared);
        return;
    };
    let stream = Arc::new(stream);
    let accepted = Accepted {
        open: shared.serving.open.register(&stream),
        stream,
        peer,
        accepted_at,
        slot,
    };
    shared.stats.record_connection();
    let Err(accepted) = shared.thread_cache.offer(accepted) else {
        return;
    };
    let thread_shared = Arc::clone(shared);
    let stream = Arc::clone(&accepted.stream);
    let alive = shared.threads.enter();
    let spawned = thread::Builder::new()
        .name(format!("conn-{peer}"))
        .spawn(move || {
            let _alive = alive;
            connection_thread(accepted, &thread_shared);
        });
    if let Err(e) = spawned {
        // The closure, with the slot, is dropped: the slot is free again,
        // and the client is told it is not served.
        connection::turn_away(&stream);
        shared.stats.record(Outcome::Failed);
        warn!(
            event = event::SPAWN_FAILED, peer:% = peer;
            "{peer} closed: cannot start a thread for it: {}",
            describe_io_error(&e)
        );
    }
}

/// A connection thread's life: serve its connection, then, while the
/// thread cache has room, park and serve the next one handed over.
fn connection_thread(first: Accepted, shared: &Shared) {
    let mut next = Some(first);
    while let Some(Accepted {
        stream,
        peer,
        accepted_at,
        slot,
        open,
    }) = next
    {
        debug!(event = event::CONNECTED, peer:% = peer; "{peer} connected");
        let served = connection::serve(&stream, peer, accepted_at, &shared.serving);
        let duration = accepted_at.elapsed();
        shared
            .stats
            .record_session(served.outcome, served.reply_bytes, duration);
        connection::close(stream, served.close, (slot, open));
        debug!(event = event::DISCONNECTED, peer:% = peer; "{peer} disconnected");
        next = shared.thread_cache.park();
    }
}

/// Sets, on the listening socket, what every accepted socket inherits
/// (Linux copies them when a handshake completes, which saves each
/// connection its own `setsockopt` calls; a connection already queued
/// before gets them set on its own socket): the prompt's write timeout, the whole reply budget
/// as the read timeout, and a zero linger time. (As a side effect an idle
/// `accept` returns `WouldBlock` once per reply timeout; the loop just goes
/// round again.)
///
/// With a zero linger time, closing a socket resets the connection. A
/// connection is closed cleanly only once its reply line has been written
/// to the log ([`connection::close`] restores the normal close then), so
/// if the process dies before that, by a signal or a crash, the kernel
/// resets the connection and the client knows its reply was not kept.
fn set_connection_options(socket: SockRef<'_>, config: &Config) -> io::Result<()> {
    socket.set_read_timeout(config.reply_timeout)?;
    socket.set_write_timeout(Some(config.write_timeout))?;
    socket.set_linger(Some(Duration::ZERO))
}

/// Turns a client away with the busy line (see [`connection::turn_away`]),
/// never waiting on it, and logs it (rate-limited, so that a flood of
/// clients is not a flood of lines).
fn turn_away(stream: TcpStream, peer: SocketAddr, why: TurnedAway, shared: &Shared) {
    match why {
        TurnedAway::Full => {
            shared.stats.record(Outcome::Busy);
            log_every!(
                BUSY_LINES, warn, [reason = "max_connections", peer:% = peer,],
                "{peer} turned away: all {} connection slots are taken",
                shared.serving.config.max_connections
            );
        }
        TurnedAway::RateLimited(limited, rate) => {
            shared.stats.record(Outcome::RateLimited);
            connection::log_rate_limited(peer, None, &limited, rate);
        }
    }
    connection::turn_away(&stream);
}

/// Why the accept loop turns a client away.
enum TurnedAway<'a> {
    /// Every connection slot is taken (`--max-connections`).
    Full,
    /// Its network connects faster than `--max-rate-per-ip`.
    RateLimited(RateLimited, &'a RateBuckets),
}

/// The accept loop's memory of recent failures: how long to pause, and
/// when a line about them may go out.
struct AcceptFailures {
    /// Current pause; zero while accepts succeed.
    pause: Duration,
    log: &'static LogEvery,
}

impl Default for AcceptFailures {
    fn default() -> Self {
        AcceptFailures {
            pause: Duration::ZERO,
            log: &ACCEPT_ERROR_LINES,
        }
    }
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
            info!(event = event::ACCEPT_RESUMED; "accepting connections again");
            self.pause = Duration::ZERO;
        }
    }

    fn log(&self, error: &io::Error, action: &str) {
        log_every!(
            self.log,
            warn,
            [],
            "accept failed: {}; {action}",
            describe_io_error(error)
        );
    }
}

/// Whether an `accept` error concerns only the connection being accepted
/// (it was aborted, a firewall refused it, its network went away), so that
/// the next accept can go ahead at once. The list is accept(2)'s.
fn about_one_connection(error: &io::Error) -> bool {
    AcceptErrorKind::of(error) == AcceptErrorKind::Connection
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
        for _ in 0..100 {
            failures.record(&enfile);
        }
        assert_eq!(failures.log.due(), None, "later ones wait for the interval");
    }

    #[test]
    fn accepted_sockets_inherit_the_listeners_options() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let config = Config {
            reply_timeout: Some(Duration::from_secs(7)),
            ..Config::default()
        };
        set_connection_options(SockRef::from(&listener), &config).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.read_timeout().unwrap(), config.reply_timeout);
        assert_eq!(
            accepted.write_timeout().unwrap(),
            Some(config.write_timeout)
        );
        assert_eq!(
            SockRef::from(&accepted).linger().unwrap(),
            Some(Duration::ZERO)
        );
    }
}
