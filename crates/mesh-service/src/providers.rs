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

use std::borrow::Cow;
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
    /// Distance of the shortest copy heard within the last round (then the latest copy's).
    hop_count: u8,
    hop_seen_ms: i64,
    /// When its last batch arrived: a provider counts as active only while it delivers.
    last_batch_ms: Option<i64>,
    /// When its last batch that could be a round's delivery arrived ([`ProviderTracker::check_claim`]):
    /// only such providers are ranked for mesh coordination.
    last_delivery_ms: Option<i64>,
}

/// What the node knows of the providers.
#[derive(Debug)]
pub struct ProviderTracker {
    interval: Duration,
    own: NodeId,
    own_active: bool,
    providers: HashMap<NodeId, Heard>,
    /// When this node's own last batch went out (it lists itself only while it delivers).
    own_last_batch_ms: Option<i64>,
    /// When this node became a provider: it gets one delivery window to deliver.
    own_since_ms: Option<i64>,
    /// Recent rounds and the providers whose batch for the round arrived (valid claims only).
    fulfilled: BTreeMap<u64, Vec<NodeId>>,
    /// The `(chain, address)` pairs this node's provider fetches (addresses in canonical
    /// form): a batch must carry all of them but [`allowed_missing`] to count as the delivery
    /// of a round.
    own_assets: HashSet<(String, String)>,
    max_providers: usize,
}

