//! The [`Shutdown`] handle that stops a running server from another thread
//! (the signal thread, a test, an embedder), and [`drain`], the stop itself
//! once the accept loops have ended. No flag interrupts a blocking `accept()`,
//! so a trigger sets the flag and connects to the listener itself (tiny-http's
//! self-connect); a `--reuseport` listener is shut down instead, since the
//! kernel may hand that connection to another process on the port.

use std::io;
use std::net::{self, IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use libc::{SIGPWR, SIGSTKFLT};
use log::{info, warn};
use signal_hook::consts::{
    SIGABRT, SIGALRM, SIGHUP, SIGINT, SIGIO, SIGPROF, SIGQUIT, SIGSYS, SIGTERM, SIGTRAP, SIGUSR1,
    SIGUSR2, SIGVTALRM, SIGXCPU, SIGXFSZ,
};
use signal_hook::iterator::Signals;
use signal_hook::low_level::signal_name;

use crate::limits::{ConnectionLimit, LiveCount, canonical};
use crate::logging::{self, COUNTERS_TARGET, event};
use crate::stats::{Stats, Summary};
use crate::{helper_thread, lock};

/// Signals that start a graceful stop; a second one exits at once. (SIGQUIT and
/// SIGABRT ask for a core dump, which would hold replies not yet recorded.)
const STOP_SIGNALS: [i32; 4] = [SIGINT, SIGTERM, SIGQUIT, SIGABRT];
/// Signals whose default would end the process but that mean nothing here:
/// logged and ignored (SIGXFSZ too: a log file at its size limit then fails
/// its writes, which are reported and retried).
const IGNORED_SIGNALS: [i32; 11] = [
    SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGXCPU, SIGXFSZ, SIGSTKFLT, SIGTRAP,
    SIGSYS,
];

/// How long [`Shutdown::trigger`] tries to reach the listener to wake it.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a second signal lets the log take the lines before the exit.
const EXIT_LOG_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

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
    /// How to wake each accept loop, one per listener.
    wake_targets: Mutex<Vec<WakeTarget>>,
    /// Where the wake-up connections come from: not clients.
    wake_from: Mutex<Vec<SocketAddr>>,
    /// What SIGUSR1 logs and what SIGHUP re-reads (see [`Shutdown::on_requests`]).
    hooks: Mutex<(Hook<Summary>, Hook<()>)>,
}

/// What a running server gives a signal: `None` while none runs.
pub(crate) type Hook<T> = Option<Arc<dyn Fn() -> T + Send + Sync>>;

impl Shutdown {
    /// A new, untriggered handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the server to stop accepting and returns at once; calling it again is harmless.
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

