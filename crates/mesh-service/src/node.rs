//! The running node: starts the parts in order, wires them, and stops them in order.
//!
//! Start: identity, storage (reload prices and seen ids), relay (with the seen ids), bootstrap
//! peers, discovery, provider (resumed when it was on), the state task that owns the price book,
//! status and metrics tasks, and last the IPC socket. Stop: the socket first, then the provider,
//! the relay and the storage workers (which write what they hold), within a grace period.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use mesh_coordination::{
    ClockCheck, Coordination, MeshOnly, MeshView, RedisCoordination, Reference,
};
use mesh_ipc::{
    ErrorKind, Event, NetworkStatus, PriceFilter, ProviderStatusView, Request, Response, Snapshot,
};
use mesh_protocol::{Body, Envelope, Identity, NodeId, Payload, PeerId};
use mesh_provider::{ApiKey, Broadcast, BroadcastError, Provider};
use mesh_relay::{Delivery, Relay};
use mesh_storage::PriceRow;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::book::{BookConfig, PriceBook, rfc3339};
use crate::config::NodeConfig;
use crate::keystore::ProviderKeyStore;
use crate::now_ms;
use crate::persistence::Persistence;
use crate::providers::{BatchClaim, ProviderTracker, SharedTracker};

/// Errors of starting a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] mesh_protocol::IdentityError),
    /// Storage could not be set up.
    #[error(transparent)]
    Persistence(#[from] crate::persistence::Error),
    /// The relay could not start.
    #[error(transparent)]
    Relay(#[from] mesh_relay::Error),
    /// The IPC socket could not be bound.
    #[error(transparent)]
    Ipc(#[from] mesh_ipc::Error),
    /// Provider mode could not be resumed or enabled.
    #[error("provider mode: {0}")]
    Provider(#[from] mesh_provider::Error),
    /// The stored provider key could not be read.
    #[error("provider key file: {0}")]
    KeyStore(std::io::Error),
}

/// How many events a subscriber may fall behind before it gets a fresh snapshot.
const EVENT_BUFFER: usize = 1024;
/// How long the relay may take to close its connections at shutdown.
const RELAY_SHUTDOWN: Duration = Duration::from_secs(5);

/// The state shared by the node's tasks and the IPC handler.
pub struct Shared {
    identity: Identity,
    config: NodeConfig,
    book: Mutex<PriceBook>,
    tracker: SharedTracker,
    /// Is this node's clock right? Fed with peers' timestamps here, Birdeye's `Date` and
    /// Redis `TIME` by the provider.
    clock_check: Arc<Mutex<ClockCheck>>,
    events: broadcast::Sender<Event>,
    relay: Relay,
    provider: Arc<Provider>,
    persistence: Persistence,
    coordination_degraded: Box<dyn Fn() -> bool + Send + Sync>,
    keys: ProviderKeyStore,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    last_network: Mutex<Option<NetworkStatus>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("node_id", &self.identity.node_id()).finish_non_exhaustive()
    }
}

impl Shared {
    fn book(&self) -> std::sync::MutexGuard<'_, PriceBook> {
        self.book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The network status now.
    pub fn network_status(&self) -> NetworkStatus {
        let now = now_ms();
        let relay = self.relay.status();
        let (freshness, last_update) = {
            let book = self.book();
            (book.freshness(now), book.last_update_ms())
        };
        let mut degraded = self.persistence.degraded_components();
        if (self.coordination_degraded)() {
            degraded.push("coordination".to_owned());
        }
        NetworkStatus {
            node_id: self.identity.node_id(),
            peer_id: self.identity.peer_id().to_string(),
            connected_peers: relay.peers.len(),
            active_providers: self.tracker.lock().active(now),
            data_freshness: freshness,
            last_update_time: last_update.map(rfc3339),
            degraded: !degraded.is_empty(),
            degraded_components: degraded,
            listen_addrs: relay.listen_addrs.iter().map(ToString::to_string).collect(),
        }
    }

    /// Provider mode status as the API shows it.
    pub fn provider_status(&self) -> ProviderStatusView {
        provider_view(&self.provider.status())
    }

    async fn enable_provider(&self, api_key: String) -> Response {
        let key = api_key.trim();
        if key.is_empty() {
            return Response::Error {
                kind: ErrorKind::BadRequest,
                message: "api_key is empty".into(),
            };
        }
        let key = ApiKey::new(key);
        match self.provider.enable(key.clone()).await {
            Ok(()) => {
                if let Err(e) = self.keys.save(&key) {
                    warn!(error = %e, "provider key could not be stored; provider mode will not survive a restart");
                }
                self.provider_became(true).await;
                Response::ProviderStatus(self.provider_status())
            }
            Err(error) => {
                let (kind, message) = match &error {
                    mesh_provider::Error::Birdeye(e) if e.kind() == "invalid_key" => {
                        (ErrorKind::InvalidApiKey, "Invalid API key".to_owned())
                    }
                    mesh_provider::Error::Birdeye(e) if e.kind() == "forbidden" => {
                        (ErrorKind::Forbidden, e.to_string())
                    }
                    mesh_provider::Error::Birdeye(e) if e.kind() == "bad_request" => {
                        (ErrorKind::BadRequest, e.to_string())
                    }
                    mesh_provider::Error::Birdeye(e) => {
                        (ErrorKind::Unavailable, format!("Birdeye unavailable: {e}"))
                    }
                    other => (ErrorKind::Internal, other.to_string()),
                };
                Response::Error { kind, message }
            }
        }
    }

    async fn disable_provider(&self) -> Response {
        self.provider.disable().await;
        if let Err(e) = self.keys.clear() {
            warn!(error = %e, "stored provider key could not be removed");
        }
        self.provider_became(false).await;
        Response::ProviderStatus(self.provider_status())
    }

    async fn provider_became(&self, active: bool) {
        self.tracker.lock().set_own_active(active, now_ms());
        let _ = self.relay.set_provider(active).await;
    }

    fn snapshot_now(&self) -> Snapshot {
        let prices = self.book().view(&PriceFilter::default(), now_ms());
        Snapshot { prices, network: self.network_status(), provider: self.provider_status() }
    }

    fn emit(&self, event: Event) {
        // No subscriber is fine; a slow one lags and resynchronises.
        let _ = self.events.send(event);
    }
}

/// Provider status in the API's shape.
pub fn provider_view(s: &mesh_provider::ProviderStatus) -> ProviderStatusView {
    ProviderStatusView {
        enabled: s.enabled,
        node_id: s.node_id,
        reason: s.reason.clone(),
        last_fetch_time: s.last_fetch_unix_ms.map(rfc3339),
        last_fetch_result: s.last_fetch.as_ref().map(|f| match f {
            mesh_provider::FetchOutcome::Fetched { .. } => "success".to_owned(),
            other => format!("{other:?}"),
        }),
        last_error: s.last_error.clone(),
        next_round: s.next_round,
        next_round_time: s.next_round_unix_ms.map(rfc3339),
        rounds_fetched: s.rounds_fetched,
        rounds_skipped: s.rounds_skipped,
        rounds_failed: s.rounds_failed,
        degraded: s.degraded,
        revision: s.revision,
    }
}

#[async_trait::async_trait]
impl mesh_ipc::Handler for Shared {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::GetPrices(filter) => {
                let prices = self.book().view(&filter, now_ms());
                if filter.asset.is_some() {
                    if prices.is_empty() {
                        metrics::counter!("mesh_cache_misses_total").increment(1);
                    } else {
                        metrics::counter!("mesh_cache_hits_total").increment(1);
                    }
                }
                Response::Prices(prices)
            }
            Request::GetNetworkStatus => Response::NetworkStatus(self.network_status()),
            Request::GetProviderStatus => Response::ProviderStatus(self.provider_status()),
            Request::EnableProvider { api_key } => self.enable_provider(api_key).await,
            Request::DisableProvider => self.disable_provider().await,
            Request::GetMetrics => match &self.metrics {
                Some(handle) => Response::Metrics(handle.render()),
                None => Response::Metrics(String::new()),
            },
            Request::Subscribe => Response::Error {
                kind: ErrorKind::BadRequest,
                message: "subscribe opens a stream; it has no single answer".into(),
            },
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.snapshot_now()
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// The relay as the provider's broadcaster.
struct RelayBroadcast(Relay);

#[async_trait::async_trait]
impl Broadcast for RelayBroadcast {
    async fn broadcast(&self, envelope: Envelope) -> Result<usize, BroadcastError> {
        self.0.publish(&envelope).await.map_err(|e| BroadcastError::Failed(Box::new(e)))
    }
}

/// Options of [`Node::start`] that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Cancels the node (its children are cancelled in order).
    pub cancel: CancellationToken,
    /// A metrics handle to answer `GetMetrics` with (the binary installs the recorder).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// mDNS interfaces to use instead of the configured ones (the demo and tests: loopback).
    pub mdns_loopback_only: bool,
}

/// A running node.
pub struct Node {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    failure: Arc<Mutex<Option<String>>>,
    socket: PathBuf,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.node_id())
            .field("socket", &self.socket)
            .finish()
    }
}

