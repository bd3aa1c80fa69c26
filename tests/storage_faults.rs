//! Faults of the services behind mesh-storage: a PostgreSQL that goes away under the
//! write-behind queue, and a Redis killed under the price mirror and the seen-id backend.
//! Each test breaks servers of its own (a throwaway cluster, a `redis-server` child process
//! on a spare port), never the machine's.

// Fixtures and helpers of a test fail loudly on impossible input, as the tests do.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_redis::redis;
use mesh_protocol::{MessageId, NodeId};
use mesh_storage::redis::Health;
use mesh_storage::{
    Database, DatabaseConfig, PriceMirror, PriceRow, PriceStore, QueueConfig, RedisConfig,
    RedisSeen, SeenRow, Sink, WriteBehind,
};
use mesh_tests::{LogCapture, PgCluster, RedisServer, eventually, unique_name};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const T0: i64 = 1_750_000_000_000;

fn price(asset: usize, ts: i64) -> PriceRow {
    PriceRow {
        asset: format!("asset-{asset:04}"),
        blockchain: "solana".into(),
        price: format!("{asset}.25").parse().expect("test price"),
        timestamp_ms: ts,
        source_node_id: NodeId::from_uuid(Uuid::from_u128(7)),
        change_24h: None,
    }
}

/// Submits rows a few at a time, letting the worker drain the channel between them as the
/// relay path would between messages.
/// These tests count log lines. tracing caches, process-wide, whether each log call site is
/// enabled; a call site first reached while another test's thread is installing its capturing
/// subscriber can be cached as disabled (one CI run lost both `Redis connection failed` lines
/// that way), so the tests of this file take turns.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn feed(queue: &WriteBehind<PriceRow>, rows: impl IntoIterator<Item = PriceRow>) -> usize {
    let mut accepted = 0;
    for (i, row) in rows.into_iter().enumerate() {
        accepted += usize::from(queue.submit(row));
        if i % 8 == 7 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    accepted
}

