//! Socket activation: the listening sockets a service manager (systemd, or
//! `systemd-socket-activate`) opened for this process and passed down, so
//! that the server serves on them instead of binding its own.
//!
//! The convention is sd_listen_fds(3): when `LISTEN_PID` is this process's
//! id, `LISTEN_FDS` descriptors starting at 3 are ours, and
//! `LISTEN_FDNAMES` (optional, colon-separated) names them. The `sd-notify`
//! crate reads those variables and marks the descriptors close-on-exec;
//! this module turns each descriptor into a [`TcpListener`] after checking
//! that it really is a listening TCP socket, because a unit file that hands
//! us a UDP or Unix socket by mistake must stop the start-up with a clear
//! line, not turn into an accept loop failing forever.
//!
//! Why the inherited sockets are owned here, once: taking a raw descriptor
//! as a socket is the one `unsafe` operation of the crate
//! ([`claim_descriptor`]), and it is sound only if nothing else in the
//! process owns that descriptor. [`inherited_listeners`] therefore claims
//! them at most once per process, and should be called first thing in
//! `main`, before anything else opens descriptors.
//!
//! The variables are left in the environment: unsetting them
//! (`sd_listen_fds(unset = true)`) exists so that child processes do not
//! mistake them for their own, but this server starts no child processes,
//! a child could not match `LISTEN_PID` anyway, and the descriptors are
//! close-on-exec. `std::env::remove_var` is `unsafe` in this edition
//! because another thread may read the environment at the same time, which
//! is not worth a second exception for nothing gained.
//!
//! Inherited sockets must never be `shutdown()` on stop: the service
//! manager keeps its own copy to serve the next process with, and a
//! `shutdown` would act on that shared socket. Dropping the listener only
//! closes our descriptor, which is what a stop should do.

use std::env;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, SockRef, Type};

use crate::error::Error;

/// The variable that names the inherited descriptors; without it every
/// descriptor is unnamed.
const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// Whether this process has claimed its inherited descriptors already: a
/// second claim would make two owners of one descriptor.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// The descriptors claimed, so that a stop can tell an inherited listener
/// (never to be shut down) from one of the process's own.
static INHERITED: OnceLock<Vec<RawFd>> = OnceLock::new();

/// Whether `listener` is one the service manager passed down.
pub(crate) fn is_inherited(listener: &TcpListener) -> bool {
    INHERITED
        .get()
        .is_some_and(|fds| fds.contains(&listener.as_raw_fd()))
}

/// A listening socket passed down by the service manager.
#[derive(Debug)]
pub(crate) struct InheritedListener {
    pub(crate) listener: TcpListener,
    /// The descriptor's name from `LISTEN_FDNAMES` (`FileDescriptorName=`
    /// in a socket unit, `--fdname` of `systemd-socket-activate`), if the
    /// manager gave names.
    pub(crate) name: Option<String>,
}

/// The listening sockets the service manager passed to this process, in
/// descriptor order (3, 4, ...), or `None` when there are none for us
/// (`LISTEN_PID` unset or another process's id, or `LISTEN_FDS` unset or 0).
///
/// Every descriptor must be a listening TCP socket (stream, IPv4 or IPv6);
/// the first one that is not is an error naming it, and no listener is
/// returned. The descriptors are claimed at most once per process: call
/// this first thing in `main`, before anything else opens descriptors.
pub(crate) fn inherited_listeners() -> Result<Option<Vec<InheritedListener>>, Error> {
    let descriptors = sd_notify::listen_fds_with_names()
        .map_err(|e| Error::new("cannot use the inherited sockets (LISTEN_FDS)", e))?;
    if descriptors.len() == 0 {
        return Ok(None);
    }
    if CLAIMED.swap(true, Ordering::SeqCst) {
        return Err(Error::new(
            "cannot use the inherited sockets (LISTEN_FDS)",
            io::Error::other("this process took them already"),
        ));
    }
    // The crate names every descriptor "unknown" when the variable is
    // missing; a name nobody gave is no name.
    let named = env::var_os(LISTEN_FDNAMES).is_some();
    let descriptors: Vec<(RawFd, String)> = descriptors.collect();
    let _ = INHERITED.set(descriptors.iter().map(|(fd, _)| *fd).collect());
    let mut listeners = Vec::with_capacity(descriptors.len());
    for (fd, name) in descriptors {
        let listener = claim_listener(fd)?;
        listeners.push(InheritedListener {
            listener,
            name: named.then_some(name),
        });
    }
    Ok(Some(listeners))
}

/// Takes ownership of inherited descriptor `fd` as a listener, if it is
/// one. One that is not is left open (not ours to close: the process is
/// about to exit with the error anyway).
fn claim_listener(fd: RawFd) -> Result<TcpListener, Error> {
    let owned = claim_descriptor(fd);
    match check_tcp_listener(&owned) {
        Ok(()) => Ok(TcpListener::from(owned)),
        Err(problem) => {
            let _ = owned.into_raw_fd();
            Err(problem.for_descriptor(fd))
        }
    }
}

