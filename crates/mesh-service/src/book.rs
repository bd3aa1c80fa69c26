//! The price book (ARCHITECTURE section 8): per (blockchain, asset) the latest accepted update
//! of each provider. It serves the newest, with its age, hop count and how many providers
//! agree, flags two providers' fresh prices that differ by more than the threshold, and rates
//! the freshness of the whole node.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use bigdecimal::BigDecimal;
use mesh_ipc::{DataFreshness, Discrepancy, PriceFilter, PriceView};
use mesh_protocol::{Decimal, NodeId, PriceUpdate};

/// Price book settings.
#[derive(Debug, Clone)]
pub struct BookConfig {
    /// `MESH_STALENESS_THRESHOLD_SECS`: a price older than this is stale.
    pub staleness: Duration,
    /// The fetch interval: data younger than two intervals is fresh, and only fresh prices of
    /// different providers are compared.
    pub fetch_interval: Duration,
    /// `MESH_PRICE_DISCREPANCY_THRESHOLD_PERCENT`, of the lower price.
    pub discrepancy_threshold_percent: f64,
    /// Most assets held; updates for further assets are dropped (and counted).
    pub max_assets: usize,
    /// Most providers remembered per asset. A new one takes the place of the quote heard
    /// longest ago only when that quote is no longer fresh: a fresh quote belongs to its origin,
    /// and no other origin may push it out.
    pub max_providers_per_asset: usize,
    /// Most quotes one origin holds over all assets; past it, the origin's own oldest quote
    /// makes room, so one origin (a throwaway key in an open mesh) can only evict its own.
    pub max_quotes_per_origin: usize,
}

/// Default of [`BookConfig::max_quotes_per_origin`]: twice what one provider can send in a
/// batch ([`mesh_protocol::MAX_PRICES_PER_BATCH`]), so a provider that changes its asset list
/// keeps its old quotes until they age out.
pub const DEFAULT_MAX_QUOTES_PER_ORIGIN: usize = 2 * mesh_protocol::MAX_PRICES_PER_BATCH;

impl Default for BookConfig {
    fn default() -> Self {
        Self {
            staleness: Duration::from_secs(3600),
            fetch_interval: Duration::from_secs(30),
            discrepancy_threshold_percent: 5.0,
            max_assets: 100_000,
            max_providers_per_asset: 64,
            max_quotes_per_origin: DEFAULT_MAX_QUOTES_PER_ORIGIN,
        }
    }
}

#[derive(Debug, Clone)]
struct Quote {
    price: Decimal,
    value: BigDecimal,
    change_24h: Option<Decimal>,
    timestamp_ms: i64,
    hop_count: u8,
}

#[derive(Debug, Default)]
struct AssetEntry {
    quotes: HashMap<NodeId, Quote>,
    discrepancy: bool,
}

type Key = (String, String);

/// What one batch changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// Served prices that changed (new price, or discrepancy flag changed).
    pub changed: Vec<PriceView>,
    /// Discrepancies found.
    pub discrepancies: Vec<Discrepancy>,
    /// Updates ignored because the provider had sent a newer one.
    pub older: usize,
    /// Updates dropped because the book is full, or the asset holds the most providers and
    /// all their quotes are fresh.
    pub dropped: usize,
    /// Indexes (into the batch) of the updates the book took: what the stores should hold.
    pub accepted: Vec<usize>,
}

/// The latest price of every provider for every asset.
#[derive(Debug)]
pub struct PriceBook {
    config: BookConfig,
    threshold: BigDecimal,
    assets: HashMap<Key, AssetEntry>,
    /// The assets each origin holds a quote of (bounded by `max_quotes_per_origin` each).
    origin_keys: HashMap<NodeId, HashSet<Key>>,
    newest_timestamp_ms: Option<i64>,
    last_update_ms: Option<i64>,
}

impl PriceBook {
    /// An empty book.
    pub fn new(config: BookConfig) -> Self {
        let threshold =
            BigDecimal::from_str(&format!("{:.6}", config.discrepancy_threshold_percent))
                .unwrap_or_else(|_| BigDecimal::from(5));
        Self {
            config,
            threshold,
            assets: HashMap::new(),
            origin_keys: HashMap::new(),
            newest_timestamp_ms: None,
            last_update_ms: None,
        }
    }

