//! mesh-storage on the real PostgreSQL and on an SQLite file: the same store tests on both
//! backends, the migrations against the guide's DDL, and concurrent writers.

// Fixtures and helpers of a test fail loudly on impossible input, as the tests do.
#![allow(clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_protocol::{MessageId, NodeId};
use mesh_seen_cache::{SeenBackend, SeenCache};
use mesh_storage::{
    Database, DatabaseConfig, PriceFilter, PriceRow, PriceStore, SeenRow, SeenStore,
};
use mesh_tests::TestDatabase;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// The guide's DDL ("Database Migration", "Manual Migration"), verbatim: the reference the
/// migrations are compared with.
const GUIDE_DDL: &str = r"
-- Migration: Create mesh_price_cache table
CREATE TABLE IF NOT EXISTS mesh_price_cache (
    asset VARCHAR(255) PRIMARY KEY,
    price VARCHAR(255) NOT NULL,
    blockchain VARCHAR(50) NOT NULL,
    timestamp TIMESTAMPTZ NOT NULL,
    source_node_id UUID NOT NULL,
    change_24h VARCHAR(50),
    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_mesh_price_cache_timestamp 
    ON mesh_price_cache(timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_mesh_price_cache_blockchain 
    ON mesh_price_cache(blockchain);

-- Migration: Create mesh_seen_messages table
CREATE TABLE IF NOT EXISTS mesh_seen_messages (
    message_id UUID PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_mesh_seen_messages_expires 
    ON mesh_seen_messages(expires_at);
";

const T0: i64 = 1_750_000_000_000;

fn node(n: u128) -> NodeId {
    NodeId::from_uuid(Uuid::from_u128(n))
}

fn price(asset: &str, chain: &str, price: &str, ts: i64, source: NodeId) -> PriceRow {
    PriceRow {
        asset: asset.into(),
        blockchain: chain.into(),
        price: price.parse().expect("test price"),
        timestamp_ms: ts,
        source_node_id: source,
        change_24h: None,
    }
}

/// A fresh PostgreSQL database of this test, migrated.
async fn postgres() -> anyhow::Result<(TestDatabase, Database)> {
    let test_db = TestDatabase::create().await?;
    let db = Database::connect(&DatabaseConfig::new(&test_db.url)).await?;
    db.migrate().await?;
    Ok((test_db, db))
}

/// A fresh SQLite file of this test, migrated.
async fn sqlite() -> anyhow::Result<(tempfile::TempDir, Database)> {
    let dir = tempfile::tempdir()?;
    let db = Database::connect(&DatabaseConfig::sqlite_file(&dir.path().join("mesh.db"))).await?;
    db.migrate().await?;
    Ok((dir, db))
}

/// The price store contract, whatever the backend.
async fn price_store_contract(db: &Database) -> anyhow::Result<()> {
    let store = PriceStore::new(db.clone());
    assert!(store.load_all().await?.is_empty());

    let mut sol = price("So111", "solana", "151.25", T0 + 123, node(1));
    sol.change_24h = Some("-1.93".parse()?);
    let eth = price("0xC02a", "ethereum", "3521.07", T0, node(2));
    let tiny = price("Bonk", "solana", "0.000016", T0, node(1));
    assert_eq!(store.upsert(&[sol.clone(), eth.clone(), tiny.clone()]).await?, 3);
    // Exact decimals, milliseconds, the node id and a missing change all round-trip.
    assert_eq!(store.load_all().await?, vec![eth.clone(), tiny.clone(), sol.clone()]);

    // Older or equal timestamps never replace; newer ones do.
    let older = price("So111", "solana", "1.00", T0, node(3));
    let same_time = price("So111", "solana", "2.00", T0 + 123, node(3));
    assert_eq!(store.upsert(&[older, same_time]).await?, 0);
    let newer = price("So111", "solana", "152.5", T0 + 124, node(3));
    assert_eq!(store.upsert(std::slice::from_ref(&newer)).await?, 1);
    let by_asset = PriceFilter { asset: Some("So111".into()), ..PriceFilter::default() };
    assert_eq!(store.query(&by_asset).await?, vec![newer.clone()]);

    // One batch naming an asset twice keeps the newer of the two.
    let a = price("Bonk", "solana", "0.000017", T0 + 5, node(1));
    let b = price("Bonk", "solana", "0.000018", T0 + 9, node(1));
    assert_eq!(store.upsert(&[b.clone(), a]).await?, 1);

    let by_chain = PriceFilter { blockchain: Some("solana".into()), ..PriceFilter::default() };
    assert_eq!(store.query(&by_chain).await?, vec![b.clone(), newer.clone()]);
    let both = PriceFilter { blockchain: Some("ethereum".into()), asset: Some("So111".into()) };
    assert!(store.query(&both).await?.is_empty());
    let both = PriceFilter { blockchain: Some("ethereum".into()), asset: Some("0xC02a".into()) };
    assert_eq!(store.query(&both).await?, vec![eth]);

    // A large batch is one statement too (no parameter limits).
    let many: Vec<PriceRow> = (0..5_000)
        .map(|i| price(&format!("asset-{i:05}"), "solana", &format!("{i}.5"), T0 + i, node(4)))
        .collect();
    assert_eq!(store.upsert(&many).await?, 5_000);
    assert_eq!(store.load_all().await?.len(), 5_003);
    Ok(())
}

/// Writers racing on the same assets: the newest price of each asset wins, whatever the
/// order the batches land in.
async fn concurrent_contract(db: &Database) -> anyhow::Result<()> {
    const TASKS: u64 = 8;
    const BATCHES: u64 = 20;
    const ASSETS: u64 = 50;
    // (batch * TASKS + task) * 7919 mod 160 is a permutation of 0..160: every write of an
    // asset has its own timestamp, and the newest comes from a random-looking (task, batch).
    let stamp = |task: u64, batch: u64, asset: u64| {
        T0 + (((batch * TASKS + task) * 7919 % 160) * 1_000 + asset) as i64
    };
    let store = PriceStore::new(db.clone());
    let mut writers = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for batch in 0..BATCHES {
                let rows: Vec<PriceRow> = (0..ASSETS)
                    .map(|asset| {
                        let ts = stamp(task, batch, asset);
                        price(
                            &format!("a{asset}"),
                            "solana",
                            &format!("{ts}.5"),
                            ts,
                            node(task.into()),
                        )
                    })
                    .collect();
                store.upsert(&rows).await?;
                tokio::task::yield_now().await;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let stored: HashMap<String, PriceRow> =
        store.load_all().await?.into_iter().map(|r| (r.asset.clone(), r)).collect();
    assert_eq!(stored.len(), ASSETS as usize);
    for asset in 0..ASSETS {
        let (task, batch) = (0..TASKS)
            .flat_map(|t| (0..BATCHES).map(move |b| (t, b)))
            .max_by_key(|&(t, b)| stamp(t, b, asset))
            .expect("writes");
        let ts = stamp(task, batch, asset);
        let row = &stored[&format!("a{asset}")];
        assert_eq!(row.timestamp_ms, ts, "asset a{asset}");
        assert_eq!(row.price.to_string(), format!("{ts}.5"));
        assert_eq!(row.source_node_id, node(task.into()));
    }
    Ok(())
}

/// The seen store contract, whatever the backend.
async fn seen_store_contract(db: &Database) -> anyhow::Result<()> {
    let store = SeenStore::new(db.clone());
    let now = SystemTime::now();
    let hour = Duration::from_secs(3_600);
    let id = |n: u128| MessageId::from_uuid(Uuid::from_u128(n));
    // Whole milliseconds, as the stores keep them.
    let at = |t: SystemTime| {
        let ms = t.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_millis();
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
    };
    let live = SeenRow { id: id(1), seen_at: at(now), expires_at: at(now + hour) };
    let live2 = SeenRow { id: id(2), seen_at: at(now), expires_at: at(now + 2 * hour) };
    let recent = SeenRow { id: id(3), seen_at: at(now - 2 * hour), expires_at: at(now - hour) };
    let old = SeenRow { id: id(4), seen_at: at(now - 50 * hour), expires_at: at(now - 49 * hour) };
    assert_eq!(store.insert(&[live, live2, recent, old]).await?, 4);
    // An id already recorded keeps its times, even repeated within one batch.
    let again = SeenRow { expires_at: at(now + 9 * hour), ..live };
    assert_eq!(store.insert(&[again, again]).await?, 0);

    let mut unexpired = store.load_unexpired().await?;
    unexpired.sort_by_key(|r| r.id);
    assert_eq!(unexpired, vec![live, live2]);

    // The guide's cleanup: older than a day past expiry goes; the recently expired stays.
    assert_eq!(store.delete_expired(Duration::from_secs(86_400)).await?, 1);
    assert_eq!(store.delete_expired(Duration::from_secs(86_400)).await?, 0);
    assert_eq!(store.delete_expired(Duration::ZERO).await?, 1);
    assert_eq!(store.load_unexpired().await?.len(), 2);

    // As the seen cache's backing store, and loaded into a seen cache at start-up.
    let backend: &dyn SeenBackend<MessageId> = &store;
    let fresh = SeenRow { id: id(5), seen_at: at(now), expires_at: at(now + hour) };
    backend.record(&[fresh, live]).await?;
    let records = backend.load_unexpired().await?;
    assert_eq!(records.len(), 3);
    let mut cache = SeenCache::new(mesh_seen_cache::Config::default());
    assert_eq!(cache.load(&records, 7), 3);
    assert!(cache.contains(&id(5)) && cache.contains(&id(1)) && !cache.contains(&id(3)));
    Ok(())
}

#[tokio::test]
async fn postgres_price_store() -> anyhow::Result<()> {
    let (test_db, db) = postgres().await?;
    price_store_contract(&db).await?;
    db.close().await;
    test_db.drop_db().await
}

#[tokio::test]
async fn sqlite_price_store() -> anyhow::Result<()> {
    let (_dir, db) = sqlite().await?;
    price_store_contract(&db).await
}

#[tokio::test]
async fn postgres_concurrent_upserts_keep_the_newest_price() -> anyhow::Result<()> {
    let (test_db, db) = postgres().await?;
    concurrent_contract(&db).await?;
    db.close().await;
    test_db.drop_db().await
}

#[tokio::test]
async fn sqlite_concurrent_upserts_keep_the_newest_price() -> anyhow::Result<()> {
    let (_dir, db) = sqlite().await?;
    concurrent_contract(&db).await
}

#[tokio::test]
async fn postgres_seen_store() -> anyhow::Result<()> {
    let (test_db, db) = postgres().await?;
    seen_store_contract(&db).await?;
    db.close().await;
    test_db.drop_db().await
}

#[tokio::test]
async fn sqlite_seen_store() -> anyhow::Result<()> {
    let (_dir, db) = sqlite().await?;
    seen_store_contract(&db).await
}

#[tokio::test]
async fn sqlite_store_survives_a_reopen() -> anyhow::Result<()> {
    let (dir, db) = sqlite().await?;
    let row = price("So111", "solana", "151.25", T0, node(1));
    PriceStore::new(db.clone()).upsert(std::slice::from_ref(&row)).await?;
    db.close().await;
    let db = Database::connect(&DatabaseConfig::sqlite_file(&dir.path().join("mesh.db"))).await?;
    db.migrate().await?;
    assert_eq!(PriceStore::new(db).load_all().await?, vec![row]);
    Ok(())
}

type Columns = Vec<(String, String, String, Option<i32>, String, Option<String>)>;

/// Columns of the guide's tables: table, column, type, length, nullable, default.
async fn columns(pool: &PgPool) -> anyhow::Result<Columns> {
    Ok(sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, \
                character_maximum_length::int, is_nullable::text, column_default::text \
         FROM information_schema.columns \
         WHERE table_schema = 'public' \
           AND table_name IN ('mesh_price_cache', 'mesh_seen_messages') \
         ORDER BY table_name, ordinal_position",
    )
    .fetch_all(pool)
    .await?)
}

/// Indexes of the guide's tables: name and definition.
async fn indexes(pool: &PgPool) -> anyhow::Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT indexname::text, indexdef::text FROM pg_indexes \
         WHERE schemaname = 'public' \
           AND tablename IN ('mesh_price_cache', 'mesh_seen_messages') ORDER BY indexname",
    )
    .fetch_all(pool)
    .await?)
}

