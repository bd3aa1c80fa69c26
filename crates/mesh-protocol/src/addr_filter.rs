//! Which peer addresses a node may dial and pass on: the one filter that every address learned
//! from the network goes through (mDNS, identify, peer exchange, whatever a bootstrap peer told
//! us), so that no peer can make nodes connect to their own Redis or PostgreSQL ports, a cloud
//! metadata service (`169.254.169.254`), other hosts of their private network, or a third
//! party's port on the internet through a private address.
//!
//! It lives here, in tier 0, because both tier-2 crates that learn addresses need it and may not
//! depend on each other: mesh-relay (identify, peer exchange) and mesh-discovery (mDNS, which
//! re-exports it as `mesh_discovery::AddrFilter`). It is pure: no I/O, no clock.
//!
//! Addresses the operator configured (`MESH_BOOTSTRAP_PEERS`, `Relay::dial`) are not filtered:
//! they are the operator's word, not a peer's.
//!
//! ```
//! use mesh_protocol::addr_filter::AddrFilter;
//!
//! let public = AddrFilter::default();
//! assert!(public.allows(&"/ip4/203.0.114.7/tcp/4001".parse()?));
//! assert!(!public.allows(&"/ip4/169.254.169.254/tcp/80".parse()?));
//! assert!(!public.allows(&"/ip4/127.0.0.1/tcp/6379".parse()?));
//! // A lab on one host or in network namespaces (MESH_ALLOW_PRIVATE_ADDRS=true).
//! assert!(AddrFilter::lab().allows(&"/ip4/127.0.0.1/tcp/4001".parse()?));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use multiaddr::{Multiaddr, Protocol};

/// What kind of place an address points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrClass {
    /// A global unicast IP: reachable across the internet.
    Public,
    /// A private network (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7): this site only.
    Private,
    /// This host (127/8, ::1).
    Loopback,
    /// Link-local (169.254/16, where clouds answer metadata requests; fe80::/10, which a
    /// multiaddr cannot carry the zone of).
    LinkLocal,
    /// Nobody can dial it as a peer: unspecified, multicast, broadcast, documentation,
    /// benchmarking and reserved ranges.
    Unroutable,
    /// A DNS name: it can resolve to any address, this one included, and the relay has no DNS
    /// transport.
    Name,
    /// libp2p's in-process memory transport (tests).
    Memory,
    /// Anything else (`/unix`, no address at all, ...).
    Other,
}

/// The class of an address, from its first component.
pub fn classify(addr: &Multiaddr) -> AddrClass {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => classify_ip(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => classify_ip(IpAddr::V6(ip)),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_)) => {
            AddrClass::Name
        }
        Some(Protocol::Memory(_)) => AddrClass::Memory,
        _ => AddrClass::Other,
    }
}

/// The class of an IP.
pub fn classify_ip(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            // ::ffff:a.b.c.d reaches a.b.c.d: judge it as that.
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        AddrClass::Loopback
    } else if ip.is_link_local() {
        AddrClass::LinkLocal
    } else if ip.is_private() || (a == 100 && (b & 0xc0) == 64) {
        // RFC 1918 and the carrier-grade NAT range (RFC 6598).
        AddrClass::Private
    } else if a == 0
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a >= 240
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b & 0xfe) == 18)
    {
        // 0/8, 224/4, 255.255.255.255, the documentation nets, 240/4, IETF 192.0.0/24 and
        // benchmarking 198.18/15.
        AddrClass::Unroutable
    } else {
        AddrClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        AddrClass::Loopback
    } else if (first & 0xffc0) == 0xfe80 {
        AddrClass::LinkLocal
    } else if (first & 0xfe00) == 0xfc00 {
        AddrClass::Private
    } else if ip.is_unspecified()
        || ip.is_multicast()
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        || (first & 0xe000) != 0x2000
    {
        // ::, ff00::/8, documentation 2001:db8::/32, and everything outside the global unicast
        // block 2000::/3 (IPv4-compatible, discard, NAT64 well-known prefixes among them).
        AddrClass::Unroutable
    } else {
        AddrClass::Public
    }
}

/// The policy applied to every address learned from the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrFilter {
    /// Also allow loopback, private networks and the memory transport
    /// (`MESH_ALLOW_PRIVATE_ADDRS=true`): labs that run every node on one host or in network
    /// namespaces, and the test harness. Link-local, unroutable addresses and DNS names stay
    /// refused.
    pub allow_private: bool,
}

impl Default for AddrFilter {
    /// Public addresses only.
    fn default() -> Self {
        Self::PUBLIC
    }
}

impl AddrFilter {
    /// Public addresses only (the default).
    pub const PUBLIC: Self = Self { allow_private: false };

    /// Public, private, loopback and memory-transport addresses: a lab on one host or in
    /// namespaces.
    pub fn lab() -> Self {
        Self { allow_private: true }
    }

    /// Whether an address learned from a peer on the internet (identify, peer exchange) may be
    /// dialed and passed on.
    pub fn allows(&self, addr: &Multiaddr) -> bool {
        self.allows_class(classify(addr), false)
    }

    /// Whether an address learned on the local network (mDNS, which does not cross routers)
    /// may be dialed: as [`AddrFilter::allows`], and private networks too, since a LAN peer
    /// sits in one. Loopback still needs the lab setting.
    pub fn allows_from_lan(&self, addr: &Multiaddr) -> bool {
        self.allows_class(classify(addr), true)
    }

