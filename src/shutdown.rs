//! The handle that stops a running server from another thread: a signal
//! handler, a test, or an embedding program.
//!
//! The accept loop blocks in `accept()`, which no flag can interrupt, so
//! [`Shutdown::trigger`] sets the flag and then connects to the listener
//! itself: the loop wakes up with that connection, sees the flag and stops.
//!
//! [`trigger_on_signals`] is how the binary uses it: the first SIGINT or
//! SIGTERM starts a graceful stop, a second one ends the process at once.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// How long [`Shutdown::trigger`] tries to reach the listener to wake it.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// The signal thread only logs and connects: a small fixed stack, so that
/// it starts whatever `RUST_MIN_STACK` says for connection threads.
const SIGNAL_THREAD_STACK: usize = 256 * 1024;

/// A cloneable "please stop" that every clone sees.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Set once, never cleared.
    requested: AtomicBool,
    /// Where to connect to wake the accept loop; set when the loop starts.
    wake_addr: Mutex<Option<SocketAddr>>,
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
        let wake_addr = *self
            .inner
            .wake_addr
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(addr) = wake_addr
            && let Err(e) = TcpStream::connect_timeout(&addr, WAKE_TIMEOUT)
        {
            warn!(event = "wake_failed"; "could not wake the accept loop at {addr}: {e}");
        }
    }

    /// Whether [`trigger`](Self::trigger) has been called.
    pub fn is_triggered(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// Records where the accept loop listens, so that a later trigger can
    /// wake it. A trigger that came earlier is seen by the loop's first
    /// [`is_triggered`](Self::is_triggered) check instead.
    pub(crate) fn set_wake_addr(&self, listening_on: SocketAddr) {
        *self
            .inner
            .wake_addr
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reachable(listening_on));
    }
}

/// Starts a thread that triggers `shutdown` on the first SIGINT or SIGTERM,
/// and exits the process at once (status 128 + signal number) on a second.
///
/// signal-hook does the async-signal-safe part (a self-pipe written from the
/// handler), so the reaction runs on an ordinary thread that may log and lock.
pub fn trigger_on_signals(shutdown: Shutdown) -> io::Result<()> {
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
                    warn!(event = "signal", signal = name; "{name} again: exiting now without waiting for clients");
                    process::exit(128 + signal);
                }
                info!(event = "signal", signal = name; "{name} received: stopping (send it again to exit at once)");
                shutdown.trigger();
            }
        })?;
    Ok(())
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
