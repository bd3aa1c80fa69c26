//! Several providers taking turns through one Redis, against birdeye-sim over real HTTP, with
//! one-second rounds: exactly one fetch per round spread over the providers, a dead rank-0
//! provider replaced one window later, a lease holder whose Birdeye calls fail or that dies
//! right after taking the lease replaced one window later, and every round still fetched while
//! Redis is down.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use birdeye_sim::{Endpoint, Simulator, SimulatorHandle};
use mesh_coordination::{Coordination, Lease, MeshView, RedisCoordination, RoundPlanner};
use mesh_protocol::{Envelope, Identity, NodeId, Payload};
use mesh_provider::{
    ApiKey, Assets, Broadcast, BroadcastError, ClientConfig, Provider, RetryPolicy, Settings,
};
use mesh_tests::{RedisServer, delete_redis_prefix, eventually, redis_url, unique_name};

const INTERVAL: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_millis(300);
const INTERVAL_MS: i64 = 1000;
const WINDOW_MS: i64 = 300;

/// One batch as the mesh saw it.
#[derive(Debug, Clone)]
struct Seen {
    round: u64,
    origin: NodeId,
    created_at_ms: i64,
}

/// The mesh between the providers: every batch broadcast reaches the others at once, and the
/// providers know each other (as from `ProviderAnnounce`).
#[derive(Default)]
struct Mesh {
    providers: Mutex<Vec<NodeId>>,
    seen: Mutex<Vec<Seen>>,
}

impl Mesh {
    fn batches(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn by_round(&self, rounds: std::ops::Range<u64>) -> BTreeMap<u64, Vec<Seen>> {
        let mut map: BTreeMap<u64, Vec<Seen>> = rounds.clone().map(|r| (r, Vec::new())).collect();
        for seen in self.batches() {
            if rounds.contains(&seen.round) {
                map.entry(seen.round).or_default().push(seen);
            }
        }
        map
    }

    fn has_round(&self, round: u64) -> bool {
        self.batches().iter().any(|s| s.round >= round)
    }
}

#[async_trait::async_trait]
impl Broadcast for Mesh {
    async fn broadcast(&self, envelope: Envelope) -> Result<usize, BroadcastError> {
        let body = mesh_protocol::decode_body(&envelope.body)
            .map_err(|e| BroadcastError::Failed(Box::new(e)))?;
        let Payload::PriceBatch { round, .. } = body.payload else {
            return Err(BroadcastError::Failed("not a price batch".into()));
        };
        self.seen.lock().unwrap().push(Seen {
            round,
            origin: body.origin,
            created_at_ms: body.created_at_ms,
        });
        Ok(2)
    }
}

impl MeshView for Mesh {
    fn providers(&self) -> Vec<NodeId> {
        self.providers.lock().unwrap().clone()
    }

    fn round_origins(&self, round: u64) -> Vec<NodeId> {
        self.seen.lock().unwrap().iter().filter(|s| s.round == round).map(|s| s.origin).collect()
    }
}

/// A coordination client whose process "dies": after `kill` it never speaks to Redis again,
/// so its heartbeat stays until it expires, as when a node is killed. With `die_on_lease`, it
/// dies right after it took a round's lease, before anything is fetched: the call never
/// returns.
struct Killable {
    inner: RedisCoordination,
    dead: AtomicBool,
    die_on_lease: AtomicBool,
}

impl Killable {
    fn new(url: &str, prefix: &str) -> Arc<Self> {
        Arc::new(Killable {
            inner: redis_coordination(url, prefix),
            dead: AtomicBool::new(false),
            die_on_lease: AtomicBool::new(false),
        })
    }
}

#[async_trait::async_trait]
impl Coordination for Killable {
    async fn heartbeat(&self, node: NodeId, ttl: Duration) -> mesh_coordination::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.heartbeat(node, ttl).await
    }

