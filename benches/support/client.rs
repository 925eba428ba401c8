//! The load generator: blocking std clients on their own threads, the same
//! for every server measured; for a TLS server, a rustls client over each
//! (tests/common/tls.rs's, with its handshake).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::ClientConfig;

use crate::tls::tls_session;

const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
const PROMPT: &[u8] = b"Do you want to play a game?\n";

/// What a batch of sessions did.
pub struct LoadResult {
    pub sessions: u64,
    pub elapsed: Duration,
    /// Session latency, connect to close, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Failed sessions by kind.
    pub errors: BTreeMap<String, u64>,
}

impl LoadResult {
    pub fn new() -> Self {
        LoadResult {
            sessions: 0,
            elapsed: Duration::ZERO,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: LoadResult) {
        self.sessions += other.sessions;
        self.latency_us.add(&other.latency_us).expect("same bounds");
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }

    /// Adds `other`, a later run of the same workload: its sessions,
    /// errors, latencies and time.
    pub fn extend(&mut self, other: LoadResult) {
        let elapsed = other.elapsed;
        self.merge(other);
        self.elapsed += elapsed;
    }

    pub fn sessions_per_sec(&self) -> f64 {
        self.sessions as f64 / self.elapsed.as_secs_f64()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn record(&mut self, outcome: Result<Duration, String>) {
        match outcome {
            Ok(latency) => {
                self.sessions += 1;
                let us = (latency.as_micros() as u64).max(1);
                self.latency_us.saturating_record(us);
            }
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }
}

/// Connects with socket timeouts set.
pub fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream =
        TcpStream::connect_timeout(&addr, SOCKET_TIMEOUT).map_err(|e| kind("connect", &e))?;
    stream
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .map_err(|e| kind("setup", &e))?;
    stream
        .set_write_timeout(Some(SOCKET_TIMEOUT))
        .map_err(|e| kind("setup", &e))?;
    Ok(stream)
}

fn kind(step: &str, error: &io::Error) -> String {
    format!("{step}: {:?}", error.kind())
}

/// Reads the prompt and checks it.
pub fn read_prompt(stream: &mut TcpStream) -> Result<(), String> {
    let mut got = [0u8; 64];
    let mut len = 0;
    while !got[..len].contains(&b'\n') {
        match stream.read(&mut got[len..]) {
            Ok(0) => return Err("prompt: closed early".to_string()),
            Ok(n) => len += n,
            Err(e) => return Err(kind("prompt", &e)),
        }
        if len == got.len() {
            break;
        }
    }
    if &got[..len] == PROMPT {
        Ok(())
    } else if got[..len].starts_with(b"server busy") {
        Err("busy".to_string())
    } else {
        Err("prompt: unexpected bytes".to_string())
    }
}

/// Where sessions go: a server's address, and for a TLS server the client
/// configuration that trusts it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<Arc<ClientConfig>>,
}

/// One full session: connect, (the handshake,) read the prompt, reply,
/// read to EOF (after `close_notify`).
pub fn session(target: &Target) -> Result<Duration, String> {
    let started = Instant::now();
    let mut stream = connect(target.addr)?;
    if let Some(config) = &target.tls {
        let session = tls_session(stream, config, b"yes\n").map_err(|e| kind("tls", &e))?;
        return match (session.prompt == PROMPT, session.closed_cleanly()) {
            (false, _) => Err("prompt: unexpected bytes".to_string()),
            (true, false) => Err("close: no close_notify".to_string()),
            (true, true) => Ok(started.elapsed()),
        };
    }
    read_prompt(&mut stream)?;
    stream.write_all(b"yes\n").map_err(|e| kind("reply", &e))?;
    let mut rest = [0u8; 64];
    match stream.read(&mut rest) {
        Ok(0) => Ok(started.elapsed()),
        Ok(_) => Err("close: unexpected bytes".to_string()),
        Err(e) => Err(kind("close", &e)),
    }
}

/// `concurrency` clients doing sessions back to back for `duration`.
pub fn run_sessions(target: &Target, concurrency: usize, duration: Duration) -> LoadResult {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (stop, target) = (Arc::clone(&stop), target.clone());
            thread::spawn(move || {
                let mut result = LoadResult::new();
                while !stop.load(Ordering::Relaxed) {
                    result.record(session(&target));
                }
                result
            })
        })
        .collect();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut total = LoadResult::new();
    for worker in workers {
        total.merge(worker.join().expect("load worker"));
    }
    total.elapsed = started.elapsed();
    total
}

/// `count` sessions one after another.
pub fn sequential_sessions(target: &Target, count: usize) -> LoadResult {
    let started = Instant::now();
    let mut result = LoadResult::new();
    for _ in 0..count {
        result.record(session(target));
    }
    result.elapsed = started.elapsed();
    result
}

/// Opens `count` clients that read the prompt and then stay silent.
pub fn hold_idle(addr: SocketAddr, count: usize) -> (Vec<TcpStream>, BTreeMap<String, u64>) {
    let mut held = Vec::with_capacity(count);
    let mut errors = BTreeMap::new();
    for _ in 0..count {
        match connect(addr).and_then(|mut s| read_prompt(&mut s).map(|()| s)) {
            Ok(stream) => held.push(stream),
            Err(kind) => *errors.entry(kind).or_default() += 1,
        }
    }
    (held, errors)
}
