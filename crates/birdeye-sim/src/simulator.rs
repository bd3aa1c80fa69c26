//! The simulator's builder, its running handle, the knobs that change at run time and the
//! request counters.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::market::{Market, NumberStyle, TokenSpec, fixture_tokens, ticks};
use crate::{Error, Result, server};

/// What the simulator does with an address it has no token for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownTokens {
    /// `"addr": null` in multi-price answers (`data: null` for a single price).
    #[default]
    Null,
    /// The address is left out of multi-price answers (no `data` for a single price).
    Missing,
}

/// A failure queued with [`SimulatorHandle::fail_next`]: the next authorised requests get this
/// status instead of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// HTTP status to answer with (429, 500, 503, 400, ...).
    pub status: u16,
    /// `Retry-After` header value in seconds, if any.
    pub retry_after_secs: Option<u64>,
}

impl Failure {
    /// A failure with `status` and no `Retry-After`.
    pub fn status(status: u16) -> Self {
        Self { status, retry_after_secs: None }
    }

    /// A 429 with `Retry-After: secs`.
    pub fn rate_limited(secs: u64) -> Self {
        Self { status: 429, retry_after_secs: Some(secs) }
    }
}

/// The endpoint a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `GET /defi/price`.
    Price,
    /// `GET` or `POST /defi/multi_price`.
    MultiPrice,
    /// `GET /defi/networks`.
    Networks,
}

/// Counters of one API key (requests without a key are counted under `"(none)"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStats {
    /// Every request with this key, whatever the answer.
    pub requests: u64,
    /// Requests to `/defi/price`.
    pub price: u64,
    /// Requests to `/defi/multi_price` (GET and POST).
    pub multi_price: u64,
    /// Requests to `/defi/networks`.
    pub networks: u64,
    /// Addresses asked for, summed over price requests.
    pub tokens_requested: u64,
    /// Answers by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
}

/// Request counters, as served at `GET /sim/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Every request to a `/defi` endpoint.
    pub total_requests: u64,
    /// Counters per API key.
    pub keys: BTreeMap<String, KeyStats>,
}

impl Stats {
    /// The counters of `key` (zero when it never called).
    pub fn key(&self, key: &str) -> KeyStats {
        self.keys.get(key).cloned().unwrap_or_default()
    }

    /// Multi-price requests over all keys.
    pub fn multi_price_requests(&self) -> u64 {
        self.keys.values().map(|k| k.multi_price).sum()
    }
}

/// One request as the simulator saw it (kept in a bounded log, newest last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// When it arrived, Unix milliseconds.
    pub at_unix_ms: i64,
    /// The API key it carried (`"(none)"` without one).
    pub key: String,
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The `x-chain` it asked for.
    pub chain: String,
    /// How many addresses it asked for.
    pub tokens: usize,
    /// The status it was answered with.
    pub status: u16,
}

/// The knobs that can change while the simulator runs.
#[derive(Debug, Clone)]
pub(crate) struct Faults {
    pub(crate) error_rate: f64,
    pub(crate) latency: Duration,
    pub(crate) frozen: bool,
    pub(crate) offset_percent: f64,
    pub(crate) unsuccessful: bool,
    pub(crate) null_tokens: HashSet<String>,
    /// Per address, how long ago (seconds) the answer says the price was last updated.
    pub(crate) update_lag_secs: HashMap<String, u64>,
    pub(crate) missing_tokens: HashSet<String>,
    pub(crate) fail_next: VecDeque<Failure>,
    /// Keys whose every authorised request fails (a provider whose Birdeye calls fail while
    /// the others' succeed).
    pub(crate) failing_keys: HashMap<String, Failure>,
    pub(crate) rate_limit_per_sec: Option<u32>,
}

