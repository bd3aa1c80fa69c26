//! The provider status the API shows (`GET /api/mesh/provider/status`).

use mesh_protocol::NodeId;
use serde::Serialize;

/// How the last round this node fetched ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum FetchOutcome {
    /// Prices fetched, signed and handed to the broadcaster.
    Fetched {
        /// The round.
        round: u64,
        /// Prices in the batch.
        assets: usize,
        /// Assets Birdeye had no price for.
        missing: usize,
        /// Peers the broadcaster reached.
        peers: usize,
    },
    /// Nothing was sent for the round.
    Failed {
        /// The round.
        round: u64,
        /// Why.
        error: String,
    },
}

/// A snapshot of provider mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderStatus {
    /// Provider mode is on.
    pub enabled: bool,
    /// This node.
    pub node_id: NodeId,
    /// Why provider mode is off when it was stopped by an error (`Invalid API key`).
    pub reason: Option<String>,
    /// When the last fetch of this node ended (Unix ms).
    pub last_fetch_unix_ms: Option<i64>,
    /// How it ended.
    pub last_fetch: Option<FetchOutcome>,
    /// The last error, kept after later successes.
    pub last_error: Option<String>,
    /// The next round this node will decide on.
    pub next_round: Option<u64>,
    /// When that round starts (Unix ms).
    pub next_round_unix_ms: Option<i64>,
    /// Rounds this node fetched and handed over.
    pub rounds_fetched: u64,
    /// Of those, rounds fetched without a coordination lease (store down): possible duplicates.
    pub rounds_fetched_uncoordinated: u64,
    /// Rounds another provider took.
    pub rounds_skipped: u64,
    /// Rounds this node tried and failed (nothing sent).
    pub rounds_failed: u64,
    /// The coordination store was unavailable at the last decision.
    pub degraded: bool,
    /// Bumped by every change: of two views of this status, the one with the higher revision
    /// is the newer (a reader that gets them by two paths keeps that one).
    pub revision: u64,
}

impl ProviderStatus {
    /// The status of a provider that was never enabled.
    pub fn disabled(node_id: NodeId) -> Self {
        Self {
            enabled: false,
            node_id,
            reason: None,
            last_fetch_unix_ms: None,
            last_fetch: None,
            last_error: None,
            next_round: None,
            next_round_unix_ms: None,
            rounds_fetched: 0,
            rounds_fetched_uncoordinated: 0,
            rounds_skipped: 0,
            rounds_failed: 0,
            degraded: false,
            revision: 0,
        }
    }
}
