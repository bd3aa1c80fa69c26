//! The registry and leases in Redis, shared by every provider that uses the same Redis.
//!
//! Keys: `{prefix}coord:providers`, a sorted set of node ids scored by the end of their
//! heartbeat (Unix ms), and `{prefix}coord:round:{r}`, the lease of round `r`, holding the
//! winner's node id and expiring after the lease (`SET ... NX PX`).

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis;
use deadpool_redis::{Connection, Pool};
use mesh_protocol::NodeId;

pub use mesh_health::Health;

use crate::{Coordination, Error, Result};

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

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait::async_trait]
impl Coordination for RedisCoordination {
    async fn heartbeat(&self, node: NodeId, ttl: Duration) -> Result<()> {
        let until = unix_ms().saturating_add(millis(ttl));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(&self.providers_key)
            .arg(until)
            .arg(node.to_string())
            .ignore()
            // The set disappears when every provider has stopped.
            .cmd("PEXPIRE")
            .arg(&self.providers_key)
            .arg(millis(ttl).saturating_mul(2))
            .ignore();
        self.guarded(|mut conn| async move { pipe.query_async::<()>(&mut conn).await }).await
    }

    async fn deregister(&self, node: NodeId) -> Result<()> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(&self.providers_key).arg(node.to_string());
        self.guarded(|mut conn| async move { cmd.query_async::<()>(&mut conn).await }).await
    }

    async fn active_providers(&self) -> Result<Vec<NodeId>> {
        let now = unix_ms();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&self.providers_key)
            .arg("-inf")
            .arg(now)
            .ignore()
            .cmd("ZRANGEBYSCORE")
            .arg(&self.providers_key)
            .arg(format!("({now}"))
            .arg("+inf");
        let (members,): (Vec<String>,) =
            self.guarded(|mut conn| async move { pipe.query_async(&mut conn).await }).await?;
        Ok(members.iter().filter_map(|m| m.parse().ok()).collect())
    }

    async fn try_acquire_round(&self, round: u64, node: NodeId, lease: Duration) -> Result<bool> {
        let key = self.round_key(round);
        let me = node.to_string();
        self.guarded(|mut conn| async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&me)
                .arg("NX")
                .arg("PX")
                .arg(millis(lease))
                .query_async(&mut conn)
                .await?;
            if set.is_some() {
                return Ok(true);
            }
            // Taken: by us already (a retried call) or by another provider.
            let holder: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            Ok(holder.as_deref() == Some(me.as_str()))
        })
        .await
    }

    fn is_degraded(&self) -> bool {
        self.health.is_degraded()
    }
}
