//! The registry and leases in process memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use mesh_protocol::NodeId;
use tokio::time::Instant;

use crate::{Coordination, Lease, Result};

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
    /// Round -> the key's value, when it was taken and when it ends (`None`: never, a key
    /// written by hand).
    leases: BTreeMap<u64, MemoryLease>,
}

#[derive(Debug, Clone)]
struct MemoryLease {
    value: String,
    taken: Instant,
    until: Option<Instant>,
}

impl MemoryCoordination {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `value` into `round`'s lease key as someone other than a provider would (tests
    /// of squatted keys): with `expires_in`, a lease taken `age` ago; without, a key that
    /// never expires.
    pub fn set_lease(&self, round: u64, value: &str, age: Duration, expires_in: Option<Duration>) {
        let now = Instant::now();
        let taken = now.checked_sub(age).unwrap_or(now);
        let lease =
            MemoryLease { value: value.to_owned(), taken, until: expires_in.map(|e| now + e) };
        self.lock().leases.insert(round, lease);
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

    async fn try_acquire_round(&self, round: u64, node: NodeId, lease: Duration) -> Result<Lease> {
        let now = Instant::now();
        let me = node.to_string();
        let mut state = self.lock();
        state.leases.retain(|_, l| l.until.is_none_or(|until| until > now));
        let held = state.leases.entry(round).or_insert(MemoryLease {
            value: me.clone(),
            taken: now,
            until: Some(now + lease),
        });
        Ok(Lease {
            mine: held.value == me,
            age: held.until.map(|_| now - held.taken),
            value: held.value.clone(),
        })
    }

    async fn take_over_round(
        &self,
        round: u64,
        node: NodeId,
        previous: &str,
        lease: Duration,
    ) -> Result<bool> {
        let now = Instant::now();
        let me = node.to_string();
        let mut state = self.lock();
        state.leases.retain(|_, l| l.until.is_none_or(|until| until > now));
        let current = state.leases.get(&round).map(|l| l.value.clone());
        match current {
            Some(value) if value == me => Ok(true),
            Some(value) if value != previous => Ok(false),
            _ => {
                let taken = MemoryLease { value: me, taken: now, until: Some(now + lease) };
                state.leases.insert(round, taken);
                Ok(true)
            }
        }
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
        assert!(coord.try_acquire_round(7, node(1), lease).await.unwrap().mine);
        tokio::time::advance(Duration::from_secs(2)).await;
        let held = coord.try_acquire_round(7, node(2), lease).await.unwrap();
        assert!(!held.mine);
        assert_eq!((held.holder(), held.age), (Some(node(1)), Some(Duration::from_secs(2))));
        assert!(
            coord.try_acquire_round(7, node(1), lease).await.unwrap().mine,
            "holder asks again"
        );
        assert!(coord.try_acquire_round(8, node(2), lease).await.unwrap().mine);
        // A take-over succeeds only against the holder it was decided on.
        assert!(!coord.take_over_round(7, node(3), "someone else", lease).await.unwrap());
        assert!(coord.take_over_round(7, node(2), &node(1).to_string(), lease).await.unwrap());
        assert!(!coord.try_acquire_round(7, node(1), lease).await.unwrap().mine);
        tokio::time::advance(lease).await;
        assert!(coord.try_acquire_round(7, node(3), lease).await.unwrap().mine, "lease expired");
        // A key written by hand, without expiry: no age.
        coord.set_lease(9, "squatter", Duration::ZERO, None);
        let squatted = coord.try_acquire_round(9, node(1), lease).await.unwrap();
        assert_eq!((squatted.holder(), squatted.age, squatted.mine), (None, None, false));
    }
}
