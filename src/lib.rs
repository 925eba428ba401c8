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
//! - [`server`]: binding the listener and the accept loop, the one place where
//!   a connection thread is started.
//! - [`connection`]: one client's life: send the prompt, read the reply, log
//!   the outcome, close.
//! - [`reply`]: reading one reply line from a socket, where every client byte is
//!   read and where the size cap and the reply deadline are enforced.
//! - [`logging`]: logger set-up and escaping of client bytes, so that nothing a
//!   client sends can forge or break a log line.
//! - [`shutdown`]: the handle that stops the accept loop from another thread.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging,
//! binds, and calls [`run`]; tests drive the very same [`bind`] and [`run`].

#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod logging;
pub mod reply;
pub mod server;
pub mod shutdown;

pub use config::Config;
pub use server::{bind, run};
pub use shutdown::Shutdown;
