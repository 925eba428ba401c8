//! Running as a system service (issue 13), checked with the real tools:
//! `systemd-analyze` on the units in contrib/systemd, `cargo deb` and
//! `dpkg-deb` on the package, and `systemd-socket-activate` for socket
//! activation with a Unix datagram socket of the test's own standing in
//! for systemd's notification socket.
//!
//! A test whose tool is missing skips itself with one SKIPPED line
//! (`require_program`); CI sets `PROMPT_SERVER_REQUIRE_ALL=1`, which makes
//! the tools required.
//!
//! The restart test needs no systemd at all: it holds the listening socket
//! itself, as a `.socket` unit does, and hands it to each server process.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    KillOnDrop, ServerProcess, TIMEOUT, TempDir, connect, expect_prompt, free_port,
    read_until_closed, require_program, session,
};

const SERVER: &str = env!("CARGO_BIN_EXE_prompt-server");
const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/systemd");
/// The exposure `systemd-analyze security` may give the service at most
/// (issue 13; lower is better).
const MAX_EXPOSURE: f64 = 2.0;
/// How long building the release binary and the .deb may take.
const DEB_BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

// ---------------------------------------------------------------------------
// The units

#[test]
fn units_pass_systemd_analyze_verify_silently() {
    if !require_program("systemd-analyze", "apt-get install systemd") {
        return;
    }
    let dir = TempDir::new("verify");
    let (service, socket) = units_for_the_built_binary(&dir);
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args([&service, &socket])
        .output()
        .expect("run systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "verify failed: {said}");
    assert_eq!(said, "", "verify must print nothing");
}

#[test]
fn the_service_is_sandboxed_to_an_exposure_of_at_most_2() {
    if !require_program("systemd-analyze", "apt-get install systemd") {
        return;
    }
    let dir = TempDir::new("security");
    let (service, _) = units_for_the_built_binary(&dir);
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&service)
        .output()
        .expect("run systemd-analyze security");
    let report = String::from_utf8_lossy(&output.stdout);
    let exposure = report
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for prompt-server.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}; the report:\n{report}"
    );
}

/// Copies of the units whose `ExecStart` runs the binary under test
/// (verify complains about a missing /usr/bin/prompt-server).
fn units_for_the_built_binary(dir: &TempDir) -> (PathBuf, PathBuf) {
    let service_text = fs::read_to_string(Path::new(UNITS).join("prompt-server.service"))
        .expect("read contrib/systemd/prompt-server.service");
    assert!(
        service_text.contains("ExecStart=/usr/bin/prompt-server "),
        "the unit runs the packaged binary"
    );
    let service = dir.path.join("prompt-server.service");
    fs::write(
        &service,
        service_text.replace(
            "ExecStart=/usr/bin/prompt-server ",
            &format!("ExecStart={SERVER} "),
        ),
    )
    .unwrap();
    let socket = dir.path.join("prompt-server.socket");
    fs::copy(Path::new(UNITS).join("prompt-server.socket"), &socket)
        .expect("copy contrib/systemd/prompt-server.socket");
    (service, socket)
}

// ---------------------------------------------------------------------------
// The Debian package

#[test]
fn cargo_deb_packages_the_binary_units_logrotate_readme_and_licence() {
    if !require_program("cargo-deb", "cargo install cargo-deb")
        || !require_program("dpkg-deb", "apt-get install dpkg")
    {
        return;
    }
    let out = TempDir::new("deb");
    // The project's own target directory, so the release build is reused
    // from one run to the next; `--output` keeps the .deb out of it.
    let mut command = Command::new("cargo");
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["deb", "--locked", "--output"])
        .arg(&out.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = run_bounded(command, DEB_BUILD_TIMEOUT);
    assert!(
        output.0.success(),
        "cargo deb failed ({}):\n{}",
        output.0,
        output.1
    );
    let deb = fs::read_dir(&out.path)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .unwrap_or_else(|| panic!("no .deb in {}:\n{}", out.path.display(), output.1));
    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .expect("run dpkg-deb -c");
    assert!(listing.status.success(), "dpkg-deb -c {}", deb.display());
    let listing = String::from_utf8_lossy(&listing.stdout);
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .collect();
    for expected in [
        "./usr/bin/prompt-server",
        "./usr/lib/systemd/system/prompt-server.service",
        "./usr/lib/systemd/system/prompt-server.socket",
        "./etc/logrotate.d/prompt-server",
        "./usr/share/doc/prompt-server/README.md",
        "./usr/share/doc/prompt-server/docs/OPERATIONS.md",
        "./usr/share/doc/prompt-server/copyright",
    ] {
        assert!(
            files.contains(&expected),
            "{expected} is not in the package:\n{listing}"
        );
    }
    let binary = listing
        .lines()
        .find(|line| line.ends_with(" ./usr/bin/prompt-server"))
        .unwrap();
    assert!(binary.starts_with("-rwxr-xr-x"), "executable: {binary}");
    let maintainer = Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .arg("Maintainer")
        .output()
        .expect("run dpkg-deb --field");
    let maintainer = String::from_utf8_lossy(&maintainer.stdout);
    assert!(
        maintainer.contains(" <")
            && maintainer.trim_end().ends_with('>')
            && maintainer.contains('@'),
        "Maintainer: needs a name and an address: {maintainer:?}"
    );
}

