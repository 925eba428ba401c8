//! The accept loop: where a connection is accepted, admitted or turned away,
//! and the one place a connection's thread starts. The loop only accepts,
//! checks the cap (and a direct client's rate) and starts a thread, so no
//! client can delay the next; it skips `accept` failures about one connection
//! and backs off from ones about the process (out of descriptors or memory).
//!
//! With `--thread-cache`, a finished thread waits in `accept` itself
//! (leader/followers, the kernel as leader: Linux wakes one blocked accepter
//! per connection, in order), so a connection reaches it with no hand-off, lock
//! or wake-up of ours; the loop steps aside meanwhile, starting a thread only
//! when none waits. A thread idle for a reply timeout leaves; at a stop,
//! whoever takes the wake-up passes it on.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use log::{info, trace};
use socket2::SockRef;

use super::connection::{self, Accepted, Serving};
use super::listen::set_connection_options;
use crate::error::{Error, describe_io_error};
use crate::helper_thread;
use crate::limits::{Live, LiveCount, Refusal, canonical, refuse};
use crate::logging::{ACCEPT_ERROR_LINES, event, log_every};
use crate::service::notify::{Heartbeat, Notifier};
use crate::shutdown::Shutdown;
use crate::stats::AcceptErrorKind;

/// The pause after an `accept` failure about the process, doubling up to
/// [`MAX_ACCEPT_PAUSE`] (as Go's net/http does).
const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(5);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);
/// How long a stopping loop waits for the threads in `accept` to leave it.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the accept loops and every connection thread share.
pub(crate) struct Shared {
    pub(crate) serving: Serving,
    /// Connection threads alive, waiting ones included.
    pub(crate) threads: Arc<LiveCount>,
    /// `--thread-cache`: how many finished threads may wait in `accept`.
    thread_cache: usize,
    /// Threads waiting in `accept` now, on every listener.
    parked: AtomicUsize,
    shutdown: Shutdown,
}

impl Shared {
    pub(crate) fn new(serving: Serving, shutdown: Shutdown) -> Self {
        Shared {
            thread_cache: serving.config.thread_cache.min(serving.limit.max()),
            threads: Arc::default(),
            parked: AtomicUsize::new(0),
            serving,
            shutdown,
        }
    }

    pub(crate) fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }
}

/// One listener, with the threads inside `accept` on it (the loop steps
/// aside while any is, and a stop passes its wake-up on to them).
struct Listening {
    listener: Arc<TcpListener>,
    addr: SocketAddr,
    in_accept: Arc<LiveCount>,
}

/// Runs an accept loop on its own thread for each listener, and returns
/// once every one has stopped.
pub(crate) fn accept_on_all(
    listeners: Vec<(Arc<TcpListener>, SocketAddr)>,
    shared: &Arc<Shared>,
    notifier: &Notifier,
) -> Result<(), Error> {
    thread::scope(|scope| {
        for (listener, addr) in listeners {
            let heartbeat = notifier.heartbeat();
            let here = Arc::new(Listening {
                listener,
                addr,
                in_accept: Arc::default(),
            });
            let serve = move || serve_listener(&here, shared, &heartbeat);
            if let Err(e) = helper_thread("accept").spawn_scoped(scope, serve) {
                // Nothing accepted yet: stop the loops already started,
                // and report it like any start-up failure.
                shared.shutdown.trigger();
                return Err(Error::new("cannot start an accept loop", e));
            }
        }
        Ok(())
    })
}

