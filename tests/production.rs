//! Running behind a balancer and among operators' controls, against the real
//! binary: PROXY protocol headers (sent by the test itself; the HAProxy
//! tests are in haproxy.rs), trusted proxies, --allow/--deny, --max-per-ip,
//! and JSON log lines.

mod common;

use std::io::Write;
use std::net::{IpAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A client that sends `header` (and maybe its reply with it) and expects
/// no prompt: the server closes at once.
fn expect_closed_without_prompt(server: &ServerProcess, header: &[u8]) -> TcpStream {
    let mut client = server.connect();
    client.write_all(header).unwrap();
    assert_eq!(read_until_closed(&mut client), b"", "no prompt expected");
    client
}

#[test]
fn v1_header_names_the_client_that_is_logged() {
    let mut server = ServerProcess::start(&["--proxy-protocol"]);
    let mut client = server.connect();
    client
        .write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 1337\r\n")
        .unwrap();
    expect_prompt(&mut client);
    client.write_all(b"yes\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    let line = server.expect_line(" said: ");
    assert!(line.ends_with("192.0.2.7:5555 said: \"yes\""), "{line}");
}

#[test]
fn header_and_reply_in_one_segment_lose_nothing() {
    let mut server = ServerProcess::start(&["--proxy-protocol"]);
    session_with_header(&server, b"PROXY TCP6 2001:db8::7 ::1 4242 1337\r\neager\n");
    let line = server.expect_line(" said: ");
    assert!(
        line.ends_with("[2001:db8::7]:4242 said: \"eager\""),
        "{line}"
    );
}

fn session_with_header(server: &ServerProcess, bytes: &[u8]) {
    let mut client = server.connect();
    client.write_all(bytes).unwrap();
    expect_prompt(&mut client);
    assert_eq!(read_until_closed(&mut client), b"");
}

fn v2_header(command: u8, source: [u8; 4], port: u16) -> Vec<u8> {
    let mut bytes = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];
    bytes.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
    bytes.extend_from_slice(&source);
    bytes.extend_from_slice(&[127, 0, 0, 1]);
    bytes.extend_from_slice(&port.to_be_bytes());
    bytes.extend_from_slice(&1337u16.to_be_bytes());
    bytes
}

#[test]
fn v2_header_and_local_command() {
    let mut server = ServerProcess::start(&["--proxy-protocol"]);
    let mut proxied = v2_header(1, [198, 51, 100, 9], 6000);
    proxied.extend_from_slice(b"from v2\n");
    session_with_header(&server, &proxied);
    let line = server.expect_line(" said: ");
    assert!(
        line.ends_with("198.51.100.9:6000 said: \"from v2\""),
        "{line}"
    );

    // LOCAL (a health check): the real endpoint is logged.
    let mut client = server.connect();
    let mut local_header = v2_header(0, [198, 51, 100, 9], 6000);
    local_header.extend_from_slice(b"local\n");
    client.write_all(&local_header).unwrap();
    expect_prompt(&mut client);
    assert_eq!(read_until_closed(&mut client), b"");
    let line = server.expect_line(" said: ");
    assert!(
        line.ends_with(&format!("{} said: \"local\"", local(&client))),
        "{line}"
    );
}

#[test]
fn missing_malformed_and_over_long_headers_get_no_prompt() {
    let mut server = ServerProcess::start(&["--proxy-protocol"]);
    let mut too_long = b"PROXY UNKNOWN ".to_vec();
    too_long.resize(200, b'x');
    for bad in [
        &b"yes\n"[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        &too_long,
    ] {
        let client = expect_closed_without_prompt(&server, bad);
        let line = server.expect_line("bad PROXY protocol header");
        assert!(line.contains(&local(&client).to_string()), "{line}");
        assert!(line.contains("WARN"), "{line}");
    }
    // Closing half-way through a header is logged too.
    let mut half = server.connect();
    half.write_all(b"PROXY TCP4 1.2").unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut half), b"");
    server.expect_line("closed before a complete PROXY header");
}

