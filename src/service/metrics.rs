//! `--metrics-addr`: the server's numbers over HTTP (docs/OPERATIONS.md has the
//! table), a `prometheus-client` registry in the text format 0.0.4 that
//! `promtool check metrics` reads. Each scrape gets a thread, at most
//! [`MAX_SCRAPES`] at once; beyond that a newcomer takes the place of the oldest
//! scrape of the address that holds the most (answered if its whole request has
//! come, closed if not). So silent sockets starve no scraper that sends its
//! request as it connects (Prometheus does), from whatever address: any local
//! user can bind all of 127/8, so a cap per address would not hold.

use std::cmp::Reverse;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{self, JoinHandle, ScopedJoinHandle};
use std::time::{Duration, Instant, UNIX_EPOCH};

use prometheus_client::encoding::prometheus_text::{self, CONTENT_TYPE};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry;
use socket2::SockRef;

use crate::helper_thread;
use crate::limits::capacity::open_fds;
use crate::logging::event;
use crate::serve::connection::Timed;
use crate::stats::{AcceptErrorKind, Label, Stats};

/// The whole time a scraper has to send its request and take the response.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(2);
/// A bigger request gets a 431.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
const MAX_SCRAPES: usize = 16;
/// After an `accept` failure that is not the client's, so as not to spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// `USER_HZ`, the unit of times in `/proc`: 100 on every Linux in use.
const PROC_TICKS_PER_SECOND: f64 = 100.0;

type Count = Gauge<u64, AtomicU64>;

/// What the gauges show: the server's state when a scrape is answered.
#[derive(Debug, Clone)]
pub(crate) struct ServerState {
    pub(crate) connections_open: u64,
    pub(crate) threads_serving: u64,
    pub(crate) threads_parked: u64,
    /// `None` without `--max-rate-per-ip`.
    pub(crate) rate_limit_networks: Option<u64>,
    /// The log's own count, which only grows.
    pub(crate) log_lines_dropped: u64,
    /// The log's failed writes and syncs by errno, which only grow.
    pub(crate) log_write_errors: Vec<(&'static str, u64)>,
}

/// Every metric the endpoint serves, in one registry.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    registry: Registry,
    log_lines_dropped: Counter,
    log_write_errors: Family<Label, Counter>,
    connections_open: Count,
    threads: Family<Label, Count>,
    /// Registered only with `--max-rate-per-ip`.
    rate_limit_networks: Option<Count>,
    /// Registered only where `/proc/self/fd` can be read at start-up.
    open_fds: Option<Count>,
}

impl Metrics {
    pub(crate) fn new(stats: &Stats, max_connections: usize, with_rate_limit: bool) -> Self {
        let mut metrics = Metrics {
            rate_limit_networks: with_rate_limit.then(Count::default),
            open_fds: open_fds().map(|_| Count::default()),
            ..Metrics::default()
        };
        let registry = &mut metrics.registry;
        let now = UNIX_EPOCH.elapsed().unwrap_or_default().as_secs_f64();
        let start_time = ConstGauge::new(process_start_time().unwrap_or(now));
        let help = "Start time of the process since the Unix epoch in seconds";
        registry.register("process_start_time_seconds", help, start_time);
        if let Some(gauge) = &metrics.open_fds {
            registry.register("process_open_fds", "Open file descriptors", gauge.clone());
        }
        let r = registry.sub_registry_with_prefix("prompt_server");
        stats.register(r);
        // The registry adds `_total` to a counter's name.
        let help = "Housekeeping log lines dropped because the log queue was full";
        r.register("log_lines_dropped", help, metrics.log_lines_dropped.clone());
        let help = "Failed writes and syncs of the log, by errno";
        r.register("log_write_errors", help, metrics.log_write_errors.clone());
        let help = "Connections open now";
        r.register("connections_open", help, metrics.connections_open.clone());
        let help = "Connection threads alive, serving a client or parked in the thread cache";
        r.register("threads", help, metrics.threads.clone());
        let help = "The effective cap on open connections";
        r.register("max_connections", help, ConstGauge::new(max_connections));
        if let Some(gauge) = &metrics.rate_limit_networks {
            let help = "Client networks the rate limit holds a bucket for \
                        (refilled ones go at the next sweep)";
            r.register("rate_limit_networks", help, gauge.clone());
        }
        metrics
    }

