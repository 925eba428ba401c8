//! The servers under test, as child processes: the project's binary and the
//! tokio yardstick (this benchmark re-executed in its yardstick role). Each
//! logs to a file, as an operator would run it, and is killed (by its PID)
//! when dropped.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::child::KillOnDrop;
use crate::yardstick;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the log file is read for the `listening on` line.
const STARTUP_POLL: Duration = Duration::from_millis(10);

/// A server process under test.
pub struct Server {
    pub name: String,
    child: KillOnDrop,
    pub addr: SocketAddr,
}

impl Server {
    /// The project's binary on 127.0.0.1, port 0, with extra `args`.
    pub fn start_project(name: &str, args: &[&str], out_dir: &Path) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_prompt-server"));
        command
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info");
        Server::spawn(name, command, out_dir)
    }

    /// The tokio yardstick.
    pub fn start_yardstick(name: &str, out_dir: &Path) -> Server {
        let mut command = Command::new(std::env::current_exe().expect("bench executable"));
        command
            .env(yardstick::ROLE_VAR, yardstick::ROLE)
            .env("RUST_LOG", "info");
        Server::spawn(name, command, out_dir)
    }

    /// Starts `command` with stderr to `out_dir/NAME.log` and waits for its
    /// `listening on` line there. A file gives no event to wait on, so the
    /// file is read again until the line is in it.
    fn spawn(name: &str, mut command: Command, out_dir: &Path) -> Server {
        let log_path = out_dir.join(format!("{name}.log"));
        let log = File::create(&log_path).expect("create log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start server");
        let child = KillOnDrop(child);
        let started = Instant::now();
        let addr = loop {
            let text = fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(rest) = text.split("listening on ").nth(1) {
                let addr = rest.lines().next().unwrap_or("").trim();
                break addr.parse().expect("address after 'listening on'");
            }
            assert!(
                started.elapsed() < STARTUP_TIMEOUT,
                "{name} did not start: {text}"
            );
            thread::sleep(STARTUP_POLL);
        };
        Server {
            name: name.to_string(),
            child,
            addr,
        }
    }

    /// (RSS in KiB, thread count) from /proc.
    pub fn memory_and_threads(&self) -> (u64, u64) {
        let status =
            fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
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
