//! The benchmark's figures as typed structs, per server, and the two things
//! made from them: tables on stdout and the JSON document, serialised once
//! at the end.
//!
//! One table per figure, a row per server (so any number of servers fits),
//! each figure beside its ratio to a yardstick of the same run: the tokio
//! server for every figure, and also the naive std server for CPU and
//! system calls per session, the targets of the project's default mode.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use crate::client::LoadResult;
use crate::strace::SyscallCounts;

/// What the run was asked to do.
pub struct Settings {
    /// Seconds per session workload.
    pub secs: u64,
    /// Rounds each session workload is split into, the servers in turn.
    pub rounds: usize,
    /// Idle clients held (after the descriptor limit is taken into account).
    pub idle: usize,
    /// The `--thread-cache` of the cached modes.
    pub thread_cache: usize,
    /// Where the JSON goes, and any file a server is told to write.
    pub out_dir: PathBuf,
}

/// Session latency, connect to close, in microseconds.
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(result: &LoadResult) -> Self {
        let h = &result.latency_us;
        Latency {
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }

    fn to_json(&self) -> Value {
        json!({"p50_us": self.p50_us, "p99_us": self.p99_us, "max_us": self.max_us})
    }
}

/// What clients doing sessions back to back got from one server, and what
/// they cost it.
pub struct SessionFigures {
    pub sessions: u64,
    pub sessions_per_sec: f64,
    /// Failed sessions by kind.
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub latency: Latency,
    /// The server's CPU time (utime + stime, all threads) over the workload.
    pub server_cpu_us: u64,
}

impl SessionFigures {
    pub fn of(result: &LoadResult, server_cpu: Duration) -> Self {
        SessionFigures {
            sessions: result.sessions,
            sessions_per_sec: result.sessions_per_sec(),
            errors: result.errors.clone(),
            errors_total: result.error_count(),
            latency: Latency::of(result),
            server_cpu_us: server_cpu.as_micros() as u64,
        }
    }

    fn cpu_us_per_session(&self) -> Option<f64> {
        (self.sessions > 0).then(|| self.server_cpu_us as f64 / self.sessions as f64)
    }

    fn to_json(&self) -> Value {
        json!({
            "sessions": self.sessions,
            "sessions_per_sec": self.sessions_per_sec,
            "errors": self.errors,
            "errors_total": self.errors_total,
            "latency": self.latency.to_json(),
            "server_cpu_us": self.server_cpu_us,
            "cpu_us_per_session": self.cpu_us_per_session(),
        })
    }
}

/// strace's counts over a workload of `sessions` sessions.
pub struct SyscallFigures {
    pub sessions: u64,
    pub counts: SyscallCounts,
}

impl SyscallFigures {
    fn per_session(&self, calls: u64) -> Option<f64> {
        (self.sessions > 0).then(|| calls as f64 / self.sessions as f64)
    }

    fn to_json(&self) -> Value {
        let total = &self.counts.total;
        let futex = self.counts.futex_calls();
        let by_call: Vec<Value> = self
            .counts
            .by_call
            .iter()
            .map(|row| {
                json!({
                    "name": row.name,
                    "calls": row.calls,
                    "errors": row.errors,
                    "calls_per_session": self.per_session(row.calls),
                })
            })
            .collect();
        json!({
            "sessions": self.sessions,
            "calls": total.calls,
            "errors": total.errors,
            "futex_calls": futex,
            "calls_per_session": self.per_session(total.calls),
            "futex_per_session": self.per_session(futex),
            "by_call": by_call,
        })
    }
}

/// What holding many idle clients cost one server, and how fresh sessions
/// fared meanwhile.
pub struct IdleFigures {
    pub wanted: usize,
    pub established: usize,
    /// Clients that could not be held, by kind.
    pub errors: BTreeMap<String, u64>,
    pub rss_before_kib: u64,
    pub rss_held_kib: u64,
    pub threads_before: u64,
    pub threads_held: u64,
    pub fresh_sessions: u64,
    pub fresh_errors: u64,
    pub fresh_latency: Latency,
}

impl IdleFigures {
    fn rss_per_idle_kib(&self) -> f64 {
        (self.rss_held_kib.saturating_sub(self.rss_before_kib)) as f64
            / self.established.max(1) as f64
    }

    fn to_json(&self) -> Value {
        json!({
            "wanted": self.wanted,
            "established": self.established,
            "errors": self.errors,
            "rss_before_kib": self.rss_before_kib,
            "rss_held_kib": self.rss_held_kib,
            "rss_per_idle_kib": self.rss_per_idle_kib(),
            "threads_before": self.threads_before,
            "threads_held": self.threads_held,
            "fresh_sessions": self.fresh_sessions,
            "fresh_errors": self.fresh_errors,
            "fresh_latency": self.fresh_latency.to_json(),
        })
    }
}

