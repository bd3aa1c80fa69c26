//! The Birdeye price API client (BIRDEYE.md), usable on its own by any Rust program.
//!
//! Every request carries `X-API-KEY`, `x-chain`, `accept: application/json` and a `User-Agent`.
//! Multi-price requests are cut into chunks of at most [`MAX_ADDRESSES_PER_REQUEST`] addresses,
//! one chain per request. Network errors, timeouts, 429 and 5xx are retried at most
//! [`RetryPolicy::max_retries`] times with exponential backoff and jitter, waiting at least what
//! `Retry-After` asks; 400, 401 and 403 are never retried. A `200` whose body says
//! `"success": false` is an error.

mod key;
mod parse;

use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{RequestBuilder, StatusCode};
use url::Url;

pub use key::ApiKey;
pub use parse::{
    MissingReason, MissingToken, PriceSet, TokenPrice, parse_multi_price_body, parse_price_body,
};

use crate::assets::Asset;
use crate::telemetry;

/// Birdeye's public API.
pub const DEFAULT_BASE_URL: &str = "https://public-api.birdeye.so";
/// Most addresses Birdeye accepts in one multi-price request.
pub const MAX_ADDRESSES_PER_REQUEST: usize = 100;
/// Largest answer body read (a 100-token answer is about 30 KiB).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// `User-Agent` sent unless configured otherwise.
const USER_AGENT: &str = concat!("mesh-provider/", env!("CARGO_PKG_VERSION"));

/// What went wrong talking to Birdeye. The API key never appears in these messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 401: the key is missing or not valid.
    #[error("Invalid API key")]
    InvalidKey,
    /// 403: the key is blacklisted, not whitelisted, or its plan is too low.
    #[error("API key refused by Birdeye (403): {message}")]
    Forbidden {
        /// Birdeye's message.
        message: String,
    },
    /// 429: too many requests, still so after the retries.
    #[error("rate limited by Birdeye (429){}", retry_after_text(.retry_after))]
    RateLimited {
        /// What `Retry-After` asked for, if it was sent.
        retry_after: Option<Duration>,
    },
    /// 400: a bad address, an unsupported chain, or credits used up.
    #[error("Birdeye rejected the request (400): {message}")]
    BadRequest {
        /// Birdeye's message.
        message: String,
    },
    /// 5xx, still so after the retries.
    #[error("Birdeye server error ({status})")]
    Server {
        /// The HTTP status.
        status: u16,
    },
    /// A status Birdeye does not document (404, 405, ...).
    #[error("unexpected HTTP status {status} from Birdeye: {message}")]
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
        /// The body's message, if any.
        message: String,
    },
    /// 200 with `"success": false`.
    #[error("Birdeye answered success=false: {message}")]
    Unsuccessful {
        /// Birdeye's message.
        message: String,
    },
    /// No answer within the request timeout, still so after the retries.
    #[error("Birdeye request timed out after {0:?}")]
    Timeout(Duration),
    /// Connecting or reading failed, still so after the retries.
    #[error("network error talking to Birdeye: {0}")]
    Network(#[source] reqwest::Error),
    /// The answer is not the JSON Birdeye documents.
    #[error("cannot read Birdeye's answer: {reason}")]
    Decode {
        /// What was wrong.
        reason: String,
    },
    /// The client could not be built (bad base URL, TLS set-up).
    #[error("invalid Birdeye client configuration: {reason}")]
    Config {
        /// What was wrong.
        reason: String,
    },
}

fn retry_after_text(retry_after: &Option<Duration>) -> String {
    retry_after.map(|d| format!(", retry after {} s", d.as_secs_f64())).unwrap_or_default()
}

impl Error {
    /// `true` for the failures worth another try: network errors, timeouts, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::RateLimited { .. }
                | Error::Server { .. }
                | Error::Timeout(_)
                | Error::Network(_)
        )
    }

    /// `true` when the key itself is refused (401/403): provider mode must stop.
    pub fn is_key_rejected(&self) -> bool {
        matches!(self, Error::InvalidKey | Error::Forbidden { .. })
    }

    /// A short label for metrics (`invalid_key`, `rate_limited`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidKey => "invalid_key",
            Error::Forbidden { .. } => "forbidden",
            Error::RateLimited { .. } => "rate_limited",
            Error::BadRequest { .. } => "bad_request",
            Error::Server { .. } => "server",
            Error::UnexpectedStatus { .. } => "unexpected_status",
            Error::Unsuccessful { .. } => "unsuccessful",
            Error::Timeout(_) => "timeout",
            Error::Network(_) => "network",
            Error::Decode { .. } => "decode",
            Error::Config { .. } => "config",
        }
    }
}

