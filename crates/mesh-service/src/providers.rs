//! Providers as the node learns them from the mesh: `ProviderAnnounce` messages and price
//! batches. It feeds the network status (`active_providers[].hop_count`) and, when Redis is
//! not there, the round coordination ([`MeshView`]): which providers to rank and whether a
//! round's batch already arrived.
//!
//! A batch counts as the delivery of its round only when it can be one (issue 31): its round is
//! the round of its own creation time (one round either way), the round is recent by this
//! node's clock, and it carries every asset this node's provider is configured for. Anyone may
//! sign a batch in an open mesh; a few tiny batches claiming every round, or one claiming round
//! `u64::MAX`, must not stop honest providers from fetching. The round planner further counts
//! only origins it ranks (registered or announced providers).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_coordination::MeshView;
use mesh_ipc::ActiveProvider;
use mesh_protocol::{NodeId, PriceUpdate};

use crate::book::rfc3339;

/// Rounds remembered behind the current one (by this node's clock).
const KEEP_ROUNDS: u64 = 16;
/// Origins remembered per round.
const MAX_ORIGINS_PER_ROUND: usize = 64;

/// What a price batch claims about its round.
#[derive(Debug, Clone, Copy)]
pub struct BatchClaim<'a> {
    /// The batch's `round`.
    pub round: u64,
    /// The batch's `created_at_ms` (signed).
    pub created_at_ms: i64,
    /// Its prices.
    pub prices: &'a [PriceUpdate],
}

/// Why a batch does not count as the delivery of its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRejected {
    /// Its round is not the round of its creation time (one round either way).
    RoundNotItsTime,
    /// Its round is too far behind or ahead of this node's current round.
    RoundNotRecent,
    /// It lacks some of the assets this node's provider fetches.
    AssetsNotCovered,
}

impl ClaimRejected {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            ClaimRejected::RoundNotItsTime => "round_not_its_time",
            ClaimRejected::RoundNotRecent => "round_not_recent",
            ClaimRejected::AssetsNotCovered => "assets_not_covered",
        }
    }
}

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
    /// Recent rounds and the providers whose batch for the round arrived (valid claims only).
    fulfilled: BTreeMap<u64, Vec<NodeId>>,
    /// The `(chain, address)` pairs this node's provider fetches: a batch must carry them all
    /// to count as the delivery of a round.
    own_assets: HashSet<(String, String)>,
    max_providers: usize,
}

impl ProviderTracker {
    /// A tracker for node `own` with rounds of `interval`, whose provider fetches `own_assets`
    /// (`(chain, address)` pairs; the configured `MESH_PROVIDER_ASSETS`).
    pub fn new(
        own: NodeId,
        interval: Duration,
        own_assets: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        Self {
            interval,
            own,
            own_active: false,
            providers: HashMap::new(),
            fulfilled: BTreeMap::new(),
            own_assets: own_assets.into_iter().collect(),
            max_providers: 1024,
        }
    }

    fn interval_ms(&self) -> i64 {
        (self.interval.as_millis() as i64).max(1)
    }

    fn round_at(&self, unix_ms: i64) -> u64 {
        (unix_ms.max(0) / self.interval_ms()) as u64
    }