#[tokio::test]
async fn tables_match_the_guides_ddl_column_by_column() -> anyhow::Result<()> {
    let (ours_db, ours) = postgres().await?;
    let guide_db = TestDatabase::create().await?;
    let guide = PgPool::connect(&guide_db.url).await?;
    sqlx::raw_sql(GUIDE_DDL).execute(&guide).await?;
    let Database::Postgres(ours_pool) = &ours else { anyhow::bail!("not PostgreSQL") };

    let (our_columns, guide_columns) = (columns(ours_pool).await?, columns(&guide).await?);
    assert_eq!(our_columns, guide_columns);
    let s = |v: &str| v.to_owned();
    let expected: Columns = vec![
        (s("mesh_price_cache"), s("asset"), s("character varying"), Some(255), s("NO"), None),
        (s("mesh_price_cache"), s("price"), s("character varying"), Some(255), s("NO"), None),
        (s("mesh_price_cache"), s("blockchain"), s("character varying"), Some(50), s("NO"), None),
        (s("mesh_price_cache"), s("timestamp"), s("timestamp with time zone"), None, s("NO"), None),
        (s("mesh_price_cache"), s("source_node_id"), s("uuid"), None, s("NO"), None),
        (s("mesh_price_cache"), s("change_24h"), s("character varying"), Some(50), s("YES"), None),
        (
            s("mesh_price_cache"),
            s("created_at"),
            s("timestamp with time zone"),
            None,
            s("YES"),
            Some(s("now()")),
        ),
        (
            s("mesh_price_cache"),
            s("updated_at"),
            s("timestamp with time zone"),
            None,
            s("YES"),
            Some(s("now()")),
        ),
        (s("mesh_seen_messages"), s("message_id"), s("uuid"), None, s("NO"), None),
        (s("mesh_seen_messages"), s("seen_at"), s("timestamp with time zone"), None, s("NO"), None),
        (
            s("mesh_seen_messages"),
            s("expires_at"),
            s("timestamp with time zone"),
            None,
            s("NO"),
            None,
        ),
    ];
    assert_eq!(our_columns, expected);

    let (our_indexes, guide_indexes) = (indexes(ours_pool).await?, indexes(&guide).await?);
    assert_eq!(our_indexes, guide_indexes);
    let names: Vec<&str> = our_indexes.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "idx_mesh_price_cache_blockchain",
            "idx_mesh_price_cache_timestamp",
            "idx_mesh_seen_messages_expires",
            "mesh_price_cache_pkey",
            "mesh_seen_messages_pkey",
        ]
    );
    assert!(our_indexes[1].1.ends_with("USING btree (\"timestamp\" DESC)"), "{:?}", our_indexes[1]);

    guide.close().await;
    ours.close().await;
    guide_db.drop_db().await?;
    ours_db.drop_db().await
}

