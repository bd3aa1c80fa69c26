//! What one row can do to a store: a row the store refuses is set aside and counted while the
//! rest of its batch lands (PostgreSQL, SQLite, the Redis mirror), and Birdeye's extreme but
//! well-formed numbers still reach the store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use birdeye_sim::{Simulator, TokenSpec};
use deadpool_redis::redis;
use mesh_protocol::NodeId;
use mesh_storage::{
    Database, DatabaseConfig, PriceMirror, PriceRow, PriceStore, QueueConfig, RedisConfig, Sink,
    WriteBehind,
};
use mesh_testkit::{DEMO_API_KEY, LocalMesh, eventually, eventually_async};
use mesh_tests::{TestDatabase, redis_url, unique_name};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const T0: i64 = 1_750_000_000_000;
const WAIT: Duration = Duration::from_secs(60);

fn row(asset: &str, ts: i64) -> PriceRow {
    PriceRow {
        asset: asset.into(),
        blockchain: "solana".into(),
        price: "1.5".parse().unwrap(),
        timestamp_ms: ts,
        source_node_id: NodeId::from_uuid(Uuid::from_u128(1)),
        change_24h: Some("2.5".parse().unwrap()),
    }
}

/// A 24-hour change of 52 digits: a valid decimal, longer than the guide's `VARCHAR(50)`.
fn long_change(asset: &str) -> PriceRow {
    PriceRow { change_24h: Some("1".repeat(52).parse().unwrap()), ..row(asset, T0) }
}

/// 6000 BC: the `time` crate holds it, PostgreSQL's `TIMESTAMPTZ` (from 4713 BC) does not.
fn ancient(asset: &str) -> PriceRow {
    row(asset, -251_500_000_000_000_000 / 1000)
}

/// 500 good rows with `poison` in the middle.
fn batch_with(poison: Vec<PriceRow>) -> Vec<PriceRow> {
    let good = (0..500).map(|i| row(&format!("good{i:03}"), T0 + i));
    good.clone().take(250).chain(poison).chain(good.skip(250)).collect()
}

/// The store without [`Sink::check`]: every row goes to the database, which decides alone.
struct Unchecked(PriceStore);

#[async_trait::async_trait]
impl Sink<PriceRow> for Unchecked {
    async fn write(&self, batch: &[PriceRow]) -> mesh_storage::Result<u64> {
        self.0.upsert(batch).await
    }
}

/// Feeds `rows` through a queue into `sink` and waits until every row was written or set
/// aside; returns the queue's counters.
async fn through_queue(
    sink: Arc<dyn Sink<PriceRow>>,
    rows: Vec<PriceRow>,
) -> anyhow::Result<mesh_storage::QueueStats> {
    let (queue, worker) = WriteBehind::new(sink, QueueConfig::named("prices"));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    let n = rows.len() as u64;
    assert_eq!(queue.submit_all(rows) as u64, n);
    eventually_async(WAIT, "every row written or set aside", || async {
        let s = queue.stats();
        s.written + s.dropped == n && s.pending == 0
    })
    .await?;
    let stats = queue.stats();
    shutdown.cancel();
    task.await?;
    Ok(stats)
}

fn assets(rows: &[PriceRow]) -> Vec<String> {
    let mut out: Vec<String> = rows.iter().map(|r| r.asset.clone()).collect();
    out.sort();
    out
}

fn good_assets() -> Vec<String> {
    (0..500).map(|i| format!("good{i:03}")).collect()
}

