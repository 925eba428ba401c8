//! `--log-file` when things go wrong, against the real binary: the file
//! system fills up (a small tmpfs), the process is killed at a random
//! moment (SIGKILL), and, under strace, the order of a reply's write, the
//! sync that covers it and its client's clean close. Whatever happens, a
//! client that saw a clean close has its reply in the file, once.

mod common;

use std::collections::HashMap;
use std::fs::{self, File};
use std::hash::BuildHasher;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

/// A tmpfs of `size` mounted on a directory of the test's own; unmounted
/// when dropped (after the server that writes there is gone).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// The tmpfs, or `None` (the test skipped) when this process cannot
    /// mount one: not root, or root in a container without the right.
    #[track_caller]
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !require_root("mount a small tmpfs that fills up") {
            return None;
        }
        fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        if !mounted.status.success() {
            skipped(&format!(
                "needs to mount a tmpfs, which failed here: {}",
                String::from_utf8_lossy(&mounted.stderr).trim()
            ));
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Fills the file system with one file, leaving about `room` bytes
    /// free, and returns the file's path.
    fn fill_leaving(&self, room: u64) -> PathBuf {
        let path = self.dir.join("filler");
        let mut filler = File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match filler.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let full = filler.metadata().unwrap().len();
        filler.set_len(full.saturating_sub(room)).unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.dir).status();
        if !unmounted.is_ok_and(|status| status.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A session of [`clients_in_waves`]: the client's address, its reply,
/// and how the server ended it.
#[derive(Debug)]
struct Served {
    peer: String,
    reply: String,
    end: End,
}

/// Sessions for `replies`, all connected and sent at once, then each read
/// to its end: so many clients wait for the log together.
fn wave(addr: SocketAddr, replies: &[String]) -> Vec<Served> {
    let mut streams: Vec<TcpStream> = replies.iter().map(|_| connect(addr)).collect();
    for (stream, reply) in streams.iter_mut().zip(replies) {
        expect_prompt(stream);
        stream.write_all(format!("{reply}\n").as_bytes()).unwrap();
    }
    streams
        .iter_mut()
        .zip(replies)
        .map(|(stream, reply)| Served {
            peer: local(stream).to_string(),
            reply: reply.clone(),
            end: end_of(stream),
        })
        .collect()
}

/// `clients` sessions named `{name} N`, from `threads` threads, each
/// running its share in waves of `wave_size`.
fn clients_in_waves(
    addr: SocketAddr,
    name: &str,
    clients: usize,
    threads: usize,
    wave_size: usize,
) -> Vec<Served> {
    let handles: Vec<JoinHandle<Vec<Served>>> = (0..threads)
        .map(|thread| {
            let replies: Vec<String> = (thread..clients)
                .step_by(threads)
                .map(|n| format!("{name} {n}"))
                .collect();
            thread::spawn(move || {
                replies
                    .chunks(wave_size)
                    .flat_map(|replies| wave(addr, replies))
                    .collect()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|handle| handle.join().expect("client thread"))
        .collect()
}

/// The `reply` records of a JSON log file, by reply: the peers it names.
fn replies_in(file: &LogFile) -> HashMap<String, Vec<String>> {
    let mut replies: HashMap<String, Vec<String>> = HashMap::new();
    for (n, line) in file.lines().iter().enumerate() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "line {} of {} is not whole: {e}: {line:?}",
                n + 1,
                file.path.display()
            )
        });
        if record["event"] == "reply" {
            let reply = record["reply"].as_str().unwrap_or_default().to_string();
            let peer = record["peer"].as_str().unwrap_or_default().to_string();
            replies.entry(reply).or_default().push(peer);
        }
    }
    replies
}

/// Fails unless each acknowledged session's reply is in `replies` exactly
/// once, with its peer.
fn assert_acked_once(served: &[Served], replies: &HashMap<String, Vec<String>>) {
    for session in served.iter().filter(|session| session.end == End::Clean) {
        let peers = replies.get(&session.reply).map_or(&[][..], Vec::as_slice);
        assert!(
            peers == [session.peer.clone()],
            "{:?} from {} saw a clean close, but the file has it from {peers:?}",
            session.reply,
            session.peer
        );
    }
}

#[test]
fn when_the_log_file_system_fills_no_client_sees_a_clean_close_for_an_unrecorded_reply() {
    const CLIENTS: usize = 300;
    const THREADS: usize = 6;
    const WAVE: usize = 25;
    const AFTER: usize = 20;
    let dir = TempDir::new("full-disk");
    let Some(tmpfs) = Tmpfs::mount(&dir.path.join("fs"), "256k") else {
        return;
    };
    // Room for a few dozen records, and not for the rest.
    let filler = tmpfs.fill_leaving(8 * 1024);
    let log = LogFile::new(tmpfs.dir.join("server.log"));
    let mut server = ServerProcess::builder()
        .env("RUST_LOG", "info")
        .json_log()
        .args(["--record-timeout", "1"])
        .log_file(&log.path)
        .start();

    let started = Instant::now();
    let served = clients_in_waves(server.addr, "full", CLIENTS, THREADS, WAVE);
    let while_full = started.elapsed();
    let acked = served.iter().filter(|s| s.end == End::Clean).count();
    let mut reset = served.len() - acked;
    assert!(
        acked > 0 && reset > 0,
        "{acked} acknowledged and {reset} reset: the file system should have filled mid-way"
    );
    let report = server.expect_line("cannot write the log file");
    assert!(
        report.contains(&format!(
            "prompt-server: cannot write the log file {}: no space left on device",
            log.path.display()
        )),
        "{report}"
    );

    fs::remove_file(&filler).unwrap();
    let mut after: Vec<Served> = Vec::new();
    // The first may meet the writer in its retry pause (up to 1 s, as
    // long as --record-timeout): once one is recorded, all are.
    for n in 0.. {
        assert!(
            n < 5,
            "no reply recorded after the filler was removed: {after:?}"
        );
        let (peer, end) = session_end(server.addr, &format!("freed {n}"));
        after.push(Served {
            peer: peer.to_string(),
            reply: format!("freed {n}"),
            end,
        });
        if end == End::Clean {
            break;
        }
        reset += 1;
    }
    for n in 0..AFTER {
        let reply = format!("after {n}");
        let (peer, end) = session_end(server.addr, &reply);
        assert_eq!(
            end,
            End::Clean,
            "{reply} from {peer}, once there is room again"
        );
        after.push(Served {
            peer: peer.to_string(),
            reply,
            end,
        });
    }
    server.expect_line("takes writes again");

    server.signal("TERM");
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(3), "{:#?}", server.seen);
    let replies = if reset == 1 {
        "reply was"
    } else {
        "replies were"
    };
    let said = format!(
        "error: the log did not take everything: {reset} {replies} not recorded \
         (their clients were reset), 0 log lines were left unwritten"
    );
    assert!(
        server.seen.contains(&said),
        "no {said:?} on stderr: {:#?}",
        server.seen
    );

    let replies = replies_in(&log);
    assert_acked_once(&served, &replies);
    assert_acked_once(&after, &replies);
    let records = log.records();
    let stopped = records
        .iter()
        .find(|record| record["event"] == "stopped")
        .unwrap_or_else(|| panic!("no stopped event in {}", log.path.display()));
    assert_eq!(stopped["not_recorded"], reset as u64, "{stopped}");
    assert!(
        records
            .iter()
            .any(|record| record["event"] == "not_recorded"),
        "no not_recorded line in the log"
    );
    eprintln!(
        "{CLIENTS} clients while the disk was full ({while_full:?}): {acked} acknowledged, \
         {} reset; {} after it was freed",
        CLIENTS - acked,
        after.len()
    );
    drop(server);
    drop(tmpfs);
}

