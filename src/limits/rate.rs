//! `--max-rate-per-ip`: how fast one client network may open connections.
//!
//! Each client network (an address masked to `--rate-prefix-v4` /
//! `--rate-prefix-v6` bits, 32 and 64 by default) has a token bucket whose
//! capacity is the rate's count (the burst) and which refills continuously
//! at count per period. A connection takes one token; a network without one
//! is turned away. Grouping by prefix is what stops one host with a /64 of
//! IPv6 addresses from multiplying its rate by changing address.
//!
//! # How a bucket is stored
//!
//! As one number, the "theoretical arrival time" of the generic cell rate
//! algorithm (GCRA): the moment at which the bucket will be full again. With
//! `T = period / count` (the time one token takes to come back), a
//! connection at `now` is admitted if `full_at - now <= (count - 1) * T`, and
//! then `full_at = max(full_at, now) + T`. That is exactly a token bucket of
//! `count` tokens refilled at `count / period`, with no floating point.
//!
//! # Bounded memory under address spraying
//!
//! A bucket whose `full_at` has passed is full, and a full bucket behaves
//! exactly like no bucket: such entries are dropped. The table is swept
//! lazily when it grows to twice what the last sweep left (at least
//! [`MIN_SWEEP_LEN`]), so each sweep's O(n) cost is paid for by the n/2
//! insertions before it: amortised O(1) per connection.
//!
//! On top of that the table never holds more than `max_buckets` entries
//! ([`DEFAULT_MAX_BUCKETS`]). If a sweep leaves it full of buckets that are
//! still refilling (more than `max_buckets` distinct networks connected
//! within one period), the eighth of them that are *closest to full* are
//! evicted in one O(n) pass (`select_nth_unstable`), again amortised O(1)
//! per insertion. Evicting a bucket forgives what its network still owes;
//! evicting the fullest forgives the least, and keeps the networks that
//! have been hammering (whose buckets are emptiest). For a sprayer that
//! connects once per address this is the same as least-recently-used.
//! Refusing unknown networks instead would let a sprayer lock everybody
//! else out, which is what xinetd's `cps` does and what this limit exists to
//! avoid.
//!
//! Keys are hashed with std's randomly seeded SipHash, because clients choose
//! them.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The default IPv4 prefix of a client network: each address on its own.
pub(crate) const DEFAULT_PREFIX_V4: u8 = 32;
/// The default IPv6 prefix: a /64, the smallest network an IPv6 host is
/// usually given (RFC 6177), so changing addresses within it buys nothing.
pub(crate) const DEFAULT_PREFIX_V6: u8 = 64;
/// Most buckets a [`RateBuckets`] holds (about 4 MiB of table; 13.6 MiB of
/// the process's memory measured at the cap, the table's earlier sizes
/// included), far more than the networks a thread-per-connection server
/// sees within one period.
pub(crate) const DEFAULT_MAX_BUCKETS: usize = 100_000;
/// The table is never swept below this size: sweeping a small table often
/// would cost more than the memory it frees.
pub(crate) const MIN_SWEEP_LEN: usize = 1024;
/// The fastest rate accepted: one connection per microsecond. Beyond it the
/// limit would be no limit, and `period / count` would lose precision.
const MAX_PER_SECOND: u64 = 1_000_000;

/// A rate such as `5/s` or `100/min`: `count` connections per `period`, the
/// count also being the burst.
///
/// Accepted periods are `s`, `min` and `h`. `m` is refused as ambiguous; a
/// day is not offered, because a bucket that takes a day to refill is a ban,
/// not a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens in a full bucket, and tokens that come back per `period`; at
    /// least 1.
    count: u32,
    period: Duration,
}

impl Rate {
    /// The burst: connections a network with a full bucket may open at once.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The time in which `count` tokens come back.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// How long one token takes to come back, in nanoseconds (at least
    /// 1000: see [`MAX_PER_SECOND`]).
    fn emission_interval_nanos(&self) -> u64 {
        duration_nanos(self.period) / u64::from(self.count)
    }
}

