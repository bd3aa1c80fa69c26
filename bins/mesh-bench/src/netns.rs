//! Real link latency (issue 9 point 4): `--nodes` real `mesh-node` processes, each in a
//! network namespace of its own, joined by point-to-point links with `--delay-ms` of delay
//! and `--loss-percent` of loss in each direction. Node 0 is a provider fed by a `birdeye-sim`
//! inside its namespace; the others are consumers. The links form a ring with chords (node i
//! also linked to i + n/2), so the diameter is known; each node bootstraps from its direct
//! neighbours only and has no route elsewhere, so the mesh is the physical graph.
//!
//! Links are veth pairs with `tc qdisc add dev <veth> root netem delay .. loss ..` on both
//! ends when the kernel has `sch_netem`; otherwise (`--links auto` falls back, or `--links
//! tun`) each link is a pair of TUN devices and this process carries the packets between
//! them with the same delay and loss (see the `tun` module). The namespaces are named
//! `meshbench-<pid>-<i>`, addresses are 10.77.x.y/30 inside them only, mDNS is off, and
//! everything is removed at the end, also on failure; `mesh-bench netns --cleanup` removes
//! what a killed run left. Needs root and iproute2.
//!
//! The benchmark subscribes to every node's IPC socket (Unix sockets are not bound to a
//! network namespace) and records, per node and round, when the first price event of the
//! round arrived. Propagation of a round to a consumer is that time minus the provider's own
//! (the provider's book takes its batch when it broadcasts it); it is compared with the
//! diameter × the link delay. Delivery: rounds the provider published that reached each
//! consumer.
//!
//! Run with `cargo build --release -p mesh-node -p birdeye-sim && cargo run --release -p
//! mesh-bench -- netns` (about three minutes: rounds are at least 10 s).

mod lab;
mod tun;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mesh_ipc::Event;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use lab::Lab;
pub use lab::LinkKind;

use crate::relay::{load_average, percentile};
use crate::report::{Figure, Report};

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Node processes (one provider, the rest consumers).
    #[arg(long, default_value_t = 16)]
    pub nodes: usize,
    /// Rounds measured.
    #[arg(long, default_value_t = 12)]
    pub rounds: i64,
    /// Round length (`MESH_PROVIDER_FETCH_INTERVAL_SECS`, at least 10).
    #[arg(long, default_value_t = 10)]
    pub interval: u64,
    /// One-way delay of every link, each direction, milliseconds.
    #[arg(long, default_value_t = 50)]
    pub delay_ms: u64,
    /// Packet loss of every link, each direction, percent.
    #[arg(long, default_value_t = 1.0)]
    pub loss_percent: f64,
    /// How links delay and drop packets.
    #[arg(long, value_enum, default_value_t = LinkKind::Auto)]
    pub links: LinkKind,
    /// TCP congestion control inside the namespaces (`cubic`, `bbr`, `reno`; default: the
    /// system's, which new namespaces inherit).
    #[arg(long)]
    pub tcp_congestion: Option<String>,
    /// Only remove the namespaces and processes a killed run left behind, then exit.
    #[arg(long)]
    pub cleanup: bool,
}

/// The port every node listens on inside its namespace.
const NODE_PORT: u16 = 4001;
/// The simulator's address inside the provider's namespace.
const SIM_ADDR: &str = "127.0.0.1:18787";
/// The simulator's accepted key.
const SIM_KEY: &str = "netns-bench-key";

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    if args.cleanup {
        let removed = lab::cleanup()?;
        return Ok(Report {
            bench: "netns",
            params: json!({ "cleanup": true, "namespaces_removed": removed }),
            figures: Vec::new(),
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(measure(args))
}

/// Ring of `n` plus chords `i - (i + n/2)`; sorted pairs `(a, b)` with `a < b`.
pub fn ring_with_chords(n: usize) -> Vec<(usize, usize)> {
    let mut edges = BTreeSet::new();
    for i in 0..n {
        let j = (i + 1) % n;
        edges.insert((i.min(j), i.max(j)));
    }
    if n >= 6 {
        for i in 0..n / 2 {
            edges.insert((i, i + n / 2));
        }
    }
    edges.into_iter().collect()
}

/// Hop distance of every node from `from`.
fn hops_from(n: usize, edges: &[(usize, usize)], from: usize) -> Vec<usize> {
    let mut dist = vec![usize::MAX; n];
    dist[from] = 0;
    for _ in 0..n {
        for &(a, b) in edges {
            if dist[a] != usize::MAX && dist[b] > dist[a] + 1 {
                dist[b] = dist[a] + 1;
            }
            if dist[b] != usize::MAX && dist[a] > dist[b] + 1 {
                dist[a] = dist[b] + 1;
            }
        }
    }
    dist
}

/// Wall clock in microseconds.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A binary next to this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        bin.exists(),
        "{} not found: cargo build --release -p mesh-node -p birdeye-sim",
        bin.display()
    );
    Ok(bin)
}

