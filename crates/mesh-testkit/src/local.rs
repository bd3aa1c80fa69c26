//! [`LocalMesh`]: full nodes (`mesh-service`) in one process on loopback, fed by in-process
//! Birdeye simulators. The integration tests and `mesh-node demo` use it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use birdeye_sim::{Simulator, SimulatorHandle};
use mesh_relay::Multiaddr;
use mesh_service::{Node, NodeConfig, StartOptions};
use tracing::Instrument;

/// The key every simulator of a [`LocalMesh`] accepts.
pub const DEMO_API_KEY: &str = "demo-key";

/// Settings of one node, before start.
pub type Overrides = BTreeMap<String, String>;

/// Adjusts node `i`'s variables.
type PerNode = Box<dyn Fn(usize, &mut Overrides) + Send + Sync>;
/// Adjusts node `i`'s parsed configuration (for what no variable sets, e.g. a skewed clock).
type Configure = std::sync::Arc<dyn Fn(usize, &mut NodeConfig) + Send + Sync>;

/// Builds a [`LocalMesh`].
pub struct LocalMeshBuilder {
    providers: usize,
    consumers: usize,
    interval_secs: u64,
    window_secs: u64,
    dir: Option<PathBuf>,
    redis_url: Option<String>,
    simulators: usize,
    per_node: Option<PerNode>,
    configure: Option<Configure>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl std::fmt::Debug for LocalMeshBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMeshBuilder")
            .field("providers", &self.providers)
            .field("consumers", &self.consumers)
            .field("interval_secs", &self.interval_secs)
            .finish_non_exhaustive()
    }
}

impl Default for LocalMeshBuilder {
    fn default() -> Self {
        Self {
            providers: 2,
            consumers: 4,
            interval_secs: 10,
            window_secs: 2,
            dir: None,
            redis_url: None,
            simulators: 1,
            per_node: None,
            configure: None,
            metrics: None,
        }
    }
}

impl LocalMeshBuilder {
    /// Provider nodes (the first nodes).
    pub fn providers(mut self, n: usize) -> Self {
        self.providers = n;
        self
    }

    /// Consumer nodes (after the providers).
    pub fn consumers(mut self, n: usize) -> Self {
        self.consumers = n;
        self
    }

    /// Round length and coordination window in seconds. Tests may go below the ranges the
    /// configuration allows operators (10-300 s and 2-30 s).
    pub fn rounds(mut self, interval_secs: u64, window_secs: u64) -> Self {
        self.interval_secs = interval_secs;
        self.window_secs = window_secs;
        self
    }

    /// Directory for the nodes' data (default: a new temporary directory).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// A Redis shared by the nodes (coordination, seen ids, mirror), with a key prefix of the
    /// mesh's own.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// One simulator per provider instead of one shared by all (so that one can be offset).
    pub fn simulator_per_provider(mut self) -> Self {
        self.simulators = 0;
        self
    }

    /// Adjusts node `i`'s variables.
    pub fn per_node(mut self, f: impl Fn(usize, &mut Overrides) + Send + Sync + 'static) -> Self {
        self.per_node = Some(Box::new(f));
        self
    }

    /// Adjusts node `i`'s parsed configuration, after the variables.
    pub fn configure(mut self, f: impl Fn(usize, &mut NodeConfig) + Send + Sync + 'static) -> Self {
        self.configure = Some(std::sync::Arc::new(f));
        self
    }

