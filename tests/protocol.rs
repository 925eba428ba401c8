//! The protocol end to end, against the real binary over loopback: prompt,
//! one reply line however it arrives, one escaped log line with the peer.

mod common;

use std::io::Write;
use std::net::Shutdown;

use common::*;

#[test]
fn reply_is_logged_with_peer_address() {
    let mut server = ServerProcess::start(&[]);
    let mut client = server.connect();
    expect_prompt(&mut client);
    client.write_all(b"yes\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    let line = server.expect_line(" said: ");
    assert!(
        line.contains(&format!("{} said: \"yes\"", local(&client))),
        "{line}"
    );
    assert!(line.contains("INFO"), "{line}");
}

#[test]
fn silent_client_does_not_delay_another() {
    let mut server = ServerProcess::start(&[]);
    let mut silent = server.connect();
    expect_prompt(&mut silent);

    session(server.addr, b"b goes first\n");
    server.expect_line("said: \"b goes first\"");

    // The silent client was not closed meanwhile: nothing to read, no EOF.
    assert!(
        still_waiting(&silent),
        "silent client should still be waiting"
    );

    silent.write_all(b"a at last\n").unwrap();
    assert_eq!(read_until_closed(&mut silent), b"");
    let line = server.expect_line("said: \"a at last\"");
    assert!(line.contains(&local(&silent).to_string()), "{line}");
}

#[test]
fn reply_split_across_segments_is_assembled() {
    let mut server = ServerProcess::builder().json_log().start();
    let mut client = server.connect();
    client.set_nodelay(true).unwrap();
    expect_prompt(&mut client);
    let peer = local(&client).to_string();
    client.write_all(b"y").unwrap();
    // Wait until the server has read the first piece on its own.
    server.expect_event("read", |read| read["peer"] == peer && read["bytes"] == 1);
    client.write_all(b"es\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    let reply = server.expect_event("reply", |reply| reply["peer"] == peer);
    assert_eq!(reply["reply"], "yes", "{reply}");
}

#[test]
fn telnet_crlf_is_stripped() {
    let mut server = ServerProcess::start(&[]);
    session(server.addr, b"yes\r\n");
    let line = server.expect_line(" said: ");
    assert!(line.ends_with(" said: \"yes\""), "{line}");
}

#[test]
fn empty_line_is_an_empty_reply() {
    let mut server = ServerProcess::start(&[]);
    session(server.addr, b"\n");
    let line = server.expect_line(" said: ");
    assert!(line.ends_with(" said: \"\""), "{line}");
}

#[test]
fn eof_before_newline_logs_what_came() {
    let mut server = ServerProcess::start(&[]);
    let mut client = server.connect();
    expect_prompt(&mut client);
    client.write_all(b"maybe").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    let line = server.expect_line(" said: ");
    assert!(
        line.ends_with(&format!(
            "{} said: \"maybe\" (closed before newline)",
            local(&client)
        )),
        "{line}"
    );
}

#[test]
fn eof_without_any_reply_is_logged_as_such() {
    let mut server = ServerProcess::start(&[]);
    let mut client = server.connect();
    expect_prompt(&mut client);
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    server.expect_line(&format!("{} closed without replying", local(&client)));
}

#[test]
fn over_long_reply_is_truncated_and_closed() {
    let mut server = ServerProcess::start(&["--max-reply-bytes", "16"]);
    let mut client = server.connect();
    expect_prompt(&mut client);
    // No newline, and far more than the cap: the server must not wait for more.
    client.write_all(&[b'a'; 100]).unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    let line = server.expect_line(" said: ");
    assert!(
        line.ends_with(&format!(
            "{} said: \"{}\" (truncated at 16 bytes)",
            local(&client),
            "a".repeat(16)
        )),
        "{line}"
    );
}

#[test]
fn reply_of_exactly_the_cap_is_not_truncated() {
    let mut server = ServerProcess::start(&["--max-reply-bytes", "4"]);
    session(server.addr, b"abcd\r\n");
    let line = server.expect_line(" said: ");
    assert!(line.ends_with(" said: \"abcd\""), "{line}");
}

#[test]
fn control_characters_and_invalid_utf8_are_escaped() {
    let mut server = ServerProcess::start(&[]);
    // CR to overwrite the line on a terminal, an ANSI colour, a NUL, a fake
    // log record, and bytes that are not UTF-8.
    session(
        server.addr,
        b"ok\r[2026-01-01T00:00:00Z ERROR forged]\x1b[31m\0\xff\xfe\"\n",
    );
    let line = server.expect_line(" said: ");
    assert!(
        line.ends_with(r#" said: "ok\r[2026-01-01T00:00:00Z ERROR forged]\u{1b}[31m\0\xFF\xFE\"""#),
        "{line}"
    );
    assert!(
        !line.chars().any(char::is_control),
        "raw control byte in {line:?}"
    );
}

#[test]
fn ipv6_loopback_is_served_and_logged_in_brackets() {
    let mut server = ServerProcess::start(&["--bind", "::1"]);
    assert!(server.addr.is_ipv6(), "{}", server.addr);
    let mut client = server.connect();
    expect_prompt(&mut client);
    client.write_all(b"six\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    let line = server.expect_line(" said: ");
    let peer = local(&client);
    assert!(peer.to_string().starts_with("[::1]:"), "{peer}");
    assert!(line.ends_with(&format!("{peer} said: \"six\"")), "{line}");
}

#[test]
fn custom_prompt_gets_a_newline() {
    let server = ServerProcess::start(&["--prompt", "Shall we?"]);
    let mut client = server.connect();
    assert_eq!(read_line(&mut client), b"Shall we?\n");
}

#[test]
fn two_hundred_concurrent_clients_are_all_served() {
    const CLIENTS: usize = 200;
    let mut server = ServerProcess::start(&[]);
    // All connected and prompted at once, before anyone replies.
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| server.connect()).collect();
    for client in &mut clients {
        expect_prompt(client);
    }
    let mut expected = std::collections::HashSet::new();
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .write_all(format!("client {i}\n").as_bytes())
            .unwrap();
        expected.insert(format!("{} said: \"client {i}\"", local(client)));
    }
    for client in &mut clients {
        assert_eq!(read_until_closed(client), b"");
    }
    while !expected.is_empty() {
        let line = server.expect_line(" said: ");
        let logged = line
            .split("] ")
            .nth(1)
            .expect("env_logger prefix")
            .to_string();
        assert!(expected.remove(&logged), "unexpected or repeated: {line}");
    }
}
