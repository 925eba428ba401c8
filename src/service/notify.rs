//! Readiness, status and watchdog messages to the service manager
//! (`Type=notify` in a systemd unit), so that systemd knows when the server
//! really serves, when it is draining, how many clients it holds, and that
//! its accept loop is still alive.
//!
//! The protocol is sd_notify(3): datagrams of `NAME=value` lines sent to the
//! Unix socket named by `NOTIFY_SOCKET`. The message texts come from the
//! `sd-notify` crate ([`NotifyState`]), and so does the watchdog period
//! (`WATCHDOG_USEC`, `WATCHDOG_PID`). The datagrams are sent here, to an
//! address read once at start-up, because the crate's `notify` reads the
//! variable on every call (so a test could only point it somewhere else by
//! changing the process's environment) and takes an abstract socket
//! (`@name`) for a file name.
//!
//! What is sent:
//! - `READY=1` once every listener is set up ([`Notifier::ready`]);
//! - `STOPPING=1` when the drain starts ([`Notifier::stopping`]);
//! - `STATUS=` with the number of connected clients, from a reporting
//!   thread, at most once per [`STATUS_INTERVAL`] and only when it changed;
//! - `WATCHDOG=1` every half of `WATCHDOG_USEC` from the same thread, but
//!   only while every accept loop is healthy: waiting in `accept`, or back
//!   from it less than half a watchdog period ago. An accept loop that is
//!   stuck (a deadlock, a thread that cannot start and retries forever)
//!   stops the pings, and systemd restarts the service, which is what the
//!   watchdog is for. Each loop reports through its own [`Heartbeat`].
//!
//! Without `NOTIFY_SOCKET` every call does nothing and no thread starts.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{self, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::warn;
use sd_notify::NotifyState;

use crate::error::describe_io_error;
use crate::lock;
use crate::logging::{self, event};

/// The variable that names the service manager's notification socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// At most one `STATUS=` message per this interval.
pub(crate) const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest time between watchdog pings, however small `WATCHDOG_USEC`
/// is: a tiny value must not make the reporting thread spin.
const MIN_WATCHDOG_PING_INTERVAL: Duration = Duration::from_millis(10);
/// The reporting thread only formats and sends short datagrams.
const REPORTER_STACK: usize = 256 * 1024;

/// Sends the service manager what it needs to know; a no-op without
/// `NOTIFY_SOCKET`. Dropping it stops the reporting thread.
pub(crate) struct Notifier {
    inner: Arc<Inner>,
    /// The thread that sends `STATUS=` and `WATCHDOG=1`, once started.
    reporter: Mutex<Option<JoinHandle<()>>>,
}

/// What the notifier and its reporting thread share.
struct Inner {
    /// Where messages go; `None` without `NOTIFY_SOCKET`.
    target: Option<Target>,
    /// `WATCHDOG_USEC`, when the watchdog is enabled for this process.
    watchdog: Option<Duration>,
    /// "serving ADDR, ADDR", the start of every status once ready.
    serving: Mutex<String>,
    /// Set by [`Notifier::stopping`]: no more watchdog pings.
    stopping: AtomicBool,
    /// The last `STATUS=` text sent, so that an unchanged one is not resent.
    last_status: Mutex<Option<String>>,
    /// One per accept loop.
    loops: Mutex<Vec<Heartbeat>>,
    /// Set when the notifier is dropped; `wake` tells the thread at once.
    finished: Mutex<bool>,
    wake: Condvar,
    /// Whether a failed send has been logged already (one line is enough).
    send_failure_logged: AtomicBool,
}