/// Runs `command` to its end or until `timeout` (then kills it, by its
/// PID, and fails), and returns its status and everything it printed.
fn run_bounded(mut command: Command, timeout: Duration) -> (ExitStatus, String) {
    // Killed on drop, so also when this test fails.
    let mut child = KillOnDrop(command.spawn().expect("start cargo deb"));
    let printed = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|out| Box::new(out) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|err| Box::new(err) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let printed = Arc::clone(&printed);
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut printed = printed.lock().unwrap_or_else(|e| e.into_inner());
                printed.push_str(&line);
                printed.push('\n');
            }
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for cargo deb") {
            break status;
        }
        if Instant::now() >= deadline {
            panic!(
                "cargo deb took longer than {timeout:?}:\n{}",
                printed.lock().unwrap_or_else(|e| e.into_inner())
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let printed = printed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (status, printed)
}

// ---------------------------------------------------------------------------
// Socket activation

#[test]
fn socket_activated_it_serves_says_ready_and_stops_cleanly_on_sigterm() {
    if !require_program("systemd-socket-activate", "apt-get install systemd") {
        return;
    }
    let notify = NotifyReceiver::new("activated");
    let (mut activated, addrs) = socket_activated(&["127.0.0.1"], None, &notify, &[]);
    // The first connection makes systemd-socket-activate start the server.
    let mut client = connect(addrs[0]);
    expect_prompt(&mut client);
    client.write_all(b"hello\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    notify.expect("READY=1");
    activated.expect_line("listening on");
    activated.signal("TERM");
    notify.expect("STOPPING=1");
    let status = activated.wait_exit();
    assert!(status.success(), "{status}; saw:\n{:#?}", activated.seen);
}

/// With `WATCHDOG_USEC` set, the server pings at half of it, and its
/// status says how many clients it holds.
#[test]
fn status_and_watchdog_pings_reach_the_service_manager() {
    if !require_program("systemd-socket-activate", "apt-get install systemd") {
        return;
    }
    let notify = NotifyReceiver::new("watchdog");
    let (mut activated, addrs) = socket_activated_with(
        &["127.0.0.1"],
        None,
        &notify,
        &[],
        &["-E", "WATCHDOG_USEC=400000"],
    );
    // A silent client: it starts the server and stays connected.
    let mut client = connect(addrs[0]);
    expect_prompt(&mut client);
    notify.expect("READY=1");
    notify.expect(&format!("STATUS=serving {}; 1 client connected", addrs[0]));
    notify.expect("WATCHDOG=1");
    client.write_all(b"bye\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    notify.expect(&format!("STATUS=serving {}; 0 clients connected", addrs[0]));
    activated.signal("TERM");
    assert!(activated.wait_exit().success(), "{:#?}", activated.seen);
}

#[test]
fn two_inherited_sockets_are_both_served_and_their_names_logged() {
    if !require_program("systemd-socket-activate", "apt-get install systemd") {
        return;
    }
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback here for the two-socket test");
        return;
    }
    let notify = NotifyReceiver::new("two");
    let (mut activated, addrs) = socket_activated(
        &["127.0.0.1", "[::1]"],
        Some("front-v4:front-v6"),
        &notify,
        // Given with inherited sockets, these do not apply (a warning says
        // so); the inherited sockets win.
        &["--port", "1", "--bind", "127.0.0.9"],
    );
    for addr in &addrs {
        let mut client = connect(*addr);
        expect_prompt(&mut client);
        client.write_all(b"hi\n").unwrap();
        assert_eq!(read_until_closed(&mut client), b"");
    }
    notify.expect("READY=1");
    activated.expect_logged("front-v4");
    activated.expect_logged("front-v6");
    activated.signal("TERM");
    assert!(activated.wait_exit().success(), "{:#?}", activated.seen);
}

#[test]
fn an_inherited_udp_socket_is_a_one_line_start_up_error() {
    if !require_program("systemd-socket-activate", "apt-get install systemd") {
        return;
    }
    let notify = NotifyReceiver::new("udp");
    let (mut activated, addrs) =
        socket_activated_with(&["127.0.0.1"], None, &notify, &[], &["--datagram"]);
    // A datagram starts the server, as a connection would.
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    sender.send_to(b"wake\n", addrs[0]).unwrap();
    let status = activated.wait_exit();
    assert_eq!(status.code(), Some(1), "{:#?}", activated.seen);
    let server_lines = server_lines(&activated);
    assert_eq!(server_lines.len(), 1, "one line: {server_lines:?}");
    let line = &server_lines[0];
    assert!(
        line.contains("descriptor 3") && line.contains("not a listening TCP socket"),
        "{line}"
    );
    assert!(notify.all_within(Duration::from_millis(200)).is_empty());
}

/// Variables set for another process (LISTEN_PID is not ours: a parent's,
/// inherited) are ignored, names and all, as sd_listen_fds(3) says.
#[test]
fn another_process_s_listen_variables_are_ignored() {
    let mut server = ServerProcess::builder()
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "not:ours:at:all")
        .start();
    session(server.addr, b"ours\n");
    server.expect_line("said: \"ours\"");
}

/// A closed descriptor that LISTEN_FDS names is named in the one error
/// line (before, the server's own log took that number first and the error
/// blamed the log's descriptor for not being a socket).
#[test]
fn a_closed_inherited_descriptor_is_named_in_a_one_line_error() {
    let script = "exec 3<&- 4<&-; export LISTEN_PID=$$ LISTEN_FDS=2; exec \"$0\" \"$@\"";
    let output = ServerProcess::builder()
        .wrapper("sh", ["-c", script])
        .output();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "error: inherited descriptor 3 (LISTEN_FDS) cannot be used: it is not open"
    );
}

