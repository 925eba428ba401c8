//! The edges an attacker or an operator reaches, against the real binary:
//! a burst of simultaneous connects, access rules on a dual-stack listener,
//! clean closes when a client sends more than the server reads, connections
//! that could not get a thread, and option values that cannot work.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Reads to the end of the stream and fails on a reset: the close must be
/// a clean FIN.
fn read_clean_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => rest,
        Err(e) => panic!("expected a clean end of stream, got {e} after {rest:?}"),
    }
}

#[test]
fn a_burst_of_simultaneous_connects_is_served_within_two_seconds() {
    const CLIENTS: usize = 1000;
    const THREADS: usize = 8;
    // The test itself holds all the sockets at once.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the test's descriptor limit");
    let server = ServerProcess::start(&["--max-connections", "1100"]);
    let addr = server.addr;

    let start = Arc::new(Barrier::new(THREADS + 1));
    let connectors: Vec<_> = (0..THREADS)
        .map(|_| {
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                (0..CLIENTS / THREADS)
                    .map(|_| TcpStream::connect_timeout(&addr, TIMEOUT))
                    .collect::<Vec<io::Result<TcpStream>>>()
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let deadline = began + Duration::from_secs(2);
    let clients: Vec<TcpStream> = connectors
        .into_iter()
        .flat_map(|connector| connector.join().expect("connector thread"))
        .map(|client| client.expect("connect"))
        .collect();
    assert_eq!(clients.len(), CLIENTS);

    let mut prompted = 0;
    for mut client in clients {
        let left = deadline.saturating_duration_since(Instant::now());
        client
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut prompt = vec![0u8; PROMPT.len()];
        if client.read_exact(&mut prompt).is_ok() && prompt == PROMPT {
            prompted += 1;
        }
    }
    assert_eq!(
        prompted,
        CLIENTS,
        "only {prompted} of {CLIENTS} clients got the prompt within 2 s ({:?} since the burst)",
        began.elapsed()
    );
}

#[test]
fn the_backlog_can_be_set() {
    let mut server = ServerProcess::start(&["--backlog", "16"]);
    session(server.addr, b"queued\n");
    server.expect_line("said: \"queued\"");
}

/// A server on `::` (dual-stack) with `rules`; the IPv4 client address to
/// reach it, and the server.
fn dual_stack_server(rules: &[&str]) -> (ServerProcess, SocketAddr) {
    let mut args = vec!["--bind", "::"];
    args.extend_from_slice(rules);
    let server = ServerProcess::start(&args);
    let ipv4 = SocketAddr::new("127.0.0.1".parse().unwrap(), server.addr.port());
    (server, ipv4)
}

#[test]
fn deny_rules_in_either_form_refuse_ipv4_clients_of_a_dual_stack_listener() {
    for rule in ["127.0.0.1", "::ffff:127.0.0.1", "::ffff:0:0/96"] {
        let (mut server, ipv4) = dual_stack_server(&["--deny", rule]);
        let end = refused_end(ipv4, None, b"");
        assert_eq!(end, End::Reset, "--deny {rule}: no prompt, a reset");
        let line = server.expect_line("refused by the access rules");
        // As plain IPv4, not ::ffff:127.0.0.1.
        assert!(
            line.contains(" 127.0.0.1:"),
            "--deny {rule}: logged as {line}"
        );
    }
}

#[test]
fn allow_rules_in_either_form_admit_ipv4_clients_logged_as_plain_ipv4() {
    for rule in ["127.0.0.1", "::ffff:127.0.0.1", "::ffff:127.0.0.0/104"] {
        let (mut server, ipv4) = dual_stack_server(&["--allow", rule]);
        let mut client = connect(ipv4);
        expect_prompt(&mut client);
        client.write_all(b"mapped\n").unwrap();
        assert_eq!(read_until_closed(&mut client), b"");
        let line = server.expect_line("said: \"mapped\"");
        let peer = local(&client);
        assert_eq!(peer.ip().to_string(), "127.0.0.1");
        assert!(
            line.ends_with(&format!("] {peer} said: \"mapped\"")),
            "--allow {rule}: logged as {line}"
        );
        assert!(!line.contains("::ffff:"), "{line}");
    }
}

#[test]
fn ipv4_clients_of_a_dual_stack_listener_are_counted_per_ipv4_address() {
    let (mut server, ipv4) = dual_stack_server(&["--max-per-ip", "1"]);
    let mut first = connect(ipv4);
    expect_prompt(&mut first);
    let mut second = connect(ipv4);
    assert_eq!(read_until_closed(&mut second), BUSY);
    let line = server.expect_line("turned away");
    assert!(
        line.ends_with(&format!(
            "{} turned away: already 1 connection from 127.0.0.1",
            local(&second)
        )),
        "{line}"
    );
    drop(first);
}

/// The server ends an over-long reply itself: what the client sent past
/// the cap is in no record, so the client must not see a clean close.
#[test]
fn an_over_long_reply_is_recorded_truncated_and_reset() {
    let mut server = ServerProcess::start(&["--max-reply-bytes", "16"]);
    let mut client = server.connect();
    expect_prompt(&mut client);
    client.write_all(&[b'a'; 5000]).unwrap();
    let end = client.read_to_end(&mut Vec::new());
    assert!(
        matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    server.expect_line("(truncated at 16 bytes)");
}

#[test]
fn bytes_after_the_reply_line_get_a_clean_close_not_a_reset() {
    let mut server = ServerProcess::start(&[]);
    let mut client = server.connect();
    expect_prompt(&mut client);
    let mut bytes = b"first line\n".to_vec();
    bytes.extend_from_slice(&[b'z'; 8000]);
    client.write_all(&bytes).unwrap();
    assert_eq!(read_clean_eof(&mut client), b"");
    server.expect_line("said: \"first line\"");
}

/// `echo yes | nc HOST 1337` sends its reply before reading anything: when
/// the server is full, that client must still read the busy line and a
/// clean end of stream (closing over its unread reply would reset the
/// connection, and the busy line would be lost with it).
#[test]
fn a_busy_client_that_already_sent_its_reply_reads_the_busy_line_and_a_clean_close() {
    let server = ServerProcess::start(&["--max-connections", "1"]);
    let mut held = server.connect();
    expect_prompt(&mut held);
    for _ in 0..20 {
        let mut client = server.connect();
        client.write_all(b"yes\n").unwrap();
        assert_eq!(read_clean_eof(&mut client), BUSY);
    }
}

#[test]
fn a_client_that_keeps_sending_is_closed_within_the_linger_bound() {
    let mut server = ServerProcess::start(&[]);
    let client = server.connect();
    let mut reader = client.try_clone().unwrap();
    expect_prompt(&mut reader);
    let sender = thread::spawn(move || {
        let mut client = client;
        client.write_all(b"line\n").unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        let mut sent = 0usize;
        while Instant::now() < until && client.write_all(&[b'b'; 4096]).is_ok() {
            sent += 4096;
        }
        sent
    });
    server.expect_line("said: \"line\"");
    let truncated_at = Instant::now();
    // The server stops reading after 64 KiB or 1 s and closes.
    let _ = reader.read_to_end(&mut Vec::new());
    sender.join().unwrap();
    assert!(
        truncated_at.elapsed() < Duration::from_secs(4),
        "held for {:?}",
        truncated_at.elapsed()
    );
    session(server.addr, b"next\n");
}

#[test]
fn connections_that_could_not_get_a_thread_cost_only_themselves_and_are_counted() {
    // A stack no machine can map makes every connection thread fail to start.
    let mut server = ServerProcess::builder()
        .env("RUST_MIN_STACK", (1u64 << 50).to_string())
        .start();
    for _ in 0..3 {
        let mut client = server.connect();
        assert_eq!(read_clean_eof(&mut client), BUSY);
        server.expect_line(&format!("{} closed: cannot start a thread", local(&client)));
    }
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
    let summary = server.expect_logged("shutdown complete: ");
    assert!(
        summary.contains("shutdown complete: 3 connections") && summary.contains(" 3 failed"),
        "{summary}"
    );
}

#[test]
fn a_thread_cache_that_cannot_work_is_a_command_line_error() {
    for value in ["1000000000", "18446744073709551615", "1025"] {
        let output = ServerProcess::builder()
            .args(["--port", "0", "--thread-cache", value])
            .output();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{value}: {stderr}");
        assert!(stderr.contains("--thread-cache"), "{value}: {stderr}");
        assert!(!stderr.contains("listening on"), "{value}: {stderr}");
    }
}