impl FromStr for Rate {
    /// The whole explanation, for clap's error line.
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const FORM: &str = "expected COUNT/PERIOD, such as 5/s, 100/min or 1000/h";
        let error = |why: &str| format!("{why} ({FORM})");
        let Some((count, unit)) = text.split_once('/') else {
            return Err(error("no '/'"));
        };
        let period = match unit {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "m" => return Err(error("'m' is ambiguous: write min for minutes")),
            _ => return Err(error("the period must be s, min or h")),
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error("the count must be a whole number"));
        }
        let count: u64 = count.parse().map_err(|_| error("the count is too large"))?;
        if count == 0 {
            return Err(error("the count must be at least 1"));
        }
        let per_second_limit = MAX_PER_SECOND * period.as_secs();
        if count > per_second_limit {
            return Err(error(&format!(
                "faster than {MAX_PER_SECOND}/s ({per_second_limit}/{unit}) is no limit"
            )));
        }
        let count = u32::try_from(count).map_err(|_| error("the count is too large"))?;
        Ok(Rate { count, period })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// How client addresses are grouped into networks that share a limit: the
/// number of leading bits kept for each family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PrefixLengths {
    v4: u8,
    v6: u8,
}

impl Default for PrefixLengths {
    fn default() -> Self {
        PrefixLengths::new(DEFAULT_PREFIX_V4, DEFAULT_PREFIX_V6)
    }
}

impl PrefixLengths {
    /// Prefix lengths, `v4` at most 32 and `v6` at most 128 (longer ones,
    /// which [`Config::validate`](crate::Config::validate) refuses, count
    /// as the whole address).
    pub(crate) fn new(v4: u8, v6: u8) -> Self {
        PrefixLengths {
            v4: v4.min(32),
            v6: v6.min(128),
        }
    }

    /// The prefix length used for `ip`'s family.
    pub(crate) fn length_of(&self, ip: IpAddr) -> u8 {
        match ip {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(_) => self.v6,
        }
    }

    /// The network `ip` belongs to: `ip` with every bit past the prefix
    /// cleared. An IPv4-mapped IPv6 address counts as the IPv4 address.
    pub(crate) fn network_of(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.v4)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.v6)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }
}

/// A connection refused by a [`RateBuckets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateLimited {
    /// The network whose bucket was empty, for the log line.
    pub(crate) network: IpAddr,
    /// When the next token comes back.
    pub(crate) retry_after: Duration,
}

/// Token buckets per client network; shared by the accept loop (the TCP peer)
/// and connection threads (the real client named by a PROXY header).
///
/// One mutex over one table: an admission is a hash and a few comparisons
/// (see `try_acquire_cost_per_call` in the tests for the measured cost), far
/// less than the `accept` and thread hand-off around it, so sharding would
/// buy nothing measurable.
#[derive(Debug)]
pub(crate) struct RateBuckets {
    rate: Rate,
    prefixes: PrefixLengths,
    /// `Rate::emission_interval_nanos`: how long one token takes to return.
    token_nanos: u64,
    /// How far ahead of `now` a bucket's `full_at` may be for one more
    /// connection to be admitted: `(count - 1)` tokens' worth.
    burst_nanos: u64,
    /// Times are kept as nanoseconds since this instant (8 bytes a bucket).
    origin: Instant,
    max_buckets: usize,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    /// When each network's bucket is full again, in nanoseconds since
    /// `origin`. Networks whose bucket is full may be absent.
    full_at: HashMap<IpAddr, u64>,
    /// The size at which the next insertion sweeps out full buckets.
    sweep_at_len: usize,
}

impl RateBuckets {
    /// A limit of `rate` per network, networks being `prefixes` long, with at
    /// most [`DEFAULT_MAX_BUCKETS`] buckets.
    pub(crate) fn new(rate: Rate, prefixes: PrefixLengths) -> Self {
        Self::with_max_buckets(rate, prefixes, DEFAULT_MAX_BUCKETS)
    }

    /// As [`RateBuckets::new`], holding at most `max_buckets` (at least 8).
    pub(crate) fn with_max_buckets(
        rate: Rate,
        prefixes: PrefixLengths,
        max_buckets: usize,
    ) -> Self {
        let token_nanos = rate.emission_interval_nanos();
        let max_buckets = max_buckets.max(8);
        RateBuckets {
            rate,
            prefixes,
            token_nanos,
            burst_nanos: token_nanos * u64::from(rate.count - 1),
            origin: Instant::now(),
            max_buckets,
            table: Mutex::new(Table {
                full_at: HashMap::new(),
                sweep_at_len: MIN_SWEEP_LEN.min(max_buckets),
            }),
        }
    }

    pub(crate) fn rate(&self) -> Rate {
        self.rate
    }

    pub(crate) fn prefixes(&self) -> PrefixLengths {
        self.prefixes
    }

