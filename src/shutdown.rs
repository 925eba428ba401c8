//! The handle that stops a running server from another thread: a signal
//! handler, a test, or an embedding program.
//!
//! The accept loop blocks in `accept()`, which no flag can interrupt, so
//! [`Shutdown::trigger`] sets the flag and then connects to the listener
//! itself: the loop wakes up with that connection, sees the flag and stops.
//! A `--reuseport` listener shares its port with other processes, and the
//! kernel may hand that connection to one of them instead; such a listener
//! is shut down instead (its `accept` fails at once), which also ends its
//! listening, as closing it would. An inherited socket is never shut down:
//! systemd keeps listening on its copy.
//!
//! [`Shutdown::trigger_on_signals`] is how the binary uses it: the first
//! SIGINT, SIGTERM or SIGQUIT starts a graceful stop, a second one ends the
//! process at once. SIGHUP reopens the log file (logrotate), SIGUSR1 logs
//! the counters so far, and every other signal whose default would end the
//! process (SIGUSR2, SIGALRM, SIGXFSZ, real-time signals, ...) is logged and
//! ignored: no signal an operator may send ends the server without its
//! drain, but SIGKILL and a second stop signal.
//!
//! `OpenConnections` is what a stop ends at its deadline: a handle to
//! every open connection, so that the server can cut off the ones still
//! open itself, and each connection thread logs what it had read.

use std::collections::HashMap;
use std::io;
use std::net::{self, IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

use libc::{SIGPWR, SIGSTKFLT};
use log::{info, warn};
use signal_hook::consts::{
    SIGALRM, SIGHUP, SIGINT, SIGIO, SIGPROF, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGVTALRM,
    SIGXCPU, SIGXFSZ,
};
use signal_hook::iterator::Signals;
use signal_hook::low_level::signal_name;

use crate::lock;
use crate::logging::{self, event};

/// Signals that start a graceful stop (a second one exits at once).
const STOP_SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGQUIT];
/// Signals whose default action would end the process, that mean nothing
/// here: logged and ignored. SIGXFSZ among them, so that a log file at
/// its size limit fails its writes (which the log reports and retries)
/// instead of killing the server.
const IGNORED_SIGNALS: [i32; 9] = [
    SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGXCPU, SIGXFSZ, SIGSTKFLT,
];

/// How long [`Shutdown::trigger`] tries to reach the listener to wake it.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a second signal lets the log take the lines before the exit.
const EXIT_LOG_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);
/// The signal thread only logs and connects: a small fixed stack, so that
/// it starts whatever `RUST_MIN_STACK` says for connection threads.
const SIGNAL_THREAD_STACK: usize = 256 * 1024;

/// How a trigger wakes one accept loop.
#[derive(Debug, Clone)]
enum WakeTarget {
    /// Connect to this address (the listener's, or its loopback).
    Connect(SocketAddr),
    /// Shut the listener down; gone once its loop has ended.
    StopListening(Weak<TcpListener>),
}