/// Which yardsticks a figure is shown as a ratio to.
#[derive(Clone, Copy)]
enum Ratios {
    None,
    /// The ratio base (tokio).
    Base,
    /// The ratio base and the CPU target (naive std).
    BaseAndTarget,
}

/// A figure: its label, how to read it, its decimals, its ratios.
struct Figure<F> {
    label: &'static str,
    read: fn(&F) -> Option<f64>,
    decimals: usize,
    ratios: Ratios,
}

const fn figure<F>(
    label: &'static str,
    read: fn(&F) -> Option<f64>,
    decimals: usize,
    ratios: Ratios,
) -> Figure<F> {
    Figure {
        label,
        read,
        decimals,
        ratios,
    }
}

/// A table each, its columns the session workloads.
const SESSION_FIGURES: [Figure<SessionFigures>; 6] = [
    figure("sessions/s", |f| Some(f.sessions_per_sec), 0, Ratios::Base),
    figure(
        "server CPU us per session (utime + stime of all threads, /proc/PID/stat)",
        SessionFigures::cpu_us_per_session,
        1,
        Ratios::BaseAndTarget,
    ),
    figure(
        "session latency p50 us",
        |f| Some(f.latency.p50_us as f64),
        0,
        Ratios::Base,
    ),
    figure(
        "session latency p99 us",
        |f| Some(f.latency.p99_us as f64),
        0,
        Ratios::Base,
    ),
    figure(
        "session latency max us",
        |f| Some(f.latency.max_us as f64),
        0,
        Ratios::Base,
    ),
    figure(
        "failed sessions",
        |f| Some(f.errors_total as f64),
        0,
        Ratios::None,
    ),
];

/// The columns of the system call table.
const SYSCALL_FIGURES: [Figure<SyscallFigures>; 4] = [
    figure(
        "calls",
        |f| f.per_session(f.counts.total.calls),
        1,
        Ratios::BaseAndTarget,
    ),
    figure(
        "futex",
        |f| f.per_session(f.counts.futex_calls()),
        1,
        Ratios::BaseAndTarget,
    ),
    figure(
        "failed",
        |f| f.per_session(f.counts.total.errors),
        1,
        Ratios::None,
    ),
    figure("sessions", |f| Some(f.sessions as f64), 0, Ratios::None),
];

/// Calls in the per-call table: those some server makes at least this
/// often per session (rarer ones are the servers' own background work).
const LEAST_CALLS_PER_SESSION: f64 = 0.05;

/// The columns of the two idle tables.
const IDLE_MEMORY_FIGURES: [Figure<IdleFigures>; 6] = [
    figure(
        "established",
        |f| Some(f.established as f64),
        0,
        Ratios::None,
    ),
    figure(
        "RSS before KiB",
        |f| Some(f.rss_before_kib as f64),
        0,
        Ratios::None,
    ),
    figure(
        "RSS held KiB",
        |f| Some(f.rss_held_kib as f64),
        0,
        Ratios::Base,
    ),
    figure(
        "KiB per idle",
        |f| Some(f.rss_per_idle_kib()),
        1,
        Ratios::Base,
    ),
    figure(
        "threads before",
        |f| Some(f.threads_before as f64),
        0,
        Ratios::None,
    ),
    figure(
        "threads held",
        |f| Some(f.threads_held as f64),
        0,
        Ratios::None,
    ),
];
const IDLE_FRESH_FIGURES: [Figure<IdleFigures>; 3] = [
    figure(
        "p50 us",
        |f| Some(f.fresh_latency.p50_us as f64),
        0,
        Ratios::Base,
    ),
    figure(
        "p99 us",
        |f| Some(f.fresh_latency.p99_us as f64),
        0,
        Ratios::Base,
    ),
    figure("errors", |f| Some(f.fresh_errors as f64), 0, Ratios::None),
];

/// Everything measured on one server.
struct ServerFigures {
    name: String,
    args: Vec<String>,
    /// By session workload.
    sessions: BTreeMap<String, SessionFigures>,
    /// strace's counts, or why there are none.
    syscalls: Option<Result<SyscallFigures, String>>,
    idle: Option<IdleFigures>,
}

impl ServerFigures {
    fn syscall_figures(&self) -> Option<&SyscallFigures> {
        self.syscalls.as_ref().and_then(|r| r.as_ref().ok())
    }
}

/// How a column reads its figure for a server.
type Reader<'r> = Box<dyn Fn(&ServerFigures) -> Option<f64> + 'r>;

/// A column of a printed table: its heading, how to read its figure for a
/// server, and the yardsticks it is shown as a ratio to.
struct Column<'r> {
    heading: String,
    read: Reader<'r>,
    decimals: usize,
    ratios: Vec<&'r str>,
}

