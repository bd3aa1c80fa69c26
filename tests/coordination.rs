//! Fetch-round coordination through real Redis: three providers contending for short rounds,
//! a dead rank-0 provider, and a Redis killed under the planners.

// Fixtures and helpers of a test fail loudly on impossible input, as the tests do.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis;
use mesh_coordination::redis::Health;
use mesh_coordination::{
    Coordination, MeshView, PlannerConfig, RedisCoordination, RoundDecision, RoundPlanner,
    SkipReason, Via,
};
use mesh_protocol::{Identity, NodeId};
use mesh_storage::RedisConfig;
use mesh_tests::{
    LogCapture, RedisServer, delete_redis_prefix, eventually, redis_url, unique_name,
};
use tokio::task::JoinHandle;

/// Short rounds: 500 ms, ranks 120 ms apart (production: 10-300 s and 2-30 s).
fn config() -> PlannerConfig {
    PlannerConfig::new(Duration::from_millis(500), Duration::from_millis(120))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The coordination store of one provider process: its own pool, like a separate node.
fn redis_store(url: &str, prefix: &str) -> anyhow::Result<Arc<RedisCoordination>> {
    let config = RedisConfig { timeout: Duration::from_millis(200), ..RedisConfig::new(url) };
    let health =
        Health::with_backoff("coordination", Duration::from_millis(50), Duration::from_millis(400));
    Ok(Arc::new(RedisCoordination::with_health(config.pool()?, prefix, health)))
}

type Log = Arc<Mutex<Vec<(RoundDecision, bool)>>>;

/// Runs `planner` round after round until `until` is decided (or forever), logging each
/// decision with the planner's degraded flag; a fetch is "broadcast" to `mesh`.
fn run(
    planner: Arc<RoundPlanner>,
    until: u64,
    log: Log,
    mesh: Option<Arc<TestMesh>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let decision = planner.next().await;
            if decision.fetch
                && let Some(mesh) = &mesh
            {
                mesh.fulfilled
                    .lock()
                    .expect("mesh")
                    .entry(decision.round)
                    .or_default()
                    .push(planner.node_id());
            }
            let round = decision.round;
            log.lock().expect("log").push((decision, planner.is_degraded()));
            if round >= until {
                return;
            }
        }
    })
}

fn by_round(log: &Log) -> BTreeMap<u64, Vec<RoundDecision>> {
    let mut rounds: BTreeMap<u64, Vec<RoundDecision>> = BTreeMap::new();
    for (d, _) in log.lock().expect("log").iter() {
        rounds.entry(d.round).or_default().push(d.clone());
    }
    rounds
}

