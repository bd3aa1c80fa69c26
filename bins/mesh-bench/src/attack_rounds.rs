//! The provider-coordination kinds of `mesh-bench attack`: `skewed-provider` and
//! `lease-squat` (issue 34 items 1 and 2). Unlike the relay kinds they need whole nodes with
//! providers, so they run on [`mesh_testkit::LocalMesh`]: two providers sharing the test Redis
//! (`MESH_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`, under a key prefix of the mesh's
//! own that is deleted at the end), a few consumers, one in-process birdeye-sim and short
//! rounds (2 s, ranks 1 s apart).
//!
//! - `skewed-provider`: provider 1's clock runs 8 s ahead (`NodeConfig.clock_offset_ms`), more
//!   than `MESH_MAX_CLOCK_SKEW_SECS` (5).
//! - `lease-squat`: someone with write access to Redis keeps the lease keys
//!   (`{prefix}coord:round:{r}`) of the next five rounds taken before any provider gets there:
//!   junk, the id of a node that is no provider, and the id of the other registered provider
//!   without an expiry, in turn, a day's expiry where there is one.
//!
//! Each kind runs twice on a fresh mesh, without the attack (baseline) and with it, and
//! reports over `--rounds` rounds after the consumers first hold prices:
//! - `attack_honest_delivery_ratio`: the share of the rounds whose batch (a valid one, as each
//!   consumer's round tracker counts it) reached every consumer (goal 1.0, reported, never
//!   asserted);
//! - `attack_upstream_fetches_per_round_max`: birdeye-sim's multi-price requests per round
//!   divided by the requests one fetch makes (goal: at most 2, one extra per affected round),
//!   with the per-round counts in `params`;
//! - `attack_worst_newest_price_age`: the worst age of a consumer's newest price, sampled every
//!   200 ms;
//! - `attack_process_rss_growth`: how much this process's resident memory grew over the
//!   measured rounds. Every node, the simulator and the attacker live in this process, so it
//!   is the mesh's memory, the victims' included, not one node's.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use birdeye_sim::Endpoint;
use deadpool_redis::redis;
use mesh_coordination::RoundPlanner;
use mesh_protocol::{Identity, NodeId};
use mesh_service::now_ms;
use mesh_testkit::LocalMesh;
use mesh_testkit::hostile::resident_memory_bytes;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::attack::{Args, Kind};
use crate::report::{Figure, Report};

/// Round length and coordination window, in seconds.
const INTERVAL_SECS: u64 = 2;
const WINDOW_SECS: u64 = 1;
const INTERVAL_MS: i64 = INTERVAL_SECS as i64 * 1_000;
/// The skewed provider's clock, ahead of the others'.
const SKEW_MS: i64 = 8_000;
/// Rounds ahead whose lease keys the squatter holds.
const SQUAT_AHEAD: u64 = 5;
/// Longest wait for the consumers' first prices.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// What one run measured.
#[derive(Debug)]
struct Run {
    rounds: std::ops::Range<u64>,
    delivered: usize,
    /// Rounds some consumer never counted.
    missed: Vec<u64>,
    /// birdeye-sim's multi-price requests in each round, divided by those of one fetch.
    fetches: Vec<f64>,
    worst_age_ms: i64,
    rss_growth: u64,
    /// Measured rounds whose lease key the attacker had set before any provider.
    squatted: usize,
    providers: Vec<serde_json::Value>,
    bans: u64,
}

impl Run {
    fn delivery(&self) -> f64 {
        self.delivered as f64 / self.rounds.clone().count().max(1) as f64
    }

    fn max_fetches(&self) -> f64 {
        self.fetches.iter().copied().fold(0.0, f64::max)
    }

    /// Fetches beyond one in the rounds measured.
    fn extra_fetches(&self) -> f64 {
        self.fetches.iter().map(|f| (f - 1.0).max(0.0)).sum()
    }
}