    /// Whether `claim` can be the delivery of its round at `now_ms` (see the module docs).
    pub fn check_claim(&self, claim: &BatchClaim<'_>, now_ms: i64) -> Result<(), ClaimRejected> {
        let created_round = self.round_at(claim.created_at_ms);
        if claim.round.abs_diff(created_round) > 1 {
            return Err(ClaimRejected::RoundNotItsTime);
        }
        let now_round = self.round_at(now_ms);
        if claim.round.saturating_add(KEEP_ROUNDS) < now_round
            || claim.round > now_round.saturating_add(2)
        {
            return Err(ClaimRejected::RoundNotRecent);
        }
        if !self.own_assets.is_empty() {
            let carried: HashSet<(&str, &str)> =
                claim.prices.iter().map(|p| (p.blockchain.as_str(), p.asset.as_str())).collect();
            if !self.own_assets.iter().all(|(c, a)| carried.contains(&(c.as_str(), a.as_str()))) {
                return Err(ClaimRejected::AssetsNotCovered);
            }
        }
        Ok(())
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
    /// A batch marks its round delivered only when [`Self::check_claim`] accepts it; the
    /// answer says why not.
    pub fn heard(
        &mut self,
        origin: NodeId,
        hop_count: u8,
        batch: Option<BatchClaim<'_>>,
        now_ms: i64,
    ) -> Result<(), ClaimRejected> {
        if origin == self.own {
            return Ok(());
        }
        if !self.providers.contains_key(&origin) && self.providers.len() >= self.max_providers {
            self.expire(now_ms);
            if self.providers.len() >= self.max_providers {
                return Ok(());
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
        // Only recent rounds matter, by this node's clock (never by a batch's claim).
        let keep_from = self.round_at(now_ms).saturating_sub(KEEP_ROUNDS);
        self.fulfilled.retain(|r, _| *r >= keep_from);
        let Some(claim) = batch else {
            return Ok(());
        };
        let checked = self.check_claim(&claim, now_ms);
        if checked.is_ok() {
            if let Some(entry) = self.providers.get_mut(&origin) {
                entry.last_batch_round = Some(claim.round);
            }
            let origins = self.fulfilled.entry(claim.round).or_default();
            if !origins.contains(&origin) && origins.len() < MAX_ORIGINS_PER_ROUND {
                origins.push(origin);
            }
        }
        checked
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

    /// The providers whose valid batch for `round` arrived (recent rounds only).
    pub fn round_origins(&self, round: u64) -> Vec<NodeId> {
        self.fulfilled.get(&round).cloned().unwrap_or_default()
    }

    /// The rounds remembered, oldest first.
    pub fn recent_rounds(&self) -> Vec<u64> {
        self.fulfilled.keys().copied().collect()
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

    fn round_origins(&self, round: u64) -> Vec<NodeId> {
        self.lock().round_origins(round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At a round boundary of 30 s rounds.
    const NOW: i64 = 1_750_000_020_000;
    const ROUND: u64 = (NOW / 30_000) as u64;

    fn node(n: u8) -> NodeId {
        NodeId::from_public_key(&[n; 32])
    }

    fn assets() -> Vec<(String, String)> {
        vec![("solana".into(), "So111".into()), ("ethereum".into(), "0xabc".into())]
    }

    fn prices(list: &[(String, String)]) -> Vec<PriceUpdate> {
        list.iter()
            .map(|(chain, asset)| PriceUpdate {
                asset: asset.clone(),
                blockchain: chain.clone(),
                price: "1.5".parse().unwrap(),
                timestamp_ms: NOW,
                change_24h: None,
                source_timestamp_ms: None,
            })
            .collect()
    }

    fn tracker() -> ProviderTracker {
        ProviderTracker::new(node(0), Duration::from_secs(30), assets())
    }

    #[test]
    fn tracks_hop_counts_rounds_and_activity() {
        let mut t = tracker();
        let full = prices(&assets());
        let claim =
            |round: u64| BatchClaim { round, created_at_ms: round as i64 * 30_000, prices: &full };
        t.heard(node(1), 3, None, NOW).unwrap();
        t.heard(node(1), 2, Some(claim(ROUND - 2)), NOW + 10).unwrap();
        t.heard(node(1), 5, None, NOW + 20).unwrap(); // a longer path does not raise the distance
        t.heard(node(2), 1, Some(claim(ROUND - 1)), NOW).unwrap();
        t.heard(node(0), 1, Some(claim(ROUND)), NOW).unwrap(); // ourselves: ignored
        let active = t.active(NOW + 30);
        assert_eq!(active.len(), 2);
        assert_eq!((active[0].node_id, active[0].hop_count), (node(2), 1));
        assert_eq!((active[1].node_id, active[1].hop_count), (node(1), 2));
        assert!(t.round_fulfilled(ROUND - 2) && t.round_fulfilled(ROUND - 1));
        assert!(!t.round_fulfilled(ROUND));
        assert_eq!(t.round_origins(ROUND - 2), vec![node(1)]);
        assert_eq!(t.recent_rounds(), vec![ROUND - 2, ROUND - 1]);
        // Silent for more than three rounds: no longer active.
        assert!(t.active(NOW + 100_000).is_empty());
        t.set_own_active(true);
        assert_eq!(t.active(NOW + 100_000)[0].hop_count, 0);
        assert_eq!(t.rankable(NOW + 30).len(), 2);
        assert!(t.rankable(NOW + 61_000).is_empty());
    }

    /// Issue 31 item 3: claims that cannot be a round's delivery do not mark it fetched, and no
    /// claim can empty the table.
    #[test]
    fn only_timely_covering_batches_mark_a_round_delivered() {
        let mut t = tracker();
        let full = prices(&assets());
        let tiny = prices(&assets()[..1]);
        let mut extra = assets();
        extra.push(("base".into(), "0xdef".into()));
        let more = prices(&extra);
        let at = |round: u64| round as i64 * 30_000 + 1_000;
        let hostile = node(9);

        // A tiny batch claiming the current round: assets missing.
        let tiny_claim = BatchClaim { round: ROUND, created_at_ms: at(ROUND), prices: &tiny };
        assert_eq!(
            t.heard(hostile, 1, Some(tiny_claim), NOW),
            Err(ClaimRejected::AssetsNotCovered)
        );
        // A full batch whose round is not its creation time's.
        let early = BatchClaim { round: ROUND + 1, created_at_ms: at(ROUND - 1), prices: &full };
        assert_eq!(t.heard(hostile, 1, Some(early), NOW), Err(ClaimRejected::RoundNotItsTime));
        // A round far ahead (created_at made to match) or far behind.
        for round in [ROUND + 3, ROUND - 17, u64::MAX] {
            let created_at_ms = (round as i128 * 30_000).min(i64::MAX as i128) as i64;
            let far = BatchClaim { round, created_at_ms, prices: &full };
            assert!(t.heard(hostile, 1, Some(far), NOW).is_err(), "round {round}");
        }
        assert!(t.recent_rounds().is_empty(), "{:?}", t.recent_rounds());
        // The hostile peer is still heard of (its prices count elsewhere), but claims nothing.
        assert_eq!(t.active(NOW).len(), 1);

        // Honest batches: one round either way of their creation time, a superset of assets.
        t.heard(
            node(1),
            1,
            Some(BatchClaim { round: ROUND - 3, created_at_ms: at(ROUND - 3), prices: &full }),
            NOW,
        )
        .unwrap();
        t.heard(
            node(2),
            1,
            Some(BatchClaim { round: ROUND, created_at_ms: at(ROUND - 1), prices: &more }),
            NOW,
        )
        .unwrap();
        assert_eq!(t.recent_rounds(), vec![ROUND - 3, ROUND]);
        // Round u64::MAX with a matching time (a claim the validator would also refuse) does not
        // wipe what is known.
        let max = BatchClaim { round: u64::MAX, created_at_ms: i64::MAX, prices: &full };
        assert!(t.heard(hostile, 1, Some(max), NOW).is_err());
        assert_eq!(t.recent_rounds(), vec![ROUND - 3, ROUND]);
        // Old rounds leave as this node's clock moves on.
        t.heard(node(1), 1, None, NOW + 30_000 * 14).unwrap();
        assert_eq!(t.recent_rounds(), vec![ROUND]);
    }
}
