//! A stalled log consumer never freezes the server: the real binary runs
//! with its stderr in a pipe that the test stops reading once it has the
//! `listening on` line. When the pipe (64 KiB) is full, connection threads
//! wait for their reply line to be written, the connection slots fill, and
//! new clients get the busy line at once; SIGTERM still stops the process
//! (exit status 3: log lines left unwritten). Once the pipe is read again,
//! the clients that were kept waiting are closed cleanly, and every client
//! that saw a clean close has its reply in the log.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const BUSY: &[u8] = b"server busy, try again later\n";
/// Connection slots: this many clients waiting for the log make the next
/// one busy.
const MAX_CONNECTIONS: &str = "20";
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// `server::LOG_DRAIN_TIMEOUT`, plus its `RELEASE_TIMEOUT` of 1 s.
const LOG_DRAIN_AND_RELEASE: Duration = Duration::from_secs(6);
/// How long a client waits for the clean close that follows its reply
/// before it counts as kept waiting.
const CLOSE_WAIT: Duration = Duration::from_millis(300);
/// Bounds on the clients it takes to fill the pipe and the slots (about
/// 400 bytes of trace lines per client: some 170 clients fill 64 KiB).
const MAX_CLIENTS: usize = 5000;
const FILL_TIME: Duration = Duration::from_secs(30);

/// The binary on 127.0.0.1, port 0, logging at trace level, with its log
/// read only up to the `listening on` line.
fn start_stalled() -> ServerProcess {
    ServerProcess::builder()
        .args(["--max-connections", MAX_CONNECTIONS])
        .args(["--reply-timeout", "5"])
        .args([
            "--shutdown-timeout",
            &SHUTDOWN_TIMEOUT.as_secs().to_string(),
        ])
        .stall_log()
        .start()
}

/// A client that sent its reply.
struct Replied {
    stream: TcpStream,
    addr: SocketAddr,
    reply: String,
    /// Whether it saw a clean close within [`CLOSE_WAIT`].
    closed: bool,
}

/// How one client of [`fill`] fared.
enum Client {
    Replied(Replied),
    /// Got the busy line this long after it connected.
    Busy(Duration),
}

/// One client: connect, read the prompt, send `reply N`, and see whether
/// the server closes cleanly within [`CLOSE_WAIT`].
fn one_client(addr: SocketAddr, n: usize) -> Client {
    let mut stream = connect(addr);
    let connected = Instant::now();
    let first = read_line(&mut stream);
    if first == BUSY {
        return Client::Busy(connected.elapsed());
    }
    assert_eq!(first, PROMPT, "client {n}: prompt");
    let reply = format!("reply {n}");
    stream.write_all(format!("{reply}\n").as_bytes()).unwrap();
    stream.set_read_timeout(Some(CLOSE_WAIT)).unwrap();
    let mut byte = [0u8; 1];
    let closed = match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("client {n}: unexpected byte {byte:?} after the prompt"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) => panic!("client {n}: expected a clean close or none yet, got {e}"),
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    Client::Replied(Replied {
        addr: local(&stream),
        stream,
        reply,
        closed,
    })
}

/// Runs clients one after another until one is turned away busy, and
/// returns the ones that replied. Fails if busy never comes, or comes late.
fn fill_until_busy(addr: SocketAddr) -> Vec<Replied> {
    let started = Instant::now();
    let mut replied = Vec::new();
    for n in 0..MAX_CLIENTS {
        assert!(
            started.elapsed() < FILL_TIME,
            "no busy line after {n} clients in {FILL_TIME:?}"
        );
        match one_client(addr, n) {
            Client::Replied(client) => replied.push(client),
            Client::Busy(after) => {
                assert!(
                    after < Duration::from_secs(1),
                    "the busy line came {after:?} after connecting"
                );
                let waiting = replied.iter().filter(|c| !c.closed).count();
                assert!(
                    waiting > 0,
                    "busy after {n} clients, none of which was kept waiting"
                );
                return replied;
            }
        }
    }
    panic!("no busy line after {MAX_CLIENTS} clients");
}

#[test]
fn a_stalled_log_degrades_to_busy_and_sigterm_still_stops_it() {
    let mut server = start_stalled();
    let clients = fill_until_busy(server.addr);
    // Still waiting now, so never closed cleanly before the signal (one
    // that was only slow to close within CLOSE_WAIT is left out).
    let waiting: Vec<Replied> = clients
        .into_iter()
        .filter(|client| !client.closed && still_waiting(&client.stream))
        .collect();
    assert!(!waiting.is_empty(), "no client still waiting for the log");

    server.signal("TERM");
    let signalled = Instant::now();
    let deadline = signalled + SHUTDOWN_TIMEOUT + LOG_DRAIN_AND_RELEASE + Duration::from_secs(8);
    let Some(status) = server.exit_status_by(deadline) else {
        panic!(
            "with the log stalled, the server did not exit within {:?} of SIGTERM",
            deadline - signalled
        );
    };
    let took = signalled.elapsed();
    assert_eq!(
        status.code(),
        Some(3),
        "exit status with log lines unwritten (after {took:?})"
    );
    eprintln!("exited {took:?} after SIGTERM with the log stalled");

    // Their replies never reached the log: each connection is reset, not
    // closed cleanly.
    for mut client in waiting {
        let mut rest = Vec::new();
        match client.stream.read_to_end(&mut rest) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!(
                "{} ({:?}), kept waiting, read {other:?} ({rest:?}) at the exit instead of a reset",
                client.addr, client.reply
            ),
        }
    }
}

