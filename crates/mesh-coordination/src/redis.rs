//! The registry and leases in Redis, shared by every provider that uses the same Redis.
//!
//! Keys: `{prefix}coord:providers`, a sorted set of node ids scored by the end of their
//! heartbeat (Unix ms by Redis `TIME`), and `{prefix}coord:round:{r}`, the lease of round `r`,
//! holding the winner's node id and expiring after the lease (`SET ... NX PX`).
//!
//! Every time here is Redis's own (`TIME`, `PTTL`), read in the same script as the write:
//! a provider whose clock is wrong neither registers for too long nor misjudges a lease's age.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use deadpool_redis::{Connection, Pool};
use mesh_protocol::NodeId;

pub use mesh_health::Health;

use crate::{Coordination, Error, Lease, Result, StoreTime};

/// `TIME` as Unix milliseconds, in the scripts below.
const NOW_MS: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS[1] providers; ARGV node, ttl ms, set expiry ms. Returns Redis's time.
const HEARTBEAT: &str =
    "redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return string.format('%.0f', now)";

/// KEYS[1] providers. Returns Redis's time and the members whose heartbeat has not ended.
const ACTIVE: &str = "local n = string.format('%.0f', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', n)
return {n, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. n, '+inf')}";

/// KEYS[1] the round; ARGV node, lease ms. Returns the value (empty when not a string), its
/// remaining time (PTTL: -1 without expiry) and Redis's time.
const ACQUIRE: &str = "redis.pcall('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' then v = '' end
return {v, redis.call('PTTL', KEYS[1]), string.format('%.0f', now)}";

/// KEYS[1] the round; ARGV previous value, node, lease ms. 1 when the node holds it after.
const TAKE_OVER: &str = "local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' and v ~= false then v = '' end
if v == ARGV[2] then return 1 end
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

/// [`Coordination`] through Redis.
///
/// Every Redis failure is reported to the planner as an error (it then falls back to the mesh),
/// logged once per outage (`Redis connection failed`) and marks the store degraded; while it
/// is degraded, calls fail at once with [`Error::Unavailable`] except one reconnect attempt
/// per backoff step.
#[derive(Debug)]
pub struct RedisCoordination {
    pool: Pool,
    providers_key: String,
    round_prefix: String,
    health: Health,
    time: Mutex<Option<StoreTime>>,
}

impl RedisCoordination {
    /// Coordination under `prefix` (default `mesh:`), sharing `pool` with the node's other
    /// Redis users.
    pub fn new(pool: Pool, prefix: &str) -> Self {
        Self::with_health(pool, prefix, Health::new("redis coordination"))
    }

    /// Coordination with its own [`Health`] (for a different reconnect backoff).
    pub fn with_health(pool: Pool, prefix: &str, health: Health) -> Self {
        Self {
            pool,
            providers_key: format!("{prefix}coord:providers"),
            round_prefix: format!("{prefix}coord:round:"),
            health,
            time: Mutex::new(None),
        }
    }

    /// The store's Redis health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The lease key of `round`.
    pub fn round_key(&self, round: u64) -> String {
        format!("{}{round}", self.round_prefix)
    }

    /// Runs `call` on a pooled connection unless a reconnect attempt is not due, and reports
    /// the outcome to [`Health`].
    async fn guarded<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        if !self.health.should_try() {
            return Err(Error::Unavailable);
        }
        let result = match self.pool.get().await {
            Ok(conn) => call(conn).await.map_err(Error::from),
            Err(error) => Err(Error::from(error)),
        };
        match &result {
            Ok(_) => {
                self.health.succeeded();
            }
            Err(error) => self.health.failed(error),
        }
        result
    }
}

/// `EVAL` of `body` after [`NOW_MS`] on one key.
fn script(body: &str, key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(format!("{NOW_MS}{body}")).arg(1).arg(key);
    cmd
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisCoordination {
    /// Runs `cmd` (a script answering Redis's time first) and keeps the time it read.
    async fn timed<T>(&self, cmd: redis::Cmd) -> Result<T>
    where
        T: redis::FromRedisValue + Send + 'static,
        (String, T): redis::FromRedisValue,
    {
        let started = Instant::now();
        let (now, value): (String, T) =
            self.guarded(|mut conn| async move { cmd.query_async(&mut conn).await }).await?;
        self.keep_time(&now, started);
        Ok(value)
    }

    /// Keeps Redis's time `now` (Unix ms, as the scripts answer it) read by a call started at
    /// `started`.
    fn keep_time(&self, now: &str, started: Instant) {
        if let Ok(unix_ms) = now.parse() {
            let received = Instant::now();
            let reading = StoreTime { unix_ms, received, round_trip: received - started };
            *self.time.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reading);
        }
    }
}

#[async_trait::async_trait]
impl Coordination for RedisCoordination {
    async fn heartbeat(&self, node: NodeId, ttl: Duration) -> Result<()> {
        let mut cmd = script(HEARTBEAT, &self.providers_key);
        // The set disappears when every provider has stopped.
        cmd.arg(node.to_string()).arg(millis(ttl)).arg(millis(ttl).saturating_mul(2));
        let started = Instant::now();
        let now: String =
            self.guarded(|mut conn| async move { cmd.query_async(&mut conn).await }).await?;
        self.keep_time(&now, started);
        Ok(())
    }

    async fn deregister(&self, node: NodeId) -> Result<()> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(&self.providers_key).arg(node.to_string());
        self.guarded(|mut conn| async move { cmd.query_async::<()>(&mut conn).await }).await
    }

    async fn active_providers(&self) -> Result<Vec<NodeId>> {
        let members: Vec<String> = self.timed(script(ACTIVE, &self.providers_key)).await?;
        Ok(members.iter().filter_map(|m| m.parse().ok()).collect())
    }

    async fn try_acquire_round(&self, round: u64, node: NodeId, lease: Duration) -> Result<Lease> {
        let me = node.to_string();
        let mut cmd = script(ACQUIRE, &self.round_key(round));
        cmd.arg(&me).arg(millis(lease));
        let (value, pttl, _now): (String, i64, String) =
            self.guarded(|mut conn| async move { cmd.query_async(&mut conn).await }).await?;
        let lease_ms = millis(lease) as i64;
        // Taken by a provider: it expires `lease` after it was taken. Anything else (no
        // expiry, a longer one) was not written by a provider of this interval.
        let age =
            (0..=lease_ms).contains(&pttl).then(|| Duration::from_millis((lease_ms - pttl) as u64));
        Ok(Lease { mine: value == me, value, age })
    }

    async fn take_over_round(
        &self,
        round: u64,
        node: NodeId,
        previous: &str,
        lease: Duration,
    ) -> Result<bool> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TAKE_OVER)
            .arg(1)
            .arg(self.round_key(round))
            .arg(previous)
            .arg(node.to_string())
            .arg(millis(lease));
        let taken: i64 =
            self.guarded(|mut conn| async move { cmd.query_async(&mut conn).await }).await?;
        Ok(taken == 1)
    }

    fn store_time(&self) -> Option<StoreTime> {
        *self.time.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_degraded(&self) -> bool {
        self.health.is_degraded()
    }
}