/// A session that may find the server gone: `None` if it got no prompt.
fn try_session(addr: SocketAddr, reply: &str) -> Option<End> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut prompt = vec![0u8; PROMPT.len()];
    stream.read_exact(&mut prompt).ok()?;
    assert_eq!(prompt, PROMPT);
    if stream.write_all(format!("{reply}\n").as_bytes()).is_err() {
        return Some(End::Reset);
    }
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Some(End::Clean),
        Ok(_) => panic!("bytes after the prompt: {rest:?}"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Some(End::Reset),
        Err(e) => panic!("{reply}: waiting for the end of stream failed: {e}"),
    }
}

/// A client that runs sessions until the server is gone, telling `acked`
/// of each acknowledged one; returns the replies acknowledged.
fn client_until_gone(addr: SocketAddr, name: String, acked: Sender<()>) -> Vec<String> {
    let mut replies = Vec::new();
    for session in 0..2000 {
        let reply = format!("{name} {session}");
        match try_session(addr, &reply) {
            Some(End::Clean) => {
                replies.push(reply);
                let _ = acked.send(());
            }
            Some(End::Reset) => {}
            None => break,
        }
    }
    replies
}

fn random_below(n: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) % n
}

#[test]
fn after_sigkill_under_load_every_acknowledged_reply_is_in_the_log_file() {
    const RUNS: usize = 5;
    const CLIENTS: usize = 8;
    for run in 0..RUNS {
        let dir = TempDir::new(&format!("sigkill-{run}"));
        let log = LogFile::new(dir.path.join("server.log"));
        let mut server = ServerProcess::builder()
            .env("RUST_LOG", "info")
            .json_log()
            .log_file(&log.path)
            .start();
        let (acked, acks): (Sender<()>, Receiver<()>) = mpsc::channel();
        let clients: Vec<JoinHandle<Vec<String>>> = (0..CLIENTS)
            .map(|client| {
                let (addr, acked) = (server.addr, acked.clone());
                thread::spawn(move || {
                    client_until_gone(addr, format!("run {run} client {client}"), acked)
                })
            })
            .collect();
        let kill_after = 1 + random_below(300) as usize;
        for n in 0..kill_after {
            acks.recv_timeout(TIMEOUT)
                .unwrap_or_else(|e| panic!("run {run}: only {n} sessions acknowledged: {e}"));
        }
        server.signal("KILL");
        let status = server.exit_status_by(Instant::now() + TIMEOUT);
        assert!(
            status.is_some_and(|status| status.code().is_none()),
            "run {run}: killed: {status:?}"
        );
        let acknowledged: Vec<String> = clients
            .into_iter()
            .flat_map(|client| client.join().expect("client thread"))
            .collect();

        let in_file = replies_in(&log);
        for reply in &acknowledged {
            let count = in_file.get(reply).map_or(0, Vec::len);
            assert_eq!(
                count, 1,
                "run {run}: {reply:?} saw a clean close, and is in the file {count} times"
            );
        }
        eprintln!(
            "run {run}: killed after {kill_after} acknowledgements; {} acknowledged in all, \
             {} replies in the file",
            acknowledged.len(),
            in_file.len()
        );
    }
}

