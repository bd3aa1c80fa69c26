//! Forgetting prices nobody sends any more (`MESH_PRICE_RETENTION_SECS`).
//!
//! In an open mesh anyone can publish prices for assets nobody else cares about; without a
//! limit in time they would stay in the price book, the Redis mirror and the tables forever.
//! A periodic task removes every price whose timestamp is older than the retention from all
//! of them, a bounded amount per pass.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::persistence::Persistence;

/// Most rows deleted from each table, and fields from the mirror, per pass: a pass never holds
/// a table long, and a backlog is worked off over several passes.
pub(crate) const ROWS_PER_PASS: u32 = 10_000;

/// How often the cleanup runs: a quarter of the retention, at most once a minute.
pub(crate) fn interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Runs until `cancel`: every [`interval`], forgets what is older than `retention` in the book
/// (through `forget_in_book`, which returns the assets it dropped), the Redis mirror and the
/// tables (`mesh_prices`, `mesh_price_cache`), and trims the mirror and the tables to
/// `max_per_origin` rows per source, the book's share (the book evicts an origin's oldest
/// quotes as it goes; the stores follow here).
pub(crate) async fn run(
    retention: Duration,
    max_per_origin: usize,
    forget_in_book: impl Fn(i64) -> usize,
    persistence: Persistence,
    cancel: CancellationToken,
) {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(interval(retention));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff_ms = crate::now_ms().saturating_sub(retention_ms);
        let assets = forget_in_book(cutoff_ms);
        let mirrored = match &persistence.redis {
            Some(redis) => redis.mirror.forget_older_than(cutoff_ms, ROWS_PER_PASS).await,
            None => 0,
        };
        let share = u32::try_from(max_per_origin).unwrap_or(u32::MAX);
        let store = persistence.price_store();
        let rows = match store.delete_older_than(cutoff_ms, ROWS_PER_PASS).await {
            Ok(rows) => rows,
            Err(error) => {
                // The database may be down; the next pass tries again.
                debug!(%error, "retention cleanup of the price tables failed");
                0
            }
        };
        let trimmed_rows = match store.trim_per_source(share, ROWS_PER_PASS).await {
            Ok(rows) => rows,
            Err(error) => {
                debug!(%error, "per-origin trim of the price tables failed");
                0
            }
        };
        let trimmed_mirror = match &persistence.redis {
            Some(redis) => {
                redis.mirror.trim_per_source(max_per_origin, ROWS_PER_PASS as usize).await
            }
            None => 0,
        };
        metrics::counter!("mesh_price_origin_trimmed_total", "store" => "database")
            .increment(trimmed_rows);
        metrics::counter!("mesh_price_origin_trimmed_total", "store" => "redis")
            .increment(trimmed_mirror);
        if trimmed_rows > 0 || trimmed_mirror > 0 {
            debug!(trimmed_rows, trimmed_mirror, "stores trimmed to each origin's share");
        }
        metrics::counter!("mesh_price_retention_removed_total", "store" => "book")
            .increment(assets as u64);
        metrics::counter!("mesh_price_retention_removed_total", "store" => "redis")
            .increment(mirrored);
        metrics::counter!("mesh_price_retention_removed_total", "store" => "database")
            .increment(rows);
        if assets > 0 || mirrored > 0 || rows > 0 {
            info!(
                assets,
                mirrored,
                rows,
                retention_secs = retention.as_secs(),
                "prices nobody sent within the retention forgotten"
            );
        }
        if u64::from(ROWS_PER_PASS) <= rows {
            warn!(rows, "retention cleanup has a backlog; continuing next pass");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_a_quarter_of_the_retention_at_most_a_minute() {
        assert_eq!(interval(Duration::from_secs(604_800)), Duration::from_secs(60));
        assert_eq!(interval(Duration::from_secs(120)), Duration::from_secs(30));
        assert_eq!(interval(Duration::from_secs(2)), Duration::from_millis(500));
    }
}