#[tokio::test(flavor = "current_thread")]
async fn the_queue_holds_writes_while_postgres_is_down_and_drains_them_after() -> anyhow::Result<()>
{
    let _turn = TURN.lock().await;
    let (logs, _guard) = LogCapture::install();
    let cluster = PgCluster::start().await?;
    let config = DatabaseConfig {
        acquire_timeout: Duration::from_millis(500),
        ..DatabaseConfig::new(cluster.url("postgres"))
    };
    let db = Database::connect(&config).await?;
    db.migrate().await?;
    let store = PriceStore::new(db.clone());
    let queue_config = QueueConfig {
        channel_capacity: 64,
        max_pending: 300,
        max_batch: 100,
        flush_interval: Duration::from_millis(20),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(400),
        ..QueueConfig::named("prices")
    };
    let (queue, worker) =
        WriteBehind::new(Arc::new(store.clone()) as Arc<dyn Sink<PriceRow>>, queue_config);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));

    // Up: rows reach the table.
    assert_eq!(feed(&queue, (0..50).map(|i| price(i, T0))).await, 50);
    eventually("the first rows are written", Duration::from_secs(10), async || {
        queue.stats().written == 50
    })
    .await?;
    assert_eq!(store.load_all().await?.len(), 50);

    // Down: nothing blocks, nothing fails for the caller; the queue holds and retries.
    cluster.stop()?;
    assert_eq!(feed(&queue, (50..250).map(|i| price(i, T0))).await, 200);
    // Newer prices of assets already held take no room.
    assert_eq!(feed(&queue, (50..250).map(|i| price(i, T0 + 1))).await, 200);
    eventually("the outage is noticed and retried", Duration::from_secs(10), async || {
        let s = queue.stats();
        s.degraded && s.failed_writes >= 3
    })
    .await?;
    let stats = queue.stats();
    assert_eq!((stats.pending, stats.dropped, stats.outages), (200, 0, 1));

    // Beyond its capacity (300 assets held) the queue drops, and counts it.
    assert_eq!(feed(&queue, (250..400).map(|i| price(i, T0))).await, 150);
    eventually("the overflow is counted", Duration::from_secs(10), async || {
        let s = queue.stats();
        s.pending == 300 && s.dropped == 50
    })
    .await?;
    assert_eq!(logs.count("Database write failed"), 1, "one line per outage:\n{}", logs.text());

    // Back: everything held is written, newest prices included; nothing within capacity lost.
    cluster.start_again()?;
    eventually("the held rows are written", Duration::from_secs(30), async || {
        let s = queue.stats();
        !s.degraded && s.pending == 0
    })
    .await?;
    let stats = queue.stats();
    assert_eq!((stats.written, stats.dropped, stats.outages), (350, 50, 1));
    let stored = store.load_all().await?;
    assert_eq!(stored.len(), 350);
    for row in &stored {
        let n: usize = row.asset["asset-".len()..].parse()?;
        assert!(n < 350, "{} was dropped, not stored", row.asset);
        let expected = if (50..250).contains(&n) { T0 + 1 } else { T0 };
        assert_eq!(row.timestamp_ms, expected, "{}", row.asset);
    }
    assert_eq!(logs.count("Database write failed"), 1);
    assert_eq!(logs.count("Database write recovered"), 1);

    shutdown.cancel();
    task.await?;
    db.close().await;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn redis_killed_under_the_mirror_and_seen_ids_falls_back_and_recovers() -> anyhow::Result<()>
{
    let _turn = TURN.lock().await;
    let (logs, _guard) = LogCapture::install();
    // A password, as the guide's REDIS_URL has one.
    let mut server = RedisServer::start(Some("s3cret pass")).await?;
    let prefix = format!("{}:", unique_name("mesh_test"));
    let config = RedisConfig {
        pool_size: 4,
        prefix: prefix.clone(),
        timeout: Duration::from_millis(300),
        ..RedisConfig::new(server.url())
    };
    let pool = config.pool()?;
    let backoff =
        || Health::with_backoff("test", Duration::from_millis(50), Duration::from_millis(400));
    let mirror = PriceMirror::with_health(pool.clone(), &config.prefix, backoff());
    let seen = RedisSeen::with_options(pool.clone(), &config.prefix, 1_000, backoff());
    let direct = redis::Client::open(server.url())?;
    let id = |n: u128| MessageId::from_uuid(Uuid::from_u128(n));
    let now = SystemTime::now();
    let ids = |range: std::ops::Range<u128>| -> Vec<SeenRow> {
        range
            .map(|n| SeenRow {
                id: id(n),
                seen_at: now,
                expires_at: now + Duration::from_secs(600),
            })
            .collect()
    };

    // Up: everything lands in Redis.
    let first: Vec<PriceRow> = (0..50).map(|i| price(i, T0)).collect();
    mirror.write(&first).await;
    assert_eq!(mirror.read_all().await, first);
    seen.insert_batch(&ids(0..20)).await;
    assert!(seen.contains(id(3)).await);
    assert!(!seen.contains(id(99)).await);
    let mut conn = direct.get_multiplexed_async_connection().await?;
    let stored: usize =
        redis::cmd("HLEN").arg(format!("{prefix}prices")).query_async(&mut conn).await?;
    assert_eq!(stored, 50);
    let ttl: i64 =
        redis::cmd("PTTL").arg(format!("{prefix}seen:{}", id(3))).query_async(&mut conn).await?;
    assert!((590_000..=600_000).contains(&ttl), "SET NX PX with the time left: {ttl}");
    assert!(!mirror.is_degraded() && !seen.is_degraded());

    // Down: callers see no error; memory serves; one log line per component.
    server.kill();
    let newer: Vec<PriceRow> = (0..50).map(|i| price(i, T0 + 1)).collect();
    mirror.write(&newer).await;
    seen.insert_batch(&ids(20..40)).await;
    assert!(mirror.is_degraded() && seen.is_degraded());
    // Keep calling for a while: several reconnect attempts fail, the log stays at one line each.
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < until {
        assert_eq!(mirror.read_all().await, newer, "memory serves the newest prices");
        assert!(seen.contains(id(25)).await, "memory answers for ids seen during the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(mirror.is_degraded() && seen.is_degraded());
    assert_eq!(seen.held_in_memory(), 20);
    assert_eq!(logs.count("Redis connection failed"), 2, "{}", logs.text());
    assert!(mirror.health().outages() == 1 && seen.health().outages() == 1);

    // Back (empty, as after a restart without persistence): both reconnect and write back
    // what they kept.
    server.restart().await?;
    eventually("the mirror reconnects", Duration::from_secs(10), async || {
        mirror.read_all().await;
        !mirror.is_degraded()
    })
    .await?;
    eventually("the seen ids reconnect", Duration::from_secs(10), async || {
        seen.contains(id(1_000)).await;
        !seen.is_degraded()
    })
    .await?;
    let mut conn = direct.get_multiplexed_async_connection().await?;
    let raw: Vec<String> =
        redis::cmd("HVALS").arg(format!("{prefix}prices")).query_async(&mut conn).await?;
    let mut in_redis: Vec<PriceRow> =
        raw.iter().map(|json| serde_json_row(json)).collect::<anyhow::Result<_>>()?;
    in_redis.sort_by(|a, b| a.asset.cmp(&b.asset));
    assert_eq!(in_redis, newer, "the prices written during the outage reached Redis");
    for n in 20..40 {
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("{prefix}seen:{}", id(n)))
            .query_async(&mut conn)
            .await?;
        assert!(exists, "id {n} seen during the outage reached Redis");
    }
    assert_eq!(seen.held_in_memory(), 0);
    assert_eq!(seen.load_unexpired().await.len(), 20, "ids 20..40 (0..20 died with the server)");
    assert_eq!(logs.count("Redis connection failed"), 2);
    assert_eq!(logs.count("Redis connection recovered"), 2);

    // The mirror keeps the newest per (blockchain, asset) in Redis too: an older write changes
    // nothing. Fields carry the chain.
    mirror.write(&[price(1, T0 - 5)]).await;
    let held: String = redis::cmd("HGET")
        .arg(format!("{prefix}prices"))
        .arg("solana asset-0001")
        .query_async(&mut conn)
        .await?;
    assert_eq!(serde_json_row(&held)?.timestamp_ms, T0 + 1);
    Ok(())
}

fn serde_json_row(json: &str) -> anyhow::Result<PriceRow> {
    Ok(serde_json::from_str(json)?)
}

#[tokio::test]
async fn a_wrong_password_is_an_outage_not_an_error() -> anyhow::Result<()> {
    // It reaches the `Redis connection failed` call site too (see TURN).
    let _turn = TURN.lock().await;
    let server = RedisServer::start(Some("right")).await?;
    let wrong = server.url().replace(":right@", ":wrong@");
    let mirror = PriceMirror::new(RedisConfig::new(wrong).pool()?, "mesh_test:");
    mirror.write(&[price(1, T0)]).await;
    assert!(mirror.is_degraded());
    assert_eq!(mirror.read_all().await, vec![price(1, T0)]);
    Ok(())
}

/// TLS to Redis and PostgreSQL (issue 25, item 3). Servers of the test's own with certificates
/// of a test authority: `rediss://` with `REDIS_CA_FILE` (and a password), `sslmode=require`
/// and `sslmode=verify-full` with `sslrootcert` connect, encrypted; a server whose certificate
/// does not chain to the configured authority is refused with an error that the log line
/// completes with the setting to check; a CA file with a `redis://` URL is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_postgres_over_tls_check_the_servers_certificate() {
    use mesh_tests::tls::TestCa;
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = TestCa::new("mesh test authority").expect("authority");
    let ca_file = ca.write_cert(&dir.path().join("ca.pem")).expect("CA file");
    let other = TestCa::new("someone else").expect("other authority");
    let other_file = other.write_cert(&dir.path().join("other.pem")).expect("other CA file");
    let server = ca.server(dir.path(), "server").expect("server certificate");

    // Redis over TLS with the guide's requirepass.
    let redis_server =
        RedisServer::start_tls(Some("s3cret"), &server, &ca_file).await.expect("TLS redis-server");
    assert!(redis_server.url().starts_with("rediss://"));
    let mut config = RedisConfig::new(redis_server.url());
    config.ca_file = Some(ca_file.clone());
    let pool = config.pool().expect("TLS pool");
    let mut conn = pool.get().await.expect("a TLS connection");
    let _: () = redis::cmd("SET").arg("tls:k").arg("v").query_async(&mut conn).await.expect("SET");
    let got: String = redis::cmd("GET").arg("tls:k").query_async(&mut conn).await.expect("GET");
    assert_eq!(got, "v");
    let mirror = PriceMirror::new(pool.clone(), "tls:");
    mirror.write(&[price(1, T0)]).await;
    assert_eq!(mirror.read_all().await.len(), 1, "the mirror works over TLS");

    // Another authority's client refuses the server.
    let mut wrong = RedisConfig::new(redis_server.url());
    wrong.ca_file = Some(other_file.clone());
    let refused = match wrong.pool().expect("pool").get().await {
        Ok(_) => panic!("a server of another authority was accepted"),
        Err(e) => e.to_string(),
    };
    let hint = mesh_storage::tls::tls_hint(&refused, "REDIS_CA_FILE");
    assert!(hint.contains("REDIS_CA_FILE"), "not seen as a certificate failure: {refused}");
    let redis_refused = refused;
    // A CA file with a plain redis:// URL is a mistake, said at start.
    let mut plain = RedisConfig::new(redis_server.url().replace("rediss://", "redis://"));
    plain.ca_file = Some(ca_file.clone());
    let error = plain.pool().expect_err("a CA file with redis://").to_string();
    assert!(error.contains("REDIS_CA_FILE") && error.contains("rediss://"), "{error}");

    // PostgreSQL with ssl=on.
    let pg = PgCluster::start_tls(&server).await.expect("TLS PostgreSQL cluster");
    let base = pg.url("postgres");
    let encrypted = async |url: String| -> bool {
        let mut c = sqlx::PgConnection::connect(&url).await.expect("connect");
        let (ssl,): (bool,) =
            sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&mut c)
                .await
                .expect("pg_stat_ssl");
        ssl
    };
    assert!(encrypted(format!("{base}?sslmode=require")).await, "sslmode=require");
    let verify = format!("{base}?sslmode=verify-full&sslrootcert={}", ca_file.display());
    assert!(encrypted(verify).await, "sslmode=verify-full");
    // The store a node uses, over TLS.
    let db = Database::connect(&DatabaseConfig::new(format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    )))
    .await
    .expect("the store connects and migrates over TLS");
    drop(db);
    let wrong = format!("{base}?sslmode=verify-full&sslrootcert={}", other_file.display());
    let refused = match sqlx::PgConnection::connect(&wrong).await {
        Ok(_) => panic!("a server of another authority was accepted"),
        Err(e) => e.to_string(),
    };
    let hint = mesh_storage::tls::tls_hint(&refused, "sslrootcert in DATABASE_URL");
    assert!(hint.contains("sslrootcert"), "not seen as a certificate failure: {refused}");
    mesh_tests::reliability::report(
        "tls_stores",
        serde_json::json!({ "redis_refused": redis_refused, "postgres_refused": refused }),
    );
}

