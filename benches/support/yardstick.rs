//! The yardstick: the tokio server one could have written instead, speaking
//! exactly the same protocol (prompt, one line up to the cap, one escaped log
//! line per reply through the same `log` + `env_logger` set-up, close), with
//! the same protections (write timeout, whole-reply deadline).
//!
//! It uses only the library's public `Config` (for the same defaults); the
//! reply is escaped with `<[u8]>::escape_ascii`, which, like the server's
//! own escaping, visits every byte once.
//!
//! It runs in a child process (the bench re-executes itself), like the
//! project's server, so both are measured from the same load generator and
//! each has its own descriptor limit.

use std::net::SocketAddr;
use std::time::Duration;

use log::{info, warn};
use prompt_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Runs the yardstick server on 127.0.0.1, port 0, until killed.
pub fn serve() {
    // Plain env_logger straight to stderr, as such a server would log.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        info!(
            "listening on {}",
            listener.local_addr().expect("local_addr")
        );
        let config = Config::default();
        // Shared by every connection task for the life of the process.
        let prompt: &'static [u8] = config.prompt.clone().leak();
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(handle(stream, peer, prompt, config.clone()));
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    });
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, prompt: &[u8], config: Config) {
    match timeout(config.write_timeout, stream.write_all(prompt)).await {
        Ok(Ok(())) => {}
        _ => {
            warn!("{peer} could not be sent the prompt");
            return;
        }
    }
    let max = config.max_reply_bytes.get();
    let limit = max + 2;
    let mut buf = vec![0u8; limit];
    let mut len = 0;
    let reply_timeout = config.reply_timeout.unwrap_or(Duration::MAX);
    let read = timeout(reply_timeout, async {
        loop {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(false);
            }
            if let Some(newline) = buf[len..len + n].iter().position(|&b| b == b'\n') {
                len += newline;
                return Ok(true);
            }
            len += n;
            if len == limit {
                return Ok(false);
            }
        }
    })
    .await;
    match read {
        Ok(Ok(true)) => {
            if len > 0 && buf[len - 1] == b'\r' {
                len -= 1;
            }
            if len > max {
                warn!(
                    "{peer} said: \"{}\" (truncated at {max} bytes)",
                    buf[..max].escape_ascii()
                );
            } else {
                info!("{peer} said: \"{}\"", buf[..len].escape_ascii());
            }
        }
        Ok(Ok(false)) if len == 0 => info!("{peer} closed without replying"),
        Ok(Ok(false)) if len > max => {
            warn!(
                "{peer} said: \"{}\" (truncated at {max} bytes)",
                buf[..max].escape_ascii()
            )
        }
        Ok(Ok(false)) => info!(
            "{peer} said: \"{}\" (closed before newline)",
            buf[..len].escape_ascii()
        ),
        Ok(Err(e)) => warn!("{peer} read error: {e}"),
        Err(_) => warn!("{peer} timed out without a full reply"),
    }
}
