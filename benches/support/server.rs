//! The servers under test, as child processes: the project's binary in its
//! modes and the tokio yardstick (this benchmark re-executed in its role).
//! Each one's stderr is a pipe read by a thread of the benchmark, as
//! journald would read a service's: the address comes from the `listening
//! on` line, and the rest is drained so the pipe never fills. A log file
//! would measure the file system too (the project's server is to sync a
//! log that is a regular file). Each server is killed (by its PID) when
//! dropped.

use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::child::KillOnDrop;
use crate::lines;
use crate::yardstick;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const LISTENING: &str = "listening on ";

/// A server process under test.
pub struct Server {
    pub name: String,
    child: KillOnDrop,
    pub addr: SocketAddr,
}

impl Server {
    /// The project's binary on 127.0.0.1, port 0, with extra `args`.
    pub fn start_project(name: &str, args: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_prompt-server"));
        command
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info");
        Server::spawn(name, command)
    }

    /// The tokio yardstick.
    pub fn start_yardstick(name: &str) -> Server {
        let mut command = Command::new(std::env::current_exe().expect("bench executable"));
        command
            .env(yardstick::ROLE_VAR, yardstick::ROLE)
            .env("RUST_LOG", "info");
        Server::spawn(name, command)
    }

    /// Starts `command` with its stderr to a pipe and waits for its
    /// `listening on ADDR` line.
    fn spawn(name: &str, mut command: Command) -> Server {
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
            child,
            addr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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