#[tokio::test]
async fn postgres_sets_aside_the_rows_it_refuses_and_writes_the_rest() -> anyhow::Result<()> {
    let test_db = TestDatabase::create().await?;
    let db = Database::connect(&DatabaseConfig::new(&test_db.url)).await?;
    db.migrate().await?;
    let store = PriceStore::new(db.clone());

    // The database alone decides: VARCHAR(50) refuses the change, TIMESTAMPTZ the year, and
    // the conversion to a time refuses i64::MIN before any statement.
    for alone in [long_change("poison1"), ancient("poison2"), row("poison3", i64::MIN)] {
        let error = store.upsert(&[alone]).await.unwrap_err();
        assert!(error.refuses_rows(), "{error:?}");
    }
    let poison = vec![long_change("poison1"), ancient("poison2"), row("poison3", i64::MIN)];
    let stats = through_queue(Arc::new(Unchecked(store.clone())), batch_with(poison)).await?;
    assert_eq!((stats.written, stats.dropped, stats.refused), (500, 3, 3));
    assert_eq!((stats.outages, stats.degraded), (0, false), "a refused row is no outage");
    assert_eq!(assets(&store.load_all().await?), good_assets());

    // Through the store's own check, the same rows are set aside before the statement.
    let later: Vec<PriceRow> = batch_with(vec![long_change("poison4"), ancient("poison5")])
        .into_iter()
        .map(|r| {
            if r.asset.starts_with("good") {
                PriceRow { timestamp_ms: r.timestamp_ms + 1_000, ..r }
            } else {
                r
            }
        })
        .chain([row("poison6", i64::MAX)])
        .collect();
    let stats = through_queue(Arc::new(store.clone()), later).await?;
    assert_eq!((stats.written, stats.refused, stats.failed_writes), (500, 3, 0));
    let rows = store.load_all().await?;
    assert_eq!(assets(&rows), good_assets());
    assert!(rows.iter().all(|r| r.timestamp_ms > T0 + 500), "the newer batch landed");

    db.close().await;
    test_db.drop_db().await
}

#[tokio::test]
async fn sqlite_sets_aside_rows_no_store_can_hold_and_writes_the_rest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = Database::connect(&DatabaseConfig::sqlite_file(&dir.path().join("mesh.db"))).await?;
    db.migrate().await?;
    let store = PriceStore::new(db.clone());
    // SQLite would keep these (it does not enforce VARCHAR lengths), but PostgreSQL would
    // not: every store holds the same rows, so a node's stores never disagree.
    let poison = vec![long_change("poison1"), row("poison2", i64::MIN), row(&"x".repeat(256), T0)];
    let stats = through_queue(Arc::new(store.clone()), batch_with(poison)).await?;
    assert_eq!((stats.written, stats.dropped, stats.refused, stats.outages), (500, 3, 3, 0));
    assert_eq!(assets(&store.load_all().await?), good_assets());
    db.close().await;
    Ok(())
}

