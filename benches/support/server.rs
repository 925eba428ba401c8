//! The servers under test, as child processes: the project's binary in its
//! modes and the yardsticks (this benchmark re-executed in a yardstick's
//! role). Each one's stderr is a pipe read by a thread of the benchmark, as
//! journald would read a service's: the address comes from the `listening
//! on` line, and the rest is drained so the pipe never fills. A log file
//! would measure the file system too (the project's server is to sync a
//! log that is a regular file). Each server is killed (by its PID) when
//! dropped.

use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;

use crate::child::KillOnDrop;
use crate::client::Target;
use crate::lines;

/// Set in the environment of a child that should be a yardstick; its value
/// is the yardstick's name.
pub const ROLE_VAR: &str = "PROMPT_BENCH_ROLE";

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Clock ticks per second of the times in /proc/PID/stat (USER_HZ, which
/// the kernel keeps at 100 in what it shows user space).
const USER_HZ: u64 = 100;
const LISTENING: &str = "listening on ";

/// A server process under test.
pub struct Server {
    pub name: String,
    /// What it was started with beside its address, for the record.
    pub args: Vec<String>,
    child: KillOnDrop,
    pub addr: SocketAddr,
    /// For a TLS server: a client configuration that trusts it.
    pub tls: Option<Arc<ClientConfig>>,
}

impl Server {
    /// The project's binary on 127.0.0.1, port 0, with extra `args`.
    pub fn start_project(name: &str, args: &[String]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_prompt-server"));
        command
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info");
        Server::spawn(name, args.to_vec(), command)
    }

    /// This executable in the role of the yardstick called `name`.
    pub fn start_yardstick(name: &str) -> Server {
        let mut command = Command::new(std::env::current_exe().expect("bench executable"));
        command.env(ROLE_VAR, name).env("RUST_LOG", "info");
        Server::spawn(name, Vec::new(), command)
    }

    /// Starts `command` with its stderr to a pipe and waits for its
    /// `listening on ADDR` line.
    fn spawn(name: &str, args: Vec<String>, mut command: Command) -> Server {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server");
        let stderr = child.stderr.take().expect("piped stderr");
        let child = KillOnDrop(child);
        let lines = lines::forward(stderr, |line| line.contains(LISTENING));
        let line = lines::wait_for(&lines, STARTUP_TIMEOUT, |line| line.contains(LISTENING))
            .unwrap_or_else(|why| panic!("{name} did not start: {why}"));
        let addr = line
            .split(LISTENING)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no address in {line:?}"));
        Server {
            name: name.to_string(),
            args,
            child,
            addr,
            tls: None,
        }
    }

    /// Where the load generator sends sessions.
    pub fn target(&self) -> Target {
        Target {
            addr: self.addr,
            tls: self.tls.clone(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the whole process has used so far, every thread, live or
    /// exited: utime + stime, fields 14 and 15 of /proc/PID/stat.
    pub fn cpu_time(&self) -> Duration {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: cannot read {path}: {e}", self.name));
        // Field 2, the command name, is in parentheses and may hold spaces:
        // fields are counted after its closing one, which is field 3.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |number: usize| -> u64 {
            fields
                .get(number - 3)
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{path}: no field {number} in {stat:?}"))
        };
        let ticks = field(14) + field(15);
        Duration::from_micros(ticks * 1_000_000 / USER_HZ)
    }

    /// (RSS in KiB, thread count) from /proc.
    pub fn memory_and_threads(&self) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("Threads:"))
    }
}
