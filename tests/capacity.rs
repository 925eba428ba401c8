//! The start-up capacity check against the real binary: with too few
//! descriptors for `--max-connections`, the cap is lowered with a warning
//! and clients beyond it are turned away busy instead of failing `accept`;
//! a thread costs the mappings the check counts; a thread cache as large as
//! the cap takes nothing from it; and a limit on threads, which the check
//! does not read, costs only the clients that could not get one.

mod common;

use std::fs;
use std::io::{self, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Descriptors the server is given; the cap becomes this minus those open
/// at start-up and a few it keeps free.
const NOFILE: usize = 48;

#[test]
fn a_cap_beyond_the_descriptor_limit_is_lowered_and_enforced() {
    if !require_program("prlimit", "apt-get install util-linux") {
        return;
    }
    let mut server = ServerProcess::builder()
        .wrapper("prlimit", [format!("--nofile={NOFILE}:{NOFILE}")])
        .args(["--max-connections", "1000", "--reply-timeout", "0"])
        .env("RUST_LOG", "prompt_server=debug")
        .start();
    let warning = server.expect_logged("lowered to");
    assert!(
        warning.contains("--max-connections 1000 lowered to ")
            && warning.contains(&format!("file descriptors but the limit is {NOFILE}")),
        "{warning}"
    );
    let cap = cap_in(&warning);
    assert!((NOFILE - 24..NOFILE - 8).contains(&cap), "{warning}");

    // Up to the cap, every client gets the prompt and holds its slot.
    let mut held = hold(&server, cap);

    // Beyond it, each gets the busy line and is closed; the server stays up.
    for i in 0..5 {
        let mut client = server.connect();
        assert_eq!(read_until_closed(&mut client), BUSY);
        // Busy lines are rate-limited: the first is logged at once.
        if i == 0 {
            server.expect_line(&format!("{} turned away", local(&client)));
        }
    }

    // Once the held clients have left, a fresh one is served.
    for (i, client) in held.iter_mut().enumerate() {
        client.write_all(format!("held {i}\n").as_bytes()).unwrap();
        assert_eq!(read_until_closed(client), b"");
    }
    session(server.addr, b"fresh\n");
    server.expect_line("said: \"fresh\"");

    let warnings = server.seen.iter().filter(|l| l.contains("lowered to"));
    assert_eq!(warnings.count(), 1, "one warning at start-up");
    // The cap kept the accept loop clear of the descriptor limit.
    assert!(
        !server.seen.iter().any(|l| l.contains("accept failed")),
        "{:#?}",
        server.seen
    );
}

/// The capacity check counts 4 mappings a thread (stack, guard page, signal
/// stack, guard page) instead of measuring; this holds it to that on the
/// real server, connection threads doing what they do.
#[test]
fn a_connection_thread_costs_at_most_the_four_mappings_counted() {
    const MEASURED: usize = 100;
    let server = ServerProcess::start(&["--reply-timeout", "0", "--thread-cache", "0"]);
    let mappings = || {
        fs::read_to_string(format!("/proc/{}/maps", server.pid()))
            .expect("read the server's /proc/PID/maps")
            .lines()
            .count()
    };
    // Threads make glibc's malloc arenas (up to 8 a CPU, two mappings each)
    // as they first allocate: a one-off cost, which the check reserves
    // apart, paid before measuring. (The first client also sees the accept
    // loop up, whose thread is not a connection's.)
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let mut held = hold(&server, 8 * cpus + 1);
    let before = mappings();
    held.extend(hold(&server, MEASURED));
    let added = mappings() - before;
    eprintln!("{MEASURED} connection threads added {added} mappings");
    assert!(
        (2 * MEASURED..=4 * MEASURED).contains(&added),
        "{MEASURED} connection threads added {added} mappings"
    );
    drop(held);
}

/// The start-up check once counted parked threads on top of connection
/// threads: `--max-connections 17000 --thread-cache 17000` came out as a cap
/// of 0 under the default `vm.max_map_count` of 65530, and the server,
/// up, told every client it was busy.
#[test]
fn a_thread_cache_as_large_as_the_cap_takes_nothing_from_it() {
    let mut server = ServerProcess::builder()
        .args(["--max-connections", "17000", "--thread-cache", "17000"])
        .start();
    session(server.addr, b"first\n");
    server.expect_line("said: \"first\"");
    // The first one's thread, parked, may serve this one.
    session(server.addr, b"second\n");
    server.expect_line("said: \"second\"");

    // A warning, if any, was logged before the first client was served.
    let Some(warning) = server.seen.iter().find(|l| l.contains("lowered to")) else {
        return;
    };
    let cap = cap_in(warning);
    if warning.contains("vm.max_map_count") {
        // All the mappings but the reserves (a few thousand) go to
        // connection threads, none to the thread cache.
        let max_map_count: usize = fs::read_to_string("/proc/sys/vm/max_map_count")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(cap + 1000 >= max_map_count / 4, "{warning}");
    } else {
        // The descriptors open at start-up and a few kept free.
        let limit = open_files_limit(server.pid());
        assert!(cap + 100 >= limit, "{warning} (RLIMIT_NOFILE {limit})");
    }
}

/// Clients held while the thread limit is reached.
const HELD: usize = 3;
/// Clients that then cannot get a thread.
const THREADLESS: usize = 3;

/// `RLIMIT_NPROC`, `kernel.threads-max` and a cgroup's `pids.max` are not
/// read at start-up: reaching one makes starting a thread fail, which costs
/// that client the busy line and a clean close, and nothing else. Tried with a `pids.max` of
/// the test's own (root ignores `RLIMIT_NPROC`), set to the server's threads
/// once it holds a few clients.
#[test]
fn clients_past_a_thread_limit_get_the_busy_line_and_the_server_goes_on() {
    let Some(cgroup) = PidsCgroup::create("thread-limit") else {
        return;
    };
    let mut server = ServerProcess::start(&["--reply-timeout", "0", "--thread-cache", "0"]);
    cgroup.add(server.pid());
    let mut held = hold(&server, HELD);
    let threads = cgroup.current();
    cgroup.set_max(threads);

    for _ in 0..THREADLESS {
        let mut client = server.connect();
        assert_eq!(
            read_until_closed(&mut client),
            BUSY,
            "the busy line, no prompt"
        );
        server.expect_line(&format!(
            "{} closed: cannot start a thread for it",
            local(&client)
        ));
    }
    // The clients that have a thread are served to the end.
    for (i, client) in held.iter_mut().enumerate() {
        client.write_all(format!("held {i}\n").as_bytes()).unwrap();
        assert_eq!(read_until_closed(client), b"");
        server.expect_line(&format!("said: \"held {i}\""));
    }
    // Once their threads are gone, there is room for a thread again.
    cgroup.wait_until_fewer_than(threads);
    session(server.addr, b"fresh\n");
    server.expect_line("said: \"fresh\"");

    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
    let summary = server.expect_logged("shutdown complete: ");
    let connections = HELD + THREADLESS + 1;
    assert!(
        summary.contains(&format!("shutdown complete: {connections} connections"))
            && summary.contains(&format!(" {THREADLESS} failed,")),
        "{summary}"
    );
}

/// `count` clients, each holding a connection (it has read the prompt).
fn hold(server: &ServerProcess, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut client = server.connect();
            expect_prompt(&mut client);
            client
        })
        .collect()
}

