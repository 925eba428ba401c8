//! What the server runs with: [`Config`], its defaults, and the one place
//! its rules are checked ([`Config::validate`]). Tests and embedders build a
//! `Config` directly; the binary's command line only fills one in.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::limits::rate::RateLimit;
use crate::limits::{AccessRules, NetList};
use crate::record::ReplySink;
use crate::record::logging::{AT_MOST_A_YEAR, LogReplies, MAX_DURATION};

/// Everything the server needs to know to serve connections.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 lets the OS pick one.
    pub listen_addr: SocketAddr,
    /// Sent to every client on connect, as is (the CLI adds a missing `\n`).
    pub prompt: Vec<u8>,
    /// Longest reply kept, not counting its line terminator; more is truncated.
    pub max_reply_bytes: NonZeroUsize,
    /// Budget for the whole reply, however it trickles in; `None` waits forever.
    pub reply_timeout: Option<Duration>,
    /// Budget for sending the whole prompt to a slow reader; more than zero.
    pub write_timeout: Duration,
    /// Connections served at once; more are sent the busy line and closed.
    pub max_connections: NonZeroUsize,
    /// How long a stopping server waits for connected clients to finish.
    pub shutdown_timeout: Duration,
    /// Finished connection threads that wait in `accept` for the next
    /// connections (0: a new thread for each); at most `max_connections`.
    pub thread_cache: usize,
    /// `Some(trusted)`: each connection starts with a PROXY header (v1 or v2)
    /// naming the real client, from a `trusted` proxy (any, if empty).
    pub proxy_protocol: Option<NetList>,
    /// Which client addresses are served.
    pub access: AccessRules,
    /// Connections one client address may hold at once; `None`: no limit.
    pub max_per_ip: Option<NonZeroUsize>,
    /// Connections the kernel may queue until accepted (at most `i32::MAX`);
    /// `None`: the most it allows (`net.core.somaxconn`).
    pub backlog: Option<NonZeroU32>,
    /// `SO_REUSEPORT`: several processes may listen on the port; the kernel spreads connections.
    pub reuse_port: bool,
    /// Report readiness, status and watchdog pings to the service manager
    /// named by `NOTIFY_SOCKET` (systemd's `Type=notify`), when it is set.
    pub notify_service_manager: bool,
    /// How fast one client network may connect (over it: the busy line); `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// Where to serve `GET /metrics` (Prometheus text); `None`: nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Where replies are recorded; a client sees a clean close only once
    /// its sink has taken its reply. The log by default.
    pub reply_sink: Arc<dyn ReplySink>,
    /// Serve every connection over TLS with these files; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
}

/// `--tls-cert`, `--tls-key`, `--tls-client-ca`: PEM files, read at the start and on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, the server's own first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Serve only clients whose certificate one of these CAs signed.
    pub client_ca: Option<PathBuf>,
}

impl Default for Config {
    /// The classic example: port 1337 on every IPv4 interface, its prompt,
    /// and its one 1024-byte read as the reply cap.
    fn default() -> Self {
        Config {
            listen_addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 1337)),
            prompt: b"Do you want to play a game?\n".to_vec(),
            max_reply_bytes: const { NonZeroUsize::new(1024).unwrap() },
            // Long enough for a person to type an answer, short enough that
            // abandoned connections do not pile up.
            reply_timeout: Some(Duration::from_secs(60)),
            // The prompt is one small write: a client that has not taken it
            // by then is not reading at all.
            write_timeout: Duration::from_secs(10),
            // Each costs a thread (a few KiB of memory, 2 MiB of address
            // space) and a descriptor: 1024 fits most systems' descriptor
            // limit once raised to the hard limit, and any 64-bit machine.
            max_connections: const { NonZeroUsize::new(1024).unwrap() },
            shutdown_timeout: Duration::from_secs(10),
            thread_cache: 0,
            proxy_protocol: None,
            access: AccessRules::default(),
            max_per_ip: None,
            backlog: None,
            reuse_port: false,
            notify_service_manager: false,
            rate_limit: None,
            metrics_addr: None,
            reply_sink: Arc::new(LogReplies),
            tls: None,
        }
    }
}

/// A [`Config`] rule that does not hold: which field, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, as [`Config`] names it: `thread_cache`, `rate_limit.prefix_v4`.
    pub field: &'static str,
    /// Its value as given.
    pub value: String,
    /// What it must be: "must be at most the connection cap (1024)".
    pub rule: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.rule)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Checks every rule that the fields' types cannot express, and returns
    /// the first that does not hold; [`run`](crate::run) calls it first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let broken = |field, value: &dyn fmt::Display, rule: String| {
            let value = value.to_string();
            Err(ConfigError { field, value, rule })
        };
        let durations = [
            ("reply_timeout", self.reply_timeout),
            ("write_timeout", Some(self.write_timeout)),
            ("shutdown_timeout", Some(self.shutdown_timeout)),
        ];
        for (field, duration) in durations {
            if let Some(duration) = duration.filter(|d| *d > MAX_DURATION) {
                return broken(field, &duration.as_secs_f64(), AT_MOST_A_YEAR.into());
            }
        }
        if self.write_timeout.is_zero() {
            return broken("write_timeout", &0, "must be more than 0 seconds".into());
        }
        let cap = self.max_connections;
        if self.thread_cache > cap.get() {
            let rule = format!("must be at most the connection cap ({cap})");
            return broken("thread_cache", &self.thread_cache, rule);
        }
        if let Some(backlog) = self.backlog.filter(|b| i32::try_from(b.get()).is_err()) {
            return broken("backlog", &backlog, format!("must be at most {}", i32::MAX));
        }
        let prefixes = self.rate_limit.iter().flat_map(|limit| {
            [
                ("rate_limit.prefix_v4", limit.prefix_v4, 32),
                ("rate_limit.prefix_v6", limit.prefix_v6, 128),
            ]
        });
        for (field, bits, max) in prefixes {
            if bits > max {
                let rule = format!("must be a prefix length from 0 to {max}");
                return broken(field, &bits, rule);
            }
        }
        Ok(())
    }
}
