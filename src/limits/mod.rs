//! What clients may hold, who may connect, and the one way a client is
//! refused ([`refuse`]). Slots are RAII guards, freed however a connection
//! ends, even by a panic. `rate`: `--max-rate-per-ip`; `capacity`: how high
//! the connection cap can go on this machine.

use std::collections::{HashMap, hash_map::Entry};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use ipnet::IpNet;
use log::warn;
use socket2::SockRef;

use crate::error::describe_io_error;
use crate::lock;
use crate::logging::{BUSY_LINES, DENIED_LINES, RATE_LIMITED_LINES, event, log_every};
use crate::stats::Outcome;

pub(crate) mod capacity;
pub(crate) mod rate;

/// How many of something are alive, and a wait for none. Joining and leaving
/// take no lock; only the last to leave while someone waits wakes anybody.
#[derive(Debug, Default)]
pub(crate) struct LiveCount {
    count: AtomicUsize,
    /// Set while [`wait_until_zero`](Self::wait_until_zero) waits.
    waiting: AtomicBool,
    zero: (Mutex<()>, Condvar),
}

/// One member of a [`LiveCount`]; leaves it on drop, even by a panic.
#[derive(Debug)]
pub(crate) struct Live(Arc<LiveCount>);

impl LiveCount {
    pub(crate) fn enter(self: &Arc<Self>) -> Live {
        self.count.fetch_add(1, SeqCst);
        Live(Arc::clone(self))
    }

    pub(crate) fn get(&self) -> usize {
        self.count.load(SeqCst)
    }

    /// Waits until none is alive or `deadline` passes; returns how many still are.
    pub(crate) fn wait_until_zero(&self, deadline: Instant) -> usize {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let guard = lock(&self.zero.0);
        // Set under the lock, before the count is read: whoever leaves after
        // that sees it, and wakes this wait.
        self.waiting.store(true, SeqCst);
        let alive = |_: &mut ()| self.get() > 0;
        let _guard = self.zero.1.wait_timeout_while(guard, timeout, alive);
        self.waiting.store(false, SeqCst);
        self.get()
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let count = &self.0;
        if count.count.fetch_sub(1, SeqCst) == 1 && count.waiting.load(SeqCst) {
            let _guard = lock(&count.zero.0);
            count.zero.1.notify_all();
        }
    }
}

/// At most `max` connections at once, each holding a [`ConnectionSlot`] that
/// names its stream, so that a stopping server can cut them all off.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionLimit {
    max: usize,
    slots: Arc<LiveCount>,
    open: Arc<OpenStreams>,
}

/// The open connections' streams, in shards so that they rarely wait on a lock.
#[derive(Debug)]
struct OpenStreams {
    shards: [Mutex<HashMap<u64, Arc<TcpStream>>>; SHARDS],
    next_id: AtomicU64,
    cutting_off: AtomicBool,
}

const SHARDS: usize = 64;

#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    _live: Live,
    open: Arc<OpenStreams>,
    id: u64,
}

impl ConnectionLimit {
    pub(crate) fn new(max: usize) -> Self {
        let open = OpenStreams {
            shards: std::array::from_fn(|_| Mutex::default()),
            next_id: AtomicU64::new(0),
            cutting_off: AtomicBool::new(false),
        };
        let (slots, open) = (Arc::default(), Arc::new(open));
        ConnectionLimit { max, slots, open }
    }

    /// A slot for `stream` if fewer than `max` are taken, without waiting.
    pub(crate) fn try_acquire(&self, stream: &Arc<TcpStream>) -> Option<ConnectionSlot> {
        let below = |count: usize| (count < self.max).then_some(count + 1);
        self.slots.count.fetch_update(SeqCst, SeqCst, below).ok()?;
        let _live = Live(Arc::clone(&self.slots));
        let id = self.open.next_id.fetch_add(1, Relaxed);
        lock(&self.open.shards[id as usize % SHARDS]).insert(id, Arc::clone(stream));
        let open = Arc::clone(&self.open);
        Some(ConnectionSlot { _live, open, id })
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn active(&self) -> usize {
        self.slots.get()
    }

    /// Waits until every slot is free or `deadline` passes; returns how many are still taken.
    pub(crate) fn wait_until_idle(&self, deadline: Instant) -> usize {
        self.slots.wait_until_zero(deadline)
    }

    /// Shuts down the read side of every open connection: a thread waiting
    /// for a reply sees its end at once and records what it had.
    pub(crate) fn cut_off_all(&self) {
        self.open.cutting_off.store(true, SeqCst);
        for shard in &self.open.shards {
            for stream in lock(shard).values() {
                let _ = stream.shutdown(Shutdown::Read);
            }
        }
    }

    pub(crate) fn cutting_off(&self) -> bool {
        self.open.cutting_off.load(SeqCst)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        lock(&self.open.shards[self.id as usize % SHARDS]).remove(&self.id);
    }
}

/// `--max-per-ip` (xinetd's `per_source`): at most `max` connections at once
/// from one client address; `None`, no bookkeeping.
#[derive(Debug)]
pub(crate) struct PerIpLimit {
    max: Option<usize>,
    /// Addresses at 0 are removed.
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of a [`PerIpLimit`], if it has one.
#[derive(Debug)]
pub(crate) struct IpSlot<'a>(Option<(&'a PerIpLimit, IpAddr)>);

