//! Shared test harness: runs the real `prompt-server` binary on port 0
//! ([`ServerProcess`], built with [`ServerBuilder`]), reads the bound address
//! from its `listening on ADDR` line (or takes it from the test, for a server
//! run on sockets the test made or knows, as under `systemd-socket-activate`,
//! [`ServerBuilder::start_at`]), and lets a test wait for log lines or,
//! with `--log-format json`, for log events; or runs the library's server in
//! this process ([`LibraryServer`]). A server can be given a listener the
//! test made, as systemd passes one down ([`ServerBuilder::inherit`]), its
//! stderr sent elsewhere ([`ServerBuilder::stderr_to`]), and its log written
//! to a file the test reads ([`ServerBuilder::log_file`], [`LogFile`]).
//! Every client socket it makes has read and write timeouts.

#![allow(dead_code)] // each test file uses its own part of the harness

mod child;
pub mod tls;

pub use child::KillOnDrop;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use prompt_server::{Config, Shutdown, Summary, bind, run};
use serde_json::Value;

/// How long a test waits for anything (a log line, a byte, an exit) before
/// failing: generous, because CI machines are shared, yet bounded.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub const PROMPT: &[u8] = b"Do you want to play a game?\n";

/// The line a client turned away by a limit gets before the close.
pub const BUSY: &[u8] = b"server busy, try again later\n";

/// How the binary is run: its arguments, environment, stdin, and an optional
/// wrapper program (such as `prlimit --nofile=48:48`) that runs it.
#[derive(Debug)]
pub struct ServerBuilder {
    args: Vec<OsString>,
    /// Variables to set (`Some`) or remove (`None`), in order.
    env: Vec<(OsString, Option<OsString>)>,
    /// A program and its arguments that run the binary as their last argument.
    wrapper: Option<Vec<OsString>>,
    /// Whether the test stops reading the log after the `listening on` line
    /// until [`ServerProcess::resume_log`].
    stall_log: bool,
    /// The started process's stdin; `None` is /dev/null.
    stdin: Option<Stdio>,
    /// Shell commands run before the binary (or its wrapper) is exec'd,
    /// such as `exec 2>/dev/full`: the command is then run by `sh -c`.
    shell_steps: Vec<String>,
    /// `--log-file`: where [`ServerBuilder::start`] reads the `listening
    /// on` line from.
    log_file: Option<PathBuf>,
}

impl Default for ServerBuilder {
    /// The binary with a clean, known log level: `RUST_LOG=prompt_server=trace`.
    fn default() -> Self {
        ServerBuilder {
            args: Vec::new(),
            env: vec![("RUST_LOG".into(), Some("prompt_server=trace".into()))],
            wrapper: None,
            stall_log: false,
            stdin: None,
            shell_steps: Vec::new(),
            log_file: None,
        }
    }
}

