//! Serving connections: [`run`] sets a server up on its listeners, runs an
//! accept loop on each, and stops it. `listen` binds the sockets or takes the
//! service manager's, with the options accepted sockets inherit; `accept`
//! accepts, admits, keeps the thread cache and is the one place a connection
//! thread starts; `connection` is one connection's life, from the thread
//! taking it to the thread parking again, every client byte read under a
//! deadline; `proxy_protocol` parses a balancer's PROXY header; `tls` runs TLS
//! on the connection's thread and renews its files.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::num::NonZeroUsize;
use std::sync::Arc;

use crate::config::Config;
use crate::error::Error;
use crate::limits::{ConnectionLimit, PerIpLimit, capacity, rate::RateBuckets};
use crate::logging;
use crate::service::metrics::{self, Metrics, ServerState};
use crate::service::notify::Notifier;
use crate::shutdown::{self, Hook, Shutdown};
use crate::stats::{Stats, Summary};

mod accept;
pub(crate) mod connection;
mod listen;
mod proxy_protocol;
mod tls;

use accept::Shared;
use connection::Serving;
pub use listen::{bind, listeners};

/// Serves connections from `listeners` (one as `[listener]`, or several such as
/// systemd's IPv4 and IPv6 sockets: an accept loop each, one connection cap for
/// all) until `shutdown` is triggered; then serves the clients already queued,
/// closes the listeners, lets connected clients finish for up to
/// `config.shutdown_timeout`, cuts off the rest (each recorded with what it had
/// sent), and returns what happened once every connection thread is gone. It
/// first logs `listening on ADDR` for each listener: a caller who asked for
/// port 0 learns its port.
///
/// # Errors
///
/// Fails before serving anyone if the config is invalid, a listener's address
/// or options cannot be read or set, the metrics address cannot be bound, or
/// `NOTIFY_SOCKET` is unusable; once serving, no error stops it.
pub fn run(
    listeners: impl IntoIterator<Item = TcpListener>,
    config: Config,
    shutdown: Shutdown,
) -> Result<Summary, Error> {
    if let Err(e) = config.validate() {
        let invalid = io::Error::new(io::ErrorKind::InvalidInput, e);
        return Err(Error::new("invalid configuration", invalid));
    }
    let tls = config.tls.as_ref().map(tls::TlsServer::load).transpose()?;
    let metrics_listener = config.metrics_addr.map(bind_metrics).transpose()?;
    let unreachable = |e| Error::new("cannot reach the service manager (NOTIFY_SOCKET)", e);
    let mut notifier = Notifier::from_env(config.notify_service_manager).map_err(unreachable)?;
    let listeners = listen::prepare_listeners(listeners, &config, &shutdown)?;
    let serving = serving(config, tls.map(Arc::new), listeners.len());
    let shared = Arc::new(Shared::new(serving, shutdown.clone()));
    let _metrics = metrics_listener
        .map(|listener| start_metrics(listener, &shared))
        .transpose()?;
    let addrs: Vec<SocketAddr> = listeners.iter().map(|(_, addr)| *addr).collect();
    let server = Arc::clone(&shared);
    notifier.ready(&addrs, move || server.serving.limit.active());
    let server = Arc::clone(&shared);
    let counters = move || server.serving.stats.summary(server.serving.limit.active());
    let tls = shared.serving.tls.clone();
    let reload: Hook<()> = tls.map(|tls| Arc::new(move || tls.reload()) as _);
    shutdown.on_requests(Some(Arc::new(counters)), reload);
    let accepted = accept::accept_on_all(listeners, &shared, &notifier);
    shutdown.on_requests(None, None);
    accepted?;
    notifier.stopping();
    let (serving, timeout) = (&shared.serving, shared.serving.config.shutdown_timeout);
    let summary = shutdown::drain(&serving.limit, &shared.threads, &serving.stats, timeout);
    Ok(summary)
}

/// What connection threads serve with, the cap lowered to what this
/// process can hold (one warn line if lowered).
fn serving(mut config: Config, tls: Option<Arc<tls::TlsServer>>, accept_loops: usize) -> Serving {
    let cap = capacity::effective_max_connections(config.max_connections.get(), accept_loops);
    config.max_connections = NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN);
    Serving {
        limit: ConnectionLimit::new(config.max_connections.get()),
        per_ip: PerIpLimit::new(config.max_per_ip.map(NonZeroUsize::get)),
        rate: config.rate_limit.map(RateBuckets::new),
        stats: Stats::default(),
        config,
        tls,
    }
}

/// The `--metrics-addr` listener, with the kernel's largest backlog: a
/// client reconnecting in a loop must not crowd other scrapers out.
fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, Error> {
    listen::listen(addr, listen::default_backlog(), false)
        .map_err(|e| Error::new(format!("cannot listen for metrics on {addr}"), e))
}

/// Starts the metrics endpoint, which serves until it is dropped (after
/// the drain, so that the drain can be watched).
fn start_metrics(listener: TcpListener, shared: &Arc<Shared>) -> Result<metrics::Endpoint, Error> {
    let serving = &shared.serving;
    let metrics = Metrics::new(&serving.stats, serving.limit.max(), serving.rate.is_some());
    let shared = Arc::clone(shared);
    let render = Box::new(move || {
        let (alive, parked) = (shared.threads.get() as u64, shared.parked() as u64);
        metrics.render(&ServerState {
            connections_open: shared.serving.limit.active() as u64,
            threads_serving: alive.saturating_sub(parked),
            threads_parked: parked,
            rate_limit_networks: shared.serving.rate.as_ref().map(|rate| rate.len() as u64),
            log_lines_dropped: logging::lines_dropped(),
            log_write_errors: logging::write_errors(),
        })
    });
    metrics::Endpoint::start(listener, render)
        .map_err(|e| Error::new("cannot start the metrics endpoint", e))
}
