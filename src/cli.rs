//! The binary's command line: [`Cli`], and its errors on one line.
//!
//! Only the binary knows clap. The flags' defaults are the library's
//! [`Config`] defaults, and every rule about values is the library's
//! ([`Config::validate`]), reported here as a bad value of its flag.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use ipnet::IpNet;
use prompt_server::logging::{DEFAULT_RECORD_TIMEOUT, LogFormat, LogSettings};
use prompt_server::{AccessRules, Config, ConfigError, NetList, Rate, RateLimit, TlsFiles};

const ABOUT: &str = "A TCP server that sends each client a prompt, logs its one-line reply \
                     with its address, and closes the connection.";
const AFTER_HELP: &str = "\
Example:
  prompt-server --port 1337     then, from another terminal: nc 127.0.0.1 1337

Replies are always logged (to stderr, or --log-file); RUST_LOG filters the
other lines, e.g. RUST_LOG=debug (a line per connect and disconnect) or
RUST_LOG=warn (problems only; the `listening on` line is always shown).";

#[derive(Debug, Parser)]
#[command(version, about = ABOUT, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    /// TCP port to listen on (0 lets the OS pick one; the log says which).
    #[arg(long, value_name = "PORT", default_value_t = DEFAULTS.listen_addr.port(),
          value_parser = parse_whole::<u16>)]
    port: u16,
    /// Address to listen on, e.g. 0.0.0.0, ::, 127.0.0.1 or ::1.
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULTS.listen_addr.ip(),
          value_parser = parse_ip)]
    bind: IpAddr,
    /// Prompt sent to every client; a missing trailing newline is added.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true,
          default_value_t = String::from_utf8_lossy(DEFAULTS.prompt.trim_ascii_end()).into())]
    prompt: String,
    /// Longest reply kept, in bytes; a longer one is logged truncated and its client reset.
    #[arg(long, value_name = "N", default_value_t = DEFAULTS.max_reply_bytes,
          value_parser = parse_whole::<NonZeroUsize>)]
    max_reply_bytes: NonZeroUsize,
    /// Seconds a client has for its whole reply, however slowly it sends; 0 waits forever.
    #[arg(long, value_name = "SECS", default_value = seconds(DEFAULTS.reply_timeout),
          value_parser = parse_seconds)]
    reply_timeout: Duration,
    /// Seconds writing the whole prompt may take before the client is
    /// dropped (a prompt the socket's send buffer holds is written at once).
    #[arg(long, value_name = "SECS", default_value = seconds(Some(DEFAULTS.write_timeout)),
          value_parser = parse_seconds)]
    write_timeout: Duration,
    /// Clients served at once; one more is sent "server busy, try again later" and closed.
    #[arg(long, value_name = "N", default_value_t = DEFAULTS.max_connections,
          value_parser = parse_whole::<NonZeroUsize>)]
    max_connections: NonZeroUsize,
    /// Seconds a stopping server (SIGINT, SIGTERM) lets connected clients finish.
    #[arg(long, value_name = "SECS", default_value = seconds(Some(DEFAULTS.shutdown_timeout)),
          value_parser = parse_seconds)]
    shutdown_timeout: Duration,
    /// Finished threads that wait in accept to serve the next connections
    /// instead of new threads (0: none; at most --max-connections).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = parse_whole::<usize>)]
    thread_cache: usize,
    /// Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy
    /// and send-proxy-v2 send) before each client's data, and log the client
    /// address it carries. Connections without a valid one are closed.
    #[arg(long)]
    proxy_protocol: bool,
    /// With --proxy-protocol: only connections from this address or network
    /// may carry a header; others are refused. Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_net, allow_hyphen_values = true,
          requires = "proxy_protocol")]
    trusted_proxy: Vec<IpNet>,
    /// Serve only clients from this address or network. Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_net, allow_hyphen_values = true)]
    allow: Vec<IpNet>,
    /// Refuse clients from this address or network; wins over --allow. Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_net, allow_hyphen_values = true)]
    deny: Vec<IpNet>,
    /// Connections one client address may hold at once; one more gets the busy line.
    #[arg(long, value_name = "N", value_parser = parse_whole::<NonZeroUsize>)]
    max_per_ip: Option<NonZeroUsize>,
    /// Connections the kernel queues for the server before it accepts them
    /// [default: net.core.somaxconn, 4096 on current kernels]
    #[arg(long, value_name = "N", value_parser = parse_whole::<NonZeroU32>)]
    backlog: Option<NonZeroU32>,
    /// Connections one client network may open per period, e.g. 5/s,
    /// 100/min or 1000/h (also the burst); one more gets the busy line.
    #[arg(long, value_name = "RATE")]
    max_rate_per_ip: Option<Rate>,
    /// With --max-rate-per-ip: leading bits of an IPv4 client address that
    /// make its network (32: each address on its own).
    #[arg(long, value_name = "BITS", default_value_t = RateLimit::DEFAULT_PREFIX_V4,
          value_parser = parse_bits, requires = "max_rate_per_ip")]
    rate_prefix_v4: u8,
    /// With --max-rate-per-ip: leading bits of an IPv6 client address that make its network
    /// (64: a host's usual allocation, so changing addresses within it gains nothing).
    #[arg(long, value_name = "BITS", default_value_t = RateLimit::DEFAULT_PREFIX_V6,
          value_parser = parse_bits, requires = "max_rate_per_ip")]
    rate_prefix_v6: u8,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics, e.g.
    /// 127.0.0.1:9337 (keep it off public interfaces).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_socket_addr)]
    metrics_addr: Option<SocketAddr>,
    /// Let several processes listen on the same port (SO_REUSEPORT), e.g. an
    /// old and a new one during a restart; see the README for the pitfall.
    #[arg(long)]
    reuseport: bool,
    /// Serve every client over TLS with this certificate chain (PEM; SIGHUP re-reads the files).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With --tls-cert: serve only clients with a certificate this CA (PEM) signed.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Log lines as text, or as one JSON object per line.
    #[arg(long, value_name = "FORMAT", default_value = "text",
          value_parser = PossibleValuesParser::new(["text", "json"]).map(|format| match &*format {
              "json" => LogFormat::Json,
              _ => LogFormat::Text,
          }))]
    log_format: LogFormat,
    /// Write the log to this file (appended, created if missing) instead of stderr; SIGHUP
    /// reopens it (logrotate). stderr keeps start-up errors and reports of a failing log file.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Do not fdatasync the log after each batch of replies: faster, but a
    /// power loss may lose replies whose clients saw a clean close.
    #[arg(long)]
    no_log_sync: bool,
    /// Seconds a reply may wait for a stalled or failing log before it is
    /// given up (its client is then reset).
    #[arg(long, value_name = "SECS", default_value = seconds(Some(DEFAULT_RECORD_TIMEOUT)),
          value_parser = parse_seconds)]
    record_timeout: Duration,
}