/// One system call in an strace log: who made it, its arguments and
/// result, and the lines of the log where it began and where it ended.
#[derive(Debug)]
struct Call {
    name: String,
    args: String,
    result: String,
    began: usize,
    ended: usize,
}

/// The calls in an `strace -f` log, with calls that other threads'
/// calls interrupted (`<unfinished ...>`, `<... resumed>`) put together.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut unfinished: HashMap<String, (String, String, usize)> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let (name, text, began) = if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, after)) = resumed.split_once(" resumed>") else {
                continue;
            };
            let Some((_, before, began)) = unfinished.remove(pid) else {
                continue;
            };
            (name.to_string(), before + after, began)
        } else if let Some(start) = rest.strip_suffix(" <unfinished ...>") {
            let Some((name, args)) = start.split_once('(') else {
                continue;
            };
            unfinished.insert(pid.to_string(), (name.to_string(), args.to_string(), n));
            continue;
        } else if let Some((name, args)) = rest.split_once('(') {
            (name.to_string(), args.to_string(), n)
        } else {
            continue;
        };
        // strace pads short calls: `close(7<socket:[...]>)       = 0`.
        let Some((args, result)) = text
            .rsplit_once(" = ")
            .and_then(|(call, result)| Some((call.trim_end().strip_suffix(')')?, result)))
        else {
            continue;
        };
        calls.push(Call {
            name,
            args: args.to_string(),
            result: result.to_string(),
            began,
            ended: n,
        });
    }
    calls
}

/// The descriptor at the start of `text` (`7<socket:[...]>, ...`).
fn leading_fd(text: &str) -> Option<u32> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// For the client at local port `port`, the lines where the write of its
/// record ended, where a sync of the log began and ended after it, and
/// where its socket's linger was restored and where it was closed.
#[derive(Debug)]
struct Order {
    written: usize,
    synced: Option<(usize, usize)>,
    linger_restored: Option<usize>,
    closed: Option<usize>,
}

