//! The HTTP face of a mesh node (ARCHITECTURE section 11): REST endpoints, Server-Sent Events,
//! a WebSocket, a small web page and Prometheus metrics, on `MESH_API_LISTEN`
//! (default `127.0.0.1:8080`).
//!
//! The API talks to the node only through [`mesh_ipc`]. One background task keeps a single
//! subscription to the node and the snapshot it feeds (prices keyed by blockchain and asset,
//! network status, provider status), so that reads never wait on the socket. When the node
//! goes away the task reconnects with backoff and resynchronises from the new snapshot; in the
//! meantime the read endpoints answer `503 {"success":false,"error":"node unavailable: ..."}`.
//! The POST endpoints go to the node directly.
//!
//! | route | what |
//! |---|---|
//! | `GET /api/mesh/prices` | every price; query `blockchain`, `asset` |
//! | `GET /api/mesh/prices/{asset}` | that asset on every chain (query `blockchain`); 404 when unknown |
//! | `GET /api/mesh/prices/{asset}/quotes` | every provider's latest quote of that asset (query `blockchain`): fresh, agreeing, served; asked of the node, 503 while it is away |
//! | `GET /api/mesh/network/status` | `node_id`, `connected_peers`, `active_providers`, `data_freshness`, `last_update_time`, `degraded`, ... |
//! | `POST /api/mesh/provider/enable` | `{"api_key": "..."}`; 401 `Invalid API key` when Birdeye refuses it |
//! | `POST /api/mesh/provider/disable` | provider mode off |
//! | `GET /api/mesh/provider/status` | `enabled`, `node_id`, last fetch, next round, errors |
//! | `GET /api/mesh/stream` | Server-Sent Events (query `blockchain`, `asset`) |
//! | `GET /api/mesh/ws` | WebSocket with the same events |
//! | `GET /metrics`, `/healthz`, `/readyz` | Prometheus text, liveness, readiness (the node answers) |
//! | `GET /`, `GET /openapi.json` | the web page, the OpenAPI description |
//!
//! Every JSON answer is `{"success": true, "data": ...}` or `{"success": false, "error": "..."}`.
//! When [`Config::api_token`] is set, the POST endpoints need `Authorization: Bearer <token>`.
//!
//! Stream events are the node's [`mesh_ipc::Event`]s as JSON (`{"type": "price", "data":
//! {...}}`, `snapshot`, `discrepancy`, `network`, `provider`) plus `{"type": "node", "data":
//! {"connected": false, "error": "..."}}` while the node is away. Each client starts with a
//! snapshot and has a bounded, conflating buffer: a slow client gets the latest value per asset,
//! and one that stops reading is closed with a reason; other clients never wait for it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_api::Error> {
//! use std::time::Duration;
//!
//! let config = mesh_api::Config {
//!     listen: "127.0.0.1:8080".parse().map_err(|_| mesh_api::Error::Config("listen".into()))?,
//!     node_socket: "/run/mesh/node.sock".into(),
//!     ..mesh_api::Config::default()
//! };
//! let server = mesh_api::ApiServer::start(config).await?;
//! println!("serving on http://{}", server.local_addr());
//! // ... until a signal:
//! server.shutdown(Duration::from_secs(10)).await;
//! # Ok(()) }
//! ```

pub mod config;
mod envelope;
mod hub;
mod metrics;
mod node;
mod routes;
mod server;

pub use config::Config;
pub use hub::StreamClientStats;
pub use server::ApiServer;

/// The OpenAPI 3 description of the REST endpoints (also served at `/openapi.json`).
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Errors of the API server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (every problem, one per line).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
    /// The metrics recorder could not be built.
    #[error("metrics recorder: {0}")]
    Metrics(String),
    /// Serving HTTP failed.
    #[error("HTTP server: {0}")]
    Serve(#[from] std::io::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