    async fn deregister(&self, node: NodeId) -> mesh_coordination::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.deregister(node).await
    }

    async fn active_providers(&self) -> mesh_coordination::Result<Vec<NodeId>> {
        self.inner.active_providers().await
    }

    async fn try_acquire_round(
        &self,
        round: u64,
        node: NodeId,
        lease: Duration,
    ) -> mesh_coordination::Result<Lease> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(mesh_coordination::Error::Unavailable);
        }
        let taken = self.inner.try_acquire_round(round, node, lease).await?;
        if taken.mine && self.die_on_lease.load(Ordering::SeqCst) {
            self.dead.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        Ok(taken)
    }

    async fn take_over_round(
        &self,
        round: u64,
        node: NodeId,
        previous: &str,
        lease: Duration,
    ) -> mesh_coordination::Result<bool> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(mesh_coordination::Error::Unavailable);
        }
        self.inner.take_over_round(round, node, previous, lease).await
    }

    fn is_degraded(&self) -> bool {
        self.inner.is_degraded()
    }
}

fn redis_coordination(url: &str, prefix: &str) -> RedisCoordination {
    let pool = deadpool_redis::Config::from_url(url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    RedisCoordination::new(pool, prefix)
}

fn settings(sim: &SimulatorHandle) -> Settings {
    Settings {
        interval: INTERVAL,
        window: WINDOW,
        message_ttl: 10,
        assets: Assets::default(),
        client: ClientConfig {
            base_url: sim.base_url(),
            request_timeout: Duration::from_millis(800),
            retry: RetryPolicy {
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(100),
                ..RetryPolicy::default()
            },
            ..ClientConfig::default()
        },
        clock_offset_ms: 0,
        max_clock_skew: mesh_provider::config::DEFAULT_MAX_CLOCK_SKEW,
    }
}

/// Three providers, keys `k0`..`k2`, sharing `mesh`, each with its coordination client.
async fn start_providers(
    sim: &SimulatorHandle,
    mesh: &Arc<Mesh>,
    coordinations: Vec<Arc<dyn Coordination>>,
) -> Vec<Provider> {
    let mut providers = Vec::new();
    for (i, coordination) in coordinations.into_iter().enumerate() {
        let provider = Provider::builder(Identity::generate(), settings(sim), mesh.clone())
            .coordination(coordination)
            .mesh(mesh.clone())
            .build();
        mesh.providers.lock().unwrap().push(provider.node_id());
        provider.enable(ApiKey::new(format!("k{i}"))).await.unwrap();
        providers.push(provider);
    }
    providers
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn current_round() -> u64 {
    (now_ms() / INTERVAL_MS) as u64
}

/// Multi-price requests the simulator received during `rounds`.
fn upstream_calls(sim: &SimulatorHandle, rounds: std::ops::Range<u64>) -> usize {
    let (from, to) = (rounds.start as i64 * INTERVAL_MS, rounds.end as i64 * INTERVAL_MS);
    sim.requests()
        .iter()
        .filter(|r| r.endpoint == Endpoint::MultiPrice && (from..to).contains(&r.at_unix_ms))
        .count()
}

async fn wait_for_round(mesh: &Mesh, round: u64) {
    let secs = (round.saturating_sub(current_round()) + 5).min(60);
    eventually(&format!("a batch of round {round}"), Duration::from_secs(secs), async || {
        mesh.has_round(round)
    })
    .await
    .unwrap();
}

fn sim_keys() -> birdeye_sim::SimulatorBuilder {
    Simulator::builder().keys(["k0", "k1", "k2"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_providers_fetch_each_round_exactly_once() {
    let prefix = format!("{}:", unique_name("mesh_test_provider"));
    let sim = sim_keys().spawn("127.0.0.1:0").await.unwrap();
    let mesh = Arc::new(Mesh::default());
    let coordinations: Vec<Arc<dyn Coordination>> =
        (0..3).map(|_| Arc::new(redis_coordination(&redis_url(), &prefix)) as _).collect();
    let providers = start_providers(&sim, &mesh, coordinations).await;
    let ids: Vec<NodeId> = providers.iter().map(Provider::node_id).collect();

    // From two rounds on, all three are registered in every planner's view.
    let first = current_round() + 2;
    let rounds = first..first + 20;
    wait_for_round(&mesh, rounds.end).await;
    for provider in &providers {
        provider.shutdown().await;
    }

    let by_round = mesh.by_round(rounds.clone());
    let mut per_provider: BTreeMap<NodeId, usize> = BTreeMap::new();
    for (round, seen) in &by_round {
        assert_eq!(seen.len(), 1, "round {round} fetched {} times: {seen:?}", seen.len());
        // The rank-0 provider of the round, never a later rank: it is alive.
        assert_eq!(seen[0].origin, RoundPlanner::ranking(*round, &ids)[0], "round {round}");
        *per_provider.entry(seen[0].origin).or_default() += 1;
    }
    // Exactly one fetch (one request per chain) per round reached Birdeye.
    assert_eq!(upstream_calls(&sim, rounds.clone()), 2 * 20);
    // The work rotates.
    assert!(per_provider.len() >= 2, "one provider did every round: {per_provider:?}");
    let per_key: Vec<u64> = (0..3).map(|i| sim.stats().key(&format!("k{i}")).multi_price).collect();
    println!("rounds per provider: {:?}; calls per key: {per_key:?}", per_provider.values());
    delete_redis_prefix(&redis_url(), &prefix).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rank0_provider_is_replaced_one_window_later() {
    let prefix = format!("{}:", unique_name("mesh_test_provider"));
    let sim = sim_keys().spawn("127.0.0.1:0").await.unwrap();
    let mesh = Arc::new(Mesh::default());
    let killables: Vec<Arc<Killable>> =
        (0..3).map(|_| Killable::new(&redis_url(), &prefix)).collect();
    let coordinations = killables.iter().map(|k| k.clone() as Arc<dyn Coordination>).collect();
    let providers = start_providers(&sim, &mesh, coordinations).await;
    let ids: Vec<NodeId> = providers.iter().map(Provider::node_id).collect();

    // Kill the rank-0 provider of round `r` in the middle of the round before it: it is still
    // registered (its heartbeat lasts three rounds) when `r` starts.
    let r = current_round() + 3;
    let victim_id = RoundPlanner::ranking(r, &ids)[0];
    let victim = ids.iter().position(|id| *id == victim_id).unwrap();
    let kill_at = (r as i64 - 1) * INTERVAL_MS + 500;
    eventually("the middle of the round before", Duration::from_secs(5), async || {
        now_ms() >= kill_at
    })
    .await
    .unwrap();
    killables[victim].dead.store(true, Ordering::SeqCst);
    providers[victim].shutdown().await;
    assert!(ids.contains(&victim_id));

    // While its heartbeat lasts, rounds it would have fetched are taken by rank 1.
    let rounds = r..r + 3;
    wait_for_round(&mesh, rounds.end).await;
    let survivors: Vec<&Provider> =
        providers.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, p)| p).collect();
    for provider in survivors {
        provider.shutdown().await;
    }
    let by_round = mesh.by_round(rounds.clone());
    for (round, seen) in &by_round {
        assert_eq!(seen.len(), 1, "round {round} fetched {} times: {seen:?}", seen.len());
        assert_ne!(seen[0].origin, victim_id, "the dead provider fetched round {round}");
    }
    let taken_over = &by_round[&r][0];
    assert_eq!(taken_over.origin, RoundPlanner::ranking(r, &ids)[1]);
    let late = taken_over.created_at_ms - r as i64 * INTERVAL_MS;
    // Not before rank 1's slot; the fetch itself may take a while on a busy machine, but stays
    // inside the round.
    assert!(
        (WINDOW_MS..INTERVAL_MS).contains(&late),
        "round {r} was fetched {late} ms after its start; rank 1 fetches one window ({WINDOW_MS} ms) in"
    );
    assert_eq!(upstream_calls(&sim, rounds), 2 * 3);
    delete_redis_prefix(&redis_url(), &prefix).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_every_round_is_still_fetched() {
    let mut redis = RedisServer::start(None).await.unwrap();
    let sim = sim_keys().spawn("127.0.0.1:0").await.unwrap();
    let mesh = Arc::new(Mesh::default());
    let coordinations: Vec<Arc<dyn Coordination>> =
        (0..3).map(|_| Arc::new(redis_coordination(&redis.url(), "mesh:")) as _).collect();
    let providers = start_providers(&sim, &mesh, coordinations).await;

    // Coordinated first: one batch per round.
    let warm = current_round() + 2;
    wait_for_round(&mesh, warm + 1).await;
    assert_eq!(mesh.by_round(warm..warm + 1)[&warm].len(), 1);

    redis.kill();
    let first = current_round() + 1;
    let rounds = first..first + 6;
    wait_for_round(&mesh, rounds.end).await;
    let statuses: Vec<_> = providers.iter().map(Provider::status).collect();
    for provider in &providers {
        provider.shutdown().await;
    }

    let by_round = mesh.by_round(rounds.clone());
    let mut duplicates = 0;
    for (round, seen) in &by_round {
        assert!(!seen.is_empty(), "round {round} was missed while Redis was down");
        duplicates += seen.len() - 1;
    }
    let batches: usize = by_round.values().map(Vec::len).sum();
    // Every fetch became a batch; duplicates are counted, not hidden.
    assert_eq!(upstream_calls(&sim, rounds.clone()), 2 * batches);
    assert!(statuses.iter().all(|s| s.enabled && s.degraded), "{statuses:?}");
    let uncoordinated: u64 = statuses.iter().map(|s| s.rounds_fetched_uncoordinated).sum();
    assert!(uncoordinated >= rounds.end - rounds.start - 1, "{statuses:?}");
    println!(
        "Redis down for {} rounds: {batches} batches, {duplicates} duplicates",
        rounds.end - rounds.start
    );
}

/// Successful multi-price answers (one per chain and fetch) during `round`, and requests from
/// keys other than `except`.
fn round_calls(sim: &SimulatorHandle, round: u64, except: &str) -> (usize, usize) {
    let (from, to) = (round as i64 * INTERVAL_MS, (round as i64 + 1) * INTERVAL_MS);
    let requests: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::MultiPrice && (from..to).contains(&r.at_unix_ms))
        .collect();
    let ok = requests.iter().filter(|r| r.status == 200).count();
    let others = requests.iter().filter(|r| r.key != except).count();
    (ok, others)
}

/// Issue 34 item 1: the provider of key `k0` keeps its lease rounds but every Birdeye call it
/// makes fails (500, retried until the round ends). Each of its rounds is still fetched, by the
/// next rank one window after the lease was taken, with one fetch's worth of extra requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_whose_birdeye_calls_fail_is_taken_over_one_window_later() {
    let prefix = format!("{}:", unique_name("mesh_test_provider"));
    let sim = sim_keys().spawn("127.0.0.1:0").await.unwrap();
    let mesh = Arc::new(Mesh::default());
    let coordinations: Vec<Arc<dyn Coordination>> =
        (0..3).map(|_| Arc::new(redis_coordination(&redis_url(), &prefix)) as _).collect();
    let providers = start_providers(&sim, &mesh, coordinations).await;
    let ids: Vec<NodeId> = providers.iter().map(Provider::node_id).collect();
    sim.set_failing_key("k0", Some(birdeye_sim::Failure::status(500)));

    let first = current_round() + 2;
    let rounds = first..first + 12;
    wait_for_round(&mesh, rounds.end).await;
    for provider in &providers {
        provider.shutdown().await;
    }
    let by_round = mesh.by_round(rounds.clone());
    let mut taken_over = 0;
    for (round, seen) in &by_round {
        let (ok, others) = round_calls(&sim, *round, "k0");
        assert_eq!(seen.len(), 1, "round {round} fetched {} times: {seen:?}", seen.len());
        assert_ne!(seen[0].origin, ids[0], "round {round}: the failing provider sent a batch");
        assert_eq!(ok, 2, "round {round}: one successful fetch (one request per chain)");
        let ranking = RoundPlanner::ranking(*round, &ids);
        if ranking[0] == ids[0] {
            taken_over += 1;
            let late = seen[0].created_at_ms - *round as i64 * INTERVAL_MS;
            assert!(
                (WINDOW_MS..INTERVAL_MS).contains(&late),
                "round {round} fetched {late} ms in; the take-over is one window ({WINDOW_MS} ms) in"
            );
        }
        // The honest keys made one fetch (two requests), whoever held the lease.
        assert_eq!(others, 2, "round {round}: {others} requests from the working keys");
    }
    assert!(taken_over >= 1, "the failing provider ranked first in no round: rerun");
    let failing = sim.stats().key("k0");
    println!("taken over {taken_over} of 12 rounds; failing key: {failing:?}");
    delete_redis_prefix(&redis_url(), &prefix).await.unwrap();
}

/// Issue 34 item 1: a provider killed right after it took a round's lease (before fetching,
/// its heartbeat still registered) costs that round one window, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_right_after_taking_the_lease_costs_one_window() {
    let prefix = format!("{}:", unique_name("mesh_test_provider"));
    let sim = sim_keys().spawn("127.0.0.1:0").await.unwrap();
    let mesh = Arc::new(Mesh::default());
    let killables: Vec<Arc<Killable>> =
        (0..3).map(|_| Killable::new(&redis_url(), &prefix)).collect();
    let coordinations = killables.iter().map(|k| k.clone() as Arc<dyn Coordination>).collect();
    let providers = start_providers(&sim, &mesh, coordinations).await;
    let ids: Vec<NodeId> = providers.iter().map(Provider::node_id).collect();

    // The rank-0 provider of round `r` dies when it takes a lease from the middle of the round
    // before (it may take none before `r`).
    let r = current_round() + 3;
    let victim_id = RoundPlanner::ranking(r, &ids)[0];
    let victim = ids.iter().position(|id| *id == victim_id).unwrap();
    let arm_at = (r as i64 - 1) * INTERVAL_MS + 500;
    eventually("the middle of the round before", Duration::from_secs(5), async || {
        now_ms() >= arm_at
    })
    .await
    .unwrap();
    killables[victim].die_on_lease.store(true, Ordering::SeqCst);
    let rounds = r..r + 4;
    wait_for_round(&mesh, rounds.end).await;
    let died = killables[victim].dead.load(Ordering::SeqCst);
    for provider in &providers {
        provider.shutdown().await;
    }
    assert!(died, "the victim never took a lease");
    let by_round = mesh.by_round(rounds.clone());
    for (round, seen) in &by_round {
        assert_eq!(seen.len(), 1, "round {round} fetched {} times: {seen:?}", seen.len());
        assert_ne!(seen[0].origin, victim_id, "the dead provider fetched round {round}");
    }
    let late = by_round[&r][0].created_at_ms - r as i64 * INTERVAL_MS;
    assert!(
        (WINDOW_MS..INTERVAL_MS).contains(&late),
        "round {r} fetched {late} ms in; the take-over is one window ({WINDOW_MS} ms) in"
    );
    // Nothing was fetched for the dead holder's lease: one fetch per round.
    assert_eq!(upstream_calls(&sim, rounds.clone()), 2 * rounds.clone().count());
    delete_redis_prefix(&redis_url(), &prefix).await.unwrap();
}