impl PerIpLimit {
    pub(crate) fn new(max: Option<usize>) -> Self {
        let held = Mutex::default();
        PerIpLimit { max, held }
    }

    /// A slot for `ip`, or its refusal if it already holds `max` connections.
    pub(crate) fn try_acquire(&self, ip: IpAddr) -> Result<IpSlot<'_>, Refusal> {
        let Some(max) = self.max else {
            return Ok(IpSlot(None));
        };
        let ip = ip.to_canonical();
        let mut held = lock(&self.held);
        let count = held.entry(ip).or_insert(0);
        (*count < max)
            .then(|| *count += 1)
            .ok_or(Refusal::PerIp { max })?;
        Ok(IpSlot(Some((self, ip))))
    }
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let Some((limit, ip)) = self.0 else { return };
        if let Entry::Occupied(mut count) = lock(&limit.held).entry(ip) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

/// A list of networks, such as `10.0.0.0/8`, `::1/128` or a bare address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetList(pub Vec<IpNet>);

impl NetList {
    /// Whether `ip` is in any of the networks. An IPv4 client also matches
    /// a rule written for its IPv4-mapped form (`::ffff:127.0.0.1`,
    /// `::ffff:0:0/96`, `::/0`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let mapped = match ip {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(_) => ip,
        };
        let within = |ip| self.0.iter().any(|net| net.contains(&ip));
        within(ip) || within(mapped)
    }

    /// Whether the list has no networks at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The one form of a client address used everywhere: an IPv4 client of a
/// dual-stack listener is `127.0.0.1:50312`, not `[::ffff:127.0.0.1]:50312`.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `--allow` and `--deny`: a client is refused if any deny rule matches
/// it, or if allow rules exist and none matches it (deny wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRules {
    /// `--allow`: when not empty, only these clients are served.
    pub allow: NetList,
    /// `--deny`: these clients are refused, whatever `allow` says.
    pub deny: NetList,
}

impl AccessRules {
    /// Whether a client at `ip` may be served.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }
}

/// Why a client is not served.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Every connection slot is taken (`--max-connections`).
    Full { cap: usize },
    /// Its address holds `--max-per-ip` connections already.
    PerIp { max: usize },
    /// Its network connects faster than `--max-rate-per-ip`.
    RateLimited(rate::RateLimited),
    /// The access rules do not admit it.
    Denied,
    /// It sent a PROXY header but is not a trusted proxy.
    UntrustedProxy,
    /// No thread could be started for it.
    NoThread(io::Error),
}

