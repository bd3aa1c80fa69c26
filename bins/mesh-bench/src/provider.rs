//! Provider benchmark against birdeye-sim on loopback: how many multi-price batches the Birdeye
//! client fetches and converts per second (sequential and concurrent), and how long the
//! provider loop takes from the start of a round to handing its signed batch over (p50/p99).

use std::sync::Arc;
use std::time::{Duration, Instant};

use birdeye_sim::{Simulator, TokenSpec};
use mesh_coordination::MemoryCoordination;
use mesh_protocol::{Identity, Payload};
use mesh_provider::{
    ApiKey, Assets, BirdeyeClient, ChannelBroadcast, ClientConfig, Provider, RetryPolicy, Settings,
};
use serde_json::json;

use crate::report::{Figure, Report, per_sec};

const KEY: &str = "bench-key";

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Multi-price requests in each throughput run.
    #[arg(long, default_value_t = 2_000)]
    pub requests: usize,
    /// Addresses per multi-price request (at most 100).
    #[arg(long, default_value_t = 50)]
    pub tokens: usize,
    /// Requests in flight in the concurrent run.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Provider rounds to measure.
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    /// Round length of the loop benchmark, milliseconds.
    #[arg(long, default_value_t = 100)]
    pub round_ms: u64,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!((1..=100).contains(&args.tokens), "--tokens must be 1..=100");
    anyhow::ensure!(args.round_ms >= 20, "--round-ms must be at least 20");
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(measure(args))
}

async fn measure(args: &Args) -> anyhow::Result<Report> {
    let mut builder = Simulator::builder().keys([KEY]);
    let mut addresses = Vec::with_capacity(args.tokens);
    for i in 0..args.tokens {
        let address = format!("Bench{i:039}");
        // Spread the magnitudes so that both plain and exponent float text are parsed.
        let price = 10f64.powi((i % 9) as i32 - 5) * (1.0 + i as f64 / 100.0);
        builder = builder.token(TokenSpec::new("solana", &address, "B", price));
        addresses.push(address);
    }
    let sim = builder.spawn("127.0.0.1:0").await?;
    let config = ClientConfig { base_url: sim.base_url(), ..ClientConfig::default() };
    let client = BirdeyeClient::with_config(ApiKey::new(KEY), config)?;

    // Warm the connection pool.
    client.multi_price("solana", &addresses).await?;

    let started = Instant::now();
    for _ in 0..args.requests {
        let set = client.multi_price("solana", &addresses).await?;
        anyhow::ensure!(set.prices.len() == args.tokens, "missing prices: {:?}", set.missing);
    }
    let sequential = per_sec(args.requests, started.elapsed());

    let started = Instant::now();
    let per_task = args.requests.div_ceil(args.concurrency.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let client = client.clone();
        let addresses = addresses.clone();
        tasks.spawn(async move {
            for _ in 0..per_task {
                client.multi_price("solana", &addresses).await?;
            }
            Ok::<_, mesh_provider::BirdeyeError>(per_task)
        });
    }
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        done += joined??;
    }
    let concurrent = per_sec(done, started.elapsed());

    let (p50, p99, max) = round_latency(args, &sim).await?;
    sim.shutdown().await;

    Ok(Report {
        bench: "provider",
        params: json!({
            "requests": args.requests,
            "tokens_per_request": args.tokens,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "round_ms": args.round_ms,
            "assets_per_round": Assets::default().len(),
            "transport": "HTTP/1.1 over loopback to birdeye-sim",
        }),
        figures: vec![
            Figure::plain("client_batches_per_sec_sequential", sequential, "batches/s"),
            Figure::plain("client_batches_per_sec_concurrent", concurrent, "batches/s"),
            Figure::plain(
                "client_prices_per_sec_concurrent",
                concurrent * args.tokens as f64,
                "prices/s",
            ),
            Figure::plain("round_start_to_handover_p50", p50, "ms"),
            Figure::plain("round_start_to_handover_p99", p99, "ms"),
            Figure::plain("round_start_to_handover_max", max, "ms"),
        ],
    })
}

/// Runs one provider (the fixture assets: two chains, two requests a round) with short rounds
/// and measures, per round, the time from the round's start to the batch reaching the
/// broadcaster.
async fn round_latency(
    args: &Args,
    sim: &birdeye_sim::SimulatorHandle,
) -> anyhow::Result<(f64, f64, f64)> {
    let interval = Duration::from_millis(args.round_ms);
    let settings = Settings {
        interval,
        window: interval / 5,
        message_ttl: 10,
        assets: Assets::default(),
        client: ClientConfig {
            base_url: sim.base_url(),
            retry: RetryPolicy::none(),
            ..ClientConfig::default()
        },
        clock_offset_ms: 0,
        max_clock_skew: mesh_provider::config::DEFAULT_MAX_CLOCK_SKEW,
    };
    let (broadcast, mut batches) = ChannelBroadcast::new(args.rounds + 8, 1);
    let provider = Provider::builder(Identity::generate(), settings, Arc::new(broadcast))
        .coordination(Arc::new(MemoryCoordination::new()))
        .build();
    provider.enable(ApiKey::new(KEY)).await?;
    let mut latencies = Vec::with_capacity(args.rounds);
    let deadline = Duration::from_millis(args.round_ms * 4);
    while latencies.len() < args.rounds {
        let envelope = tokio::time::timeout(deadline, batches.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no batch for {deadline:?}: {:?}", provider.status()))?
            .ok_or_else(|| anyhow::anyhow!("broadcast channel closed"))?;
        let received_us = unix_micros();
        let body = mesh_protocol::decode_body(&envelope.body)?;
        let Payload::PriceBatch { round, .. } = body.payload else {
            anyhow::bail!("not a price batch");
        };
        let round_start_us = round as f64 * args.round_ms as f64 * 1000.0;
        latencies.push((received_us - round_start_us) / 1000.0);
    }
    provider.shutdown().await;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99), at(1.0)))
}

fn unix_micros() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_micros() as f64)
}