    /// Number of assets held.
    pub fn len(&self) -> usize {
        self.assets.len()
    }

    /// `true` when no price is held.
    pub fn is_empty(&self) -> bool {
        self.assets.is_empty()
    }

    /// Timestamp of the newest price held (Unix ms).
    pub fn newest_timestamp_ms(&self) -> Option<i64> {
        self.newest_timestamp_ms
    }

    /// When the newest update arrived (Unix ms).
    pub fn last_update_ms(&self) -> Option<i64> {
        self.last_update_ms
    }

    /// Age of the newest price, by its timestamp.
    pub fn data_age(&self, now_ms: i64) -> Option<Duration> {
        self.newest_timestamp_ms.map(|ts| Duration::from_millis((now_ms - ts).max(0) as u64))
    }

    fn fresh(&self, quote: &Quote, now_ms: i64) -> bool {
        let window = 2 * self.config.fetch_interval.as_millis() as i64;
        now_ms - quote.timestamp_ms < window
    }

    /// Applies a batch from `origin` that travelled `hop_count` hops, received at `now_ms`.
    pub fn apply(
        &mut self,
        origin: NodeId,
        hop_count: u8,
        updates: &[PriceUpdate],
        now_ms: i64,
    ) -> Applied {
        let mut applied = Applied::default();
        let max_providers = self.config.max_providers_per_asset.max(1);
        let max_per_origin = self.config.max_quotes_per_origin.max(1);
        for (index, update) in updates.iter().enumerate() {
            let key = (update.blockchain.clone(), update.asset.clone());
            if !self.assets.contains_key(&key) && self.assets.len() >= self.config.max_assets {
                applied.dropped += 1;
                continue;
            }
            let quote = Quote {
                price: update.price.clone(),
                value: update.price.value(),
                change_24h: update.change_24h.clone(),
                timestamp_ms: update.timestamp_ms,
                hop_count,
            };
            let held = self.assets.get(&key).and_then(|e| e.quotes.get(&origin));
            if held.is_some_and(|held| held.timestamp_ms >= quote.timestamp_ms) {
                applied.older += 1;
                continue;
            }
            if held.is_none() {
                // A new quote: room on the asset (a stale quote's, never a fresh one's)...
                let oldest =
                    self.assets.get(&key).filter(|e| e.quotes.len() >= max_providers).and_then(
                        |e| {
                            e.quotes
                                .iter()
                                .min_by_key(|(_, q)| q.timestamp_ms)
                                .map(|(n, q)| (*n, q.clone()))
                        },
                    );
                if let Some((oldest, oldest_quote)) = oldest {
                    if self.fresh(&oldest_quote, now_ms) {
                        applied.dropped += 1;
                        continue;
                    }
                    self.remove_quote(&key, oldest);
                }
                // ...and room within the origin's own share.
                if self.origin_keys.get(&origin).is_some_and(|own| own.len() >= max_per_origin)
                    && let Some(victim) = self.oldest_of(origin)
                {
                    self.remove_quote(&victim, origin);
                }
                self.origin_keys.entry(origin).or_default().insert(key.clone());
            }
            applied.accepted.push(index);
            let before = self.served_key(&key);
            let entry = self.assets.entry(key.clone()).or_default();
            let was_flagged = entry.discrepancy;
            entry.quotes.insert(origin, quote.clone());
            self.newest_timestamp_ms = Some(
                self.newest_timestamp_ms.map_or(quote.timestamp_ms, |t| t.max(quote.timestamp_ms)),
            );
            self.last_update_ms = Some(now_ms);

            let found = self.compare(&key, origin, &quote, now_ms);
            let flagged = !found.is_empty() || self.any_disagreement(&key, now_ms);
            if let Some(e) = self.assets.get_mut(&key) {
                e.discrepancy = flagged;
            }
            applied.discrepancies.extend(found);
            let after = self.served_key(&key);
            if (before != after || was_flagged != flagged)
                && let Some(view) = self.view_of(&key, now_ms)
            {
                applied.changed.push(view);
            }
        }
        applied
    }

