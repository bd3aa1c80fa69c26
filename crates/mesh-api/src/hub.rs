//! Fan-out of events to stream clients (SSE and WebSocket).
//!
//! Each client has a conflating queue: at most one pending item per key (one per asset for
//! prices and discrepancies, one each for network, provider and node status), so a client that
//! reads slowly gets the latest value of each instead of a growing backlog. A queue that would
//! hold more than `client_buffer` keys closes its client with a reason. Publishing locks each
//! queue only to insert; it never waits for a client.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::ws::Utf8Bytes;
use mesh_ipc::PriceFilter;
use tokio::sync::Notify;

use crate::metrics::{Metrics, StreamKind};

/// What an item replaces in a client's queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// A full state: replaces everything pending.
    Snapshot,
    /// The API's link to the node.
    Node,
    Network,
    Provider,
    Price(Arc<(String, String)>),
    Discrepancy(Arc<(String, String)>),
}

/// One event, encoded once for every client.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub key: Key,
    /// The SSE event name (`price`, `snapshot`, ...).
    pub name: &'static str,
    /// The JSON text.
    pub text: Utf8Bytes,
}

impl Item {
    fn passes(&self, filter: &PriceFilter) -> bool {
        match &self.key {
            Key::Price(scope) | Key::Discrepancy(scope) => filter.matches(&scope.0, &scope.1),
            _ => true,
        }
    }
}

/// What a stream task gets from its queue.
#[derive(Debug)]
pub(crate) enum Next {
    /// Items to send, oldest first.
    Items(Vec<Item>),
    /// The client must be closed, for this reason.
    Closed(String),
}

#[derive(Debug, Default)]
struct Pending {
    order: VecDeque<Key>,
    items: HashMap<Key, Item>,
    closed: Option<String>,
}

#[derive(Debug)]
struct ClientQueue {
    id: u64,
    kind: StreamKind,
    address: IpAddr,
    filter: PriceFilter,
    pending: Mutex<Pending>,
    notify: Notify,
}

impl ClientQueue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves a consistent queue (inserts are single steps).
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Figures of one stream client, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamClientStats {
    /// Server-side id of the client.
    pub id: u64,
    /// `sse` or `ws`.
    pub kind: &'static str,
    /// Updates waiting to be written to it (bounded by the number of distinct keys).
    pub pending: usize,
}

/// Why a stream client was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Every slot is taken.
    Full,
    /// Its address holds its share of the slots already.
    AddressFull,
}

#[derive(Debug, Default)]
struct Clients {
    by_id: HashMap<u64, Arc<ClientQueue>>,
    /// Clients per address; an address leaves the map with its last client.
    per_address: HashMap<IpAddr, usize>,
}

