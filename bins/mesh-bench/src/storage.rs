//! Storage benchmark against the real services: batch upserts into PostgreSQL in rows per
//! second (first writes of new assets in batches of 10,000, then updates of existing ones in
//! batches of 50, 1,000 and 10,000; goal 100,000 rows/s with large batches), a Redis mirror
//! write + read-all of 50 prices (goal p99 under 2 ms), and round-lease acquisition through
//! Redis (p50/p99, won and lost).
//!
//! It creates a database of its own on the PostgreSQL server and drops it afterwards, and
//! uses a key prefix of its own on Redis, deleted afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use mesh_coordination::{Coordination, RedisCoordination};
use mesh_protocol::{Identity, NodeId};
use mesh_storage::{Database, DatabaseConfig, PriceMirror, PriceRow, PriceStore, RedisConfig};
use serde_json::json;
use sqlx::{Connection, Executor};

use crate::report::{Figure, Report, per_sec};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// PostgreSQL server URL of a role that may create databases (the benchmark works in a
    /// database of its own).
    #[arg(
        long,
        env = "MESH_TEST_DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Redis URL (`REDIS_URL`).
    #[arg(long, env = "MESH_TEST_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Rows written per batch size.
    #[arg(long, default_value_t = 200_000)]
    pub rows: usize,
    /// Distinct assets, inserted first; then every measured row updates one, as prices do.
    #[arg(long, default_value_t = 50_000)]
    pub assets: usize,
    /// Redis write+read and lease iterations.
    #[arg(long, default_value_t = 5_000)]
    pub iterations: usize,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(measure(args))
}

async fn measure(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.assets >= 10_000, "--assets must hold a 10,000-row batch");
    let mut figures = Vec::new();
    let mut params = json!({ "rows_per_batch_size": args.rows, "assets": args.assets, "iterations": args.iterations });

    let (server, name) = (
        admin_url_server(&args.database_url)?,
        format!("mesh_bench_{}", uuid::Uuid::new_v4().simple()),
    );
    let mut admin = sqlx::PgConnection::connect(&args.database_url).await?;
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
    let result = upserts(args, &format!("{server}/{name}"), &mut figures, &mut params).await;
    admin
        .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .await?;
    result?;

    let prefix = format!("mesh_bench_{}:", uuid::Uuid::new_v4().simple());
    let config = RedisConfig { prefix: prefix.clone(), ..RedisConfig::new(args.redis_url.clone()) };
    let pool = config.pool()?;
    let result = redis_figures(args, &pool, &prefix, &mut figures).await;
    let mut conn = pool.get().await?;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await?;
    if !keys.is_empty() {
        redis::cmd("DEL").arg(&keys).query_async::<()>(&mut conn).await?;
    }
    result?;

    Ok(Report { bench: "storage", params, figures })
}

/// `postgres://user@host:port` of a URL naming a database.
fn admin_url_server(url: &str) -> anyhow::Result<&str> {
    url.rsplit_once('/')
        .map(|(server, _)| server)
        .ok_or_else(|| anyhow::anyhow!("{url} has no database part"))
}

fn row(asset: usize, ts: i64, source: NodeId) -> PriceRow {
    PriceRow {
        asset: format!("So{asset:040}"),
        blockchain: if asset.is_multiple_of(2) { "solana" } else { "ethereum" }.into(),
        price: mesh_protocol::Decimal::from((asset % 10_000) as u32 + 1),
        timestamp_ms: ts,
        source_node_id: source,
        change_24h: Some(mesh_protocol::Decimal::from(3)),
    }
}

