//! `--max-rate-per-ip`: a token bucket per client network. A client over
//! its rate gets the busy line and is closed; other clients are served at
//! once; tokens come back over time; addresses group into networks by
//! `--rate-prefix-v4`/`--rate-prefix-v6`; and spraying addresses does not
//! grow the server's memory without bound.

mod common;
mod metrics_scrape;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Connects from `source`; `true` if it was served (prompt, reply, clean
/// close), `false` if it was turned away with the busy line.
fn served_from(source: IpAddr, server: SocketAddr) -> bool {
    let mut client = connect_from(source, server);
    let first = read_line(&mut client);
    if first == BUSY {
        assert_eq!(
            read_until_closed(&mut client),
            b"",
            "closed after the busy line"
        );
        return false;
    }
    assert_eq!(first, PROMPT);
    client.write_all(b"yes\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    true
}

#[test]
fn a_burst_past_the_rate_is_turned_away_while_another_client_is_served() {
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--max-rate-per-ip", "3/min"])
        .start();
    for _ in 0..3 {
        assert!(
            served_from(ip("127.0.0.1"), server.addr),
            "within the burst"
        );
    }
    assert!(!served_from(ip("127.0.0.1"), server.addr), "past the burst");
    assert!(served_from(ip("127.0.0.2"), server.addr), "another client");
    let record = server.expect_logged_event("rate_limited", |_| true);
    assert_eq!(record["network"], "127.0.0.1", "{record}");
    assert_eq!(record["level"], "warn", "{record}");
}

#[test]
fn tokens_come_back_over_time() {
    let server = ServerProcess::start(&["--max-rate-per-ip", "10/s"]);
    let client = ip("127.0.0.3");
    // A token comes back every 100 ms: a slow machine may get one or two
    // back during the burst, so keep going until the bucket is empty.
    let mut served = 0;
    while served_from(client, server.addr) {
        served += 1;
        assert!(served < 40, "never turned away");
    }
    assert!(served >= 10, "the burst is the count: {served}");
    let refused_at = Instant::now();
    while !served_from(client, server.addr) {
        assert!(refused_at.elapsed() < TIMEOUT, "no token came back");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused_at.elapsed() < Duration::from_secs(2));
}

#[test]
fn ipv4_clients_share_a_bucket_per_rate_prefix_network() {
    let server = ServerProcess::start(&["--max-rate-per-ip", "2/min", "--rate-prefix-v4", "24"]);
    assert!(served_from(ip("127.0.0.1"), server.addr));
    assert!(served_from(ip("127.0.0.2"), server.addr));
    assert!(
        !served_from(ip("127.0.0.3"), server.addr),
        "127.0.0.0/24 has used its two"
    );
    assert!(served_from(ip("127.0.1.1"), server.addr), "another /24");
}

#[test]
fn ipv6_clients_are_grouped_by_the_v6_prefix_on_a_dual_stack_listener() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback here for the IPv6 rate-limit test");
        return;
    }
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--bind", "::", "--max-rate-per-ip", "1/min"])
        .start();
    let v6 = SocketAddr::new(ip("::1"), server.addr.port());
    let v4 = SocketAddr::new(ip("127.0.0.1"), server.addr.port());
    assert!(served_from(ip("::1"), v6));
    assert!(!served_from(ip("::1"), v6));
    let record = server.expect_logged_event("rate_limited", |_| true);
    assert_eq!(record["network"], "::", "::1 in its /64: {record}");
    assert!(message(&record).contains("its network ::/64 "), "{record}");
    // An IPv4 client of the same listener is an IPv4 network of its own.
    assert!(served_from(ip("127.0.0.1"), v4));
}

#[test]
fn spraying_addresses_keeps_the_bucket_table_bounded() {
    let mut server = ServerProcess::builder()
        .json_log()
        .args([
            "--max-rate-per-ip",
            "100/s",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .start();
    let metrics: SocketAddr = server.expect_logged_event("metrics", |_| true)["addr"]
        .as_str()
        .expect("an address")
        .parse()
        .expect("a socket address");
    // 4,000 client networks, each connecting once: a bucket refills in
    // 10 ms, so old ones are full (the same as absent) and swept.
    const SPRAYED: u32 = 4000;
    for n in 0..SPRAYED {
        let source = IpAddr::from([127, 1, (n >> 8) as u8, n as u8]);
        assert!(served_from(source, server.addr), "{source} is new");
    }
    let text = metrics_scrape::scrape(metrics, "/metrics").body;
    let held = metrics_scrape::sample(&text, "prompt_server_rate_limit_networks", &[])
        .unwrap_or_else(|| panic!("no gauge in\n{text}"));
    assert!(
        held <= 2048.0,
        "{held} buckets held after {SPRAYED} networks: idle ones are not dropped"
    );
}

/// With `--proxy-protocol`, a header that names no client (`PROXY
/// UNKNOWN`, as a health check sends) leaves the TCP peer to be limited:
/// it is no way around the limit.
#[test]
fn a_proxy_header_without_a_client_is_limited_by_its_peer() {
    let server = ServerProcess::start(&[
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1",
        "--max-rate-per-ip",
        "2/min",
    ]);
    let through_unknown = || {
        let mut client = connect(server.addr);
        client.write_all(b"PROXY UNKNOWN\r\n").unwrap();
        let first = read_line(&mut client);
        if first == PROMPT {
            client.write_all(b"yes\n").unwrap();
        }
        assert_eq!(read_until_closed(&mut client), b"");
        first
    };
    assert_eq!(through_unknown(), PROMPT);
    assert_eq!(through_unknown(), PROMPT);
    assert_eq!(through_unknown(), BUSY, "127.0.0.1 is past its rate");
}