/// Everything the request handlers share; one mutex, never held across an await.
pub(crate) struct State {
    pub(crate) accepted_keys: HashSet<String>,
    pub(crate) forbidden_keys: HashSet<String>,
    pub(crate) faults: Faults,
    pub(crate) unknown: UnknownTokens,
    pub(crate) number_style: NumberStyle,
    pub(crate) market: Market,
    pub(crate) rng: StdRng,
    pub(crate) limiter: HashMap<String, (Instant, u32)>,
    pub(crate) stats: Stats,
    pub(crate) log: VecDeque<RequestRecord>,
    pub(crate) log_capacity: usize,
    pub(crate) frozen_at_tick: Option<u64>,
    pub(crate) tick_shift: u64,
}

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) started: Instant,
    pub(crate) tick: Duration,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A handler that panicked while holding the lock left counters half-updated at worst;
        // the simulator keeps serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Brings the walk up to now (unless frozen) and returns the locked state.
    pub(crate) fn lock_market(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        let now_tick = ticks(self.started.elapsed(), self.tick);
        if state.faults.frozen {
            state.frozen_at_tick.get_or_insert(now_tick);
        } else {
            if let Some(frozen_at) = state.frozen_at_tick.take() {
                // Resume the walk where it stopped instead of jumping over the frozen time.
                state.tick_shift += now_tick.saturating_sub(frozen_at);
            }
            let target = now_tick.saturating_sub(state.tick_shift);
            state.market.advance_to(target);
        }
        state
    }
}

/// Builds a [`Simulator`]; every option has a default that serves the fixture tokens to any key.
#[derive(Debug, Clone)]
pub struct SimulatorBuilder {
    keys: Vec<String>,
    forbidden_keys: Vec<String>,
    rate_limit_per_sec: Option<u32>,
    error_rate: f64,
    latency: Duration,
    frozen: bool,
    offset_percent: f64,
    unsuccessful: bool,
    null_tokens: Vec<String>,
    update_lag_secs: HashMap<String, u64>,
    missing_tokens: Vec<String>,
    unknown: UnknownTokens,
    number_style: NumberStyle,
    tokens: Vec<TokenSpec>,
    seed: u64,
    tick: Duration,
    log_capacity: usize,
}

impl Default for SimulatorBuilder {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            forbidden_keys: Vec::new(),
            rate_limit_per_sec: None,
            error_rate: 0.0,
            latency: Duration::ZERO,
            frozen: false,
            offset_percent: 0.0,
            unsuccessful: false,
            null_tokens: Vec::new(),
            update_lag_secs: HashMap::new(),
            missing_tokens: Vec::new(),
            unknown: UnknownTokens::Null,
            number_style: NumberStyle::Python,
            tokens: fixture_tokens(),
            seed: 0x6d65_7368,
            tick: Duration::from_secs(1),
            log_capacity: 10_000,
        }
    }
}

