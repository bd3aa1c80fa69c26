//! What travels between `mesh-node` and `mesh-api`: requests, responses and events. The JSON
//! shapes of the HTTP API are these types serialised with serde, so they are the contract of
//! the guide's `curl | jq` commands (`.data.active_providers[].hop_count`, ...).

use mesh_protocol::{Decimal, NodeId};
use serde::{Deserialize, Serialize};

/// Query of the price book.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceFilter {
    /// Only this chain.
    pub blockchain: Option<String>,
    /// Only this asset (its address; an EVM address in any case).
    pub asset: Option<String>,
}

impl PriceFilter {
    /// `true` when `price` passes the filter. An EVM address matches in any case (prices are
    /// served with it in lower case, see [`mesh_protocol::canonical_asset`]).
    pub fn matches(&self, blockchain: &str, asset: &str) -> bool {
        self.blockchain.as_deref().is_none_or(|b| b == blockchain)
            && self.asset.as_deref().is_none_or(|a| mesh_protocol::same_asset(a, asset))
    }
}

/// One asset's served price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceView {
    /// The asset (token address; an EVM address in lower case).
    pub asset: String,
    /// Its chain.
    pub blockchain: String,
    /// The newest price, exact, as text.
    pub price: Decimal,
    /// Change over 24 hours in percent, when known.
    pub change_24h: Option<Decimal>,
    /// When the provider fetched it (RFC 3339, UTC).
    pub timestamp: String,
    /// The same in Unix milliseconds.
    pub timestamp_ms: i64,
    /// When the source (Birdeye) last updated the price (RFC 3339, UTC), when it said; `age_secs`
    /// and `stale` count from it. `null` when the source gave no time (or the price came from a
    /// provider of protocol version 1).
    #[serde(default)]
    pub source_timestamp: Option<String>,
    /// The same in Unix milliseconds.
    #[serde(default)]
    pub source_timestamp_ms: Option<i64>,
    /// The provider that sent it.
    pub source_node_id: NodeId,
    /// Seconds since the price was observed (`source_timestamp` when given, else `timestamp`)
    /// at the moment this view is served.
    pub age_secs: u64,
    /// Older than the staleness threshold at the moment this view is served.
    pub stale: bool,
    /// Hops the update travelled to this node (0 for our own); `None` (JSON `null`) for a
    /// price reloaded from the store at start-up, until a message about it arrives.
    pub hop_count: Option<u8>,
    /// Providers whose price for this asset is fresh (fetched within two fetch intervals) at
    /// the moment this view is served.
    pub providers_reporting: u32,
    /// Of those, how many agree with the served price within the discrepancy threshold.
    pub providers_agreeing: u32,
    /// Two of the fresh prices differ by more than the threshold (never with fewer than two
    /// providers reporting).
    pub discrepancy: bool,
}

/// Freshness of the whole node's data (ARCHITECTURE section 8). Serialises as `"Fresh"`,
/// `{"MinutesAgo": n}`, `{"HoursAgo": n}` or `"Stale"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataFreshness {
    /// The newest update is younger than two fetch intervals.
    Fresh,
    /// The newest update is this many minutes old (under an hour).
    MinutesAgo(u64),
    /// The newest update is this many hours old.
    HoursAgo(u64),
    /// No data, or older than the staleness threshold.
    Stale,
}

/// A provider the node has heard from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveProvider {
    /// Its node id.
    pub node_id: NodeId,
    /// Hops its messages travel to reach this node (0 for this node itself).
    pub hop_count: u8,
    /// When it was last heard from (RFC 3339, UTC).
    pub last_seen: String,
}

/// The node's view of the network (`GET /api/mesh/network/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    /// This node.
    pub node_id: NodeId,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Connected peers.
    pub connected_peers: usize,
    /// Providers heard from recently.
    pub active_providers: Vec<ActiveProvider>,
    /// Freshness of the data.
    pub data_freshness: DataFreshness,
    /// When the newest update was received (RFC 3339, UTC), if any.
    pub last_update_time: Option<String>,
    /// Some component runs on its fallback (Redis or the database is unreachable).
    pub degraded: bool,
    /// Which components are degraded (`redis`, `database`, `coordination`).
    pub degraded_components: Vec<String>,
    /// Addresses the node listens on.
    pub listen_addrs: Vec<String>,
}

/// Provider mode of this node (`GET /api/mesh/provider/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStatusView {
    /// Provider mode is on.
    pub enabled: bool,
    /// This node.
    pub node_id: NodeId,
    /// Why provider mode is off after an error (`Invalid API key`); always `null` while
    /// `enabled` is true.
    pub reason: Option<String>,
    /// When the last fetch ended (RFC 3339, UTC).
    pub last_fetch_time: Option<String>,
    /// `success`, or what went wrong.
    pub last_fetch_result: Option<String>,
    /// The last error seen.
    pub last_error: Option<String>,
    /// The next round number.
    pub next_round: Option<u64>,
    /// When it starts (RFC 3339, UTC).
    pub next_round_time: Option<String>,
    /// Rounds fetched by this node.
    pub rounds_fetched: u64,
    /// Rounds another provider took.
    pub rounds_skipped: u64,
    /// Rounds that failed.
    pub rounds_failed: u64,
    /// Coordination runs on its fallback.
    pub degraded: bool,
    /// Bumped by every change of the status (from 0 at the node's start): of two views, the
    /// one with the higher revision is the newer.
    #[serde(default)]
    pub revision: u64,
    /// Where a key Birdeye refused was set aside (`provider.key.rejected` in the data
    /// directory), while that file is there: never used again by the node, kept for the
    /// operator. `null` when there is none.
    #[serde(default)]
    pub rejected_key_file: Option<String>,
}

