//! The server and client over a real Unix socket, with a handler that plays the node.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_ipc::{
    Client, DataFreshness, Error, ErrorKind, Event, Handler, NetworkStatus, PriceFilter, PriceView,
    ProviderStatusView, Request, Response, Server, ServerConfig, Snapshot,
};
use mesh_protocol::NodeId;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

struct FakeNode {
    events: broadcast::Sender<Event>,
    snapshots: AtomicUsize,
}

fn node_id() -> NodeId {
    "00000000-0000-8000-8000-000000000001".parse().unwrap()
}

fn network() -> NetworkStatus {
    NetworkStatus {
        node_id: node_id(),
        peer_id: "12D3KooW".into(),
        connected_peers: 3,
        active_providers: vec![],
        data_freshness: DataFreshness::MinutesAgo(4),
        last_update_time: None,
        degraded: false,
        degraded_components: vec![],
        listen_addrs: vec![],
    }
}

fn provider() -> ProviderStatusView {
    ProviderStatusView {
        enabled: false,
        node_id: node_id(),
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

fn price(asset: &str, value: &str) -> PriceView {
    PriceView {
        asset: asset.into(),
        blockchain: "solana".into(),
        price: value.parse().unwrap(),
        change_24h: None,
        timestamp: "2026-01-01T00:00:00Z".into(),
        timestamp_ms: 0,
        source_timestamp: None,
        source_timestamp_ms: None,
        source_node_id: node_id(),
        age_secs: 1,
        stale: false,
        hop_count: Some(2),
        providers_reporting: 1,
        providers_agreeing: 1,
        discrepancy: false,
    }
}

#[async_trait::async_trait]
impl Handler for FakeNode {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::GetPrices(f) => Response::Prices(
                vec![price("SOL", "150.5"), price("BONK", "0.000016")]
                    .into_iter()
                    .filter(|p| f.matches(&p.blockchain, &p.asset))
                    .collect(),
            ),
            Request::GetNetworkStatus => Response::NetworkStatus(network()),
            Request::EnableProvider { api_key } if api_key == "bad" => Response::Error {
                kind: ErrorKind::InvalidApiKey,
                message: "Invalid API key".into(),
            },
            _ => Response::ProviderStatus(provider()),
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.snapshots.fetch_add(1, Ordering::SeqCst);
        Snapshot { prices: vec![price("SOL", "150.5")], network: network(), provider: provider() }
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

async fn serve(buffer: usize) -> (tempfile::TempDir, Client, Arc<FakeNode>, CancellationToken) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/node.sock");
    let server = Server::bind(ServerConfig::new(&path)).await.unwrap();
    let (events, _) = broadcast::channel(buffer);
    let node = Arc::new(FakeNode { events, snapshots: AtomicUsize::new(0) });
    let cancel = CancellationToken::new();
    tokio::spawn(server.run(node.clone(), cancel.clone()));
    (dir, Client::new(path), node, cancel)
}

#[tokio::test]
async fn requests_are_answered_and_the_socket_is_group_accessible() {
    let (dir, client, _node, cancel) = serve(16).await;
    let all = client.prices(PriceFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2);
    let one =
        client.prices(PriceFilter { blockchain: None, asset: Some("BONK".into()) }).await.unwrap();
    assert_eq!(one[0].price.to_string(), "0.000016");
    assert_eq!(client.network_status().await.unwrap().connected_peers, 3);
    let refused = client.request(&Request::EnableProvider { api_key: "bad".into() }).await.unwrap();
    assert_eq!(
        refused,
        Response::Error { kind: ErrorKind::InvalidApiKey, message: "Invalid API key".into() }
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(dir.path().join("run/node.sock")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
    }
    cancel.cancel();
}

#[tokio::test]
async fn a_subscription_starts_with_a_snapshot_then_carries_events() {
    let (_dir, client, node, cancel) = serve(16).await;
    let mut sub = client.subscribe().await.unwrap();
    assert!(matches!(sub.next().await.unwrap(), Some(Event::Snapshot(_))));
    node.events.send(Event::Price(price("JUP", "0.4"))).unwrap();
    match sub.next().await.unwrap() {
        Some(Event::Price(p)) => assert_eq!(p.asset, "JUP"),
        other => panic!("unexpected {other:?}"),
    }
    cancel.cancel();
    assert!(sub.next().await.unwrap().is_none(), "the stream ends when the node stops");
}

#[tokio::test]
async fn a_subscriber_that_fell_behind_gets_a_fresh_snapshot_and_the_node_never_waits() {
    let (_dir, client, node, cancel) = serve(4).await;
    let mut sub = client.subscribe().await.unwrap();
    assert!(matches!(sub.next().await.unwrap(), Some(Event::Snapshot(_))));
    // The subscriber reads nothing while the node sends far more than the buffer holds: every
    // send returns at once.
    let started = std::time::Instant::now();
    for i in 0..10_000 {
        let _ = node.events.send(Event::Price(price(&format!("A{i}"), "1")));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Reading again, it finds a snapshot in place of what it missed...
    let mut prices = 0;
    let resync = async {
        loop {
            match sub.next().await.unwrap() {
                Some(Event::Snapshot(_)) => break,
                Some(Event::Price(_)) => prices += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), resync).await.unwrap();
    assert!(prices < 10_000, "the missed events were conflated into a snapshot");
    assert!(node.snapshots.load(Ordering::SeqCst) >= 2);
    // ...and then the events that follow.
    node.events.send(Event::Price(price("LATEST", "2"))).unwrap();
    let latest = async {
        loop {
            if let Some(Event::Price(p)) = sub.next().await.unwrap()
                && p.asset == "LATEST"
            {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), latest).await.unwrap();
    cancel.cancel();
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_an_error_not_a_crash() {
    let (_dir, client, _node, cancel) = serve(4).await;
    let mut raw = tokio::net::UnixStream::connect(client.path()).await.unwrap();
    raw.write_all(&5u32.to_be_bytes()).await.unwrap();
    raw.write_all(b"nope!").await.unwrap();
    let answer: Option<Response> = mesh_ipc::frame::read(&mut raw, 1 << 20).await.unwrap();
    assert!(matches!(answer, Some(Response::Error { kind: ErrorKind::BadRequest, .. })));

    let mut raw = tokio::net::UnixStream::connect(client.path()).await.unwrap();
    raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let answer: Option<Response> = mesh_ipc::frame::read(&mut raw, 1 << 20).await.unwrap();
    assert!(matches!(answer, Some(Response::Error { kind: ErrorKind::BadRequest, .. })));
    // The server still answers others.
    assert_eq!(client.network_status().await.unwrap().connected_peers, 3);
    cancel.cancel();
}

#[tokio::test]
async fn a_missing_node_is_reported_as_unreachable_and_a_live_socket_is_not_taken_over() {
    let client = Client::new("/nonexistent/mesh/node.sock");
    assert!(matches!(client.network_status().await, Err(Error::Unreachable { .. })));
    let (_dir, client, _node, cancel) = serve(4).await;
    assert!(matches!(Server::bind(ServerConfig::new(client.path())).await, Err(Error::InUse(_))));
    cancel.cancel();
}

#[test]
fn freshness_serialises_as_the_guide_shows() {
    assert_eq!(serde_json::to_string(&DataFreshness::Fresh).unwrap(), r#""Fresh""#);
    assert_eq!(
        serde_json::to_string(&DataFreshness::MinutesAgo(5)).unwrap(),
        r#"{"MinutesAgo":5}"#
    );
    assert_eq!(serde_json::to_string(&DataFreshness::HoursAgo(2)).unwrap(), r#"{"HoursAgo":2}"#);
    assert_eq!(serde_json::to_string(&DataFreshness::Stale).unwrap(), r#""Stale""#);
}

/// A node whose book is at its limit: 100,000 assets (`BookConfig::max_assets` in
/// mesh-service), each named with 255 characters (the longest asset the validator accepts).
struct FullBook {
    prices: Vec<PriceView>,
    events: broadcast::Sender<Event>,
}

#[async_trait::async_trait]
impl Handler for FullBook {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::GetPrices(_) => Response::Prices(self.prices.clone()),
            _ => Response::NetworkStatus(network()),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot { prices: self.prices.clone(), network: network(), provider: provider() }
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Before parts, such a snapshot was one frame of about 60 MB: the client refused it as too
/// large, and mesh-api, which resubscribes after every failure, never got a snapshot again
/// (503 for good, across restarts of either process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_book_at_its_maximum_goes_through_in_parts() {
    let prices: Vec<PriceView> =
        (0..100_000).map(|i| price(&format!("{i:0>255}"), "1.5")).collect();
    let whole = Event::Snapshot(Box::new(Snapshot {
        prices: prices.clone(),
        network: network(),
        provider: provider(),
    }));
    let one_frame = serde_json::to_vec(&whole).unwrap().len();
    assert!(
        one_frame > mesh_ipc::frame::MAX_RESPONSE_LEN,
        "the test book must not fit in one frame ({one_frame} bytes)"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.sock");
    let server = Server::bind(ServerConfig::new(&path)).await.unwrap();
    let (events, _) = broadcast::channel(16);
    let node = Arc::new(FullBook { prices: prices.clone(), events });
    let cancel = CancellationToken::new();
    tokio::spawn(server.run(node.clone(), cancel.clone()));
    let client = Client::new(&path);

    let mut sub = client.subscribe().await.unwrap();
    match sub.next().await.unwrap() {
        Some(Event::Snapshot(snapshot)) => {
            assert_eq!(snapshot.prices.len(), 100_000);
            assert!(snapshot.prices == prices, "the parts are joined in order");
            assert_eq!(snapshot.network, network());
        }
        other => panic!("expected the snapshot, got {:?}", other.map(|_| "another event")),
    }
    // The stream is in step after the parts.
    node.events.send(Event::Price(price("JUP", "0.4"))).unwrap();
    match sub.next().await.unwrap() {
        Some(Event::Price(p)) => assert_eq!(p.asset, "JUP"),
        other => panic!("unexpected {other:?}"),
    }
    // A price list answer of the same size, and a short request on the same connection kind.
    let all = client.prices(PriceFilter::default()).await.unwrap();
    assert_eq!(all.len(), 100_000);
    assert!(all == prices);
    assert_eq!(client.network_status().await.unwrap().connected_peers, 3);
    cancel.cancel();
}
