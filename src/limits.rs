//! Limits on what clients can hold: the connection cap, as a counting permit
//! that each connection thread owns. (How high the cap can go on this machine
//! is [`crate::capacity`]'s concern.)
//!
//! A [`ConnectionSlot`] is taken in the accept loop before a thread is
//! started and released when it is dropped, however the thread ends (even by
//! a panic), so a slot can never leak. [`PerIpLimit`] (`--max-per-ip`, like
//! xinetd's `per_source`) works the same way, per client address, once the
//! real client address is known.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

/// How many of something are alive now (connections holding a slot,
/// connection threads), with a wait for the count to reach zero: what a
/// stopping server waits on.
#[derive(Debug, Default)]
pub(crate) struct LiveCount {
    count: Mutex<usize>,
    /// Signalled when the count reaches zero.
    zero: Condvar,
}

/// One member of a [`LiveCount`]; leaves it on drop, however its owner ends
/// (even by a panic).
#[derive(Debug)]
pub(crate) struct Live {
    count: Arc<LiveCount>,
}

impl LiveCount {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(LiveCount::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the count if it is below `max`, without waiting.
    pub(crate) fn try_enter(self: &Arc<Self>, max: usize) -> Option<Live> {
        let mut count = self.lock();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Live {
            count: Arc::clone(self),
        })
    }

    /// Joins the count.
    pub(crate) fn enter(self: &Arc<Self>) -> Live {
        *self.lock() += 1;
        Live {
            count: Arc::clone(self),
        }
    }

    /// How many are alive now.
    pub(crate) fn get(&self) -> usize {
        *self.lock()
    }

    /// Waits until none is alive or `deadline` passes; returns how many
    /// still are.
    pub(crate) fn wait_until_zero(&self, deadline: Instant) -> usize {
        let timeout = deadline.saturating_duration_since(Instant::now());
        *self
            .zero
            .wait_timeout_while(self.lock(), timeout, |count| *count > 0)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut count = self.count.lock();
        *count -= 1;
        if *count == 0 {
            self.count.zero.notify_all();
        }
    }
}

/// At most `max` connections at once. A connection holds a
/// [`ConnectionSlot`] from the accept loop until it is closed.
#[derive(Debug)]
pub(crate) struct ConnectionLimit {
    max: usize,
    slots: Arc<LiveCount>,
}

/// One connection's share of a [`ConnectionLimit`]; released on drop.
pub(crate) type ConnectionSlot = Live;

impl ConnectionLimit {
    /// A limit of `max` connections at once.
    pub(crate) fn new(max: usize) -> Self {
        ConnectionLimit {
            max,
            slots: LiveCount::new(),
        }
    }

    /// A slot if fewer than `max` are taken, without waiting.
    pub(crate) fn try_acquire(&self) -> Option<ConnectionSlot> {
        self.slots.try_enter(self.max)
    }

    /// How many slots are taken now.
    pub(crate) fn active(&self) -> usize {
        self.slots.get()
    }

    /// Waits until every slot is released or `deadline` passes; returns how
    /// many are still taken.
    pub(crate) fn wait_until_idle(&self, deadline: Instant) -> usize {
        self.slots.wait_until_zero(deadline)
    }
}

/// At most `max` connections at once from one client address.
#[derive(Debug)]
pub(crate) struct PerIpLimit {
    /// `None`: no limit, and no bookkeeping.
    max: Option<usize>,
    /// Connections held now, by client address; addresses at 0 are removed.
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of a [`PerIpLimit`]; released on drop.
#[derive(Debug)]
pub(crate) struct IpSlot<'a> {
    limit: &'a PerIpLimit,
    /// `None` when there is no limit to release.
    ip: Option<IpAddr>,
}

impl PerIpLimit {
    pub(crate) fn new(max: Option<usize>) -> Self {
        PerIpLimit {
            max,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for `ip`, or `None` if it already holds `max` connections.
    pub(crate) fn try_acquire(&self, ip: IpAddr) -> Option<IpSlot<'_>> {
        let Some(max) = self.max else {
            return Some(IpSlot {
                limit: self,
                ip: None,
            });
        };
        let ip = ip.to_canonical();
        let mut held = self.held();
        let count = held.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            limit: self,
            ip: Some(ip),
        })
    }
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut held = self.limit.held();
            if let Some(count) = held.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn slots_are_capped_and_come_back_on_drop() {
        let limit = ConnectionLimit::new(2);
        let a = limit.try_acquire().expect("first");
        let _b = limit.try_acquire().expect("second");
        assert!(limit.try_acquire().is_none());
        drop(a);
        assert_eq!(limit.active(), 1);
        assert!(limit.try_acquire().is_some());
    }

    #[test]
    fn slot_is_released_when_its_thread_panics() {
        let limit = ConnectionLimit::new(1);
        let slot = limit.try_acquire().expect("slot");
        let panicked = thread::spawn(move || {
            let _slot = slot;
            panic!("handler bug");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(limit.active(), 0);
        assert!(limit.try_acquire().is_some());
    }

    #[test]
    fn wait_until_idle_returns_when_the_last_slot_goes() {
        let limit = ConnectionLimit::new(4);
        let slot = limit.try_acquire().expect("slot");
        let holder = thread::spawn(move || drop(slot));
        assert_eq!(
            limit.wait_until_idle(Instant::now() + Duration::from_secs(20)),
            0
        );
        holder.join().unwrap();
    }

    #[test]
    fn per_ip_slots_are_counted_per_address() {
        let limit = PerIpLimit::new(Some(2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limit.try_acquire(a).expect("first");
        let _second = limit.try_acquire(a).expect("second");
        assert!(limit.try_acquire(a).is_none());
        // The same client seen through an IPv6 socket counts as itself.
        assert!(
            limit
                .try_acquire("::ffff:192.0.2.1".parse().unwrap())
                .is_none()
        );
        assert!(limit.try_acquire(b).is_some());
        drop(first);
        assert!(limit.try_acquire(a).is_some());
    }

    #[test]
    fn no_per_ip_limit_admits_everyone_without_bookkeeping() {
        let limit = PerIpLimit::new(None);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let _slots: Vec<_> = (0..100)
            .map(|_| limit.try_acquire(ip).expect("slot"))
            .collect();
        assert!(limit.held().is_empty());
    }

    #[test]
    fn wait_until_idle_gives_up_at_the_timeout() {
        let limit = ConnectionLimit::new(4);
        let _held = limit.try_acquire().expect("slot");
        assert_eq!(
            limit.wait_until_idle(Instant::now() + Duration::from_millis(50)),
            1
        );
    }
}
