//! The HTTP side: routes, the checks every request goes through (key, rate limit, injected
//! faults), and the answer bodies of BIRDEYE.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::market::CHAINS;
use crate::simulator::{Endpoint, RequestRecord, Shared, State};

/// Most addresses one multi-price request may carry.
pub const MAX_ADDRESSES: usize = 100;

type SharedState = Arc<Shared>;

pub(crate) fn router(shared: SharedState) -> Router {
    Router::new()
        .route("/defi/price", get(price))
        .route("/defi/multi_price", get(multi_price_get).post(multi_price_post))
        .route("/defi/networks", get(networks))
        .route("/sim/stats", get(stats))
        .fallback(not_found)
        .with_state(shared)
}

/// What a handler decided, computed under the lock and sent after the injected latency.
struct Answer {
    status: StatusCode,
    body: String,
    retry_after: Option<u64>,
}

impl Answer {
    fn ok(body: String) -> Self {
        Self { status: StatusCode::OK, body, retry_after: None }
    }

    fn error(status: StatusCode, message: &str) -> Self {
        let body = serde_json::json!({ "success": false, "message": message }).to_string();
        Self { status, body, retry_after: None }
    }
}

/// The request as far as the shared checks need it.
struct Request<'a> {
    endpoint: Endpoint,
    headers: &'a HeaderMap,
    query: &'a HashMap<String, String>,
    /// Addresses asked for, or why the request is malformed.
    addresses: Result<Vec<String>, String>,
}

async fn price(
    AxumState(shared): AxumState<SharedState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let addresses = match query.get("address").map(|a| a.trim()) {
        Some(a) if !a.is_empty() => Ok(vec![a.to_owned()]),
        _ => Err("address is required".to_owned()),
    };
    let request =
        Request { endpoint: Endpoint::Price, headers: &headers, query: &query, addresses };
    respond(&shared, request).await
}

async fn multi_price_get(
    AxumState(shared): AxumState<SharedState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let addresses = split_list(query.get("list_address").map(String::as_str));
    let request =
        Request { endpoint: Endpoint::MultiPrice, headers: &headers, query: &query, addresses };
    respond(&shared, request).await
}

#[derive(Deserialize)]
struct MultiPriceBody {
    list_address: Option<String>,
}

async fn multi_price_post(
    AxumState(shared): AxumState<SharedState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let addresses = match serde_json::from_slice::<MultiPriceBody>(&body) {
        Ok(parsed) => split_list(parsed.list_address.as_deref()),
        Err(e) => Err(format!("body is not valid JSON: {e}")),
    };
    let request =
        Request { endpoint: Endpoint::MultiPrice, headers: &headers, query: &query, addresses };
    respond(&shared, request).await
}

async fn networks(AxumState(shared): AxumState<SharedState>, headers: HeaderMap) -> Response {
    let query = HashMap::new();
    let request = Request {
        endpoint: Endpoint::Networks,
        headers: &headers,
        query: &query,
        addresses: Ok(vec![]),
    };
    respond(&shared, request).await
}

async fn stats(AxumState(shared): AxumState<SharedState>) -> Response {
    let stats = shared.lock().stats.clone();
    axum::Json(stats).into_response()
}

async fn not_found() -> Response {
    let answer = Answer::error(StatusCode::NOT_FOUND, "Not found");
    (answer.status, json_headers(), answer.body).into_response()
}

fn split_list(list: Option<&str>) -> Result<Vec<String>, String> {
    let list = list.unwrap_or("");
    let addresses: Vec<String> =
        list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
    if addresses.is_empty() {
        return Err("list_address is required".to_owned());
    }
    Ok(addresses)
}

/// Base58 (Solana, ...) or 0x-hex (EVM) shaped, at most 64 characters.
fn plausible_address(address: &str) -> bool {
    !address.is_empty() && address.len() <= 64 && address.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn json_headers() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"))]
}

