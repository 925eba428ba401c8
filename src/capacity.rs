//! How many connections this process can really hold, worked out once at
//! start-up from every limit on what a connection costs: a descriptor
//! (`RLIMIT_NOFILE`) and a thread, which costs memory mappings
//! (`vm.max_map_count`) and counts against `kernel.threads-max`,
//! `RLIMIT_NPROC` and the cgroup's `pids.max`.
//!
//! Running out of descriptors only fails an `accept`, which the accept loop
//! survives. Running out of mappings or threads is worse: std cannot map a
//! new thread's signal stack and aborts the whole process. So the connection
//! cap is lowered below every limit before the first client arrives, with
//! one warning that names the limit that bound it and how to raise it.
//!
//! Reading the limits (`read_limits`) is kept apart from the arithmetic
//! (`plan`), which is pure so that it can be tested with made-up numbers.
//! A limit that cannot be read (no `/proc`, no cgroup) is no limit.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, Scope};
use std::time::Duration;

use log::warn;
use rlimit::Resource;

use crate::logging::event;

/// Descriptors kept free besides those open at start-up (stdio, the
/// listeners, the metrics listener, the signal pipe) and one per
/// connection: a client being turned away, a metrics scrape, a stop's
/// wake-up connection, a read of `/proc`, and slack.
const RESERVED_FDS: u64 = 8;
/// Threads the process runs besides connection threads and accept loops:
/// main, the signal thread, a log writer, a metrics thread, a notify
/// thread, and slack.
const RESERVED_THREADS: u64 = 8;
/// Mappings a thread costs if measuring fails: its stack and guard page,
/// std's signal stack and its guard page.
const FALLBACK_MAPPINGS_PER_THREAD: u64 = 4;
/// Mappings kept free beyond the threads' own: heap growth, large
/// allocations (each its own mapping while it lives), late-loaded libraries.
const MAPPINGS_SLACK: u64 = 1024;
/// glibc makes up to 8 malloc arenas per CPU on 64-bit systems, each of
/// two mappings, as threads start allocating.
const MALLOC_ARENAS_PER_CPU: u64 = 8;
/// Probe threads started, and kept running, before measuring: their first
/// allocations create malloc arenas, a one-off cost that must not be
/// counted as every thread's.
const WARM_UP_PROBES: usize = 16;
/// Probe threads whose mappings are counted.
const MEASURED_PROBES: usize = 8;
/// How long measuring waits for probe threads to start.
const PROBE_START_TIMEOUT: Duration = Duration::from_secs(5);

/// One limit on connections, with what was read about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `RLIMIT_NOFILE` (soft, after raising it to the hard limit): each
    /// connection holds a descriptor; `in_use` are open at start-up.
    OpenFiles { limit: u64, in_use: u64 },
    /// `vm.max_map_count`, per process: each thread costs `per_thread`
    /// mappings; `reserved` are kept for the rest of the process.
    MapCount {
        limit: u64,
        in_use: u64,
        per_thread: u64,
        reserved: u64,
    },
    /// `kernel.threads-max`: threads on the whole system.
    ThreadsMax { limit: u64, in_use: u64 },
    /// `RLIMIT_NPROC`: threads of all processes of this user.
    UserThreads { limit: u64, in_use: u64 },
    /// A cgroup's `pids.max` (in `file`): threads of all its processes.
    CgroupPids {
        limit: u64,
        in_use: u64,
        file: PathBuf,
    },
}

impl Limit {
    /// Connections this limit leaves room for, with `own` threads (parked
    /// ones for `--thread-cache`, accept loops, the process's own) besides
    /// the connection threads.
    fn connections_allowed(&self, own_threads: u64) -> u64 {
        match *self {
            Limit::OpenFiles { limit, in_use } => {
                limit.saturating_sub(in_use.saturating_add(RESERVED_FDS))
            }
            Limit::MapCount {
                limit,
                in_use,
                per_thread,
                reserved,
            } => (limit.saturating_sub(in_use.saturating_add(reserved)) / per_thread.max(1))
                .saturating_sub(own_threads),
            Limit::ThreadsMax { limit, in_use }
            | Limit::UserThreads { limit, in_use }
            | Limit::CgroupPids { limit, in_use, .. } => {
                limit.saturating_sub(in_use).saturating_sub(own_threads)
            }
        }
    }