impl SimulatorBuilder {
    /// Accepted API keys. With none configured, every non-empty key that is not forbidden is
    /// accepted; with some, any other key gets 401.
    pub fn keys<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.keys.extend(keys.into_iter().map(Into::into));
        self
    }

    /// A key that is answered 403 (blacklisted / plan too low).
    pub fn forbidden_key(mut self, key: impl Into<String>) -> Self {
        self.forbidden_keys.push(key.into());
        self
    }

    /// Requests per second allowed per key; more get 429 with `Retry-After`.
    pub fn rate_limit(mut self, per_second: u32) -> Self {
        self.rate_limit_per_sec = Some(per_second);
        self
    }

    /// Share of authorised requests answered 500 or 503 (0.0..=1.0).
    pub fn error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    /// Delay added before every answer.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Prices stop moving.
    pub fn frozen(mut self, frozen: bool) -> Self {
        self.frozen = frozen;
        self
    }

    /// Every price of this instance is moved by this many percent (discrepancy tests).
    pub fn offset_percent(mut self, percent: f64) -> Self {
        self.offset_percent = percent;
        self
    }

    /// Price requests are answered `200 {"success": false, ...}`.
    pub fn unsuccessful(mut self, unsuccessful: bool) -> Self {
        self.unsuccessful = unsuccessful;
        self
    }

    /// These addresses are answered `null` even when known.
    pub fn null_tokens<I: IntoIterator<Item = S>, S: Into<String>>(mut self, addresses: I) -> Self {
        self.null_tokens.extend(addresses.into_iter().map(Into::into));
        self
    }

    /// `address` is answered with an `updateUnixTime` `lag` in the past: a token the market
    /// stopped trading (its price is still quoted, but not fresh).
    pub fn update_lag(mut self, address: impl Into<String>, lag: Duration) -> Self {
        self.update_lag_secs.insert(address.into(), lag.as_secs());
        self
    }

    /// These addresses are left out of multi-price answers even when known.
    pub fn missing_tokens<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        addresses: I,
    ) -> Self {
        self.missing_tokens.extend(addresses.into_iter().map(Into::into));
        self
    }

    /// What happens to addresses the simulator has no token for.
    pub fn unknown_tokens(mut self, unknown: UnknownTokens) -> Self {
        self.unknown = unknown;
        self
    }

    /// How prices are written as JSON numbers.
    pub fn number_style(mut self, style: NumberStyle) -> Self {
        self.number_style = style;
        self
    }

    /// Adds a token to the fixture tokens (for example many tokens for a benchmark).
    pub fn token(mut self, token: TokenSpec) -> Self {
        self.tokens.push(token);
        self
    }

    /// Seed of the random walk and of the fault dice.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Time between two steps of the random walk (default 1 s).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// How many requests the request log keeps (oldest dropped first).
    pub fn log_capacity(mut self, capacity: usize) -> Self {
        self.log_capacity = capacity;
        self
    }

    /// Checks the options and builds the simulator without starting it.
    pub fn build(self) -> Result<Simulator> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(Error::InvalidOption(format!(
                "error rate {} is out of range 0.0..=1.0",
                self.error_rate
            )));
        }
        if self.rate_limit_per_sec == Some(0) {
            return Err(Error::InvalidOption("rate limit 0 would refuse everything".into()));
        }
        if !self.offset_percent.is_finite() || self.offset_percent <= -100.0 {
            return Err(Error::InvalidOption(format!(
                "price offset {}% would make prices non-positive",
                self.offset_percent
            )));
        }
        if let Some(bad) = self.tokens.iter().find(|t| t.base_price.is_nan() || t.base_price <= 0.0)
        {
            return Err(Error::InvalidOption(format!(
                "token {} has base price {}",
                bad.address, bad.base_price
            )));
        }
        let state = State {
            accepted_keys: self.keys.into_iter().collect(),
            forbidden_keys: self.forbidden_keys.into_iter().collect(),
            faults: Faults {
                error_rate: self.error_rate,
                latency: self.latency,
                frozen: self.frozen,
                offset_percent: self.offset_percent,
                unsuccessful: self.unsuccessful,
                null_tokens: self.null_tokens.into_iter().collect(),
                update_lag_secs: self.update_lag_secs,
                missing_tokens: self.missing_tokens.into_iter().collect(),
                fail_next: VecDeque::new(),
                failing_keys: HashMap::new(),
                rate_limit_per_sec: self.rate_limit_per_sec,
            },
            unknown: self.unknown,
            number_style: self.number_style,
            market: Market::new(self.tokens, self.seed),
            rng: StdRng::seed_from_u64(self.seed.wrapping_add(1)),
            limiter: HashMap::new(),
            stats: Stats::default(),
            log: VecDeque::new(),
            log_capacity: self.log_capacity,
            frozen_at_tick: None,
            tick_shift: 0,
        };
        Ok(Simulator {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                started: Instant::now(),
                tick: self.tick,
            }),
        })
    }

    /// Builds the simulator and serves it on `addr` (`"127.0.0.1:0"` picks a free port).
    pub async fn spawn(self, addr: &str) -> Result<SimulatorHandle> {
        self.build()?.spawn(addr).await
    }
}

/// A Birdeye-compatible API with simulated prices; see the crate docs.
pub struct Simulator {
    shared: Arc<Shared>,
}

impl Simulator {
    /// Starts building a simulator.
    pub fn builder() -> SimulatorBuilder {
        SimulatorBuilder::default()
    }

