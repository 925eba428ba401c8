//! Readiness, status and watchdog datagrams to the service manager (`Type=notify`,
//! sd_notify(3)), sent to `NOTIFY_SOCKET` read once (`sd-notify` 0.5.0 reads it at
//! every call, and takes `@name` for a file). `WATCHDOG=1` goes only while every
//! accept loop's [`Heartbeat`] is healthy: systemd restarts a server whose loop is stuck.

use std::ffi::OsStr;
use std::io;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{self, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;
use sd_notify::NotifyState;

use crate::error::describe_io_error;
use crate::logging::{self, event};
use crate::{helper_thread, lock};

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// However small `WATCHDOG_USEC` is, the reporting thread must not spin.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);

/// Tells the service manager how the server is; dropping it stops the reporting thread.
#[derive(Default)]
pub(crate) struct Notifier {
    inner: Arc<Inner>,
    /// The reporting thread, and the sender whose drop stops it at once.
    reporter: Option<(Sender<()>, JoinHandle<()>)>,
}

/// What the notifier and its reporting thread share.
#[derive(Default)]
struct Inner {
    /// The service manager's address, and a socket to send from.
    target: Option<(UnixDatagram, net::SocketAddr)>,
    /// Half of `WATCHDOG_USEC`, when the watchdog is enabled for this process.
    ping_every: Option<Duration>,
    /// "serving ADDR, ADDR; ", the start of every status once ready.
    serving: Mutex<String>,
    /// Set by [`Notifier::stopping`]: no more watchdog pings.
    stopping: AtomicBool,
    loops: Mutex<Vec<Heartbeat>>,
    send_failure_logged: AtomicBool,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` and `WATCHDOG_USEC` ask for, if `enabled`;
    /// an error if `NOTIFY_SOCKET` is unusable (a service that cannot say it
    /// is ready is killed at its start timeout: better say why at once).
    pub(crate) fn from_env(enabled: bool) -> io::Result<Notifier> {
        // Empty counts as unset: it names nothing to send to.
        match std::env::var_os(NOTIFY_SOCKET).filter(|socket| !socket.is_empty()) {
            Some(socket) if enabled => Notifier::to_socket(&socket, sd_notify::watchdog_enabled()),
            _ => Ok(Notifier::default()),
        }
    }

    /// Sends to `socket` ([`notify_address`]), pinging every half of `watchdog`.
    fn to_socket(socket: &OsStr, watchdog: Option<Duration>) -> io::Result<Notifier> {
        let watchdog = watchdog.filter(|period| !period.is_zero());
        Ok(Notifier {
            inner: Arc::new(Inner {
                target: Some((UnixDatagram::unbound()?, notify_address(socket)?)),
                ping_every: watchdog.map(|period| (period / 2).max(MIN_PING_INTERVAL)),
                ..Inner::default()
            }),
            reporter: None,
        })
    }

    /// A heartbeat for one more accept loop; inert without a watchdog.
    pub(crate) fn heartbeat(&self) -> Heartbeat {
        let alive_now = || Arc::new(Mutex::new(Some(Instant::now())));
        let heartbeat = Heartbeat(self.inner.ping_every.map(|_| alive_now()));
        lock(&self.inner.loops).push(heartbeat.clone());
        heartbeat
    }

    /// `READY=1`, with a status naming the addresses served, then the reporting
    /// thread (if there is a `NOTIFY_SOCKET`), which counts `connected()`
    /// clients for the status; a failure is logged, and serving goes on.
    pub(crate) fn ready(
        &mut self,
        listening: &[SocketAddr],
        connected: impl Fn() -> usize + Send + 'static,
    ) {
        let addrs: Vec<String> = listening.iter().map(SocketAddr::to_string).collect();
        let serving = format!("serving {}", addrs.join(", "));
        *lock(&self.inner.serving) = format!("{serving}; ");
        let ready = [NotifyState::Ready, NotifyState::Status(&serving)];
        let _ = self.inner.send(&ready);
        if self.inner.target.is_none() {
            return;
        }
        let (stop, stopped) = mpsc::channel();
        let inner = Arc::clone(&self.inner);
        let reporter = helper_thread("notify").spawn(move || inner.report(connected, &stopped));
        match reporter {
            Ok(thread) => self.reporter = Some((stop, thread)),
            Err(e) => warn!(
                event = event::NOTIFY_FAILED;
                "cannot start reporting to the service manager: {}", describe_io_error(&e)
            ),
        }
    }

    /// `STOPPING=1`, as the drain starts. Watchdog pings end (systemd no
    /// longer expects them); status messages go on until the drop.
    pub(crate) fn stopping(&self) {
        self.inner.stopping.store(true, SeqCst);
        let _ = self.inner.send(&[NotifyState::Stopping]);
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.reporter.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

impl Inner {
    /// The reporting thread, until the notifier drops the sender of
    /// `stopped`: a changed status at most once per [`STATUS_INTERVAL`], and
    /// watchdog pings every `ping_every`, each on its own clock.
    fn report(&self, connected: impl Fn() -> usize, stopped: &mpsc::Receiver<()>) {
        let mut next_status = Instant::now() + STATUS_INTERVAL;
        let mut next_ping = self.ping_every.map(|every| Instant::now() + every);
        let mut last_status = String::new();
        loop {
            let next = next_ping.map_or(next_status, |ping| ping.min(next_status));
            let left = next.saturating_duration_since(Instant::now());
            if stopped.recv_timeout(left) != Err(RecvTimeoutError::Timeout) {
                return;
            }
            let now = Instant::now();
            if now >= next_status {
                let status = self.status(connected());
                if status != last_status && self.send(&[NotifyState::Status(&status)]).is_ok() {
                    last_status = status;
                }
                next_status = now + STATUS_INTERVAL;
            }
            if let (Some(at), Some(every)) = (next_ping, self.ping_every)
                && now >= at
            {
                let loops = lock(&self.loops);
                let healthy = !loops.is_empty() && loops.iter().all(|beat| !beat.stalled(every));
                if healthy && !self.stopping.load(SeqCst) {
                    let _ = self.send(&[NotifyState::Watchdog]);
                }
                next_ping = Some(now + every);
            }
        }
    }

    /// "serving 127.0.0.1:1337; 3 clients connected", or "stopping; 3
    /// clients still connected" once draining, and what fails in the log.
    fn status(&self, connected: usize) -> String {
        let clients = if connected == 1 { "client" } else { "clients" };
        let failing = logging::failure().map_or(String::new(), |failure| format!("; {failure}"));
        if self.stopping.load(SeqCst) {
            return format!("stopping; {connected} {clients} still connected{failing}");
        }
        let serving = lock(&self.serving);
        format!("{serving}{connected} {clients} connected{failing}")
    }

    /// Sends one datagram of `states`, a line each. Only the first failure
    /// is logged, so that a service manager gone away does not fill the log.
    fn send(&self, states: &[NotifyState]) -> io::Result<()> {
        let Some((socket, addr)) = &self.target else {
            return Ok(());
        };
        let message: String = states.iter().map(|state| format!("{state}\n")).collect();
        // A datagram is sent whole or not at all.
        let result = socket.send_to_addr(message.as_bytes(), addr).map(drop);
        if let Err(e) = &result
            && !self.send_failure_logged.swap(true, SeqCst)
        {
            warn!(
                event = event::NOTIFY_FAILED;
                "cannot notify the service manager ({NOTIFY_SOCKET}): {}", describe_io_error(e)
            );
        }
        result
    }
}

/// One accept loop's sign of life for the watchdog (`None` without one): when
/// it last came back from `accept`, or `None` while it waits there.
#[derive(Clone, Debug)]
pub(crate) struct Heartbeat(Option<Arc<Mutex<Option<Instant>>>>);

impl Heartbeat {
    /// Runs `accept` (the loop's blocking call) as "waiting, healthy", and
    /// counts its return as a sign of life.
    pub(crate) fn accepting<T>(&self, accept: impl FnOnce() -> T) -> T {
        let Some(last) = &self.0 else {
            return accept();
        };
        *lock(last) = None;
        let result = accept();
        *lock(last) = Some(Instant::now());
        result
    }

    /// Whether the loop is outside `accept` with no sign of life for `stall_limit`.
    fn stalled(&self, stall_limit: Duration) -> bool {
        let last = self.0.as_ref().and_then(|last| *lock(last));
        last.is_some_and(|at| at.elapsed() >= stall_limit)
    }
}

/// `NOTIFY_SOCKET`'s value as an address: a path, or `@name` for an abstract one.
fn notify_address(socket: &OsStr) -> io::Result<net::SocketAddr> {
    match socket.as_bytes() {
        [b'/', ..] => net::SocketAddr::from_pathname(socket),
        [b'@', name @ ..] => net::SocketAddr::from_abstract_name(name),
        _ => {
            let socket = socket.to_string_lossy();
            let why = format!("{NOTIFY_SOCKET}={socket} is neither a path nor @name");
            Err(io::Error::new(io::ErrorKind::InvalidInput, why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;

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
        let mut notifier = receiver.notifier(None);
        let addrs = [
            "127.0.0.1:1337".parse().unwrap(),
            "[::1]:1337".parse().unwrap(),
        ];
        notifier.ready(&addrs, || 0);
        assert_eq!(
            receiver.next(WAIT).unwrap(),
            "READY=1\nSTATUS=serving 127.0.0.1:1337, [::1]:1337\n"
        );
        notifier.stopping();
        assert_eq!(receiver.next(WAIT).unwrap(), "STOPPING=1\n");
    }

    #[test]
    fn status_is_sent_at_most_once_a_second_and_only_when_it_changed() {
        let receiver = Receiver::new("status");
        let mut notifier = receiver.notifier(None);
        let connected = Arc::new(AtomicUsize::new(2));
        let count = Arc::clone(&connected);
        let started = Instant::now();
        notifier.ready(&["127.0.0.1:1337".parse().unwrap()], move || {
            count.load(Ordering::SeqCst)
        });
        receiver.next(WAIT).unwrap();
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
        notifier.stopping();
        assert_eq!(receiver.next(WAIT).unwrap(), "STOPPING=1\n");
        assert_eq!(
            receiver.next(WAIT).unwrap(),
            "STATUS=stopping; 1 client still connected\n"
        );
    }

    #[test]
    fn watchdog_pings_while_the_loop_waits_in_accept_and_stops_when_it_is_stuck() {
        let receiver = Receiver::new("watchdog");
        let mut notifier = receiver.notifier(Some(Duration::from_millis(400)));
        let heartbeat = notifier.heartbeat();
        notifier.ready(&[], || 0);
        // A loop blocked in accept for a whole second is healthy.
        let received = heartbeat.accepting(|| receiver.all_within(Duration::from_secs(1)));
        let pings = received.iter().filter(|m| *m == "WATCHDOG=1\n").count();
        assert!(
            pings >= 3,
            "pings every 200 ms while in accept: {received:?}"
        );
        // Back from accept and then stuck: the pings stop within a period.
        heartbeat.accepting(|| ());
        let _ = receiver.all_within(Duration::from_millis(400));
        let received = receiver.all_within(Duration::from_secs(1));
        assert!(
            !received.iter().any(|m| m == "WATCHDOG=1\n"),
            "no pings for a stuck loop: {received:?}"
        );
        // Alive again (a loop that wakes by itself): pings again.
        let mut received = Vec::new();
        for _ in 0..12 {
            heartbeat.accepting(|| ());
            received.extend(receiver.all_within(Duration::from_millis(50)));
        }
        assert!(received.iter().any(|m| m == "WATCHDOG=1\n"), "{received:?}");
    }

    #[test]
    fn no_watchdog_pings_without_an_accept_loop_or_once_stopping() {
        let receiver = Receiver::new("watchdog-stop");
        let mut notifier = receiver.notifier(Some(Duration::from_millis(200)));
        notifier.ready(&[], || 0);
        let received = receiver.all_within(Duration::from_millis(600));
        assert!(
            !received.iter().any(|m| m == "WATCHDOG=1\n"),
            "{received:?}"
        );
        let heartbeat = notifier.heartbeat();
        heartbeat.accepting(|| ());
        notifier.stopping();
        let received = heartbeat.accepting(|| receiver.all_within(Duration::from_millis(600)));
        assert_eq!(received.first().map(String::as_str), Some("STOPPING=1\n"));
        assert!(
            !received.iter().any(|m| m == "WATCHDOG=1\n"),
            "{received:?}"
        );
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_no_thread_starts() {
        let mut notifier = Notifier::default();
        assert!(notifier.inner.target.is_none());
        notifier.ready(&["127.0.0.1:1337".parse().unwrap()], || 0);
        notifier.stopping();
        assert!(notifier.reporter.is_none());
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
        notifier.stopping();
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STOPPING=1\n");
    }

    #[test]
    fn a_heartbeat_in_accept_is_never_stalled() {
        let receiver = Receiver::new("stalled");
        let heartbeat = receiver.notifier(Some(WAIT)).heartbeat();
        heartbeat.accepting(|| ());
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
