//! What the server runs with: [`Config`], its documented defaults, and the
//! command line ([`Cli`]) that fills it in.
//!
//! The library takes a [`Config`] and never reads the command line itself, so
//! tests and embedders build one directly; the CLI only validates and converts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::Parser;

/// The prompt of the classic example.
pub const DEFAULT_PROMPT: &str = "Do you want to play a game?\n";
/// The port of the classic example.
pub const DEFAULT_PORT: u16 = 1337;
/// Every IPv4 interface, as the classic example listens.
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// The classic example reads one 1024-byte buffer; a longer reply is cut there.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 1024;

/// Everything the server needs to know to serve connections.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 lets the OS pick one.
    pub listen_addr: SocketAddr,
    /// Bytes sent to every client on connect; always ends in `\n`.
    pub prompt: Vec<u8>,
    /// Longest reply kept, not counting its line terminator; more is truncated.
    pub max_reply_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_addr: SocketAddr::new(DEFAULT_BIND, DEFAULT_PORT),
            prompt: DEFAULT_PROMPT.as_bytes().to_vec(),
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
        }
    }
}

/// Turns prompt text into the bytes sent, adding the newline a line-based
/// client (netcat, telnet) needs to show it.
pub fn prompt_bytes(text: &str) -> Vec<u8> {
    let mut prompt = text.as_bytes().to_vec();
    if !prompt.ends_with(b"\n") {
        prompt.push(b'\n');
    }
    prompt
}

/// The command line of `prompt-server`.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// TCP port to listen on (0 lets the OS pick one; the log says which).
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Address to listen on, e.g. 0.0.0.0, ::, 127.0.0.1 or ::1.
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULT_BIND)]
    pub bind: IpAddr,

    /// Prompt sent to every client; a missing trailing newline is added.
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_PROMPT.trim_end())]
    pub prompt: String,

    /// Longest reply kept, in bytes; a longer one is logged truncated and the
    /// connection closed.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_REPLY_BYTES,
          value_parser = parse_at_least_one)]
    pub max_reply_bytes: usize,
}

impl Cli {
    /// The [`Config`] this command line asks for.
    pub fn to_config(&self) -> Config {
        Config {
            listen_addr: SocketAddr::new(self.bind, self.port),
            prompt: prompt_bytes(&self.prompt),
            max_reply_bytes: self.max_reply_bytes,
        }
    }
}

fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_gets_exactly_one_trailing_newline() {
        assert_eq!(prompt_bytes("hi"), b"hi\n");
        assert_eq!(prompt_bytes("hi\n"), b"hi\n");
        assert_eq!(prompt_bytes(""), b"\n");
    }

    #[test]
    fn defaults_match_the_classic_example() {
        let config = Cli::parse_from(["prompt-server"]).to_config();
        assert_eq!(config.listen_addr, "0.0.0.0:1337".parse().unwrap());
        assert_eq!(config.prompt, b"Do you want to play a game?\n");
        assert_eq!(config.max_reply_bytes, 1024);
    }

    #[test]
    fn zero_reply_cap_is_refused() {
        let err = Cli::try_parse_from(["prompt-server", "--max-reply-bytes", "0"]).unwrap_err();
        assert!(err.to_string().contains("must be at least 1"), "{err}");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
