//! The running node: starts the parts in order, wires them, and stops them in order.
//!
//! Start: identity, storage (reload prices and seen ids), relay (with the seen ids), bootstrap
//! peers, discovery, provider (resumed when it was on), the state task that owns the price book,
//! status and metrics tasks, and last the IPC socket. Stop: the socket first, then the provider,
//! the relay and the storage workers (which write what they hold), within a grace period.

//!
//! `shared.rs` holds the state the tasks share and answers the IPC requests; `tasks.rs` holds
//! the long-running tasks (the price book's state task, expiry, status, announces, discovery,
//! provider events).

mod shared;
mod tasks;

pub use shared::{Shared, provider_view};
use tasks::{run_announce, run_discovery, run_expiry, run_provider_events, run_state, run_status};

use std::os::unix::fs::DirBuilderExt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use mesh_coordination::{ClockCheck, Coordination, MeshOnly, MeshView, RedisCoordination};
use mesh_ipc::{NetworkStatus, PriceFilter};
use mesh_protocol::{Envelope, Identity, NodeId, PeerId};
use mesh_provider::{Broadcast, BroadcastError, Provider};
use mesh_relay::Relay;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::book::{BookConfig, PriceBook};
use crate::config::NodeConfig;
use crate::keystore::ProviderKeyStore;
use crate::now_ms;
use crate::persistence::Persistence;
use crate::providers::{ProviderTracker, SharedTracker};

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
        // Closed to other users: it holds the node's key (and, by default, its socket).
        std::fs::DirBuilder::new().recursive(true).mode(0o750).create(&config.data_dir).map_err(
            |e| crate::persistence::Error::DataDir { path: config.data_dir.clone(), source: e },
        )?;
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
            key_from_store: std::sync::atomic::AtomicBool::new(false),
            config,
        });

        // Provider mode: the command line, or what the API left on before a restart.
        let stored = shared.keys.load().map_err(Error::KeyStore)?;
        let resume = match (&shared.config.provider.api_key, stored) {
            (Some(key), _) if shared.config.provider_mode => Some((key.clone(), false)),
            (_, Some(stored)) => Some((stored, true)),
            _ => None,
        };
        if let Some((key, from_store)) = resume {
            if provider.resume(key).await? {
                shared.key_from_store.store(from_store, std::sync::atomic::Ordering::Relaxed);
                shared.provider_became(true).await;
                info!("provider mode on");
            } else if from_store {
                // Refused by Birdeye (the status says why): set aside, not tried again at the
                // next start, not lost.
                match shared.keys.quarantine() {
                    Ok(Some(path)) => warn!(
                        key_file = %path.display(),
                        "the stored provider key was set aside; enable provider mode with a valid key"
                    ),
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "the stored provider key could not be set aside"),
                }
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

        let server = mesh_ipc::Server::bind(mesh_ipc::ServerConfig {
            group: shared.config.socket_group,
            ..mesh_ipc::ServerConfig::new(&shared.config.socket)
        })
        .await?;
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
