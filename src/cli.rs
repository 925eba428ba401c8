//! The command line of the `prompt-server` binary: [`Cli`], its checks, and
//! the one-line form of its errors.
//!
//! A module of the binary (declared in `main.rs`), not of the library: only
//! the binary knows clap. It fills in the library's [`Config`], whose
//! defaults are the flags' defaults.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};
use ipnet::IpNet;
use std::path::PathBuf;

use prompt_server::logging::{DEFAULT_RECORD_TIMEOUT, LogFormat, LogSettings};
use prompt_server::{AccessRules, Config, NetList, Rate};

/// What `--help` says after the options.
const AFTER_HELP: &str = "\
Example:
  prompt-server --port 1337     then, from another terminal: nc 127.0.0.1 1337

Logging goes to stderr at level info; RUST_LOG changes it, e.g. RUST_LOG=debug
(a line per connect and disconnect) or RUST_LOG=warn (problems only; the
`listening on` line is always shown).";

/// The command line of `prompt-server`.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "A TCP server that sends each client a prompt, logs its one-line reply \
             with its address, and closes the connection.",
    long_about = None,
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// TCP port to listen on (0 lets the OS pick one; the log says which).
    #[arg(long, value_name = "PORT", default_value_t = defaults().listen_addr.port())]
    pub port: u16,

    /// Address to listen on, e.g. 0.0.0.0, ::, 127.0.0.1 or ::1.
    #[arg(long, value_name = "ADDR", default_value_t = defaults().listen_addr.ip())]
    pub bind: IpAddr,

    /// Prompt sent to every client; a missing trailing newline is added.
    #[arg(long, value_name = "TEXT", default_value_t = default_prompt())]
    pub prompt: String,

    /// Longest reply kept, in bytes; a longer one is logged truncated and the
    /// connection closed.
    #[arg(long, value_name = "N", default_value_t = defaults().max_reply_bytes,
          value_parser = parse_at_least_one)]
    pub max_reply_bytes: usize,

    /// Seconds a client has for its whole reply, however slowly it sends;
    /// 0 waits forever.
    #[arg(long, value_name = "SECS", default_value_t = defaults().reply_timeout.map_or(0.0, |t| t.as_secs_f64()),
          value_parser = parse_seconds, allow_negative_numbers = true)]
    pub reply_timeout: f64,

    /// Seconds sending the prompt may take before the client is dropped.
    #[arg(long, value_name = "SECS", default_value_t = defaults().write_timeout.as_secs_f64(),
          value_parser = parse_positive_seconds, allow_negative_numbers = true)]
    pub write_timeout: f64,

    /// Clients served at once; one more is sent "server busy, try again
    /// later" and closed.
    #[arg(long, value_name = "N", default_value_t = defaults().max_connections,
          value_parser = parse_at_least_one)]
    pub max_connections: usize,

    /// Seconds a stopping server (SIGINT, SIGTERM) lets connected clients
    /// finish before it exits.
    #[arg(long, value_name = "SECS", default_value_t = defaults().shutdown_timeout.as_secs_f64(),
          value_parser = parse_seconds, allow_negative_numbers = true)]
    pub shutdown_timeout: f64,

    /// Finished connection threads kept parked (up to 10 s) to serve the next
    /// connection instead of starting a new thread; 0 disables it; at most
    /// --max-connections.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub thread_cache: usize,

    /// Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy
    /// and send-proxy-v2 send) before each client's data, and log the client
    /// address it carries. Connections without a valid one are closed.
    #[arg(long)]
    pub proxy_protocol: bool,

    /// With --proxy-protocol: only connections from this address or network
    /// may carry a header; others are refused. Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_net, requires = "proxy_protocol")]
    pub trusted_proxy: Vec<IpNet>,

    /// Serve only clients from this address or network. Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_net)]
    pub allow: Vec<IpNet>,

    /// Refuse clients from this address or network; wins over --allow.
    /// Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_net)]
    pub deny: Vec<IpNet>,

    /// Connections one client address may hold at once; one more is sent the
    /// busy line.
    #[arg(long, value_name = "N", value_parser = parse_at_least_one)]
    pub max_per_ip: Option<usize>,

    /// Connections the kernel queues for the server before it accepts them
    /// [default: net.core.somaxconn, 4096 on current kernels]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i32::MAX as i64))]
    pub backlog: Option<u32>,

    /// Connections one client network may open per period, e.g. 5/s,
    /// 100/min or 1000/h (also the burst); one more gets the busy line.
    #[arg(long, value_name = "RATE")]
    pub max_rate_per_ip: Option<Rate>,

    /// With --max-rate-per-ip: leading bits of an IPv4 client address that
    /// make its network (32: each address on its own).
    #[arg(long, value_name = "BITS", default_value_t = defaults().rate_prefix_v4,
          value_parser = parse_prefix_v4, requires = "max_rate_per_ip")]
    pub rate_prefix_v4: u8,

    /// With --max-rate-per-ip: leading bits of an IPv6 client address that
    /// make its network (64: a host's usual allocation, so changing
    /// addresses within it gains nothing).
    #[arg(long, value_name = "BITS", default_value_t = defaults().rate_prefix_v6,
          value_parser = parse_prefix_v6, requires = "max_rate_per_ip")]
    pub rate_prefix_v6: u8,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics, e.g.
    /// 127.0.0.1:9337 (keep it off public interfaces).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,

    /// Let several processes listen on the same port (SO_REUSEPORT), e.g. an
    /// old and a new one during a restart; see the README for the pitfall.
    #[arg(long)]
    pub reuseport: bool,

    /// Log lines as text, or as one JSON object per line.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormatArg::Text)]
    pub log_format: LogFormatArg,

    /// Write the log to this file (appended, created if missing) instead of
    /// stderr; SIGHUP reopens it (logrotate). stderr keeps start-up errors
    /// and reports of a failing log file.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Do not fdatasync the log after each batch of replies: faster, but a
    /// power loss may lose replies whose clients saw a clean close.
    #[arg(long)]
    pub no_log_sync: bool,

    /// Seconds a reply may wait for a stalled or failing log before it is
    /// given up (its client is then reset).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_RECORD_TIMEOUT.as_secs_f64(),
          value_parser = parse_positive_seconds, allow_negative_numbers = true)]
    pub record_timeout: f64,
}

