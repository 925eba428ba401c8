//! The connection cap this machine can hold, worked out once at start-up
//! from the two limits the accept loop cannot absorb one client at a time:
//! out of memory mappings (`vm.max_map_count`), std aborts the process when
//! it cannot map a new thread's signal stack; out of descriptors
//! (`RLIMIT_NOFILE`), `accept` fails and clients wait unanswered. Thread
//! limits (`threads-max`, `RLIMIT_NPROC`, `pids.max`) only make `spawn` fail,
//! which costs just that client. Threads waiting for a connection
//! (`--thread-cache`) add nothing: one waits only after giving up its slot.

use std::fmt;
use std::fs;

use log::warn;
use rlimit::Resource;

use crate::logging::event;

/// Descriptors kept free besides those open at start-up and one per
/// connection: a client being turned away, a metrics scrape, a stop's
/// wake-up connection, a read of `/proc`, and slack.
const RESERVED_FDS: u64 = 8;
/// Threads besides connection threads and accept loops: main, signals, the
/// log writer, metrics, notify, and slack.
const RESERVED_THREADS: u64 = 8;
/// An upper bound (tests/capacity.rs checks it): glibc's stack and std's
/// signal stack, each with a guard page; static TLS is in the stack block,
/// malloc arenas are in the reserve, neighbours only merge.
const MAPPINGS_PER_THREAD: u64 = 4;
/// Mappings kept free for heap growth, large allocations, stacks glibc
/// keeps cached after their threads exit, late-loaded libraries.
const MAPPINGS_SLACK: u64 = 1024;
/// glibc's malloc arenas on 64-bit systems, two mappings each.
const MALLOC_ARENAS_PER_CPU: u64 = 8;
/// The largest `vm.max_map_count` the kernel accepts: the sysctl is an `int`.
const MAX_MAP_COUNT_CEILING: u64 = i32::MAX as u64;

/// One limit on connections, as read at start-up: its value (for
/// descriptors the soft limit, once raised to the hard one), how much was
/// `used` at start-up, and how much is `kept` for the rest of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Limit {
    OpenFiles { max: u64, used: u64 },
    MapCount { max: u64, used: u64, kept: u64 },
}

impl Limit {
    /// The limit, what the process takes of it besides its connection
    /// threads (with `process_threads` others), and what each of those takes.
    fn costs(&self, process_threads: u64) -> (u64, u64, u64) {
        match *self {
            Limit::OpenFiles { max, used } => (max, used.saturating_add(RESERVED_FDS), 1),
            Limit::MapCount { max, used, kept } => {
                let threads = process_threads.saturating_mul(MAPPINGS_PER_THREAD);
                let fixed = used.saturating_add(kept).saturating_add(threads);
                (max, fixed, MAPPINGS_PER_THREAD)
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Limit::OpenFiles { .. } => "RLIMIT_NOFILE",
            Limit::MapCount { .. } => "vm.max_map_count",
        }
    }
}

/// A connection cap lowered below `--max-connections`, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lowered {
    requested: u64,
    /// The process's own threads and one accept loop per listener.
    process_threads: u64,
    max_connections: u64,
    bound_by: Limit,
}

/// `None` if every limit has room for `requested`, else what the tightest
/// one allows, but never 0: a server that turns every client away serves no
/// one, and one connection fits in the reserves.
fn plan(limits: &[Limit], requested: u64, accept_loops: u64) -> Option<Lowered> {
    let process_threads = RESERVED_THREADS.saturating_add(accept_loops);
    let allowed = |limit: &Limit| {
        let (max, fixed, each) = limit.costs(process_threads);
        (max.saturating_sub(fixed) / each).max(1)
    };
    let bound_by = limits.iter().min_by_key(|limit| allowed(limit))?.clone();
    let max_connections = allowed(&bound_by);
    (max_connections < requested).then_some(Lowered {
        requested,
        process_threads,
        max_connections,
        bound_by,
    })
}

/// The warning line: the limit that bound the cap, its numbers, and how to
/// raise it (or, past what the kernel accepts, to lower `--max-connections`).
impl fmt::Display for Lowered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (requested, threads, limit) = (self.requested, self.process_threads, &self.bound_by);
        let (_, fixed, each) = limit.costs(threads);
        let needed = requested.saturating_mul(each).saturating_add(fixed);
        let most = MAX_MAP_COUNT_CEILING.saturating_sub(fixed) / each;
        let raise = if needed <= MAX_MAP_COUNT_CEILING {
            format!("raise it with sysctl vm.max_map_count={needed}")
        } else {
            let cannot = format!("it cannot be raised past {MAX_MAP_COUNT_CEILING}");
            format!("{cannot}, so lower --max-connections to at most {most}")
        };
        let cap = self.max_connections;
        write!(
            f,
            "--max-connections {requested} lowered to {cap}: it needs about {needed} "
        )?;
        match *limit {
            Limit::OpenFiles { max, used } => write!(
                f,
                "file descriptors but the limit is {max} ({used} open at start-up, {RESERVED_FDS} \
                 kept for the process); raise it with ulimit -n or LimitNOFILE="
            ),
            Limit::MapCount { max, used, kept } => write!(
                f,
                "memory mappings but vm.max_map_count is {max} ({MAPPINGS_PER_THREAD} per \
                 connection thread, {used} in use at start-up, {kept} kept for the heap and \
                 {threads} threads of the process); {raise}"
            ),
        }
    }
}