    /// The axum router, for embedding the simulator in another server.
    pub fn router(&self) -> axum::Router {
        server::router(self.shared.clone())
    }

    /// Serves on `addr` in a background task until the handle is shut down or dropped.
    pub async fn spawn(self, addr: &str) -> Result<SimulatorHandle> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr: addr.to_owned(), source })?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr: addr.to_owned(), source })?;
        let cancel = CancellationToken::new();
        let router = self.router();
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "birdeye-sim server stopped with an error");
            }
        });
        tracing::info!(addr = %local, "birdeye-sim listening");
        Ok(SimulatorHandle { addr: local, shared: self.shared, cancel, task: Some(task) })
    }
}

/// A running simulator. Dropping it stops the server; [`SimulatorHandle::shutdown`] also waits
/// for it to finish.
pub struct SimulatorHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimulatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatorHandle").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl SimulatorHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, to use as the client's base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the request counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// The request log, oldest first (at most the configured capacity).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.iter().cloned().collect()
    }

    /// Zeroes the counters and empties the request log.
    pub fn reset_stats(&self) {
        let mut state = self.shared.lock();
        state.stats = Stats::default();
        state.log.clear();
    }

    /// The JSON number text the simulator would answer now for `address` on `chain`, offset
    /// included (`None` for an unknown token).
    pub fn price_text(&self, chain: &str, address: &str) -> Option<String> {
        let state = self.shared.lock_market();
        let quote = state.market.quote(chain, address)?;
        Some(state.number_style.format(quote.price * (1.0 + state.faults.offset_percent / 100.0)))
    }

    /// Moves every price of this instance by `percent`.
    pub fn set_offset_percent(&self, percent: f64) {
        self.shared.lock().faults.offset_percent = percent;
    }

    /// Freezes or unfreezes prices.
    pub fn set_frozen(&self, frozen: bool) {
        self.shared.lock_market().faults.frozen = frozen;
    }

    /// Share of authorised requests answered 500/503.
    pub fn set_error_rate(&self, rate: f64) {
        self.shared.lock().faults.error_rate = rate.clamp(0.0, 1.0);
    }

    /// Delay added before every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().faults.latency = latency;
    }

    /// Answers price requests `200 {"success": false}` while `true`.
    pub fn set_unsuccessful(&self, unsuccessful: bool) {
        self.shared.lock().faults.unsuccessful = unsuccessful;
    }

    /// Requests per second allowed per key (`None`: unlimited).
    pub fn set_rate_limit(&self, per_second: Option<u32>) {
        self.shared.lock().faults.rate_limit_per_sec = per_second.filter(|n| *n > 0);
    }

    /// Answers these addresses `null` (replaces the previous set).
    pub fn set_null_tokens<I: IntoIterator<Item = S>, S: Into<String>>(&self, addresses: I) {
        self.shared.lock().faults.null_tokens = addresses.into_iter().map(Into::into).collect();
    }

    /// Leaves these addresses out of answers (replaces the previous set).
    pub fn set_missing_tokens<I: IntoIterator<Item = S>, S: Into<String>>(&self, addresses: I) {
        self.shared.lock().faults.missing_tokens = addresses.into_iter().map(Into::into).collect();
    }

    /// Every authorised request with `key` fails with `failure` (`None`: answers again), while
    /// other keys are served: one provider's Birdeye calls fail.
    pub fn set_failing_key(&self, key: impl Into<String>, failure: Option<Failure>) {
        let mut state = self.shared.lock();
        let key = key.into();
        match failure {
            Some(failure) => state.faults.failing_keys.insert(key, failure),
            None => state.faults.failing_keys.remove(&key),
        };
    }

    /// The next `count` authorised requests fail with `failure`.
    pub fn fail_next(&self, count: usize, failure: Failure) {
        let mut state = self.shared.lock();
        state.faults.fail_next.extend(std::iter::repeat_n(failure, count));
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // The server task never panics by itself; a join error can only be a panic in a
            // handler, which the test that caused it reports on its own.
            let _ = task.await;
        }
    }
}

impl Drop for SimulatorHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