/// `--log-format`: the library's [`LogFormat`], as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(format: LogFormatArg) -> Self {
        match format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// The library's defaults, which are the flags' defaults.
fn defaults() -> Config {
    Config::default()
}

/// The default prompt as a flag value: without the newline every prompt
/// gets.
fn default_prompt() -> String {
    String::from_utf8_lossy(&defaults().prompt)
        .trim_end()
        .to_string()
}

impl Cli {
    /// Checks what one option's parser cannot: how options relate. The
    /// error is clap's, so it is reported like any other bad argument.
    pub fn validate(self) -> Result<Self, clap::Error> {
        if self.thread_cache > self.max_connections {
            let message = format!(
                "invalid value '{}' for '--thread-cache <N>': must be at most --max-connections ({})",
                self.thread_cache, self.max_connections
            );
            return Err(Self::command().error(clap::error::ErrorKind::ValueValidation, message));
        }
        Ok(self)
    }

    /// How the log is written.
    pub fn log_settings(&self) -> LogSettings {
        LogSettings {
            format: self.log_format.into(),
            file: self.log_file.clone(),
            sync: !self.no_log_sync,
            record_timeout: Duration::from_secs_f64(self.record_timeout),
        }
    }

    /// The [`Config`] this command line asks for.
    pub fn to_config(&self) -> Config {
        Config {
            listen_addr: SocketAddr::new(self.bind, self.port),
            prompt: prompt_bytes(&self.prompt),
            max_reply_bytes: self.max_reply_bytes,
            reply_timeout: (self.reply_timeout > 0.0)
                .then(|| Duration::from_secs_f64(self.reply_timeout)),
            write_timeout: Duration::from_secs_f64(self.write_timeout),
            max_connections: self.max_connections,
            shutdown_timeout: Duration::from_secs_f64(self.shutdown_timeout),
            thread_cache: self.thread_cache,
            proxy_protocol: self.proxy_protocol,
            trusted_proxies: NetList(self.trusted_proxy.clone()),
            access: AccessRules {
                allow: NetList(self.allow.clone()),
                deny: NetList(self.deny.clone()),
            },
            max_per_ip: self.max_per_ip,
            backlog: self.backlog,
            reuse_port: self.reuseport,
            notify_service_manager: true,
            max_rate_per_ip: self.max_rate_per_ip,
            rate_prefix_v4: self.rate_prefix_v4,
            rate_prefix_v6: self.rate_prefix_v6,
            metrics_addr: self.metrics_addr,
            ..Config::default()
        }
    }
}

