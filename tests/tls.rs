//! TLS (`--tls-cert`, `--tls-key`, `--tls-client-ca`) with real clients:
//! `openssl s_client` and `ncat --ssl` are served, recorded, and see
//! `close_notify` and a clean close; a reply not recorded whole gets no
//! `close_notify`; a plain-TCP client, one that stalls mid-handshake and one
//! without the certificate mutual TLS asks for are reset, logged and
//! counted, and free their slot; a certificate and key that do not match
//! stop the start; SIGHUP renews the certificate under load. HAProxy in
//! front of a TLS server: tests/haproxy.rs.
//!
//! Certificates come from the real `openssl` command (tests/common/tls.rs);
//! without it the tests skip with one SKIPPED line (ncat's test, without
//! ncat), unless `PROMPT_SERVER_REQUIRE_ALL=1`, as `.ci/run` sets.

mod common;
mod metrics_scrape;

use std::fs;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::tls::{Identity, Pki, SERVER_NAME, TlsClientSession, client_config, tls_session};
use common::*;
use metrics_scrape::{sample, scrape};
use rustls::ClientConnection;
use rustls::pki_types::ServerName;

/// A test's directory, its CA, and a server certificate from it.
struct Setup {
    pki: Pki,
    server: Identity,
    _dir: TempDir,
}

/// The certificates, or `None` (the test skips) without openssl.
#[track_caller]
fn setup(name: &str) -> Option<Setup> {
    if !require_program("openssl", "apt-get install openssl") {
        return None;
    }
    let dir = TempDir::new(&format!("tls-{name}"));
    let pki = Pki::new(&dir.path);
    let server = pki.server("server");
    Some(Setup {
        pki,
        server,
        _dir: dir,
    })
}

impl Setup {
    /// The binary with JSON logs, serving TLS with the server certificate.
    fn start(&self, args: &[&str]) -> ServerProcess {
        ServerProcess::builder()
            .json_log()
            .arg("--tls-cert")
            .arg(&self.server.cert)
            .arg("--tls-key")
            .arg(&self.server.key)
            .args(args)
            .start()
    }

    /// One session with a rustls client that trusts the CA.
    fn session(
        &self,
        addr: SocketAddr,
        identity: Option<&Identity>,
    ) -> io::Result<TlsClientSession> {
        tls_session(
            connect(addr),
            &client_config(&self.pki.ca, identity),
            b"yes\n",
        )
    }
}

/// Runs `program` with `args` and `input` on its stdin, ended by `timeout`
/// (coreutils) should it hang.
fn run_client(program: &str, args: &[String], input: &[u8]) -> Output {
    let mut child = Command::new("timeout")
        .arg(TIMEOUT.as_secs().to_string())
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input).expect("write the reply");
    drop(stdin);
    child.wait_with_output().expect("wait for the client")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn openssl_s_client_is_served_recorded_and_sees_close_notify() {
    let Some(setup) = setup("s-client") else {
        return;
    };
    let mut server = setup.start(&[]);
    // -ign_eof: the end of its stdin does not end the session; only the
    // server's close does, which it prints as "closed" (after close_notify).
    let args = [
        "s_client",
        "-connect",
        &server.addr.to_string(),
        "-servername",
        SERVER_NAME,
        "-CAfile",
        &setup.pki.ca.display().to_string(),
        "-verify_return_error",
        "-ign_eof",
    ]
    .map(String::from);
    let output = run_client("openssl", &args, b"yes, said openssl\n");
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&text(PROMPT)), "{stdout}");
    assert!(
        stdout.lines().any(|line| line == "closed"),
        "no clean close: {stdout}\n{stderr}"
    );

    let record = server.expect_event("reply", |_| true);
    assert_eq!(record["reply"], "yes, said openssl");
    assert_eq!(record["tls_version"], "TLSv1_3", "{record}");
    assert!(
        record["tls_cipher"]
            .as_str()
            .is_some_and(|c| c.starts_with("TLS13_")),
        "{record}"
    );
    assert_eq!(record["tls_sni"], SERVER_NAME);
    assert!(record.get("tls_client").is_none(), "{record}");
    assert!(
        message(&record).ends_with(&format!(
            "said: \"yes, said openssl\" over TLSv1_3 {}, SNI \"localhost\"",
            record["tls_cipher"].as_str().unwrap_or_default()
        )),
        "{record}"
    );
}

