//! Seen message ids in Redis.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use deadpool_redis::Pool;
use deadpool_redis::redis;
use mesh_protocol::MessageId;
use mesh_seen_cache::{BackendError, SeenBackend};

use super::{CallError, Health, glob_escape};
use crate::row::{SeenRow, ms_to_system, system_to_ms};

/// Ids kept in memory while Redis is down, by default.
pub const DEFAULT_SEEN_MEMORY_CAPACITY: usize = 100_000;

/// Keys one `SCAN` step asks for, and ids per pipelined read when loading.
const SCAN_COUNT: usize = 1_000;

/// Seen message ids shared through Redis: one key `{prefix}seen:{id}` per id, written with
/// `SET ... NX PX <ms left>` (a batch is one pipeline), holding the Unix milliseconds at which
/// the id was first seen. While Redis is down ids are kept in a bounded memory set and answered
/// from there; they are written to Redis when it is back. No method returns an error.
#[derive(Debug)]
pub struct RedisSeen {
    pool: Pool,
    key_prefix: String,
    memory: Mutex<HashMap<MessageId, SeenRow>>,
    capacity: usize,
    dropped: AtomicU64,
    health: Health,
}

impl RedisSeen {
    /// Seen ids under `prefix`, with [`DEFAULT_SEEN_MEMORY_CAPACITY`].
    pub fn new(pool: Pool, prefix: &str) -> Self {
        Self::with_options(
            pool,
            prefix,
            DEFAULT_SEEN_MEMORY_CAPACITY,
            Health::new("redis seen ids"),
        )
    }

    /// Seen ids keeping at most `memory_capacity` ids in memory during an outage.
    pub fn with_options(pool: Pool, prefix: &str, memory_capacity: usize, health: Health) -> Self {
        Self {
            pool,
            key_prefix: format!("{prefix}seen:"),
            memory: Mutex::new(HashMap::new()),
            capacity: memory_capacity,
            dropped: AtomicU64::new(0),
            health,
        }
    }

    /// Records `rows`; an id already recorded keeps its expiry. Rows already expired are
    /// skipped.
    pub async fn insert_batch(&self, rows: &[SeenRow]) {
        if !self.health.should_try() {
            self.remember(rows);
            return;
        }
        let mut batch = rows.to_vec();
        let recovering = self.health.is_degraded();
        if recovering {
            batch.extend(self.memory_rows());
        }
        match self.send(&batch).await {
            Ok(sent) => {
                if recovering {
                    self.forget(&batch);
                }
                // Nothing to send (all expired): Redis was not asked, nothing is known.
                if sent {
                    self.health.succeeded();
                }
            }
            Err(error) => {
                self.health.failed(&error);
                self.remember(rows);
            }
        }
    }

    /// `true` when `id` was recorded and has not expired.
    pub async fn contains(&self, id: MessageId) -> bool {
        if self.lock().get(&id).is_some_and(|row| row.expires_at > SystemTime::now()) {
            return true;
        }
        if !self.health.should_try() {
            return false;
        }
        let result: Result<bool, CallError> = async {
            let mut conn = self.pool.get().await?;
            Ok(redis::cmd("EXISTS").arg(self.key(id)).query_async(&mut conn).await?)
        }
        .await;
        match result {
            Ok(found) => {
                if self.health.succeeded() {
                    self.write_back().await;
                }
                found
            }
            Err(error) => {
                self.health.failed(&error);
                false
            }
        }
    }

    /// Every unexpired id, from Redis (`SCAN`, then `GET` and `PTTL` pipelined per 1,000 ids)
    /// and from memory.
    pub async fn load_unexpired(&self) -> Vec<SeenRow> {
        let mut rows = HashMap::new();
        if self.health.should_try() {
            match self.scan().await {
                Ok(found) => {
                    rows.extend(found.into_iter().map(|row| (row.id, row)));
                    if self.health.succeeded() {
                        self.write_back().await;
                    }
                }
                Err(error) => self.health.failed(&error),
            }
        }
        for row in self.memory_rows() {
            rows.entry(row.id).or_insert(row);
        }
        rows.into_values().collect()
    }

