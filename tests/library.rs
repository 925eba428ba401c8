//! The library entry points that the binary and embedders use: bind on port
//! 0, read `local_addr()`, run on a thread, stop with a `Shutdown` handle.

mod common;

use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use prompt_server::{Config, Shutdown, bind, run};

/// The default configuration on 127.0.0.1, port 0.
fn loopback_config() -> Config {
    Config {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    }
}

#[test]
fn library_server_serves_and_stops_on_shutdown() {
    let listener = bind(&loopback_config()).unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let (done, finished) = mpsc::channel();
    let handle = shutdown.clone();
    thread::spawn(move || {
        let result = run(listener, Config::default(), handle);
        let _ = done.send(result.map_err(|e| e.to_string()));
    });

    session(addr, b"in process\n");
    shutdown.trigger();
    let result = finished
        .recv_timeout(TIMEOUT)
        .expect("run returns after shutdown");
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn shutdown_before_run_stops_at_once() {
    let listener = bind(&loopback_config()).unwrap();
    let shutdown = Shutdown::new();
    shutdown.trigger();
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(run(listener, Config::default(), shutdown).is_ok());
    });
    assert_eq!(finished.recv_timeout(TIMEOUT), Ok(true));
}

#[test]
fn bind_error_names_the_address() {
    let taken = bind(&loopback_config()).unwrap();
    let addr = taken.local_addr().unwrap();
    let error = bind(&Config {
        listen_addr: addr,
        ..Config::default()
    })
    .unwrap_err();
    assert_eq!(
        format!("{error:#}"),
        format!("cannot listen on {addr}: address already in use")
    );
}

#[test]
fn a_client_that_never_reads_is_dropped_at_the_write_timeout() {
    let listener = bind(&loopback_config()).unwrap();
    let addr = listener.local_addr().unwrap();
    // Far more than loopback socket buffers hold for a client that never reads.
    let config = Config {
        prompt: vec![b'p'; 16 << 20],
        write_timeout: Duration::from_secs(1),
        shutdown_timeout: TIMEOUT,
        ..Config::default()
    };
    let shutdown = Shutdown::new();
    let handle = shutdown.clone();
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(run(listener, config, handle).map_err(|e| e.to_string()));
    });

    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect_timeout(&addr.into(), TIMEOUT).unwrap();
    let client: TcpStream = socket.into();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    // Once prompt bytes arrive, the server's thread is writing to us.
    let mut first = [0u8; 1];
    assert_eq!(client.peek(&mut first).unwrap(), 1);
    let writing_since = Instant::now();

    // The server waits for connected clients on shutdown: the stuck write
    // must end by its own timeout for the client to count as done.
    shutdown.trigger();
    let summary = finished
        .recv_timeout(TIMEOUT * 2)
        .expect("run returns")
        .unwrap();
    assert_eq!(summary.still_connected, 0, "{summary}");
    assert_eq!(summary.failed, 1, "{summary}");
    assert!(
        writing_since.elapsed() < TIMEOUT,
        "{:?}",
        writing_since.elapsed()
    );
    drop(client);
}
