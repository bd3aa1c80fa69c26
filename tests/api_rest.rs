//! mesh-api's REST endpoints over real HTTP against a node stand-in behind a real mesh-ipc
//! socket: the guide's shapes and commands, error paths, the bearer token, the node going away
//! and coming back, metrics and the health-check scripts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use mesh_tests::api::{BAD_KEY, FakeNode, NODE_ID, NodeSocket, network, price, start_api};
use mesh_tests::eventually;
use serde_json::{Value, json};

fn prices() -> Vec<mesh_ipc::PriceView> {
    vec![
        price("solana", "So11111111111111111111111111111111111111112", "150.5"),
        price("solana", "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263", "0.000016"),
        price("solana", "USDC", "1.0001"),
        price("ethereum", "USDC", "0.9998"),
    ]
}

const SOL: &str = "So11111111111111111111111111111111111111112";

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn post(url: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn wait_ready(base: &str) {
    eventually("the API is ready", Duration::from_secs(10), async || {
        reqwest::get(format!("{base}/readyz")).await.is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap();
}

fn assets(data: &Value) -> Vec<(String, String)> {
    data.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (p["blockchain"].as_str().unwrap().to_owned(), p["asset"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn rest_endpoints_answer_with_the_guides_shapes_and_errors() {
    let node = NodeSocket::start(FakeNode::new(prices())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    wait_ready(&base).await;

    // Prices: all, by chain, by asset, both.
    let (status, body) = get(&format!("{base}/api/mesh/prices")).await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    assert_eq!(assets(&body["data"]).len(), 4);
    let sol = body["data"].as_array().unwrap().iter().find(|p| p["asset"] == SOL).unwrap();
    assert_eq!(sol["price"], "150.5", "prices are exact decimal strings");
    assert_eq!(sol["change_24h"], "-1.25");
    assert_eq!(sol["hop_count"], 1);
    assert!(sol["age_secs"].is_u64());
    let (_, body) = get(&format!("{base}/api/mesh/prices?blockchain=ethereum")).await;
    assert_eq!(assets(&body["data"]), [("ethereum".into(), "USDC".into())]);
    let (_, body) = get(&format!("{base}/api/mesh/prices?asset=USDC")).await;
    assert_eq!(assets(&body["data"]).len(), 2);
    let (_, body) = get(&format!("{base}/api/mesh/prices?blockchain=solana&asset=USDC")).await;
    assert_eq!(body["data"][0]["price"], "1.0001");
    let (status, body) = get(&format!("{base}/api/mesh/prices?blockchain=bitcoin")).await;
    assert_eq!((status, body["data"].clone()), (200, json!([])));

    // One asset: every chain that has it, or the one asked for; 404 when unknown.
    let (status, body) = get(&format!("{base}/api/mesh/prices/{SOL}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"][0]["price"], "150.5");
    let (_, body) = get(&format!("{base}/api/mesh/prices/USDC")).await;
    assert_eq!(
        assets(&body["data"]),
        [("ethereum".into(), "USDC".into()), ("solana".into(), "USDC".into())]
    );
    let (_, body) = get(&format!("{base}/api/mesh/prices/USDC?blockchain=ethereum")).await;
    assert_eq!(body["data"][0]["price"], "0.9998");
    let (status, body) = get(&format!("{base}/api/mesh/prices/NOPE")).await;
    assert_eq!(status, 404);
    assert_eq!(body, json!({ "success": false, "error": "unknown asset NOPE" }));
    let (status, body) = get(&format!("{base}/api/mesh/prices/USDC?blockchain=bitcoin")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown asset USDC on bitcoin");

    // Network status: every field of the architecture, with the guide's types.
    let (status, body) = get(&format!("{base}/api/mesh/network/status")).await;
    assert_eq!(status, 200);
    let data = &body["data"];
    assert_eq!(data["node_id"], NODE_ID);
    assert_eq!(data["connected_peers"], 3);
    assert_eq!(data["data_freshness"], "Fresh");
    assert_eq!(data["last_update_time"], "2026-01-01T00:00:00Z");
    assert_eq!(data["degraded"], false);
    let provider = &data["active_providers"][0];
    let mut keys: Vec<_> = provider.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["hop_count", "last_seen", "node_id"]);
    assert_eq!(provider["hop_count"], 2);

    // Provider mode: the guide's status shape, enable, refusals, disable.
    let (status, body) = get(&format!("{base}/api/mesh/provider/status")).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["success"].clone(), body["data"]["enabled"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(body["data"]["node_id"], NODE_ID);
    let enable = format!("{base}/api/mesh/provider/enable");
    let (status, body) = post(&enable, None, r#"{"api_key": "  good-key "}"#).await;
    assert_eq!((status, body["data"]["enabled"].clone()), (200, json!(true)), "{body}");
    assert_eq!(node.node.keys.lock().unwrap().last().unwrap(), "good-key", "spaces are trimmed");
    let (_, body) = get(&format!("{base}/api/mesh/provider/status")).await;
    assert_eq!(body["data"]["enabled"], true, "the status shows the change at once");
    let (status, body) = post(&enable, None, &format!(r#"{{"api_key": "{BAD_KEY}"}}"#)).await;
    assert_eq!(status, 401);
    assert_eq!(body, json!({ "success": false, "error": "Invalid API key" }));
    for (bad_body, expected) in [
        (r#"{"api_key": "#, "invalid JSON body"),
        ("not json", "invalid JSON body"),
        ("", "invalid JSON body"),
        ("{}", "missing field `api_key`"),
        (r#"{"api_key": 5}"#, "invalid type"),
        (r#"{"api_key": "   "}"#, "api_key must not be empty"),
    ] {
        let (status, body) = post(&enable, None, bad_body).await;
        assert_eq!(status, 400, "{bad_body:?} -> {body}");
        assert_eq!(body["success"], false);
        assert!(body["error"].as_str().unwrap().contains(expected), "{bad_body:?} -> {body}");
    }
    let huge = format!(r#"{{"api_key": "{}"}}"#, "k".repeat(20_000));
    let (status, body) = post(&enable, None, &huge).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["success"], false);
    let (status, body) = post(&format!("{base}/api/mesh/provider/disable"), None, "").await;
    assert_eq!((status, body["data"]["enabled"].clone()), (200, json!(false)));

    // Health, readiness, page, description, unknown routes and methods.
    assert_eq!(
        get(&format!("{base}/healthz")).await,
        (200, json!({"success": true, "data": {"status": "ok"}}))
    );
    assert_eq!(
        get(&format!("{base}/readyz")).await,
        (200, json!({"success": true, "data": {"ready": true}}))
    );
    let page = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("id=\"prices\""), "the page has the price table");
    assert!(!html.contains("http://") && !html.contains("https://"), "no internet resources");
    let (status, spec) = get(&format!("{base}/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let (status, body) = get(&format!("{base}/api/nope")).await;
    assert_eq!((status, body["success"].clone()), (404, json!(false)));
    let response =
        reqwest::Client::new().delete(format!("{base}/api/mesh/prices")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.json::<Value>().await.unwrap()["success"], false);
    let (status, body) = get(&format!("{base}/api/mesh/ws")).await;
    assert_eq!(status, 400, "a plain GET of the WebSocket route is a client error: {body}");
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn post_endpoints_need_the_bearer_token_when_one_is_set() {
    let node = NodeSocket::start(FakeNode::new(prices())).await.unwrap();
    let api = start_api(node.path(), |c| c.api_token = Some("s3cret".into())).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    wait_ready(&base).await;
    let enable = format!("{base}/api/mesh/provider/enable");
    let disable = format!("{base}/api/mesh/provider/disable");
    let body = r#"{"api_key": "good-key"}"#;
    for token in [None, Some("wrong"), Some("s3cret-and-more"), Some("")] {
        let (status, answer) = post(&enable, token, body).await;
        assert_eq!(status, 401, "{token:?}");
        assert!(answer["error"].as_str().unwrap().contains("bearer token"), "{answer}");
        assert_eq!(post(&disable, token, "").await.0, 401);
    }
    let response = reqwest::Client::new().post(&enable).body(body).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert!(node.node.keys.lock().unwrap().is_empty(), "nothing reached the node");
    // The scheme is case-insensitive; the token is not.
    let response = reqwest::Client::new()
        .post(&enable)
        .header("authorization", "bearer s3cret")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(post(&enable, Some("S3CRET"), body).await.0, 401);
    assert_eq!(post(&disable, Some("s3cret"), "").await.0, 200);
    // Reads need no token.
    assert_eq!(get(&format!("{base}/api/mesh/provider/status")).await.0, 200);
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_api_answers_503_while_the_node_is_away_and_recovers_after_it_restarts() {
    let mut node = NodeSocket::start(FakeNode::new(prices())).await.unwrap();
    node.stop().await.unwrap();
    // Started while the node is down: not ready, 503 with the reason, alive all the same.
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    let (status, body) = get(&format!("{base}/api/mesh/prices")).await;
    assert_eq!(status, 503);
    assert_eq!(body["success"], false);
    assert!(body["error"].as_str().unwrap().starts_with("node unavailable: "), "{body}");
    assert_eq!(get(&format!("{base}/readyz")).await.0, 503);
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);

    node.restart().await.unwrap();
    wait_ready(&base).await;
    assert_eq!(get(&format!("{base}/api/mesh/prices")).await.0, 200);

    // The node goes away: every read and POST answers 503, readiness drops.
    node.stop().await.unwrap();
    eventually("reads answer 503", Duration::from_secs(5), async || {
        get(&format!("{base}/api/mesh/network/status")).await.0 == 503
    })
    .await
    .unwrap();
    for path in
        ["/api/mesh/prices", "/api/mesh/prices/USDC", "/api/mesh/provider/status", "/readyz"]
    {
        let (status, body) = get(&format!("{base}{path}")).await;
        assert_eq!(status, 503, "{path}");
        assert!(
            body["error"].as_str().unwrap().starts_with("node unavailable: "),
            "{path}: {body}"
        );
    }
    let (status, body) =
        post(&format!("{base}/api/mesh/provider/enable"), None, r#"{"api_key": "k"}"#).await;
    assert_eq!(status, 503, "{body}");
    assert!(!api.node_connected());

    // While it was away its book changed: after the restart the API resynchronises.
    node.node.set_price(price("solana", "NEW", "42"));
    node.restart().await.unwrap();
    wait_ready(&base).await;
    let (status, body) = get(&format!("{base}/api/mesh/prices/NEW")).await;
    assert_eq!((status, body["data"][0]["price"].clone()), (200, json!("42")));
    assert!(api.node_connected());
    api.shutdown(Duration::from_secs(5)).await;
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name)
}

/// Runs a shell command line with curl and jq, pointing the guide's scripts at `base` (async:
/// the API under test runs on this test's runtime).
async fn shell(base: &str, line: &str) -> (i32, String) {
    let output = tokio::process::Command::new("bash")
        .args(["-c", line])
        .env("MESH_API_URL", base)
        .env("API", base)
        .output()
        .await
        .expect("bash runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[tokio::test]
async fn the_guides_commands_and_health_check_scripts_work_verbatim() {
    for tool in ["curl", "jq"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .status
                .success(),
            "{tool} is needed (scripts/test installs it)"
        );
    }
    let mut node = NodeSocket::start(FakeNode::new(prices())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    wait_ready(&base).await;
    let provider = format!("bash {}", script("check_provider_health.sh").display());
    let network = format!("bash {}", script("check_network_health.sh").display());

    // The guide's jq commands (with its host replaced by the test server's).
    assert_eq!(
        shell(&base, r#"curl -s "$API/api/mesh/network/status" | jq '.data.connected_peers'"#)
            .await,
        (0, "3".into())
    );
    assert_eq!(
        shell(
            &base,
            r#"curl -s "$API/api/mesh/network/status" | jq '.data.active_providers[].hop_count'"#
        )
        .await,
        (0, "2".into())
    );
    assert_eq!(
        shell(
            &base,
            r#"curl -s "$API/api/mesh/network/status" | jq '.data.active_providers | length'"#
        )
        .await,
        (0, "1".into())
    );
    assert_eq!(
        shell(&base, r#"curl -s "$API/api/mesh/network/status" | jq '.data.data_freshness'"#).await,
        (0, "\"Fresh\"".into())
    );
    assert_eq!(
        shell(&base, r#"curl -s "$API/api/mesh/network/status" | jq '.data.last_update_time'"#)
            .await,
        (0, "\"2026-01-01T00:00:00Z\"".into())
    );
    assert_eq!(
        shell(&base, r#"curl -s "$API/api/mesh/prices" | jq '.data | length'"#).await,
        (0, "4".into())
    );

    // Healthy network, provider mode off.
    assert_eq!(shell(&base, &network).await, (0, "Network is healthy".into()));
    assert_eq!(shell(&base, &provider).await, (1, "Provider is not enabled".into()));
    // The guide's enable command, then the provider check passes.
    let enable = r#"curl -s -X POST "$API/api/mesh/provider/enable" -H "Content-Type: application/json" -d '{"api_key": "your_birdeye_api_key_here"}' | jq -c '.data.enabled'"#;
    assert_eq!(shell(&base, enable).await, (0, "true".into()));
    assert_eq!(shell(&base, &provider).await, (0, "Provider is healthy".into()));
    assert_eq!(
        shell(&base, r#"curl -s "$API/api/mesh/provider/status" | jq -c '{success, enabled: .data.enabled, node_id: .data.node_id}'"#).await,
        (0, format!(r#"{{"success":true,"enabled":true,"node_id":"{NODE_ID}"}}"#))
    );

    // Too few peers, then no provider: unhealthy.
    node.node.set_network(network_with(1, true));
    eventually("the API sees one peer", Duration::from_secs(5), async || {
        shell(&base, &network).await == (1, "Network health issue: providers=1, peers=1".into())
    })
    .await
    .unwrap();
    node.node.set_network(network_with(5, false));
    eventually("the API sees no provider", Duration::from_secs(5), async || {
        shell(&base, &network).await == (1, "Network health issue: providers=0, peers=5".into())
    })
    .await
    .unwrap();

    // Node away: both checks fail.
    node.stop().await.unwrap();
    eventually("the API notices", Duration::from_secs(5), async || !api.node_connected())
        .await
        .unwrap();
    assert_eq!(
        shell(&base, &network).await,
        (1, "Network health issue: providers=0, peers=null".into())
    );
    assert_eq!(shell(&base, &provider).await, (1, "Provider is not enabled".into()));
    api.shutdown(Duration::from_secs(5)).await;
}

fn network_with(peers: usize, provider: bool) -> mesh_ipc::NetworkStatus {
    let mut status = network(peers);
    if !provider {
        status.active_providers.clear();
    }
    status
}

#[tokio::test]
async fn metrics_count_requests_and_pass_promtool() {
    let node = NodeSocket::start(FakeNode::new(prices())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    wait_ready(&base).await;
    for _ in 0..3 {
        assert_eq!(get(&format!("{base}/api/mesh/prices")).await.0, 200);
    }
    assert_eq!(get(&format!("{base}/api/mesh/prices/NOPE")).await.0, 404);
    let (_ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/mesh/ws", api.local_addr()))
            .await
            .unwrap();
    eventually("the WebSocket client is counted", Duration::from_secs(5), async || {
        api.stream_clients().len() == 1
    })
    .await
    .unwrap();
    let response = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let line = |prefix: &str, parts: &[&str]| {
        text.lines()
            .find(|l| l.starts_with(prefix) && parts.iter().all(|p| l.contains(p)))
            .unwrap_or_else(|| panic!("no {prefix} line with {parts:?} in\n{text}"))
            .to_owned()
    };
    let ok =
        line("mesh_api_http_requests_total{", &["route=\"/api/mesh/prices\"", "status=\"200\""]);
    assert!(ok.ends_with(" 3"), "{ok}");
    line(
        "mesh_api_http_requests_total{",
        &["route=\"/api/mesh/prices/{asset}\"", "status=\"404\""],
    );
    line(
        "mesh_api_http_request_duration_seconds_bucket{",
        &["route=\"/api/mesh/prices\"", "le=\"0.001\""],
    );
    assert_eq!(line("mesh_api_node_connected", &[]), "mesh_api_node_connected 1");
    assert_eq!(
        line("mesh_api_stream_clients{", &["kind=\"ws\""]),
        "mesh_api_stream_clients{kind=\"ws\"} 1"
    );
    assert_eq!(line("mesh_api_snapshot_prices", &[]), "mesh_api_snapshot_prices 4");
    // The node's own metrics follow the API's (the node has no HTTP listener).
    assert_eq!(line("mesh_network_connected_peers", &[]), "mesh_network_connected_peers 3");

    let promtool = Command::new("sh").args(["-c", "command -v promtool"]).output().unwrap();
    assert!(
        promtool.status.success(),
        "promtool is needed (scripts/test unpacks it from Debian's prometheus package)"
    );
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = check.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_unfiltered_price_answer_follows_every_change_and_ages_move_on() {
    let node = NodeSocket::start(FakeNode::new(prices())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    wait_ready(&base).await;
    let sol_in = |body: &Value| {
        body["data"].as_array().unwrap().iter().find(|p| p["asset"] == SOL).cloned().unwrap()
    };
    let (_, all) = get(&format!("{base}/api/mesh/prices")).await;
    assert_eq!(sol_in(&all)["price"], "150.5");
    for value in ["151.5", "152.5", "153.5"] {
        node.node.set_price(price("solana", SOL, value));
        eventually("the filtered answer shows the update", Duration::from_secs(5), async || {
            get(&format!("{base}/api/mesh/prices?asset={SOL}")).await.1["data"][0]["price"] == value
        })
        .await
        .unwrap();
        // The unfiltered answer is cached, but a change replaces it at once.
        let (_, all) = get(&format!("{base}/api/mesh/prices")).await;
        assert_eq!(sol_in(&all)["price"], value);
    }
    let (_, all) = get(&format!("{base}/api/mesh/prices")).await;
    assert_eq!(sol_in(&all)["age_secs"], 0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, all) = get(&format!("{base}/api/mesh/prices")).await;
    assert!(sol_in(&all)["age_secs"].as_u64().unwrap() >= 2, "{all}");
    api.shutdown(Duration::from_secs(5)).await;
}
