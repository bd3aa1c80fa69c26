//! Who fetches prices in which round (ARCHITECTURE section 7).
//!
//! Time is cut into rounds of the fetch interval: round `r = floor(unix_secs / interval)`.
//! Providers register with an expiring heartbeat; for each round they are ranked by
//! SHA-256(round, node_id), so the work rotates, and the provider of rank `k` waits
//! `k x window` after the round starts and then tries to take the round's lease
//! (`SET {prefix}coord:round:{r} <node_id> NX PX <interval>`). Only the winner fetches: rank 0
//! normally, rank 1 one window later when rank 0 is dead. Exactly one fetch per round.
//!
//! [`Coordination`] is the registry and lease store: [`RedisCoordination`] shares it between
//! processes, [`MemoryCoordination`] within one process (single node, tests). While the store
//! fails (Redis down), [`RoundPlanner`] ranks the providers a [`MeshView`] learned from the
//! mesh and skips a round only when a fresh batch for it already arrived: duplicates are
//! possible then, a missed round is not.
//!
//! A held lease is not a delivered round (issue 34): the provider of rank `k > 0` checks at its
//! slot that a valid batch of the round arrived from a provider it ranks ([`MeshView`]); when
//! none did one window after the lease was taken, or the lease is held by no registered
//! provider, or the key carries no lease's expiry (set by hand), it takes the round over
//! ([`Coordination::take_over_round`]) and fetches. A round is then late by at most one window.
//! The step is the pure [`lease_step`], with the time as an argument. Lease ages and heartbeats
//! are measured by the store's clock (Redis `TIME`), never by each node's.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use mesh_coordination::{MemoryCoordination, NoMesh, PlannerConfig, RoundPlanner, TokioClock, Via};
//! use mesh_protocol::Identity;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // Two providers of one process share an in-memory registry (Redis across processes).
//! let shared = Arc::new(MemoryCoordination::new());
//! let config = PlannerConfig::new(Duration::from_secs(30), Duration::from_secs(5));
//! // A wall clock that follows tokio's paused time, starting at a round boundary.
//! let clock = Arc::new(TokioClock::starting_at(1_750_000_020_000));
//! let planner = || {
//!     let node = Identity::generate().node_id();
//!     RoundPlanner::new(config, node, shared.clone(), Arc::new(NoMesh)).with_clock(clock.clone())
//! };
//! let (a, b) = (planner(), planner());
//! a.register().await; // normally done by `next`; here both must know each other at once
//! b.register().await;
//!
//! // Each waits until its slot in the round, then decides. Rank 0 takes the lease at the
//! // round start; with no mesh to bring rank 0's batch, rank 1 sees the round undelivered one
//! // window later and takes it over.
//! let (a, b) = tokio::join!(a.next(), b.next());
//! assert_eq!(a.round, b.round);
//! let (first, second) = if a.rank == 0 { (a, b) } else { (b, a) };
//! assert!(first.fetch && !first.taken_over);
//! assert_eq!(first.via, Via::Lease);
//! assert!(second.fetch && second.taken_over);
//! assert_eq!(second.decided_at_unix_ms - second.round_start_unix_ms, 5_000);
//! # }
//! ```

#![warn(missing_docs)]

pub mod clock;
mod memory;
mod planner;
pub mod redis;

use std::time::Duration;

use mesh_protocol::NodeId;

pub use clock::{ClockCheck, ClockVerdict, Reference};
pub use memory::MemoryCoordination;
pub use planner::{
    Clock, LeaseObservation, LeaseStep, OffsetClock, PlannerConfig, RoundDecision, RoundPlanner,
    SkipReason, SystemClock, TokioClock, Undelivered, Via, lease_step,
};
pub use redis::RedisCoordination;

/// Why a coordination call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis answered with an error or not at all.
    #[error("redis: {0}")]
    Redis(#[from] deadpool_redis::redis::RedisError),
    /// No Redis connection could be had.
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// Redis is down and the next reconnect attempt is not due yet.
    #[error("redis is unavailable (reconnecting with backoff)")]
    Unavailable,
    /// No coordination store is configured ([`MeshOnly`]): rounds are coordinated through the
    /// mesh.
    #[error("no coordination store configured")]
    NotConfigured,
    /// A setting is out of range.
    #[error("{name}={value} is invalid: {reason}")]
    Config {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: String,
    },
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A round's lease as the store holds it, read when trying to take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The key's value: the holder's node id when a provider took it, or whatever someone
    /// else wrote there (empty when it is not a string).
    pub value: String,
    /// `true` when this node holds it.
    pub mine: bool,
    /// How long ago it was taken, by the store's clock (the lease length minus what is left of
    /// it); `None` when the key does not carry a lease's expiry (written by hand).
    pub age: Option<Duration>,
}

