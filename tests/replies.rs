//! Replies are data: a client sees a clean close only if its whole reply is
//! in the record, or it was told in words that it was not served;
//! otherwise it sees a reset, and the reply is counted as not recorded.
//!
//! Here against a log that takes nothing (stderr on `/dev/full`), bytes
//! that come after the server ended a reply itself (its deadline, a stop's
//! cut-off), `RUST_LOG` turning every diagnostic off, and the library with
//! reply sinks of its own: one that keeps, one that fails, one that blocks.

mod common;
mod metrics_scrape;

use std::io::{self, Write};
use std::net::{Shutdown as Direction, SocketAddr, TcpListener};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use metrics_scrape::{sample, scrape};
use prompt_server::{Config, Record, ReplyEnd, ReplySink};

/// `--record-timeout` where the log takes nothing: how long a client with
/// a reply waits for its reset.
const RECORD_TIMEOUT: &str = "1";

#[test]
fn with_stderr_on_dev_full_every_replying_client_is_reset_and_the_exit_status_is_3() {
    const CLIENTS: usize = 4;
    // stderr cannot carry the `listening on` line (nor the metrics one):
    // the test makes the sockets.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port(&["127.0.0.1"]))
        .parse()
        .unwrap();
    let mut server = ServerProcess::builder()
        .inherit(&listener)
        .stderr_to("/dev/full")
        .args(["--record-timeout", RECORD_TIMEOUT])
        .args(["--metrics-addr", &metrics.to_string()])
        .start_at(addr);
    drop(listener);

    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| thread::spawn(move || session_end(addr, &format!("reply {n}"))))
        .collect();
    for (n, client) in clients.into_iter().enumerate() {
        let (peer, end) = client.join().expect("client thread");
        assert_eq!(
            end,
            End::Reset,
            "client {n} ({peer}) saw a clean close, but no log line can be written"
        );
    }
    eprintln!("{CLIENTS} clients reset after {:?}", started.elapsed());

    let body = scrape(metrics, "/metrics").body;
    let not_recorded = sample(
        &body,
        "prompt_server_connections_total",
        &[("outcome", "not_recorded")],
    );
    assert_eq!(not_recorded, Some(CLIENTS as f64), "{body}");

    server.signal("TERM");
    let signalled = Instant::now();
    let status = server.exit_status_by(signalled + TIMEOUT);
    assert_eq!(
        status.and_then(|status| status.code()),
        Some(3),
        "exit status with replies not recorded: {status:?}"
    );
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
}

