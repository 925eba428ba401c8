//! The start-up capacity check against the real binary: with too few
//! descriptors for `--max-connections`, the cap is lowered with a warning,
//! and clients beyond it are turned away busy instead of failing `accept`.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;

/// Descriptors the server is given; the cap becomes this minus those open
/// at start-up and a few it keeps free.
const NOFILE: usize = 48;

#[test]
fn a_cap_beyond_the_descriptor_limit_is_lowered_and_enforced() {
    if !require_program("prlimit", "apt-get install util-linux") {
        return;
    }
    let mut server = ServerProcess::builder()
        .wrapper("prlimit", [format!("--nofile={NOFILE}:{NOFILE}")])
        .args(["--max-connections", "1000", "--reply-timeout", "0"])
        .env("RUST_LOG", "prompt_server=debug")
        .start();
    let warning = server.expect_logged("lowered to");
    assert!(
        warning.contains("--max-connections 1000 lowered to ")
            && warning.contains(&format!("file descriptors but the limit is {NOFILE}")),
        "{warning}"
    );
    let cap: usize = warning
        .split("lowered to ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|cap| cap.parse().ok())
        .unwrap_or_else(|| panic!("no cap in {warning}"));
    assert!((NOFILE - 24..NOFILE - 8).contains(&cap), "{warning}");

    // Up to the cap, every client gets the prompt and holds its slot.
    let mut held: Vec<TcpStream> = (0..cap)
        .map(|_| {
            let mut client = server.connect();
            expect_prompt(&mut client);
            client
        })
        .collect();

    // Beyond it, each gets the busy line and is closed; the server stays up.
    for i in 0..5 {
        let mut client = server.connect();
        assert_eq!(read_until_closed(&mut client), BUSY);
        // Busy lines are rate-limited: the first is logged at once.
        if i == 0 {
            server.expect_line(&format!("{} turned away", local(&client)));
        }
    }

    // Once the held clients have left, a fresh one is served.
    for (i, client) in held.iter_mut().enumerate() {
        client.write_all(format!("held {i}\n").as_bytes()).unwrap();
        assert_eq!(read_until_closed(client), b"");
    }
    session(server.addr, b"fresh\n");
    server.expect_line("said: \"fresh\"");

    let warnings = server.seen.iter().filter(|l| l.contains("lowered to"));
    assert_eq!(warnings.count(), 1, "one warning at start-up");
    // The cap kept the accept loop clear of the descriptor limit.
    assert!(
        !server.seen.iter().any(|l| l.contains("accept failed")),
        "{:#?}",
        server.seen
    );
}
