//! `mesh-node demo`: a local mesh in one process on loopback, with no servers and no
//! internet: a Birdeye simulator, provider nodes and consumer nodes (embedded SQLite stores,
//! bootstrapping from each other, mDNS off), and the HTTP API in front of the first consumer.
//!
//! The terminal shows a banner (what runs where, what to open and curl), then one line per
//! round as the first consumer saw it, and one line when it stops. Each node's full log goes
//! to `<dir>/node<i>/logs/app.log` (the guide's `logs/app.log`, one per node); `--verbose`
//! prints the logs on the terminal too.

use std::path::PathBuf;
use std::time::Duration;

use mesh_ipc::PriceView;
use mesh_service::Node;

use crate::local::{DEMO_API_KEY, LocalMesh};

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Provider nodes.
    #[arg(long, default_value_t = 2)]
    pub providers: usize,
    /// Consumer nodes.
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Round length in seconds.
    #[arg(long, default_value_t = 10)]
    pub interval: u64,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api_listen: std::net::SocketAddr,
    /// Directory for the nodes' data and logs (default: a temporary directory).
    #[arg(long)]
    pub demo_dir: Option<PathBuf>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Use this Redis for coordination (default: none; the mesh coordinates itself).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Also print the nodes' full logs here (they always go to the files the banner names).
    #[arg(short, long)]
    pub verbose: bool,
}

/// Runs the demo until Ctrl-C or SIGTERM (or `--duration`).
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let dir = match &args.demo_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("mesh-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let total = args.providers + args.consumers;
    let node_logs: Vec<PathBuf> =
        (0..total).map(|i| dir.join(format!("node{i}")).join("logs")).collect();
    let _logs = mesh_service::telemetry::init_logs_per_node(
        "info,mesh_relay=warn",
        &node_logs,
        &dir.join("logs"),
        args.verbose,
    )?;
    let metrics = mesh_service::telemetry::init_metrics(None)?;
    let mut builder = LocalMesh::builder()
        .providers(args.providers)
        .consumers(args.consumers)
        .rounds(args.interval, 2.min(args.interval.saturating_sub(1)).max(1))
        .dir(&dir)
        .metrics(metrics);
    if let Some(url) = &args.redis_url {
        builder = builder.redis(url.clone());
    }
    let mesh = builder.start().await?;
    let entry = args.providers.min(mesh.len() - 1); // the first consumer
    let socket = mesh.running(entry)?.socket().to_path_buf();
    let api = mesh_api::ApiServer::start(mesh_api::Config {
        listen: args.api_listen,
        node_socket: socket.clone(),
        ..mesh_api::Config::default()
    })
    .await?;
    let url = format!("http://{}", api.local_addr());

    let sim = &mesh.simulators()[0];
    println!();
    println!("mesh demo: {} providers, {} consumers on loopback", args.providers, args.consumers);
    println!("  Birdeye simulator   {}  (accepts API key {DEMO_API_KEY:?})", sim.base_url());
    for i in 0..mesh.len() {
        let node = mesh.running(i)?;
        let role = if i < args.providers { "provider" } else { "consumer" };
        println!("  node {i} {role:<9} {}  socket {}", node.node_id(), node.socket().display());
    }
    println!("  data                {}", dir.display());
    println!("  logs                {}", dir.join("node<i>/logs/app.log").display());
    println!("  HTTP API of node {entry}   {url}  (socket {})", socket.display());
    println!();
    println!("open   {url}/");
    println!("curl   {url}/api/mesh/prices");
    println!("curl   {url}/api/mesh/network/status");
    println!("curl   {url}/api/mesh/provider/status");
    println!("curl -N {url}/api/mesh/stream");
    println!(
        "curl -X POST {url}/api/mesh/provider/enable -H 'Content-Type: application/json' -d '{{\"api_key\": \"{DEMO_API_KEY}\"}}'"
    );
    println!();
    println!(
        "prices arrive within one round ({} s); one line per round below (as node {entry} sees it); \
         Ctrl-C stops the demo",
        args.interval
    );

    let stop = stop_signal(args.duration);
    tokio::pin!(stop);
    let interval_ms = i64::try_from(args.interval.max(1) * 1000)?;
    loop {
        // Report each round just before it ends: its batches (a takeover's included) have had
        // the whole round to arrive, and the next round's are not there yet.
        let now = crate::now_ms();
        let mut round = now / interval_ms;
        if (round + 1) * interval_ms - REPORT_BEFORE_END_MS <= now {
            round += 1;
        }
        let report_at = (round + 1) * interval_ms - REPORT_BEFORE_END_MS;
        let wait = Duration::from_millis(u64::try_from(report_at - now).unwrap_or(0));
        tokio::select! {
            reason = &mut stop => {
                let reason = reason?;
                let nodes = mesh.len();
                api.shutdown(Duration::from_secs(5)).await;
                let result = mesh.shutdown().await;
                match &result {
                    Ok(()) => println!(
                        "{reason}: stopped {nodes} nodes, the simulator and the API cleanly; logs in {}",
                        dir.display()
                    ),
                    Err(e) => println!("{reason}: stopped, with an error: {e}"),
                }
                return result;
            }
            () = tokio::time::sleep(wait) => {
                if let Some(node) = mesh.node(entry) {
                    let seen = RoundSeen::of(node, round, interval_ms, crate::now_ms());
                    println!("{}", seen.line());
                }
            }
        }
    }
}

