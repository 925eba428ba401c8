//! One client's life on its own thread: send the prompt, read one reply, log
//! what happened with the peer's address, close.
//!
//! Everything here may block for as long as the client lets it; that is
//! fine because nothing else waits on this thread.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use log::{debug, info, warn};

use crate::config::Config;
use crate::logging::{Escaped, describe_io_error};
use crate::reply::{Reply, ReplyEnd, read_reply};

/// Serves one accepted connection to the end; the connection is closed when
/// `stream` is dropped on return.
pub fn serve(mut stream: TcpStream, peer: SocketAddr, config: &Config) {
    debug!("{peer} connected");
    if let Err(e) = stream.write_all(&config.prompt) {
        warn!(
            "{peer} could not be sent the prompt: {}",
            describe_io_error(&e)
        );
        return;
    }
    let reply = read_reply(&mut stream, peer, config.max_reply_bytes, None);
    log_reply(peer, &reply, config);
    debug!("{peer} disconnected");
}

/// The one log line that says how a client's reply went.
fn log_reply(peer: SocketAddr, reply: &Reply, config: &Config) {
    let bytes = Escaped(&reply.bytes);
    match &reply.end {
        ReplyEnd::Line => info!("{peer} said: {bytes}"),
        ReplyEnd::Closed if reply.bytes.is_empty() => info!("{peer} closed without replying"),
        ReplyEnd::Closed => info!("{peer} said: {bytes} (closed before newline)"),
        ReplyEnd::Truncated => warn!(
            "{peer} said: {bytes} (truncated at {} bytes)",
            config.max_reply_bytes
        ),
        ReplyEnd::TimedOut => warn!("{peer} timed out before replying; got {bytes}"),
        ReplyEnd::Failed(e) => warn!("{peer} read error: {}; got {bytes}", describe_io_error(e)),
    }
}
