//! What the server runs with: [`Config`] and its documented defaults.
//!
//! Plain data: the library takes a [`Config`] and never reads the command
//! line itself, so tests and embedders build one directly; the binary's
//! command line (the `cli` module) only validates and converts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use std::sync::Arc;

use crate::access::{AccessRules, NetList};
use crate::logging::LogReplies;
use crate::rate_limit::{DEFAULT_PREFIX_V4, DEFAULT_PREFIX_V6, Rate};
use crate::record::ReplySink;

/// The prompt of the classic example.
pub(crate) const DEFAULT_PROMPT: &str = "Do you want to play a game?\n";
/// The port of the classic example.
pub(crate) const DEFAULT_PORT: u16 = 1337;
/// Every IPv4 interface, as the classic example listens.
pub(crate) const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// The classic example reads one 1024-byte buffer; a longer reply is cut there.
pub(crate) const DEFAULT_MAX_REPLY_BYTES: usize = 1024;
/// A minute is long enough for a person to type an answer, short enough
/// that abandoned connections do not pile up.
pub(crate) const DEFAULT_REPLY_TIMEOUT_SECS: f64 = 60.0;
/// The prompt is one small write; a client that has not taken it in this
/// long is not reading at all.
pub(crate) const DEFAULT_WRITE_TIMEOUT_SECS: f64 = 10.0;
/// Each connection costs a thread (a few KiB of memory, 2 MiB of address
/// space) and a file descriptor: 1024 fits the default descriptor limit of
/// most systems once raised to the hard limit, and any 64-bit machine.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How long a stopping server lets connected clients finish.
pub(crate) const DEFAULT_SHUTDOWN_TIMEOUT_SECS: f64 = 10.0;
/// The line a client gets when every connection slot is taken.
pub(crate) const BUSY_MESSAGE: &[u8] = b"server busy, try again later\n";

/// Everything the server needs to know to serve connections.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 lets the OS pick one.
    pub listen_addr: SocketAddr,
    /// Bytes sent to every client on connect, as they are (the command line
    /// adds a missing final `\n`).
    pub prompt: Vec<u8>,
    /// Longest reply kept, not counting its line terminator; more is truncated.
    pub max_reply_bytes: usize,
    /// Budget for the whole reply, however it trickles in; `None` waits forever.
    pub reply_timeout: Option<Duration>,
    /// How long sending the prompt may block on a client that does not read.
    pub write_timeout: Duration,
    /// Connections served at once; more are sent the busy line and closed.
    pub max_connections: usize,
    /// How long a stopping server waits for connected clients to finish.
    pub shutdown_timeout: Duration,
    /// Finished connection threads kept parked for the next connection
    /// (0: every connection gets a new thread).
    pub thread_cache: usize,
    /// Every connection starts with a PROXY protocol header (v1 or v2) that
    /// names the real client.
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: if not empty, only these may send a header.
    pub trusted_proxies: NetList,
    /// Which client addresses are served.
    pub access: AccessRules,
    /// Connections one client address may hold at once; `None`: no limit.
    pub max_per_ip: Option<usize>,
    /// Connections the kernel may queue before the server accepts them;
    /// `None`: the most it allows (`net.core.somaxconn`).
    pub backlog: Option<u32>,
    /// Set `SO_REUSEPORT` before binding, so that several processes can
    /// listen on one port and the kernel spreads connections among them.
    pub reuse_port: bool,
    /// Report readiness, status and watchdog pings to the service manager
    /// named by `NOTIFY_SOCKET` (systemd's `Type=notify`), when it is set.
    pub notify_service_manager: bool,
    /// How fast one client network may open connections; `None`: no limit.
    /// One over it gets the busy line.
    pub max_rate_per_ip: Option<Rate>,
    /// Leading bits of an IPv4 client address that make its network for
    /// `max_rate_per_ip` (32: each address on its own).
    pub rate_prefix_v4: u8,
    /// Leading bits of an IPv6 client address that make its network for
    /// `max_rate_per_ip` (64: a host's usual allocation).
    pub rate_prefix_v6: u8,
    /// Where to serve `GET /metrics` (Prometheus text format); `None`: not
    /// at all.
    pub metrics_addr: Option<SocketAddr>,
    /// Where replies are recorded; a client sees a clean close only once
    /// its sink has taken its reply. The log by default.
    pub reply_sink: Arc<dyn ReplySink>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_addr: SocketAddr::new(DEFAULT_BIND, DEFAULT_PORT),
            prompt: DEFAULT_PROMPT.as_bytes().to_vec(),
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            reply_timeout: Some(Duration::from_secs_f64(DEFAULT_REPLY_TIMEOUT_SECS)),
            write_timeout: Duration::from_secs_f64(DEFAULT_WRITE_TIMEOUT_SECS),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_timeout: Duration::from_secs_f64(DEFAULT_SHUTDOWN_TIMEOUT_SECS),
            thread_cache: 0,
            proxy_protocol: false,
            trusted_proxies: NetList::default(),
            access: AccessRules::default(),
            max_per_ip: None,
            backlog: None,
            reuse_port: false,
            notify_service_manager: false,
            max_rate_per_ip: None,
            rate_prefix_v4: DEFAULT_PREFIX_V4,
            rate_prefix_v6: DEFAULT_PREFIX_V6,
            metrics_addr: None,
            reply_sink: Arc::new(LogReplies),
        }
    }
}
