//! The statements of the SQLite store. A batch travels as one JSON array bound to one
//! parameter and `json_each` turns it into rows, so a batch is one statement however large
//! (no limit on bound variables). Times are Unix milliseconds, UUIDs their hyphenated text.

use std::time::Duration;

use mesh_protocol::{MessageId, NodeId};
use sqlx::sqlite::SqlitePool;
use uuid::Uuid;

use crate::Result;
use crate::row::{PriceFilter, PriceRow, SeenRow, ms_to_system, now_ms, system_to_ms};

/// Milliseconds now, as SQLite computes them (the migrations' column default).
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// Inserts or updates the rows in `mesh_prices` (keyed by blockchain and asset) and
/// `guide_rows` in the guide's `mesh_price_cache` (keyed by asset alone), in one transaction;
/// an existing row is replaced only by a strictly newer one. Returns how many rows of
/// `mesh_prices` were inserted or updated.
pub(crate) async fn upsert_prices(
    pool: &SqlitePool,
    rows: &[&PriceRow],
    guide_rows: &[&PriceRow],
) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let done = upsert_into(&mut tx, "mesh_prices", "blockchain, asset", rows).await?;
    upsert_into(&mut tx, "mesh_price_cache", "asset", guide_rows).await?;
    tx.commit().await?;
    Ok(done)
}

async fn upsert_into(
    tx: &mut sqlx::SqliteConnection,
    table: &'static str,
    key: &'static str,
    rows: &[&PriceRow],
) -> Result<u64> {
    let batch: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.asset.as_str(),
                r.price.to_string(),
                r.blockchain.as_str(),
                r.timestamp_ms,
                r.source_node_id.to_string(),
                r.change_24h.as_ref().map(ToString::to_string),
            )
        })
        .collect();
    let json = serde_json::to_string(&batch).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    // `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT. `table` and
    // `key` are constants of this module, never input.
    let sql = format!(
        "INSERT INTO {table} \
             (asset, price, blockchain, timestamp, source_node_id, change_24h) \
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
                json_extract(value, '$[2]'), json_extract(value, '$[3]'), \
                json_extract(value, '$[4]'), json_extract(value, '$[5]') \
         FROM json_each(?1) WHERE true \
         ON CONFLICT ({key}) DO UPDATE SET \
             price = excluded.price, \
             blockchain = excluded.blockchain, \
             timestamp = excluded.timestamp, \
             source_node_id = excluded.source_node_id, \
             change_24h = excluded.change_24h, \
             updated_at = {NOW_MS} \
         WHERE {table}.timestamp < excluded.timestamp"
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(json).execute(&mut *tx).await?;
    Ok(done.rows_affected())
}

type PriceTuple = (String, String, String, i64, String, Option<String>);

/// The rows `filter` selects, one per (blockchain, asset), sorted by asset then blockchain.
pub(crate) async fn load_prices(pool: &SqlitePool, filter: &PriceFilter) -> Result<Vec<PriceRow>> {
    let rows: Vec<PriceTuple> = sqlx::query_as(
        "SELECT asset, blockchain, price, timestamp, source_node_id, change_24h \
         FROM mesh_prices \
         WHERE (?1 IS NULL OR blockchain = ?1) AND (?2 IS NULL OR asset = ?2) \
         ORDER BY asset, blockchain",
    )
    .bind(filter.blockchain.as_deref())
    .bind(filter.asset.as_deref())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(asset, blockchain, price, stamp, source, change)| {
            let Ok(source) = source.parse::<Uuid>() else {
                tracing::warn!(asset, source_node_id = source, "stored price has a bad node id");
                return None;
            };
            super::decode_price(
                asset,
                blockchain,
                &price,
                stamp,
                NodeId::from_uuid(source),
                change.as_deref(),
            )
        })
        .collect())
}

/// Deletes at most `limit` rows of each price table whose timestamp is older than `cutoff_ms`.
pub(crate) async fn delete_prices_older_than(
    pool: &SqlitePool,
    cutoff_ms: i64,
    limit: i64,
) -> Result<u64> {
    let mut deleted = 0;
    for table in ["mesh_prices", "mesh_price_cache"] {
        // `table` is one of the two constants above, never input.
        let sql = format!(
            "DELETE FROM {table} WHERE rowid IN \
             (SELECT rowid FROM {table} WHERE timestamp < ?1 LIMIT ?2)"
        );
        let done =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(cutoff_ms).bind(limit).execute(pool).await?;
        deleted += done.rows_affected();
    }
    Ok(deleted)
}

/// Deletes, from each price table, at most `limit` rows of sources holding more than
/// `max_per_source` rows: each source's oldest beyond that number.
pub(crate) async fn trim_prices_per_source(
    pool: &SqlitePool,
    max_per_source: i64,
    limit: i64,
) -> Result<u64> {
    let mut deleted = 0;
    for table in ["mesh_prices", "mesh_price_cache"] {
        // `table` is one of the two constants above, never input.
        let sql = format!(
            "DELETE FROM {table} WHERE rowid IN ( \
                 SELECT id FROM ( \
                     SELECT rowid AS id, row_number() OVER ( \
                         PARTITION BY source_node_id ORDER BY timestamp DESC, asset, blockchain \
                     ) AS rank FROM {table} \
                 ) WHERE rank > ?1 LIMIT ?2)"
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(max_per_source)
            .bind(limit)
            .execute(pool)
            .await?;
        deleted += done.rows_affected();
    }
    Ok(deleted)
}

/// Records ids not recorded yet; an id already present keeps its times.
pub(crate) async fn insert_seen(pool: &SqlitePool, rows: &[SeenRow]) -> Result<u64> {
    let batch: Vec<_> = rows
        .iter()
        .map(|r| (r.id.to_string(), system_to_ms(r.seen_at), system_to_ms(r.expires_at)))
        .collect();
    let json = serde_json::to_string(&batch).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let done = sqlx::query(
        "INSERT INTO mesh_seen_messages (message_id, seen_at, expires_at) \
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
                json_extract(value, '$[2]') \
         FROM json_each(?1) WHERE true \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(json)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Every id whose `expires_at` is in the future.
pub(crate) async fn load_unexpired_seen(pool: &SqlitePool) -> Result<Vec<SeenRow>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT message_id, seen_at, expires_at FROM mesh_seen_messages WHERE expires_at > ?1",
    )
    .bind(now_ms())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, seen, expires)| match id.parse::<Uuid>() {
            Ok(id) => Some(SeenRow {
                id: MessageId::from_uuid(id),
                seen_at: ms_to_system(seen),
                expires_at: ms_to_system(expires),
            }),
            Err(_) => {
                tracing::warn!(message_id = id, "stored seen id is not a UUID");
                None
            }
        })
        .collect())
}

/// The guide's cleanup query, in milliseconds: ids that expired more than `grace` ago.
pub(crate) async fn delete_expired_seen(pool: &SqlitePool, grace: Duration) -> Result<u64> {
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let done = sqlx::query("DELETE FROM mesh_seen_messages WHERE expires_at < ?1")
        .bind(now_ms().saturating_sub(grace_ms))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