/// A command-line error as one line for stderr: clap's whole message (the
/// flag, the allowed values, the tip) without its usage block and its "For
/// more information" line, as plain text, ending in "(see --help)":
///
/// `error: unexpected argument '--prot' found; tip: a similar argument exists: '--port' (see --help)`
pub fn error_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let mut line = String::new();
    for part in rendered.lines().map(str::trim) {
        if part.starts_with("Usage:") || part.starts_with("For more information") {
            break;
        }
        if part.is_empty() {
            continue;
        }
        if !line.is_empty() {
            line.push_str(if part.starts_with("tip:") { "; " } else { " " });
        }
        line.push_str(part);
    }
    if line.is_empty() {
        line.push_str("error: invalid arguments");
    }
    line.push_str(" (see --help)");
    line
}

/// Seconds as a number that makes a [`Duration`]: finite, not negative, and
/// not absurdly large (at most a year).
fn parse_seconds(text: &str) -> Result<f64, String> {
    const YEAR: f64 = 365.0 * 24.0 * 3600.0;
    match text.parse::<f64>() {
        Ok(secs) if (0.0..=YEAR).contains(&secs) => Ok(secs),
        Ok(_) => Err(format!("must be between 0 and {YEAR} seconds")),
        Err(_) => Err("must be a number of seconds".to_string()),
    }
}

fn parse_positive_seconds(text: &str) -> Result<f64, String> {
    match parse_seconds(text)? {
        0.0 => Err("must be more than 0 seconds".to_string()),
        secs => Ok(secs),
    }
}

fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses `ADDR/PREFIX`, or a bare address meaning that one host.
fn parse_net(text: &str) -> Result<IpNet, String> {
    if text.contains('/') {
        text.parse::<IpNet>().map(|net| net.trunc()).map_err(|_| {
            "must be an address or a network such as 10.0.0.0/8 or ::1/128".to_string()
        })
    } else {
        text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
            "must be an address or a network such as 10.0.0.0/8 or ::1/128".to_string()
        })
    }
}

/// Turns prompt text into the bytes sent, adding the newline a line-based
/// client (netcat, telnet) needs to show it.
fn prompt_bytes(text: &str) -> Vec<u8> {
    let mut prompt = text.as_bytes().to_vec();
    if !prompt.ends_with(b"\n") {
        prompt.push(b'\n');
    }
    prompt
}

/// `--rate-prefix-v4` as a clap value parser: a prefix length 0..=32.
fn parse_prefix_v4(text: &str) -> Result<u8, String> {
    parse_prefix(text, 32)
}

/// `--rate-prefix-v6` as a clap value parser: a prefix length 0..=128.
fn parse_prefix_v6(text: &str) -> Result<u8, String> {
    parse_prefix(text, 128)
}