async fn upserts(
    args: &Args,
    url: &str,
    figures: &mut Vec<Figure>,
    params: &mut serde_json::Value,
) -> anyhow::Result<()> {
    let db = Database::connect(&DatabaseConfig::new(url)).await?;
    db.migrate().await?;
    let store = PriceStore::new(db.clone());
    let source = Identity::generate().node_id();
    // Fill the empty table in batches of 10,000 new assets (first writes: inserts); after
    // that every measured row updates an existing one, as prices do.
    let mut ts = 1_750_000_000_000i64;
    let all: Vec<PriceRow> = (0..args.assets).map(|a| row(a, ts, source)).collect();
    let started = Instant::now();
    for chunk in all.chunks(10_000) {
        store.upsert(chunk).await?;
    }
    figures.push(Figure::at_least(
        "insert_rows_per_sec_batch_10000",
        per_sec(all.len(), started.elapsed()),
        "rows/s",
        100_000.0,
    ));
    let mut next_asset = 0usize;
    for (size, name, p99_name) in [
        (50, "update_rows_per_sec_batch_50", "update_batch_50_p99"),
        (1_000, "update_rows_per_sec_batch_1000", "update_batch_1000_p99"),
        (10_000, "update_rows_per_sec_batch_10000", "update_batch_10000_p99"),
    ] {
        let batches = args.rows.div_ceil(size);
        let mut prepared = Vec::with_capacity(batches);
        for _ in 0..batches {
            ts += 1;
            let batch: Vec<PriceRow> =
                (0..size).map(|i| row((next_asset + i) % args.assets, ts, source)).collect();
            next_asset = (next_asset + size) % args.assets;
            prepared.push(batch);
        }
        let mut latencies = Vec::with_capacity(batches);
        let started = Instant::now();
        for batch in &prepared {
            let one = Instant::now();
            let written = store.upsert(batch).await?;
            latencies.push(one.elapsed());
            anyhow::ensure!(written == size as u64, "batch of {size} updated {written} rows");
        }
        let rate = per_sec(batches * size, started.elapsed());
        figures.push(if size == 10_000 {
            Figure::at_least(name, rate, "rows/s", 100_000.0)
        } else {
            Figure::plain(name, rate, "rows/s")
        });
        figures.push(Figure::plain(p99_name, quantile_ms(&mut latencies, 0.99), "ms"));
    }
    params["postgres_rows_in_table"] = json!(store.load_all().await?.len());
    db.close().await;
    Ok(())
}

async fn redis_figures(
    args: &Args,
    pool: &deadpool_redis::Pool,
    prefix: &str,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let mirror = PriceMirror::new(pool.clone(), prefix);
    let source = Identity::generate().node_id();
    let mut latencies = Vec::with_capacity(args.iterations);
    for i in 0..args.iterations {
        let batch: Vec<PriceRow> =
            (0..50).map(|a| row(a, 1_750_000_000_000 + i as i64, source)).collect();
        let started = Instant::now();
        mirror.write(&batch).await;
        let read = mirror.read_all().await;
        latencies.push(started.elapsed());
        anyhow::ensure!(
            read.len() == 50 && !mirror.is_degraded(),
            "mirror read {} prices, degraded {}",
            read.len(),
            mirror.is_degraded()
        );
    }
    figures.push(Figure::plain("mirror_write_read_50_p50", quantile_ms(&mut latencies, 0.5), "ms"));
    figures.push(Figure::at_most(
        "mirror_write_read_50_p99",
        quantile_ms(&mut latencies, 0.99),
        "ms",
        2.0,
    ));

    let coordination = Arc::new(RedisCoordination::new(pool.clone(), prefix));
    let (me, other) = (Identity::generate().node_id(), Identity::generate().node_id());
    let lease = Duration::from_secs(30);
    let (mut won, mut lost) =
        (Vec::with_capacity(args.iterations), Vec::with_capacity(args.iterations));
    for round in 0..args.iterations as u64 {
        let started = Instant::now();
        let first = coordination.try_acquire_round(round, me, lease).await?.mine;
        won.push(started.elapsed());
        let started = Instant::now();
        let second = coordination.try_acquire_round(round, other, lease).await?.mine;
        lost.push(started.elapsed());
        anyhow::ensure!(first && !second, "round {round}: won {first}, second holder {second}");
    }
    figures.push(Figure::plain("lease_acquire_won_p50", quantile_ms(&mut won, 0.5), "ms"));
    figures.push(Figure::plain("lease_acquire_won_p99", quantile_ms(&mut won, 0.99), "ms"));
    figures.push(Figure::plain("lease_acquire_lost_p99", quantile_ms(&mut lost, 0.99), "ms"));
    Ok(())
}

fn quantile_ms(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort_unstable();
    let at = ((samples.len().saturating_sub(1)) as f64 * q).round() as usize;
    samples.get(at).map_or(0.0, |d| d.as_secs_f64() * 1_000.0)
}
