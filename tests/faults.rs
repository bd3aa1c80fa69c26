//! Fault tests on whole nodes (`mesh-service` in this process through `mesh-testkit`'s
//! LocalMesh, and real `mesh-node` processes for the provider killed with SIGKILL), against
//! servers of the test's own (a `redis-server` child, a throwaway PostgreSQL cluster, both on
//! spare loopback ports; never the machine's): Redis killed then restored, PostgreSQL stopped
//! then restored, a provider killed and restarted, a fifth of a 30-node mesh killed and
//! restarted again and again, a partition then heal.
//!
//! Each test reports delivery to live nodes, rounds missed, rows lost and recovery times as a
//! `RELIABILITY {...}` JSON line, asserts the promises of RELIABILITY.md, and polls an HTTP API
//! (`mesh-api`) in front of a node that stays up: every answer must be a 200. The bounded
//! versions take seconds; `MESH_LONG_FAULTS=1` runs the long ones (Redis down 60 s,
//! PostgreSQL down 3 minutes, more cycles).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_coordination::RoundPlanner;
use mesh_protocol::NodeId;
use mesh_service::Node;
use mesh_testkit::{LocalMesh, eventually, now_ms};
use mesh_tests::api::start_api;
use mesh_tests::reliability::{ApiPoller, ms, pick, report};
use mesh_tests::{PgCluster, RedisServer, mesh_node_bin};
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(60);
/// How often the tests poll the API and the nodes' round records.
const POLL: Duration = Duration::from_millis(100);

/// The round that `unix_ms` falls in, for rounds of `interval_secs`.
fn round_at(unix_ms: i64, interval_secs: u64) -> u64 {
    (unix_ms.max(0) as u64) / 1000 / interval_secs
}

/// Every round each node received a batch for, with the batches' origins. A node remembers
/// only its last 16 rounds (`Node::rounds_received`), so the tests sample while they wait.
#[derive(Debug, Default)]
struct Rounds {
    by_node: HashMap<usize, BTreeMap<u64, BTreeSet<NodeId>>>,
    /// When each (node, round) was first seen here.
    first_seen: HashMap<(usize, u64), Instant>,
}

impl Rounds {
    fn sample_node(&mut self, i: usize, node: &Node) {
        let now = Instant::now();
        let log = self.by_node.entry(i).or_default();
        for (round, origins) in node.rounds_received() {
            log.entry(round).or_default().extend(origins);
            self.first_seen.entry((i, round)).or_insert(now);
        }
    }

    fn sample(&mut self, mesh: &LocalMesh) {
        for i in 0..mesh.len() {
            if let Some(node) = mesh.node(i) {
                self.sample_node(i, node);
            }
        }
    }

    fn received(&self, i: usize) -> BTreeMap<u64, BTreeSet<NodeId>> {
        self.by_node.get(&i).cloned().unwrap_or_default()
    }

    fn has(&self, i: usize, round: u64) -> bool {
        self.by_node.get(&i).is_some_and(|l| l.contains_key(&round))
    }

    fn latest(&self, i: usize) -> Option<u64> {
        self.by_node.get(&i).and_then(|l| l.keys().next_back().copied())
    }

    /// Rounds of `range` node `i` never received.
    fn missed(&self, i: usize, range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
        range.filter(|r| !self.has(i, *r)).collect()
    }

    /// Batches (round, origin) node `i` received.
    fn batches(&self, i: usize) -> usize {
        self.by_node.get(&i).map_or(0, |l| l.values().map(BTreeSet::len).sum())
    }
}

/// Samples the mesh's rounds every [`POLL`] for `d` (holding a fault for its duration).
async fn hold(mesh: &LocalMesh, rounds: &mut Rounds, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        rounds.sample(mesh);
        tokio::time::sleep(POLL).await;
    }
    rounds.sample(mesh);
}

