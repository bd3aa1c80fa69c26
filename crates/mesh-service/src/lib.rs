//! The mesh node runtime (ARCHITECTURE sections 7-10, 12-13): it composes the relay,
//! discovery, the provider, coordination, storage and the seen cache into one running node,
//! owns the price book, and serves the local `mesh-api` over a Unix socket.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use mesh_service::{Node, NodeConfig, Sources, StartOptions};
//!
//! // Defaults < mesh.toml < .env < environment < flags.
//! let sources = Sources { file: None, dotenv: None, environment: true, overrides: Default::default() };
//! let config = NodeConfig::load(&sources, false)?;
//! let node = Node::start(config, StartOptions::default()).await?;
//! println!("node {} on {}", node.node_id(), node.socket().display());
//! let reason = node.shutdown(Duration::from_secs(10)).await;
//! assert!(reason.is_none());
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_coordination::Coordination;
use mesh_protocol::NodeId;

pub mod book;
pub mod config;
pub mod keystore;
pub mod node;
pub mod persistence;
pub mod providers;
pub mod telemetry;

pub use config::{ConfigError, NodeConfig, Sources, VARIABLES};
pub use node::{Node, StartOptions};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Coordination for a node without Redis: there is no registry and no lease, so every call
/// answers "unavailable" and the round planner ranks the providers learned from the mesh
/// (`ProviderAnnounce`) and skips rounds whose batch already arrived (ARCHITECTURE section 7).
#[derive(Debug, Clone, Copy, Default)]
pub struct MeshOnly;

#[async_trait::async_trait]
impl Coordination for MeshOnly {
    async fn heartbeat(&self, _node: NodeId, _ttl: Duration) -> mesh_coordination::Result<()> {
        Err(mesh_coordination::Error::Unavailable)
    }

    async fn deregister(&self, _node: NodeId) -> mesh_coordination::Result<()> {
        Ok(())
    }

    async fn active_providers(&self) -> mesh_coordination::Result<Vec<NodeId>> {
        Err(mesh_coordination::Error::Unavailable)
    }

    async fn try_acquire_round(
        &self,
        _round: u64,
        _node: NodeId,
        _lease: Duration,
    ) -> mesh_coordination::Result<bool> {
        Err(mesh_coordination::Error::Unavailable)
    }
}
