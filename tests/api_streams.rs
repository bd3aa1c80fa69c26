//! mesh-api's streams (WebSocket and Server-Sent Events) over real connections against a node
//! stand-in: snapshot first, updates within a second, filters, the slow-client rule, ping/pong,
//! and the node going away and coming back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use mesh_tests::api::{FakeNode, NodeSocket, price, start_api};
use mesh_tests::eventually;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn book() -> Vec<mesh_ipc::PriceView> {
    vec![
        price("solana", "SOL", "150.5"),
        price("solana", "BONK", "0.000016"),
        price("ethereum", "WETH", "3100.25"),
    ]
}

async fn ws(addr: std::net::SocketAddr, query: &str) -> Ws {
    let (socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/api/mesh/ws{query}")).await.unwrap();
    socket
}

/// The next JSON event (pings are answered by tungstenite while reading).
async fn next_event(socket: &mut Ws) -> Value {
    let read = async {
        loop {
            match socket.next().await.expect("stream open").unwrap() {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Close(frame) => panic!("closed by the server: {frame:?}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("an event within 10 s")
}

/// Reads events until `pick` accepts one.
async fn until(socket: &mut Ws, mut pick: impl FnMut(&Value) -> bool) -> Value {
    loop {
        let event = next_event(socket).await;
        if pick(&event) {
            return event;
        }
    }
}

fn snapshot_assets(event: &Value) -> Vec<String> {
    assert_eq!(event["type"], "snapshot", "{event}");
    let mut assets: Vec<String> = event["data"]["prices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["asset"].as_str().unwrap().to_owned())
        .collect();
    assets.sort();
    assets
}

#[tokio::test]
async fn a_websocket_client_gets_the_snapshot_then_each_update_within_a_second() {
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    let mut socket = ws(api.local_addr(), "").await;
    let first = next_event(&mut socket).await;
    assert_eq!(snapshot_assets(&first), ["BONK", "SOL", "WETH"]);
    assert_eq!(first["data"]["network"]["connected_peers"], 3);
    assert_eq!(first["data"]["provider"]["enabled"], false);

    for i in 0..5 {
        let value = format!("151.{}", i + 1);
        let emitted = Instant::now();
        node.node.set_price(price("solana", "SOL", &value));
        let event = until(&mut socket, |e| e["type"] == "price").await;
        let latency = emitted.elapsed();
        assert_eq!(event["data"]["asset"], "SOL");
        assert_eq!(event["data"]["price"], value.as_str());
        assert!(latency < Duration::from_secs(1), "update {i} took {latency:?}");
    }
    // Network, provider and discrepancy events pass through as well.
    node.node.set_network(mesh_tests::api::network(7));
    let event = until(&mut socket, |e| e["type"] == "network").await;
    assert_eq!(event["data"]["connected_peers"], 7);
    node.node.emit(mesh_ipc::Event::Discrepancy(mesh_ipc::Discrepancy {
        asset: "SOL".into(),
        blockchain: "solana".into(),
        node_a: mesh_tests::api::NODE_ID.parse().unwrap(),
        price_a: "150".parse().unwrap(),
        node_b: mesh_tests::api::PROVIDER_ID.parse().unwrap(),
        price_b: "160".parse().unwrap(),
        difference_percent: "6.67".into(),
        detected_at: "2026-01-01T00:00:00Z".into(),
    }));
    let event = until(&mut socket, |e| e["type"] == "discrepancy").await;
    assert_eq!(event["data"]["difference_percent"], "6.67");
    // The flag is the node's to compute when it serves (issue 33): it comes with the price
    // event the node sends when the flag changes, never from the discrepancy event alone.
    let sol_flag = async || {
        reqwest::get(format!("http://{}/api/mesh/prices/SOL", api.local_addr()))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["data"][0]["discrepancy"]
            .clone()
    };
    assert_eq!(sol_flag().await, false, "a discrepancy event does not set the flag");
    let mut flagged = price("solana", "SOL", "150");
    (flagged.discrepancy, flagged.providers_reporting, flagged.providers_agreeing) = (true, 2, 1);
    node.node.set_price(flagged);
    until(&mut socket, |e| e["type"] == "price" && e["data"]["discrepancy"] == true).await;
    assert_eq!(sol_flag().await, true, "the snapshot flags the asset");
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn filters_apply_to_the_snapshot_and_to_the_updates() {
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    let mut ethereum = ws(api.local_addr(), "?blockchain=ethereum").await;
    let mut bonk = ws(api.local_addr(), "?blockchain=solana&asset=BONK").await;
    assert_eq!(snapshot_assets(&next_event(&mut ethereum).await), ["WETH"]);
    assert_eq!(snapshot_assets(&next_event(&mut bonk).await), ["BONK"]);
    node.node.set_price(price("solana", "SOL", "152"));
    node.node.set_price(price("solana", "BONK", "0.00002"));
    node.node.set_price(price("ethereum", "WETH", "3200"));
    let event = until(&mut ethereum, |e| e["type"] == "price").await;
    assert_eq!(event["data"]["asset"], "WETH", "SOL and BONK were filtered out");
    let event = until(&mut bonk, |e| e["type"] == "price").await;
    assert_eq!(event["data"]["asset"], "BONK", "SOL was filtered out");
    api.shutdown(Duration::from_secs(5)).await;
}

/// Reads Server-Sent Events from a streaming response: (event name, data) pairs and comments.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn next_block(&mut self) -> String {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block = self.buffer[..end].to_owned();
                self.buffer.drain(..end + 2);
                return block;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("SSE data within 10 s")
                .unwrap()
                .expect("stream open");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    async fn next_event(&mut self) -> (String, Value) {
        loop {
            let block = self.next_block().await;
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if !data.is_empty() {
                return (name, serde_json::from_str(&data).unwrap());
            }
        }
    }
}

#[tokio::test]
async fn server_sent_events_carry_the_same_events_and_keep_alive_comments() {
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api =
        start_api(node.path(), |c| c.sse_keep_alive = Duration::from_millis(200)).await.unwrap();
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    let response = reqwest::get(format!("http://{}/api/mesh/stream?asset=SOL", api.local_addr()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut sse = SseReader { response, buffer: String::new() };
    let (name, event) = sse.next_event().await;
    assert_eq!(name, "snapshot");
    assert_eq!(snapshot_assets(&event), ["SOL"]);
    let emitted = Instant::now();
    node.node.set_price(price("solana", "BONK", "0.1"));
    node.node.set_price(price("solana", "SOL", "149"));
    let (name, event) = sse.next_event().await;
    assert!(emitted.elapsed() < Duration::from_secs(1));
    assert_eq!((name.as_str(), &event["data"]["price"]), ("price", &Value::from("149")));
    // Nothing happens for a while: comment lines keep the connection open.
    let quiet = Instant::now();
    let block = sse.next_block().await;
    assert_eq!(block, ": keep-alive");
    assert!(quiet.elapsed() < Duration::from_secs(2));
    // `curl -N` reads the same stream.
    let curl = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "1", &format!("http://{}/api/mesh/stream", api.local_addr())])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&curl.stdout);
    assert!(text.starts_with("event: snapshot\ndata: {\"type\":\"snapshot\""), "{text}");
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_conflated_then_closed_and_never_slows_the_others() {
    const ASSETS: usize = 20;
    let node = NodeSocket::start(FakeNode::new(vec![])).await.unwrap();
    let api = start_api(node.path(), |c| {
        c.client_write_timeout = Duration::from_secs(1);
        c.ws_ping_interval = Duration::from_secs(60);
    })
    .await
    .unwrap();
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    // The slow client connects and then never reads again.
    let slow = ws(api.local_addr(), "").await;
    let mut fast = ws(api.local_addr(), "").await;
    snapshot_assets(&next_event(&mut fast).await);
    eventually("both clients are registered", Duration::from_secs(5), async || {
        api.stream_clients().len() == 2
    })
    .await
    .unwrap();

    // Big updates (2 KB asset names) in rounds, far more than socket buffers hold; the fast
    // client keeps up with every round while the slow one's queue stays bounded.
    let asset = |i: usize| format!("{i:02}-{}", "x".repeat(2000));
    let mut max_pending = 0;
    for round in 0..150 {
        for i in 0..ASSETS {
            node.node.set_price(price("solana", &asset(i), &format!("{round}.{i}")));
        }
        let last = format!("{round}.{}", ASSETS - 1);
        let started = Instant::now();
        until(&mut fast, |e| e["type"] == "price" && e["data"]["price"] == last.as_str()).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "round {round}: {:?}",
            started.elapsed()
        );
        for stats in api.stream_clients() {
            max_pending = max_pending.max(stats.pending);
            assert!(stats.pending <= ASSETS + 3, "{stats:?}");
        }
    }
    // The slow client is closed (write timeout) and the fast one stays.
    eventually("the slow client is closed", Duration::from_secs(10), async || {
        api.stream_clients().len() == 1
    })
    .await
    .unwrap();
    let metrics = reqwest::get(format!("http://{}/metrics", api.local_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let closed = metrics
        .lines()
        .find(|l| {
            l.starts_with("mesh_api_stream_clients_closed_total{") && l.contains("reason=\"slow\"")
        })
        .unwrap_or_else(|| panic!("no slow close counted:\n{metrics}"));
    assert!(closed.ends_with(" 1"), "{closed}");
    node.node.set_price(price("solana", "AFTER", "1"));
    until(&mut fast, |e| e["type"] == "price" && e["data"]["asset"] == "AFTER").await;
    drop(slow);
    println!("slow client: at most {max_pending} updates were waiting for it");
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_server_pings_and_closes_clients_that_never_answer() {
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api =
        start_api(node.path(), |c| c.ws_ping_interval = Duration::from_millis(200)).await.unwrap();
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    // A reading client answers pings (tungstenite replies while reading) and stays.
    let mut alive = ws(api.local_addr(), "").await;
    let silent = ws(api.local_addr(), "").await;
    let mut pings = 0;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        if let Ok(Some(Ok(Message::Ping(_)))) =
            tokio::time::timeout(Duration::from_millis(100), alive.next()).await
        {
            pings += 1;
        }
    }
    assert!(pings >= 3, "{pings} pings in 1.5 s at a 200 ms interval");
    eventually("the silent client is closed", Duration::from_secs(5), async || {
        api.stream_clients().len() == 1
    })
    .await
    .unwrap();
    node.node.set_price(price("solana", "SOL", "153"));
    let event = until(&mut alive, |e| e["type"] == "price").await;
    assert_eq!(event["data"]["price"], "153");
    drop(silent);
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn stream_clients_hear_when_the_node_goes_away_and_get_a_new_snapshot_when_it_is_back() {
    let mut node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    let mut socket = ws(api.local_addr(), "").await;
    snapshot_assets(&next_event(&mut socket).await);
    node.stop().await.unwrap();
    let away = until(&mut socket, |e| e["type"] == "node").await;
    assert_eq!(away["data"]["connected"], false);
    assert!(away["data"]["error"].as_str().unwrap().starts_with("node unavailable: "), "{away}");
    // A client that connects now starts with the same news.
    let mut late = ws(api.local_addr(), "").await;
    assert_eq!(next_event(&mut late).await["type"], "node");
    node.node.set_price(price("solana", "NEW", "1"));
    node.restart().await.unwrap();
    let back = until(&mut socket, |e| e["type"] == "snapshot").await;
    assert_eq!(snapshot_assets(&back), ["BONK", "NEW", "SOL", "WETH"]);
    assert_eq!(snapshot_assets(&until(&mut late, |e| e["type"] == "snapshot").await).len(), 4);
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn shutdown_closes_the_streams_and_ends_in_time() {
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    let mut socket = ws(api.local_addr(), "").await;
    next_event(&mut socket).await;
    let sse = reqwest::get(format!("http://{}/api/mesh/stream", api.local_addr())).await.unwrap();
    let started = Instant::now();
    assert!(api.shutdown(Duration::from_secs(5)).await, "everything stopped within the grace");
    assert!(started.elapsed() < Duration::from_secs(3));
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(closed.unwrap().reason.as_str(), "server shutting down");
    let body = tokio::time::timeout(Duration::from_secs(5), sse.text()).await.unwrap().unwrap();
    assert!(body.contains("event: close"), "{body}");
}