    /// The asset of `origin`'s oldest quote.
    fn oldest_of(&self, origin: NodeId) -> Option<Key> {
        self.origin_keys
            .get(&origin)?
            .iter()
            .filter_map(|key| {
                let ts = self.assets.get(key)?.quotes.get(&origin)?.timestamp_ms;
                Some((ts, key))
            })
            .min()
            .map(|(_, key)| key.clone())
    }

    /// Removes `origin`'s quote of `key`, and the asset when no quote is left.
    fn remove_quote(&mut self, key: &Key, origin: NodeId) {
        if let Some(entry) = self.assets.get_mut(key) {
            entry.quotes.remove(&origin);
            if entry.quotes.is_empty() {
                self.assets.remove(key);
            }
        }
        if let Some(own) = self.origin_keys.get_mut(&origin) {
            own.remove(key);
            if own.is_empty() {
                self.origin_keys.remove(&origin);
            }
        }
    }

    /// Forgets every quote whose timestamp is older than `cutoff_ms`, and the assets left with
    /// none (`MESH_PRICE_RETENTION_SECS`). Returns the (blockchain, asset) pairs forgotten.
    pub fn forget_older_than(&mut self, cutoff_ms: i64) -> Vec<(String, String)> {
        let mut gone = Vec::new();
        let mut newest: Option<i64> = None;
        let origin_keys = &mut self.origin_keys;
        self.assets.retain(|key, entry| {
            entry.quotes.retain(|origin, quote| {
                let keep = quote.timestamp_ms >= cutoff_ms;
                if keep {
                    newest = Some(newest.map_or(quote.timestamp_ms, |n| n.max(quote.timestamp_ms)));
                } else if let Some(own) = origin_keys.get_mut(origin) {
                    own.remove(key);
                }
                keep
            });
            if entry.quotes.is_empty() {
                gone.push(key.clone());
            }
            !entry.quotes.is_empty()
        });
        self.origin_keys.retain(|_, own| !own.is_empty());
        self.newest_timestamp_ms = newest;
        gone
    }

    /// Number of quotes `origin` holds.
    pub fn quotes_of(&self, origin: &NodeId) -> usize {
        self.origin_keys.get(origin).map_or(0, HashSet::len)
    }

    /// Number of quotes held, over all assets and origins.
    pub fn quote_count(&self) -> usize {
        self.assets.values().map(|e| e.quotes.len()).sum()
    }

    /// Identity of the served quote, to tell whether it changed.
    fn served_key(&self, key: &Key) -> Option<(NodeId, i64)> {
        let entry = self.assets.get(key)?;
        served(entry).map(|(id, q)| (*id, q.timestamp_ms))
    }

    /// Discrepancies between `origin`'s new quote and the other providers' fresh ones.
    fn compare(&self, key: &Key, origin: NodeId, quote: &Quote, now_ms: i64) -> Vec<Discrepancy> {
        let Some(entry) = self.assets.get(key) else { return Vec::new() };
        if !self.fresh(quote, now_ms) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (other, q) in &entry.quotes {
            if *other == origin || !self.fresh(q, now_ms) {
                continue;
            }
            if self.exceeds(&quote.value, &q.value)
                && let Some(percent) = difference_percent(&quote.value, &q.value)
            {
                out.push(Discrepancy {
                    asset: key.1.clone(),
                    blockchain: key.0.clone(),
                    node_a: origin,
                    price_a: quote.price.clone(),
                    node_b: *other,
                    price_b: q.price.clone(),
                    difference_percent: percent
                        .with_scale_round(2, bigdecimal::RoundingMode::HalfUp)
                        .to_string(),
                    detected_at: rfc3339(now_ms),
                });
            }
        }
        out
    }

    fn any_disagreement(&self, key: &Key, now_ms: i64) -> bool {
        let Some(entry) = self.assets.get(key) else { return false };
        let fresh: Vec<&Quote> = entry.quotes.values().filter(|q| self.fresh(q, now_ms)).collect();
        fresh
            .iter()
            .enumerate()
            .any(|(i, a)| fresh[i + 1..].iter().any(|b| self.exceeds(&a.value, &b.value)))
    }