    /// The value this limit would need for `connections` to fit, with
    /// `own_threads` besides them.
    fn needed_for(&self, connections: u64, own_threads: u64) -> u64 {
        let threads = connections.saturating_add(own_threads);
        match *self {
            Limit::OpenFiles { in_use, .. } => connections
                .saturating_add(in_use)
                .saturating_add(RESERVED_FDS),
            Limit::MapCount {
                in_use,
                per_thread,
                reserved,
                ..
            } => threads
                .saturating_mul(per_thread)
                .saturating_add(in_use)
                .saturating_add(reserved),
            Limit::ThreadsMax { in_use, .. }
            | Limit::UserThreads { in_use, .. }
            | Limit::CgroupPids { in_use, .. } => threads.saturating_add(in_use),
        }
    }

    /// A short name, for the log line's `bound_by` field.
    fn name(&self) -> &'static str {
        match self {
            Limit::OpenFiles { .. } => "RLIMIT_NOFILE",
            Limit::MapCount { .. } => "vm.max_map_count",
            Limit::ThreadsMax { .. } => "kernel.threads-max",
            Limit::UserThreads { .. } => "RLIMIT_NPROC",
            Limit::CgroupPids { .. } => "pids.max",
        }
    }
}

/// The connection cap the process runs with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Budget {
    /// `--max-connections` as asked for.
    requested: u64,
    /// Idle parked threads (`--thread-cache`) counted against thread limits.
    parked: u64,
    /// Accept loops (one per listener), counted against thread limits.
    accept_loops: u64,
    /// The cap to run with: `requested`, or less if a limit bound it.
    max_connections: u64,
    /// The limit that lowered the cap, if one did.
    bound_by: Option<Limit>,
}

/// The cap for `requested` connections (plus `parked` idle threads and
/// `accept_loops` accept threads) under `limits`: `requested` itself if
/// every limit has room for it, else what the tightest one allows.
pub(crate) fn plan(limits: &[Limit], requested: u64, parked: u64, accept_loops: u64) -> Budget {
    let own_threads = own_threads(parked, accept_loops);
    let tightest = limits
        .iter()
        .map(|limit| (limit.connections_allowed(own_threads), limit))
        .min_by_key(|&(allowed, _)| allowed);
    let (max_connections, bound_by) = match tightest {
        Some((allowed, limit)) if allowed < requested => (allowed, Some(limit.clone())),
        _ => (requested, None),
    };
    Budget {
        requested,
        parked,
        accept_loops,
        max_connections,
        bound_by,
    }
}

/// Threads besides the connection threads: the process's own, the accept
/// loops, and `parked` idle ones.
fn own_threads(parked: u64, accept_loops: u64) -> u64 {
    RESERVED_THREADS
        .saturating_add(accept_loops)
        .saturating_add(parked)
}

/// The warning line: what was lowered to what, which limit bound it (with
/// the numbers), and how to raise that limit.
impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Budget {
            requested,
            parked,
            accept_loops,
            max_connections,
            ..
        } = *self;
        let process = RESERVED_THREADS.saturating_add(accept_loops);
        let Some(limit) = &self.bound_by else {
            return write!(f, "--max-connections {requested} fits every limit");
        };
        write!(
            f,
            "--max-connections {requested} lowered to {max_connections}: "
        )?;
        let needed = limit.needed_for(requested, own_threads(parked, accept_loops));
        let threads = max_connections.saturating_add(parked);
        let kept = match parked {
            0 => format!("{process} kept for the process"),
            _ => format!("{process} kept for the process, {parked} for --thread-cache"),
        };
        match limit {
            Limit::OpenFiles { limit, in_use } => write!(
                f,
                "it needs about {needed} file descriptors but the limit is {limit} \
                 ({in_use} open at start-up, {RESERVED_FDS} kept for the process); \
                 raise it with ulimit -n or LimitNOFILE="
            ),
            Limit::MapCount {
                limit,
                in_use,
                per_thread,
                reserved,
            } => write!(
                f,
                "at most {threads} connection threads fit in vm.max_map_count {limit} \
                 ({per_thread} mappings each, {in_use} in use, {reserved} kept for the heap, \
                 {kept}); raise it with sysctl vm.max_map_count={needed}"
            ),
            Limit::ThreadsMax { limit, in_use } => write!(
                f,
                "at most {threads} connection threads fit in kernel.threads-max {limit} \
                 ({in_use} threads running on the system, {kept}); \
                 raise it with sysctl kernel.threads-max={needed}"
            ),
            Limit::UserThreads { limit, in_use } => write!(
                f,
                "at most {threads} connection threads fit in RLIMIT_NPROC {limit} \
                 ({in_use} threads of this user running, {kept}); \
                 raise it with ulimit -u {needed} or LimitNPROC={needed}"
            ),
            Limit::CgroupPids {
                limit,
                in_use,
                file,
            } => write!(
                f,
                "at most {threads} connection threads fit in the cgroup's pids.max {limit} \
                 ({in_use} in use, {kept}); raise it to {needed} in {} (systemd: TasksMax=)",
                file.display()
            ),
        }
    }
}

