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
//! [`Shutdown::trigger_on_signals`] is how the binary uses it: the first SIGINT or
//! SIGTERM starts a graceful stop, a second one ends the process at once.
//!
//! `OpenConnections` is what a stop ends at its deadline: a handle to
//! every open connection, so that the server can cut off the ones still
//! open itself, and each connection thread logs what it had read.

use std::collections::HashMap;
use std::io;
use std::net::{self, IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::logging::event;

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

#[derive(Debug, Default)]
struct Inner {
    /// Set once, never cleared.
    requested: AtomicBool,
    /// How to wake each accept loop, one per listener; noted when the
    /// loops start.
    wake_targets: Mutex<Vec<WakeTarget>>,
    /// The addresses the wake-up connections come from, so that the accept
    /// loops do not serve them as clients.
    wake_from: Mutex<Vec<SocketAddr>>,
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
        let targets = self
            .inner
            .wake_targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
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
            self.inner
                .wake_from
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(crate::access::canonical(from));
        }
        socket.connect_timeout(&addr.into(), WAKE_TIMEOUT)
    }

    /// Whether an accepted connection from `peer` is [`trigger`](Self::trigger)'s
    /// wake-up call rather than a client.
    pub(crate) fn is_wake_connection(&self, peer: SocketAddr) -> bool {
        self.inner
            .wake_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&peer)
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
        self.inner
            .wake_targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(target);
    }

    /// Starts a thread that triggers this handle on the first SIGINT or
    /// SIGTERM, and exits the process at once (status 128 + signal number) on a
    /// second.
    ///
    /// signal-hook does the async-signal-safe part (a self-pipe written from the
    /// handler), so the reaction runs on an ordinary thread that may log and lock.
    ///
    /// # Errors
    ///
    /// Fails if the signal handlers cannot be installed or the thread cannot
    /// be started.
    pub fn trigger_on_signals(&self) -> io::Result<()> {
        let shutdown = self.clone();
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        thread::Builder::new()
            .name("signals".to_string())
            .stack_size(SIGNAL_THREAD_STACK)
            .spawn(move || {
                for signal in signals.forever() {
                    let name = if signal == SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    if shutdown.is_triggered() {
                        warn!(event = event::SIGNAL, signal = name; "{name} again: exiting now without waiting for clients");
                        // Connections still open are reset by the exit (their
                        // sockets linger zero), so no client mistakes it for a
                        // clean close; only the log gets a moment.
                        crate::logging::flush(EXIT_LOG_FLUSH_TIMEOUT);
                        process::exit(128 + signal);
                    }
                    info!(event = event::SIGNAL, signal = name; "{name} received: stopping (send it again to exit at once)");
                    shutdown.trigger();
                }
            })?;
        Ok(())
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
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(stream));
        OpenConnection {
            connections: Arc::clone(self),
            id,
        }
    }

    /// Shuts down the read side of every open connection: a thread waiting
    /// for a reply sees the end of it at once and logs what it had.
    pub(crate) fn cut_off_all(&self) {
        self.cut_off.store(true, Ordering::SeqCst);
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
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
        self.connections
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
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