    /// Sets the gauges from `state` and writes every metric's text.
    pub(crate) fn render(&self, state: &ServerState) -> Result<String, fmt::Error> {
        // `fetch_max`: two scrapes at once never set a count back.
        let dropped = self.log_lines_dropped.inner();
        dropped.fetch_max(state.log_lines_dropped, Ordering::Relaxed);
        for &(kind, count) in &state.log_write_errors {
            let errors = self.log_write_errors.get_or_create(&[("kind", kind)]);
            errors.inner().fetch_max(count, Ordering::Relaxed);
        }
        self.connections_open.set(state.connections_open);
        let threads = |state| self.threads.get_or_create(&[("state", state)]);
        threads("serving").set(state.threads_serving);
        threads("parked").set(state.threads_parked);
        let rate_limit = (&self.rate_limit_networks, state.rate_limit_networks);
        if let (Some(gauge), Some(networks)) = rate_limit {
            gauge.set(networks);
        }
        if let (Some(gauge), Some(open_fds)) = (&self.open_fds, open_fds()) {
            gauge.set(open_fds);
        }
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// When this process started, in seconds since the Unix epoch, as Prometheus's
/// process collector has it: `/proc/self/stat`'s field 22 after the boot time.
fn process_start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Field 2, the command name in parentheses, may hold spaces: skip it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after_name.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot = stat.lines().find_map(|line| line.strip_prefix("btime "))?;
    let boot: u64 = boot.trim().parse().ok()?;
    Some(boot as f64 + ticks as f64 / PROC_TICKS_PER_SECOND)
}

/// What a scrape is answered with: the text, or why there is none.
type Render = dyn Fn() -> Result<String, fmt::Error> + Send + Sync;

/// The running endpoint. Dropping it stops it: scrapes still sending their
/// request are cut off, and the drop returns once their threads are gone.
#[derive(Debug)]
pub(crate) struct Endpoint {
    listener: Arc<TcpListener>,
    /// The accept thread.
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Answers scrapes on `listener` with `render()`, and logs where; fails
    /// only if no thread starts.
    pub(crate) fn start(listener: TcpListener, render: Box<Render>) -> io::Result<Self> {
        let listener = Arc::new(listener);
        let accepted = Arc::clone(&listener);
        let thread = helper_thread("metrics").spawn(move || accept_scrapes(&accepted, &render))?;
        if let Ok(addr) = listener.local_addr() {
            log::info!(event = event::METRICS, addr:% = addr; "metrics at http://{addr}/metrics");
        }
        let thread = Some(thread);
        Ok(Endpoint { listener, thread })
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // The blocked `accept`, and every later one, fails with EINVAL.
        let _ = SockRef::from(&*self.listener).shutdown(Shutdown::Read);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A scrape being answered, held by its thread alone: it closes as the thread ends.
struct Scrape {
    stream: TcpStream,
    /// Why its read side was shut down, if it was.
    cut_off: OnceLock<&'static str>,
}

/// A scrape's place among those under way.
struct Place<'scope> {
    source: IpAddr,
    scrape: Weak<Scrape>,
    thread: ScopedJoinHandle<'scope, ()>,
}

impl Place<'_> {
    /// Its thread sees the end of the stream once it has read what had come
    /// (shutting the read side keeps what is queued, and sends nothing).
    fn cut_off(&self, why: &'static str) {
        if let Some(scrape) = self.scrape.upgrade() {
            let _ = scrape.cut_off.set(why);
            let _ = scrape.stream.shutdown(Shutdown::Read);
        }
    }
}

/// Gives each scrape a place and a thread; at the end, cuts off those still reading.
fn accept_scrapes(listener: &TcpListener, render: &Render) {
    thread::scope(|scope| {
        // The scrapes under way, oldest first.
        let mut places: Vec<Place> = Vec::new();
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) if AcceptErrorKind::of(&e) == AcceptErrorKind::Connection => continue,
                Err(_) => {
                    thread::sleep(ACCEPT_ERROR_PAUSE);
                    continue;
                }
            };
            places.retain(|place| !place.thread.is_finished());
            if places.len() >= MAX_SCRAPES {
                make_room(&mut places);
            }
            let cut_off = OnceLock::new();
            let scrape = Arc::new(Scrape { stream, cut_off });
            let watched = Arc::downgrade(&scrape);
            let answer = move || {
                answer(&scrape, render).unwrap_or_else(|e| scrape_failed(peer, "failed", e))
            };
            match helper_thread("metrics-scrape").spawn_scoped(scope, answer) {
                Ok(thread) => places.push(Place {
                    source: peer.ip().to_canonical(),
                    scrape: watched,
                    thread,
                }),
                Err(e) => scrape_failed(peer, "closed: cannot start a thread for it", e),
            }
        }
        for place in &places {
            place.cut_off("cut off: the server is stopping");
        }
    });
}

