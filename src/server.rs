//! Binding the listener and the accept loop: the one place where a
//! connection's thread is started.
//!
//! The loop does nothing but accept and hand each connection to a new thread,
//! so no client, however slow, can delay the next one.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

use anyhow::Context;
use log::{info, warn};

use crate::config::Config;
use crate::connection;
use crate::logging::describe_io_error;
use crate::shutdown::Shutdown;

/// Binds the listening socket, with an error that names the address.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| anyhow::Error::msg(describe_io_error(&e)))
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves connections from `listener` until `shutdown` is triggered.
///
/// Logs `listening on ADDR` with the address actually bound first, so that a
/// caller who asked for port 0 can find out which port it got.
pub fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let local_addr = listener
        .local_addr()
        .context("cannot read the address the listener is bound to")?;
    info!("listening on {local_addr}");
    shutdown.set_wake_addr(local_addr);
    let config = Arc::new(config);
    while !shutdown.is_triggered() {
        match listener.accept() {
            Ok((stream, peer)) => {
                if shutdown.is_triggered() {
                    break;
                }
                spawn_connection(stream, peer, &config);
            }
            Err(e) => warn!("accept failed: {}", describe_io_error(&e)),
        }
    }
    info!("stopped accepting connections");
    Ok(())
}

/// Starts the thread that serves one connection. If no thread can be
/// started, the connection is closed and the loop goes on.
fn spawn_connection(stream: TcpStream, peer: SocketAddr, config: &Arc<Config>) {
    let config = Arc::clone(config);
    let spawned = thread::Builder::new()
        .name(format!("conn-{peer}"))
        .spawn(move || connection::serve(stream, peer, &config));
    if let Err(e) = spawned {
        warn!(
            "{peer} closed: cannot start a thread for it: {}",
            describe_io_error(&e)
        );
    }
}