/// The cap to run with: `requested`, or less (with one warning) if it would
/// not fit beside `accept_loops` threads once the descriptor limit is raised.
/// Call it once the listeners are open: they count among the descriptors.
pub(crate) fn effective_max_connections(requested: usize, accept_loops: usize) -> usize {
    let Some(lowered) = plan(&read_limits(), requested as u64, accept_loops as u64) else {
        return requested;
    };
    warn!(
        event = event::CAPACITY, requested = lowered.requested,
        max_connections = lowered.max_connections, bound_by = lowered.bound_by.name();
        "{lowered}"
    );
    // Below `requested`, so it fits.
    usize::try_from(lowered.max_connections).unwrap_or(requested)
}

/// A limit that cannot be read (no `/proc`) is no limit.
fn read_limits() -> Vec<Limit> {
    [open_files(), map_count()].into_iter().flatten().collect()
}

fn open_files() -> Option<Limit> {
    let raised = rlimit::increase_nofile_limit(u64::MAX).or_else(|e| {
        warn!(event = event::FD_LIMIT; "cannot raise the file descriptor limit: {e}");
        rlimit::getrlimit(Resource::NOFILE).map(|(soft, _)| soft)
    });
    let max = raised.ok().filter(|&max| max != rlimit::INFINITY)?;
    // Less the one that lists them.
    let used = open_fds().map_or(0, |fds| fds.saturating_sub(1));
    Some(Limit::OpenFiles { max, used })
}

/// The entries of `/proc/self/fd`, counting the one used to list them (as
/// the official Go client's `process_open_fds` does).
pub(crate) fn open_fds() -> Option<u64> {
    let entries = fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.filter(Result::is_ok).count() as u64)
}

