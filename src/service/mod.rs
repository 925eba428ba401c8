//! Running as a service: what the server tells the service manager (`notify`)
//! and a monitoring system (`metrics`). Socket activation is where listeners
//! are made (`serve::listen`); an operator's signals, with the stop (`shutdown`).

pub(crate) mod metrics;
pub(crate) mod notify;
