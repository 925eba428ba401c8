//! `--metrics-addr`: the real binary's Prometheus endpoint. A scrape is well
//! formed (checked by the test-side parser and, when installed, by
//! `promtool check metrics`), its counters move as clients are served, and
//! anything but `GET /metrics` gets a 404.

mod common;
mod prometheus_format;

use std::net::{SocketAddr, TcpListener};

use common::*;
use prometheus_format::{Exposition, check, promtool_check, scrape};

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

fn metrics_of(endpoint: SocketAddr) -> Exposition {
    let (status, headers, body) = scrape(endpoint, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let content_type = headers.iter().find(|(name, _)| name == "content-type");
    assert_eq!(
        content_type.map(|(_, value)| value.as_str()),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    check(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

fn outcome(metrics: &Exposition, outcome: &str) -> Option<f64> {
    metrics.value("prompt_server_connections_total", &[("outcome", outcome)])
}

#[test]
fn counters_move_as_clients_are_served() {
    let (mut server, endpoint) = start_with_metrics(&["--max-connections", "2"]);
    let before = metrics_of(endpoint);
    assert_eq!(outcome(&before, "replied"), Some(0.0));
    assert_eq!(
        before.value("prompt_server_max_connections", &[]),
        Some(2.0)
    );

    for reply in [&b"yes\n"[..], b"no\n", b"maybe\n"] {
        session(server.addr, reply);
    }
    // The counts are taken before the connection closes: a client that has
    // seen its close finds itself counted.
    let served = metrics_of(endpoint);
    assert_eq!(outcome(&served, "replied"), Some(3.0));
    let accepted = served.value("prompt_server_connections_accepted_total", &[]);
    assert_eq!(accepted, Some(3.0));
    assert_eq!(
        served.value("prompt_server_reply_bytes_total", &[]),
        Some(10.0)
    );
    let sessions = served.value("prompt_server_session_duration_seconds_count", &[]);
    assert_eq!(sessions, Some(3.0));
    let replies = served.value("prompt_server_reply_size_bytes_count", &[]);
    assert_eq!(replies, Some(3.0));
    assert_eq!(
        served.value("prompt_server_connections_open", &[]),
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
    assert_eq!(busy.value("prompt_server_connections_open", &[]), Some(2.0));
    let serving = busy.value("prompt_server_threads", &[("state", "serving")]);
    assert_eq!(serving, Some(2.0));
    assert_eq!(outcome(&busy, "busy"), Some(1.0));
    assert!(
        busy.value("process_open_fds", &[])
            .is_some_and(|fds| fds > 4.0)
    );
    assert!(
        busy.value("process_start_time_seconds", &[])
            .is_some_and(|t| t > 1.7e9)
    );
}

#[test]
fn promtool_accepts_a_real_scrape() {
    if !require_program("promtool", "apt-get install prometheus") {
        return;
    }
    let (server, endpoint) = start_with_metrics(&["--max-rate-per-ip", "5/s"]);
    session(server.addr, b"for promtool\n");
    let (_, _, body) = scrape(endpoint, "/metrics");
    if let Err(e) = promtool_check(&body) {
        panic!("{e}\n{body}");
    }
}

#[test]
fn other_paths_get_a_404_and_the_endpoint_keeps_serving() {
    let (_server, endpoint) = start_with_metrics(&[]);
    let (status, _, _) = scrape(endpoint, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = scrape(endpoint, "/metrics?debug=1");
    assert_eq!(status, "HTTP/1.1 200 OK", "a query string is ignored");
    metrics_of(endpoint);
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
