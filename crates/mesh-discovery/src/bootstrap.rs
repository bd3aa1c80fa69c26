//! The bootstrap list, `MESH_BOOTSTRAP_PEERS`: comma-separated multiaddrs that each end with
//! `/p2p/<peer id>`, for peers beyond the local network. One bootstrap address is enough for a
//! node to reach more peers through the relay's peer exchange.

use std::fmt;
use std::str::FromStr;

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;

use crate::addrs::split_p2p;

/// Most entries in `MESH_BOOTSTRAP_PEERS`.
pub const MAX_BOOTSTRAP_PEERS: usize = 64;

/// One bootstrap entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BootstrapPeer {
    /// The peer it must be (the `/p2p/<peer id>` suffix).
    pub peer_id: PeerId,
    /// Where to dial it, without the `/p2p` suffix.
    pub addr: Multiaddr,
}

impl fmt::Display for BootstrapPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/p2p/{}", self.addr, self.peer_id)
    }
}

/// A bad bootstrap entry; the message names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// Not a multiaddr.
    #[error("bootstrap peer {entry:?} is not a multiaddr: {reason}")]
    NotMultiaddr {
        /// The entry as written.
        entry: String,
        /// What the parser said.
        reason: String,
    },
    /// No `/p2p/<peer id>` at the end.
    #[error("bootstrap peer {entry:?} does not end with /p2p/<peer id>")]
    MissingPeerId {
        /// The entry as written.
        entry: String,
    },
    /// Only `/p2p/<peer id>`, nothing to dial.
    #[error("bootstrap peer {entry:?} has no address before /p2p/<peer id>")]
    MissingAddress {
        /// The entry as written.
        entry: String,
    },
    /// More entries than [`MAX_BOOTSTRAP_PEERS`].
    #[error("{count} bootstrap peers given, at most {max} allowed")]
    TooMany {
        /// Entries given.
        count: usize,
        /// The limit.
        max: usize,
    },
}

impl FromStr for BootstrapPeer {
    type Err = BootstrapError;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let entry = entry.trim();
        let addr = Multiaddr::from_str(entry).map_err(|e| BootstrapError::NotMultiaddr {
            entry: entry.to_owned(),
            reason: e.to_string(),
        })?;
        match split_p2p(&addr) {
            (_, None) => Err(BootstrapError::MissingPeerId { entry: entry.to_owned() }),
            (base, Some(_)) if base.is_empty() => {
                Err(BootstrapError::MissingAddress { entry: entry.to_owned() })
            }
            (addr, Some(peer_id)) => Ok(BootstrapPeer { peer_id, addr }),
        }
    }
}

/// Parses a `MESH_BOOTSTRAP_PEERS` value. Blank entries (a trailing comma, an empty value) are
/// skipped; every bad entry is reported, each naming itself.
pub fn parse_list(text: &str) -> Result<Vec<BootstrapPeer>, Vec<BootstrapError>> {
    let entries: Vec<&str> = text.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    let mut peers = Vec::new();
    let mut errors = Vec::new();
    if entries.len() > MAX_BOOTSTRAP_PEERS {
        errors.push(BootstrapError::TooMany { count: entries.len(), max: MAX_BOOTSTRAP_PEERS });
    }
    for entry in entries {
        match entry.parse::<BootstrapPeer>() {
            Ok(peer) => peers.push(peer),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(peers) } else { Err(errors) }
}

/// The entries grouped by peer, in first-seen order, each address once.
pub fn by_peer(peers: &[BootstrapPeer]) -> Vec<(PeerId, Vec<Multiaddr>)> {
    let mut grouped: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
    for peer in peers {
        match grouped.iter_mut().find(|(id, _)| *id == peer.peer_id) {
            Some((_, addrs)) if !addrs.contains(&peer.addr) => addrs.push(peer.addr.clone()),
            Some(_) => {}
            None => grouped.push((peer.peer_id, vec![peer.addr.clone()])),
        }
    }
    grouped
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_entries_parses_and_groups_by_peer() {
        let a = PeerId::random();
        let b = PeerId::random();
        let text = format!(
            " /ip4/203.0.113.5/tcp/4001/p2p/{a}, /dns4/boot.example/udp/4001/quic-v1/p2p/{b} ,\
             /ip4/203.0.113.5/udp/4001/quic-v1/p2p/{a},"
        );
        let peers = parse_list(&text).unwrap();
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[0].addr, "/ip4/203.0.113.5/tcp/4001".parse::<Multiaddr>().unwrap());
        assert_eq!(peers[0].to_string(), format!("/ip4/203.0.113.5/tcp/4001/p2p/{a}"));
        let grouped = by_peer(&peers);
        assert_eq!(grouped.len(), 2);
        assert_eq!(grouped[0].0, a);
        assert_eq!(grouped[0].1.len(), 2);
        assert_eq!(grouped[1], (b, vec!["/dns4/boot.example/udp/4001/quic-v1".parse().unwrap()]));
        assert_eq!(parse_list("").unwrap(), vec![]);
        assert_eq!(parse_list(" , ").unwrap(), vec![]);
    }

    #[test]
    fn every_bad_entry_is_reported_by_name() {
        let a = PeerId::random();
        let text = format!("/ip4/1.2.3.4/tcp/1, garbage, /ip4/1.2.3.4/tcp/2/p2p/{a}, /p2p/{a}");
        let errors = parse_list(&text).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(errors[0], BootstrapError::MissingPeerId { entry: "/ip4/1.2.3.4/tcp/1".into() });
        assert!(
            matches!(&errors[1], BootstrapError::NotMultiaddr { entry, .. } if entry == "garbage")
        );
        assert_eq!(errors[2], BootstrapError::MissingAddress { entry: format!("/p2p/{a}") });
        assert!(errors[0].to_string().contains("/ip4/1.2.3.4/tcp/1"));
        assert!(errors[1].to_string().contains("garbage"));
    }

    #[test]
    fn too_many_entries_are_refused() {
        let a = PeerId::random();
        let text = (0..=MAX_BOOTSTRAP_PEERS)
            .map(|i| format!("/ip4/10.0.0.1/tcp/{}/p2p/{a}", 1000 + i))
            .collect::<Vec<_>>()
            .join(",");
        let errors = parse_list(&text).unwrap_err();
        assert_eq!(errors, vec![BootstrapError::TooMany { count: 65, max: 64 }]);
    }
}
