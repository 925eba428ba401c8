//! The sockets a server listens on: bound here ([`bind`], with the kernel's
//! largest backlog) or passed down by a service manager (sd_listen_fds(3),
//! through `sd-notify`), and the options every accepted socket inherits from
//! them. An inherited descriptor that is not a listening TCP socket (a unit's
//! mistake) stops the start-up with a clear line. The variables stay in the
//! environment (`env::remove_var` is `unsafe` in this edition; no child starts).

use std::env;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use log::info;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::config::Config;
use crate::error::Error;
use crate::logging::{LISTENING_TARGET, event};
use crate::shutdown::Shutdown;

/// The descriptors this process claimed, with their `LISTEN_FDNAMES`: set once
/// (a second claim would make two owners of one), read so that a stop never
/// shuts down an inherited listener.
static INHERITED: OnceLock<Vec<(RawFd, Option<String>)>> = OnceLock::new();

/// The listening sockets the service manager passed to this process, in
/// descriptor order (3, 4, ...), or `None` when there are none for us.
fn inherited_listeners() -> Result<Option<Vec<TcpListener>>, Error> {
    // Another process's variables (a parent's) are ignored, names and all.
    let ours = env::var("LISTEN_PID").is_ok_and(|pid| pid == std::process::id().to_string());
    if !ours {
        return Ok(None);
    }
    let cannot = "cannot use the inherited sockets (LISTEN_FDS)";
    let descriptors = sd_notify::listen_fds_with_names()
        .map_err(|e| closed_descriptor().unwrap_or_else(|| Error::new(cannot, e)))?;
    if descriptors.len() == 0 {
        return Ok(None);
    }
    // The crate says "unknown" when the variable is missing: no name.
    let named = env::var_os("LISTEN_FDNAMES").is_some();
    let descriptors = descriptors.map(|(fd, name)| (fd, named.then_some(name)));
    if INHERITED.set(descriptors.collect()).is_err() {
        let taken = io::Error::other("this process took them already");
        return Err(Error::new(cannot, taken));
    }
    let fds = INHERITED.get().into_iter().flatten().map(|(fd, _)| *fd);
    fds.map(claim_listener).collect::<Result<_, _>>().map(Some)
}

/// The error naming the first descriptor `LISTEN_FDS` names that is not open.
fn closed_descriptor() -> Option<Error> {
    let count: RawFd = env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let is_closed = |fd| std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err();
    let fd = (3..3 + count).find(|&fd| is_closed(fd))?;
    let what = format!("inherited descriptor {fd} (LISTEN_FDS) cannot be used");
    let closed = io::Error::new(io::ErrorKind::NotFound, "it is not open");
    Some(Error::new(what, closed))
}

