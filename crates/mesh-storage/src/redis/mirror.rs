//! The Redis price mirror.

use std::collections::HashMap;
use std::sync::Mutex;

use deadpool_redis::Pool;
use deadpool_redis::redis;

use super::{CallError, Health};
use crate::row::{PriceRow, newest_per_key};

/// Writes each `(field, timestamp_ms, json)` triple of ARGV into the hashes KEYS[1] (field ->
/// json) and KEYS[2] (field -> timestamp) unless the held timestamp is as new or newer, so a
/// node that lags behind cannot put old prices over fresh ones. Returns how many it wrote.
const WRITE_NEWEST: &str = r"
local written = 0
for i = 1, #ARGV, 3 do
  local held = redis.call('HGET', KEYS[2], ARGV[i])
  if (not held) or tonumber(held) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    written = written + 1
  end
end
return written
";

/// Deletes up to ARGV[2] fields of KEYS[1] and KEYS[2] whose timestamp (in KEYS[2]) is below
/// ARGV[1]; returns how many it deleted. `HSCAN` keeps each call's work bounded.
const FORGET_OLDER: &str = r"
local deleted = 0
local cursor = '0'
repeat
  local page = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', 500)
  cursor = page[1]
  local entries = page[2]
  for i = 1, #entries, 2 do
    if deleted < tonumber(ARGV[2]) and tonumber(entries[i + 1]) < tonumber(ARGV[1]) then
      redis.call('HDEL', KEYS[2], entries[i])
      redis.call('HDEL', KEYS[1], entries[i])
      deleted = deleted + 1
    end
  end
until cursor == '0' or deleted >= tonumber(ARGV[2])
return deleted
";

/// The latest price of each (blockchain, asset) in Redis, for fast reads shared by the
/// processes of a box. The hash field is `"{blockchain} {asset}"` (neither may
/// hold a space, so no two pairs share a field), so one address on two chains is two prices.
///
/// A batch is written in one round trip (one `EVAL` that keeps the newest price per field) and
/// all prices are read in one (`HGETALL`). An in-memory copy follows every write and read, so
/// while Redis is down reads are served from memory and writes land there; when Redis is back
/// the memory copy is written back. No method returns an error.
#[derive(Debug)]
pub struct PriceMirror {
    pool: Pool,
    prices_key: String,
    stamps_key: String,
    memory: Mutex<HashMap<(String, String), PriceRow>>,
    health: Health,
}

impl PriceMirror {
    /// A mirror under `prefix` (keys `{prefix}prices` and `{prefix}prices:ts`).
    pub fn new(pool: Pool, prefix: &str) -> Self {
        Self::with_health(pool, prefix, Health::new("redis price mirror"))
    }

    /// A mirror with its own [`Health`] (for a different reconnect backoff).
    pub fn with_health(pool: Pool, prefix: &str, health: Health) -> Self {
        Self {
            pool,
            prices_key: format!("{prefix}prices"),
            stamps_key: format!("{prefix}prices:ts"),
            memory: Mutex::new(HashMap::new()),
            health,
        }
    }

    /// Mirrors `rows` (newest per (blockchain, asset) wins, here and in Redis). A row that not every store
    /// can hold ([`PriceRow::storable`]) is set aside and counted
    /// (`mesh_store_dropped_total{queue="redis"}`), so the mirror never holds, and a restart
    /// never reloads, what the database would refuse.
    pub async fn write(&self, rows: &[PriceRow]) {
        let storable: Vec<PriceRow>;
        let rows = if rows.iter().all(|r| r.storable().is_ok()) {
            rows
        } else {
            storable = rows
                .iter()
                .filter(|row| match row.storable() {
                    Ok(()) => true,
                    Err(reason) => {
                        crate::queue::count_dropped("redis", reason, 1);
                        tracing::debug!(asset = row.asset, %reason, "row not mirrored");
                        false
                    }
                })
                .cloned()
                .collect();
            &storable
        };
        self.remember(rows.iter().cloned());
        if !self.health.should_try() {
            return;
        }
        // A call made while degraded is the reconnect attempt: it carries everything kept in
        // memory meanwhile.
        let rows: Vec<PriceRow> = if self.health.is_degraded() {
            self.snapshot()
        } else {
            newest_per_key(rows).into_iter().cloned().collect()
        };
        match self.send(&rows).await {
            Ok(true) => {
                self.health.succeeded();
            }
            // Nothing to send: Redis was not asked, so nothing is known about it.
            Ok(false) => {}
            Err(error) => self.health.failed(&error),
        }
    }

    /// Every mirrored price, sorted by asset then blockchain: from Redis (merged with what this process wrote)
    /// or, while Redis is down, from memory.
    pub async fn read_all(&self) -> Vec<PriceRow> {
        if self.health.should_try() {
            match self.fetch_all().await {
                Ok(rows) => {
                    self.remember(rows);
                    if self.health.succeeded() {
                        self.write_back().await;
                    }
                }
                Err(error) => self.health.failed(&error),
            }
        }
        self.snapshot()
    }

    /// Prices held in memory (every price this process mirrored; while Redis is down, the ones
    /// it may be missing). Never asks Redis.
    pub fn held_in_memory(&self) -> usize {
        self.lock().len()
    }

