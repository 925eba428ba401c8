//! One client's life on its own thread: send the prompt, read one reply, log
//! what happened with the peer's address.
//!
//! Everything here may block, but never for longer than the write timeout
//! plus the reply deadline, and nothing else waits on this thread.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use log::{info, warn};

use crate::config::Config;
use crate::logging::{Escaped, describe_io_error};
use crate::reply::{Reply, ReplyDeadline, ReplyEnd, read_reply};

/// How a connection ended, for the shutdown summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A reply was logged whole.
    Replied,
    /// A reply was logged cut at the cap.
    Truncated,
    /// The reply deadline passed.
    TimedOut,
    /// The client closed without sending anything.
    NoReply,
    /// Writing the prompt or reading the reply failed.
    Failed,
}

/// Sends the prompt and reads and logs one reply. The caller closes the
/// connection.
///
/// `timeouts_inherited` says that the socket already carries the write
/// timeout and a read timeout of the whole reply budget (inherited from the
/// listening socket), which saves two system calls per connection.
pub fn serve(
    stream: &mut TcpStream,
    peer: SocketAddr,
    config: &Config,
    timeouts_inherited: bool,
) -> Outcome {
    let sent = if timeouts_inherited {
        Ok(())
    } else {
        stream.set_write_timeout(Some(config.write_timeout))
    }
    .and_then(|()| stream.write_all(&config.prompt));
    if let Err(e) = sent {
        warn!(
            "{peer} could not be sent the prompt: {}",
            describe_io_error(&e)
        );
        return Outcome::Failed;
    }
    let deadline = config.reply_timeout.map(|timeout| ReplyDeadline {
        at: Instant::now() + timeout,
        first_read_timeout_is_set: timeouts_inherited,
    });
    let reply = read_reply(stream, peer, config.max_reply_bytes, deadline);
    log_reply(peer, &reply, config)
}

/// The one log line that says how a client's reply went.
fn log_reply(peer: SocketAddr, reply: &Reply, config: &Config) -> Outcome {
    let bytes = Escaped(&reply.bytes);
    match &reply.end {
        ReplyEnd::Line => {
            info!("{peer} said: {bytes}");
            Outcome::Replied
        }
        ReplyEnd::Closed if reply.bytes.is_empty() => {
            info!("{peer} closed without replying");
            Outcome::NoReply
        }
        ReplyEnd::Closed => {
            info!("{peer} said: {bytes} (closed before newline)");
            Outcome::Replied
        }
        ReplyEnd::Truncated => {
            warn!(
                "{peer} said: {bytes} (truncated at {} bytes)",
                config.max_reply_bytes
            );
            Outcome::Truncated
        }
        ReplyEnd::TimedOut => {
            let secs = config.reply_timeout.unwrap_or_default().as_secs_f64();
            warn!("{peer} timed out after {secs}s without a full reply; got {bytes}");
            Outcome::TimedOut
        }
        ReplyEnd::Failed(e) => {
            warn!("{peer} read error: {}; got {bytes}", describe_io_error(e));
            Outcome::Failed
        }
    }
}