fn order_for(calls: &[Call], log: &Path, port: u16) -> Order {
    let log = format!("<{}>", log.display());
    let record = format!("127.0.0.1:{port} said: ");
    let written = calls
        .iter()
        .find(|call| {
            call.name == "write" && call.args.contains(&log) && call.args.contains(&record)
        })
        .unwrap_or_else(|| panic!("no write of {record:?} to {log}"))
        .ended;
    let synced = calls
        .iter()
        .find(|call| call.name == "fdatasync" && call.args.contains(&log) && call.began > written)
        .map(|call| (call.began, call.ended));
    let accepted = calls
        .iter()
        .find(|call| {
            call.name.starts_with("accept")
                && call.args.contains(&format!("sin_port=htons({port})"))
        })
        .unwrap_or_else(|| panic!("no accept of the client at port {port}"));
    let fd = leading_fd(&accepted.result).expect("an accepted descriptor");
    let on_socket =
        |call: &&Call| call.ended > accepted.ended && leading_fd(&call.args) == Some(fd);
    let closed = calls
        .iter()
        .filter(on_socket)
        .find(|call| call.name == "close")
        .map(|call| call.began);
    let linger_restored = calls
        .iter()
        .filter(on_socket)
        .filter(|call| closed.is_none_or(|closed| call.began < closed))
        .find(|call| call.name == "setsockopt" && call.args.contains("SO_LINGER, {l_onoff=0"))
        .map(|call| call.began);
    Order {
        written,
        synced,
        linger_restored,
        closed,
    }
}

/// Runs the binary under strace with `builder`'s log going to `log`,
/// serves a few clients, stops the server, and checks, for each client,
/// that its record was written, then synced, before its socket's linger
/// was restored for the clean close, and before the close.
fn assert_synced_before_clean_close(name: &str, builder: impl FnOnce(&Path) -> ServerBuilder) {
    if !require_program("strace", "apt-get install strace") {
        return;
    }
    let dir = TempDir::new(name);
    let log = dir.path.join("server.log");
    let trace = dir.path.join("trace");
    let mut server = builder(&log)
        .env("RUST_LOG", "info")
        .wrapper(
            "strace",
            [
                "-f",
                "-y",
                "-s",
                "65536",
                "-e",
                "trace=accept,accept4,write,fdatasync,setsockopt,close",
                "-o",
                trace.to_str().unwrap(),
            ],
        )
        .start();
    let mut ports = Vec::new();
    for n in 0..3 {
        let (peer, end) = session_end(server.addr, &format!("traced {n}"));
        assert_eq!(end, End::Clean, "{peer}");
        ports.push(peer.port());
    }
    // strace runs the server as its child: stop that one (by its PID);
    // strace exits with it.
    let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", server.pid()))
        .expect("read strace's children");
    let traced = children
        .split_whitespace()
        .next()
        .expect("the traced server");
    let status = Command::new("kill")
        .args(["-TERM", traced])
        .status()
        .unwrap();
    assert!(status.success());
    let status = server.exit_status_by(Instant::now() + TIMEOUT);
    assert_eq!(status.and_then(|status| status.code()), Some(0));

    let text = fs::read_to_string(&trace).unwrap();
    let calls = parse_trace(&text);
    for port in ports {
        let order = order_for(&calls, &log, port);
        let in_order = match order {
            Order {
                written,
                synced: Some((sync_began, sync_ended)),
                linger_restored: Some(linger),
                closed: Some(closed),
            } => written < sync_began && sync_ended < linger && linger < closed,
            _ => false,
        };
        assert!(
            in_order,
            "client at port {port}: {order:?} (trace lines: the write of its record ended, \
             a sync of the log began and ended, its linger was restored, it was closed); \
             trace:\n{text}"
        );
    }
}

#[test]
fn under_strace_a_reply_is_synced_to_the_log_file_before_its_clean_close() {
    assert_synced_before_clean_close("strace-log-file", |log| {
        ServerProcess::builder().log_file(log)
    });
}

#[test]
fn under_strace_a_reply_is_synced_to_stderr_in_a_file_before_its_clean_close() {
    assert_synced_before_clean_close("strace-stderr", |log| {
        ServerProcess::builder().stderr_to(log).log_read_from(log)
    });
}