/// Spawns `future` on `tasks` under `name`; a panic in it cancels the whole node with a reason.
fn spawn_guarded<F>(
    tasks: &TaskTracker,
    cancel: &CancellationToken,
    failure: &Arc<Mutex<Option<String>>>,
    name: &'static str,
    future: F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let cancel = cancel.clone();
    let failure = failure.clone();
    tasks.spawn(
        async move {
            if let Err(panic) = AssertUnwindSafe(future).catch_unwind().await {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                error!(task = name, panic = %what, "task panicked; shutting the node down");
                *failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(format!("task {name} panicked: {what}"));
                cancel.cancel();
            }
        }
        .instrument(info_span!("task", name)),
    );
}

impl Node {
    /// Starts a node.
    pub async fn start(config: NodeConfig, options: StartOptions) -> Result<Node, Error> {
        let cancel = options.cancel.clone();
        let tasks = TaskTracker::new();
        let failure = Arc::new(Mutex::new(None));
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            crate::persistence::Error::DataDir { path: config.data_dir.clone(), source: e }
        })?;
        let identity = Identity::load_or_create(&config.node_key_path())?;
        let node_id = identity.node_id();
        info!(%node_id, peer_id = %identity.peer_id(), "node identity");

        // Storage first: the relay needs the seen ids it reloads.
        let storage_cancel = CancellationToken::new();
        let (persistence, loaded) = Persistence::start(&config, &tasks, &storage_cancel).await?;
        persistence.spawn_cleanup(Duration::from_secs(3600), &tasks, &cancel);

        let interval = Duration::from_secs(config.provider.fetch_interval_secs);
        let mut book = PriceBook::new(BookConfig {
            staleness: config.staleness_threshold,
            fetch_interval: interval,
            discrepancy_threshold_percent: config.discrepancy_threshold_percent,
            max_quotes_per_origin: config.max_quotes_per_origin,
            ..BookConfig::default()
        });
        let now = now_ms();
        let reloaded = crate::reload::checked(
            &loaded.prices,
            config.trusted_providers.as_ref(),
            config.max_clock_skew_secs,
            now,
        );
        for (source, update) in reloaded {
            // Not a receipt: the price keeps its times, and its hop count is unknown until a
            // message about it arrives (our own are 0).
            book.restore(source, &update, source == node_id, now);
        }

        let relay_cancel = cancel.child_token();
        let relay_config = relay_config(&config, loaded.seen);
        let (relay, deliveries) =
            Relay::start(&identity, relay_config, relay_cancel.clone()).await?;
        // Bootstrap peers are dialed at once and kept (redialed while below the minimum).
        for peer in &config.discovery.bootstrap_peers {
            let addr = peer.addr.clone().with(libp2p::multiaddr::Protocol::P2p(peer.peer_id));
            if let Err(e) = relay.dial(addr.clone()).await {
                warn!(%addr, error = %e, "bootstrap peer not dialed");
            }
        }

        let own_assets =
            config.provider.assets.as_slice().iter().map(|a| (a.chain.clone(), a.address.clone()));
        let tracker = SharedTracker(Arc::new(Mutex::new(ProviderTracker::new(
            node_id, interval, own_assets,
        ))));
        let (coordination, coordination_degraded): (
            Arc<dyn Coordination>,
            Box<dyn Fn() -> bool + Send + Sync>,
        ) = match &persistence.redis {
            Some(redis) => {
                let c = Arc::new(RedisCoordination::new(redis.pool.clone(), &redis.prefix));
                let probe = c.clone();
                (c, Box::new(move || probe.is_degraded()))
            }
            None => (Arc::new(MeshOnly), Box::new(|| false)),
        };
        let mesh_view: Arc<dyn MeshView> = Arc::new(tracker.clone());
        let mut settings = config.provider.settings();
        settings.clock_offset_ms = config.clock_offset_ms;
        settings.max_clock_skew = Duration::from_secs(u64::from(config.max_clock_skew_secs));
        let clock_check =
            Arc::new(Mutex::new(ClockCheck::new(i64::from(config.max_clock_skew_secs) * 1000)));
        let provider = Arc::new(
            Provider::builder(identity.clone(), settings, Arc::new(RelayBroadcast(relay.clone())))
                .coordination(coordination)
                .mesh(mesh_view)
                .clock_check(clock_check.clone())
                .cancel(cancel.clone())
                .build(),
        );
        let keys = ProviderKeyStore::new(config.provider_key_path());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            identity: identity.clone(),
            book: Mutex::new(book),
            tracker,
            clock_check,
            events,
            relay: relay.clone(),
            provider: provider.clone(),
            persistence,
            coordination_degraded,
            keys,
            metrics: options.metrics.clone(),
            last_network: Mutex::new(None),
            config,
        });

        // Provider mode: the command line, or what the API left on before a restart.
        let stored = shared.keys.load().map_err(Error::KeyStore)?;
        let resume = match (&shared.config.provider.api_key, stored) {
            (Some(key), _) if shared.config.provider_mode => Some(key.clone()),
            (_, Some(stored)) => Some(stored),
            _ => None,
        };
        if let Some(key) = resume {
            if provider.resume(key).await? {
                shared.provider_became(true).await;
                info!("provider mode on");
            } else if let Err(e) = shared.keys.clear() {
                // Refused by Birdeye (the status says why): not tried again at the next start.
                warn!(error = %e, "stored provider key could not be removed");
            }
        }

        if shared.config.discovery.mdns_enabled || shared.config.discovery.ble_enabled {
            let discovery_config = mesh_discovery::Config {
                // Dialed above already.
                bootstrap_peers: Vec::new(),
                ..shared.config.discovery.clone()
            };
            match mesh_discovery::Discovery::start(
                identity.peer_id(),
                discovery_config,
                cancel.child_token(),
            )
            .await
            {
                Ok((discovery, found)) => {
                    let task = run_discovery(shared.clone(), discovery, found, cancel.clone());
                    spawn_guarded(&tasks, &cancel, &failure, "discovery", task);
                }
                // Discovery is a convenience: without it the node still has its bootstrap peers.
                Err(e) => warn!(error = %e, "discovery not started"),
            }
        }
        let state_done = CancellationToken::new();
        spawn_guarded(
            &tasks,
            &cancel,
            &failure,
            "state",
            run_state(shared.clone(), deliveries, cancel.clone(), state_done.clone()),
        );
        spawn_guarded(
            &tasks,
            &cancel,
            &failure,
            "status",
            run_status(shared.clone(), cancel.clone()),
        );
        spawn_guarded(
            &tasks,
            &cancel,
            &failure,
            "expiry",
            run_expiry(shared.clone(), cancel.clone()),
        );
        spawn_guarded(
            &tasks,
            &cancel,
            &failure,
            "announce",
            run_announce(shared.clone(), cancel.clone()),
        );
        spawn_guarded(
            &tasks,
            &cancel,
            &failure,
            "provider_events",
            run_provider_events(shared.clone(), cancel.clone()),
        );
        {
            let book_owner = shared.clone();
            let forget = move |cutoff_ms| book_owner.book().forget_older_than(cutoff_ms).len();
            let task = crate::retention::run(
                shared.config.price_retention,
                shared.config.max_quotes_per_origin,
                forget,
                shared.persistence.clone(),
                cancel.clone(),
            );
            spawn_guarded(&tasks, &cancel, &failure, "retention", task);
        }

        let server =
            mesh_ipc::Server::bind(mesh_ipc::ServerConfig::new(&shared.config.socket)).await?;
        let socket = server.path().to_path_buf();
        let ipc_cancel = cancel.child_token();
        let handler: Arc<dyn mesh_ipc::Handler> = shared.clone();
        spawn_guarded(&tasks, &cancel, &failure, "ipc", server.run(handler, ipc_cancel));

        // Ordered shutdown once the node is cancelled.
        {
            let shared = shared.clone();
            let cancel = cancel.clone();
            let storage_cancel = storage_cancel.clone();
            tasks.spawn(
                async move {
                    cancel.cancelled().await;
                    shared.provider.shutdown().await;
                    shared.relay.shutdown(RELAY_SHUTDOWN).await;
                    // The state task hands the deliveries it had accepted to the stores first;
                    // then the storage workers write what they hold (within the grace), and stop.
                    let grace = shared.config.shutdown_grace;
                    let _ = tokio::time::timeout(grace, state_done.cancelled()).await;
                    storage_cancel.cancel();
                }
                .instrument(info_span!("shutdown")),
            );
        }
        info!(%node_id, socket = %socket.display(), "node started");
        Ok(Node { shared, cancel, tasks, failure, socket })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.identity.node_id()
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.identity.peer_id()
    }

    /// The relay (status, listen addresses, dialing).
    pub fn relay(&self) -> &Relay {
        &self.shared.relay
    }

    /// The provider.
    pub fn provider(&self) -> &Provider {
        &self.shared.provider
    }

    /// The IPC socket path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The node's state, as the IPC handler sees it.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The storage queues and Redis side.
    pub fn persistence(&self) -> &Persistence {
        &self.shared.persistence
    }

    /// The served prices now.
    pub fn prices(&self) -> Vec<mesh_ipc::PriceView> {
        self.shared.book().view(&PriceFilter::default(), now_ms())
    }

    /// The network status now.
    pub fn network_status(&self) -> NetworkStatus {
        self.shared.network_status()
    }

    /// Recent rounds with the providers whose batch for each arrived here, oldest first.
    pub fn rounds_received(&self) -> Vec<(u64, Vec<NodeId>)> {
        let tracker = self.shared.tracker.lock();
        tracker.recent_rounds().into_iter().map(|r| (r, tracker.round_origins(r))).collect()
    }

    /// A token that is cancelled when the node stops (signal, panic, or [`Node::shutdown`]).
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Waits until the node was cancelled, then for its tasks (bounded by `grace`). Returns
    /// the reason when a task panicked.
    pub async fn wait(self, grace: Duration) -> Option<String> {
        self.cancel.cancelled().await;
        self.finish(grace).await
    }

    /// Stops the node and waits for its tasks (bounded by `grace`).
    pub async fn shutdown(self, grace: Duration) -> Option<String> {
        self.cancel.cancel();
        self.finish(grace).await
    }

    async fn finish(self, grace: Duration) -> Option<String> {
        self.tasks.close();
        // Room for the ordered shutdown: the relay, then the stores' bounded final flush.
        let grace = grace.max(RELAY_SHUTDOWN + self.shared.config.shutdown_grace * 2);
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            warn!("some tasks did not stop within {grace:?}");
        }
        let (prices, seen, redis) = self.shared.persistence.unwritten().counts();
        if prices + seen + redis > 0 {
            warn!(
                prices,
                seen,
                redis,
                grace_secs = self.shared.config.shutdown_grace.as_secs(),
                "shutdown: rows accepted but not written to the stores"
            );
        }
        // A statement abandoned at the deadline still holds its connection (the driver waits
        // for the server's answer before giving it back), so closing the pool is bounded too.
        let close = self.shared.persistence.db.close();
        if tokio::time::timeout(self.shared.config.shutdown_grace, close).await.is_err() {
            warn!("database connections still busy at shutdown; not waiting for them");
        }
        info!("node stopped");
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

