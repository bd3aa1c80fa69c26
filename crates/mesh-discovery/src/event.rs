//! What discovery reports: peers found (with where from) and peers gone.

use std::fmt;
use std::str::FromStr;

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;

/// What a node does for the mesh, as it advertises itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// Fetches prices from Birdeye and broadcasts them (hop distance 0).
    Provider,
    /// Relays and consumes prices.
    #[default]
    Consumer,
}

impl Role {
    /// The word used on the wire (`provider` or `consumer`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Provider => "provider",
            Role::Consumer => "consumer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role word that is neither `provider` nor `consumer`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (expected provider or consumer)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("provider") {
            Ok(Role::Provider)
        } else if s.eq_ignore_ascii_case("consumer") {
            Ok(Role::Consumer)
        } else {
            Err(UnknownRole(s.chars().take(32).collect()))
        }
    }
}

/// How a peer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An mDNS advertisement (`_mesh-price._udp.local.`) on the local network.
    Mdns,
    /// The configured bootstrap list (`MESH_BOOTSTRAP_PEERS`).
    Bootstrap,
    /// A BLE advertisement carrying the mesh service UUID.
    Ble,
}

impl Source {
    /// A short lowercase name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mdns => "mdns",
            Source::Bootstrap => "bootstrap",
            Source::Ble => "ble",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One discovery event. The node hands `PeerFound` to the relay (`Relay::add_bootstrap` for
/// [`Source::Bootstrap`], `Relay::add_peer_addresses` otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A peer, or new information about a peer already found (its addresses, role or hop
    /// distance changed). Never our own node.
    PeerFound {
        /// Its libp2p peer id.
        peer_id: PeerId,
        /// Addresses to dial it on, without the `/p2p/<peer id>` suffix; at most
        /// `Config::max_addrs_per_peer`. Never unspecified (`0.0.0.0`), multicast or IPv6
        /// link-local addresses; loopback ones only from a peer on this host.
        addrs: Vec<Multiaddr>,
        /// Its role; `None` when the source does not say (bootstrap entries).
        role: Option<Role>,
        /// Its advertised hop distance to the nearest provider, when known.
        hop_distance: Option<u8>,
        /// Where it was found.
        source: Source,
    },
    /// A peer found through mDNS withdrew its advertisement (goodbye packet or expiry).
    PeerExpired {
        /// Its libp2p peer id.
        peer_id: PeerId,
    },
}

impl DiscoveryEvent {
    /// The peer the event is about.
    pub fn peer_id(&self) -> PeerId {
        match self {
            DiscoveryEvent::PeerFound { peer_id, .. } | DiscoveryEvent::PeerExpired { peer_id } => {
                *peer_id
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_words_round_trip_and_unknown_words_are_refused() {
        for role in [Role::Provider, Role::Consumer] {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert_eq!("PROVIDER".parse::<Role>(), Ok(Role::Provider));
        assert_eq!("relay".parse::<Role>(), Err(UnknownRole("relay".into())));
        let long = "x".repeat(1000);
        let err = long.parse::<Role>().err().map(|e| e.0.len());
        assert_eq!(err, Some(32), "the error keeps a bounded excerpt");
    }
}
