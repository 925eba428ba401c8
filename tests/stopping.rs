//! Shutdown loses no reply the server read, against the real binary:
//! replies that arrive right at the shutdown deadline are each logged once
//! (as said, or as cut off with what had arrived), and clients already
//! queued on the listener when SIGTERM comes are all served and logged.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How a client's connection ended.
#[derive(Debug)]
enum End {
    /// A clean end of stream, after these bytes.
    Clean(Vec<u8>),
    /// A reset or another error.
    Failed(ErrorKind),
}

/// Reads to the end of the stream and says how it ended.
fn read_end(stream: &mut TcpStream) -> End {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => End::Clean(rest),
        Err(e) => End::Failed(e.kind()),
    }
}

/// The outcome lines the server logs about a served connection, one per
/// connection.
const OUTCOMES: [&str; 6] = [
    " said: ",
    " cut off by shutdown ",
    " closed without replying",
    " timed out after ",
    " read error: ",
    " could not be sent the prompt",
];

/// The log lines that give the outcome of `addr`'s connection.
fn outcome_lines(log: &[String], addr: SocketAddr) -> Vec<&String> {
    let me = format!("{addr} ");
    log.iter()
        .filter(|line| {
            line.find(&me)
                .is_some_and(|at| OUTCOMES.iter().any(|o| line[at..].contains(o)))
        })
        .collect()
}

/// The summary's "N replies" text.
fn replies(n: usize) -> String {
    format!(", {n} {}, ", if n == 1 { "reply" } else { "replies" })
}

/// Raises this test process's descriptor limit: it holds every client.
fn raise_fd_limit() {
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the test's descriptor limit");
}

