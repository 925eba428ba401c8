//! The accept loop: where a connection is accepted, admitted or turned
//! away, and the one place where a connection's thread is started.
//!
//! The loop only accepts, checks the connection cap (and a direct client's
//! rate) and hands the connection to a thread, so no client, however slow,
//! can delay the next one. It survives every `accept` failure: ones about a
//! single connection are skipped, ones about the process (out of
//! descriptors or memory) pause it with a growing backoff instead of
//! spinning, and serving resumes by itself.
//!
//! With `--thread-cache`, a finished connection thread parks for a while
//! (MySQL `thread_cache_size` style) and the loop hands it the next
//! connection instead of starting a new thread. The invariant that makes
//! the hand-off safe: an item is queued only while more threads are parked
//! than items are queued, and a parked thread checks the queue (under the
//! same lock) before it gives up, so no queued connection is ever left
//! without a thread.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use log::{info, trace};
use socket2::SockRef;

use super::connection::{self, Accepted, Serving};
use super::listen::set_connection_options;
use crate::error::{Error, describe_io_error};
use crate::limits::{ConnectionLimit, LiveCount, Refusal, canonical, refuse};
use crate::lock;
use crate::logging::{ACCEPT_ERROR_LINES, LogEvery, event, log_every};
use crate::service::notify::{Heartbeat, Notifier};
use crate::shutdown::Shutdown;
use crate::stats::AcceptErrorKind;

/// First pause after an `accept` failure about the process; it doubles with
/// each further failure up to [`MAX_ACCEPT_PAUSE`] (Go's net/http does the same).
const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(5);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);
/// An accept loop only accepts and hands over: a small fixed stack, so that
/// it starts whatever `RUST_MIN_STACK` says for connection threads.
const ACCEPT_THREAD_STACK: usize = 256 * 1024;

/// What the accept loops and every connection thread share.
pub(crate) struct Shared {
    /// What a connection is served with.
    pub(crate) serving: Serving,
    /// Finished connection threads waiting for the next connection.
    pub(crate) thread_cache: ThreadCache<Accepted>,
    /// Connection threads alive, parked ones included: `run` returns only
    /// once they are gone.
    pub(crate) threads: Arc<LiveCount>,
}

impl Shared {
    pub(crate) fn new(serving: Serving, thread_cache: usize) -> Self {
        Shared {
            thread_cache: ThreadCache::new(
                thread_cache.min(serving.limit.max()),
                PARKED_THREAD_IDLE_TIMEOUT,
            ),
            threads: LiveCount::new(),
            serving,
        }
    }

    fn limit(&self) -> &ConnectionLimit {
        &self.serving.limit
    }
}

/// Runs an accept loop on its own thread for each listener, and returns
/// once every one has stopped.
pub(crate) fn accept_on_all(
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
                shared
                    .serving
                    .stats
                    .record_accept_error(AcceptErrorKind::of(&e));
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
    shared.serving.stats.record_accepted();
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
        let refused = Refusal::RateLimited(limited, rate);
        serving.stats.record(refuse(&stream, peer, None, &refused));
        return;
    }
    let stream = Arc::new(stream);
    let Some(slot) = shared.limit().try_acquire(&stream) else {
        let refused = Refusal::Full {
            cap: shared.limit().max(),
        };
        serving.stats.record(refuse(&stream, peer, None, &refused));
        return;
    };
    let accepted = Accepted {
        stream,
        peer,
        accepted_at,
        slot,
    };
    if let Err(accepted) = shared.thread_cache.offer(accepted) {
        start_thread(accepted, shared);
    }
}

