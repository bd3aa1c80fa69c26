//! Node configuration (ARCHITECTURE section 12): every variable of the guide with its default
//! and range, read from (lowest to highest precedence) the defaults, a TOML file
//! (`--config mesh.toml`, keys named like the variables, any case), a `.env` file, the
//! environment and command-line overrides. Every bad value is reported at once.

//!
//! `variables.rs` is the table of every variable (name, default, range, meaning); `sources.rs`
//! merges the sources into one map; this file turns the map into a checked [`NodeConfig`].

mod sources;
mod variables;

pub use sources::{ConfigError, Problem, Sources, merge};
pub use variables::{VARIABLES, Variable};

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;
use mesh_protocol::NodeId;
use mesh_storage::SecretUrl;

/// Redis settings.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `REDIS_URL` (may hold a password: never printed).
    pub url: String,
    /// `REDIS_POOL_SIZE`.
    pub pool_size: usize,
    /// `MESH_REDIS_PREFIX`.
    pub prefix: String,
    /// `REDIS_CA_FILE`: the authority a `rediss://` server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("prefix", &self.prefix)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The effective configuration of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Provider settings (`BIRDEYE_API_KEY`, assets, interval, window, TTL).
    pub provider: mesh_provider::Config,
    /// Start in provider mode (`--provider`).
    pub provider_mode: bool,
    /// `MESH_DATA_DIR`.
    pub data_dir: PathBuf,
    /// `MESH_NODE_SOCKET`.
    pub socket: PathBuf,
    /// `MESH_NODE_SOCKET_GROUP`, resolved to a group id (`None`: unset).
    pub socket_group: Option<u32>,
    /// `MESH_LOG_DIR`.
    pub log_dir: PathBuf,
    /// `MESH_LOG_LEVEL`.
    pub log_level: String,
    /// `MESH_METRICS_LISTEN` (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// `MESH_LISTEN_ADDRS`.
    pub listen_addrs: Vec<Multiaddr>,
    /// `MESH_MDNS_*`, `MESH_BOOTSTRAP_PEERS`, `MESH_BLE_ENABLED`, `MESH_ALLOW_PRIVATE_ADDRS`
    /// (`addr_filter`, which the relay applies too).
    pub discovery: mesh_discovery::Config,
    /// `MESH_MIN_PEER_CONNECTIONS`.
    pub min_peers: usize,
    /// `MESH_MAX_PEER_CONNECTIONS`.
    pub max_peers: usize,
    /// `MESH_PEER_EXPLORE_INTERVAL_SECS` (`None`: 0, off).
    pub explore_interval: Option<Duration>,
    /// `MESH_STALENESS_THRESHOLD_SECS`.
    pub staleness_threshold: Duration,
    /// `MESH_PRICE_RETENTION_SECS`: prices older than this (by their timestamp) leave the
    /// book, the Redis mirror and the tables.
    pub price_retention: Duration,
    /// Most quotes one origin may hold in the price book; past it, the origin's own oldest
    /// quote makes room (tests set it low; no variable).
    pub max_quotes_per_origin: usize,
    /// `MESH_PRICE_DISCREPANCY_THRESHOLD_PERCENT`.
    pub discrepancy_threshold_percent: f64,
    /// `MESH_SEEN_MESSAGES_CACHE_SIZE`.
    pub seen_cache_size: usize,
    /// `MESH_SEEN_MESSAGES_TTL_SECS`.
    pub seen_ttl: Duration,
    /// `MESH_MAX_CLOCK_SKEW_SECS`.
    pub max_clock_skew_secs: u32,
    /// `MESH_TRUSTED_PROVIDERS`.
    pub trusted_providers: Option<HashSet<NodeId>>,
    /// `REDIS_URL` and friends.
    pub redis: Option<RedisSettings>,
    /// `DATABASE_URL` (`None`: SQLite in the data directory); `Debug` hides its secrets.
    pub database_url: Option<SecretUrl>,
    /// `DATABASE_MAX_CONNECTIONS`.
    pub database_max_connections: u32,
    /// `MESH_WRITE_QUEUE_CAPACITY`.
    pub write_queue_capacity: usize,
    /// `MESH_SHUTDOWN_GRACE_SECS`: how long the final flush of the stores may take.
    pub shutdown_grace: Duration,
    /// Added to this node's wall clock (provider stamps and validation), in milliseconds: 0 in
    /// production; tests set it to play a node whose clock is wrong. Not a variable.
    pub clock_offset_ms: i64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        // The defaults are the values of VARIABLES; parsing an empty map yields them.
        match Self::from_map(&BTreeMap::new(), false) {
            Ok(config) => config,
            // Unreachable: the built-in defaults are checked by a test below.
            Err(e) => panic!("built-in defaults are invalid: {e}"),
        }
    }
}

