//! The `prompt-server` binary: parse the command line, set up logging, bind,
//! run the library's server, and turn the outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;
use prompt_server::config::Cli;
use prompt_server::{Shutdown, bind, logging, run};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are not errors; clap prints them and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let first_line = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid arguments");
            eprintln!("{first_line} (see --help)");
            return ExitCode::from(2);
        }
    };
    logging::init();
    let config = cli.to_config();
    let served =
        bind(config.listen_addr).and_then(|listener| run(listener, config, Shutdown::new()));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
