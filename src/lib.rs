//! prompt-server: a thread-per-connection TCP prompt server.
//!
//! Whoever connects is sent a prompt; the server reads one reply line, logs it
//! with the peer's address, and closes. Every client gets its own `std::thread`,
//! so a client that never answers holds up nobody but itself. Linux only.
//!
//! # Using the library
//!
//! [`bind`] a listener for a [`Config`] (or take the sockets systemd passes
//! down with [`listeners`]), then [`run`] it until a [`Shutdown`] handle is
//! triggered; `run` returns a [`Summary`] of how the connections ended. The
//! binary (`src/main.rs`, with its clap command line in `src/cli.rs`) does
//! just this around the [`logging`] set-up, and tests drive the same calls.
//!
//! # Layout
//!
//! `ls src` shows the parts, each folder's `mod.rs` says what it owns, modules
//! depend on each other one way (a test checks it), and `docs/ARCHITECTURE.md`
//! follows one connection through them.
//!
//! - `serve/`: [`run`], the listeners ([`bind`], [`listeners`]), the accept
//!   loop, TLS, and one connection's life (`serve/connection.rs`).
//! - `limits/`: what clients may hold, who may connect, the one way a client
//!   is refused, and how many connections this machine can hold.
//! - `record/`: the [`ReplySink`] every reply goes to before its close, and
//!   its default, the log ([`logging`]) with its group commit.
//! - `service/`: the service manager (readiness, status, watchdog) and the metrics endpoint.
//! - `shutdown.rs`: the [`Shutdown`] handle, the signals, the stop's drain.
//! - `config.rs`, `stats.rs`, `error.rs`: the [`Config`] and its rules, the
//!   counters behind the [`Summary`] and the metrics, the [`Error`].

// `deny`, not `forbid`: `serve::listen::claim_descriptor` opts out, with a
// SAFETY comment (no safe API takes a socket inherited by number).
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

pub use config::{Config, ConfigError, TlsFiles};
pub use error::Error;
pub use limits::rate::{Rate, RateLimit};
pub use limits::{AccessRules, NetList};
pub use record::{Record, ReplyEnd, ReplySink, TlsSession, logging};
pub use serve::{bind, listeners, run};
pub use shutdown::Shutdown;
pub use stats::Summary;

/// A builder for one of the server's own threads (not a connection's), with
/// a small fixed stack, so that it starts whatever `RUST_MIN_STACK` says.
pub(crate) fn helper_thread(name: &str) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(256 * 1024)
}

/// Locks `mutex` even if a thread panicked holding it: every value kept under
/// a lock is whole after each update, and one panic must not stop the rest.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
