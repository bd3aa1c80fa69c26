//! Shutdown loses nothing it has accepted (issue 31, item 10): deliveries still queued in the
//! node reach the stores, the final flush is bounded by `MESH_SHUTDOWN_GRACE_SECS`, and what a
//! store did not take by then is counted.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mesh_protocol::{Body, Envelope, Identity, Payload, PriceUpdate};
use mesh_service::{Node, NodeConfig, StartOptions};
use mesh_storage::{Database, DatabaseConfig, PriceStore};
use mesh_tests::{RedisServer, TestDatabase, eventually};
use sqlx::{Connection, Executor, PgConnection};

/// A node on loopback writing to `database_url`, without discovery.
async fn start_node(
    dir: &std::path::Path,
    database_url: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Node> {
    let mut vars: BTreeMap<String, String> = [
        ("MESH_DATA_DIR", dir.to_str().unwrap_or_default()),
        ("MESH_LISTEN_ADDRS", "/ip4/127.0.0.1/tcp/0"),
        ("MESH_MDNS_ENABLED", "false"),
        ("DATABASE_URL", database_url),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in extra {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let config = NodeConfig::from_map(&vars, false)?;
    Ok(Node::start(config, StartOptions::default()).await?)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A signed batch of `assets` prices named `{prefix}{i}`.
fn batch(identity: &Identity, prefix: &str, assets: usize) -> anyhow::Result<Envelope> {
    let now = now_ms();
    let mut prices = Vec::with_capacity(assets);
    for i in 0..assets {
        prices.push(PriceUpdate {
            asset: format!("{prefix}{i}"),
            blockchain: "solana".into(),
            price: format!("{}.25", i + 1).parse()?,
            timestamp_ms: now,
            change_24h: None,
            source_timestamp_ms: None,
        });
    }
    let body = Body::new(identity, now, Payload::PriceBatch { round: 1, prices });
    Ok(Envelope::seal(identity, &body, 10)?)
}

async fn stored_assets(url: &str) -> anyhow::Result<Vec<String>> {
    let db = Database::connect(&DatabaseConfig::new(url)).await?;
    let rows = PriceStore::new(db.clone()).load_all().await?;
    db.close().await;
    Ok(rows.into_iter().map(|r| r.asset).collect())
}

/// The node's first batch is in the database: migrations are applied and the queue writes.
async fn wait_until_stored(node: &Node, url: &str) -> anyhow::Result<()> {
    node.relay().publish(&batch(&Identity::generate(), "FIRST", 1)?).await?;
    eventually("the first batch in PostgreSQL", Duration::from_secs(30), async || {
        stored_assets(url).await.is_ok_and(|a| a.iter().any(|a| a == "FIRST0"))
    })
    .await
}

/// Deliveries queued in the node when it is told to stop are applied and written: every
/// accepted batch of a burst is in the database afterwards. Before the fix the state task
/// returned at cancellation and dropped whatever the relay had queued for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_delivery_is_in_the_database_after_shutdown() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let node = start_node(dir.path(), &db.url, &[("MESH_WRITE_QUEUE_CAPACITY", "100000")]).await?;
    wait_until_stored(&node, &db.url).await?;

    // A burst from ten origins, then stop at once: much of it is still queued for the state
    // task when the node is cancelled.
    let identities: Vec<Identity> = (0..10).map(|_| Identity::generate()).collect();
    let mut envelopes = Vec::new();
    // 3,000 rows: under the storage channel's 4,096, so no row is dropped as "queue full".
    for b in 0..60 {
        envelopes.push(batch(&identities[b % 10], &format!("B{b}_"), 50)?);
    }
    let relay = node.relay().clone();
    let published = futures::future::join_all(envelopes.iter().map(|e| relay.publish(e))).await;
    let accepted = published.iter().filter(|r| r.is_ok()).count();
    assert_eq!(accepted, 60, "every batch was accepted by the relay");
    let persistence = node.persistence().clone();
    let stopped =
        tokio::time::timeout(Duration::from_secs(120), node.shutdown(Duration::from_secs(10)))
            .await
            .map_err(|_| anyhow::anyhow!("shutdown did not finish"))?;
    assert_eq!(stopped, None);

    let stored = stored_assets(&db.url).await?;
    let stored: std::collections::HashSet<String> = stored.into_iter().collect();
    let missing = (0..60)
        .flat_map(|b| (0..50).map(move |i| format!("B{b}_{i}")))
        .filter(|a| !stored.contains(a))
        .count();
    assert_eq!(persistence.prices.stats().dropped, 0);
    assert_eq!(missing, 0, "{missing} of 3000 accepted prices were not stored");
    assert_eq!(persistence.unwritten().counts(), (0, 0, 0));
    db.drop_db().await
}

/// A database that hangs at shutdown (a lock held by this test) costs the grace period, not
/// the shutdown: the node stops, and the rows it could not write are counted. Before the fix
/// the final flush waited for the lock forever and counted nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_hanging_at_shutdown_is_bounded_by_the_grace_and_counted() -> anyhow::Result<()>
{
    let db = TestDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let node = start_node(dir.path(), &db.url, &[("MESH_SHUTDOWN_GRACE_SECS", "1")]).await?;
    wait_until_stored(&node, &db.url).await?;

    let mut lock = PgConnection::connect(&db.url).await?;
    lock.execute("BEGIN").await?;
    lock.execute("LOCK TABLE mesh_price_cache IN ACCESS EXCLUSIVE MODE").await?;

    node.relay().publish(&batch(&Identity::generate(), "HELD", 50)?).await?;
    eventually("the held batch in the book", Duration::from_secs(30), async || {
        node.prices().iter().filter(|p| p.asset.starts_with("HELD")).count() == 50
    })
    .await?;
    // The queue worker is now blocked on the lock with the 50 rows.
    let persistence = node.persistence().clone();
    let stopped =
        tokio::time::timeout(Duration::from_secs(60), node.shutdown(Duration::from_secs(1)))
            .await
            .map_err(|_| anyhow::anyhow!("shutdown hung on the locked table"))?;
    assert_eq!(stopped, None);
    let unwritten = persistence.unwritten();
    assert_eq!(unwritten.prices.load(Ordering::Relaxed), 50, "the held rows are counted");
    assert_eq!(unwritten.seen.load(Ordering::Relaxed), 0, "seen ids were written");

    lock.execute("ROLLBACK").await?;
    lock.close().await?;
    db.drop_db().await
}

/// A Redis that hangs at shutdown (paused with `CLIENT PAUSE` on a server of the test's own)
/// costs the grace period, not the shutdown, and the prices it did not take are counted.
/// Before, the Redis writer returned at cancellation: its queued batches and the prices held in
/// memory during the outage were dropped without a count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_hanging_at_shutdown_is_bounded_by_the_grace_and_counted() -> anyhow::Result<()> {
    let mut redis = RedisServer::start(None).await?;
    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("mesh.db").display());
    let node = start_node(
        dir.path(),
        &sqlite,
        &[("REDIS_URL", &redis.url()), ("MESH_SHUTDOWN_GRACE_SECS", "1")],
    )
    .await?;
    node.relay().publish(&batch(&Identity::generate(), "FIRST", 1)?).await?;
    let client = deadpool_redis::redis::Client::open(redis.url())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    eventually("the first price in Redis", Duration::from_secs(30), async || {
        deadpool_redis::redis::cmd("HLEN")
            .arg("mesh:prices")
            .query_async::<u64>(&mut connection)
            .await
            .is_ok_and(|n| n > 0)
    })
    .await?;

    deadpool_redis::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(120_000)
        .arg("ALL")
        .query_async::<()>(&mut connection)
        .await?;
    node.relay().publish(&batch(&Identity::generate(), "HELD", 50)?).await?;
    eventually("the held batch in the book", Duration::from_secs(30), async || {
        node.prices().iter().filter(|p| p.asset.starts_with("HELD")).count() == 50
    })
    .await?;
    let persistence = node.persistence().clone();
    let stopped =
        tokio::time::timeout(Duration::from_secs(60), node.shutdown(Duration::from_secs(1)))
            .await
            .map_err(|_| anyhow::anyhow!("shutdown hung on the paused Redis"))?;
    assert_eq!(stopped, None);
    let (prices, _, in_redis) = persistence.unwritten().counts();
    assert_eq!(prices, 0, "the database took everything");
    assert!(in_redis >= 50, "the held prices are counted: {in_redis}");
    redis.kill();
    Ok(())
}
