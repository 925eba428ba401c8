//! The `prompt-server` binary: parse the command line, set up logging, bind,
//! run the library's server until a signal stops it, and turn the outcome
//! into an exit code.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use prompt_server::config::{self, Cli};
use prompt_server::{Shutdown, bind, limits, logging, run, shutdown};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are not errors; clap prints them and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", config::error_line(&e));
            return ExitCode::from(2);
        }
    };
    logging::init(cli.log_format);
    logging::log_panics();
    match serve(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cli: &Cli) -> anyhow::Result<()> {
    let config = cli.to_config();
    limits::raise_fd_limit(config.max_connections);
    let listener = bind(config.listen_addr)?;
    let stop = Shutdown::new();
    shutdown::trigger_on_signals(stop.clone()).context("cannot install signal handlers")?;
    run(listener, config, stop)?;
    Ok(())
}
