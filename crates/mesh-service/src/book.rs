//! The price book (ARCHITECTURE section 8): per (blockchain, asset) the latest accepted update
//! of each provider. It serves the newest, with its age, hop count and how many providers
//! agree, flags two providers' fresh prices that differ by more than the threshold, and rates
//! the freshness of the whole node.
//!
//! Whatever depends on the clock (age, `stale`, which quotes are fresh, how many agree, the
//! discrepancy among them) is never stored: [`assess`] computes it from the stored quotes and
//! `now` whenever a view is made. So that stream subscribers, which hold the last view they
//! were sent, learn when one of those facts changes with no new quote, the book keeps the
//! instant of each asset's next change and [`PriceBook::expire`] hands out the views whose
//! facts changed by then (the node calls it on a short tick and pushes them as price events).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use bigdecimal::BigDecimal;
use mesh_ipc::{DataFreshness, Discrepancy, PriceFilter, PriceView, QuoteView};
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

/// The thresholds the clock-dependent facts of a price are judged by.
#[derive(Debug, Clone)]
pub struct Rules {
    /// A price observed longer ago than this is stale (ms).
    pub staleness_ms: i64,
    /// A provider's quote fetched within this window (two fetch intervals, ms) is fresh: the
    /// provider still reports the asset, and its quote counts for agreement and discrepancy.
    pub fresh_window_ms: i64,
    /// The discrepancy threshold in percent of the lower price.
    pub threshold_percent: BigDecimal,
}

impl Rules {
    /// The rules of `config`.
    pub fn of(config: &BookConfig) -> Self {
        let threshold_percent =
            BigDecimal::from_str(&format!("{:.6}", config.discrepancy_threshold_percent))
                .unwrap_or_else(|_| BigDecimal::from(5));
        Self {
            staleness_ms: duration_ms(config.staleness),
            fresh_window_ms: duration_ms(config.fetch_interval).saturating_mul(2),
            threshold_percent,
        }
    }

    /// Whether `quote` is fresh at `now_ms`: fetched less than the fresh window ago.
    pub fn fresh(&self, quote: &Quote, now_ms: i64) -> bool {
        now_ms.saturating_sub(quote.timestamp_ms) < self.fresh_window_ms
    }

