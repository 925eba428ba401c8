//! The `prompt-server` binary: parse the command line, take the listeners,
//! set up logging, run the library's server until a signal stops it, and
//! turn the outcome into an exit code.

mod cli;

use std::io::{self, ErrorKind, Write};
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use cli::Cli;
use prompt_server::logging::LogSettings;
use prompt_server::{Config, Shutdown, listeners, logging, run};

/// Exit status of a server whose log did not take everything: replies not
/// recorded, or log lines left unwritten at the stop.
const RECORD_INCOMPLETE: u8 = 3;

fn main() -> ExitCode {
    let (config, log) = match Cli::settings_from(std::env::args_os()) {
        Ok(parsed) => parsed,
        // --help and --version are not errors; clap prints them and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            say(&cli::error_line(&e));
            return ExitCode::from(2);
        }
    };
    let (port, metrics_addr) = (config.listen_addr.port(), config.metrics_addr);
    serve(config, &log).unwrap_or_else(|e| {
        say(&format!("error: {e:#}{}", hint(&e, port, metrics_addr)));
        ExitCode::FAILURE
    })
}

/// Takes the listeners, sets up logging and signals, and runs the server
/// to its stop; the exit code says whether the log took everything.
fn serve(config: Config, log: &LogSettings) -> anyhow::Result<ExitCode> {
    // Before anything opens a descriptor that could take a number the
    // service manager's LISTEN_FDS names.
    let listeners = listeners(&config)?;
    logging::init(log).context("cannot set up logging")?;
    logging::log_panics();
    let stop = Shutdown::new();
    stop.trigger_on_signals()
        .context("cannot install signal handlers")?;
    let summary = run(listeners, config, stop)?;
    if summary.unwritten_log_lines == 0 && summary.not_recorded == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    // stderr says it when it is not the log that failed: written to a
    // stalled stderr, the line would never let the process exit.
    if log.file.is_some() {
        let replies = match summary.not_recorded {
            1 => "reply was not recorded (its client was reset)",
            _ => "replies were not recorded (their clients were reset)",
        };
        say(&format!(
            "error: the log did not take everything: {} {replies}, {} log lines were left unwritten",
            summary.not_recorded, summary.unwritten_log_lines
        ));
    }
    Ok(ExitCode::from(RECORD_INCOMPLETE))
}

/// Writes `line` to stderr; one that cannot be written is lost, not a
/// panic (`eprintln!` would turn exit status 2 or 3 into 101).
fn say(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// What to do about an address in use, after the error's message.
fn hint(error: &anyhow::Error, port: u16, metrics: Option<SocketAddr>) -> String {
    let error = error.downcast_ref::<prompt_server::Error>();
    let Some(error) = error.filter(|e| e.kind() == ErrorKind::AddrInUse) else {
        return String::new();
    };
    let what = "--port, or --port 0 for a free one; --reuseport shares a port";
    let (port, what) = match metrics {
        Some(addr) if error.to_string().contains("for metrics") => (addr.port(), "--metrics-addr"),
        _ => (port, what),
    };
    format!(
        " (another process listens there: `ss -ltnp 'sport = :{port}'` shows which; \
         choose another {what})"
    )
}
