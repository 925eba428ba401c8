//! `--metrics-addr`: the server's numbers over HTTP (the README's Metrics
//! section has the table). [`Metrics`] is a `prometheus-client` registry of
//! the counters and histograms in [`Stats`] and of gauges set from
//! [`ServerState`] as each scrape is answered; the crate writes the text, in
//! the Prometheus format 0.0.4 rather than its OpenMetrics, because that is
//! what `promtool check metrics` reads (OpenMetrics' `x_total` samples are
//! untyped families without help to it) and what Go's client serves unless
//! told otherwise.
//!
//! [`serve_metrics`] is the HTTP endpoint, on one thread. `GET /metrics`
//! (or `HEAD`, any query string ignored) gets the text; another path 404,
//! another method 405, anything unparseable 400. Every response closes the
//! connection. Every waiting scraper's request is read as its bytes come,
//! so a silent one holds up nobody; each has [`SCRAPE_DEADLINE`] for the
//! whole exchange and [`MAX_REQUEST_BYTES`] for its request.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::{Metric, Registry};

use crate::logging::event;
use crate::stats::Stats;

/// The whole time one scraper may take: reading its request and taking the
/// response. A silent scraper is dropped after this.
pub(crate) const SCRAPE_DEADLINE: Duration = Duration::from_secs(2);
/// The largest request read; a bigger one gets a 431 and is closed.
pub(crate) const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How often the idle metrics thread checks whether the server is stopping.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the metrics thread looks at scrapers while some are waiting.
const PENDING_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// The most scrapes whose requests are read at once.
pub(crate) const MAX_PENDING_SCRAPES: usize = 16;
/// The metrics thread reads a request and formats a few kilobytes of text.
const METRICS_THREAD_STACK: usize = 256 * 1024;
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A gauge of a count.
type Count = Gauge<u64, AtomicU64>;

/// The `state` label of `prompt_server_threads`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// What the gauges show: the server's state when a scrape is answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerState {
    pub(crate) connections_open: u64,
    pub(crate) threads_serving: u64,
    pub(crate) threads_parked: u64,
    pub(crate) max_connections: u64,
    /// `None` without `--max-rate-per-ip`.
    pub(crate) rate_limit_networks: Option<u64>,
    /// The log's own count, which only grows.
    pub(crate) log_lines_dropped: u64,
}

/// Every metric the endpoint serves, in one registry.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Follows [`ServerState::log_lines_dropped`].
    log_lines_dropped: Counter,
    connections_open: Count,
    threads: Family<StateLabel, Count>,
    max_connections: Count,
    /// Registered only with `--max-rate-per-ip`.
    rate_limit_networks: Option<Count>,
    /// Registered only where `/proc/self/fd` can be read at start-up; a
    /// later failed read leaves the last count.
    open_fds: Option<Count>,
}

impl Metrics {
    pub(crate) fn new(stats: &Stats, with_rate_limit: bool) -> Self {
        let mut registry = Registry::default();
        let started = process_start_time().unwrap_or_else(SystemTime::now);
        let start_time = Gauge::<f64, AtomicU64>::default();
        start_time.set(seconds_since_epoch(started));
        let help = "Start time of the process since the Unix epoch in seconds";
        registry.register("process_start_time_seconds", help, start_time);
        let open_fds = count_open_fds().map(|_| {
            let help = "Open file descriptors";
            registered(&mut registry, "process_open_fds", help, Count::default())
        });
        let r = registry.sub_registry_with_prefix("prompt_server");
        stats.register(r);
        let help = "Housekeeping log lines dropped because the log queue was full";
        let log_lines_dropped = registered(r, "log_lines_dropped", help, Counter::default());
        let help = "Connections open now";
        let connections_open = registered(r, "connections_open", help, Count::default());
        let help = "Connection threads alive, serving a client or parked in the thread cache";
        let threads = registered(r, "threads", help, Family::default());
        let help = "The effective cap on open connections";
        let max_connections = registered(r, "max_connections", help, Count::default());
        let rate_limit_networks = with_rate_limit.then(|| {
            let help = "Client networks the rate limit holds a bucket for \
                        (refilled ones go at the next sweep)";
            registered(r, "rate_limit_networks", help, Count::default())
        });
        Metrics {
            registry,
            log_lines_dropped,
            connections_open,
            threads,
            max_connections,
            rate_limit_networks,
            open_fds,
        }
    }

