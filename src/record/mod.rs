//! The record: where every served connection's reply goes (a [`ReplySink`], the log
//! by default), and that log: [`logging`] sets it up, `format` makes its lines,
//! `queue` writes them to stderr or the log file (group commit).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

mod format;
pub mod logging;
mod queue;

/// Where a server's replies are recorded: the log by default
/// ([`logging::LogReplies`]), or an embedder's own store.
///
/// [`record`](ReplySink::record) runs on the connection's thread before its
/// close; its `Ok` is the acknowledgement that gives the client a clean
/// close. An error (or a panic) resets the client, and the reply is counted
/// as not recorded and logged. A sink may block (a slow disk, a database),
/// not forever: a stopping server waits for it only so long.
///
/// # Examples
///
/// Replies kept in memory (a database would go here):
///
/// ```
/// use std::io::{self, Read, Write};
/// use std::net::{SocketAddr, TcpStream};
/// use std::sync::{Arc, Mutex};
/// use prompt_server::{Config, Record, ReplySink, Shutdown};
///
/// struct Replies(Mutex<Vec<(SocketAddr, Vec<u8>)>>);
///
/// impl ReplySink for Replies {
///     fn record(&self, record: &Record<'_>) -> io::Result<()> {
///         let mut replies = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
///         replies.push((record.peer, record.reply.to_vec()));
///         Ok(())
///     }
/// }
///
/// let replies = Arc::new(Replies(Mutex::default()));
/// let config = Config {
///     listen_addr: "127.0.0.1:0".parse()?,
///     reply_sink: replies.clone(),
///     ..Config::default()
/// };
/// let listener = prompt_server::bind(&config)?;
/// let addr = listener.local_addr()?;
/// let shutdown = Shutdown::new();
/// let stop = shutdown.clone();
/// let server = std::thread::spawn(move || prompt_server::run([listener], config, stop));
///
/// let mut client = TcpStream::connect(addr)?;
/// client.read_exact(&mut [0; 28])?; // the prompt
/// client.write_all(b"yes\n")?;
/// client.read_to_end(&mut Vec::new())?; // a clean close: the reply is kept
/// shutdown.trigger();
/// assert_eq!(server.join().expect("the server thread")?.replies, 1);
/// assert_eq!(replies.0.lock().unwrap()[0].1, b"yes");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait ReplySink: Send + Sync {
    /// Records one served connection's reply: `Ok` once it is kept.
    fn record(&self, record: &Record<'_>) -> io::Result<()>;
}

impl fmt::Debug for dyn ReplySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplySink")
    }
}

/// What a served connection left.
#[derive(Debug)]
#[non_exhaustive]
pub struct Record<'a> {
    /// The real client: the socket's peer, or the one a PROXY header named.
    pub peer: SocketAddr,
    /// The balancer that relayed the connection, if one did.
    pub proxy: Option<SocketAddr>,
    /// The reply without its line terminator, at most `max_reply_bytes`.
    pub reply: &'a [u8],
    /// How the reply ended.
    pub end: &'a ReplyEnd,
    /// From the accept to now.
    pub duration: Duration,
    /// The TLS session the reply came over, if any.
    pub tls: Option<&'a TlsSession>,
}

/// A TLS session as a record tells it, in rustls's names.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsSession {
    /// `TLSv1_3` or `TLSv1_2`.
    pub version: &'static str,
    /// `TLS13_AES_256_GCM_SHA384`, for example.
    pub cipher_suite: &'static str,
    /// The name the client asked for (SNI), if it sent one.
    pub server_name: Option<String>,
    /// The subject of the client's certificate (RFC 4514), with a client CA.
    pub client_subject: Option<String>,
}

/// How a reply ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReplyEnd {
    /// A whole line arrived; its terminator is not part of the reply.
    Line,
    /// The client closed its side before a newline (or without replying).
    Closed,
    /// Longer than `max_reply_bytes`: the reply holds the first ones.
    Truncated,
    /// The reply deadline passed first.
    TimedOut {
        /// The reply deadline (`reply_timeout`).
        after: Duration,
    },
    /// A stopping server cut the connection off at its deadline.
    CutOff,
    /// Reading failed, for example because the client reset the connection.
    Failed(io::Error),
}

impl Record<'_> {
    /// Whether [`reply`](Record::reply) holds every byte the client sent for
    /// it (a whole line, or all it sent before closing), not a reply the
    /// server ended (or reading failed), after which the rest is in no record.
    pub fn is_whole(&self) -> bool {
        matches!(self.end, ReplyEnd::Line | ReplyEnd::Closed)
    }
}
