//! `--metrics-addr`: the real binary's Prometheus endpoint. A scrape passes
//! `promtool check metrics` (the format check: nothing on the test side
//! parses more than a sample's value), its counters move as clients are
//! served, requests other than `GET` or `HEAD /metrics` are refused as
//! HTTP says, and sockets held open, from any local address, starve no
//! scraper.

mod common;
mod metrics_scrape;

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use metrics_scrape::{Response, exchange, sample, scrape};

/// The binary with a metrics endpoint on a free loopback port, and that
/// endpoint's address (from its `metrics` log event).
fn start_with_metrics(args: &[&str]) -> (ServerProcess, SocketAddr) {
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(args)
        .start();
    let record = server.expect_logged_event("metrics", |_| true);
    let addr = record["addr"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {record}"));
    (server, addr)
}

/// A scrape's text, after checking its status and content type.
fn metrics_of(endpoint: SocketAddr) -> String {
    let response = scrape(endpoint, "/metrics");
    assert_eq!(response.status, "HTTP/1.1 200 OK");
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    response.body
}

fn outcome(metrics: &str, outcome: &str) -> Option<f64> {
    sample(
        metrics,
        "prompt_server_connections_total",
        &[("outcome", outcome)],
    )
}

#[test]
fn counters_move_as_clients_are_served() {
    let (mut server, endpoint) = start_with_metrics(&["--max-connections", "2"]);
    let before = metrics_of(endpoint);
    assert_eq!(outcome(&before, "replied"), Some(0.0));
    assert_eq!(
        sample(&before, "prompt_server_max_connections", &[]),
        Some(2.0)
    );

    for reply in [&b"yes\n"[..], b"no\n", b"maybe\n"] {
        session(server.addr, reply);
    }
    // The counts are taken before the connection closes: a client that has
    // seen its close finds itself counted.
    let served = metrics_of(endpoint);
    assert_eq!(outcome(&served, "replied"), Some(3.0));
    let accepted = sample(&served, "prompt_server_connections_accepted_total", &[]);
    assert_eq!(accepted, Some(3.0));
    assert_eq!(
        sample(&served, "prompt_server_reply_bytes_total", &[]),
        Some(10.0)
    );
    let sessions = sample(&served, "prompt_server_session_duration_seconds_count", &[]);
    assert_eq!(sessions, Some(3.0));
    let replies = sample(&served, "prompt_server_reply_size_bytes_count", &[]);
    assert_eq!(replies, Some(3.0));
    assert_eq!(
        sample(&served, "prompt_server_connections_open", &[]),
        Some(0.0)
    );

    // Two silent clients fill the cap; a third is turned away busy.
    let mut silent = [connect(server.addr), connect(server.addr)];
    for client in &mut silent {
        expect_prompt(client);
    }
    let mut third = connect(server.addr);
    assert_eq!(read_line(&mut third), BUSY);
    server.expect_logged_event("busy", |record| record["reason"] == "max_connections");
    let busy = metrics_of(endpoint);
    assert_eq!(
        sample(&busy, "prompt_server_connections_open", &[]),
        Some(2.0)
    );
    let serving = sample(&busy, "prompt_server_threads", &[("state", "serving")]);
    assert_eq!(serving, Some(2.0));
    assert_eq!(outcome(&busy, "busy"), Some(1.0));
    assert!(sample(&busy, "process_open_fds", &[]).is_some_and(|fds| fds > 4.0));
    assert!(sample(&busy, "process_start_time_seconds", &[]).is_some_and(|t| t > 1.7e9));
}

/// Every metric of the table in `src/metrics.rs`, as a scrape names it.
const EVERY_METRIC: &[&str] = &[
    "prompt_server_connections_accepted_total",
    "prompt_server_connections_total",
    "prompt_server_reply_bytes_total",
    "prompt_server_accept_errors_total",
    "prompt_server_log_lines_dropped_total",
    "prompt_server_connections_open",
    "prompt_server_threads",
    "prompt_server_max_connections",
    "prompt_server_rate_limit_networks",
    "process_open_fds",
    "process_start_time_seconds",
    "prompt_server_session_duration_seconds",
    "prompt_server_reply_size_bytes",
];

#[test]
fn promtool_accepts_a_real_scrape_of_every_metric() {
    if !require_program("promtool", "apt-get install prometheus") {
        return;
    }
    let (server, endpoint) = start_with_metrics(&["--max-rate-per-ip", "5/s"]);
    session(server.addr, b"for promtool\n");
    let text = metrics_of(endpoint);
    // promtool passes an empty text: every family must be there first.
    for name in EVERY_METRIC {
        let declared = format!("# TYPE {name} ");
        assert!(text.contains(&declared), "no {name} in\n{text}");
    }
    if let Err(e) = promtool_check(&text) {
        panic!("{e}\n{text}");
    }
}

/// `promtool check metrics < text`: `Err` with its output if it finds any
/// problem (it exits non-zero for lint warnings too, such as a counter
/// without `_total` or a metric without help), or if it cannot be run.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("promtool has no stdin")?;
    // The text is small; promtool reads all of it before writing anything.
    stdin
        .write_all(text.as_bytes())
        .map_err(|e| format!("cannot write to promtool: {e}"))?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(|e| format!("promtool did not finish: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics: {}: {said}", output.status))
    }
}