    /// Sets the gauges from `state` and writes every metric's text.
    pub(crate) fn render(&self, state: &ServerState) -> Result<String, fmt::Error> {
        // `fetch_max`: two scrapes at once never set the count back.
        let dropped = self.log_lines_dropped.inner();
        dropped.fetch_max(state.log_lines_dropped, Ordering::Relaxed);
        self.connections_open.set(state.connections_open);
        let threads = |state| self.threads.get_or_create(&StateLabel { state });
        threads("serving").set(state.threads_serving);
        threads("parked").set(state.threads_parked);
        self.max_connections.set(state.max_connections);
        if let (Some(gauge), Some(networks)) =
            (&self.rate_limit_networks, state.rate_limit_networks)
        {
            gauge.set(networks);
        }
        if let (Some(gauge), Some(open_fds)) = (&self.open_fds, count_open_fds()) {
            gauge.set(open_fds);
        }
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// `metric`, after registering a handle to it. The registry adds `_total`
/// to a counter's name, and a full stop to the help.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The unit of times in `/proc`: `USER_HZ`, which is 100 on every Linux
/// architecture in use (what `sysconf(_SC_CLK_TCK)` returns).
const PROC_TICKS_PER_SECOND: u64 = 100;

/// When this process started, as Prometheus's own process collector works
/// it out: `/proc/self/stat`'s start time (field 22, in ticks since boot)
/// after `/proc/stat`'s boot time. `None` where they cannot be read.
fn process_start_time() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Field 2, the command name, is in parentheses and may hold spaces:
    // count from after it, where field 3 comes first.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after_name.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let since_boot = Duration::from_millis(ticks.saturating_mul(1000) / PROC_TICKS_PER_SECOND);
    Some(UNIX_EPOCH + Duration::from_secs(boot) + since_boot)
}

/// `time` as seconds since the Unix epoch (negative before it).
fn seconds_since_epoch(time: SystemTime) -> f64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

/// Open descriptors: the entries of `/proc/self/fd`, counting the one used
/// to list them, as the official Go client does.
fn count_open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.filter(Result::is_ok).count() as u64)
}

/// Starts the metrics thread: it answers scrapes on `listener` with
/// `render()` until `is_stopping()` returns true, which it checks at least
/// every [`STOP_POLL_INTERVAL`]. Errors only if the thread cannot be started
/// or the listener made non-blocking.
///
/// The thread reads every waiting scrape's request as its bytes come, so a
/// scraper that sends nothing holds up neither the others nor the thread;
/// each is dropped at its own [`SCRAPE_DEADLINE`], and at most
/// [`MAX_PENDING_SCRAPES`] wait at once (the oldest goes first).
pub(crate) fn serve_metrics(
    listener: TcpListener,
    render: impl Fn() -> Result<String, fmt::Error> + Send + 'static,
    is_stopping: impl Fn() -> bool + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    // A blocking accept could not see the stop; polling costs ten wake-ups
    // a second when idle, and a scrape waits at most one interval.
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("metrics".to_string())
        .stack_size(METRICS_THREAD_STACK)
        .spawn(move || {
            let mut pending = VecDeque::new();
            while !is_stopping() {
                let mut progressed = accept_scrapes(&listener, &mut pending);
                pending.retain_mut(|scrape: &mut PendingScrape| match scrape.advance(&render) {
                    Progress::Waiting => true,
                    Progress::Read => {
                        progressed = true;
                        true
                    }
                    Progress::Done(result) => {
                        if let Err(e) = result {
                            log::debug!(
                                event = event::METRICS_SCRAPE_FAILED;
                                "metrics scrape from {} failed: {e}", scrape.peer
                            );
                        }
                        progressed = true;
                        false
                    }
                });
                if !progressed {
                    thread::sleep(if pending.is_empty() {
                        STOP_POLL_INTERVAL
                    } else {
                        PENDING_POLL_INTERVAL
                    });
                }
            }
        })
}

