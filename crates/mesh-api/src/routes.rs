//! The router: which handler answers which route, and the layers around them (authentication,
//! origin and content-type checks of POST endpoints, body limit, timeout, metrics).

mod page;
mod rest;
mod streams;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

use crate::Config;
use crate::envelope::ApiError;
use crate::metrics::Metrics;
use crate::node::NodeLink;

/// The TCP peer of the connection a request came on (set by the accept loop).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub std::net::SocketAddr);

/// What every handler can reach.
pub(crate) struct AppState {
    pub link: Arc<NodeLink>,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// SHA-256 of the API token: comparing digests takes the same time whatever the length.
    token_digest: Option<[u8; 32]>,
    /// Fires at shutdown: streams end so that the server can stop.
    pub cancel: CancellationToken,
}

impl AppState {
    pub fn new(
        link: Arc<NodeLink>,
        metrics: Arc<Metrics>,
        config: Config,
        cancel: CancellationToken,
    ) -> Self {
        let token_digest = config.api_token.as_deref().map(|t| Sha256::digest(t.as_bytes()).into());
        Self { link, metrics, config, token_digest, cancel }
    }

    fn authorised(&self, authorization: Option<&str>) -> bool {
        let Some(expected) = &self.token_digest else { return true };
        let Some((scheme, token)) = authorization.and_then(|v| v.trim().split_once(' ')) else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        scheme.eq_ignore_ascii_case("bearer") && bool::from(given.ct_eq(expected))
    }
}

/// The whole application.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let guarded = Router::new()
        .route("/api/mesh/provider/enable", post(rest::enable))
        .route("/api/mesh/provider/disable", post(rest::disable))
        // The token is checked first (the outer layer): without it, nothing else is said.
        .route_layer(middleware::from_fn_with_state(state.clone(), refuse_cross_site))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let rest = Router::new()
        .route("/api/mesh/prices", get(rest::prices))
        .route("/api/mesh/prices/{asset}", get(rest::asset))
        .route("/api/mesh/prices/{asset}/quotes", get(rest::quotes))
        .route("/api/mesh/network/status", get(rest::network_status))
        .route("/api/mesh/provider/status", get(rest::provider_status))
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .route("/metrics", get(rest::metrics))
        .route("/", get(page::index))
        .route("/assets/app.js", get(page::script))
        .route("/assets/style.css", get(page::style))
        .route("/openapi.json", get(page::openapi))
        .merge(guarded)
        // A client that is slow to send its request gets 408, not a server error.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.config.request_timeout,
        ));
    let streams = Router::new()
        .route("/api/mesh/stream", get(streams::sse))
        .route("/api/mesh/ws", get(streams::ws));
    Router::new()
        .merge(rest)
        .merge(streams)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), refuse_announced_oversize))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts and times every request by its route pattern (never the raw path: bounded labels).
async fn track(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    app.metrics.request(&route, method.as_str(), response.status().as_u16(), seconds);
    response
}

/// A body announced (`Content-Length`) larger than the limit gets its 413 at once: the body
/// limit alone counts bytes as they arrive, so a client that announced a huge body and sent
/// none of it held its connection until the request timeout (and then got a 408).
async fn refuse_announced_oversize(
    State(app): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(len) if len > app.config.body_limit as u64 => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body: {len} bytes announced; at most {} accepted",
                app.config.body_limit
            ),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

/// What a browser page of another site could send without a CORS preflight: a form or a
/// `text/plain` fetch. State-changing endpoints refuse it, so a page an operator happens to
/// visit cannot switch their node into provider mode with a key of its own (or off):
///
/// - an `Origin` header (browsers send it with every POST, same-origin included) must be the
///   API's own (its `Host`) or one of `MESH_API_ALLOWED_ORIGINS`, else 403;
/// - a body must be `Content-Type: application/json` (which a cross-site page can only send
///   after a preflight this server never grants), else 415. A POST without a body and
///   without a type (`curl -X POST .../disable`) passes.
///
/// Programs (the guide's curl commands) send no `Origin` and a JSON body, and are unaffected.
async fn refuse_cross_site(
    State(app): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(origin, host, &app.config.allowed_origins) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "cross-origin request from {:?} refused; allow the origin with \
                     MESH_API_ALLOWED_ORIGINS",
                    origin.chars().take(100).collect::<String>()
                ),
            )
            .into_response();
        }
    }
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"));
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    let json = content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json && (content_type.is_some() || has_body) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type {:?} is not accepted; send the body as application/json",
                content_type.unwrap_or("(none)").chars().take(100).collect::<String>()
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// `true` when `origin` is the API's own (the request's `Host`; its port is compared only when
/// `Host` has one, since reverse proxies pass `$host` without it) or one of `allowed`.
fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    let origin = origin.trim().trim_end_matches('/');
    if allowed.iter().any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Some(authority) =
        origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"))
    else {
        // `null` (sandboxed frames, file: pages) and anything malformed.
        return false;
    };
    let Some(host) = host.map(str::trim).filter(|h| !h.is_empty()) else { return false };
    if authority.eq_ignore_ascii_case(host) {
        return true;
    }
    let has_port = |a: &str| {
        a.rsplit_once(':').is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            && !a.ends_with(']')
    };
    let without_port = |a: &str| -> String {
        if has_port(a) { a.rsplit_once(':').map_or(a, |(h, _)| h).to_owned() } else { a.to_owned() }
    };
    !has_port(host) && without_port(authority).eq_ignore_ascii_case(host)
}

