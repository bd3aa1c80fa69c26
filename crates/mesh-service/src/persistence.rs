//! Where the node keeps what it learned: the database (PostgreSQL with `DATABASE_URL`, else an
//! SQLite file in the data directory) behind write-behind queues, and Redis (when `REDIS_URL`
//! is set) for the price mirror and the shared seen ids. Nothing here is on the relay path:
//! the node hands rows to bounded queues and moves on.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use mesh_protocol::MessageId;
use mesh_storage::{
    Database, DatabaseConfig, PriceMirror, PriceRow, PriceStore, QueueConfig, RedisConfig,
    RedisSeen, SeenRow, SeenStore, WriteBehind,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::NodeConfig;

/// How long start-up waits for the database before going on without it.
const STARTUP_DB_TIMEOUT: Duration = Duration::from_secs(5);

/// The node's storage.
#[derive(Debug, Clone)]
pub struct Persistence {
    /// The database.
    pub db: Database,
    /// Price rows on their way to the database.
    pub prices: WriteBehind<PriceRow>,
    /// Seen ids on their way to the database.
    pub seen: WriteBehind<SeenRow>,
    /// The Redis side, when configured.
    pub redis: Option<RedisSide>,
    /// Rows for Redis, written by a task of their own.
    redis_tx: Option<mpsc::Sender<(Vec<PriceRow>, Vec<SeenRow>)>>,
    seen_store: SeenStore,
    price_store: PriceStore,
    unwritten: Arc<Unwritten>,
}

/// Rows the node had accepted but could not write when it stopped, per store.
#[derive(Debug, Default)]
pub struct Unwritten {
    /// Price rows for the database.
    pub prices: AtomicU64,
    /// Seen ids for the database.
    pub seen: AtomicU64,
    /// Price rows and seen ids for Redis.
    pub redis: AtomicU64,
}

impl Unwritten {
    fn add(&self, queue: &'static str, rows: u64) {
        if rows == 0 {
            return;
        }
        let counter = match queue {
            "prices" => &self.prices,
            "seen" => &self.seen,
            _ => &self.redis,
        };
        counter.fetch_add(rows, Ordering::Relaxed);
        metrics::counter!("mesh_store_shutdown_unwritten_total", "queue" => queue).increment(rows);
    }

    /// `(prices, seen, redis)` now.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.prices.load(Ordering::Relaxed),
            self.seen.load(Ordering::Relaxed),
            self.redis.load(Ordering::Relaxed),
        )
    }
}

/// Redis components.
#[derive(Debug, Clone)]
pub struct RedisSide {
    /// Price mirror.
    pub mirror: Arc<PriceMirror>,
    /// Seen ids shared by the processes of the box.
    pub seen: Arc<RedisSeen>,
    /// The pool, for coordination.
    pub pool: deadpool_redis::Pool,
    /// The key prefix.
    pub prefix: String,
}

/// What start-up loaded.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The latest price per asset.
    pub prices: Vec<PriceRow>,
    /// Unexpired seen ids.
    pub seen: Vec<SeenRow>,
}

