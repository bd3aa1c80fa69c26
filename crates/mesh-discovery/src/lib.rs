//! Peer discovery for the mesh price network (ARCHITECTURE section 6): how a node learns
//! which peers to dial. It emits [`DiscoveryEvent`]s; the node hands them to the relay
//! (`Relay::add_bootstrap` for bootstrap peers, `Relay::add_peer_addresses` otherwise). This
//! crate does not depend on the relay.
//!
//! - **mDNS** ([`mdns`], with mdns-sd): advertises `_mesh-price._udp.local.` with a TXT record
//!   carrying the peer id, role, hop distance to a provider and listen addresses ([`txt`]), and
//!   browses for other nodes. The advertisement follows the node at run time
//!   ([`Discovery::set_role`], [`Discovery::set_hop_distance`],
//!   [`Discovery::set_listen_addrs`]). Interfaces are configurable (`MESH_MDNS_INTERFACES`,
//!   default all); tests use the loopback interface only ([`Config::loopback`]).
//! - **Bootstrap** ([`bootstrap`]): `MESH_BOOTSTRAP_PEERS`, multiaddrs ending with
//!   `/p2p/<peer id>`, reported once at start.
//! - **BLE** ([`ble`], with btleplug behind the cargo feature `ble`): scans for service data
//!   under the mesh service UUID, when `MESH_BLE_ENABLED=true` (`mesh-node` builds it with its
//!   own feature `ble`). Any BLE error means "BLE off", logged once.
//!
//! Every advertised address goes through [`AddrFilter`] (`MESH_ALLOW_PRIVATE_ADDRS`), the one
//! filter the relay applies to addresses learned through identify and peer exchange too: it
//! lives in mesh-protocol, tier 0, because the relay may not depend on this crate.
//!
//! Everything is bounded: the event queue, addresses per peer, peers tracked, TXT and BLE
//! payload sizes. Records from the network are parsed without panicking and our own
//! advertisement is ignored.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_discovery::{Config, Discovery, DiscoveryEvent, PeerId, Role, Source};
//! use tokio_util::sync::CancellationToken;
//!
//! let local = PeerId::random(); // the relay's peer id
//! let config = Config::from_lookup(|name| std::env::var(name).ok())?;
//! let (discovery, mut events) = Discovery::start(local, config, CancellationToken::new()).await?;
//! discovery.set_listen_addrs(vec!["/ip4/0.0.0.0/tcp/4001".parse()?]);
//! discovery.set_role(Role::Provider);
//! discovery.set_hop_distance(Some(0));
//! while let Some(event) = events.recv().await {
//!     match event {
//!         DiscoveryEvent::PeerFound { peer_id, addrs, hop_distance, source: Source::Bootstrap, .. } => {
//!             println!("bootstrap {peer_id} at {addrs:?} (hop {hop_distance:?})"); // relay.add_bootstrap
//!         }
//!         DiscoveryEvent::PeerFound { peer_id, addrs, hop_distance, .. } => {
//!             println!("found {peer_id} at {addrs:?} (hop {hop_distance:?})"); // relay.add_peer_addresses
//!         }
//!         DiscoveryEvent::PeerExpired { peer_id } => println!("{peer_id} left"),
//!     }
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod addrs;
pub mod ble;
pub mod bootstrap;
pub mod config;
pub mod discovery;
pub mod event;
pub mod mdns;
pub mod txt;

pub use bootstrap::{BootstrapError, BootstrapPeer};
pub use config::{Config, ConfigError, ConfigErrors, MdnsInterface};
pub use discovery::Discovery;
pub use event::{DiscoveryEvent, Role, Source};
pub use libp2p_identity::PeerId;
pub use mdns::SERVICE_TYPE;
pub use mesh_protocol::addr_filter::{AddrClass, AddrFilter};
pub use multiaddr::Multiaddr;
pub use txt::Advertisement;

/// Errors of starting discovery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (every problem listed).
    #[error("invalid discovery configuration: {0}")]
    Config(#[from] ConfigErrors),
    /// The mDNS daemon refused a request.
    #[error("{action}: {source}")]
    Mdns {
        /// What was being done.
        action: &'static str,
        /// What mdns-sd said.
        #[source]
        source: mdns_sd::Error,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
