//! The statements of the PostgreSQL store. Every batch is one statement: the rows travel as
//! one array per column and `UNNEST` turns them back into rows.

use std::time::Duration;

use mesh_protocol::{MessageId, NodeId};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Result;
use crate::row::{PriceFilter, PriceRow, SeenRow, datetime_to_ms, ms_to_datetime};

/// Inserts or updates the rows in both price tables, in one transaction: `mesh_prices`
/// (keyed by blockchain and asset; `rows` holds each pair once, sorted) and the guide's
/// `mesh_price_cache` (keyed by asset alone: `guide_rows` holds each asset once, the newest of
/// its chains). An existing row is replaced only by a strictly newer one. Returns how many rows
/// of `mesh_prices` were inserted or updated.
pub(crate) async fn upsert_prices(
    pool: &PgPool,
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
    tx: &mut sqlx::PgConnection,
    table: &'static str,
    key: &'static str,
    rows: &[&PriceRow],
) -> Result<u64> {
    let n = rows.len();
    let (mut assets, mut prices, mut chains) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut stamps, mut sources, mut changes) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for row in rows {
        assets.push(row.asset.as_str());
        prices.push(row.price.to_string());
        chains.push(row.blockchain.as_str());
        stamps.push(ms_to_datetime(row.timestamp_ms)?);
        sources.push(*row.source_node_id.as_uuid());
        changes.push(row.change_24h.as_ref().map(ToString::to_string));
    }
    // `table` and `key` are constants of this module, never input.
    let sql = format!(
        "INSERT INTO {table} \
             (asset, price, blockchain, timestamp, source_node_id, change_24h) \
         SELECT * FROM UNNEST($1::varchar[], $2::varchar[], $3::varchar[], \
                              $4::timestamptz[], $5::uuid[], $6::varchar[]) \
         ON CONFLICT ({key}) DO UPDATE SET \
             price = EXCLUDED.price, \
             blockchain = EXCLUDED.blockchain, \
             timestamp = EXCLUDED.timestamp, \
             source_node_id = EXCLUDED.source_node_id, \
             change_24h = EXCLUDED.change_24h, \
             updated_at = NOW() \
         WHERE {table}.timestamp < EXCLUDED.timestamp"
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(assets)
        .bind(prices)
        .bind(chains)
        .bind(stamps)
        .bind(sources)
        .bind(changes)
        .execute(&mut *tx)
        .await?;
    Ok(done.rows_affected())
}

type PriceTuple = (String, String, String, OffsetDateTime, Uuid, Option<String>);

/// The rows `filter` selects, one per (blockchain, asset), sorted by asset then blockchain.
pub(crate) async fn load_prices(pool: &PgPool, filter: &PriceFilter) -> Result<Vec<PriceRow>> {
    let rows: Vec<PriceTuple> = sqlx::query_as(
        "SELECT asset, blockchain, price, timestamp, source_node_id, change_24h \
         FROM mesh_prices \
         WHERE ($1::varchar IS NULL OR blockchain = $1) AND ($2::varchar IS NULL OR asset = $2) \
         ORDER BY asset, blockchain",
    )
    .bind(filter.blockchain.as_deref())
    .bind(filter.asset.as_deref())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(asset, blockchain, price, stamp, source, change)| {
            super::decode_price(
                asset,
                blockchain,
                &price,
                datetime_to_ms(stamp),
                NodeId::from_uuid(source),
                change.as_deref(),
            )
        })
        .collect())
}

/// Deletes at most `limit` rows of each price table whose timestamp is older than `cutoff_ms`.
pub(crate) async fn delete_prices_older_than(
    pool: &PgPool,
    cutoff_ms: i64,
    limit: i64,
) -> Result<u64> {
    let cutoff = ms_to_datetime(cutoff_ms)?;
    let mut deleted = 0;
    for table in ["mesh_prices", "mesh_price_cache"] {
        // `table` is one of the two constants above, never input.
        let sql = format!(
            "DELETE FROM {table} WHERE ctid IN \
             (SELECT ctid FROM {table} WHERE timestamp < $1 LIMIT $2)"
        );
        let done =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(cutoff).bind(limit).execute(pool).await?;
        deleted += done.rows_affected();
    }
    Ok(deleted)
}

/// Deletes, from each price table, at most `limit` rows of sources holding more than
/// `max_per_source` rows: each source's oldest beyond that number.
pub(crate) async fn trim_prices_per_source(
    pool: &PgPool,
    max_per_source: i64,
    limit: i64,
) -> Result<u64> {
    let mut deleted = 0;
    for table in ["mesh_prices", "mesh_price_cache"] {
        // `table` is one of the two constants above, never input.
        let sql = format!(
            "DELETE FROM {table} t USING ( \
                 SELECT blockchain, asset FROM ( \
                     SELECT blockchain, asset, row_number() OVER ( \
                         PARTITION BY source_node_id ORDER BY timestamp DESC, asset, blockchain \
                     ) AS rank FROM {table} \
                 ) ranked WHERE rank > $1 LIMIT $2 \
             ) extra WHERE t.blockchain = extra.blockchain AND t.asset = extra.asset"
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
pub(crate) async fn insert_seen(pool: &PgPool, rows: &[SeenRow]) -> Result<u64> {
    let ids: Vec<Uuid> = rows.iter().map(|r| *r.id.as_uuid()).collect();
    let seen: Vec<OffsetDateTime> = rows.iter().map(|r| r.seen_at.into()).collect();
    let expires: Vec<OffsetDateTime> = rows.iter().map(|r| r.expires_at.into()).collect();
    let done = sqlx::query(
        "INSERT INTO mesh_seen_messages (message_id, seen_at, expires_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[]) \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(ids)
    .bind(seen)
    .bind(expires)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Every id whose `expires_at` is in the future (the server's clock).
pub(crate) async fn load_unexpired_seen(pool: &PgPool) -> Result<Vec<SeenRow>> {
    let rows: Vec<(Uuid, OffsetDateTime, OffsetDateTime)> = sqlx::query_as(
        "SELECT message_id, seen_at, expires_at FROM mesh_seen_messages WHERE expires_at > NOW()",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, seen, expires)| SeenRow {
            id: MessageId::from_uuid(id),
            seen_at: seen.into(),
            expires_at: expires.into(),
        })
        .collect())
}

/// The guide's cleanup query (`expires_at < NOW() - INTERVAL '1 day'`) with the grace period
/// as a parameter.
pub(crate) async fn delete_expired_seen(pool: &PgPool, grace: Duration) -> Result<u64> {
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let done = sqlx::query(
        "DELETE FROM mesh_seen_messages \
         WHERE expires_at < NOW() - ($1::bigint * INTERVAL '1 millisecond')",
    )
    .bind(grace_ms)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