/// What a restart under systemd looks like, without systemd: the test
/// holds the listening socket (as the .socket unit does) and hands a copy
/// to each server process as fd 3 with LISTEN_PID/LISTEN_FDS.
/// (`systemd-socket-activate` cannot do this: the socket it made goes away
/// with the process it ran, so it has no restart.) Clients connect all the
/// time, while the first server drains and before the second is up: none
/// may be refused or reset, every one gets the prompt.
#[test]
fn no_client_is_refused_across_a_restart_on_an_inherited_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut first = inheriting(&listener);
    let addr = first.addr;
    first.expect_line("listening on");

    // One client after another, all the time; each one served is reported.
    let stop = Arc::new(AtomicBool::new(false));
    let (served_one, served) = mpsc::channel();
    let clients = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut count = 0;
            while !stop.load(Ordering::SeqCst) {
                let mut client = connect(addr);
                expect_prompt(&mut client);
                client.write_all(b"still here\n").unwrap();
                assert_eq!(read_until_closed(&mut client), b"");
                count += 1;
                let _ = served_one.send(());
            }
            count
        })
    };
    let wait_for_clients = |n: usize| {
        for _ in 0..n {
            served
                .recv_timeout(TIMEOUT)
                .expect("a client served in time (the client thread panicked?)");
        }
    };
    wait_for_clients(5);
    first.signal("TERM");
    assert!(first.wait_exit().success(), "{:#?}", first.seen);
    // The gap between the old process and the new one, as in a restart:
    // the client now connecting waits in the socket's queue.
    thread::sleep(Duration::from_millis(300));
    let mut second = inheriting(&listener);
    second.expect_line("listening on");
    wait_for_clients(5);
    stop.store(true, Ordering::SeqCst);
    let count = clients.join().expect("every client was served");
    assert!(count >= 10, "only {count} clients across the restart");
    second.signal("TERM");
    assert!(second.wait_exit().success(), "{:#?}", second.seen);
}

/// A stop never shuts an inherited socket down, not even one with
/// SO_REUSEPORT under `--reuseport` (which a stop does shut down when the
/// server bound it itself): systemd goes on listening on it.
#[test]
fn a_stop_leaves_an_inherited_reuseport_socket_listening() {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(16).unwrap();
    let listener: TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();
    let mut server = inheriting_with(&listener, &["--reuseport"]);
    server.expect_line("listening on");
    server.signal("TERM");
    assert!(server.wait_exit().success(), "{:#?}", server.seen);
    // Still listening: a client is queued for the next process.
    let _client = connect(addr);
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_ok(),
        "the inherited socket stopped listening"
    );
}

/// A datagram socket standing in for systemd's notification socket.
struct NotifyReceiver {
    socket: UnixDatagram,
    dir: TempDir,
    /// Messages received so far, for failure messages.
    seen: Mutex<Vec<String>>,
}