    /// Whether `a` and `b` differ by more than the threshold: |a - b| in percent of the lower
    /// of the two is above it (never when the lower is not positive). Exact, and without a
    /// division: |a - b| × 100 > threshold × lower. A `BigDecimal` division works to 100
    /// digits; with several providers it was most of a consumer's CPU time (a division per
    /// pair of quotes, per price, per batch).
    pub fn exceeds(&self, a: &BigDecimal, b: &BigDecimal) -> bool {
        let low = a.min(b);
        bigdecimal::Signed::is_positive(low)
            && (a - b).abs() * BigDecimal::from(100) > &self.threshold_percent * low
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One provider's latest quote for an asset.
#[derive(Debug, Clone)]
pub struct Quote {
    /// The price, exact.
    pub price: Decimal,
    value: BigDecimal,
    /// Change over 24 hours in percent, when known.
    pub change_24h: Option<Decimal>,
    /// When the provider fetched it (the signed `timestamp_ms`): orders one provider's quotes
    /// and tells whether the provider still reports the asset.
    pub timestamp_ms: i64,
    /// When the source last updated the price (Birdeye's `updateUnixTime`), when it said.
    pub source_timestamp_ms: Option<i64>,
    /// Hops the quote travelled; `None` when it was reloaded from the store at start-up and
    /// no message about it has arrived since (the hop count is not stored).
    pub hop_count: Option<u8>,
}

impl Quote {
    /// A quote of `update` that travelled `hop_count` hops (`None`: unknown).
    pub fn of(update: &PriceUpdate, hop_count: Option<u8>) -> Self {
        Self {
            price: update.price.clone(),
            value: update.price.value(),
            change_24h: update.change_24h.clone(),
            timestamp_ms: update.timestamp_ms,
            source_timestamp_ms: update.source_timestamp_ms,
            hop_count,
        }
    }

    /// When the price was true: the source's own time when it gave one (never later than the
    /// fetch), else the fetch. Age and `stale` count from here.
    pub fn observed_ms(&self) -> i64 {
        self.source_timestamp_ms.map_or(self.timestamp_ms, |s| s.min(self.timestamp_ms))
    }
}

/// The facts about one asset's served price that depend on the clock, at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    /// Milliseconds since the served price was observed (never negative).
    pub age_ms: i64,
    /// The served price is older than the staleness threshold.
    pub stale: bool,
    /// Providers with a fresh quote.
    pub providers_reporting: u32,
    /// Of those, how many agree with the served price within the threshold.
    pub providers_agreeing: u32,
    /// Two fresh quotes differ by more than the threshold (so never with fewer than two
    /// providers reporting).
    pub discrepancy: bool,
    /// The next instant (Unix ms) at which `stale`, the reporting or agreeing counts or the
    /// discrepancy can change without a new quote; `None` when none will.
    pub next_change_ms: Option<i64>,
}

impl Assessment {
    fn flags(&self) -> Flags {
        (self.stale, self.providers_reporting, self.providers_agreeing, self.discrepancy)
    }
}

/// The part of an assessment a subscriber must be told about when it changes.
type Flags = (bool, u32, u32, bool);

/// `quote` is within the discrepancy threshold of `served` (both positive).
fn agrees(quote: &Quote, served: &Quote, rules: &Rules) -> bool {
    bigdecimal::Signed::is_positive(std::cmp::min(&quote.value, &served.value))
        && !rules.exceeds(&quote.value, &served.value)
}

/// The clock-dependent facts of `served` among `quotes` (all of one asset, `served` among
/// them) at `now_ms`: a pure function of the stored quotes, the clock and the rules.
pub fn assess(served: &Quote, quotes: &[&Quote], now_ms: i64, rules: &Rules) -> Assessment {
    let age_ms = now_ms.saturating_sub(served.observed_ms()).max(0);
    let stale = age_ms > rules.staleness_ms;
    let fresh: Vec<&Quote> = quotes.iter().copied().filter(|q| rules.fresh(q, now_ms)).collect();
    let agreeing = fresh.iter().filter(|q| agrees(q, served, rules)).count();
    let discrepancy = fresh
        .iter()
        .enumerate()
        .any(|(i, a)| fresh[i + 1..].iter().any(|b| rules.exceeds(&a.value, &b.value)));
    // Stale from one millisecond past the threshold; a fresh quote stops counting when its
    // window ends.
    let stale_at =
        (!stale).then(|| served.observed_ms().saturating_add(rules.staleness_ms).saturating_add(1));
    let expiries = fresh.iter().map(|q| q.timestamp_ms.saturating_add(rules.fresh_window_ms));
    let next_change_ms = stale_at.into_iter().chain(expiries).filter(|t| *t > now_ms).min();
    Assessment {
        age_ms,
        stale,
        providers_reporting: fresh.len() as u32,
        providers_agreeing: agreeing as u32,
        discrepancy,
        next_change_ms,
    }
}

#[derive(Debug, Default)]
struct AssetEntry {
    quotes: HashMap<NodeId, Quote>,
    /// The flags subscribers were last told (by a price event or the snapshot).
    shown: Option<Flags>,
    /// When [`assess`] said the flags change next (also held in `PriceBook::schedule`).
    next_change_ms: Option<i64>,
}

type Key = (String, String);

/// What one batch changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// Served prices that changed (new price, or one of its flags changed).
    pub changed: Vec<PriceView>,
    /// How many served prices changed (`changed` may have been handed on already).
    pub changed_count: usize,
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

/// What became of a quote offered to the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inserted {
    /// Stored as its origin's latest for the asset.
    Stored,
    /// An equal or newer quote of that origin is held.
    Older,
    /// No room: the asset holds the most providers and all their quotes are fresh.
    NoRoom,
}

/// The latest price of every provider for every asset.
#[derive(Debug)]
pub struct PriceBook {
    config: BookConfig,
    rules: Rules,
    assets: HashMap<Key, AssetEntry>,
    /// (next change, asset) for every asset whose flags will change with time alone.
    schedule: BTreeSet<(i64, Key)>,
    /// The assets each origin holds a quote of (bounded by `max_quotes_per_origin` each).
    origin_keys: HashMap<NodeId, HashSet<Key>>,
    newest_timestamp_ms: Option<i64>,
    last_update_ms: Option<i64>,
}