    /// Takes a token from the bucket of the network `ip` belongs to, at time
    /// `now`; `Err` if it has none. Any address works: the TCP peer at accept
    /// time, or the client a PROXY header names.
    pub(crate) fn try_acquire(&self, ip: IpAddr, now: Instant) -> Result<(), RateLimited> {
        let network = self.prefixes.network_of(ip);
        let now = self.nanos_since_origin(now);
        let mut table = self.table();
        if let Some(full_at) = table.full_at.get_mut(&network) {
            let start = (*full_at).max(now);
            if start - now > self.burst_nanos {
                return Err(RateLimited {
                    network,
                    retry_after: Duration::from_nanos(start - now - self.burst_nanos),
                });
            }
            *full_at = start + self.token_nanos;
            return Ok(());
        }
        // A network without a bucket has a full one: admitted, one token gone.
        self.make_room(&mut table, now);
        table.full_at.insert(network, now + self.token_nanos);
        Ok(())
    }

    /// Buckets held now.
    pub(crate) fn len(&self) -> usize {
        self.table().full_at.len()
    }

    /// Drops every bucket that is full at `now`.
    #[cfg(test)]
    pub(crate) fn sweep(&self, now: Instant) {
        let now = self.nanos_since_origin(now);
        let mut table = self.table();
        Self::sweep_table(&mut table, now, self.max_buckets);
    }

    /// Before an insertion: sweep when the table has grown enough to pay for
    /// it, and evict when it is still at the cap.
    fn make_room(&self, table: &mut Table, now: u64) {
        if table.full_at.len() < table.sweep_at_len {
            return;
        }
        Self::sweep_table(table, now, self.max_buckets);
        if table.full_at.len() >= self.max_buckets {
            Self::evict_fullest(table, self.max_buckets / 8);
        }
    }

    fn sweep_table(table: &mut Table, now: u64, max_buckets: usize) {
        table.full_at.retain(|_, full_at| *full_at > now);
        let left = table.full_at.len();
        table.sweep_at_len = (left * 2).max(MIN_SWEEP_LEN).min(max_buckets);
        // After a spray, give back most of the memory it made the table take.
        if table.full_at.capacity() > 4 * left.max(MIN_SWEEP_LEN) {
            table.full_at.shrink_to(2 * left);
        }
    }

    /// Removes the `count` buckets closest to full.
    fn evict_fullest(table: &mut Table, count: usize) {
        let mut full_at: Vec<u64> = table.full_at.values().copied().collect();
        if count == 0 || full_at.is_empty() {
            return;
        }
        let count = count.min(full_at.len());
        let (below, &mut threshold, _) = full_at.select_nth_unstable(count - 1);
        // Everything below the threshold goes, and as many buckets at it as
        // it takes to make `count` (a spray from one instant is all ties).
        let mut ties_to_evict = count - below.iter().filter(|&&t| t < threshold).count();
        table.full_at.retain(|_, full_at| {
            if *full_at == threshold && ties_to_evict > 0 {
                ties_to_evict -= 1;
                return false;
            }
            *full_at > threshold
        });
    }

