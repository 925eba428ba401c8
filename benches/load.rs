//! Load benchmark: the real `prompt-server` binary (release build) in its
//! modes against two yardsticks speaking the same protocol, a tokio server
//! and the naive std one, driven by the same load generator in the same run.
//!
//! Every figure is reported for each server and as a ratio to the tokio
//! yardstick, because these machines are shared and noisy: absolute numbers
//! drift between runs, ratios from one run hold. Workloads run in rounds
//! that take the servers in turn, so that drift hits all of them alike. Beside sessions/s
//! and latency: the server's CPU per session (from /proc/PID/stat), its
//! system calls per session (from `strace -c`, when installed) and what
//! idle clients cost it. Every server's stderr is a pipe the benchmark
//! drains, as journald would. The `tls` mode serves TLS (a certificate made
//! with `openssl`, left out without it): its sessions include the handshake
//! (the load generator's too, on the same cores); its idle clients are not
//! measured.
//!
//! Settings (environment): `PROMPT_BENCH_SECS` (seconds per session
//! workload, default 3), `PROMPT_BENCH_ROUNDS` (the rounds each workload is
//! split into, taking the servers in turn, default 3), `PROMPT_BENCH_IDLE`
//! (idle clients held, default 10000), `PROMPT_BENCH_THREAD_CACHE` (the
//! `--thread-cache` of the cached modes, default 256).
//!
//! Run with `cargo bench --bench load`; the tables go to stdout and the same
//! figures as JSON to `target/bench/load.json`.

#[path = "../tests/common/child.rs"]
mod child;
#[path = "support/client.rs"]
mod client;
#[path = "support/lines.rs"]
mod lines;
#[path = "support/naive.rs"]
mod naive;
#[path = "support/report.rs"]
mod report;
#[path = "support/server.rs"]
mod server;
#[path = "support/strace.rs"]
mod strace;
#[path = "../tests/common/tls.rs"]
mod tls;
#[path = "support/yardstick.rs"]
mod yardstick;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use client::{LoadResult, Target};
use report::{IdleFigures, Latency, Report, SessionFigures, Settings, SyscallFigures};
use rustls::ClientConfig;
use server::Server;
use tls::{Identity, Pki};

const CONCURRENCY: [usize; 3] = [1, 16, 128];
const FRESH_SESSIONS_WHILE_IDLE: usize = 200;
/// Warm-up before a server's first round of each session workload (and
/// before strace's), so that page faults and caches are not measured.
const WARM_UP: Duration = Duration::from_millis(200);
/// The workload strace counts system calls over: short, as a traced server
/// is slow, and concurrent, so that contention shows.
const SYSCALL_CONCURRENCY: usize = 16;
const SYSCALL_WORKLOAD: Duration = Duration::from_secs(2);

/// The yardstick every figure is shown as a ratio to.
const TOKIO: &str = "tokio";
/// The mode that serves TLS.
const TLS: &str = "tls";
/// The yardstick whose CPU per session the default mode aims at.
const NAIVE_STD: &str = "naive-std";
/// The yardsticks: this executable re-executed in the role of that name.
const YARDSTICKS: [(&str, fn()); 2] = [(TOKIO, yardstick::serve), (NAIVE_STD, naive::serve)];

fn main() {
    if let Ok(role) = std::env::var(server::ROLE_VAR) {
        let (_, serve) = YARDSTICKS
            .iter()
            .find(|(name, _)| *name == role)
            .unwrap_or_else(|| panic!("no yardstick {role:?}"));
        serve();
        return;
    }
    if let Ok(target) = std::env::var("PROMPT_BENCH_TARGET") {
        drive_external(&target);
        return;
    }
    // cargo bench passes --bench; nothing else is expected.
    let settings = settings_from_env();
    fs::create_dir_all(&settings.out_dir).expect("create target/bench");
    let tls = tls_files(&settings.out_dir).map_err(|why| println!("tls mode left out: {why}"));
    let servers = start_servers(&settings, tls.ok());

    let mut report = Report::new(
        servers
            .iter()
            .map(|s| (s.name.clone(), s.args.clone()))
            .collect(),
        TOKIO,
        NAIVE_STD,
    );
    measure_sessions(&servers, &settings, &mut report);
    measure_syscalls(&servers, &mut report);
    measure_idle(&servers, settings.idle, &mut report);

    report.print();
    write_json(&report, &settings, &settings.out_dir.join("load.json"));
    println!("machine: {}", report::machine());
}

/// The settings from the environment, with the idle count capped by the
/// descriptor limit this process can raise itself to.
fn settings_from_env() -> Settings {
    let fd_limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let idle = env_number("PROMPT_BENCH_IDLE", 10_000);
    Settings {
        secs: env_number("PROMPT_BENCH_SECS", 3) as u64,
        rounds: env_number("PROMPT_BENCH_ROUNDS", 3).max(1),
        idle: idle.min(fd_limit.saturating_sub(256) as usize),
        thread_cache: env_number("PROMPT_BENCH_THREAD_CACHE", 256),
        out_dir: target_dir().join("bench"),
    }
}

