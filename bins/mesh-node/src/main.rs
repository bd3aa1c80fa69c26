//! `mesh-node`: runs a mesh node. Parses the configuration, builds the node, runs it until
//! SIGINT or SIGTERM, and shuts it down in order. Everything else lives in `mesh-service`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_service::{Node, NodeConfig, Sources, StartOptions, telemetry};

/// A node of the mesh price network.
///
/// Configuration comes from (lowest to highest precedence) built-in defaults, the TOML file of
/// --config, a .env file, the environment, and --set / the flags below. Run
/// `mesh-node variables` for every variable with its default and range.
// No `Debug`: `--set DATABASE_URL=...` may hold a password.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Start in provider mode: fetch prices from Birdeye (needs BIRDEYE_API_KEY, or provider
    /// mode enabled earlier through the API).
    #[arg(long, global = true)]
    provider: bool,
    /// A TOML file with variables as keys (`MESH_MESSAGE_TTL = 7`).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The .env file to read (default: ./.env when it exists).
    #[arg(long, value_name = "FILE", global = true)]
    env_file: Option<PathBuf>,
    /// Set a variable, overriding every other source (repeatable): --set MESH_MESSAGE_TTL=7.
    #[arg(long = "set", value_name = "NAME=VALUE", global = true)]
    set: Vec<String>,
    /// MESH_DATA_DIR.
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// MESH_LISTEN_ADDRS (comma separated multiaddrs).
    #[arg(long, value_name = "ADDRS", global = true)]
    listen: Option<String>,
    /// MESH_BOOTSTRAP_PEERS (comma separated multiaddrs ending in /p2p/PEER_ID).
    #[arg(long, value_name = "ADDRS", global = true)]
    bootstrap: Option<String>,
    /// MESH_NODE_SOCKET.
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    dump_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node (the default).
    Run,
    /// Apply the database migrations (DATABASE_URL, or the SQLite file) and exit.
    Migrate,
    /// Print this node's node_id and PeerId (creating its key when missing) and exit.
    Id,
    /// List every configuration variable with its default, range and meaning.
    Variables,
    /// A local demo mesh in one process: birdeye-sim, two providers and several consumers on
    /// loopback, plus the HTTP API when built; prints what to open and curl.
    Demo(mesh_testkit::demo::DemoArgs),
}

impl Cli {
    fn sources(&self) -> anyhow::Result<Sources> {
        let mut overrides = BTreeMap::new();
        for item in &self.set {
            let (k, v) = item
                .split_once('=')
                .with_context(|| format!("--set {item:?}: expected NAME=VALUE"))?;
            overrides.insert(k.trim().to_uppercase(), v.to_owned());
        }
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                overrides.insert(name.to_owned(), v);
            }
        };
        flag("MESH_DATA_DIR", self.data_dir.as_ref().map(|p| p.display().to_string()));
        flag("MESH_LISTEN_ADDRS", self.listen.clone());
        flag("MESH_BOOTSTRAP_PEERS", self.bootstrap.clone());
        flag("MESH_NODE_SOCKET", self.socket.as_ref().map(|p| p.display().to_string()));
        Ok(Sources {
            file: self.config.clone(),
            dotenv: self.env_file.clone(),
            environment: true,
            overrides,
        })
    }
}

/// mimalloc: the relay's many small, short-lived buffers (frames, yamux and noise chunks,
/// decoded prices) cost markedly less CPU than with the system allocator (BENCHMARKS.md).
/// `.cargo/config.toml` builds it without eager arena commits, which would keep about
/// 17 MiB more resident in an idle node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.as_ref().unwrap_or(&Command::Run);
    if let Command::Variables = command {
        for v in mesh_service::VARIABLES {
            println!(
                "{:<42} default {:<28} range {:<30} {}",
                v.name,
                if v.default.is_empty() { "(unset)" } else { v.default },
                v.range,
                v.meaning
            );
        }
        return Ok(());
    }
    if let Command::Demo(args) = command {
        return mesh_testkit::demo::run(args).await;
    }
    let config = NodeConfig::load(&cli.sources()?, cli.provider)?;
    if cli.dump_config {
        print!("{}", config.dump());
        return Ok(());
    }
    match command {
        Command::Id => {
            let identity = mesh_protocol::Identity::load_or_create(&config.node_key_path())?;
            println!("node_id: {}", identity.node_id());
            println!("peer_id: {}", identity.peer_id());
            Ok(())
        }
        Command::Migrate => migrate(&config).await,
        _ => serve(config).await,
    }
}

async fn migrate(config: &NodeConfig) -> anyhow::Result<()> {
    let db_config = match &config.database_url {
        Some(url) => mesh_storage::DatabaseConfig::new(url.clone()),
        None => {
            std::fs::create_dir_all(&config.data_dir)?;
            mesh_storage::DatabaseConfig::sqlite_file(&config.sqlite_path())
        }
    };
    let db = mesh_storage::Database::connect(&db_config).await?;
    db.migrate().await?;
    println!("migrations applied ({})", db.backend());
    db.close().await;
    Ok(())
}

async fn serve(config: NodeConfig) -> anyhow::Result<()> {
    let _logs = telemetry::init_logs(&config.log_level, Some(&config.log_dir))?;
    let metrics = telemetry::init_metrics(config.metrics_listen)?;
    let node =
        Node::start(config, StartOptions { metrics: Some(metrics), ..StartOptions::default() })
            .await?;
    let cancel = node.cancellation();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    match node.wait(Duration::from_secs(15)).await {
        Some(reason) => anyhow::bail!("node stopped: {reason}"),
        None => Ok(()),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