/// Raises the descriptor limit, reads every other limit, and returns the
/// connection cap to run with: `requested`, or less if it would not fit,
/// in which case one warning says why. `thread_cache` idle threads are
/// counted besides the connection threads, and `accept_loops` threads.
///
/// Call it once the listeners are open (they count among the descriptors
/// in use), and before the server starts any thread of its own: it starts
/// and stops a few short-lived probe threads to measure what a thread
/// costs.
pub(crate) fn effective_max_connections(
    requested: usize,
    thread_cache: usize,
    accept_loops: usize,
) -> usize {
    let budget = plan(
        &read_limits(),
        requested as u64,
        thread_cache as u64,
        accept_loops as u64,
    );
    if let Some(limit) = &budget.bound_by {
        warn!(
            event = event::CAPACITY, requested = budget.requested,
            max_connections = budget.max_connections, bound_by = limit.name();
            "{budget}"
        );
    }
    usize::try_from(budget.max_connections).map_or(requested, |cap| cap.min(requested))
}

/// Every limit that could be read; a missing or unreadable one is left out.
pub(crate) fn read_limits() -> Vec<Limit> {
    let mut limits: Vec<Limit> = [open_files(), map_count(), threads_max(), user_threads()]
        .into_iter()
        .flatten()
        .collect();
    limits.extend(cgroup_pids());
    limits
}

/// `RLIMIT_NOFILE`, after raising the soft limit to the hard one.
fn open_files() -> Option<Limit> {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!(event = event::FD_LIMIT; "cannot raise the file descriptor limit: {e}");
            rlimit::getrlimit(Resource::NOFILE).ok()?.0
        }
    };
    // Less the one that lists them.
    let in_use =
        fs::read_dir("/proc/self/fd").map_or(0, |fds| fds.count().saturating_sub(1) as u64);
    (limit != rlimit::INFINITY).then_some(Limit::OpenFiles { limit, in_use })
}

/// `vm.max_map_count`, with the mappings in use now and what one more
/// thread costs, measured.
fn map_count() -> Option<Limit> {
    let limit = read_number("/proc/sys/vm/max_map_count")?;
    let per_thread = measure_mappings_per_thread().unwrap_or(FALLBACK_MAPPINGS_PER_THREAD);
    // Counted after the probes: stacks glibc caches from them stay mapped.
    let in_use = count_mappings()?;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get() as u64);
    Some(Limit::MapCount {
        limit,
        in_use,
        per_thread,
        reserved: MAPPINGS_SLACK + 2 * MALLOC_ARENAS_PER_CPU * cpus,
    })
}

/// `kernel.threads-max`, with the threads running on the system now (the
/// fourth field of `/proc/loadavg`, `running/total`).
fn threads_max() -> Option<Limit> {
    let limit = read_number("/proc/sys/kernel/threads-max")?;
    let in_use = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|loadavg| threads_in_loadavg(&loadavg))
        .unwrap_or(0);
    Some(Limit::ThreadsMax { limit, in_use })
}

fn threads_in_loadavg(loadavg: &str) -> Option<u64> {
    let running_total = loadavg.split_whitespace().nth(3)?;
    running_total.split_once('/')?.1.parse().ok()
}

