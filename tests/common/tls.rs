//! TLS for the tests and the benchmark (which includes this file with
//! `#[path]`): certificates made by the real `openssl` command ([`Pki`]: a
//! CA, server certificates for 127.0.0.1 and localhost, client
//! certificates), and a rustls client session over a socket the caller
//! opened, with its timeouts ([`tls_session`]).

#![allow(dead_code)] // each user takes its own part

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// The name the server certificates are for, and every client asks for.
pub const SERVER_NAME: &str = "localhost";

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Identity {
    /// The certificate as DER: what a client sees of it.
    pub fn der(&self) -> Vec<u8> {
        let cert = CertificateDer::from_pem_file(&self.cert).expect("a PEM certificate");
        cert.to_vec()
    }
}

/// A test CA in a directory, which issues certificates there.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
    /// The CA's certificate: what clients trust, and `--tls-client-ca`.
    pub ca: PathBuf,
    ca_key: PathBuf,
}

impl Pki {
    /// A new CA ("CN=prompt-server test CA") in `dir`, which must exist.
    pub fn new(dir: &Path) -> Pki {
        let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=prompt-server test CA",
            "-keyout",
            path(&ca_key),
            "-out",
            path(&ca),
        ]);
        Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_key,
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, with a new key,
    /// in `NAME.pem` and `NAME.key`.
    pub fn server(&self, name: &str) -> Identity {
        let extensions = "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
                          extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n";
        self.issue(name, "/CN=localhost", extensions)
    }

    /// A client certificate with `subject` ("/CN=alice/O=Example"), with a
    /// new key, in `NAME.pem` and `NAME.key`.
    pub fn client(&self, name: &str, subject: &str) -> Identity {
        self.issue(
            name,
            subject,
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        )
    }

    fn issue(&self, name: &str, subject: &str, extensions: &str) -> Identity {
        let file = |ext: &str| self.dir.join(format!("{name}.{ext}"));
        let (cert, key, request, ext) = (file("pem"), file("key"), file("csr"), file("ext"));
        fs::write(&ext, extensions).expect("write the extensions");
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            path(&key),
            "-out",
            path(&request),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            path(&request),
            "-CA",
            path(&self.ca),
            "-CAkey",
            path(&self.ca_key),
            "-set_serial",
            &serial(),
            "-extfile",
            path(&ext),
            "-out",
            path(&cert),
        ]);
        Identity { cert, key }
    }
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// A serial number no other certificate of the run has.
fn serial() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A client that trusts `ca` and, for mutual TLS, shows `identity`.
pub fn client_config(ca: &Path, identity: Option<&Identity>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots
            .add(cert.expect("a CA certificate"))
            .expect("a usable CA");
    }
    // ring, as the server uses, with X25519 first, as openssl and browsers
    // offer it (ring's default offers P-384 first).
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .kx_groups
        .sort_by_key(|group| group.name() != rustls::NamedGroup::X25519);
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let chain = vec![CertificateDer::from_pem_file(&identity.cert).expect("the cert")];
            let key = PrivateKeyDer::from_pem_file(&identity.key).expect("the key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("a client identity")
        }
    };
    Arc::new(config)
}

/// What a TLS client saw of one session.
#[derive(Debug)]
pub struct TlsClientSession {
    /// The server's certificate, as DER.
    pub server_cert: Vec<u8>,
    pub prompt: Vec<u8>,
    /// How reading after the reply ended: `Ok` with what came before a
    /// `close_notify` and the end of stream (a clean close), or the error
    /// (an end of stream without `close_notify`, a reset).
    pub end: io::Result<Vec<u8>>,
}

impl TlsClientSession {
    /// Whether the session ended in `close_notify` with nothing more sent.
    pub fn closed_cleanly(&self) -> bool {
        matches!(&self.end, Ok(rest) if rest.is_empty())
    }
}

/// A session over `socket` (which has its timeouts): the handshake, the
/// prompt line, `reply`, then reading to the end. An error is one that
/// came before the reply was sent.
pub fn tls_session(
    socket: TcpStream,
    config: &Arc<ClientConfig>,
    reply: &[u8],
) -> io::Result<TlsClientSession> {
    let name = ServerName::try_from(SERVER_NAME).expect("a server name");
    let conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, socket);
    let mut prompt = Vec::new();
    let mut byte = [0u8; 1];
    while !prompt.ends_with(b"\n") {
        match stream.read(&mut byte)? {
            0 => break,
            _ => prompt.push(byte[0]),
        }
    }
    let server_cert = (stream.conn.peer_certificates())
        .and_then(|chain| chain.first())
        .map_or_else(Vec::new, |cert| cert.to_vec());
    stream.write_all(reply)?;
    let mut rest = Vec::new();
    let end = stream.read_to_end(&mut rest).map(|_| rest);
    Ok(TlsClientSession {
        server_cert,
        prompt,
        end,
    })
}