fn relay_config(config: &NodeConfig, seen: Vec<mesh_storage::SeenRow>) -> mesh_relay::Config {
    let defaults = mesh_relay::Config::default();
    mesh_relay::Config {
        listen_addrs: config.listen_addrs.clone(),
        peers: mesh_relay::peer_manager::Config {
            min_peers: config.min_peers,
            max_peers: config.max_peers,
            explore_interval: config.explore_interval,
            addr_filter: config.discovery.addr_filter,
            ..defaults.peers.clone()
        },
        core: mesh_relay::CoreConfig {
            seen: mesh_seen_cache::Config {
                capacity: config.seen_cache_size,
                ttl: config.seen_ttl,
            },
            validation: mesh_protocol::validate::Config {
                max_clock_skew_secs: config.max_clock_skew_secs,
                trusted_providers: config.trusted_providers.clone(),
            },
            ..defaults.core.clone()
        },
        seen_preload: seen,
        clock_offset_ms: config.clock_offset_ms,
        ..defaults
    }
}

/// The task that owns the price book: every delivered message goes through here. At shutdown
/// it stops taking new deliveries and applies the ones already queued (at most the relay's
/// delivery queue), so that their rows reach the stores' final flush; `done` is cancelled when
/// it has.
async fn run_state(
    shared: Arc<Shared>,
    mut deliveries: mpsc::Receiver<Delivery>,
    cancel: CancellationToken,
    done: CancellationToken,
) {
    let _done = done.drop_guard();
    loop {
        let delivery = tokio::select! {
            () = cancel.cancelled() => break,
            d = deliveries.recv() => match d {
                Some(d) => d,
                None => return,
            },
        };
        apply_delivery(&shared, delivery);
    }
    deliveries.close();
    while let Some(delivery) = deliveries.recv().await {
        apply_delivery(&shared, delivery);
    }
}