    /// `true` while Redis is down and memory serves.
    pub fn is_degraded(&self) -> bool {
        self.health.is_degraded()
    }

    /// The backend's Redis health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Ids held in memory, waiting for Redis to come back.
    pub fn held_in_memory(&self) -> usize {
        self.lock().len()
    }

    /// Ids dropped because the memory set was full during an outage.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn key(&self, id: MessageId) -> String {
        format!("{}{id}", self.key_prefix)
    }

    /// Writes `rows` in one pipeline; `false` when there was nothing to write.
    async fn send(&self, rows: &[SeenRow]) -> Result<bool, CallError> {
        let now = SystemTime::now();
        let mut pipe = redis::pipe();
        for row in rows {
            let Ok(left) = row.expires_at.duration_since(now) else { continue };
            // PX 0 is refused by Redis; an id with less than a millisecond left is expired.
            let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            if left_ms == 0 {
                continue;
            }
            pipe.cmd("SET")
                .arg(self.key(row.id))
                .arg(system_to_ms(row.seen_at))
                .arg("NX")
                .arg("PX")
                .arg(left_ms)
                .ignore();
        }
        if pipe.is_empty() {
            return Ok(false);
        }
        let mut conn = self.pool.get().await?;
        pipe.query_async::<()>(&mut conn).await?;
        Ok(true)
    }

    async fn scan(&self) -> Result<Vec<SeenRow>, CallError> {
        let mut conn = self.pool.get().await?;
        let pattern = format!("{}*", glob_escape(&self.key_prefix));
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let now = SystemTime::now();
        let mut rows = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(SCAN_COUNT) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
            }
            let values: Vec<(Option<i64>, i64)> = pipe.query_async(&mut conn).await?;
            for (key, (seen_ms, ttl_ms)) in chunk.iter().zip(values) {
                let Some(id) = key.strip_prefix(&self.key_prefix).and_then(|s| s.parse().ok())
                else {
                    continue;
                };
                // PTTL: -2 the key is gone, -1 it has no expiry (not written by us).
                let Ok(ttl_ms) = u64::try_from(ttl_ms) else { continue };
                rows.push(SeenRow {
                    id: MessageId::from_uuid(id),
                    seen_at: seen_ms.map_or(now, ms_to_system),
                    expires_at: now + Duration::from_millis(ttl_ms),
                });
            }
        }
        Ok(rows)
    }

    async fn write_back(&self) {
        let rows = self.memory_rows();
        match self.send(&rows).await {
            Ok(_) => self.forget(&rows),
            Err(error) => self.health.failed(&error),
        }
    }

    fn remember(&self, rows: &[SeenRow]) {
        let now = SystemTime::now();
        let mut memory = self.lock();
        let mut purged = false;
        for row in rows {
            if memory.contains_key(&row.id) {
                continue;
            }
            if memory.len() >= self.capacity && !purged {
                memory.retain(|_, held| held.expires_at > now);
                purged = true;
            }
            if memory.len() >= self.capacity {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            memory.insert(row.id, *row);
        }
    }

    fn memory_rows(&self) -> Vec<SeenRow> {
        let now = SystemTime::now();
        self.lock().values().filter(|row| row.expires_at > now).copied().collect()
    }

    fn forget(&self, rows: &[SeenRow]) {
        let mut memory = self.lock();
        for row in rows {
            memory.remove(&row.id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MessageId, SeenRow>> {
        // A set of ids stays valid even if a holder panicked mid-insert.
        self.memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Never fails: while Redis is down the ids are kept in memory.
#[async_trait::async_trait]
impl SeenBackend<MessageId> for RedisSeen {
    async fn record(&self, records: &[SeenRow]) -> Result<(), BackendError> {
        self.insert_batch(records).await;
        Ok(())
    }

    async fn load_unexpired(&self) -> Result<Vec<SeenRow>, BackendError> {
        Ok(RedisSeen::load_unexpired(self).await)
    }
}
