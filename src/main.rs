//! The `prompt-server` binary: parse the command line, take the listeners,
//! set up logging, run the library's server until a signal stops it, and
//! turn the outcome into an exit code.

mod cli;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use cli::Cli;
use prompt_server::{Shutdown, listeners, logging, run};

/// Exit status of a server whose log did not take everything: replies not
/// recorded, or log lines left unwritten at the stop.
const RECORD_INCOMPLETE: u8 = 3;

fn main() -> ExitCode {
    let (config, log) = match Cli::try_parse().and_then(Cli::settings) {
        Ok(parsed) => parsed,
        // --help and --version are not errors; clap prints them and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", cli::error_line(&e));
            return ExitCode::from(2);
        }
    };
    let (port, metrics_addr) = (config.listen_addr.port(), config.metrics_addr);
    // Before anything opens a descriptor that could take a number the
    // service manager's LISTEN_FDS names.
    let listeners = match listeners(&config) {
        Ok(listeners) => listeners,
        Err(e) => return start_failed(&e, port, metrics_addr),
    };
    if let Err(e) = logging::init(&log) {
        eprintln!("error: cannot set up logging: {e}");
        return ExitCode::FAILURE;
    }
    logging::log_panics();
    let stop = Shutdown::new();
    if let Err(e) = stop.trigger_on_signals() {
        eprintln!("error: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    match run(listeners, config, stop) {
        Ok(summary) if summary.unwritten_log_lines > 0 || summary.not_recorded > 0 => {
            // stderr says it when it is not the log that failed: written to
            // a stalled stderr, the line would never let the process exit.
            if log.file.is_some() {
                eprintln!(
                    "error: the log did not take everything: {} replies were not recorded \
                     (their clients were reset), {} log lines were left unwritten",
                    summary.not_recorded, summary.unwritten_log_lines
                );
            }
            ExitCode::from(RECORD_INCOMPLETE)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => start_failed(&e, port, metrics_addr),
    }
}

/// Reports a start-up error, saying what to do about an address in use.
fn start_failed(error: &prompt_server::Error, port: u16, metrics: Option<SocketAddr>) -> ExitCode {
    let mut hint = String::new();
    if error.kind() == ErrorKind::AddrInUse {
        let (port, what) = match metrics {
            Some(metrics) if error.to_string().contains("for metrics") => {
                (metrics.port(), "--metrics-addr")
            }
            _ => (
                port,
                "--port, or --port 0 for a free one; --reuseport shares a port",
            ),
        };
        hint = format!(
            " (another process listens there: `ss -ltnp 'sport = :{port}'` shows which; \
             choose another {what})"
        );
    }
    eprintln!("error: {error}{hint}");
    ExitCode::FAILURE
}