async fn respond(shared: &Shared, request: Request<'_>) -> Response {
    let (answer, latency) = {
        let mut state = shared.lock_market();
        let answer = decide(&mut state, &request);
        let key = key_label(request.headers);
        let chain = chain_of(request.headers);
        let tokens = request.addresses.as_ref().map(Vec::len).unwrap_or(0);
        record(&mut state, key, request.endpoint, chain, tokens, answer.status.as_u16());
        (answer, state.faults.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut response = (answer.status, json_headers(), answer.body).into_response();
    if let Some(secs) = answer.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

fn key_label(headers: &HeaderMap) -> String {
    match headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        Some(key) if !key.is_empty() => key.to_owned(),
        _ => "(none)".to_owned(),
    }
}

fn chain_of(headers: &HeaderMap) -> String {
    headers.get("x-chain").and_then(|v| v.to_str().ok()).unwrap_or("solana").to_owned()
}

fn record(
    state: &mut State,
    key: String,
    endpoint: Endpoint,
    chain: String,
    tokens: usize,
    status: u16,
) {
    state.stats.total_requests += 1;
    let counters = state.stats.keys.entry(key.clone()).or_default();
    counters.requests += 1;
    match endpoint {
        Endpoint::Price => counters.price += 1,
        Endpoint::MultiPrice => counters.multi_price += 1,
        Endpoint::Networks => counters.networks += 1,
    }
    counters.tokens_requested += tokens as u64;
    *counters.by_status.entry(status).or_default() += 1;
    if state.log_capacity > 0 {
        if state.log.len() >= state.log_capacity {
            state.log.pop_front();
        }
        let at_unix_ms = unix_ms();
        state.log.push_back(RequestRecord { at_unix_ms, key, endpoint, chain, tokens, status });
    }
}

fn unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The checks in the order a real API gateway makes them, then the answer.
fn decide(state: &mut State, request: &Request<'_>) -> Answer {
    let key = request.headers.get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("");
    if state.forbidden_keys.contains(key) {
        return Answer::error(StatusCode::FORBIDDEN, "Forbidden: API key is not allowed");
    }
    let accepted =
        !key.is_empty() && (state.accepted_keys.is_empty() || state.accepted_keys.contains(key));
    if !accepted {
        return Answer::error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    if let Some(limit) = state.faults.rate_limit_per_sec
        && let Some(retry_after) = over_limit(state, key, limit)
    {
        let mut answer = Answer::error(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
        answer.retry_after = Some(retry_after);
        return answer;
    }
    let failure = state.faults.failing_keys.get(key).copied();
    if let Some(failure) = failure.or_else(|| state.faults.fail_next.pop_front()) {
        let status =
            StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = match status.as_u16() {
            400 => "Compute units usage limit exceeded",
            429 => "Too many requests",
            _ => "Internal server error",
        };
        let mut answer = Answer::error(status, message);
        answer.retry_after = failure.retry_after_secs;
        return answer;
    }
    if state.faults.error_rate > 0.0 && state.rng.gen_bool(state.faults.error_rate) {
        return if state.rng.gen_bool(0.5) {
            Answer::error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
        } else {
            Answer::error(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable")
        };
    }
    let chain = chain_of(request.headers);
    if !CHAINS.contains(&chain.as_str()) {
        return Answer::error(StatusCode::BAD_REQUEST, &format!("Chain {chain} is not supported"));
    }
    if request.endpoint == Endpoint::Networks {
        let body = serde_json::json!({ "success": true, "data": CHAINS }).to_string();
        return Answer::ok(body);
    }
    let addresses = match &request.addresses {
        Ok(addresses) => addresses,
        Err(message) => return Answer::error(StatusCode::BAD_REQUEST, message),
    };
    if addresses.len() > MAX_ADDRESSES {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            &format!("list_address has {} addresses; at most {MAX_ADDRESSES}", addresses.len()),
        );
    }
    if let Some(bad) = addresses.iter().find(|a| !plausible_address(a)) {
        return Answer::error(StatusCode::BAD_REQUEST, &format!("Invalid address {bad}"));
    }
    if state.faults.unsuccessful {
        let body = serde_json::json!({ "success": false, "message": "Failed to get price" });
        return Answer::ok(body.to_string());
    }
    let options = QuoteOptions::from_query(request.query);
    let answer = match request.endpoint {
        Endpoint::Price => single_answer(state, &chain, &addresses[0], options),
        _ => multi_answer(state, &chain, addresses, options),
    };
    match answer {
        Ok(body) => Answer::ok(body),
        Err(e) => Answer::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Fixed one-second windows per key; returns the `Retry-After` seconds when over the limit.
fn over_limit(state: &mut State, key: &str, limit: u32) -> Option<u64> {
    let now = Instant::now();
    let window = Duration::from_secs(1);
    let entry = state.limiter.entry(key.to_owned()).or_insert((now, 0));
    if now.duration_since(entry.0) >= window {
        *entry = (now, 0);
    }
    if entry.1 >= limit {
        let left = window.saturating_sub(now.duration_since(entry.0));
        return Some(left.as_secs_f64().ceil().max(1.0) as u64);
    }
    entry.1 += 1;
    None
}

#[derive(Clone, Copy)]
struct QuoteOptions {
    include_liquidity: bool,
    check_liquidity: Option<f64>,
}

impl QuoteOptions {
    fn from_query(query: &HashMap<String, String>) -> Self {
        Self {
            include_liquidity: query.get("include_liquidity").is_some_and(|v| v == "true"),
            check_liquidity: query.get("check_liquidity").and_then(|v| v.parse().ok()),
        }
    }
}

/// One token's `data` object.
#[derive(Serialize)]
struct PriceData {
    value: Option<Box<RawValue>>,
    #[serde(rename = "updateUnixTime")]
    update_unix_time: i64,
    #[serde(rename = "updateHumanTime")]
    update_human_time: String,
    #[serde(rename = "priceChange24h")]
    price_change_24h: Box<RawValue>,
    #[serde(rename = "priceInNative", skip_serializing_if = "Option::is_none")]
    price_in_native: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    liquidity: Option<Box<RawValue>>,
    #[serde(rename = "isScaledUiToken")]
    is_scaled_ui_token: bool,
}

#[derive(Serialize)]
struct Success<T: Serialize> {
    success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
}

enum Lookup {
    Found(Box<PriceData>),
    Null,
    Missing,
}

fn number(state: &State, value: f64) -> Result<Box<RawValue>, serde_json::Error> {
    RawValue::from_string(state.number_style.format(value))
}

fn lookup(
    state: &State,
    chain: &str,
    address: &str,
    options: QuoteOptions,
) -> Result<Lookup, serde_json::Error> {
    if state.faults.missing_tokens.contains(address) {
        return Ok(Lookup::Missing);
    }
    if state.faults.null_tokens.contains(address) {
        return Ok(Lookup::Null);
    }
    let Some(quote) = state.market.quote(chain, address) else {
        return Ok(match state.unknown {
            crate::UnknownTokens::Null => Lookup::Null,
            crate::UnknownTokens::Missing => Lookup::Missing,
        });
    };
    let factor = 1.0 + state.faults.offset_percent / 100.0;
    let price = quote.price * factor;
    let below_liquidity = options.check_liquidity.is_some_and(|min| quote.liquidity < min);
    let now = time::OffsetDateTime::now_utc();
    let human = now
        .format(time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"))
        .unwrap_or_default();
    Ok(Lookup::Found(Box::new(PriceData {
        value: if below_liquidity { None } else { Some(number(state, price)?) },
        update_unix_time: now.unix_timestamp().saturating_sub(
            state
                .faults
                .update_lag_secs
                .iter()
                .find(|(a, _)| a.eq_ignore_ascii_case(address))
                .map_or(0, |(_, lag)| *lag as i64),
        ),
        update_human_time: human,
        // Four decimals, as Birdeye gives them; a huge change stays as it is.
        price_change_24h: number(state, round_change(quote.change_24h_percent))?,
        price_in_native: match quote.native_price {
            Some(native) => Some(number(state, price / (native * factor))?),
            None => None,
        },
        liquidity: if options.include_liquidity {
            Some(number(state, quote.liquidity)?)
        } else {
            None
        },
        is_scaled_ui_token: false,
    })))
}

fn round_change(percent: f64) -> f64 {
    let rounded = (percent * 1e4).round() / 1e4;
    if rounded.is_finite() { rounded } else { percent }
}

fn single_answer(
    state: &State,
    chain: &str,
    address: &str,
    options: QuoteOptions,
) -> Result<String, serde_json::Error> {
    let data = match lookup(state, chain, address, options)? {
        Lookup::Found(data) => Some(Some(data)),
        Lookup::Null => Some(None),
        Lookup::Missing => None,
    };
    serde_json::to_string(&Success { success: true, data })
}

fn multi_answer(
    state: &State,
    chain: &str,
    addresses: &[String],
    options: QuoteOptions,
) -> Result<String, serde_json::Error> {
    let mut data: BTreeMap<&str, Option<Box<PriceData>>> = BTreeMap::new();
    for address in addresses {
        match lookup(state, chain, address, options)? {
            Lookup::Found(found) => {
                data.insert(address, Some(found));
            }
            Lookup::Null => {
                data.insert(address, None);
            }
            Lookup::Missing => {}
        }
    }
    serde_json::to_string(&Success { success: true, data: Some(data) })
}
