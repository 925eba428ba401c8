//! Shared test harness: runs the real `prompt-server` binary on port 0, reads
//! the bound address from its `listening on ADDR` line, and lets a test wait
//! for log lines. Every client socket it makes has read and write timeouts.

#![allow(dead_code)] // each test file uses its own part of the harness

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for anything (a log line, a byte, an exit) before
/// failing: generous, because CI machines are shared, yet bounded.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub const PROMPT: &[u8] = b"Do you want to play a game?\n";

/// A running `prompt-server` process, killed (by its PID) when dropped.
pub struct ServerProcess {
    child: Child,
    /// The address from the `listening on` line.
    pub addr: SocketAddr,
    lines: Receiver<String>,
    /// Every stderr line seen so far, for failure messages.
    pub seen: Vec<String>,
}

/// The binary with a clean, known log level.
pub fn server_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prompt-server"));
    command.env("RUST_LOG", "prompt_server=trace");
    command
}

impl ServerProcess {
    /// Starts the binary on 127.0.0.1, port 0, with extra `args`.
    pub fn start(args: &[&str]) -> Self {
        let mut command = server_command();
        if !args.contains(&"--bind") {
            command.args(["--bind", "127.0.0.1"]);
        }
        command.args(["--port", "0"]).args(args);
        Self::spawn(command)
    }

    /// Runs `command` (which must listen on port 0) and waits for its
    /// `listening on` line.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", command.get_program()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\n')
                    .to_string();
                if sender.send(text).is_err() {
                    break;
                }
                line.clear();
            }
        });
        let mut server = ServerProcess {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            seen: Vec::new(),
        };
        let line = server.expect_line("listening on ");
        // Text or JSON: the address runs from there to a space or a quote.
        let after = line.rsplit("listening on ").next().unwrap();
        let addr: String = after
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '"')
            .collect();
        server.addr = addr.parse().expect("an address after 'listening on'");
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next log line that contains `needle`, and returns it.
    pub fn expect_line(&mut self, needle: &str) -> String {
        self.expect_line_matching(needle, |line| line.contains(needle))
    }

    /// Returns a line with `needle` already seen, or waits for the next one.
    pub fn expect_logged(&mut self, needle: &str) -> String {
        match self.seen.iter().find(|line| line.contains(needle)) {
            Some(line) => line.clone(),
            None => self.expect_line(needle),
        }
    }

    /// Waits for the next log line for which `matches` holds.
    pub fn expect_line_matching(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no log line with {what:?} in {TIMEOUT:?}; saw:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "server exited before logging {what:?}; saw:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Sends a signal to the server (by its PID) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the server to exit, reading the rest of its log; fails the
    /// test if it does not exit in time.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "server did not exit in {TIMEOUT:?}; saw:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
        // stderr is closed: the process has exited (it starts no children).
        self.child.wait().expect("wait for server")
    }

    /// Connects a client to the server.
    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client socket with read and write timeouts, so no test can hang on it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect to server");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// A client socket bound to `source` (for example 127.0.0.2, to be a
/// different client address on loopback), with timeouts.
pub fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .expect("bind client source");
    socket
        .connect_timeout(&addr.into(), TIMEOUT)
        .expect("connect to server");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// Reads up to and including the first `\n` (one byte at a time, so nothing
/// after it is consumed).
pub fn read_line(stream: &mut TcpStream) -> Vec<u8> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return line,
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    return line;
                }
            }
            Err(e) => panic!("reading a line failed after {line:?}: {e}"),
        }
    }
}

/// Reads the prompt and checks it is the default one.
pub fn expect_prompt(stream: &mut TcpStream) {
    assert_eq!(read_line(stream), PROMPT, "prompt");
}

/// Reads until the server closes the connection. A reset counts as closed:
/// the server may close with unread client bytes, which Linux reports as RST.
pub fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => rest,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => rest,
        Err(e) => panic!("waiting for the server to close failed: {e}"),
    }
}

/// True while the server has neither sent anything nor closed `stream`.
pub fn still_waiting(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let result = (&*stream).read(&mut byte);
    stream.set_nonblocking(false).unwrap();
    matches!(result, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// A whole session: read the prompt, send `reply`, read until closed.
pub fn session(addr: SocketAddr, reply: &[u8]) {
    let mut stream = connect(addr);
    expect_prompt(&mut stream);
    stream.write_all(reply).unwrap();
    assert_eq!(
        read_until_closed(&mut stream),
        b"",
        "nothing after the prompt"
    );
}

/// The local address of a client, as the server logs its peer.
pub fn local(stream: &TcpStream) -> SocketAddr {
    stream.local_addr().unwrap()
}

/// Whether the outside program `program` (haproxy, prlimit, ...) is on
/// PATH, for a test that needs it to start with:
///
/// ```ignore
/// if !require_program("haproxy", "apt-get install haproxy") {
///     return;
/// }
/// ```
///
/// When it is missing the test is skipped (it returns early and counts as
/// passed), and the first skip in each test binary writes one line to the
/// terminal, such as
/// "SKIPPED: tests in tests/haproxy.rs need haproxy, which is not installed;
/// apt-get install haproxy to run them".
/// libtest captures only `print!`/`eprint!` output, so the line is written
/// to `io::stderr()` directly and shows in a plain `cargo test`.
///
/// With `PROMPT_SERVER_REQUIRE_<PROGRAM>=1` (the name in upper case, `-` as
/// `_`: `PROMPT_SERVER_REQUIRE_HAPROXY`) or `PROMPT_SERVER_REQUIRE_ALL=1`
/// set, a missing program fails the test instead: CI sets the latter, so it
/// can never skip a test silently.
#[track_caller]
pub fn require_program(program: &str, install_hint: &str) -> bool {
    if on_path(program) {
        return true;
    }
    let file = std::panic::Location::caller().file();
    let variable = require_variable(program);
    let required = [variable.as_str(), "PROMPT_SERVER_REQUIRE_ALL"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| value == "1"));
    assert!(
        !required,
        "{program} is not installed but is required ({variable} or PROMPT_SERVER_REQUIRE_ALL \
         is 1): {install_hint}"
    );
    static REPORTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut reported = REPORTED.lock().unwrap_or_else(|e| e.into_inner());
    if reported
        .get_or_insert_with(HashSet::new)
        .insert(program.to_string())
    {
        let line = format!(
            "SKIPPED: tests in {file} need {program}, which is not installed; \
             {install_hint} to run them\n"
        );
        let _ = io::stderr().write_all(line.as_bytes());
    }
    false
}

/// The variable that makes `program` required: `PROMPT_SERVER_REQUIRE_HAPROXY`.
fn require_variable(program: &str) -> String {
    let name: String = program
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("PROMPT_SERVER_REQUIRE_{name}")
}

/// Whether an executable file named `program` is in a directory of PATH.
fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
}

fn is_executable(file: &Path) -> bool {
    file.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