#[test]
fn replies_sent_right_before_the_deadline_are_each_logged_once() {
    const CLIENTS: usize = 300;
    const THREADS: usize = 4;
    const SPREAD: Duration = Duration::from_millis(4);
    raise_fd_limit();
    let mut server = ServerProcess::start(&["--shutdown-timeout", "1"]);
    let mut clients: Vec<(usize, TcpStream)> = (0..CLIENTS)
        .map(|n| {
            let mut stream = server.connect();
            expect_prompt(&mut stream);
            (n, stream)
        })
        .collect();

    server.signal("TERM");
    server.expect_line("shutting down");
    // The deadline is 1 s after that line was logged: the clients send
    // from a little before it to a little after, a few at a time.
    thread::sleep(Duration::from_millis(850));
    let mut groups: Vec<Vec<(usize, TcpStream)>> = (0..THREADS).map(|_| Vec::new()).collect();
    for (i, client) in clients.drain(..).enumerate() {
        groups[i % THREADS].push(client);
    }
    let senders: Vec<_> = groups
        .into_iter()
        .map(|group| {
            thread::spawn(move || {
                let sent: Vec<_> = group
                    .into_iter()
                    .map(|(n, mut stream)| {
                        // Spreads the sends over some 300 ms.
                        thread::sleep(SPREAD);
                        let sent = stream.write_all(format!("late {n}\n").as_bytes());
                        (n, stream, sent)
                    })
                    .collect();
                sent.into_iter()
                    .map(|(n, mut stream, sent)| {
                        let end = match sent {
                            Ok(()) => read_end(&mut stream),
                            // Refused: the server had closed it already.
                            Err(e) => End::Failed(e.kind()),
                        };
                        (n, local(&stream), end)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ends: Vec<(usize, SocketAddr, End)> = senders
        .into_iter()
        .flat_map(|sender| sender.join().expect("client thread"))
        .collect();

    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{:#?}", server.seen);
    let log = &server.seen;
    let complete = log
        .iter()
        .position(|line| line.contains("shutdown complete: "))
        .expect("a summary line");

    let (mut clean, mut said, mut cut_off) = (0, 0, 0);
    for (n, addr, end) in &ends {
        let lines = outcome_lines(log, *addr);
        assert!(
            lines.len() <= 1,
            "client {n} ({addr}, {end:?}) has more than one line: {lines:#?}"
        );
        if let End::Clean(rest) = end {
            clean += 1;
            assert_eq!(rest, b"", "client {n}: nothing after the prompt");
            assert_eq!(
                lines.len(),
                1,
                "client {n} ({addr}) saw a clean close but its reply is not in the log"
            );
        }
        let Some(line) = lines.first() else { continue };
        if line.contains(&format!("{addr} said: \"late {n}\"")) {
            said += 1;
        } else if let Some(got) = line
            .split_once(&format!(
                "{addr} cut off by shutdown before a full reply; got \""
            ))
            .and_then(|(_, got)| got.strip_suffix('"'))
        {
            cut_off += 1;
            // What had arrived of "late N\n" by the cut-off, if anything.
            assert!(
                format!("late {n}").starts_with(got),
                "client {n}: cut off with {got:?}"
            );
        } else {
            panic!("client {n} ({addr}): unexpected line {line:?}");
        }
    }
    for line in &log[complete + 1..] {
        assert!(
            !line.contains("127.0.0.1:"),
            "a line about a client after the summary: {line:?}"
        );
    }
    let summary = &log[complete];
    assert_eq!(
        log.iter().filter(|line| line.contains(" said: ")).count(),
        said,
        "said lines about clients other than these"
    );
    assert!(
        summary.contains(&format!(": {CLIENTS} connections, ")),
        "{summary}"
    );
    assert!(summary.ends_with(", 0 still connected"), "{summary}");
    assert!(summary.contains(&replies(said)), "{said} said: {summary}");
    assert!(
        summary.contains(&format!(", {cut_off} cut off by shutdown, ")),
        "{cut_off} cut off: {summary}"
    );
    let failed: Vec<ErrorKind> = ends
        .iter()
        .filter_map(|(_, _, end)| match end {
            End::Failed(kind) => Some(*kind),
            End::Clean(_) => None,
        })
        .collect();
    eprintln!(
        "{CLIENTS} clients: {clean} closed cleanly, failed: {failed:?}; {said} said, {cut_off} cut off"
    );
}

#[test]
fn clients_queued_at_sigterm_are_served() {
    const CLIENTS: usize = 600;
    const THREADS: usize = 4;
    raise_fd_limit();
    let mut server = ServerProcess::start(&["--shutdown-timeout", "5"]);
    let addr = server.addr;
    let connectors: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                (t..CLIENTS)
                    .step_by(THREADS)
                    .map(|n| {
                        let mut stream = connect(addr);
                        stream
                            .write_all(format!("queued {n}\n").as_bytes())
                            .unwrap();
                        (n, stream)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut clients: Vec<(usize, TcpStream)> = connectors
        .into_iter()
        .flat_map(|connector| connector.join().expect("connector thread"))
        .collect();
    // Every handshake is complete and every reply in the kernel's hands.
    server.signal("TERM");
    let signalled = Instant::now();
    assert_eq!(clients.len(), CLIENTS);

    let mut failures = Vec::new();
    for (n, stream) in &mut clients {
        match read_end(stream) {
            End::Clean(bytes) if bytes == PROMPT => {}
            end => failures.push(format!("client {n} ({}): {end:?}", local(stream))),
        }
    }
    let status = server.wait_exit();
    let took = signalled.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients queued at SIGTERM were not served: {failures:#?}",
        failures.len()
    );
    assert_eq!(status.code(), Some(0), "{:#?}", server.seen);
    let log = &server.seen;
    for (n, stream) in &clients {
        let addr = local(stream);
        let lines = outcome_lines(log, addr);
        let expected = format!("{addr} said: \"queued {n}\"");
        assert!(
            lines.len() == 1 && lines[0].ends_with(&expected),
            "client {n}: expected one line with {expected:?}, got {lines:#?}"
        );
    }
    let summary = log
        .iter()
        .find(|line| line.contains("shutdown complete: "))
        .expect("a summary line");
    assert!(
        summary.contains(&format!(": {CLIENTS} connections{}", replies(CLIENTS))),
        "{summary}"
    );
    // How many were still to be accepted or started when the signal came
    // (for the record: the test holds either way).
    let signal_at = log
        .iter()
        .position(|line| line.contains("SIGTERM received"))
        .expect("a signal line");
    let late_starts = log[signal_at..]
        .iter()
        .filter(|line| line.ends_with(" connected"))
        .count();
    eprintln!(
        "{CLIENTS} queued clients served; {late_starts} started after the signal line; \
         exit {took:?} after SIGTERM"
    );
}