/// A cloneable "please stop" that every clone sees.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Set once, never cleared.
    requested: AtomicBool,
    /// How to wake each accept loop, one per listener; noted when the
    /// loops start.
    wake_targets: Mutex<Vec<WakeTarget>>,
    /// The addresses the wake-up connections come from, so that the accept
    /// loops do not serve them as clients.
    wake_from: Mutex<Vec<SocketAddr>>,
    /// What SIGUSR1 logs: set by a running server.
    counters: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Shutdown {
    /// A new, untriggered handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the server to stop accepting; returns at once. Calling it again
    /// is harmless.
    pub fn trigger(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        let targets = lock(&self.inner.wake_targets).clone();
        for target in targets {
            let woken = match &target {
                WakeTarget::Connect(addr) => self.wake(*addr),
                WakeTarget::StopListening(listener) => match listener.upgrade() {
                    Some(listener) => SockRef::from(&*listener).shutdown(net::Shutdown::Read),
                    // Its loop has ended already.
                    None => Ok(()),
                },
            };
            if let Err(e) = woken {
                warn!(event = event::WAKE_FAILED; "could not wake an accept loop ({target:?}): {e}");
            }
        }
    }

    /// Connects to the listener from an address noted first, so that the
    /// accept loop can tell this connection from a client's.
    fn wake(&self, addr: SocketAddr) -> io::Result<()> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(addr.ip(), 0).into())?;
        if let Some(from) = socket.local_addr()?.as_socket() {
            lock(&self.inner.wake_from).push(crate::access::canonical(from));
        }
        socket.connect_timeout(&addr.into(), WAKE_TIMEOUT)
    }

    /// Whether an accepted connection from `peer` is [`trigger`](Self::trigger)'s
    /// wake-up call rather than a client.
    pub(crate) fn is_wake_connection(&self, peer: SocketAddr) -> bool {
        lock(&self.inner.wake_from).contains(&peer)
    }

    /// Whether [`trigger`](Self::trigger) has been called.
    pub fn is_triggered(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// Records where an accept loop listens, so that a later trigger can
    /// wake it. A trigger that came earlier is seen by the loop's first
    /// [`is_triggered`](Self::is_triggered) check instead.
    pub(crate) fn add_wake_addr(&self, listening_on: SocketAddr) {
        self.add_wake_target(WakeTarget::Connect(reachable(listening_on)));
    }

    /// Records a listener that a trigger wakes by shutting it down: one
    /// whose port other processes share (`SO_REUSEPORT`), where a wake-up
    /// connection could reach another process's accept loop.
    pub(crate) fn add_listener_to_stop(&self, listener: &Arc<TcpListener>) {
        self.add_wake_target(WakeTarget::StopListening(Arc::downgrade(listener)));
    }

    fn add_wake_target(&self, target: WakeTarget) {
        lock(&self.inner.wake_targets).push(target);
    }

    /// Sets what SIGUSR1 logs (the counters of the server running now), or
    /// clears it.
    pub(crate) fn on_counters_request(&self, log_counters: Option<Arc<dyn Fn() + Send + Sync>>) {
        *lock(&self.inner.counters) = log_counters;
    }

    /// Starts a thread that handles the signals an operator sends:
    ///
    /// - SIGINT, SIGTERM, SIGQUIT: the first triggers this handle (a
    ///   graceful stop); a second exits the process at once, with status
    ///   128 + the signal's number;
    /// - SIGHUP: reopens the log file (after logrotate renamed it); without
    ///   one it is logged and ignored;
    /// - SIGUSR1: logs one line with the counters so far;
    /// - SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGXCPU,
    ///   SIGXFSZ, SIGSTKFLT and the real-time signals: logged and ignored.
    ///
    /// signal-hook does the async-signal-safe part (a self-pipe written from
    /// the handler), so the reaction runs on an ordinary thread that may
    /// log and lock; it never waits for the log.
    ///
    /// # Errors
    ///
    /// Fails if the signal handlers cannot be installed or the thread cannot
    /// be started.
    pub fn trigger_on_signals(&self) -> io::Result<()> {
        let shutdown = self.clone();
        let real_time = libc::SIGRTMIN()..=libc::SIGRTMAX();
        let handled = STOP_SIGNALS
            .into_iter()
            .chain([SIGHUP, SIGUSR1])
            .chain(IGNORED_SIGNALS)
            .chain(real_time);
        let mut signals = Signals::new(handled)?;
        thread::Builder::new()
            .name("signals".to_string())
            .stack_size(SIGNAL_THREAD_STACK)
            .spawn(move || {
                for signal in signals.forever() {
                    shutdown.on_signal(signal);
                }
            })?;
        Ok(())
    }

    fn on_signal(&self, signal: i32) {
        let number = signal.to_string();
        let name = signal_name(signal).unwrap_or(&number);
        if STOP_SIGNALS.contains(&signal) {
            if self.is_triggered() {
                warn!(event = event::SIGNAL, signal = name; "{name} again: exiting now without waiting for clients");
                // Connections still open are reset by the exit (their
                // sockets linger zero), so no client mistakes it for a
                // clean close; only the log gets a moment.
                logging::flush(EXIT_LOG_FLUSH_TIMEOUT);
                process::exit(128 + signal);
            }
            info!(event = event::SIGNAL, signal = name; "{name} received: stopping (send it again to exit at once)");
            self.trigger();
        } else if signal == SIGHUP {
            if logging::reopen() {
                info!(event = event::SIGNAL, signal = name; "{name} received: reopening the log file");
            } else {
                info!(event = event::SIGNAL, signal = name; "{name} received: no log file to reopen; ignored");
            }
        } else if signal == SIGUSR1 {
            let log_counters = lock(&self.inner.counters).clone();
            match log_counters {
                Some(log_counters) => log_counters(),
                None => {
                    info!(event = event::SIGNAL, signal = name; "{name} received: no server running")
                }
            }
        } else {
            info!(event = event::SIGNAL, signal = name; "{name} received: ignored");
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("requested", &self.requested)
            .finish_non_exhaustive()
    }
}

/// Every open connection, by a handle shared with its thread, so that a
/// stopping server can end the ones still open at its deadline.
#[derive(Debug, Default)]
pub(crate) struct OpenConnections {
    streams: Mutex<HashMap<u64, Arc<TcpStream>>>,
    next_id: AtomicU64,
    /// Set when the deadline has come and connections are being cut off.
    cut_off: AtomicBool,
}

/// A connection's entry in [`OpenConnections`]; removed on drop.
#[derive(Debug)]
pub(crate) struct OpenConnection {
    connections: Arc<OpenConnections>,
    id: u64,
}

impl OpenConnections {
    /// Notes `stream` as open until the returned entry is dropped.
    pub(crate) fn register(self: &Arc<Self>, stream: &Arc<TcpStream>) -> OpenConnection {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.streams).insert(id, Arc::clone(stream));
        OpenConnection {
            connections: Arc::clone(self),
            id,
        }
    }

    /// Shuts down the read side of every open connection: a thread waiting
    /// for a reply sees the end of it at once and logs what it had.
    pub(crate) fn cut_off_all(&self) {
        self.cut_off.store(true, Ordering::SeqCst);
        let streams = lock(&self.streams);
        for stream in streams.values() {
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
    }

    /// Whether connections are being cut off by a stopping server.
    pub(crate) fn cutting_off(&self) -> bool {
        self.cut_off.load(Ordering::SeqCst)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        lock(&self.connections.streams).remove(&self.id);
    }
}

/// An address that reaches a listener bound to `addr`: a listener on "every
/// interface" is reached through the loopback of its family.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}
