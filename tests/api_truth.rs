//! Every price and status the API serves is true when it is served (issue 33): flags that
//! depend on the clock are computed when served on every surface (REST, WebSocket, SSE), a
//! restart does not pretend, the source's own update time counts, one canonical form per EVM
//! address, and provider status says what the provider is doing now. Real nodes (mesh-testkit's
//! LocalMesh, in process) behind a real mesh-api, with the Birdeye simulator; the page in
//! headless Chromium (scripts/test installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use birdeye_sim::Simulator;
use futures::StreamExt;
use mesh_testkit::local::{DEMO_API_KEY, LocalMesh};
use mesh_tests::api::start_api;
use mesh_tests::eventually;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// The answer to a GET, or `None` while the API cannot answer (following a restarted node).
async fn try_get(url: &str) -> Option<Value> {
    let response = reqwest::get(url).await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

async fn get(url: &str) -> Value {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

/// The latest view of every price as one stream client has been told.
type Views = Arc<Mutex<BTreeMap<(String, String), Value>>>;

fn absorb(views: &Views, event: &Value) {
    let mut views = views.lock().unwrap();
    let key = |p: &Value| {
        (p["blockchain"].as_str().unwrap().to_owned(), p["asset"].as_str().unwrap().to_owned())
    };
    match event["type"].as_str() {
        Some("snapshot") => {
            views.clear();
            for p in event["data"]["prices"].as_array().unwrap() {
                views.insert(key(p), p.clone());
            }
        }
        Some("price") => {
            views.insert(key(&event["data"]), event["data"].clone());
        }
        _ => {}
    }
}

/// Follows the WebSocket stream in the background.
async fn follow_ws(addr: std::net::SocketAddr) -> Views {
    let views = Views::default();
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/api/mesh/ws")).await.unwrap();
    let v = views.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(text) = message {
                absorb(&v, &serde_json::from_str(text.as_str()).unwrap());
            }
        }
    });
    views
}

/// Follows the Server-Sent Events stream in the background.
async fn follow_sse(addr: std::net::SocketAddr) -> Views {
    let views = Views::default();
    let mut response = reqwest::get(format!("http://{addr}/api/mesh/stream")).await.unwrap();
    assert_eq!(response.status(), 200);
    let v = views.clone();
    tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            buffer.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let data: String = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                if !data.is_empty() {
                    absorb(&v, &serde_json::from_str(&data).unwrap());
                }
            }
        }
    });
    views
}

/// The facts every served price must keep among themselves, whenever it is served.
fn consistent(p: &Value, staleness_secs: u64) {
    let reporting = p["providers_reporting"].as_u64().unwrap();
    let agreeing = p["providers_agreeing"].as_u64().unwrap();
    assert!(agreeing <= reporting, "{p}");
    assert!(
        !(p["discrepancy"] == true && reporting < 2),
        "a discrepancy needs two fresh quotes: {p}"
    );
    // Ages are whole seconds and the API ages what the node last pushed: one second of slack.
    let age = p["age_secs"].as_u64().unwrap();
    assert!(!(age > staleness_secs + 1 && p["stale"] == false), "stale at {age} s: {p}");
}

/// A Birdeye that quotes everything 10 % higher than the mesh's own simulator (same seed): a
/// discrepancy at the default 5 % threshold.
async fn birdeye_ten_percent_higher() -> birdeye_sim::SimulatorHandle {
    Simulator::builder()
        .keys([DEMO_API_KEY])
        .seed(7)
        .offset_percent(10.0)
        .spawn("127.0.0.1:0")
        .await
        .unwrap()
}

fn settled(p: &Value) -> bool {
    p["stale"] == true && p["discrepancy"] == false && p["providers_reporting"] == 0
}

