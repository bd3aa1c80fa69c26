//! The state shared by the node's tasks, and the IPC handler that answers from it.

use std::sync::{Arc, Mutex};

use mesh_coordination::ClockCheck;
use mesh_ipc::{
    ErrorKind, Event, NetworkStatus, PriceFilter, ProviderStatusView, Request, Response, Snapshot,
};
use mesh_protocol::Identity;
use mesh_provider::{ApiKey, Provider};
use mesh_relay::Relay;
use tokio::sync::broadcast;
use tracing::warn;

use crate::book::{PriceBook, rfc3339};
use crate::config::NodeConfig;
use crate::keystore::ProviderKeyStore;
use crate::now_ms;
use crate::persistence::Persistence;
use crate::providers::SharedTracker;

/// The state shared by the node's tasks and the IPC handler.
pub struct Shared {
    pub(super) identity: Identity,
    pub(super) config: NodeConfig,
    pub(super) book: Mutex<PriceBook>,
    pub(super) tracker: SharedTracker,
    /// Is this node's clock right? Fed with peers' timestamps here, Birdeye's `Date` and
    /// Redis `TIME` by the provider.
    pub(super) clock_check: Arc<Mutex<ClockCheck>>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) relay: Relay,
    pub(super) provider: Arc<Provider>,
    pub(super) persistence: Persistence,
    pub(super) coordination_degraded: Box<dyn Fn() -> bool + Send + Sync>,
    pub(super) keys: ProviderKeyStore,
    pub(super) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub(super) last_network: Mutex<Option<NetworkStatus>>,
    /// Provider mode runs with the stored key (enabled through the API, or resumed from the
    /// store), not `BIRDEYE_API_KEY`: only that key is set aside when Birdeye refuses it.
    pub(super) key_from_store: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("node_id", &self.identity.node_id()).finish_non_exhaustive()
    }
}

impl Shared {
    pub(super) fn book(&self) -> std::sync::MutexGuard<'_, PriceBook> {
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
        self.view_of(&self.provider.status())
    }

    /// `status` in the API's shape, with where a refused key was set aside.
    pub(super) fn view_of(&self, status: &mesh_provider::ProviderStatus) -> ProviderStatusView {
        let rejected = self.keys.rejected_path();
        ProviderStatusView {
            rejected_key_file: rejected.exists().then(|| rejected.display().to_string()),
            ..provider_view(status)
        }
    }

    pub(super) async fn enable_provider(&self, api_key: String) -> Response {
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
                match self.keys.save(&key) {
                    Ok(()) => self.key_from_store.store(true, std::sync::atomic::Ordering::Relaxed),
                    Err(e) => {
                        self.key_from_store.store(false, std::sync::atomic::Ordering::Relaxed);
                        warn!(error = %e, "provider key could not be stored; provider mode will not survive a restart");
                    }
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

    pub(super) async fn disable_provider(&self) -> Response {
        self.provider.disable().await;
        self.key_from_store.store(false, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.keys.clear() {
            warn!(error = %e, "stored provider key could not be removed");
        }
        self.provider_became(false).await;
        Response::ProviderStatus(self.provider_status())
    }

    pub(super) async fn provider_became(&self, active: bool) {
        self.tracker.lock().set_own_active(active, now_ms());
        let _ = self.relay.set_provider(active).await;
    }

    pub(super) fn snapshot_now(&self) -> Snapshot {
        let prices = self.book().view(&PriceFilter::default(), now_ms());
        Snapshot { prices, network: self.network_status(), provider: self.provider_status() }
    }

    pub(super) fn emit(&self, event: Event) {
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
        rejected_key_file: None,
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
            Request::GetQuotes(filter) => Response::Quotes(self.book().quotes(&filter, now_ms())),
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
