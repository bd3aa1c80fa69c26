//! `mesh-api`: serves the HTTP API, streams, web page and metrics of the mesh node that listens
//! on `MESH_NODE_SOCKET`. Parses its configuration, runs [`mesh_api::ApiServer`] until SIGINT
//! or SIGTERM, then shuts down within a grace period.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// HTTP API of a mesh price node: REST (`/api/mesh/...`), Server-Sent Events
/// (`/api/mesh/stream`), WebSocket (`/api/mesh/ws`), the web page (`/`), `/metrics`,
/// `/healthz`, `/readyz` and `/openapi.json`. It talks to the node only over its Unix socket.
// No `Debug`: it would print MESH_API_TOKEN.
#[derive(Parser)]
#[command(name = "mesh-api", version, about, long_about = None)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "MESH_API_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The node's Unix socket.
    #[arg(long, env = "MESH_NODE_SOCKET", default_value = "data/node.sock")]
    node_socket: PathBuf,
    /// When set, POST endpoints require `Authorization: Bearer <token>`. When not set, they
    /// are accepted only from a client on this host that came through no proxy.
    #[arg(long, env = "MESH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Start on a listen address that is not loopback without MESH_API_TOKEN (refused
    /// otherwise); POSTs stay loopback-only without a token either way.
    #[arg(
        long,
        env = "MESH_API_ALLOW_REMOTE_WITHOUT_TOKEN",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    allow_remote_without_token: bool,
    /// Longest time a REST request may take, in seconds.
    #[arg(long, env = "MESH_API_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    request_timeout_secs: u64,
    /// Largest request body, in bytes.
    #[arg(long, env = "MESH_API_BODY_LIMIT_BYTES", default_value_t = 16 * 1024)]
    body_limit_bytes: usize,
    /// Most SSE plus WebSocket clients at once.
    #[arg(long, env = "MESH_API_MAX_STREAM_CLIENTS", default_value_t = 10_000)]
    max_stream_clients: usize,
    /// WebSocket ping interval in seconds (a client silent for two is closed).
    #[arg(long, env = "MESH_API_WS_PING_SECS", default_value_t = 15)]
    ws_ping_secs: u64,
    /// SSE keep-alive comment interval in seconds.
    #[arg(long, env = "MESH_API_SSE_KEEPALIVE_SECS", default_value_t = 15)]
    sse_keepalive_secs: u64,
    /// Seconds a stream client may take to accept a batch of events before it is closed.
    #[arg(long, env = "MESH_API_CLIENT_WRITE_TIMEOUT_SECS", default_value_t = 10)]
    client_write_timeout_secs: u64,
    /// Most SSE plus WebSocket clients from one client address at once.
    #[arg(long, env = "MESH_API_MAX_STREAMS_PER_ADDRESS", default_value_t = 64)]
    max_streams_per_address: usize,
    /// Proxies whose X-Forwarded-For names the client (comma separated IP addresses).
    #[arg(
        long,
        env = "MESH_API_TRUSTED_PROXIES",
        default_value = "127.0.0.1,::1",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<std::net::IpAddr>,
    /// Browser origins besides the API's own allowed to call the POST endpoints (comma
    /// separated, e.g. `https://dashboard.example.com`); any other Origin gets 403.
    #[arg(long, env = "MESH_API_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Directory for the log file `mesh-api.log` (logs go to standard output as well).
    #[arg(long, env = "MESH_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// Log filter (`info`, `mesh_api=debug,info`, ...); `RUST_LOG` wins when set.
    #[arg(long, env = "MESH_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Seconds to let requests and streams finish at shutdown.
    #[arg(long, env = "MESH_API_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
}

fn init_logs(cli: &Cli) -> anyhow::Result<Option<tracing_appender::non_blocking::WorkerGuard>> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec),
        _ => EnvFilter::try_new(&cli.log_level),
    }
    .context("invalid log filter")?;
    let stdout = tracing_subscriber::fmt::layer();
    let (file, guard) = match &cli.log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("MESH_LOG_DIR={} cannot be created", dir.display()))?;
            let (writer, guard) = tracing_appender::non_blocking(tracing_appender::rolling::never(
                dir,
                "mesh-api.log",
            ));
            (
                Some(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer)),
                Some(guard),
            )
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(filter).with(stdout).with(file).init();
    Ok(guard)
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").context("waiting for SIGINT"),
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// mimalloc, as in mesh-node: many small, short-lived buffers (HTTP and WebSocket frames, JSON)
/// cost less CPU than with the system allocator (BENCHMARKS.md).
/// `.cargo/config.toml` builds it without eager arena commits, which would keep about
/// 17 MiB more resident in an idle node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _log_guard = init_logs(&cli)?;
    let secs = Duration::from_secs;
    let config = mesh_api::Config {
        listen: cli.listen,
        node_socket: cli.node_socket,
        api_token: cli.api_token,
        allow_remote_without_token: cli.allow_remote_without_token,
        request_timeout: secs(cli.request_timeout_secs),
        body_limit: cli.body_limit_bytes,
        max_stream_clients: cli.max_stream_clients,
        ws_ping_interval: secs(cli.ws_ping_secs),
        sse_keep_alive: secs(cli.sse_keepalive_secs),
        client_write_timeout: secs(cli.client_write_timeout_secs),
        max_streams_per_address: cli.max_streams_per_address,
        trusted_proxies: cli.trusted_proxies,
        allowed_origins: cli.allowed_origins.into_iter().filter(|o| !o.trim().is_empty()).collect(),
        ..mesh_api::Config::default()
    };
    let server = mesh_api::ApiServer::start(config).await?;
    let signal = shutdown_signal().await?;
    tracing::info!(signal, "shutting down");
    if !server.shutdown(secs(cli.shutdown_grace_secs)).await {
        tracing::warn!(grace_secs = cli.shutdown_grace_secs, "shutdown grace period ran out");
    }
    Ok(())
}