/// Errors of setting up storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage layer refused the configuration.
    #[error(transparent)]
    Storage(#[from] mesh_storage::Error),
    /// The data directory could not be made.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

impl Persistence {
    /// Sets up storage and starts its workers on `tasks`. Start-up never waits long for a
    /// database that is down: the queues hold and retry, and migrations are retried in the
    /// background.
    pub async fn start(
        config: &NodeConfig,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<(Self, Loaded), Error> {
        let db_config = match &config.database_url {
            Some(url) => {
                let mut c = DatabaseConfig::new(url.clone());
                c.max_connections = config.database_max_connections;
                c
            }
            None => {
                std::fs::create_dir_all(&config.data_dir)
                    .map_err(|e| Error::DataDir { path: config.data_dir.clone(), source: e })?;
                DatabaseConfig::sqlite_file(&config.sqlite_path())
            }
        };
        let db = Database::connect_lazy(&db_config)?;
        info!(backend = db.backend(), "database configured");
        let price_store = PriceStore::new(db.clone());
        let seen_store = SeenStore::new(db.clone());

        let mut loaded = Loaded::default();
        let ready = tokio::time::timeout(STARTUP_DB_TIMEOUT, async {
            db.migrate().await?;
            let prices = price_store.load_all().await?;
            let seen = seen_store.load_unexpired().await?;
            Ok::<_, mesh_storage::Error>((prices, seen))
        })
        .await;
        match ready {
            Ok(Ok((prices, seen))) => {
                info!(
                    prices = prices.len(),
                    seen_ids = seen.len(),
                    "state reloaded from the database"
                );
                loaded = Loaded { prices, seen };
            }
            Ok(Err(error)) => {
                let hint =
                    mesh_storage::tls::tls_hint(&error.to_string(), "sslrootcert in DATABASE_URL");
                warn!(%error, "Database write failed: starting without stored state; retrying in the background{hint}");
                spawn_migration_retry(db.clone(), tasks, cancel);
            }
            Err(_) => {
                warn!(
                    "Database write failed: database not answering at start-up; retrying in the background"
                );
                spawn_migration_retry(db.clone(), tasks, cancel);
            }
        }

        let mut price_queue = QueueConfig::named("prices");
        price_queue.max_pending = config.write_queue_capacity;
        let mut seen_queue = QueueConfig::named("seen");
        seen_queue.max_pending = config.write_queue_capacity;
        let (prices, price_worker) = WriteBehind::new(Arc::new(price_store.clone()), price_queue);
        let (seen, seen_worker) = WriteBehind::new(Arc::new(seen_store.clone()), seen_queue);
        let unwritten = Arc::new(Unwritten::default());
        let grace = config.shutdown_grace;
        tasks.spawn(
            flush_within(
                "prices",
                price_worker.run(cancel.clone()),
                prices.clone(),
                cancel.clone(),
                grace,
                unwritten.clone(),
            )
            .instrument(info_span!("store_prices")),
        );
        tasks.spawn(
            flush_within(
                "seen",
                seen_worker.run(cancel.clone()),
                seen.clone(),
                cancel.clone(),
                grace,
                unwritten.clone(),
            )
            .instrument(info_span!("store_seen")),
        );

        let mut redis = None;
        let mut redis_tx = None;
        if let Some(settings) = &config.redis {
            let mut rc = RedisConfig::new(settings.url.clone());
            rc.pool_size = settings.pool_size;
            rc.prefix = settings.prefix.clone();
            rc.ca_file = settings.ca_file.clone();
            let pool = rc.pool()?;
            let side = RedisSide {
                mirror: Arc::new(PriceMirror::new(pool.clone(), &rc.prefix)),
                seen: Arc::new(RedisSeen::new(pool.clone(), &rc.prefix)),
                pool,
                prefix: rc.prefix.clone(),
            };
            if loaded.prices.is_empty() {
                let mirrored = tokio::time::timeout(STARTUP_DB_TIMEOUT, side.mirror.read_all())
                    .await
                    .unwrap_or_default();
                if !mirrored.is_empty() {
                    info!(prices = mirrored.len(), "prices reloaded from the Redis mirror");
                    loaded.prices = mirrored;
                }
            }
            let (tx, rx) = mpsc::channel(1024);
            tasks.spawn(
                write_redis(side.clone(), rx, cancel.clone(), grace, unwritten.clone())
                    .instrument(info_span!("redis_writer")),
            );
            redis = Some(side);
            redis_tx = Some(tx);
        }

        Ok((Self { db, prices, seen, redis, redis_tx, seen_store, price_store, unwritten }, loaded))
    }

    /// Hands a delivered batch's rows and its message id to storage (never waits).
    pub fn record(&self, rows: Vec<PriceRow>, id: MessageId, seen_ttl: Duration) {
        let now = SystemTime::now();
        let seen = SeenRow { id, seen_at: now, expires_at: now + seen_ttl };
        self.seen.submit(seen);
        if let Some(tx) = &self.redis_tx
            && tx.try_send((rows.clone(), vec![seen])).is_err()
        {
            mesh_storage::count_dropped("redis", mesh_storage::DropReason::QueueFull, 1);
        }
        self.prices.submit_all(rows);
    }

    /// Components running on their fallback, by name.
    pub fn degraded_components(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.prices.is_degraded() || self.seen.is_degraded() {
            out.push("database".to_owned());
        }
        if let Some(r) = &self.redis
            && (r.mirror.is_degraded() || r.seen.is_degraded())
        {
            out.push("redis".to_owned());
        }
        out
    }

    /// Deletes expired seen ids (the guide's cleanup query) every `every`.
    pub fn spawn_cleanup(&self, every: Duration, tasks: &TaskTracker, cancel: &CancellationToken) {
        let store = self.seen_store.clone();
        let cancel = cancel.clone();
        tasks.spawn(
            async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    match store.delete_expired(Duration::ZERO).await {
                        Ok(n) => debug!(deleted = n, "expired seen message ids deleted"),
                        Err(error) => warn!(%error, "cleanup of expired seen message ids failed"),
                    }
                }
            }
            .instrument(info_span!("seen_cleanup")),
        );
    }

    /// What the stores had not taken when the node stopped (filled in at shutdown).
    pub fn unwritten(&self) -> &Unwritten {
        &self.unwritten
    }

    /// The price store (tests and tools).
    pub fn price_store(&self) -> &PriceStore {
        &self.price_store
    }
}