/// The N of a `--max-connections M lowered to N: ...` warning.
fn cap_in(warning: &str) -> usize {
    warning
        .split("lowered to ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|cap| cap.parse().ok())
        .unwrap_or_else(|| panic!("no cap in {warning}"))
}

/// The soft `RLIMIT_NOFILE` of process `pid`, from `/proc/PID/limits`.
fn open_files_limit(pid: u32) -> usize {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|values| values.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no open files limit in {limits}"))
}

/// A cgroup of the test's own under the test's cgroup, in the hierarchy
/// with the pids controller (cgroup v2 with it enabled for children, or
/// v1's pids hierarchy); removed when dropped, once empty.
struct PidsCgroup {
    dir: PathBuf,
}

impl PidsCgroup {
    /// The cgroup, or `None` when none can be made here (not root, no pids
    /// controller, a read-only `/sys/fs/cgroup`), which writes one SKIPPED
    /// line; with `PROMPT_SERVER_REQUIRE_ALL=1` that fails the test instead.
    fn create(name: &str) -> Option<PidsCgroup> {
        let name = format!("prompt-server-test-{}-{name}", std::process::id());
        let made = pids_hierarchy().and_then(|parent| {
            let dir = parent.join(name);
            fs::create_dir(&dir).ok()?;
            let cgroup = PidsCgroup { dir };
            cgroup.dir.join("pids.max").exists().then_some(cgroup)
        });
        if made.is_none() {
            let required = std::env::var_os("PROMPT_SERVER_REQUIRE_ALL").is_some_and(|v| v == "1");
            assert!(!required, "no pids cgroup can be made here");
            let _ = io::stderr().write_all(
                b"SKIPPED: a test in tests/capacity.rs needs a pids cgroup it can create \
                  (cgroup v2 with pids enabled for children, or v1's pids controller, as root)\n",
            );
        }
        made
    }

    /// Moves process `pid`, with all its threads, into this cgroup.
    fn add(&self, pid: u32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("move into the cgroup");
    }

    /// Threads in this cgroup now.
    fn current(&self) -> u64 {
        let current = fs::read_to_string(self.dir.join("pids.current")).unwrap();
        current.trim().parse().unwrap()
    }

    fn set_max(&self, max: u64) {
        fs::write(self.dir.join("pids.max"), max.to_string()).expect("set pids.max");
    }

    /// Waits until fewer than `threads` are in this cgroup. Threads leave
    /// it when they have exited, of which nothing outside the kernel tells,
    /// so this polls.
    fn wait_until_fewer_than(&self, threads: u64) {
        let deadline = Instant::now() + TIMEOUT;
        while self.current() >= threads {
            assert!(Instant::now() < deadline, "threads did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// The directory of this process's cgroup in the hierarchy where children
/// can have a `pids.max`.
fn pids_hierarchy() -> Option<PathBuf> {
    let membership = fs::read_to_string("/proc/self/cgroup").ok()?;
    membership.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        let dir = if id == "0" && controllers.is_empty() {
            let dir = Path::new("/sys/fs/cgroup").join(path);
            let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
            enabled
                .split_whitespace()
                .any(|c| c == "pids")
                .then_some(dir)?
        } else if controllers.split(',').any(|c| c == "pids") {
            Path::new("/sys/fs/cgroup/pids").join(path)
        } else {
            return None;
        };
        dir.is_dir().then_some(dir)
    })
}
