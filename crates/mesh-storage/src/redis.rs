//! Redis: the price mirror and the seen-id backend, both under one key prefix.
//!
//! Redis is optional and never in a caller's way: every component keeps working from memory
//! while Redis is down, and [`Health`] (one per component) logs `Redis connection failed`
//! once per outage, exposes the degraded flag and spaces reconnect attempts with exponential
//! backoff. Keys: `{prefix}prices` and `{prefix}prices:ts` (hashes, `"{blockchain} {asset}"` ->
//! price JSON and -> timestamp ms), `{prefix}seen:{message_id}` (one string per id, with its expiry).

mod mirror;
mod seen;

use std::time::Duration;

use deadpool_redis::redis::{
    AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo, TlsCertificates,
};
use deadpool_redis::{Manager, Pool, Runtime};

pub use mesh_health::Health;
pub use mirror::PriceMirror;
pub use seen::{DEFAULT_SEEN_MEMORY_CAPACITY, RedisSeen};

use crate::{Error, Result};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "mesh:";

/// How to reach Redis. Its `Debug` hides the URL's secrets ([`crate::redact_url`]).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `REDIS_URL`, e.g. `redis://:password@localhost:6379` (the password part is optional).
    pub url: String,
    /// `REDIS_POOL_SIZE`: most connections of the pool.
    pub pool_size: usize,
    /// Every key starts with it.
    pub prefix: String,
    /// Connect and response timeout of one call; a call that takes longer counts as a
    /// failure and the component falls back to memory.
    pub timeout: Duration,
    /// `REDIS_CA_FILE`: PEM certificates of the authority a `rediss://` server's certificate
    /// must chain to, instead of the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &crate::redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl RedisConfig {
    /// The defaults for `url`: pool of 10, prefix `mesh:`, 500 ms timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 10,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: Duration::from_millis(500),
            ca_file: None,
        }
    }

    /// `REDIS_URL` and `REDIS_POOL_SIZE` from the environment; `None` when `REDIS_URL` is
    /// unset or empty (Redis is optional).
    pub fn from_env() -> Result<Option<Self>> {
        let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let mut config = Self::new(url);
        if let Ok(size) = std::env::var("REDIS_POOL_SIZE") {
            config.pool_size = parse_pool_size(&size)?;
        }
        Ok(Some(config))
    }

    /// Builds the connection pool. Nothing is connected yet: connections open on first use,
    /// so a node starts while Redis is down (and reports degraded on first use).
    ///
    /// A `rediss://` URL connects over TLS (rustls): the server's certificate must chain to
    /// [`RedisConfig::ca_file`] when set, else to the system's roots, and name the URL's host.
    /// A CA file that cannot be read or holds no certificate, or one given with a `redis://`
    /// URL, is an error here, at start.
    pub fn pool(&self) -> Result<Pool> {
        let pool_error =
            |reason: String| Error::RedisPool { url: crate::db::redact(&self.url), reason };
        crate::tls::install_crypto_provider();
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let info = self.connection_info()?;
        let manager =
            Manager::new_with_config(info, connection).map_err(|e| pool_error(e.to_string()))?;
        Pool::builder(manager)
            .max_size(self.pool_size)
            .wait_timeout(Some(self.timeout))
            .create_timeout(Some(self.timeout))
            .recycle_timeout(Some(self.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| pool_error(e.to_string()))
    }
}

impl RedisConfig {
    /// Where and how to connect: the URL, with the CA file's certificates as the roots of a
    /// `rediss://` connection when one is set.
    fn connection_info(&self) -> Result<ConnectionInfo> {
        let config_error = |reason: String| Error::Config {
            name: "REDIS_CA_FILE",
            value: self.ca_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            reason,
        };
        let pool_error =
            |reason: String| Error::RedisPool { url: crate::db::redact(&self.url), reason };
        let Some(ca_file) = &self.ca_file else {
            return self.url.as_str().into_connection_info().map_err(|e| pool_error(e.to_string()));
        };
        if !self.url.starts_with("rediss://") {
            return Err(config_error("a CA file needs a rediss:// REDIS_URL (TLS)".into()));
        }
        let pem = std::fs::read(ca_file).map_err(|e| config_error(e.to_string()))?;
        crate::tls::check_pem_certificates(&pem).map_err(config_error)?;
        let certificates = TlsCertificates { client_tls: None, root_cert: Some(pem) };
        let client = deadpool_redis::redis::Client::build_with_tls(self.url.as_str(), certificates)
            .map_err(|e| config_error(e.to_string()))?;
        Ok(client.get_connection_info().clone())
    }
}

/// `REDIS_POOL_SIZE`: a whole number in 1..=1024.
fn parse_pool_size(text: &str) -> Result<usize> {
    text.trim().parse().ok().filter(|n| (1..=1024).contains(n)).ok_or_else(|| Error::Config {
        name: "REDIS_POOL_SIZE",
        value: text.to_owned(),
        reason: "expected a whole number in 1..=1024".into(),
    })
}

/// Why a Redis call failed: the pool could not give a connection, or the command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("{0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("{0}")]
    Command(#[from] deadpool_redis::redis::RedisError),
}

/// Escapes the glob characters of `text` for `SCAN ... MATCH`.
pub(crate) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", RedisConfig::new("rediss://user:s/cret@h:6380/0?token=t0k"));
        assert!(!shown.contains("cret") && !shown.contains("t0k"), "{shown}");
        assert!(shown.contains("rediss://user:<redacted>@h:6380/0?token=<redacted>"), "{shown}");
    }

    #[test]
    fn pool_size_is_checked() {
        assert_eq!(parse_pool_size("10").unwrap(), 10);
        for bad in ["0", "-1", "ten", "", "1025"] {
            let err = parse_pool_size(bad).unwrap_err();
            assert!(err.to_string().starts_with(&format!("REDIS_POOL_SIZE={bad} ")), "{err}");
        }
    }

    #[test]
    fn pool_accepts_a_password_url_and_refuses_nonsense() {
        assert!(RedisConfig::new("redis://:pw@localhost:6379").pool().is_ok());
        let err = RedisConfig::new("redis://:pw@").pool().unwrap_err();
        assert!(!err.to_string().contains("pw"), "password leaked: {err}");
        assert!(RedisConfig::new("nonsense://x").pool().is_err());
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("mesh:seen:"), "mesh:seen:");
        assert_eq!(glob_escape(r"a*b?[c]\"), r"a\*b\?\[c\]\\");
    }
}