/// How many of `assets` configured assets a batch may lack and still count as its round's
/// delivery: a tenth (at least one from five assets on). Birdeye sometimes has no price for a
/// token; every provider then lacks it, and demanding it would have the next rank fetch the
/// round again, every round. A tiny batch (the cheap way to claim rounds) still does not count.
pub fn allowed_missing(assets: usize) -> usize {
    if assets >= 5 { (assets / 10).max(1) } else { 0 }
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
            own_last_batch_ms: None,
            own_since_ms: None,
            fulfilled: BTreeMap::new(),
            own_assets: own_assets
                .into_iter()
                .map(|(chain, asset)| {
                    let asset = mesh_protocol::canonical_asset(&asset).into_owned();
                    (chain, asset)
                })
                .collect(),
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
            let carried: HashSet<(&str, Cow<'_, str>)> = claim
                .prices
                .iter()
                .map(|p| (p.blockchain.as_str(), mesh_protocol::canonical_asset(&p.asset)))
                .collect();
            let missing = self
                .own_assets
                .iter()
                .filter(|(c, a)| !carried.contains(&(c.as_str(), Cow::Borrowed(a.as_str()))))
                .count();
            if missing > allowed_missing(self.own_assets.len()) {
                return Err(ClaimRejected::AssetsNotCovered);
            }
        }
        Ok(())
    }

    /// Whether this node itself is a provider now (from `now_ms`).
    pub fn set_own_active(&mut self, active: bool, now_ms: i64) {
        if active && !self.own_active {
            self.own_since_ms = Some(now_ms);
        }
        self.own_active = active;
    }

    fn active_window_ms(&self) -> i64 {
        // Three rounds, and never less than 90 s, so a provider is not dropped for one miss.
        (3 * self.interval.as_millis() as i64).max(90_000)
    }

    /// How recently a provider must have delivered a batch to count as active: with `n`
    /// providers taking turns (a random ranking each round) each fetches about one round in
    /// `n`, so ten turns' worth (`10 x n` rounds): a healthy provider goes that long without
    /// a turn with a probability of about e^-10, where three turns (e^-3, 5 %) had healthy
    /// providers drop out and come back every few minutes. A provider whose rounds all fail
    /// (Birdeye credits gone) drops out within that.
    fn delivery_window_ms(&self, now_ms: i64) -> i64 {
        let window = self.active_window_ms();
        let heard = self.providers.values().filter(|h| now_ms - h.last_seen_ms <= window).count();
        // Capped, so that announces from many keys cannot keep a silent provider listed.
        let providers = (heard + usize::from(self.own_active)).clamp(1, 10) as i64;
        10 * self.interval_ms() * providers
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
            if batch.is_some() {
                self.own_last_batch_ms = Some(now_ms);
            }
            return Ok(());
        }
        if !self.providers.contains_key(&origin) && self.providers.len() >= self.max_providers {
            self.expire(now_ms);
            if self.providers.len() >= self.max_providers {
                return Ok(());
            }
        }
        let round_ms = self.interval_ms();
        let entry = self.providers.entry(origin).or_insert(Heard {
            last_seen_ms: now_ms,
            hop_count,
            hop_seen_ms: now_ms,
            last_batch_ms: None,
            last_delivery_ms: None,
        });
        // The shortest path heard within the last round: a copy that came the long way does
        // not count, but once the short path has been silent for a round (a link dropped),
        // the distance follows the copies that still come.
        if hop_count <= entry.hop_count || now_ms - entry.hop_seen_ms > round_ms {
            entry.hop_count = hop_count;
            entry.hop_seen_ms = now_ms;
        }
        entry.last_seen_ms = now_ms;
        if batch.is_some() {
            entry.last_batch_ms = Some(now_ms);
        }
        // Only recent rounds matter, by this node's clock (never by a batch's claim).
        let keep_from = self.round_at(now_ms).saturating_sub(KEEP_ROUNDS);
        self.fulfilled.retain(|r, _| *r >= keep_from);
        let Some(claim) = batch else {
            return Ok(());
        };
        let checked = self.check_claim(&claim, now_ms);
        if checked.is_ok() {
            if let Some(entry) = self.providers.get_mut(&origin) {
                entry.last_delivery_ms = Some(now_ms);
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

    /// Providers that delivered a batch recently (this node first when it is one and its
    /// rounds succeed), for the status (issue 33: announces alone do not make a provider
    /// active).
    pub fn active(&self, now_ms: i64) -> Vec<ActiveProvider> {
        let window = self.active_window_ms();
        let delivery = self.delivery_window_ms(now_ms);
        let delivered = |at: Option<i64>| at.is_some_and(|at| now_ms - at <= delivery);
        let mut list: Vec<ActiveProvider> = self
            .providers
            .iter()
            .filter(|(_, h)| now_ms - h.last_seen_ms <= window && delivered(h.last_batch_ms))
            .map(|(id, h)| ActiveProvider {
                node_id: *id,
                hop_count: h.hop_count,
                last_seen: rfc3339(h.last_seen_ms),
            })
            .collect();
        list.sort_by(|a, b| a.hop_count.cmp(&b.hop_count).then(a.node_id.cmp(&b.node_id)));
        // Since it became a provider, or since its last batch: a node whose every round fails
        // drops out like any other.
        if self.own_active
            && (self.own_since_ms.is_some_and(|at| now_ms - at <= delivery)
                || delivered(self.own_last_batch_ms))
        {
            list.insert(
                0,
                ActiveProvider { node_id: self.own, hop_count: 0, last_seen: rfc3339(now_ms) },
            );
        }
        list
    }

    /// Providers to rank for mesh coordination: heard within two rounds and delivered a batch
    /// that could be a round's (all the assets, its own round) recently. A key that only
    /// announces itself, or sends batches that cannot be a round's, takes no rank (and no
    /// slot that the others would wait for); a new provider is ranked once its first batch
    /// arrives.
    pub fn rankable(&self, now_ms: i64) -> Vec<NodeId> {
        let window = 2 * self.interval.as_millis() as i64;
        let delivery = self.delivery_window_ms(now_ms);
        self.providers
            .iter()
            .filter(|(_, h)| {
                now_ms - h.last_seen_ms <= window
                    && h.last_delivery_ms.is_some_and(|at| now_ms - at <= delivery)
            })
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
        t.set_own_active(true, NOW + 100_000);
        assert_eq!(t.active(NOW + 100_000)[0].hop_count, 0);
        assert_eq!(t.rankable(NOW + 30).len(), 2);
        assert!(t.rankable(NOW + 61_000).is_empty());
    }

    /// Issue 31 item 3: claims that cannot be a round's delivery do not mark it fetched, and no
    /// claim can empty the table.
    /// A token Birdeye has no price for is missing from every provider's batch: such a batch
    /// still delivers the round (else the next rank fetches it again, every round), a batch
    /// lacking more does not. Checksummed and lower-case addresses are one asset.
    #[test]
    fn a_batch_lacking_a_tenth_of_the_assets_still_delivers_its_round() {
        let nine: Vec<(String, String)> =
            (0..9).map(|i| ("ethereum".to_owned(), format!("0x{i:040x}"))).collect();
        let mut t = ProviderTracker::new(node(0), Duration::from_secs(30), nine.clone());
        let at = ROUND as i64 * 30_000 + 1_000;
        let one_short = prices(&nine[1..]);
        let claim = BatchClaim { round: ROUND, created_at_ms: at, prices: &one_short };
        assert_eq!(t.heard(node(1), 1, Some(claim), NOW), Ok(()));
        let two_short = prices(&nine[2..]);
        let claim = BatchClaim { round: ROUND, created_at_ms: at, prices: &two_short };
        assert_eq!(t.heard(node(2), 1, Some(claim), NOW), Err(ClaimRejected::AssetsNotCovered));
        let mut shouting = prices(&nine);
        for p in &mut shouting {
            p.asset = p.asset.to_uppercase().replacen("0X", "0x", 1);
        }
        let claim = BatchClaim { round: ROUND, created_at_ms: at, prices: &shouting };
        assert_eq!(t.heard(node(3), 1, Some(claim), NOW), Ok(()));
        assert_eq!((allowed_missing(4), allowed_missing(9), allowed_missing(30)), (0, 1, 3));
    }

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
        // The hostile peer is still heard of (its prices count elsewhere), but claims nothing
        // and takes no rank.
        assert_eq!(t.active(NOW).len(), 1);
        assert!(t.rankable(NOW).is_empty());

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

    /// Issue 33 item 4: announces alone do not make a provider active; one whose batches stop
    /// (Birdeye credits gone) drops out, this node included; the distance follows the path
    /// copies still take once the short one has been silent for a round.
    #[test]
    fn active_providers_are_providers_that_deliver() {
        let mut t = tracker();
        let full = prices(&assets());
        let batch =
            |at: i64| BatchClaim { round: (at / 30_000) as u64, created_at_ms: at, prices: &full };
        t.heard(node(1), 1, None, NOW).unwrap();
        assert!(t.active(NOW).is_empty(), "announced only");
        t.heard(node(1), 1, Some(batch(NOW)), NOW).unwrap();
        t.heard(node(2), 2, Some(batch(NOW)), NOW).unwrap();
        assert_eq!(t.active(NOW).len(), 2);
        // node(1) keeps announcing but sends no batch: two providers, ten turns each (twenty
        // rounds, 600 s) later it is gone; node(2) delivered meanwhile.
        for step in 1..=21 {
            let at = NOW + step * 30_000;
            t.heard(node(1), 1, None, at).unwrap();
            t.heard(node(2), 2, Some(batch(at)), at).unwrap();
        }
        let t0 = NOW + 630_000;
        assert!(t.active(NOW + 590_000).iter().any(|p| p.node_id == node(1)), "within 600 s");
        let ids: Vec<NodeId> = t.active(t0).iter().map(|p| p.node_id).collect();
        assert_eq!(ids, vec![node(2)]);

        // This node: listed while it delivers, gone when its rounds all fail.
        t.set_own_active(true, t0);
        assert_eq!(t.active(t0)[0].node_id, node(0));
        t.heard(node(0), 0, Some(batch(t0 + 10_000)), t0 + 10_000).unwrap();
        assert_eq!(t.active(t0 + 60_000)[0].node_id, node(0));
        // Two providers heard: twenty rounds (600 s) without a batch of its own.
        let later = t0 + 10_000 + 601_000;
        t.heard(node(2), 2, Some(batch(later)), later).unwrap();
        assert!(t.active(later).iter().all(|p| p.node_id != node(0)), "own rounds failing");

        // Distance: direct link (1 hop), then it drops and copies come over 3 hops.
        let mut t = tracker();
        t.heard(node(3), 1, Some(batch(NOW)), NOW).unwrap();
        t.heard(node(3), 3, Some(batch(NOW + 1_000)), NOW + 1_000).unwrap();
        assert_eq!(t.active(NOW + 1_000)[0].hop_count, 1, "a longer copy of the same round");
        t.heard(node(3), 3, Some(batch(NOW + 31_000)), NOW + 31_000).unwrap();
        assert_eq!(t.active(NOW + 31_000)[0].hop_count, 3, "the short path is gone");
        t.heard(node(3), 2, None, NOW + 32_000).unwrap();
        assert_eq!(t.active(NOW + 32_000)[0].hop_count, 2);
    }
}