static DEFAULTS: LazyLock<Config> = LazyLock::new(Config::default);

/// A `SECS` flag's default (0 for `None`, waiting forever); leaked, once per
/// flag, because clap wants a `&'static str`.
fn seconds(duration: Option<Duration>) -> &'static str {
    let text = duration.map_or(0.0, |duration| duration.as_secs_f64());
    Box::leak(text.to_string().into_boxed_str())
}

impl Cli {
    /// The [`Config`] and the log settings that `args` (the program's name
    /// first) ask for; a [`Config::validate`] rule that does not hold is an
    /// error about its flag, with the value as it was given.
    pub fn settings_from(
        args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
    ) -> Result<(Config, LogSettings), clap::Error> {
        // A negative number is a bad value of its flag, not an unknown flag.
        let command = Cli::command().mut_args(|arg| {
            let takes_values = arg.get_action().takes_values();
            arg.allow_negative_numbers(takes_values)
        });
        let matches = command.try_get_matches_from(args)?;
        let cli = Cli::from_arg_matches(&matches)?;
        let config = Config {
            listen_addr: SocketAddr::new(cli.bind, cli.port),
            prompt: prompt_bytes(&cli.prompt),
            max_reply_bytes: cli.max_reply_bytes,
            reply_timeout: Some(cli.reply_timeout).filter(|timeout| !timeout.is_zero()),
            write_timeout: cli.write_timeout,
            max_connections: cli.max_connections,
            shutdown_timeout: cli.shutdown_timeout,
            thread_cache: cli.thread_cache,
            proxy_protocol: cli.proxy_protocol.then_some(NetList(cli.trusted_proxy)),
            access: AccessRules {
                allow: NetList(cli.allow),
                deny: NetList(cli.deny),
            },
            max_per_ip: cli.max_per_ip,
            backlog: cli.backlog,
            reuse_port: cli.reuseport,
            notify_service_manager: true,
            rate_limit: cli.max_rate_per_ip.map(|rate| RateLimit {
                rate,
                prefix_v4: cli.rate_prefix_v4,
                prefix_v6: cli.rate_prefix_v6,
            }),
            metrics_addr: cli.metrics_addr,
            tls: cli.tls_cert.zip(cli.tls_key).map(|(cert, key)| TlsFiles {
                cert,
                key,
                client_ca: cli.tls_client_ca,
            }),
            ..Config::default()
        };
        config.validate().map_err(|e| flag_error(&e, &matches))?;
        let log = LogSettings {
            format: cli.log_format,
            file: cli.log_file,
            sync: !cli.no_log_sync,
            record_timeout: cli.record_timeout,
        };
        log.validate().map_err(|rule| {
            let value = log.record_timeout.as_secs_f64().to_string();
            let (field, rule) = ("record_timeout", rule.into());
            flag_error(&ConfigError { field, value, rule }, &matches)
        })?;
        Ok((config, log))
    }
}