/// Providers go silent: right after the staleness threshold REST, the WebSocket (what the page
/// shows) and SSE all say stale, and the discrepancy between the two providers clears when
/// their quotes expire, with no new message. Before issue 33 the API kept the flags of the
/// last price event: `stale: false` at any age, and `discrepancy: true` with nobody reporting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_surface_says_stale_right_after_the_threshold_and_a_discrepancy_clears() {
    // The second provider's Birdeye quotes everything 10 % higher: a discrepancy (threshold 5 %).
    let skewed = birdeye_ten_percent_higher().await;
    let skewed_url = skewed.base_url();
    // Below the 300 s that MESH_STALENESS_THRESHOLD_SECS allows: set in the parsed config.
    let staleness_secs = 6;
    let mut mesh = LocalMesh::builder()
        .providers(2)
        .consumers(1)
        .rounds(2, 1)
        .per_node(move |i, o| {
            if i == 1 {
                o.insert("MESH_BIRDEYE_BASE_URL".into(), skewed_url.clone());
            }
        })
        .configure(move |_, c| c.staleness_threshold = Duration::from_secs(staleness_secs))
        .start()
        .await
        .unwrap();
    let consumer = 2;
    let socket = mesh.running(consumer).unwrap().socket().to_path_buf();
    let api = start_api(&socket, |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    let ws = follow_ws(api.local_addr()).await;
    let sse = follow_sse(api.local_addr()).await;
    let mut page = mesh_tests::cdp::Browser::launch().await.unwrap();
    page.navigate(&format!("{base}/")).await.unwrap();

    eventually("the two providers disagree", Duration::from_secs(60), async || {
        let body = get(&format!("{base}/api/mesh/prices")).await;
        let prices = body["data"].as_array().unwrap();
        prices.iter().for_each(|p| consistent(p, staleness_secs));
        prices.iter().any(|p| p["discrepancy"] == true && p["providers_reporting"] == 2)
    })
    .await
    .unwrap();

    mesh.stop(0).await.unwrap();
    mesh.stop(1).await.unwrap();
    eventually(
        "REST: stale, nobody reporting, no discrepancy",
        Duration::from_secs(30),
        async || {
            let body = get(&format!("{base}/api/mesh/prices")).await;
            let prices = body["data"].as_array().unwrap();
            prices.iter().for_each(|p| consistent(p, staleness_secs));
            !prices.is_empty() && prices.iter().all(settled)
        },
    )
    .await
    .unwrap();
    for (name, views) in [("WebSocket", &ws), ("SSE", &sse)] {
        eventually(&format!("{name}: stale, no discrepancy"), Duration::from_secs(5), async || {
            let views = views.lock().unwrap();
            views.values().for_each(|p| consistent(p, staleness_secs));
            !views.is_empty() && views.values().all(settled)
        })
        .await
        .unwrap();
    }
    // The page (its rows carry the flags it was sent).
    page.wait_for(
        "the page: every row stale, none in discrepancy",
        "(() => { const rows = [...document.querySelectorAll('#prices tbody tr[data-asset]')]; \
          return rows.length > 0 && rows.every(r => r.dataset.stale === 'true' \
          && r.dataset.discrepancy === 'false'); })()",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    page.close().await.unwrap();
    // The single-asset answer and the network status agree.
    let first = get(&format!("{base}/api/mesh/prices")).await["data"][0].clone();
    let one = get(&format!("{base}/api/mesh/prices/{}", first["asset"].as_str().unwrap())).await;
    assert!(settled(&one["data"][0]), "{one}");
    // The node publishes its status once a second.
    eventually("the network status says stale", Duration::from_secs(5), async || {
        get(&format!("{base}/api/mesh/network/status")).await["data"]["data_freshness"] == "Stale"
    })
    .await
    .unwrap();

    drop(api);
    mesh.shutdown().await.unwrap();
}

/// A restart does not pretend: reloaded prices keep their times, their hop count is unknown
/// (`null`) until a message about them arrives, and `last_update_time` names a real receipt
/// (none since the start, until the provider's next batch). Before issue 33 reloaded rows went
/// through the path of received prices: hop 0 ("our own") and `last_update_time` = start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_serves_reloaded_prices_with_their_times_and_unknown_hops() {
    let mut mesh =
        LocalMesh::builder().providers(1).consumers(1).rounds(2, 1).start().await.unwrap();
    let consumer = 1;
    eventually("prices reach the consumer", Duration::from_secs(30), async || {
        mesh.running(consumer).unwrap().prices().len() >= 3
    })
    .await
    .unwrap();
    mesh.stop(0).await.unwrap();
    let before: BTreeMap<String, i64> = mesh
        .running(consumer)
        .unwrap()
        .prices()
        .into_iter()
        .map(|p| {
            assert_eq!(p.hop_count, Some(1));
            (p.asset, p.source_timestamp_ms.unwrap_or(p.timestamp_ms))
        })
        .collect();
    mesh.stop(consumer).await.unwrap();
    mesh.restart(consumer).await.unwrap();

    let node = mesh.running(consumer).unwrap();
    let after: BTreeMap<String, i64> = node
        .prices()
        .into_iter()
        .map(|p| {
            assert_eq!(p.hop_count, None, "{p:?}");
            (p.asset, p.source_timestamp_ms.unwrap_or(p.timestamp_ms))
        })
        .collect();
    // The store keeps when each price was true (the source's time): the same, or newer when a
    // batch arrived while the prices above were read.
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>());
    assert!(before.iter().all(|(asset, ts)| after[asset] >= *ts), "{before:?} {after:?}");
    assert_eq!(node.network_status().last_update_time, None);
    let api = start_api(node.socket(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    let body = get(&format!("{base}/api/mesh/prices")).await;
    let prices = body["data"].as_array().unwrap();
    assert!(!prices.is_empty());
    assert!(prices.iter().all(|p| p["hop_count"].is_null()), "{body}");
    let network = get(&format!("{base}/api/mesh/network/status")).await;
    assert!(network["data"]["last_update_time"].is_null(), "{network}");

    // The provider's next batch tells the hop count and is a receipt. (The consumer is started
    // again once the provider is up: its bootstrap dial to it failed while it was down.)
    mesh.restart(0).await.unwrap();
    mesh.stop(consumer).await.unwrap();
    mesh.restart(consumer).await.unwrap();
    eventually("a message brings the hop count back", Duration::from_secs(30), async || {
        let (Some(prices), Some(network)) = (
            try_get(&format!("{base}/api/mesh/prices")).await,
            try_get(&format!("{base}/api/mesh/network/status")).await,
        ) else {
            return false;
        };
        prices["data"].as_array().is_some_and(|p| p.iter().all(|p| p["hop_count"] == 1))
            && network["data"]["last_update_time"].is_string()
    })
    .await
    .unwrap();
    drop(api);
    mesh.shutdown().await.unwrap();
}

/// Birdeye's own update time counts: a token whose `updateUnixTime` is two hours old is
/// served stale with its real age, after travelling the mesh in a version 2 batch, while the
/// other tokens of the same batch are fresh. Before issue 33 the provider stamped every price
/// with the time the answer arrived, and the token was served as fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_birdeye_stopped_updating_is_served_stale_with_its_real_age() {
    const SOL: &str = "So11111111111111111111111111111111111111112";
    let two_hours = Duration::from_secs(7200);
    let sim = Simulator::builder()
        .keys([DEMO_API_KEY])
        .seed(7)
        .update_lag(SOL, two_hours)
        .spawn("127.0.0.1:0")
        .await
        .unwrap();
    let url = sim.base_url();
    let mesh = LocalMesh::builder()
        .providers(1)
        .consumers(1)
        .rounds(2, 1)
        .per_node(move |_, o| {
            o.insert("MESH_BIRDEYE_BASE_URL".into(), url.clone());
        })
        .start()
        .await
        .unwrap();
    let api = start_api(mesh.running(1).unwrap().socket(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    eventually("prices reach the consumer's API", Duration::from_secs(30), async || {
        try_get(&format!("{base}/api/mesh/prices"))
            .await
            .and_then(|b| b["data"].as_array().map(|p| p.len() >= 3))
            .unwrap_or(false)
    })
    .await
    .unwrap();
    let body = get(&format!("{base}/api/mesh/prices")).await;
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as i64;
    for p in body["data"].as_array().unwrap() {
        assert_eq!(p["hop_count"], 1, "{p}");
        let source = p["source_timestamp_ms"].as_i64().expect("a source time");
        assert!(p["source_timestamp"].is_string(), "{p}");
        let age = p["age_secs"].as_u64().unwrap();
        if p["asset"] == SOL {
            let lag = (now_ms - source) / 1000;
            assert!((7195..7215).contains(&lag), "source time {lag} s ago: {p}");
            assert!((7195..7215).contains(&age), "{p}");
            assert_eq!(p["stale"], true, "{p}");
            assert!(p["timestamp_ms"].as_i64().unwrap() - source >= 7_195_000, "fetched now: {p}");
        } else {
            assert!(age < 60, "{p}");
            assert_eq!(p["stale"], false, "{p}");
        }
    }
    let one = get(&format!("{base}/api/mesh/prices/{SOL}")).await;
    assert_eq!(one["data"][0]["stale"], true, "{one}");

    // EVM address case (item 6): WETH is configured checksummed (the default assets), served
    // in lower case, and found by either writing; base58 keeps its case.
    const WETH: &str = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2";
    let lower = WETH.to_ascii_lowercase();
    assert!(body["data"].as_array().unwrap().iter().any(|p| p["asset"] == lower.as_str()));
    assert!(body["data"].as_array().unwrap().iter().all(|p| p["asset"] != WETH));
    for query in [WETH, lower.as_str()] {
        let one = get(&format!("{base}/api/mesh/prices/{query}")).await;
        assert_eq!(one["data"][0]["asset"], lower.as_str(), "{one}");
        let filtered = get(&format!("{base}/api/mesh/prices?asset={query}")).await;
        assert_eq!(filtered["data"].as_array().unwrap().len(), 1, "{filtered}");
    }
    let response =
        reqwest::get(format!("{base}/api/mesh/prices/{}", SOL.to_ascii_lowercase())).await.unwrap();
    assert_eq!(response.status(), 404, "base58 addresses are case-sensitive");

    drop(api);
    mesh.shutdown().await.unwrap();
}

async fn post_enable(base: &str, key: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}/api/mesh/provider/enable"))
        .json(&serde_json::json!({ "api_key": key }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Provider status says what the provider is doing now: a key refused while provider mode
/// runs leaves it running, and the status says enabled with no reason; after a restart with
/// a key Birdeye has revoked since, the status never says enabled (the stored key is checked
/// before the loop starts). Before issue 33: `enabled: true` with `reason: "Invalid API key"`,
/// and `enabled: true` after the restart until the first round failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_status_says_what_the_provider_is_doing_now() {
    let revoking = Simulator::builder()
        .keys(["the-key-that-replaced-it"])
        .seed(7)
        .spawn("127.0.0.1:0")
        .await
        .unwrap();
    // Node 0 talks to the mesh's simulator until it is pointed at the one that revoked the key.
    let birdeye: Arc<Mutex<Option<String>>> = Arc::default();
    let chosen = birdeye.clone();
    let mut mesh = LocalMesh::builder()
        .providers(1)
        .consumers(0)
        .rounds(2, 1)
        .configure(move |_, c| {
            if let Some(url) = chosen.lock().unwrap().clone() {
                c.provider.base_url = url;
            }
        })
        .start()
        .await
        .unwrap();
    let api = start_api(mesh.running(0).unwrap().socket(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    eventually("the provider runs", Duration::from_secs(20), async || {
        try_get(&format!("{base}/api/mesh/provider/status"))
            .await
            .is_some_and(|b| b["data"]["enabled"] == true && b["data"]["rounds_fetched"] != 0)
    })
    .await
    .unwrap();

    let (status, body) = post_enable(&base, "not-a-birdeye-key").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("Invalid API key")), "{body}");
    for status in [
        get(&format!("{base}/api/mesh/provider/status")).await["data"].clone(),
        serde_json::to_value(mesh.running(0).unwrap().shared().provider_status()).unwrap(),
    ] {
        assert_eq!(status["enabled"], true, "{status}");
        assert!(status["reason"].is_null(), "running with its own key: {status}");
        assert_eq!(status["last_error"], "Invalid API key", "{status}");
    }

    // Birdeye revokes the key while the node is down.
    mesh.stop(0).await.unwrap();
    *birdeye.lock().unwrap() = Some(revoking.base_url());
    mesh.restart(0).await.unwrap();
    let status = mesh.running(0).unwrap().shared().provider_status();
    assert!(!status.enabled, "{status:?}");
    assert_eq!(status.reason.as_deref(), Some("Invalid API key"), "{status:?}");
    eventually("the API shows it", Duration::from_secs(10), async || {
        try_get(&format!("{base}/api/mesh/provider/status")).await.is_some_and(|b| {
            b["data"]["enabled"] == false && b["data"]["reason"] == "Invalid API key"
        })
    })
    .await
    .unwrap();

    drop(api);
    mesh.shutdown().await.unwrap();
}

/// The answer to an enable (read-your-writes) never overwrites a newer provider event: the
/// snapshot keeps the view with the higher revision.
#[tokio::test]
async fn an_enable_answer_never_overwrites_a_newer_provider_event() {
    use mesh_tests::api::{FakeNode, NodeSocket, price, provider};
    let node = NodeSocket::start(FakeNode::new(vec![price("solana", "SOL", "1")])).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    eventually("the API follows the node", Duration::from_secs(10), async || api.node_connected())
        .await
        .unwrap();
    // The node says the provider stopped (revision 7); the enable answer it then gives was
    // made earlier (revision 0, enabled).
    let mut stopped = provider(false);
    stopped.reason = Some("Invalid API key".into());
    stopped.revision = 7;
    node.node.emit(mesh_ipc::Event::Provider(stopped));
    eventually("the event arrives", Duration::from_secs(10), async || {
        get(&format!("{base}/api/mesh/provider/status")).await["data"]["revision"] == 7
    })
    .await
    .unwrap();
    let (status, body) = post_enable(&base, "some-key").await;
    assert_eq!((status, body["data"]["revision"].as_u64()), (200, Some(0)), "{body}");
    let shown = get(&format!("{base}/api/mesh/provider/status")).await;
    assert_eq!(shown["data"]["revision"], 7, "{shown}");
    assert_eq!(shown["data"]["enabled"], false, "{shown}");
}

/// A stored key Birdeye refuses in a round (a 401) is set aside, not deleted and not used
/// again: `provider.key` moves to `provider.key.rejected`, the API says why provider mode is
/// off, and after a restart provider mode stays off with the key still there for the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_key_birdeye_refuses_is_set_aside_not_lost() {
    let mut mesh =
        LocalMesh::builder().providers(0).consumers(1).rounds(2, 1).start().await.unwrap();
    let api = start_api(mesh.running(0).unwrap().socket(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    let (status, body) = post_enable(&base, DEMO_API_KEY).await;
    assert_eq!(status, 200, "{body}");
    let data_dir = std::path::PathBuf::from(&mesh.overrides(0)["MESH_DATA_DIR"]);
    let (stored, aside) = (data_dir.join("provider.key"), data_dir.join("provider.key.rejected"));
    assert!(stored.exists());

    mesh.simulators()[0].set_failing_key(DEMO_API_KEY, Some(birdeye_sim::Failure::status(401)));
    eventually("the API says provider mode stopped", Duration::from_secs(20), async || {
        try_get(&format!("{base}/api/mesh/provider/status")).await.is_some_and(|b| {
            b["data"]["enabled"] == false && b["data"]["reason"] == "Invalid API key"
        })
    })
    .await
    .unwrap();
    eventually("the key is set aside", Duration::from_secs(10), async || !stored.exists())
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&aside).unwrap(), DEMO_API_KEY);
    eventually("the API says where the key went", Duration::from_secs(10), async || {
        try_get(&format!("{base}/api/mesh/provider/status")).await.is_some_and(|b| {
            b["data"]["rejected_key_file"].as_str() == Some(aside.to_str().unwrap_or_default())
        })
    })
    .await
    .unwrap();

    // Birdeye would take it again: it is not tried by itself after a restart.
    mesh.simulators()[0].set_failing_key(DEMO_API_KEY, None);
    mesh.stop(0).await.unwrap();
    mesh.restart(0).await.unwrap();
    assert!(!mesh.running(0).unwrap().shared().provider_status().enabled);
    assert!(aside.exists() && !stored.exists());
    drop(api);
    mesh.shutdown().await.unwrap();
}

/// `GET /api/mesh/prices/{asset}/quotes` (issue 26, item 2): every provider's latest quote, with
/// its node id, timestamp and hop count, which one is served, and whether each agrees with it.
/// Two providers, the second's Birdeye 10 % higher (threshold 5 %): on a consumer, each asset
/// has one quote of each, exactly one served, the other disagreeing; an unknown asset is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotes_show_every_provider_and_which_agree() {
    let skewed = birdeye_ten_percent_higher().await;
    let skewed_url = skewed.base_url();
    let mesh = LocalMesh::builder()
        .providers(2)
        .consumers(1)
        .rounds(2, 1)
        .per_node(move |i, o| {
            if i == 1 {
                o.insert("MESH_BIRDEYE_BASE_URL".into(), skewed_url.clone());
            }
        })
        .start()
        .await
        .unwrap();
    let providers: Vec<String> = (0..2)
        .map(|i| mesh.running(i).unwrap().shared().network_status().node_id.to_string())
        .collect();
    let api = start_api(mesh.running(2).unwrap().socket(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    let asset = mesh.running(0).unwrap().prices()[0].asset.clone();
    let url = format!("{base}/api/mesh/prices/{asset}/quotes");
    // Providers take turns: wait for an answer in which both quotes are fresh.
    let seen: Arc<Mutex<Option<Value>>> = Arc::default();
    eventually(
        "both providers' fresh quotes at the consumer",
        Duration::from_secs(60),
        async || {
            let Some(body) = try_get(&url).await else { return false };
            let both = body["data"]
                .as_array()
                .is_some_and(|q| q.len() == 2 && q.iter().all(|q| q["fresh"] == true));
            if both {
                *seen.lock().unwrap() = Some(body);
            }
            both
        },
    )
    .await
    .unwrap();
    let body = seen.lock().unwrap().clone().unwrap();
    let quotes = body["data"].as_array().unwrap();
    let mut sources: Vec<String> =
        quotes.iter().map(|q| q["source_node_id"].as_str().unwrap().to_owned()).collect();
    sources.sort();
    let mut expected = providers.clone();
    expected.sort();
    assert_eq!(sources, expected, "{body}");
    assert_eq!(quotes.iter().filter(|q| q["served"] == true).count(), 1, "{body}");
    assert_eq!(quotes[0]["served"], true, "the served quote comes first: {body}");
    assert_eq!(quotes[0]["agrees"], true, "{body}");
    assert_eq!(quotes[1]["agrees"], false, "10 % apart with a 5 % threshold: {body}");
    for q in quotes {
        assert_eq!(q["asset"], asset.as_str());
        assert!(q["hop_count"].as_u64().is_some_and(|h| h >= 1), "{q}");
        assert!(q["timestamp_ms"].as_i64().is_some_and(|t| t > 0), "{q}");
    }
    let response =
        reqwest::get(format!("{base}/api/mesh/prices/NoSuchAsset/quotes")).await.unwrap();
    assert_eq!(response.status(), 404);
    drop(api);
    mesh.shutdown().await.unwrap();
}

/// A node run with `--provider` and `BIRDEYE_API_KEY` whose key Birdeye refuses in a round
/// stops provider mode, and leaves alone a key stored earlier through the API: only the key
/// that was refused is ever set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_environment_key_leaves_the_stored_key_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node0");
    std::fs::create_dir_all(&data).unwrap();
    let stored = data.join("provider.key");
    std::fs::write(&stored, "a-key-given-through-the-api").unwrap();
    let mesh = LocalMesh::builder()
        .providers(1)
        .consumers(0)
        .rounds(2, 1)
        .dir(dir.path())
        .start()
        .await
        .unwrap();
    let node = mesh.running(0).unwrap();
    assert!(node.shared().provider_status().enabled, "running with BIRDEYE_API_KEY");
    let mut events = mesh_ipc::Client::new(node.socket()).subscribe().await.unwrap();
    mesh.simulators()[0].set_failing_key(DEMO_API_KEY, Some(birdeye_sim::Failure::status(401)));
    // The provider event comes after the decision about the key file.
    let stopped = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(event)) = events.next().await {
            if let mesh_ipc::Event::Provider(view) = event
                && !view.enabled
                && view.reason.is_some()
            {
                return Some(view);
            }
        }
        None
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(stopped.reason.as_deref(), Some("Invalid API key"));
    assert_eq!(stopped.rejected_key_file, None, "{stopped:?}");
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), "a-key-given-through-the-api");
    assert!(!data.join("provider.key.rejected").exists());
    mesh.shutdown().await.unwrap();
}
