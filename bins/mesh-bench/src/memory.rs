//! Memory of a real consumer process (issue 9 point 6): the resident set of `mesh-node` (the
//! release binary next to this one) while idle and while it takes `--rate` batches per second.
//!
//! The consumer runs with its defaults (SQLite store in a temporary directory, no Redis, no
//! mDNS, no metrics listener) and bootstraps from one peer: a relay in this process
//! (`mesh_relay::Relay`, TCP on 127.0.0.1). After `--idle-secs` connected and idle, the relay
//! publishes signed `--prices`-price batches from `--providers` provider keys in turn at
//! `--rate` per second for `--seconds`. The figures: RSS when idle, RSS at the end and the
//! largest RSS sampled each second under load, the peak (`VmHWM`), the consumer's CPU time per
//! batch, and how many of the batches it delivered (its `mesh_relay_messages_total` counter,
//! read over its IPC socket).
//!
//! Run with `cargo build --release -p mesh-node && cargo run --release -p mesh-bench -- memory`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_protocol::Identity;
use mesh_relay::Relay;
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::relay::load_average;
use crate::report::{Figure, Report};

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Batches published per second under load.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Provider keys signing the batches, in turn.
    #[arg(long, default_value_t = 4)]
    pub providers: usize,
    /// Prices per batch.
    #[arg(long, default_value_t = 50)]
    pub prices: usize,
    /// Seconds under load.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seconds connected and idle before the idle reading.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
}

/// A child process killed (by its PID) and reaped when dropped.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `mesh-node` binary next to this one.
pub fn mesh_node_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("mesh-node");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with cargo build --release -p mesh-node",
        bin.display()
    );
    Ok(bin)
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// User + system CPU time of process `pid`.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?.parse()?)
    };
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// The value of one counter line (`name{labels} value`) in Prometheus text.
pub fn counter(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(line_start))?.split_whitespace().last()?.parse().ok()
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(measure(args))
}

async fn measure(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.rate > 0.0 && args.providers >= 1, "--rate and --providers must be > 0");
    let load_before = load_average();
    let bin = mesh_node_bin()?;
    let dir = tempfile::tempdir()?;
    let cancel = CancellationToken::new();
    let result = with_relay(args, &bin, dir.path(), &cancel).await;
    cancel.cancel();
    let (figures, mut params) = result?;
    params["load_average_before"] = json!(load_before);
    params["load_average_after"] = json!(load_average());
    Ok(Report { bench: "memory", params, figures })
}