#[test]
fn ncat_ssl_is_served_recorded_and_sees_a_clean_close() {
    let Some(setup) = setup("ncat") else {
        return;
    };
    if !require_program("ncat", "apt-get install ncat") {
        return;
    }
    let mut server = setup.start(&[]);
    let args = [
        "--ssl",
        "--ssl-verify",
        "--ssl-trustfile",
        &setup.pki.ca.display().to_string(),
        SERVER_NAME,
        &server.addr.port().to_string(),
    ]
    .map(String::from);
    let output = run_client("ncat", &args, b"yes, said ncat\n");
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(output.stdout, PROMPT, "{stderr}");
    let record = server.expect_event("reply", |_| true);
    assert_eq!(record["reply"], "yes, said ncat");
    assert!(record["tls_version"].as_str().is_some(), "{record}");
}

/// The invariant under TLS: `close_notify` only once the whole reply is
/// recorded; a reply cut at the cap is recorded truncated, and reset.
#[test]
fn a_reply_not_recorded_whole_gets_no_close_notify() {
    let Some(setup) = setup("truncated") else {
        return;
    };
    let mut server = setup.start(&["--max-reply-bytes", "3"]);
    let config = client_config(&setup.pki.ca, None);
    let session = tls_session(connect(server.addr), &config, b"too long\n").expect("a session");
    assert_eq!(session.prompt, PROMPT);
    let end = session.end.expect_err("no clean close");
    assert!(
        matches!(
            end.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
        ),
        "{end}"
    );
    server.expect_event("truncated", |record| record["reply"] == "too");
    let served = setup.session(server.addr, None).expect("a session");
    assert!(served.closed_cleanly(), "{:?}", served.end);
}

/// `--reply-timeout 0` waits forever under TLS too: the prompt's
/// `--write-timeout` does not bound the reply that follows.
#[test]
fn without_a_reply_timeout_a_reply_may_come_after_the_write_timeout() {
    let Some(setup) = setup("no-timeout") else {
        return;
    };
    let mut server = setup.start(&["--reply-timeout", "0", "--write-timeout", "0.2"]);
    let config = client_config(&setup.pki.ca, None);
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let conn = ClientConnection::new(config, name).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, connect(server.addr));
    let mut prompt = vec![0; PROMPT.len()];
    stream.read_exact(&mut prompt).expect("the prompt");
    // Slower than the write timeout: the client under test is slow.
    thread::sleep(Duration::from_millis(500));
    stream.write_all(b"slow yes\n").unwrap();
    let rest = stream.read_to_end(&mut Vec::new());
    assert_eq!(rest.expect("close_notify and an end of stream"), 0);
    server.expect_event("reply", |record| record["reply"] == "slow yes");
}

/// With `--proxy-protocol`, a ClientHello that comes in the same segment as
/// the PROXY header (the bytes read with it) starts the handshake.
#[test]
fn a_client_hello_sent_with_the_proxy_header_is_served() {
    let Some(setup) = setup("proxy-early") else {
        return;
    };
    let mut server = setup.start(&["--proxy-protocol", "--trusted-proxy", "127.0.0.1"]);
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let mut conn = ClientConnection::new(client_config(&setup.pki.ca, None), name).unwrap();
    let mut first = b"PROXY TCP4 192.0.2.7 127.0.0.1 4711 1337\r\n".to_vec();
    conn.write_tls(&mut first).expect("the ClientHello");
    let mut socket = connect(server.addr);
    socket.write_all(&first).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, socket);
    let mut prompt = vec![0; PROMPT.len()];
    stream.read_exact(&mut prompt).expect("the prompt");
    assert_eq!(prompt, PROMPT);
    stream.write_all(b"proxied yes\n").unwrap();
    assert_eq!(
        stream.read_to_end(&mut Vec::new()).expect("a clean close"),
        0
    );
    let record = server.expect_event("reply", |_| true);
    assert_eq!(record["peer"], "192.0.2.7:4711", "{record}");
    assert_eq!(record["reply"], "proxied yes");
}

/// A stop's cut-off under TLS: the silent client's record says so, and it
/// is reset without `close_notify`.
#[test]
fn a_client_cut_off_by_a_stop_is_recorded_as_such_and_reset() {
    let Some(setup) = setup("cut-off") else {
        return;
    };
    let mut server = setup.start(&["--shutdown-timeout", "0.2"]);
    let config = client_config(&setup.pki.ca, None);
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let conn = ClientConnection::new(config, name).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, connect(server.addr));
    let mut prompt = vec![0; PROMPT.len()];
    stream.read_exact(&mut prompt).expect("the prompt");
    server.signal("TERM");
    let end = stream.read_to_end(&mut Vec::new());
    assert!(end.is_err(), "no close_notify: {end:?}");
    server.expect_event("cut_off", |_| true);
    let stopped = server.expect_event("stopped", |_| true);
    assert_eq!(stopped["cut_off"], 1, "{stopped}");
}

