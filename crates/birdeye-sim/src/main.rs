//! `birdeye-sim` from the command line: a Birdeye-compatible API on loopback for demos and
//! manual tests. `birdeye-sim --help` lists the options.

use std::time::Duration;

use anyhow::Context;
use birdeye_sim::{NumberStyle, Simulator, UnknownTokens};
use clap::Parser;

/// A Birdeye-compatible price API with simulated prices and injectable faults.
#[derive(Debug, Parser)]
#[command(name = "birdeye-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787", env = "BIRDEYE_SIM_LISTEN")]
    listen: String,
    /// Accepted API keys, comma separated (others get 401). Empty: any non-empty key.
    #[arg(long, value_delimiter = ',')]
    keys: Vec<String>,
    /// A key answered 403 (repeatable).
    #[arg(long)]
    forbidden_key: Vec<String>,
    /// Requests per second allowed per key; more get 429 with Retry-After.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Share of requests answered 500/503, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Milliseconds added before every answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Prices stop moving.
    #[arg(long)]
    frozen: bool,
    /// Move every price of this instance by this many percent.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    offset_percent: f64,
    /// Answer price requests with 200 and `"success": false`.
    #[arg(long)]
    unsuccessful: bool,
    /// Addresses answered null, comma separated.
    #[arg(long, value_delimiter = ',')]
    null_tokens: Vec<String>,
    /// Addresses left out of answers, comma separated.
    #[arg(long, value_delimiter = ',')]
    missing_tokens: Vec<String>,
    /// Leave unknown addresses out of multi-price answers instead of answering null.
    #[arg(long)]
    unknown_missing: bool,
    /// How prices are written: python (1.6e-05), javascript (0.000016) or plain.
    #[arg(long, default_value = "python")]
    number_style: NumberStyle,
    /// Seed of the price walk and of the fault dice.
    #[arg(long, default_value_t = 0x6d65_7368)]
    seed: u64,
    /// Milliseconds between two steps of the price walk.
    #[arg(long, default_value_t = 1000)]
    tick_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut builder = Simulator::builder()
        .keys(args.keys)
        .error_rate(args.error_rate)
        .latency(Duration::from_millis(args.latency_ms))
        .frozen(args.frozen)
        .offset_percent(args.offset_percent)
        .unsuccessful(args.unsuccessful)
        .null_tokens(args.null_tokens)
        .missing_tokens(args.missing_tokens)
        .number_style(args.number_style)
        .seed(args.seed)
        .tick(Duration::from_millis(args.tick_ms));
    for key in args.forbidden_key {
        builder = builder.forbidden_key(key);
    }
    if let Some(limit) = args.rate_limit {
        builder = builder.rate_limit(limit);
    }
    if args.unknown_missing {
        builder = builder.unknown_tokens(UnknownTokens::Missing);
    }
    let sim = builder.spawn(&args.listen).await.context("starting birdeye-sim")?;
    println!("birdeye-sim listening on {}", sim.base_url());
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    sim.shutdown().await;
    Ok(())
}