#[tokio::test]
async fn the_redis_mirror_sets_aside_rows_no_store_can_hold() -> anyhow::Result<()> {
    let prefix = format!("{}:", unique_name("mesh_test_rows"));
    let pool = RedisConfig::new(redis_url()).pool()?;
    let mirror = PriceMirror::new(pool.clone(), &prefix);
    let poison = vec![long_change("poison1"), row("poison2", i64::MIN)];
    mirror.write(&batch_with(poison)).await;
    assert!(!mirror.is_degraded());
    let mut conn = pool.get().await?;
    let held: Vec<String> =
        redis::cmd("HKEYS").arg(format!("{prefix}prices")).query_async(&mut conn).await?;
    assert_eq!(held.len(), 500, "the good rows reached Redis");
    assert!(held.iter().all(|k| !k.contains("poison")), "{held:?}");
    assert_eq!(assets(&mirror.read_all().await), good_assets());
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}prices"))
        .arg(format!("{prefix}prices:ts"))
        .query_async(&mut conn)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn birdeyes_extreme_numbers_still_reach_the_store() -> anyhow::Result<()> {
    const TINY: &str = "Tiny1111111111111111111111111111111111111111";
    const HUGE: &str = "Huge1111111111111111111111111111111111111111";
    const ODD: &str = "Odd11111111111111111111111111111111111111111";
    let sim = Simulator::builder()
        .keys([DEMO_API_KEY])
        .token(TokenSpec::new("solana", TINY, "TINY", 1e-40).change_24h(1.234_567_890_123_456_7e51))
        .token(TokenSpec::new("solana", HUGE, "HUGE", 1e40))
        .token(TokenSpec::new("solana", ODD, "ODD", 2.5).change_24h(-1.234_567_890_123_456_7e-45))
        .spawn("127.0.0.1:0")
        .await?;
    let test_db = TestDatabase::create().await?;
    let (base_url, db_url) = (sim.base_url(), test_db.url.clone());
    let mesh = LocalMesh::builder()
        .providers(1)
        .consumers(1)
        .rounds(2, 1)
        .per_node(move |i, o| {
            o.insert("MESH_BIRDEYE_BASE_URL".into(), base_url.clone());
            o.insert(
                "MESH_PROVIDER_ASSETS".into(),
                format!("solana:{TINY},solana:{HUGE},solana:{ODD}"),
            );
            if i == 1 {
                o.insert("DATABASE_URL".into(), db_url.clone());
            }
        })
        .start()
        .await?;
    let store = mesh.node(1).unwrap().persistence().price_store().clone();
    eventually_async(WAIT, "the three prices reach PostgreSQL", || async {
        store.load_all().await.map(|r| r.len() == 3).unwrap_or(false)
    })
    .await?;
    let rows = store.load_all().await?;
    let get = |a: &str| rows.iter().find(|r| r.asset == a).unwrap();
    assert!(get(TINY).price.as_str().starts_with("0.0000000000000000000000000000000000000"));
    assert_eq!(get(TINY).change_24h, None, "a 52-digit change cannot be held: dropped");
    assert!(get(HUGE).price.as_str().len() >= 40, "{}", get(HUGE).price);
    let odd = get(ODD).change_24h.as_ref().unwrap();
    assert!(odd.as_str().len() <= 50, "a long fraction is truncated: {odd}");
    assert_eq!(mesh.node(1).unwrap().persistence().prices.stats().dropped, 0);
    let provider = mesh.node(0).unwrap();
    assert!(provider.prices().len() == 3);
    mesh.shutdown().await?;
    sim.shutdown().await;
    test_db.drop_db().await
}

/// WETH's address on Base and on Optimism (the same predeploy address on both).
const WETH: &str = "0x4200000000000000000000000000000000000006";

