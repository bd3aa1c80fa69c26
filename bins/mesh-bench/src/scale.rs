//! Scale benchmark (issue 9 point 3): `--nodes` relays (1,000 by default) in one process on
//! libp2p's memory transport, linked in one random `--degree`-regular graph, carry a stream
//! of signed 50-price batches from `--providers` provider keys, each attached to a different
//! node. The same net carries one stream per `--ttls` value (the configuration default 10,
//! then the hop-TTL trap case 5 of PITFALLS.md); the streams follow each other, so each TTL is
//! measured alone.
//!
//! Per message: the time from the publish call to the first delivery at 99 % and at 100 % of
//! the other nodes (p50/p99/max over messages). Per stream: the delivery ratio, every
//! (node, message) pair that was never delivered (every node is live, so each one is a loss),
//! copies received per node per message, duplicates re-forwarded because they carried more
//! TTL, queue drops, and the process CPU time per message (from `/proc/self/stat`, the whole
//! process: 1,000 relays and this harness). Memory: process RSS growth over the build divided
//! by the number of nodes.
//!
//! Run with `cargo run --release -p mesh-bench -- scale` (about 3 minutes on two cores).

use std::collections::VecDeque;
use std::time::Duration;

use mesh_protocol::{Envelope, Identity, MessageId};
use mesh_relay::StatsSnapshot;
use mesh_testkit::{TestNet, Topology};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};

use crate::relay::{cpu_time, load_average, percentile, rss_bytes};
use crate::report::{Figure, Report};

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Nodes in the network.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    /// Links per node (random regular graph).
    #[arg(long, default_value_t = 8)]
    pub degree: usize,
    /// Provider keys publishing, each from its own node, in turn.
    #[arg(long, default_value_t = 5)]
    pub providers: usize,
    /// Batches published per TTL.
    #[arg(long, default_value_t = 60)]
    pub batches: usize,
    /// Prices per batch.
    #[arg(long, default_value_t = 50)]
    pub prices: usize,
    /// Batches published per second (all providers together).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// The TTLs to measure, one stream each, in this order.
    #[arg(long, value_delimiter = ',', default_value = "10,5")]
    pub ttls: Vec<u8>,
    /// Seed of the graph and of the providers' nodes.
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    /// How long to wait for the last deliveries after the last publish of a stream, seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Our relay's lazy-push settings.
    #[command(flatten)]
    pub lazy: crate::relay::LazyArgs,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(measure(args))
}

/// What one stream (one TTL) achieved.
#[derive(Debug, Default)]
struct Stream {
    ttl: u8,
    /// Publish to the 99 % coverage point, per message that reached 99 %, ms.
    to_99: Vec<f64>,
    /// Publish to the last node, per message that reached every node, ms.
    to_100: Vec<f64>,
    delivered: u64,
    expected: u64,
    /// Messages some node never delivered.
    incomplete: usize,
    /// Most nodes that missed one message.
    worst_missing: usize,
    /// Largest hop count of a first delivery.
    max_first_hops: u8,
    cpu: Duration,
    publish_secs: f64,
    complete_secs: f64,
    stats: StatsSnapshot,
}

