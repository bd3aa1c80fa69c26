//! Relay benchmark (issue 3 point 6, issue 9 point 2): our flood relay and libp2p gossipsub
//! side by side, in one run, on the same random regular graph and with the same signed
//! messages, plus the relay rate of one node and the memory per node.
//!
//! - **Ours**: `--nodes` relays (`mesh_testkit::TestNet`, libp2p memory transport, one
//!   process) on a random `--degree`-regular graph. `--batches` signed 50-price batches are
//!   published at `--rate` batches/s from random nodes; each publishing node signs with a
//!   provider key of its own, and a node publishes again only after every other node has
//!   published once, so that per (provider, asset) timestamps always rise and no batch can be
//!   overtaken by the next one of its provider (which receivers would drop as stale).
//! - **Gossipsub**: the same graph (the same edges dialled in the same direction, no other
//!   connection), mesh_n 6, `ValidationMode::Strict` (every message signed by the publishing
//!   peer), and application validation exactly as strict as ours: each message goes through
//!   `mesh_protocol::Validator` (decode, envelope signature, every rule) and the replay marks
//!   before it is accepted with `report_message_validation_result`. The payload is the same
//!   encoded envelope.
//! - **One node's relay rate**: node A floods distinct valid messages into B as fast as B takes
//!   them (a window on B's delivered count); B validates and forwards them to C, a bare
//!   libp2p peer that only counts frames, so that C's work does not compete with B's for the
//!   two cores.
//!
//! Figures per system: delivery ratio (deliveries at the N - 1 nodes that did not publish the
//! message), publish-to-last-node latency (from the publish call to the first delivery at the
//! last of those nodes) p50/p99/max over messages, copies received per node per message
//! (duplicates included), message bytes sent per node, and the process CPU time per message.
//! Ours also gives `arrival_by_hop` in its details: the first copies by the hop count they
//! carried, with their mean and longest time from the publish call, to see where a message's
//! time goes.
//!
//! Run with `cargo run --release -p mesh-bench -- relay` (100 nodes: about 25 s on two cores)
//! or `-- relay --nodes 300` (about 60 s, or two minutes more when a gossipsub node has to wait
//! out a 60 s prune backoff before its mesh forms: its details give `mesh_formed_secs`);
//! `--skip-gossipsub`, `--skip-ours` and `--skip-relay-rate` run parts alone (for profiling).
//!
//! **Idle CPUs.** On a virtual machine, an idle CPU halts and waking it costs a trip through
//! the hypervisor. A hundred relays in one process sleep and wake many times per message, so at
//! a low rate these wake-ups are a large part of the latency (on the 2-core build VMs, 100
//! nodes deliver faster at 50 batches/s than at 10). `--keep-cpus-awake` runs
//! both systems with a `SCHED_IDLE` spinner per CPU in a child process ([`crate::awake`]): it
//! takes no CPU time from the relays, it only keeps the CPUs from halting. Comparing a run with
//! and without it separates relay work from wake-up cost. `--want-delay-ms` sets our relay's
//! wait before it asks a `HAVE`'s sender for the message (lazy push).

mod gossipsub;
mod one_node;
mod ours;

use std::time::Duration;

use mesh_protocol::{Envelope, Identity, MessageId};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::json;

use crate::report::{Figure, Report};

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Nodes in the network.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Links per node (random regular graph).
    #[arg(long, default_value_t = 8)]
    pub degree: usize,
    /// Batches published.
    #[arg(long, default_value_t = 200)]
    pub batches: usize,
    /// Prices per batch.
    #[arg(long, default_value_t = 50)]
    pub prices: usize,
    /// Batches published per second (all publishers together).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Nodes that publish, each with its own provider key, in turn (0: every node). A mesh
    /// has a few providers; every node publishing is the worst case for per-origin trees
    /// (each origin's first message starts its tree).
    #[arg(long, default_value_t = 0)]
    pub publishers: usize,
    /// TTL of the published messages (ours; gossipsub carries the same bytes).
    #[arg(long, default_value_t = 10)]
    pub ttl: u8,
    /// Seed of the graph and of the choice of publishing nodes.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Gossipsub mesh degree (`mesh_n`); `mesh_n_low`, `mesh_n_high` and `mesh_outbound_min`
    /// follow from it and from `--degree`.
    #[arg(long, default_value_t = 6)]
    pub mesh_n: usize,
    /// How long to wait for every delivery after the last publish, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Messages A sends through B in the one-node relay rate measurement.
    #[arg(long, default_value_t = 40_000)]
    pub relay_messages: usize,
    /// Our relay's lazy-push settings.
    #[command(flatten)]
    pub lazy: LazyArgs,
    /// Keep the CPUs from halting while nothing runs (a `SCHED_IDLE` spinner per CPU in a
    /// child process; see the `awake` module): measures the relays without the hypervisor's
    /// wake-up of idle virtual CPUs. Both systems run under it.
    #[arg(long)]
    pub keep_cpus_awake: bool,
    /// Skip the gossipsub baseline (to profile ours alone).
    #[arg(long)]
    pub skip_gossipsub: bool,
    /// Skip our relay (to profile gossipsub alone).
    #[arg(long)]
    pub skip_ours: bool,
    /// Skip the one-node relay rate measurement.
    #[arg(long)]
    pub skip_relay_rate: bool,
}

