//! Storage of the mesh price network (ARCHITECTURE section 9): the latest price per asset and
//! the seen message ids, in PostgreSQL (`DATABASE_URL`) or an embedded SQLite file, an optional
//! Redis mirror of the prices and Redis as a shared seen-id backend, and the bounded
//! write-behind queue that keeps database writes off the relay path.
//!
//! - [`Database`] connects to PostgreSQL or SQLite and applies the embedded migrations (the
//!   guide's `mesh_price_cache` and `mesh_seen_messages`; `migrations/` at the workspace root).
//! - [`PriceStore`] upserts a batch in one statement and never replaces a newer price with an
//!   older one; [`SeenStore`] records ids with their expiry and runs the guide's cleanup.
//!   [`SeenStore`] and [`redis::RedisSeen`] are backing stores of the seen cache
//!   ([`mesh_seen_cache::SeenBackend`]).
//! - [`WriteBehind`] batches, retries while the database is down, never blocks its callers and
//!   counts what it had to drop (`mesh_store_dropped_total{queue, reason}`); a row the store
//!   refuses is set aside and counted, never retried with its batch ([`DropReason`]).
//! - [`redis::PriceMirror`] and [`redis::RedisSeen`] fall back to memory while Redis is down
//!   (`Redis connection failed`, once per outage) and catch up when it is back.
//!
//! ```
//! use std::sync::Arc;
//! use mesh_protocol::NodeId;
//! use mesh_storage::{Database, DatabaseConfig, PriceRow, PriceStore, QueueConfig, WriteBehind};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! // With no DATABASE_URL a node keeps its prices in an SQLite file in its data directory.
//! let db = Database::connect(&DatabaseConfig::sqlite_file(&dir.path().join("mesh.db"))).await?;
//! db.migrate().await?;
//! let store = PriceStore::new(db);
//!
//! let row = |price: &str, timestamp_ms| PriceRow {
//!     asset: "So11111111111111111111111111111111111111112".into(),
//!     blockchain: "solana".into(),
//!     price: price.parse().unwrap(),
//!     timestamp_ms,
//!     source_node_id: NodeId::from_uuid(uuid::Uuid::nil()),
//!     change_24h: None,
//! };
//! store.upsert(&[row("151.25", 2_000)]).await?;
//! store.upsert(&[row("149.00", 1_000)]).await?; // older: ignored
//! assert_eq!(store.load_all().await?[0].price.to_string(), "151.25");
//!
//! // The relay path hands rows to the queue and never waits for the database.
//! let (queue, worker) = WriteBehind::new(Arc::new(store.clone()), QueueConfig::named("prices"));
//! let shutdown = CancellationToken::new();
//! let task = tokio::spawn(worker.run(shutdown.clone()));
//! assert!(queue.submit(row("152.00", 3_000)));
//! shutdown.cancel(); // the worker writes what it holds before it stops
//! task.await?;
//! assert_eq!(store.load_all().await?[0].price.to_string(), "152");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod db;
mod error;
pub mod migrations;
pub mod queue;
mod redact;
pub mod redis;
mod row;
mod store;
pub mod tls;

pub use db::{Database, DatabaseConfig};
pub use error::{Error, Result};
pub use queue::{
    Coalesce, DropReason, QueueConfig, QueueStats, Sink, Worker, WriteBehind, count_dropped,
};
pub use redact::{REDACTED, SecretUrl, redact_url};
pub use redis::{PriceMirror, RedisConfig, RedisSeen};
pub use row::{PriceFilter, PriceRow, SeenRow};
pub use store::{PriceStore, SeenStore};