struct Reader<'a> {
    map: &'a BTreeMap<String, String>,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn raw(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn text(&self, name: &'static str) -> String {
        self.raw(name).map(str::to_owned).unwrap_or_else(|| default_of(name).to_owned())
    }

    fn number<T>(&mut self, name: &'static str, min: T, max: T) -> T
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let text = self.text(name);
        match text.parse::<T>() {
            Ok(v) if v >= min && v <= max => v,
            Ok(_) => {
                self.problems.push(Problem(format!("{name}={text} is out of range {min}..={max}")));
                min
            }
            Err(_) => {
                self.problems.push(Problem(format!(
                    "{name}={text:?} is not a number (allowed {min}..={max})"
                )));
                min
            }
        }
    }

    fn list(&self, name: &'static str) -> Vec<String> {
        self.text(name)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn multiaddrs(&mut self, name: &'static str) -> Vec<Multiaddr> {
        let mut out = Vec::new();
        for item in self.list(name) {
            match item.parse::<Multiaddr>() {
                Ok(a) => out.push(a),
                Err(e) => {
                    self.problems.push(Problem(format!("{name}: {item:?} is not a multiaddr: {e}")))
                }
            }
        }
        out
    }
}

fn default_of(name: &str) -> &'static str {
    VARIABLES.iter().find(|v| v.name == name).map_or("", |v| v.default)
}

