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

use std::time::{SystemTime, UNIX_EPOCH};

pub mod book;
pub mod config;
pub mod keystore;
pub mod node;
pub mod persistence;
pub mod providers;
mod reload;
mod retention;
pub mod telemetry;

pub use config::{ConfigError, NodeConfig, Sources, VARIABLES};
pub use node::{Node, StartOptions};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
