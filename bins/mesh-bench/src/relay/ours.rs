//! Our relay on the workload: a `mesh_testkit::TestNet` of real relays.

use std::time::Duration;

use mesh_relay::StatsSnapshot;
use mesh_testkit::{TestNet, Topology};
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};

use super::{Args, NetResult, Workload, cpu_time, poll_until, rss_bytes};

/// Process memory grown by building the net and by running the traffic, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// RSS growth from before the net was built to when every link was up.
    pub after_build: u64,
    /// RSS growth from before the net was built to after the traffic.
    pub after_traffic: u64,
}

/// Every copy a node received: first copies and duplicates alike.
fn copies_received(s: &StatsSnapshot) -> u64 {
    s.delivered + s.duplicates + s.reforwarded + s.stale + s.rejected_total()
}

/// Builds the net, publishes the workload, waits for every delivery and collects the figures.
pub async fn run(args: &Args, workload: &Workload) -> anyhow::Result<(NetResult, Memory)> {
    let rss_before = rss_bytes()?;
    let lazy = args.lazy.lazy_push();
    let net = TestNet::builder()
        .nodes(args.nodes)
        .topology(Topology::RandomRegular { degree: args.degree })
        .seed(args.seed)
        .configure(move |_, config| config.lazy = lazy)
        .build()
        .await?;
    let rss_built = rss_bytes()?;
    anyhow::ensure!(
        net.nodes().iter().all(|n| n.relay().is_some_and(|r| r.connected_peers() == args.degree)),
        "not every node has {} peers",
        args.degree
    );

    let mut tick = tokio::time::interval(workload.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut published_at = Vec::with_capacity(workload.len());
    let cpu_before = cpu_time()?;
    let first = Instant::now();
    for (k, envelope) in workload.envelopes.iter().enumerate() {
        tick.tick().await;
        let at = Instant::now();
        net.publish(workload.publishers[k], envelope).await?;
        published_at.push(at);
    }
    let publish_secs = first.elapsed().as_secs_f64();

    // Every node delivers every message once (its own ones included).
    let expected_total = args.nodes * workload.len();
    let timeout = Duration::from_secs(args.timeout_secs);
    poll_until(timeout, || {
        net.nodes().iter().map(mesh_testkit::TestNode::received_count).sum::<usize>()
            >= expected_total
    })
    .await;
    let complete_secs = first.elapsed().as_secs_f64();
    let cpu = cpu_time()?.saturating_sub(cpu_before);
    // Then let the last duplicates land: every frame queued was written and every frame
    // written was taken in by its receiver.
    let stats = || -> Vec<StatsSnapshot> {
        net.nodes().iter().filter_map(|n| n.relay().map(mesh_relay::Relay::stats)).collect()
    };
    poll_until(Duration::from_secs(5), || {
        let all = stats();
        let queued: u64 = all.iter().map(|s| s.frames_queued).sum();
        let gone: u64 =
            all.iter().map(|s| s.frames_sent + s.dropped_stream_lost + s.suppressed).sum();
        let sent: u64 = all.iter().map(|s| s.frames_sent).sum();
        let received: u64 = all.iter().map(copies_received).sum();
        queued == gone && received >= sent
    })
    .await;
    let rss_traffic = rss_bytes()?;

    let mut result = NetResult {
        expected: ((args.nodes - 1) * workload.len()) as u64,
        publish_secs,
        complete_secs,
        cpu,
        ..NetResult::default()
    };
    let mut by_hop = ArrivalByHop::default();
    for (k, id) in workload.ids.iter().enumerate() {
        let publisher = workload.publishers[k];
        let mut last = Some(published_at[k]);
        for node in net.nodes().iter().filter(|n| n.index != publisher) {
            match node.received(id) {
                Some(r) => {
                    result.delivered += 1;
                    last = last.map(|l| l.max(r.at));
                    by_hop.add(r.hop_count, r.at.saturating_duration_since(published_at[k]));
                }
                None => last = None,
            }
        }
        match last {
            Some(last) => result.record_latency(
                workload,
                k,
                last.saturating_duration_since(published_at[k]).as_secs_f64() * 1000.0,
            ),
            None => result.incomplete += 1,
        }
    }
    let all = stats();
    let sum = |f: fn(&StatsSnapshot) -> u64| all.iter().map(f).sum::<u64>();
    result.copies = sum(copies_received);
    result.bytes_sent = sum(|s| s.bytes_sent);
    result.details = json!({
        "duplicates": sum(|s| s.duplicates),
        "reforwarded": sum(|s| s.reforwarded),
        "stale": sum(|s| s.stale),
        "rejected": sum(StatsSnapshot::rejected_total),
        "frames_sent": sum(|s| s.frames_sent),
        "suppressed": sum(|s| s.suppressed),
        "prepared_in_parallel": sum(|s| s.prepared_in_parallel),
        "haves_sent": sum(|s| s.haves_sent),
        "wants_sent": sum(|s| s.wants_sent),
        "wants_served": sum(|s| s.wants_served),
        "wants_unknown": sum(|s| s.wants_unknown),
        "wanted_full": sum(|s| s.wanted_full),
        "prunes_sent": sum(|s| s.prunes_sent),
        "grafts": sum(|s| s.grafts),
        "dropped_queue_full": sum(|s| s.dropped_queue_full),
        "dropped_subscriber": sum(|s| s.dropped_subscriber),
        "dropped_stream_lost": sum(|s| s.dropped_stream_lost),
        "streams_opened": sum(|s| s.streams_opened),
        "stream_open_failures": sum(|s| s.stream_open_failures),
        "arrival_by_hop": by_hop.to_json(),
        "max_delivery_count": net
            .nodes()
            .iter()
            .flat_map(|n| workload.ids.iter().filter_map(|id| n.received(id)))
            .map(|r| r.count)
            .max()
            .unwrap_or(0),
    });

    net.shutdown().await;
    let memory = Memory {
        after_build: rss_built.saturating_sub(rss_before),
        after_traffic: rss_traffic.saturating_sub(rss_before),
    };
    Ok((result, memory))
}

/// When first copies arrived, by the hop count they carried: how many, and their mean and
/// longest time from the publish call, in ms. Where a message's time goes (per hop, or at the
/// few nodes reached late over a long path) shows here and not in the end-to-end figures.
#[derive(Default)]
struct ArrivalByHop {
    /// hop count -> (deliveries, sum of ms, longest ms)
    per_hop: std::collections::BTreeMap<u8, (u64, f64, f64)>,
}

impl ArrivalByHop {
    fn add(&mut self, hop_count: u8, after_publish: Duration) {
        let ms = after_publish.as_secs_f64() * 1000.0;
        let entry = self.per_hop.entry(hop_count).or_default();
        entry.0 += 1;
        entry.1 += ms;
        entry.2 = entry.2.max(ms);
    }

    fn to_json(&self) -> serde_json::Value {
        self.per_hop
            .iter()
            .map(|(hop, &(deliveries, sum, max))| {
                json!({
                    "hop_count": hop,
                    "deliveries": deliveries,
                    "mean_ms": sum / deliveries as f64,
                    "max_ms": max,
                })
            })
            .collect()
    }
}