/// Waits up to `within` for a whole line of `file` that contains `needle`.
fn line_within(file: &LogFile, needle: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(line) = file.lines().into_iter().find(|line| line.contains(needle)) {
            return Some(line);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]

fn a_log_file_at_its_size_limit_is_rotated_and_replies_are_recorded_again() {
    if !require_program("prlimit", "apt-get install util-linux") {
        return;
    }
    let dir = TempDir::new("size-limit");
    let current = LogFile::new(dir.path.join("server.log"));
    let rotated = LogFile::new(dir.path.join("server.log.1"));
    // RLIMIT_FSIZE: a write past 16 KiB fails with EFBIG (the server
    // ignores SIGXFSZ); a new file can take 16 KiB again.
    let mut server = ServerProcess::builder()
        .env("RUST_LOG", "info")
        .json_log()
        .wrapper("prlimit", ["--fsize=16384"])
        .args(["--record-timeout", "1"])
        .log_file(&current.path)
        .start();
    let mut before = Vec::new();
    for n in 0.. {
        assert!(n < 500, "the log file never reached its size limit");
        let reply = format!("before {n}");
        let (peer, end) = session_end(server.addr, &reply);
        if end == End::Reset {
            break;
        }
        before.push((peer.to_string(), reply));
    }
    server.expect_line("file too large");

    fs::rename(&current.path, &rotated.path).unwrap();
    server.signal("HUP");
    // The writer retries the failed write at least once a second.
    let reopened = line_within(&current, "log_reopened", Duration::from_secs(3));
    assert!(
        reopened.is_some(),
        "no new log file 3 s after the full one was renamed and the server got SIGHUP"
    );
    let mut after = Vec::new();
    for n in 0..5 {
        let reply = format!("after {n}");
        let (peer, end) = session_end(server.addr, &reply);
        assert_eq!(end, End::Clean, "{reply} from {peer}, after the rotation");
        after.push((peer.to_string(), reply));
    }
    server.signal("TERM");
    let status = server.wait_exit();
    assert_eq!(
        status.code(),
        Some(3),
        "the reply that was reset is not recorded"
    );

    let old = replies_in(&rotated);
    let new = replies_in(&current);
    for (files, sessions) in [(&old, &before), (&new, &after)] {
        for (peer, reply) in sessions {
            assert_eq!(files.get(reply), Some(&vec![peer.clone()]), "{reply}");
        }
    }
}

#[test]

fn while_the_log_file_cannot_grow_stderr_never_says_it_takes_writes_again() {
    if !require_program("prlimit", "apt-get install util-linux") {
        return;
    }
    let dir = TempDir::new("cannot-grow");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // How long the log's first line is (RUST_LOG=off: only `listening on`
    // before any record), from a first run on the same socket.
    let measured = LogFile::new(dir.path.join("measure.log"));
    let mut measuring = ServerProcess::builder()
        .env("RUST_LOG", "off")
        .inherit(&listener)
        .log_file(&measured.path)
        .start();
    measuring.signal("KILL");
    let _ = measuring.exit_status_by(Instant::now() + TIMEOUT);
    let first_line = fs::metadata(&measured.path).unwrap().len();

    // The file can hold that line and not one byte more: every record
    // fails whole, and is given up after --record-timeout.
    let mut server = ServerProcess::builder()
        .env("RUST_LOG", "off")
        .inherit(&listener)
        .wrapper("prlimit", [format!("--fsize={first_line}")])
        .args(["--record-timeout", "1"])
        .log_file(dir.path.join("server.log"))
        .start();
    for n in 0..3 {
        let (peer, end) = session_end(server.addr, &format!("lost {n}"));
        assert_eq!(end, End::Reset, "{peer}: its record cannot be written");
    }
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(3));
    assert!(
        server
            .seen
            .iter()
            .any(|line| line.contains("file too large")),
        "{:#?}",
        server.seen
    );
    let recovered: Vec<&String> = server
        .seen
        .iter()
        .filter(|line| line.contains("takes writes again"))
        .collect();
    assert!(
        recovered.is_empty(),
        "the log file never took a write, yet stderr says: {recovered:#?}"
    );
}

#[test]