fn winners(decisions: &[RoundDecision]) -> Vec<&RoundDecision> {
    decisions.iter().filter(|d| d.fetch).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn three_providers_take_turns_with_exactly_one_winner_per_round() -> anyhow::Result<()> {
    let prefix = format!("{}:", unique_name("mesh_test"));
    // The mesh brings each winner's batch to the others at once.
    let mesh = Arc::new(TestMesh { providers: Vec::new(), fulfilled: Mutex::default() });
    let mut planners = Vec::new();
    for _ in 0..3 {
        let node = Identity::generate().node_id();
        let store = redis_store(&redis_url(), &prefix)?;
        planners.push(Arc::new(RoundPlanner::new(config(), node, store, mesh.clone())));
    }
    for p in &planners {
        assert!(p.register().await);
    }
    let first = planners[0].round_at(now_ms()) + 2;
    let last = first + 49;
    let log = Log::default();
    let tasks: Vec<_> = planners
        .iter()
        .map(|p| run(Arc::clone(p), last, log.clone(), Some(Arc::clone(&mesh))))
        .collect();
    for task in tasks {
        task.await?;
    }

    let rounds = by_round(&log);
    let mut wins: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut rank_zero_wins = 0;
    for round in first..=last {
        let decisions = &rounds[&round];
        let won = winners(decisions);
        assert_eq!(won.len(), 1, "round {round}: {decisions:#?}");
        assert_eq!(won[0].via, Via::Lease);
        let winner = won[0].providers[won[0].rank];
        *wins.entry(winner).or_default() += 1;
        rank_zero_wins += usize::from(won[0].rank == 0);
        for loser in decisions.iter().filter(|d| !d.fetch) {
            assert_eq!(loser.skip_reason, Some(SkipReason::Fulfilled), "{loser:?}");
        }
    }
    assert_eq!(wins.len(), 3, "every provider wins some rounds: {wins:?}");
    // Rank 0 tries first; only a wake-up late by more than a window lets rank 1 in.
    assert!(rank_zero_wins >= 40, "rank 0 won {rank_zero_wins} of 50 rounds");

    delete_redis_prefix(&redis_url(), &prefix).await?;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn a_provider_that_stops_heartbeating_is_replaced_one_window_later() -> anyhow::Result<()> {
    let prefix = format!("{}:", unique_name("mesh_test"));
    // Heartbeats long enough that the dead provider stays registered while we watch.
    let config = PlannerConfig { heartbeat_ttl: Duration::from_secs(60), ..config() };
    let mesh = Arc::new(TestMesh { providers: Vec::new(), fulfilled: Mutex::default() });
    let mut planners = Vec::new();
    for _ in 0..3 {
        let node = Identity::generate().node_id();
        let store = redis_store(&redis_url(), &prefix)?;
        planners.push(Arc::new(RoundPlanner::new(config, node, store, mesh.clone())));
    }
    for p in &planners {
        assert!(p.register().await);
    }
    // planners[0] registered and then stopped: it never calls `next` again.
    let dead = planners[0].node_id();
    let all: Vec<NodeId> = planners.iter().map(|p| p.node_id()).collect();
    let first = planners[0].round_at(now_ms()) + 2;
    // Watch until the dead provider was due first in three rounds (ranking is deterministic).
    let dead_first: Vec<u64> =
        (first..).filter(|&r| RoundPlanner::ranking(r, &all)[0] == dead).take(3).collect();
    let last = dead_first[2];
    let log = Log::default();
    let tasks: Vec<_> = planners[1..]
        .iter()
        .map(|p| run(Arc::clone(p), last, log.clone(), Some(Arc::clone(&mesh))))
        .collect();
    for task in tasks {
        task.await?;
    }

    let rounds = by_round(&log);
    let window = config.window.as_millis() as u64;
    let mut one_window_later = 0;
    for round in first..=last {
        let won = winners(&rounds[&round]);
        assert_eq!(won.len(), 1, "round {round}: exactly one winner, dead rank 0 or not");
        let w = won[0];
        assert_eq!(
            w.providers,
            RoundPlanner::ranking(round, &all),
            "the dead provider is still ranked"
        );
        if dead_first.contains(&round) {
            let offset = w.decided_at_unix_ms - w.round_start_unix_ms;
            assert!(
                w.rank >= 1 && offset >= window,
                "round {round}: rank {} at +{offset} ms",
                w.rank
            );
            one_window_later += usize::from(w.rank == 1 && offset < 2 * window);
        }
    }
    assert!(one_window_later >= 2, "rank 1 took over one window later in {one_window_later} of 3");

    delete_redis_prefix(&redis_url(), &prefix).await?;
    Ok(())
}

/// Issue 34 item 1: round keys written ahead into Redis by someone with access (junk, a node id
/// that is not registered, a registered id with no expiry or a day's) stop nobody: rank 0 takes
/// each round over at its slot.
#[tokio::test(flavor = "current_thread")]
async fn round_keys_written_ahead_into_redis_are_taken_over() -> anyhow::Result<()> {
    let prefix = format!("{}:", unique_name("mesh_test"));
    let mesh = Arc::new(TestMesh { providers: Vec::new(), fulfilled: Mutex::default() });
    let mut planners = Vec::new();
    for _ in 0..2 {
        let node = Identity::generate().node_id();
        let store = redis_store(&redis_url(), &prefix)?;
        planners.push(Arc::new(RoundPlanner::new(config(), node, store, mesh.clone())));
    }
    for p in &planners {
        assert!(p.register().await);
    }
    let first = planners[0].round_at(now_ms()) + 2;
    let stranger = Identity::generate().node_id().to_string();
    let ids: Vec<NodeId> = planners.iter().map(|p| p.node_id()).collect();
    // A registered provider, but not the one that comes first in the round (whose own id the
    // key would then hold).
    let second = |round: u64| RoundPlanner::ranking(round, &ids)[1].to_string();
    let squats: [(String, Option<u64>); 4] = [
        ("junk".to_owned(), Some(86_400_000)),
        (stranger, Some(86_400_000)),
        (second(first + 2), None),
        (second(first + 3), Some(86_400_000)),
    ];
    let client = redis::Client::open(redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for (i, (value, px)) in squats.iter().enumerate() {
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{prefix}coord:round:{}", first + i as u64)).arg(value);
        if let Some(px) = px {
            cmd.arg("PX").arg(*px);
        }
        cmd.query_async::<()>(&mut conn).await?;
    }
    let last = first + squats.len() as u64 - 1;
    let log = Log::default();
    let tasks: Vec<_> = planners
        .iter()
        .map(|p| run(Arc::clone(p), last, log.clone(), Some(Arc::clone(&mesh))))
        .collect();
    for task in tasks {
        task.await?;
    }
    let rounds = by_round(&log);
    for round in first..=last {
        let won = winners(&rounds[&round]);
        assert_eq!(won.len(), 1, "round {round}: {:#?}", rounds[&round]);
        assert!(won[0].taken_over && won[0].undelivered.is_some(), "round {round}: {:?}", won[0]);
        assert_eq!(won[0].rank, 0, "round {round}");
        let offset = won[0].decided_at_unix_ms - won[0].round_start_unix_ms;
        assert!(offset <= config().window.as_millis() as u64, "round {round} taken {offset} ms in");
    }
    delete_redis_prefix(&redis_url(), &prefix).await?;
    Ok(())
}

/// The mesh as the providers see it: each other, and the rounds someone broadcast.
struct TestMesh {
    providers: Vec<NodeId>,
    fulfilled: Mutex<std::collections::HashMap<u64, Vec<NodeId>>>,
}

impl MeshView for TestMesh {
    fn providers(&self) -> Vec<NodeId> {
        self.providers.clone()
    }

    fn round_origins(&self, round: u64) -> Vec<NodeId> {
        self.fulfilled.lock().expect("mesh").get(&round).cloned().unwrap_or_default()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn redis_killed_under_the_planners_falls_back_to_the_mesh_and_recovers() -> anyhow::Result<()>
{
    let (logs, _guard) = LogCapture::install();
    let mut server = RedisServer::start(None).await?;
    let nodes: Vec<NodeId> = (0..3).map(|_| Identity::generate().node_id()).collect();
    let mesh = Arc::new(TestMesh { providers: nodes.clone(), fulfilled: Mutex::default() });
    let mut planners = Vec::new();
    let mut stores = Vec::new();
    for node in &nodes {
        let store = redis_store(&server.url(), "mesh:")?;
        stores.push(Arc::clone(&store));
        planners.push(Arc::new(RoundPlanner::new(
            config(),
            *node,
            store,
            Arc::clone(&mesh) as Arc<dyn MeshView>,
        )));
    }
    for p in &planners {
        assert!(p.register().await);
    }
    let log = Log::default();
    let first = planners[0].round_at(now_ms()) + 2;
    let tasks: Vec<_> = planners
        .iter()
        .map(|p| run(Arc::clone(p), u64::MAX, log.clone(), Some(Arc::clone(&mesh))))
        .collect();
    let decided_by_all = |round: u64| {
        let log = log.clone();
        move || log.lock().expect("log").iter().filter(|(d, _)| d.round == round).count() == 3
    };

    // Lease rounds, then Redis dies.
    let until = decided_by_all(first + 3);
    eventually("three rounds by lease", Duration::from_secs(10), async || until()).await?;
    server.kill();
    let killed = planners[0].round_at(now_ms());

    let until = decided_by_all(killed + 6);
    eventually("six rounds without Redis", Duration::from_secs(10), async || until()).await?;
    assert!(stores.iter().all(|s| s.is_degraded()));
    assert!(planners.iter().all(|p| p.is_degraded()));
    server.restart().await?;
    let restarted = planners[0].round_at(now_ms());

    // Back to leases: a round every planner decided by lease, with its only winner.
    let recovered = {
        let log = log.clone();
        move || {
            let rounds = by_round(&log);
            rounds.iter().any(|(round, ds)| {
                *round > restarted && ds.len() == 3 && ds.iter().all(|d| d.via == Via::Lease)
            })
        }
    };
    eventually("rounds decided by lease again", Duration::from_secs(15), async || recovered())
        .await?;
    for task in &tasks {
        task.abort();
    }

    let rounds = by_round(&log);
    let end = *rounds.keys().last().expect("rounds");
    for round in first..end {
        let decisions = &rounds[&round];
        let won = winners(decisions);
        assert!(!won.is_empty(), "round {round} was missed: {decisions:#?}");
        if decisions.iter().all(|d| d.via == Via::Lease) {
            assert_eq!(won.len(), 1, "round {round}");
        }
    }
    for round in killed + 1..restarted {
        for (d, degraded) in log.lock().expect("log").iter().filter(|(d, _)| d.round == round) {
            assert_eq!(d.via, Via::Mesh, "round {round} during the outage");
            assert!(*degraded);
            assert!(d.fetch || d.skip_reason == Some(SkipReason::Fulfilled));
        }
    }
    assert!(stores.iter().all(|s| !s.is_degraded()));
    assert_eq!(logs.count("Redis connection failed"), 3, "one per store:\n{}", logs.text());
    assert_eq!(logs.count("Redis connection recovered"), 3);
    Ok(())
}
