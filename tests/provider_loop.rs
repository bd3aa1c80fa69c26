//! One provider's round loop against birdeye-sim over real HTTP, with short rounds: signed
//! batches a receiver accepts, the guide's log lines and metrics, refused keys stopping provider
//! mode, failed rounds sending nothing, retries within the round, disable/enable at run time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use birdeye_sim::{Failure, Simulator, SimulatorHandle};
use mesh_coordination::{Coordination, MemoryCoordination};
use mesh_protocol::{Envelope, HighWaterMarks, Identity, Payload, PriceUpdate, Validator};
use mesh_provider::{
    ApiKey, Assets, BirdeyeError, ChannelBroadcast, ClientConfig, Error, FetchOutcome, Provider,
    RetryPolicy, Settings,
};
use mesh_tests::{LogCapture, eventually};
use tokio::sync::mpsc;

const KEY: &str = "sk-provider-test";

fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap()
    })
}

fn settings(sim: &SimulatorHandle, interval: Duration, window: Duration) -> Settings {
    Settings {
        interval,
        window,
        message_ttl: 10,
        assets: Assets::default(),
        client: ClientConfig {
            base_url: sim.base_url(),
            request_timeout: Duration::from_secs(2),
            retry: RetryPolicy {
                max_retries: 3,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(100),
                max_retry_after: Duration::from_secs(5),
            },
            ..ClientConfig::default()
        },
        clock_offset_ms: 0,
        max_clock_skew: mesh_provider::config::DEFAULT_MAX_CLOCK_SKEW,
    }
}

struct Node {
    provider: Provider,
    batches: mpsc::Receiver<Envelope>,
    coordination: Arc<MemoryCoordination>,
}

fn node(settings: Settings) -> Node {
    let (broadcast, batches) = ChannelBroadcast::new(64, 4);
    let coordination = Arc::new(MemoryCoordination::new());
    let provider = Provider::builder(Identity::generate(), settings, Arc::new(broadcast))
        .coordination(coordination.clone())
        .build();
    Node { provider, batches, coordination }
}