/// Figures by server (in table order), then by workload.
pub struct Report {
    servers: Vec<ServerFigures>,
    /// The yardstick every figure is shown as a ratio to.
    ratio_base: String,
    /// The yardstick CPU and system calls per session are also shown as a
    /// ratio to.
    cpu_target: String,
    /// Session workloads in the order measured.
    workloads: Vec<String>,
    /// The workload strace counted, or why system calls were left out.
    syscall_workload: Result<String, String>,
    idle_workload: String,
}

impl Report {
    /// A report on `servers` (name and arguments), in this order; two of
    /// them are the yardsticks.
    pub fn new(servers: Vec<(String, Vec<String>)>, ratio_base: &str, cpu_target: &str) -> Self {
        for yardstick in [ratio_base, cpu_target] {
            assert!(
                servers.iter().any(|(name, _)| name == yardstick),
                "no server {yardstick}"
            );
        }
        Report {
            servers: servers
                .into_iter()
                .map(|(name, args)| ServerFigures {
                    name,
                    args,
                    sessions: BTreeMap::new(),
                    syscalls: None,
                    idle: None,
                })
                .collect(),
            ratio_base: ratio_base.to_string(),
            cpu_target: cpu_target.to_string(),
            workloads: Vec::new(),
            syscall_workload: Err("not measured".to_string()),
            idle_workload: String::new(),
        }
    }

    pub fn add_sessions(&mut self, workload: &str, server: &str, figures: SessionFigures) {
        if !self.workloads.iter().any(|w| w == workload) {
            self.workloads.push(workload.to_string());
        }
        self.server_mut(server)
            .sessions
            .insert(workload.to_string(), figures);
    }

    pub fn add_syscalls(
        &mut self,
        workload: &str,
        server: &str,
        figures: Result<SyscallFigures, String>,
    ) {
        self.syscall_workload = Ok(workload.to_string());
        self.server_mut(server).syscalls = Some(figures);
    }

    /// System calls are not counted in this run, for `reason`.
    pub fn leave_out_syscalls(&mut self, reason: &str) {
        self.syscall_workload = Err(reason.to_string());
    }

    pub fn add_idle(&mut self, workload: &str, server: &str, figures: IdleFigures) {
        self.idle_workload = workload.to_string();
        self.server_mut(server).idle = Some(figures);
    }