/// A node whose Redis and PostgreSQL present certificates of another authority than the one
/// it is told to trust keeps running: it relays and serves prices, and reports both stores
/// degraded (issue 25, item 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refusing_its_stores_certificates_keeps_serving_degraded() {
    use mesh_tests::tls::TestCa;
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = TestCa::new("the servers' authority").expect("authority");
    let ca_file = ca.write_cert(&dir.path().join("ca.pem")).expect("CA file");
    let other = TestCa::new("the node's authority").expect("other authority");
    let trusted = other.write_cert(&dir.path().join("trusted.pem")).expect("trusted CA file");
    let server = ca.server(dir.path(), "server").expect("server certificate");
    let redis_server =
        RedisServer::start_tls(None, &server, &ca_file).await.expect("TLS redis-server");
    let pg = PgCluster::start_tls(&server).await.expect("TLS PostgreSQL cluster");
    let database_url =
        format!("{}?sslmode=verify-full&sslrootcert={}", pg.url("postgres"), trusted.display());
    let (redis_url, trusted_file) = (redis_server.url(), trusted.display().to_string());
    let mesh = mesh_testkit::LocalMesh::builder()
        .providers(1)
        .consumers(1)
        .rounds(2, 1)
        .per_node(move |i, o| {
            if i == 1 {
                o.insert("REDIS_URL".into(), redis_url.clone());
                o.insert("REDIS_CA_FILE".into(), trusted_file.clone());
                o.insert("DATABASE_URL".into(), database_url.clone());
            }
        })
        .start()
        .await
        .expect("the node starts with stores it cannot trust");
    let wait = Duration::from_secs(60);
    eventually("the consumer serves prices and says both stores are degraded", wait, async || {
        let node = mesh.running(1).expect("node 1");
        let status = node.shared().network_status();
        !node.prices().is_empty()
            && status.degraded
            && ["database", "redis"]
                .iter()
                .all(|c| status.degraded_components.iter().any(|d| d == c))
    })
    .await
    .expect("degraded, serving");
    mesh.shutdown().await.expect("shutdown");
}