/// A broken [`Config`] rule as clap's error about the flag that set the
/// field: "invalid value '2000' for '--thread-cache <N>': must be at most
/// the connection cap (1024)".
fn flag_error(error: &ConfigError, matches: &ArgMatches) -> clap::Error {
    let id = error.field.replace("rate_limit.", "rate_");
    let mut command = Cli::command();
    command.build(); // an argument's Display needs a built command
    let flag = command
        .get_arguments()
        .find(|arg| arg.get_id() == id.as_str())
        .map_or_else(|| error.field.to_string(), ToString::to_string);
    let given = matches.get_raw(&id).into_iter().flatten().next_back();
    let value = given.map_or_else(|| error.value.clone(), |raw| raw.to_string_lossy().into());
    let message = format!("invalid value '{value}' for '{flag}': {}", error.rule);
    command.error(clap::error::ErrorKind::ValueValidation, message)
}

/// clap's error as one plain line for stderr: its whole message (the flag,
/// the allowed values, the tip), not its usage block and "For more
/// information" line, then "(see --help)".
pub fn error_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line: String = rendered
        .lines()
        .map(str::trim)
        .take_while(|part| !part.starts_with("Usage:") && !part.starts_with("For more information"))
        .filter(|part| !part.is_empty())
        .map(|part| format!("{} {part}", if part.starts_with("tip:") { ";" } else { "" }))
        .collect();
    format!("{} (see --help)", line.trim_start())
}

/// Seconds as a number (`0.5`, `10`, `1e3`), finite and not negative; how
/// long it may be is the library's rule (past `Duration`'s range it is
/// `Duration::MAX`, for that rule to refuse).
fn parse_seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
        }
        _ => Err("must be a number of seconds, 0 or more".to_string()),
    }
}

/// A prefix length; how long it may be is the library's rule.
fn parse_bits(text: &str) -> Result<u8, String> {
    text.parse()
        .map_err(|_| "must be a whole number of bits".to_string())
}

/// A whole number that fits the integer type `T`: 0 or more, or 1 or more
/// for a `NonZero` type. The limits come from `T`'s name.
fn parse_whole<T: FromStr>(text: &str) -> Result<T, String> {
    let name = std::any::type_name::<T>().trim_end_matches('>');
    let min = u8::from(name.contains("NonZero"));
    if min == 1 && text.parse::<u128>() == Ok(0) {
        return Err("must be at least 1".to_string());
    }
    let max = match name {
        name if name.ends_with("u8") => u8::MAX.to_string(),
        name if name.ends_with("u16") => u16::MAX.to_string(),
        name if name.ends_with("u32") => u32::MAX.to_string(),
        _ => usize::MAX.to_string(),
    };
    text.parse()
        .map_err(|_| format!("must be a whole number from {min} to {max}"))
}

/// An IP address; a host name is not looked up, so that the address served
/// is the one the operator wrote.
fn parse_ip(text: &str) -> Result<IpAddr, String> {
    let rule = "must be an IP address such as 0.0.0.0, ::, 127.0.0.1 or ::1 \
                (host names such as localhost are not looked up)";
    text.parse().map_err(|_| rule.to_string())
}