    fn server_mut(&mut self, name: &str) -> &mut ServerFigures {
        self.servers
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name} in the report"))
    }

    fn server(&self, name: &str) -> Option<&ServerFigures> {
        self.servers.iter().find(|s| s.name == name)
    }

    fn yardsticks(&self, ratios: Ratios) -> Vec<&str> {
        match ratios {
            Ratios::None => vec![],
            Ratios::Base => vec![&self.ratio_base],
            Ratios::BaseAndTarget => vec![&self.ratio_base, &self.cpu_target],
        }
    }

    /// Columns for `figures`, each read from what `part` picks of a server.
    fn columns<'r, F: 'r>(
        &'r self,
        figures: &'r [Figure<F>],
        part: fn(&ServerFigures) -> Option<&F>,
    ) -> Vec<Column<'r>> {
        figures
            .iter()
            .map(|figure| Column {
                heading: figure.label.to_string(),
                read: Box::new(move |server| part(server).and_then(figure.read)),
                decimals: figure.decimals,
                ratios: self.yardsticks(figure.ratios),
            })
            .collect()
    }

    /// The tables, one per figure.
    pub fn print(&self) {
        for figure in &SESSION_FIGURES {
            let columns: Vec<Column> = self
                .workloads
                .iter()
                .map(|workload| Column {
                    heading: workload.clone(),
                    read: Box::new(move |server| {
                        server.sessions.get(workload).and_then(figure.read)
                    }),
                    decimals: figure.decimals,
                    ratios: self.yardsticks(figure.ratios),
                })
                .collect();
            self.print_table(figure.label, &columns);
        }
        self.print_syscalls();
        let idle = &self.idle_workload;
        self.print_table(
            &format!("{idle} clients held: memory and threads"),
            &self.columns(&IDLE_MEMORY_FIGURES, |s| s.idle.as_ref()),
        );
        self.print_table(
            &format!("fresh sessions while {idle} clients are held"),
            &self.columns(&IDLE_FRESH_FIGURES, |s| s.idle.as_ref()),
        );
    }

    fn print_syscalls(&self) {
        let workload = match &self.syscall_workload {
            Ok(workload) => workload,
            Err(reason) => {
                println!("\nsystem calls per session: left out: {reason}");
                return;
            }
        };
        let counted = ServerFigures::syscall_figures;
        self.print_table(
            &format!("system calls per session ({workload})"),
            &self.columns(&SYSCALL_FIGURES, counted),
        );
        for server in &self.servers {
            if let Some(Err(why)) = &server.syscalls {
                println!("{}: no counts: {why}", server.name);
            }
        }
        let mut calls: Vec<(String, f64)> = Vec::new();
        for figures in self.servers.iter().filter_map(counted) {
            for row in &figures.counts.by_call {
                let per_session = figures.per_session(row.calls).unwrap_or(0.0);
                match calls.iter_mut().find(|(name, _)| *name == row.name) {
                    Some((_, most)) => *most = most.max(per_session),
                    None => calls.push((row.name.clone(), per_session)),
                }
            }
        }
        calls.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut headings = vec!["call".to_string()];
        headings.extend(self.servers.iter().map(|s| s.name.clone()));
        let rows: Vec<Vec<String>> = calls
            .iter()
            .take_while(|(_, most)| *most >= LEAST_CALLS_PER_SESSION)
            .map(|(call, _)| {
                let mut row = vec![call.clone()];
                row.extend(self.servers.iter().map(|server| match counted(server) {
                    Some(figures) => {
                        let calls = figures.counts.by_call.iter().find(|r| r.name == *call);
                        let per_session = figures.per_session(calls.map_or(0, |r| r.calls));
                        per_session.map_or("-".to_string(), |n| format!("{n:.2}"))
                    }
                    None => "-".to_string(),
                }));
                row
            })
            .collect();
        print_text_table("system calls per session by call", &headings, &rows);
    }

    /// A row per server: each column's figure, then its ratio to each of
    /// the column's yardsticks.
    fn print_table(&self, title: &str, columns: &[Column]) {
        let mut headings = vec!["server".to_string()];
        for column in columns {
            headings.push(column.heading.clone());
            headings.extend(column.ratios.iter().map(|base| format!("/{base}")));
        }
        let rows: Vec<Vec<String>> = self
            .servers
            .iter()
            .map(|server| {
                let mut row = vec![server.name.clone()];
                for column in columns {
                    let figure = (column.read)(server);
                    row.push(
                        figure.map_or("-".to_string(), |f| format!("{f:.*}", column.decimals)),
                    );
                    for &base in &column.ratios {
                        let base_figure = self.server(base).and_then(|b| (column.read)(b));
                        row.push(match (figure, base_figure) {
                            (Some(f), Some(b)) if b != 0.0 && server.name != base => {
                                format!("{:.2}x", f / b)
                            }
                            _ => "-".to_string(),
                        });
                    }
                }
                row
            })
            .collect();
        print_text_table(title, &headings, &rows);
    }

    /// The whole report as one JSON document.
    pub fn to_json(&self, settings: &Settings) -> Value {
        let servers: serde_json::Map<String, Value> = self
            .servers
            .iter()
            .map(|server| {
                let sessions: serde_json::Map<String, Value> = self
                    .workloads
                    .iter()
                    .filter_map(|w| server.sessions.get(w).map(|f| (w.clone(), f.to_json())))
                    .collect();
                let syscalls = match &server.syscalls {
                    Some(Ok(figures)) => figures.to_json(),
                    Some(Err(why)) => json!({"error": why}),
                    None => Value::Null,
                };
                let figures = json!({
                    "args": server.args,
                    "sessions": sessions,
                    "syscalls": syscalls,
                    "idle": server.idle.as_ref().map(IdleFigures::to_json),
                });
                (server.name.clone(), figures)
            })
            .collect();
        let (syscall_workload, syscalls_left_out) = match &self.syscall_workload {
            Ok(workload) => (Some(workload), None),
            Err(reason) => (None, Some(reason)),
        };
        json!({
            "machine": machine(),
            "ratio_base": self.ratio_base,
            "cpu_target": self.cpu_target,
            "settings": {
                "secs": settings.secs,
                "rounds": settings.rounds,
                "idle": settings.idle,
                "thread_cache": settings.thread_cache,
            },
            "session_workloads": self.workloads,
            "syscall_workload": syscall_workload,
            "syscalls_left_out": syscalls_left_out,
            "idle_workload": self.idle_workload,
            "servers": servers,
        })
    }
}

/// `title`, then the cells in columns as wide as their widest cell: the
/// first left-aligned, the others right-aligned.
fn print_text_table(title: &str, headings: &[String], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..headings.len())
        .map(|at| {
            rows.iter()
                .map(|row| row[at].len())
                .chain([headings[at].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let mut text = String::new();
        for (at, cell) in cells.iter().enumerate() {
            if at == 0 {
                text.push_str(&format!("{cell:<width$}", width = widths[0]));
            } else {
                text.push_str(&format!("  {cell:>width$}", width = widths[at]));
            }
        }
        println!("{}", text.trim_end());
    };
    println!("\n{title}");
    line(headings);
    for row in rows {
        line(row);
    }
}

/// Cores, CPU model and kernel of this machine.
pub fn machine() -> String {
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