/// Sends `request` to the endpoint and reads the response to the close.
fn send(endpoint: SocketAddr, request: &[u8]) -> Response {
    exchange(endpoint, request, TIMEOUT).unwrap_or_else(|e| panic!("{request:?}: {e}"))
}

#[test]
fn get_and_head_of_metrics_are_answered_and_the_rest_refused() {
    let (_server, endpoint) = start_with_metrics(&[]);
    for request in [
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        "GET /metrics HTTP/1.0\r\n\r\n",
        "GET /metrics?target=a HTTP/1.1\r\n\r\n",
        "GET /metrics HTTP/1.0\n\n",
    ] {
        let response = send(endpoint, request.as_bytes());
        assert_eq!(response.status, "HTTP/1.1 200 OK", "{request:?}");
        let length = response.body.len().to_string();
        assert_eq!(response.header("content-length"), Some(length.as_str()));
        assert_eq!(response.header("connection"), Some("close"));
        assert!(
            response
                .body
                .contains("# TYPE prompt_server_threads gauge\n")
        );
    }
    let head = send(endpoint, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(head.status, "HTTP/1.1 200 OK");
    assert!(head.header("content-length").is_some_and(|n| n != "0"));
    assert_eq!(head.body, "");
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
        let response = send(endpoint, request.as_bytes());
        assert_eq!(response.status, expected, "{request:?}");
        assert_eq!(response.header("connection"), Some("close"));
        if expected.contains("405") {
            assert_eq!(response.header("allow"), Some("GET, HEAD"));
        }
    }
    // Just over the cap without an end of headers, read in full: a 431.
    let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
    request.extend(std::iter::repeat_n(b'h', 8 * 1024));
    let too_large = send(endpoint, &request).status;
    assert_eq!(too_large, "HTTP/1.1 431 Request Header Fields Too Large");
    // Half a request, then the client closes its side.
    let mut client = connect(endpoint);
    client.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let response = String::from_utf8(read_until_closed(&mut client)).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{response}"
    );
}

#[test]
fn a_huge_request_is_cut_short_and_the_endpoint_keeps_serving() {
    let (_server, endpoint) = start_with_metrics(&[]);
    let started = Instant::now();
    let mut client = connect(endpoint);
    // Far more than the cap, with no end of headers: the endpoint stops
    // reading at the cap, answers 431 and closes; the rest of the write may
    // then fail with a reset.
    let _ = client.write_all(&vec![b'a'; 4 * 1024 * 1024]);
    let _ = client.read_to_end(&mut Vec::new());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    metrics_of(endpoint);
}

#[test]
fn a_silent_scraper_holds_up_nobody_and_is_closed_at_its_deadline() {
    let (_server, endpoint) = start_with_metrics(&[]);
    let started = Instant::now();
    let mut silent = connect(endpoint);
    metrics_of(endpoint);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        read_until_closed(&mut silent),
        b"",
        "closed with nothing sent"
    );
    // The endpoint gives each scrape 2 s for the whole exchange.
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1800),
        "{closed_after:?}"
    );
    assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");
}