impl NodeConfig {
    /// Reads and validates a configuration from merged values (see [`merge`]).
    pub fn from_map(
        map: &BTreeMap<String, String>,
        provider_mode: bool,
    ) -> Result<Self, ConfigError> {
        let mut r = Reader { map, problems: Vec::new() };
        let provider =
            match mesh_provider::Config::from_lookup(|name| r.raw(name).map(str::to_owned)) {
                Ok(p) => p,
                Err(errors) => {
                    for e in errors.0 {
                        r.problems.push(Problem(e.to_string()));
                    }
                    mesh_provider::Config::default()
                }
            };
        let min_peers = r.number::<usize>("MESH_MIN_PEER_CONNECTIONS", 2, 5);
        let max_peers = r.number::<usize>("MESH_MAX_PEER_CONNECTIONS", 5, 20);
        let explore = r.number::<u64>("MESH_PEER_EXPLORE_INTERVAL_SECS", 0, 3600);
        let staleness = r.number::<u64>("MESH_STALENESS_THRESHOLD_SECS", 300, 7200);
        let retention = r.number::<u64>("MESH_PRICE_RETENTION_SECS", 3600, 31_536_000);
        let discrepancy = r.number::<f64>("MESH_PRICE_DISCREPANCY_THRESHOLD_PERCENT", 0.1, 100.0);
        let seen_cache_size = r.number::<usize>("MESH_SEEN_MESSAGES_CACHE_SIZE", 1000, 1_000_000);
        let seen_ttl = r.number::<u64>("MESH_SEEN_MESSAGES_TTL_SECS", 60, 86_400);
        let skew = r.number::<u32>("MESH_MAX_CLOCK_SKEW_SECS", 0, 300);
        let pool = r.number::<usize>("REDIS_POOL_SIZE", 1, 100);
        let db_conns = r.number::<u32>("DATABASE_MAX_CONNECTIONS", 1, 100);
        let queue = r.number::<usize>("MESH_WRITE_QUEUE_CAPACITY", 100, 1_000_000);
        let shutdown_grace = r.number::<u64>("MESH_SHUTDOWN_GRACE_SECS", 1, 120);
        let listen_addrs = r.multiaddrs("MESH_LISTEN_ADDRS");
        let discovery =
            match mesh_discovery::Config::from_lookup(|name| r.raw(name).map(str::to_owned)) {
                Ok(d) => d,
                Err(errors) => {
                    for e in errors.0 {
                        r.problems.push(Problem(e.to_string()));
                    }
                    mesh_discovery::Config::default()
                }
            };
        let trusted: Vec<String> = r.list("MESH_TRUSTED_PROVIDERS");
        let mut trusted_providers = None;
        if !trusted.is_empty() {
            let mut set = HashSet::new();
            for t in trusted {
                match t.parse::<NodeId>() {
                    Ok(id) => {
                        set.insert(id);
                    }
                    Err(_) => r.problems.push(Problem(format!(
                        "MESH_TRUSTED_PROVIDERS: {t:?} is not a node id (UUID)"
                    ))),
                }
            }
            trusted_providers = Some(set);
        }
        let metrics_text = r.text("MESH_METRICS_LISTEN");
        let metrics_listen = match metrics_text.to_ascii_lowercase().as_str() {
            "off" | "none" | "false" | "0" => None,
            _ => match metrics_text.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    r.problems.push(Problem(format!(
                        "MESH_METRICS_LISTEN={metrics_text:?} is not host:port or off"
                    )));
                    None
                }
            },
        };
        let database_url = r.raw("DATABASE_URL").map(SecretUrl::from);
        if let Some(url) = &database_url
            && !["postgres://", "postgresql://", "sqlite:"].iter().any(|p| url.starts_with(p))
        {
            r.problems.push(Problem(format!(
                "DATABASE_URL={} is not a postgres:// (or sqlite:) URL",
                redact_url(url)
            )));
        }
        let redis_ca = r.raw("REDIS_CA_FILE").filter(|p| !p.trim().is_empty()).map(PathBuf::from);
        let redis = r.raw("REDIS_URL").map(|url| RedisSettings {
            url: url.to_owned(),
            pool_size: pool,
            prefix: r.text("MESH_REDIS_PREFIX"),
            ca_file: redis_ca.clone(),
        });
        if let Some(ca) = &redis_ca {
            match &redis {
                Some(redis) if !redis.url.starts_with("rediss://") => r.problems.push(Problem(
                    format!("REDIS_CA_FILE={} needs a rediss:// REDIS_URL (TLS)", ca.display()),
                )),
                None => r.problems.push(Problem(format!(
                    "REDIS_CA_FILE={} is set but REDIS_URL is not",
                    ca.display()
                ))),
                Some(_) => {}
            }
            match std::fs::read_to_string(ca) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => r.problems.push(Problem(format!(
                    "REDIS_CA_FILE={}: no PEM certificate in the file",
                    ca.display()
                ))),
                Err(e) => r.problems.push(Problem(format!("REDIS_CA_FILE={}: {e}", ca.display()))),
            }
        }
        if let Some(redis) = &redis
            && !(redis.url.starts_with("redis://") || redis.url.starts_with("rediss://"))
        {
            r.problems.push(Problem(format!(
                "REDIS_URL={} is not a redis:// URL",
                redact_url(&redis.url)
            )));
        }
        if min_peers > max_peers {
            r.problems.push(Problem(format!(
                "MESH_MIN_PEER_CONNECTIONS={min_peers} is above MESH_MAX_PEER_CONNECTIONS={max_peers}"
            )));
        }
        let data_dir = PathBuf::from(r.text("MESH_DATA_DIR"));
        let socket = match r.raw("MESH_NODE_SOCKET") {
            Some(s) => PathBuf::from(s),
            None => data_dir.join("node.sock"),
        };
        let socket_group = match r.raw("MESH_NODE_SOCKET_GROUP").filter(|g| !g.trim().is_empty()) {
            None => None,
            Some(name) => match mesh_ipc::resolve_group(name.trim()) {
                Ok(gid) => Some(gid),
                Err(e) => {
                    r.problems.push(Problem(e.to_string()));
                    None
                }
            },
        };
        let level = r.text("MESH_LOG_LEVEL");
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            r.problems
                .push(Problem(format!("MESH_LOG_LEVEL={level:?} is not a log level or filter")));
        }
        let config = NodeConfig {
            provider,
            provider_mode,
            socket,
            socket_group,
            log_dir: PathBuf::from(r.text("MESH_LOG_DIR")),
            log_level: level,
            metrics_listen,
            listen_addrs,
            discovery,
            min_peers,
            max_peers,
            explore_interval: (explore > 0).then(|| Duration::from_secs(explore)),
            staleness_threshold: Duration::from_secs(staleness),
            price_retention: Duration::from_secs(retention),
            max_quotes_per_origin: crate::book::DEFAULT_MAX_QUOTES_PER_ORIGIN,
            discrepancy_threshold_percent: discrepancy,
            seen_cache_size,
            seen_ttl: Duration::from_secs(seen_ttl),
            max_clock_skew_secs: skew,
            trusted_providers,
            redis,
            database_url,
            database_max_connections: db_conns,
            write_queue_capacity: queue,
            shutdown_grace: Duration::from_secs(shutdown_grace),
            clock_offset_ms: 0,
            data_dir,
        };
        if config.provider_mode
            && config.provider.api_key.is_none()
            && !config.stored_provider_key_exists()
        {
            r.problems.push(Problem(
                "--provider needs BIRDEYE_API_KEY (or provider mode enabled earlier through the API)".to_owned(),
            ));
        }
        if r.problems.is_empty() { Ok(config) } else { Err(ConfigError(r.problems)) }
    }

    /// Reads and validates a configuration from `sources`.
    pub fn load(sources: &Sources, provider_mode: bool) -> Result<Self, ConfigError> {
        Self::from_map(&merge(sources)?, provider_mode)
    }

    /// Path of the node key.
    pub fn node_key_path(&self) -> PathBuf {
        self.data_dir.join("node.key")
    }

    /// Path of the stored provider key (provider mode survives restarts).
    pub fn provider_key_path(&self) -> PathBuf {
        self.data_dir.join("provider.key")
    }

    /// Path of the SQLite file used when `DATABASE_URL` is unset.
    pub fn sqlite_path(&self) -> PathBuf {
        self.data_dir.join("mesh.db")
    }

    fn stored_provider_key_exists(&self) -> bool {
        self.provider_key_path().exists()
    }

    /// Every variable with its effective value, secrets redacted, as `NAME=value` lines.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let redacted = |set: bool| if set { "<redacted>".to_owned() } else { String::new() };
        let join =
            |v: &[Multiaddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        for v in VARIABLES {
            let value = match v.name {
                "BIRDEYE_API_KEY" => redacted(self.provider.api_key.is_some()),
                "MESH_BIRDEYE_BASE_URL" => self.provider.base_url.clone(),
                "MESH_PROVIDER_ASSETS" => self.provider.assets.to_string(),
                "MESH_PROVIDER_FETCH_INTERVAL_SECS" => {
                    self.provider.fetch_interval_secs.to_string()
                }
                "MESH_COORDINATION_WINDOW_SECS" => {
                    self.provider.coordination_window_secs.to_string()
                }
                "MESH_MESSAGE_TTL" => self.provider.message_ttl.to_string(),
                "MESH_MIN_PEER_CONNECTIONS" => self.min_peers.to_string(),
                "MESH_MAX_PEER_CONNECTIONS" => self.max_peers.to_string(),
                "MESH_PEER_EXPLORE_INTERVAL_SECS" => {
                    self.explore_interval.map_or(0, |d| d.as_secs()).to_string()
                }
                "MESH_STALENESS_THRESHOLD_SECS" => self.staleness_threshold.as_secs().to_string(),
                "MESH_PRICE_RETENTION_SECS" => self.price_retention.as_secs().to_string(),
                "MESH_PRICE_DISCREPANCY_THRESHOLD_PERCENT" => {
                    self.discrepancy_threshold_percent.to_string()
                }
                "MESH_SEEN_MESSAGES_CACHE_SIZE" => self.seen_cache_size.to_string(),
                "MESH_SEEN_MESSAGES_TTL_SECS" => self.seen_ttl.as_secs().to_string(),
                "MESH_MAX_CLOCK_SKEW_SECS" => self.max_clock_skew_secs.to_string(),
                "MESH_TRUSTED_PROVIDERS" => self
                    .trusted_providers
                    .as_ref()
                    .map(|s| {
                        let mut ids: Vec<String> = s.iter().map(ToString::to_string).collect();
                        ids.sort();
                        ids.join(",")
                    })
                    .unwrap_or_default(),
                "MESH_LISTEN_ADDRS" => join(&self.listen_addrs),
                "MESH_BOOTSTRAP_PEERS" => self
                    .discovery
                    .bootstrap_peers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                "MESH_MDNS_ENABLED" => self.discovery.mdns_enabled.to_string(),
                "MESH_MDNS_INTERFACES" => self
                    .discovery
                    .mdns_interfaces
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                "MESH_MDNS_PORT" => self.discovery.mdns_port.to_string(),
                "MESH_BLE_ENABLED" => self.discovery.ble_enabled.to_string(),
                "MESH_ALLOW_PRIVATE_ADDRS" => self.discovery.addr_filter.allow_private.to_string(),
                "MESH_DATA_DIR" => self.data_dir.display().to_string(),
                "MESH_NODE_SOCKET" => self.socket.display().to_string(),
                "MESH_NODE_SOCKET_GROUP" => {
                    self.socket_group.map(|g| g.to_string()).unwrap_or_default()
                }
                "MESH_LOG_DIR" => self.log_dir.display().to_string(),
                "MESH_LOG_LEVEL" => self.log_level.clone(),
                "MESH_METRICS_LISTEN" => {
                    self.metrics_listen.map_or("off".to_owned(), |a| a.to_string())
                }
                "REDIS_URL" => self.redis.as_ref().map(|r| redact_url(&r.url)).unwrap_or_default(),
                "REDIS_POOL_SIZE" => self
                    .redis
                    .as_ref()
                    .map_or(default_of("REDIS_POOL_SIZE").to_owned(), |r| r.pool_size.to_string()),
                "MESH_REDIS_PREFIX" => self
                    .redis
                    .as_ref()
                    .map_or(default_of("MESH_REDIS_PREFIX").to_owned(), |r| r.prefix.clone()),
                "REDIS_CA_FILE" => self
                    .redis
                    .as_ref()
                    .and_then(|r| r.ca_file.as_ref())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                "DATABASE_URL" => self.database_url.as_deref().map(redact_url).unwrap_or_default(),
                "DATABASE_MAX_CONNECTIONS" => self.database_max_connections.to_string(),
                "MESH_WRITE_QUEUE_CAPACITY" => self.write_queue_capacity.to_string(),
                "MESH_SHUTDOWN_GRACE_SECS" => self.shutdown_grace.as_secs().to_string(),
                _ => String::new(),
            };
            out.push_str(&format!("{}={value}\n", v.name));
        }
        out
    }
}

