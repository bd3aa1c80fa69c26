//! The simulator over real HTTP on loopback: the contract of BIRDEYE.md, the faults and the
//! counters.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use birdeye_sim::{Failure, Simulator, SimulatorHandle, UnknownTokens};
use serde_json::Value;

const SOL: &str = "So11111111111111111111111111111111111111112";
const BONK: &str = "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263";
const WETH: &str = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2";
const UNKNOWN: &str = "Unknown1111111111111111111111111111111111111";

async fn get(
    sim: &SimulatorHandle,
    path: &str,
    key: Option<&str>,
    chain: Option<&str>,
) -> (u16, Option<String>, String) {
    let mut request = reqwest::Client::new().get(format!("{}{path}", sim.base_url()));
    if let Some(key) = key {
        request = request.header("X-API-KEY", key);
    }
    if let Some(chain) = chain {
        request = request.header("x-chain", chain);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, response.text().await.unwrap())
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[tokio::test]
async fn keys_are_checked_and_errors_have_birdeye_bodies() {
    let sim = Simulator::builder()
        .keys(["good"])
        .forbidden_key("banned")
        .spawn("127.0.0.1:0")
        .await
        .unwrap();
    let path = format!("/defi/price?address={SOL}");

    let (status, _, body) = get(&sim, &path, None, None).await;
    assert_eq!(status, 401);
    assert_eq!(json(&body)["success"], false);
    assert!(json(&body)["message"].is_string());
    assert_eq!(get(&sim, &path, Some("wrong"), None).await.0, 401);
    let (status, _, body) = get(&sim, &path, Some("banned"), None).await;
    assert_eq!(status, 403);
    assert_eq!(json(&body)["success"], false);

    let (status, _, body) = get(&sim, &path, Some("good"), None).await;
    assert_eq!(status, 200, "{body}");
    let body = json(&body);
    assert_eq!(body["success"], true);
    let value = body["data"]["value"].as_f64().unwrap();
    assert!((100.0..250.0).contains(&value), "SOL at {value}");
    assert!(body["data"]["updateUnixTime"].is_i64());
    assert!(body["data"]["priceChange24h"].is_number());

    let stats = sim.stats();
    assert_eq!(stats.total_requests, 4);
    assert_eq!(stats.key("good").price, 1);
    assert_eq!(stats.key("good").by_status.get(&200), Some(&1));
    assert_eq!(stats.key("(none)").by_status.get(&401), Some(&1));
    assert_eq!(stats.key("banned").by_status.get(&403), Some(&1));
    // The same counters over HTTP.
    let (status, _, body) = get(&sim, "/sim/stats", None, None).await;
    assert_eq!(status, 200);
    let served: birdeye_sim::Stats = serde_json::from_str(&body).unwrap();
    assert_eq!(served, stats);
}

#[tokio::test]
async fn multi_price_get_and_post_with_nulls_missing_and_float_text() {
    let sim =
        Simulator::builder().keys(["k"]).null_tokens([BONK]).spawn("127.0.0.1:0").await.unwrap();
    let (status, _, body) = get(
        &sim,
        &format!("/defi/multi_price?list_address={SOL},{UNKNOWN},{BONK}"),
        Some("k"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let parsed = json(&body);
    assert!(parsed["data"][SOL]["value"].is_number());
    assert!(parsed["data"][BONK].is_null());
    assert!(parsed["data"].as_object().unwrap().contains_key(UNKNOWN));
    assert!(parsed["data"][UNKNOWN].is_null());

    sim.set_null_tokens(Vec::<String>::new());
    sim.set_missing_tokens([SOL]);
    let response = reqwest::Client::new()
        .post(format!("{}/defi/multi_price", sim.base_url()))
        .header("X-API-KEY", "k")
        .json(&serde_json::json!({ "list_address": format!("{SOL},{BONK}") }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let parsed = json(&text);
    assert!(!parsed["data"].as_object().unwrap().contains_key(SOL));
    let bonk = parsed["data"][BONK]["value"].as_f64().unwrap();
    assert!((1e-5..3e-5).contains(&bonk), "BONK at {bonk}");
    // Python-style float text for small prices, as real clients must parse.
    assert!(text.contains("e-05"), "{text}");

    let stats = sim.stats();
    assert_eq!(stats.key("k").multi_price, 2);
    assert_eq!(stats.key("k").tokens_requested, 5);
}

#[tokio::test]
async fn unknown_tokens_can_be_left_out_and_chains_are_separate() {
    let sim = Simulator::builder()
        .unknown_tokens(UnknownTokens::Missing)
        .spawn("127.0.0.1:0")
        .await
        .unwrap();
    let path = format!("/defi/multi_price?list_address={WETH},{SOL}");
    let (status, _, body) = get(&sim, &path, Some("any"), Some("ethereum")).await;
    assert_eq!(status, 200);
    let parsed = json(&body);
    let data = parsed["data"].as_object().unwrap();
    assert!(data.contains_key(WETH));
    assert!(!data.contains_key(SOL), "SOL is not an ethereum token");
    let weth = parsed["data"][WETH]["value"].as_f64().unwrap();
    assert!((2500.0..4500.0).contains(&weth));

    let (status, _, body) = get(&sim, &path, Some("any"), Some("dogechain")).await;
    assert_eq!(status, 400);
    assert!(json(&body)["message"].as_str().unwrap().contains("dogechain"));

    let (status, _, body) = get(&sim, "/defi/networks", Some("any"), None).await;
    assert_eq!(status, 200);
    assert!(json(&body)["data"].as_array().unwrap().iter().any(|c| c == "ethereum"));
}

#[tokio::test]
async fn more_than_100_addresses_is_a_bad_request() {
    let sim = Simulator::builder().spawn("127.0.0.1:0").await.unwrap();
    let list: Vec<String> = (0..101).map(|i| format!("Addr{i:040}")).collect();
    let path = format!("/defi/multi_price?list_address={}", list.join(","));
    let (status, _, body) = get(&sim, &path, Some("k"), None).await;
    assert_eq!(status, 400);
    assert!(json(&body)["message"].as_str().unwrap().contains("101"));
    let path = format!("/defi/multi_price?list_address={}", list[..100].join(","));
    assert_eq!(get(&sim, &path, Some("k"), None).await.0, 200);
    let (status, _, _) = get(&sim, "/defi/multi_price", Some("k"), None).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_per_key() {
    let sim = Simulator::builder().rate_limit(2).spawn("127.0.0.1:0").await.unwrap();
    let path = format!("/defi/price?address={SOL}");
    assert_eq!(get(&sim, &path, Some("a"), None).await.0, 200);
    assert_eq!(get(&sim, &path, Some("a"), None).await.0, 200);
    let (status, retry_after, _) = get(&sim, &path, Some("a"), None).await;
    assert_eq!(status, 429);
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Another key has its own budget.
    assert_eq!(get(&sim, &path, Some("b"), None).await.0, 200);
}

#[tokio::test]
async fn injected_failures_latency_and_success_false() {
    let sim = Simulator::builder().spawn("127.0.0.1:0").await.unwrap();
    let path = format!("/defi/price?address={SOL}");
    sim.fail_next(2, Failure::status(503));
    sim.fail_next(1, Failure::rate_limited(7));
    assert_eq!(get(&sim, &path, Some("k"), None).await.0, 503);
    assert_eq!(get(&sim, &path, Some("k"), None).await.0, 503);
    let (status, retry_after, _) = get(&sim, &path, Some("k"), None).await;
    assert_eq!((status, retry_after.as_deref()), (429, Some("7")));
    assert_eq!(get(&sim, &path, Some("k"), None).await.0, 200);

    sim.set_error_rate(1.0);
    let status = get(&sim, &path, Some("k"), None).await.0;
    assert!(status == 500 || status == 503, "{status}");
    sim.set_error_rate(0.0);

    sim.set_unsuccessful(true);
    let (status, _, body) = get(&sim, &path, Some("k"), None).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["success"], false);
    sim.set_unsuccessful(false);

    sim.set_latency(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(get(&sim, &path, Some("k"), None).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn frozen_prices_and_offset_between_instances() {
    let a = Simulator::builder().frozen(true).seed(9).spawn("127.0.0.1:0").await.unwrap();
    let b = Simulator::builder()
        .frozen(true)
        .seed(9)
        .offset_percent(5.0)
        .spawn("127.0.0.1:0")
        .await
        .unwrap();
    let path = format!("/defi/price?address={SOL}");
    let first = json(&get(&a, &path, Some("k"), None).await.2)["data"]["value"].as_f64().unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let text = a.price_text("solana", SOL).unwrap();
    assert_eq!(text.parse::<f64>().unwrap(), first, "frozen price moved");
    let offset = json(&get(&b, &path, Some("k"), None).await.2)["data"]["value"].as_f64().unwrap();
    assert!((offset / first - 1.05).abs() < 1e-9, "{offset} vs {first}");
    b.set_offset_percent(0.0);
    let back = json(&get(&b, &path, Some("k"), None).await.2)["data"]["value"].as_f64().unwrap();
    assert_eq!(back, first);
}

#[tokio::test]
async fn prices_walk_over_ticks() {
    let sim =
        Simulator::builder().tick(Duration::from_millis(5)).spawn("127.0.0.1:0").await.unwrap();
    let first = sim.price_text("solana", SOL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if sim.price_text("solana", SOL).unwrap() != first {
            break;
        }
        assert!(Instant::now() < deadline, "price never moved");
    }
    sim.shutdown().await;
}