/// Applies one delivered message to the book and hands its rows to the stores.
fn apply_delivery(shared: &Shared, delivery: Delivery) {
    let seen_ttl = shared.config.seen_ttl;
    let now = now_ms();
    let body = &delivery.message.body;
    let origin = body.origin;
    let own = delivery.from.is_none();
    let hops = if own { 0 } else { delivery.message.envelope.hop_count };
    // Another node's fresh message says what time it is there (the clock check).
    let local = now.saturating_add(shared.config.clock_offset_ms);
    if !own && origin != shared.identity.node_id() && local.abs_diff(body.created_at_ms) < 60_000 {
        shared.clock_check.lock().unwrap_or_else(std::sync::PoisonError::into_inner).observe(
            Reference::Peer(origin),
            body.created_at_ms,
            local,
        );
    }
    match &body.payload {
        Payload::ProviderAnnounce { .. } => {
            let _ = shared.tracker.lock().heard(origin, hops, None, now);
        }
        Payload::PriceBatch { round, prices } => {
            let claim = BatchClaim { round: *round, created_at_ms: body.created_at_ms, prices };
            if let Err(why) = shared.tracker.lock().heard(origin, hops, Some(claim), now) {
                // Prices still count; only the round is not taken as delivered.
                metrics::counter!("mesh_network_round_claims_ignored_total", "reason" => why.label())
                    .increment(1);
                tracing::debug!(
                    source_node_id = %origin,
                    round,
                    reason = why.label(),
                    "batch does not count as its round's delivery"
                );
            }
            // Events leave while the book is held, so that a view the expiry task made
            // just before cannot overtake this newer one on its way to subscribers.
            let applied = {
                let mut book = shared.book();
                let mut applied = book.apply(origin, hops, prices, now);
                for d in &applied.discrepancies {
                    shared.emit(Event::Discrepancy(d.clone()));
                }
                for view in applied.changed.drain(..) {
                    shared.emit(Event::Price(view));
                }
                applied
            };
            tracing::info!(
                source_node_id = %origin,
                round,
                prices = prices.len(),
                hop_count = hops,
                changed = applied.changed_count,
                "price update received"
            );
            for d in &applied.discrepancies {
                warn!(
                    asset = %d.asset,
                    blockchain = %d.blockchain,
                    node_a = %d.node_a,
                    price_a = %d.price_a,
                    node_b = %d.node_b,
                    price_b = %d.price_b,
                    difference_percent = %d.difference_percent,
                    "price discrepancy detected"
                );
                metrics::counter!("mesh_price_discrepancies_total").increment(1);
            }
            // Only what the book took: the stores are bounded as the book is. They keep one
            // time per price: when it was true (the source's update time when given), so that
            // a reloaded price keeps its real age.
            let rows = applied
                .accepted
                .iter()
                .filter_map(|&i| prices.get(i))
                .map(|p| {
                    let mut row = PriceRow::from_update(p, origin);
                    row.timestamp_ms = p.observed_ms();
                    if let std::borrow::Cow::Owned(canonical) =
                        mesh_protocol::canonical_asset(&row.asset)
                    {
                        row.asset = canonical;
                    }
                    row
                })
                .collect();
            shared.persistence.record(rows, delivery.message.id, seen_ttl);
        }
    }
}