/// Logs why `peer` (behind `proxy`) is refused, at most once a second per
/// kind (every missing thread), sends the busy line to all but denied ones
/// (closed without a word), and returns how it counts; the caller closes.
pub(crate) fn refuse(
    mut stream: &TcpStream,
    peer: SocketAddr,
    proxy: Option<SocketAddr>,
    why: &Refusal,
) -> Outcome {
    let proxy = proxy.map(|proxy| proxy.to_string());
    match why {
        Refusal::Full { cap } => log_every!(
            BUSY_LINES, warn, [reason = "max_connections", peer:% = peer,],
            "{peer} turned away: all {cap} connection slots are taken"
        ),
        Refusal::PerIp { max } => {
            let s = if *max == 1 { "" } else { "s" };
            log_every!(
                BUSY_LINES, warn, [reason = "max_per_ip", peer:% = peer, proxy = proxy,],
                "{peer} turned away: already {max} connection{s} from {}", peer.ip()
            );
        }
        Refusal::RateLimited(limited) => log_every!(
            RATE_LIMITED_LINES, warn,
            [peer:% = peer, proxy = proxy, network:% = limited.network.addr(),],
            "{peer} turned away: its network {} connects faster than {} \
             (next connection in {:.2}s)",
            limited.network,
            limited.rate,
            limited.retry_after.as_secs_f64()
        ),
        Refusal::Denied => log_every!(
            DENIED_LINES, warn, [reason = "access_rules", peer:% = peer, proxy = proxy,],
            "{peer} refused by the access rules"
        ),
        Refusal::UntrustedProxy => log_every!(
            DENIED_LINES, warn, [reason = "untrusted_proxy", peer:% = peer,],
            "{peer} refused: not a trusted proxy"
        ),
        Refusal::NoThread(e) => warn!(
            event = event::SPAWN_FAILED, peer:% = peer;
            "{peer} closed: cannot start a thread for it: {}", describe_io_error(e)
        ),
    }
    let outcome = match why {
        Refusal::Full { .. } | Refusal::PerIp { .. } => Outcome::Busy,
        Refusal::RateLimited(..) => Outcome::RateLimited,
        Refusal::Denied | Refusal::UntrustedProxy => Outcome::Denied,
        Refusal::NoThread(_) => Outcome::Failed,
    };
    if outcome != Outcome::Denied {
        // Never waiting on the client. Closing over bytes it sent at once (`echo
        // yes | nc`) would reset the connection and lose the busy line: what
        // has arrived (up to 16 KiB, room for a reply) is read and dropped.
        let _ = SockRef::from(stream).set_linger(None);
        let _ = stream.set_nonblocking(true);
        let _ = stream.write(b"server busy, try again later\n");
        let _ = stream.shutdown(Shutdown::Write);
        let _ = io::copy(&mut stream.take(16 * 1024), &mut io::sink());
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;
    use std::time::Duration;

    /// A connected stream to hold slots with.
    fn stream() -> Arc<TcpStream> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Arc::new(TcpStream::connect(listener.local_addr().unwrap()).unwrap())
    }

    #[test]
    fn slots_are_capped_and_come_back_on_drop() {
        let (limit, stream) = (ConnectionLimit::new(2), stream());
        let a = limit.try_acquire(&stream).expect("first");
        let _b = limit.try_acquire(&stream).expect("second");
        assert!(limit.try_acquire(&stream).is_none());
        drop(a);
        assert_eq!(limit.active(), 1);
        assert!(limit.try_acquire(&stream).is_some());
    }

    #[test]
    fn slot_is_released_when_its_thread_panics() {
        let (limit, stream) = (ConnectionLimit::new(1), stream());
        let slot = limit.try_acquire(&stream).expect("slot");
        let panicked = thread::spawn(move || {
            let _slot = slot;
            panic!("handler bug");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(limit.active(), 0);
        assert!(limit.try_acquire(&stream).is_some());
    }

    #[test]
    fn wait_until_idle_returns_when_the_last_slot_goes() {
        let (limit, stream) = (ConnectionLimit::new(4), stream());
        let slot = limit.try_acquire(&stream).expect("slot");
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
        assert!(matches!(
            limit.try_acquire(a),
            Err(Refusal::PerIp { max: 2 })
        ));
        // The same client seen through an IPv6 socket counts as itself.
        assert!(
            limit
                .try_acquire("::ffff:192.0.2.1".parse().unwrap())
                .is_err()
        );
        assert!(limit.try_acquire(b).is_ok());
        drop(first);
        assert!(limit.try_acquire(a).is_ok());
    }

    #[test]
    fn no_per_ip_limit_admits_everyone_without_bookkeeping() {
        let limit = PerIpLimit::new(None);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let _slots: Vec<_> = (0..100)
            .map(|_| limit.try_acquire(ip).expect("slot"))
            .collect();
        assert!(lock(&limit.held).is_empty());
    }

    #[test]
    fn wait_until_idle_gives_up_at_the_timeout() {
        let (limit, stream) = (ConnectionLimit::new(4), stream());
        let _held = limit.try_acquire(&stream).expect("slot");
        assert_eq!(
            limit.wait_until_idle(Instant::now() + Duration::from_millis(50)),
            1
        );
    }

    fn nets(list: &[&str]) -> NetList {
        let net = |text: &&str| {
            text.parse::<IpNet>()
                .unwrap_or_else(|_| IpNet::from(text.parse::<IpAddr>().unwrap()))
        };
        NetList(list.iter().map(net).collect())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn no_rules_permit_everyone() {
        assert!(AccessRules::default().permits(ip("203.0.113.9")));
    }

    #[test]
    fn allow_rules_admit_only_their_networks() {
        let rules = AccessRules {
            allow: nets(&["10.0.0.0/8", "::1"]),
            deny: NetList::default(),
        };
        assert!(rules.permits(ip("10.1.2.3")));
        assert!(rules.permits(ip("::1")));
        assert!(!rules.permits(ip("11.0.0.1")));
        assert!(!rules.permits(ip("::2")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let rules = AccessRules {
            allow: nets(&["10.0.0.0/8"]),
            deny: nets(&["10.9.0.0/16"]),
        };
        assert!(rules.permits(ip("10.1.0.1")));
        assert!(!rules.permits(ip("10.9.0.1")));
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let rules = AccessRules {
            allow: NetList::default(),
            deny: nets(&["127.0.0.0/8"]),
        };
        assert!(!rules.permits(ip("::ffff:127.0.0.1")));
        assert!(rules.permits(ip("::ffff:192.0.2.1")));
    }

    #[test]
    fn rules_in_mapped_form_match_ipv4_clients() {
        for rule in [
            "::ffff:127.0.0.1",
            "::ffff:0:0/96",
            "::ffff:127.0.0.0/104",
            "::/0",
        ] {
            let rules = AccessRules {
                allow: NetList::default(),
                deny: nets(&[rule]),
            };
            assert!(!rules.permits(ip("127.0.0.1")), "{rule}");
            assert!(!rules.permits(ip("::ffff:127.0.0.1")), "{rule}");
        }
        let allow_mapped = AccessRules {
            allow: nets(&["::ffff:127.0.0.1"]),
            deny: NetList::default(),
        };
        assert!(allow_mapped.permits(ip("127.0.0.1")));
        assert!(!allow_mapped.permits(ip("127.0.0.2")));
        assert!(!allow_mapped.permits(ip("::1")));
    }

    #[test]
    fn mapped_client_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:50312".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "127.0.0.1:50312");
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
