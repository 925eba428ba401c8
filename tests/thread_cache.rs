//! `--thread-cache`: finished connection threads serve later connections
//! instead of new threads being started, and everyone is still served.

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::*;

/// Thread ids of the server process now.
fn thread_ids(pid: u32) -> BTreeSet<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Threads that waited in `accept` serve the later connections: a thread
/// is started only when none was waiting, which in sessions one after
/// another happens only while the cache warms up (and, rarely, when a
/// client is quicker to connect again than the thread is to get back into
/// `accept`).
#[test]
fn cached_threads_serve_later_connections() {
    let mut server = ServerProcess::builder()
        .json_log()
        .args(["--thread-cache", "2"])
        .start();
    for warm_up in 0..3 {
        session(server.addr, format!("warm-up {warm_up}\n").as_bytes());
        server.expect_event("reply", |logged| {
            logged["reply"] == format!("warm-up {warm_up}")
        });
    }
    let mut seen = thread_ids(server.pid());
    let mut started = 0;
    for i in 0..30 {
        let reply = format!("again {i}");
        session(server.addr, format!("{reply}\n").as_bytes());
        server.expect_event("reply", |logged| logged["reply"] == reply);
        let now = thread_ids(server.pid());
        started += now.difference(&seen).count();
        seen.extend(now);
    }
    assert!(started <= 2, "{started} threads started for 30 sessions");
}

#[test]
fn without_the_cache_every_connection_gets_a_new_thread() {
    let mut server = ServerProcess::builder().json_log().start();
    session(server.addr, b"first\n");
    server.expect_event("disconnected", |_| true);
    let first = thread_ids(server.pid());
    let mut client = server.connect();
    expect_prompt(&mut client);
    let during = thread_ids(server.pid());
    assert!(
        during.difference(&first).count() == 1,
        "{first:?} then {during:?}"
    );
}

#[test]
fn concurrent_clients_beyond_the_cache_are_all_served() {
    let mut server = ServerProcess::start(&["--thread-cache", "3"]);
    for round in 0..3 {
        let mut clients: Vec<_> = (0..10).map(|_| server.connect()).collect();
        for client in &mut clients {
            expect_prompt(client);
        }
        for (i, client) in clients.iter_mut().enumerate() {
            use std::io::Write;
            client
                .write_all(format!("r{round} c{i}\n").as_bytes())
                .unwrap();
            assert_eq!(read_until_closed(client), b"");
        }
        for i in 0..10 {
            server.expect_logged(&format!("said: \"r{round} c{i}\""));
        }
    }
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
}
