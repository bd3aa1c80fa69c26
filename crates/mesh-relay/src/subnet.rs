//! Networks: the unit in which the relay bounds what one operator can hold of a node (its
//! inbound connections, its dials, its known-peer table). One network is an IPv4 /24 or an
//! IPv6 /48, the blocks one operator most often gets in one piece.

use std::fmt;
use std::net::IpAddr;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// The /24 of an IPv4 address, the /48 of an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subnet {
    /// The first three octets.
    V4([u8; 3]),
    /// The first three segments.
    V6([u16; 3]),
}

/// The network of `ip` (an IPv4-mapped IPv6 address counts as its IPv4 address).
pub fn subnet(ip: IpAddr) -> Subnet {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            Subnet::V4([o[0], o[1], o[2]])
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => subnet(IpAddr::V4(v4)),
            None => {
                let s = a.segments();
                Subnet::V6([s[0], s[1], s[2]])
            }
        },
    }
}

/// The IP an address starts with, if it starts with one (not DNS names, not the memory
/// transport).
pub fn first_ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// The network of an address; loopback addresses only when `loopback` (a lab on one host
/// shares one loopback network, so the bounds leave it alone unless a test asks).
pub fn of_addr(addr: &Multiaddr, loopback: bool) -> Option<Subnet> {
    let ip = first_ip(addr)?;
    (loopback || !ip.is_loopback()).then(|| subnet(ip))
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4([a, b, c]) => write!(f, "{a}.{b}.{c}.0/24"),
            Self::V6([a, b, c]) => write!(f, "{a:x}:{b:x}:{c:x}::/48"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_a_slash_24_or_a_slash_48() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
        assert_eq!(subnet(ip("203.0.113.9")), subnet(ip("203.0.113.200")));
        assert_ne!(subnet(ip("203.0.113.9")), subnet(ip("203.0.114.9")));
        assert_eq!(subnet(ip("2001:db8:1:2::1")), subnet(ip("2001:db8:1:ffff::9")));
        assert_ne!(subnet(ip("2001:db8:1::1")), subnet(ip("2001:db8:2::1")));
        assert_eq!(subnet(ip("::ffff:192.0.2.1")), subnet(ip("192.0.2.77")));
        assert_eq!(subnet(ip("203.0.113.9")).to_string(), "203.0.113.0/24");
        assert_eq!(subnet(ip("2001:db8:1::1")).to_string(), "2001:db8:1::/48");
        let addr = |s: &str| -> Multiaddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
        assert_eq!(of_addr(&addr("/ip4/127.0.0.1/tcp/1"), false), None);
        assert!(of_addr(&addr("/ip4/127.0.0.1/tcp/1"), true).is_some());
        assert_eq!(of_addr(&addr("/dns4/example.com/tcp/1"), true), None);
        assert_eq!(of_addr(&addr("/memory/5"), true), None);
    }
}
