//! The local protocol between `mesh-node` and `mesh-api` (ARCHITECTURE section 10): a Unix
//! socket (`MESH_NODE_SOCKET`, mode 0660) carrying length-prefixed JSON frames.
//!
//! Only the node's own user, root and members of `MESH_NODE_SOCKET_GROUP` may use the socket:
//! the server checks every connecting process's credentials (`SO_PEERCRED`, see [`access`]),
//! and makes the socket's directory closed to other users.
//!
//! - [`types`]: requests (prices, network status, provider status, enable and disable provider
//!   mode, subscribe), responses and events. Their JSON is also what the HTTP API returns.
//! - [`Server`] runs in the node and answers through a [`Handler`]; subscribers get a snapshot,
//!   then events, with a bounded buffer each (a slow one is conflated or dropped).
//! - [`Client`] is what `mesh-api` and the tests use.
//! - [`frame`]: the framing. No frame carries more than [`frame::PART_PRICES`] prices: a
//!   snapshot or price list of a large book (up to 100,000 assets) is sent in parts that
//!   [`Client`] and [`Subscription`] join, so it never meets the frame limit.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_ipc::Error> {
//! use mesh_ipc::{Client, Event, PriceFilter};
//!
//! let client = Client::new("/run/mesh/node.sock");
//! let status = client.network_status().await?;
//! println!("{} peers", status.connected_peers);
//! let prices = client.prices(PriceFilter { blockchain: Some("solana".into()), asset: None }).await?;
//! println!("{} solana prices", prices.len());
//! let mut events = client.subscribe().await?;
//! while let Some(event) = events.next().await? {
//!     if let Event::Price(p) = event {
//!         println!("{} {}", p.asset, p.price);
//!     }
//! }
//! # Ok(()) }
//! ```

use std::path::PathBuf;

pub mod access;
pub mod client;
pub mod frame;
pub mod server;
pub mod types;

pub use access::resolve_group;
pub use client::{Client, Subscription};
pub use server::{Handler, Server, ServerConfig};
pub use types::{
    ActiveProvider, DataFreshness, Discrepancy, ErrorKind, Event, NetworkStatus, PriceFilter,
    PriceView, ProviderStatusView, QuoteView, Request, Response, Snapshot,
};

/// Errors of the IPC layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the socket failed.
    #[error("IPC socket: {0}")]
    Io(#[from] std::io::Error),
    /// The socket file could not be set up.
    #[error("IPC socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// Another process answers on the socket already.
    #[error("IPC socket {0} is in use by another running node")]
    InUse(PathBuf),
    /// The node is not reachable (not running, or no permission).
    #[error("node not reachable at {path}: {source}")]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A frame announced more bytes than allowed.
    #[error("IPC frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame did not hold the expected JSON.
    #[error("malformed IPC frame: {0}")]
    Malformed(String),
    /// The node closed the connection before answering.
    #[error("the node closed the connection")]
    Closed,
    /// No answer in time.
    #[error("the node did not answer in time")]
    Timeout,
    /// A setting of the socket is wrong (`MESH_NODE_SOCKET_GROUP`).
    #[error("{0}")]
    Config(String),
    /// The node answered with an error.
    #[error("{message}")]
    Remote {
        /// Its kind.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
