//! Graceful shutdown of the real binary: SIGTERM and SIGINT stop accepting,
//! let connected clients finish up to --shutdown-timeout, log every reply
//! that was completed, and exit 0 with a summary; a second signal exits now.

mod common;

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigterm_lets_clients_finish_then_exits_zero_with_a_summary() {
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--shutdown-timeout", "3"])
        .start();

    // Served completely before the signal.
    session(server.addr, b"early\n");
    // Mid-reply when the signal comes, finishes after it.
    let mut finishing = server.connect();
    expect_prompt(&mut finishing);
    finishing.write_all(b"partial").unwrap();
    let peer = local(&finishing).to_string();
    server.expect_event("read", |read| read["peer"] == peer && read["bytes"] == 7);
    // Never replies: still connected when the shutdown timeout runs out.
    let mut silent = server.connect();
    expect_prompt(&mut silent);
    // Sends its whole reply right before the signal.
    let mut just_in_time = server.connect();
    expect_prompt(&mut just_in_time);
    just_in_time.write_all(b"just in time\n").unwrap();

    server.signal("TERM");
    server.expect_event("signal", |signal| signal["signal"] == "SIGTERM");
    let stopping = message(&server.expect_event("shutdown", |_| true));
    let signalled = Instant::now();
    assert!(stopping.contains("waiting up to 3s"), "{stopping}");

    // No new clients once stopping.
    let refused = TcpStream::connect_timeout(&server.addr, TIMEOUT);
    assert!(
        matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "{refused:?}"
    );

    finishing.write_all(b" done\n").unwrap();
    assert_eq!(read_until_closed(&mut finishing), b"");
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{:?}", server.seen);
    let waited = signalled.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "exited after {waited:?}"
    );

    for reply in ["early", "partial done", "just in time"] {
        server.expect_logged_event("reply", |logged| logged["reply"] == reply);
    }
    let summary = message(&server.expect_logged_event("stopped", |_| true));
    assert!(
        summary.ends_with(
            "4 connections, 3 replies, 0 truncated, 0 timed out, 0 without reply, \
             0 failed, 0 rejected busy, 0 rate limited, 0 denied, 1 cut off by shutdown, \
             0 not recorded, 0 still connected"
        ),
        "{summary}"
    );
    drop(silent);
}

#[test]
fn sigint_with_no_clients_exits_at_once() {
    let mut server = ServerProcess::start(&[]);
    server.signal("INT");
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0));
    server.expect_logged("shutdown complete: 0 connections");
}

#[test]
fn second_sigint_exits_without_waiting_for_clients() {
    let mut server = ServerProcess::start(&["--shutdown-timeout", "60"]);
    let mut held = server.connect();
    expect_prompt(&mut held);
    server.signal("INT");
    server.expect_line("1 still connected, waiting");
    let second = Instant::now();
    server.signal("INT");
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(130));
    assert!(
        second.elapsed() < Duration::from_secs(10),
        "{:?}",
        second.elapsed()
    );
    server.expect_logged("SIGINT again: exiting now");
}

/// Busy and denied lines go out at most once a second, each with the count
/// held back since the last; a stop logs what is still held back before
/// its summary, so the log accounts for every refused client.
#[test]
fn refusals_held_back_at_the_stop_are_logged_before_the_summary() {
    const DENIED: u64 = 5;
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--deny", "127.0.0.1"])
        .start();
    for _ in 0..DENIED {
        assert_eq!(refused_end(server.addr, None, b""), End::Reset);
    }
    server.expect_event("denied", |_| true);
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);

    let records: Vec<_> = server.seen.iter().filter_map(|line| record(line)).collect();
    let stopped = records
        .iter()
        .position(|record| record["event"] == "stopped")
        .expect("a summary");
    // A client's line carries its peer and the count held back before it;
    // the stop's line carries only the count.
    let denied = records.iter().filter(|record| record["event"] == "denied");
    let accounted: u64 = denied
        .map(|record| {
            u64::from(record["peer"].is_string()) + record["held_back"].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(accounted, DENIED, "{:#?}", server.seen);
    let last_denied = records
        .iter()
        .rposition(|record| record["event"] == "denied")
        .expect("a denied line");
    assert!(last_denied < stopped, "{:#?}", server.seen);
    let summary = message(&records[stopped]);
    assert!(summary.contains(&format!(" {DENIED} denied")), "{summary}");
}