async fn next_batch(batches: &mut mpsc::Receiver<Envelope>, within: Duration) -> Envelope {
    tokio::time::timeout(within, batches.recv())
        .await
        .expect("no batch in time")
        .expect("broadcast channel closed")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn batch_of(envelope: &Envelope) -> (u64, Vec<PriceUpdate>, i64) {
    let body = mesh_protocol::decode_body(&envelope.body).unwrap();
    match body.payload {
        Payload::PriceBatch { round, prices } => (round, prices, body.created_at_ms),
        other => panic!("not a price batch: {other:?}"),
    }
}

#[tokio::test]
async fn every_round_yields_one_signed_batch_that_receivers_accept() {
    let (logs, _guard) = LogCapture::install();
    let metrics = metrics();
    let sim = Simulator::builder().keys([KEY]).spawn("127.0.0.1:0").await.unwrap();
    let mut node = node(settings(&sim, Duration::from_secs(1), Duration::from_millis(200)));
    node.provider.enable(ApiKey::new(KEY)).await.unwrap();
    assert!(node.provider.status().enabled);

    let validator = Validator::default();
    let mut marks = HighWaterMarks::default();
    let mut rounds = Vec::new();
    let mut last_ts = std::collections::HashMap::new();
    for _ in 0..3 {
        let envelope = next_batch(&mut node.batches, Duration::from_secs(3)).await;
        assert_eq!(envelope.ttl, 10);
        assert_eq!(envelope.hop_count, 1);
        let frame = mesh_protocol::encode_envelope(&envelope).unwrap();
        let verified = validator.validate(&frame, now_ms(), &mut marks).unwrap();
        assert_eq!(verified.body.origin, node.provider.node_id());
        let (round, prices, created_at) = batch_of(&envelope);
        // The round is the one the batch was made in.
        assert_eq!(round, (created_at / 1000) as u64, "created at {created_at}");
        assert_eq!(prices.len(), 9);
        for price in &prices {
            assert!(price.price.is_positive());
            let text = sim.price_text(&price.blockchain, &price.asset);
            assert!(text.is_some(), "{} is not a simulator token", price.asset);
            let previous = last_ts.insert(price.asset.clone(), price.timestamp_ms);
            assert!(previous.is_none_or(|p| p < price.timestamp_ms), "timestamp did not grow");
        }
        rounds.push(round);
    }
    assert!(rounds.windows(2).all(|w| w[1] == w[0] + 1), "rounds {rounds:?}");

    // The batch is handed over before the round is recorded: wait for the record.
    eventually("three rounds recorded", Duration::from_secs(2), async || {
        node.provider.status().rounds_fetched >= 3
    })
    .await
    .unwrap();
    assert!(node.provider.status().next_round.unwrap() > rounds[2]);
    node.provider.shutdown().await;
    let status = node.provider.status();
    assert!(!status.enabled);
    assert_eq!(status.rounds_failed, 0);
    assert!(status.last_fetch_unix_ms.is_some());
    assert!(matches!(status.last_fetch, Some(FetchOutcome::Fetched { assets: 9, peers: 4, .. })));
    // Two multi-price calls per round (solana, ethereum) and one key check; a round cut short
    // by the shutdown may have made its calls without a batch.
    let fetched = status.rounds_fetched;
    let stats = sim.stats().key(KEY);
    assert_eq!(stats.networks, 1);
    assert!((2 * fetched..=2 * fetched + 2).contains(&stats.multi_price), "{stats:?}");

    let fetching = logs.count("Provider node fetching price data") as u64;
    assert!((fetched..=fetched + 1).contains(&fetching), "{}", logs.text());
    let complete = logs.count("Provider node broadcast complete: 9 assets to 4 peers") as u64;
    assert_eq!(complete, status.rounds_fetched, "{}", logs.text());
    let rendered = metrics.render();
    for name in [
        "mesh_provider_fetch_attempts_total",
        "mesh_provider_fetch_success_total",
        "mesh_provider_broadcast_attempts_total",
        "mesh_provider_broadcast_success_total",
        "mesh_provider_api_latency_seconds",
        "mesh_provider_rounds_fetched_total",
    ] {
        assert!(rendered.contains(name), "{name} missing from:\n{rendered}");
    }
}

#[tokio::test]
async fn a_refused_key_keeps_or_takes_provider_mode_off_with_a_reason() {
    let sim = Simulator::builder()
        .keys([KEY])
        .forbidden_key("sk-banned")
        .spawn("127.0.0.1:0")
        .await
        .unwrap();
    let mut node = node(settings(&sim, Duration::from_secs(1), Duration::from_millis(200)));

    // Enabling checks the key first.
    let err = node.provider.enable(ApiKey::new("sk-wrong")).await.unwrap_err();
    assert!(matches!(err, Error::Birdeye(BirdeyeError::InvalidKey)), "{err:?}");
    let status = node.provider.status();
    assert!(!status.enabled);
    assert_eq!(status.reason.as_deref(), Some("Invalid API key"));
    assert_eq!(sim.stats().key("sk-wrong").requests, 1);

    // A key remembered from before a restart is checked too (issue 33): refused, provider
    // mode never shows as enabled and no round runs.
    let mut watch = node.provider.subscribe();
    assert!(!node.provider.resume(ApiKey::new("sk-banned")).await.unwrap());
    assert!(!watch.borrow_and_update().enabled);
    let status = node.provider.status();
    assert!(!status.enabled);
    assert!(status.reason.as_deref().unwrap().contains("403"), "{status:?}");
    assert_eq!(status.rounds_failed, 0);
    assert_eq!(status.rounds_fetched, 0);
    assert!(node.batches.try_recv().is_err(), "a batch was sent with a refused key");
    // It left the registry, and asks Birdeye no more.
    assert!(node.coordination.active_providers().await.unwrap().is_empty());
    let calls = sim.stats().key("sk-banned").requests;
    assert_eq!(calls, 1);

    // A good key brings it back.
    node.provider.enable(ApiKey::new(KEY)).await.unwrap();
    next_batch(&mut node.batches, Duration::from_secs(3)).await;
    assert_eq!(node.provider.status().reason, None);
    node.provider.shutdown().await;
}

/// A key Birdeye revokes while provider mode runs (401 in a round): provider mode stops with
/// the reason, Birdeye is asked no more, and the refusal is counted for the alert
/// (`mesh_provider_key_rejections_total`, `mesh_provider_key_rejected`).
#[tokio::test]
async fn a_key_revoked_while_rounds_run_stops_provider_mode_and_is_counted() {
    let metrics = metrics();
    let rejections = || {
        metrics
            .render()
            .lines()
            .find(|l| l.starts_with(r#"mesh_provider_key_rejections_total{status="401"}"#))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = rejections();
    let sim = Simulator::builder().keys([KEY]).spawn("127.0.0.1:0").await.unwrap();
    let mut node = node(settings(&sim, Duration::from_secs(1), Duration::from_millis(200)));
    node.provider.enable(ApiKey::new(KEY)).await.unwrap();
    next_batch(&mut node.batches, Duration::from_secs(3)).await;

    sim.set_failing_key(KEY, Some(Failure::status(401)));
    eventually("provider mode stops", Duration::from_secs(10), async || {
        !node.provider.status().enabled
    })
    .await
    .unwrap();
    let status = node.provider.status();
    assert_eq!(status.reason.as_deref(), Some("Invalid API key"), "{status:?}");
    assert!(rejections() > before, "the refusal was not counted");
    assert!(metrics.render().contains("mesh_provider_key_rejected"));
    // Nothing more is asked of Birdeye with the refused key.
    let asked = sim.stats().key(KEY).requests;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sim.stats().key(KEY).requests, asked);
    node.provider.shutdown().await;
}

#[tokio::test]
async fn a_failed_round_is_counted_and_sends_nothing() {
    let sim = Simulator::builder().keys([KEY]).spawn("127.0.0.1:0").await.unwrap();
    let mut node = node(settings(&sim, Duration::from_secs(1), Duration::from_millis(200)));
    node.provider.enable(ApiKey::new(KEY)).await.unwrap();
    let (first, first_prices, _) =
        batch_of(&next_batch(&mut node.batches, Duration::from_secs(3)).await);
    // The next round's first request and its three retries all fail.
    sim.fail_next(4, Failure::status(503));
    let (second, second_prices, _) =
        batch_of(&next_batch(&mut node.batches, Duration::from_secs(4)).await);
    assert_eq!(second, first + 2, "the failed round {} was filled in", first + 1);
    let status = node.provider.status();
    assert_eq!(status.rounds_failed, 1);
    assert!(status.last_error.as_deref().unwrap().contains("503"), "{status:?}");
    // Fresh observations only: every timestamp is newer than the previous batch's.
    for (old, new) in first_prices.iter().zip(&second_prices) {
        assert_eq!(old.asset, new.asset);
        assert!(new.timestamp_ms >= old.timestamp_ms + 1000, "{old:?} -> {new:?}");
    }
    node.provider.shutdown().await;
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_within_the_round() {
    let sim = Simulator::builder().keys([KEY]).spawn("127.0.0.1:0").await.unwrap();
    let mut node = node(settings(&sim, Duration::from_secs(3), Duration::from_millis(500)));
    node.provider.enable(ApiKey::new(KEY)).await.unwrap();
    let (first, _, _) = batch_of(&next_batch(&mut node.batches, Duration::from_secs(7)).await);
    sim.fail_next(1, Failure::rate_limited(1));
    sim.fail_next(1, Failure::status(500));
    let (second, prices, created_at) =
        batch_of(&next_batch(&mut node.batches, Duration::from_secs(7)).await);
    assert_eq!(second, first + 1);
    assert_eq!(prices.len(), 9);
    // It waited out the Retry-After inside the round.
    let into_round = created_at - (second as i64) * 3000;
    assert!((1000..3000).contains(&into_round), "batch made {into_round} ms into its round");
    let stats = sim.stats().key(KEY);
    assert_eq!(stats.by_status.get(&429), Some(&1));
    assert_eq!(stats.by_status.get(&500), Some(&1));
    assert_eq!(node.provider.status().rounds_failed, 0);
    node.provider.shutdown().await;
}

#[tokio::test]
async fn provider_mode_can_be_disabled_and_enabled_at_run_time() {
    let sim = Simulator::builder().keys([KEY]).spawn("127.0.0.1:0").await.unwrap();
    let mut node = node(settings(&sim, Duration::from_secs(1), Duration::from_millis(200)));
    let validator = Validator::default();
    let mut marks = HighWaterMarks::default();

    node.provider.enable(ApiKey::new(KEY)).await.unwrap();
    let envelope = next_batch(&mut node.batches, Duration::from_secs(3)).await;
    let frame = mesh_protocol::encode_envelope(&envelope).unwrap();
    validator.validate(&frame, now_ms(), &mut marks).unwrap();
    assert_eq!(node.coordination.active_providers().await.unwrap(), [node.provider.node_id()]);

    node.provider.disable().await;
    let status = node.provider.status();
    assert!(!status.enabled);
    assert_eq!(status.next_round, None);
    assert!(node.coordination.active_providers().await.unwrap().is_empty());
    let calls = sim.stats().key(KEY).multi_price;
    // Stopped: over two more rounds, no call and no batch.
    let quiet = eventually("two rounds pass", Duration::from_secs(3), async || {
        now_ms() > status.last_fetch_unix_ms.unwrap() + 2000
    });
    quiet.await.unwrap();
    assert_eq!(sim.stats().key(KEY).multi_price, calls);
    while let Ok(envelope) = node.batches.try_recv() {
        // At most the batch of the round in flight when disable was called.
        let frame = mesh_protocol::encode_envelope(&envelope).unwrap();
        validator.validate(&frame, now_ms(), &mut marks).unwrap();
    }

    node.provider.enable(ApiKey::new(KEY)).await.unwrap();
    let envelope = next_batch(&mut node.batches, Duration::from_secs(3)).await;
    // Accepted after the earlier ones: its timestamps are newer, not replays.
    let frame = mesh_protocol::encode_envelope(&envelope).unwrap();
    validator.validate(&frame, now_ms(), &mut marks).unwrap();
    assert!(node.provider.status().enabled);
    node.provider.shutdown().await;
    assert!(node.provider.enable(ApiKey::new(KEY)).await.is_err(), "enabled after shutdown");
}
