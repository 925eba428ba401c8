//! The `prompt-server` binary: parse the command line, set up logging, bind,
//! run the library's server until a signal stops it, and turn the outcome
//! into an exit code.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
mod cli;

use cli::Cli;
use prompt_server::{Config, Shutdown, Summary, listeners, logging, run};

/// Exit status of a server whose log did not take everything: replies not
/// recorded, or log lines left unwritten at the stop.
const RECORD_INCOMPLETE: u8 = 3;

fn main() -> ExitCode {
    let (cli, config) = match Cli::try_parse().and_then(|cli| Ok((cli.to_config()?, cli))) {
        Ok((config, cli)) => (cli, config),
        // --help and --version are not errors; clap prints them and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", cli::error_line(&e));
            return ExitCode::from(2);
        }
    };
    // Before anything opens a descriptor that could take a number the
    // service manager's LISTEN_FDS names.
    let listeners = match listeners(&config) {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!("error: {e}{}", hint(&e, &cli));
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = logging::init(&cli.log_settings()) {
        eprintln!("error: cannot set up logging: {e}");
        return ExitCode::FAILURE;
    }
    logging::log_panics();
    match serve(listeners, config) {
        Ok(summary) if summary.unwritten_log_lines > 0 || summary.not_recorded > 0 => {
            // stderr says it when it is not the log that failed: written to
            // a stalled stderr, the line would never let the process exit.
            if cli.log_file.is_some() {
                eprintln!(
                    "error: the log did not take everything: {} replies were not recorded \
                     (their clients were reset), {} log lines were left unwritten",
                    summary.not_recorded, summary.unwritten_log_lines
                );
            }
            ExitCode::from(RECORD_INCOMPLETE)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let hint = e.downcast_ref().map(|e| hint(e, &cli)).unwrap_or_default();
            eprintln!("error: {e:#}{hint}");
            ExitCode::FAILURE
        }
    }
}

fn serve(listeners: Vec<TcpListener>, config: Config) -> anyhow::Result<Summary> {
    let stop = Shutdown::new();
    stop.trigger_on_signals()
        .context("cannot install signal handlers")?;
    Ok(run(listeners, config, stop)?)
}

/// What to do about a start-up error, where there is something to say.
fn hint(error: &prompt_server::Error, cli: &Cli) -> String {
    let in_use = error.kind() == ErrorKind::AddrInUse;
    let (port, what) = match cli.metrics_addr {
        Some(metrics) if error.to_string().contains("for metrics") => {
            (metrics.port(), "--metrics-addr")
        }
        _ => (
            cli.port,
            "--port, or --port 0 for a free one; --reuseport shares a port",
        ),
    };
    if !in_use {
        return String::new();
    }
    format!(
        " (another process listens there: `ss -ltnp 'sport = :{port}'` shows which; \
         choose another {what})"
    )
}