fn weth_chains(prices: &[mesh_ipc::PriceView]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = prices
        .iter()
        .filter(|p| p.asset == WETH)
        .map(|p| (p.blockchain.clone(), p.price.to_string()))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_on_two_chains_is_two_prices_after_a_restart() -> anyhow::Result<()> {
    let sim = Simulator::builder()
        .keys([DEMO_API_KEY])
        .token(TokenSpec::new("base", WETH, "WETH", 3500.0))
        .token(TokenSpec::new("optimism", WETH, "WETH", 2.0))
        .spawn("127.0.0.1:0")
        .await?;
    let test_db = TestDatabase::create().await?;
    let (base_url, db_url) = (sim.base_url(), test_db.url.clone());
    // Node 1 keeps its prices in PostgreSQL, node 2 in its SQLite file; both mirror to Redis.
    let mut mesh = LocalMesh::builder()
        .providers(1)
        .consumers(2)
        .rounds(2, 1)
        .redis(redis_url())
        .per_node(move |i, o| {
            o.insert("MESH_BIRDEYE_BASE_URL".into(), base_url.clone());
            o.insert("MESH_PROVIDER_ASSETS".into(), format!("base:{WETH},optimism:{WETH}"));
            if i == 1 {
                o.insert("DATABASE_URL".into(), db_url.clone());
            }
        })
        .start()
        .await?;
    for i in [1, 2] {
        let node = mesh.node(i).unwrap();
        eventually(WAIT, "both chains' WETH arrive", || weth_chains(&node.prices()).len() == 2)
            .await?;
        // A node started after the provider's first round reloads it from the shared mirror:
        // wait for rows that came through the mesh and the queue.
        let queue = node.persistence().prices.clone();
        eventually(WAIT, "both rows written", || queue.stats().written >= 2).await?;
    }
    mesh.stop(0).await?;
    let mut held = Vec::new();
    for i in [1, 2] {
        let node = mesh.node(i).unwrap();
        let queue = node.persistence().prices.clone();
        // The book takes a batch before the queue does: wait for the rows, not for silence.
        eventually(WAIT, "the price queue is empty", || queue.stats().pending == 0).await?;
        held.push(weth_chains(&node.prices()));
    }
    // The Redis mirror keeps both too.
    let mirror = mesh.node(1).unwrap().persistence().redis.as_ref().unwrap().mirror.clone();
    let mirrored = mirror.read_all().await;
    assert_eq!(mirrored.iter().filter(|r| r.asset == WETH).count(), 2, "{mirrored:?}");
    // The guide's table, keyed by the address alone, holds the newest of the two.
    let store = mesh.node(1).unwrap().persistence().price_store().clone();
    let Database::Postgres(pool) = store_db(&test_db).await? else { anyhow::bail!("not pg") };
    let guide: Vec<(String, i64)> = sqlx::query_as(
        "SELECT blockchain, (EXTRACT(EPOCH FROM timestamp) * 1000)::bigint \
         FROM mesh_price_cache WHERE asset = $1",
    )
    .bind(WETH)
    .fetch_all(&pool)
    .await?;
    let rows = store.load_all().await?;
    assert_eq!(rows.iter().filter(|r| r.asset == WETH).count(), 2, "mesh_prices keeps both");
    let newest = rows.iter().map(|r| r.timestamp_ms).max().unwrap();
    assert_eq!(guide.len(), 1);
    assert!(rows.iter().any(|r| r.blockchain == guide[0].0 && r.timestamp_ms == guide[0].1));
    assert_eq!(guide[0].1, newest, "the newest of the two chains: {guide:?} {rows:?}");
    pool.close().await;

    for i in [1, 2] {
        mesh.stop(i).await?;
        mesh.restart(i).await?;
        let reloaded = weth_chains(&mesh.node(i).unwrap().prices());
        assert_eq!(reloaded, held[i - 1], "node {i}: both chains served after the restart");
        assert_eq!(reloaded.len(), 2);
    }
    mesh.shutdown().await?;
    sim.shutdown().await;
    test_db.drop_db().await
}

async fn store_db(test_db: &TestDatabase) -> anyhow::Result<Database> {
    Ok(Database::connect(&DatabaseConfig::new(&test_db.url)).await?)
}

/// Rows planted in a store or the mirror behind the node's back: one good, the others what no
/// received message could carry.
fn planted(trusted: NodeId, stranger: NodeId) -> Vec<PriceRow> {
    let now = mesh_service::now_ms();
    let at = |asset: &str, price: &str, ts: i64, source: NodeId| PriceRow {
        asset: asset.into(),
        blockchain: "solana".into(),
        price: price.parse().unwrap(),
        timestamp_ms: ts,
        source_node_id: source,
        change_24h: None,
    };
    vec![
        at("Good1111111111111111111111111111111111111111", "1.5", now - 1_000, trusted),
        at("Future11111111111111111111111111111111111111", "1.5", now + 3_600_000, trusted),
        at("Negative111111111111111111111111111111111111", "-1", now - 1_000, trusted),
        at("Zero1111111111111111111111111111111111111111", "0", now - 1_000, trusted),
        at("Stranger11111111111111111111111111111111111", "1.5", now - 1_000, stranger),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_rows_pass_the_price_rules_and_the_allow_list() -> anyhow::Result<()> {
    let trusted = NodeId::from_uuid(Uuid::from_u128(0x1111));
    let stranger = NodeId::from_uuid(Uuid::from_u128(0x2222));
    let test_db = TestDatabase::create().await?;
    let db_url = test_db.url.clone();
    // Node 0 reloads from PostgreSQL; node 1 has an empty SQLite file and reloads from the
    // Redis mirror.
    let mut mesh = LocalMesh::builder()
        .providers(0)
        .consumers(2)
        .redis(redis_url())
        .per_node(move |i, o| {
            o.insert("MESH_TRUSTED_PROVIDERS".into(), trusted.to_string());
            if i == 0 {
                o.insert("DATABASE_URL".into(), db_url.clone());
            }
        })
        .start()
        .await?;
    mesh.stop(0).await?;
    mesh.stop(1).await?;

    let db = store_db(&test_db).await?;
    PriceStore::new(db.clone()).upsert(&planted(trusted, stranger)).await?;
    db.close().await;
    let prefix = mesh.overrides(1).get("MESH_REDIS_PREFIX").cloned().unwrap();
    let mirror = PriceMirror::new(RedisConfig::new(redis_url()).pool()?, &prefix);
    mirror.write(&planted(trusted, stranger)).await;
    assert_eq!(mirror.read_all().await.len(), 5, "all planted in the mirror");

    for i in [0, 1] {
        mesh.restart(i).await?;
        let served: Vec<String> =
            mesh.node(i).unwrap().prices().into_iter().map(|p| p.asset).collect();
        assert_eq!(served, ["Good1111111111111111111111111111111111111111"], "node {i}");
    }
    mesh.shutdown().await?;
    test_db.drop_db().await
}

/// A signed batch of `n` assets named after `tag`, all stamped `ts`.
fn batch_of(
    origin: &mesh_protocol::Identity,
    tag: usize,
    n: usize,
    ts: i64,
) -> mesh_protocol::Envelope {
    use mesh_protocol::{Body, Envelope, Payload, PriceUpdate};
    let prices = (0..n)
        .map(|i| PriceUpdate {
            asset: format!("O{tag:03}A{i:03}"),
            blockchain: "solana".into(),
            price: "1.5".parse().unwrap(),
            timestamp_ms: ts,
            change_24h: None,
            source_timestamp_ms: None,
        })
        .collect();
    let body = Body::new(origin, ts, Payload::PriceBatch { round: 1, prices });
    Envelope::seal(origin, &body, 5).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_origins_stay_within_their_share_and_old_prices_are_forgotten() -> anyhow::Result<()> {
    const ORIGINS: usize = 25;
    const PER_BATCH: usize = 30;
    const SHARE: usize = 20;
    let test_db = TestDatabase::create().await?;
    let db_url = test_db.url.clone();
    let mesh = LocalMesh::builder()
        .providers(0)
        .consumers(1)
        .redis(redis_url())
        .per_node(move |_, o| {
            o.insert("DATABASE_URL".into(), db_url.clone());
        })
        .configure(|_, c| {
            c.max_quotes_per_origin = SHARE;
            // Shorter than operators may set (3600 s at least), for the test.
            c.price_retention = Duration::from_secs(8);
        })
        .start()
        .await?;
    let node = mesh.node(0).unwrap();
    let addr = node
        .relay()
        .listen_addrs()
        .await?
        .into_iter()
        .find(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/"))
        .unwrap()
        .with(mesh_relay::Protocol::P2p(node.peer_id()));

    // A peer that relays batches of many origins, each with assets of its own.
    let mut config = mesh_testkit::test_config();
    config.listen_addrs = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    let cancel = CancellationToken::new();
    let (peer, _deliveries) =
        mesh_relay::Relay::start(&mesh_protocol::Identity::generate(), config, cancel.clone())
            .await?;
    peer.dial(addr).await?;
    eventually(WAIT, "the peer is connected", || peer.connected_peers() == 1).await?;
    let now = mesh_service::now_ms();
    for tag in 0..ORIGINS {
        let origin = mesh_protocol::Identity::generate();
        peer.publish(&batch_of(&origin, tag, PER_BATCH, now)).await?;
    }
    let queue = node.persistence().prices.clone();
    eventually(WAIT, "every origin's batch arrived and was written", || {
        // Each batch is taken whole (the share is enforced by evicting the origin's own
        // oldest quotes), so every row of every batch is written once.
        queue.stats().pending == 0 && queue.stats().written >= (ORIGINS * PER_BATCH) as u64
    })
    .await?;
    // The book: each origin within its share, so at most ORIGINS x SHARE prices.
    let held = node.prices().len();
    assert!(held <= ORIGINS * SHARE, "{held} prices held");
    assert!(held >= ORIGINS, "{held}");
    // The tables: what the book took, at most ORIGINS x PER_BATCH rows, until the retention.
    let db = store_db(&test_db).await?;
    let Database::Postgres(pool) = &db else { anyhow::bail!("not PostgreSQL") };
    let count = |table: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {table}"
            )))
            .fetch_one(&pool)
            .await
            .unwrap_or(-1)
        }
    };
    for table in ["mesh_prices", "mesh_price_cache"] {
        let rows = count(table).await;
        assert!((1..=(ORIGINS * PER_BATCH) as i64).contains(&rows), "{table}: {rows}");
    }
    // ...and within a cleanup pass, each origin's share there too (as in the mirror).
    let mirror = node.persistence().redis.as_ref().unwrap().mirror.clone();
    let share = (ORIGINS * SHARE) as i64;
    eventually_async(WAIT, "the stores trimmed to each origin's share", || async {
        let mirrored = mirror.read_all().await.len() as i64;
        let (rows, guide) = (count("mesh_prices").await, count("mesh_price_cache").await);
        (1..=share).contains(&rows)
            && (1..=share).contains(&guide)
            && (1..=share).contains(&mirrored)
    })
    .await?;

    // Nobody sends these assets again: after the retention they are gone everywhere.
    eventually_async(
        WAIT,
        "old prices forgotten in the book, the mirror and the tables",
        || async {
            node.prices().is_empty()
                && mirror.read_all().await.is_empty()
                && count("mesh_prices").await == 0
                && count("mesh_price_cache").await == 0
        },
    )
    .await?;
    db.close().await;
    cancel.cancel();
    mesh.shutdown().await?;
    test_db.drop_db().await
}

