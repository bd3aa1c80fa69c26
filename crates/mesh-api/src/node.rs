//! The link to the node: one subscription, kept alive by a background task, feeding the
//! snapshot that every read is answered from and the events the stream clients get.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use mesh_ipc::{
    Client, Event, NetworkStatus, PriceFilter, PriceView, ProviderStatusView, Request, Response,
    Snapshot,
};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use axum::body::Bytes;

use crate::envelope::{ApiError, data_json};
use crate::hub::{Hub, Item, Key, Refused, Subscriber};
use crate::metrics::{Metrics, StreamKind};

/// A price as the node served it, and when it arrived here (its age grows from then on).
struct Entry {
    view: PriceView,
    received: Instant,
}

impl Entry {
    fn aged(&self) -> PriceView {
        let mut view = self.view.clone();
        view.age_secs = view.age_secs.saturating_add(self.received.elapsed().as_secs());
        view
    }
}

/// The node's state as last heard, while the subscription is live.
struct Synced {
    prices: BTreeMap<(String, String), Entry>,
    network: NetworkStatus,
    provider: ProviderStatusView,
}

impl Synced {
    fn prices(&self, filter: &PriceFilter) -> Vec<PriceView> {
        self.prices
            .iter()
            .filter(|((chain, asset), _)| filter.matches(chain, asset))
            .map(|(_, e)| e.aged())
            .collect()
    }

    fn snapshot(&self, filter: &PriceFilter) -> Snapshot {
        Snapshot {
            prices: self.prices(filter),
            network: self.network.clone(),
            provider: self.provider.clone(),
        }
    }
}

struct State {
    synced: Option<Synced>,
    /// Why the node is away (meaningful while `synced` is `None`).
    away: String,
    /// Bumped by every change: what a cached answer was made from.
    generation: u64,
}

/// The answer to `GET /api/mesh/prices` without a filter, the guide's command and the one
/// that dashboards poll: encoded once per change, and at most once a second so that the ages
/// in it move on.
struct CachedPrices {
    generation: u64,
    made: Instant,
    body: Bytes,
}

/// How long a cached price answer may be served while nothing changes (ages are whole seconds).
const PRICES_CACHE_TTL: Duration = Duration::from_secs(1);

/// The `node` stream event: the API's link to the node changed.
#[derive(Serialize)]
struct NodeLinkEvent<'a> {
    r#type: &'static str,
    data: NodeLinkData<'a>,
}

#[derive(Serialize)]
struct NodeLinkData<'a> {
    connected: bool,
    error: Option<&'a str>,
}

/// The snapshot, the subscription task and the stream hub.
pub(crate) struct NodeLink {
    client: Client,
    state: RwLock<State>,
    all_prices: Mutex<Option<CachedPrices>>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
}

impl NodeLink {
    pub fn new(client: Client, hub: Arc<Hub>, metrics: Arc<Metrics>) -> Self {
        let away = format!("connecting to the node at {}", client.path().display());
        Self {
            client,
            state: RwLock::new(State { synced: None, away, generation: 0 }),
            all_prices: Mutex::new(None),
            hub,
            metrics,
        }
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // Every write replaces whole values, so a poisoned lock still holds a usable state.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.generation += 1;
        state
    }

    fn with_synced<T>(&self, f: impl FnOnce(&Synced) -> T) -> Result<T, ApiError> {
        let state = self.read_state();
        match &state.synced {
            Some(synced) => Ok(f(synced)),
            None => Err(ApiError::node_unavailable(&state.away)),
        }
    }

    /// Prices passing `filter`, ordered by blockchain then asset.
    pub fn prices(&self, filter: &PriceFilter) -> Result<Vec<PriceView>, ApiError> {
        self.with_synced(|s| s.prices(filter))
    }

    /// Every price as the encoded answer of `GET /api/mesh/prices` (see [`CachedPrices`]).
    pub fn all_prices_answer(&self) -> Result<Bytes, ApiError> {
        let state = self.read_state();
        let Some(synced) = &state.synced else {
            return Err(ApiError::node_unavailable(&state.away));
        };
        let mut cache = self.all_prices.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = cache.as_ref()
            && cached.generation == state.generation
            && cached.made.elapsed() < PRICES_CACHE_TTL
        {
            return Ok(cached.body.clone());
        }
        let body = data_json(&synced.prices(&PriceFilter::default()))?;
        *cache = Some(CachedPrices {
            generation: state.generation,
            made: Instant::now(),
            body: body.clone(),
        });
        Ok(body)
    }