/// Takes inherited descriptor `fd` as a listener, if it is one (else it is
/// left open: the process is about to exit with the error).
fn claim_listener(fd: RawFd) -> Result<TcpListener, Error> {
    let owned = claim_descriptor(fd);
    match check_tcp_listener(&owned) {
        Ok(()) => Ok(TcpListener::from(owned)),
        Err(problem) => {
            let _ = owned.into_raw_fd();
            Err(not_a_listener(fd, problem))
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
    // or of our dependencies takes descriptors by number, `INHERITED` (set
    // only once) makes sure `inherited_listeners` claims the range only
    // once, and `listeners`, its caller, is documented to run before
    // anything else opens descriptors (so none of them can have landed in
    // the range).
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn not_a_listener(fd: RawFd, problem: io::Error) -> Error {
    let what = format!("inherited descriptor {fd} is not a listening TCP socket");
    Error::new(what, problem)
}

/// Checks that `socket` is a listening TCP socket; what it is instead is an
/// `InvalidInput` error ("it is a Unix stream socket").
fn check_tcp_listener(socket: &OwnedFd) -> io::Result<()> {
    let socket = SockRef::from(socket);
    let (domain, kind) = (socket.domain()?, socket.r#type()?);
    let family = match domain {
        Domain::IPV4 => "an IPv4",
        Domain::IPV6 => "an IPv6",
        Domain::UNIX => "a Unix",
        _ => "another family's",
    };
    let tcp = family.contains("IP")
        && kind == Type::STREAM
        && socket.protocol()?.is_none_or(|p| p == Protocol::TCP);
    let what = match kind {
        _ if tcp && socket.is_listener()? => return Ok(()),
        _ if tcp => "TCP socket that is not listening (a connection?)",
        Type::STREAM => "stream socket",
        Type::DGRAM => "datagram socket",
        Type::SEQPACKET => "seqpacket socket",
        _ => "raw socket",
    };
    let found = format!("it is {family} {what}");
    Err(io::Error::new(io::ErrorKind::InvalidInput, found))
}

/// Binds the listening socket for `config.listen_addr`, with
/// `config.backlog` (or the kernel's maximum) as its backlog.
///
/// # Errors
///
/// Fails if the socket cannot be bound or listen, for example with
/// [`AddrInUse`](std::io::ErrorKind::AddrInUse); the message names the address.
pub fn bind(config: &Config) -> Result<TcpListener, Error> {
    let addr = config.listen_addr;
    let backlog = config.backlog.map_or_else(default_backlog, |n| n.get());
    listen(addr, backlog, config.reuse_port)
        .map_err(|e| Error::new(format!("cannot listen on {addr}"), e))
}

/// The sockets to serve: the ones a service manager passed down (`LISTEN_PID`
/// is this process and `LISTEN_FDS` is set; [`run`](crate::run) logs each with
/// its name), else one bound by [`bind`] from `config.listen_addr`.
///
/// Call it first thing, before anything else in the process opens descriptors
/// (logging set-up included): one opened before could land on a number
/// `LISTEN_FDS` names.
///
/// # Errors
///
/// Fails if an inherited descriptor is not a listening TCP socket, or as
/// [`bind`] does.
pub fn listeners(config: &Config) -> Result<Vec<TcpListener>, Error> {
    match inherited_listeners()? {
        Some(inherited) => Ok(inherited),
        None => Ok(vec![bind(config)?]),
    }
}

/// `TcpListener::bind` (`SO_REUSEADDR`, bind, listen) with a backlog of our
/// choosing instead of std's 128, and `SO_REUSEPORT` if asked for.
pub(crate) fn listen(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// The most the kernel accepts (`net.core.somaxconn`), as Go does, so that a
/// burst waits in the queue instead of having its handshakes dropped; else
/// 4096 (Linux's default since 5.4).
pub(crate) fn default_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
}

/// Logs `listening on` for each listener, gives it the options accepted
/// sockets inherit, and registers how a stop wakes its accept loop.
pub(crate) fn prepare_listeners(
    listeners: impl IntoIterator<Item = TcpListener>,
    config: &Config,
    shutdown: &Shutdown,
) -> Result<Vec<(Arc<TcpListener>, SocketAddr)>, Error> {
    let unreadable = |e| Error::new("cannot read the address the listener is bound to", e);
    let mut prepared = Vec::new();
    for listener in listeners {
        let local_addr = listener.local_addr().map_err(unreadable)?;
        let fd = listener.as_raw_fd();
        let inherited = INHERITED.get().into_iter().flatten().find(|i| i.0 == fd);
        if let Some((_, name)) = inherited {
            let named = name.as_ref().map(|name| format!(" (named {name:?})"));
            info!(
                event = event::INHERITED, addr:% = local_addr, name = name.as_deref();
                "serving the socket passed down by the service manager on {local_addr}{}",
                named.unwrap_or_default()
            );
        }
        info!(
            target: LISTENING_TARGET, event = event::LISTENING, addr:% = local_addr;
            "listening on {local_addr}"
        );
        set_connection_options(SockRef::from(&listener), config)
            .map_err(|e| Error::new("cannot set options on the listening socket", e))?;
        let listener = Arc::new(listener);
        shutdown.add_accept_loop(&listener, local_addr, inherited.is_some());
        prepared.push((listener, local_addr));
    }
    Ok(prepared)
}

/// Sets, on the listening socket, what every accepted socket inherits
/// (Linux copies them, saving each connection its own `setsockopt`): the
/// prompt's write timeout, the reply budget as the read timeout (an idle
/// `accept` returns `WouldBlock` once per reply timeout), and a zero linger
/// time: a close resets the connection until `connection::close` restores
/// the normal close once the reply is recorded, so if the process dies
/// first, the client knows its reply was not kept.
pub(crate) fn set_connection_options(socket: SockRef<'_>, config: &Config) -> io::Result<()> {
    socket.set_read_timeout(config.reply_timeout)?;
    socket.set_write_timeout(Some(config.write_timeout))?;
    socket.set_linger(Some(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpStream, UdpSocket};
    use std::os::unix::net::{UnixDatagram, UnixListener};

    fn owned(socket: impl Into<OwnedFd>) -> OwnedFd {
        socket.into()
    }

    fn found(result: io::Result<()>) -> String {
        match result {
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => e.to_string(),
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
            "it is an IPv4 TCP socket that is not listening (a connection?)"
        );
    }

    #[test]
    fn a_udp_socket_is_named_as_such() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            found(check_tcp_listener(&owned(udp))),
            "it is an IPv4 datagram socket"
        );
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
            "it is a Unix stream socket"
        );
        let (datagram, _) = UnixDatagram::pair().unwrap();
        assert_eq!(
            found(check_tcp_listener(&owned(datagram))),
            "it is a Unix datagram socket"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_is_unreadable_as_a_socket() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let e = check_tcp_listener(&owned(file)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK), "{e}");
    }

    #[test]
    fn errors_are_one_line_naming_the_descriptor() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let wrong = not_a_listener(3, check_tcp_listener(&owned(udp)).unwrap_err());
        assert_eq!(
            wrong.to_string(),
            "inherited descriptor 3 is not a listening TCP socket: it is an IPv4 datagram socket"
        );
        let unreadable = not_a_listener(4, io::Error::from_raw_os_error(libc::ENOTSOCK));
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

    #[test]
    fn accepted_sockets_inherit_the_listeners_options() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let config = Config {
            reply_timeout: Some(Duration::from_secs(7)),
            ..Config::default()
        };
        set_connection_options(SockRef::from(&listener), &config).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.read_timeout().unwrap(), config.reply_timeout);
        assert_eq!(
            accepted.write_timeout().unwrap(),
            Some(config.write_timeout)
        );
        assert_eq!(
            SockRef::from(&accepted).linger().unwrap(),
            Some(Duration::ZERO)
        );
    }
}