/// Cuts off the oldest scrape of the address that holds the most places, and
/// awaits its end: that waits on no client, as an answer fits in the socket's buffer.
fn make_room(places: &mut Vec<Place>) {
    let held = |place: &Place| places.iter().filter(|p| p.source == place.source).count();
    let oldest_of_most = (0..places.len()).max_by_key(|&age| (held(&places[age]), Reverse(age)));
    let gone = places.remove(oldest_of_most.unwrap_or(0));
    gone.cut_off("cut off: a newer scrape took its place");
    let _ = gone.thread.join();
}

fn scrape_failed(peer: SocketAddr, what: &str, e: io::Error) {
    log::debug!(event = event::METRICS_SCRAPE_FAILED; "metrics scrape from {peer} {what}: {e}");
}

/// Reads a request's headers within [`SCRAPE_DEADLINE`], answers, and closes.
fn answer(scrape: &Scrape, render: &Render) -> io::Result<()> {
    let deadline = Some(Instant::now() + SCRAPE_DEADLINE);
    let mut stream = Timed::new(&scrape.stream, deadline, false);
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    let response = loop {
        match stream.read(&mut chunk)? {
            0 => match scrape.cut_off.get() {
                Some(&why) => return Err(io::Error::other(why)),
                None => break error("400 Bad Request", ""),
            },
            read => request.extend_from_slice(&chunk[..read]),
        }
        // An empty line, after CRLF or bare LF lines, ends the headers.
        if request.windows(2).any(|w| w == b"\n\n") || request.windows(3).any(|w| w == b"\n\r\n") {
            break respond(&request, render);
        }
        if request.len() > MAX_REQUEST_BYTES {
            break error("431 Request Header Fields Too Large", "");
        }
    };
    stream.write_all(response.as_bytes())?;
    scrape.stream.shutdown(Shutdown::Write)
}

/// The response to a whole request: only its request line matters.
fn respond(request: &[u8], render: &Render) -> String {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    // Not UTF-8: empty, so a 400.
    let line = std::str::from_utf8(line).unwrap_or_default();
    let parts: Vec<&str> = line.strip_suffix('\r').unwrap_or(line).split(' ').collect();
    let [method, target, "HTTP/1.0" | "HTTP/1.1"] = parts[..] else {
        return error("400 Bad Request", "");
    };
    match method {
        _ if !target.starts_with('/') => error("400 Bad Request", ""),
        _ if target.split('?').next() != Some("/metrics") => error("404 Not Found", ""),
        "GET" | "HEAD" => match render() {
            Ok(text) => response("200 OK", CONTENT_TYPE, &text, "", method == "HEAD"),
            Err(_) => error("500 Internal Server Error", ""),
        },
        _ => error("405 Method Not Allowed", "Allow: GET, HEAD\r\n"),
    }
}

/// A plain-text response naming `status`, with `headers` (CRLF lines) after the usual ones.
fn error(status: &str, headers: &str) -> String {
    let body = format!("{status}\n");
    response(status, "text/plain; charset=utf-8", &body, headers, false)
}