/// `ADDR:PORT`, with an IP address: host names are not looked up.
fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    let rule = "must be an IP address and a port such as 127.0.0.1:9337 or [::1]:9337 \
                (host names such as localhost are not looked up)";
    text.parse().map_err(|_| rule.to_string())
}

/// `ADDR/PREFIX`, or a bare address meaning that one host.
fn parse_net(text: &str) -> Result<IpNet, String> {
    let rule = "must be an address or a network such as 10.0.0.0/8 or ::1/128";
    text.parse::<IpNet>()
        .map(|net| net.trunc())
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| rule.to_string())
}

/// The bytes sent, ending in the newline a line-based client (netcat,
/// telnet) needs to show the prompt.
fn prompt_bytes(text: &str) -> Vec<u8> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    format!("{text}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config these arguments ask for, or the one-line error.
    fn config(args: &[&str]) -> Result<Config, String> {
        let args = std::iter::once("prompt-server").chain(args.iter().copied());
        Cli::settings_from(args)
            .map(|(config, _)| config)
            .map_err(|e| error_line(&e))
    }

    fn error_for(args: &[&str]) -> String {
        config(args).expect_err("an error")
    }

    #[test]
    fn prompt_gets_exactly_one_trailing_newline() {
        assert_eq!(prompt_bytes("hi"), b"hi\n");
        assert_eq!(prompt_bytes("hi\n"), b"hi\n");
        assert_eq!(prompt_bytes(""), b"\n");
    }

    #[test]
    fn networks_parse_with_or_without_prefix() {
        assert_eq!(parse_net("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_net("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0/8", ""] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_match_the_classic_example() {
        let config = config(&[]).unwrap();
        assert_eq!(config.listen_addr, "0.0.0.0:1337".parse().unwrap());
        assert_eq!(config.prompt, b"Do you want to play a game?\n");
        assert_eq!(config.max_reply_bytes.get(), 1024);
        assert_eq!(config.reply_timeout, Some(Duration::from_secs(60)));
        assert_eq!(config.write_timeout, Duration::from_secs(10));
        assert_eq!(config.max_connections.get(), 1024);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.backlog, None);
    }

    #[test]
    fn zero_reply_timeout_waits_forever() {
        assert_eq!(
            config(&["--reply-timeout", "0"]).unwrap().reply_timeout,
            None
        );
        let half = config(&["--reply-timeout", "0.5"]).unwrap();
        assert_eq!(half.reply_timeout, Some(Duration::from_millis(500)));
    }

    #[test]
    fn nonsense_values_name_their_option() {
        for (flag, value) in [
            ("--reply-timeout", "-1"),
            ("--reply-timeout", "NaN"),
            ("--shutdown-timeout", "1e30"),
            ("--shutdown-timeout", "-2"),
            ("--write-timeout", "0"),
            ("--record-timeout", "0"),
            ("--record-timeout", "1e30"),
            ("--port", "-1"),
            ("--port", "65536"),
            ("--max-reply-bytes", "-1"),
            ("--max-reply-bytes", "0"),
            ("--backlog", "-1"),
            ("--backlog", "0"),
            ("--backlog", "4294967296"),
            ("--max-per-ip", "-1"),
            ("--max-connections", "-5"),
            ("--thread-cache", "-1"),
            ("--bind", "localhost"),
            ("--metrics-addr", "localhost:9000"),
            ("--allow", "-1"),
            ("--deny", "-1"),
            ("--rate-prefix-v4", "-1"),
        ] {
            let error = error_for(&[flag, value]);
            // One line that names the option, even for a negative number.
            assert!(
                error.starts_with(&format!("error: invalid value '{value}' for '{flag}")),
                "{flag} {value}: {error}"
            );
        }
        assert!(error_for(&["--bind", "localhost"]).contains("not looked up"));
        assert!(error_for(&["--metrics-addr", "localhost:1"]).contains("not looked up"));
        assert!(!error_for(&["--rate-prefix-v4", "-1"]).contains("255"));
        for flag in ["--shutdown-timeout", "--record-timeout"] {
            assert!(error_for(&[flag, "1e30"]).contains("a year"), "{flag}");
        }
        let dashed = config(&["--prompt", "-x"]).unwrap();
        assert_eq!(dashed.prompt, b"-x\n");
        assert!(error_for(&["--max-reply-bytes", "0"]).contains("must be at least 1"));
    }

    #[test]
    fn the_librarys_rules_speak_as_errors_about_their_flags() {
        assert_eq!(
            error_for(&["--thread-cache", "2000"]),
            "error: invalid value '2000' for '--thread-cache <N>': must be at most the \
             connection cap (1024) (see --help)"
        );
        assert!(config(&["--max-connections", "8", "--thread-cache", "8"]).is_ok());
        assert_eq!(
            error_for(&["--max-rate-per-ip", "5/s", "--rate-prefix-v4", "33"]),
            "error: invalid value '33' for '--rate-prefix-v4 <BITS>': must be a prefix \
             length from 0 to 32 (see --help)"
        );
        assert!(
            error_for(&["--max-rate-per-ip", "5/s", "--rate-prefix-v6", "129"])
                .contains("from 0 to 128")
        );
        assert!(error_for(&["--backlog", "2147483648"]).contains("must be at most 2147483647"));
        assert!(error_for(&["--reply-timeout", "40000000"]).contains("a year"));
    }

    #[test]
    fn access_options_repeat_and_trusted_proxy_needs_proxy_protocol() {
        let config = config(&[
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "::1",
            "--deny",
            "10.9.0.0/16",
            "--max-per-ip",
            "3",
        ])
        .unwrap();
        assert_eq!(config.access.allow.0.len(), 2);
        assert!(!config.access.permits("10.9.1.1".parse().unwrap()));
        assert_eq!(config.max_per_ip.map(NonZeroUsize::get), Some(3));
        assert_eq!(config.proxy_protocol, None);
        assert!(error_for(&["--trusted-proxy", "127.0.0.1"]).contains("--proxy-protocol"));
        let proxied = super::tests::config(&["--proxy-protocol", "--trusted-proxy", "127.0.0.1"]);
        assert_eq!(
            proxied.unwrap().proxy_protocol.map(|list| list.0.len()),
            Some(1)
        );
        assert!(error_for(&["--log-format", "xml"]).contains("[possible values: text, json]"));
    }

    #[test]
    fn errors_keep_the_flag_the_values_and_the_tip_on_one_line() {
        assert_eq!(
            error_for(&["--trusted-proxy", "1.2.3.4"]),
            "error: the following required arguments were not provided: --proxy-protocol \
             (see --help)"
        );
        assert_eq!(
            error_for(&["--log-format", "yaml"]),
            "error: invalid value 'yaml' for '--log-format <FORMAT>' \
             [possible values: text, json] (see --help)"
        );
        assert_eq!(
            error_for(&["--prot", "1337"]),
            "error: unexpected argument '--prot' found; \
             tip: a similar argument exists: '--port' (see --help)"
        );
        assert_eq!(
            error_for(&["--max-reply-bytes", "0"]),
            "error: invalid value '0' for '--max-reply-bytes <N>': must be at least 1 \
             (see --help)"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rate_prefixes_need_a_rate_and_default_to_32_and_64() {
        let limit = config(&["--max-rate-per-ip", "5/s"])
            .unwrap()
            .rate_limit
            .unwrap();
        assert_eq!((limit.prefix_v4, limit.prefix_v6), (32, 64));
        assert_eq!(limit.rate, "5/s".parse().unwrap());
        for flag in ["--rate-prefix-v4", "--rate-prefix-v6"] {
            assert!(
                error_for(&[flag, "24"]).contains("--max-rate-per-ip"),
                "{flag}"
            );
        }
    }

    #[test]
    fn tls_needs_a_certificate_and_its_key() {
        let config = config(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        let files = config.tls.map(|tls| (tls.cert, tls.key, tls.client_ca));
        assert_eq!(files, Some(("c.pem".into(), "k.pem".into(), None)));
        assert!(error_for(&["--tls-cert", "c.pem"]).contains("--tls-key"));
        assert!(error_for(&["--tls-client-ca", "ca.pem"]).contains("--tls-cert"));
    }

    #[test]
    fn backlog_defaults_to_the_kernel_maximum_and_can_be_set() {
        let config = config(&["--backlog", "64"]).unwrap();
        assert_eq!(config.backlog.map(NonZeroU32::get), Some(64));
    }
}
