//! Who may connect: `--allow` and `--deny` address rules, and the
//! `--trusted-proxy` list of balancers allowed to send a PROXY header.
//!
//! Rules are checked against the real client address, which is the one
//! from the PROXY header when that protocol is on. IPv4 clients of a
//! dual-stack (`::`) listener arrive as IPv4-mapped IPv6 addresses
//! (`::ffff:192.0.2.7`); [`canonical`] turns them into the IPv4 addresses
//! they are, once, so that logs, rules and per-address counts all see one
//! form, and a rule written in either form matches them.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A list of networks, such as `10.0.0.0/8`, `::1/128` or a bare address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetList(pub Vec<IpNet>);

impl NetList {
    /// Whether `ip` is in any of the networks. An IPv4 client also matches
    /// a rule written for its IPv4-mapped form (`::ffff:127.0.0.1`,
    /// `::ffff:0:0/96`, `::/0`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let mapped = match ip {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(_) => None,
        };
        self.0
            .iter()
            .any(|net| net.contains(&ip) || mapped.is_some_and(|m| net.contains(&m)))
    }

    /// Whether the list has no networks at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A client address in the one form the server uses everywhere: an
/// IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]:50312`, how a dual-stack
/// listener sees IPv4 clients) becomes the IPv4 address it is
/// (`127.0.0.1:50312`).
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `--allow` and `--deny`: a client is refused if any deny rule matches
/// it, or if allow rules exist and none matches it (deny wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRules {
    /// `--allow`: when not empty, only these clients are served.
    pub allow: NetList,
    /// `--deny`: these clients are refused, whatever `allow` says.
    pub deny: NetList,
}

impl AccessRules {
    /// Whether a client at `ip` may be served.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> NetList {
        let net = |text: &&str| {
            text.parse::<IpNet>()
                .unwrap_or_else(|_| IpNet::from(text.parse::<IpAddr>().unwrap()))
        };
        NetList(list.iter().map(net).collect())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn no_rules_permit_everyone() {
        assert!(AccessRules::default().permits(ip("203.0.113.9")));
    }

    #[test]
    fn allow_rules_admit_only_their_networks() {
        let rules = AccessRules {
            allow: nets(&["10.0.0.0/8", "::1"]),
            deny: NetList::default(),
        };
        assert!(rules.permits(ip("10.1.2.3")));
        assert!(rules.permits(ip("::1")));
        assert!(!rules.permits(ip("11.0.0.1")));
        assert!(!rules.permits(ip("::2")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let rules = AccessRules {
            allow: nets(&["10.0.0.0/8"]),
            deny: nets(&["10.9.0.0/16"]),
        };
        assert!(rules.permits(ip("10.1.0.1")));
        assert!(!rules.permits(ip("10.9.0.1")));
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let rules = AccessRules {
            allow: NetList::default(),
            deny: nets(&["127.0.0.0/8"]),
        };
        assert!(!rules.permits(ip("::ffff:127.0.0.1")));
        assert!(rules.permits(ip("::ffff:192.0.2.1")));
    }

    #[test]
    fn rules_in_mapped_form_match_ipv4_clients() {
        for rule in [
            "::ffff:127.0.0.1",
            "::ffff:0:0/96",
            "::ffff:127.0.0.0/104",
            "::/0",
        ] {
            let rules = AccessRules {
                allow: NetList::default(),
                deny: nets(&[rule]),
            };
            assert!(!rules.permits(ip("127.0.0.1")), "{rule}");
            assert!(!rules.permits(ip("::ffff:127.0.0.1")), "{rule}");
        }
        let allow_mapped = AccessRules {
            allow: nets(&["::ffff:127.0.0.1"]),
            deny: NetList::default(),
        };
        assert!(allow_mapped.permits(ip("127.0.0.1")));
        assert!(!allow_mapped.permits(ip("127.0.0.2")));
        assert!(!allow_mapped.permits(ip("::1")));
    }

    #[test]
    fn mapped_client_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:50312".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "127.0.0.1:50312");
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