/// How often the expiry task looks for prices whose flags changed with time alone.
const EXPIRY_TICK: Duration = Duration::from_millis(250);

/// Tells subscribers when a price's clock-dependent flags change with no new quote (it turned
/// stale, a disagreeing quote expired): the book knows when each asset's next change is due.
async fn run_expiry(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut book = shared.book();
        for view in book.expire(now_ms()) {
            shared.emit(Event::Price(view));
        }
    }
}

/// Publishes the network status when it changes, and keeps the gauges current.
async fn run_status(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut known_providers = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = shared.network_status();
        metrics::gauge!("mesh_network_active_providers").set(status.active_providers.len() as f64);
        let active: std::collections::HashSet<NodeId> =
            status.active_providers.iter().map(|p| p.node_id).collect();
        let joined = active.difference(&known_providers).count();
        let left = known_providers.difference(&active).count();
        if joined > 0 {
            info!(joined, providers = active.len(), "provider joined the network");
            metrics::counter!("mesh_network_providers_joined_total").increment(joined as u64);
        }
        if left > 0 {
            info!(left, providers = active.len(), "provider disconnected");
            metrics::counter!("mesh_network_providers_left_total").increment(left as u64);
        }
        known_providers = active;
        if let Some(ms) = shared.book().newest_timestamp_ms() {
            metrics::gauge!("mesh_cache_last_update_timestamp_seconds").set(ms as f64 / 1000.0);
        }
        metrics::gauge!("mesh_network_connected_peers").set(status.connected_peers as f64);
        if let Some(age) = shared.book().data_age(now_ms()) {
            metrics::gauge!("mesh_cache_data_age_seconds").set(age.as_secs_f64());
        }
        for component in ["database", "redis", "coordination"] {
            let degraded = status.degraded_components.iter().any(|c| c == component);
            metrics::gauge!("mesh_component_degraded", "component" => component).set(if degraded {
                1.0
            } else {
                0.0
            });
        }
        let changed = {
            let mut last =
                shared.last_network.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let changed = last.as_ref() != Some(&status);
            *last = Some(status.clone());
            changed
        };
        if changed {
            shared.emit(Event::Network(status));
        }
    }
}