impl PriceBook {
    /// An empty book.
    pub fn new(config: BookConfig) -> Self {
        Self {
            rules: Rules::of(&config),
            config,
            assets: HashMap::new(),
            schedule: BTreeSet::new(),
            origin_keys: HashMap::new(),
            newest_timestamp_ms: None,
            last_update_ms: None,
        }
    }

    /// The rules the book judges prices by.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Number of assets held.
    pub fn len(&self) -> usize {
        self.assets.len()
    }

    /// `true` when no price is held.
    pub fn is_empty(&self) -> bool {
        self.assets.is_empty()
    }

    /// When the newest price held was observed (Unix ms; the source's time when it gave one).
    pub fn newest_timestamp_ms(&self) -> Option<i64> {
        self.newest_timestamp_ms
    }

    /// When the newest update arrived in a message since start-up (Unix ms); `None` before
    /// the first (prices reloaded from the store were not received now).
    pub fn last_update_ms(&self) -> Option<i64> {
        self.last_update_ms
    }

    /// Age of the newest price, by the time it was observed.
    pub fn data_age(&self, now_ms: i64) -> Option<Duration> {
        self.newest_timestamp_ms.map(|ts| Duration::from_millis((now_ms - ts).max(0) as u64))
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
        for (index, update) in updates.iter().enumerate() {
            let key = key_of(update);
            if !self.assets.contains_key(&key) && self.assets.len() >= self.config.max_assets {
                applied.dropped += 1;
                continue;
            }
            let quote = Quote::of(update, Some(hop_count));
            let before = self.served_key(&key);
            match self.insert(&key, origin, quote.clone(), now_ms) {
                Inserted::Stored => applied.accepted.push(index),
                Inserted::Older => {
                    applied.older += 1;
                    continue;
                }
                Inserted::NoRoom => {
                    applied.dropped += 1;
                    continue;
                }
            }
            self.last_update_ms = Some(now_ms);
            applied.discrepancies.extend(self.compare(&key, origin, &quote, now_ms));
            let after = self.served_key(&key);
            if let Some(view) = self.refresh(&key, now_ms, before != after) {
                applied.changed.push(view);
                applied.changed_count += 1;
            }
        }
        applied
    }

    /// Puts back a price reloaded from the store at start-up: it keeps its own times, its hop
    /// count is unknown (`None`) unless it is `own` (this node fetched it: 0), and it is no
    /// receipt (`last_update_ms` stays as it is). Returns `false` when it was not taken (the
    /// book is full, or a newer quote of that provider is held).
    pub fn restore(
        &mut self,
        origin: NodeId,
        update: &PriceUpdate,
        own: bool,
        now_ms: i64,
    ) -> bool {
        let key = key_of(update);
        if !self.assets.contains_key(&key) && self.assets.len() >= self.config.max_assets {
            return false;
        }
        let quote = Quote::of(update, own.then_some(0));
        if self.insert(&key, origin, quote, now_ms) != Inserted::Stored {
            return false;
        }
        self.refresh(&key, now_ms, false);
        true
    }

