//! The registry and leases in process memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use mesh_protocol::NodeId;
use tokio::time::Instant;

use crate::{Coordination, Result};

/// [`Coordination`] within one process: for a node that coordinates with nobody but itself,
/// and for tests (several planners can share one through an `Arc`). It never fails. Expiry
/// follows `tokio::time`, so tests can pause and advance it.
#[derive(Debug, Default)]
pub struct MemoryCoordination {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Provider -> end of its heartbeat.
    providers: HashMap<NodeId, Instant>,
    /// Round -> holder and end of its lease.
    leases: BTreeMap<u64, (NodeId, Instant)>,
}

impl MemoryCoordination {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain maps: still consistent if a holder panicked.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Coordination for MemoryCoordination {
    async fn heartbeat(&self, node: NodeId, ttl: Duration) -> Result<()> {
        self.lock().providers.insert(node, Instant::now() + ttl);
        Ok(())
    }

    async fn deregister(&self, node: NodeId) -> Result<()> {
        self.lock().providers.remove(&node);
        Ok(())
    }

    async fn active_providers(&self) -> Result<Vec<NodeId>> {
        let now = Instant::now();
        let mut state = self.lock();
        state.providers.retain(|_, until| *until > now);
        Ok(state.providers.keys().copied().collect())
    }

    async fn try_acquire_round(&self, round: u64, node: NodeId, lease: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut state = self.lock();
        state.leases.retain(|_, (_, until)| *until > now);
        let (holder, _) = *state.leases.entry(round).or_insert((node, now + lease));
        Ok(holder == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128) -> NodeId {
        NodeId::from_uuid(uuid::Uuid::from_u128(n))
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_expire_and_leases_have_one_holder() {
        let coord = MemoryCoordination::new();
        coord.heartbeat(node(1), Duration::from_secs(10)).await.unwrap();
        coord.heartbeat(node(2), Duration::from_secs(20)).await.unwrap();
        let mut active = coord.active_providers().await.unwrap();
        active.sort();
        assert_eq!(active, vec![node(1), node(2)]);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(coord.active_providers().await.unwrap(), vec![node(2)]);
        coord.deregister(node(2)).await.unwrap();
        assert!(coord.active_providers().await.unwrap().is_empty());

        let lease = Duration::from_secs(30);
        assert!(coord.try_acquire_round(7, node(1), lease).await.unwrap());
        assert!(!coord.try_acquire_round(7, node(2), lease).await.unwrap());
        assert!(coord.try_acquire_round(7, node(1), lease).await.unwrap(), "holder asks again");
        assert!(coord.try_acquire_round(8, node(2), lease).await.unwrap());
        tokio::time::advance(lease).await;
        assert!(coord.try_acquire_round(7, node(2), lease).await.unwrap(), "lease expired");
    }
}