pub use mesh_storage::redact_url;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_the_guides() {
        let c = NodeConfig::from_map(&BTreeMap::new(), false).unwrap();
        assert_eq!(c.provider.fetch_interval_secs, 30);
        assert_eq!(c.provider.coordination_window_secs, 5);
        assert_eq!(c.provider.message_ttl, 10);
        assert_eq!((c.min_peers, c.max_peers), (3, 10));
        assert_eq!(c.staleness_threshold, Duration::from_secs(3600));
        assert_eq!(c.price_retention, Duration::from_secs(604_800));
        assert_eq!(c.socket, PathBuf::from("data/node.sock"));
        assert!(c.redis.is_none() && c.database_url.is_none());
        assert_eq!(c.listen_addrs.len(), 2);
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = NodeConfig::from_map(
            &map(&[
                ("MESH_MESSAGE_TTL", "30"),
                ("MESH_MAX_PEER_CONNECTIONS", "50"),
                ("MESH_MIN_PEER_CONNECTIONS", "abc"),
                ("MESH_STALENESS_THRESHOLD_SECS", "10"),
                ("MESH_PRICE_RETENTION_SECS", "60"),
                ("MESH_BOOTSTRAP_PEERS", "/ip4/1.2.3.4/tcp/4001"),
                ("DATABASE_URL", "mysql://u:secret@h/db"),
                ("MESH_MDNS_ENABLED", "maybe"),
            ]),
            false,
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "MESH_MESSAGE_TTL=30 is out of range 5..=20",
            "MESH_MAX_PEER_CONNECTIONS=50 is out of range 5..=20",
            "MESH_MIN_PEER_CONNECTIONS=\"abc\" is not a number",
            "MESH_STALENESS_THRESHOLD_SECS=10 is out of range 300..=7200",
            "MESH_PRICE_RETENTION_SECS=60 is out of range 3600..=31536000",
            "does not end with /p2p/<peer id>",
            "DATABASE_URL=mysql://u:<redacted>@h/db",
            "MESH_MDNS_ENABLED",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(!text.contains("secret"));
        assert_eq!(err.0.len(), 8);
    }

    #[test]
    fn provider_mode_needs_a_key() {
        let err =
            NodeConfig::from_map(&map(&[("MESH_DATA_DIR", "/nonexistent/x")]), true).unwrap_err();
        assert!(err.to_string().contains("--provider needs BIRDEYE_API_KEY"));
        let ok = NodeConfig::from_map(
            &map(&[("BIRDEYE_API_KEY", "k"), ("MESH_DATA_DIR", "/nonexistent/x")]),
            true,
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn dump_redacts_secrets() {
        let c = NodeConfig::from_map(
            &map(&[
                ("BIRDEYE_API_KEY", "topsecretkey"),
                ("REDIS_URL", "redis://:hunter2@localhost:6379"),
                ("DATABASE_URL", "postgres://mesh:pw123@localhost/mesh"),
            ]),
            false,
        )
        .unwrap();
        let dump = c.dump();
        assert!(
            !dump.contains("topsecretkey") && !dump.contains("hunter2") && !dump.contains("pw123")
        );
        assert!(dump.contains("BIRDEYE_API_KEY=<redacted>"));
        assert!(dump.contains("REDIS_URL=redis://:<redacted>@localhost:6379"));
        assert!(dump.contains("MESH_MESSAGE_TTL=10"));
        assert_eq!(dump.lines().count(), VARIABLES.len());
    }

    #[test]
    fn precedence_file_then_dotenv_then_environment_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.toml");
        std::fs::write(&file, "MESH_MESSAGE_TTL = 7\nmesh_min_peer_connections = 4\nMESH_MAX_PEER_CONNECTIONS = 6\nMESH_STALENESS_THRESHOLD_SECS = 600\n").unwrap();
        let dotenv = dir.path().join(".env");
        std::fs::write(&dotenv, "MESH_MIN_PEER_CONNECTIONS=2\nMESH_MAX_PEER_CONNECTIONS=8\n")
            .unwrap();
        let sources = Sources {
            file: Some(file),
            dotenv: Some(dotenv),
            environment: false,
            overrides: [("MESH_MAX_PEER_CONNECTIONS".to_owned(), "9".to_owned())].into(),
        };
        let c = NodeConfig::load(&sources, false).unwrap();
        assert_eq!(c.provider.message_ttl, 7, "from the file");
        assert_eq!(c.min_peers, 2, ".env over the file");
        assert_eq!(c.max_peers, 9, "flags over everything");
        assert_eq!(c.staleness_threshold.as_secs(), 600);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:<redacted>@h:6379/0");
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:<redacted>@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn debug_and_dump_never_show_a_secret() {
        let c = NodeConfig::from_map(
            &map(&[
                ("DATABASE_URL", "postgres://mesh:db/pw1@h/db?sslpassword=sslpw2"),
                ("REDIS_URL", "rediss://:redis#pw3@h:6380/0?password=redispw4"),
                ("BIRDEYE_API_KEY", "birdeyekey5"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(
            c.database_url.as_deref(),
            Some("postgres://mesh:db/pw1@h/db?sslpassword=sslpw2")
        );
        for shown in [format!("{c:?}"), format!("{c:#?}"), c.dump()] {
            for secret in ["pw1", "sslpw2", "pw3", "redispw4", "birdeyekey5"] {
                assert!(!shown.contains(secret), "{secret} shown in {shown}");
            }
            assert!(shown.contains("postgres://mesh:<redacted>@h/db"), "{shown}");
        }
    }
}