/// Plain-TCP clients get no prompt, are reset, logged with why (one line a
/// second at most, the stop accounting for the rest) and counted (summary
/// and metrics), and each frees its slot at once.
#[test]
fn plain_tcp_clients_are_reset_logged_counted_and_free_their_slot() {
    const PLAIN: u64 = 3;
    let Some(setup) = setup("plain") else {
        return;
    };
    let args = ["--max-connections", "1", "--metrics-addr", "127.0.0.1:0"];
    let mut server = setup.start(&args);
    let metrics = server.expect_logged_event("metrics", |_| true)["addr"]
        .as_str()
        .and_then(|addr| addr.parse::<SocketAddr>().ok())
        .expect("the metrics address");

    for _ in 0..PLAIN {
        let mut client = connect(server.addr);
        client.write_all(b"hello\n").unwrap();
        let mut got = Vec::new();
        let read = client.read_to_end(&mut got);
        assert!(!got.starts_with(PROMPT), "{got:?}");
        assert!(read.is_err(), "a reset, not an end of stream: {got:?}");
    }
    let record = server.expect_event("tls_handshake", |_| true);
    let text = message(&record);
    assert!(
        text.contains("TLS handshake failed: received corrupt message"),
        "{text}"
    );
    assert_eq!(record["level"], "warn");

    // The one slot is free again: a TLS client is served, not turned away.
    assert!(
        setup
            .session(server.addr, None)
            .expect("a session")
            .closed_cleanly()
    );
    let body = scrape(metrics, "/metrics").body;
    let failed = [("outcome", "tls_handshake_failed")];
    assert_eq!(
        sample(&body, "prompt_server_connections_total", &failed),
        Some(PLAIN as f64)
    );

    server.signal("TERM");
    let stopped = server.expect_event("stopped", |_| true);
    assert_eq!(stopped["tls_handshake_failed"], PLAIN, "{stopped}");
    assert!(
        message(&stopped).contains(&format!(", {PLAIN} failed TLS handshakes, ")),
        "{stopped}"
    );
    let accounted: u64 = (server.events("tls_handshake").iter())
        .map(|line| u64::from(line["peer"].is_string()) + line["held_back"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(accounted, PLAIN, "{:#?}", server.seen);
}

/// A client that sends its ClientHello and then nothing is reset at the
/// reply deadline, like a silent client.
#[test]
fn a_client_stalling_mid_handshake_is_reset_at_the_reply_deadline() {
    let Some(setup) = setup("stall") else {
        return;
    };
    let mut server = setup.start(&["--reply-timeout", "1"]);
    let started = Instant::now();
    let mut socket = connect(server.addr);
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let mut hello = ClientConnection::new(client_config(&setup.pki.ca, None), name).unwrap();
    hello.write_tls(&mut socket).expect("send the ClientHello");
    let mut got = Vec::new();
    let read = socket.read_to_end(&mut got);
    let took = started.elapsed();
    assert!(read.is_err(), "a reset, not an end of stream");
    assert!(!got.is_empty(), "the server answered the ClientHello");
    assert!(
        took >= Duration::from_millis(900) && took < TIMEOUT,
        "{took:?}"
    );
    let record = server.expect_event("tls_handshake", |_| true);
    assert!(
        message(&record).ends_with("not done by the reply deadline"),
        "{record}"
    );
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_one_line_and_exit_1() {
    let Some(setup) = setup("mismatch") else {
        return;
    };
    let other = setup.pki.server("other");
    let with_files = |cert: &std::path::Path, key: &std::path::Path| {
        ServerProcess::builder()
            .args(["--bind", "127.0.0.1", "--port", "0", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
    };
    let output = with_files(&setup.server.cert, &other.key);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: cannot set up TLS: {} is not the key of {}",
            other.key.display(),
            setup.server.cert.display()
        )
    );
    let missing = setup.pki.dir.join("missing.pem");
    let output = with_files(&missing, &other.key);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: cannot set up TLS: {}: no such file or directory",
            missing.display()
        )
    );
}

#[test]
fn mutual_tls_serves_only_clients_the_ca_signed_and_records_their_subject() {
    let Some(setup) = setup("mutual") else {
        return;
    };
    let ca = setup.pki.ca.display().to_string();
    let mut server = setup.start(&["--tls-client-ca", &ca]);

    let refused = setup.session(server.addr, None);
    assert!(
        refused.is_err(),
        "served without a certificate: {refused:?}"
    );
    let record = server.expect_event("tls_handshake", |_| true);
    assert!(
        message(&record).contains("TLS handshake failed: "),
        "{record}"
    );

    // Signed by another CA: refused too.
    let stranger_dir = TempDir::new("tls-mutual-stranger");
    let stranger = Pki::new(&stranger_dir.path).client("mallory", "/CN=mallory");
    assert!(setup.session(server.addr, Some(&stranger)).is_err());

    let alice = setup
        .pki
        .client("alice", "/O=Example/CN=alice \"the admin\"");
    let served = setup.session(server.addr, Some(&alice)).expect("served");
    assert_eq!(served.prompt, PROMPT);
    assert!(served.closed_cleanly(), "{:?}", served.end);
    let record = server.expect_event("reply", |_| true);
    assert_eq!(
        record["tls_client"], "CN=alice \\\"the admin\\\",O=Example",
        "{record}"
    );
    assert!(
        message(&record).ends_with(r#", client "CN=alice \\\"the admin\\\",O=Example""#),
        "{record}"
    );
    // Both refusals are counted, whether or not their line was held back.
    server.signal("TERM");
    let stopped = server.expect_event("stopped", |_| true);
    assert_eq!(stopped["tls_handshake_failed"], 2, "{stopped}");
}

/// Clients connecting without a pause while the certificate is replaced
/// (by rename, as certbot does) and SIGHUP sent: none fails, each one that
/// starts after the reload's line sees the new certificate, and a pair that
/// does not match keeps it.
#[test]
fn sighup_renews_the_certificate_under_load_and_a_broken_pair_keeps_the_old() {
    let Some(setup) = setup("renewal") else {
        return;
    };
    let mut server = setup.start(&[]);
    let (old, new) = (setup.server.der(), setup.pki.server("renewed"));
    let config = client_config(&setup.pki.ca, None);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (config, stop, addr) = (Arc::clone(&config), Arc::clone(&stop), server.addr);
            thread::spawn(move || {
                let mut sessions = Vec::new();
                let deadline = Instant::now() + TIMEOUT;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let started = Instant::now();
                    let session = tls_session(connect(addr), &config, b"yes\n");
                    sessions.push((started, session));
                }
                sessions
            })
        })
        .collect();

    let replace = |from: &Identity| {
        for (file, to) in [
            (&from.cert, &setup.server.cert),
            (&from.key, &setup.server.key),
        ] {
            let staged = to.with_extension("new");
            fs::copy(file, &staged).unwrap();
            fs::rename(&staged, to).unwrap();
        }
    };
    server.expect_event("reply", |_| true);
    replace(&new);
    server.signal("HUP");
    server.expect_event("tls_reloaded", |_| true);
    let renewed_at = Instant::now();
    server.expect_event("reply", |_| true);
    // The new certificate with a key that is not its own.
    let broken = setup.pki.server("broken");
    fs::copy(&broken.key, &new.key).unwrap();
    replace(&new);
    server.signal("HUP");
    let failed = server.expect_event("tls_reload_failed", |_| true);
    assert!(message(&failed).contains("is not the key of"), "{failed}");
    let broken_at = Instant::now();
    // Replies logged just before `broken_at` may still be unread here, and
    // each of the 4 clients has a session under way: 16 more replies are
    // sure to include sessions started after it.
    for _ in 0..16 {
        server.expect_event("reply", |_| true);
    }
    stop.store(true, Ordering::Relaxed);

    let sessions: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let (mut before, mut after, mut after_broken) = (0, 0, 0);
    for (started, session) in &sessions {
        let session = session.as_ref().expect("no client fails");
        assert!(session.closed_cleanly(), "{:?}", session.end);
        if *started >= renewed_at {
            assert!(
                session.server_cert == new.der(),
                "an old certificate after the renewal"
            );
            after += 1;
            after_broken += usize::from(*started >= broken_at);
        } else {
            before += usize::from(session.server_cert == old);
        }
    }
    assert!(
        before > 0 && after > 0 && after_broken > 0,
        "{before} {after} {after_broken}"
    );
}