/// `head` (for `HEAD`): the headers of `body`, without it.
fn response(status: &str, content_type: &str, body: &str, headers: &str, head: bool) -> String {
    let (length, body) = (body.len(), if head { "" } else { body });
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\
         {headers}Connection: close\r\n\r\n{body}"
    )
}

#[cfg(test)]
#[path = "../../tests/metrics_scrape/mod.rs"]
#[allow(unreachable_pub)] // written for tests/, where `pub` is needed
mod metrics_scrape;

#[cfg(test)]
mod tests {
    use super::metrics_scrape::{exchange, sample};
    use super::*;
    use crate::stats::Outcome;
    use std::io::{Read, Write};
    use std::net::IpAddr;

    /// Every test client's reads and writes give up after this.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

    const STATE: ServerState = ServerState {
        connections_open: 1,
        threads_serving: 1,
        threads_parked: 3,
        rate_limit_networks: Some(2),
        log_lines_dropped: 5,
        log_write_errors: Vec::new(),
    };

    #[test]
    fn a_scrape_shows_what_the_summary_reads_and_the_state_now() {
        let stats = Stats::default();
        let metrics = Metrics::new(&stats, 1024, true);
        for _ in 0..7 {
            stats.record_accepted();
        }
        for (secs, reply) in [(0.0004, Some(12)), (0.003, Some(1024)), (600.0, None)] {
            let duration = Duration::from_secs_f64(secs);
            stats.record_session(Outcome::Replied, reply, duration);
        }
        stats.record(Outcome::RateLimited);
        stats.record(Outcome::CutOff);
        stats.record_accept_error(AcceptErrorKind::Descriptors);
        let text = metrics.render(&STATE).expect("rendered");
        let value = |name: &str, labels: &[(&str, &str)]| {
            sample(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
        };
        let summary = stats.summary(0);
        assert_eq!(value("prompt_server_connections_accepted_total", &[]), 7.0);
        let outcome = |o| value("prompt_server_connections_total", &[("outcome", o)]);
        assert_eq!(outcome("replied"), summary.replies as f64);
        assert_eq!(outcome("rate_limited"), 1.0);
        assert_eq!(outcome("shutdown"), summary.cut_off as f64);
        assert_eq!(outcome("timed_out"), 0.0, "present before it happens");
        let errors = "prompt_server_accept_errors_total";
        assert_eq!(value(errors, &[("kind", "descriptors")]), 1.0);
        assert_eq!(value(errors, &[("kind", "memory")]), 0.0);
        assert_eq!(value("prompt_server_reply_bytes_total", &[]), 1036.0);
        let bucket = "prompt_server_session_duration_seconds_bucket";
        assert_eq!(value(bucket, &[("le", "0.005")]), 2.0);
        assert_eq!(value(bucket, &[("le", "+Inf")]), 3.0);
        assert_eq!(value("prompt_server_reply_size_bytes_count", &[]), 2.0);
        assert_eq!(value("prompt_server_threads", &[("state", "parked")]), 3.0);
        assert_eq!(value("prompt_server_threads", &[("state", "serving")]), 1.0);
        assert_eq!(value("prompt_server_max_connections", &[]), 1024.0);
        assert_eq!(value("prompt_server_rate_limit_networks", &[]), 2.0);
        assert!(value("process_open_fds", &[]) >= 3.0);
        let started = value("process_start_time_seconds", &[]);
        assert!(started > 1.7e9, "{started}");
        assert_eq!(value("prompt_server_log_lines_dropped_total", &[]), 5.0);
        // A scrape that read the log's count a moment earlier does not set
        // the counter back.
        let earlier = ServerState {
            log_lines_dropped: 4,
            rate_limit_networks: None,
            ..STATE.clone()
        };
        let text = metrics.render(&earlier).expect("rendered");
        let dropped = sample(&text, "prompt_server_log_lines_dropped_total", &[]);
        assert_eq!(dropped, Some(5.0));
    }

    #[test]
    fn without_a_rate_limit_there_is_no_rate_limit_gauge() {
        let metrics = Metrics::new(&Stats::default(), 1024, false);
        let text = metrics.render(&STATE).expect("rendered");
        assert_eq!(
            sample(&text, "prompt_server_rate_limit_networks", &[]),
            None
        );
        assert_eq!(
            sample(&text, "prompt_server_max_connections", &[]),
            Some(1024.0)
        );
    }

    /// An endpoint on loopback that answers `x 1`.
    fn endpoint() -> (Endpoint, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let addr = listener.local_addr().expect("local address");
        let render = Box::new(|| Ok("x 1\n".to_string()));
        let endpoint = Endpoint::start(listener, render).expect("started");
        (endpoint, addr)
    }

    /// A client of `addr` from `source`, with timeouts.
    fn client_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let source = SocketAddr::new(IpAddr::from(source), 0);
        socket.bind(&source.into()).expect("bind the source");
        socket
            .connect_timeout(&addr.into(), CLIENT_TIMEOUT)
            .expect("connect");
        let stream = TcpStream::from(socket);
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .expect("timeout");
        stream
    }

