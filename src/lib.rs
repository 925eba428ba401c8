//! prompt-server: a thread-per-connection TCP prompt server.
//!
//! Whoever connects is sent a prompt; the server reads one reply line, logs it
//! with the peer's address, and closes. Every client gets its own `std::thread`,
//! so a client that never answers holds up nobody but itself.
//!
//! # Layout
//!
//! - [`config`]: the [`Config`] the server runs with, its documented defaults,
//!   and the command line that fills it in.
//! - [`server`]: binding the listener and the accept loop: where a connection
//!   is admitted or turned away busy, the one place where a connection thread
//!   is started, and how the loop survives `accept` failures.
//! - [`limits`]: the connection cap, as a slot each connection thread owns
//!   and releases however it ends.
//! - [`capacity`]: how many connections this process can really hold
//!   (descriptors, memory mappings, thread limits), worked out at start-up,
//!   so that a too-high cap is lowered with a warning instead of aborting
//!   the process when a thread cannot be started.
//! - [`connection`]: one client's life: send the prompt, read the reply, log
//!   the outcome, close.
//! - [`reply`]: reading one reply line from a socket, where every client byte is
//!   read and where the size cap and the reply deadline are enforced.
//! - [`proxy_protocol`]: the PROXY protocol header (v1 and v2) a load
//!   balancer sends first, which names the real client.
//! - [`access`]: `--allow`/`--deny` rules and trusted proxies, checked
//!   against the real client address.
//! - `log_sink`: the bounded queue between log calls and stderr, so that a
//!   stalled log never blocks the accept loop or the signal handling, and a
//!   reply's connection is closed only once its line is written.
//! - [`logging`]: logger set-up (text or JSON lines) and escaping of client
//!   bytes, so that nothing a client sends can forge or break a log line.
//! - [`shutdown`]: the handle that stops the accept loop from another thread,
//!   the signal handling (SIGINT, SIGTERM) that triggers it, and the open
//!   connections a stop cuts off at its deadline.
//! - [`thread_cache`]: finished connection threads parked to serve the next
//!   connection (`--thread-cache`), instead of a new thread for each.
//! - [`stats`]: counters of how connections ended, for the summary at exit.
//! - `activation`: the listening sockets a service manager passed down
//!   (socket activation), checked to be listening TCP sockets.
//! - `notify`: readiness, status and watchdog messages to the service
//!   manager (`Type=notify`), the watchdog fed by each accept loop.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging,
//! binds, and calls [`run`]; tests drive the very same [`bind`] and [`run`].

// `deny`, not `forbid`: exactly one function may opt out, with a SAFETY
// comment (`activation::claim_descriptor`, taking a socket inherited by
// number from the service manager, which has no safe API).
#![deny(unsafe_code)]

pub mod access;
// Not yet called by the accept loop (issue 13 wires it in).
#[allow(dead_code)]
mod activation;
pub mod capacity;
pub mod config;
pub mod connection;
pub mod limits;
mod log_sink;
pub mod logging;
// Not yet called by the accept loop (issue 13 wires it in).
#[allow(dead_code)]
mod notify;
pub mod proxy_protocol;
pub mod reply;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod thread_cache;

pub use config::Config;
pub use server::{bind, run};
pub use shutdown::Shutdown;
pub use stats::Summary;