/// Two providers disagree on an asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discrepancy {
    /// The asset.
    pub asset: String,
    /// Its chain.
    pub blockchain: String,
    /// One provider.
    pub node_a: NodeId,
    /// Its price.
    pub price_a: Decimal,
    /// The other provider.
    pub node_b: NodeId,
    /// Its price.
    pub price_b: Decimal,
    /// The difference in percent of the lower price (two decimals).
    pub difference_percent: String,
    /// When it was detected (RFC 3339, UTC).
    pub detected_at: String,
}

/// Everything a subscriber needs to start from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Every price.
    pub prices: Vec<PriceView>,
    /// The network status.
    pub network: NetworkStatus,
    /// Provider mode.
    pub provider: ProviderStatusView,
}

/// One provider's latest quote of an asset, as this node holds it
/// (`GET /api/mesh/prices/{asset}/quotes`): what each provider says, so that a lying or
/// broken one can be found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteView {
    /// The asset (token address; an EVM address in lower case).
    pub asset: String,
    /// Its chain.
    pub blockchain: String,
    /// The provider that sent it.
    pub source_node_id: NodeId,
    /// Its price, exact, as text.
    pub price: Decimal,
    /// Change over 24 hours in percent, when known.
    pub change_24h: Option<Decimal>,
    /// When the provider fetched it (RFC 3339, UTC).
    pub timestamp: String,
    /// The same in Unix milliseconds.
    pub timestamp_ms: i64,
    /// Seconds since the price was observed (the source's time when given, else the fetch).
    pub age_secs: u64,
    /// Hops the quote travelled to this node (0 for our own); `null` for a quote reloaded from
    /// the store at start-up, until a message about it arrives.
    pub hop_count: Option<u8>,
    /// Fetched within two fetch intervals: it counts in `providers_reporting`.
    pub fresh: bool,
    /// Within the discrepancy threshold of the served price (the served quote agrees with
    /// itself).
    pub agrees: bool,
    /// This is the quote the price endpoints serve for the asset.
    pub served: bool,
}

/// What a subscription carries after its first [`Event::Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// A full state: first on every subscription, and again when the subscriber fell behind
    /// (events in between were conflated into it). A large one is preceded by
    /// [`Event::SnapshotPart`] frames carrying its first prices ([`crate::frame`]).
    Snapshot(Box<Snapshot>),
    /// The first prices of the [`Event::Snapshot`] that follows (a snapshot of a large book is
    /// sent in parts, each well under the frame limit). [`crate::Subscription::next`] joins
    /// the parts, so its callers never see this.
    SnapshotPart(Vec<PriceView>),
    /// An asset's served price changed.
    Price(PriceView),
    /// Two providers disagree.
    Discrepancy(Discrepancy),
    /// The network status changed.
    Network(NetworkStatus),
    /// Provider mode changed.
    Provider(ProviderStatusView),
}

/// A request to the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Prices matching the filter.
    GetPrices(PriceFilter),
    /// The network status.
    GetNetworkStatus,
    /// Provider mode status.
    GetProviderStatus,
    /// Turn provider mode on with this Birdeye key (checked against Birdeye first).
    EnableProvider {
        /// The key; never logged.
        api_key: String,
    },
    /// Turn provider mode off.
    DisableProvider,
    /// The node's metrics in the Prometheus text format.
    GetMetrics,
    /// Switch this connection to a stream of [`Event`]s.
    Subscribe,
    /// Every provider's latest quote of the assets matching the filter (an asset, and a chain
    /// when given).
    GetQuotes(PriceFilter),
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Birdeye refused the key (HTTP 401 for the API).
    InvalidApiKey,
    /// Birdeye refused access (HTTP 403).
    Forbidden,
    /// The request was malformed (HTTP 400).
    BadRequest,
    /// Nothing matches (HTTP 404).
    NotFound,
    /// Birdeye or the node is unavailable right now (HTTP 503).
    Unavailable,
    /// Anything else (HTTP 500).
    Internal,
    /// This process may not use the node's socket (its user is not the node's, root, or in
    /// `MESH_NODE_SOCKET_GROUP`).
    PermissionDenied,
}

/// The node's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Response {
    /// Prices. A long list is preceded by [`Response::PricesPart`] frames carrying its first
    /// prices ([`crate::frame`]).
    Prices(Vec<PriceView>),
    /// The first prices of the [`Response::Prices`] that follows; [`crate::Client`] joins the
    /// parts, so its callers never see this.
    PricesPart(Vec<PriceView>),
    /// The network status.
    NetworkStatus(NetworkStatus),
    /// Provider mode status.
    ProviderStatus(ProviderStatusView),
    /// The node's metrics (Prometheus text format).
    Metrics(String),
    /// Providers' quotes ([`Request::GetQuotes`]).
    Quotes(Vec<QuoteView>),
    /// A failed request.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// A readable message (never contains a secret).
        message: String,
    },
}
