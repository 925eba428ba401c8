//! The PROXY protocol (HAProxy's `send-proxy` and `send-proxy-v2`): the header
//! a balancer puts in front of a connection to name the real client, whose
//! address the reply is logged with. [`parse`] is a pure function over the
//! bytes received so far, so that it can be tested on any input (the
//! connection reads until the header is complete); it follows the receiver
//! rules of haproxy's doc/proxy-protocol.txt: act on nothing before the whole
//! header is in, and reject the connection on any mismatch.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// The longest version 1 header, CRLF included.
const V1_MAX_LEN: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family, and the 2-byte length.
const V2_FIXED_LEN: usize = 16;

/// What a valid header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxyHeader {
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No client address is given (v1 `UNKNOWN`, v2 `LOCAL` such as a health
    /// check, or a family without IP addresses): use the real endpoints.
    Local,
}

/// How far [`parse`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A whole header, `length` bytes long.
    Complete { header: ProxyHeader, length: usize },
    /// Valid so far; more bytes are needed.
    Incomplete,
    /// No more bytes can make it a valid header.
    Invalid(&'static str),
}

/// Parses the start of a connection's bytes as a PROXY header (v1 or v2).
pub(crate) fn parse(bytes: &[u8]) -> Parsed {
    if bytes.starts_with(V2_SIGNATURE) {
        parse_v2(bytes)
    } else if bytes.starts_with(V1_PREFIX) {
        parse_v1(bytes)
    } else if V2_SIGNATURE.starts_with(bytes) || V1_PREFIX.starts_with(bytes) {
        Parsed::Incomplete
    } else {
        Parsed::Invalid("no PROXY protocol header")
    }
}

fn parse_v1(bytes: &[u8]) -> Parsed {
    let window = &bytes[..bytes.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if window.len() == V1_MAX_LEN {
            return Parsed::Invalid("v1 header longer than 107 bytes");
        }
        if window.contains(&b'\r') && !window.ends_with(b"\r") {
            return Parsed::Invalid("v1 header has a CR not followed by LF");
        }
        return Parsed::Incomplete;
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Parsed::Invalid("v1 header ends in LF without CR");
    }
    let line = &window[V1_PREFIX.len()..lf - 1];
    if line.contains(&b'\r') {
        return Parsed::Invalid("v1 header has a CR not followed by LF");
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return Parsed::Invalid("v1 header is not text");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["UNKNOWN", ..] => Some(ProxyHeader::Local),
        ["TCP4", src, dst, sport, dport] => v1_addresses::<Ipv4Addr>(src, dst, sport, dport),
        ["TCP6", src, dst, sport, dport] => v1_addresses::<Ipv6Addr>(src, dst, sport, dport),
        _ => None,
    };
    let length = lf + 1;
    match header {
        Some(header) => Parsed::Complete { header, length },
        None => Parsed::Invalid("malformed v1 header"),
    }
}

fn v1_addresses<A>(src: &str, dst: &str, sport: &str, dport: &str) -> Option<ProxyHeader>
where
    A: FromStr + Into<IpAddr>,
{
    let source = SocketAddr::new(src.parse::<A>().ok()?.into(), v1_port(sport)?);
    let destination = SocketAddr::new(dst.parse::<A>().ok()?.into(), v1_port(dport)?);
    Some(ProxyHeader::Proxied {
        source,
        destination,
    })
}

/// A port in decimal, without sign or leading zeros.
fn v1_port(text: &str) -> Option<u16> {
    let digits = text.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = text.len() > 1 && text.starts_with('0');
    text.parse().ok().filter(|_| digits && !leading_zero)
}

fn parse_v2(bytes: &[u8]) -> Parsed {
    if bytes.len() < V2_FIXED_LEN {
        return Parsed::Incomplete;
    }
    let (version_command, family) = (bytes[12], bytes[13]);
    let length = V2_FIXED_LEN + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if version_command >> 4 != 2 {
        return Parsed::Invalid("v2 header with an unknown version");
    }
    let local = match version_command & 0x0F {
        0 => true,
        1 => false,
        _ => return Parsed::Invalid("v2 header with an unknown command"),
    };
    if bytes.len() < length {
        return Parsed::Incomplete;
    }
    let body = &bytes[V2_FIXED_LEN..length];
    let header = match family {
        _ if local => ProxyHeader::Local,
        // TCP over IPv4: 4 + 4 address bytes, 2 + 2 port bytes.
        0x11 if body.len() >= 12 => v2_addresses::<4>(body),
        // TCP over IPv6: 16 + 16 address bytes, 2 + 2 port bytes.
        0x21 if body.len() >= 36 => v2_addresses::<16>(body),
        0x11 | 0x21 => return Parsed::Invalid("v2 header too short for its addresses"),
        // UNSPEC, UNIX sockets, UDP: no TCP client address to report.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => ProxyHeader::Local,
        _ => return Parsed::Invalid("v2 header with an unknown address family"),
    };
    Parsed::Complete { header, length }
}