impl NotifyReceiver {
    fn new(test: &str) -> NotifyReceiver {
        let dir = TempDir::new(&format!("notify-{test}"));
        let socket = UnixDatagram::bind(dir.path.join("notify")).expect("bind notify socket");
        NotifyReceiver {
            socket,
            dir,
            seen: Mutex::new(Vec::new()),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path.join("notify")
    }

    /// Waits for a message with a line equal to `line`.
    fn expect(&self, line: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if self
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|message| message.lines().any(|l| l == line))
            {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && self.receive(left),
                "no {line} notification in {TIMEOUT:?}; got {:?}",
                self.seen.lock().unwrap()
            );
        }
    }

    /// Every message received within `wait`.
    fn all_within(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        while self.receive(deadline.saturating_duration_since(Instant::now())) {}
        self.seen.lock().unwrap().clone()
    }

    /// Receives one message into `seen`; false if none came within `wait`.
    fn receive(&self, wait: Duration) -> bool {
        if wait.is_zero() {
            return false;
        }
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buffer = [0u8; 4096];
        match self.socket.recv(&mut buffer) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                self.seen.lock().unwrap().push(message);
                true
            }
            Err(_) => false,
        }
    }
}

// ---------------------------------------------------------------------------
// The server under systemd-socket-activate, or a shell standing in for systemd

/// `systemd-socket-activate --listen HOST:PORT ... -E NOTIFY_SOCKET=...
/// prompt-server ARGS` on a free port, the same one for every host, and
/// the addresses it listens on. The activator execs the server in its own
/// process once the first client arrives; the log is the activator's lines,
/// then the server's ([`server_lines`]).
fn socket_activated(
    hosts: &[&str],
    fdnames: Option<&str>,
    notify: &NotifyReceiver,
    args: &[&str],
) -> (ServerProcess, Vec<SocketAddr>) {
    socket_activated_with(hosts, fdnames, notify, args, &[])
}

/// As [`socket_activated`], with more `activate_options` for the activator.
fn socket_activated_with(
    hosts: &[&str],
    fdnames: Option<&str>,
    notify: &NotifyReceiver,
    args: &[&str],
    activate_options: &[&str],
) -> (ServerProcess, Vec<SocketAddr>) {
    // The free port may be taken between our check and the
    // activator's bind: try again with another.
    for _ in 0..5 {
        let port = free_port(hosts);
        let addrs: Vec<SocketAddr> = hosts
            .iter()
            .map(|host| format!("{host}:{port}").parse().unwrap())
            .collect();
        let mut options: Vec<String> = Vec::new();
        for addr in &addrs {
            options.extend(["--listen".to_string(), addr.to_string()]);
        }
        options.extend(activate_options.iter().map(|option| option.to_string()));
        if let Some(names) = fdnames {
            options.push(format!("--fdname={names}"));
        }
        // The activator hands the server only the variables given with -E;
        // `-E RUST_LOG` passes on the harness's own.
        options.extend([
            "-E".to_string(),
            format!("NOTIFY_SOCKET={}", notify.path().display()),
            "-E".to_string(),
            "RUST_LOG".to_string(),
        ]);
        let mut activated = ServerProcess::builder()
            .wrapper("systemd-socket-activate", options)
            .args(args)
            .start_at(addrs[0]);
        if listening(&mut activated, addrs.len()) {
            return (activated, addrs);
        }
    }
    panic!("systemd-socket-activate could not listen on a free port in 5 tries");
}

/// Waits for the activator's `Listening on ... as N.` line for each of
/// `sockets`; false if it exits first (the port was taken).
fn listening(activated: &mut ServerProcess, sockets: usize) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    let mut listening = 0;
    while listening < sockets {
        match activated.next_line(deadline, "`Listening on` line of systemd-socket-activate") {
            Some(line) if line.starts_with("Listening on ") => listening += 1,
            Some(_) => {}
            None => return false,
        }
    }
    true
}

/// The lines the server wrote: those after the activator's `Execing`.
fn server_lines(activated: &ServerProcess) -> Vec<String> {
    let start = activated
        .seen
        .iter()
        .position(|line| line.starts_with("Execing "))
        .map_or(0, |at| at + 1);
    activated.seen[start..].to_vec()
}

/// The server with a copy of `listener` as fd 3, and LISTEN_PID,
/// LISTEN_FDS and LISTEN_FDNAMES set for it, as systemd starts it.
fn inheriting(listener: &TcpListener) -> ServerProcess {
    inheriting_with(listener, &[])
}

/// [`inheriting`], with `args` for the server.
fn inheriting_with(listener: &TcpListener, args: &[&str]) -> ServerProcess {
    let socket: OwnedFd = listener.try_clone().expect("copy the listener").into();
    // stdin is the socket: move it to fd 3, then become the server (exec
    // keeps the shell's pid, which is LISTEN_PID).
    let script = "exec 3<&0 0</dev/null; \
                  export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=restart; \
                  exec \"$0\" \"$@\"";
    ServerProcess::builder()
        .wrapper("sh", ["-c", script])
        .args(args)
        .stdin(socket)
        .start_at(listener.local_addr().unwrap())
}
