//! Which addresses a node advertises and which advertised addresses it accepts.
//!
//! A node never advertises an unspecified address (`0.0.0.0`, `::`): a listener on one is
//! replaced by the concrete addresses of the interfaces discovery runs on. Received addresses
//! that nobody can dial (unspecified, multicast, broadcast, IPv6 link-local without a zone) are
//! dropped, and loopback addresses are kept only from a peer on the same host, so that a
//! node on the LAN does not dial itself at `127.0.0.1`. Every received address must also pass
//! the node's [`AddrFilter`] (as learned on the LAN: private networks pass, loopback only in a
//! lab, link-local and DNS names never).

use std::collections::HashSet;
use std::net::IpAddr;

use libp2p_identity::PeerId;
use mesh_protocol::AddrFilter;
use multiaddr::{Multiaddr, Protocol};
use tracing::debug;

use crate::config::MdnsInterface;

/// The IP of an address that starts with `/ip4` or `/ip6`.
pub fn first_ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// Whether another node could dial this IP (loopback counts: on the same host it can).
pub fn is_dialable_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        // fe80::/10 needs a zone index, which multiaddrs do not carry.
        IpAddr::V6(v6) => {
            !(v6.is_unspecified() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Splits a trailing `/p2p/<peer id>` off an address.
pub fn split_p2p(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) => (base, Some(peer)),
        _ => (addr.clone(), None),
    }
}

fn with_ip(addr: &Multiaddr, ip: IpAddr) -> Multiaddr {
    let mut out = Multiaddr::empty();
    out.push(match ip {
        IpAddr::V4(v4) => Protocol::Ip4(v4),
        IpAddr::V6(v6) => Protocol::Ip6(v6),
    });
    for protocol in addr.iter().skip(1) {
        out.push(protocol);
    }
    out
}

fn is_loopback(addr: &Multiaddr) -> bool {
    first_ip(addr).is_some_and(|ip| ip.is_loopback())
}

/// Keeps the first copy of each address and at most `max`, addresses reachable from other
/// hosts first (a LAN peer gets the useful ones even when the list is cut).
fn dedup_and_cap(addrs: Vec<Multiaddr>, max: usize) -> Vec<Multiaddr> {
    let mut seen = HashSet::new();
    let mut out: Vec<Multiaddr> = addrs.into_iter().filter(|a| seen.insert(a.clone())).collect();
    out.sort_by_key(is_loopback); // stable: keeps the order within each group
    out.truncate(max);
    out
}

/// The addresses to advertise for a node listening on `listen`: `/p2p` suffixes removed,
/// unspecified IPs replaced by every dialable address of the same family in `local_ips`,
/// undialable IPs dropped, duplicates removed, at most `max`.
pub fn advertised(listen: &[Multiaddr], local_ips: &[IpAddr], max: usize) -> Vec<Multiaddr> {
    let mut out = Vec::new();
    for addr in listen {
        let (addr, _) = split_p2p(addr);
        match first_ip(&addr) {
            Some(ip) if ip.is_unspecified() => {
                let same_family = local_ips
                    .iter()
                    .filter(|local| local.is_ipv4() == ip.is_ipv4() && is_dialable_ip(**local));
                out.extend(same_family.map(|local| with_ip(&addr, *local)));
            }
            Some(ip) if !is_dialable_ip(ip) => {
                debug!(%addr, "not advertising an undialable address")
            }
            _ => out.push(addr),
        }
    }
    dedup_and_cap(out, max)
}

/// Filters addresses advertised by a peer on the LAN: those `filter` refuses dropped
/// ([`AddrFilter::allows_from_lan`]), undialable IPs dropped, loopback ones kept only when
/// `same_host`, duplicates removed, at most `max`.
pub fn received(
    addrs: impl IntoIterator<Item = Multiaddr>,
    same_host: bool,
    filter: AddrFilter,
    max: usize,
) -> Vec<Multiaddr> {
    let usable = addrs.into_iter().filter(|addr| {
        filter.allows_from_lan(addr)
            && match first_ip(addr) {
                Some(ip) => is_dialable_ip(ip) && (same_host || !ip.is_loopback()),
                None => true,
            }
    });
    dedup_and_cap(usable.collect(), max)
}