    /// Whether `a` and `b` differ by more than the threshold: |a - b| in percent of the lower
    /// of the two is above it (never when the lower is not positive). Exact, and without a
    /// division: |a - b| × 100 > threshold × lower. A `BigDecimal` division works to 100
    /// digits; with several providers it was most of a consumer's CPU time (a division per
    /// pair of quotes, per price, per batch).
    fn exceeds(&self, a: &BigDecimal, b: &BigDecimal) -> bool {
        let low = a.min(b);
        bigdecimal::Signed::is_positive(low)
            && (a - b).abs() * BigDecimal::from(100) > &self.threshold * low
    }

    fn view_of(&self, key: &Key, now_ms: i64) -> Option<PriceView> {
        let entry = self.assets.get(key)?;
        let (source, quote) = served(entry)?;
        let fresh: Vec<&Quote> = entry.quotes.values().filter(|q| self.fresh(q, now_ms)).collect();
        let agreeing = fresh
            .iter()
            .filter(|q| {
                bigdecimal::Signed::is_positive(std::cmp::min(&q.value, &quote.value))
                    && !self.exceeds(&q.value, &quote.value)
            })
            .count();
        let age_ms = (now_ms - quote.timestamp_ms).max(0);
        Some(PriceView {
            asset: key.1.clone(),
            blockchain: key.0.clone(),
            price: quote.price.clone(),
            change_24h: quote.change_24h.clone(),
            timestamp: rfc3339(quote.timestamp_ms),
            timestamp_ms: quote.timestamp_ms,
            source_node_id: *source,
            age_secs: (age_ms / 1000) as u64,
            stale: age_ms as u128 > self.config.staleness.as_millis(),
            hop_count: quote.hop_count,
            providers_reporting: fresh.len() as u32,
            providers_agreeing: agreeing as u32,
            discrepancy: entry.discrepancy,
        })
    }

    /// The served prices matching `filter`, sorted by chain then asset.
    pub fn view(&self, filter: &PriceFilter, now_ms: i64) -> Vec<PriceView> {
        let mut keys: Vec<&Key> =
            self.assets.keys().filter(|(c, a)| filter.matches(c, a)).collect();
        keys.sort();
        keys.into_iter().filter_map(|k| self.view_of(k, now_ms)).collect()
    }

    /// Freshness of the whole node: `Fresh` while the newest price is younger than two fetch
    /// intervals, then minutes, then hours; `Stale` with no data or past the threshold.
    pub fn freshness(&self, now_ms: i64) -> DataFreshness {
        let Some(age) = self.data_age(now_ms) else { return DataFreshness::Stale };
        if age > self.config.staleness {
            DataFreshness::Stale
        } else if age < 2 * self.config.fetch_interval {
            DataFreshness::Fresh
        } else if age < Duration::from_secs(3600) {
            DataFreshness::MinutesAgo(age.as_secs() / 60)
        } else {
            DataFreshness::HoursAgo(age.as_secs() / 3600)
        }
    }
}

/// The newest quote (ties: the lower node id, so every node serves the same one).
fn served(entry: &AssetEntry) -> Option<(&NodeId, &Quote)> {
    entry
        .quotes
        .iter()
        .max_by(|(a_id, a), (b_id, b)| a.timestamp_ms.cmp(&b.timestamp_ms).then(b_id.cmp(a_id)))
}