/// Accepts every scraper waiting on `listener`; true if there was one.
fn accept_scrapes(listener: &TcpListener, pending: &mut VecDeque<PendingScrape>) -> bool {
    let mut accepted = false;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if pending.len() >= MAX_PENDING_SCRAPES {
                    pending.pop_front();
                }
                pending.push_back(PendingScrape {
                    stream,
                    peer,
                    request: Vec::new(),
                    deadline: Instant::now() + SCRAPE_DEADLINE,
                });
                accepted = true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // None waiting, or out of descriptors: try again later.
            Err(_) => return accepted,
        }
    }
}

/// A scraper whose request is being read.
struct PendingScrape {
    /// Non-blocking while its request is read.
    stream: TcpStream,
    peer: SocketAddr,
    request: Vec<u8>,
    /// When it is dropped, answered or not.
    deadline: Instant,
}

/// What one look at a pending scrape gave.
enum Progress {
    /// Nothing new from the scraper.
    Waiting,
    /// More of its request arrived.
    Read,
    /// Answered (or dropped): it is finished.
    Done(io::Result<()>),
}

impl PendingScrape {
    /// Reads what the scraper has sent; once the request is whole (or
    /// cannot be), answers it and closes.
    fn advance(&mut self, render: &impl Fn() -> Result<String, fmt::Error>) -> Progress {
        let mut chunk = [0u8; 1024];
        let mut progress = Progress::Waiting;
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Progress::Done(self.answer(Response::error("400 Bad Request"))),
                Ok(read) => {
                    self.request.extend_from_slice(&chunk[..read]);
                    if let Some(end) = header_end(&self.request) {
                        let response = respond(&self.request[..end], render);
                        return Progress::Done(self.answer(response));
                    }
                    if self.request.len() > MAX_REQUEST_BYTES {
                        let too_large = Response::error("431 Request Header Fields Too Large");
                        return Progress::Done(self.answer(too_large));
                    }
                    progress = Progress::Read;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= self.deadline {
                        let timed_out =
                            io::Error::new(io::ErrorKind::TimedOut, "no request in time");
                        return Progress::Done(Err(timed_out));
                    }
                    return progress;
                }
                Err(e) => return Progress::Done(Err(e)),
            }
        }
    }

    /// Writes `response` within what is left of the deadline, and closes.
    fn answer(&mut self, response: Response) -> io::Result<()> {
        self.stream.set_nonblocking(false)?;
        self.stream
            .set_write_timeout(Some(remaining(self.deadline)?))?;
        self.stream.write_all(&response.to_bytes())?;
        self.stream.shutdown(std::net::Shutdown::Write)
    }
}

/// One HTTP response, before it is written.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: &'static str,
    content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    extra_headers: &'static str,
    body: String,
    /// `HEAD`: the headers of the body, without it.
    head_only: bool,
}

impl Response {
    fn error(status: &'static str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_headers: "",
            body: format!("{status}\n"),
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len(),
            self.extra_headers
        )
        .into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The time left before `deadline`, or a timeout error once it has passed.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "scrape deadline passed",
        ));
    }
    Ok(left)
}

/// Where the blank line ending the headers ends (CRLF or bare LF lines).
fn header_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The response to a whole request: only its request line matters.
fn respond(request: &[u8], render: &impl Fn() -> Result<String, fmt::Error>) -> Response {
    let line_end = request
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(request.len());
    let Ok(line) = std::str::from_utf8(&request[..line_end]) else {
        return Response::error("400 Bad Request");
    };
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::error("400 Bad Request");
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Response::error("400 Bad Request");
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    if path != "/metrics" {
        return Response::error("404 Not Found");
    }
    if !matches!(method, "GET" | "HEAD") {
        return Response {
            extra_headers: "Allow: GET, HEAD\r\n",
            ..Response::error("405 Method Not Allowed")
        };
    }
    match render() {
        Ok(body) => Response {
            status: "200 OK",
            content_type: CONTENT_TYPE,
            extra_headers: "",
            body,
            head_only: method == "HEAD",
        },
        Err(fmt::Error) => Response::error("500 Internal Server Error"),
    }
}

