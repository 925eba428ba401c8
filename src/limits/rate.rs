//! `--max-rate-per-ip`: a GCRA token bucket per client network (an address
//! masked to `--rate-prefix-v4`/`-v6` bits, so that a host gains nothing by
//! changing address within its /64). Hand-written because governor's keyed
//! limiter has no cap on its keys: at the cap, the buckets closest to full are
//! evicted, which forgives the least and keeps the networks hammering, where
//! refusing new networks would let a sprayer lock everybody out (xinetd's `cps`).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::lock;

/// 13.6 MiB of process memory measured at the cap.
const DEFAULT_MAX_BUCKETS: usize = 100_000;
/// Sweeping a smaller table often would cost more than the memory it frees.
const MIN_SWEEP_LEN: usize = 1024;
/// One connection per microsecond: faster is no limit, and `period / count` loses precision.
const MAX_PER_SECOND: u64 = 1_000_000;

/// A rate such as `5/s` or `100/min`: `count` connections per `period`, the
/// count also being the burst. Periods are `s`, `min` and `h`: `m` is
/// ambiguous, and a bucket that takes a day to refill is a ban, not a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// At least 1.
    count: u32,
    period: Duration,
}

impl FromStr for Rate {
    /// The whole explanation, for clap's error line.
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error =
            |why: &str| format!("{why} (expected COUNT/PERIOD, such as 5/s, 100/min or 1000/h)");
        let (count, unit) = text.split_once('/').ok_or_else(|| error("no '/'"))?;
        let seconds = match unit {
            "s" => 1,
            "min" => 60,
            "h" => 3600,
            "m" => return Err(error("'m' is ambiguous: write min for minutes")),
            _ => return Err(error("the period must be s, min or h")),
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error("the count must be a whole number"));
        }
        let count: u64 = count.parse().map_err(|_| error("the count is too large"))?;
        let most = MAX_PER_SECOND * seconds;
        if count == 0 {
            return Err(error("the count must be at least 1"));
        } else if count > most {
            let why = format!("faster than {MAX_PER_SECOND}/s ({most}/{unit}) is no limit");
            return Err(error(&why));
        }
        let count = u32::try_from(count).map_err(|_| error("the count is too large"))?;
        let period = Duration::from_secs(seconds);
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

/// `--max-rate-per-ip`: how fast one client network may connect, and how
/// client addresses are grouped into networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Connections per period, which is also the burst.
    pub rate: Rate,
    /// Leading bits of an IPv4 client address that make its network (0-32).
    pub prefix_v4: u8,
    /// Leading bits of an IPv6 client address that make its network (0-128).
    pub prefix_v6: u8,
}

impl RateLimit {
    /// The default IPv4 prefix: each address on its own.
    pub const DEFAULT_PREFIX_V4: u8 = 32;
    /// The default IPv6 prefix, /64: a host's usual allocation (RFC 6177),
    /// so changing addresses within it buys nothing.
    pub const DEFAULT_PREFIX_V6: u8 = 64;

    /// `rate` per network, with the default prefixes (/32 and /64).
    pub fn new(rate: Rate) -> Self {
        RateLimit {
            rate,
            prefix_v4: Self::DEFAULT_PREFIX_V4,
            prefix_v6: Self::DEFAULT_PREFIX_V6,
        }
    }

    /// `ip`'s network, an IPv4-mapped address as the IPv4 one (a prefix longer
    /// than the address, which `Config::validate` refuses, keeps all of it).
    pub(crate) fn network_of(&self, ip: IpAddr) -> IpNet {
        let (ip, prefix) = match ip.to_canonical() {
            ip @ IpAddr::V4(_) => (ip, self.prefix_v4),
            ip => (ip, self.prefix_v6),
        };
        IpNet::new(ip, prefix).map_or_else(|_| IpNet::from(ip), |net| net.trunc())
    }
}

