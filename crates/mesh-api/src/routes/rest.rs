//! The REST endpoints.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use mesh_ipc::{
    Event, NetworkStatus, PriceFilter, PriceView, ProviderStatusView, QuoteView, Request, Response,
};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::envelope::{ApiError, Data, Encoded};

type Answer<T> = Result<Data<T>, ApiError>;

/// Query of the price endpoints and streams; an empty value means no filter.
#[derive(Debug, Default, Deserialize)]
pub(super) struct PriceQuery {
    blockchain: Option<String>,
    asset: Option<String>,
}

impl PriceQuery {
    pub fn into_filter(self) -> PriceFilter {
        let keep = |v: Option<String>| v.filter(|s| !s.is_empty());
        PriceFilter { blockchain: keep(self.blockchain), asset: keep(self.asset) }
    }
}

pub(super) fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request(format!("invalid query: {}", rejection.body_text()))
}

fn body_error(rejection: BytesRejection) -> ApiError {
    ApiError::new(rejection.status(), format!("request body: {}", rejection.body_text()))
}

/// `GET /api/mesh/prices?blockchain=&asset=`
pub(super) async fn prices(
    State(app): State<Arc<AppState>>,
    query: Result<Query<PriceQuery>, QueryRejection>,
) -> Result<HttpResponse, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let filter = query.into_filter();
    if filter == PriceFilter::default() {
        return Ok(Encoded(app.link.all_prices_answer()?).into_response());
    }
    Ok(Data(app.link.prices(&filter)?).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct ChainQuery {
    blockchain: Option<String>,
}

/// `GET /api/mesh/prices/{asset}?blockchain=`: the asset on every chain that has it.
pub(super) async fn asset(
    State(app): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ChainQuery>, QueryRejection>,
) -> Answer<Vec<PriceView>> {
    let Path(asset) = path.map_err(|r| ApiError::bad_request(r.body_text()))?;
    let Query(query) = query.map_err(query_error)?;
    let filter = PriceQuery { blockchain: query.blockchain, asset: Some(asset) }.into_filter();
    let found = app.link.prices(&filter)?;
    if found.is_empty() {
        return Err(unknown_asset(filter));
    }
    Ok(Data(found))
}

/// The 404 of an asset nobody sent (on that chain, when one was asked for).
fn unknown_asset(filter: PriceFilter) -> ApiError {
    let asset = filter.asset.unwrap_or_default();
    ApiError::not_found(match filter.blockchain {
        Some(chain) => format!("unknown asset {asset} on {chain}"),
        None => format!("unknown asset {asset}"),
    })
}

/// `GET /api/mesh/prices/{asset}/quotes?blockchain=`: every provider's latest quote of the
/// asset, asked of the node itself (the snapshot holds served prices only).
pub(super) async fn quotes(
    State(app): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ChainQuery>, QueryRejection>,
) -> Answer<Vec<QuoteView>> {
    let Path(asset) = path.map_err(|r| ApiError::bad_request(r.body_text()))?;
    let Query(query) = query.map_err(query_error)?;
    let filter = PriceQuery { blockchain: query.blockchain, asset: Some(asset) }.into_filter();
    match app.link.request(&Request::GetQuotes(filter.clone())).await? {
        Response::Quotes(quotes) if quotes.is_empty() => Err(unknown_asset(filter)),
        Response::Quotes(quotes) => Ok(Data(quotes)),
        Response::Error { kind, message } => Err(ApiError::from_remote(kind, message)),
        other => Err(ApiError::from_ipc(mesh_ipc::Error::Malformed(format!(
            "expected quotes, got {other:?}"
        )))),
    }
}

/// `GET /api/mesh/network/status`
pub(super) async fn network_status(State(app): State<Arc<AppState>>) -> Answer<NetworkStatus> {
    app.link.network().map(Data)
}

/// `GET /api/mesh/provider/status`
pub(super) async fn provider_status(
    State(app): State<Arc<AppState>>,
) -> Answer<ProviderStatusView> {
    app.link.provider().map(Data)
}

#[derive(Debug, Deserialize)]
struct EnableRequest {
    api_key: String,
}

/// `POST /api/mesh/provider/enable {"api_key": "..."}`
pub(super) async fn enable(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<ProviderStatusView> {
    let body = body.map_err(body_error)?;
    let request: EnableRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(r#"invalid JSON body ({e}); expected {{"api_key": "..."}}"#))
    })?;
    // The guide's first advice for a refused key is "no extra spaces": drop them here.
    let api_key = request.api_key.trim();
    if api_key.is_empty() {
        return Err(ApiError::bad_request("api_key must not be empty"));
    }
    // The key travels in an HTTP header to Birdeye: anything else is the client's mistake
    // (found by schemathesis: it was a 503 from the node's client set-up).
    if !api_key.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(ApiError::bad_request(
            "api_key must be printable ASCII (it is sent to Birdeye in a header)",
        ));
    }
    provider_call(&app, Request::EnableProvider { api_key: api_key.to_owned() }).await
}

/// `POST /api/mesh/provider/disable` (a JSON body is ignored; so is none)
pub(super) async fn disable(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<ProviderStatusView> {
    body.map_err(body_error)?;
    provider_call(&app, Request::DisableProvider).await
}

async fn provider_call(app: &AppState, request: Request) -> Answer<ProviderStatusView> {
    match app.link.request(&request).await? {
        Response::ProviderStatus(view) => {
            // Read-your-writes: the status endpoint shows the change at once (the node's
            // own event carries the same and is conflated with it).
            app.link.apply(Event::Provider(view.clone()));
            Ok(Data(view))
        }
        Response::Error { kind, message } => Err(ApiError::from_remote(kind, message)),
        other => Err(ApiError::from_ipc(mesh_ipc::Error::Malformed(format!(
            "expected a provider status, got {other:?}"
        )))),
    }
}

#[derive(Serialize)]
pub(super) struct Health {
    status: &'static str,
}

/// `GET /healthz`: the process answers.
pub(super) async fn healthz() -> Data<Health> {
    Data(Health { status: "ok" })
}

#[derive(Serialize)]
pub(super) struct Ready {
    ready: bool,
}

/// `GET /readyz`: the subscription is live and the node answers a request.
pub(super) async fn readyz(State(app): State<Arc<AppState>>) -> Answer<Ready> {
    app.link.network()?;
    app.link.ping(Duration::from_secs(2)).await?;
    Ok(Data(Ready { ready: true }))
}

/// `GET /metrics`: Prometheus text of this process (`mesh_api_*`), followed by the node's own
/// metrics (the guide's `mesh_provider_*`, `mesh_network_*`, ...) while the node answers: the
/// node has no HTTP listener of its own, so one scrape of the API covers both.
pub(super) async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let mut text = app.metrics.render();
    if let Some(node) = app.link.node_metrics(Duration::from_secs(2)).await {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&node);
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
}