#[test]
fn a_taken_metrics_address_is_a_one_line_start_up_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = ServerProcess::builder()
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-addr",
            &addr,
        ])
        .output();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let port = addr.rsplit(':').next().unwrap();
    assert!(
        errors[0].starts_with(&format!(
            "error: cannot listen for metrics on {addr}: address already in use (another \
             process listens there: `ss -ltnp 'sport = :{port}'` shows which; choose another \
             --metrics-addr)"
        )),
        "{stderr}"
    );
}

/// 200 sockets from 127.0.0.2, each held open and opened again as soon as
/// the endpoint closes it, while 127.0.0.1 scrapes 40 times in a row: every
/// one of the 40 is answered.
#[test]
fn a_client_holding_many_sockets_starves_no_other_scraper() {
    assert_every_scrape_answered_while_held(&["127.0.0.2"], 200);
}

/// The same from the scraper's own address: the endpoint cannot tell the
/// two apart by address, only by the scraper sending its request at once.
#[test]
fn sockets_held_from_the_scrapers_own_address_starve_it_not() {
    assert_every_scrape_answered_while_held(&["127.0.0.1"], 200);
}

/// Any local user can bind 127.0.0.2 to 127.0.0.6: a few sockets from each,
/// more than the endpoint's whole cap together.
#[test]
fn sockets_held_from_several_addresses_starve_no_scraper() {
    let sources = [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
    ];
    assert_every_scrape_answered_while_held(&sources, 8);
}

/// While `per_source` sockets from each of `sources` are held open (and
/// opened again as soon as the endpoint closes them), 127.0.0.1 scrapes 40
/// times in a row, and every scrape is answered.
fn assert_every_scrape_answered_while_held(sources: &[&str], per_source: usize) {
    const SCRAPES: usize = 40;
    let (_server, endpoint) = start_with_metrics(&[]);
    let sources: Vec<IpAddr> = sources.iter().map(|s| s.parse().unwrap()).collect();
    let held = sources.len() * per_source;
    let stop = AtomicBool::new(false);
    let all_connected = Barrier::new(held + 1);
    let answered = thread::scope(|scope| {
        for &source in sources
            .iter()
            .flat_map(|s| std::iter::repeat_n(s, per_source))
        {
            let (stop, all_connected) = (&stop, &all_connected);
            thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn_scoped(scope, move || {
                    hold_open(source, endpoint, stop, all_connected)
                })
                .expect("attacker thread");
        }
        all_connected.wait();
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {endpoint}\r\n\r\n");
        let outcomes: Vec<String> = (0..SCRAPES)
            .map(
                |_| match exchange(endpoint, request.as_bytes(), Duration::from_secs(10)) {
                    Ok(response) => response.status,
                    Err(e) => e.to_string(),
                },
            )
            .collect();
        stop.store(true, Ordering::Relaxed);
        outcomes
    });
    let failed: Vec<&String> = answered
        .iter()
        .filter(|s| *s != "HTTP/1.1 200 OK")
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {SCRAPES} scrapes failed while {sources:?} held {per_source} sockets each: {failed:?}",
        failed.len()
    );
}

/// One of the attacker's sockets: connected from `source`, held until the
/// endpoint closes it, then connected again, until `stop`. Waits at
/// `connected` once, after its first connect.
fn hold_open(source: IpAddr, endpoint: SocketAddr, stop: &AtomicBool, connected: &Barrier) {
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let stream = connect_quietly(source, endpoint);
        if std::mem::take(&mut first) {
            connected.wait();
        }
        let Ok(mut stream) = stream else { continue };
        let mut buffer = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    }
}

/// A socket from `source` to `endpoint` that reads with a short timeout, so
/// that its holder sees `stop` soon; an error instead of a panic.
fn connect_quietly(source: IpAddr, endpoint: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&endpoint.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(stream)
}
