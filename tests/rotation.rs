//! Log rotation under load: with `--log-file`, the file is renamed and the
//! server told to reopen it (SIGHUP) while clients are served, by hand and
//! by the real logrotate with the shipped configuration
//! (contrib/logrotate/prompt-server, `create` mode). Every reply a client
//! saw acknowledged (a clean close) is in exactly one of the two files,
//! and the new file starts with the line that says it was reopened.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use common::*;

/// The shipped logrotate configuration, and the log path it names.
const SHIPPED_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/logrotate/prompt-server"
);
const SHIPPED_LOG_PATH: &str = "/var/log/prompt-server/prompt-server.log";
/// The unit whose log it rotates.
const SHIPPED_UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/systemd/prompt-server.service"
);

/// A session a client finished: its address, its reply, how it ended.
struct Finished {
    peer: String,
    reply: String,
    end: End,
}

/// `clients` threads each doing `sessions` sessions one after another; the
/// receiver hears of each acknowledged one as it happens.
fn run_clients(
    server: &ServerProcess,
    clients: usize,
    sessions: usize,
) -> (Vec<JoinHandle<Vec<Finished>>>, Receiver<()>) {
    let addr = server.addr;
    let (acked, acks) = mpsc::channel();
    let threads = (0..clients)
        .map(|client| {
            let acked = acked.clone();
            thread::spawn(move || {
                (0..sessions)
                    .map(|session| {
                        let reply = format!("client {client} session {session}");
                        let (peer, end) = session_end(addr, &reply);
                        if end == End::Clean {
                            let _ = acked.send(());
                        }
                        Finished {
                            peer: peer.to_string(),
                            reply,
                            end,
                        }
                    })
                    .collect()
            })
        })
        .collect();
    (threads, acks)
}

/// Waits until `count` sessions have been acknowledged.
fn wait_for_acks(acks: &Receiver<()>, count: usize) {
    for n in 0..count {
        acks.recv_timeout(TIMEOUT)
            .unwrap_or_else(|e| panic!("only {n} of {count} sessions acknowledged: {e}"));
    }
}

fn join_all(threads: Vec<JoinHandle<Vec<Finished>>>) -> Vec<Finished> {
    threads
        .into_iter()
        .flat_map(|thread| thread.join().expect("client thread"))
        .collect()
}

/// Checks that every session was acknowledged and that each reply is in
/// exactly one of `files` (with the right peer); returns how many replies
/// each file holds.
fn assert_each_reply_once(finished: &[Finished], files: &[&LogFile]) -> Vec<usize> {
    let mut found: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    let mut per_file = vec![0; files.len()];
    for (n, file) in files.iter().enumerate() {
        for record in file.records() {
            if record["event"] == "reply" {
                let reply = record["reply"].as_str().unwrap_or_default().to_string();
                let peer = record["peer"].as_str().unwrap_or_default().to_string();
                found.entry(reply).or_default().push((n, peer));
                per_file[n] += 1;
            }
        }
    }
    let reset: Vec<&str> = finished
        .iter()
        .filter(|session| session.end != End::Clean)
        .map(|session| session.reply.as_str())
        .collect();
    assert!(reset.is_empty(), "sessions reset: {reset:?}");
    for session in finished {
        let places = found.get(&session.reply).map_or(&[][..], Vec::as_slice);
        assert!(
            matches!(places, [(_, peer)] if *peer == session.peer),
            "{:?} from {}, acknowledged, is in the files {places:?} (file, peer) instead of once",
            session.reply,
            session.peer
        );
    }
    assert_eq!(
        found.values().map(Vec::len).sum::<usize>(),
        finished.len(),
        "replies in the files that no client sent"
    );
    per_file
}

/// Asserts that the first line of `file` is the reopened line.
fn assert_starts_with_reopened_line(file: &LogFile) {
    let lines = file.lines();
    let first = lines.first().map(String::as_str).unwrap_or_default();
    let record: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first:?}"));
    assert_eq!(record["event"], "log_reopened", "{first}");
    assert!(
        message(&record).starts_with("log file reopened (SIGHUP): "),
        "{first}"
    );
    let reopened = lines.iter().filter(|line| line.contains("log_reopened"));
    assert_eq!(reopened.count(), 1, "{}", lines.join("\n"));
}

/// The binary logging in JSON to `dir/server.log`.
fn start_logging_to(dir: &Path) -> ServerProcess {
    ServerProcess::builder()
        .json_log()
        .log_file(dir.join("server.log"))
        .start()
}

#[test]
fn renaming_the_log_and_sighup_under_load_keeps_every_reply_exactly_once() {
    const CLIENTS: usize = 200;
    const SESSIONS: usize = 5;
    let dir = TempDir::new("rotation-by-hand");
    let mut server = start_logging_to(&dir.path);
    let current = LogFile::new(dir.path.join("server.log"));
    let rotated = LogFile::new(dir.path.join("server.log.1"));

    let started = Instant::now();
    let (clients, acks) = run_clients(&server, CLIENTS, SESSIONS);
    wait_for_acks(&acks, CLIENTS / 2);
    fs::rename(&current.path, &rotated.path).expect("rename the log");
    let hup_at = started.elapsed();
    server.signal("HUP");
    current.wait_for("log_reopened");
    let reopened_at = started.elapsed();
    let finished = join_all(clients);
    let took = started.elapsed();

    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);
    assert_starts_with_reopened_line(&current);
    let per_file = assert_each_reply_once(&finished, &[&rotated, &current]);
    assert!(
        per_file.iter().all(|&n| n > 0),
        "replies per file (rotated, new): {per_file:?}: the rotation was not under load"
    );
    eprintln!(
        "{} sessions of {CLIENTS} clients in {took:?}, SIGHUP at {hup_at:?}, reopened at \
         {reopened_at:?}; replies in the rotated and the new file: {per_file:?}",
        finished.len()
    );
}

