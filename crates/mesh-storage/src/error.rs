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

impl Error {
    /// `true` when the store refused the rows of the statement, not the statement itself:
    /// a value it cannot hold (PostgreSQL SQLSTATE class 22 "data exception" such as a string
    /// longer than its column or a time out of range, class 23 "integrity constraint
    /// violation"; SQLite `TOOBIG`, `CONSTRAINT`, `MISMATCH`), a value that could not be
    /// encoded, or a time this crate cannot convert. Retrying the same rows fails the same
    /// way, so the write-behind queue isolates the row instead of retrying the batch.
    ///
    /// Everything else (connection, pool, I/O, missing table, disk full, deadlock) counts as
    /// an outage: rows are kept and retried, since losing them to a passing fault is worse
    /// than retrying.
    pub fn refuses_rows(&self) -> bool {
        match self {
            Error::TimeOutOfRange(_) => true,
            Error::Database(sqlx::Error::Encode(_)) => true,
            Error::Database(sqlx::Error::Database(e)) => {
                let Some(code) = e.code() else { return false };
                if e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                    // SQLSTATE: five characters, the first two the class.
                    code.starts_with("22") || code.starts_with("23")
                } else {
                    // SQLite's extended result codes keep the primary code in the low byte.
                    code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 18..=20))
                }
            }
            _ => false,
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
