//! The benchmark's figures as typed structs, and the two things made from
//! them: the table on stdout (each figure per server and as a ratio to the
//! yardstick) and the JSON document, serialised once at the end.

use std::collections::BTreeMap;
use std::fs;
use std::thread;

use serde_json::{Value, json};

use crate::client::LoadResult;

/// What the run was asked to do.
pub struct Settings {
    /// Seconds per session workload.
    pub secs: u64,
    /// Idle clients held (after the descriptor limit is taken into account).
    pub idle: usize,
    /// The `--thread-cache` of the cached mode.
    pub thread_cache: usize,
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

/// What clients doing sessions back to back got from one server.
pub struct SessionFigures {
    pub sessions: u64,
    pub sessions_per_sec: f64,
    /// Failed sessions by kind.
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub latency: Latency,
}

impl SessionFigures {
    pub fn of(result: &LoadResult) -> Self {
        SessionFigures {
            sessions: result.sessions,
            sessions_per_sec: result.sessions_per_sec(),
            errors: result.errors.clone(),
            errors_total: result.error_count(),
            latency: Latency::of(result),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "sessions": self.sessions,
            "sessions_per_sec": self.sessions_per_sec,
            "errors": self.errors,
            "errors_total": self.errors_total,
            "latency": self.latency.to_json(),
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

/// A table row: its label and how to read its figure.
type Metric<F> = (&'static str, fn(&F) -> f64);

const SESSION_METRICS: [Metric<SessionFigures>; 5] = [
    ("sessions/s", |f| f.sessions_per_sec),
    ("p50 us", |f| f.latency.p50_us as f64),
    ("p99 us", |f| f.latency.p99_us as f64),
    ("max us", |f| f.latency.max_us as f64),
    ("errors", |f| f.errors_total as f64),
];

const IDLE_METRICS: [Metric<IdleFigures>; 9] = [
    ("established", |f| f.established as f64),
    ("RSS before KiB", |f| f.rss_before_kib as f64),
    ("RSS held KiB", |f| f.rss_held_kib as f64),
    ("KiB per idle", IdleFigures::rss_per_idle_kib),
    ("threads before", |f| f.threads_before as f64),
    ("threads held", |f| f.threads_held as f64),
    ("fresh p50 us", |f| f.fresh_latency.p50_us as f64),
    ("fresh p99 us", |f| f.fresh_latency.p99_us as f64),
    ("fresh errors", |f| f.fresh_errors as f64),
];

/// One workload's figures, by server name.
struct Workload<F> {
    name: String,
    by_server: BTreeMap<String, F>,
}

/// Figures by workload (in the order measured), then by server.
pub struct Report {
    /// Server names in table order; the last is the yardstick.
    servers: Vec<String>,
    sessions: Vec<Workload<SessionFigures>>,
    idle: Vec<Workload<IdleFigures>>,
}

impl Report {
    /// A report on `servers`, the yardstick last.
    pub fn new(servers: Vec<String>) -> Self {
        assert!(servers.len() >= 2, "servers and a yardstick");
        Report {
            servers,
            sessions: Vec::new(),
            idle: Vec::new(),
        }
    }

    pub fn add_sessions(&mut self, workload: &str, server: &str, figures: SessionFigures) {
        add(&mut self.sessions, workload, server, figures);
    }

    pub fn add_idle(&mut self, workload: &str, server: &str, figures: IdleFigures) {
        add(&mut self.idle, workload, server, figures);
    }

    fn yardstick(&self) -> &str {
        self.servers.last().expect("servers")
    }

    /// The table: a row per workload and metric, a column per server, then
    /// a column per measured server as a ratio to the yardstick.
    pub fn print(&self) {
        let yardstick = self.yardstick();
        let measured = &self.servers[..self.servers.len() - 1];
        print!("{:<12} {:<18}", "workload", "metric");
        for name in &self.servers {
            print!(" {name:>14}");
        }
        for name in measured {
            print!(" {:>14}", format!("{name}/{yardstick}"));
        }
        println!();
        for workload in &self.sessions {
            for metric in &SESSION_METRICS {
                self.print_row(workload, metric);
            }
        }
        for workload in &self.idle {
            for metric in &IDLE_METRICS {
                self.print_row(workload, metric);
            }
        }
    }

    fn print_row<F>(&self, workload: &Workload<F>, &(label, read): &Metric<F>) {
        let value = |name: &str| workload.by_server.get(name).map(read);
        print!("{:<12} {label:<18}", workload.name);
        for name in &self.servers {
            match value(name) {
                Some(figure) => print!(" {figure:>14.1}"),
                None => print!(" {:>14}", "-"),
            }
        }
        let base = value(self.yardstick());
        for name in &self.servers[..self.servers.len() - 1] {
            match (value(name), base) {
                (Some(figure), Some(base)) if base != 0.0 => print!(" {:>13.2}x", figure / base),
                _ => print!(" {:>14}", "-"),
            }
        }
        println!();
    }

    /// The whole report as one JSON document.
    pub fn to_json(&self, settings: &Settings) -> Value {
        json!({
            "machine": machine(),
            "yardstick": self.yardstick(),
            "settings": {
                "secs": settings.secs,
                "idle": settings.idle,
                "thread_cache": settings.thread_cache,
            },
            "sessions": table(&self.sessions, SessionFigures::to_json),
            "idle": table(&self.idle, IdleFigures::to_json),
        })
    }
}

fn add<F>(rows: &mut Vec<Workload<F>>, workload: &str, server: &str, figures: F) {
    let at = match rows.iter().position(|row| row.name == workload) {
        Some(at) => at,
        None => {
            rows.push(Workload {
                name: workload.to_string(),
                by_server: BTreeMap::new(),
            });
            rows.len() - 1
        }
    };
    rows[at].by_server.insert(server.to_string(), figures);
}

/// `{workload: {server: figures}}`, workloads in the order measured.
fn table<F>(rows: &[Workload<F>], to_json: fn(&F) -> Value) -> Value {
    let table: serde_json::Map<String, Value> = rows
        .iter()
        .map(|row| {
            let by_server: serde_json::Map<String, Value> = row
                .by_server
                .iter()
                .map(|(server, figures)| (server.clone(), to_json(figures)))
                .collect();
            (row.name.clone(), Value::Object(by_server))
        })
        .collect();
    Value::Object(table)
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
