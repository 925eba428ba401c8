//! Behind a real HAProxy on loopback, with `send-proxy` and `send-proxy-v2`:
//! a client connecting from its own address (127.0.0.2) is logged with that
//! address, not the balancer's; also in front of a TLS server.
//!
//! Needs the `haproxy` binary (Debian package `haproxy`); the tests install
//! nothing themselves. Without it they are skipped with one `SKIPPED` line,
//! unless `PROMPT_SERVER_REQUIRE_HAPROXY=1` (or `PROMPT_SERVER_REQUIRE_ALL=1`,
//! as `.ci/run` sets after installing it) makes that a failure. HAProxy gets its listening
//! socket already bound on port 0 (`bind fd@N`), so no fixed port is used
//! and no readiness wait is needed: connections queue until it accepts.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use common::tls::{Pki, client_config, tls_session};
use common::*;

/// The configuration docs/OPERATIONS.md shows, with the listening socket
/// passed in (`bind fd@N` where the document binds a port).
fn haproxy_config(listen_fd: i32, backend: SocketAddr, send_proxy: &str) -> String {
    format!(
        "global
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend prompt
    bind fd@{listen_fd}
    default_backend prompt_servers

backend prompt_servers
    server prompt1 {backend} {send_proxy}
"
    )
}

/// A running HAProxy, killed (by its PID) when dropped, and then its
/// directory removed (fields drop in this order).
struct Haproxy {
    /// Held only to be killed when the test is done.
    _child: KillOnDrop,
    addr: SocketAddr,
    dir: TempDir,
}

impl Haproxy {
    fn start(backend: SocketAddr, send_proxy: &str) -> Haproxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = TempDir::new(&format!("haproxy-{}", addr.port()));
        let config = dir.path.join("haproxy.cfg");
        let fd = listener.as_raw_fd();
        fs::write(&config, haproxy_config(fd, backend, send_proxy)).unwrap();

        // HAProxy inherits the bound socket: clear close-on-exec just for
        // the spawn.
        let socket = socket2::SockRef::from(&listener);
        socket.set_cloexec(false).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path.join("haproxy.log")).unwrap())
            .spawn()
            .expect("start haproxy");
        let child = KillOnDrop(child);
        socket.set_cloexec(true).unwrap();
        drop(listener);
        Haproxy {
            _child: child,
            addr,
            dir,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path.join("haproxy.log")).unwrap_or_default()
    }
}

fn client_behind(send_proxy: &str) {
    if !require_program("haproxy", "apt-get install haproxy") {
        return;
    }
    let mut server = ServerProcess::start(&["--proxy-protocol", "--trusted-proxy", "127.0.0.1"]);
    let haproxy = Haproxy::start(server.addr, send_proxy);

    let mut client = connect_from("127.0.0.2".parse().unwrap(), haproxy.addr);
    let prompt = read_line(&mut client);
    assert_eq!(prompt, PROMPT, "haproxy log:\n{}", haproxy.log());
    client.write_all(b"through haproxy\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");

    let line = server.expect_line(" said: ");
    let client_addr = client.local_addr().unwrap();
    assert_eq!(client_addr.ip().to_string(), "127.0.0.2");
    assert!(
        line.ends_with(&format!("{client_addr} said: \"through haproxy\"")),
        "{line}\nhaproxy log:\n{}",
        haproxy.log()
    );
}

#[test]
fn send_proxy_v1_logs_the_real_client() {
    client_behind("send-proxy");
}

#[test]
fn send_proxy_v2_logs_the_real_client() {
    client_behind("send-proxy-v2");
}

/// Behind a balancer, `--max-rate-per-ip` limits the real client the PROXY
/// header names, not the balancer every connection comes from.
#[test]
fn the_rate_limit_applies_to_the_real_client_not_the_balancer() {
    if !require_program("haproxy", "apt-get install haproxy") {
        return;
    }
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--proxy-protocol", "--trusted-proxy", "127.0.0.1"])
        .args(["--max-rate-per-ip", "2/min"])
        .start();
    let haproxy = Haproxy::start(server.addr, "send-proxy-v2");
    let through = |source: &str| {
        let mut client = connect_from(source.parse().unwrap(), haproxy.addr);
        let first = read_line(&mut client);
        if first == PROMPT {
            client.write_all(b"yes\n").unwrap();
        }
        assert_eq!(read_until_closed(&mut client), b"");
        first
    };
    assert_eq!(
        through("127.0.0.2"),
        PROMPT,
        "haproxy log:\n{}",
        haproxy.log()
    );
    assert_eq!(through("127.0.0.2"), PROMPT);
    assert_eq!(through("127.0.0.2"), BUSY, "127.0.0.2 is past its rate");
    // Four connections from the balancer so far; its clients are not.
    assert_eq!(through("127.0.0.3"), PROMPT);
    assert_eq!(through("127.0.0.3"), PROMPT);
    let record = server.expect_logged_event("rate_limited", |_| true);
    assert_eq!(record["network"], "127.0.0.2", "{record}");
    assert_eq!(
        record["proxy"]
            .as_str()
            .map(|p| p.starts_with("127.0.0.1:")),
        Some(true)
    );
}

/// HAProxy in TCP mode with `send-proxy-v2` in front of a TLS server: the
/// PROXY header comes first in clear, then the client's own handshake, and
/// the record names the real client.
#[test]
fn send_proxy_v2_in_front_of_a_tls_server_records_the_real_client() {
    if !require_program("haproxy", "apt-get install haproxy")
        || !require_program("openssl", "apt-get install openssl")
    {
        return;
    }
    let dir = TempDir::new("haproxy-tls");
    let pki = Pki::new(&dir.path);
    let identity = pki.server("server");
    let mut server = ServerProcess::builder()
        .json_log()
        .args([
            "--proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1",
            "--tls-cert",
        ])
        .arg(&identity.cert)
        .arg("--tls-key")
        .arg(&identity.key)
        .start();
    let haproxy = Haproxy::start(server.addr, "send-proxy-v2");

    let client = connect_from("127.0.0.2".parse().unwrap(), haproxy.addr);
    let client_addr = local(&client);
    let config = client_config(&pki.ca, None);
    let session = tls_session(client, &config, b"through haproxy, over TLS\n")
        .unwrap_or_else(|e| panic!("{e}; haproxy log:\n{}", haproxy.log()));
    assert_eq!(session.prompt, PROMPT);
    assert!(session.closed_cleanly(), "{:?}", session.end);
    let record = server.expect_event("reply", |_| true);
    assert_eq!(record["peer"], client_addr.to_string(), "{record}");
    assert_eq!(record["reply"], "through haproxy, over TLS");
    let proxy = record["proxy"].as_str().unwrap_or_default();
    assert!(proxy.starts_with("127.0.0.1:"), "{record}");
    assert!(record["tls_version"].is_string(), "{record}");
}