#[test]
fn after_the_log_drains_every_cleanly_closed_client_has_its_reply_logged() {
    let mut server = start_stalled();
    let mut clients = fill_until_busy(server.addr);
    let kept_waiting = clients.iter().filter(|client| !client.closed).count();

    server.resume_log();
    // Their lines get written now, and then they are closed cleanly.
    for client in clients.iter_mut().filter(|client| !client.closed) {
        let mut rest = Vec::new();
        match client.stream.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => client.closed = true,
            other => panic!(
                "{} ({:?}), kept waiting, read {other:?} ({rest:?}) once the log drained \
                 instead of a clean close",
                client.addr, client.reply
            ),
        }
    }

    server.signal("TERM");
    let status = server.wait_exit();
    let log = &server.seen;
    assert_eq!(
        status.code(),
        Some(0),
        "the log was drained before the stop"
    );

    let said: Vec<&String> = log.iter().filter(|line| line.contains(" said: ")).collect();
    for client in &clients {
        assert!(client.closed);
        let expected = format!("{} said: \"{}\"", client.addr, client.reply);
        let found = said.iter().filter(|line| line.ends_with(&expected)).count();
        assert_eq!(
            found,
            1,
            "lines with {expected:?} for a cleanly closed client; log:\n{}",
            log.join("\n")
        );
    }
    assert_eq!(said.len(), clients.len(), "said lines: {said:#?}");
    let summary = log
        .iter()
        .find(|line| line.contains("shutdown complete: "))
        .unwrap_or_else(|| panic!("no summary line; log:\n{}", log.join("\n")));
    let replies = format!(" {} replies, ", said.len());
    assert!(
        summary.contains(&replies),
        "summary should count {replies:?}: {summary}"
    );
    eprintln!(
        "{} clients replied, {kept_waiting} were kept waiting by the stalled log",
        clients.len()
    );
}

/// A reply too long for the pipe's atomic write (`PIPE_BUF`) goes through
/// the log queue: with the pipe full, its client waits for the log, and is
/// reset once `--record-timeout` runs out. No client waits longer, not
/// even one whose record was being written when the pipe filled.
#[test]
fn on_a_stalled_log_every_client_ends_within_the_record_timeout() {
    const RECORD_TIMEOUT: Duration = Duration::from_secs(2);
    let server = ServerProcess::builder()
        .args(["--record-timeout", &RECORD_TIMEOUT.as_secs().to_string()])
        .args(["--max-reply-bytes", "4000", "--max-connections", "100"])
        .stall_log()
        .start();
    let addr = server.addr;
    let clients: Vec<_> = (0..40)
        .map(|n| {
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                if read_line(&mut stream) != PROMPT {
                    return None;
                }
                let started = Instant::now();
                let reply = format!("{}{n}\n", "x".repeat(3000));
                let end = send_and_see_end(&mut stream, reply.as_bytes());
                Some((end, started.elapsed()))
            })
        })
        .collect();
    let ends: Vec<(End, Duration)> = clients
        .into_iter()
        .filter_map(|client| client.join().expect("client thread"))
        .collect();
    for (end, took) in &ends {
        assert!(
            *took < RECORD_TIMEOUT + Duration::from_secs(3),
            "a client saw {end:?} only after {took:?}"
        );
    }
    assert!(
        ends.iter().any(|(end, _)| *end == End::Reset),
        "the log never stalled: {ends:?}"
    );
}

/// A slow reader of stderr: records short enough for one atomic pipe write
/// (written by their own thread) and long ones (written by the log queue,
/// in several writes as the pipe empties) all arrive as whole lines, none
/// inside another.
#[test]
fn records_on_a_slowly_read_pipe_are_never_spliced() {
    let mut command = ServerProcess::builder()
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--max-reply-bytes",
            "4000",
        ])
        .args(["--max-connections", "400"])
        .env("RUST_LOG", "warn")
        .command();
    let mut child = KillOnDrop(
        command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start prompt-server"),
    );
    let mut stderr = child.stderr.take().expect("stderr");
    let mut log = Vec::new();
    while !String::from_utf8_lossy(&log).contains('\n') {
        let mut byte = [0u8; 1];
        assert_eq!(stderr.read(&mut byte).expect("the listening line"), 1);
        log.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&log).into_owned();
    let addr: SocketAddr = line.rsplit(' ').next().unwrap().trim().parse().unwrap();
    // Reads 4 KiB every 10 ms until the pipe is closed.
    let reader = std::thread::spawn(move || {
        let mut log = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut chunk) {
            log.extend_from_slice(&chunk[..n]);
            std::thread::sleep(Duration::from_millis(10));
        }
        log
    });
    let replies: Vec<String> = (0..300)
        .map(|n| match n % 3 {
            0 => format!("long-{n}-{}-end", "y".repeat(3000)),
            _ => format!("short-{n}-end"),
        })
        .collect();
    let clients: Vec<_> = replies
        .iter()
        .cloned()
        .map(|reply| {
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                expect_prompt(&mut stream);
                send_and_see_end(&mut stream, format!("{reply}\n").as_bytes())
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = String::from_utf8_lossy(&reader.join().expect("reader")).into_owned();
    let said: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(" said: "))
        .collect();
    for line in &said {
        let reply = line.split(" said: \"").nth(1).unwrap_or_default();
        let reply = reply.strip_suffix('"').unwrap_or_default();
        assert!(
            replies.iter().any(|sent| sent == reply),
            "a spliced line: {line:?}"
        );
    }
    assert!(!said.is_empty(), "no replies in {log:?}");
}