/// Samples the mesh's rounds every [`POLL`] until `done` holds; `false` when `limit` passed
/// first.
async fn sample_until(
    mesh: &LocalMesh,
    rounds: &mut Rounds,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let end = Instant::now() + limit;
    loop {
        rounds.sample(mesh);
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits (sampling) until each of `nodes` received a round at or after `round`; a missed
/// round does not stall this, it shows in [`Rounds::missed`].
async fn wait_round(
    mesh: &LocalMesh,
    rounds: &mut Rounds,
    nodes: &[usize],
    round: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        rounds.sample(mesh);
        if nodes.iter().all(|&i| rounds.latest(i).is_some_and(|r| r >= round)) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "round {round} did not reach nodes {nodes:?} within {WAIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// (asset, price, time) of every price node `node` serves, sorted; the time is when the price
/// was true (its source's time when given), which is what the stores keep.
fn book(node: &Node) -> Vec<(String, String, i64)> {
    let observed = |p: &mesh_ipc::PriceView| p.source_timestamp_ms.unwrap_or(p.timestamp_ms);
    let mut v: Vec<_> =
        node.prices().iter().map(|p| (p.asset.clone(), p.price.to_string(), observed(p))).collect();
    v.sort();
    v
}

/// Waits until node `node`'s write-behind queues are empty and healthy, then counts the
/// served prices its store does not hold (missing or older): the rows lost. Call it once the
/// book stopped moving (providers stopped).
async fn rows_lost(node: &Node) -> anyhow::Result<(usize, usize)> {
    let persistence = node.persistence();
    eventually(WAIT, "the write-behind queues drained", || {
        let (p, s) = (persistence.prices.stats(), persistence.seen.stats());
        !p.degraded && !s.degraded && p.pending == 0 && s.pending == 0
    })
    .await?;
    let served = book(node);
    let mut stored: Vec<_> = persistence
        .price_store()
        .load_all()
        .await?
        .into_iter()
        .map(|r| (r.asset, r.price.to_string(), r.timestamp_ms))
        .collect();
    stored.sort();
    let lost = served.iter().filter(|p| !stored.contains(p)).count();
    Ok((served.len(), lost))
}

fn consumers(mesh: &LocalMesh) -> Vec<usize> {
    (mesh.provider_indexes().end..mesh.len()).collect()
}

/// An API in front of node `i` of `mesh`, polled every [`POLL`].
async fn api_on(node: &Node) -> anyhow::Result<(mesh_api::ApiServer, ApiPoller)> {
    let api = start_api(node.socket(), |_| {}).await?;
    let url = format!("http://{}/api/mesh/prices", api.local_addr());
    // The API follows the node over its socket: wait for it before polling starts.
    let client = reqwest::Client::new();
    mesh_tests::eventually("the API serves prices", WAIT, async || {
        client.get(&url).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await?;
    Ok((api, ApiPoller::start(url, POLL)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restored() -> anyhow::Result<()> {
    let outage = pick(Duration::from_secs(5), Duration::from_secs(60));
    let mut redis = RedisServer::start(None).await?;
    let mut mesh = LocalMesh::builder()
        .providers(2)
        .consumers(3)
        .rounds(2, 1)
        .redis(redis.url())
        .start()
        .await?;
    let all: Vec<usize> = (0..mesh.len()).collect();
    let watched = consumers(&mesh);
    let mut rounds = Rounds::default();
    eventually(WAIT, "every consumer holds the nine prices", || {
        watched.iter().all(|&i| mesh.node(i).unwrap().prices().len() == 9)
    })
    .await?;
    let (api, poller) = api_on(mesh.running(2)?).await?;

    let first = round_at(now_ms(), 2) + 1;
    wait_round(&mesh, &mut rounds, &watched, first).await?;
    redis.kill();
    let killed = Instant::now();
    let killed_round = round_at(now_ms(), 2);
    eventually(WAIT, "the providers report Redis and coordination degraded", || {
        (0..2).all(|i| {
            let s = mesh.node(i).unwrap().network_status();
            s.degraded_components.iter().any(|c| c == "coordination")
        })
    })
    .await?;
    let detected = killed.elapsed();
    hold(&mesh, &mut rounds, outage.saturating_sub(killed.elapsed())).await;
    redis.restart().await?;
    let restored = Instant::now();
    let restored_round = round_at(now_ms(), 2);
    // Recovered: no node reports anything degraded.
    let healthy = sample_until(&mesh, &mut rounds, WAIT, || {
        all.iter().all(|&i| !mesh.node(i).unwrap().network_status().degraded)
    })
    .await;
    anyhow::ensure!(healthy, "still degraded {WAIT:?} after Redis came back");
    let recovered = restored.elapsed();
    let last = round_at(now_ms(), 2) + 2;
    wait_round(&mesh, &mut rounds, &watched, last).await?;
    let missed: BTreeMap<usize, Vec<u64>> =
        watched.iter().map(|&i| (i, rounds.missed(i, first..=last))).collect();

    // Freeze the books, then count what storage lost: the database (SQLite here) and the
    // Redis mirror, which Redis lost when it was killed and the nodes wrote back.
    mesh.stop(0).await?;
    mesh.stop(1).await?;
    let mut lost_db = 0;
    let mut lost_mirror = 0;
    for &i in &watched {
        let node = mesh.running(i)?;
        lost_db += rows_lost(node).await?.1;
        let mirror = node.persistence().redis.as_ref().unwrap().mirror.clone();
        eventually(WAIT, "the mirror is back on Redis", || !mirror.is_degraded()).await?;
        let mirrored: Vec<(String, i64)> =
            mirror.read_all().await.into_iter().map(|r| (r.asset, r.timestamp_ms)).collect();
        lost_mirror += book(node)
            .iter()
            .filter(|(asset, _, ts)| !mirrored.iter().any(|(a, t)| a == asset && *t >= *ts))
            .count();
    }
    let availability = poller.stop().await?;
    let expected = (last - first + 1) as usize * watched.len();
    let missed_total: usize = missed.values().map(Vec::len).sum();
    let mut figures = json!({
        "outage_s": outage.as_secs(),
        "rounds": last - first + 1,
        "rounds_killed_restored": [killed_round - first, restored_round - first],
        "delivery": 1.0 - missed_total as f64 / expected as f64,
        "rounds_missed": missed_total,
        "missed": missed.values().flatten().map(|r| r - first).collect::<BTreeSet<u64>>(),
        "rows_lost_db": lost_db,
        "rows_lost_redis_mirror": lost_mirror,
        "detect_ms": ms(detected),
        "recover_ms": ms(recovered),
    });
    figures.as_object_mut().unwrap().extend(availability.json().as_object().unwrap().clone());
    report("redis_killed_then_restored", figures);

    assert_eq!(missed_total, 0, "rounds missed while Redis was down: {missed:?}");
    assert_eq!((lost_db, lost_mirror), (0, 0));
    assert!(recovered < Duration::from_secs(30), "recovered after {recovered:?}");
    availability.assert_always_ok(outage.as_secs() * 5)?;
    api.shutdown(Duration::from_secs(5)).await;
    mesh.shutdown().await
}

/// Creates database `name` in `cluster`.
async fn create_db(cluster: &PgCluster, name: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(&cluster.url("postgres")).await?;
    conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
    conn.close().await?;
    Ok(cluster.url(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_then_restored() -> anyhow::Result<()> {
    let outage = pick(Duration::from_secs(5), Duration::from_secs(180));
    let pg = PgCluster::start().await?;
    let urls = [create_db(&pg, "node_two").await?, create_db(&pg, "node_three").await?];
    let mut mesh = LocalMesh::builder()
        .providers(2)
        .consumers(2)
        .rounds(2, 1)
        .per_node(move |i, o| {
            if i >= 2 {
                o.insert("DATABASE_URL".into(), urls[i - 2].clone());
            }
        })
        .start()
        .await?;
    let watched = consumers(&mesh);
    let mut rounds = Rounds::default();
    // From the start: the seen ids written must match every batch delivered.
    rounds.sample(&mesh);
    eventually(WAIT, "every consumer holds the nine prices", || {
        watched.iter().all(|&i| mesh.node(i).unwrap().prices().len() == 9)
    })
    .await?;
    for &i in &watched {
        let store = mesh.running(i)?.persistence().price_store().clone();
        mesh_tests::eventually("rows reach PostgreSQL", WAIT, async || {
            store.load_all().await.is_ok_and(|r| r.len() == 9)
        })
        .await?;
    }
    let (api, poller) = api_on(mesh.running(2)?).await?;

    let first = round_at(now_ms(), 2) + 1;
    wait_round(&mesh, &mut rounds, &watched, first).await?;
    pg.stop()?;
    let stopped = Instant::now();
    eventually(WAIT, "the consumers' queues report the outage", || {
        watched.iter().all(|&i| mesh.node(i).unwrap().persistence().prices.is_degraded())
    })
    .await?;
    let detected = stopped.elapsed();
    hold(&mesh, &mut rounds, outage.saturating_sub(stopped.elapsed())).await;
    let held: Vec<usize> =
        watched.iter().map(|&i| mesh.node(i).unwrap().persistence().seen.stats().pending).collect();
    pg.start_again()?;
    let restarted = Instant::now();
    let flushed = sample_until(&mesh, &mut rounds, WAIT, || {
        watched.iter().all(|&i| {
            let p = mesh.node(i).unwrap().persistence();
            !p.prices.is_degraded() && !p.seen.is_degraded() && p.prices.stats().pending == 0
        })
    })
    .await;
    anyhow::ensure!(flushed, "queues still held {WAIT:?} after recovery");
    let recovered = restarted.elapsed();
    let last = round_at(now_ms(), 2) + 1;
    wait_round(&mesh, &mut rounds, &watched, last).await?;
    let missed: BTreeMap<usize, Vec<u64>> =
        watched.iter().map(|&i| (i, rounds.missed(i, first..=last))).collect();

    mesh.stop(0).await?;
    mesh.stop(1).await?;
    let mut lost_prices = 0;
    let mut lost_seen = 0;
    let mut dropped = 0;
    for &i in &watched {
        let node = mesh.running(i)?;
        rounds.sample_node(i, node);
        lost_prices += rows_lost(node).await?.1;
        // One seen id per batch delivered since the node started.
        let stored = mesh_storage::SeenStore::new(node.persistence().db.clone())
            .load_unexpired()
            .await?
            .len();
        lost_seen += rounds.batches(i).saturating_sub(stored);
        let p = node.persistence();
        dropped += p.prices.stats().dropped + p.seen.stats().dropped;
    }
    let availability = poller.stop().await?;
    let expected = (last - first + 1) as usize * watched.len();
    let missed_total: usize = missed.values().map(Vec::len).sum();
    let mut figures = json!({
        "outage_s": outage.as_secs(),
        "rounds": last - first + 1,
        "delivery": 1.0 - missed_total as f64 / expected as f64,
        "rounds_missed": missed_total,
        "seen_ids_held_at_restart": held,
        "rows_lost_prices": lost_prices,
        "rows_lost_seen_ids": lost_seen,
        "rows_dropped": dropped,
        "detect_ms": ms(detected),
        "recover_ms": ms(recovered),
    });
    figures.as_object_mut().unwrap().extend(availability.json().as_object().unwrap().clone());
    report("postgres_stopped_then_restored", figures);

    assert_eq!(missed_total, 0, "rounds missed while PostgreSQL was down: {missed:?}");
    assert_eq!((lost_prices, lost_seen, dropped), (0, 0, 0));
    assert!(held.iter().all(|&h| h > 0), "the outage held seen ids: {held:?}");
    assert!(recovered < Duration::from_secs(30), "recovered after {recovered:?}");
    availability.assert_always_ok(outage.as_secs() * 5)?;
    api.shutdown(Duration::from_secs(5)).await;
    mesh.shutdown().await
}

/// A provider process of the test, killed (SIGKILL) when dropped.
struct ProviderProcess {
    dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    node_id: NodeId,
}

impl ProviderProcess {
    fn new(dir: PathBuf, env: Vec<(String, String)>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let out = Self::command(&dir, &env)?.arg("id").stdout(Stdio::piped()).output()?;
        anyhow::ensure!(out.status.success(), "mesh-node id failed: {out:?}");
        let text = String::from_utf8(out.stdout)?;
        let node_id = text
            .lines()
            .find_map(|l| l.strip_prefix("node_id: "))
            .ok_or_else(|| anyhow::anyhow!("no node_id in {text:?}"))?
            .trim()
            .parse()?;
        Ok(Self { dir, env, child: None, node_id })
    }

    fn command(dir: &Path, env: &[(String, String)]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(mesh_node_bin()?);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MESH_DATA_DIR", dir)
            .env("MESH_LOG_DIR", dir.join("logs"))
            .env("MESH_NODE_SOCKET", dir.join("node.sock"))
            .env("MESH_MDNS_ENABLED", "false")
            .env("MESH_METRICS_LISTEN", "off")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(cmd)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "already running");
        self.child = Some(Self::command(&self.dir, &self.env)?.arg("--provider").spawn()?);
        Ok(())
    }

    /// SIGKILL: no goodbye to Redis or peers, nothing flushed.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ProviderProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// First round after `after` in which `node` ranks first among `providers`.
fn next_first_rank(after: u64, node: NodeId, providers: &[NodeId]) -> u64 {
    (after + 1..).find(|&r| RoundPlanner::ranking(r, providers)[0] == node).unwrap_or(after + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_killed_with_sigkill_and_restarted() -> anyhow::Result<()> {
    // Process providers run the operators' minimum round (10 s) and window (2 s).
    const INTERVAL: u64 = 10;
    const WINDOW_MS: i64 = 2_000;
    let cycles = pick(1, 4);
    let redis = RedisServer::start(None).await?;
    let dir = tempfile::tempdir()?;
    // Consumers in this process; the providers are processes that bootstrap from them.
    let mesh = LocalMesh::builder()
        .providers(0)
        .consumers(3)
        .rounds(INTERVAL, 2)
        .dir(dir.path().join("mesh"))
        .start()
        .await?;
    let sim = &mesh.simulators()[0];
    let mut bootstrap = Vec::new();
    for i in 0..2 {
        let node = mesh.running(i)?;
        let addr = node
            .relay()
            .listen_addrs()
            .await?
            .into_iter()
            .find(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/"));
        let addr = addr.ok_or_else(|| anyhow::anyhow!("node {i} has no TCP address"))?;
        bootstrap.push(format!("{addr}/p2p/{}", node.peer_id()));
    }
    let prefix = format!("{}:", mesh_tests::unique_name("mesh_faults"));
    let mut providers = Vec::new();
    for name in ["a", "b"] {
        let env = vec![
            (
                "MESH_LISTEN_ADDRS".into(),
                format!("/ip4/127.0.0.1/tcp/{}", mesh_tests::free_port()?),
            ),
            ("MESH_BOOTSTRAP_PEERS".into(), bootstrap.join(",")),
            ("MESH_ALLOW_PRIVATE_ADDRS".into(), "true".into()),
            ("MESH_BIRDEYE_BASE_URL".into(), sim.base_url()),
            ("BIRDEYE_API_KEY".into(), mesh_testkit::DEMO_API_KEY.into()),
            ("MESH_PROVIDER_FETCH_INTERVAL_SECS".into(), INTERVAL.to_string()),
            ("MESH_COORDINATION_WINDOW_SECS".into(), "2".into()),
            ("REDIS_URL".into(), redis.url()),
            ("MESH_REDIS_PREFIX".into(), prefix.clone()),
        ];
        let mut p = ProviderProcess::new(dir.path().join(name), env)?;
        p.start()?;
        providers.push(p);
    }
    let ids: Vec<NodeId> = providers.iter().map(|p| p.node_id).collect();
    let watched = consumers(&mesh);
    let mut rounds = Rounds::default();
    // A provider is active once it has delivered, and the two take turns at random: one may
    // wait several rounds for its first turn (within 6 rounds, one in 32 runs would not get
    // one). 20 rounds make that one in half a million.
    let first_turns = Duration::from_secs(INTERVAL * 20);
    eventually(first_turns, "the consumers know both providers and hold prices", || {
        watched.iter().all(|&i| {
            let node = mesh.node(i).unwrap();
            let active = node.network_status().active_providers;
            node.prices().len() == 9 && ids.iter().all(|id| active.iter().any(|p| p.node_id == *id))
        })
    })
    .await?;
    let (api, poller) = api_on(mesh.running(0)?).await?;
    let first = round_at(now_ms(), INTERVAL) + 1;
    wait_round(&mesh, &mut rounds, &watched, first).await?;

    let mut takeovers = Vec::new();
    let mut rejoins = Vec::new();
    let mut refetches = Vec::new();
    for _ in 0..cycles {
        // Kill the provider that ranks first in the next round (at least 3 s away), 1.5 s
        // before that round: the other must take it over one window later (the dead one's
        // registration lives on until its heartbeat expires).
        let victim = round_at(now_ms() + 3_000, INTERVAL) + 1;
        let k = ids.iter().position(|id| RoundPlanner::ranking(victim, &ids)[0] == *id).unwrap();
        let (dead, alive) = (ids[k], ids[1 - k]);
        let start_ms = (victim * INTERVAL * 1000) as i64;
        hold(
            &mesh,
            &mut rounds,
            Duration::from_millis((start_ms - 1_500 - now_ms()).max(0) as u64),
        )
        .await;
        providers[k].kill();
        wait_round(&mesh, &mut rounds, &watched, victim).await?;
        for &i in &watched {
            anyhow::ensure!(
                rounds.received(i).get(&victim).is_some_and(|o| o.contains(&alive)),
                "round {victim} not taken over at node {i}: {:?}",
                rounds.received(i).get(&victim)
            );
        }
        // When the takeover reached the consumers, from the round start (a poll's precision).
        let seen = watched
            .iter()
            .filter_map(|&i| rounds.first_seen.get(&(i, victim)).copied())
            .max()
            .unwrap();
        takeovers.push(now_ms() - seen.elapsed().as_millis() as i64 - start_ms);
        // Stay down at least one more round (three in the long run), and come back 4 s before
        // a round the dead provider ranks first in: it must fetch that round.
        let again = next_first_rank(victim + pick(1, 3), dead, &ids);
        let again_ms = (again * INTERVAL * 1000) as i64;
        hold(
            &mesh,
            &mut rounds,
            Duration::from_millis((again_ms - 4_000 - now_ms()).max(0) as u64),
        )
        .await;
        // Its last_seen at each consumer stays put while it is dead; a new one means its
        // announce arrived after the restart.
        let last_seen = |i: usize| {
            mesh.node(i).and_then(|n| {
                n.network_status()
                    .active_providers
                    .into_iter()
                    .find(|p| p.node_id == dead)
                    .map(|p| p.last_seen)
            })
        };
        let before: Vec<Option<String>> = watched.iter().map(|&i| last_seen(i)).collect();
        providers[k].start()?;
        let restarted = Instant::now();
        eventually(WAIT, "the consumers hear the restarted provider", || {
            watched
                .iter()
                .zip(&before)
                .all(|(&i, b)| last_seen(i).is_some_and(|s| Some(&s) != b.as_ref()))
        })
        .await?;
        rejoins.push(restarted.elapsed());
        wait_round(&mesh, &mut rounds, &watched, again).await?;
        anyhow::ensure!(
            rounds.received(watched[0]).get(&again).is_some_and(|o| o.contains(&dead)),
            "the restarted provider did not fetch round {again}: {:?}",
            rounds.received(watched[0]).get(&again)
        );
        let seen = rounds.first_seen[&(watched[0], again)];
        refetches.push(seen.saturating_duration_since(restarted));
    }
    let last = round_at(now_ms(), INTERVAL);
    wait_round(&mesh, &mut rounds, &watched, last).await?;
    let missed: BTreeMap<usize, Vec<u64>> =
        watched.iter().map(|&i| (i, rounds.missed(i, first..=last))).collect();
    let missed_total: usize = missed.values().map(Vec::len).sum();
    // Rounds fetched twice (both providers' batches arrived for one round).
    let doubled = (first..=last)
        .filter(|r| rounds.received(watched[0]).get(r).is_some_and(|o| o.len() > 1))
        .count();

    for p in &mut providers {
        p.kill();
    }
    let mut lost = 0;
    for &i in &watched {
        lost += rows_lost(mesh.running(i)?).await?.1;
    }
    let availability = poller.stop().await?;
    let expected = (last - first + 1) as usize * watched.len();
    let mut figures = json!({
        "cycles": cycles,
        "rounds": last - first + 1,
        "delivery": 1.0 - missed_total as f64 / expected as f64,
        "rounds_missed": missed_total,
        "rounds_fetched_twice": doubled,
        "rows_lost": lost,
        "takeover_after_round_start_ms": takeovers,
        "heard_again_ms": rejoins.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        "fetching_again_ms": refetches.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
    });
    figures.as_object_mut().unwrap().extend(availability.json().as_object().unwrap().clone());
    report("provider_killed_and_restarted", figures);

    assert_eq!(missed_total, 0, "rounds missed: {missed:?}");
    assert_eq!(lost, 0);
    for t in &takeovers {
        // One window after the round start, plus the fetch and the trip (a poll's precision).
        assert!(*t >= WINDOW_MS - 200 && *t < WINDOW_MS + 5_000, "takeovers {takeovers:?}");
    }
    availability.assert_always_ok(20)?;
    api.shutdown(Duration::from_secs(5)).await;
    mesh.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifth_of_a_30_node_mesh_killed_and_restarted_repeatedly() -> anyhow::Result<()> {
    let cycles = pick(3, 20);
    let mut mesh = LocalMesh::builder().providers(2).consumers(28).rounds(2, 1).start().await?;
    let watched = consumers(&mesh);
    // Node 2 carries the API and stays up; six of the others (20 % of 30) go down each cycle.
    let candidates: Vec<usize> = (3..mesh.len()).collect();
    let mut rounds = Rounds::default();
    eventually(WAIT, "every consumer holds the nine prices", || {
        watched.iter().all(|&i| mesh.node(i).unwrap().prices().len() == 9)
    })
    .await?;
    let (api, poller) = api_on(mesh.running(2)?).await?;
    let first = round_at(now_ms(), 2) + 1;
    wait_round(&mesh, &mut rounds, &watched, first).await?;

    let mut excused: HashMap<usize, BTreeSet<u64>> = HashMap::new();
    let mut recoveries = Vec::new();
    let mut rows_lost = 0;
    let mut restarts = 0;
    let mut rejoin_rounds = 0;
    for cycle in 0..cycles {
        let victims: Vec<usize> =
            (0..6).map(|k| candidates[(cycle * 6 + k * 5) % candidates.len()]).collect();
        let down_from = round_at(now_ms(), 2);
        let mut before = HashMap::new();
        for &v in &victims {
            before.insert(v, book(mesh.running(v)?));
            mesh.stop(v).await?;
        }
        hold(&mesh, &mut rounds, Duration::from_secs(pick(2, 4))).await;
        let mut back = Vec::new();
        for &v in &victims {
            mesh.restart(v).await?;
            restarts += 1;
            // What the restarted node serves at once comes from its store: nothing older
            // than what it served before it went down.
            let after: HashMap<String, i64> =
                book(mesh.running(v)?).into_iter().map(|(a, _, ts)| (a, ts)).collect();
            rows_lost += before[&v]
                .iter()
                .filter(|(asset, _, ts)| after.get(asset).is_none_or(|t| t < ts))
                .count();
            back.push((v, Instant::now(), round_at(now_ms(), 2) + 1));
        }
        for &(v, restarted, round) in &back {
            wait_round(&mesh, &mut rounds, &[v], round).await?;
            let got = rounds.received(v).range(round..).next().map(|(r, _)| *r).unwrap();
            let seen = rounds.first_seen[&(v, got)];
            recoveries.push(seen.saturating_duration_since(restarted));
            // Down, then rejoining: the rounds until the first one it got back are its
            // recovery, not misses of a live node.
            rejoin_rounds += got - round;
            excused.entry(v).or_default().extend(down_from..got);
        }
    }
    let last = round_at(now_ms(), 2) + 1;
    wait_round(&mesh, &mut rounds, &watched, last).await?;
    let mut missed: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    let mut expected = 0;
    for &i in &watched {
        let excuse = excused.get(&i).cloned().unwrap_or_default();
        let due: Vec<u64> = (first..=last).filter(|r| !excuse.contains(r)).collect();
        expected += due.len();
        let m: Vec<u64> = due.into_iter().filter(|r| !rounds.has(i, *r)).collect();
        if !m.is_empty() {
            missed.insert(i, m);
        }
    }
    let missed_total: usize = missed.values().map(Vec::len).sum();
    let availability = poller.stop().await?;
    recoveries.sort();
    let mut figures = json!({
        "nodes": mesh.len(),
        "cycles": cycles,
        "restarts": restarts,
        "rounds": last - first + 1,
        "delivery_to_live_nodes": 1.0 - missed_total as f64 / expected.max(1) as f64,
        "rounds_missed": missed_total,
        "rounds_missed_by": missed.keys().collect::<Vec<_>>(),
        "rounds_missed_while_rejoining": rejoin_rounds,
        "bootstrap_nodes_peers": [
            mesh.running(0)?.relay().connected_peers(),
            mesh.running(1)?.relay().connected_peers()
        ],
        "rows_lost_at_restart": rows_lost,
        "recover_ms_median": ms(recoveries[recoveries.len() / 2]),
        "recover_ms_max": ms(*recoveries.last().unwrap()),
    });
    figures.as_object_mut().unwrap().extend(availability.json().as_object().unwrap().clone());
    report("relays_killed_and_restarted", figures);

    // A live node loses rounds only while every neighbour it had is down at once, until it
    // dials others; it catches up with the next round it gets (checked by the wait above).
    let delivery = 1.0 - missed_total as f64 / expected.max(1) as f64;
    assert!(delivery >= 0.98, "delivery to live nodes {delivery}: {missed:?}");
    assert_eq!(rows_lost, 0);
    let slowest = *recoveries.last().unwrap();
    assert!(slowest < Duration::from_secs(30), "a restarted node took {slowest:?} to rejoin");
    availability.assert_always_ok(20)?;
    api.shutdown(Duration::from_secs(5)).await;
    mesh.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_then_heal() -> anyhow::Result<()> {
    let split_for = pick(Duration::from_secs(6), Duration::from_secs(60));
    // No Redis: each side's provider fetches the rounds the other side's batches no longer
    // bring (coordination through the mesh).
    // Nodes explore (dial a random known peer) every 1-3 s, so that they relink by themselves.
    let mesh = LocalMesh::builder()
        .providers(2)
        .consumers(6)
        .rounds(2, 1)
        .configure(|_, c| c.explore_interval = Some(Duration::from_secs(2)))
        .start()
        .await?;
    let left = [0usize, 2, 3, 4];
    let right = [1usize, 5, 6, 7];
    let providers: Vec<NodeId> = (0..2).map(|i| mesh.node(i).unwrap().node_id()).collect();
    let watched = consumers(&mesh);
    let mut rounds = Rounds::default();
    eventually(WAIT, "every consumer holds the nine prices", || {
        watched.iter().all(|&i| mesh.node(i).unwrap().prices().len() == 9)
    })
    .await?;
    let (api, poller) = api_on(mesh.running(2)?).await?;
    let first = round_at(now_ms(), 2) + 1;
    wait_round(&mesh, &mut rounds, &watched, first).await?;

    let crosses = |mesh: &LocalMesh| -> Vec<(usize, usize)> {
        let mut links = Vec::new();
        for &a in &left {
            let peers = mesh.node(a).unwrap().relay().status().peers;
            for &b in &right {
                let pb = mesh.node(b).unwrap().peer_id();
                if peers.iter().any(|p| p.peer_id == pb) {
                    links.push((a, b));
                }
            }
        }
        links
    };
    let cut_links = crosses(&mesh);
    anyhow::ensure!(!cut_links.is_empty(), "the two sides were not linked to begin with");
    for &a in &left {
        for &b in &right {
            let (na, nb) = (mesh.running(a)?, mesh.running(b)?);
            na.relay().block(nb.peer_id()).await?;
            nb.relay().block(na.peer_id()).await?;
        }
    }
    eventually(WAIT, "no link crosses the partition", || crosses(&mesh).is_empty()).await?;
    let split_from = round_at(now_ms(), 2) + 1;
    hold(&mesh, &mut rounds, split_for).await;
    let split_to = round_at(now_ms(), 2) - 1;
    // Nothing crossed: each side's rounds came from its own provider only.
    for (side, provider, other) in [(&left, 0, 1), (&right, 1, 0)] {
        for &i in side.iter().filter(|&&i| i >= 2) {
            for (r, origins) in rounds.received(i).range(split_from..=split_to) {
                anyhow::ensure!(
                    !origins.contains(&providers[other]) && origins.contains(&providers[provider]),
                    "node {i} round {r}: {origins:?}"
                );
            }
        }
    }

    for &a in &left {
        for &b in &right {
            let (na, nb) = (mesh.running(a)?, mesh.running(b)?);
            na.relay().unblock(nb.peer_id()).await?;
            nb.relay().unblock(na.peer_id()).await?;
        }
    }
    let healed = Instant::now();
    // The nodes find each other again by themselves: every node still has its minimum of
    // peers on its own side, so it is exploring that dials across. (A peer that could not be
    // reached during the split waits up to 64 s before it is tried again: the long run waits
    // that out.)
    let self_heal_wait = Duration::from_secs(pick(30, 90));
    let self_healed =
        sample_until(&mesh, &mut rounds, self_heal_wait, || !crosses(&mesh).is_empty()).await;
    let relinked = healed.elapsed();
    anyhow::ensure!(self_healed, "the sides did not relink within {self_heal_wait:?}");
    // Recovered: a round whose batch, from one provider, reached every consumer again.
    let deadline = Instant::now() + WAIT;
    let heal_round = round_at(now_ms(), 2) + 1;
    let (merged_round, merged_at) = loop {
        rounds.sample(&mesh);
        let merged = (heal_round..=round_at(now_ms(), 2)).find(|r| {
            providers.iter().any(|p| {
                watched.iter().all(|&i| rounds.received(i).get(r).is_some_and(|o| o.contains(p)))
            })
        });
        if let Some(r) = merged {
            let at = watched.iter().map(|&i| rounds.first_seen[&(i, r)]).max().unwrap();
            break (r, at);
        }
        anyhow::ensure!(Instant::now() < deadline, "the sides never merged after the heal");
        tokio::time::sleep(POLL).await;
    };
    let recovered = merged_at.saturating_duration_since(healed);
    let last = merged_round + 1;
    wait_round(&mesh, &mut rounds, &watched, last).await?;
    let missed: BTreeMap<usize, Vec<u64>> =
        watched.iter().map(|&i| (i, rounds.missed(i, first..=last))).collect();
    let missed_total: usize = missed.values().map(Vec::len).sum();
    let availability = poller.stop().await?;
    let expected = (last - first + 1) as usize * watched.len();
    let mut figures = json!({
        "split_s": split_for.as_secs(),
        "rounds": last - first + 1,
        "rounds_split": split_to.saturating_sub(split_from) + 1,
        "delivery": 1.0 - missed_total as f64 / expected as f64,
        "rounds_missed": missed_total,
        "links_cut": cut_links.len(),
        "relink_ms": ms(relinked),
        "recover_ms": ms(recovered),
    });
    figures.as_object_mut().unwrap().extend(availability.json().as_object().unwrap().clone());
    report("partition_then_heal", figures);

    assert_eq!(missed_total, 0, "rounds missed: {missed:?}");
    availability.assert_always_ok(20)?;
    api.shutdown(Duration::from_secs(5)).await;
    mesh.shutdown().await
}
