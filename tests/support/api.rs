//! A node stand-in for the API tests: a [`mesh_ipc::Handler`] whose state a test sets, served
//! by a real [`mesh_ipc::Server`] on a temporary socket that the test can stop and restart,
//! and a helper that starts a [`mesh_api::ApiServer`] against it on a spare loopback port.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mesh_ipc::{
    ActiveProvider, DataFreshness, ErrorKind, Event, Handler, NetworkStatus, PriceView,
    ProviderStatusView, Request, Response, Server, ServerConfig, Snapshot,
};
use mesh_protocol::NodeId;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The fake node's id.
pub const NODE_ID: &str = "550e8400-e29b-41d4-a716-446655440000";
/// A provider's id.
pub const PROVIDER_ID: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
/// What the fake node answers to `GetMetrics`.
pub const NODE_METRICS: &str = "# HELP mesh_network_connected_peers Connected peers.\n\
# TYPE mesh_network_connected_peers gauge\n\
mesh_network_connected_peers 3\n";

/// The Birdeye key the fake node refuses.
pub const BAD_KEY: &str = "bad-key";

fn id(text: &str) -> NodeId {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// A price of `asset` on `blockchain`, one hop away, seen just now.
pub fn price(blockchain: &str, asset: &str, value: &str) -> PriceView {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    PriceView {
        asset: asset.into(),
        blockchain: blockchain.into(),
        price: value.parse().unwrap_or_else(|e| panic!("{value}: {e:?}")),
        change_24h: Some("-1.25".parse().unwrap_or_else(|e| panic!("{e:?}"))),
        timestamp: "2026-01-01T00:00:00Z".into(),
        timestamp_ms: now_ms,
        source_timestamp: None,
        source_timestamp_ms: None,
        source_node_id: id(PROVIDER_ID),
        age_secs: 0,
        stale: false,
        hop_count: Some(1),
        providers_reporting: 1,
        providers_agreeing: 1,
        discrepancy: false,
    }
}

/// A healthy network: `peers` peers and one provider two hops away.
pub fn network(peers: usize) -> NetworkStatus {
    NetworkStatus {
        node_id: id(NODE_ID),
        peer_id: "12D3KooWFakeNode".into(),
        connected_peers: peers,
        active_providers: vec![ActiveProvider {
            node_id: id(PROVIDER_ID),
            hop_count: 2,
            last_seen: "2026-01-01T00:00:00Z".into(),
        }],
        data_freshness: DataFreshness::Fresh,
        last_update_time: Some("2026-01-01T00:00:00Z".into()),
        degraded: false,
        degraded_components: vec![],
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
    }
}

/// Provider mode off.
pub fn provider(enabled: bool) -> ProviderStatusView {
    ProviderStatusView {
        enabled,
        node_id: id(NODE_ID),
        reason: None,
        last_fetch_time: None,
        last_fetch_result: None,
        last_error: None,
        next_round: None,
        next_round_time: None,
        rounds_fetched: 0,
        rounds_skipped: 0,
        rounds_failed: 0,
        degraded: false,
        revision: 0,
        rejected_key_file: None,
    }
}

/// What the fake node knows.
#[derive(Debug, Clone)]
pub struct FakeState {
    /// Its price book.
    pub prices: Vec<PriceView>,
    /// Its network status.
    pub network: NetworkStatus,
    /// Its provider mode.
    pub provider: ProviderStatusView,
}

/// The node stand-in.
pub struct FakeNode {
    state: Mutex<FakeState>,
    events: broadcast::Sender<Event>,
    /// API keys it was asked to enable provider mode with.
    pub keys: Mutex<Vec<String>>,
}

impl FakeNode {
    /// A node with these prices, 3 peers, one provider, provider mode off.
    pub fn new(prices: Vec<PriceView>) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            state: Mutex::new(FakeState { prices, network: network(3), provider: provider(false) }),
            events,
            keys: Mutex::new(Vec::new()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets a price (replacing the same asset on the same chain) and emits it.
    pub fn set_price(&self, view: PriceView) {
        {
            let mut state = self.state();
            state.prices.retain(|p| !(p.asset == view.asset && p.blockchain == view.blockchain));
            state.prices.push(view.clone());
        }
        let _ = self.events.send(Event::Price(view));
    }

    /// Sets the network status and emits it.
    pub fn set_network(&self, status: NetworkStatus) {
        self.state().network = status.clone();
        let _ = self.events.send(Event::Network(status));
    }

    /// Emits an event as it is (no state change).
    pub fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

#[async_trait::async_trait]
impl Handler for FakeNode {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::GetPrices(filter) => Response::Prices(
                self.state()
                    .prices
                    .iter()
                    .filter(|p| filter.matches(&p.blockchain, &p.asset))
                    .cloned()
                    .collect(),
            ),
            // Each price as its provider's only quote.
            Request::GetQuotes(filter) => Response::Quotes(
                self.state()
                    .prices
                    .iter()
                    .filter(|p| filter.matches(&p.blockchain, &p.asset))
                    .map(|p| mesh_ipc::QuoteView {
                        asset: p.asset.clone(),
                        blockchain: p.blockchain.clone(),
                        source_node_id: p.source_node_id,
                        price: p.price.clone(),
                        change_24h: p.change_24h.clone(),
                        timestamp: p.timestamp.clone(),
                        timestamp_ms: p.timestamp_ms,
                        age_secs: p.age_secs,
                        hop_count: p.hop_count,
                        fresh: !p.stale,
                        agrees: true,
                        served: true,
                    })
                    .collect(),
            ),
            Request::GetNetworkStatus => Response::NetworkStatus(self.state().network.clone()),
            Request::GetProviderStatus => Response::ProviderStatus(self.state().provider.clone()),
            Request::EnableProvider { api_key } => {
                self.keys
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(api_key.clone());
                if api_key == BAD_KEY {
                    return Response::Error {
                        kind: ErrorKind::InvalidApiKey,
                        message: "Birdeye answered 401".into(),
                    };
                }
                let view = {
                    let mut state = self.state();
                    state.provider.enabled = true;
                    state.provider.clone()
                };
                let _ = self.events.send(Event::Provider(view.clone()));
                Response::ProviderStatus(view)
            }
            Request::DisableProvider => {
                let view = {
                    let mut state = self.state();
                    state.provider.enabled = false;
                    state.provider.clone()
                };
                let _ = self.events.send(Event::Provider(view.clone()));
                Response::ProviderStatus(view)
            }
            Request::GetMetrics => Response::Metrics(NODE_METRICS.into()),
            other => Response::Error {
                kind: ErrorKind::BadRequest,
                message: format!("the fake node does not answer {other:?}"),
            },
        }
    }

    fn snapshot(&self) -> Snapshot {
        let state = self.state();
        Snapshot {
            prices: state.prices.clone(),
            network: state.network.clone(),
            provider: state.provider.clone(),
        }
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// A [`FakeNode`] served on a socket of a temporary directory, stoppable and restartable.
pub struct NodeSocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// The node.
    pub node: Arc<FakeNode>,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl NodeSocket {
    /// Serves `node` on a fresh socket.
    pub async fn start(node: Arc<FakeNode>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.sock");
        let mut socket = Self { _dir: dir, path, node, running: None };
        socket.serve().await?;
        Ok(socket)
    }

    /// The socket path (`MESH_NODE_SOCKET`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn serve(&mut self) -> anyhow::Result<()> {
        let server = Server::bind(ServerConfig::new(&self.path)).await?;
        let cancel = CancellationToken::new();
        let handler: Arc<dyn Handler> = self.node.clone();
        let task = tokio::spawn(server.run(handler, cancel.clone()));
        self.running = Some((cancel, task));
        Ok(())
    }

    /// Stops the server (its subscribers see the stream end) and removes the socket.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some((cancel, task)) = self.running.take() {
            cancel.cancel();
            task.await?;
        }
        Ok(())
    }

    /// Serves again on the same path.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.serve().await
    }
}

impl Drop for NodeSocket {
    fn drop(&mut self) {
        if let Some((cancel, _)) = self.running.take() {
            cancel.cancel();
        }
    }
}

/// Starts an API server on a spare loopback port against the node at `socket`, with short
/// reconnection waits; `tweak` changes the configuration further.
pub async fn start_api(
    socket: &Path,
    tweak: impl FnOnce(&mut mesh_api::Config),
) -> anyhow::Result<mesh_api::ApiServer> {
    let mut config = mesh_api::Config {
        node_socket: socket.to_path_buf(),
        reconnect_min: std::time::Duration::from_millis(20),
        reconnect_max: std::time::Duration::from_millis(200),
        ..mesh_api::Config::default()
    };
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(mesh_api::ApiServer::serve(listener, config)?)
}