    /// How long until the endpoint closes `stream`, and what it sent first.
    fn closed_after(mut stream: TcpStream, started: Instant) -> (Duration, Vec<u8>) {
        let mut sent = Vec::new();
        // A reset is a close too.
        let _ = stream.read_to_end(&mut sent);
        (started.elapsed(), sent)
    }

    /// The status line of a scrape of `addr`.
    fn scrape_status(addr: SocketAddr) -> String {
        let request = b"GET /metrics HTTP/1.0\r\n\r\n";
        exchange(addr, request, CLIENT_TIMEOUT)
            .expect("a response")
            .status
    }

    /// The status line of a scrape sent on `stream`.
    fn status_of(mut stream: TcpStream) -> String {
        let request = b"GET /metrics HTTP/1.0\r\n\r\n";
        stream.write_all(request).expect("request sent");
        let (_, response) = closed_after(stream, Instant::now());
        let response = String::from_utf8_lossy(&response);
        response.lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn at_the_cap_the_oldest_scrape_of_the_address_holding_most_makes_room() {
        let (_endpoint, addr) = endpoint();
        // Accepted in order: the silent scraper from 127.0.0.1 is the oldest.
        let silent = client_from([127, 0, 0, 1], addr);
        let mut held: Vec<TcpStream> = (1..MAX_SCRAPES)
            .map(|_| client_from([127, 0, 0, 2], addr))
            .collect();
        let _newcomer = client_from([127, 0, 0, 3], addr);
        let started = Instant::now();
        let (took, sent) = closed_after(held.remove(0), started);
        assert!(
            took < Duration::from_secs(1) && sent.is_empty(),
            "{took:?} {sent:?}"
        );
        // Still at the cap: this one takes the next place of 127.0.0.2.
        assert_eq!(scrape_status(addr), "HTTP/1.1 200 OK");
        assert_eq!(status_of(silent), "HTTP/1.1 200 OK");
    }

    #[test]
    fn the_endpoint_stops_at_once_with_a_silent_scraper_open() {
        let (endpoint, addr) = endpoint();
        let silent = client_from([127, 0, 0, 1], addr);
        // Accepted after the silent one, which is being read by now.
        assert_eq!(scrape_status(addr), "HTTP/1.1 200 OK");
        let started = Instant::now();
        drop(endpoint);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        let (_, sent) = closed_after(silent, started);
        assert_eq!(sent, b"", "cut off with nothing sent");
        assert!(
            TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT).is_err(),
            "still listening"
        );
    }

    #[test]
    fn the_process_start_time_is_in_the_recent_past() {
        let started = process_start_time().expect("readable on Linux");
        let age = UNIX_EPOCH.elapsed().unwrap().as_secs_f64() - started;
        // This test process started at most a few minutes ago (cargo test
        // may build for a while first, which is not this process).
        assert!((0.0..600.0).contains(&age), "{age}");
    }
}