/// Result of the client's calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How failed requests are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try (3: at most four requests).
    pub max_retries: u32,
    /// Backoff before the first retry; it doubles each time, plus up to half again of jitter.
    pub initial_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// A `Retry-After` longer than this is not waited for: the call fails with
    /// [`Error::RateLimited`] at once.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(3),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self { max_retries: 0, ..Self::default() }
    }

    /// The wait before retry number `retry` (0-based): `initial x 2^retry`, plus up to half of
    /// that again at random, at most `max_backoff`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let nominal = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry.min(16)))
            .min(self.max_backoff);
        let jitter = nominal.mul_f64(rand::thread_rng().gen_range(0.0..=0.5));
        (nominal + jitter).min(self.max_backoff)
    }
}

/// Which form of the multi-price call to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MultiPriceMethod {
    /// `GET /defi/multi_price?list_address=a,b,c`.
    #[default]
    Get,
    /// `POST /defi/multi_price` with `{"list_address": "a,b,c"}`.
    Post,
}

/// Client settings; the defaults talk to Birdeye's public API.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL (`MESH_BIRDEYE_BASE_URL`), default [`DEFAULT_BASE_URL`].
    pub base_url: String,
    /// Time allowed for one request, answer body included.
    pub request_timeout: Duration,
    /// Time allowed for connecting.
    pub connect_timeout: Duration,
    /// Retries of failed requests.
    pub retry: RetryPolicy,
    /// GET or POST for multi-price calls.
    pub multi_price_method: MultiPriceMethod,
    /// `User-Agent` header (some clients got 403 without one).
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            multi_price_method: MultiPriceMethod::Get,
            user_agent: USER_AGENT.to_owned(),
        }
    }
}

/// A Birdeye API client bound to one key. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct BirdeyeClient {
    http: reqwest::Client,
    base: Url,
    /// The key as a header value marked sensitive (hidden from reqwest's and our `Debug`).
    key_header: HeaderValue,
    config: ClientConfig,
    /// The `Date` of Birdeye's last answer, for the clock check (shared by clones).
    last_date: std::sync::Arc<std::sync::Mutex<Option<ServerDate>>>,
}

/// The `Date` header of an answer: Birdeye's clock, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerDate {
    /// The date, Unix milliseconds (whole seconds).
    pub unix_ms: i64,
    /// When the answer arrived (this process's monotonic clock).
    pub received: std::time::Instant,
}

impl std::fmt::Debug for BirdeyeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BirdeyeClient")
            .field("base_url", &self.base.as_str())
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The endpoints, for metric labels and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Price,
    MultiPrice,
    Networks,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Price => "price",
            Endpoint::MultiPrice => "multi_price",
            Endpoint::Networks => "networks",
        }
    }
}

impl BirdeyeClient {
    /// A client for Birdeye's public API with default settings.
    pub fn new(key: ApiKey) -> Result<Self> {
        Self::with_config(key, ClientConfig::default())
    }