/// One listener's life: the accept loop, then, once stopped, the clients
/// still queued for it, then the close.
fn serve_listener(here: &Arc<Listening>, shared: &Arc<Shared>, heartbeat: &Heartbeat) {
    // Connections queued before the listener got its options (by systemd
    // before this process started) did not inherit them: they get their own.
    accept_queued(here, shared, true);
    let (shutdown, mut failures) = (&shared.shutdown, AcceptFailures::default());
    loop {
        let next = heartbeat.accepting(|| {
            // Aside while threads wait in `accept`; the last to leave wakes it.
            while here.in_accept.get() > 0 && !shutdown.is_triggered() {
                here.in_accept
                    .wait_until_zero(Instant::now() + MAX_ACCEPT_PAUSE);
            }
            next_connection(here, shared, &mut failures, None)
        });
        match next {
            Some(accepted) => start_thread(accepted, here, shared),
            None if shutdown.is_triggered() => break,
            None => {}
        }
    }
    // Waiting threads hold the listener only while in `accept`.
    here.in_accept
        .wait_until_zero(Instant::now() + LEAVE_TIMEOUT);
    // Queued clients have completed their handshakes, and some have sent
    // their reply: serve them too, then close (new clients are refused).
    accept_queued(here, shared, false);
}

/// Waits in `accept` until a connection is admitted (refusing the ones
/// turned away); `None` if the listener idles for a reply timeout, or at a stop.
fn next_connection(
    here: &Listening,
    shared: &Shared,
    failures: &mut AcceptFailures,
    mut inside: Option<Live>,
) -> Option<Accepted> {
    loop {
        match accept_next(here, &shared.shutdown, inside.take()) {
            Ok(Some((stream, peer))) => {
                failures.recovered();
                if let Some(accepted) = admit(stream, peer, shared) {
                    return Some(accepted);
                }
            }
            Ok(None) => return None,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            // A stop that shut the listener down (`--reuseport`).
            Err(_) if shared.shutdown.is_triggered() => return None,
            Err(e) => {
                let kind = AcceptErrorKind::of(&e);
                shared.serving.stats.record_accept_error(kind);
                thread::sleep(failures.record(&e));
            }
        }
    }
}

/// The next client on `here`; `None` once the server is stopping (its
/// wake-up connection is passed on to the next thread in `accept`).
fn accept_next(
    here: &Listening,
    shutdown: &Shutdown,
    inside: Option<Live>,
) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    // Counted before the stop is looked at, so that no stop is missed.
    let inside = inside.unwrap_or_else(|| here.in_accept.enter());
    let accepted = if shutdown.is_triggered() {
        Ok(None)
    } else {
        here.listener.accept().map(Some)
    };
    drop(inside);
    let Some((stream, peer)) = accepted? else {
        return Ok(None);
    };
    let peer = canonical(peer);
    if !shutdown.is_wake_connection(&stream, peer) {
        return Ok(Some((stream, peer)));
    }
    if here.in_accept.get() > 0 {
        shutdown.pass_wake_on(here.addr);
    }
    Ok(None)
}

/// Accepts, without waiting, every connection already queued on `here` (with
/// the listener's options first if `set_options`), starting a thread for each admitted.
fn accept_queued(here: &Arc<Listening>, shared: &Arc<Shared>, set_options: bool) {
    if here.listener.set_nonblocking(true).is_err() {
        return;
    }
    loop {
        // Accepted sockets do not inherit O_NONBLOCK on Linux.
        let (stream, peer) = match here.listener.accept() {
            Ok((stream, peer)) => (stream, canonical(peer)),
            Err(e) if AcceptErrorKind::of(&e) == AcceptErrorKind::Connection => continue,
            Err(_) => break,
        };
        let config = &shared.serving.config;
        if (set_options && set_connection_options(SockRef::from(&stream), config).is_err())
            || shared.shutdown.is_wake_connection(&stream, peer)
        {
            continue;
        }
        if let Some(accepted) = admit(stream, peer, shared) {
            start_thread(accepted, here, shared);
        }
    }
    let _ = here.listener.set_nonblocking(false);
}

/// Counts an accepted connection and gives it a slot, or turns it away. A
/// direct client's rate is checked here, before it takes a slot (behind a
/// balancer, the connection thread checks the client the header names).
fn admit(stream: TcpStream, peer: SocketAddr, shared: &Shared) -> Option<Accepted> {
    let accepted_at = Instant::now();
    let serving = &shared.serving;
    serving.stats.record_accepted();
    if let Some(rate) = &serving.rate
        && serving.config.proxy_protocol.is_none()
        && let Err(limited) = rate.try_acquire(peer.ip(), accepted_at)
    {
        let refused = Refusal::RateLimited(limited);
        serving.stats.record(refuse(&stream, peer, None, &refused));
        return None;
    }
    let stream = Arc::new(stream);
    let Some(slot) = serving.limit.try_acquire(&stream) else {
        let cap = serving.limit.max();
        let outcome = refuse(&stream, peer, None, &Refusal::Full { cap });
        serving.stats.record(outcome);
        return None;
    };
    Some(Accepted {
        stream,
        peer,
        accepted_at,
        slot,
        tls: None,
    })
}

