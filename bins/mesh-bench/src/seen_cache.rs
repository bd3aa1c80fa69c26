//! Seen-cache benchmark: lookups and inserts per second at the configured capacity.
//! Goal: 5 million lookups per second.

use std::hint::black_box;
use std::time::{Duration, Instant};

use mesh_seen_cache::{Config, SeenCache};
use serde_json::json;
use uuid::Uuid;

use crate::report::{Figure, Report, per_sec};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cache capacity (`MESH_SEEN_MESSAGES_CACHE_SIZE`).
    #[arg(long, default_value_t = 20_000)]
    pub capacity: usize,
    /// Operations of each kind.
    #[arg(long, default_value_t = 5_000_000)]
    pub ops: usize,
}

/// Runs the benchmark (the cache reads `tokio::time`, so it runs inside a runtime).
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    rt.block_on(async { measure(args) })
}

fn measure(args: &Args) -> anyhow::Result<Report> {
    let mut cache =
        SeenCache::new(Config { capacity: args.capacity, ttl: Duration::from_secs(600) });
    // Message ids are UUIDs made from a hash: random-looking.
    let ids: Vec<Uuid> = (0..args.capacity * 4).map(|_| Uuid::new_v4()).collect();

    // Inserts beyond capacity: every insert past the first `capacity` also evicts.
    let started = Instant::now();
    for i in 0..args.ops {
        cache.insert(ids[i % ids.len()], 10);
    }
    let insert_rate = per_sec(args.ops, started.elapsed());

    // Lookups: half hits, half misses.
    let started = Instant::now();
    let mut hits = 0usize;
    for i in 0..args.ops {
        if cache.contains(black_box(&ids[i % ids.len()])) {
            hits += 1;
        }
    }
    let lookup_rate = per_sec(args.ops, started.elapsed());
    anyhow::ensure!(hits > 0 && hits < args.ops, "lookups found {hits} of {} ids", args.ops);

    Ok(Report {
        bench: "seen-cache",
        params: json!({ "capacity": args.capacity, "ops": args.ops, "hit_ratio": hits as f64 / args.ops as f64 }),
        figures: vec![
            Figure::at_least("lookups_per_sec", lookup_rate, "lookups/s", 5_000_000.0),
            Figure::plain("inserts_per_sec", insert_rate, "inserts/s"),
        ],
    })
}