/// A connection refused: its network, the rate it broke, and when a token comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateLimited {
    pub(crate) network: IpNet,
    pub(crate) rate: Rate,
    pub(crate) retry_after: Duration,
}

/// Token buckets per client network, for the accept loop and connection
/// threads (behind a proxy). One mutex: an admission is a hash and a few
/// comparisons (`try_acquire_cost_per_call`), far less than an `accept`.
#[derive(Debug)]
pub(crate) struct RateBuckets {
    limit: RateLimit,
    /// Times are nanoseconds since this instant (8 bytes a bucket).
    origin: Instant,
    max_buckets: usize,
    table: Mutex<Table>,
}

/// GCRA: a bucket is its "theoretical arrival time" `full_at`. With `T =
/// period / count`, a connection at `now` is admitted if `full_at - now <=
/// (count - 1) * T`, then `full_at = max(full_at, now) + T`. A full bucket is
/// as good as none: full ones are swept once the table has doubled since the
/// last sweep (amortised O(1)). Std's seeded SipHash, as clients choose keys.
#[derive(Debug, Default)]
struct Table {
    full_at: HashMap<IpAddr, u64>,
    /// The size at which the next insertion sweeps (or `max_buckets`, if
    /// less); 0 until the first one, whose sweep of nothing sets it.
    sweep_at_len: usize,
}

impl RateBuckets {
    pub(crate) fn new(limit: RateLimit) -> Self {
        RateBuckets {
            limit,
            origin: Instant::now(),
            max_buckets: DEFAULT_MAX_BUCKETS,
            table: Mutex::default(),
        }
    }

    /// Takes a token from the bucket of `ip`'s network at `now`.
    pub(crate) fn try_acquire(&self, ip: IpAddr, now: Instant) -> Result<(), RateLimited> {
        let (network, rate) = (self.limit.network_of(ip), self.limit.rate);
        let token_nanos = duration_nanos(rate.period) / u64::from(rate.count);
        let burst_nanos = token_nanos * u64::from(rate.count - 1);
        let now = duration_nanos(now.saturating_duration_since(self.origin));
        let mut table = lock(&self.table);
        // A network without a bucket has a full one, for which room is made first.
        if table.full_at.len() >= table.sweep_at_len.min(self.max_buckets)
            && !table.full_at.contains_key(&network.addr())
        {
            table.sweep(now);
            if table.full_at.len() >= self.max_buckets {
                table.evict_fullest(self.max_buckets / 8);
            }
        }
        let full_at = table.full_at.entry(network.addr()).or_insert(now);
        let start = (*full_at).max(now);
        if start - now > burst_nanos {
            let retry_after = Duration::from_nanos(start - now - burst_nanos);
            return Err(RateLimited {
                network,
                rate,
                retry_after,
            });
        }
        *full_at = start + token_nanos;
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.table).full_at.len()
    }
}

impl Table {
    fn sweep(&mut self, now: u64) {
        self.full_at.retain(|_, full_at| *full_at > now);
        let left = self.full_at.len();
        self.sweep_at_len = (left * 2).max(MIN_SWEEP_LEN);
        // After a spray, give back most of the memory it made the table take.
        if self.full_at.capacity() > 4 * left.max(MIN_SWEEP_LEN) {
            self.full_at.shrink_to(2 * left);
        }
    }

    /// Removes the `count` buckets closest to full.
    fn evict_fullest(&mut self, count: usize) {
        let mut full_at: Vec<u64> = self.full_at.values().copied().collect();
        if count == 0 || full_at.is_empty() {
            return;
        }
        let count = count.min(full_at.len());
        let (below, &mut threshold, _) = full_at.select_nth_unstable(count - 1);
        // Everything below the threshold goes, and as many at it as it takes
        // to make `count` (a spray from one instant is all ties).
        let mut ties_to_evict = count - below.iter().filter(|&&t| t < threshold).count();
        self.full_at.retain(|_, full_at| {
            if *full_at == threshold && ties_to_evict > 0 {
                ties_to_evict -= 1;
                return false;
            }
            *full_at > threshold
        });
    }
}