/// The shipped configuration, for a log at `log` and a server whose PID is
/// `pid`: its postrotate block replaced by one that sends the server
/// SIGHUP (as the unit's ExecReload= does).
fn logrotate_config_for(log: &Path, pid: u32) -> String {
    let shipped = fs::read_to_string(SHIPPED_CONFIG).expect("read the shipped config");
    assert!(shipped.contains(SHIPPED_LOG_PATH), "{shipped}");
    let (before, rest) = shipped
        .split_once("    postrotate\n")
        .expect("a postrotate block");
    let (_, after) = rest.split_once("    endscript\n").expect("its endscript");
    let log = log.to_str().expect("a UTF-8 path");
    format!("{before}    postrotate\n        kill -HUP {pid}\n    endscript\n{after}")
        .replace(SHIPPED_LOG_PATH, log)
}

#[test]
fn the_shipped_logrotate_config_rotates_under_load_without_losing_a_reply() {
    const CLIENTS: usize = 50;
    const SESSIONS: usize = 4;
    if !require_program("logrotate", "apt-get install logrotate") {
        return;
    }
    let dir = TempDir::new("logrotate");
    let mut server = start_logging_to(&dir.path);
    let current = LogFile::new(dir.path.join("server.log"));
    let rotated = LogFile::new(dir.path.join("server.log.1"));
    let config = dir.path.join("logrotate.conf");
    fs::write(&config, logrotate_config_for(&current.path, server.pid())).unwrap();

    let started = Instant::now();
    let (clients, acks) = run_clients(&server, CLIENTS, SESSIONS);
    wait_for_acks(&acks, CLIENTS);
    let state = dir.path.join("logrotate.state");
    let output = Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(&state)
        .arg(&config)
        .output()
        .expect("run logrotate");
    assert!(
        output.status.success(),
        "logrotate failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    current.wait_for("log_reopened");
    let rotated_at = started.elapsed();
    let finished = join_all(clients);

    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0), "{:#?}", server.seen);
    assert_starts_with_reopened_line(&current);
    assert!(
        !dir.path.join("server.log.1.gz").exists(),
        "delaycompress: the newest rotated file stays as it is"
    );
    let per_file = assert_each_reply_once(&finished, &[&rotated, &current]);
    assert!(
        per_file.iter().all(|&n| n > 0),
        "replies per file (rotated, new): {per_file:?}: the rotation was not under load"
    );
    eprintln!(
        "logrotate ran at {rotated_at:?}; replies in the rotated and the new file: {per_file:?}"
    );
}

#[test]
fn the_shipped_logrotate_config_renames_and_reloads_the_service_that_writes_the_file() {
    let shipped = fs::read_to_string(SHIPPED_CONFIG).expect("read the shipped config");
    let directives: Vec<&str> = shipped
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(
        directives.first(),
        Some(&"/var/log/prompt-server/prompt-server.log {")
    );
    for directive in [
        "daily",
        "rotate 14",
        "compress",
        "delaycompress",
        "missingok",
        "notifempty",
        "create",
    ] {
        assert!(
            directives.contains(&directive),
            "no {directive:?} in {shipped}"
        );
    }
    assert!(
        !directives.iter().any(|line| line.contains("copytruncate")),
        "copytruncate loses the lines written between its copy and its truncation"
    );
    let script: Vec<&str> = directives
        .iter()
        .skip_while(|line| **line != "postrotate")
        .take_while(|line| **line != "endscript")
        .copied()
        .collect();
    assert_eq!(
        script,
        [
            "postrotate",
            "if systemctl --quiet is-active prompt-server.service; then",
            "systemctl reload prompt-server.service",
            "fi",
        ],
        "postrotate reloads the service only if it runs"
    );

    // The unit writes the file the config rotates, and reloads by SIGHUP.
    let unit = fs::read_to_string(SHIPPED_UNIT).expect("read the shipped unit");
    let unit_lines: Vec<&str> = unit.lines().map(str::trim).collect();
    let exec_start = unit_lines
        .iter()
        .find(|line| line.starts_with("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart= in {unit}"));
    assert!(
        exec_start.contains(&format!("--log-file {SHIPPED_LOG_PATH}")),
        "{exec_start}"
    );
    for setting in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LogsDirectory=prompt-server",
    ] {
        assert!(unit_lines.contains(&setting), "no {setting:?} in {unit}");
    }

    if require_program("logrotate", "apt-get install logrotate") {
        // logrotate's own reading of it (-d: nothing is done).
        let dir = TempDir::new("logrotate-debug");
        let config = dir.path.join("prompt-server");
        fs::write(&config, &shipped).unwrap();
        let output = Command::new("logrotate")
            .arg("-d")
            .arg("-s")
            .arg(dir.path.join("state"))
            .arg(&config)
            .output()
            .expect("run logrotate -d");
        let said = String::from_utf8_lossy(&output.stderr).to_string()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && !said.contains("error"),
            "logrotate -d: {}: {said}",
            output.status
        );
    }
}