/// The service manager's socket and ours to send from.
struct Target {
    socket: UnixDatagram,
    addr: net::SocketAddr,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` and `WATCHDOG_USEC` ask for: a no-op
    /// one when `NOTIFY_SOCKET` is unset. An error when it is set but
    /// unusable (neither a path nor `@abstract`, or no socket to send
    /// from): a `Type=notify` service that cannot say it is ready would be
    /// killed at its start timeout, so better say why at once.
    pub(crate) fn from_env() -> io::Result<Notifier> {
        // Empty counts as unset, as it names nothing to send to.
        let Some(socket) = std::env::var_os(NOTIFY_SOCKET).filter(|socket| !socket.is_empty())
        else {
            return Ok(Notifier::disabled());
        };
        Notifier::to_socket(&socket, sd_notify::watchdog_enabled())
    }

    /// A notifier that sends nothing.
    pub(crate) fn disabled() -> Notifier {
        Notifier::new(None, None)
    }

    /// A notifier that sends to `socket` (a file name, or `@name` for an
    /// abstract socket, as in `NOTIFY_SOCKET`), with watchdog pings every
    /// half of `watchdog` when that is given.
    pub(crate) fn to_socket(socket: &OsStr, watchdog: Option<Duration>) -> io::Result<Notifier> {
        let addr = notify_address(socket)?;
        let socket = UnixDatagram::unbound()?;
        Ok(Notifier::new(
            Some(Target { socket, addr }),
            watchdog.filter(|period| !period.is_zero()),
        ))
    }

    fn new(target: Option<Target>, watchdog: Option<Duration>) -> Notifier {
        Notifier {
            inner: Arc::new(Inner {
                target,
                watchdog,
                serving: Mutex::new(String::new()),
                stopping: AtomicBool::new(false),
                last_status: Mutex::new(None),
                loops: Mutex::new(Vec::new()),
                finished: Mutex::new(false),
                wake: Condvar::new(),
                send_failure_logged: AtomicBool::new(false),
            }),
            reporter: Mutex::new(None),
        }
    }

    /// Whether messages go anywhere (`NOTIFY_SOCKET` was set).
    pub(crate) fn is_enabled(&self) -> bool {
        self.inner.target.is_some()
    }

    /// A new heartbeat for one accept loop to report through. The
    /// watchdog pings only while every heartbeat handed out is healthy.
    /// Without a watchdog it is inert: the accept loop pays nothing for it.
    pub(crate) fn heartbeat(&self) -> Heartbeat {
        if !self.is_enabled() || self.inner.watchdog.is_none() {
            return Heartbeat { state: None };
        }
        let heartbeat = Heartbeat::new();
        lock(&self.inner.loops).push(heartbeat.clone());
        heartbeat
    }

    /// `READY=1`, with a status naming the addresses served: call it once
    /// every listener is set up, just before accepting.
    pub(crate) fn ready(&self, listening: &[SocketAddr]) -> io::Result<()> {
        let serving = serving_text(listening);
        *lock(&self.inner.serving) = serving.clone();
        *lock(&self.inner.last_status) = Some(serving.clone());
        self.inner
            .send(&[NotifyState::Ready, NotifyState::Status(&serving)])
    }

    /// `STOPPING=1`: call it when the accept loop stops and the drain
    /// starts. Watchdog pings end (systemd no longer expects them); status
    /// messages go on until the notifier is dropped.
    pub(crate) fn stopping(&self) -> io::Result<()> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.send(&[NotifyState::Stopping])
    }

    /// Starts the thread that sends `STATUS=` with `connected()` clients
    /// (at most once per [`STATUS_INTERVAL`], only when the text changed)
    /// and the watchdog pings. Does nothing without `NOTIFY_SOCKET`, or if
    /// the thread runs already. Fails only if the thread cannot start.
    pub(crate) fn start_reporting(
        &self,
        connected: impl Fn() -> usize + Send + 'static,
    ) -> io::Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let mut reporter = lock(&self.reporter);
        if reporter.is_some() {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        *reporter = Some(
            thread::Builder::new()
                .name("notify".into())
                .stack_size(REPORTER_STACK)
                .spawn(move || inner.report(connected))?,
        );
        Ok(())
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        *lock(&self.inner.finished) = true;
        self.inner.wake.notify_all();
        if let Some(reporter) = lock(&self.reporter).take() {
            let _ = reporter.join();
        }
    }
}

impl Inner {
    /// The reporting thread: status and watchdog, each on its own period,
    /// until the notifier is dropped.
    fn report(&self, connected: impl Fn() -> usize) {
        let ping_every = self
            .watchdog
            .map(|period| (period / 2).max(MIN_WATCHDOG_PING_INTERVAL));
        let mut next_status = Instant::now() + STATUS_INTERVAL;
        let mut next_ping = ping_every.map(|every| Instant::now() + every);
        loop {
            let next = next_ping.map_or(next_status, |ping| ping.min(next_status));
            if self.wait_until(next) {
                return;
            }
            let now = Instant::now();
            if now >= next_status {
                self.send_status_if_changed(connected());
                next_status = now + STATUS_INTERVAL;
            }
            if let (Some(at), Some(every)) = (next_ping, ping_every)
                && now >= at
            {
                if !self.stopping.load(Ordering::SeqCst) && self.loops_healthy(every) {
                    let _ = self.send(&[NotifyState::Watchdog]);
                }
                next_ping = Some(now + every);
            }
        }
    }

    /// Waits until `deadline`; true if the notifier was dropped meanwhile.
    fn wait_until(&self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        let (finished, _) = self
            .wake
            .wait_timeout_while(lock(&self.finished), left, |finished| !*finished)
            .unwrap_or_else(PoisonError::into_inner);
        *finished
    }

    /// Whether there is an accept loop and every one is healthy: waiting
    /// in `accept`, or back from it less than `stall_limit` ago.
    fn loops_healthy(&self, stall_limit: Duration) -> bool {
        let loops = lock(&self.loops);
        !loops.is_empty() && loops.iter().all(|beat| !beat.stalled(stall_limit))
    }

    fn send_status_if_changed(&self, connected: usize) {
        let mut status = status_text(
            &lock(&self.serving),
            connected,
            self.stopping.load(Ordering::SeqCst),
        );
        if let Some(failure) = logging::failure() {
            status.push_str("; ");
            status.push_str(&failure);
        }
        let mut last = lock(&self.last_status);
        if last.as_deref() == Some(status.as_str()) {
            return;
        }
        if self.send(&[NotifyState::Status(&status)]).is_ok() {
            *last = Some(status);
        }
    }

    /// Sends one datagram with `states`, one per line. The first failure
    /// is logged; later ones only returned, so that a service manager gone
    /// away does not fill the log.
    fn send(&self, states: &[NotifyState]) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let message = message(states);
        let result = target
            .socket
            .send_to_addr(message.as_bytes(), &target.addr)
            .and_then(|sent| {
                if sent == message.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "notification sent in part",
                    ))
                }
            });
        if let Err(e) = &result
            && !self.send_failure_logged.swap(true, Ordering::SeqCst)
        {
            warn!(
                event = event::NOTIFY_FAILED;
                "cannot notify the service manager ({NOTIFY_SOCKET}): {}",
                describe_io_error(e)
            );
        }
        result
    }
}

/// One accept loop's sign of life, for the watchdog: the loop wraps its
/// blocking `accept` in [`Heartbeat::accepting`].
#[derive(Clone, Debug)]
pub(crate) struct Heartbeat {
    /// `None`: nobody watches (no watchdog), so nothing is recorded.
    state: Option<Arc<BeatState>>,
}

#[derive(Debug)]
struct BeatState {
    /// What the millisecond counts in `last` are counted from.
    epoch: Instant,
    /// Milliseconds since `epoch` at the loop's last sign of life, or
    /// [`IN_ACCEPT`] while it waits in `accept` (where only the kernel can
    /// keep it, and a queued client wakes it).
    last: AtomicU64,
}

/// The value of `BeatState::last` while the loop waits in `accept`.
const IN_ACCEPT: u64 = u64::MAX;

impl Heartbeat {
    fn new() -> Heartbeat {
        Heartbeat {
            state: Some(Arc::new(BeatState {
                epoch: Instant::now(),
                last: AtomicU64::new(0),
            })),
        }
    }

    /// Runs `accept` (the loop's blocking call) as "waiting, healthy", and
    /// counts its return as a sign of life.
    pub(crate) fn accepting<T>(&self, accept: impl FnOnce() -> T) -> T {
        let Some(state) = &self.state else {
            return accept();
        };
        state.last.store(IN_ACCEPT, Ordering::SeqCst);
        let result = accept();
        self.beat();
        result
    }

    /// A sign of life now.
    fn beat(&self) {
        if let Some(state) = &self.state {
            state
                .last
                .store(state.millis_since_epoch(Instant::now()), Ordering::SeqCst);
        }
    }

    /// Whether the loop is outside `accept` and gave no sign of life for
    /// `stall_limit` or longer.
    fn stalled(&self, stall_limit: Duration) -> bool {
        let Some(state) = &self.state else {
            return false;
        };
        let last = state.last.load(Ordering::SeqCst);
        if last == IN_ACCEPT {
            return false;
        }
        let now = state.millis_since_epoch(Instant::now());
        Duration::from_millis(now.saturating_sub(last)) >= stall_limit
    }
}

impl BeatState {
    fn millis_since_epoch(&self, at: Instant) -> u64 {
        let millis = at.saturating_duration_since(self.epoch).as_millis();
        u64::try_from(millis).unwrap_or(IN_ACCEPT - 1)
    }
}

/// `NOTIFY_SOCKET`'s value as an address: a file name (`/run/...`), or an
/// abstract name written with a leading `@`.
fn notify_address(socket: &OsStr) -> io::Result<net::SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'/') => net::SocketAddr::from_pathname(socket),
        Some(b'@') => net::SocketAddr::from_abstract_name(&bytes[1..]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{NOTIFY_SOCKET}={} is neither a path nor @name",
                socket.to_string_lossy()
            ),
        )),
    }
}

/// One datagram: each state on its own line.
fn message(states: &[NotifyState]) -> String {
    let mut message = String::new();
    for state in states {
        let _ = writeln!(message, "{state}");
    }
    message
}

/// "serving 127.0.0.1:1337, [::1]:1337"
fn serving_text(listening: &[SocketAddr]) -> String {
    let addrs: Vec<String> = listening.iter().map(SocketAddr::to_string).collect();
    format!("serving {}", addrs.join(", "))
}

/// The status line: "serving 127.0.0.1:1337; 3 clients connected", or
/// "stopping; 3 clients still connected" once draining.
fn status_text(serving: &str, connected: usize, stopping: bool) -> String {
    let clients = if connected == 1 { "client" } else { "clients" };
    if stopping {
        format!("stopping; {connected} {clients} still connected")
    } else if serving.is_empty() {
        format!("{connected} {clients} connected")
    } else {
        format!("{serving}; {connected} {clients} connected")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    /// A bound datagram socket standing in for systemd's, in its own
    /// directory, removed when dropped.
    struct Receiver {
        socket: UnixDatagram,
        dir: PathBuf,
    }

    impl Receiver {
        fn new(test: &str) -> Receiver {
            let dir = std::env::temp_dir().join(format!(
                "prompt-server-notify-{}-{test}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let socket = UnixDatagram::bind(dir.join("notify")).unwrap();
            Receiver { socket, dir }
        }

        fn path(&self) -> PathBuf {
            self.dir.join("notify")
        }

        fn notifier(&self, watchdog: Option<Duration>) -> Notifier {
            Notifier::to_socket(self.path().as_os_str(), watchdog).unwrap()
        }

        /// The next datagram, or `None` if none comes within `wait`.
        fn next(&self, wait: Duration) -> Option<String> {
            self.socket.set_read_timeout(Some(wait)).unwrap();
            let mut buffer = [0u8; 4096];
            match self.socket.recv(&mut buffer) {
                Ok(n) => Some(String::from_utf8_lossy(&buffer[..n]).into_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    None
                }
                Err(e) => panic!("receiving a notification failed: {e}"),
            }
        }

        /// Every datagram that arrives within `wait`.
        fn all_within(&self, wait: Duration) -> Vec<String> {
            let deadline = Instant::now() + wait;
            let mut received = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return received;
                }
                match self.next(left) {
                    Some(message) => received.push(message),
                    None => return received,
                }
            }
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn ready_and_stopping_are_sent_as_sd_notify_lines() {
        let receiver = Receiver::new("ready");
        let notifier = receiver.notifier(None);
        let addrs = [
            "127.0.0.1:1337".parse().unwrap(),
            "[::1]:1337".parse().unwrap(),
        ];
        notifier.ready(&addrs).unwrap();
        assert_eq!(
            receiver.next(WAIT).unwrap(),
            "READY=1\nSTATUS=serving 127.0.0.1:1337, [::1]:1337\n"
        );
        notifier.stopping().unwrap();
        assert_eq!(receiver.next(WAIT).unwrap(), "STOPPING=1\n");
    }

    #[test]
    fn status_is_sent_at_most_once_a_second_and_only_when_it_changed() {
        let receiver = Receiver::new("status");
        let notifier = receiver.notifier(None);
        notifier
            .ready(&["127.0.0.1:1337".parse().unwrap()])
            .unwrap();
        receiver.next(WAIT).unwrap();
        let connected = Arc::new(AtomicUsize::new(2));
        let count = Arc::clone(&connected);
        notifier
            .start_reporting(move || count.load(Ordering::SeqCst))
            .unwrap();
        let started = Instant::now();
        assert_eq!(
            receiver.next(WAIT).unwrap(),
            "STATUS=serving 127.0.0.1:1337; 2 clients connected\n"
        );
        assert!(started.elapsed() >= STATUS_INTERVAL - Duration::from_millis(50));
        // Unchanged: nothing for a while.
        assert_eq!(
            receiver.all_within(Duration::from_millis(2500)),
            Vec::<String>::new()
        );
        connected.store(1, Ordering::SeqCst);
        assert_eq!(
            receiver.next(WAIT).unwrap(),
            "STATUS=serving 127.0.0.1:1337; 1 client connected\n"
        );
        notifier.stopping().unwrap();
        assert_eq!(receiver.next(WAIT).unwrap(), "STOPPING=1\n");
        assert_eq!(
            receiver.next(WAIT).unwrap(),
            "STATUS=stopping; 1 client still connected\n"
        );
    }

    #[test]
    fn watchdog_pings_while_the_loop_waits_in_accept_and_stops_when_it_is_stuck() {
        let receiver = Receiver::new("watchdog");
        let notifier = receiver.notifier(Some(Duration::from_millis(400)));
        let heartbeat = notifier.heartbeat();
        notifier.start_reporting(|| 0).unwrap();
        // A loop blocked in accept for a whole second is healthy.
        let received = heartbeat.accepting(|| receiver.all_within(Duration::from_secs(1)));
        let pings = received.iter().filter(|m| *m == "WATCHDOG=1\n").count();
        assert!(
            pings >= 3,
            "pings every 200 ms while in accept: {received:?}"
        );
        // Back from accept and then stuck: the pings stop within a period.
        heartbeat.beat();
        let _ = receiver.all_within(Duration::from_millis(400));
        let received = receiver.all_within(Duration::from_secs(1));
        assert!(
            !received.iter().any(|m| m == "WATCHDOG=1\n"),
            "no pings for a stuck loop: {received:?}"
        );
        // Alive again (a loop that wakes by itself): pings again.
        let mut received = Vec::new();
        for _ in 0..12 {
            heartbeat.beat();
            received.extend(receiver.all_within(Duration::from_millis(50)));
        }
        assert!(received.iter().any(|m| m == "WATCHDOG=1\n"), "{received:?}");
    }

    #[test]
    fn no_watchdog_pings_without_an_accept_loop_or_once_stopping() {
        let receiver = Receiver::new("watchdog-stop");
        let notifier = receiver.notifier(Some(Duration::from_millis(200)));
        notifier.start_reporting(|| 0).unwrap();
        let received = receiver.all_within(Duration::from_millis(600));
        assert!(
            !received.iter().any(|m| m == "WATCHDOG=1\n"),
            "{received:?}"
        );
        let heartbeat = notifier.heartbeat();
        heartbeat.beat();
        notifier.stopping().unwrap();
        let received = heartbeat.accepting(|| receiver.all_within(Duration::from_millis(600)));
        assert_eq!(received.first().map(String::as_str), Some("STOPPING=1\n"));
        assert!(
            !received.iter().any(|m| m == "WATCHDOG=1\n"),
            "{received:?}"
        );
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_no_thread_starts() {
        let notifier = Notifier::disabled();
        assert!(!notifier.is_enabled());
        notifier
            .ready(&["127.0.0.1:1337".parse().unwrap()])
            .unwrap();
        notifier.stopping().unwrap();
        notifier.start_reporting(|| 0).unwrap();
        assert!(lock(&notifier.reporter).is_none());
        let heartbeat = notifier.heartbeat();
        heartbeat.accepting(|| ());
    }

    #[test]
    fn notify_socket_may_be_a_path_or_abstract_but_nothing_else() {
        assert!(notify_address(OsStr::new("/run/systemd/notify")).is_ok());
        let abstract_addr = notify_address(OsStr::new("@prompt-server/notify")).unwrap();
        assert_eq!(
            abstract_addr.as_abstract_name(),
            Some(&b"prompt-server/notify"[..])
        );
        let error = notify_address(OsStr::new("vsock:2:1234")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn an_abstract_notify_socket_receives_too() {
        let name = format!("prompt-server-test-{}", std::process::id());
        let addr = net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        receiver.set_read_timeout(Some(WAIT)).unwrap();
        let notifier = Notifier::to_socket(OsStr::new(&format!("@{name}")), None).unwrap();
        notifier.stopping().unwrap();
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STOPPING=1\n");
    }

    #[test]
    fn a_heartbeat_in_accept_is_never_stalled() {
        let heartbeat = Heartbeat::new();
        heartbeat.beat();
        thread::sleep(Duration::from_millis(30));
        assert!(heartbeat.stalled(Duration::from_millis(20)));
        assert!(!heartbeat.stalled(Duration::from_secs(10)));
        heartbeat.accepting(|| {
            thread::sleep(Duration::from_millis(30));
            assert!(!heartbeat.stalled(Duration::from_millis(20)));
        });
        assert!(!heartbeat.stalled(Duration::from_millis(20)));
    }
}