/// The project's server modes, one entry each: its name in the report and
/// its flags beside `--bind 127.0.0.1 --port 0 --max-connections N` (N
/// room for every idle client). A file a mode writes goes in
/// `settings.out_dir`.
fn project_modes(settings: &Settings, tls: Option<&Identity>) -> Vec<(&'static str, Vec<String>)> {
    let cache = settings.thread_cache.to_string();
    let mode = |name, args: &[&str]| (name, args.iter().map(|a| a.to_string()).collect());
    let log_file = target_dir().join("bench").join("log-file.log");
    let _ = fs::remove_file(&log_file);
    let log_file = log_file.to_string_lossy().into_owned();
    let mut modes = vec![
        mode("threads", &[]),
        mode("thread-cache", &["--thread-cache", &cache]),
        // The thread cache with its log in a file, synced after each batch
        // of replies (group commit): what durable replies cost.
        mode(
            "log-file",
            &["--thread-cache", &cache, "--log-file", &log_file],
        ),
        // The thread cache with both operator features on: the metrics
        // endpoint idle, and a rate limit every client (all from
        // 127.0.0.1, one network) stays under, so that its cost is the
        // bucket check on every connection.
        mode(
            "watched",
            &[
                "--thread-cache",
                &cache,
                "--metrics-addr",
                "127.0.0.1:0",
                "--max-rate-per-ip",
                "1000000/s",
            ],
        ),
    ];
    // The thread cache over TLS: what the handshake and encryption cost.
    if let Some(identity) = tls {
        let (cert, key) = (
            identity.cert.to_string_lossy(),
            identity.key.to_string_lossy(),
        );
        let args = [
            "--thread-cache",
            &cache,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ];
        modes.push(mode(TLS, &args));
    }
    modes
}

/// The `tls` mode's certificate, made with openssl in `out_dir/tls`, and a
/// client configuration that trusts its CA; or why there is none.
fn tls_files(out_dir: &Path) -> Result<(Identity, Arc<ClientConfig>), String> {
    let openssl = Command::new("openssl").arg("version").output();
    if !openssl.is_ok_and(|output| output.status.success()) {
        return Err("openssl is not installed (apt-get install openssl)".to_string());
    }
    let dir = out_dir.join("tls");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let pki = Pki::new(&dir);
    Ok((pki.server("server"), tls::client_config(&pki.ca, None)))
}

/// The project's modes, then the yardsticks.
fn start_servers(settings: &Settings, tls: Option<(Identity, Arc<ClientConfig>)>) -> Vec<Server> {
    let max_connections = (settings.idle + 1024).to_string();
    let (identity, client) = tls.unzip();
    let mut servers: Vec<Server> = project_modes(settings, identity.as_ref())
        .into_iter()
        .map(|(name, args)| {
            let args: Vec<String> = ["--max-connections".to_string(), max_connections.clone()]
                .into_iter()
                .chain(args)
                .collect();
            let mut server = Server::start_project(name, &args);
            server.tls = client.clone().filter(|_| name == TLS);
            server
        })
        .collect();
    servers.extend(
        YARDSTICKS
            .iter()
            .map(|(name, _)| Server::start_yardstick(name)),
    );
    servers
}

/// Sessions back to back at each concurrency, in rounds that take the
/// servers in turn, so that drift in the machine (other builds, other
/// tenants) hits them alike; with the CPU time each server used over its
/// rounds.
fn measure_sessions(servers: &[Server], settings: &Settings, report: &mut Report) {
    let round_time = Duration::from_secs_f64(settings.secs as f64 / settings.rounds as f64);
    for c in CONCURRENCY {
        let mut totals: Vec<(LoadResult, Duration)> = servers
            .iter()
            .map(|_| (LoadResult::new(), Duration::ZERO))
            .collect();
        for round in 0..settings.rounds {
            for (server, (result, cpu)) in servers.iter().zip(&mut totals) {
                if round == 0 {
                    client::run_sessions(&server.target(), c, WARM_UP);
                }
                let cpu_before = server.cpu_time();
                result.extend(client::run_sessions(&server.target(), c, round_time));
                *cpu += server.cpu_time().saturating_sub(cpu_before);
            }
        }
        for (server, (result, cpu)) in servers.iter().zip(&totals) {
            let figures = SessionFigures::of(result, *cpu);
            report.add_sessions(&format!("C={c}"), &server.name, figures);
        }
    }
}

/// A short workload per server with strace attached, when strace can run.
fn measure_syscalls(servers: &[Server], report: &mut Report) {
    if let Some(reason) = strace::unavailable() {
        report.leave_out_syscalls(&reason);
        return;
    }
    let workload = format!(
        "strace -f -c, C={SYSCALL_CONCURRENCY} for {}s",
        SYSCALL_WORKLOAD.as_secs()
    );
    for server in servers {
        client::run_sessions(&server.target(), SYSCALL_CONCURRENCY, WARM_UP);
        let counted = strace::count_during(server.pid(), || {
            client::run_sessions(&server.target(), SYSCALL_CONCURRENCY, SYSCALL_WORKLOAD)
        })
        .map(|(counts, result)| SyscallFigures {
            sessions: result.sessions,
            counts,
        });
        report.add_syscalls(&workload, &server.name, counted);
    }
}

/// `idle` silent clients held by each plain-TCP server in turn.
fn measure_idle(servers: &[Server], idle: usize, report: &mut Report) {
    for server in servers.iter().filter(|server| server.tls.is_none()) {
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
    let fresh = client::sequential_sessions(&server.target(), FRESH_SESSIONS_WHILE_IDLE);
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
    let result = client::run_sessions(&Target { addr, tls: None }, concurrency, duration);
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