    /// Connects to `addr` from an address noted first as a wake-up's.
    fn wake(&self, addr: SocketAddr) -> io::Result<()> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(addr.ip(), 0).into())?;
        if let Some(from) = socket.local_addr()?.as_socket() {
            lock(&self.inner.wake_from).push(canonical(from));
        }
        socket.connect_timeout(&addr.into(), WAKE_TIMEOUT)
    }

    /// Wakes the next thread waiting in `accept` on `listening_on`.
    pub(crate) fn pass_wake_on(&self, listening_on: SocketAddr) {
        if let Err(e) = self.wake(reachable(listening_on)) {
            warn!(event = event::WAKE_FAILED; "could not wake a thread waiting in accept: {e}");
        }
    }

    /// Whether `stream` from `peer` is a trigger's wake-up (then closed cleanly) or a client.
    pub(crate) fn is_wake_connection(&self, stream: &TcpStream, peer: SocketAddr) -> bool {
        let wake = self.is_triggered() && lock(&self.inner.wake_from).contains(&peer);
        if wake {
            let _ = SockRef::from(stream).set_linger(None);
        }
        wake
    }

    /// Whether [`trigger`](Self::trigger) has been called.
    pub fn is_triggered(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// Notes how a trigger wakes `listener`'s accept loop: by shutting down a
    /// shared port (never an inherited socket: systemd keeps its copy), else
    /// by connecting to `addr`.
    pub(crate) fn add_accept_loop(
        &self,
        listener: &Arc<TcpListener>,
        addr: SocketAddr,
        inherited: bool,
    ) {
        let target = if !inherited && SockRef::from(&**listener).reuse_port().unwrap_or(false) {
            WakeTarget::StopListening(Arc::downgrade(listener))
        } else {
            WakeTarget::Connect(reachable(addr))
        };
        lock(&self.inner.wake_targets).push(target);
    }

    /// Sets where SIGUSR1 reads the counters it logs, and what SIGHUP re-reads
    /// besides the log file (the TLS files); `None`, `None` once the server stops.
    pub(crate) fn on_requests(&self, counters: Hook<Summary>, reload: Hook<()>) {
        *lock(&self.inner.hooks) = (counters, reload);
    }

    /// Starts a thread that handles the signals an operator sends: SIGINT,
    /// SIGTERM, SIGQUIT or SIGABRT triggers this handle (a graceful stop), a
    /// second one exits at once with status 128 + its number; SIGHUP reopens
    /// the log file and re-reads TLS files; SIGUSR1 logs the counters so far;
    /// any other signal whose default would end the process is logged and
    /// ignored. signal-hook's self-pipe runs the reaction on an ordinary thread.
    ///
    /// # Errors
    ///
    /// Fails if the signal handlers cannot be installed or the thread cannot start.
    pub fn trigger_on_signals(&self) -> io::Result<()> {
        let shutdown = self.clone();
        let real_time = libc::SIGRTMIN()..=libc::SIGRTMAX();
        let handled = STOP_SIGNALS.into_iter().chain([SIGHUP, SIGUSR1]);
        let mut signals = Signals::new(handled.chain(IGNORED_SIGNALS).chain(real_time))?;
        helper_thread("signals").spawn(move || {
            for signal in signals.forever() {
                shutdown.handle_signal(signal);
            }
        })?;
        Ok(())
    }

    fn handle_signal(&self, signal: i32) {
        let name: &str = &match signal {
            SIGPWR => "SIGPWR".to_string(),
            SIGSTKFLT => "SIGSTKFLT".to_string(),
            n if n >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", n - libc::SIGRTMIN()),
            n => signal_name(n).map_or_else(|| n.to_string(), str::to_string),
        };
        let stop = STOP_SIGNALS.contains(&signal);
        if stop && self.is_triggered() {
            warn!(event = event::SIGNAL, signal = name; "{name} again: exiting now without waiting for clients");
            // Open connections are reset by the exit (linger zero).
            logging::flush(EXIT_LOG_FLUSH_TIMEOUT);
            process::exit(128 + signal);
        }
        let (counters, reload) = lock(&self.inner.hooks).clone();
        let what = match signal {
            _ if stop => "stopping (send it again to exit at once)",
            SIGHUP if logging::reopen() => "reopening the log file",
            SIGHUP if reload.is_some() => "re-reading the TLS files",
            SIGHUP => "no log file to reopen; ignored",
            SIGUSR1 => match counters {
                Some(counters) => return log_summary(&counters(), false),
                None => "no server running",
            },
            _ => "ignored",
        };
        info!(event = event::SIGNAL, signal = name; "{name} received: {what}");
        if let Some(reload) = reload.filter(|_| signal == SIGHUP) {
            reload();
        }
        if stop {
            self.trigger();
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

/// An address that reaches a listener bound to `addr` (loopback for "every interface").
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// How long, after `--shutdown-timeout`, a stop waits for the connections
/// it cut off to record what they had, and for the log to drain.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it then waits for threads once it gave up on the log.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// The stop after the accept loops: waits up to `timeout` for connected
/// clients, cuts off the rest, waits for every connection thread to record
/// and finish, logs what was held back and the summary, and waits for the
/// log to take it.
pub(crate) fn drain(
    limit: &ConnectionLimit,
    threads: &LiveCount,
    stats: &Stats,
    timeout: Duration,
) -> Summary {
    let connected = limit.active();
    info!(
        event = event::SHUTDOWN, connected = connected;
        "shutting down: no longer accepting; {connected} still connected, waiting up to {}s for them",
        timeout.as_secs_f64()
    );
    let still_connected = limit.wait_until_idle(Instant::now() + timeout);
    if still_connected > 0 {
        info!(
            event = event::SHUTDOWN, connected = still_connected;
            "shutdown timeout: cutting off {still_connected} still connected"
        );
    }
    limit.cut_off_all();
    let drain_deadline = Instant::now() + LOG_DRAIN_TIMEOUT;
    let mut threads_left = threads.wait_until_zero(drain_deadline);
    if threads_left > 0 {
        // The log is stalled: threads waiting for it give up and reset
        // their clients; their lines stay queued.
        logging::stop_waiting_for_the_log();
        threads_left = threads.wait_until_zero(Instant::now() + RELEASE_TIMEOUT);
    }
    logging::report_held_back();
    let mut summary = stats.summary(threads_left);
    log_summary(&summary, true);
    summary.unwritten_log_lines =
        logging::flush(drain_deadline.saturating_duration_since(Instant::now()));
    summary
}

/// Logs `summary`, its counts as fields: the counters so far (SIGUSR1) or the stop's last line.
fn log_summary(summary: &Summary, stopped: bool) {
    let (target, kind, said) = match stopped {
        true => (module_path!(), event::STOPPED, "shutdown complete"),
        false => (COUNTERS_TARGET, event::COUNTERS, "counters so far"),
    };
    let mut text = summary.to_string();
    if !stopped {
        text = text.replace(" still connected", " connected now");
    }
    let connected = summary.still_connected;
    info!(
        target: target, event = kind, connections = summary.connections, replies = summary.replies,
        truncated = summary.truncated, timed_out = summary.timed_out, no_reply = summary.no_reply,
        failed = summary.failed, rejected_busy = summary.rejected_busy,
        rate_limited = summary.rate_limited, denied = summary.denied, cut_off = summary.cut_off,
        not_recorded = summary.not_recorded, tls_handshake_failed = summary.tls_handshake_failed,
        connected = (!stopped).then_some(connected), still_connected = stopped.then_some(connected);
        "{said}: {text}"
    );
}