    pub fn network(&self) -> Result<NetworkStatus, ApiError> {
        self.with_synced(|s| s.network.clone())
    }

    pub fn provider(&self) -> Result<ProviderStatusView, ApiError> {
        self.with_synced(|s| s.provider.clone())
    }

    /// Figures of the stream clients.
    pub fn stream_stats(&self) -> Vec<crate::hub::StreamClientStats> {
        self.hub.stats()
    }

    /// The subscription is live.
    pub fn connected(&self) -> bool {
        self.read_state().synced.is_some()
    }

    /// Sends a request to the node (not through the snapshot).
    pub async fn request(&self, request: &Request) -> Result<Response, ApiError> {
        self.client.request(request).await.map_err(ApiError::from_ipc)
    }

    /// The node answers a request within `within`.
    pub async fn ping(&self, within: Duration) -> Result<(), ApiError> {
        let client = self.client.clone().with_timeout(within);
        match client.request(&Request::GetNetworkStatus).await {
            Ok(Response::NetworkStatus(_)) => Ok(()),
            Ok(Response::Error { kind, message }) => Err(ApiError::from_remote(kind, message)),
            Ok(other) => Err(ApiError::from_ipc(mesh_ipc::Error::Malformed(format!("{other:?}")))),
            Err(e) => Err(ApiError::from_ipc(e)),
        }
    }

    /// The node's own metrics (Prometheus text), when the node is followed and answers
    /// within `within`; `None` otherwise (the API's metrics are served all the same).
    pub async fn node_metrics(&self, within: Duration) -> Option<String> {
        if !self.connected() {
            return None;
        }
        let client = self.client.clone().with_timeout(within);
        match client.request(&Request::GetMetrics).await {
            Ok(Response::Metrics(text)) => Some(text),
            Ok(other) => {
                debug!(answer = ?other, "the node gave no metrics");
                None
            }
            Err(e) => {
                debug!(error = %e, "the node's metrics could not be read");
                None
            }
        }
    }

    /// A stream client: its queue starts with the current snapshot (filtered), or with a
    /// `node` event when the node is away. `None` when the server has no room for it.
    pub fn subscribe(
        &self,
        kind: StreamKind,
        filter: PriceFilter,
        address: std::net::IpAddr,
    ) -> Result<Subscriber, Refused> {
        let state = self.read_state();
        let first = match &state.synced {
            Some(synced) => snapshot_item(synced, &filter),
            None => node_item(Some(&state.away)),
        };
        self.hub.subscribe(kind, filter, address, first.into_iter().collect())
    }

    /// Takes in an event: updates the snapshot and passes it on to the stream clients.
    pub fn apply(&self, event: Event) {
        self.metrics.node_event(event_name(&event));
        let mut state = self.write_state();
        match event {
            Event::Snapshot(snapshot) => {
                let was_live = state.synced.is_some();
                let received = Instant::now();
                let Snapshot { prices, network, provider } = *snapshot;
                let prices = prices
                    .into_iter()
                    .map(|view| {
                        ((view.blockchain.clone(), view.asset.clone()), Entry { view, received })
                    })
                    .collect();
                let synced = Synced { prices, network, provider };
                self.metrics.prices(synced.prices.len());
                self.hub.publish_snapshot(|filter| snapshot_item(&synced, filter));
                state.synced = Some(synced);
                if !was_live {
                    self.metrics.node_connected(true);
                }
            }
            other => {
                let Some(synced) = state.synced.as_mut() else {
                    // Only a snapshot starts a subscription (`follow` checks it).
                    return;
                };
                let item = event_item(&other);
                match other {
                    Event::Price(view) => {
                        let key = (view.blockchain.clone(), view.asset.clone());
                        synced.prices.insert(key, Entry { view, received: Instant::now() });
                        self.metrics.prices(synced.prices.len());
                    }
                    // The flag is the node's to compute (from the fresh quotes, at the moment
                    // it answers): every change of it comes as a price event of its own, the
                    // clearing when the disagreeing quotes expire included.
                    Event::Discrepancy(_) => {}
                    Event::Network(network) => synced.network = network,
                    // The answer to an enable or disable (read-your-writes) and the node's
                    // events come by two paths: keep the newer, never an older over a newer.
                    Event::Provider(provider) => {
                        if provider.revision >= synced.provider.revision {
                            synced.provider = provider;
                        }
                    }
                    // Parts are joined into the snapshot by the subscription.
                    Event::Snapshot(_) | Event::SnapshotPart(_) => {}
                }
                if let Some(item) = item {
                    self.hub.publish(&item);
                }
            }
        }
    }