/// The address a stream client is counted under: the connection's peer, or, when the peer is a
/// trusted proxy, the nearest address in `X-Forwarded-For` that is not a trusted proxy itself
/// (proxies append the address they received from, so entries further left are the client's
/// own claims and may be forged).
pub(crate) fn client_address(
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[std::net::IpAddr],
) -> std::net::IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for entry in forwarded.iter().rev().take(16) {
        match entry.parse::<std::net::IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => continue,
            Ok(ip) => return ip,
            // Garbage where an address should be: no claim further left can be believed.
            Err(_) => return peer,
        }
    }
    peer
}

/// Headers a reverse proxy adds: a request carrying one came through a proxy.
const FORWARDING_HEADERS: [&str; 6] =
    ["forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "via"];

/// Whether a request from `peer` with `headers` is an operator's on the box itself: a loopback
/// peer and no forwarding header (a proxy on the same host connects from loopback too, and
/// says so in these headers; the shipped nginx site sets them).
fn is_local_operator(peer: Option<std::net::IpAddr>, headers: &axum::http::HeaderMap) -> bool {
    peer.is_some_and(|p| p.is_loopback())
        && FORWARDING_HEADERS.iter().all(|name| !headers.contains_key(*name))
}

/// With `MESH_API_TOKEN` set, the request needs `Authorization: Bearer <token>`; without it,
/// the request must come from the box itself ([`is_local_operator`]).
async fn authenticate(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if app.token_digest.is_none() {
        let peer = request.extensions().get::<Peer>().map(|p| p.0.ip());
        if is_local_operator(peer, request.headers()) {
            return next.run(request).await;
        }
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "without MESH_API_TOKEN this endpoint is open only to a client on the API's own \
             host, not through a proxy: set MESH_API_TOKEN and send Authorization: Bearer \
             <MESH_API_TOKEN>",
        )
        .into_response();
    }
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if app.authorised(header) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token (Authorization: Bearer <MESH_API_TOKEN>)",
        )
        .into_response()
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_apis_own_origin_and_allowed_ones_pass() {
        let allowed = vec!["https://dash.example".to_owned()];
        for (origin, host, ok) in [
            ("http://127.0.0.1:8080", Some("127.0.0.1:8080"), true),
            ("https://mesh.example.com", Some("mesh.example.com"), true),
            // nginx passes `$host`, without the port the browser used.
            ("https://mesh.example.com:8443", Some("mesh.example.com"), true),
            ("http://127.0.0.1:9999", Some("127.0.0.1:8080"), false),
            ("http://[::1]:8080", Some("[::1]:8080"), true),
            ("http://[::1]:9999", Some("[::1]:8080"), false),
            ("https://evil.example", Some("mesh.example.com"), false),
            ("https://mesh.example.com.evil.example", Some("mesh.example.com"), false),
            ("null", Some("mesh.example.com"), false),
            ("http://mesh.example.com", None, false),
            ("https://dash.example", Some("mesh.example.com"), true),
            ("https://DASH.example/", Some("mesh.example.com"), true),
        ] {
            assert_eq!(origin_allowed(origin, host, &allowed), ok, "{origin} on {host:?}");
        }
    }

    #[test]
    fn without_a_token_only_a_loopback_client_through_no_proxy_may_post() {
        use axum::http::{HeaderMap, HeaderValue};
        let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let local6: std::net::IpAddr = "::1".parse().unwrap();
        let far: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        let none = HeaderMap::new();
        assert!(is_local_operator(Some(local), &none));
        assert!(is_local_operator(Some(local6), &none));
        assert!(!is_local_operator(Some(far), &none));
        assert!(!is_local_operator(None, &none), "no peer known: refused");
        for name in FORWARDING_HEADERS {
            let mut proxied = HeaderMap::new();
            proxied.insert(name, HeaderValue::from_static("198.51.100.1"));
            assert!(!is_local_operator(Some(local), &proxied), "{name}");
        }
    }

    #[test]
    fn forwarded_addresses_count_only_behind_trusted_proxies() {
        let local: std::net::IpAddr =
            "127.0.0.1".parse().unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let far: std::net::IpAddr = "192.0.2.1".parse().unwrap_or(local);
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            axum::http::HeaderValue::from_static("203.0.113.9, 198.51.100.1, 127.0.0.1"),
        );
        let client = client_address(local, &headers, &[local]);
        assert_eq!(client.to_string(), "198.51.100.1");
        assert_eq!(client_address(far, &headers, &[local]), far);
        assert_eq!(client_address(local, &headers, &[]), local);
        headers.insert("x-forwarded-for", axum::http::HeaderValue::from_static("garbage"));
        assert_eq!(client_address(local, &headers, &[local]), local);
    }
}
