//! `mesh-node demo`: a local mesh in one process on loopback, with no servers and no
//! internet: a Birdeye simulator, provider nodes and consumer nodes (embedded SQLite stores,
//! bootstrapping from each other, mDNS off), and the HTTP API in front of the first consumer.

use std::path::PathBuf;
use std::time::Duration;

use crate::local::{DEMO_API_KEY, LocalMesh};

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Provider nodes.
    #[arg(long, default_value_t = 2)]
    pub providers: usize,
    /// Consumer nodes.
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Round length in seconds.
    #[arg(long, default_value_t = 10)]
    pub interval: u64,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api_listen: std::net::SocketAddr,
    /// Directory for the nodes' data and logs (default: a temporary directory).
    #[arg(long)]
    pub demo_dir: Option<PathBuf>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Use this Redis for coordination (default: none; the mesh coordinates itself).
    #[arg(long)]
    pub redis_url: Option<String>,
}

/// Runs the demo until Ctrl-C (or `--duration`).
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let dir = match &args.demo_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("mesh-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let _logs =
        mesh_service::telemetry::init_logs("info,mesh_relay=warn", Some(&dir.join("logs")))?;
    let metrics = mesh_service::telemetry::init_metrics(None)?;
    let mut builder = LocalMesh::builder()
        .providers(args.providers)
        .consumers(args.consumers)
        .rounds(args.interval, 2.min(args.interval.saturating_sub(1)).max(1))
        .dir(&dir)
        .metrics(metrics);
    if let Some(url) = &args.redis_url {
        builder = builder.redis(url.clone());
    }
    let mesh = builder.start().await?;
    let entry = args.providers; // the first consumer
    let socket = mesh.running(entry.min(mesh.len() - 1))?.socket().to_path_buf();
    let api = mesh_api::ApiServer::start(mesh_api::Config {
        listen: args.api_listen,
        node_socket: socket.clone(),
        ..mesh_api::Config::default()
    })
    .await?;
    let url = format!("http://{}", api.local_addr());

    let sim = &mesh.simulators()[0];
    println!();
    println!("mesh demo: {} providers, {} consumers on loopback", args.providers, args.consumers);
    println!("  Birdeye simulator   {}  (accepts API key {DEMO_API_KEY:?})", sim.base_url());
    for i in 0..mesh.len() {
        let node = mesh.running(i)?;
        let role = if i < args.providers { "provider" } else { "consumer" };
        println!("  node {i} {role:<9} {}  socket {}", node.node_id(), node.socket().display());
    }
    println!("  data and logs       {}", dir.display());
    println!("  HTTP API of node {entry}   {url}  (socket {})", socket.display());
    {
        println!();
        println!("open   {url}/");
        println!("curl   {url}/api/mesh/prices");
        println!("curl   {url}/api/mesh/network/status");
        println!("curl   {url}/api/mesh/provider/status");
        println!("curl -N {url}/api/mesh/stream");
        println!(
            "curl -X POST {url}/api/mesh/provider/enable -H 'Content-Type: application/json' -d '{{\"api_key\": \"{DEMO_API_KEY}\"}}'"
        );
    }
    println!();
    println!("prices arrive within one round ({} s); Ctrl-C stops the demo", args.interval);

    match args.duration {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    println!("stopping");
    api.shutdown(Duration::from_secs(5)).await;
    mesh.shutdown().await
}
