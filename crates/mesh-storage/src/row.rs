//! What the stores hold: one price per asset and one entry per seen message id.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_protocol::{Decimal, MessageId, NodeId, PriceUpdate};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::queue::DropReason;
use crate::{Error, Result};

/// `mesh_price_cache.asset VARCHAR(255)`.
const MAX_ASSET_CHARS: usize = 255;
/// `mesh_price_cache.blockchain VARCHAR(50)`.
const MAX_BLOCKCHAIN_CHARS: usize = 50;
/// `mesh_price_cache.price VARCHAR(255)`.
const MAX_PRICE_CHARS: usize = 255;
/// `mesh_price_cache.change_24h VARCHAR(50)`.
const MAX_CHANGE_CHARS: usize = 50;
/// 0001-01-01T00:00:00Z in Unix milliseconds.
const MIN_STORED_MS: i64 = -62_135_596_800_000;
/// 9999-12-31T23:59:59.999Z in Unix milliseconds.
const MAX_STORED_MS: i64 = 253_402_300_799_999;

/// A price row of the stores: the latest price of one asset on one chain (`mesh_prices`, and
/// the guide's `mesh_price_cache`, which keeps the newest of an address's chains).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceRow {
    /// The asset (token address); with the chain, the row's key.
    pub asset: String,
    /// The chain it lives on.
    pub blockchain: String,
    /// The price, exact (stored as its decimal text).
    pub price: Decimal,
    /// When the provider observed it, Unix milliseconds (`TIMESTAMPTZ` in PostgreSQL).
    pub timestamp_ms: i64,
    /// The provider that fetched it.
    pub source_node_id: NodeId,
    /// Change over 24 hours in percent, when known.
    pub change_24h: Option<Decimal>,
}

impl PriceRow {
    /// The row for `update` as fetched by `source`.
    pub fn from_update(update: &PriceUpdate, source: NodeId) -> Self {
        Self {
            asset: update.asset.clone(),
            blockchain: update.blockchain.clone(),
            price: update.price.clone(),
            timestamp_ms: update.timestamp_ms,
            source_node_id: source,
            change_24h: update.change_24h.clone(),
        }
    }

    /// Whether every store can hold this row: the column lengths of the guide's
    /// `mesh_price_cache` (asset 255, price 255, blockchain 50, change 50 characters) and a
    /// time within the years 1..=9999, which PostgreSQL, SQLite and this crate's conversions
    /// all hold. A row outside them would make a whole batch fail; the write-behind queue
    /// and the Redis mirror set it aside instead.
    pub fn storable(&self) -> Result<(), DropReason> {
        let too_long = |text: &str, max: usize| text.chars().count() > max;
        if too_long(&self.asset, MAX_ASSET_CHARS)
            || too_long(&self.blockchain, MAX_BLOCKCHAIN_CHARS)
            || too_long(self.price.as_str(), MAX_PRICE_CHARS)
            || self.change_24h.as_ref().is_some_and(|c| too_long(c.as_str(), MAX_CHANGE_CHARS))
        {
            return Err(DropReason::TooLong);
        }
        if !(MIN_STORED_MS..=MAX_STORED_MS).contains(&self.timestamp_ms) {
            return Err(DropReason::TimeOutOfRange);
        }
        Ok(())
    }

    /// `true` when this row is strictly newer than `other` (the stores' replacement rule: an
    /// equal timestamp keeps the row already held).
    pub fn is_newer_than(&self, other: &PriceRow) -> bool {
        self.timestamp_ms > other.timestamp_ms
    }
}

/// A row of `mesh_seen_messages`: a message id, when it was first seen and when it may be
/// forgotten (the seen cache's backing-store record).
pub type SeenRow = mesh_seen_cache::SeenRecord<MessageId>;

/// Which prices a query returns; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceFilter {
    /// Only this chain.
    pub blockchain: Option<String>,
    /// Only this asset.
    pub asset: Option<String>,
}

impl PriceFilter {
    /// `true` when `row` passes the filter.
    pub fn matches(&self, row: &PriceRow) -> bool {
        self.blockchain.as_deref().is_none_or(|b| b == row.blockchain)
            && self.asset.as_deref().is_none_or(|a| a == row.asset)
    }
}

/// The newest row of each (blockchain, asset) in `rows`, sorted by asset then blockchain.
///
/// One statement may not touch a row twice (`ON CONFLICT DO UPDATE` refuses), and concurrent
/// batches that lock their rows in the same order cannot deadlock each other.
pub(crate) fn newest_per_key(rows: &[PriceRow]) -> Vec<&PriceRow> {
    newest_by(rows, |row| (row.asset.as_str(), row.blockchain.as_str()))
}

/// The newest row of each asset whatever its chain, sorted by asset: what the guide's
/// `mesh_price_cache` (asset alone is its key) holds for an address on several chains.
pub(crate) fn newest_per_asset(rows: &[PriceRow]) -> Vec<&PriceRow> {
    newest_by(rows, |row| (row.asset.as_str(), ""))
}

