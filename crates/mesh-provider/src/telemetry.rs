//! Metric names (the guide's, plus round counters named `mesh_provider_<name>_total`).
//!
//! The crate only emits through the `metrics` facade; the binary installs the recorder.

/// Round fetches started (one per round this node fetches).
pub const FETCH_ATTEMPTS_TOTAL: &str = "mesh_provider_fetch_attempts_total";
/// Round fetches that produced a batch.
pub const FETCH_SUCCESS_TOTAL: &str = "mesh_provider_fetch_success_total";
/// Batches handed to the broadcaster.
pub const BROADCAST_ATTEMPTS_TOTAL: &str = "mesh_provider_broadcast_attempts_total";
/// Batches the broadcaster accepted.
pub const BROADCAST_SUCCESS_TOTAL: &str = "mesh_provider_broadcast_success_total";
/// Latency of each HTTP request to Birdeye (histogram, seconds; labels `endpoint`, `outcome`).
pub const API_LATENCY_SECONDS: &str = "mesh_provider_api_latency_seconds";
/// Rounds this node did not fetch (label `reason`: `not_chosen`, `fulfilled`, `coordination`).
pub const ROUNDS_SKIPPED_TOTAL: &str = "mesh_provider_rounds_skipped_total";
/// Rounds this node tried to fetch and failed (label `reason`: the error kind).
pub const ROUNDS_FAILED_TOTAL: &str = "mesh_provider_rounds_failed_total";
/// Birdeye answers 429 (too many requests), each try counted, retried or not.
pub const RATE_LIMITED_TOTAL: &str = "mesh_provider_rate_limited_total";
/// 1 while provider mode is off because Birdeye refused the key (401 or 403 in a round, or the
/// stored key refused at start); 0 once a key is accepted (gauge).
pub const KEY_REJECTED: &str = "mesh_provider_key_rejected";
/// Keys Birdeye refused while provider mode ran or resumed (label `status`: 401 or 403).
pub const KEY_REJECTIONS_TOTAL: &str = "mesh_provider_key_rejections_total";
/// Tokens asked for that Birdeye had no price for.
pub const MISSING_PRICES_TOTAL: &str = "mesh_provider_missing_prices_total";
/// Rounds this node fetched and handed over (label `via`: `lease`, `mesh`, `single`).
pub const ROUNDS_FETCHED_TOTAL: &str = "mesh_provider_rounds_fetched_total";
/// Rounds whose lease another provider held (or a key no provider wrote) and whose batch had not
/// arrived when this node looked, one window after the lease was taken (label `reason`:
/// `not_delivered`, `unregistered`, `no_expiry`).
pub const ROUNDS_UNDELIVERED_TOTAL: &str = "mesh_provider_rounds_undelivered_total";
/// Rounds this node took over from a lease holder that did not deliver, and fetched.
pub const ROUNDS_TAKEN_OVER_TOTAL: &str = "mesh_provider_rounds_taken_over_total";
/// This node's wall clock minus the references it checks it against (Birdeye's `Date`, Redis
/// `TIME`, peers' fresh timestamps), seconds (gauge). Beyond `MESH_MAX_CLOCK_SKEW_SECS` the
/// provider takes no lease and publishes nothing.
pub const CLOCK_OFFSET_SECONDS: &str = "mesh_clock_offset_seconds";
/// The allowed skew, `MESH_MAX_CLOCK_SKEW_SECS` (gauge, seconds), for the alert to compare.
pub const CLOCK_MAX_SKEW_SECONDS: &str = "mesh_clock_max_skew_seconds";
