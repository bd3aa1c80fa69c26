//! The Birdeye client against birdeye-sim over real HTTP on loopback: every answer shape, every
//! error status, retries with `Retry-After`, chunking, headers, and the key kept secret.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests

use std::time::{Duration, Instant};

use birdeye_sim::{Failure, Simulator, SimulatorHandle, TokenSpec, UnknownTokens};
use mesh_provider::{
    ApiKey, Asset, Assets, BirdeyeClient, BirdeyeError, ClientConfig, MissingReason,
    MultiPriceMethod, RetryPolicy,
};

const KEY: &str = "sk-test-0123456789";
const SOL: &str = "So11111111111111111111111111111111111111112";
const BONK: &str = "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263";
const JUP: &str = "JUPyiwrYJFskUPiHa7hkeR8VUtAeFoSYbKedZNsDvCN";
const WETH: &str = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2";
const UNKNOWN: &str = "Unknown1111111111111111111111111111111111111";

async fn sim(builder: birdeye_sim::SimulatorBuilder) -> SimulatorHandle {
    builder.keys([KEY]).forbidden_key("sk-banned").spawn("127.0.0.1:0").await.unwrap()
}

/// Fast retries so that tests of the retry rules take milliseconds, not seconds.
fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        max_retry_after: Duration::from_secs(5),
    }
}

fn client(sim: &SimulatorHandle, key: &str) -> BirdeyeClient {
    let config = ClientConfig {
        base_url: sim.base_url(),
        request_timeout: Duration::from_secs(5),
        retry: quick_retries(),
        ..ClientConfig::default()
    };
    BirdeyeClient::with_config(ApiKey::new(key), config).unwrap()
}

#[tokio::test]
async fn prices_are_the_exact_text_of_the_json_numbers() {
    let sim = sim(Simulator::builder().frozen(true)).await;
    let client = client(&sim, KEY);
    let set = client.prices(Assets::default().as_slice()).await.unwrap();
    assert_eq!(set.prices.len(), 9, "missing: {:?}", set.missing);
    assert!(set.missing.is_empty());
    for price in &set.prices {
        let text = sim.price_text(&price.chain, &price.address).unwrap();
        let exact = mesh_protocol::Decimal::parse_any(&text).unwrap();
        assert_eq!(price.value, exact, "{} {text}", price.address);
        assert!(price.change_24h.is_some());
        assert!(price.update_unix_time.is_some());
    }
    // BONK is written in exponent notation by the simulator and read exactly.
    let bonk_text = sim.price_text("solana", BONK).unwrap();
    assert!(bonk_text.contains("e-05"), "{bonk_text}");
    let bonk = set.get("solana", BONK).unwrap();
    assert!(bonk.value.to_string().starts_with("0.0000"), "{}", bonk.value);
    // One request per chain, each with its x-chain and the key.
    let log = sim.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].chain, "solana");
    assert_eq!(log[0].tokens, 6);
    assert_eq!(log[1].chain, "ethereum");
    assert_eq!(log[1].tokens, 3);
    assert!(log.iter().all(|r| r.key == KEY && r.status == 200));
}

#[tokio::test]
async fn get_and_post_chunk_at_100_addresses() {
    let mut builder = Simulator::builder();
    let mut addresses = Vec::new();
    for i in 0..250 {
        let address = format!("Tok{i:040}");
        builder = builder.token(TokenSpec::new("solana", &address, "T", 1.0 + i as f64));
        addresses.push(address);
    }
    let sim = sim(builder).await;
    let client = client(&sim, KEY);
    for method in [MultiPriceMethod::Get, MultiPriceMethod::Post] {
        sim.reset_stats();
        let set = client.multi_price_with(method, "solana", &addresses).await.unwrap();
        assert_eq!(set.prices.len(), 250, "{method:?}");
        let sizes: Vec<usize> = sim.requests().iter().map(|r| r.tokens).collect();
        assert_eq!(sizes, [100, 100, 50], "{method:?}");
        // In the order asked for.
        assert_eq!(set.prices[137].address, addresses[137]);
    }
    // Duplicates are asked for once.
    sim.reset_stats();
    let set = client.multi_price("solana", &[SOL, SOL, JUP]).await.unwrap();
    assert_eq!(set.prices.len(), 2);
    assert_eq!(sim.requests()[0].tokens, 2);
}

