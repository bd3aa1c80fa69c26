//! `mesh-bench`: the workspace's benchmarks. Each subcommand runs one benchmark and prints a
//! JSON document with the figures, the goal and whether it was met. Build with `--release`.

mod api;
mod attack;
mod attack_rounds;
mod awake;
mod e2e;
mod memory;
mod netns;
mod node;
mod protocol;
mod provider;
mod relay;
mod report;
mod scale;
mod seen_cache;
mod storage;
mod suite;

use clap::{Parser, Subcommand};

/// Benchmarks of the mesh price network (run with `cargo run --release -p mesh-bench -- ...`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// GET /api/mesh/prices under loopback load; WebSocket fan-out to many clients.
    Api(api::Args),
    /// Encode+sign and decode+verify+validate of 50-price batches on one core.
    Protocol(protocol::Args),
    /// Seen-cache lookups and inserts per second.
    SeenCache(seen_cache::Args),
    /// Birdeye client batches/s against birdeye-sim, provider round start to hand-over.
    Provider(provider::Args),
    /// Our relay vs libp2p gossipsub on one random regular graph, one node's relay rate.
    Relay(relay::Args),
    /// Round start to price in each consumer's book on a mesh of full nodes; idle node RSS.
    Node(node::Args),
    /// PostgreSQL batch upserts, Redis mirror write+read of 50 prices, round-lease p99.
    Storage(storage::Args),
    /// 1,000 relays in one process: coverage times, delivery, memory and CPU per message.
    Scale(scale::Args),
    /// birdeye-sim -> provider -> mesh -> mesh-api -> WebSocket client, round start to client.
    E2e(e2e::Args),
    /// RSS of a real mesh-node consumer process, idle and under 100 batches/s.
    Memory(memory::Args),
    /// mesh-node processes in network namespaces joined by links with delay and loss (root).
    Netns(netns::Args),
    /// One hostile peer against one node of a 50-node mesh, or an attack on the providers'
    /// round coordination: honest delivery and memory.
    Attack(attack::Args),
    /// Runs every benchmark and writes BENCHMARKS.md.
    Report(suite::Args),
    /// Spins at the lowest CPU priority until its parent ends (`--keep-cpus-awake`).
    #[command(hide = true)]
    Awake(awake::Args),
}

/// The allocator mesh-node and mesh-api use, so that in-process figures match them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let doc = match cli.bench {
        Bench::Api(args) => api::run(&args)?,
        Bench::Protocol(args) => protocol::run(&args)?,
        Bench::SeenCache(args) => seen_cache::run(&args)?,
        Bench::Provider(args) => provider::run(&args)?,
        Bench::Relay(args) => relay::run(&args)?,
        Bench::Storage(args) => storage::run(&args)?,
        Bench::Node(args) => node::run(&args)?,
        Bench::Scale(args) => scale::run(&args)?,
        Bench::E2e(args) => e2e::run(&args)?,
        Bench::Memory(args) => memory::run(&args)?,
        Bench::Netns(args) => netns::run(&args)?,
        Bench::Attack(args) => attack::run(&args)?,
        Bench::Report(args) => suite::run(&args)?,
        Bench::Awake(args) => return awake::run(&args),
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
