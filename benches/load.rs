//! Load benchmark: the real `prompt-server` binary (release build, logging
//! to a file) against a tokio server speaking the same protocol, driven by
//! the same load generator in the same run.
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

#[path = "support/client.rs"]
mod client;
#[path = "support/yardstick.rs"]
mod yardstick;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use client::LoadResult;
use serde_json::{Value, json};

const CONCURRENCY: [usize; 3] = [1, 16, 128];
const FRESH_SESSIONS_WHILE_IDLE: usize = 200;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

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
    let secs = env_number("PROMPT_BENCH_SECS", 3) as u64;
    let idle = env_number("PROMPT_BENCH_IDLE", 10_000);
    let thread_cache = env_number("PROMPT_BENCH_THREAD_CACHE", 256);
    let duration = Duration::from_secs(secs);

    let fd_limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let idle = idle.min(fd_limit.saturating_sub(256) as usize);
    let out_dir = target_dir().join("bench");
    fs::create_dir_all(&out_dir).expect("create target/bench");

    let max_connections = (idle + 1024).to_string();
    let cache = thread_cache.to_string();
    let mut servers = vec![
        Server::start_project(
            "threads",
            &["--max-connections", &max_connections],
            &out_dir,
        ),
        Server::start_project(
            "thread-cache",
            &[
                "--max-connections",
                &max_connections,
                "--thread-cache",
                &cache,
            ],
            &out_dir,
        ),
        Server::start_yardstick("tokio", &out_dir),
    ];

    let mut report = Report::default();
    for c in CONCURRENCY {
        for server in &mut servers {
            // A short warm-up so page faults and caches are not measured.
            client::run_sessions(server.addr, c, Duration::from_millis(200));
            let result = client::run_sessions(server.addr, c, duration);
            report.sessions(&format!("C={c}"), &server.name, &result);
        }
    }
    for server in &mut servers {
        report.idle(
            &format!("idle {idle}"),
            &server.name,
            idle_hold(server, idle),
        );
    }

    report.print(&servers);
    let json = report.json(&servers, secs, idle, thread_cache);
    let json_path = out_dir.join("load.json");
    fs::write(
        &json_path,
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write json");
    println!("\nJSON: {}", json_path.display());
    println!("machine: {}", machine());
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

fn machine() -> String {
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

/// A server process under test, killed (by its PID) when dropped.
struct Server {
    name: String,
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start_project(name: &str, args: &[&str], out_dir: &Path) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_prompt-server"));
        command
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info");
        Server::spawn(name, command, out_dir)
    }

    fn start_yardstick(name: &str, out_dir: &Path) -> Server {
        let mut command = Command::new(std::env::current_exe().expect("bench executable"));
        command
            .env(yardstick::ROLE_VAR, yardstick::ROLE)
            .env("RUST_LOG", "info");
        Server::spawn(name, command, out_dir)
    }

    /// Starts `command` with stderr to a log file, as an operator would run
    /// it, and waits for its `listening on` line there.
    fn spawn(name: &str, mut command: Command, out_dir: &Path) -> Server {
        let log_path = out_dir.join(format!("{name}.log"));
        let log = File::create(&log_path).expect("create log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start server");
        let started = Instant::now();
        let addr = loop {
            let text = fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(rest) = text.split("listening on ").nth(1) {
                let addr = rest.lines().next().unwrap_or("").trim();
                break addr.parse().expect("address after 'listening on'");
            }
            assert!(
                started.elapsed() < STARTUP_TIMEOUT,
                "{name} did not start: {text}"
            );
            thread::sleep(Duration::from_millis(10));
        };
        Server {
            name: name.to_string(),
            child,
            addr,
        }
    }

    /// (RSS in KiB, thread count) from /proc.
    fn memory_and_threads(&self) -> (u64, u64) {
        let status =
            fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("Threads:"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What holding many idle clients costs a server.
struct IdleResult {
    wanted: usize,
    established: usize,
    errors: BTreeMap<String, u64>,
    rss_before_kib: u64,
    rss_held_kib: u64,
    threads_before: u64,
    threads_held: u64,
    fresh: LoadResult,
}

impl IdleResult {
    fn rss_per_idle_kib(&self) -> f64 {
        (self.rss_held_kib.saturating_sub(self.rss_before_kib)) as f64
            / self.established.max(1) as f64
    }
}

fn idle_hold(server: &Server, count: usize) -> IdleResult {
    let (rss_before_kib, threads_before) = server.memory_and_threads();
    let (held, errors) = client::hold_idle(server.addr, count);
    let (rss_held_kib, threads_held) = server.memory_and_threads();
    let fresh = client::sequential_sessions(server.addr, FRESH_SESSIONS_WHILE_IDLE);
    let established = held.len();
    drop(held);
    IdleResult {
        wanted: count,
        established,
        errors,
        rss_before_kib,
        rss_held_kib,
        threads_before,
        threads_held,
        fresh,
    }
}

/// Figures by workload, then by server.
#[derive(Default)]
struct Report {
    sessions: Vec<(String, BTreeMap<String, Value>)>,
    idle: Vec<(String, BTreeMap<String, Value>)>,
}

fn latency_json(result: &LoadResult) -> Value {
    let h = &result.latency_us;
    json!({
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "max_us": h.max(),
    })
}

fn entry<'a>(
    rows: &'a mut Vec<(String, BTreeMap<String, Value>)>,
    workload: &str,
) -> &'a mut BTreeMap<String, Value> {
    if !rows.iter().any(|(w, _)| w == workload) {
        rows.push((workload.to_string(), BTreeMap::new()));
    }
    &mut rows
        .iter_mut()
        .find(|(w, _)| w == workload)
        .expect("just added")
        .1
}

impl Report {
    fn sessions(&mut self, workload: &str, server: &str, result: &LoadResult) {
        let mut figures = json!({
            "sessions": result.sessions,
            "sessions_per_sec": result.sessions_per_sec(),
            "errors": result.errors,
            "errors_total": result.error_count(),
        });
        figures["latency"] = latency_json(result);
        entry(&mut self.sessions, workload).insert(server.to_string(), figures);
    }

    fn idle(&mut self, workload: &str, server: &str, result: IdleResult) {
        let figures = json!({
            "wanted": result.wanted,
            "established": result.established,
            "errors": result.errors,
            "rss_before_kib": result.rss_before_kib,
            "rss_held_kib": result.rss_held_kib,
            "rss_per_idle_kib": result.rss_per_idle_kib(),
            "threads_before": result.threads_before,
            "threads_held": result.threads_held,
            "fresh_sessions": result.fresh.sessions,
            "fresh_errors": result.fresh.error_count(),
            "fresh_latency": latency_json(&result.fresh),
        });
        entry(&mut self.idle, workload).insert(server.to_string(), figures);
    }

    fn print(&self, servers: &[Server]) {
        let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        let yardstick = *names.last().expect("servers");
        let measured = &names[..names.len() - 1];
        print!("{:<12} {:<18}", "workload", "metric");
        for name in &names {
            print!(" {name:>14}");
        }
        for name in measured {
            print!(" {:>14}", format!("{name}/{yardstick}"));
        }
        println!();
        let row =
            |workload: &str, metric: &str, figures: &BTreeMap<String, Value>, path: &[&str]| {
                let value = |name: &str| {
                    path.iter()
                        .fold(&figures[name], |v, key| &v[*key])
                        .as_f64()
                        .unwrap_or(f64::NAN)
                };
                print!("{workload:<12} {metric:<18}");
                for name in &names {
                    print!(" {:>14.1}", value(name));
                }
                for name in measured {
                    match value(yardstick) {
                        0.0 => print!(" {:>14}", "-"),
                        base => print!(" {:>13.2}x", value(name) / base),
                    }
                }
                println!();
            };
        for (workload, figures) in &self.sessions {
            row(workload, "sessions/s", figures, &["sessions_per_sec"]);
            row(workload, "p50 us", figures, &["latency", "p50_us"]);
            row(workload, "p99 us", figures, &["latency", "p99_us"]);
            row(workload, "max us", figures, &["latency", "max_us"]);
            row(workload, "errors", figures, &["errors_total"]);
        }
        for (workload, figures) in &self.idle {
            row(workload, "established", figures, &["established"]);
            row(workload, "RSS before KiB", figures, &["rss_before_kib"]);
            row(workload, "RSS held KiB", figures, &["rss_held_kib"]);
            row(workload, "KiB per idle", figures, &["rss_per_idle_kib"]);
            row(workload, "threads before", figures, &["threads_before"]);
            row(workload, "threads held", figures, &["threads_held"]);
            row(
                workload,
                "fresh p50 us",
                figures,
                &["fresh_latency", "p50_us"],
            );
            row(
                workload,
                "fresh p99 us",
                figures,
                &["fresh_latency", "p99_us"],
            );
            row(workload, "fresh errors", figures, &["fresh_errors"]);
        }
    }

    fn json(&self, servers: &[Server], secs: u64, idle: usize, thread_cache: usize) -> Value {
        let yardstick = servers.last().expect("servers").name.clone();
        let table = |rows: &Vec<(String, BTreeMap<String, Value>)>| {
            rows.iter()
                .map(|(workload, figures)| (workload.clone(), json!(figures)))
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "machine": machine(),
            "yardstick": yardstick,
            "settings": {"secs": secs, "idle": idle, "thread_cache": thread_cache},
            "sessions": table(&self.sessions),
            "idle": table(&self.idle),
        })
    }
}