fn map_count() -> Option<Limit> {
    let max = fs::read_to_string("/proc/sys/vm/max_map_count").ok()?;
    let max = max.trim().parse().ok()?;
    let maps = fs::read("/proc/self/maps").ok()?;
    let used = maps.iter().filter(|&&b| b == b'\n').count() as u64;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let kept = MAPPINGS_SLACK + 2 * MALLOC_ARENAS_PER_CPU * cpus;
    Some(Limit::MapCount { max, used, kept })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap `plan` runs with.
    fn cap(limits: &[Limit], requested: u64, accept_loops: u64) -> u64 {
        plan(limits, requested, accept_loops).map_or(requested, |lowered| lowered.max_connections)
    }

    fn warning(limits: &[Limit], requested: u64, accept_loops: u64) -> String {
        plan(limits, requested, accept_loops)
            .expect("a lowered cap")
            .to_string()
    }

    fn files(max: u64, used: u64) -> Limit {
        Limit::OpenFiles { max, used }
    }

    fn maps(max: u64, used: u64) -> Limit {
        Limit::MapCount {
            max,
            used,
            kept: 1000,
        }
    }

    #[test]
    fn fitting_requests_are_left_alone() {
        assert_eq!(plan(&[files(20_000, 8), maps(65_530, 100)], 1024, 1), None);
        // Exactly what a limit allows still fits.
        assert_eq!(plan(&[files(1040, 8)], 1024, 0), None);
        // No limit read at all: nothing to lower it.
        assert_eq!(plan(&[], 19_990, 0), None);
    }

    #[test]
    fn each_limit_can_be_the_binding_one() {
        let loose_files = files(1_000_000, 8);
        let loose_maps = maps(10_000_000, 100);
        let tight = [
            (files(40, 8), 24),
            // (65530 - 1100 - 1000) / 4 - 8
            (maps(65_530, 1100), 15_849),
        ];
        for (limit, allowed) in tight {
            let limits = match limit {
                Limit::OpenFiles { .. } => [limit.clone(), loose_maps.clone()],
                Limit::MapCount { .. } => [loose_files.clone(), limit.clone()],
            };
            let lowered = plan(&limits, 19_990, 0).expect("lowered");
            assert_eq!(lowered.max_connections, allowed, "{limit:?}");
            assert_eq!(lowered.bound_by, limit);
        }
    }

    #[test]
    fn open_descriptors_and_accept_loops_are_counted() {
        assert_eq!(cap(&[files(1000, 30)], 5000, 14), 1000 - 30 - RESERVED_FDS);
        // (40000 - 0 - 1000) / 4 - 8 - 14: accept loops cost mappings, not descriptors.
        assert_eq!(
            cap(&[maps(40_000, 0)], 50_000, 14),
            9750 - RESERVED_THREADS - 14
        );
    }

    /// The bug this module once had: `--max-connections 17000
    /// --thread-cache 17000` under the default `vm.max_map_count` came out
    /// as a cap of 0, the server up and every client busy.
    #[test]
    fn a_machine_that_can_hold_connections_never_gets_a_cap_of_zero() {
        let default_machine = [files(20_000, 12), maps(65_530, 120)];
        // (65530 - 120 - 1000) / 4 - 8 - 1
        assert_eq!(cap(&default_machine, 17_000, 1), 16_093);
        for requested in [1, 2, 100, 17_000, 1 << 40, u64::MAX] {
            for limit in [1, 100, 1_100, 1_150, 4_000, 65_530, u64::MAX] {
                for in_use in [0, 50, 1_100, u64::MAX] {
                    for limits in [[files(limit, in_use)], [maps(limit, in_use)]] {
                        let cap = cap(&limits, requested, 3);
                        assert!(
                            (1..=requested).contains(&cap),
                            "{limits:?} {requested}: {cap}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn limits_with_no_room_left_give_one_connection_not_an_underflow() {
        for limit in [files(3, 8), maps(10, 100), maps(0, 0), files(0, 0)] {
            let lowered = plan(std::slice::from_ref(&limit), 10, 5).expect("lowered");
            assert_eq!(lowered.max_connections, 1, "{limit:?}");
            assert_eq!(lowered.bound_by, limit);
        }
        // One connection asked for and none left: nothing to lower, nothing to warn about.
        assert_eq!(plan(&[files(3, 8)], 1, 0), None);
        for limit in [files(3, 8), maps(10, 100)] {
            let line = warning(&[limit], u64::MAX, u64::MAX);
            assert!(line.contains("needs about 18446744073709551615 "), "{line}");
        }
    }

    #[test]
    fn the_warning_names_the_limit_its_numbers_and_the_fix() {
        let descriptors = warning(&[files(40, 8)], 1000, 0);
        for part in [
            "--max-connections 1000 lowered to 24: ",
            "it needs about 1016 file descriptors but the limit is 40",
            "(8 open at start-up, 8 kept for the process); raise it with ulimit -n",
        ] {
            assert!(descriptors.contains(part), "{part:?} not in {descriptors}");
        }

        let mappings = warning(&[maps(65_530, 1100)], 19_990, 1);
        for part in [
            "--max-connections 19990 lowered to 15848: ",
            // (19990 + 8 + 1) * 4 + 1100 + 1000
            "it needs about 82096 memory mappings but vm.max_map_count is 65530",
            "(4 per connection thread, 1100 in use at start-up, 1000 kept for the heap \
             and 9 threads of the process)",
            "; raise it with sysctl vm.max_map_count=82096",
        ] {
            assert!(mappings.contains(part), "{part:?} not in {mappings}");
        }
        assert!(!mappings.contains('\n'), "{mappings}");
    }

    #[test]
    fn a_mapping_count_past_what_the_kernel_accepts_is_never_suggested() {
        // 600 million threads would need 2.4 billion mappings: more than an int.
        let line = warning(&[maps(65_530, 1100)], 600_000_000, 0);
        assert!(
            line.contains("it needs about 2400002132 memory mappings"),
            "{line}"
        );
        // (2147483647 - 1100 - 1000) / 4 - 8
        assert!(
            line.ends_with(
                "it cannot be raised past 2147483647, so lower --max-connections to at most \
                 536870378"
            ),
            "{line}"
        );
        assert!(!line.contains("sysctl"), "{line}");
        // At the ceiling it is still a value to suggest; one more is not.
        let fits = warning(&[maps(65_530, 1100)], 536_870_378, 0);
        assert!(
            fits.ends_with("sysctl vm.max_map_count=2147483644"),
            "{fits}"
        );
        let beyond = warning(&[maps(65_530, 1100)], 536_870_379, 0);
        assert!(beyond.ends_with("at most 536870378"), "{beyond}");
    }

    /// The budget on this very machine leaves room for at least one
    /// connection and never exceeds what the kernel allows, checked against
    /// values read here independently.
    #[test]
    fn the_budget_fits_this_machines_limits() {
        let limits = read_limits();
        assert!(
            limits
                .iter()
                .any(|limit| limit.name() == "vm.max_map_count"),
            "vm.max_map_count is readable on Linux: {limits:?}"
        );
        let cap = cap(&limits, u64::MAX, 1);
        let threads = cap + RESERVED_THREADS + 1;
        let max_map_count: u64 = fs::read_to_string("/proc/sys/vm/max_map_count")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mappings_now = fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count() as u64;
        assert!(
            threads * MAPPINGS_PER_THREAD + mappings_now <= max_map_count,
            "{cap}"
        );
        let (nofile_soft, _) = rlimit::getrlimit(Resource::NOFILE).unwrap();
        assert!(cap <= nofile_soft, "{cap}");
        assert!(cap > 1, "{limits:?}");
    }
}