/// While provider mode is on, tells the mesh about this provider once per round, so that
/// nodes without Redis can rank the providers (coordination without Redis).
async fn run_announce(shared: Arc<Shared>, cancel: CancellationToken) {
    let interval = Duration::from_secs(shared.config.provider.fetch_interval_secs);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = shared.provider.subscribe();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                // Announce at once when provider mode turns on.
                if !status.borrow_and_update().enabled {
                    continue;
                }
            }
        }
        if !shared.provider.status().enabled {
            continue;
        }
        let now = now_ms();
        let round = (now.max(0) as u64 / 1000) / interval.as_secs().max(1);
        let payload = Payload::ProviderAnnounce {
            fetch_interval_secs: interval.as_secs() as u32,
            assets: shared.config.provider.assets.as_slice().len() as u32,
            round,
        };
        let body = Body::new(&shared.identity, now, payload);
        match Envelope::seal(&shared.identity, &body, shared.config.provider.message_ttl) {
            Ok(envelope) => {
                if let Err(e) = shared.relay.publish(&envelope).await {
                    tracing::debug!(error = %e, "provider announce not sent");
                }
            }
            Err(e) => warn!(error = %e, "provider announce not sealed"),
        }
    }
}

/// Feeds peers found by discovery to the relay, and keeps our advertisement current (listen
/// addresses, role, hop distance to a provider).
async fn run_discovery(
    shared: Arc<Shared>,
    discovery: mesh_discovery::Discovery,
    mut found: mpsc::Receiver<mesh_discovery::DiscoveryEvent>,
    cancel: CancellationToken,
) {
    use mesh_discovery::{DiscoveryEvent, Role, Source};
    let mut relay_status = shared.relay.watch_status();
    let mut provider_status = shared.provider.subscribe();
    if let Ok(addrs) = shared.relay.listen_addrs().await {
        discovery.set_listen_addrs(addrs);
    }
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            event = found.recv() => match event {
                Some(DiscoveryEvent::PeerFound { peer_id, addrs, hop_distance, source, .. }) => {
                    let result = if source == Source::Bootstrap {
                        shared.relay.add_bootstrap(peer_id, addrs).await
                    } else {
                        shared.relay.add_peer_addresses(peer_id, addrs, hop_distance).await
                    };
                    if result.is_err() {
                        return;
                    }
                }
                Some(DiscoveryEvent::PeerExpired { .. }) => {}
                None => return,
            },
            changed = relay_status.changed() => {
                if changed.is_err() {
                    return;
                }
                let status = relay_status.borrow_and_update().clone();
                discovery.set_hop_distance(status.own_distance);
                discovery.set_listen_addrs(status.listen_addrs);
            }
            changed = provider_status.changed() => {
                if changed.is_err() {
                    return;
                }
                let enabled = provider_status.borrow_and_update().enabled;
                discovery.set_role(if enabled { Role::Provider } else { Role::Consumer });
            }
        }
    }
}

/// Forwards provider status changes to subscribers.
async fn run_provider_events(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut status = shared.provider.subscribe();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let view = provider_view(&status.borrow_and_update());
        if !view.enabled && view.reason.is_some() {
            // Stopped by Birdeye (invalid key): forget the stored key.
            let _ = shared.keys.clear();
            shared.tracker.lock().set_own_active(false, now_ms());
            let _ = shared.relay.set_provider(false).await;
        }
        shared.emit(Event::Provider(view));
    }
}
