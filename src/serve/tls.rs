//! TLS (`--tls-cert`): rustls's `ServerConnection` over the socket on the
//! connection's own thread (the caller gives it the socket with the deadline
//! every call of it meets; one read of plaintext may take several). The files are read
//! at the start and on each SIGHUP (a set that does not load keeps the old);
//! sessions are never resumed, so each handshake meets the current files.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig, ServerConnection, crypto::ring};
use x509_cert::{Certificate, der::Decode};

use crate::config::TlsFiles;
use crate::error::{Error, describe_io_error};
use crate::lock;
use crate::logging::{TLS_HANDSHAKE_LINES, event, log_every};
use crate::record::TlsSession;
use crate::stats::Outcome;

/// A TLS server's files, and the configuration last read from them.
pub(crate) struct TlsServer {
    files: TlsFiles,
    /// What each new handshake starts with; a reload replaces it whole.
    current: Mutex<Arc<ServerConfig>>,
}

impl TlsServer {
    /// Reads the files, or says which one does not load and why.
    pub(crate) fn load(files: &TlsFiles) -> Result<TlsServer, Error> {
        let config = server_config(files)
            .map_err(|why| Error::new("cannot set up TLS", io::Error::other(why)))?;
        let (files, current) = (files.clone(), Mutex::new(Arc::new(config)));
        Ok(TlsServer { files, current })
    }

    /// Reads the files again (SIGHUP): new connections get them or, if they
    /// do not load, what there was. One line says which.
    pub(crate) fn reload(&self) {
        match server_config(&self.files) {
            Ok(config) => {
                *lock(&self.current) = Arc::new(config);
                let cert = self.files.cert.display();
                info!(event = event::TLS_RELOADED; "TLS files re-read: new connections get {cert}");
            }
            Err(why) => warn!(
                event = event::TLS_RELOAD_FAILED;
                "TLS files not reloaded, new connections keep the previous certificate: {why}"
            ),
        }
    }

    /// Runs the handshake over `io`, after the `early` bytes that came with
    /// a PROXY header; logs a failure.
    #[inline(never)] // its buffers stay out of the frame an idle client waits in
    pub(crate) fn handshake<T: Read + Write>(
        &self,
        io: T,
        mut early: &[u8],
        peer: SocketAddr,
    ) -> Result<Box<TlsStream<T>>, Outcome> {
        let config = Arc::clone(&lock(&self.current));
        let shake = || -> io::Result<Box<TlsStream<T>>> {
            let conn = ServerConnection::new(config).map_err(io::Error::other)?;
            let mut tls = Box::new(TlsStream { conn, io });
            while !early.is_empty() {
                tls.conn.read_tls(&mut early)?;
            }
            tls.conn.process_new_packets().map_err(io::Error::other)?;
            while tls.conn.is_handshaking() {
                tls.conn.complete_io(&mut tls.io)?;
            }
            Ok(tls)
        };
        shake().map_err(|e| handshake_failed(&e, peer))
    }
}

/// Logs why a handshake failed (one line a second at most), for a reset.
fn handshake_failed(e: &io::Error, peer: SocketAddr) -> Outcome {
    let why = match e.kind() {
        ErrorKind::TimedOut => "not done by the reply deadline".into(),
        ErrorKind::UnexpectedEof => "the client closed the connection".into(),
        _ => describe_io_error(e),
    };
    log_every!(TLS_HANDSHAKE_LINES, warn, [peer:% = peer,], "{peer} reset: TLS handshake failed: {why}");
    Outcome::TlsHandshakeFailed
}

/// A connection's TLS session: what its prompt and reply go through.
pub(crate) struct TlsStream<T> {
    conn: ServerConnection,
    /// The socket.
    pub(crate) io: T,
}

impl<T: Read + Write> TlsStream<T> {
    /// What the record tells of the session.
    pub(crate) fn session(&self) -> TlsSession {
        let (conn, version) = (&self.conn, self.conn.protocol_version());
        let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
        TlsSession {
            version: version.and_then(|v| v.as_str()).unwrap_or("unknown"),
            cipher_suite: suite.and_then(|s| s.as_str()).unwrap_or("unknown"),
            server_name: conn.server_name().map(str::to_string),
            client_subject: conn.peer_certificates().and_then(<[_]>::first).map(subject),
        }
    }

    /// Sends `close_notify`, for a clean close only.
    pub(crate) fn close_notify(&mut self) {
        self.conn.send_close_notify();
        let _ = self.send(&[]);
    }

    /// Writes every TLS record rustls has waiting, then `bytes` as more.
    pub(crate) fn send(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        loop {
            while self.conn.wants_write() && self.conn.write_tls(&mut self.io)? > 0 {}
            if bytes.is_empty() {
                return Ok(());
            }
            bytes = &bytes[self.conn.writer().write(bytes)?..];
        }
    }
}

/// An end of stream without `close_notify` is an error: a reply cut short.
impl<T: Read + Write> Read for TlsStream<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        rustls::Stream::new(&mut self.conn, &mut self.io).read(buf)
    }
}

/// A `ServerConfig` from the files (a client CA: every client must show a
/// certificate it signed), or why not, naming the file.
fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    // ring, not aws-lc-rs: a faster build and fewer dependencies; rustls
    // deprecates it only for its lack of post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(ring::default_provider());
    let chain = read_pem(&files.cert, "certificate")?;
    let key_der = read_pem::<PrivateKeyDer>(&files.key, "private key")?.swap_remove(0);
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(read_pem(ca, "certificate")?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
    };
    let (cert, key) = (files.cert.display(), files.key.display());
    let config = builder.with_single_cert(chain, key_der);
    let mut config = config.map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!("{key} is not the key of {cert}"),
        e => format!("{cert}, {key}: {e}"),
    })?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Every `what` in the PEM file at `path` (at least one), or why not.
fn read_pem<T: PemObject>(path: &Path, what: &str) -> Result<Vec<T>, String> {
    let why = match T::pem_file_iter(path).and_then(Iterator::collect::<Result<Vec<T>, _>>) {
        Ok(items) if !items.is_empty() => return Ok(items),
        Ok(_) => format!("no PEM {what} in it"),
        Err(pem::Error::Io(e)) => describe_io_error(&e),
        Err(e) => e.to_string(),
    };
    Err(format!("{}: {why}", path.display()))
}

/// A certificate's subject as RFC 4514 writes it: `CN=alice,O=Example`.
fn subject(cert: &CertificateDer<'_>) -> String {
    match Certificate::from_der(cert) {
        Ok(cert) => cert.tbs_certificate().subject().to_string(),
        Err(e) => format!("(unreadable certificate: {e})"),
    }
}