/// Our relay's lazy-push options (the relay and scale benchmarks).
#[derive(Debug, Clone, clap::Args)]
pub struct LazyArgs {
    /// Our relay: most peers a relayed message goes to in full (the others get its id and ask
    /// for it when no copy comes). 0 floods: every peer gets every message. Default: every
    /// peer on an eager link (tree push), or 4 with `--no-tree`.
    #[arg(long)]
    pub eager_peers: Option<usize>,
    /// Our relay: no tree push; the peers that get a message in full are picked at random for
    /// each message (the scheme before tree push, for comparison).
    #[arg(long)]
    pub no_tree: bool,
    /// Our relay: how long `HAVE`s are held before they are sent, in milliseconds (default:
    /// the relay's own).
    #[arg(long)]
    pub have_delay_ms: Option<u64>,
    /// Our relay: how long a node that got only `HAVE`s for a message waits for a copy before
    /// it asks for one, in milliseconds (default: the relay's own).
    #[arg(long)]
    pub want_delay_ms: Option<u64>,
}

impl LazyArgs {
    /// The relay settings these options ask for.
    pub fn lazy_push(&self) -> mesh_relay::LazyPush {
        let mut lazy = mesh_relay::LazyPush::default();
        if self.no_tree {
            lazy.tree = false;
            lazy.eager_peers = 4;
        }
        match self.eager_peers {
            Some(0) => lazy = mesh_relay::LazyPush::FLOOD,
            Some(n) => lazy.eager_peers = n,
            None => {}
        }
        if let Some(ms) = self.have_delay_ms {
            lazy.have_delay = Duration::from_millis(ms);
        }
        if let Some(ms) = self.want_delay_ms {
            lazy.want_delay = Duration::from_millis(ms);
        }
        lazy
    }

    /// The settings as the report's parameters show them.
    pub fn params(&self) -> serde_json::Value {
        let lazy = self.lazy_push();
        let scheme = if !lazy.is_lazy() {
            "flood"
        } else if lazy.tree {
            "tree push"
        } else {
            "random eager peers"
        };
        let eager =
            if lazy.eager_peers == usize::MAX { json!("all") } else { json!(lazy.eager_peers) };
        json!({
            "scheme": scheme,
            "eager_peers": eager,
            "have_delay_ms": lazy.have_delay.as_millis() as u64,
            "want_delay_ms": lazy.want_delay.as_millis() as u64,
        })
    }
}

/// The messages of one run: the same for both systems.
pub struct Workload {
    /// The signed messages, in publishing order.
    pub envelopes: Vec<Envelope>,
    /// The same, encoded (the bytes gossipsub carries).
    pub frames: Vec<Vec<u8>>,
    /// Their ids.
    pub ids: Vec<MessageId>,
    /// Which node publishes each message.
    pub publishers: Vec<usize>,
    /// Whether each message's publisher has published before (its origin is known to the
    /// mesh: tree push has a tree for it).
    pub repeat: Vec<bool>,
    /// Gap between two publishes.
    pub interval: Duration,
}