    fn set_away(&self, reason: String) {
        let mut state = self.write_state();
        let was_live = state.synced.take().is_some();
        if let Some(item) = node_item(Some(&reason)) {
            self.hub.publish(&item);
        }
        state.away = reason;
        if was_live {
            self.metrics.node_connected(false);
            self.metrics.prices(0);
        }
    }

    /// Keeps the subscription alive until `cancel` fires: reconnects with a backoff from
    /// `min` doubling to `max`, and starts again from the new snapshot each time.
    pub async fn run(self: Arc<Self>, min: Duration, max: Duration, cancel: CancellationToken) {
        let mut backoff = min;
        let mut failures = 0u64;
        loop {
            let (was_live, reason) = tokio::select! {
                () = cancel.cancelled() => return,
                outcome = self.follow() => outcome,
            };
            if was_live {
                warn!(socket = %self.client.path().display(), %reason, "lost the node; reconnecting");
                backoff = min;
                failures = 0;
            } else if failures == 0 {
                warn!(socket = %self.client.path().display(), %reason, "node not reachable; retrying");
            } else {
                debug!(%reason, failures, "node still not reachable");
            }
            failures += 1;
            self.set_away(reason);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(max);
        }
    }

    /// One subscription from connect to its end: whether it went live, and why it ended.
    async fn follow(&self) -> (bool, String) {
        let mut subscription = match self.client.subscribe().await {
            Ok(s) => s,
            Err(e) => return (false, e.to_string()),
        };
        let first = tokio::time::timeout(Duration::from_secs(10), subscription.next()).await;
        match first {
            Ok(Ok(Some(event @ Event::Snapshot(_)))) => self.apply(event),
            Ok(Ok(Some(other))) => {
                return (
                    false,
                    format!("the node sent a {} event before its snapshot", event_name(&other)),
                );
            }
            Ok(Ok(None)) => return (false, "the node closed the subscription".to_owned()),
            Ok(Err(e)) => return (false, e.to_string()),
            Err(_) => return (false, "the node sent no snapshot within 10 s".to_owned()),
        }
        info!(socket = %self.client.path().display(), "subscribed to the node");
        loop {
            match subscription.next().await {
                Ok(Some(event)) => self.apply(event),
                Ok(None) => return (true, "the node closed the subscription".to_owned()),
                Err(e) => return (true, e.to_string()),
            }
        }
    }
}

fn event_name(event: &Event) -> &'static str {
    match event {
        Event::Snapshot(_) => "snapshot",
        Event::SnapshotPart(_) => "snapshot_part",
        Event::Price(_) => "price",
        Event::Discrepancy(_) => "discrepancy",
        Event::Network(_) => "network",
        Event::Provider(_) => "provider",
    }
}

fn encode<T: Serialize>(key: Key, name: &'static str, value: &T) -> Option<Item> {
    match serde_json::to_string(value) {
        Ok(text) => Some(Item { key, name, text: text.into() }),
        Err(e) => {
            warn!(error = %e, event = name, "stream event could not be encoded");
            None
        }
    }
}

fn event_item(event: &Event) -> Option<Item> {
    let key = match event {
        Event::Snapshot(_) => Key::Snapshot,
        // Never reaches here: the subscription joins parts into their snapshot.
        Event::SnapshotPart(_) => return None,
        Event::Price(p) => Key::Price(Arc::new((p.blockchain.clone(), p.asset.clone()))),
        Event::Discrepancy(d) => {
            Key::Discrepancy(Arc::new((d.blockchain.clone(), d.asset.clone())))
        }
        Event::Network(_) => Key::Network,
        Event::Provider(_) => Key::Provider,
    };
    encode(key, event_name(event), event)
}

fn snapshot_item(synced: &Synced, filter: &PriceFilter) -> Option<Item> {
    let event = Event::Snapshot(Box::new(synced.snapshot(filter)));
    encode(Key::Snapshot, "snapshot", &event)
}

fn node_item(error: Option<&str>) -> Option<Item> {
    let error = error.map(|reason| format!("node unavailable: {reason}"));
    let event = NodeLinkEvent {
        r#type: "node",
        data: NodeLinkData { connected: error.is_none(), error: error.as_deref() },
    };
    encode(Key::Node, "node", &event)
}