/// Source and destination from a v2 address block of `N`-byte addresses
/// (4 or 16), which the caller has checked is long enough.
fn v2_addresses<const N: usize>(body: &[u8]) -> ProxyHeader
where
    IpAddr: From<[u8; N]>,
{
    let ip = |at: usize| IpAddr::from(<[u8; N]>::try_from(&body[at..at + N]).unwrap_or([0; N]));
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    ProxyHeader::Proxied {
        source: SocketAddr::new(ip(0), port(2 * N)),
        destination: SocketAddr::new(ip(N), port(2 * N + 2)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn complete(bytes: &[u8]) -> (ProxyHeader, usize) {
        match parse(bytes) {
            Parsed::Complete { header, length } => (header, length),
            other => panic!("{other:?} for {bytes:?}"),
        }
    }

    fn invalid(bytes: &[u8]) {
        assert!(
            matches!(parse(bytes), Parsed::Invalid(_)),
            "{:?} for {bytes:?}",
            parse(bytes)
        );
    }

    fn proxied(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1337\r\nyes\n";
        assert_eq!(
            complete(line),
            (proxied("192.0.2.7:56324", "198.51.100.1:1337"), 46)
        );
        let line = b"PROXY TCP6 2001:db8::7 ::1 56324 1337\r\n";
        assert_eq!(
            complete(line),
            (proxied("[2001:db8::7]:56324", "[::1]:1337"), line.len())
        );
    }

    #[test]
    fn v1_unknown_uses_the_real_endpoints() {
        assert_eq!(complete(b"PROXY UNKNOWN\r\n").0, ProxyHeader::Local);
        assert_eq!(
            complete(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n").0,
            ProxyHeader::Local
        );
    }

    #[test]
    fn v1_incomplete_until_crlf() {
        for prefix in [
            &b"P"[..],
            b"PROXY",
            b"PROXY TCP4 1.2.3.4",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
        ] {
            assert_eq!(parse(prefix), Parsed::Incomplete, "{prefix:?}");
        }
    }

    #[test]
    fn v1_garbage_is_invalid() {
        invalid(b"GET / HTTP/1.1\r\n");
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"); // LF without CR
        invalid(b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n"); // lone CR
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"); // leading zero
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n");
        invalid(b"PROXY TCP4 ::1 ::1 1 2\r\n"); // family mismatch
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n");
        invalid(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n");
        invalid(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n");
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'x');
        invalid(&long);
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.push(0x20 | command);
        bytes.push(family);
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn v2_tcp4_tcp6_with_tlvs_consumed() {
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&1337u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x02, 0xAB, 0xCD]); // a TLV
        let mut bytes = v2(1, 0x11, &body);
        let header_len = bytes.len();
        bytes.extend_from_slice(b"yes\n");
        assert_eq!(
            complete(&bytes),
            (proxied("192.0.2.7:56324", "198.51.100.1:1337"), header_len)
        );

        let mut body = Ipv6Addr::LOCALHOST.octets().to_vec();
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&[0x12, 0x34, 0x05, 0x39]);
        let (header, _) = complete(&v2(1, 0x21, &body));
        assert_eq!(header, proxied("[::1]:4660", "[2001:db8::1]:1337"));
    }

    #[test]
    fn v2_local_and_unspec_use_the_real_endpoints() {
        assert_eq!(complete(&v2(0, 0x11, &[0; 12])).0, ProxyHeader::Local);
        assert_eq!(complete(&v2(0, 0x00, &[])).0, ProxyHeader::Local);
        assert_eq!(complete(&v2(1, 0x00, &[])).0, ProxyHeader::Local);
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).0, ProxyHeader::Local);
    }

    #[test]
    fn v2_truncated_is_incomplete_and_bad_fields_invalid() {
        let whole = v2(1, 0x11, &[1; 12]);
        for cut in 1..whole.len() {
            assert_eq!(parse(&whole[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        invalid(&v2(2, 0x11, &[1; 12])); // command 2
        let mut version3 = v2(1, 0x11, &[1; 12]);
        version3[12] = 0x31;
        invalid(&version3);
        invalid(&v2(1, 0x11, &[1; 4])); // too short for IPv4 addresses
        invalid(&v2(1, 0x21, &[1; 12])); // too short for IPv6 addresses
        invalid(&v2(1, 0x55, &[]));
    }

    proptest! {
        /// Any bytes at all: no panic, and a complete header never claims
        /// more bytes than there are.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Parsed::Complete { length, .. } = parse(&bytes) {
                prop_assert!(length <= bytes.len());
            }
        }

        /// Random bytes after a valid signature or prefix: still no panic.
        #[test]
        fn arbitrary_bytes_after_a_signature_never_panic(
            v2_header in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = if v2_header { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            bytes.extend_from_slice(&tail);
            if let Parsed::Complete { length, .. } = parse(&bytes) {
                prop_assert!(length <= bytes.len());
            }
        }

        /// Whatever the split, a header is only complete once all of it is in.
        #[test]
        fn prefixes_of_a_valid_header_are_incomplete(port in 1u16.., cut in 0usize..200) {
            let line = format!("PROXY TCP4 10.0.0.1 10.0.0.2 {port} 1337\r\n");
            let cut = cut % line.len();
            prop_assert_eq!(parse(&line.as_bytes()[..cut]), Parsed::Incomplete);
        }
    }
}