impl Lease {
    /// The holder, when the value is a node id.
    pub fn holder(&self) -> Option<NodeId> {
        self.value.parse().ok()
    }
}

/// The store's clock as last read: Redis `TIME`, for the clock check of issue 34.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreTime {
    /// The store's time, Unix milliseconds.
    pub unix_ms: u64,
    /// When the answer arrived (this process's monotonic clock).
    pub received: std::time::Instant,
    /// The call's round trip: the reading is that uncertain.
    pub round_trip: Duration,
}

/// The provider registry and the per-round leases, shared by the providers that coordinate.
#[async_trait::async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// Registers `node` as an active provider for `ttl` from now (call again before it ends).
    async fn heartbeat(&self, node: NodeId, ttl: Duration) -> Result<()>;
    /// Removes `node` from the registry at once (provider mode disabled, clean shutdown).
    async fn deregister(&self, node: NodeId) -> Result<()>;
    /// The providers whose heartbeat has not expired, in no particular order.
    async fn active_providers(&self) -> Result<Vec<NodeId>>;
    /// Tries to take `round` for `node` and reads the lease as it then is ([`Lease::mine`] when
    /// `node` holds it, now or already). At most one node holds a round; the lease lasts
    /// `lease`.
    async fn try_acquire_round(&self, round: u64, node: NodeId, lease: Duration) -> Result<Lease>;
    /// Takes `round` over for `node` when its lease still holds `previous` (or nothing, or is
    /// already `node`'s): `true` when `node` holds it afterwards. Used when the holder did not
    /// deliver ([`lease_step`]).
    async fn take_over_round(
        &self,
        round: u64,
        node: NodeId,
        previous: &str,
        lease: Duration,
    ) -> Result<bool>;
    /// The store's clock as last read (`None` for stores without one).
    fn store_time(&self) -> Option<StoreTime> {
        None
    }
    /// `true` while the store is unreachable and callers should expect errors.
    fn is_degraded(&self) -> bool {
        false
    }
}

/// What the node learned from the mesh (plugged in by mesh-service; [`NoMesh`] by default).
pub trait MeshView: Send + Sync + 'static {
    /// Providers announced through the mesh (`ProviderAnnounce`), still fresh.
    fn providers(&self) -> Vec<NodeId>;
    /// The other providers whose valid batch for `round` already arrived (a batch whose round
    /// matches its creation time and that carries this node's assets). The planner counts
    /// only the origins it ranks.
    fn round_origins(&self, round: u64) -> Vec<NodeId>;
}

/// Coordination for nodes without Redis: there is no registry and no lease, so the round
/// planner ranks the providers learned from the mesh (`ProviderAnnounce`) and skips rounds whose
/// batch already arrived (ARCHITECTURE section 7). Every call answers [`Error::NotConfigured`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MeshOnly;

#[async_trait::async_trait]
impl Coordination for MeshOnly {
    async fn heartbeat(&self, _node: NodeId, _ttl: Duration) -> Result<()> {
        Err(Error::NotConfigured)
    }

    async fn deregister(&self, _node: NodeId) -> Result<()> {
        Ok(())
    }

    async fn active_providers(&self) -> Result<Vec<NodeId>> {
        Err(Error::NotConfigured)
    }

    async fn try_acquire_round(
        &self,
        _round: u64,
        _node: NodeId,
        _lease: Duration,
    ) -> Result<Lease> {
        Err(Error::NotConfigured)
    }

    async fn take_over_round(
        &self,
        _round: u64,
        _node: NodeId,
        _previous: &str,
        _lease: Duration,
    ) -> Result<bool> {
        Err(Error::NotConfigured)
    }
}

/// A mesh view that knows nothing: without a store the node then fetches every round alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMesh;

impl MeshView for NoMesh {
    fn providers(&self) -> Vec<NodeId> {
        Vec::new()
    }

    fn round_origins(&self, _round: u64) -> Vec<NodeId> {
        Vec::new()
    }
}
