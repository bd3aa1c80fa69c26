//! Providers as the node learns them from the mesh: `ProviderAnnounce` messages and price
//! batches. It feeds the network status (`active_providers[].hop_count`) and, when Redis is
//! not there, the round coordination ([`MeshView`]): which providers to rank and whether a
//! round's batch already arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_coordination::MeshView;
use mesh_ipc::ActiveProvider;
use mesh_protocol::NodeId;

use crate::book::rfc3339;

#[derive(Debug, Clone, Copy)]
struct Heard {
    last_seen_ms: i64,
    hop_count: u8,
    last_batch_round: Option<u64>,
}

/// What the node knows of the providers.
#[derive(Debug)]
pub struct ProviderTracker {
    interval: Duration,
    own: NodeId,
    own_active: bool,
    providers: HashMap<NodeId, Heard>,
    /// Recent rounds and the providers whose batch for the round arrived.
    fulfilled: HashMap<u64, Vec<NodeId>>,
    max_providers: usize,
}

impl ProviderTracker {
    /// A tracker for node `own` with rounds of `interval`.
    pub fn new(own: NodeId, interval: Duration) -> Self {
        Self {
            interval,
            own,
            own_active: false,
            providers: HashMap::new(),
            fulfilled: HashMap::new(),
            max_providers: 1024,
        }
    }

    /// Whether this node itself is a provider now.
    pub fn set_own_active(&mut self, active: bool) {
        self.own_active = active;
    }

    fn active_window_ms(&self) -> i64 {
        // Three rounds, and never less than 90 s, so a provider is not dropped for one miss.
        (3 * self.interval.as_millis() as i64).max(90_000)
    }

    /// A provider message (announce or batch) from `origin` arrived over `hop_count` hops.
    pub fn heard(&mut self, origin: NodeId, hop_count: u8, batch_round: Option<u64>, now_ms: i64) {
        if origin == self.own {
            return;
        }
        if !self.providers.contains_key(&origin) && self.providers.len() >= self.max_providers {
            self.expire(now_ms);
            if self.providers.len() >= self.max_providers {
                return;
            }
        }
        let window = self.active_window_ms();
        let entry = self.providers.entry(origin).or_insert(Heard {
            last_seen_ms: now_ms,
            hop_count,
            last_batch_round: None,
        });
        // Keep the shortest recent path: a copy that came the long way does not count.
        if now_ms - entry.last_seen_ms > window || hop_count < entry.hop_count {
            entry.hop_count = hop_count;
        }
        entry.last_seen_ms = now_ms;
        if let Some(round) = batch_round {
            entry.last_batch_round = Some(round);
            let origins = self.fulfilled.entry(round).or_default();
            if !origins.contains(&origin) && origins.len() < 64 {
                origins.push(origin);
            }
            // Only recent rounds matter.
            let keep_from = round.saturating_sub(16);
            self.fulfilled.retain(|r, _| *r >= keep_from);
        }
    }

    fn expire(&mut self, now_ms: i64) {
        let window = self.active_window_ms();
        self.providers.retain(|_, h| now_ms - h.last_seen_ms <= window);
    }

    /// Providers heard from recently (this node first when it is one), for the status.
    pub fn active(&self, now_ms: i64) -> Vec<ActiveProvider> {
        let window = self.active_window_ms();
        let mut list: Vec<ActiveProvider> = self
            .providers
            .iter()
            .filter(|(_, h)| now_ms - h.last_seen_ms <= window)
            .map(|(id, h)| ActiveProvider {
                node_id: *id,
                hop_count: h.hop_count,
                last_seen: rfc3339(h.last_seen_ms),
            })
            .collect();
        list.sort_by(|a, b| a.hop_count.cmp(&b.hop_count).then(a.node_id.cmp(&b.node_id)));
        if self.own_active {
            list.insert(
                0,
                ActiveProvider { node_id: self.own, hop_count: 0, last_seen: rfc3339(now_ms) },
            );
        }
        list
    }

    /// Providers fresh enough to rank for coordination (heard within two rounds).
    pub fn rankable(&self, now_ms: i64) -> Vec<NodeId> {
        let window = 2 * self.interval.as_millis() as i64;
        self.providers
            .iter()
            .filter(|(_, h)| now_ms - h.last_seen_ms <= window)
            .map(|(id, _)| *id)
            .collect()
    }

    /// `true` when another provider's batch for `round` arrived.
    pub fn round_fulfilled(&self, round: u64) -> bool {
        self.fulfilled.contains_key(&round)
    }

    /// The providers whose batch for `round` arrived (recent rounds only).
    pub fn round_origins(&self, round: u64) -> Vec<NodeId> {
        self.fulfilled.get(&round).cloned().unwrap_or_default()
    }

    /// The rounds remembered, oldest first.
    pub fn recent_rounds(&self) -> Vec<u64> {
        let mut rounds: Vec<u64> = self.fulfilled.keys().copied().collect();
        rounds.sort_unstable();
        rounds
    }
}

/// The tracker shared between the node's tasks and the provider's round planner.
#[derive(Debug, Clone)]
pub struct SharedTracker(pub Arc<Mutex<ProviderTracker>>);

impl SharedTracker {
    /// Locks the tracker (never held across an await).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ProviderTracker> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl MeshView for SharedTracker {
    fn providers(&self) -> Vec<NodeId> {
        self.lock().rankable(crate::now_ms())
    }

    fn round_fulfilled(&self, round: u64) -> bool {
        self.lock().round_fulfilled(round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    fn node(n: u8) -> NodeId {
        NodeId::from_public_key(&[n; 32])
    }

    #[test]
    fn tracks_hop_counts_rounds_and_activity() {
        let mut t = ProviderTracker::new(node(0), Duration::from_secs(30));
        t.heard(node(1), 3, None, NOW);
        t.heard(node(1), 2, Some(7), NOW + 10);
        t.heard(node(1), 5, None, NOW + 20); // a longer path does not raise the distance
        t.heard(node(2), 1, Some(8), NOW);
        t.heard(node(0), 1, Some(9), NOW); // ourselves: ignored
        let active = t.active(NOW + 30);
        assert_eq!(active.len(), 2);
        assert_eq!((active[0].node_id, active[0].hop_count), (node(2), 1));
        assert_eq!((active[1].node_id, active[1].hop_count), (node(1), 2));
        assert!(t.round_fulfilled(7) && t.round_fulfilled(8) && !t.round_fulfilled(9));
        assert_eq!(t.round_origins(7), vec![node(1)]);
        assert_eq!(t.recent_rounds(), vec![7, 8]);
        // Silent for more than three rounds: no longer active.
        assert!(t.active(NOW + 100_000).is_empty());
        t.set_own_active(true);
        assert_eq!(t.active(NOW + 100_000)[0].hop_count, 0);
        assert_eq!(t.rankable(NOW + 30).len(), 2);
        assert!(t.rankable(NOW + 61_000).is_empty());
    }
}