/// Starts a connection thread for `accepted`: the one place where one is
/// started. If none can be, the client gets the busy line.
fn start_thread(accepted: Accepted, shared: &Arc<Shared>) {
    let (stream, peer) = (Arc::clone(&accepted.stream), accepted.peer);
    let thread_shared = Arc::clone(shared);
    let alive = shared.threads.enter();
    let spawned = thread::Builder::new()
        .name(format!("conn-{peer}"))
        .spawn(move || {
            let _alive = alive;
            let shared = &thread_shared;
            connection::run_thread(accepted, &shared.serving, || shared.thread_cache.park());
        });
    if let Err(e) = spawned {
        // The closure, with the slot, is dropped: the slot is free again.
        let outcome = refuse(&stream, peer, None, &Refusal::NoThread(e));
        shared.serving.stats.record(outcome);
    }
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

/// How long a parked thread waits for a connection before it exits.
pub(crate) const PARKED_THREAD_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Up to `capacity` finished threads waiting for work of type `T`.
#[derive(Debug)]
pub(crate) struct ThreadCache<T> {
    capacity: usize,
    idle_timeout: Duration,
    state: Mutex<CacheState<T>>,
    /// Signalled when an item is queued or the cache is closed.
    handed_over: Condvar,
}

#[derive(Debug)]
struct CacheState<T> {
    /// Threads inside [`ThreadCache::park`].
    parked: usize,
    /// Items offered to parked threads and not yet taken; never more than `parked`.
    queue: VecDeque<T>,
    /// Once set, no thread parks and parked ones leave.
    closed: bool,
}

impl<T> ThreadCache<T> {
    /// A cache of at most `capacity` parked threads (0 disables it), each
    /// waiting at most `idle_timeout`.
    pub(crate) fn new(capacity: usize, idle_timeout: Duration) -> Self {
        ThreadCache {
            capacity,
            idle_timeout,
            state: Mutex::new(CacheState {
                parked: 0,
                queue: VecDeque::new(),
                closed: false,
            }),
            handed_over: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState<T>> {
        lock(&self.state)
    }

    /// Hands `item` to a parked thread, or gives it back if none is free.
    pub(crate) fn offer(&self, item: T) -> Result<(), T> {
        if self.capacity == 0 {
            return Err(item);
        }
        let mut state = self.lock();
        if state.closed || state.parked <= state.queue.len() {
            return Err(item);
        }
        state.queue.push_back(item);
        drop(state);
        self.handed_over.notify_one();
        Ok(())
    }

    /// Called by a thread whose work is done: waits for the next item, or
    /// returns `None` if the cache is full, closed, or nothing came in time
    /// (the thread should then exit).
    pub(crate) fn park(&self) -> Option<T> {
        if self.capacity == 0 {
            return None;
        }
        let mut state = self.lock();
        if state.closed || state.parked >= self.capacity {
            return None;
        }
        state.parked += 1;
        trace!(event = event::THREAD_PARKED; "thread parked, {} parked now", state.parked);
        let (mut state, _) = self
            .handed_over
            .wait_timeout_while(state, self.idle_timeout, |state| {
                state.queue.is_empty() && !state.closed
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.parked -= 1;
        state.queue.pop_front()
    }

    /// Sends every parked thread away and parks no more.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.handed_over.notify_all();
    }

    /// Threads parked now.
    pub(crate) fn parked(&self) -> usize {
        self.lock().parked
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
        assert_eq!(failures.log.due(), None, "later ones wait for the interval");
    }
    use std::sync::mpsc;
    use std::thread;

    const LONG: Duration = Duration::from_secs(20);

    /// Spawns a thread that parks once and reports what it got.
    fn parked_thread(cache: &Arc<ThreadCache<u32>>) -> mpsc::Receiver<Option<u32>> {
        let (sender, got) = mpsc::channel();
        let cache = Arc::clone(cache);
        thread::spawn(move || sender.send(cache.park()).unwrap());
        got
    }

    fn wait_until_parked(cache: &ThreadCache<u32>, n: usize) {
        let deadline = Instant::now() + LONG;
        while cache.parked() < n {
            assert!(Instant::now() < deadline, "threads did not park");
            thread::yield_now();
        }
    }

    #[test]
    fn disabled_cache_takes_nothing() {
        let cache = ThreadCache::new(0, LONG);
        assert_eq!(cache.offer(1), Err(1));
        assert_eq!(cache.park(), None);
    }

    #[test]
    fn offer_without_a_parked_thread_is_refused() {
        let cache = ThreadCache::new(4, LONG);
        assert_eq!(cache.offer(7), Err(7));
    }

    #[test]
    fn a_parked_thread_takes_the_offered_item() {
        let cache = Arc::new(ThreadCache::new(4, LONG));
        let got = parked_thread(&cache);
        wait_until_parked(&cache, 1);
        assert_eq!(cache.offer(7), Ok(()));
        // One parked thread, one item: the next offer has nobody to go to.
        assert_eq!(cache.offer(8), Err(8));
        assert_eq!(got.recv_timeout(LONG).unwrap(), Some(7));
    }

    #[test]
    fn threads_beyond_capacity_do_not_park() {
        let cache = Arc::new(ThreadCache::new(1, LONG));
        let first = parked_thread(&cache);
        wait_until_parked(&cache, 1);
        assert_eq!(cache.park(), None);
        cache.close();
        assert_eq!(first.recv_timeout(LONG).unwrap(), None);
    }

    #[test]
    fn idle_parked_threads_leave_after_the_timeout() {
        let cache = Arc::new(ThreadCache::new(2, Duration::from_millis(50)));
        let got = parked_thread(&cache);
        assert_eq!(got.recv_timeout(LONG).unwrap(), None);
        assert_eq!(cache.parked(), 0);
        assert_eq!(cache.offer(1), Err(1));
    }

    #[test]
    fn every_accepted_item_is_taken_under_contention() {
        // Threads park with a tiny timeout while items are offered: an
        // accepted offer must always reach a thread, never be stranded.
        let cache = Arc::new(ThreadCache::new(8, Duration::from_micros(50)));
        let (sender, taken) = mpsc::channel();
        let parkers: Vec<_> = (0..4)
            .map(|_| {
                let cache = Arc::clone(&cache);
                let sender = sender.clone();
                thread::spawn(move || {
                    let until = Instant::now() + Duration::from_millis(300);
                    while Instant::now() < until {
                        if let Some(item) = cache.park() {
                            sender.send(item).unwrap();
                        }
                    }
                })
            })
            .collect();
        drop(sender);
        let mut accepted = 0u32;
        let until = Instant::now() + Duration::from_millis(250);
        let mut next = 0u32;
        while Instant::now() < until {
            if cache.offer(next).is_ok() {
                accepted += 1;
            }
            next += 1;
        }
        for parker in parkers {
            parker.join().unwrap();
        }
        assert_eq!(taken.iter().count() as u32, accepted);
    }
}
