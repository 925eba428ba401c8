//! The library entry points that the binary and embedders use: bind on port
//! 0, read `local_addr()`, run on a thread, stop with a `Shutdown` handle.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use prompt_server::{Config, Shutdown, bind};

#[test]
fn library_server_serves_and_stops_on_shutdown() {
    let server = LibraryServer::start(Config::default());
    session(server.addr, b"in process\n");
    server.shutdown.trigger();
    let result = server.result(TIMEOUT);
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn shutdown_before_run_stops_at_once() {
    let shutdown = Shutdown::new();
    shutdown.trigger();
    let server = LibraryServer::start_with(Config::default(), shutdown);
    let result = server.result(TIMEOUT);
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn bind_error_names_the_address() {
    let loopback = Config {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let taken = bind(&loopback).unwrap();
    let addr = taken.local_addr().unwrap();
    let error = bind(&Config {
        listen_addr: addr,
        ..Config::default()
    })
    .unwrap_err();
    // `{:#}`: today's anyhow error shows its cause only in the alternate
    // form; a plain error type shows the same text either way.
    assert_eq!(
        error.to_string(),
        format!("cannot listen on {addr}: address already in use")
    );
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
}

#[test]
fn a_client_that_never_reads_is_dropped_at_the_write_timeout() {
    // Far more than loopback socket buffers hold for a client that never reads.
    let server = LibraryServer::start(Config {
        prompt: vec![b'p'; 16 << 20],
        write_timeout: Duration::from_secs(1),
        shutdown_timeout: TIMEOUT,
        ..Config::default()
    });

    let client = small_window_client(server.addr);
    // Once prompt bytes arrive, the server's thread is writing to us.
    let mut first = [0u8; 1];
    assert_eq!(client.peek(&mut first).unwrap(), 1);
    let writing_since = Instant::now();

    // The server waits for connected clients on shutdown: the stuck write
    // must end by its own timeout for the client to count as done.
    server.shutdown.trigger();
    let summary = server.result(TIMEOUT * 2).unwrap();
    assert_eq!(summary.still_connected, 0, "{summary}");
    assert_eq!(summary.failed, 1, "{summary}");
    assert!(
        writing_since.elapsed() < TIMEOUT,
        "{:?}",
        writing_since.elapsed()
    );
    drop(client);
}

/// `write_timeout` is one budget for the whole prompt: a client that takes
/// it a little at a time, each write making progress, is still dropped
/// when the budget is spent (a budget per write never ran out).
#[test]
fn a_client_that_reads_the_prompt_slowly_is_dropped_at_the_write_timeout() {
    let server = LibraryServer::start(Config {
        prompt: vec![b'p'; 4 << 20],
        write_timeout: Duration::from_secs(1),
        ..Config::default()
    });
    let mut client = small_window_client(server.addr);
    let started = Instant::now();
    let mut chunk = [0u8; 512];
    let dropped_after = loop {
        // A reader, but a slow one: some 50 KiB a second.
        std::thread::sleep(Duration::from_millis(10));
        match std::io::Read::read(&mut client, &mut chunk) {
            Ok(0) | Err(_) => break started.elapsed(),
            Ok(_) => assert!(
                started.elapsed() < Duration::from_secs(8),
                "still being fed the prompt after {:?}",
                started.elapsed()
            ),
        }
    };
    assert!(
        dropped_after >= Duration::from_millis(900),
        "{dropped_after:?}"
    );
    server.shutdown.trigger();
    let summary = server.result(TIMEOUT).unwrap();
    assert_eq!(summary.failed, 1, "{summary}");
}

/// A client with a small receive buffer, so that a large prompt fills it
/// and the server's writes block until the client reads.
fn small_window_client(addr: std::net::SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect_timeout(&addr.into(), TIMEOUT).unwrap();
    let client: TcpStream = socket.into();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client
}
