//! The command line as a person meets it: help, version, default log level,
//! and one readable line with a non-zero exit for every user error.

mod common;

use std::net::TcpListener;
use std::process::Output;

use common::*;

/// Runs the binary to completion (it must exit by itself) and returns its output.
fn run(args: &[&str]) -> Output {
    ServerProcess::builder().args(args).output()
}

/// Asserts the run failed with exit code 2 or 1 and exactly one stderr line
/// that starts with `error: ` and contains `needle`.
fn assert_one_line_error(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "escape codes in: {stderr:?}");
}

#[test]
fn help_lists_every_option() {
    let output = run(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "--port",
        "--bind",
        "--prompt",
        "--max-reply-bytes",
        "--version",
    ] {
        assert!(help.contains(option), "{option} missing from help:\n{help}");
    }
}

#[test]
fn help_says_what_the_program_does_with_an_example_and_rust_log() {
    let output = run(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.starts_with("A TCP server that sends each client a prompt, logs its one-line reply"),
        "{help}"
    );
    assert!(help.contains("prompt-server --port 1337"), "{help}");
    assert!(help.contains("RUST_LOG"), "{help}");
}

#[test]
fn version_is_printed() {
    let output = run(&["--version"]);
    assert!(output.status.success());
    let version = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        version.trim(),
        format!("prompt-server {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn port_in_use_is_one_readable_line() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = run(&["--bind", "127.0.0.1", "--port", &port]);
    assert_one_line_error(
        &output,
        1,
        &format!("cannot listen on 127.0.0.1:{port}: address already in use"),
    );
}

#[test]
fn bad_arguments_are_one_readable_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["--max-reply-bytes", "0"], "must be at least 1"),
        (&["--max-reply-bytes", "lots"], "--max-reply-bytes"),
        (&["--port", "99999"], "--port"),
        (&["--bind", "not-an-address"], "--bind"),
        (&["--no-such-flag"], "--no-such-flag"),
        (
            &["--trusted-proxy", "1.2.3.4"],
            "error: the following required arguments were not provided: --proxy-protocol \
             (see --help)",
        ),
        (
            &["--log-format", "yaml"],
            "error: invalid value 'yaml' for '--log-format <FORMAT>' \
             [possible values: text, json] (see --help)",
        ),
        (
            &["--prot", "1337"],
            "error: unexpected argument '--prot' found; \
             tip: a similar argument exists: '--port' (see --help)",
        ),
    ];
    for (args, needle) in cases {
        // Colours forced, as on a terminal: the line must still be plain.
        let output = ServerProcess::builder()
            .env("CLICOLOR_FORCE", "1")
            .args(*args)
            .output();
        assert_one_line_error(&output, 2, needle);
    }
}

#[test]
fn address_not_on_this_host_is_one_readable_line() {
    // TEST-NET-1 (RFC 5737) is never assigned to a local interface.
    let output = run(&["--bind", "192.0.2.1", "--port", "0"]);
    assert_one_line_error(&output, 1, "cannot listen on 192.0.2.1:0");
}

#[test]
fn logs_at_info_when_rust_log_is_unset() {
    let mut server = ServerProcess::builder().env_remove("RUST_LOG").start();
    session(server.addr, b"quiet\n");
    server.expect_line("said: \"quiet\"");
    assert!(
        !server
            .seen
            .iter()
            .any(|l| l.contains("DEBUG") || l.contains("TRACE")),
        "debug lines at the default level: {:?}",
        server.seen
    );
}

#[test]
fn listening_line_and_replies_show_at_warn_level() {
    // start waits for the `listening on` line and fails the test without it.
    let mut server = ServerProcess::builder().env("RUST_LOG", "warn").start();
    session(server.addr, b"hushed\n");
    server.signal("TERM");
    assert!(server.wait_exit().success());
    assert!(
        server.seen.iter().any(|l| l.contains("said: \"hushed\"")),
        "a reply is data, not a diagnostic: {:?}",
        server.seen
    );
    assert!(
        !server.seen.iter().any(|l| l.contains("SIGTERM received")),
        "info diagnostics at warn: {:?}",
        server.seen
    );
}