#[cfg(test)]
#[path = "../tests/metrics_scrape/mod.rs"]
#[allow(unreachable_pub)] // written for tests/, where `pub` is needed
mod metrics_scrape;

#[cfg(test)]
mod tests {
    use super::metrics_scrape::sample;
    use super::*;
    use crate::stats::AcceptErrorKind;
    use crate::stats::Outcome;
    use std::collections::HashSet;
    use std::net::Shutdown;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    /// Every test client's reads and writes give up after this.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

    const STATE: ServerState = ServerState {
        connections_open: 1,
        threads_serving: 1,
        threads_parked: 3,
        max_connections: 1024,
        rate_limit_networks: Some(2),
        log_lines_dropped: 5,
    };

    #[test]
    fn a_scrape_shows_what_the_summary_reads_and_the_state_now() {
        let stats = Stats::default();
        let metrics = Metrics::new(&stats, true);
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
        assert_eq!(value(bucket, &[("le", "0.001")]), 1.0);
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
            ..STATE
        };
        let text = metrics.render(&earlier).expect("rendered");
        let dropped = sample(&text, "prompt_server_log_lines_dropped_total", &[]);
        assert_eq!(dropped, Some(5.0));
    }

    #[test]
    fn without_a_rate_limit_there_is_no_rate_limit_gauge() {
        let text = Metrics::new(&Stats::default(), false).render(&STATE);
        let text = text.expect("rendered");
        assert!(
            !text.contains("prompt_server_rate_limit_networks"),
            "{text}"
        );
        assert!(
            text.contains("prompt_server_max_connections 1024\n"),
            "{text}"
        );
    }

    /// A running endpoint and how to stop it.
    struct Endpoint {
        addr: SocketAddr,
        stopping: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Endpoint {
        fn start(body: &'static str) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
            let addr = listener.local_addr().expect("local address");
            let stopping = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stopping);
            let thread = serve_metrics(
                listener,
                move || Ok(body.to_string()),
                move || flag.load(Ordering::Relaxed),
            )
            .expect("metrics thread");
            Endpoint {
                addr,
                stopping,
                thread: Some(thread),
            }
        }

        fn client(&self) -> TcpStream {
            let stream = TcpStream::connect(self.addr).expect("connect");
            stream
                .set_read_timeout(Some(CLIENT_TIMEOUT))
                .expect("timeout");
            stream
                .set_write_timeout(Some(CLIENT_TIMEOUT))
                .expect("timeout");
            stream
        }

        /// Sends `request` and reads the whole response.
        fn exchange(&self, request: &[u8]) -> String {
            let mut stream = self.client();
            stream.write_all(request).expect("send request");
            let mut response = Vec::new();
            stream.read_to_end(&mut response).expect("read response");
            String::from_utf8(response).expect("a UTF-8 response")
        }
    }

    impl Drop for Endpoint {
        fn drop(&mut self) {
            self.stopping.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// The status line, the header lines, and the body of a response.
    fn split_response(response: &str) -> (&str, HashSet<&str>, &str) {
        let (head, body) = response.split_once("\r\n\r\n").expect("a blank line");
        let mut lines = head.split("\r\n");
        let status = lines.next().expect("a status line");
        (status, lines.collect(), body)
    }

    #[test]
    fn a_scrape_gets_the_text_with_the_format_headers() {
        let endpoint = Endpoint::start("x 1\n");
        for request in [
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
            "GET /metrics HTTP/1.0\r\n\r\n",
            "GET /metrics?target=a HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.0\n\n",
        ] {
            let response = endpoint.exchange(request.as_bytes());
            let (status, headers, body) = split_response(&response);
            assert_eq!(status, "HTTP/1.1 200 OK", "{request:?}");
            assert!(headers.contains(format!("Content-Type: {CONTENT_TYPE}").as_str()));
            assert!(headers.contains("Content-Length: 4"), "{headers:?}");
            assert!(headers.contains("Connection: close"));
            assert_eq!(body, "x 1\n");
        }
        let response = endpoint.exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        let (status, headers, body) = split_response(&response);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers.contains("Content-Length: 4"));
        assert_eq!(body, "");
    }

    #[test]
    fn other_requests_are_refused_and_closed() {
        let endpoint = Endpoint::start("x 1\n");
        for (request, expected) in [
            ("GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            ("GET /metricsx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (
                "POST /metrics HTTP/1.1\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            ("GET /metrics HTTP/2.0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            ("GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            ("hello\n\n", "HTTP/1.1 400 Bad Request"),
            ("\u{1b}[2J\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ] {
            let response = endpoint.exchange(request.as_bytes());
            let (status, headers, _) = split_response(&response);
            assert_eq!(status, expected, "{request:?}");
            assert!(headers.contains("Connection: close"));
            if expected.contains("405") {
                assert!(headers.contains("Allow: GET, HEAD"));
            }
        }
        // Half a request, then the client closes its side.
        let mut stream = endpoint.client();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .expect("send");
        stream.shutdown(Shutdown::Write).expect("half-close");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        assert!(
            response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{response}"
        );
    }

    #[test]
    fn silent_scrapers_hold_up_nobody_and_are_dropped_at_the_deadline() {
        let endpoint = Endpoint::start("x 1\n");
        let others: Vec<TcpStream> = (0..5).map(|_| endpoint.client()).collect();
        let started = Instant::now();
        let response = endpoint.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        drop(others);
    }

    #[test]
    fn a_silent_scraper_is_dropped_and_the_next_is_served() {
        let endpoint = Endpoint::start("x 1\n");
        let started = Instant::now();
        let mut silent = endpoint.client();
        let second = Mutex::new(None);
        thread::scope(|scope| {
            scope.spawn(|| {
                // Answered while the silent one still waits.
                let response = endpoint.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
                *second.lock().expect("lock") = Some((response, started.elapsed()));
            });
            let mut buffer = [0u8; 16];
            // The silent client is closed with nothing sent.
            let read = silent.read(&mut buffer);
            assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
            let dropped_after = started.elapsed();
            assert!(
                dropped_after >= SCRAPE_DEADLINE - Duration::from_millis(200),
                "{dropped_after:?}"
            );
            assert!(
                dropped_after < SCRAPE_DEADLINE + Duration::from_secs(1),
                "{dropped_after:?}"
            );
        });
        let (response, waited) = second.into_inner().expect("lock").expect("second scrape");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            waited < SCRAPE_DEADLINE + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[test]
    fn a_huge_request_is_cut_short() {
        let endpoint = Endpoint::start("x 1\n");
        let started = Instant::now();
        let mut stream = endpoint.client();
        // Far more than the cap, with no end of headers: the server stops
        // reading at the cap, answers 431 and closes; the rest of the write
        // may then fail with a reset.
        let huge = vec![b'a'; 4 * 1024 * 1024];
        let _ = stream.write_all(&huge);
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        assert!(started.elapsed() < SCRAPE_DEADLINE + Duration::from_secs(1));
        let response = endpoint.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        // Just over the cap, read in full by the client: a 431.
        let mut stream = endpoint.client();
        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        request.extend(std::iter::repeat_n(b'h', MAX_REQUEST_BYTES));
        stream.write_all(&request).expect("send");
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response);
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{response}"
        );
    }

    #[test]
    fn the_thread_stops_when_asked() {
        let mut endpoint = Endpoint::start("x 1\n");
        endpoint.stopping.store(true, Ordering::Relaxed);
        let started = Instant::now();
        if let Some(thread) = endpoint.thread.take() {
            thread.join().expect("metrics thread ends cleanly");
        }
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_process_start_time_is_in_the_recent_past() {
        let started = process_start_time().expect("readable on Linux");
        let age = SystemTime::now()
            .duration_since(started)
            .expect("in the past");
        // This test process started at most a few minutes ago (cargo test
        // may build for a while first, which is not this process).
        assert!(age < Duration::from_secs(600), "{age:?}");
    }
}