#[tokio::test]
async fn migrations_applied_twice_are_a_no_op() -> anyhow::Result<()> {
    let (test_db, db) = postgres().await?;
    let Database::Postgres(pool) = &db else { anyhow::bail!("not PostgreSQL") };
    PriceStore::new(db.clone()).upsert(&[price("So111", "solana", "1", T0, node(1))]).await?;
    let before = (columns(pool).await?, indexes(pool).await?);

    // Through the migrator: nothing left to apply.
    db.migrate().await?;
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(pool)
            .await?;
    assert_eq!(applied, vec![20240101000001, 20240101000002, 20240101000003]);
    // And the statements themselves, run again by hand (as the guide's manual path would).
    for migration in mesh_storage::migrations::postgres().await?.iter() {
        sqlx::raw_sql(migration.sql.clone()).execute(pool).await?;
    }
    assert_eq!((columns(pool).await?, indexes(pool).await?), before);
    assert_eq!(PriceStore::new(db.clone()).load_all().await?.len(), 1, "data untouched");

    db.close().await;
    test_db.drop_db().await
}

#[tokio::test]
async fn sqlite_tables_have_the_guides_columns_and_indexes() -> anyhow::Result<()> {
    let (_dir, db) = sqlite().await?;
    let Database::Sqlite(pool) = &db else { anyhow::bail!("not SQLite") };
    let (pg_test_db, pg) = postgres().await?;
    let Database::Postgres(pg_pool) = &pg else { anyhow::bail!("not PostgreSQL") };
    for table in ["mesh_price_cache", "mesh_seen_messages"] {
        let sqlite_columns: Vec<(String, bool)> =
            sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info({table})")))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| (r.get::<String, _>("name"), r.get::<i64, _>("notnull") == 0))
                .collect();
        let pg_columns: Vec<(String, bool)> = columns(pg_pool)
            .await?
            .into_iter()
            .filter(|c| c.0 == table)
            .map(|c| (c.1, c.4 == "YES"))
            .collect();
        assert_eq!(sqlite_columns, pg_columns, "{table}: names, order and nullability");
    }
    let mut sqlite_indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
         AND tbl_name IN ('mesh_price_cache', 'mesh_seen_messages') ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    sqlite_indexes.sort();
    assert_eq!(
        sqlite_indexes,
        [
            "idx_mesh_price_cache_blockchain",
            "idx_mesh_price_cache_timestamp",
            "idx_mesh_seen_messages_expires"
        ]
    );
    pg.close().await;
    pg_test_db.drop_db().await
}

#[tokio::test]
async fn store_writes_go_through_the_queue_to_postgres() -> anyhow::Result<()> {
    use mesh_storage::{QueueConfig, Sink, WriteBehind};
    let (test_db, db) = postgres().await?;
    let store = PriceStore::new(db.clone());
    let (queue, worker) = WriteBehind::new(
        Arc::new(store.clone()) as Arc<dyn Sink<PriceRow>>,
        QueueConfig::named("prices"),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    let accepted = queue
        .submit_all((0..2_000).map(|i| price(&format!("q{i}"), "solana", "1.5", T0 + i, node(1))));
    mesh_tests::eventually("2,000 rows written", Duration::from_secs(20), async || {
        queue.stats().written == accepted as u64
    })
    .await?;
    assert_eq!(store.load_all().await?.len(), accepted);
    assert_eq!(queue.stats().dropped, 2_000 - accepted as u64);
    shutdown.cancel();
    task.await?;
    db.close().await;
    test_db.drop_db().await
}
