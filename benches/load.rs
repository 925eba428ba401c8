//! Load benchmark: the real `prompt-server` binary (release build) against
//! a tokio server speaking the same protocol, driven by the same load
//! generator in the same run. Every server's stderr is a pipe the benchmark
//! drains, as journald would.
//!
//! Every figure is reported for each server and as a ratio to the tokio
//! yardstick, because these machines are shared and noisy: absolute numbers
//! drift between runs, ratios from one run hold. Workloads are interleaved
//! across servers so that drift hits all of them alike.
//!
//! Settings (environment): `PROMPT_BENCH_SECS` (seconds per session
//! workload, default 3), `PROMPT_BENCH_IDLE` (idle clients held, default
//! 10000), `PROMPT_BENCH_THREAD_CACHE` (the `--thread-cache` of the cached
//! mode, default 256).
//!
//! Run with `cargo bench --bench load`; a table goes to stdout and the same
//! figures as JSON to `target/bench/load.json`.

#[path = "../tests/common/child.rs"]
mod child;
#[path = "support/client.rs"]
mod client;
#[path = "support/lines.rs"]
mod lines;
#[path = "support/report.rs"]
mod report;
#[path = "support/server.rs"]
mod server;
#[path = "support/yardstick.rs"]
mod yardstick;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use report::{IdleFigures, Latency, Report, SessionFigures, Settings};
use server::Server;

const CONCURRENCY: [usize; 3] = [1, 16, 128];
const FRESH_SESSIONS_WHILE_IDLE: usize = 200;
/// Warm-up before each measured session workload, so that page faults and
/// caches are not measured.
const WARM_UP: Duration = Duration::from_millis(200);

fn main() {
    if std::env::var(yardstick::ROLE_VAR).as_deref() == Ok(yardstick::ROLE) {
        yardstick::serve();
        return;
    }
    if let Ok(target) = std::env::var("PROMPT_BENCH_TARGET") {
        drive_external(&target);
        return;
    }
    // cargo bench passes --bench; nothing else is expected.
    let settings = settings_from_env();
    let out_dir = target_dir().join("bench");
    fs::create_dir_all(&out_dir).expect("create target/bench");
    let servers = start_servers(&settings);

    let mut report = Report::new(servers.iter().map(|s| s.name.clone()).collect());
    measure_sessions(&servers, settings.secs, &mut report);
    measure_idle(&servers, settings.idle, &mut report);

    report.print();
    write_json(&report, &settings, &out_dir.join("load.json"));
    println!("machine: {}", report::machine());
}

/// The settings from the environment, with the idle count capped by the
/// descriptor limit this process can raise itself to.
fn settings_from_env() -> Settings {
    let fd_limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let idle = env_number("PROMPT_BENCH_IDLE", 10_000);
    Settings {
        secs: env_number("PROMPT_BENCH_SECS", 3) as u64,
        idle: idle.min(fd_limit.saturating_sub(256) as usize),
        thread_cache: env_number("PROMPT_BENCH_THREAD_CACHE", 256),
    }
}

/// The project's server in its modes, then the yardstick (last, as the
/// report expects).
fn start_servers(settings: &Settings) -> Vec<Server> {
    let max_connections = (settings.idle + 1024).to_string();
    let cache = settings.thread_cache.to_string();
    vec![
        Server::start_project("threads", &["--max-connections", &max_connections]),
        Server::start_project(
            "thread-cache",
            &[
                "--max-connections",
                &max_connections,
                "--thread-cache",
                &cache,
            ],
        ),
        // The thread cache with both operator features on: the metrics
        // endpoint idle, and a rate limit every client (all from
        // 127.0.0.1, one network) stays under, so that its cost is the
        // bucket check on every connection.
        Server::start_project(
            "watched",
            &[
                "--max-connections",
                &max_connections,
                "--thread-cache",
                &cache,
                "--metrics-addr",
                "127.0.0.1:0",
                "--max-rate-per-ip",
                "1000000/s",
            ],
        ),
        Server::start_yardstick("tokio"),
    ]
}

/// Sessions back to back at each concurrency, the servers interleaved so
/// that drift in the machine hits them alike.
fn measure_sessions(servers: &[Server], secs: u64, report: &mut Report) {
    let duration = Duration::from_secs(secs);
    for c in CONCURRENCY {
        for server in servers {
            client::run_sessions(server.addr, c, WARM_UP);
            let result = client::run_sessions(server.addr, c, duration);
            report.add_sessions(&format!("C={c}"), &server.name, SessionFigures::of(&result));
        }
    }
}

/// `idle` silent clients held by each server in turn.
fn measure_idle(servers: &[Server], idle: usize, report: &mut Report) {
    for server in servers {
        report.add_idle(
            &format!("idle {idle}"),
            &server.name,
            idle_hold(server, idle),
        );
    }
}

/// Holds `count` idle clients on `server`: its memory and threads before
/// and while, and fresh sessions meanwhile.
fn idle_hold(server: &Server, count: usize) -> IdleFigures {
    let (rss_before_kib, threads_before) = server.memory_and_threads();
    let (held, errors) = client::hold_idle(server.addr, count);
    let (rss_held_kib, threads_held) = server.memory_and_threads();
    let fresh = client::sequential_sessions(server.addr, FRESH_SESSIONS_WHILE_IDLE);
    let established = held.len();
    drop(held);
    IdleFigures {
        wanted: count,
        established,
        errors,
        rss_before_kib,
        rss_held_kib,
        threads_before,
        threads_held,
        fresh_sessions: fresh.sessions,
        fresh_errors: fresh.error_count(),
        fresh_latency: Latency::of(&fresh),
    }
}

fn write_json(report: &Report, settings: &Settings, path: &Path) {
    let json = serde_json::to_string_pretty(&report.to_json(settings)).expect("json");
    fs::write(path, json).expect("write json");
    println!("\nJSON: {}", path.display());
}

/// Load on a server started by hand (`PROMPT_BENCH_TARGET=ADDR`), for
/// profiling it with `perf` or `strace -c` while it runs: `PROMPT_BENCH_C`
/// clients (default 16) for `PROMPT_BENCH_SECS`.
fn drive_external(target: &str) {
    let addr: SocketAddr = target.parse().expect("PROMPT_BENCH_TARGET is ADDR:PORT");
    let concurrency = env_number("PROMPT_BENCH_C", 16);
    let duration = Duration::from_secs(env_number("PROMPT_BENCH_SECS", 3) as u64);
    let result = client::run_sessions(addr, concurrency, duration);
    let h = &result.latency_us;
    println!(
        "C={concurrency}: {:.0} sessions/s, p50 {} us, p99 {} us, errors {:?}",
        result.sessions_per_sec(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        result.errors
    );
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}
