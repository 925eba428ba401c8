//! The signals an operator (or a tool) sends, against the real binary: none
//! but a stop signal ends the server, and none ends it without its drain.
//! SIGHUP without `--log-file` is logged and ignored, SIGUSR1 logs the
//! counters, signals that mean nothing here (SIGUSR2, SIGALRM, SIGXFSZ, a
//! real-time signal, ...) are logged and ignored, and after each a session
//! is served; SIGQUIT and SIGABRT drain like SIGTERM. (SIGHUP with a log file is in
//! tests/rotation.rs.)

mod common;

use std::io::Write;

use common::*;

/// Sends `signal` (a name for kill(1)), waits for the `signal` event that
/// names `logged_as`, and returns its message.
fn signal_and_expect_line(server: &mut ServerProcess, signal: &str, logged_as: &str) -> String {
    server.signal(signal);
    let record = server.expect_event("signal", |record| record["signal"] == logged_as);
    message(&record)
}

/// A session after `signal`, whose reply is then in the log.
fn still_serving_after(server: &mut ServerProcess, signal: &str) {
    let reply = format!("after {signal}");
    let (peer, end) = session_end(server.addr, &reply);
    assert_eq!(end, End::Clean, "{peer}: a session after {signal}");
    let peer = peer.to_string();
    server.expect_event("reply", |record| {
        record["peer"] == peer && record["reply"] == reply
    });
}

#[test]
fn signals_that_mean_nothing_here_are_logged_and_ignored() {
    let mut server = ServerProcess::builder().json_log().start();
    let cases = [
        (
            "HUP",
            "SIGHUP",
            "SIGHUP received: no log file to reopen; ignored",
        ),
        ("USR2", "SIGUSR2", "SIGUSR2 received: ignored"),
        ("ALRM", "SIGALRM", "SIGALRM received: ignored"),
        ("XFSZ", "SIGXFSZ", "SIGXFSZ received: ignored"),
        ("VTALRM", "SIGVTALRM", "SIGVTALRM received: ignored"),
        ("PROF", "SIGPROF", "SIGPROF received: ignored"),
        ("XCPU", "SIGXCPU", "SIGXCPU received: ignored"),
        ("IO", "SIGIO", "SIGIO received: ignored"),
        ("TRAP", "SIGTRAP", "SIGTRAP received: ignored"),
        ("SYS", "SIGSYS", "SIGSYS received: ignored"),
    ];
    for (signal, logged_as, expected) in cases {
        let line = signal_and_expect_line(&mut server, signal, logged_as);
        assert_eq!(line, expected);
        still_serving_after(&mut server, signal);
    }
    // A real-time signal is named from SIGRTMIN.
    let rtmin = libc::SIGRTMIN().to_string();
    let line = signal_and_expect_line(&mut server, &rtmin, "SIGRTMIN+0");
    assert_eq!(line, "SIGRTMIN+0 received: ignored");
    still_serving_after(&mut server, "RTMIN");

    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);
}

#[test]
fn sigusr1_logs_the_counters_so_far_and_serving_goes_on() {
    let mut server = ServerProcess::builder().json_log().start();
    let (_, end) = session_end(server.addr, "counted");
    assert_eq!(end, End::Clean);
    let mut held = server.connect();
    expect_prompt(&mut held);

    server.signal("USR1");
    let counters = server.expect_event("counters", |_| true);
    assert_eq!(counters["connections"], 2, "{counters}");
    assert_eq!(counters["replies"], 1, "{counters}");
    assert_eq!(counters["connected"], 1, "{counters}");
    assert_eq!(counters["not_recorded"], 0, "{counters}");
    let text = message(&counters);
    assert!(
        text.starts_with("counters so far: 2 connections, 1 reply, ")
            && text.ends_with(", 0 not recorded, 1 connected now"),
        "{text}"
    );
    still_serving_after(&mut server, "USR1");

    server.signal("USR1");
    let counters = server.expect_event("counters", |_| true);
    assert_eq!(counters["replies"], 2, "{counters}");
    drop(held);
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);
    assert_eq!(
        server.events("counters").len(),
        2,
        "one counters line per SIGUSR1"
    );
}

/// SIGQUIT and SIGABRT (the core-dump signals) drain like SIGTERM.
#[test]
fn sigquit_and_sigabrt_drain_like_sigterm() {
    for signal in ["QUIT", "ABRT"] {
        drains_like_sigterm(signal);
    }
}

fn drains_like_sigterm(signal: &str) {
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--shutdown-timeout", "5"])
        .start();
    let (_, end) = session_end(server.addr, "before");
    assert_eq!(end, End::Clean);
    let mut finishing = server.connect();
    expect_prompt(&mut finishing);
    finishing.write_all(b"half").unwrap();
    let peer = local(&finishing).to_string();
    server.expect_event("read", |read| read["peer"] == peer);

    let line = signal_and_expect_line(&mut server, signal, &format!("SIG{signal}"));
    assert_eq!(
        line,
        format!("SIG{signal} received: stopping (send it again to exit at once)")
    );
    server.expect_event("shutdown", |_| true);
    finishing.write_all(b" after\n").unwrap();
    assert_eq!(end_of(&mut finishing), End::Clean);

    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{:#?}", server.seen);
    server.expect_logged_event("reply", |record| record["reply"] == "half after");
    let stopped = server.expect_logged_event("stopped", |_| true);
    assert_eq!(stopped["replies"], 2, "{stopped}");
    assert_eq!(stopped["cut_off"], 0, "{stopped}");
    assert_eq!(stopped["not_recorded"], 0, "{stopped}");
}

#[test]

fn sigpwr_and_sigstkflt_are_logged_by_name() {
    let mut server = ServerProcess::builder().json_log().start();
    for signal in ["PWR", "STKFLT"] {
        server.signal(signal);
        let record = server.expect_event("signal", |_| true);
        assert_eq!(
            message(&record),
            format!("SIG{signal} received: ignored"),
            "{record}"
        );
        still_serving_after(&mut server, signal);
    }
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);
}

/// `RUST_LOG=warn` keeps what an operator asks for or must know: SIGUSR1's
/// counters, and the count of refusals held back at the stop (at the level
/// of the refusals themselves).
#[test]
fn with_rust_log_warn_counters_and_held_back_refusals_still_show() {
    let mut server = ServerProcess::builder()
        .json_log()
        .env("RUST_LOG", "warn")
        .args(["--deny", "127.0.0.1"])
        .start();
    // Refused clients first: then the server is surely serving (and so
    // has its counters to log).
    for _ in 0..3 {
        assert_eq!(refused_end(server.addr, None, b""), End::Reset);
    }
    server.signal("USR1");
    server.expect_event("counters", |_| true);
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);
    let denied = server.events("denied");
    let last = denied.last().expect("denied lines");
    assert!(
        last["held_back"].as_u64() >= Some(1) && message(last).contains("more denied line"),
        "{:#?}",
        server.seen
    );
}