/// 584 years fit; more saturate.
fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Drops every bucket that is full at `now`.
    fn sweep(limit: &RateBuckets, now: Instant) {
        let now = duration_nanos(now.saturating_duration_since(limit.origin));
        lock(&limit.table).sweep(now);
    }

    fn rate(text: &str) -> Rate {
        text.parse().expect("a valid rate")
    }

    fn prefixes(prefix_v4: u8, prefix_v6: u8) -> RateLimit {
        RateLimit {
            prefix_v4,
            prefix_v6,
            ..RateLimit::new(rate("1/s"))
        }
    }

    fn net(text: &str) -> IpNet {
        text.parse().expect("a valid network")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a valid address")
    }

    fn limit(text: &str) -> RateBuckets {
        RateBuckets::new(RateLimit::new(rate(text)))
    }

    /// How many of `tries` connections from `addr` at `now` are admitted.
    fn admitted(limit: &RateBuckets, addr: &str, now: Instant, tries: usize) -> usize {
        (0..tries)
            .filter(|_| limit.try_acquire(ip(addr), now).is_ok())
            .count()
    }

    #[test]
    fn rates_parse_with_their_burst_and_period() {
        assert_eq!(rate("5/s").count, 5);
        assert_eq!(rate("5/s").period, Duration::from_secs(1));
        assert_eq!(rate("100/min").period, Duration::from_secs(60));
        assert_eq!(rate("1000/h").period, Duration::from_secs(3600));
        assert_eq!(rate("1000000/s").count, 1_000_000);
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
        let masked = prefixes(24, 48);
        assert_eq!(masked.network_of(ip("10.1.2.3")), net("10.1.2.0/24"));
        assert_eq!(masked.network_of(ip("::ffff:10.1.2.3")), net("10.1.2.0/24"));
        assert_eq!(
            masked.network_of(ip("2001:db8:1:2:3:4:5:6")),
            net("2001:db8:1::/48")
        );
        let all = prefixes(0, 0);
        assert_eq!(all.network_of(ip("10.1.2.3")), net("0.0.0.0/0"));
        assert_eq!(all.network_of(ip("2001:db8::1")), net("::/0"));
        let exact = prefixes(32, 128);
        assert_eq!(exact.network_of(ip("10.1.2.3")), net("10.1.2.3/32"));
        assert_eq!(exact.network_of(ip("2001:db8::1")), net("2001:db8::1/128"));
    }

    #[test]
    fn prefixes_longer_than_the_address_keep_all_of_it() {
        let longer = prefixes(33, 200);
        assert_eq!(longer.network_of(ip("10.1.2.3")), net("10.1.2.3/32"));
        assert_eq!(longer.network_of(ip("2001:db8::1")), net("2001:db8::1/128"));
    }

    #[test]
    fn a_burst_past_the_count_is_refused() {
        let limit = limit("5/s");
        let now = Instant::now();
        assert_eq!(admitted(&limit, "127.0.0.1", now, 5), 5);
        let refused = limit
            .try_acquire(ip("127.0.0.1"), now)
            .expect_err("the sixth at once is refused");
        assert_eq!(refused.network, net("127.0.0.1/32"));
        assert_eq!(refused.rate, rate("5/s"));
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
        let limit = RateBuckets::new(RateLimit {
            prefix_v4: 24,
            ..RateLimit::new(rate("3/s"))
        });
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
        sweep(&limit, start + Duration::from_millis(200));
        assert_eq!(limit.len(), 1);
        sweep(&limit, start + Duration::from_secs(1));
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
        let limit = RateBuckets {
            max_buckets,
            ..limit("10/h")
        };
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
        let limit = RateBuckets {
            max_buckets: 16,
            ..limit("10/s")
        };
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

    /// Not a pass/fail test: prints the cost of an admission, for docs/OPERATIONS.md.
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