#[test]
fn a_stalled_header_is_cut_off_at_the_reply_timeout() {
    let mut server = ServerProcess::start(&["--proxy-protocol", "--reply-timeout", "1"]);
    let started = Instant::now();
    let client = expect_closed_without_prompt(&server, b"PROXY TCP4 ");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    let line = server.expect_line("no complete PROXY header in time");
    assert!(line.contains(&local(&client).to_string()), "{line}");
}

#[test]
fn only_trusted_proxies_may_send_a_header() {
    let mut server = ServerProcess::start(&["--proxy-protocol", "--trusted-proxy", "127.0.0.2"]);
    // Refused at once, without a word: a reset, maybe before the connect returns.
    let header = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 1337\r\n";
    assert_eq!(refused_end(server.addr, None, header), End::Reset);
    let line = server.expect_line("refused: not a trusted proxy");
    assert!(line.contains(" 127.0.0.1:"), "{line}");

    let mut trusted = connect_from(ip("127.0.0.2"), server.addr);
    trusted
        .write_all(b"PROXY TCP4 192.0.2.8 127.0.0.1 5555 1337\r\nok\n")
        .unwrap();
    expect_prompt(&mut trusted);
    assert_eq!(read_until_closed(&mut trusted), b"");
    server.expect_line("192.0.2.8:5555 said: \"ok\"");
}

/// A denied client gets no prompt and no words, and so a reset: a clean
/// close would tell a client that sent its reply at once (`echo yes | nc`)
/// that it was recorded.
#[test]
fn deny_resets_without_a_prompt_and_wins_over_allow() {
    let mut server = ServerProcess::start(&["--allow", "127.0.0.0/8", "--deny", "127.0.0.2"]);
    let denied = Some(ip("127.0.0.2"));
    assert_eq!(
        refused_end(server.addr, denied, b""),
        End::Reset,
        "no prompt"
    );
    for _ in 0..5 {
        let end = refused_end(server.addr, denied, b"yes\n");
        assert_eq!(end, End::Reset, "a reply sent at once");
    }
    let line = server.expect_line("refused by the access rules");
    assert!(
        line.contains("127.0.0.2:") && line.contains("WARN"),
        "{line}"
    );

    session(server.addr, b"allowed\n");
    server.expect_line("said: \"allowed\"");
}

#[test]
fn allow_admits_only_its_networks_ipv6_too() {
    let mut server = ServerProcess::start(&["--bind", "::1", "--allow", "::1/128"]);
    session(server.addr, b"six\n");
    server.expect_line("said: \"six\"");

    let mut server = ServerProcess::start(&["--allow", "127.0.0.3"]);
    assert_eq!(refused_end(server.addr, None, b""), End::Reset);
    server.expect_line("refused by the access rules");
    let mut allowed = connect_from(ip("127.0.0.3"), server.addr);
    expect_prompt(&mut allowed);
}