/// `RLIMIT_NPROC`, unless it is unlimited or does not apply: the kernel
/// ignores it for root and for CAP_SYS_ADMIN or CAP_SYS_RESOURCE.
fn user_threads() -> Option<Limit> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_RESOURCE: u32 = 24;
    let (limit, _) = rlimit::getrlimit(Resource::NPROC).ok()?;
    if limit == rlimit::INFINITY {
        return None;
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status_field(&status, "Uid:").and_then(|uids| uids.split_whitespace().next());
    let capabilities = status_field(&status, "CapEff:")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0);
    let exempt = |cap: u32| capabilities & (1 << cap) != 0;
    if uid == Some("0") || exempt(CAP_SYS_ADMIN) || exempt(CAP_SYS_RESOURCE) {
        return None;
    }
    let in_use = uid.map_or(0, threads_of_user);
    Some(Limit::UserThreads { limit, in_use })
}

/// Threads of every process whose real user is `uid` (what `RLIMIT_NPROC`
/// counts), from `/proc/PID/status`; processes that vanish are skipped.
fn threads_of_user(uid: &str) -> u64 {
    let Ok(processes) = fs::read_dir("/proc") else {
        return 0;
    };
    processes
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|entry| fs::read_to_string(entry.path().join("status")).ok())
        .filter(|status| {
            status_field(status, "Uid:").and_then(|uids| uids.split_whitespace().next())
                == Some(uid)
        })
        .filter_map(|status| status_field(&status, "Threads:")?.parse::<u64>().ok())
        .sum()
}

/// The value after `key` on its line of a `/proc/PID/status` file.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .map(str::trim)
}

/// The tightest `pids.max` of each cgroup hierarchy this process is in
/// (cgroup v2, mounted at `/sys/fs/cgroup` or, on hybrid systems,
/// `/sys/fs/cgroup/unified`; and cgroup v1's `pids` controller).
fn cgroup_pids() -> Vec<Limit> {
    let Ok(membership) = fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    let mut limits = Vec::new();
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let mounts: &[&str] = if id == "0" && controllers.is_empty() {
            &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        } else if controllers.split(',').any(|c| c == "pids") {
            &["/sys/fs/cgroup/pids"]
        } else {
            continue;
        };
        limits.extend(
            mounts
                .iter()
                .filter_map(|mount| tightest_pids_limit(Path::new(mount), path)),
        );
    }
    limits
}

/// The `pids.max` that leaves the least room, in the cgroup at `path` under
/// `mount` or any of its ancestors (each caps all its descendants).
fn tightest_pids_limit(mount: &Path, path: &str) -> Option<Limit> {
    let mut dir = mount.join(path.trim_start_matches('/'));
    let mut tightest: Option<Limit> = None;
    while dir.starts_with(mount) {
        let file = dir.join("pids.max");
        // "max" (no limit) does not parse as a number.
        if let Some(limit) = read_number(&file) {
            let in_use = read_number(dir.join("pids.current")).unwrap_or(0);
            let found = Limit::CgroupPids {
                limit,
                in_use,
                file,
            };
            if tightest
                .as_ref()
                .is_none_or(|t| found.connections_allowed(0) < t.connections_allowed(0))
            {
                tightest = Some(found);
            }
        }
        if !dir.pop() {
            break;
        }
    }
    tightest
}

/// A file holding one number, as `/proc/sys` and cgroup files do.
fn read_number(path: impl AsRef<Path>) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Memory mappings of this process: lines of `/proc/self/maps`.
fn count_mappings() -> Option<u64> {
    let maps = fs::read("/proc/self/maps").ok()?;
    Some(maps.iter().filter(|&&b| b == b'\n').count() as u64)
}

/// What one more thread costs in mappings, measured: start warm-up probe
/// threads (which absorb one-off costs such as new malloc arenas), count
/// mappings, start more probes, count again, all while every probe is still
/// running, so that none of them reuses a stack another one left behind.
/// `None` if probes cannot be started or mappings cannot be counted.
///
/// Another thread of the process that starts or ends between the two counts
/// skews one measurement (in a test binary, other tests' threads do), and
/// later measurements may find stacks glibc cached from earlier probes,
/// which cost no new mapping: the largest of three is taken, which errs
/// towards a lower cap.
fn measure_mappings_per_thread() -> Option<u64> {
    (0..MEASUREMENTS).filter_map(|_| measure_once()).max()
}