    /// A client with explicit settings.
    pub fn with_config(key: ApiKey, config: ClientConfig) -> Result<Self> {
        let base = parse_base_url(&config.base_url)?;
        let mut key_header = HeaderValue::from_str(key.expose()).map_err(|_| Error::Config {
            reason: "API key holds characters a header cannot carry".into(),
        })?;
        key_header.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(config.user_agent.clone())
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| Error::Config { reason: format!("HTTP client: {e}") })?;
        Ok(Self { http, base, key_header, config, last_date: Default::default() })
    }

    /// The settings in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Checks the key with a cheap authorised call (the chain list): `Ok` when Birdeye accepts
    /// it, [`Error::InvalidKey`] (401) or [`Error::Forbidden`] (403) when not.
    pub async fn validate_key(&self) -> Result<()> {
        self.networks().await.map(|_| ())
    }

    /// `GET /defi/networks`: the chains Birdeye serves.
    pub async fn networks(&self) -> Result<Vec<String>> {
        let url = self.endpoint_url("defi/networks")?;
        let body = self.send(Endpoint::Networks, "solana", || self.http.get(url.clone())).await?;
        let data = parse::envelope_data(&body)?;
        let Some(data) = data else { return Ok(Vec::new()) };
        serde_json::from_str(data.get())
            .map_err(|e| Error::Decode { reason: format!("networks data is not a list: {e}") })
    }

    /// `GET /defi/price`: one token's price, or `Ok(None)` when Birdeye has none for it.
    pub async fn price(&self, chain: &str, address: &str) -> Result<Option<TokenPrice>> {
        let mut url = self.endpoint_url("defi/price")?;
        url.query_pairs_mut().append_pair("address", address);
        let body = self.send(Endpoint::Price, chain, || self.http.get(url.clone())).await?;
        parse_price_body(chain, address, &body, unix_ms_now())
    }

    /// Prices of `addresses` on `chain`, in chunks of at most [`MAX_ADDRESSES_PER_REQUEST`],
    /// with the configured [`MultiPriceMethod`]. Duplicates are asked for once.
    pub async fn multi_price<S: AsRef<str>>(
        &self,
        chain: &str,
        addresses: &[S],
    ) -> Result<PriceSet> {
        self.multi_price_with(self.config.multi_price_method, chain, addresses).await
    }

    /// Like [`BirdeyeClient::multi_price`] with an explicit method.
    pub async fn multi_price_with<S: AsRef<str>>(
        &self,
        method: MultiPriceMethod,
        chain: &str,
        addresses: &[S],
    ) -> Result<PriceSet> {
        let mut unique: Vec<String> = Vec::with_capacity(addresses.len());
        for address in addresses {
            let address = address.as_ref();
            if !unique.iter().any(|a| a == address) {
                unique.push(address.to_owned());
            }
        }
        let url = self.endpoint_url("defi/multi_price")?;
        let mut set = PriceSet::default();
        for chunk in unique.chunks(MAX_ADDRESSES_PER_REQUEST) {
            let list = chunk.join(",");
            let body = match method {
                MultiPriceMethod::Get => {
                    let mut url = url.clone();
                    url.query_pairs_mut().append_pair("list_address", &list);
                    self.send(Endpoint::MultiPrice, chain, || self.http.get(url.clone())).await?
                }
                MultiPriceMethod::Post => {
                    let payload = serde_json::json!({ "list_address": list });
                    self.send(Endpoint::MultiPrice, chain, || {
                        self.http.post(url.clone()).json(&payload)
                    })
                    .await?
                }
            };
            set.extend(parse_multi_price_body(chain, chunk, &body, unix_ms_now())?);
        }
        Ok(set)
    }

    /// Prices of `assets` over all their chains: one series of multi-price requests per chain,
    /// chains in the order they first appear.
    pub async fn prices(&self, assets: &[Asset]) -> Result<PriceSet> {
        let mut chains: Vec<&str> = Vec::new();
        for asset in assets {
            if !chains.contains(&asset.chain.as_str()) {
                chains.push(&asset.chain);
            }
        }
        let mut set = PriceSet::default();
        for chain in chains {
            let addresses: Vec<&str> =
                assets.iter().filter(|a| a.chain == chain).map(|a| a.address.as_str()).collect();
            set.extend(self.multi_price(chain, &addresses).await?);
        }
        Ok(set)
    }

    fn endpoint_url(&self, path: &str) -> Result<Url> {
        self.base.join(path).map_err(|e| Error::Config { reason: format!("endpoint {path}: {e}") })
    }

    /// Sends with retries; returns the body of a 200.
    async fn send(
        &self,
        endpoint: Endpoint,
        chain: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Vec<u8>> {
        let mut retry = 0;
        loop {
            let started = Instant::now();
            let outcome = self.send_once(build(), chain).await;
            metrics::histogram!(
                telemetry::API_LATENCY_SECONDS,
                "endpoint" => endpoint.label(),
                "outcome" => match &outcome { Ok(_) => "ok", Err(e) => e.kind() },
            )
            .record(started.elapsed().as_secs_f64());
            let error = match outcome {
                Ok(body) => return Ok(body),
                Err(error) if error.is_retryable() && retry < self.config.retry.max_retries => {
                    error
                }
                Err(error) => return Err(error),
            };
            let backoff = self.config.retry.backoff(retry);
            let wait = match &error {
                Error::RateLimited { retry_after: Some(asked) } => {
                    if *asked > self.config.retry.max_retry_after {
                        return Err(error);
                    }
                    backoff.max(*asked)
                }
                _ => backoff,
            };
            retry += 1;
            tracing::warn!(
                endpoint = endpoint.label(),
                chain,
                error = %error,
                retry,
                wait_ms = wait.as_millis() as u64,
                "Birdeye request failed; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn send_once(&self, request: RequestBuilder, chain: &str) -> Result<Vec<u8>> {
        let chain_header = HeaderValue::from_str(chain).map_err(|_| Error::Config {
            reason: format!("chain {chain:?} is not a header value"),
        })?;
        let response = request
            .header("X-API-KEY", self.key_header.clone())
            .header("x-chain", chain_header)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(parse_retry_after);
        if let Some(unix_ms) = response
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            let date = ServerDate {
                unix_ms: unix_ms.as_millis() as i64,
                received: std::time::Instant::now(),
            };
            *self.last_date.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(date);
        }
        let body = read_body(response).await.map_err(|e| match e {
            BodyError::Transport(e) => self.transport_error(e),
            BodyError::TooLarge => {
                Error::Decode { reason: format!("answer is larger than {MAX_BODY_BYTES} bytes") }
            }
        })?;
        let message = || parse::error_message(&body).unwrap_or_else(|| "(no message)".into());
        match status {
            StatusCode::OK => Ok(body),
            StatusCode::BAD_REQUEST => Err(Error::BadRequest { message: message() }),
            StatusCode::UNAUTHORIZED => Err(Error::InvalidKey),
            StatusCode::FORBIDDEN => Err(Error::Forbidden { message: message() }),
            StatusCode::TOO_MANY_REQUESTS => {
                metrics::counter!(telemetry::RATE_LIMITED_TOTAL).increment(1);
                Err(Error::RateLimited { retry_after })
            }
            s if s.is_server_error() => Err(Error::Server { status: s.as_u16() }),
            s => Err(Error::UnexpectedStatus { status: s.as_u16(), message: message() }),
        }
    }

    /// The `Date` of the last answer Birdeye gave (any status), if it sent one.
    pub fn last_server_date(&self) -> Option<ServerDate> {
        *self.last_date.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn transport_error(&self, error: reqwest::Error) -> Error {
        if error.is_timeout() {
            Error::Timeout(self.config.request_timeout)
        } else {
            // reqwest's message names the URL (base, path, addresses), never a header.
            Error::Network(error)
        }
    }
}

enum BodyError {
    Transport(reqwest::Error),
    TooLarge,
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The wall clock in Unix milliseconds.
pub(crate) fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `Retry-After` as seconds or as an HTTP date.
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn parse_base_url(base: &str) -> Result<Url> {
    let mut url = Url::parse(base)
        .map_err(|e| Error::Config { reason: format!("base URL {base:?}: {e}") })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::Config { reason: format!("base URL {base:?} is not http(s)") });
    }
    // `join` replaces the last path segment unless the path ends with '/'.
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_between_half_a_second_and_three() {
        let policy = RetryPolicy::default();
        for _ in 0..200 {
            let first = policy.backoff(0);
            assert!((Duration::from_millis(500)..=Duration::from_millis(750)).contains(&first));
            let second = policy.backoff(1);
            assert!((Duration::from_millis(1000)..=Duration::from_millis(1500)).contains(&second));
            assert!(policy.backoff(2) >= Duration::from_secs(2));
            assert!(policy.backoff(2) <= Duration::from_secs(3));
            assert_eq!(policy.backoff(10), Duration::from_secs(3));
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after(&HeaderValue::from_static("7")), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let date = HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap();
        let parsed = parse_retry_after(&date).unwrap();
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn base_urls_keep_their_path() {
        let url = parse_base_url("http://127.0.0.1:8787/birdeye").unwrap();
        assert_eq!(
            url.join("defi/price").unwrap().as_str(),
            "http://127.0.0.1:8787/birdeye/defi/price"
        );
        let url = parse_base_url(DEFAULT_BASE_URL).unwrap();
        assert_eq!(
            url.join("defi/networks").unwrap().as_str(),
            "https://public-api.birdeye.so/defi/networks"
        );
        assert!(parse_base_url("ftp://x").is_err());
        assert!(parse_base_url("not a url").is_err());
    }

    #[test]
    fn retry_classification() {
        assert!(Error::Server { status: 503 }.is_retryable());
        assert!(Error::RateLimited { retry_after: None }.is_retryable());
        assert!(Error::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!Error::InvalidKey.is_retryable());
        assert!(!Error::BadRequest { message: String::new() }.is_retryable());
        assert!(!Error::Unsuccessful { message: String::new() }.is_retryable());
        assert!(Error::InvalidKey.is_key_rejected());
        assert_eq!(Error::InvalidKey.to_string(), "Invalid API key");
    }

    #[test]
    fn debug_of_a_client_hides_the_key() {
        let client = BirdeyeClient::new(ApiKey::new("sk-secret-value")).unwrap();
        let debug = format!("{client:?}");
        assert!(!debug.contains("sk-secret-value"), "{debug}");
    }
}
