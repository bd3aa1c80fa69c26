//! The node's IPC server (`mesh_ipc::Server`) under abuse, over a real Unix socket: oversized,
//! truncated and garbage frames, more idle connections than `max_connections`, and a
//! subscriber that never reads. Each time the server keeps answering well-behaved clients, and
//! the node side never waits for a client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use mesh_ipc::frame::MAX_REQUEST_LEN;
use mesh_ipc::{
    Client, ErrorKind, Event, Handler, Request, Response, Server, ServerConfig, Snapshot,
};
use mesh_tests::api::{network, price, provider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A node that answers every request at once and streams what the test sends.
struct Node {
    events: broadcast::Sender<Event>,
}

#[async_trait::async_trait]
impl Handler for Node {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::GetNetworkStatus => Response::NetworkStatus(network(3)),
            _ => Response::ProviderStatus(provider(false)),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            prices: vec![price("solana", "SOL", "150.5")],
            network: network(3),
            provider: provider(false),
        }
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

struct Running {
    _dir: tempfile::TempDir,
    client: Client,
    node: Arc<Node>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn start(tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.sock");
        let mut config = ServerConfig::new(&path);
        tweak(&mut config);
        let server = Server::bind(config).await.unwrap();
        let (events, _) = broadcast::channel(64);
        let node = Arc::new(Node { events });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server.run(node.clone(), cancel.clone()));
        let client = Client::new(path).with_timeout(Duration::from_secs(5));
        Self { _dir: dir, client, node, cancel, task }
    }

    async fn raw(&self) -> UnixStream {
        UnixStream::connect(self.client.path()).await.unwrap()
    }

    /// A well-behaved request is answered, and quickly.
    async fn answers(&self) {
        let started = Instant::now();
        let status = self.client.network_status().await.unwrap();
        assert_eq!(status.connected_peers, 3);
        assert!(started.elapsed() < Duration::from_secs(2), "slow answer {:?}", started.elapsed());
        assert!(!self.task.is_finished(), "the server task ended");
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.unwrap().unwrap();
    }
}

/// Reads what the server says until it closes (bounded in time and size).
async fn read_to_close(stream: &mut UnixStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if out.len() < 1 << 20 => out.extend_from_slice(&buf[..n]),
                Ok(_) => panic!("the server sent more than 1 MiB"),
            }
        }
    };
    tokio::time::timeout(within, read).await.expect("the server closed the connection in time");
    out
}

/// The error answer a refused request gets: one frame holding `Response::Error`.
fn error_answer(bytes: &[u8]) -> (ErrorKind, String) {
    assert!(bytes.len() >= 4, "no answer: {bytes:?}");
    let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), 4 + len, "exactly one frame, then the close");
    match serde_json::from_slice(&bytes[4..]).unwrap() {
        Response::Error { kind, message } => (kind, message),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test]
async fn oversized_truncated_and_garbage_frames_are_refused_and_others_keep_being_served() {
    let node = Running::start(|c| c.request_timeout = Duration::from_secs(2)).await;
    let within = Duration::from_secs(5);

    // Oversized: the length alone is refused, before any allocation or read of the body.
    for len in [u32::MAX, MAX_REQUEST_LEN as u32 + 1, 16 << 20] {
        let mut raw = node.raw().await;
        raw.write_all(&len.to_be_bytes()).await.unwrap();
        let (kind, message) = error_answer(&read_to_close(&mut raw, within).await);
        assert_eq!(kind, ErrorKind::BadRequest);
        assert!(message.contains("exceeds"), "{message}");
        node.answers().await;
    }
    // The largest allowed frame, full of garbage: read, refused as malformed.
    let mut raw = node.raw().await;
    let mut frame = (MAX_REQUEST_LEN as u32).to_be_bytes().to_vec();
    frame.resize(4 + MAX_REQUEST_LEN, b'{');
    raw.write_all(&frame).await.unwrap();
    let (kind, message) = error_answer(&read_to_close(&mut raw, within).await);
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(message.contains("malformed"), "{message}");

    // Truncated: a length prefix cut short, a body cut short, then the client goes away.
    for bytes in [&[0u8, 0][..], &[0, 0, 0, 100, b'{', b'"'][..]] {
        let mut raw = node.raw().await;
        raw.write_all(bytes).await.unwrap();
        drop(raw);
        node.answers().await;
    }
    // Truncated and left open: the server gives up on it after request_timeout.
    let mut raw = node.raw().await;
    raw.write_all(&[0, 0, 0, 100, b'{']).await.unwrap();
    let started = Instant::now();
    let said = read_to_close(&mut raw, within).await;
    assert!(said.is_empty(), "a stalled frame is dropped without an answer: {said:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "closed too early");

    // Garbage: 300 connections of pseudo-random bytes (a fixed xorshift, so runs repeat).
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut answered, mut closed) = (0, 0);
    for round in 0..300 {
        let len = (next() % 2048) as usize + 1;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 3 == 0 {
            // A plausible length prefix in front of the garbage reaches the JSON decoder.
            let body = (len - 1).min(MAX_REQUEST_LEN) as u32;
            bytes.splice(0..0, body.to_be_bytes());
            bytes.truncate(4 + body as usize);
        }
        let mut raw = node.raw().await;
        raw.write_all(&bytes).await.unwrap();
        raw.shutdown().await.unwrap();
        let said = read_to_close(&mut raw, within).await;
        if said.is_empty() {
            closed += 1;
        } else {
            assert_eq!(error_answer(&said).0, ErrorKind::BadRequest);
            answered += 1;
        }
    }
    eprintln!("ipc garbage: {answered} connections answered BadRequest, {closed} closed quietly");
    assert!(answered > 100, "most garbage is answered with an error ({answered})");
    node.answers().await;
    node.stop().await;
}