/// Unix milliseconds as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// |a - b| in percent of the lower of the two; `None` when the lower is not positive. Only
/// for the report of a discrepancy (`PriceBook::exceeds` decides whether there is one).
fn difference_percent(a: &BigDecimal, b: &BigDecimal) -> Option<BigDecimal> {
    let low = a.min(b);
    if !bigdecimal::Signed::is_positive(low) {
        return None;
    }
    Some((a - b).abs() * BigDecimal::from(100) / low)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    fn node(n: u8) -> NodeId {
        NodeId::from_public_key(&[n; 32])
    }

    fn update(asset: &str, price: &str, ts: i64) -> PriceUpdate {
        PriceUpdate {
            asset: asset.into(),
            blockchain: "solana".into(),
            price: price.parse().unwrap(),
            timestamp_ms: ts,
            change_24h: None,
        }
    }

    fn book() -> PriceBook {
        PriceBook::new(BookConfig::default())
    }

    #[test]
    fn each_origin_holds_at_most_its_share_and_evicts_only_its_own() {
        let config = BookConfig {
            max_quotes_per_origin: 30,
            max_providers_per_asset: 4,
            ..BookConfig::default()
        };
        let mut b = PriceBook::new(config);
        // An honest provider's ten assets.
        let honest: Vec<PriceUpdate> =
            (0..10).map(|i| update(&format!("HONEST{i}"), "1", NOW)).collect();
        assert_eq!(b.apply(node(1), 1, &honest, NOW).accepted.len(), 10);
        // Fifty origins, each sending a hundred assets of its own and the honest ones.
        for origin in 2..52 {
            for round in 0..5 {
                let batch: Vec<PriceUpdate> = (0..20)
                    .map(|i| update(&format!("O{origin}A{}", round * 20 + i), "2", NOW + round))
                    .chain((0..10).map(|i| update(&format!("HONEST{i}"), "3", NOW + round)))
                    .collect();
                b.apply(node(origin), 1, &batch, NOW + round);
                assert!(b.quotes_of(&node(origin)) <= 30, "origin {origin}");
            }
        }
        // The honest provider's quotes are all there: nobody else could push them out.
        assert_eq!(b.quotes_of(&node(1)), 10);
        // Bounds: 30 quotes per origin; at most four providers per asset.
        assert!(b.quote_count() <= 10 + 50 * 30, "{}", b.quote_count());
        assert!(b.view(&PriceFilter::default(), NOW).len() <= 10 + 50 * 30);
        // An origin's newest assets are kept, its oldest evicted.
        let held: Vec<String> = b
            .view(&PriceFilter::default(), NOW)
            .into_iter()
            .filter(|v| v.source_node_id == node(2))
            .map(|v| v.asset)
            .collect();
        assert!(held.contains(&"O2A99".to_owned()) && !held.contains(&"O2A0".to_owned()));
    }

    #[test]
    fn a_full_asset_takes_a_new_provider_only_in_place_of_a_stale_quote() {
        let config = BookConfig { max_providers_per_asset: 2, ..BookConfig::default() };
        let mut b = PriceBook::new(config);
        b.apply(node(1), 1, &[update("SOL", "1", NOW - 3_600_000)], NOW);
        b.apply(node(2), 1, &[update("SOL", "1", NOW)], NOW);
        let applied = b.apply(node(3), 1, &[update("SOL", "1", NOW)], NOW);
        assert_eq!((applied.accepted.len(), applied.dropped), (1, 0), "the stale quote made room");
        let applied = b.apply(node(4), 1, &[update("SOL", "1", NOW)], NOW);
        assert_eq!((applied.accepted.len(), applied.dropped), (0, 1), "fresh quotes stay");
        assert_eq!(
            (b.quotes_of(&node(1)), b.quotes_of(&node(2)), b.quotes_of(&node(3))),
            (0, 1, 1)
        );
    }

    #[test]
    fn quotes_older_than_the_retention_are_forgotten() {
        let mut b = book();
        b.apply(node(1), 1, &[update("OLD", "1", NOW - 10_000), update("NEW", "1", NOW)], NOW);
        b.apply(node(2), 1, &[update("NEW", "2", NOW - 10_000)], NOW);
        let gone = b.forget_older_than(NOW - 5_000);
        assert_eq!(gone, vec![("solana".to_owned(), "OLD".to_owned())]);
        assert_eq!((b.len(), b.quote_count(), b.quotes_of(&node(2))), (1, 1, 0));
        assert_eq!(b.newest_timestamp_ms(), Some(NOW));
        assert_eq!(b.forget_older_than(NOW + 1).len(), 1);
        assert!(b.is_empty() && b.newest_timestamp_ms().is_none());
    }

    #[test]
    fn serves_the_newest_price_with_age_hops_and_agreement() {
        let mut b = book();
        b.apply(node(1), 2, &[update("SOL", "150", NOW - 4000)], NOW);
        let applied = b.apply(node(2), 3, &[update("SOL", "151", NOW - 1000)], NOW);
        assert_eq!(applied.changed.len(), 1);
        let v = &b.view(&PriceFilter::default(), NOW)[0];
        assert_eq!(v.price.to_string(), "151");
        assert_eq!(v.source_node_id, node(2));
        assert_eq!((v.age_secs, v.hop_count, v.stale), (1, 3, false));
        assert_eq!((v.providers_reporting, v.providers_agreeing), (2, 2));
        assert!(!v.discrepancy);
    }

    #[test]
    fn an_older_update_never_replaces_a_newer_one() {
        let mut b = book();
        b.apply(node(1), 1, &[update("SOL", "150", NOW)], NOW);
        let applied = b.apply(node(1), 1, &[update("SOL", "140", NOW - 10)], NOW);
        assert_eq!(applied.older, 1);
        assert!(applied.changed.is_empty());
        assert_eq!(b.view(&PriceFilter::default(), NOW)[0].price.to_string(), "150");
    }

    #[test]
    fn a_difference_above_the_threshold_is_flagged_with_both_nodes() {
        let mut b = book();
        b.apply(node(1), 1, &[update("SOL", "100", NOW - 1000)], NOW);
        let applied = b.apply(node(2), 1, &[update("SOL", "110", NOW)], NOW);
        assert_eq!(applied.discrepancies.len(), 1);
        let d = &applied.discrepancies[0];
        assert_eq!((d.node_a, d.node_b), (node(2), node(1)));
        assert_eq!(d.difference_percent, "10.00");
        let v = &b.view(&PriceFilter::default(), NOW)[0];
        assert!(v.discrepancy);
        assert_eq!(v.providers_agreeing, 1);
        // Back in agreement: the flag clears.
        let applied = b.apply(node(1), 1, &[update("SOL", "109", NOW + 10)], NOW + 10);
        assert!(applied.discrepancies.is_empty());
        assert!(!b.view(&PriceFilter::default(), NOW + 10)[0].discrepancy);
        // Exactly at the threshold is not above it.
        let mut b = book();
        b.apply(node(1), 1, &[update("X", "100", NOW)], NOW);
        assert!(b.apply(node(2), 1, &[update("X", "105", NOW)], NOW).discrepancies.is_empty());
    }

    #[test]
    fn the_division_free_rule_agrees_with_the_percentage() {
        let values = [
            "0",
            "-1",
            "1",
            "1.05",
            "1.0500000001",
            "0.95",
            "3",
            "3.15",
            "100",
            "105",
            "105.01",
            "104.99",
            "0.000016",
            "0.0000168",
            "0.00001680000001",
            "7",
            "7.35",
            "7.3500001",
        ];
        for threshold in [5.0, 0.1, 33.333333] {
            let b = PriceBook::new(BookConfig {
                discrepancy_threshold_percent: threshold,
                ..BookConfig::default()
            });
            for x in values {
                for y in values {
                    let (x, y): (BigDecimal, BigDecimal) = (x.parse().unwrap(), y.parse().unwrap());
                    let by_division = difference_percent(&x, &y).is_some_and(|p| p > b.threshold);
                    assert_eq!(b.exceeds(&x, &y), by_division, "{x} vs {y} at {threshold} %");
                }
            }
        }
    }

    #[test]
    fn stale_quotes_are_not_compared() {
        let mut b = book();
        b.apply(node(1), 1, &[update("SOL", "100", NOW - 120_000)], NOW);
        assert!(b.apply(node(2), 1, &[update("SOL", "200", NOW)], NOW).discrepancies.is_empty());
    }

    #[test]
    fn freshness_follows_section_8() {
        let mut b = PriceBook::new(BookConfig {
            staleness: Duration::from_secs(7200),
            ..BookConfig::default()
        });
        assert_eq!(b.freshness(NOW), DataFreshness::Stale, "no data");
        b.apply(node(1), 1, &[update("SOL", "1", NOW)], NOW);
        assert_eq!(b.freshness(NOW + 59_000), DataFreshness::Fresh);
        assert_eq!(b.freshness(NOW + 61_000), DataFreshness::MinutesAgo(1));
        assert_eq!(b.freshness(NOW + 59 * 60_000), DataFreshness::MinutesAgo(59));
        assert_eq!(b.freshness(NOW + 61 * 60_000), DataFreshness::HoursAgo(1));
        assert_eq!(b.freshness(NOW + 7201 * 1000), DataFreshness::Stale);
        let v = &b.view(&PriceFilter::default(), NOW + 7201 * 1000)[0];
        assert!(v.stale);
    }

    #[test]
    fn filters_and_bounds() {
        let mut b = PriceBook::new(BookConfig { max_assets: 2, ..BookConfig::default() });
        let mut eth = update("WETH", "3000", NOW);
        eth.blockchain = "ethereum".into();
        b.apply(node(1), 1, &[update("SOL", "1", NOW), eth], NOW);
        let applied = b.apply(node(1), 1, &[update("JUP", "0.4", NOW + 1)], NOW);
        assert_eq!(applied.dropped, 1);
        let only = b.view(&PriceFilter { blockchain: Some("ethereum".into()), asset: None }, NOW);
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].asset, "WETH");
        assert!(
            b.view(&PriceFilter { blockchain: None, asset: Some("NOPE".into()) }, NOW).is_empty()
        );
    }

    /// Every order of Heap's algorithm over `items`.
    fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        fn heap<T: Clone>(k: usize, a: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
            if k <= 1 {
                out.push(a.clone());
                return;
            }
            for i in 0..k {
                heap(k - 1, a, out);
                let j = if k.is_multiple_of(2) { i } else { 0 };
                a.swap(j, k - 1);
            }
        }
        let mut a = items.to_vec();
        let mut out = Vec::new();
        heap(a.len(), &mut a, &mut out);
        out
    }

    /// Newest wins whatever the arrival order: every interleaving of two providers' updates
    /// (720 orders of six updates, equal timestamps included) ends in the same served price,
    /// the same flags and the same per-provider quotes.
    #[test]
    fn newest_wins_in_every_interleaving() {
        let updates = vec![
            (node(1), update("SOL", "100", NOW - 5000)),
            (node(1), update("SOL", "101", NOW - 3000)),
            (node(1), update("SOL", "102", NOW - 1000)),
            (node(2), update("SOL", "150", NOW - 4000)),
            (node(2), update("SOL", "103", NOW - 1000)),
            (node(2), update("SOL", "99", NOW - 2000)),
        ];
        let orders = permutations(&updates);
        assert_eq!(orders.len(), 720);
        let mut outcomes = std::collections::HashSet::new();
        for order in orders {
            let mut b = book();
            for (origin, u) in &order {
                b.apply(*origin, 1, std::slice::from_ref(u), NOW);
            }
            let v = b.view(&PriceFilter::default(), NOW).remove(0);
            let quotes: Vec<(NodeId, String, i64)> = {
                let e = &b.assets[&("solana".to_owned(), "SOL".to_owned())];
                let mut q: Vec<_> = e
                    .quotes
                    .iter()
                    .map(|(n, q)| (*n, q.price.to_string(), q.timestamp_ms))
                    .collect();
                q.sort();
                q
            };
            outcomes.insert((
                v.price.to_string(),
                v.source_node_id,
                v.discrepancy,
                v.providers_agreeing,
                quotes,
            ));
        }
        assert_eq!(outcomes.len(), 1, "the final state depends on the order: {outcomes:?}");
        let (price, source, discrepancy, agreeing, _) = outcomes.into_iter().next().unwrap();
        // Both newest quotes share a timestamp: the lower node id is served.
        let expected = node(1).min(node(2));
        assert_eq!(source, expected);
        assert_eq!(price, if expected == node(1) { "102" } else { "103" });
        assert!(!discrepancy, "102 and 103 are within 5 %");
        assert_eq!(agreeing, 2);
    }

    #[test]
    fn rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
    }
}