    fn allows_class(&self, class: AddrClass, lan: bool) -> bool {
        match class {
            AddrClass::Public => true,
            AddrClass::Private => self.allow_private || lan,
            AddrClass::Loopback | AddrClass::Memory => self.allow_private,
            AddrClass::LinkLocal | AddrClass::Unroutable | AddrClass::Name | AddrClass::Other => {
                false
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    const REFUSED_BY_DEFAULT: &[&str] = &[
        "/ip4/169.254.169.254/tcp/80",
        "/ip4/10.0.0.5/tcp/6379",
        "/ip4/10.255.255.255/tcp/1",
        "/ip4/192.168.1.1/tcp/80",
        "/ip4/172.16.0.1/tcp/5432",
        "/ip4/172.31.255.254/tcp/5432",
        "/ip4/100.64.0.1/tcp/1",
        "/ip4/127.0.0.1/tcp/6379",
        "/ip4/127.0.0.2/tcp/6379",
        "/ip6/::1/tcp/5432",
        "/ip6/fe80::1/tcp/1",
        "/ip6/fc00::1/tcp/1",
        "/ip6/fd12:3456::1/tcp/1",
        "/ip6/::ffff:127.0.0.1/tcp/6379",
        "/ip6/::ffff:10.0.0.1/tcp/6379",
        "/ip4/0.0.0.0/tcp/4001",
        "/ip6/::/tcp/4001",
        "/ip4/224.0.0.251/udp/5353",
        "/ip4/255.255.255.255/tcp/1",
        "/ip6/ff02::1/tcp/1",
        "/ip4/192.0.2.1/tcp/1",
        "/ip4/240.0.0.1/tcp/1",
        "/dns4/localhost/tcp/6379",
        "/dns/node.example/tcp/4001",
        "/dnsaddr/bootstrap.example",
        "/memory/42",
        "/unix/%2Ftmp%2Fredis.sock",
    ];

    #[test]
    fn the_default_allows_public_addresses_only() {
        let public = AddrFilter::default();
        for addr in REFUSED_BY_DEFAULT {
            assert!(!public.allows(&ma(addr)), "{addr} must be refused");
        }
        for addr in [
            "/ip4/8.8.8.8/tcp/4001",
            "/ip4/203.0.114.7/udp/4001/quic-v1",
            "/ip4/172.32.0.1/tcp/1",
            "/ip4/100.128.0.1/tcp/1",
            "/ip6/2a01:4f8::1/tcp/4001",
            "/ip4/8.8.8.8/tcp/4001/p2p/12D3KooWJ1Y8wHjnrdkt6t2rBU8VfxychLAFUGGU34D7go2BLCCo",
        ] {
            assert!(public.allows(&ma(addr)), "{addr} must be allowed");
        }
    }

    #[test]
    fn the_lab_setting_allows_loopback_private_and_memory_but_never_link_local() {
        let lab = AddrFilter::lab();
        for addr in [
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/127.0.0.2/tcp/4001",
            "/ip6/::1/tcp/4001",
            "/ip4/10.0.0.5/tcp/4001",
            "/ip4/192.168.1.1/tcp/4001",
            "/ip4/172.16.0.1/tcp/4001",
            "/ip6/fd00::1/tcp/4001",
            "/memory/42",
            "/ip4/8.8.8.8/tcp/4001",
        ] {
            assert!(lab.allows(&ma(addr)), "{addr} must be allowed in a lab");
        }
        for addr in [
            "/ip4/169.254.169.254/tcp/80",
            "/ip6/fe80::1/tcp/1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip4/224.0.0.251/udp/5353",
            "/dns4/localhost/tcp/6379",
        ] {
            assert!(!lab.allows(&ma(addr)), "{addr} stays refused in a lab");
        }
    }

    #[test]
    fn the_lan_allows_private_networks_but_not_loopback_or_link_local() {
        let public = AddrFilter::default();
        assert!(public.allows_from_lan(&ma("/ip4/192.168.1.7/tcp/4001")));
        assert!(public.allows_from_lan(&ma("/ip6/fd00::7/tcp/4001")));
        assert!(!public.allows_from_lan(&ma("/ip4/127.0.0.1/tcp/4001")));
        assert!(!public.allows_from_lan(&ma("/ip4/169.254.169.254/tcp/80")));
        assert!(AddrFilter::lab().allows_from_lan(&ma("/ip4/127.0.0.1/tcp/4001")));
    }

    #[test]
    fn classes() {
        assert_eq!(classify(&ma("/ip4/169.254.169.254/tcp/80")), AddrClass::LinkLocal);
        assert_eq!(classify(&ma("/ip4/10.1.2.3/tcp/1")), AddrClass::Private);
        assert_eq!(classify(&ma("/ip6/::1/tcp/1")), AddrClass::Loopback);
        assert_eq!(classify(&ma("/dns6/x.example/tcp/1")), AddrClass::Name);
        assert_eq!(classify(&ma("/memory/1")), AddrClass::Memory);
        assert_eq!(classify(&Multiaddr::empty()), AddrClass::Other);
        assert_eq!(classify(&ma("/ip4/1.1.1.1/tcp/1")), AddrClass::Public);
    }
}
