//! The mesh relay: a libp2p swarm (TCP + Noise + Yamux, QUIC, and an in-memory transport for
//! tests) that floods signed price messages with a hop TTL and a seen-message cache, validates
//! everything it receives, and keeps its peer count between a minimum and a maximum
//! (ARCHITECTURE sections 4 and 5).
//!
//! - [`RelayCore`] holds the relay rules with no networking: seen check, validation, which
//!   peers get a copy, the re-forward of a duplicate that carries more TTL.
//! - [`Relay`] runs the network: one long-lived outbound stream per peer on
//!   `/mesh/relay/1.0.0` (libp2p-stream) fed by a bounded queue, lazy push ([`lazy`]: a
//!   relayed message goes in full to a few peers and as an id to the others, who ask for it
//!   when no copy comes), readers for inbound streams that decode frames and check the
//!   signatures of new messages in parallel ([`RelayCore::on_prepared`]),
//!   the peer manager (dial below the minimum, prune above the maximum, ban peers past their
//!   misbehaviour budget) and peer exchange (`/mesh/pex/1.0.0`).
//! - [`AddrBook`] keeps where peers are, by source (operator, the peer itself, a successful
//!   dial, third parties), bounded per claimant; every learned address passes [`AddrFilter`]
//!   (public only unless `MESH_ALLOW_PRIVATE_ADDRS`), and peer exchange passes on only
//!   addresses a dial reached.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_protocol::Identity;
//! use mesh_relay::{Config, Relay};
//! use tokio_util::sync::CancellationToken;
//!
//! let identity = Identity::generate();
//! let config = Config { listen_addrs: vec!["/ip4/127.0.0.1/tcp/0".parse()?], ..Config::default() };
//! let (relay, mut deliveries) = Relay::start(&identity, config, CancellationToken::new()).await?;
//! relay.dial("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWJ1Y8wHjnrdkt6t2rBU8VfxychLAFUGGU34D7go2BLCCo".parse()?).await?;
//! while let Some(delivery) = deliveries.recv().await {
//!     println!("{} from {:?}", delivery.message.id, delivery.from);
//! }
//! # Ok(()) }
//! ```

pub mod addr_book;
pub mod config;
pub mod core;
pub mod framing;
pub mod inbound;
pub mod lazy;
pub mod network;
pub mod peer_manager;
pub mod pex;
mod prepare;
mod rates;
pub mod stats;

pub use addr_book::AddrBook;
pub use config::Config;
pub use core::{CoreConfig, Forward, OriginBudget, OriginRate, Outcome, Prepared, RelayCore};
pub use inbound::InboundLimits;
pub use lazy::LazyPush;
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};
pub use mesh_protocol::AddrFilter;
pub use network::{Delivery, Error, PeerStatus, Relay, Result, Status};
pub use stats::StatsSnapshot;

/// A table keyed by message id, hashed with seeded foldhash: the relay's per-message tables are
/// looked up for every copy, and SipHash was a measurable part of a relay's CPU time.
pub(crate) type IdMap<V> =
    std::collections::HashMap<mesh_protocol::MessageId, V, foldhash::fast::RandomState>;