impl ServerBuilder {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        let value = value.as_ref().to_owned();
        self.env.push((name.as_ref().to_owned(), Some(value)));
        self
    }

    pub fn env_remove(mut self, name: impl AsRef<OsStr>) -> Self {
        self.env.push((name.as_ref().to_owned(), None));
        self
    }

    /// Runs the binary through `program` with `args` before it, e.g.
    /// `wrapper("prlimit", ["--nofile=48:48"])`,
    /// `wrapper("systemd-socket-activate", ["--listen", ADDR])` or
    /// `wrapper("sh", ["-c", "exec \"$0\" \"$@\""])`. The wrapper must exec
    /// the binary (so that its PID is the server's), as these do.
    pub fn wrapper<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
        mut self,
        program: &str,
        args: I,
    ) -> Self {
        let mut wrapper = vec![OsString::from(program)];
        wrapper.extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self.wrapper = Some(wrapper);
        self
    }

    /// JSON log lines, so that the test can wait for events
    /// ([`ServerProcess::expect_event`]).
    pub fn json_log(self) -> Self {
        self.args(["--log-format", "json"])
    }

    /// The started process's stdin instead of /dev/null: an inherited
    /// socket, for example (`OwnedFd` converts).
    pub fn stdin(mut self, stdin: impl Into<Stdio>) -> Self {
        self.stdin = Some(stdin.into());
        self
    }

    /// Serves `listener`, a socket the test made, as a service manager
    /// passes one down: it becomes descriptor 3, with `LISTEN_PID` and
    /// `LISTEN_FDS=1` set by a `sh -c` wrapper that then execs the binary
    /// (so its PID is `LISTEN_PID`). Clients may connect at once: the
    /// kernel queues them until the server accepts. Start it with
    /// [`ServerBuilder::start_at`] and the listener's address, or with
    /// `start` when the `listening on` line can be read. A
    /// [`ServerBuilder::wrapper`] must then exec the binary, as `prlimit`
    /// does, for the server's PID to be `LISTEN_PID`.
    pub fn inherit(mut self, listener: &std::net::TcpListener) -> Self {
        let socket: OwnedFd = listener.try_clone().expect("copy the listener").into();
        self.stdin = Some(socket.into());
        self.shell_steps
            .push("exec 3<&0 0</dev/null; export LISTEN_PID=$$ LISTEN_FDS=1".into());
        self
    }

    /// Sends the server's stderr to `target` (appended to; `/dev/full`
    /// fails every write) instead of the test's pipe: a shell redirection
    /// before the exec. The test then sees no stderr line, so the server is
    /// started with [`ServerBuilder::start_at`], or with `start` and a
    /// [`ServerBuilder::log_file`] (or `target` itself given to
    /// [`ServerBuilder::log_read_from`]), and its exit waited for with
    /// [`ServerProcess::exit_status_by`].
    pub fn stderr_to(mut self, target: impl AsRef<Path>) -> Self {
        let target = shell_quote(target.as_ref());
        self.shell_steps.push(format!("exec 2>>{target}"));
        self
    }

    /// `--log-file PATH`; `start` then waits for the `listening on` line
    /// there, and [`ServerProcess::log_file`] reads it.
    pub fn log_file(mut self, path: impl AsRef<Path>) -> Self {
        let path = path.as_ref().to_path_buf();
        self = self.arg("--log-file").arg(&path);
        self.log_file = Some(path);
        self
    }

    /// Where the test reads the log the server writes to a file without
    /// asking for `--log-file`, such as its stderr sent there with
    /// [`ServerBuilder::stderr_to`].
    pub fn log_read_from(mut self, path: impl AsRef<Path>) -> Self {
        self.log_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// The test reads the log only up to the `listening on` line, until
    /// [`ServerProcess::resume_log`]: the server's stderr pipe fills up.
    pub fn stall_log(mut self) -> Self {
        self.stall_log = true;
        self
    }

    /// The command with exactly the arguments given (no `--bind` or `--port`
    /// added).
    pub fn command(&self) -> Command {
        let binary = env!("CARGO_BIN_EXE_prompt-server");
        let mut program: Vec<OsString> = self.wrapper.clone().unwrap_or_default();
        program.push(binary.into());
        if !self.shell_steps.is_empty() {
            let script = format!("{}; exec \"$0\" \"$@\"", self.shell_steps.join("; "));
            program.splice(0..0, ["sh".into(), "-c".into(), script.into()]);
        }
        let mut command = Command::new(&program[0]);
        command.args(&program[1..]);
        command.args(&self.args);
        for (name, value) in &self.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
    }

    /// Runs the binary to completion (it must exit by itself, as with
    /// `--help` or a bad argument) with exactly the arguments given.
    pub fn output(&self) -> Output {
        self.command()
            .stdin(Stdio::null())
            .output()
            .expect("run prompt-server")
    }

    /// Starts the server on 127.0.0.1 and port 0, unless the arguments have
    /// a `--bind` or a `--port`, and waits for its `listening on` line.
    ///
    /// With a [`ServerBuilder::log_file`], the line is read from that file.
    pub fn start(self) -> ServerProcess {
        let mut builder = self;
        if !builder.args.iter().any(|arg| arg == "--bind") {
            builder = builder.args(["--bind", "127.0.0.1"]);
        }
        if !builder.args.iter().any(|arg| arg == "--port") {
            builder = builder.args(["--port", "0"]);
        }
        let mut server = ServerProcess::spawn(builder, "0.0.0.0:0".parse().unwrap());
        let line = match &server.log_file {
            Some(_) => server.expect_file_line("listening on "),
            None => server.expect_line("listening on "),
        };
        server.addr = listening_addr(&line).expect("an address after 'listening on'");
        server
    }

    /// Starts the command with exactly the arguments given (no `--bind` or
    /// `--port` added) for a server at `addr`, which the test knows: it made
    /// the socket, or `systemd-socket-activate` listens there and starts the
    /// server only on the first connection. Does not wait for any line.
    pub fn start_at(self, addr: SocketAddr) -> ServerProcess {
        ServerProcess::spawn(self, addr)
    }
}

