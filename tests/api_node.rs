//! mesh-api in front of real nodes (`mesh-service` through `mesh-testkit`'s LocalMesh, with a
//! Birdeye simulator): prices from provider rounds reach the REST endpoints and a WebSocket
//! client, provider mode is enabled through the API (a key Birdeye refuses gives 401), and the
//! API rides out a node restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use mesh_testkit::local::{DEMO_API_KEY, LocalMesh};
use mesh_tests::api::start_api;
use mesh_tests::eventually;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn enable(base: &str, key: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}/api/mesh/provider/enable"))
        .json(&json!({ "api_key": key }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_a_real_node_and_follows_it_through_a_restart() {
    let mut mesh =
        LocalMesh::builder().providers(1).consumers(1).rounds(2, 1).start().await.unwrap();
    let consumer = 1;
    let socket = mesh.running(consumer).unwrap().socket().to_path_buf();
    let node_id = mesh.running(consumer).unwrap().node_id().to_string();
    let provider_id = mesh.running(0).unwrap().node_id().to_string();
    let api = start_api(&socket, |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());

    // Prices of the provider's rounds reach the consumer and its API.
    eventually("prices reach the API", Duration::from_secs(30), async || {
        let (status, body) = get(&format!("{base}/api/mesh/prices")).await;
        status == 200 && body["data"].as_array().is_some_and(|p| !p.is_empty())
    })
    .await
    .unwrap();
    let (_, body) = get(&format!("{base}/api/mesh/prices")).await;
    let first = &body["data"][0];
    assert_eq!(first["source_node_id"], provider_id.as_str());
    assert_eq!(first["hop_count"], 1);
    let asset = first["asset"].as_str().unwrap().to_owned();
    let (status, one) = get(&format!("{base}/api/mesh/prices/{asset}")).await;
    assert_eq!((status, one["data"][0]["asset"].clone()), (200, json!(asset)));

    // The node publishes its network status within a second of a change.
    eventually("the provider shows in the network status", Duration::from_secs(10), async || {
        let (_, body) = get(&format!("{base}/api/mesh/network/status")).await;
        body["data"]["active_providers"].as_array().is_some_and(|p| {
            p.iter().any(|p| p["node_id"] == provider_id.as_str() && p["hop_count"] == 1)
        }) && body["data"]["data_freshness"] == "Fresh"
    })
    .await
    .unwrap();
    let (status, body) = get(&format!("{base}/api/mesh/network/status")).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["node_id"], node_id.as_str());
    assert!(body["data"]["connected_peers"].as_u64().unwrap() >= 1, "{body}");
    assert!(body["data"]["last_update_time"].is_string(), "{body}");
    let (status, body) = get(&format!("{base}/api/mesh/provider/status")).await;
    assert_eq!((status, body["data"]["enabled"].clone()), (200, json!(false)));
    assert_eq!(body["data"]["node_id"], node_id.as_str());

    // A WebSocket client gets each price within a second of the node publishing it: compare
    // with a direct subscription to the node's socket.
    let mut direct = mesh_ipc::Client::new(&socket).subscribe().await.unwrap();
    assert!(matches!(direct.next().await.unwrap(), Some(mesh_ipc::Event::Snapshot(_))));
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/mesh/ws", api.local_addr()))
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let published = loop {
        assert!(Instant::now() < deadline, "no price event from the node within 20 s");
        let next = tokio::time::timeout(Duration::from_secs(10), direct.next()).await.unwrap();
        if let Some(mesh_ipc::Event::Price(p)) = next.unwrap() {
            break (p, Instant::now());
        }
    };
    let (price, at) = published;
    let delay = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap();
        if let Some(Ok(Message::Text(text))) = frame {
            let event: Value = serde_json::from_str(text.as_str()).unwrap();
            if event["type"] == "price"
                && event["data"]["asset"] == price.asset.as_str()
                && event["data"]["timestamp_ms"] == price.timestamp_ms
            {
                break at.elapsed();
            }
        }
    };
    assert!(delay < Duration::from_secs(1), "the WebSocket client got the price {delay:?} later");

    // Provider mode through the API: Birdeye (the simulator) refuses a wrong key.
    let (status, body) = enable(&base, "not-a-birdeye-key").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "Invalid API key");
    let (status, body) = enable(&base, DEMO_API_KEY).await;
    assert_eq!((status, body["data"]["enabled"].clone()), (200, json!(true)), "{body}");
    let (_, body) = get(&format!("{base}/api/mesh/provider/status")).await;
    assert_eq!(body["data"]["enabled"], true);

    // The node's metrics come with the API's.
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("mesh_api_node_connected 1"), "{metrics}");

    // The node restarts: 503 meanwhile, then the API follows the new node.
    mesh.stop(consumer).await.unwrap();
    eventually("the API answers 503", Duration::from_secs(10), async || {
        get(&format!("{base}/api/mesh/prices")).await.0 == 503
    })
    .await
    .unwrap();
    mesh.restart(consumer).await.unwrap();
    eventually("the API follows the restarted node", Duration::from_secs(30), async || {
        let (status, body) = get(&format!("{base}/api/mesh/prices")).await;
        status == 200 && body["data"].as_array().is_some_and(|p| !p.is_empty())
    })
    .await
    .unwrap();
    assert_eq!(get(&format!("{base}/readyz")).await.0, 200);
    api.shutdown(Duration::from_secs(5)).await;
    mesh.shutdown().await.unwrap();
}