    /// Stores `quote` as `origin`'s latest for `key` unless an equal or newer one is held
    /// (an equal one only lends a hop count the held one lacks). A new quote needs room: on
    /// the asset (a stale quote's, never a fresh one's) and within the origin's own share (its
    /// own oldest quote goes).
    fn insert(&mut self, key: &Key, origin: NodeId, quote: Quote, now_ms: i64) -> Inserted {
        let held = self.assets.get_mut(key).and_then(|e| e.quotes.get_mut(&origin));
        if let Some(held) = held {
            if held.timestamp_ms >= quote.timestamp_ms {
                if held.timestamp_ms == quote.timestamp_ms && held.hop_count.is_none() {
                    held.hop_count = quote.hop_count;
                }
                return Inserted::Older;
            }
        } else {
            let max_providers = self.config.max_providers_per_asset.max(1);
            let oldest =
                self.assets.get(key).filter(|e| e.quotes.len() >= max_providers).and_then(|e| {
                    e.quotes
                        .iter()
                        .min_by_key(|(_, q)| q.timestamp_ms)
                        .map(|(n, q)| (*n, q.clone()))
                });
            if let Some((oldest, oldest_quote)) = oldest {
                if self.rules.fresh(&oldest_quote, now_ms) {
                    return Inserted::NoRoom;
                }
                self.remove_quote(key, oldest);
            }
            let max_per_origin = self.config.max_quotes_per_origin.max(1);
            if self.origin_keys.get(&origin).is_some_and(|own| own.len() >= max_per_origin)
                && let Some(victim) = self.oldest_of(origin)
            {
                self.remove_quote(&victim, origin);
            }
            self.origin_keys.entry(origin).or_default().insert(key.clone());
        }
        let observed = quote.observed_ms();
        self.assets.entry(key.clone()).or_default().quotes.insert(origin, quote);
        self.newest_timestamp_ms =
            Some(self.newest_timestamp_ms.map_or(observed, |t| t.max(observed)));
        Inserted::Stored
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

    /// Removes `origin`'s quote of `key`, and the asset (with its scheduled change) when no
    /// quote is left.
    fn remove_quote(&mut self, key: &Key, origin: NodeId) {
        if let Some(entry) = self.assets.get_mut(key) {
            entry.quotes.remove(&origin);
            if entry.quotes.is_empty() {
                if let Some(at) = entry.next_change_ms {
                    self.schedule.remove(&(at, key.clone()));
                }
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

    /// Forgets every quote fetched before `cutoff_ms`, and the assets left with none
    /// (`MESH_PRICE_RETENTION_SECS`). Returns the (blockchain, asset) pairs forgotten.
    pub fn forget_older_than(&mut self, cutoff_ms: i64) -> Vec<(String, String)> {
        let mut old: Vec<(Key, NodeId)> = Vec::new();
        for (key, entry) in &self.assets {
            for (origin, quote) in &entry.quotes {
                if quote.timestamp_ms < cutoff_ms {
                    old.push((key.clone(), *origin));
                }
            }
        }
        let mut gone = Vec::new();
        for (key, origin) in old {
            self.remove_quote(&key, origin);
            if !self.assets.contains_key(&key) && gone.last() != Some(&key) {
                gone.push(key);
            }
        }
        gone.sort();
        gone.dedup();
        self.newest_timestamp_ms =
            self.assets.values().flat_map(|e| e.quotes.values().map(Quote::observed_ms)).max();
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

    /// Reassesses `key` at `now_ms`, reschedules its next change, and returns its view when
    /// subscribers must be told: `served_changed`, or the flags differ from the ones shown.
    fn refresh(&mut self, key: &Key, now_ms: i64, served_changed: bool) -> Option<PriceView> {
        let assessment = {
            let entry = self.assets.get(key)?;
            let (_, quote) = served(entry)?;
            let quotes: Vec<&Quote> = entry.quotes.values().collect();
            assess(quote, &quotes, now_ms, &self.rules)
        };
        let entry = self.assets.get_mut(key)?;
        let flags = assessment.flags();
        let tell = served_changed || entry.shown != Some(flags);
        entry.shown = Some(flags);
        if entry.next_change_ms != assessment.next_change_ms {
            if let Some(old) = entry.next_change_ms {
                self.schedule.remove(&(old, key.clone()));
            }
            if let Some(new) = assessment.next_change_ms {
                self.schedule.insert((new, key.clone()));
            }
            entry.next_change_ms = assessment.next_change_ms;
        }
        // A view (strings, times as text) only for what subscribers must be told.
        if tell { self.view_and_assessment(key, now_ms).map(|(view, _)| view) } else { None }
    }

    /// The views whose clock-dependent flags changed by `now_ms` with no new quote (a price
    /// turned stale, a disagreeing quote expired, ...): what subscribers must be told now.
    pub fn expire(&mut self, now_ms: i64) -> Vec<PriceView> {
        let mut due = Vec::new();
        while let Some(first) = self.schedule.first()
            && first.0 <= now_ms
        {
            if let Some((_, key)) = self.schedule.pop_first() {
                if let Some(entry) = self.assets.get_mut(&key) {
                    entry.next_change_ms = None;
                }
                due.push(key);
            }
        }
        due.iter().filter_map(|key| self.refresh(key, now_ms, false)).collect()
    }

    /// Identity of the served quote, to tell whether it changed.
    fn served_key(&self, key: &Key) -> Option<(NodeId, i64)> {
        let entry = self.assets.get(key)?;
        served(entry).map(|(id, q)| (*id, q.timestamp_ms))
    }

    /// Discrepancies between `origin`'s new quote and the other providers' fresh ones.
    fn compare(&self, key: &Key, origin: NodeId, quote: &Quote, now_ms: i64) -> Vec<Discrepancy> {
        let Some(entry) = self.assets.get(key) else { return Vec::new() };
        if !self.rules.fresh(quote, now_ms) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (other, q) in &entry.quotes {
            if *other == origin || !self.rules.fresh(q, now_ms) {
                continue;
            }
            if self.rules.exceeds(&quote.value, &q.value)
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

    fn view_and_assessment(&self, key: &Key, now_ms: i64) -> Option<(PriceView, Assessment)> {
        let entry = self.assets.get(key)?;
        let (source, quote) = served(entry)?;
        let quotes: Vec<&Quote> = entry.quotes.values().collect();
        let a = assess(quote, &quotes, now_ms, &self.rules);
        let view = PriceView {
            asset: key.1.clone(),
            blockchain: key.0.clone(),
            price: quote.price.clone(),
            change_24h: quote.change_24h.clone(),
            timestamp: rfc3339(quote.timestamp_ms),
            timestamp_ms: quote.timestamp_ms,
            source_timestamp: quote.source_timestamp_ms.map(rfc3339),
            source_timestamp_ms: quote.source_timestamp_ms,
            source_node_id: *source,
            age_secs: (a.age_ms / 1000) as u64,
            stale: a.stale,
            hop_count: quote.hop_count,
            providers_reporting: a.providers_reporting,
            providers_agreeing: a.providers_agreeing,
            discrepancy: a.discrepancy,
        };
        Some((view, a))
    }

    /// The served prices matching `filter`, sorted by chain then asset, as they are at `now_ms`.
    pub fn view(&self, filter: &PriceFilter, now_ms: i64) -> Vec<PriceView> {
        let mut keys: Vec<&Key> =
            self.assets.keys().filter(|(c, a)| filter.matches(c, a)).collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|k| self.view_and_assessment(k, now_ms))
            .map(|(v, _)| v)
            .collect()
    }

    /// Every provider's latest quote of the assets matching `filter`, by chain and asset, the
    /// served one first, then the newest: whether each is fresh and agrees with the served
    /// price, as they are at `now_ms`.
    pub fn quotes(&self, filter: &PriceFilter, now_ms: i64) -> Vec<QuoteView> {
        let mut keys: Vec<&Key> =
            self.assets.keys().filter(|(c, a)| filter.matches(c, a)).collect();
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let Some(entry) = self.assets.get(key) else { continue };
            let Some((served_id, served_quote)) = served(entry) else { continue };
            let mut quotes: Vec<(&NodeId, &Quote)> = entry.quotes.iter().collect();
            quotes.sort_by(|(a_id, a), (b_id, b)| {
                (*b_id == served_id)
                    .cmp(&(*a_id == served_id))
                    .then(b.observed_ms().cmp(&a.observed_ms()))
                    .then(a_id.cmp(b_id))
            });
            out.extend(quotes.into_iter().map(|(id, q)| QuoteView {
                asset: key.1.clone(),
                blockchain: key.0.clone(),
                source_node_id: *id,
                price: q.price.clone(),
                change_24h: q.change_24h.clone(),
                timestamp: rfc3339(q.timestamp_ms),
                timestamp_ms: q.timestamp_ms,
                age_secs: (now_ms.saturating_sub(q.observed_ms()).max(0) / 1000) as u64,
                hop_count: q.hop_count,
                fresh: self.rules.fresh(q, now_ms),
                agrees: agrees(q, served_quote, &self.rules),
                served: id == served_id,
            }));
        }
        out
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

/// The book's key of `update`: its chain and its address in the canonical form (an EVM
/// address in lower case, whatever case the provider signed).
fn key_of(update: &PriceUpdate) -> Key {
    (update.blockchain.clone(), mesh_protocol::canonical_asset(&update.asset).into_owned())
}

/// The newest quote by the time it was observed (ties: the newer fetch, then the lower node
/// id, so every node serves the same one).
fn served(entry: &AssetEntry) -> Option<(&NodeId, &Quote)> {
    entry.quotes.iter().max_by(|(a_id, a), (b_id, b)| {
        a.observed_ms()
            .cmp(&b.observed_ms())
            .then(a.timestamp_ms.cmp(&b.timestamp_ms))
            .then(b_id.cmp(a_id))
    })
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
/// for the report of a discrepancy (`Rules::exceeds` decides whether there is one).
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
            source_timestamp_ms: None,
        }
    }

    fn book() -> PriceBook {
        PriceBook::new(BookConfig::default())
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
        assert_eq!((v.age_secs, v.hop_count, v.stale), (1, Some(3), false));
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
                    let by_division =
                        difference_percent(&x, &y).is_some_and(|p| p > b.rules.threshold_percent);
                    assert_eq!(b.rules.exceeds(&x, &y), by_division, "{x} vs {y} at {threshold} %");
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

    fn quote(price: &str, fetched: i64, source: Option<i64>) -> Quote {
        let mut u = update("SOL", price, fetched);
        u.timestamp_ms = fetched;
        let mut q = Quote::of(&u, Some(1));
        q.source_timestamp_ms = source;
        q
    }

    fn rules(staleness_secs: u64) -> Rules {
        Rules::of(&BookConfig {
            staleness: Duration::from_secs(staleness_secs),
            ..BookConfig::default()
        })
    }

    /// The pure function alone: the same stored quotes say different things as the clock
    /// moves, and each change is announced by `next_change_ms`.
    #[test]
    fn assessment_follows_the_clock() {
        let r = rules(300);
        let a = quote("100", NOW, None);
        let b = quote("120", NOW - 10_000, None);
        let quotes = [&a, &b];
        let at = |now| assess(&a, &quotes, now, &r);
        let now = at(NOW);
        assert_eq!((now.stale, now.providers_reporting, now.providers_agreeing), (false, 2, 1));
        assert!(now.discrepancy);
        // b's window (two 30 s intervals from its fetch) ends first.
        assert_eq!(now.next_change_ms, Some(NOW - 10_000 + 60_000));
        let later = at(NOW + 50_000);
        assert_eq!((later.providers_reporting, later.providers_agreeing), (1, 1));
        assert!(!later.discrepancy, "the disagreeing quote expired");
        assert_eq!(later.next_change_ms, Some(NOW + 60_000));
        let silent = at(NOW + 60_000);
        assert_eq!((silent.providers_reporting, silent.providers_agreeing), (0, 0));
        assert!(!silent.discrepancy && !silent.stale);
        assert_eq!(silent.next_change_ms, Some(NOW + 300_001));
        assert!(!at(NOW + 300_000).stale, "at the threshold is not past it");
        let stale = at(NOW + 300_001);
        assert!(stale.stale);
        assert_eq!(stale.age_ms, 300_001);
        assert_eq!(stale.next_change_ms, None);
    }

    /// A source time older than the fetch is what age and staleness count from; a source
    /// time later than the fetch (a clock ahead) counts as the fetch.
    #[test]
    fn the_source_time_counts_for_age_and_staleness() {
        let r = rules(3600);
        let old = quote("1", NOW, Some(NOW - 7_200_000));
        let a = assess(&old, &[&old], NOW, &r);
        assert_eq!((a.age_ms, a.stale, a.providers_reporting), (7_200_000, true, 1));
        let ahead = quote("1", NOW, Some(NOW + 5_000));
        assert_eq!(assess(&ahead, &[&ahead], NOW + 1_000, &r).age_ms, 1_000);
    }

    /// Providers go silent: the served price turns stale and a discrepancy clears, and the
    /// book hands out exactly those changes, once each, with no new quote.
    #[test]
    fn expiry_tells_each_change_once() {
        let mut b = PriceBook::new(BookConfig {
            staleness: Duration::from_secs(90),
            ..BookConfig::default()
        });
        b.apply(node(1), 1, &[update("SOL", "100", NOW)], NOW);
        let applied = b.apply(node(2), 1, &[update("SOL", "110", NOW)], NOW);
        assert!(applied.changed[0].discrepancy);
        assert!(b.expire(NOW + 59_999).is_empty());
        let cleared = b.expire(NOW + 60_000);
        assert_eq!(cleared.len(), 1);
        let v = &cleared[0];
        assert_eq!((v.discrepancy, v.providers_reporting, v.stale), (false, 0, false));
        assert!(b.expire(NOW + 89_000).is_empty());
        let stale = b.expire(NOW + 90_001);
        assert_eq!(stale.len(), 1);
        assert!(stale[0].stale);
        assert_eq!(stale[0].age_secs, 90);
        assert!(b.expire(NOW + 10_000_000).is_empty(), "nothing left to change");
        assert!(b.schedule.is_empty());
        // What is served agrees with what was pushed.
        let v = &b.view(&PriceFilter::default(), NOW + 90_001)[0];
        assert!(v.stale && !v.discrepancy && v.providers_reporting == 0);
    }

    /// A quote that arrives reschedules its asset: one schedule entry per asset, whatever
    /// the number of batches.
    #[test]
    fn the_schedule_holds_one_entry_per_asset() {
        let mut b = book();
        for i in 0..100 {
            b.apply(
                node(1),
                1,
                &[update("SOL", "100", NOW + i), update("JUP", "1", NOW + i)],
                NOW + i,
            );
        }
        assert_eq!(b.schedule.len(), 2);
    }

    /// Reloaded prices keep their times, their hop count is unknown (ours: 0) until a
    /// message arrives, and they are no receipt.
    #[test]
    fn restored_prices_do_not_pretend() {
        let mut b = PriceBook::new(BookConfig {
            staleness: Duration::from_secs(3600),
            ..BookConfig::default()
        });
        let two_hours_ago = NOW - 7_200_000;
        assert!(b.restore(node(1), &update("SOL", "100", two_hours_ago), false, NOW));
        assert!(b.restore(node(2), &update("JUP", "1", two_hours_ago), true, NOW));
        assert_eq!(b.last_update_ms(), None, "nothing was received");
        assert_eq!(b.freshness(NOW), DataFreshness::Stale);
        let views = b.view(&PriceFilter::default(), NOW);
        let sol = views.iter().find(|v| v.asset == "SOL").unwrap();
        let jup = views.iter().find(|v| v.asset == "JUP").unwrap();
        assert_eq!((sol.hop_count, sol.age_secs, sol.stale), (None, 7200, true));
        assert_eq!(jup.hop_count, Some(0));
        // The same price arriving in a message tells its hop count; a newer one too.
        b.apply(node(1), 3, &[update("SOL", "100", two_hours_ago)], NOW);
        let sol = &b.view(&PriceFilter { asset: Some("SOL".into()), ..Default::default() }, NOW)[0];
        assert_eq!(sol.hop_count, Some(3));
        b.apply(node(1), 2, &[update("SOL", "101", NOW)], NOW);
        let sol = &b.view(&PriceFilter { asset: Some("SOL".into()), ..Default::default() }, NOW)[0];
        assert_eq!((sol.hop_count, sol.stale), (Some(2), false));
        assert_eq!(b.last_update_ms(), Some(NOW));
    }

    /// The checksummed and lower-case writings of one EVM token are one asset: served once,
    /// in lower case, and compared for discrepancy. Base58 addresses keep their case.
    #[test]
    fn evm_addresses_are_keyed_in_lower_case() {
        let mut b = book();
        let weth = |address: &str, price: &str| PriceUpdate {
            blockchain: "ethereum".into(),
            ..update(address, price, NOW)
        };
        b.apply(node(1), 1, &[weth("0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2", "3000")], NOW);
        let applied =
            b.apply(node(2), 1, &[weth("0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2", "3300")], NOW);
        assert_eq!(applied.discrepancies.len(), 1, "the two writings are compared");
        let views = b.view(&PriceFilter::default(), NOW);
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].asset, "0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2");
        assert_eq!(views[0].providers_reporting, 2);
        let query = |asset: &str| PriceFilter { blockchain: None, asset: Some(asset.into()) };
        assert_eq!(b.view(&query("0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2"), NOW).len(), 1);
        assert_eq!(b.view(&query("0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2"), NOW).len(), 1);
        b.apply(
            node(1),
            1,
            &[update("EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v", "1", NOW)],
            NOW,
        );
        assert_eq!(b.view(&query("EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"), NOW).len(), 1);
        assert!(b.view(&query("epjfwdd5aufqssqem2qn1xzybapc8g4wegGkzwytdt1v"), NOW).is_empty());
    }

    #[test]
    fn rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
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
}