/// A running `prompt-server` process, killed (by its PID) when dropped.
pub struct ServerProcess {
    child: KillOnDrop,
    /// The address it serves: from its `listening on` line, or as given to
    /// [`ServerBuilder::start_at`].
    pub addr: SocketAddr,
    lines: Receiver<String>,
    /// With [`ServerBuilder::stall_log`]: lets the log reader go on.
    resume: Option<Sender<()>>,
    /// Every stderr line seen so far, for failure messages.
    pub seen: Vec<String>,
    /// The log file the server writes, if it was told to write one.
    log_file: Option<LogFile>,
}

impl ServerProcess {
    /// How to run the binary; `start()` it, or get its `output()`.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Starts the binary on 127.0.0.1, port 0, with extra `args`.
    pub fn start(args: &[&str]) -> Self {
        Self::builder().args(args).start()
    }

    /// Runs `builder`'s command, serving at `addr`, with its stderr read
    /// line by line on a thread of its own.
    fn spawn(mut builder: ServerBuilder, addr: SocketAddr) -> Self {
        let mut command = builder.command();
        let child = command
            .stdin(builder.stdin.take().unwrap_or_else(Stdio::null))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", command.get_program()));
        let mut child = KillOnDrop(child);
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = mpsc::channel();
        let (resume, resumed) = mpsc::channel();
        let stall_log = builder.stall_log;
        let log_file = builder.log_file.take().map(LogFile::new);
        thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\n')
                    .to_string();
                let listening = listening_addr(&text).is_some();
                if sender.send(text).is_err() {
                    break;
                }
                // Stalled: park with the pipe unread until resumed (or the
                // test is done with the server).
                if stall_log && listening && resumed.recv().is_err() {
                    break;
                }
                line.clear();
            }
        });
        ServerProcess {
            child,
            addr,
            lines,
            resume: stall_log.then_some(resume),
            seen: Vec::new(),
            log_file,
        }
    }

    /// The log file it writes ([`ServerBuilder::log_file`]).
    pub fn log_file(&self) -> &LogFile {
        self.log_file
            .as_ref()
            .expect("a server started with a log file")
    }

    /// Waits for a whole line containing `needle` in the log file, and
    /// returns the first; fails the test (with its stderr) if the server
    /// exits or none comes within [`TIMEOUT`].
    pub fn expect_file_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self
                .log_file()
                .lines()
                .into_iter()
                .find(|l| l.contains(needle))
            {
                return line;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.drain_stderr();
                panic!(
                    "server exited ({status}) before writing {needle:?} to {}; stderr:\n{}",
                    self.log_file().path.display(),
                    self.seen.join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} in {} within {TIMEOUT:?}",
                self.log_file().path.display()
            );
            // Nothing tells when a file grows: poll it.
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Moves the stderr lines that have come so far into `seen`.
    pub fn drain_stderr(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// With [`ServerBuilder::stall_log`]: reads the rest of the log from now
    /// on.
    pub fn resume_log(&mut self) {
        let resume = self.resume.take().expect("a stalled log, not resumed yet");
        resume.send(()).expect("the log reader is parked");
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

    /// Waits for the next JSON log record whose `event` field is `event`
    /// and for which `matches` holds, and returns it. Needs
    /// [`ServerBuilder::json_log`].
    pub fn expect_event(&mut self, event: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let line = self.expect_line_matching(&format!("event {event}"), |line| {
            record(line).is_some_and(|record| record["event"] == event && matches(&record))
        });
        record(&line).expect("a JSON record")
    }

    /// Returns a record of `event` already seen for which `matches` holds,
    /// or waits for the next one.
    pub fn expect_logged_event(&mut self, event: &str, matches: impl Fn(&Value) -> bool) -> Value {
        match self
            .events(event)
            .into_iter()
            .find(|record| matches(record))
        {
            Some(record) => record,
            None => self.expect_event(event, matches),
        }
    }

    /// The JSON records of `event` seen so far, in order.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.seen
            .iter()
            .filter_map(|line| record(line))
            .filter(|record| record["event"] == event)
            .collect()
    }

    /// Waits for the next log line for which `matches` holds.
    pub fn expect_line_matching(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.next_line(deadline, &format!("log line with {what:?}")) {
                Some(line) if matches(&line) => return line,
                Some(_) => {}
                None => panic!(
                    "server exited before logging {what:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The next log line (also kept in `seen`), or `None` once the process
    /// has closed its stderr (exited); fails the test, saying it waited for
    /// `what`, if neither happens by `deadline`.
    pub fn next_line(&mut self, deadline: Instant, what: &str) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                panic!("no {what} in {TIMEOUT:?}; saw:\n{}", self.seen.join("\n"))
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
        while self.next_line(deadline, "exit of the server").is_some() {}
        // stderr is closed: the process has exited (it starts no children).
        self.child.wait().expect("wait for server")
    }

    /// The exit status if the server exits by `deadline`, without reading
    /// its log (for a stalled log, whose pipe stays full). There is no
    /// event to wait on here, so this polls the process state.
    pub fn exit_status_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
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

    /// Connects a client to the server.
    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }
}

/// The address in a `listening on ADDR` line, text or JSON: it runs from
/// there to a space or a quote.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, after) = line.rsplit_once("listening on ")?;
    let addr: String = after
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    addr.parse().ok()
}

