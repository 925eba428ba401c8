//! prompt-server: a thread-per-connection TCP prompt server.
//!
//! Whoever connects is sent a prompt; the server reads one reply line, logs it
//! with the peer's address, and closes. Every client gets its own `std::thread`,
//! so a client that never answers holds up nobody but itself.
//!
//! # Using the library
//!
//! [`bind`] a listener for a [`Config`] (or take the sockets systemd passes
//! down with [`listeners`]), then [`run`] it until a [`Shutdown`] handle is
//! triggered; `run` returns a [`Summary`] of how the connections ended. The
//! binary does exactly this, with its command line (`src/cli.rs`, the
//! binary's own module: the library does not know clap) and the
//! [`logging`] set-up around it. Linux only (see the README).
//!
//! # Layout
//!
//! Modules depend on each other one way (a test checks it), roughly in this
//! order from the top:
//!
//! - `server`: binding the listener and the accept loop: where a connection
//!   is admitted or turned away busy, the one place where a connection thread
//!   is started, and how the loop survives `accept` failures.
//! - `activation`: the listening sockets a service manager passed down
//!   (socket activation), checked to be listening TCP sockets.
//! - `notify`: readiness, status and watchdog messages to the service
//!   manager (`Type=notify`), the watchdog fed by each accept loop.
//! - `capacity`: how many connections this process can really hold
//!   (descriptors, memory mappings, thread limits), worked out at start-up,
//!   so that a too-high cap is lowered with a warning instead of aborting
//!   the process when a thread cannot be started.
//! - `thread_cache`: finished connection threads parked to serve the next
//!   connection (`--thread-cache`), instead of a new thread for each.
//! - `connection`: one client's life: identify the client, admit it, send the
//!   prompt, read the reply, log the outcome, close.
//! - `proxy_protocol`: the PROXY protocol header (v1 and v2) a load
//!   balancer sends first, which names the real client.
//! - `reply`: reading one reply line, where the size cap and the reply
//!   deadline are enforced.
//! - `timed_read`: one read under a deadline, the step that both the PROXY
//!   header and the reply are read with.
//! - `limits`: the connection cap and the per-address cap, as slots each
//!   connection owns and releases however it ends.
//! - `access`: `--allow`/`--deny` rules and trusted proxies, checked
//!   against the real client address.
//! - `shutdown`: the [`Shutdown`] handle, the signal handling (SIGINT,
//!   SIGTERM) that triggers it, and the open connections a stop cuts off at
//!   its deadline.
//! - `stats`: counters of how connections ended, for the [`Summary`] and
//!   the metrics.
//! - `metrics`: the Prometheus text format, histograms, and the
//!   `--metrics-addr` endpoint.
//! - `record`: the [`ReplySink`] every served connection's reply goes to
//!   before its close, and the log ([`logging`]) that is the default sink:
//!   a bounded queue with group commit in front of stderr or the log file,
//!   so that a stalled or failing log never blocks the accept loop or the
//!   signal handling, and a client sees a clean close only once its reply
//!   is kept; text and JSON lines, and the escaping of client bytes.
//! - `config`: the [`Config`] the server runs with, and its defaults.
//! - `rate_limit`: `--max-rate-per-ip`, token buckets per client network
//!   in a table whose size stays bounded.
//! - `error`: the library's [`Error`], and how an I/O error is worded.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging,
//! takes its sockets ([`listeners`]: systemd's, or bound) and calls
//! [`run`]; tests drive the very same [`bind`] and [`run`].

// `deny`, not `forbid`: exactly one function opts out, with a SAFETY
// comment (`activation::claim_descriptor`, which takes a socket inherited
// by number from the service manager; there is no safe API for that).
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "prompt-server supports Linux only: it relies on accepted sockets inheriting the \
     listener's timeouts and linger time, and on Linux's accept(2) errors and /proc files"
);

mod config;
mod error;
mod limits;
mod record;
mod serve;
mod service;
mod shutdown;
mod stats;

pub use config::{Config, ConfigError, RateLimit};
pub use error::Error;
pub use limits::rate::Rate;
pub use limits::{AccessRules, NetList};
pub use record::{Record, ReplyEnd, ReplySink, logging};
pub use serve::{bind, listeners, run};
pub use shutdown::Shutdown;
pub use stats::Summary;

/// Locks `mutex`, whether or not a thread panicked while holding it: every
/// value the server keeps under a lock is whole after any single update,
/// and one connection's panic must not stop the others.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
