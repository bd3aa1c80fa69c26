//! The mesh relay: a libp2p swarm (TCP + Noise + Yamux, QUIC with the `quic` feature, and an
//! in-memory transport for tests) that floods signed price messages with a hop TTL and a
//! seen-message cache, validates everything it receives, and keeps its peer count between a
//! minimum and a maximum (ARCHITECTURE sections 4 and 5).
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
//! # Where a frame goes when it arrives
//!
//! In order, file by file:
//! 1. `network/reader.rs`: the peer's reader cuts the frame out of its inbound stream
//!    ([`framing`]; an oversized length prefix ends the stream).
//! 2. `prepare.rs`: decoded and hashed; the first copy of a message claims its id; for an
//!    origin already accepted here, the origin's rate through this peer ([`OriginRate`], with
//!    the young origins' shared budget, `rates.rs`) is taken before the signature check, which
//!    then runs on the reader's task (or a check task of its own, in parallel).
//! 3. `network/core_task.rs` hands it to [`RelayCore::on_prepared`] (`core.rs`): seen check
//!    (a duplicate stops here, a copy with more TTL may be re-forwarded once), the
//!    allow-list, the budget of unknown origins ([`OriginBudget`]), the rate for what the
//!    reader did not check, the signature and field checks ([`mesh_protocol::validate`]), the
//!    replay marks. The outcome: deliver and forward, stale, throttled, rate-limited, or
//!    rejected (charged to the peer only when the fault is the sender's own).
//! 4. Back in `network/core_task.rs`: a delivery goes to the node (the receiver of
//!    [`Relay::start`]); the forward goes in full to the origin's tree peers and as an id
//!    (`HAVE`) to the others ([`lazy`]), each through the peer's bounded queue; a rejection
//!    is charged through the swarm task (`network/swarm.rs`), which asks the
//!    [`peer_manager`] whether to ban.
//! 5. `network/writer.rs`: the peer's writer takes the frame from its queue, skips it if that
//!    peer has meanwhile sent us the same message, and writes it with others in one batch.
//!
//! Control frames (`HAVE`, `WANT`, `PRUNE`) take steps 1 and 3 without the checks; `WANT`s
//! are answered from the copies kept in [`lazy`].
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
pub mod subnet;

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