    fn nanos_since_origin(&self, now: Instant) -> u64 {
        duration_nanos(now.saturating_duration_since(self.origin))
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Nothing in the table can be left half-updated by a panic.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A duration in nanoseconds; 584 years fit, more saturate.
fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_lengths_longer_than_the_address_count_as_the_address() {
        assert_eq!(PrefixLengths::new(33, 200), PrefixLengths::new(32, 128));
    }

    fn rate(text: &str) -> Rate {
        text.parse().expect("a valid rate")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a valid address")
    }

    fn limit(text: &str) -> RateBuckets {
        RateBuckets::new(rate(text), PrefixLengths::default())
    }

    /// How many of `tries` connections from `addr` at `now` are admitted.
    fn admitted(limit: &RateBuckets, addr: &str, now: Instant, tries: usize) -> usize {
        (0..tries)
            .filter(|_| limit.try_acquire(ip(addr), now).is_ok())
            .count()
    }

    #[test]
    fn rates_parse_with_their_burst_and_period() {
        assert_eq!(rate("5/s").count(), 5);
        assert_eq!(rate("5/s").period(), Duration::from_secs(1));
        assert_eq!(rate("100/min").period(), Duration::from_secs(60));
        assert_eq!(rate("1000/h").period(), Duration::from_secs(3600));
        assert_eq!(rate("1000000/s").count(), 1_000_000);
        assert_eq!(rate("100/min").to_string(), "100/min");
    }

    #[test]
    fn nonsense_rates_are_refused_with_the_expected_form() {
        for (text, why) in [
            ("", "no '/'"),
            ("5", "no '/'"),
            ("0/s", "at least 1"),
            ("5/m", "ambiguous"),
            ("5/day", "s, min or h"),
            ("5/S", "s, min or h"),
            ("/s", "whole number"),
            ("-5/s", "whole number"),
            ("+5/s", "whole number"),
            (" 5/s", "whole number"),
            ("1.5/s", "whole number"),
            ("99999999999999999999999/s", "too large"),
            ("1000001/s", "no limit"),
            ("4294967296/h", "no limit"),
        ] {
            let error = text.parse::<Rate>().expect_err(text).to_string();
            assert!(error.contains(why), "{text:?}: {error}");
            assert!(error.contains("such as 5/s"), "{text:?}: {error}");
        }
    }

    #[test]
    fn addresses_are_masked_to_their_network() {
        let prefixes = PrefixLengths::new(24, 48);
        assert_eq!(prefixes.network_of(ip("10.1.2.3")), ip("10.1.2.0"));
        assert_eq!(prefixes.network_of(ip("::ffff:10.1.2.3")), ip("10.1.2.0"));
        assert_eq!(
            prefixes.network_of(ip("2001:db8:1:2:3:4:5:6")),
            ip("2001:db8:1::")
        );
        let all = PrefixLengths::new(0, 0);
        assert_eq!(all.network_of(ip("10.1.2.3")), ip("0.0.0.0"));
        assert_eq!(all.network_of(ip("2001:db8::1")), ip("::"));
        let exact = PrefixLengths::new(32, 128);
        assert_eq!(exact.network_of(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(exact.network_of(ip("2001:db8::1")), ip("2001:db8::1"));
    }

    #[test]
    fn a_burst_past_the_count_is_refused() {
        let limit = limit("5/s");
        let now = Instant::now();
        assert_eq!(admitted(&limit, "127.0.0.1", now, 5), 5);
        let refused = limit
            .try_acquire(ip("127.0.0.1"), now)
            .expect_err("the sixth at once is refused");
        assert_eq!(refused.network, ip("127.0.0.1"));
        assert_eq!(refused.retry_after, Duration::from_millis(200));
    }

    #[test]
    fn tokens_come_back_continuously() {
        let limit = limit("5/s");
        let start = Instant::now();
        assert_eq!(admitted(&limit, "127.0.0.1", start, 10), 5);
        // One token every 200 ms.
        let later = start + Duration::from_millis(199);
        assert_eq!(admitted(&limit, "127.0.0.1", later, 1), 0);
        let later = start + Duration::from_millis(200);
        assert_eq!(admitted(&limit, "127.0.0.1", later, 10), 1);
        let later = start + Duration::from_millis(200 + 600);
        assert_eq!(admitted(&limit, "127.0.0.1", later, 10), 3);
        // A long pause refills the bucket, but never past the burst.
        let later = start + Duration::from_secs(60);
        assert_eq!(admitted(&limit, "127.0.0.1", later, 10), 5);
    }

    #[test]
    fn a_steady_client_at_the_rate_is_never_refused() {
        let limit = limit("100/min");
        let start = Instant::now();
        for i in 0..1000 {
            let now = start + Duration::from_millis(600 * i);
            assert!(limit.try_acquire(ip("127.0.0.1"), now).is_ok(), "at {i}");
        }
    }

    #[test]
    fn networks_are_limited_independently() {
        let limit = limit("2/s");
        let now = Instant::now();
        assert_eq!(admitted(&limit, "127.0.0.1", now, 5), 2);
        assert_eq!(admitted(&limit, "127.0.0.2", now, 5), 2);
        assert_eq!(admitted(&limit, "2001:db8:0:1::1", now, 5), 2);
        assert_eq!(admitted(&limit, "2001:db8:0:2::1", now, 5), 2);
    }

    #[test]
    fn ipv4_addresses_in_one_prefix_share_a_bucket() {
        let prefixes = PrefixLengths::new(24, 64);
        let limit = RateBuckets::new(rate("3/s"), prefixes);
        let now = Instant::now();
        assert_eq!(admitted(&limit, "192.0.2.1", now, 1), 1);
        assert_eq!(admitted(&limit, "192.0.2.200", now, 1), 1);
        assert_eq!(admitted(&limit, "::ffff:192.0.2.7", now, 5), 1);
        assert_eq!(admitted(&limit, "192.0.2.9", now, 1), 0);
        assert_eq!(admitted(&limit, "192.0.3.1", now, 5), 3);
    }

    #[test]
    fn ipv6_addresses_in_one_prefix_share_a_bucket() {
        let limit = limit("3/s");
        let now = Instant::now();
        // A host changing addresses within its /64 gains nothing.
        for host in 1..=10 {
            let addr = format!("2001:db8:0:1::{host:x}");
            let expected = usize::from(host <= 3);
            assert_eq!(admitted(&limit, &addr, now, 1), expected, "{addr}");
        }
        assert_eq!(admitted(&limit, "2001:db8:0:2::1", now, 5), 3);
    }

    #[test]
    fn the_sweep_frees_idle_buckets() {
        let limit = limit("5/s");
        let start = Instant::now();
        for host in 0..100u32 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + host));
            assert!(limit.try_acquire(addr, start).is_ok());
        }
        assert_eq!(admitted(&limit, "127.0.0.1", start, 10), 5);
        assert_eq!(limit.len(), 101);
        // 200 ms later the one-connection buckets are full again; the
        // emptied one is not.
        limit.sweep(start + Duration::from_millis(200));
        assert_eq!(limit.len(), 1);
        limit.sweep(start + Duration::from_secs(1));
        assert_eq!(limit.len(), 0);
    }