fn newest_by<'a>(
    rows: &'a [PriceRow],
    key: impl Fn(&'a PriceRow) -> (&'a str, &'a str),
) -> Vec<&'a PriceRow> {
    let mut newest: HashMap<(&str, &str), &PriceRow> = HashMap::with_capacity(rows.len());
    for row in rows {
        newest
            .entry(key(row))
            .and_modify(|held| {
                if row.is_newer_than(held) {
                    *held = row;
                }
            })
            .or_insert(row);
    }
    let mut out: Vec<((&str, &str), &PriceRow)> = newest.into_iter().collect();
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, row)| row).collect()
}

/// Unix milliseconds of `t` (negative before 1970).
pub(crate) fn system_to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The [`SystemTime`] of `ms` Unix milliseconds.
pub(crate) fn ms_to_system(ms: i64) -> SystemTime {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 { UNIX_EPOCH + magnitude } else { UNIX_EPOCH - magnitude }
}

/// The [`OffsetDateTime`] (UTC) of `ms` Unix milliseconds.
pub(crate) fn ms_to_datetime(ms: i64) -> Result<OffsetDateTime> {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| Error::TimeOutOfRange(ms.into()))
}

/// Unix milliseconds of `t`, truncated (PostgreSQL keeps microseconds).
pub(crate) fn datetime_to_ms(t: OffsetDateTime) -> i64 {
    let ms = t.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

/// Milliseconds now, from the wall clock.
pub(crate) fn now_ms() -> i64 {
    system_to_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(asset: &str, ts: i64) -> PriceRow {
        PriceRow {
            asset: asset.into(),
            blockchain: "solana".into(),
            price: "1.5".parse().unwrap(),
            timestamp_ms: ts,
            source_node_id: NodeId::from_uuid(uuid::Uuid::nil()),
            change_24h: None,
        }
    }

    #[test]
    fn newest_per_key_keeps_each_chain() {
        let mut base = row("weth", 5);
        base.blockchain = "base".into();
        let mut optimism = row("weth", 7);
        optimism.blockchain = "optimism".into();
        let rows = vec![optimism.clone(), base.clone(), row("a", 1)];
        let keys: Vec<(&str, &str)> = newest_per_key(&rows)
            .iter()
            .map(|r| (r.asset.as_str(), r.blockchain.as_str()))
            .collect();
        assert_eq!(keys, vec![("a", "solana"), ("weth", "base"), ("weth", "optimism")]);
        let guide: Vec<(&str, i64)> = newest_per_asset(&rows)
            .iter()
            .map(|r| (r.blockchain.as_str(), r.timestamp_ms))
            .collect();
        assert_eq!(guide, vec![("solana", 1), ("optimism", 7)]);
    }

    #[test]
    fn newest_per_asset_keeps_the_newest_and_sorts() {
        let rows = vec![row("b", 5), row("a", 1), row("b", 9), row("a", 3), row("b", 9)];
        let out: Vec<(&str, i64)> =
            newest_per_asset(&rows).iter().map(|r| (r.asset.as_str(), r.timestamp_ms)).collect();
        assert_eq!(out, vec![("a", 3), ("b", 9)]);
    }

    #[test]
    fn times_round_trip_at_millisecond_precision() {
        for ms in [0, 1, 1_750_000_000_123, -1_000, -1] {
            assert_eq!(system_to_ms(ms_to_system(ms)), ms);
            assert_eq!(datetime_to_ms(ms_to_datetime(ms).unwrap()), ms);
        }
        assert!(ms_to_datetime(i64::MAX).is_err());
    }

    #[test]
    fn storable_rows_fit_every_column_and_time() {
        assert_eq!(row("a", 1).storable(), Ok(()));
        assert_eq!(row(&"a".repeat(255), MAX_STORED_MS).storable(), Ok(()));
        assert_eq!(row("a", MIN_STORED_MS).storable(), Ok(()));
        assert!(ms_to_datetime(MIN_STORED_MS).is_ok() && ms_to_datetime(MAX_STORED_MS).is_ok());
        assert_eq!(row(&"a".repeat(256), 1).storable(), Err(DropReason::TooLong));
        let mut long_change = row("a", 1);
        long_change.change_24h = Some("1".repeat(51).parse().unwrap());
        assert_eq!(long_change.storable(), Err(DropReason::TooLong));
        let mut long_chain = row("a", 1);
        long_chain.blockchain = "c".repeat(51);
        assert_eq!(long_chain.storable(), Err(DropReason::TooLong));
        for ts in [MIN_STORED_MS - 1, MAX_STORED_MS + 1, i64::MIN, i64::MAX] {
            assert_eq!(row("a", ts).storable(), Err(DropReason::TimeOutOfRange), "{ts}");
        }
    }

    #[test]
    fn filter_matches_on_both_fields() {
        let r = row("a", 1);
        assert!(PriceFilter::default().matches(&r));
        assert!(PriceFilter { blockchain: Some("solana".into()), asset: None }.matches(&r));
        assert!(!PriceFilter { blockchain: Some("ethereum".into()), asset: None }.matches(&r));
        assert!(!PriceFilter { blockchain: None, asset: Some("b".into()) }.matches(&r));
    }
}