impl Workload {
    /// Builds and signs every message before anything is timed.
    fn new(args: &Args) -> anyhow::Result<Self> {
        let n = args.nodes;
        // Publishers: a random order of the nodes, repeated, so that each node publishes again
        // only after all the others did (its provider's timestamps then rise by far more than
        // a delivery takes).
        let mut rng = StdRng::seed_from_u64(args.seed ^ 0x9e37_79b9_7f4a_7c15);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let senders = if args.publishers == 0 { n } else { args.publishers.min(n) };
        let publishers: Vec<usize> = (0..args.batches).map(|k| order[k % senders]).collect();
        let providers: Vec<Identity> = (0..n).map(|i| provider(args.seed, i)).collect();
        // Timestamps rise with the message index and stay in the past (receivers refuse
        // timestamps more than 5 s ahead).
        let base = mesh_testkit::now_ms() - args.batches as i64 - 1_000;
        let mut envelopes = Vec::with_capacity(args.batches);
        for (k, &p) in publishers.iter().enumerate() {
            envelopes.push(mesh_testkit::price_batch(
                &providers[p],
                k as u64,
                base + k as i64,
                args.prices,
                args.ttl,
            )?);
        }
        let frames =
            envelopes.iter().map(mesh_protocol::encode_envelope).collect::<Result<Vec<_>, _>>()?;
        let ids = envelopes.iter().map(Envelope::message_id).collect();
        anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
        Ok(Self {
            envelopes,
            frames,
            ids,
            repeat: publishers
                .iter()
                .enumerate()
                .map(|(k, p)| publishers[..k].contains(p))
                .collect(),
            publishers,
            interval: Duration::from_secs_f64(1.0 / args.rate),
        })
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The provider key of node `index` (not its libp2p key: providers sign envelopes).
fn provider(seed: u64, index: usize) -> Identity {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    s[16] = 0xb0;
    Identity::from_seed(s)
}

/// What one system achieved on the workload.
#[derive(Debug, Default)]
pub struct NetResult {
    /// Deliveries at nodes other than the message's publisher.
    pub delivered: u64,
    /// `(N - 1) * M`.
    pub expected: u64,
    /// Publish-to-last-node latency of every message that reached all nodes, in ms.
    pub latencies_ms: Vec<f64>,
    /// The same, of the messages whose publisher had published before.
    pub repeat_latencies_ms: Vec<f64>,
    /// Messages that did not reach every node before the timeout.
    pub incomplete: usize,
    /// Copies received by all nodes together, duplicates included.
    pub copies: u64,
    /// Message bytes sent by all nodes together.
    pub bytes_sent: u64,
    /// How long the publishing took, in seconds.
    pub publish_secs: f64,
    /// From the first publish until every node had every message (or the timeout), seconds.
    pub complete_secs: f64,
    /// CPU time of the whole process from the first publish until every node had every
    /// message (late duplicates after that are not included).
    pub cpu: Duration,
    /// Details specific to the system (drops, rejections, gossip counters).
    pub details: serde_json::Value,
}

impl NetResult {
    fn delivery_ratio(&self) -> f64 {
        if self.expected == 0 { 0.0 } else { self.delivered as f64 / self.expected as f64 }
    }

    fn percentile(&self, q: f64) -> f64 {
        percentile(&self.latencies_ms, q)
    }

    /// Records message `k`'s latency.
    pub fn record_latency(&mut self, workload: &Workload, k: usize, ms: f64) {
        self.latencies_ms.push(ms);
        if workload.repeat[k] {
            self.repeat_latencies_ms.push(ms);
        }
    }
}

/// Polls `done` every few milliseconds until it holds or `timeout` has passed; `true` when it
/// held.
pub async fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Nearest-rank percentile of `values` (sorted or not); 0 for none.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Resident memory of this process in bytes (`VmRSS` of `/proc/self/status`).
pub fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS line in /proc/self/status"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("malformed VmRSS line: {line}"))?
        .parse()?;
    Ok(kib * 1024)
}

/// CPU time this process has used so far (all threads, user + system), from `/proc/self/stat`.
pub fn cpu_time() -> anyhow::Result<Duration> {
    stat_cpu(&std::fs::read_to_string("/proc/self/stat")?)
}

/// CPU time used so far by this process's threads whose name starts with `prefix`, from
/// `/proc/self/task/*/stat`.
pub fn threads_cpu_time(prefix: &str) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        // A thread may end between the listing and the reads.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue;
        };
        if comm.trim_end().starts_with(prefix) {
            total += stat_cpu(&stat)?;
        }
    }
    Ok(total)
}

/// CPU time the calling thread has used so far, from `/proc/thread-self/stat`.
pub fn thread_cpu_time() -> anyhow::Result<Duration> {
    stat_cpu(&std::fs::read_to_string("/proc/thread-self/stat")?)
}