    /// Metrics handle given to the first node (its `GetMetrics` answers).
    pub fn metrics(mut self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Starts the simulators and the nodes; nodes after the first bootstrap from the first.
    pub async fn start(self) -> anyhow::Result<LocalMesh> {
        let tempdir = match &self.dir {
            Some(_) => None,
            None => Some(tempfile::tempdir()?),
        };
        let dir = match (&self.dir, &tempdir) {
            (Some(d), _) => d.clone(),
            (None, Some(t)) => t.path().to_path_buf(),
            (None, None) => anyhow::bail!("no directory"),
        };
        let sim_count = if self.simulators == 0 { self.providers.max(1) } else { self.simulators };
        let mut sims = Vec::new();
        for i in 0..sim_count {
            sims.push(
                Simulator::builder()
                    .keys([DEMO_API_KEY])
                    .seed(7)
                    .spawn("127.0.0.1:0")
                    .await
                    .map_err(|e| anyhow::anyhow!("simulator {i}: {e}"))?,
            );
        }
        let prefix = format!("meshdemo:{}:", uuid_like());
        let mut mesh = LocalMesh {
            sims,
            nodes: Vec::new(),
            overrides: Vec::new(),
            listen: Vec::new(),
            providers: self.providers,
            redis: self.redis_url.clone().map(|url| (url, prefix.clone())),
            configure: self.configure.clone(),
            interval_secs: self.interval_secs,
            window_secs: self.window_secs,
            dir,
            _tempdir: tempdir,
        };
        let total = self.providers + self.consumers;
        for i in 0..total {
            let mut o = Overrides::new();
            let node_dir = mesh.dir.join(format!("node{i}"));
            o.insert("MESH_DATA_DIR".into(), node_dir.display().to_string());
            o.insert("MESH_NODE_SOCKET".into(), node_dir.join("node.sock").display().to_string());
            o.insert("MESH_LOG_DIR".into(), node_dir.join("logs").display().to_string());
            o.insert("MESH_LISTEN_ADDRS".into(), "/ip4/127.0.0.1/tcp/0".into());
            o.insert("MESH_MDNS_ENABLED".into(), "false".into());
            // Every node listens on 127.0.0.1: a lab.
            o.insert("MESH_ALLOW_PRIVATE_ADDRS".into(), "true".into());
            o.insert("MESH_METRICS_LISTEN".into(), "off".into());
            o.insert("MESH_MIN_PEER_CONNECTIONS".into(), "3".into());
            let sim = &mesh.sims[if self.simulators == 0 { i.min(mesh.sims.len() - 1) } else { 0 }];
            o.insert("MESH_BIRDEYE_BASE_URL".into(), sim.base_url());
            if i < self.providers {
                o.insert("BIRDEYE_API_KEY".into(), DEMO_API_KEY.into());
            }
            if let Some(url) = &self.redis_url {
                o.insert("REDIS_URL".into(), url.clone());
                o.insert("MESH_REDIS_PREFIX".into(), prefix.clone());
            }
            if let Some(f) = &self.per_node {
                f(i, &mut o);
            }
            mesh.overrides.push(o);
            mesh.listen.push(None);
            mesh.nodes.push(None);
        }
        for i in 0..total {
            let metrics = if i == 0 { self.metrics.clone() } else { None };
            mesh.start_node(i, metrics).await?;
        }
        Ok(mesh)
    }
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Full nodes in one process.
pub struct LocalMesh {
    sims: Vec<SimulatorHandle>,
    nodes: Vec<Option<Node>>,
    overrides: Vec<Overrides>,
    listen: Vec<Option<Multiaddr>>,
    providers: usize,
    /// The Redis and key prefix of this mesh, cleaned at shutdown.
    redis: Option<(String, String)>,
    configure: Option<Configure>,
    interval_secs: u64,
    window_secs: u64,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for LocalMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMesh")
            .field("nodes", &self.nodes.len())
            .field("dir", &self.dir)
            .finish()
    }
}

impl LocalMesh {
    /// A builder.
    pub fn builder() -> LocalMeshBuilder {
        LocalMeshBuilder::default()
    }