    #[test]
    fn the_table_sweeps_itself_as_it_grows() {
        let limit = limit("1/s");
        let start = Instant::now();
        // Each second a new batch of addresses, each connecting once: the
        // previous batches are full again and must not accumulate.
        for second in 0..20u32 {
            let now = start + Duration::from_secs(u64::from(second));
            for host in 0..1000u32 {
                let addr = IpAddr::V4(Ipv4Addr::from(second << 16 | host));
                assert!(limit.try_acquire(addr, now).is_ok());
            }
            assert!(limit.len() <= 2 * MIN_SWEEP_LEN, "{}", limit.len());
        }
    }

    #[test]
    fn spraying_a_million_addresses_stays_within_the_cap() {
        let max_buckets = 10_000;
        let limit =
            RateBuckets::with_max_buckets(rate("10/h"), PrefixLengths::default(), max_buckets);
        let start = Instant::now();
        // An abuser empties its bucket first (ten tokens owed, an hour to
        // refill); then a million addresses connect once each (one token
        // owed, six minutes to refill), all within the same hour.
        assert_eq!(admitted(&limit, "192.0.2.1", start, 20), 10);
        let now = start + Duration::from_secs(1);
        for host in 0..1_000_000u32 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + host));
            assert!(limit.try_acquire(addr, now).is_ok());
            assert!(limit.len() <= max_buckets);
        }
        // The abuser's bucket, the emptiest, survived every eviction.
        assert_eq!(admitted(&limit, "192.0.2.1", now, 1), 0);
        // The most recent sprayers are still remembered.
        assert_eq!(admitted(&limit, "10.15.66.63", now, 20), 9);
    }

    #[test]
    fn eviction_picks_the_fullest_buckets() {
        let limit = RateBuckets::with_max_buckets(rate("10/s"), PrefixLengths::default(), 16);
        let start = Instant::now();
        // 15 networks with one connection each, one with ten.
        for host in 0..15u32 {
            assert!(
                limit
                    .try_acquire(IpAddr::V4(Ipv4Addr::from(host)), start)
                    .is_ok()
            );
        }
        assert_eq!(admitted(&limit, "192.0.2.1", start, 10), 10);
        // A new network at the cap evicts two of the one-connection ones.
        assert!(limit.try_acquire(ip("192.0.2.2"), start).is_ok());
        assert!(limit.len() <= 16);
        assert_eq!(admitted(&limit, "192.0.2.1", start, 1), 0);
    }

    /// Not a pass/fail test: prints the cost of an admission, for the README.
    #[test]
    fn try_acquire_cost_per_call() {
        let limit = limit("1000000/s");
        let start = Instant::now();
        let calls = 200_000u32;
        let timer = Instant::now();
        for i in 0..calls {
            let _ = limit.try_acquire(ip("127.0.0.1"), start + Duration::from_micros(u64::from(i)));
        }
        let same = timer.elapsed() / calls;
        let timer = Instant::now();
        let mut slowest = Duration::ZERO;
        for i in 0..calls {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let call = Instant::now();
            let _ = limit.try_acquire(addr, start);
            slowest = slowest.max(call.elapsed());
        }
        let spray = timer.elapsed() / calls;
        eprintln!(
            "try_acquire: {} ns/op for one client, {} ns/op for new addresses \
             (table of up to {DEFAULT_MAX_BUCKETS}; slowest call, a sweep and \
             an eviction: {} us)",
            same.as_nanos(),
            spray.as_nanos(),
            slowest.as_micros()
        );
    }
}
