//! `--reuseport`: several processes listen on one port, and the kernel
//! spreads the connections among them.

mod common;

use common::*;

#[test]
fn two_processes_with_reuseport_share_one_port_and_both_serve() {
    let port = free_port(&["127.0.0.1"]).to_string();
    let args = ["--bind", "127.0.0.1", "--port", &port, "--reuseport"];
    let mut first = ServerProcess::builder().args(args).start();
    let mut second = ServerProcess::builder().args(args).start();
    assert_eq!(first.addr, second.addr);

    // The kernel picks a listener by a hash of each connection's addresses:
    // over 64 connections, each process gets some (all 64 on one process
    // would happen once in 2^63 runs).
    for i in 0..64 {
        session(first.addr, format!("client {i}\n").as_bytes());
    }
    first.expect_logged("said: \"client ");
    second.expect_logged("said: \"client ");
}

/// A stop wakes its own accept loop even though the port is shared: the
/// old way, a connection to the port, reached the other process half the
/// time, which served it as a client while the stopping one waited on.
#[test]
fn stopping_one_of_them_is_prompt_and_the_other_sees_nothing() {
    let port = free_port(&["127.0.0.1"]).to_string();
    // No reply timeout: nothing but the stop itself can wake a loop.
    let args = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port,
        "--reuseport",
        "--reply-timeout",
        "0",
    ];
    let mut staying = ServerProcess::builder().json_log().args(args).start();
    // Each stop's wake-up would pick one of the two listeners at random.
    for _ in 0..4 {
        let mut stopping = ServerProcess::builder().args(args).start();
        let asked = std::time::Instant::now();
        stopping.signal("TERM");
        assert!(stopping.wait_exit().success(), "{:#?}", stopping.seen);
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(5),
            "the stop took {:?}",
            asked.elapsed()
        );
    }
    session(staying.addr, b"still here\n");
    staying.expect_event("reply", |_| true);
    assert!(
        staying.events("no_reply").is_empty(),
        "a stop's wake-up reached the other process: {:#?}",
        staying.seen
    );
}
