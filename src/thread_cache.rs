//! Parked connection threads, MySQL `thread_cache_size` style: a thread
//! whose connection has ended may wait a short while for the next accepted
//! connection instead of exiting, which saves the accept loop a thread
//! spawn and the new thread its start-up. A connection still owns its thread
//! for its whole life; only finished threads are reused.
//!
//! The invariant that makes hand-off safe: an item is queued only while more
//! threads are parked than items are queued, and a parked thread checks the
//! queue (under the same lock) before it gives up, so no queued connection
//! is ever left without a thread.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::trace;

use crate::logging::event;

/// How long a parked thread waits for a connection before it exits.
pub(crate) const PARKED_THREAD_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Up to `capacity` finished threads waiting for work of type `T`.
#[derive(Debug)]
pub(crate) struct ThreadCache<T> {
    capacity: usize,
    idle_timeout: Duration,
    state: Mutex<State<T>>,
    /// Signalled when an item is queued or the cache is closed.
    handed_over: Condvar,
}

#[derive(Debug)]
struct State<T> {
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
            state: Mutex::new(State {
                parked: 0,
                queue: VecDeque::new(),
                closed: false,
            }),
            handed_over: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
            .unwrap_or_else(PoisonError::into_inner);
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
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Instant;

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