#[tokio::test]
async fn idle_connections_cannot_hold_the_connection_slots() {
    let max = 8;
    let node = Running::start(|c| {
        c.max_connections = max;
        c.request_timeout = Duration::from_millis(500);
    })
    .await;
    // Every slot taken by a client that connects and says nothing (and never leaves)...
    let mut idle = Vec::new();
    for _ in 0..max * 2 {
        idle.push(node.raw().await);
    }
    // ...holds it only for request_timeout: the server closes them and answers the next
    // well-behaved client, while the idle ones are still open on their side.
    let started = Instant::now();
    let status = node.client.network_status().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(status.connected_peers, 3);
    eprintln!("ipc: answered after {waited:?} with {} idle connections open", idle.len());
    assert!(waited < Duration::from_secs(4), "waited {waited:?} behind idle connections");
    for stream in &mut idle[..max] {
        assert!(read_to_close(stream, Duration::from_secs(3)).await.is_empty());
    }
    node.answers().await;
    node.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_never_blocks_the_node_and_is_dropped() {
    let node = Running::start(|c| c.write_timeout = Duration::from_millis(500)).await;
    let mut raw = node.raw().await;
    let subscribe = serde_json::to_vec(&Request::Subscribe).unwrap();
    raw.write_all(&(subscribe.len() as u32).to_be_bytes()).await.unwrap();
    raw.write_all(&subscribe).await.unwrap();
    mesh_tests::eventually("the subscriber is attached", Duration::from_secs(5), async || {
        node.node.events.receiver_count() == 1
    })
    .await
    .unwrap();

    // 20,000 events of about 1 KiB (far more than the socket buffers hold), never read: every
    // send returns at once.
    let big = "A".repeat(1000);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut slow_sends = 0;
    for i in 0..20_000 {
        let one = Instant::now();
        let _ = node.node.events.send(Event::Price(price("solana", &format!("{big}{i}"), "1")));
        let took = one.elapsed();
        slowest = slowest.max(took);
        slow_sends += usize::from(took >= Duration::from_millis(100));
    }
    let total = started.elapsed();
    eprintln!("ipc: 20,000 sends to a non-reading subscriber took {total:?}, slowest {slowest:?}");
    assert!(total < Duration::from_secs(2), "sending took {total:?}");
    // A send that waited on the subscriber would wait its write timeout (500 ms), and so would
    // every one after it; a few slow ones are this thread being descheduled on a busy machine.
    assert!(slow_sends <= 3, "{slow_sends} sends took 100 ms or more, the slowest {slowest:?}");

    // Once its socket is full, the server gives up on the subscriber after write_timeout and
    // releases its receiver. A burst conflates into snapshots, so keep a steady trickle of
    // 8 KiB events going (which the server writes one by one) until the socket fills.
    let big = "B".repeat(8 * 1024);
    let mut i = 0;
    mesh_tests::eventually("the subscriber is dropped", Duration::from_secs(10), async || {
        for _ in 0..20 {
            i += 1;
            let _ = node.node.events.send(Event::Price(price("solana", &format!("{big}{i}"), "1")));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        node.node.events.receiver_count() == 0
    })
    .await
    .unwrap();
    let said = read_to_close(&mut raw, Duration::from_secs(5)).await;
    assert!(!said.is_empty(), "it got the snapshot and what fitted in the socket");
    node.answers().await;
    node.stop().await;
}