async fn measure(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.nodes > args.degree, "--nodes must exceed --degree");
    anyhow::ensure!((1..=args.nodes).contains(&args.providers), "--providers must be 1..=--nodes");
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(!args.ttls.is_empty(), "--ttls is empty");
    let load_before = load_average();
    let started = std::time::Instant::now();

    // Provider keys and the distinct nodes they publish from.
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5ca1e);
    let mut order: Vec<usize> = (0..args.nodes).collect();
    order.shuffle(&mut rng);
    let hosts: Vec<usize> = order[..args.providers].to_vec();
    let keys: Vec<Identity> = (0..args.providers).map(|p| provider_key(args.seed, p)).collect();
    // Every message of every stream signed up front; timestamps rise across streams (a
    // provider's later batch must be newer than any earlier one) and stay in the past.
    let total = args.batches * args.ttls.len();
    let base = mesh_testkit::now_ms() - total as i64 - 1_000;
    let mut streams_msgs = Vec::new();
    for (s, &ttl) in args.ttls.iter().enumerate() {
        let mut msgs = Vec::with_capacity(args.batches);
        for k in 0..args.batches {
            let n = s * args.batches + k;
            let p = n % args.providers;
            let envelope =
                mesh_testkit::price_batch(&keys[p], n as u64, base + n as i64, args.prices, ttl)?;
            msgs.push((hosts[p], envelope));
        }
        streams_msgs.push((ttl, msgs));
    }

    let topology = Topology::RandomRegular { degree: args.degree };
    let edges = topology.edges(args.nodes, args.seed)?;
    let (diameter, eccentricities) = distances(args.nodes, &edges, &hosts);
    let rss_before = rss_bytes()?;
    let build_started = Instant::now();
    let lazy = args.lazy.lazy_push();
    let net = TestNet::builder()
        .nodes(args.nodes)
        .topology(topology)
        .seed(args.seed)
        .configure(move |_, config| config.lazy = lazy)
        .build()
        .await?;
    let build_secs = build_started.elapsed().as_secs_f64();
    let rss_built = rss_bytes()?;
    let connected = net.nodes().iter().filter_map(|n| n.relay()).map(|r| r.connected_peers());
    let (min_peers, max_peers) =
        connected.fold((usize::MAX, 0), |(lo, hi), c| (lo.min(c), hi.max(c)));

    let mut streams = Vec::new();
    for (ttl, msgs) in &streams_msgs {
        streams.push(run_stream(args, &net, *ttl, msgs).await?);
    }
    let rss_traffic = rss_bytes()?;
    net.shutdown().await;

    let n = args.nodes as f64;
    let mut figures = vec![
        Figure::plain(
            "rss_per_node_after_build",
            (rss_built.saturating_sub(rss_before)) as f64 / n / 1024.0,
            "KiB",
        ),
        Figure::plain(
            "rss_per_node_after_traffic",
            (rss_traffic.saturating_sub(rss_before)) as f64 / n / 1024.0,
            "KiB",
        ),
        Figure::plain("build_secs", build_secs, "s"),
        Figure::plain("graph_diameter", diameter as f64, "hops"),
    ];
    let mut details = serde_json::Map::new();
    for s in &streams {
        figures.extend(stream_figures(s, args));
        details.insert(format!("ttl{}", s.ttl), stream_details(s));
    }
    Ok(Report {
        bench: "scale",
        params: json!({
            "nodes": args.nodes,
            "degree": args.degree,
            "edges": edges.len(),
            "providers": args.providers,
            "provider_nodes": hosts,
            "provider_eccentricity_hops": eccentricities,
            "graph_diameter_hops": diameter,
            "peers_per_node_min_max": [min_peers, max_peers],
            "batches_per_ttl": args.batches,
            "prices_per_batch": args.prices,
            "rate_batches_per_sec": args.rate,
            "ttls": args.ttls,
            "lazy_push": args.lazy.params(),
            "seed": args.seed,
            "transport": "libp2p memory transport + noise + yamux, one process",
            "cpu_counts": "whole process (all relays and this harness), user + system, \
                from the first publish of a stream until its last delivery",
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "elapsed_secs": started.elapsed().as_secs_f64(),
            "details": details,
        }),
        figures,
    })
}