    /// The simulators (one, or one per provider).
    pub fn simulators(&self) -> &[SimulatorHandle] {
        &self.sims
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// `true` without nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Indexes of the provider nodes.
    pub fn provider_indexes(&self) -> std::ops::Range<usize> {
        0..self.providers
    }

    /// The data directory of the mesh.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node `i` (`None` while stopped).
    pub fn node(&self, i: usize) -> Option<&Node> {
        self.nodes[i].as_ref()
    }

    /// Node `i`, or an error while stopped.
    pub fn running(&self, i: usize) -> anyhow::Result<&Node> {
        self.node(i).ok_or_else(|| anyhow::anyhow!("node {i} is stopped"))
    }

    /// The variables of node `i`.
    pub fn overrides(&self, i: usize) -> &Overrides {
        &self.overrides[i]
    }

    async fn start_node(
        &mut self,
        i: usize,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> anyhow::Result<()> {
        let mut o = self.overrides[i].clone();
        if let Some(addr) = &self.listen[i] {
            o.insert("MESH_LISTEN_ADDRS".into(), addr.to_string());
        }
        if i > 0 && !o.contains_key("MESH_BOOTSTRAP_PEERS") {
            let boot: Vec<String> = (0..i.min(2))
                .filter_map(|j| {
                    let node = self.nodes[j].as_ref()?;
                    let addr = self.listen[j].clone()?;
                    Some(addr.with(mesh_relay::Protocol::P2p(node.peer_id())).to_string())
                })
                .collect();
            o.insert("MESH_BOOTSTRAP_PEERS".into(), boot.join(","));
        }
        let provider_mode = i < self.providers;
        let mut config = NodeConfig::from_map(&o, provider_mode)?;
        // Rounds shorter than operators may configure, for tests and the demo.
        config.provider.fetch_interval_secs = self.interval_secs;
        config.provider.coordination_window_secs = self.window_secs;
        if let Some(f) = &self.configure {
            f(i, &mut config);
        }
        // Everything the node does runs inside its span, so a process running several nodes
        // can keep one log file per node (`telemetry::init_logs_per_node`).
        let span = tracing::info_span!(mesh_service::telemetry::NODE_SPAN, index = i);
        let node = Node::start(config, StartOptions { metrics, ..StartOptions::default() })
            .instrument(span)
            .await?;
        let addrs = node.relay().listen_addrs().await?;
        if self.listen[i].is_none() {
            self.listen[i] =
                addrs.into_iter().find(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/"));
        }
        self.nodes[i] = Some(node);
        Ok(())
    }

    /// Stops node `i` (its data directory, key and port are kept).
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        let span = tracing::info_span!(mesh_service::telemetry::NODE_SPAN, index = i);
        if let Some(node) = self.nodes[i].take()
            && let Some(reason) = node.shutdown(Duration::from_secs(10)).instrument(span).await
        {
            anyhow::bail!("node {i} stopped with a failure: {reason}");
        }
        Ok(())
    }

    /// Starts a stopped node again with the same data directory (same key, same store).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[i].is_none(), "node {i} is running");
        self.start_node(i, None).await
    }

    /// Stops every node and simulator.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for i in (0..self.nodes.len()).rev() {
            if let Err(e) = self.stop(i).await {
                failures.push(e.to_string());
            }
        }
        for sim in self.sims.drain(..) {
            sim.shutdown().await;
        }
        if let Some((url, prefix)) = &self.redis
            && let Err(e) = delete_keys(url, prefix).await
        {
            failures.push(format!("cleaning Redis keys {prefix}*: {e}"));
        }
        anyhow::ensure!(failures.is_empty(), "{}", failures.join("; "));
        Ok(())
    }
}

/// Deletes every key under `prefix` (bounded: SCAN in pages, at most 100 pages).
async fn delete_keys(url: &str, prefix: &str) -> anyhow::Result<()> {
    use deadpool_redis::redis::AsyncCommands;
    let client = deadpool_redis::redis::Client::open(url)?;
    let mut conn =
        tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
            .await??;
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    for _ in 0..100 {
        let (next, keys): (u64, Vec<String>) = deadpool_redis::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: u64 = conn.del(keys).await?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(())
}