async fn measure(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!((3..=64).contains(&args.nodes), "--nodes must be 3..=64");
    anyhow::ensure!(args.interval >= 10, "--interval must be at least 10 (the node's minimum)");
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let node_bin = sibling("mesh-node")?;
    let sim_bin = sibling("birdeye-sim")?;
    let load_before = load_average();
    let started = std::time::Instant::now();
    let dir = tempfile::Builder::new().prefix("meshbench-netns").tempdir()?;
    let mut lab = Lab::new(args.nodes)?;
    let result = measure_in(args, &mut lab, dir.path(), &node_bin, &sim_bin).await;
    let link_stats = json!({
        "packets_forwarded": lab.link_stats.forwarded.load(Ordering::Relaxed),
        "packets_lost": lab.link_stats.lost.load(Ordering::Relaxed),
        "packets_dropped_queue": lab.link_stats.overflow.load(Ordering::Relaxed),
    });
    let commands = lab.commands.clone();
    lab.shutdown().await;
    let (figures, mut params) = match result {
        Ok(r) => r,
        Err(e) => {
            // The nodes' own words help more than ours: the provider's and one consumer's.
            for i in [0, args.nodes - 1] {
                let log = dir.path().join(format!("n{i}")).join("stdout.log");
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    eprintln!("--- {} (last lines)", log.display());
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
            return Err(e);
        }
    };
    params["emulated_links"] = link_stats;
    params["link_commands_sample"] = json!(commands.iter().take(6).collect::<Vec<_>>());
    params["load_average_before"] = json!(load_before);
    params["load_average_after"] = json!(load_average());
    params["elapsed_secs"] = json!(started.elapsed().as_secs_f64());
    Ok(Report { bench: "netns", params, figures })
}

async fn measure_in(
    args: &Args,
    lab: &mut Lab,
    dir: &Path,
    node_bin: &Path,
    sim_bin: &Path,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let n = args.nodes;
    let kind = match args.links {
        LinkKind::Auto if lab.netem_available()? => LinkKind::Netem,
        LinkKind::Auto => LinkKind::Tun,
        k => k,
    };
    let delay = Duration::from_millis(args.delay_ms);
    let congestion = lab.congestion_control(args.tcp_congestion.as_deref())?;
    let edges = ring_with_chords(n);
    let (diameter, ecc) = crate::scale::distances(n, &edges, &[0]);
    let hops = hops_from(n, &edges, 0);
    // Each node's address on each of its links, to bootstrap its neighbours from.
    let mut neighbours: Vec<Vec<(usize, String)>> = vec![Vec::new(); n];
    for (k, &(a, b)) in edges.iter().enumerate() {
        let (addr_a, addr_b) = lab.link(kind, k, (a, b), delay, args.loss_percent)?;
        neighbours[a].push((b, addr_b));
        neighbours[b].push((a, addr_a));
    }

    let mut peer_ids = Vec::new();
    for i in 0..n {
        let data = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&data)?;
        let out = Command::new(node_bin)
            .current_dir(&data)
            .env_clear()
            .arg("--data-dir")
            .arg(&data)
            .arg("id")
            .output()?;
        anyhow::ensure!(out.status.success(), "mesh-node id failed for node {i}");
        let text = String::from_utf8_lossy(&out.stdout);
        let peer = text
            .lines()
            .find_map(|l| l.strip_prefix("peer_id:"))
            .map(|p| p.trim().to_owned())
            .ok_or_else(|| anyhow::anyhow!("no peer_id in mesh-node id output: {text}"))?;
        peer_ids.push(peer);
    }

    let sim_dir = dir.join("sim");
    std::fs::create_dir_all(&sim_dir)?;
    let mut sim = Command::new(sim_bin);
    sim.current_dir(&sim_dir).args(["--listen", SIM_ADDR, "--keys", SIM_KEY]);
    lab.spawn(0, sim)?;

    for (i, links) in neighbours.iter().enumerate() {
        let data = dir.join(format!("n{i}"));
        let bootstrap: Vec<String> = links
            .iter()
            .map(|(j, addr)| format!("/ip4/{addr}/tcp/{NODE_PORT}/p2p/{}", peer_ids[*j]))
            .collect();
        let mut node = Command::new(node_bin);
        node.current_dir(&data)
            .env("MESH_DATA_DIR", &data)
            .env("MESH_NODE_SOCKET", data.join("node.sock"))
            .env("MESH_LOG_DIR", data.join("logs"))
            .env("MESH_LISTEN_ADDRS", format!("/ip4/0.0.0.0/tcp/{NODE_PORT}"))
            // The namespaces' addresses are private ones.
            .env("MESH_ALLOW_PRIVATE_ADDRS", "true")
            .env("MESH_BOOTSTRAP_PEERS", bootstrap.join(","))
            .env("MESH_MDNS_ENABLED", "false")
            .env("MESH_METRICS_LISTEN", "off")
            .env("MESH_MIN_PEER_CONNECTIONS", "2")
            .env("MESH_PROVIDER_FETCH_INTERVAL_SECS", args.interval.to_string())
            .env("MESH_COORDINATION_WINDOW_SECS", "2");
        if i == 0 {
            node.arg("--provider")
                .env("BIRDEYE_API_KEY", SIM_KEY)
                .env("MESH_BIRDEYE_BASE_URL", format!("http://{SIM_ADDR}"));
        }
        lab.spawn(i, node)?;
    }

    // Follow every node's events from now on.
    let interval_us = args.interval as i64 * 1_000_000;
    let stop = CancellationToken::new();
    let firsts: Arc<std::sync::Mutex<Vec<HashMap<i64, i64>>>> =
        Arc::new(std::sync::Mutex::new(vec![HashMap::new(); n]));
    let mut tasks = Vec::new();
    for i in 0..n {
        let socket = dir.join(format!("n{i}")).join("node.sock");
        tasks.push(tokio::spawn(follow(i, socket, interval_us, firsts.clone(), stop.clone())));
    }
    let lock = |f: &std::sync::Mutex<Vec<HashMap<i64, i64>>>| {
        f.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    };

    // The mesh has formed when every node holds a price of some round.
    let formed_by = Instant::now() + Duration::from_secs(3 * args.interval + 60);
    let formed_in = Instant::now();
    while lock(&firsts).iter().any(HashMap::is_empty) {
        if Instant::now() >= formed_by {
            stop.cancel();
            let missing: Vec<usize> = lock(&firsts)
                .iter()
                .enumerate()
                .filter(|(_, f)| f.is_empty())
                .map(|(i, _)| i)
                .collect();
            anyhow::bail!("nodes {missing:?} had no price within {} s", 3 * args.interval + 60);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let formed_secs = formed_in.elapsed().as_secs_f64();
    let start_round = now_us() / interval_us + 1;
    let end_round = start_round + args.rounds;
    let wait_us = ((end_round + 1) * interval_us - now_us()).max(0) as u64;
    tokio::time::sleep(Duration::from_micros(wait_us)).await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let firsts = lock(&firsts);

    let mut propagation = Vec::new();
    let mut from_round_start = Vec::new();
    let mut by_hops: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let (mut delivered, mut expected, mut published) = (0u64, 0u64, 0u64);
    for r in start_round..end_round {
        let Some(&p) = firsts[0].get(&r) else { continue };
        published += 1;
        for i in 1..n {
            expected += 1;
            if let Some(&t) = firsts[i].get(&r) {
                delivered += 1;
                let ms = (t - p) as f64 / 1e3;
                propagation.push(ms);
                by_hops.entry(hops[i]).or_default().push(ms);
                from_round_start.push(t as f64 / 1e3);
            }
        }
    }
    let bound_ms = (diameter as u64 * args.delay_ms) as f64;
    let p99 = percentile(&propagation, 0.99);
    let figures = vec![
        Figure::at_least(
            "delivery_ratio",
            if expected == 0 { 0.0 } else { delivered as f64 / expected as f64 },
            "ratio",
            1.0,
        ),
        Figure::at_least("rounds_published", published as f64, "rounds", args.rounds as f64),
        Figure::plain("propagation_p50", percentile(&propagation, 0.5), "ms"),
        Figure::plain("propagation_p99", p99, "ms"),
        Figure::plain("propagation_max", percentile(&propagation, 1.0), "ms"),
        Figure::plain("diameter_x_link_delay", bound_ms, "ms"),
        Figure::plain("propagation_p99_over_diameter_x_delay", p99 / bound_ms.max(1.0), "x"),
        Figure::plain("round_start_to_consumer_p50", percentile(&from_round_start, 0.5), "ms"),
        Figure::plain("round_start_to_consumer_p99", percentile(&from_round_start, 0.99), "ms"),
        Figure::plain("mesh_formed_after", formed_secs, "s"),
    ];
    let per_hop: serde_json::Map<String, serde_json::Value> = by_hops
        .iter()
        .map(|(h, v)| {
            (
                format!("{h}_hops"),
                json!({
                    "samples": v.len(),
                    "p50_ms": percentile(v, 0.5),
                    "p99_ms": percentile(v, 0.99),
                    "max_ms": percentile(v, 1.0),
                    "bound_ms": (*h as u64 * args.delay_ms),
                }),
            )
        })
        .collect();
    let params = json!({
        "nodes": n,
        "providers": 1,
        "topology": format!("ring of {n} with chords i-(i+{})", n / 2),
        "links": edges.len(),
        "diameter_hops": diameter,
        "provider_eccentricity_hops": ecc.first(),
        "link_kind": kind,
        "tcp_congestion_control": congestion,
        "delay_ms_each_direction": args.delay_ms,
        "loss_percent_each_direction": args.loss_percent,
        "rounds": args.rounds,
        "interval_secs": args.interval,
        "samples": propagation.len(),
        "propagation_by_hop_distance": per_hop,
        "binary": node_bin.display().to_string(),
        "clock": "wall clock of this machine (every process shares it), microseconds; \
            events read from each node's IPC socket",
    });
    Ok((figures, params))
}

/// Subscribes to node `i` (retrying until its socket answers) and records when the first
/// price event of each round arrived, in µs after the round's start.
async fn follow(
    i: usize,
    socket: PathBuf,
    interval_us: i64,
    firsts: Arc<std::sync::Mutex<Vec<HashMap<i64, i64>>>>,
    stop: CancellationToken,
) {
    let client = mesh_ipc::Client::new(&socket).with_timeout(Duration::from_secs(5));
    // Reconnect when the stream ends (bounded by `stop`).
    while !stop.is_cancelled() {
        let mut subscription = match client.subscribe().await {
            Ok(s) => s,
            Err(_) => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                e = subscription.next() => e,
            };
            match event {
                Ok(Some(Event::Price(p))) => {
                    let at = now_us();
                    let round = p.timestamp_ms * 1000 / interval_us;
                    let mut all = firsts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    all[i].entry(round).or_insert(at - round * interval_us);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{hops_from, ring_with_chords};

    #[test]
    fn ring_with_chords_has_degree_three_and_a_short_diameter() {
        let edges = ring_with_chords(16);
        assert_eq!(edges.len(), 24);
        let (diameter, _) = crate::scale::distances(16, &edges, &[0]);
        assert_eq!(diameter, 4);
        let hops = hops_from(16, &edges, 0);
        assert_eq!(hops[8], 1);
        assert_eq!(hops.iter().max(), Some(&4));
    }
}