/// Runs a coordination kind (baseline first, then the attack).
pub async fn measure(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(args.consumers >= 1, "--consumers must be at least 1");
    let redis_url = std::env::var("MESH_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let baseline = one_run(args, &redis_url, None).await?;
    let attack = one_run(args, &redis_url, Some(args.kind)).await?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(Report {
        bench: "attack",
        params: json!({
            "kind": format!("{:?}", args.kind),
            "providers": 2,
            "consumers": args.consumers,
            "interval_secs": INTERVAL_SECS,
            "window_secs": WINDOW_SECS,
            "rounds": args.rounds,
            "coordination": "redis",
            "skew_ms": if args.kind == Kind::SkewedProvider { SKEW_MS } else { 0 },
            "attack_rounds_squatted": attack.squatted,
            "attack_rounds_missed": attack.missed,
            "baseline_rounds_missed": baseline.missed,
            "attack_upstream_fetches_per_round": attack.fetches,
            "baseline_upstream_fetches_per_round": baseline.fetches,
            "attack_providers": attack.providers,
            "attack_bans": attack.bans,
            "note": "rss is this process's: every node, birdeye-sim and the attacker",
        }),
        figures: vec![
            Figure::at_least("attack_honest_delivery_ratio", attack.delivery(), "ratio", 1.0),
            Figure::plain("baseline_honest_delivery_ratio", baseline.delivery(), "ratio"),
            Figure::at_most(
                "attack_upstream_fetches_per_round_max",
                attack.max_fetches(),
                "fetches",
                2.0,
            ),
            Figure::plain("attack_upstream_extra_fetches", attack.extra_fetches(), "fetches"),
            Figure::plain("baseline_upstream_extra_fetches", baseline.extra_fetches(), "fetches"),
            Figure::at_most(
                "attack_worst_newest_price_age",
                attack.worst_age_ms as f64,
                "ms",
                2.0 * INTERVAL_MS as f64,
            ),
            Figure::plain("baseline_worst_newest_price_age", baseline.worst_age_ms as f64, "ms"),
            Figure::plain("attack_process_rss_growth", mib(attack.rss_growth), "MiB"),
            Figure::plain("baseline_process_rss_growth", mib(baseline.rss_growth), "MiB"),
        ],
    })
}

fn round_now() -> u64 {
    (now_ms() / INTERVAL_MS).max(0) as u64
}

async fn one_run(args: &Args, redis_url: &str, kind: Option<Kind>) -> anyhow::Result<Run> {
    let skewed = kind == Some(Kind::SkewedProvider);
    let mesh = LocalMesh::builder()
        .providers(2)
        .consumers(args.consumers)
        .rounds(INTERVAL_SECS, WINDOW_SECS)
        .redis(redis_url)
        .configure(move |i, c| {
            if skewed && i == 1 {
                c.clock_offset_ms = SKEW_MS;
            }
        })
        .start()
        .await?;
    let result = measure_run(args, &mesh, redis_url, kind).await;
    let shutdown = mesh.shutdown().await;
    let run = result?;
    shutdown?;
    Ok(run)
}

async fn measure_run(
    args: &Args,
    mesh: &LocalMesh,
    redis_url: &str,
    kind: Option<Kind>,
) -> anyhow::Result<Run> {
    let consumers: Vec<usize> = (2..mesh.len()).collect();
    let deadline = tokio::time::Instant::now() + FORM_TIMEOUT;
    while consumers.iter().any(|&i| mesh.node(i).is_none_or(|n| n.prices().is_empty())) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the consumers held no prices within {FORM_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stop = CancellationToken::new();
    let squatted = Arc::new(Mutex::new(BTreeSet::new()));
    let squatter = if kind == Some(Kind::LeaseSquat) {
        let prefix = mesh
            .overrides(0)
            .get("MESH_REDIS_PREFIX")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the mesh has no Redis prefix"))?;
        let providers = [mesh.running(0)?.node_id(), mesh.running(1)?.node_id()];
        let client = redis::Client::open(redis_url)?;
        let conn =
            tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
                .await??;
        let (stop, squatted) = (stop.clone(), squatted.clone());
        Some(tokio::spawn(squat(conn, prefix, providers, squatted, stop)))
    } else {
        None
    };
    let rss_before = resident_memory_bytes().unwrap_or(0);
    // The attack starts now: the first round measured is the next but one (a squatter's first
    // keys are in place by then).
    let first = round_now() + 2;
    let rounds = first..first + args.rounds;
    let mut seen: Vec<HashSet<u64>> = vec![HashSet::new(); consumers.len()];
    let mut worst_age_ms = 0i64;
    // Until the last round had a round's time to arrive.
    while round_now() <= rounds.end {
        for (k, &i) in consumers.iter().enumerate() {
            let node = mesh.running(i)?;
            seen[k].extend(
                node.rounds_received()
                    .into_iter()
                    .filter(|(r, origins)| rounds.contains(r) && !origins.is_empty())
                    .map(|(r, _)| r),
            );
            if round_now() >= first
                && round_now() < rounds.end
                && let Some(newest) = node.prices().iter().map(|p| p.timestamp_ms).max()
            {
                worst_age_ms = worst_age_ms.max(now_ms() - newest);
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    stop.cancel();
    if let Some(task) = squatter
        && let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), task).await
    {
        eprintln!("lease squatter ended: {e:#}");
    }
    let rss_growth = resident_memory_bytes().unwrap_or(0).saturating_sub(rss_before);
    let mut missed = Vec::new();
    for r in rounds.clone() {
        if !seen.iter().all(|s| s.contains(&r)) {
            missed.push(r);
        }
    }
    let per_fetch = requests_per_fetch();
    let fetches = upstream_calls(mesh, rounds.clone())
        .into_iter()
        .map(|n| n as f64 / per_fetch as f64)
        .collect();
    let providers = (0..2)
        .filter_map(|i| mesh.node(i))
        .map(|n| {
            let s = n.provider().status();
            json!({
                "rounds_fetched": s.rounds_fetched,
                "rounds_skipped": s.rounds_skipped,
                "rounds_failed": s.rounds_failed,
                "last_error": s.last_error,
            })
        })
        .collect();
    let bans = (0..mesh.len()).filter_map(|i| mesh.node(i)).map(|n| n.relay().stats().bans).sum();
    Ok(Run {
        delivered: rounds.clone().count() - missed.len(),
        missed,
        fetches,
        worst_age_ms,
        rss_growth,
        squatted: squatted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .range(rounds.clone())
            .count(),
        providers,
        bans,
        rounds,
    })
}

/// Keeps the lease keys of the next [`SQUAT_AHEAD`] rounds taken (`SET NX`) until `stop`.
async fn squat(
    mut conn: redis::aio::MultiplexedConnection,
    prefix: String,
    providers: [NodeId; 2],
    squatted: Arc<Mutex<BTreeSet<u64>>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let day_ms: u64 = 86_400_000;
    let stranger = Identity::generate().node_id().to_string();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        tick.tick().await;
        let now = round_now();
        for round in now + 1..=now + SQUAT_AHEAD {
            // The provider that does not come first in the round: its own key would be its
            // lease, not a squat.
            let second = RoundPlanner::ranking(round, &providers)
                .get(1)
                .map_or_else(|| providers[1].to_string(), ToString::to_string);
            let (value, expiry) = match round % 3 {
                0 => ("junk".to_owned(), Some(day_ms)),
                1 => (stranger.clone(), Some(day_ms)),
                _ => (second, None),
            };
            let mut cmd = redis::cmd("SET");
            cmd.arg(format!("{prefix}coord:round:{round}")).arg(value).arg("NX");
            if let Some(px) = expiry {
                cmd.arg("PX").arg(px);
            }
            let set: Option<String> = cmd.query_async(&mut conn).await?;
            if set.is_some() {
                squatted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(round);
            }
        }
    }
    Ok(())
}

/// birdeye-sim's multi-price requests (one per chain and fetch) in each of `rounds`.
fn upstream_calls(mesh: &LocalMesh, rounds: std::ops::Range<u64>) -> Vec<usize> {
    let requests: Vec<_> = mesh.simulators().iter().flat_map(|s| s.requests()).collect();
    rounds
        .map(|r| {
            let span = r as i64 * INTERVAL_MS..(r as i64 + 1) * INTERVAL_MS;
            requests
                .iter()
                .filter(|q| q.endpoint == Endpoint::MultiPrice && span.contains(&q.at_unix_ms))
                .count()
        })
        .collect()
}

/// The multi-price requests one fetch of the default assets makes: one per chain.
fn requests_per_fetch() -> usize {
    let assets = mesh_provider::Assets::default();
    let chains: BTreeSet<&str> = assets.as_slice().iter().map(|a| a.chain.as_str()).collect();
    chains.len().max(1)
}