async fn with_relay(
    args: &Args,
    bin: &Path,
    dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let identity = Identity::generate();
    let mut config = mesh_testkit::test_config();
    config.listen_addrs = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    let (relay, mut deliveries) = Relay::start(&identity, config, cancel.child_token()).await?;
    // Nothing comes back from a consumer with one peer, but keep the queue drained.
    tokio::spawn(async move { while deliveries.recv().await.is_some() {} });
    let addr = relay
        .listen_addrs()
        .await?
        .into_iter()
        .find(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/"))
        .ok_or_else(|| anyhow::anyhow!("the relay has no TCP address"))?
        .with(mesh_relay::Protocol::P2p(identity.peer_id()));

    let socket = dir.join("node.sock");
    let child = std::process::Command::new(bin)
        .current_dir(dir)
        .env_clear()
        .env("MESH_DATA_DIR", dir.join("data"))
        .env("MESH_NODE_SOCKET", &socket)
        .env("MESH_LOG_DIR", dir.join("logs"))
        .env("MESH_LISTEN_ADDRS", "/ip4/127.0.0.1/tcp/0")
        .env("MESH_ALLOW_PRIVATE_ADDRS", "true")
        .env("MESH_BOOTSTRAP_PEERS", addr.to_string())
        .env("MESH_MDNS_ENABLED", "false")
        .env("MESH_METRICS_LISTEN", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let child = ChildGuard(child);
    let pid = child.0.id();

    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.connected_peers() == 0 {
        anyhow::ensure!(Instant::now() < deadline, "the consumer did not connect within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ipc = mesh_ipc::Client::new(&socket);
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_kib = status_kib(pid, "VmRSS")?;
    let delivered_before = delivered(&ipc).await?;

    let keys: Vec<Identity> = (0..args.providers).map(|_| Identity::generate()).collect();
    let mut last_ts = vec![0i64; args.providers];
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let total = (args.rate * args.seconds as f64).round() as u64;
    let cpu_before = process_cpu(pid)?;
    let started = Instant::now();
    let mut next_sample = started + Duration::from_secs(1);
    let mut samples = Vec::new();
    let mut unsent = 0u64;
    for k in 0..total {
        tick.tick().await;
        let p = (k as usize) % args.providers;
        let ts = mesh_testkit::now_ms().max(last_ts[p] + 1);
        last_ts[p] = ts;
        let envelope = mesh_testkit::price_batch(&keys[p], k, ts, args.prices, 10)?;
        if relay.publish(&envelope).await? == 0 {
            unsent += 1;
        }
        if Instant::now() >= next_sample {
            samples.push(status_kib(pid, "VmRSS")?);
            next_sample += Duration::from_secs(1);
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    // Let the consumer take what is queued (bounded), then read.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = delivered(&ipc).await? - delivered_before;
    while got < total as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = delivered(&ipc).await? - delivered_before;
    }
    let cpu = process_cpu(pid)?.saturating_sub(cpu_before);
    let end_kib = status_kib(pid, "VmRSS")?;
    let peak_kib = status_kib(pid, "VmHWM")?;
    let max_sampled = samples.iter().copied().max().unwrap_or(end_kib).max(end_kib);
    drop(child);
    relay.shutdown(Duration::from_secs(5)).await;

    let mib = |kib: u64| kib as f64 / 1024.0;
    let figures = vec![
        Figure::at_most("idle_connected_consumer_rss", mib(idle_kib), "MiB", 32.0),
        Figure::at_most("loaded_consumer_rss_end", mib(end_kib), "MiB", 32.0),
        Figure::at_most("loaded_consumer_rss_max_sampled", mib(max_sampled), "MiB", 32.0),
        Figure::plain("consumer_rss_peak_vmhwm", mib(peak_kib), "MiB"),
        Figure::plain("consumer_cpu_per_batch", cpu.as_secs_f64() * 1e6 / total as f64, "us"),
        Figure::plain("consumer_cpu_share", cpu.as_secs_f64() / publish_secs, "cores"),
        Figure::at_least("delivery_ratio", got / total as f64, "ratio", 1.0),
    ];
    let params = json!({
        "binary": bin.display().to_string(),
        "rate_batches_per_sec": args.rate,
        "achieved_rate_batches_per_sec": total as f64 / publish_secs,
        "providers": args.providers,
        "prices_per_batch": args.prices,
        "seconds": args.seconds,
        "batches": total,
        "batches_not_queued": unsent,
        "delivered": got,
        "idle_secs": args.idle_secs,
        "rss_samples_mib": samples.iter().map(|k| (mib(*k) * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "consumer": "mesh-node with defaults: SQLite store, no Redis, no mDNS, \
            MESH_METRICS_LISTEN=off, one peer (this process's relay over TCP 127.0.0.1)",
    });
    Ok((figures, params))
}

/// The consumer's delivered-message counter, over its socket.
async fn delivered(ipc: &mesh_ipc::Client) -> anyhow::Result<f64> {
    let text = ipc.metrics().await?;
    Ok(counter(&text, "mesh_relay_messages_total{outcome=\"delivered\"}").unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::counter;

    #[test]
    fn reads_a_counter_line() {
        let text = "# TYPE x counter\nx{outcome=\"delivered\"} 42\nx{outcome=\"duplicate\"} 3\n";
        assert_eq!(counter(text, "x{outcome=\"delivered\"}"), Some(42.0));
        assert_eq!(counter(text, "y"), None);
    }
}