/// How long before a round ends its line is printed.
const REPORT_BEFORE_END_MS: i64 = 200;

/// Resolves with what stopped the demo: Ctrl-C, SIGTERM or the end of `--duration`.
async fn stop_signal(duration: Option<u64>) -> anyhow::Result<&'static str> {
    if let Some(secs) = duration {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        return Ok("--duration reached");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map(|()| "Ctrl-C").map_err(Into::into),
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// What one node saw of one round: the demo's line per round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSeen {
    /// The round (`unix_secs / interval`).
    pub round: u64,
    /// Providers whose batch for the round arrived.
    pub providers_heard: usize,
    /// Providers active now.
    pub providers_active: usize,
    /// Assets whose price was taken in this round or later.
    pub assets_updated: usize,
    /// Assets held.
    pub assets_total: usize,
    /// Age in milliseconds of the freshest and of the oldest price held.
    pub ages_ms: Option<(i64, i64)>,
    /// Connected peers.
    pub peers: usize,
}

impl RoundSeen {
    /// What `node` holds for `round` at `now_ms`.
    pub fn of(node: &Node, round: i64, interval_ms: i64, now_ms: i64) -> Self {
        let status = node.network_status();
        let round_u = u64::try_from(round).unwrap_or(0);
        let providers_heard = node
            .rounds_received()
            .into_iter()
            .find(|(r, _)| *r == round_u)
            .map_or(0, |(_, origins)| origins.len());
        let mut seen = Self::from_prices(&node.prices(), round * interval_ms, now_ms);
        seen.round = round_u;
        seen.providers_heard = providers_heard;
        seen.providers_active = status.active_providers.len();
        seen.peers = status.connected_peers;
        seen
    }

    /// The price part of a round's line: prices taken since `round_start_ms`, and the ages.
    pub fn from_prices(prices: &[PriceView], round_start_ms: i64, now_ms: i64) -> Self {
        let newest = prices.iter().map(|p| p.timestamp_ms).max();
        let oldest = prices.iter().map(|p| p.timestamp_ms).min();
        Self {
            round: 0,
            providers_heard: 0,
            providers_active: 0,
            assets_updated: prices.iter().filter(|p| p.timestamp_ms >= round_start_ms).count(),
            assets_total: prices.len(),
            ages_ms: newest.zip(oldest).map(|(n, o)| ((now_ms - n).max(0), (now_ms - o).max(0))),
            peers: 0,
        }
    }

    /// The line, e.g. `round 176432  fetched by 1 of 2 providers  9/9 assets updated  ages
    /// 9.4-9.6 s  3 peers`.
    pub fn line(&self) -> String {
        let secs = |ms: i64| format!("{:.1}", ms as f64 / 1000.0);
        let ages = match self.ages_ms {
            Some((fresh, old)) => format!("ages {}-{} s", secs(fresh), secs(old)),
            None => "no prices yet".to_owned(),
        };
        format!(
            "round {}  fetched by {} of {} providers  {}/{} assets updated  {ages}  {} peers",
            self.round,
            self.providers_heard,
            self.providers_active,
            self.assets_updated,
            self.assets_total,
            self.peers
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(asset: &str, timestamp_ms: i64) -> PriceView {
        serde_json::from_value(serde_json::json!({
            "asset": asset, "blockchain": "solana", "price": "1.5", "change_24h": null,
            "timestamp": "2025-01-01T00:00:00Z", "timestamp_ms": timestamp_ms,
            "source_node_id": "00000000-0000-8000-8000-000000000000", "age_secs": 0,
            "stale": false, "hop_count": 1, "providers_reporting": 1, "providers_agreeing": 1,
            "discrepancy": false
        }))
        .unwrap()
    }

    #[test]
    fn a_rounds_line_counts_updates_and_ages() {
        let prices = [price("A", 10_500), price("B", 10_100), price("C", 1_000)];
        let mut seen = RoundSeen::from_prices(&prices, 10_000, 11_000);
        (seen.round, seen.providers_heard, seen.providers_active, seen.peers) = (1, 1, 2, 3);
        assert_eq!(
            seen.line(),
            "round 1  fetched by 1 of 2 providers  2/3 assets updated  ages 0.5-10.0 s  3 peers"
        );
        let empty = RoundSeen::from_prices(&[], 10_000, 11_000);
        assert_eq!(
            empty.line(),
            "round 0  fetched by 0 of 0 providers  0/0 assets updated  no prices yet  0 peers"
        );
    }
}
