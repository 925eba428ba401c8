//! Hostile and broken clients against the real binary on loopback: idle and
//! dribbling clients, floods past the connection cap,
//! resets and garbage. Each test is bounded in clients and time.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use socket2::SockRef;

/// JSON log records about `peer` above debug level: what an operator sees
/// of it.
fn outcome_records(server: &ServerProcess, peer: &str) -> Vec<Value> {
    server
        .seen
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).expect("a JSON log line"))
        .filter(|record| {
            (record["peer"] == peer || message(record).contains(&format!("{peer} ")))
                && record["level"] != "debug"
                && record["level"] != "trace"
        })
        .collect()
}

#[test]
fn idle_and_dribbling_clients_are_closed_at_the_reply_timeout() {
    const IDLE: usize = 500;
    const DRIBBLERS: usize = 5;
    const REPLY_TIMEOUT: Duration = Duration::from_secs(4);
    let mut server = ServerProcess::start(&["--reply-timeout", "4"]);

    let started = Instant::now();
    let mut idle: Vec<TcpStream> = (0..IDLE).map(|_| server.connect()).collect();
    for client in &mut idle {
        expect_prompt(client);
    }
    // Dribblers send a byte every 200 ms and never a newline: each read
    // resets nothing, the budget is for the whole reply.
    let dribblers: Vec<_> = (0..DRIBBLERS)
        .map(|_| {
            let mut client = server.connect();
            thread::spawn(move || {
                expect_prompt(&mut client);
                let connected = Instant::now();
                while client.write_all(b"x").is_ok() && connected.elapsed() < TIMEOUT {
                    if !still_waiting(&client) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                read_until_closed(&mut client);
                connected.elapsed()
            })
        })
        .collect();

    // Fresh clients are served at once while all of those are held.
    for i in 0..20 {
        let fresh = Instant::now();
        session(server.addr, format!("fresh {i}\n").as_bytes());
        assert!(
            fresh.elapsed() < Duration::from_secs(1),
            "fresh session took {:?}",
            fresh.elapsed()
        );
    }
    assert!(
        still_waiting(&idle[0]) && still_waiting(&idle[IDLE - 1]),
        "idle clients closed before the fresh sessions were done ({:?})",
        started.elapsed()
    );

    for client in &mut idle {
        assert_eq!(read_until_closed(client), b"");
    }
    let closed_after = started.elapsed();
    assert!(
        closed_after >= REPLY_TIMEOUT,
        "closed early: {closed_after:?}"
    );
    for dribbler in dribblers {
        let held = dribbler.join().unwrap();
        assert!(
            held >= REPLY_TIMEOUT && held < REPLY_TIMEOUT + Duration::from_secs(3),
            "dribbler held its connection for {held:?}"
        );
    }
    for _ in 0..IDLE + DRIBBLERS {
        server.expect_line("timed out after 4s without a full reply");
    }
    session(server.addr, b"still here\n");
    server.expect_line("said: \"still here\"");
}

#[test]
fn connections_past_the_cap_get_the_busy_line() {
    let mut server = ServerProcess::start(&["--max-connections", "5"]);
    let mut held: Vec<TcpStream> = (0..5).map(|_| server.connect()).collect();
    for client in &mut held {
        expect_prompt(client);
    }
    for i in 0..10 {
        let mut extra = server.connect();
        assert_eq!(read_until_closed(&mut extra), BUSY);
        // One line a second at most: the first is logged at once.
        if i == 0 {
            server.expect_line(&format!("{} turned away", local(&extra)));
        }
    }
    // The held clients were not disturbed.
    for (i, client) in held.iter_mut().enumerate() {
        assert!(still_waiting(client));
        client.write_all(format!("held {i}\n").as_bytes()).unwrap();
        assert_eq!(read_until_closed(client), b"");
        server.expect_line(&format!("said: \"held {i}\""));
    }
    // Slots are free again: normal service.
    for _ in 0..5 {
        session(server.addr, b"after the flood\n");
    }
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
    let summary = server.expect_logged("shutdown complete: ");
    assert!(summary.contains(" 10 rejected busy"), "{summary}");
    let busy_lines = server
        .seen
        .iter()
        .filter(|l| l.contains("turned away"))
        .count();
    assert!(busy_lines <= 3, "{busy_lines} busy lines for 10 clients");
}

#[test]
fn a_freed_slot_is_usable_as_soon_as_its_client_sees_the_close() {
    let server = ServerProcess::start(&["--max-connections", "1"]);
    for i in 0..20 {
        session(server.addr, format!("turn {i}\n").as_bytes());
    }
}

#[test]
fn resets_early_closes_and_garbage_are_each_logged_once() {
    let mut server = ServerProcess::builder().json_log().start();
    let mut peers = Vec::new();

    // Reset at once (SO_LINGER 0 makes close send RST).
    let reset = server.connect();
    SockRef::from(&reset)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    peers.push(local(&reset).to_string());
    drop(reset);

    // Reset after reading the prompt, mid-reply.
    let mut reset_mid = server.connect();
    expect_prompt(&mut reset_mid);
    reset_mid.write_all(b"half a rep").unwrap();
    let peer = local(&reset_mid).to_string();
    server.expect_event("read", |read| read["peer"] == peer && read["bytes"] == 10);
    SockRef::from(&reset_mid)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    peers.push(local(&reset_mid).to_string());
    drop(reset_mid);

    // Close before reading the prompt.
    let early = server.connect();
    peers.push(local(&early).to_string());
    drop(early);

    // Binary garbage, newline included somewhere.
    let mut garbage = server.connect();
    let mut state = 0x2545_f491_u32;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    expect_prompt(&mut garbage);
    garbage.write_all(&bytes).unwrap();
    read_until_closed(&mut garbage);
    peers.push(local(&garbage).to_string());

    for peer in &peers {
        server.expect_logged_event("disconnected", |gone| gone["peer"] == *peer);
        let records = outcome_records(&server, peer);
        assert_eq!(records.len(), 1, "{peer}: {records:?}");
        // The message is what the text format writes.
        let message = message(&records[0]);
        assert!(!message.chars().any(char::is_control), "{message:?}");
    }
    session(server.addr, b"fine\n");
    server.expect_event("reply", |reply| reply["reply"] == "fine");
    assert!(!server.seen.iter().any(|l| l.contains("panicked")));
}

/// The summary's connection count is every connection accepted, so that
/// its outcomes add up to it: busy clients at the cap are in it too.
#[test]
fn the_summary_counts_every_accepted_connection_whatever_became_of_it() {
    let mut server = ServerProcess::start(&["--max-connections", "1"]);
    let mut held = server.connect();
    expect_prompt(&mut held);
    for _ in 0..2 {
        let mut busy = server.connect();
        assert_eq!(read_until_closed(&mut busy), BUSY);
    }
    held.write_all(b"held\n").unwrap();
    assert_eq!(read_until_closed(&mut held), b"");
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
    let summary = server.expect_logged("shutdown complete: ");
    assert!(
        summary.contains("shutdown complete: 3 connections, 1 reply, ")
            && summary.contains(" 2 rejected busy, "),
        "{summary}"
    );
}
