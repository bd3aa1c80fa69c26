//! Every variable the node reads, with its default, range and meaning.

/// One configuration variable, for `--dump-config`, `--help` and the README reference.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// Its name (environment variable, and key in the config file).
    pub name: &'static str,
    /// Its default, as text (empty: unset).
    pub default: &'static str,
    /// Allowed values.
    pub range: &'static str,
    /// What it does.
    pub meaning: &'static str,
    /// Its value must never be printed.
    pub secret: bool,
}

const fn var(
    name: &'static str,
    default: &'static str,
    range: &'static str,
    meaning: &'static str,
) -> Variable {
    Variable { name, default, range, meaning, secret: false }
}

const fn secret(name: &'static str, meaning: &'static str) -> Variable {
    Variable { name, default: "", range: "text", meaning, secret: true }
}

/// Every variable the node reads.
pub const VARIABLES: &[Variable] = &[
    secret("BIRDEYE_API_KEY", "Birdeye API key; with --provider the node fetches prices"),
    var("MESH_BIRDEYE_BASE_URL", "https://public-api.birdeye.so", "URL", "Birdeye API base URL"),
    var(
        "MESH_PROVIDER_ASSETS",
        "the 9 fixture tokens",
        "chain:address,...",
        "assets a provider fetches",
    ),
    var(
        "MESH_PROVIDER_FETCH_INTERVAL_SECS",
        "30",
        "10-300",
        "round length: how often prices are fetched",
    ),
    var(
        "MESH_COORDINATION_WINDOW_SECS",
        "5",
        "2-30",
        "how long each provider rank waits before taking a round",
    ),
    var("MESH_MESSAGE_TTL", "10", "5-20", "hop TTL of the messages this node originates"),
    var("MESH_MIN_PEER_CONNECTIONS", "3", "2-5", "dial known peers while fewer are connected"),
    var("MESH_MAX_PEER_CONNECTIONS", "10", "5-20", "drop peers while more are connected"),
    var(
        "MESH_PEER_EXPLORE_INTERVAL_SECS",
        "30",
        "0-3600 (0: off)",
        "between the minimum and the maximum, dial a random known peer about this often \
         (heals partitions)",
    ),
    var("MESH_STALENESS_THRESHOLD_SECS", "3600", "300-7200", "a price older than this is stale"),
    var(
        "MESH_PRICE_RETENTION_SECS",
        "604800",
        "3600-31536000",
        "a price nobody has sent for this long is forgotten (book, mirror, tables)",
    ),
    var(
        "MESH_PRICE_DISCREPANCY_THRESHOLD_PERCENT",
        "5",
        "0.1-100",
        "providers differing by more are flagged",
    ),
    var(
        "MESH_SEEN_MESSAGES_CACHE_SIZE",
        "10000",
        "1000-1000000",
        "message ids remembered for de-duplication",
    ),
    var("MESH_SEEN_MESSAGES_TTL_SECS", "600", "60-86400", "how long a message id is remembered"),
    var("MESH_MAX_CLOCK_SKEW_SECS", "5", "0-300", "how far in the future a timestamp may be"),
    var(
        "MESH_TRUSTED_PROVIDERS",
        "",
        "node ids, comma separated",
        "when set, only these providers are accepted and relayed",
    ),
    var(
        "MESH_LISTEN_ADDRS",
        "/ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1",
        "multiaddrs",
        "where the node listens for peers",
    ),
    var(
        "MESH_BOOTSTRAP_PEERS",
        "",
        "multiaddrs with /p2p/<peer id>",
        "peers to dial at start and keep",
    ),
    var("MESH_MDNS_ENABLED", "true", "true/false", "find peers on the local network with mDNS"),
    var(
        "MESH_MDNS_INTERFACES",
        "",
        "interface names",
        "limit mDNS to these interfaces (empty: all)",
    ),
    var("MESH_MDNS_PORT", "5353", "1-65535", "mDNS port (every node of a mesh uses the same)"),
    var(
        "MESH_BLE_ENABLED",
        "false",
        "true/false",
        "scan for peers over Bluetooth LE (build feature `ble`; true is refused without it)",
    ),
    var(
        "MESH_ALLOW_PRIVATE_ADDRS",
        "false",
        "true/false",
        "dial loopback and private peer addresses learned from peers (labs on one host or in namespaces only)",
    ),
    var("MESH_DATA_DIR", "data", "path", "node key, provider key, SQLite file"),
    var("MESH_NODE_SOCKET", "data/node.sock", "path", "Unix socket for mesh-api"),
    var(
        "MESH_NODE_SOCKET_GROUP",
        "",
        "group name or id",
        "besides the node's own user and root, members of this group may use the node socket",
    ),
    var("MESH_LOG_DIR", "logs", "path", "directory of app.log"),
    var(
        "MESH_LOG_LEVEL",
        "info",
        "error/warn/info/debug/trace or a filter",
        "log level (RUST_LOG wins when set)",
    ),
    var(
        "MESH_METRICS_LISTEN",
        "127.0.0.1:9464",
        "host:port or off",
        "Prometheus metrics of the node",
    ),
    secret(
        "REDIS_URL",
        "Redis (redis://:password@host:6379): coordination, seen ids, price mirror",
    ),
    var("REDIS_POOL_SIZE", "10", "1-100", "Redis connections"),
    var("MESH_REDIS_PREFIX", "mesh:", "text", "prefix of every Redis key"),
    var(
        "REDIS_CA_FILE",
        "",
        "path",
        "PEM certificates a rediss:// (TLS) server's certificate must chain to (unset: the system's roots)",
    ),
    secret("DATABASE_URL", "postgres://... (else an SQLite file in MESH_DATA_DIR)"),
    var("DATABASE_MAX_CONNECTIONS", "10", "1-100", "database connections"),
    var(
        "MESH_WRITE_QUEUE_CAPACITY",
        "10000",
        "100-1000000",
        "rows held for the database while it is down",
    ),
    var(
        "MESH_SHUTDOWN_GRACE_SECS",
        "10",
        "1-120",
        "at SIGTERM, longest wait for the stores to take what the node accepted; rows still \
         unwritten then are counted (mesh_store_shutdown_unwritten_total) and logged",
    ),
];
