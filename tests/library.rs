//! The library entry points that the binary and embedders use: bind on port
//! 0, read `local_addr()`, run on a thread, stop with a `Shutdown` handle.

mod common;

use std::sync::mpsc;
use std::thread;

use common::*;
use prompt_server::{Config, Shutdown, bind, run};

#[test]
fn library_server_serves_and_stops_on_shutdown() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
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
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
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
    let taken = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = taken.local_addr().unwrap();
    let error = bind(addr).unwrap_err();
    assert_eq!(
        format!("{error:#}"),
        format!("cannot listen on {addr}: address already in use")
    );
}
