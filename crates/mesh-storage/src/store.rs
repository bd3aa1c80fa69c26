//! `PriceStore` and `SeenStore`: the two tables of the guide, on either backend.

use std::time::Duration;

use mesh_protocol::MessageId;
use mesh_seen_cache::{BackendError, SeenBackend};

use crate::Result;
use crate::db::{Database, postgres, sqlite};
use crate::queue::{DropReason, Sink};
use crate::row::{PriceFilter, PriceRow, SeenRow, newest_per_asset, newest_per_key};

/// The latest price of each (blockchain, asset) (`mesh_prices`), and of each asset whatever its
/// chain (the guide's `mesh_price_cache`).
#[derive(Debug, Clone)]
pub struct PriceStore {
    db: Database,
}

impl PriceStore {
    /// A store on `db` (migrated with [`Database::migrate`]).
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Writes `rows` in one transaction of one statement per table. A row replaces the stored
    /// one of its (blockchain, asset) in `mesh_prices` only when its timestamp is strictly
    /// newer; within `rows`, the newest per (blockchain, asset) is kept. The guide's
    /// `mesh_price_cache`, keyed by asset alone, gets the newest of an address's chains.
    /// Returns how many rows of `mesh_prices` were inserted or updated.
    pub async fn upsert(&self, rows: &[PriceRow]) -> Result<u64> {
        let guide_rows = newest_per_asset(rows);
        let rows = newest_per_key(rows);
        if rows.is_empty() {
            return Ok(0);
        }
        match &self.db {
            Database::Postgres(pool) => postgres::upsert_prices(pool, &rows, &guide_rows).await,
            Database::Sqlite(pool) => sqlite::upsert_prices(pool, &rows, &guide_rows).await,
        }
    }

    /// Deletes prices whose timestamp is older than `cutoff_ms` from `mesh_prices` and the
    /// guide's `mesh_price_cache`, at most `limit` rows of each per call (so one call never
    /// holds the tables long; a periodic cleanup catches up over several calls). Returns how
    /// many rows were deleted.
    pub async fn delete_older_than(&self, cutoff_ms: i64, limit: u32) -> Result<u64> {
        let limit = i64::from(limit);
        match &self.db {
            Database::Postgres(pool) => {
                postgres::delete_prices_older_than(pool, cutoff_ms, limit).await
            }
            Database::Sqlite(pool) => {
                sqlite::delete_prices_older_than(pool, cutoff_ms, limit).await
            }
        }
    }

    /// Keeps at most `max_per_source` rows per source node in `mesh_prices` and
    /// `mesh_price_cache` (each source's newest), deleting at most `limit` rows of each per
    /// call: the tables stay within the price book's share per origin, however many assets one
    /// origin sends. Returns how many rows were deleted.
    pub async fn trim_per_source(&self, max_per_source: u32, limit: u32) -> Result<u64> {
        let (max, limit) = (i64::from(max_per_source), i64::from(limit));
        match &self.db {
            Database::Postgres(pool) => postgres::trim_prices_per_source(pool, max, limit).await,
            Database::Sqlite(pool) => sqlite::trim_prices_per_source(pool, max, limit).await,
        }
    }

    /// Every stored price, one per (blockchain, asset), sorted by asset then blockchain (what a
    /// node loads into its price book at start).
    pub async fn load_all(&self) -> Result<Vec<PriceRow>> {
        self.query(&PriceFilter::default()).await
    }

    /// The prices `filter` selects (by blockchain and/or asset), sorted by asset then blockchain.
    pub async fn query(&self, filter: &PriceFilter) -> Result<Vec<PriceRow>> {
        match &self.db {
            Database::Postgres(pool) => postgres::load_prices(pool, filter).await,
            Database::Sqlite(pool) => sqlite::load_prices(pool, filter).await,
        }
    }
}

/// Message ids already seen, until they expire (`mesh_seen_messages`).
#[derive(Debug, Clone)]
pub struct SeenStore {
    db: Database,
}

impl SeenStore {
    /// A store on `db` (migrated with [`Database::migrate`]).
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Records `rows` in one statement; an id already recorded keeps its times. Returns how
    /// many ids were new.
    pub async fn insert(&self, rows: &[SeenRow]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        match &self.db {
            Database::Postgres(pool) => postgres::insert_seen(pool, rows).await,
            Database::Sqlite(pool) => sqlite::insert_seen(pool, rows).await,
        }
    }

    /// Every id that has not expired yet (what a node loads into its seen cache at start).
    pub async fn load_unexpired(&self) -> Result<Vec<SeenRow>> {
        match &self.db {
            Database::Postgres(pool) => postgres::load_unexpired_seen(pool).await,
            Database::Sqlite(pool) => sqlite::load_unexpired_seen(pool).await,
        }
    }

    /// Deletes ids that expired more than `grace` ago: the guide's daily cleanup
    /// (`DELETE FROM mesh_seen_messages WHERE expires_at < NOW() - INTERVAL '1 day'`) with
    /// the interval as a parameter. Returns how many were deleted.
    pub async fn delete_expired(&self, grace: Duration) -> Result<u64> {
        match &self.db {
            Database::Postgres(pool) => postgres::delete_expired_seen(pool, grace).await,
            Database::Sqlite(pool) => sqlite::delete_expired_seen(pool, grace).await,
        }
    }
}

#[async_trait::async_trait]
impl Sink<PriceRow> for PriceStore {
    async fn write(&self, batch: &[PriceRow]) -> Result<u64> {
        self.upsert(batch).await
    }

    fn check(&self, row: &PriceRow) -> std::result::Result<(), DropReason> {
        row.storable()
    }
}

#[async_trait::async_trait]
impl SeenBackend<MessageId> for SeenStore {
    async fn record(&self, records: &[SeenRow]) -> Result<(), BackendError> {
        self.insert(records).await.map(drop).map_err(|e| BackendError(Box::new(e)))
    }

    async fn load_unexpired(&self) -> Result<Vec<SeenRow>, BackendError> {
        SeenStore::load_unexpired(self).await.map_err(|e| BackendError(Box::new(e)))
    }
}

#[async_trait::async_trait]
impl Sink<SeenRow> for SeenStore {
    async fn write(&self, batch: &[SeenRow]) -> Result<u64> {
        self.insert(batch).await
    }
}
