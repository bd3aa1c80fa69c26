//! Where the node keeps what it learned: the database (PostgreSQL with `DATABASE_URL`, else an
//! SQLite file in the data directory) behind write-behind queues, and Redis (when `REDIS_URL`
//! is set) for the price mirror and the shared seen ids. Nothing here is on the relay path:
//! the node hands rows to bounded queues and moves on.

use std::sync::Arc;
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
                warn!(%error, "Database write failed: starting without stored state; retrying in the background");
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
        tasks.spawn(price_worker.run(cancel.clone()).instrument(info_span!("store_prices")));
        tasks.spawn(seen_worker.run(cancel.clone()).instrument(info_span!("store_seen")));

        let mut redis = None;
        let mut redis_tx = None;
        if let Some(settings) = &config.redis {
            let mut rc = RedisConfig::new(settings.url.clone());
            rc.pool_size = settings.pool_size;
            rc.prefix = settings.prefix.clone();
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
                write_redis(side.clone(), rx, cancel.clone())
                    .instrument(info_span!("redis_writer")),
            );
            redis = Some(side);
            redis_tx = Some(tx);
        }

        Ok((Self { db, prices, seen, redis, redis_tx, seen_store, price_store }, loaded))
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

async fn write_redis(
    side: RedisSide,
    mut rx: mpsc::Receiver<(Vec<PriceRow>, Vec<SeenRow>)>,
    cancel: CancellationToken,
) {
    loop {
        let item = tokio::select! {
            () = cancel.cancelled() => return,
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
}