/// The IPs of the interfaces that are up and match `selection` (all of them when it is empty).
/// An error listing the interfaces gives an empty list (logged): nothing is then advertised
/// for unspecified listeners.
pub fn local_ips(selection: &[MdnsInterface]) -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .into_iter()
            .filter(|i| i.is_oper_up() || i.is_loopback())
            .filter(|i| {
                selection.is_empty() || selection.iter().any(|s| s.matches(&i.name, i.ip()))
            })
            .map(|i| i.ip())
            .collect(),
        Err(e) => {
            debug!(error = %e, "cannot list the network interfaces");
            Vec::new()
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

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn unspecified_listeners_are_expanded_and_never_advertised() {
        let listen = [ma("/ip4/0.0.0.0/tcp/4001"), ma("/ip6/::/udp/4001/quic-v1")];
        let local = ips(&["127.0.0.1", "192.168.1.5", "fe80::1", "2001:db8::5", "::1"]);
        let out = advertised(&listen, &local, 16);
        assert_eq!(
            out,
            vec![
                ma("/ip4/192.168.1.5/tcp/4001"),
                ma("/ip6/2001:db8::5/udp/4001/quic-v1"),
                ma("/ip4/127.0.0.1/tcp/4001"),
                ma("/ip6/::1/udp/4001/quic-v1"),
            ]
        );
        assert!(out.iter().all(|a| !first_ip(a).unwrap().is_unspecified()));
        // No local address of the family: the listener is left out, not advertised as is.
        assert!(advertised(&[ma("/ip4/0.0.0.0/tcp/1")], &ips(&["::1"]), 16).is_empty());
    }

    #[test]
    fn advertised_strips_p2p_deduplicates_and_caps() {
        let peer = PeerId::random();
        let with_id = ma(&format!("/ip4/10.0.0.1/tcp/1/p2p/{peer}"));
        let listen = [with_id, ma("/ip4/10.0.0.1/tcp/1"), ma("/ip4/224.0.0.1/tcp/2")];
        assert_eq!(advertised(&listen, &[], 16), vec![ma("/ip4/10.0.0.1/tcp/1")]);
        let many: Vec<Multiaddr> =
            (1..=40).map(|p| ma(&format!("/ip4/10.0.0.1/tcp/{p}"))).collect();
        assert_eq!(advertised(&many, &[], 16).len(), 16);
    }

    #[test]
    fn received_drops_undialable_and_foreign_loopback_addresses() {
        let addrs = vec![
            ma("/ip4/127.0.0.1/tcp/1"),
            ma("/ip4/0.0.0.0/tcp/1"),
            ma("/ip4/239.1.1.1/tcp/1"),
            ma("/ip6/fe80::1/tcp/1"),
            ma("/ip4/192.168.1.7/tcp/1"),
            ma("/dns4/node.example/tcp/1"),
            ma("/ip4/192.168.1.7/tcp/1"),
            ma("/ip4/169.254.169.254/tcp/80"),
            ma("/memory/5"),
        ];
        let (public, lab) = (AddrFilter::PUBLIC, AddrFilter::lab());
        assert_eq!(received(addrs.clone(), false, public, 16), vec![ma("/ip4/192.168.1.7/tcp/1")]);
        assert_eq!(
            received(addrs.clone(), true, public, 16),
            vec![ma("/ip4/192.168.1.7/tcp/1")],
            "loopback needs the lab setting, even from this host"
        );
        assert_eq!(
            received(addrs.clone(), false, lab, 16),
            vec![ma("/ip4/192.168.1.7/tcp/1"), ma("/memory/5")]
        );
        assert_eq!(
            received(addrs, true, lab, 16),
            vec![ma("/ip4/192.168.1.7/tcp/1"), ma("/memory/5"), ma("/ip4/127.0.0.1/tcp/1")]
        );
    }

    #[test]
    fn split_p2p_only_takes_a_trailing_peer_id() {
        let peer = PeerId::random();
        let (base, id) = split_p2p(&ma(&format!("/ip4/1.2.3.4/tcp/5/p2p/{peer}")));
        assert_eq!((base, id), (ma("/ip4/1.2.3.4/tcp/5"), Some(peer)));
        assert_eq!(split_p2p(&ma("/ip4/1.2.3.4/tcp/5")), (ma("/ip4/1.2.3.4/tcp/5"), None));
    }

    #[test]
    fn loopback_selection_lists_only_loopback_addresses() {
        let found = local_ips(&[MdnsInterface::Loopback]);
        assert!(found.contains(&"127.0.0.1".parse().unwrap()), "{found:?}");
        assert!(found.iter().all(|ip| ip.is_loopback()), "{found:?}");
    }
}