/// How many times [`measure_mappings_per_thread`] measures.
const MEASUREMENTS: usize = 3;

/// One measurement for [`measure_mappings_per_thread`].
fn measure_once() -> Option<u64> {
    let gate = ProbeGate::default();
    thread::scope(|scope| {
        // Probes must be released on every path, or the scope never ends.
        let _release = Release(&gate);
        let warmed_up = gate.start(scope, WARM_UP_PROBES);
        let before = gate.wait_started(warmed_up).then(count_mappings)??;
        let measured = gate.start(scope, MEASURED_PROBES);
        let after = gate
            .wait_started(warmed_up + measured)
            .then(count_mappings)??;
        let added = after.checked_sub(before).filter(|&added| added > 0)?;
        // No probe started (threads cannot be made at all): nothing measured.
        (measured > 0).then(|| added.div_ceil(measured as u64))
    })
}

/// Where probe threads report that they run, and wait to be released.
#[derive(Default)]
struct ProbeGate {
    state: Mutex<ProbeState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProbeState {
    /// Probes running now.
    started: usize,
    /// Once set, probes end.
    released: bool,
}

/// Releases the probes when dropped.
struct Release<'a>(&'a ProbeGate);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.lock().released = true;
        self.0.changed.notify_all();
    }
}

impl ProbeGate {
    fn lock(&self) -> MutexGuard<'_, ProbeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts up to `count` probes, made the way connection threads are;
    /// returns how many started.
    fn start<'scope>(&'scope self, scope: &'scope Scope<'scope, '_>, count: usize) -> usize {
        (0..count)
            .filter(|_| {
                thread::Builder::new()
                    .name("capacity-probe".into())
                    .spawn_scoped(scope, || self.probe())
                    .is_ok()
            })
            .count()
    }

    /// A probe's life: report that it runs, wait to be released. It
    /// allocates nothing, so that it costs only what every thread costs.
    fn probe(&self) {
        let mut state = self.lock();
        state.started += 1;
        self.changed.notify_all();
        let _released = self
            .changed
            .wait_while(state, |state| !state.released)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Waits until `count` probes run; false if they do not in time.
    fn wait_started(&self, count: usize) -> bool {
        let (_state, waited) = self
            .changed
            .wait_timeout_while(self.lock(), PROBE_START_TIMEOUT, |state| {
                state.started < count
            })
            .unwrap_or_else(PoisonError::into_inner);
        !waited.timed_out()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(limit: u64, in_use: u64) -> Limit {
        Limit::MapCount {
            limit,
            in_use,
            per_thread: 4,
            reserved: 1000,
        }
    }

    #[test]
    fn fitting_requests_are_left_alone() {
        let limits = [
            Limit::OpenFiles {
                limit: 20_000,
                in_use: 8,
            },
            maps(65_530, 100),
            Limit::ThreadsMax {
                limit: 190_000,
                in_use: 500,
            },
        ];
        let budget = plan(&limits, 1024, 0, 0);
        assert_eq!(budget.max_connections, 1024);
        assert_eq!(budget.bound_by, None);
        // Exactly what a limit allows still fits.
        let exact = plan(
            &[Limit::OpenFiles {
                limit: 1040,
                in_use: 8,
            }],
            1024,
            0,
            0,
        );
        assert_eq!((exact.max_connections, exact.bound_by), (1024, None));
        // No limit read at all: nothing to lower it.
        assert_eq!(plan(&[], 19_990, 0, 0).max_connections, 19_990);
    }

    #[test]
    fn each_limit_can_be_the_binding_one() {
        let loose = || {
            vec![
                Limit::OpenFiles {
                    limit: 1_000_000,
                    in_use: 8,
                },
                maps(10_000_000, 100),
                Limit::ThreadsMax {
                    limit: 1_000_000,
                    in_use: 0,
                },
                Limit::UserThreads {
                    limit: 1_000_000,
                    in_use: 0,
                },
                Limit::CgroupPids {
                    limit: 1_000_000,
                    in_use: 0,
                    file: "/sys/fs/cgroup/x/pids.max".into(),
                },
            ]
        };
        let tight = [
            (
                Limit::OpenFiles {
                    limit: 40,
                    in_use: 8,
                },
                24,
            ),
            // (65530 - 1100 - 1000) / 4 - 8
            (maps(65_530, 1100), 15_849),
            (
                Limit::ThreadsMax {
                    limit: 3000,
                    in_use: 1000,
                },
                1992,
            ),
            (
                Limit::UserThreads {
                    limit: 4096,
                    in_use: 96,
                },
                3992,
            ),
            (
                Limit::CgroupPids {
                    limit: 500,
                    in_use: 10,
                    file: "/sys/fs/cgroup/x/pids.max".into(),
                },
                482,
            ),
        ];
        for (which, (limit, allowed)) in tight.into_iter().enumerate() {
            let mut limits = loose();
            limits[which] = limit.clone();
            let budget = plan(&limits, 19_990, 0, 0);
            assert_eq!(budget.max_connections, allowed, "{limit:?}");
            assert_eq!(budget.bound_by, Some(limit));
        }
    }

    #[test]
    fn tiny_limits_give_zero_not_an_underflow() {
        let tiny = [
            Limit::OpenFiles {
                limit: 3,
                in_use: 8,
            },
            maps(10, 100),
            Limit::ThreadsMax {
                limit: 1,
                in_use: 5,
            },
            Limit::UserThreads {
                limit: 0,
                in_use: 0,
            },
            Limit::MapCount {
                limit: 0,
                in_use: 0,
                per_thread: 0,
                reserved: 0,
            },
        ];
        for limit in tiny {
            assert_eq!(plan(&[limit], 10, 5, 0).max_connections, 0);
        }
        let huge = Limit::OpenFiles {
            limit: u64::MAX,
            in_use: 0,
        };
        assert!(huge.needed_for(u64::MAX, u64::MAX) == u64::MAX);
    }

    #[test]
    fn parked_threads_count_against_threads_but_not_descriptors() {
        let threads = Limit::ThreadsMax {
            limit: 1000,
            in_use: 0,
        };
        assert_eq!(threads.connections_allowed(own_threads(0, 0)), 992);
        assert_eq!(threads.connections_allowed(own_threads(100, 0)), 892);
        let files = Limit::OpenFiles {
            limit: 1000,
            in_use: 8,
        };
        assert_eq!(files.connections_allowed(own_threads(100, 0)), 984);
    }

    #[test]
    fn open_descriptors_and_accept_loops_are_counted() {
        let files = Limit::OpenFiles {
            limit: 1000,
            in_use: 30,
        };
        assert_eq!(
            plan(&[files], 5000, 0, 14).max_connections,
            1000 - 30 - RESERVED_FDS
        );
        let threads = Limit::ThreadsMax {
            limit: 1000,
            in_use: 0,
        };
        assert_eq!(
            plan(&[threads], 5000, 0, 14).max_connections,
            1000 - RESERVED_THREADS - 14
        );
    }

    #[test]
    fn the_warning_names_the_limit_its_numbers_and_the_fix() {
        let files = plan(
            &[Limit::OpenFiles {
                limit: 40,
                in_use: 8,
            }],
            1000,
            0,
            0,
        )
        .to_string();
        assert!(
            files.starts_with("--max-connections 1000 lowered to 24: "),
            "{files}"
        );
        assert!(
            files.contains("file descriptors but the limit is 40"),
            "{files}"
        );

        let mappings = plan(&[maps(65_530, 1100)], 19_990, 0, 0).to_string();
        for part in [
            "--max-connections 19990 lowered to 15849: ",
            "at most 15849 connection threads fit in vm.max_map_count 65530",
            "(4 mappings each, 1100 in use, 1000 kept for the heap",
            // (19990 + 8) * 4 + 1100 + 1000
            "sysctl vm.max_map_count=82092",
        ] {
            assert!(mappings.contains(part), "{part:?} not in {mappings}");
        }

        let pids = Limit::CgroupPids {
            limit: 500,
            in_use: 10,
            file: "/sys/fs/cgroup/x/pids.max".into(),
        };
        let cgroup = plan(&[pids], 1000, 20, 0).to_string();
        assert!(cgroup.contains("lowered to 462"), "{cgroup}");
        assert!(cgroup.contains("at most 482 connection threads fit in the cgroup's pids.max 500"));
        assert!(cgroup.contains("20 for --thread-cache"), "{cgroup}");
        assert!(cgroup.contains("raise it to 1038 in /sys/fs/cgroup/x/pids.max"));

        let threads = Limit::ThreadsMax {
            limit: 300,
            in_use: 100,
        };
        assert!(
            plan(&[threads], 1000, 0, 0)
                .to_string()
                .contains("kernel.threads-max 300")
        );
        let user = Limit::UserThreads {
            limit: 300,
            in_use: 100,
        };
        assert!(
            plan(&[user], 1000, 0, 0)
                .to_string()
                .contains("RLIMIT_NPROC 300")
        );
    }

    #[test]
    fn proc_fields_are_parsed() {
        assert_eq!(
            threads_in_loadavg("0.52 0.58 0.59 2/467 12345\n"),
            Some(467)
        );
        assert_eq!(threads_in_loadavg("garbage"), None);
        let status = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nThreads:\t7\n";
        assert_eq!(status_field(status, "Threads:"), Some("7"));
        assert_eq!(
            status_field(status, "Uid:")
                .unwrap()
                .split_whitespace()
                .next(),
            Some("1000")
        );
        assert_eq!(status_field(status, "CapEff:"), None);
    }

    #[test]
    fn the_tightest_cgroup_on_the_path_binds() {
        let mount = std::env::temp_dir().join(format!("capacity-cgroup-{}", std::process::id()));
        let leaf = mount.join("a/b");
        fs::create_dir_all(&leaf).unwrap();
        let write = |dir: &Path, max: &str, current: &str| {
            fs::write(dir.join("pids.max"), max).unwrap();
            fs::write(dir.join("pids.current"), current).unwrap();
        };
        write(&mount, "max\n", "900\n");
        write(&mount.join("a"), "1000\n", "900\n");
        write(&leaf, "max\n", "3\n");
        let found = tightest_pids_limit(&mount, "/a/b");
        fs::remove_dir_all(&mount).unwrap();
        assert_eq!(
            found,
            Some(Limit::CgroupPids {
                limit: 1000,
                in_use: 900,
                file: mount.join("a/pids.max"),
            })
        );
    }

    /// The budget on this very machine never exceeds what the kernel
    /// allows, checked against values read here independently.
    #[test]
    fn the_budget_fits_this_machines_limits() {
        let _measuring = MEASURING.lock().unwrap_or_else(PoisonError::into_inner);
        let limits = read_limits();
        let budget = plan(&limits, u64::MAX, 0, 0);
        let threads = budget.max_connections + RESERVED_THREADS;

        let per_thread = limits
            .iter()
            .find_map(|limit| match limit {
                Limit::MapCount { per_thread, .. } => Some(*per_thread),
                _ => None,
            })
            .expect("vm.max_map_count is readable on Linux");
        assert!(
            per_thread >= 2,
            "a thread costs at least its stack and guard: {per_thread}"
        );
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
            threads * per_thread + mappings_now <= max_map_count,
            "{budget:?}"
        );

        let threads_max: u64 = fs::read_to_string("/proc/sys/kernel/threads-max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(threads <= threads_max, "{budget:?}");

        let (nofile_soft, _) = rlimit::getrlimit(Resource::NOFILE).unwrap();
        assert!(budget.max_connections <= nofile_soft, "{budget:?}");
        assert!(budget.max_connections > 0, "{limits:?}");
    }

    /// Held by the tests that measure what a thread costs: one's probe
    /// threads ending (their stacks cached by glibc) would skew the other's
    /// counts.
    static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_thread_costs_a_few_mappings() {
        let _measuring = MEASURING.lock().unwrap_or_else(PoisonError::into_inner);
        let per_thread = measure_mappings_per_thread().expect("measurable on Linux");
        eprintln!("one thread costs {per_thread} mappings");
        // Other tests' threads, starting meanwhile, may add to the count.
        assert!((2..=16).contains(&per_thread), "{per_thread}");
    }
}