fn parse_prefix(text: &str, max: u8) -> Result<u8, String> {
    match text.parse::<u8>() {
        Ok(bits) if bits <= max => Ok(bits),
        _ => Err(format!("must be a prefix length from 0 to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn prefix_lengths_are_checked() {
        assert_eq!(parse_prefix_v4("0"), Ok(0));
        assert_eq!(parse_prefix_v4("32"), Ok(32));
        assert_eq!(parse_prefix_v6("128"), Ok(128));
        for bad in ["33", "-1", "", "x", "1000"] {
            let error = parse_prefix_v4(bad).expect_err(bad);
            assert_eq!(error, "must be a prefix length from 0 to 32");
        }
        assert!(parse_prefix_v6("129").is_err());
    }

    #[test]
    fn defaults_match_the_classic_example() {
        let config = Cli::parse_from(["prompt-server"]).to_config();
        assert_eq!(config.listen_addr, "0.0.0.0:1337".parse().unwrap());
        assert_eq!(config.prompt, b"Do you want to play a game?\n");
        assert_eq!(config.max_reply_bytes, 1024);
        assert_eq!(config.reply_timeout, Some(Duration::from_secs(60)));
        assert_eq!(config.max_connections, 1024);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    fn zero_reply_timeout_waits_forever() {
        let config = Cli::parse_from(["prompt-server", "--reply-timeout", "0"]).to_config();
        assert_eq!(config.reply_timeout, None);
        let config = Cli::parse_from(["prompt-server", "--reply-timeout", "0.5"]).to_config();
        assert_eq!(config.reply_timeout, Some(Duration::from_millis(500)));
    }

    #[test]
    fn nonsense_durations_are_refused() {
        for (flag, value) in [
            ("--reply-timeout", "-1"),
            ("--reply-timeout", "NaN"),
            ("--shutdown-timeout", "1e30"),
            ("--shutdown-timeout", "-2"),
            ("--write-timeout", "0"),
        ] {
            let error = Cli::try_parse_from(["prompt-server", flag, value])
                .expect_err(value)
                .to_string();
            // The error names the option, even for a negative number.
            assert!(error.contains(flag), "{flag} {value}: {error}");
        }
    }

    #[test]
    fn zero_reply_cap_is_refused() {
        let err = Cli::try_parse_from(["prompt-server", "--max-reply-bytes", "0"]).unwrap_err();
        assert!(err.to_string().contains("must be at least 1"), "{err}");
    }

    #[test]
    fn access_options_repeat_and_trusted_proxy_needs_proxy_protocol() {
        let cli = Cli::parse_from([
            "prompt-server",
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "::1",
            "--deny",
            "10.9.0.0/16",
            "--max-per-ip",
            "3",
        ]);
        let config = cli.to_config();
        assert_eq!(config.access.allow.0.len(), 2);
        assert!(!config.access.permits("10.9.1.1".parse().unwrap()));
        assert_eq!(config.max_per_ip, Some(3));
        assert!(Cli::try_parse_from(["prompt-server", "--trusted-proxy", "127.0.0.1"]).is_err());
        assert!(
            Cli::try_parse_from([
                "prompt-server",
                "--proxy-protocol",
                "--trusted-proxy",
                "127.0.0.1"
            ])
            .is_ok()
        );
        assert!(Cli::try_parse_from(["prompt-server", "--log-format", "xml"]).is_err());
    }

    fn error_for(args: &[&str]) -> String {
        let args = std::iter::once("prompt-server").chain(args.iter().copied());
        error_line(&Cli::try_parse_from(args).unwrap_err())
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
    fn thread_cache_beyond_the_connection_cap_is_refused() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["prompt-server"].iter().chain(args)).and_then(Cli::validate)
        };
        let err = parse(&["--thread-cache", "1000000000"]).unwrap_err();
        assert!(
            err.to_string().contains("at most --max-connections (1024)"),
            "{err}"
        );
        assert!(parse(&["--thread-cache", "18446744073709551616"]).is_err());
        assert!(parse(&["--max-connections", "8", "--thread-cache", "8"]).is_ok());
    }

    #[test]
    fn rate_prefixes_need_a_rate_and_default_to_32_and_64() {
        let config = Cli::parse_from(["prompt-server", "--max-rate-per-ip", "5/s"]).to_config();
        assert_eq!((config.rate_prefix_v4, config.rate_prefix_v6), (32, 64));
        assert_eq!(config.max_rate_per_ip.map(|rate| rate.count()), Some(5));
        for flag in ["--rate-prefix-v4", "--rate-prefix-v6"] {
            assert!(
                Cli::try_parse_from(["prompt-server", flag, "24"]).is_err(),
                "{flag}"
            );
        }
        assert!(
            Cli::try_parse_from([
                "prompt-server",
                "--max-rate-per-ip",
                "5/s",
                "--rate-prefix-v4",
                "33"
            ])
            .is_err()
        );
    }

    #[test]
    fn backlog_defaults_to_the_kernel_maximum_and_can_be_set() {
        assert_eq!(Cli::parse_from(["prompt-server"]).to_config().backlog, None);
        let config = Cli::parse_from(["prompt-server", "--backlog", "64"]).to_config();
        assert_eq!(config.backlog, Some(64));
        assert!(Cli::try_parse_from(["prompt-server", "--backlog", "0"]).is_err());
    }
}