#[test]
fn rules_apply_to_the_address_in_the_proxy_header() {
    let mut server = ServerProcess::start(&["--proxy-protocol", "--deny", "192.0.2.0/24"]);
    expect_closed_without_prompt(&server, b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 1337\r\n");
    server.expect_line("192.0.2.7:5555 refused by the access rules");
    session_with_header(
        &server,
        b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 1337\r\nfine\n",
    );
    server.expect_line("198.51.100.7:5555 said: \"fine\"");
}

#[test]
fn max_per_ip_turns_away_the_extra_connection_from_one_address() {
    let mut server = ServerProcess::start(&["--max-per-ip", "2"]);
    let mut held: Vec<TcpStream> = (0..2).map(|_| server.connect()).collect();
    for client in &mut held {
        expect_prompt(client);
    }
    let mut extra = server.connect();
    assert_eq!(
        read_until_closed(&mut extra),
        b"server busy, try again later\n"
    );
    server.expect_line(&format!(
        "{} turned away: already 2 connections from 127.0.0.1",
        local(&extra)
    ));

    // Another address is not affected.
    let mut other = connect_from(ip("127.0.0.2"), server.addr);
    expect_prompt(&mut other);

    // A slot of 127.0.0.1 frees up when one of its clients is done.
    held[0].write_all(b"done\n").unwrap();
    assert_eq!(read_until_closed(&mut held[0]), b"");
    let mut again = server.connect();
    expect_prompt(&mut again);
}

/// Parses every line of the server's log so far as JSON.
fn json_lines(server: &ServerProcess) -> Vec<Value> {
    server
        .seen
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

#[test]
fn json_logs_carry_the_fields_one_object_per_line() {
    let mut server = ServerProcess::start(&["--log-format", "json"]);
    let mut client = server.connect();
    expect_prompt(&mut client);
    client.write_all(b"ok\r\x1b[31m\xff\"}\n").unwrap();
    assert_eq!(read_until_closed(&mut client), b"");
    server.expect_line("\"event\":\"reply\"");
    let mut timed = ServerProcess::start(&["--log-format", "json", "--max-reply-bytes", "4"]);
    session(timed.addr, b"longer than four\n");
    timed.expect_line("\"event\":\"truncated\"");

    let lines = json_lines(&server);
    let listening = lines
        .iter()
        .find(|l| l["event"] == "listening")
        .expect("listening event");
    assert_eq!(listening["addr"], server.addr.to_string());
    let reply = lines
        .iter()
        .find(|l| l["event"] == "reply")
        .expect("reply event");
    assert_eq!(reply["level"], "info");
    assert_eq!(reply["peer"], local(&client).to_string());
    assert_eq!(reply["reply"], "ok\r\u{1b}[31m\u{fffd}\"}");
    assert_eq!(reply["reply_lossy"], true);
    assert_eq!(reply["bytes"], 11);
    assert!(reply["duration_ms"].is_u64(), "{reply}");
    let ts = reply["ts"].as_str().unwrap();
    // RFC 3339 in UTC, e.g. 2026-11-25T12:41:26.123Z.
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");

    let truncated = json_lines(&timed)
        .into_iter()
        .find(|l| l["event"] == "truncated")
        .unwrap();
    assert_eq!(truncated["level"], "warn");
    assert_eq!(truncated["reply"], "long");
    assert_eq!(truncated["reply_lossy"], false);
}

#[test]
fn json_logs_name_the_proxy_and_the_real_client() {
    let mut server = ServerProcess::start(&["--log-format", "json", "--proxy-protocol"]);
    let mut client = server.connect();
    client
        .write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 1337\r\nyes\n")
        .unwrap();
    expect_prompt(&mut client);
    read_until_closed(&mut client);
    let line = server.expect_line("\"event\":\"reply\"");
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["peer"], "192.0.2.7:5555");
    assert_eq!(reply["proxy"], local(&client).to_string());
}

#[test]
fn no_client_bytes_split_or_forge_a_line_in_either_format() {
    let nasty: [&[u8]; 6] = [
        b"a\rINFO forged\n",
        b"\x0b\x0c\x1b[2J\x1b]0;title\x07\n",
        "next\u{85}line\u{2028}sep\u{2029}\n".as_bytes(),
        b"\"}\n{\"event\":\"forged\"}\n",
        b"\\\"\x00\xc3\x28\n",
        b"\r\r\r\r\n",
    ];
    for format in ["text", "json"] {
        let mut server = ServerProcess::builder()
            .env("RUST_LOG", "info")
            .args(["--log-format", format])
            .start();
        for reply in nasty {
            session(server.addr, reply);
        }
        for _ in nasty {
            server.expect_line(if format == "json" {
                "\"event\":\"reply\""
            } else {
                " said: "
            });
        }
        server.signal("TERM");
        assert_eq!(server.wait_exit().code(), Some(0));
        let expected_lines = [
            "listening on",
            "SIGTERM received",
            "shutting down",
            "shutdown complete",
        ];
        // Every line is a whole record: exactly the expected records, no more.
        assert_eq!(
            server.seen.len(),
            nasty.len() + expected_lines.len(),
            "{format}: {:#?}",
            server.seen
        );
        for line in &server.seen {
            assert!(!line.chars().any(|c| c.is_control()), "{format}: {line:?}");
            if format == "json" {
                let record: Value = serde_json::from_str(line).unwrap();
                assert_ne!(record["event"], "forged");
            } else {
                assert!(line.starts_with("[20"), "{line}");
            }
        }
    }
}