/// The registry of stream clients.
pub(crate) struct Hub {
    clients: Mutex<Clients>,
    next_id: AtomicU64,
    max_clients: usize,
    max_per_address: usize,
    client_buffer: usize,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(
        max_clients: usize,
        max_per_address: usize,
        client_buffer: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            clients: Mutex::new(Clients::default()),
            next_id: AtomicU64::new(1),
            max_clients,
            max_per_address,
            client_buffer,
            metrics,
        }
    }

    fn clients(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a client of `address` whose queue starts with `first`; refused when the
    /// server is full or the address holds `max_per_address` clients already. Call it while
    /// holding the state lock that also orders [`Hub::publish`], so that the client gets every
    /// event after its first items and none before.
    pub fn subscribe(
        self: &Arc<Self>,
        kind: StreamKind,
        filter: PriceFilter,
        address: IpAddr,
        first: Vec<Item>,
    ) -> Result<Subscriber, Refused> {
        let mut clients = self.clients();
        if clients.by_id.len() >= self.max_clients {
            return Err(Refused::Full);
        }
        let of_address = clients.per_address.entry(address).or_insert(0);
        if *of_address >= self.max_per_address {
            return Err(Refused::AddressFull);
        }
        *of_address += 1;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(ClientQueue {
            id,
            kind,
            address,
            filter,
            pending: Mutex::default(),
            notify: Notify::new(),
        });
        {
            let mut pending = queue.lock();
            for item in first {
                self.push(&queue, &mut pending, item);
            }
        }
        queue.notify.notify_one();
        clients.by_id.insert(id, queue.clone());
        self.metrics.stream_clients(kind).increment(1.0);
        Ok(Subscriber { queue, hub: self.clone() })
    }

    /// Queues `item` for every client whose filter it passes.
    pub fn publish(&self, item: &Item) {
        for queue in self.clients().by_id.values() {
            if item.passes(&queue.filter) {
                let mut pending = queue.lock();
                self.push(queue, &mut pending, item.clone());
                drop(pending);
                queue.notify.notify_one();
            }
        }
    }

    /// Queues a snapshot made for each client's filter (once per distinct filter).
    /// A snapshot that cannot be made (`None`) is skipped.
    pub fn publish_snapshot(&self, mut make: impl FnMut(&PriceFilter) -> Option<Item>) {
        let mut made: Vec<(PriceFilter, Option<Item>)> = Vec::new();
        for queue in self.clients().by_id.values() {
            let item = match made.iter().find(|(f, _)| *f == queue.filter) {
                Some((_, item)) => item.clone(),
                None => {
                    let item = make(&queue.filter);
                    made.push((queue.filter.clone(), item.clone()));
                    item
                }
            };
            let Some(item) = item else { continue };
            let mut pending = queue.lock();
            self.push(queue, &mut pending, item);
            drop(pending);
            queue.notify.notify_one();
        }
    }

    fn push(&self, queue: &ClientQueue, pending: &mut Pending, item: Item) {
        if pending.closed.is_some() {
            return;
        }
        if item.key == Key::Snapshot {
            pending.order.clear();
            pending.items.clear();
        }
        if let Some(slot) = pending.items.get_mut(&item.key) {
            *slot = item;
            self.metrics.conflated().increment(1);
            return;
        }
        if pending.items.len() >= self.client_buffer {
            pending.order.clear();
            pending.items.clear();
            pending.closed = Some(format!(
                "client too slow: more than {} distinct updates waiting",
                self.client_buffer
            ));
            tracing::info!(
                client = queue.id,
                kind = queue.kind.as_str(),
                "closing a slow stream client"
            );
            return;
        }
        pending.order.push_back(item.key.clone());
        pending.items.insert(item.key.clone(), item);
    }

    /// Figures of every client.
    pub fn stats(&self) -> Vec<StreamClientStats> {
        let mut stats: Vec<_> = self
            .clients()
            .by_id
            .values()
            .map(|q| StreamClientStats {
                id: q.id,
                kind: q.kind.as_str(),
                pending: q.lock().items.len(),
            })
            .collect();
        stats.sort_by_key(|s| s.id);
        stats
    }

    /// Clients connected now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.clients().by_id.len()
    }
}

/// One client's end of the hub; leaving it unregisters the client.
pub(crate) struct Subscriber {
    queue: Arc<ClientQueue>,
    hub: Arc<Hub>,
}

impl Subscriber {
    /// Waits for items (or the order to close) and takes them all.
    pub async fn next(&self) -> Next {
        loop {
            {
                let mut pending = self.queue.lock();
                if let Some(reason) = pending.closed.clone() {
                    return Next::Closed(reason);
                }
                if !pending.order.is_empty() {
                    let pending = &mut *pending;
                    let items =
                        pending.order.drain(..).filter_map(|k| pending.items.remove(&k)).collect();
                    return Next::Items(items);
                }
            }
            // A single waiter per queue: `notify_one` keeps a permit when nobody waits, so an
            // insert between the check above and this await is not lost.
            self.queue.notify.notified().await;
        }
    }