fn a_reopen_that_fails_keeps_the_old_file_and_says_so() {
    let dir = TempDir::new("reopen-fails");
    fs::create_dir(dir.path.join("logs")).unwrap();
    let mut server = ServerProcess::builder()
        .env("RUST_LOG", "info")
        .log_file(dir.path.join("logs/server.log"))
        .start();
    // The directory is gone: the path cannot be opened again.
    fs::rename(dir.path.join("logs"), dir.path.join("logs.old")).unwrap();
    let old = LogFile::new(dir.path.join("logs.old/server.log"));
    server.signal("HUP");
    let report =
        server.expect_line_matching("a report on stderr", |line| !line.contains("listening on"));

    let (peer, end) = session_end(server.addr, "still kept");
    assert_eq!(end, End::Clean, "{peer}: the old file still takes writes");
    old.wait_for(&format!("{peer} said: \"still kept\""));
    assert!(
        report.contains("reopen") && !report.contains("replies wait"),
        "the report should say the reopen failed and the old file is kept: {report}"
    );
    let said_in_log: Vec<String> = old
        .lines()
        .into_iter()
        .filter(|line| line.contains("reopen") && !line.contains("SIGHUP received"))
        .collect();
    assert!(
        !said_in_log.is_empty(),
        "the log does not say the reopen failed:\n{}",
        old.lines().join("\n")
    );
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);
}

/// A reply written into a log file that was deleted is in no record: the
/// server notices, makes the file anew and writes the reply there before
/// the clean close; if the file cannot be made again, the client is reset.
#[test]
fn a_deleted_log_file_is_made_anew_or_its_clients_are_reset() {
    let dir = TempDir::new("deleted-log");
    fs::create_dir(dir.path.join("logs")).unwrap();
    let path = dir.path.join("logs/server.log");
    let mut server = ServerProcess::builder()
        .log_file(&path)
        .args(["--record-timeout", "1"])
        .start();
    let (_, end) = session_end(server.addr, "before");
    assert_eq!(end, End::Clean);

    fs::remove_file(&path).unwrap();
    let (peer, end) = session_end(server.addr, "after");
    assert_eq!(end, End::Clean, "{peer}");
    let made_anew = LogFile::new(&path);
    made_anew.wait_for(&format!("{peer} said: \"after\""));
    server.expect_line_matching("a report of the deletion", |line| line.contains("deleted"));

    fs::remove_file(&path).unwrap();
    fs::remove_dir(dir.path.join("logs")).unwrap();
    let (peer, end) = session_end(server.addr, "nowhere");
    assert_eq!(end, End::Reset, "{peer}: its reply is in no file");
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(3), "{:#?}", server.seen);
}

/// A log file that cannot be synced (a character device, a pipe) is written
/// without a sync, as stderr on a pipe is, instead of failing every batch.
#[test]
fn a_log_file_that_is_not_a_regular_file_takes_replies_without_a_sync() {
    // stderr still says where the server listens.
    let mut server = ServerProcess::builder()
        .args(["--log-file", "/dev/null", "--record-timeout", "1"])
        .start();
    let (peer, end) = session_end(server.addr, "into the void");
    assert_eq!(end, End::Clean, "{peer}");
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);
}

/// Colours are for a terminal: with `--log-file`, the file gets plain
/// lines even when the server runs on one (`script` gives it a terminal).
#[test]
fn a_server_on_a_terminal_writes_its_log_file_without_colours() {
    if !require_program("script", "apt-get install bsdutils") {
        return;
    }
    let dir = TempDir::new("colours");
    let path = dir.path.join("server.log");
    let binary = env!("CARGO_BIN_EXE_prompt-server");
    let inner = format!(
        "echo pid $$; exec env RUST_LOG=info {binary} --bind 127.0.0.1 --port 0 --log-file {}",
        path.display()
    );
    let mut terminal = KillOnDrop(
        Command::new("script")
            .args(["-qfec", &inner, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start script"),
    );
    let mut output = BufReader::new(terminal.stdout.take().expect("script's output"));
    let (mut pid, mut addr) = (None, None);
    let mut line = String::new();
    while addr.is_none() && output.read_line(&mut line).expect("a line") > 0 {
        pid = pid.or_else(|| line.trim().strip_prefix("pid ").map(str::to_string));
        addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| {
                addr.trim_end_matches("\u{1b}[0m")
                    .parse::<SocketAddr>()
                    .ok()
            });
        line.clear();
    }
    let (pid, addr) = (pid.expect("the server's pid"), addr.expect("its address"));
    let (peer, end) = session_end(addr, "plain");
    assert_eq!(end, End::Clean);
    let log = LogFile::new(&path);
    log.wait_for(&format!("{peer} said: \"plain\""));
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(terminal.wait().expect("script").success());
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in the log file: {text:?}"
    );
}