#[test]
fn bytes_after_the_reply_deadline_get_a_reset_and_are_in_no_record() {
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--reply-timeout", "1"])
        .start();
    let mut client = server.connect();
    expect_prompt(&mut client);
    let peer = local(&client).to_string();
    let connected = Instant::now();

    // The record is written before the close: once it is in the log, the
    // server has stopped reading.
    let timeout = server.expect_event("timeout", |record| record["peer"] == peer);
    assert_eq!(timeout["reply"], "", "{timeout}");
    let text = message(&timeout);
    assert!(text.ends_with(r#"without a full reply; got """#), "{text}");
    assert!(connected.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        send_and_see_end(&mut client, b"late\n"),
        End::Reset,
        "bytes sent after the deadline were not read: the client must not see a clean close"
    );

    server.signal("TERM");
    assert!(server.wait_exit().success(), "{:#?}", server.seen);
    assert_no_reply_with(&server, "late");
}

#[test]
fn bytes_after_the_shutdown_cut_off_get_a_reset_and_are_in_no_record() {
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--shutdown-timeout", "1"])
        .start();
    let mut client = server.connect();
    expect_prompt(&mut client);
    let peer = local(&client).to_string();
    client.write_all(b"part").unwrap();
    server.expect_event("read", |read| read["peer"] == peer && read["bytes"] == 4);

    server.signal("TERM");
    let cut_off = server.expect_event("cut_off", |record| record["peer"] == peer);
    assert_eq!(cut_off["reply"], "part", "{cut_off}");
    assert_eq!(
        send_and_see_end(&mut client, b" and late\n"),
        End::Reset,
        "bytes sent after the cut-off were not read: the client must not see a clean close"
    );
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{:#?}", server.seen);
    assert_no_reply_with(&server, "late");
    let stopped = server.expect_logged_event("stopped", |_| true);
    assert_eq!(stopped["cut_off"], 1, "{stopped}");
    assert_eq!(stopped["not_recorded"], 0, "{stopped}");
}

/// Fails if any record in the server's log holds `text`.
fn assert_no_reply_with(server: &ServerProcess, text: &str) {
    let holding: Vec<&String> = server
        .seen
        .iter()
        .filter(|line| line.contains(r#""reply":"#) && line.contains(text))
        .collect();
    assert!(
        holding.is_empty(),
        "a record holds {text:?}, which the server never read: {holding:#?}"
    );
}

#[test]
fn with_rust_log_off_every_reply_is_still_recorded() {
    let mut server = ServerProcess::builder().env("RUST_LOG", "off").start();
    let (peer, end) = session_end(server.addr, "silent");
    assert_eq!(end, End::Clean);
    server.signal("TERM");
    assert!(server.wait_exit().success(), "{:#?}", server.seen);
    let said = format!("{peer} said: \"silent\"");
    assert!(
        server.seen.iter().any(|line| line.ends_with(&said)),
        "a reply is data, not a diagnostic: no {said:?} in {:#?}",
        server.seen
    );
    assert!(
        !server.seen.iter().any(|line| line.contains("SIGTERM")),
        "diagnostics with RUST_LOG=off: {:#?}",
        server.seen
    );
}

#[test]
fn with_rust_log_off_the_json_log_holds_every_record_and_nothing_else() {
    let mut server = ServerProcess::builder()
        .env("RUST_LOG", "off")
        .json_log()
        .args(["--reply-timeout", "1"])
        .start();
    let (replied, end) = session_end(server.addr, "in json");
    assert_eq!(end, End::Clean);

    let mut closing = server.connect();
    expect_prompt(&mut closing);
    let closed = local(&closing);
    closing.shutdown(Direction::Write).unwrap();
    assert_eq!(end_of(&mut closing), End::Clean);

    let mut silent = server.connect();
    expect_prompt(&mut silent);
    let timed_out = local(&silent);
    assert_eq!(end_of(&mut silent), End::Reset, "a timed-out reply");

    server.signal("TERM");
    assert!(server.wait_exit().success(), "{:#?}", server.seen);
    let events: Vec<(String, String)> = server
        .seen
        .iter()
        .map(|line| {
            let record: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let peer = record["peer"].as_str().unwrap_or_default().to_string();
            (
                record["event"].as_str().unwrap_or_default().to_string(),
                peer,
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("listening", String::new()),
        ("reply", replied.to_string()),
        ("no_reply", closed.to_string()),
        ("timeout", timed_out.to_string()),
    ]
    .into_iter()
    .map(|(event, peer)| (event.to_string(), peer))
    .collect();
    assert_eq!(events, expected, "{:#?}", server.seen);
}

/// What a reply sink was given: the peer, the reply, and how it ended.
type Kept = (SocketAddr, Vec<u8>, String);

/// A reply sink that keeps records in memory, and can be made to fail, or
/// to block on replies that start with `slow` until released.
#[derive(Default)]
struct TestSink {
    kept: Mutex<Vec<Kept>>,
    failing: bool,
    /// Told each time a `slow` reply starts to block.
    blocked: Mutex<Option<mpsc::Sender<()>>>,
    released: Mutex<bool>,
    release: Condvar,
}

impl TestSink {
    fn failing() -> Self {
        TestSink {
            failing: true,
            ..TestSink::default()
        }
    }

    fn blocking(blocked: mpsc::Sender<()>) -> Self {
        TestSink {
            blocked: Mutex::new(Some(blocked)),
            ..TestSink::default()
        }
    }

    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.release.notify_all();
    }

    fn kept(&self) -> Vec<Kept> {
        self.kept.lock().unwrap().clone()
    }
}

impl ReplySink for TestSink {
    fn record(&self, record: &Record<'_>) -> io::Result<()> {
        if self.failing {
            return Err(io::Error::other("the store is down"));
        }
        assert!(!record.reply.starts_with(b"panic"), "the store broke");
        if record.reply.starts_with(b"slow") {
            if let Some(blocked) = &*self.blocked.lock().unwrap() {
                let _ = blocked.send(());
            }
            let released = self.released.lock().unwrap();
            let (released, _) = self
                .release
                .wait_timeout_while(released, TIMEOUT, |released| !*released)
                .unwrap();
            if !*released {
                return Err(io::Error::other("never released"));
            }
        }
        let end = match record.end {
            ReplyEnd::Line => "line".to_string(),
            ReplyEnd::Closed => "closed".to_string(),
            other => format!("{other:?}"),
        };
        self.kept
            .lock()
            .unwrap()
            .push((record.peer, record.reply.to_vec(), end));
        Ok(())
    }
}

/// The library's server with `sink` as its reply sink.
fn library_server(sink: &Arc<TestSink>) -> LibraryServer {
    LibraryServer::start(Config {
        reply_sink: Arc::clone(sink) as Arc<dyn ReplySink>,
        shutdown_timeout: Duration::from_secs(2),
        ..Config::default()
    })
}

#[test]
fn a_reply_sink_of_the_library_gets_every_reply() {
    let sink = Arc::new(TestSink::default());
    let server = library_server(&sink);
    let (yes, end) = session_end(server.addr, "yes");
    assert_eq!(end, End::Clean);
    let mut closing = connect(server.addr);
    expect_prompt(&mut closing);
    closing.write_all(b"no newline").unwrap();
    closing.shutdown(Direction::Write).unwrap();
    assert_eq!(end_of(&mut closing), End::Clean);
    let closed = local(&closing);

    server.shutdown.trigger();
    let summary = server.result(TIMEOUT).expect("run");
    assert_eq!(
        sink.kept(),
        vec![
            (yes, b"yes".to_vec(), "line".to_string()),
            (closed, b"no newline".to_vec(), "closed".to_string()),
        ]
    );
    assert_eq!(summary.replies, 2, "{summary}");
    assert_eq!(summary.not_recorded, 0, "{summary}");
}

#[test]
fn a_reply_sink_that_fails_resets_its_clients_and_counts_them_not_recorded() {
    let sink = Arc::new(TestSink::failing());
    let server = library_server(&sink);
    for reply in ["lost", "lost too"] {
        let (peer, end) = session_end(server.addr, reply);
        assert_eq!(end, End::Reset, "{peer}: a reply its sink refused");
    }
    server.shutdown.trigger();
    let summary = server.result(TIMEOUT).expect("run");
    assert_eq!(summary.not_recorded, 2, "{summary}");
    assert_eq!(summary.replies, 0, "{summary}");
}

#[test]
fn a_reply_sink_that_blocks_holds_up_no_other_client() {
    let (blocked, blocking) = mpsc::channel();
    let sink = Arc::new(TestSink::blocking(blocked));
    let server = library_server(&sink);
    let mut slow = connect(server.addr);
    expect_prompt(&mut slow);
    slow.write_all(b"slow\n").unwrap();
    blocking
        .recv_timeout(TIMEOUT)
        .expect("the sink blocks on the slow reply");

    let started = Instant::now();
    for n in 0..3 {
        let (peer, end) = session_end(server.addr, &format!("fast {n}"));
        assert_eq!(end, End::Clean, "{peer}");
    }
    let fast = started.elapsed();
    assert!(
        still_waiting(&slow),
        "the slow client was closed before its sink took its reply"
    );
    assert!(fast < Duration::from_secs(2), "3 sessions took {fast:?}");

    sink.release();
    assert_eq!(end_of(&mut slow), End::Clean);
    server.shutdown.trigger();
    let summary = server.result(TIMEOUT).expect("run");
    let replies: Vec<Vec<u8>> = sink.kept().into_iter().map(|(_, reply, _)| reply).collect();
    assert_eq!(
        replies,
        [&b"fast 0"[..], b"fast 1", b"fast 2", b"slow"],
        "the fast replies were kept while the slow one was blocked"
    );
    assert_eq!(summary.replies, 4, "{summary}");
}

/// Bytes after a whole reply line are no part of it: a client that sends
/// more while its reply is being recorded still gets a clean close (the
/// server reads them away first), not a reset.
#[test]
fn bytes_sent_while_the_reply_is_recorded_still_get_a_clean_close() {
    let (blocked, entered) = mpsc::channel();
    let sink = Arc::new(TestSink::blocking(blocked));
    let server = library_server(&sink);
    let mut client = connect(server.addr);
    expect_prompt(&mut client);
    client.write_all(b"slow yes\n").unwrap();
    entered
        .recv_timeout(TIMEOUT)
        .expect("the sink has the reply");
    // On loopback the bytes are in the server's receive queue once the
    // write returns, before the sink lets the close go ahead.
    client.write_all(b"and more\n").unwrap();
    sink.release();
    assert_eq!(end_of(&mut client), End::Clean);
    server.shutdown.trigger();
    let summary = server.result(TIMEOUT).expect("run");
    assert_eq!(summary.replies, 1, "{summary}");
}

/// A sink that panics has not kept the reply: its client is reset and the
/// reply counted as not recorded, and the server goes on.
#[test]
fn a_reply_sink_that_panics_resets_its_client_and_counts_it_not_recorded() {
    let sink = Arc::new(TestSink::default());
    let server = library_server(&sink);
    let (peer, end) = session_end(server.addr, "panic now");
    assert_eq!(end, End::Reset, "{peer}: a reply its sink panicked on");
    let (_, end) = session_end(server.addr, "fine");
    assert_eq!(end, End::Clean);
    server.shutdown.trigger();
    let summary = server.result(TIMEOUT).expect("run");
    assert_eq!((summary.replies, summary.not_recorded), (1, 1), "{summary}");
}