    /// Its kind (SSE or WebSocket).
    pub fn kind(&self) -> StreamKind {
        self.queue.kind
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let mut clients = self.hub.clients();
        clients.by_id.remove(&self.queue.id);
        if let std::collections::hash_map::Entry::Occupied(mut n) =
            clients.per_address.entry(self.queue.address)
        {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
        drop(clients);
        self.hub.metrics.stream_clients(self.queue.kind).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn price(chain: &str, asset: &str, text: &str) -> Item {
        Item {
            key: Key::Price(Arc::new((chain.into(), asset.into()))),
            name: "price",
            text: text.to_owned().into(),
        }
    }

    fn texts(next: Next) -> Vec<String> {
        match next {
            Next::Items(items) => items.iter().map(|i| i.text.as_str().to_owned()).collect(),
            Next::Closed(reason) => panic!("closed: {reason}"),
        }
    }

    #[tokio::test]
    async fn a_slow_client_gets_the_latest_value_per_asset_in_first_seen_order() {
        let hub = Arc::new(Hub::new(10, 10, 100, Arc::new(Metrics::new().unwrap())));
        let sub = hub.subscribe(StreamKind::Ws, PriceFilter::default(), LOCAL, vec![]).unwrap();
        for i in 0..1000 {
            hub.publish(&price("solana", "SOL", &format!("sol{i}")));
            hub.publish(&price("solana", "BONK", &format!("bonk{i}")));
        }
        assert_eq!(hub.stats()[0].pending, 2);
        assert_eq!(texts(sub.next().await), ["sol999", "bonk999"]);
    }

    #[tokio::test]
    async fn filters_apply_and_a_snapshot_replaces_what_is_pending() {
        let hub = Arc::new(Hub::new(10, 10, 100, Arc::new(Metrics::new().unwrap())));
        let filter = PriceFilter { blockchain: Some("ethereum".into()), asset: None };
        let sub = hub.subscribe(StreamKind::Sse, filter, LOCAL, vec![]).unwrap();
        hub.publish(&price("solana", "SOL", "sol"));
        hub.publish(&price("ethereum", "WETH", "weth"));
        assert_eq!(texts(sub.next().await), ["weth"]);
        hub.publish(&price("ethereum", "WETH", "weth2"));
        hub.publish_snapshot(|f| {
            Some(Item {
                key: Key::Snapshot,
                name: "snapshot",
                text: format!("snap {:?}", f.blockchain).into(),
            })
        });
        assert_eq!(texts(sub.next().await), [r#"snap Some("ethereum")"#]);
    }

    #[tokio::test]
    async fn too_many_distinct_updates_close_the_client_and_free_its_queue() {
        let hub = Arc::new(Hub::new(10, 10, 5, Arc::new(Metrics::new().unwrap())));
        let sub = hub.subscribe(StreamKind::Ws, PriceFilter::default(), LOCAL, vec![]).unwrap();
        for i in 0..6 {
            hub.publish(&price("solana", &format!("A{i}"), "x"));
        }
        assert_eq!(hub.stats()[0].pending, 0);
        assert!(matches!(sub.next().await, Next::Closed(r) if r.contains("too slow")));
        drop(sub);
        assert_eq!(hub.len(), 0);
    }

    #[test]
    fn the_hub_refuses_clients_beyond_its_limit() {
        let hub = Arc::new(Hub::new(1, 10, 5, Arc::new(Metrics::new().unwrap())));
        let first = hub.subscribe(StreamKind::Ws, PriceFilter::default(), LOCAL, vec![]);
        assert!(first.is_ok());
        let second = hub.subscribe(StreamKind::Sse, PriceFilter::default(), LOCAL, vec![]);
        assert_eq!(second.err(), Some(Refused::Full));
    }

    #[test]
    fn each_address_gets_its_share_and_a_leaving_client_frees_it() {
        let hub = Arc::new(Hub::new(10, 2, 5, Arc::new(Metrics::new().unwrap())));
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        let subscribe =
            |address| hub.subscribe(StreamKind::Sse, PriceFilter::default(), address, vec![]);
        let a = subscribe(LOCAL).unwrap();
        let _b = subscribe(LOCAL).unwrap();
        assert_eq!(subscribe(LOCAL).err(), Some(Refused::AddressFull));
        let _c = subscribe(other).unwrap();
        drop(a);
        let _d = subscribe(LOCAL).unwrap();
        assert_eq!(hub.len(), 3);
    }
}