#[tokio::test]
async fn null_and_missing_tokens_are_reported_missing() {
    let sim = sim(Simulator::builder().null_tokens([JUP]).missing_tokens([BONK])).await;
    let client = client(&sim, KEY);
    let set = client.multi_price("solana", &[SOL, JUP, BONK, UNKNOWN]).await.unwrap();
    assert_eq!(set.prices.len(), 1);
    assert_eq!(set.prices[0].address, SOL);
    let missing: Vec<(&str, MissingReason)> =
        set.missing.iter().map(|m| (m.address.as_str(), m.reason)).collect();
    assert_eq!(
        missing,
        [(JUP, MissingReason::Null), (BONK, MissingReason::Absent), (UNKNOWN, MissingReason::Null)]
    );

    // Unknown tokens left out of the answer instead.
    let sim = self::sim(Simulator::builder().unknown_tokens(UnknownTokens::Missing)).await;
    let client = self::client(&sim, KEY);
    let set =
        client.multi_price_with(MultiPriceMethod::Post, "solana", &[UNKNOWN, SOL]).await.unwrap();
    assert_eq!(set.missing[0].reason, MissingReason::Absent);
    assert_eq!(set.prices.len(), 1);

    // A known token on the wrong chain has no price there.
    let set = client.multi_price("ethereum", &[SOL, WETH]).await.unwrap();
    assert_eq!(set.prices.len(), 1);
    assert_eq!(set.prices[0].address, WETH);

    // Single price: known, unknown.
    assert!(client.price("solana", SOL).await.unwrap().is_some());
    assert!(client.price("solana", UNKNOWN).await.unwrap().is_none());
}

#[tokio::test]
async fn success_false_with_200_is_an_error() {
    let sim = sim(Simulator::builder().unsuccessful(true)).await;
    let client = client(&sim, KEY);
    let err = client.multi_price("solana", &[SOL]).await.unwrap_err();
    assert!(
        matches!(&err, BirdeyeError::Unsuccessful { message } if message == "Failed to get price"),
        "{err:?}"
    );
    // Not retried: one request.
    assert_eq!(sim.stats().key(KEY).requests, 1);
    let err = client.price("solana", SOL).await.unwrap_err();
    assert!(matches!(err, BirdeyeError::Unsuccessful { .. }));
}

#[tokio::test]
async fn key_errors_are_typed_and_never_retried() {
    let sim = sim(Simulator::builder()).await;

    let err = client(&sim, "sk-wrong-key").validate_key().await.unwrap_err();
    assert!(matches!(err, BirdeyeError::InvalidKey), "{err:?}");
    assert_eq!(err.to_string(), "Invalid API key");
    assert_eq!(sim.stats().key("sk-wrong-key").requests, 1, "401 was retried");

    let err = client(&sim, "sk-banned").multi_price("solana", &[SOL]).await.unwrap_err();
    assert!(
        matches!(&err, BirdeyeError::Forbidden { message } if message.contains("not allowed")),
        "{err:?}"
    );
    assert_eq!(sim.stats().key("sk-banned").requests, 1, "403 was retried");

    client(&sim, KEY).validate_key().await.unwrap();
    let networks = client(&sim, KEY).networks().await.unwrap();
    assert!(networks.iter().any(|n| n == "solana"));
}

#[tokio::test]
async fn bad_requests_carry_birdeyes_message_and_are_not_retried() {
    let sim = sim(Simulator::builder()).await;
    let client = client(&sim, KEY);
    let err = client.multi_price("dogechain", &[SOL]).await.unwrap_err();
    assert!(
        matches!(&err, BirdeyeError::BadRequest { message } if message.contains("dogechain")),
        "{err:?}"
    );
    sim.fail_next(1, Failure::status(400));
    let err = client.multi_price("solana", &[SOL]).await.unwrap_err();
    assert!(
        matches!(&err, BirdeyeError::BadRequest { message } if message == "Compute units usage limit exceeded"),
        "{err:?}"
    );
    assert_eq!(sim.stats().key(KEY).requests, 2);
}

#[tokio::test]
async fn server_errors_are_retried_three_times_then_reported() {
    let sim = sim(Simulator::builder()).await;
    let client = client(&sim, KEY);
    // Two failures, then an answer: succeeds on the third request.
    sim.fail_next(2, Failure::status(503));
    let set = client.multi_price("solana", &[SOL]).await.unwrap();
    assert_eq!(set.prices.len(), 1);
    assert_eq!(sim.stats().key(KEY).requests, 3);
    // Four failures: the first try and three retries, then the error.
    sim.reset_stats();
    sim.fail_next(4, Failure::status(500));
    let err = client.multi_price("solana", &[SOL]).await.unwrap_err();
    assert!(matches!(err, BirdeyeError::Server { status: 500 }), "{err:?}");
    assert_eq!(sim.stats().key(KEY).requests, 4);
    // With retries off, one request.
    sim.reset_stats();
    sim.fail_next(1, Failure::status(503));
    let config = ClientConfig {
        base_url: sim.base_url(),
        retry: RetryPolicy::none(),
        ..ClientConfig::default()
    };
    let once = BirdeyeClient::with_config(ApiKey::new(KEY), config).unwrap();
    assert!(matches!(once.validate_key().await, Err(BirdeyeError::Server { status: 503 })));
    assert_eq!(sim.stats().key(KEY).requests, 1);
}

