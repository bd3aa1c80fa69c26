//! Node benchmark: round start to price in every consumer's book on a mesh of full nodes, and
//! the memory of an idle consumer process.
//!
//! The mesh is `mesh_testkit::LocalMesh` (one provider, the other nodes consumers, bootstrap
//! from the first nodes, peer exchange and the peer manager shape the rest). Latency of a
//! consumer for a round is the time from the round's start (`round × interval`) to the
//! consumer's first price event of that round. The idle RSS is read from `/proc/<pid>/status`
//! of a real `mesh-node` process next to this binary (build it with
//! `cargo build --release -p mesh-node`).

use std::collections::HashMap;
use std::time::Duration;

use mesh_ipc::{Event, Handler};
use mesh_testkit::LocalMesh;
use serde_json::json;

use crate::report::{Figure, Report};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes in the mesh (one provider, the rest consumers).
    #[arg(long, default_value_t = 20)]
    pub nodes: usize,
    /// Rounds to measure.
    #[arg(long, default_value_t = 6)]
    pub rounds: u64,
    /// Round length in seconds.
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
    /// Skip the idle-process memory measurement.
    #[arg(long)]
    pub no_rss: bool,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (latencies, coverage) = rt.block_on(latency(args))?;
    let rss = if args.no_rss { None } else { Some(idle_rss_mb()?) };
    let mut figures = vec![
        Figure::plain("round_start_to_consumer_p50_ms", percentile(&latencies, 0.50), "ms"),
        Figure::plain("round_start_to_consumer_p99_ms", percentile(&latencies, 0.99), "ms"),
        Figure::plain("round_start_to_consumer_max_ms", percentile(&latencies, 1.0), "ms"),
        Figure::at_least("delivery_ratio", coverage, "ratio", 1.0),
    ];
    if let Some(rss) = rss {
        figures.push(Figure::at_most("idle_consumer_rss_mb", rss, "MiB", 32.0));
    }
    Ok(Report {
        bench: "node",
        params: json!({ "nodes": args.nodes, "rounds": args.rounds, "interval_secs": args.interval, "samples": latencies.len() }),
        figures,
    })
}

async fn latency(args: &Args) -> anyhow::Result<(Vec<f64>, f64)> {
    let consumers = args.nodes.saturating_sub(1).max(1);
    let mesh = LocalMesh::builder()
        .providers(1)
        .consumers(consumers)
        .rounds(args.interval, 1)
        .start()
        .await?;
    let interval_ms = args.interval as i64 * 1000;
    // Wait until every consumer has a first price, so the measured rounds run on a formed mesh.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while (1..mesh.len()).any(|i| mesh.node(i).is_none_or(|n| n.prices().is_empty())) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the mesh did not form within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start_round = mesh_service::now_ms() / interval_ms + 1;
    let end_round = start_round + args.rounds as i64;
    let mut tasks = Vec::new();
    for i in 1..mesh.len() {
        let mut events = mesh.running(i)?.shared().events();
        tasks.push(tokio::spawn(async move {
            let mut first: HashMap<i64, i64> = HashMap::new();
            let until = tokio::time::Instant::now()
                + Duration::from_millis(((end_round - start_round + 2) * interval_ms) as u64);
            while tokio::time::Instant::now() < until {
                let event = tokio::select! {
                    e = events.recv() => e,
                    () = tokio::time::sleep_until(until) => break,
                };
                if let Ok(Event::Price(p)) = event {
                    let now = mesh_service::now_ms();
                    let round = p.timestamp_ms / interval_ms;
                    if (start_round..end_round).contains(&round) {
                        first.entry(round).or_insert(now - round * interval_ms);
                    }
                }
            }
            first
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await?.into_values().map(|ms| ms as f64));
    }
    let expected = (mesh.len() - 1) as f64 * args.rounds as f64;
    let coverage = latencies.len() as f64 / expected;
    mesh.shutdown().await?;
    latencies.sort_by(f64::total_cmp);
    Ok((latencies, coverage))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Starts `mesh-node` (the binary next to this one) as a consumer with no peers, lets it
/// settle, and reads its resident memory.
fn idle_rss_mb() -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("mesh-node");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with cargo build --release -p mesh-node",
        bin.display()
    );
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = std::process::Command::new(&bin)
        .env_clear()
        .env("MESH_DATA_DIR", dir.path())
        .env("MESH_LOG_DIR", dir.path().join("logs"))
        .env("MESH_LISTEN_ADDRS", format!("/ip4/127.0.0.1/tcp/{port}"))
        .env("MESH_ALLOW_PRIVATE_ADDRS", "true")
        .env("MESH_MDNS_ENABLED", "false")
        .env("MESH_METRICS_LISTEN", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(5));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let status = status?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc status"))?;
    Ok(kb / 1024.0)
}