fn spawn_migration_retry(db: Database, tasks: &TaskTracker, cancel: &CancellationToken) {
    let cancel = cancel.clone();
    tasks.spawn(
        async move {
            let mut wait = Duration::from_secs(1);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                match db.migrate().await {
                    Ok(()) => {
                        info!("database reachable; migrations applied");
                        return;
                    }
                    Err(error) => debug!(%error, "migrations not applied yet"),
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
        .instrument(info_span!("migrate_retry")),
    );
}

/// Runs a write-behind worker; once `cancel` fires, gives its final flush at most `grace`.
/// A store that hangs (a lock, a stalled server) would otherwise hold the node's shutdown
/// until the service manager kills it, losing everything and counting nothing. The rows the
/// flush could not write (refused, or still held at the deadline) are counted as unwritten.
async fn flush_within<T: mesh_storage::Coalesce>(
    name: &'static str,
    worker: impl Future<Output = ()>,
    queue: WriteBehind<T>,
    cancel: CancellationToken,
    grace: Duration,
    unwritten: Arc<Unwritten>,
) {
    tokio::pin!(worker);
    tokio::select! {
        () = &mut worker => return,
        () = cancel.cancelled() => {}
    }
    let dropped_before = queue.stats().dropped;
    let finished = tokio::time::timeout(grace, &mut worker).await.is_ok();
    let stats = queue.stats();
    // Rows still held or queued at the deadline are lost with the worker.
    let lost = stats.dropped.saturating_sub(dropped_before)
        + if finished { 0 } else { stats.pending as u64 };
    unwritten.add(name, lost);
}

async fn write_redis(
    side: RedisSide,
    mut rx: mpsc::Receiver<(Vec<PriceRow>, Vec<SeenRow>)>,
    cancel: CancellationToken,
    grace: Duration,
    unwritten: Arc<Unwritten>,
) {
    loop {
        let item = tokio::select! {
            () = cancel.cancelled() => break,
            i = rx.recv() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let (rows, seen) = item;
        // Both fall back to memory on their own when Redis is down.
        side.mirror.write(&rows).await;
        side.seen.insert_batch(&seen).await;
    }
    // Shutdown: write what is queued (up to the channel's 1,024 batches) until the deadline.
    // What Redis did not take (down, or too slow) lives only in this process's memory
    // fallback and ends with it: counted as unwritten.
    rx.close();
    let deadline = tokio::time::Instant::now() + grace;
    while let Some((rows, seen)) = rx.recv().await {
        let size = (rows.len() + seen.len()) as u64;
        let written = tokio::time::timeout_at(deadline, async {
            side.mirror.write(&rows).await;
            side.seen.insert_batch(&seen).await;
        })
        .await
        .is_ok()
            && !side.mirror.is_degraded()
            && !side.seen.is_degraded();
        if !written {
            unwritten.add("redis", size);
        }
    }
    // Prices taken while Redis was down wait in the mirror's memory for it to come back: one
    // last attempt carries them (a write while degraded is the reconnect attempt); what is
    // still only in memory then ends with this process. The count is the memory's size, an
    // upper bound (it also holds prices Redis took before the outage).
    if side.mirror.is_degraded() {
        let _ = tokio::time::timeout_at(deadline, side.mirror.write(&[])).await;
        if side.mirror.is_degraded() {
            unwritten.add("redis", side.mirror.held_in_memory() as u64);
        }
    }
}