#[tokio::test]
async fn rate_limits_wait_for_retry_after() {
    let sim = sim(Simulator::builder()).await;
    let client = client(&sim, KEY);
    sim.fail_next(1, Failure::rate_limited(1));
    let started = Instant::now();
    let set = client.multi_price("solana", &[SOL]).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(set.prices.len(), 1);
    // The backoff alone would be under 100 ms; Retry-After asked for a second.
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    assert_eq!(sim.stats().key(KEY).by_status.get(&429), Some(&1));
    assert_eq!(sim.stats().key(KEY).requests, 2);

    // The simulator's own per-key limit: 1 request/s; the client still gets through.
    sim.reset_stats();
    sim.set_rate_limit(Some(1));
    for _ in 0..2 {
        client.multi_price("solana", &[SOL]).await.unwrap();
    }
    let stats = sim.stats().key(KEY);
    assert_eq!(stats.by_status.get(&200), Some(&2));
    assert!(stats.by_status.get(&429).copied().unwrap_or(0) >= 1, "{stats:?}");
    sim.set_rate_limit(None);

    // A Retry-After beyond what the client accepts to wait fails at once.
    sim.reset_stats();
    sim.fail_next(1, Failure::rate_limited(60));
    let err = client.multi_price("solana", &[SOL]).await.unwrap_err();
    assert!(
        matches!(err, BirdeyeError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(60)),
        "{err:?}"
    );
    assert_eq!(sim.stats().key(KEY).requests, 1);
    // Rate limits that never end are reported after three retries.
    sim.reset_stats();
    sim.fail_next(4, Failure::status(429));
    let err = client.multi_price("solana", &[SOL]).await.unwrap_err();
    assert!(matches!(err, BirdeyeError::RateLimited { retry_after: None }), "{err:?}");
    assert_eq!(sim.stats().key(KEY).requests, 4);
}

#[tokio::test]
async fn timeouts_and_network_errors() {
    let sim = sim(Simulator::builder().latency(Duration::from_millis(500))).await;
    let config = ClientConfig {
        base_url: sim.base_url(),
        request_timeout: Duration::from_millis(100),
        retry: RetryPolicy { max_retries: 1, ..quick_retries() },
        ..ClientConfig::default()
    };
    let client = BirdeyeClient::with_config(ApiKey::new(KEY), config).unwrap();
    let err = client.multi_price("solana", &[SOL]).await.unwrap_err();
    assert!(matches!(err, BirdeyeError::Timeout(_)), "{err:?}");
    // The request and its one retry both reached the simulator.
    assert_eq!(sim.stats().key(KEY).multi_price, 2);

    // Nobody listening: a network error after the retries.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = ClientConfig {
        base_url: format!("http://127.0.0.1:{port}"),
        retry: quick_retries(),
        ..ClientConfig::default()
    };
    let client = BirdeyeClient::with_config(ApiKey::new(KEY), config).unwrap();
    let err = client.validate_key().await.unwrap_err();
    assert!(matches!(err, BirdeyeError::Network(_)), "{err:?}");
}

#[tokio::test]
async fn the_key_never_shows_in_errors_or_debug_output() {
    let (logs, _guard) = mesh_tests::LogCapture::install();
    let secret = "sk-super-secret-value-42";
    let refused = "sk-refused-secret-value-43";
    let sim = sim(Simulator::builder().keys([secret])).await;
    let accepted = client(&sim, secret);
    let mut texts = vec![format!("{accepted:?}")];
    let err = client(&sim, refused).multi_price("solana", &[SOL]).await.unwrap_err();
    texts.push(format!("{err} {err:?}"));
    for failure in [Failure::status(503), Failure::status(400), Failure::rate_limited(60)] {
        sim.fail_next(4, failure);
        let err = accepted.multi_price("solana", &[SOL]).await.unwrap_err();
        texts.push(format!("{err} {err:?}"));
        sim.reset_stats();
    }
    // A network error names the URL, never the headers.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = ClientConfig {
        base_url: format!("http://127.0.0.1:{port}"),
        retry: RetryPolicy::none(),
        ..ClientConfig::default()
    };
    let offline = BirdeyeClient::with_config(ApiKey::new(secret), config).unwrap();
    let err = offline.validate_key().await.unwrap_err();
    texts.push(format!("{err} {err:?} {offline:?}"));
    assert_eq!(texts.len(), 6);
    // The retries were logged (with their errors), without the key.
    assert!(logs.count("Birdeye request failed; retrying") >= 3, "{}", logs.text());
    texts.push(logs.text());
    for text in texts {
        assert!(!text.contains(secret) && !text.contains(refused), "{text}");
    }
}

#[tokio::test]
async fn assets_are_grouped_by_chain_in_first_seen_order() {
    let sim = sim(Simulator::builder()).await;
    let client = client(&sim, KEY);
    let assets = vec![
        Asset::new("ethereum", WETH).unwrap(),
        Asset::new("solana", SOL).unwrap(),
        Asset::new("ethereum", "0xdAC17F958D2ee523a2206206994597C13D831ec7").unwrap(),
    ];
    let set = client.prices(&assets).await.unwrap();
    assert_eq!(set.prices.len(), 3);
    let chains: Vec<String> = sim.requests().into_iter().map(|r| r.chain).collect();
    assert_eq!(chains, ["ethereum", "solana"]);
}