/// The `message` of a JSON log record: the text the text format writes.
pub fn message(record: &Value) -> String {
    match record["message"].as_str() {
        Some(message) => message.to_string(),
        None => panic!("no message in {record}"),
    }
}

/// A log line as a JSON record, if it is one.
pub fn record(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok()
}

/// The library's server, run in this process on 127.0.0.1, port 0, on a
/// thread of its own; stopped when dropped.
pub struct LibraryServer {
    pub addr: SocketAddr,
    /// Stops the server ([`Shutdown::trigger`]).
    pub shutdown: Shutdown,
    /// What `run` returned, its error as text.
    result: Receiver<Result<Summary, String>>,
}

impl LibraryServer {
    /// Binds 127.0.0.1, port 0, and runs `config` (its `listen_addr` is
    /// not used).
    pub fn start(config: Config) -> Self {
        Self::start_with(config, Shutdown::new())
    }

    /// As [`LibraryServer::start`], stopped by `shutdown` (which may already
    /// be triggered).
    pub fn start_with(config: Config, shutdown: Shutdown) -> Self {
        let config = Config {
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            ..config
        };
        let listener = bind(&config).expect("bind 127.0.0.1, port 0");
        let addr = listener.local_addr().unwrap();
        let (done, result) = mpsc::channel();
        let handle = shutdown.clone();
        thread::Builder::new()
            .name("library-server".into())
            .spawn(move || {
                let _ = done.send(run([listener], config, handle).map_err(|e| format!("{e:#}")));
            })
            .expect("start the server thread");
        LibraryServer {
            addr,
            shutdown,
            result,
        }
    }

    /// What `run` returned; fails the test if it has not returned `within`.
    pub fn result(&self, within: Duration) -> Result<Summary, String> {
        self.result
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("run did not return within {within:?}: {e}"))
    }
}

impl Drop for LibraryServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
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

/// How a client the server refuses without a word (a denied one) sees its
/// connection end, after sending `bytes` (from `source`, if given): a reset,
/// which may come before the connect returns.
pub fn refused_end(addr: SocketAddr, source: Option<IpAddr>, bytes: &[u8]) -> End {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    if let Some(source) = source {
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .expect("bind client source");
    }
    match socket.connect_timeout(&addr.into(), TIMEOUT) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return End::Reset,
        connected => connected.expect("connect to server"),
    }
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    send_and_see_end(&mut stream, bytes)
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

/// A port free on every one of `hosts` right now, for what cannot take port
/// 0 (`systemd-socket-activate`, several processes sharing one port).
pub fn free_port(hosts: &[&str]) -> u16 {
    for _ in 0..50 {
        let Ok(first) = std::net::TcpListener::bind(format!("{}:0", hosts[0])) else {
            continue;
        };
        let port = first.local_addr().unwrap().port();
        let rest_free = hosts[1..]
            .iter()
            .all(|host| std::net::TcpListener::bind(format!("{host}:{port}")).is_ok());
        if rest_free {
            return port;
        }
    }
    panic!("no port free on all of {hosts:?}");
}