/// The crate's one `unsafe` operation: a descriptor number passed down by
/// the service manager, taken as an owned descriptor.
#[allow(unsafe_code)]
fn claim_descriptor(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` is one of the descriptors `sd_notify::listen_fds` just
    // returned: LISTEN_PID names this process, so the manager opened the
    // range 3..3+LISTEN_FDS for us, and the crate has already set
    // close-on-exec on each of them, which fails on a closed descriptor, so
    // `fd` is open. Nothing else in this process owns it: no code of ours
    // or of our dependencies takes descriptors by number, `CLAIMED` makes
    // sure `inherited_listeners` claims the range only once, and
    // `inherited_listeners` is documented to run before anything else
    // opens descriptors (so none of them can have landed in the range).
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What is wrong with a descriptor that should be a listening TCP socket.
#[derive(Debug)]
enum Problem {
    Unreadable(io::Error),
    Found(String),
}

impl Problem {
    fn for_descriptor(self, fd: RawFd) -> Error {
        let source = match self {
            Problem::Unreadable(source) => source,
            Problem::Found(found) => {
                io::Error::new(io::ErrorKind::InvalidInput, format!("it is {found}"))
            }
        };
        Error::new(
            format!("inherited descriptor {fd} is not a listening TCP socket"),
            source,
        )
    }
}

/// Checks, with `getsockopt`, that `socket` is a listening TCP socket:
/// `SO_DOMAIN` IPv4 or IPv6, `SO_TYPE` stream, `SO_PROTOCOL` TCP, and
/// `SO_ACCEPTCONN` set.
fn check_tcp_listener(socket: &OwnedFd) -> Result<(), Problem> {
    let socket = SockRef::from(socket);
    let domain = socket.domain().map_err(Problem::Unreadable)?;
    let kind = socket.r#type().map_err(Problem::Unreadable)?;
    let protocol = socket.protocol().map_err(Problem::Unreadable)?;
    let family = match domain {
        Domain::IPV4 => "an IPv4",
        Domain::IPV6 => "an IPv6",
        Domain::UNIX => return Err(Problem::Found(format!("a Unix {}", kind_name(kind)))),
        _ => {
            return Err(Problem::Found(format!(
                "a {} of another family",
                kind_name(kind)
            )));
        }
    };
    if kind != Type::STREAM || protocol.is_some_and(|p| p != Protocol::TCP) {
        let kind = match (kind, protocol) {
            (Type::DGRAM, Some(Protocol::UDP)) => "UDP socket".to_string(),
            (kind, _) => kind_name(kind),
        };
        return Err(Problem::Found(format!("{family} {kind}")));
    }
    if !socket.is_listener().map_err(Problem::Unreadable)? {
        return Err(Problem::Found(format!(
            "{family} TCP socket that is not listening (a connection?)"
        )));
    }
    Ok(())
}

/// "stream socket", "datagram socket", ...
fn kind_name(kind: Type) -> String {
    match kind {
        Type::STREAM => "stream socket".to_string(),
        Type::DGRAM => "datagram socket".to_string(),
        Type::SEQPACKET => "seqpacket socket".to_string(),
        Type::RAW => "raw socket".to_string(),
        other => format!("socket of type {}", i32::from(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpStream, UdpSocket};
    use std::os::unix::net::{UnixDatagram, UnixListener};

    fn owned(socket: impl Into<OwnedFd>) -> OwnedFd {
        socket.into()
    }

    fn found(result: Result<(), Problem>) -> String {
        match result {
            Err(Problem::Found(found)) => found,
            other => panic!("expected a wrong kind of socket, got {other:?}"),
        }
    }

    #[test]
    fn a_listening_tcp_socket_passes_on_ipv4_and_ipv6() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(check_tcp_listener(&owned(v4)).is_ok());
        // Loopback IPv6 may be missing in a container; test it where it is.
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            assert!(check_tcp_listener(&owned(v6)).is_ok());
        }
    }

    #[test]
    fn a_connected_tcp_socket_is_not_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let found = found(check_tcp_listener(&owned(client)));
        assert_eq!(
            found,
            "an IPv4 TCP socket that is not listening (a connection?)"
        );
    }

    #[test]
    fn a_udp_socket_is_named_as_such() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(found(check_tcp_listener(&owned(udp))), "an IPv4 UDP socket");
    }

    #[test]
    fn unix_sockets_are_refused() {
        let dir = env::temp_dir().join(format!("prompt-server-activation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stream.sock");
        let _ = std::fs::remove_file(&path);
        let stream = UnixListener::bind(&path).unwrap();
        assert_eq!(
            found(check_tcp_listener(&owned(stream))),
            "a Unix stream socket"
        );
        let (datagram, _) = UnixDatagram::pair().unwrap();
        assert_eq!(
            found(check_tcp_listener(&owned(datagram))),
            "a Unix datagram socket"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_is_unreadable_as_a_socket() {
        let file = std::fs::File::open("/dev/null").unwrap();
        match check_tcp_listener(&owned(file)) {
            Err(Problem::Unreadable(e)) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK), "{e}")
            }
            other => panic!("expected ENOTSOCK, got {other:?}"),
        }
    }

    #[test]
    fn errors_are_one_line_naming_the_descriptor() {
        let wrong = Problem::Found("an IPv4 UDP socket".into()).for_descriptor(3);
        assert_eq!(
            wrong.to_string(),
            "inherited descriptor 3 is not a listening TCP socket: it is an IPv4 UDP socket"
        );
        let unreadable =
            Problem::Unreadable(io::Error::from_raw_os_error(libc::ENOTSOCK)).for_descriptor(4);
        let line = unreadable.to_string();
        assert!(line.starts_with("inherited descriptor 4 is not a listening TCP socket: "));
        assert!(!line.contains('\n'), "{line}");
    }

    /// The test process was started by cargo, not by a service manager:
    /// nothing is inherited, however often it asks.
    #[test]
    fn without_listen_pid_for_us_nothing_is_inherited() {
        if env::var_os("LISTEN_PID").is_some() {
            return; // the harness itself was socket-activated: not this case
        }
        assert!(inherited_listeners().unwrap().is_none());
        assert!(inherited_listeners().unwrap().is_none());
    }
}