/// Publishes one stream, waits for it, and measures it.
async fn run_stream(
    args: &Args,
    net: &TestNet,
    ttl: u8,
    msgs: &[(usize, Envelope)],
) -> anyhow::Result<Stream> {
    let stats_before = sum_stats(net);
    let delivered_before: usize =
        net.nodes().iter().map(mesh_testkit::TestNode::received_count).sum();
    let ids: Vec<MessageId> = msgs.iter().map(|(_, e)| e.message_id()).collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let cpu_before = cpu_time()?;
    let first = Instant::now();
    let mut published_at = Vec::with_capacity(msgs.len());
    for (host, envelope) in msgs {
        tick.tick().await;
        let at = Instant::now();
        net.publish(*host, envelope).await?;
        published_at.push(at);
    }
    let publish_secs = first.elapsed().as_secs_f64();
    // Every node delivers every message once (the publisher its own).
    let target = delivered_before + args.nodes * msgs.len();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    loop {
        let now: usize = net.nodes().iter().map(mesh_testkit::TestNode::received_count).sum();
        if now >= target || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let complete_secs = first.elapsed().as_secs_f64();
    let cpu = cpu_time()?.saturating_sub(cpu_before);
    // Let the last duplicates land before reading the counters (bounded).
    let settle = Instant::now() + Duration::from_secs(5);
    loop {
        let s = sum_stats(net);
        let gone = s.frames_sent + s.dropped_stream_lost + s.suppressed;
        if s.frames_queued == gone || Instant::now() >= settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let others = (args.nodes - 1) as u64;
    let mut stream = Stream {
        ttl,
        expected: others * msgs.len() as u64,
        cpu,
        publish_secs,
        complete_secs,
        stats: diff(&sum_stats(net), &stats_before),
        ..Stream::default()
    };
    // The node that holds the 99 % mark among the others.
    let rank99 = ((0.99 * others as f64).ceil() as usize).max(1);
    for (k, id) in ids.iter().enumerate() {
        let publisher = msgs[k].0;
        let mut arrivals: Vec<Instant> = Vec::with_capacity(args.nodes);
        for node in net.nodes().iter().filter(|n| n.index != publisher) {
            if let Some(r) = node.received(id) {
                arrivals.push(r.at);
                stream.max_first_hops = stream.max_first_hops.max(r.hop_count);
            }
        }
        stream.delivered += arrivals.len() as u64;
        let missing = others as usize - arrivals.len();
        if missing > 0 {
            stream.incomplete += 1;
            stream.worst_missing = stream.worst_missing.max(missing);
        }
        arrivals.sort();
        let ms = |at: Instant| at.saturating_duration_since(published_at[k]).as_secs_f64() * 1e3;
        if arrivals.len() >= rank99 {
            stream.to_99.push(ms(arrivals[rank99 - 1]));
        }
        if missing == 0
            && let Some(&last) = arrivals.last()
        {
            stream.to_100.push(ms(last));
        }
    }
    Ok(stream)
}

fn stream_figures(s: &Stream, args: &Args) -> Vec<Figure> {
    let p = |name: &str| format!("ttl{}_{name}", s.ttl);
    let m = args.batches as f64;
    let n = args.nodes as f64;
    let copies = copies_received(&s.stats) as f64 / (n * m);
    vec![
        Figure::at_least(p("delivery_ratio"), ratio(s.delivered, s.expected), "ratio", 1.0),
        Figure::at_most(
            p("missed_deliveries"),
            (s.expected - s.delivered) as f64,
            "node-messages",
            0.0,
        ),
        Figure::at_most(p("incomplete_messages"), s.incomplete as f64, "messages", 0.0),
        Figure::plain(p("to_99pct_p50"), percentile(&s.to_99, 0.5), "ms"),
        Figure::plain(p("to_99pct_p99"), percentile(&s.to_99, 0.99), "ms"),
        Figure::plain(p("to_99pct_max"), percentile(&s.to_99, 1.0), "ms"),
        Figure::plain(p("to_100pct_p50"), percentile(&s.to_100, 0.5), "ms"),
        Figure::at_most(p("to_100pct_p99"), percentile(&s.to_100, 0.99), "ms", 1000.0),
        Figure::plain(p("to_100pct_max"), percentile(&s.to_100, 1.0), "ms"),
        Figure::plain(p("copies_per_node_per_message"), copies, "copies"),
        Figure::plain(p("reforwarded_per_message"), s.stats.reforwarded as f64 / m, "copies"),
        Figure::plain(p("max_first_copy_hops"), f64::from(s.max_first_hops), "hops"),
        Figure::at_most(p("queue_full_drops"), s.stats.dropped_queue_full as f64, "frames", 0.0),
        Figure::plain(p("cpu_per_message"), s.cpu.as_secs_f64() * 1e3 / m, "ms"),
        Figure::plain(p("cpu_per_message_per_node"), s.cpu.as_secs_f64() * 1e6 / (m * n), "us"),
    ]
}

fn stream_details(s: &Stream) -> serde_json::Value {
    json!({
        "delivered": s.delivered,
        "expected": s.expected,
        "incomplete_messages": s.incomplete,
        "most_nodes_missing_one_message": s.worst_missing,
        "messages_reaching_99pct": s.to_99.len(),
        "publish_secs": s.publish_secs,
        "complete_secs": s.complete_secs,
        "cpu_secs": s.cpu.as_secs_f64(),
        "delivered_by_relays": s.stats.delivered,
        "duplicates": s.stats.duplicates,
        "reforwarded": s.stats.reforwarded,
        "stale": s.stats.stale,
        "rejected": s.stats.rejected_total(),
        "frames_sent": s.stats.frames_sent,
        "bytes_sent": s.stats.bytes_sent,
        "dropped_queue_full": s.stats.dropped_queue_full,
        "dropped_subscriber": s.stats.dropped_subscriber,
        "dropped_stream_lost": s.stats.dropped_stream_lost,
    })
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Every copy a node received: first copies and duplicates alike.
fn copies_received(s: &StatsSnapshot) -> u64 {
    s.delivered + s.duplicates + s.reforwarded + s.stale + s.rejected_total()
}

/// The counters of every running relay, added up (rejections as one total).
fn sum_stats(net: &TestNet) -> StatsSnapshot {
    let mut t = StatsSnapshot::default();
    let mut rejected = 0;
    for s in net.nodes().iter().filter_map(|n| n.relay().map(mesh_relay::Relay::stats)) {
        t.delivered += s.delivered;
        t.published += s.published;
        t.duplicates += s.duplicates;
        t.reforwarded += s.reforwarded;
        t.stale += s.stale;
        rejected += s.rejected_total();
        t.frames_queued += s.frames_queued;
        t.frames_sent += s.frames_sent;
        t.bytes_sent += s.bytes_sent;
        t.dropped_queue_full += s.dropped_queue_full;
        t.dropped_subscriber += s.dropped_subscriber;
        t.dropped_stream_lost += s.dropped_stream_lost;
        t.suppressed += s.suppressed;
        t.haves_sent += s.haves_sent;
        t.wants_sent += s.wants_sent;
    }
    t.rejected = vec![("all", rejected)];
    t
}

/// `a - b`, counter by counter.
fn diff(a: &StatsSnapshot, b: &StatsSnapshot) -> StatsSnapshot {
    StatsSnapshot {
        delivered: a.delivered - b.delivered,
        published: a.published - b.published,
        duplicates: a.duplicates - b.duplicates,
        reforwarded: a.reforwarded - b.reforwarded,
        stale: a.stale - b.stale,
        rejected: vec![("all", a.rejected_total() - b.rejected_total())],
        frames_queued: a.frames_queued - b.frames_queued,
        frames_sent: a.frames_sent - b.frames_sent,
        bytes_sent: a.bytes_sent - b.bytes_sent,
        dropped_queue_full: a.dropped_queue_full - b.dropped_queue_full,
        dropped_subscriber: a.dropped_subscriber - b.dropped_subscriber,
        dropped_stream_lost: a.dropped_stream_lost - b.dropped_stream_lost,
        suppressed: a.suppressed - b.suppressed,
        haves_sent: a.haves_sent - b.haves_sent,
        wants_sent: a.wants_sent - b.wants_sent,
        ..StatsSnapshot::default()
    }
}

/// The graph's diameter, and the eccentricity (farthest node, in hops) of each of `from`.
pub fn distances(n: usize, edges: &[(usize, usize)], from: &[usize]) -> (usize, Vec<usize>) {
    let mut adjacent = vec![Vec::new(); n];
    for &(a, b) in edges {
        adjacent[a].push(b);
        adjacent[b].push(a);
    }
    let eccentricity = |start: usize| -> usize {
        let mut dist = vec![usize::MAX; n];
        dist[start] = 0;
        let mut queue = VecDeque::from([start]);
        let mut far = 0;
        while let Some(v) = queue.pop_front() {
            far = far.max(dist[v]);
            for &w in &adjacent[v] {
                if dist[w] == usize::MAX {
                    dist[w] = dist[v] + 1;
                    queue.push_back(w);
                }
            }
        }
        if dist.contains(&usize::MAX) { usize::MAX } else { far }
    };
    let diameter = (0..n).map(eccentricity).max().unwrap_or(0);
    (diameter, from.iter().map(|&v| eccentricity(v)).collect())
}

/// The signing key of provider `index` (not a node's libp2p key).
fn provider_key(seed: u64, index: usize) -> Identity {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    s[16] = 0x5c;
    Identity::from_seed(s)
}

#[cfg(test)]
mod tests {
    use super::distances;

    #[test]
    fn diameter_of_a_ring_and_a_line() {
        let ring: Vec<(usize, usize)> = (0..8).map(|i| (i, (i + 1) % 8)).collect();
        assert_eq!(distances(8, &ring, &[0]), (4, vec![4]));
        let line: Vec<(usize, usize)> = (0..4).map(|i| (i, i + 1)).collect();
        assert_eq!(distances(5, &line, &[0, 2]), (4, vec![4, 2]));
    }
}