/// Starts a connection thread for `accepted`, the one place one is
/// started; if none can be, the client gets the busy line.
fn start_thread(accepted: Accepted, here: &Arc<Listening>, shared: &Arc<Shared>) {
    let (stream, peer) = (Arc::clone(&accepted.stream), accepted.peer);
    // Only the accept loop keeps the listener open.
    let here = (shared.thread_cache > 0).then(|| Arc::downgrade(here));
    let (thread_shared, alive) = (Arc::clone(shared), shared.threads.enter());
    let spawned = thread::Builder::new().spawn(move || {
        let _alive = alive;
        let shared = &thread_shared;
        let reserve = || Parked::reserve(here.as_ref()?, shared);
        let park = |parked: Option<Parked<'_>>| parked?.wait();
        connection::run_thread(accepted, &shared.serving, reserve, park);
    });
    if let Err(e) = spawned {
        // The closure is dropped with the slot: free again.
        let outcome = refuse(&stream, peer, None, &Refusal::NoThread(e));
        shared.serving.stats.record(outcome);
    }
}

/// A finished thread's place among those waiting in `accept`, taken
/// before its client sees the close.
struct Parked<'a> {
    here: Arc<Listening>,
    /// Counted in `accept` from now on, for the accept loop to step aside.
    inside: Option<Live>,
    shared: &'a Shared,
}

impl<'a> Parked<'a> {
    /// A place, unless the cache is full or the accept loop has ended.
    fn reserve(here: &Weak<Listening>, shared: &'a Shared) -> Option<Self> {
        let here = here.upgrade()?;
        let parked = shared.parked.fetch_add(1, Ordering::Relaxed);
        let inside = Some(here.in_accept.enter());
        let place = Parked {
            here,
            inside,
            shared,
        };
        (parked < shared.thread_cache).then_some(place)
    }

    /// Waits in `accept` for the next connection; `None` when the thread
    /// should end (a stop, or a reply timeout without a connection).
    fn wait(mut self) -> Option<Accepted> {
        let waiting = self.shared.parked();
        trace!(event = event::THREAD_PARKED; "thread waiting in accept, {waiting} waiting now");
        let (inside, failures) = (self.inside.take(), &mut AcceptFailures::default());
        next_connection(&self.here, self.shared, failures, inside)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.shared.parked.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The pause after the last `accept` failure about the process (zero after a success).
#[derive(Default)]
struct AcceptFailures {
    pause: Duration,
}

impl AcceptFailures {
    /// Notes a failure, logs it unless a line went out recently, and says
    /// how long to pause.
    fn record(&mut self, error: &io::Error) -> Duration {
        let (pause, then) = if AcceptErrorKind::of(error) == AcceptErrorKind::Connection {
            (Duration::ZERO, "skipped that connection".to_string())
        } else {
            self.pause = (self.pause * 2).clamp(FIRST_ACCEPT_PAUSE, MAX_ACCEPT_PAUSE);
            let ms = self.pause.as_millis();
            (self.pause, format!("pausing accepts for {ms} ms"))
        };
        let why = describe_io_error(error);
        log_every!(ACCEPT_ERROR_LINES, warn, [], "accept failed: {why}; {then}");
        pause
    }

    /// Notes a successful accept, ending any backoff.
    fn recovered(&mut self) {
        if !self.pause.is_zero() {
            info!(event = event::ACCEPT_RESUMED; "accepting connections again");
            self.pause = Duration::ZERO;
        }
    }
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
        assert_eq!(
            ACCEPT_ERROR_LINES.due(),
            None,
            "later ones wait for the interval"
        );
    }
}
