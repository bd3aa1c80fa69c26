//! The error type of the crate.

/// Why a storage call failed.
///
/// Redis components never return these to their callers at run time (they fall back to memory);
/// only their construction can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A database statement or connection failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL names no backend this crate speaks.
    #[error("database URL {0:?} is not supported: use postgres://, postgresql:// or sqlite:")]
    UnsupportedUrl(String),
    /// A setting is out of range or malformed.
    #[error("{name}={value} is invalid: {reason}")]
    Config {
        /// The setting (an environment variable name where there is one).
        name: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: String,
    },
    /// A time cannot be represented (outside the years 1..=9999).
    #[error("time {0} ms since the Unix epoch is out of range")]
    TimeOutOfRange(i128),
    /// The Redis connection pool could not be built.
    #[error("redis pool for {url}: {reason}")]
    RedisPool {
        /// The URL, password removed.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
