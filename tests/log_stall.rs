//! A stalled log consumer never freezes the server: the real binary runs
//! with its stderr in a pipe that the test stops reading once it has the
//! `listening on` line. When the pipe (64 KiB) is full, connection threads
//! wait for their reply line to be written, the connection slots fill, and
//! new clients get the busy line at once; SIGTERM still stops the process
//! (exit status 3: log lines left unwritten). Once the pipe is read again,
//! the clients that were kept waiting are closed cleanly, and every client
//! that saw a clean close has its reply in the log.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
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

/// The server process, with its stderr parked unread; killed (by its PID)
/// when dropped.
struct StalledServer {
    child: Child,
    addr: SocketAddr,
    /// The unread rest of stderr, until the test drains it.
    stderr: Option<BufReader<ChildStderr>>,
    /// The lines read up to `listening on`.
    seen: Vec<String>,
}

impl StalledServer {
    /// Starts the binary on 127.0.0.1, port 0, logging at trace level, and
    /// reads its stderr only up to the `listening on` line.
    fn start() -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_prompt-server"));
        command
            .env("RUST_LOG", "prompt_server=trace")
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--max-connections", MAX_CONNECTIONS])
            .args(["--reply-timeout", "5"])
            .args([
                "--shutdown-timeout",
                &SHUTDOWN_TIMEOUT.as_secs().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start prompt-server");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut server = StalledServer {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            stderr: None,
            seen: Vec::new(),
        };
        let (sender, up_to_listening) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut seen = Vec::new();
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(n) if n > 0 => {
                        let listening = line.contains("listening on ");
                        seen.push(line.trim_end().to_string());
                        if listening {
                            let _ = sender.send(Ok((seen, reader)));
                            return;
                        }
                    }
                    _ => {
                        let _ = sender.send(Err(seen));
                        return;
                    }
                }
            }
        });
        let (seen, reader) = match up_to_listening.recv_timeout(TIMEOUT) {
            Ok(Ok(found)) => found,
            Ok(Err(seen)) => panic!("server exited before listening:\n{}", seen.join("\n")),
            Err(e) => panic!("no 'listening on' line in {TIMEOUT:?}: {e}"),
        };
        let line = seen.last().unwrap();
        let after = line.rsplit("listening on ").next().unwrap();
        let addr: String = after.chars().take_while(|c| !c.is_whitespace()).collect();
        server.addr = addr.parse().expect("an address after 'listening on'");
        server.stderr = Some(reader);
        server.seen = seen;
        server
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Polls for the exit until `deadline`, without reading stderr.
    fn exit_status_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts reading the rest of stderr, line by line, on a thread.
    fn drain(&mut self) -> Receiver<String> {
        let mut reader = self.stderr.take().expect("stderr not drained yet");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                if sender.send(text).is_err() {
                    break;
                }
                line.clear();
            }
        });
        lines
    }
}

impl Drop for StalledServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let mut server = StalledServer::start();
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
    let mut server = StalledServer::start();
    let mut clients = fill_until_busy(server.addr);
    let kept_waiting = clients.iter().filter(|client| !client.closed).count();

    let lines = server.drain();
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
    let mut log = std::mem::take(&mut server.seen);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => log.push(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "server did not exit in {TIMEOUT:?}; saw:\n{}",
                    log.join("\n")
                )
            }
        }
    }
    let status = server
        .exit_status_by(Instant::now() + TIMEOUT)
        .expect("stderr closed, yet the server did not exit");
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
