//! The router: which handler answers which route, and the layers around them (authentication
//! of POST endpoints, body limit, timeout, metrics).

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
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let rest = Router::new()
        .route("/api/mesh/prices", get(rest::prices))
        .route("/api/mesh/prices/{asset}", get(rest::asset))
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

/// With `MESH_API_TOKEN` set, the request needs `Authorization: Bearer <token>`.
async fn authenticate(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
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