/// Trimming to a share per source and forgetting by age, on one backend.
async fn trim_and_forget_contract(db: &Database) -> anyhow::Result<()> {
    let store = PriceStore::new(db.clone());
    let source = |n: u128| NodeId::from_uuid(Uuid::from_u128(n));
    let rows: Vec<PriceRow> = (0..30)
        .map(|i| PriceRow { source_node_id: source(1), ..row(&format!("a{i:02}"), T0 + i) })
        .chain(
            (0..5).map(|i| PriceRow { source_node_id: source(2), ..row(&format!("b{i}"), T0 + i) }),
        )
        .collect();
    store.upsert(&rows).await?;
    // Source 1 keeps its ten newest, source 2 (within its share) all five; both tables.
    assert_eq!(store.trim_per_source(10, 1_000).await?, 2 * 20);
    let kept = assets(&store.load_all().await?);
    let expected: Vec<String> =
        (20..30).map(|i| format!("a{i:02}")).chain((0..5).map(|i| format!("b{i}"))).collect();
    assert_eq!(kept, expected);
    assert_eq!(store.trim_per_source(10, 1_000).await?, 0);
    // By age: everything before T0 + 25 goes, at most `limit` rows per table per call.
    assert_eq!(store.delete_older_than(T0 + 25, 3).await?, 2 * 3);
    store.delete_older_than(T0 + 25, 1_000).await?;
    assert_eq!(assets(&store.load_all().await?), ["a25", "a26", "a27", "a28", "a29"]);
    Ok(())
}

#[tokio::test]
async fn postgres_and_sqlite_trim_per_source_and_forget_by_age() -> anyhow::Result<()> {
    let test_db = TestDatabase::create().await?;
    let pg = store_db(&test_db).await?;
    pg.migrate().await?;
    trim_and_forget_contract(&pg).await?;
    pg.close().await;
    let dir = tempfile::tempdir()?;
    let sqlite =
        Database::connect(&DatabaseConfig::sqlite_file(&dir.path().join("mesh.db"))).await?;
    sqlite.migrate().await?;
    trim_and_forget_contract(&sqlite).await?;
    test_db.drop_db().await
}