/// utime + stime of a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> anyhow::Result<Duration> {
    // The command name may hold spaces; the fields after it are plain numbers. utime and
    // stime are fields 14 and 15, the 12th and 13th after the name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).ok_or_else(|| anyhow::anyhow!("short /proc/self/stat"))?.parse()?)
    };
    // /proc reports in USER_HZ, which is 100 on Linux whatever the kernel's tick rate.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    // Started here, on the main thread, which outlives the measurement (the keeper ends with
    // the thread that started it).
    let awake = if args.keep_cpus_awake {
        Some(crate::awake::Awake::start(worker_threads())?)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut report = rt.block_on(measure(args))?;
    report.params["cpus_kept_awake"] = match &awake {
        Some(a) => json!(format!("yes: {} SCHED_IDLE spinners in a child process", a.threads())),
        None => json!("no"),
    };
    Ok(report)
}

async fn measure(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.nodes >= 3, "--nodes must be at least 3");
    anyhow::ensure!(args.batches >= 1, "--batches must be at least 1");
    let load_before = load_average();
    let started = std::time::Instant::now();
    let workload = Workload::new(args)?;
    let edges = mesh_testkit::Topology::RandomRegular { degree: args.degree }
        .edges(args.nodes, args.seed)?;
    let frame_bytes = workload.frames.iter().map(Vec::len).sum::<usize>() / workload.len();

    let mut figures = Vec::new();
    let mut details = serde_json::Map::new();
    let mut ours_p99 = None;
    let mut gossip_p99 = None;

    if !args.skip_ours {
        let (result, memory) = ours::run(args, &workload).await?;
        let p99 = result.percentile(0.99);
        ours_p99 = Some(p99);
        figures.extend(system_figures(System::Ours, &result, args));
        figures.push(Figure::plain(
            "ours_rss_per_node_after_build",
            memory.after_build as f64 / args.nodes as f64 / 1024.0,
            "KiB",
        ));
        figures.push(Figure::plain(
            "ours_rss_per_node_after_traffic",
            memory.after_traffic as f64 / args.nodes as f64 / 1024.0,
            "KiB",
        ));
        details.insert("ours".into(), summary(&result));
    }
    if !args.skip_gossipsub {
        let result = gossipsub::run(args, &workload, &edges).await?;
        gossip_p99 = Some(result.percentile(0.99));
        figures.extend(system_figures(System::Gossipsub, &result, args));
        details.insert("gossipsub".into(), summary(&result));
    }
    if let (Some(ours), Some(theirs)) = (ours_p99, gossip_p99) {
        let ratio = if theirs > 0.0 { ours / theirs } else { f64::INFINITY };
        figures.push(Figure::at_most("p99_ratio_ours_over_gossipsub", ratio, "x", 0.5));
    }
    if !args.skip_relay_rate {
        let rate = one_node::run(args).await?;
        figures.push(Figure::at_least(
            "one_node_unique_messages_relayed_per_sec",
            rate.forwarded_per_sec,
            "messages/s",
            15_000.0,
        ));
        figures.push(Figure::plain(
            "one_node_unique_messages_validated_per_sec",
            rate.validated_per_sec,
            "messages/s",
        ));
        details.insert("one_node".into(), rate.details);
    }

    Ok(Report {
        bench: "relay",
        params: json!({
            "nodes": args.nodes,
            "degree": args.degree,
            "edges": edges.len(),
            "batches": args.batches,
            "prices_per_batch": args.prices,
            "frame_bytes": frame_bytes,
            "rate_batches_per_sec": args.rate,
            "ttl": args.ttl,
            "publishers": if args.publishers == 0 { json!("every node") } else { json!(args.publishers.min(args.nodes)) },
            "seed": args.seed,
            "ours_lazy_push": args.lazy.params(),
            "gossipsub": {
                "mesh_n": args.mesh_n,
                "mesh_n_low": gossipsub::mesh_params(args).0,
                "mesh_n_high": gossipsub::mesh_params(args).1,
                "mesh_outbound_min": gossipsub::mesh_params(args).2,
                "validation_mode": "Strict",
                "application_validation": "mesh_protocol::Validator + HighWaterMarks per message",
                "heartbeat_interval_ms": gossipsub::HEARTBEAT.as_millis() as u64,
                "flood_publish": true,
            },
            "transport": "libp2p memory transport + noise + yamux, one process",
            "runtime": format!("tokio multi-thread, {} worker threads", worker_threads()),
            "bytes_sent_counts": "message bytes only: ours = frames written to relay streams \
                (4-byte length prefix included); gossipsub = protobuf length of each message \
                sent (published or forwarded), control messages (IHAVE/IWANT/IDONTWANT/GRAFT) \
                and stream framing not included; noise and yamux overhead in neither",
            "copies_count": "every message copy a node received, first copies and duplicates \
                (ours: delivered + duplicates + re-forwarded + stale + rejected; gossipsub: \
                topic_msg_recv_counts_unfiltered, which includes copies fetched with IWANT)",
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "elapsed_secs": started.elapsed().as_secs_f64(),
            "details": details,
        }),
        figures,
    })
}

fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

#[derive(Debug, Clone, Copy)]
enum System {
    Ours,
    Gossipsub,
}

/// The figures of one system; only ours carry the goals.
fn system_figures(system: System, r: &NetResult, args: &Args) -> Vec<Figure> {
    let names = match system {
        System::Ours => [
            "ours_delivery_ratio",
            "ours_publish_to_last_node_p50",
            "ours_publish_to_last_node_p99",
            "ours_publish_to_last_node_max",
            "ours_copies_per_node_per_message",
            "ours_bytes_sent_per_node",
            "ours_incomplete_messages",
            "ours_cpu_per_message",
        ],
        System::Gossipsub => [
            "gossipsub_delivery_ratio",
            "gossipsub_publish_to_last_node_p50",
            "gossipsub_publish_to_last_node_p99",
            "gossipsub_publish_to_last_node_max",
            "gossipsub_copies_per_node_per_message",
            "gossipsub_bytes_sent_per_node",
            "gossipsub_incomplete_messages",
            "gossipsub_cpu_per_message",
        ],
    };
    let n = args.nodes as f64;
    let m = args.batches as f64;
    let copies = r.copies as f64 / (n * m);
    let bytes = r.bytes_sent as f64 / n;
    let p99 = r.percentile(0.99);
    let cpu = Figure::plain(names[7], r.cpu.as_secs_f64() * 1000.0 / m, "ms");
    let mut figures = match system {
        System::Ours => vec![
            Figure::at_least(names[0], r.delivery_ratio(), "ratio", 1.0),
            Figure::plain(names[1], r.percentile(0.5), "ms"),
            if args.nodes <= 100 {
                Figure::at_most(names[2], p99, "ms", 20.0)
            } else {
                Figure::plain(names[2], p99, "ms")
            },
            Figure::plain(names[3], r.percentile(1.0), "ms"),
            Figure::at_most(names[4], copies, "copies", (args.degree - 1) as f64),
            Figure::plain(names[5], bytes, "bytes"),
            Figure::at_most(names[6], r.incomplete as f64, "messages", 0.0),
        ],
        System::Gossipsub => vec![
            Figure::plain(names[0], r.delivery_ratio(), "ratio"),
            Figure::plain(names[1], r.percentile(0.5), "ms"),
            Figure::plain(names[2], p99, "ms"),
            Figure::plain(names[3], r.percentile(1.0), "ms"),
            Figure::plain(names[4], copies, "copies"),
            Figure::plain(names[5], bytes, "bytes"),
            Figure::plain(names[6], r.incomplete as f64, "messages"),
        ],
    };
    figures.push(cpu);
    if !r.repeat_latencies_ms.is_empty() {
        let name = match system {
            System::Ours => "ours_repeat_publisher_p99",
            System::Gossipsub => "gossipsub_repeat_publisher_p99",
        };
        figures.push(Figure::plain(name, percentile(&r.repeat_latencies_ms, 0.99), "ms"));
    }
    figures
}

fn summary(r: &NetResult) -> serde_json::Value {
    json!({
        "delivered": r.delivered,
        "expected": r.expected,
        "incomplete_messages": r.incomplete,
        "copies_received": r.copies,
        "bytes_sent": r.bytes_sent,
        "publish_secs": r.publish_secs,
        "complete_secs": r.complete_secs,
        "p90_ms": r.percentile(0.9),
        "mean_ms": if r.latencies_ms.is_empty() { 0.0 } else {
            r.latencies_ms.iter().sum::<f64>() / r.latencies_ms.len() as f64
        },
        "more": r.details,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