/// A directory of the test's own under the system's temp directory,
/// removed when dropped.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    /// `prompt-server-PID-NAME` in the temp directory, empty.
    pub fn new(name: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("prompt-server-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Quotes `path` for `sh`.
fn shell_quote(path: &Path) -> String {
    let text = path.to_str().expect("a UTF-8 path");
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A log file the server writes (`--log-file`, or stderr sent to a file),
/// read by the test.
#[derive(Debug, Clone)]
pub struct LogFile {
    pub path: PathBuf,
}

impl LogFile {
    pub fn new(path: impl AsRef<Path>) -> LogFile {
        LogFile {
            path: path.as_ref().to_path_buf(),
        }
    }

    /// Its whole lines (each ended by a newline) so far, without the
    /// newline; none if the file does not exist. A line still being
    /// written is left out.
    pub fn lines(&self) -> Vec<String> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("cannot read {}: {e}", self.path.display()),
        };
        let whole = match bytes.iter().rposition(|&b| b == b'\n') {
            Some(last) => &bytes[..last],
            None => return Vec::new(),
        };
        String::from_utf8_lossy(whole)
            .split('\n')
            .map(str::to_string)
            .collect()
    }

    /// Its whole lines that are JSON records (`--log-format json`).
    pub fn records(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|line| record(line))
            .collect()
    }

    /// Waits (polling: nothing tells when a file grows) for a whole line
    /// that contains `needle`, up to [`TIMEOUT`], and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} in {} within {TIMEOUT:?}; it holds:\n{}",
                self.path.display(),
                self.lines().join("\n")
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How the server ended a connection, as its client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An end of stream: the reply is recorded (or the client was told
    /// in words it is not served).
    Clean,
    /// A reset: the client cannot count on its reply being recorded.
    Reset,
}

/// Reads until the server ends the stream, and says how it ended; fails
/// the test on any byte, another error, or no end within the read timeout.
pub fn end_of(stream: &mut TcpStream) -> End {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => End::Clean,
        Ok(_) => panic!("unexpected bytes before the end of stream: {rest:?}"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => End::Reset,
        Err(e) => panic!("waiting for the end of stream failed: {e} (after {rest:?})"),
    }
}

/// Sends `line` (a reply and its newline, or late bytes) on a stream the
/// server may have ended already, then reads to the end: a write refused
/// by a reset, or a reset seen by the read, is [`End::Reset`].
pub fn send_and_see_end(stream: &mut TcpStream, line: &[u8]) -> End {
    match stream.write_all(line) {
        Ok(()) => end_of(stream),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
        {
            End::Reset
        }
        Err(e) => panic!("sending {line:?} failed: {e}"),
    }
}

/// A whole session that says how it ended: read the prompt, send `reply`
/// and a newline, and see the end of stream. Returns the client's address
/// (as the server logs its peer) with it.
pub fn session_end(addr: SocketAddr, reply: &str) -> (SocketAddr, End) {
    let mut stream = connect(addr);
    expect_prompt(&mut stream);
    let end = send_and_see_end(&mut stream, format!("{reply}\n").as_bytes());
    (local(&stream), end)
}

/// Whether the test runs as root, for a test that needs it (to mount a
/// file system, say) to start with; if not, the test is [`skipped`].
#[track_caller]
pub fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skipped(&format!("needs root to {what}"));
    false
}

/// Skips the calling test, which then returns early, for `why` ("needs
/// root to mount a tmpfs"): one "SKIPPED: a test in FILE WHY" line on the
/// terminal; with `PROMPT_SERVER_REQUIRE_ALL=1` (CI) it fails instead.
#[track_caller]
pub fn skipped(why: &str) {
    let file = std::panic::Location::caller().file();
    let required = std::env::var_os("PROMPT_SERVER_REQUIRE_ALL").is_some_and(|value| value == "1");
    assert!(
        !required,
        "a test in {file} {why} (PROMPT_SERVER_REQUIRE_ALL is 1)"
    );
    let line = format!("SKIPPED: a test in {file} {why}\n");
    let _ = io::stderr().write_all(line.as_bytes());
}
