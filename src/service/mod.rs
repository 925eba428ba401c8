//! Running as a service: what the server tells the service manager
//! (readiness, status, the watchdog: `notify`) and what it tells a
//! monitoring system (`--metrics-addr`: `metrics`). Socket activation, the
//! other half of the service manager's contract, is where listeners are
//! made (`serve::listen`); the signals an operator sends are handled with
//! the stop (`shutdown`).

pub(crate) mod metrics;
pub(crate) mod notify;
