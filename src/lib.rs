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
//! `ls src` shows the parts; each folder's `mod.rs` says what it owns, and
//! modules depend on each other one way (a test checks it).
//!
//! - `serve/`: [`run`], the listeners ([`bind`], [`listeners`]), the accept
//!   loop, and one connection's life (`serve/connection.rs`: identify,
//!   admit, prompt, read, record, close, park).
//! - `limits/`: what clients may hold (the connection cap, per address, per
//!   network's rate), who may connect, the one way a client is refused, and
//!   how many connections this machine can hold.
//! - `record/`: the [`ReplySink`] every reply goes to before its close, and
//!   the log ([`logging`]), its default: a queue with group commit in front
//!   of stderr or the log file.
//! - `service/`: the service manager (readiness, status, watchdog) and the
//!   metrics endpoint.
//! - `shutdown.rs`: the [`Shutdown`] handle, the signals an operator sends,
//!   and the stop's drain.
//! - `config.rs`, `stats.rs`, `error.rs`: the [`Config`] and its rules, the
//!   counters behind the [`Summary`] and the metrics, the library's
//!   [`Error`].
//!
//! One connection, accept to park, reads through `serve/accept.rs`,
//! `serve/connection.rs`, `serve/read.rs`, `limits/mod.rs`, the reply sink
//! (`record/logging.rs` by default, over `record/format.rs` and
//! `record/queue.rs`) and `stats.rs`; `serve/proxy_protocol.rs` behind a
//! balancer, `limits/rate.rs` with a rate limit. `docs/ARCHITECTURE.md`
//! follows it step by step.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging,
//! takes its sockets ([`listeners`]: systemd's, or bound) and calls
//! [`run`]; tests drive the very same [`bind`] and [`run`].

// `deny`, not `forbid`: exactly one function opts out, with a SAFETY
// comment (`serve::listen::claim_descriptor`, which takes a socket inherited
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
