//! The database connection: PostgreSQL when a server is configured, SQLite otherwise.

pub(crate) mod postgres;
pub(crate) mod sqlite;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::{Error, Result};

/// How to reach the database. Its `Debug` hides the URL's secrets ([`crate::redact_url`]).
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// `postgres://...` / `postgresql://...` (`DATABASE_URL`), or `sqlite:...` (the embedded
    /// default, a file in the data directory).
    pub url: String,
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a statement waits for a connection before it fails (the write-behind queue
    /// then retries); keeps callers from hanging while the server is unreachable.
    pub acquire_timeout: Duration,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

impl DatabaseConfig {
    /// The defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), max_connections: 5, acquire_timeout: Duration::from_secs(3) }
    }

    /// An SQLite file at `path`, created when missing.
    pub fn sqlite_file(path: &Path) -> Self {
        Self::new(format!("sqlite://{}?mode=rwc", path.display()))
    }
}

/// A connection pool to PostgreSQL or SQLite. Cloning is cheap and shares the pool.
#[derive(Debug, Clone)]
pub enum Database {
    /// A PostgreSQL server.
    Postgres(PgPool),
    /// An SQLite file (or memory database).
    Sqlite(SqlitePool),
}

impl Database {
    /// Connects, failing when the database cannot be reached now.
    pub async fn connect(config: &DatabaseConfig) -> Result<Self> {
        let db = Self::connect_lazy(config)?;
        match &db {
            Database::Postgres(pool) => drop(pool.acquire().await?),
            Database::Sqlite(pool) => drop(pool.acquire().await?),
        }
        Ok(db)
    }

    /// Builds the pool without connecting (within a Tokio runtime): connections are opened on
    /// first use, so a node can start while its database is down and let the write-behind
    /// queue retry.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Self> {
        let url = config.url.as_str();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(config.max_connections)
                .acquire_timeout(config.acquire_timeout)
                .connect_lazy(url)?;
            Ok(Database::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            let mut options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .busy_timeout(config.acquire_timeout);
            if !in_memory {
                // Readers do not block the writer and the file survives a crash.
                options = options.journal_mode(SqliteJournalMode::Wal);
            }
            // Every connection to `:memory:` is a database of its own: keep exactly one.
            let pool = if in_memory {
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
            } else {
                SqlitePoolOptions::new().max_connections(config.max_connections)
            }
            .acquire_timeout(config.acquire_timeout)
            .connect_lazy_with(options);
            Ok(Database::Sqlite(pool))
        } else {
            Err(Error::UnsupportedUrl(redact(url)))
        }
    }

    /// Applies the embedded migrations of this backend ([`crate::migrations`]); a no-op when
    /// they are all applied.
    pub async fn migrate(&self) -> Result<()> {
        match self {
            Database::Postgres(pool) => crate::migrations::postgres().await?.run(pool).await?,
            Database::Sqlite(pool) => crate::migrations::sqlite().await?.run(pool).await?,
        }
        Ok(())
    }

    /// `"postgres"` or `"sqlite"`, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Database::Postgres(_) => "postgres",
            Database::Sqlite(_) => "sqlite",
        }
    }

    /// Closes every connection of the pool.
    pub async fn close(&self) {
        match self {
            Database::Postgres(pool) => pool.close().await,
            Database::Sqlite(pool) => pool.close().await,
        }
    }
}

/// A stored price row, or `None` (logged) when its decimal text is not a number: one bad row
/// must not stop a node from loading the others.
fn decode_price(
    asset: String,
    blockchain: String,
    price: &str,
    timestamp_ms: i64,
    source_node_id: mesh_protocol::NodeId,
    change_24h: Option<&str>,
) -> Option<crate::PriceRow> {
    use mesh_protocol::Decimal;
    let Ok(price) = Decimal::parse_any(price) else {
        tracing::warn!(asset, price, "stored price is not a decimal number; row skipped");
        return None;
    };
    let change_24h = match change_24h.map(Decimal::parse_any) {
        None => None,
        Some(Ok(change)) => Some(change),
        Some(Err(_)) => {
            tracing::warn!(asset, change_24h, "stored change_24h is not a decimal; ignored");
            None
        }
    };
    Some(crate::PriceRow { asset, blockchain, price, timestamp_ms, source_node_id, change_24h })
}

/// `url` with its secrets hidden, for error messages and logs.
pub(crate) fn redact(url: &str) -> String {
    crate::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:secret@localhost:6379"), "redis://:<redacted>@localhost:6379");
        assert_eq!(redact("postgres://u:p@h/db"), "postgres://u:<redacted>@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:mesh.db"), "sqlite:mesh.db");
    }

    #[test]
    fn debug_hides_the_password() {
        let config = DatabaseConfig::new("postgres://u:hunter2@h/db?sslpassword=k3y");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("k3y"), "{shown}");
        assert!(shown.contains("postgres://u:<redacted>@h/db"), "{shown}");
    }

    #[test]
    fn unknown_schemes_are_refused() {
        let err = Database::connect_lazy(&DatabaseConfig::new("mysql://u:pw@h/db")).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedUrl(ref u) if u == "mysql://u:<redacted>@h/db"),
            "{err}"
        );
    }
}