    /// Forgets prices whose timestamp is older than `cutoff_ms`: from memory, and from Redis
    /// (at most `limit` per call) when it answers. Returns how many Redis fields were deleted.
    pub async fn forget_older_than(&self, cutoff_ms: i64, limit: u32) -> u64 {
        self.lock().retain(|_, row| row.timestamp_ms >= cutoff_ms);
        if !self.health.should_try() {
            return 0;
        }
        let call = async {
            let mut conn = self.pool.get().await?;
            let deleted: u64 = redis::cmd("EVAL")
                .arg(FORGET_OLDER)
                .arg(2)
                .arg(&self.prices_key)
                .arg(&self.stamps_key)
                .arg(cutoff_ms)
                .arg(limit)
                .query_async(&mut conn)
                .await?;
            Ok::<_, CallError>(deleted)
        };
        match call.await {
            Ok(deleted) => {
                self.health.succeeded();
                deleted
            }
            Err(error) => {
                self.health.failed(&error);
                0
            }
        }
    }

    /// Keeps at most `max_per_source` of the prices this process mirrored per source node
    /// (each source's newest), deleting the others from memory and (at most `limit` per call)
    /// from Redis. Prices other processes mirrored under the same prefix are theirs to trim.
    /// Returns how many prices were dropped.
    pub async fn trim_per_source(&self, max_per_source: usize, limit: usize) -> u64 {
        let extra: Vec<PriceRow> = {
            let memory = self.lock();
            let mut by_source: HashMap<mesh_protocol::NodeId, Vec<&PriceRow>> = HashMap::new();
            for row in memory.values() {
                by_source.entry(row.source_node_id).or_default().push(row);
            }
            by_source
                .into_values()
                .filter(|rows| rows.len() > max_per_source)
                .flat_map(|mut rows| {
                    rows.sort_unstable_by_key(|row| std::cmp::Reverse(row.timestamp_ms));
                    rows.split_off(max_per_source)
                })
                .take(limit)
                .cloned()
                .collect()
        };
        if extra.is_empty() {
            return 0;
        }
        {
            let mut memory = self.lock();
            for row in &extra {
                memory.remove(&(row.blockchain.clone(), row.asset.clone()));
            }
        }
        if self.health.should_try() {
            let fields: Vec<String> = extra.iter().map(field).collect();
            let call = async {
                let mut conn = self.pool.get().await?;
                let mut pipe = redis::pipe();
                pipe.cmd("HDEL").arg(&self.prices_key).arg(&fields).ignore();
                pipe.cmd("HDEL").arg(&self.stamps_key).arg(&fields).ignore();
                pipe.query_async::<()>(&mut conn).await?;
                Ok::<_, CallError>(())
            };
            match call.await {
                Ok(()) => {
                    self.health.succeeded();
                }
                Err(error) => self.health.failed(&error),
            }
        }
        extra.len() as u64
    }

    /// `true` while Redis is down and memory serves.
    pub fn is_degraded(&self) -> bool {
        self.health.is_degraded()
    }

    /// The mirror's Redis health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    async fn write_back(&self) {
        let rows = self.snapshot();
        if let Err(error) = self.send(&rows).await {
            self.health.failed(&error);
        }
    }

    /// Writes `rows` in one `EVAL`; `false` when there was nothing to write.
    async fn send(&self, rows: &[PriceRow]) -> Result<bool, CallError> {
        if rows.is_empty() {
            return Ok(false);
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(WRITE_NEWEST).arg(2).arg(&self.prices_key).arg(&self.stamps_key);
        for row in rows {
            // A row is plain strings and numbers: serialising it cannot fail.
            let Ok(json) = serde_json::to_string(row) else { continue };
            cmd.arg(field(row)).arg(row.timestamp_ms).arg(json);
        }
        let mut conn = self.pool.get().await?;
        let _written: i64 = cmd.query_async(&mut conn).await?;
        Ok(true)
    }

    async fn fetch_all(&self) -> Result<Vec<PriceRow>, CallError> {
        let mut conn = self.pool.get().await?;
        let raw: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&self.prices_key).query_async(&mut conn).await?;
        Ok(raw
            .into_iter()
            .filter_map(|(key, json)| match serde_json::from_str::<PriceRow>(&json) {
                Ok(row) => Some(row),
                Err(error) => {
                    tracing::warn!(field = key, %error, "mirrored price is not a price row; skipped");
                    None
                }
            })
            .collect())
    }

    fn remember(&self, rows: impl IntoIterator<Item = PriceRow>) {
        let mut memory = self.lock();
        for row in rows {
            let key = (row.blockchain.clone(), row.asset.clone());
            match memory.get(&key) {
                Some(held) if !row.is_newer_than(held) => {}
                _ => {
                    memory.insert(key, row);
                }
            }
        }
    }

    fn snapshot(&self) -> Vec<PriceRow> {
        let mut rows: Vec<PriceRow> = self.lock().values().cloned().collect();
        rows.sort_unstable_by(|a, b| (&a.asset, &a.blockchain).cmp(&(&b.asset, &b.blockchain)));
        rows
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), PriceRow>> {
        // A map of prices stays valid even if a holder panicked mid-insert.
        self.memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The hash field of `row`: `"{blockchain} {asset}"`. Validation allows no space in either, and
/// the mirror reads rows from their JSON, never from the field, so older fields (the asset
/// alone, before the chain was part of the key) still load and age out.
pub(crate) fn field(row: &PriceRow) -> String {
    format!("{} {}", row.blockchain, row.asset)
}
