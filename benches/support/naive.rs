//! The naive yardstick: the server written the simplest way with std, as
//! the Rust Book would first write it: accept in a loop, `thread::spawn` per
//! client, write the prompt, read one line through a `BufReader`, log it
//! with one write to stderr, close. No reply cap, no timeouts, no limit on
//! threads: not a server to run, but the floor of what a thread per
//! connection costs. Its CPU per session is the target of the project's
//! default mode (`threads`): at most 1.05 times it.
//!
//! The peer comes from `accept` itself (as the project's server gets it),
//! not from a `peer_addr` call per client after `incoming()`, so the floor
//! has no system call the project's server does not make.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

use prompt_server::Config;

/// Runs the naive server on 127.0.0.1, port 0, until killed.
pub fn serve() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    eprintln!(
        "listening on {}",
        listener.local_addr().expect("local_addr")
    );
    let prompt: &'static [u8] = Config::default().prompt.leak();
    loop {
        if let Ok((stream, peer)) = listener.accept() {
            thread::spawn(move || handle(stream, peer, prompt));
        }
    }
}

fn handle(mut stream: TcpStream, peer: SocketAddr, prompt: &[u8]) {
    if stream.write_all(prompt).is_err() {
        return;
    }
    let mut reply = Vec::new();
    if BufReader::new(&stream)
        .read_until(b'\n', &mut reply)
        .is_err()
    {
        return;
    }
    let reply = reply.strip_suffix(b"\n").unwrap_or(&reply);
    let reply = reply.strip_suffix(b"\r").unwrap_or(reply);
    // Formatted first: stderr is unbuffered, and `eprintln!` writes each
    // piece of its format separately.
    let line = format!("{peer} said: \"{}\"\n", reply.escape_ascii());
    let _ = io::stderr().write_all(line.as_bytes());
}
