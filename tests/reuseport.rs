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
