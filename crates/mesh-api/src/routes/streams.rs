//! Server-Sent Events and WebSocket: the same events, from the same per-client queues.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, Stream, StreamExt};
use mesh_ipc::PriceFilter;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::rest::{PriceQuery, query_error};
use super::{AppState, Peer, client_address};
use crate::envelope::ApiError;
use crate::hub::{Item, Next, Refused, Subscriber};
use crate::metrics::StreamKind;

/// Largest message a WebSocket client may send (it has nothing to say but pongs).
const MAX_CLIENT_MESSAGE: usize = 4 * 1024;

/// Bytes read from a WebSocket client at a time.
const READ_CHUNK: usize = 256;

fn attach(
    app: &AppState,
    kind: StreamKind,
    filter: PriceFilter,
    peer: Option<Extension<Peer>>,
    headers: &HeaderMap,
) -> Result<Subscriber, ApiError> {
    // Requests built in-process (tests of the router) have no peer: they count as loopback.
    let peer = peer.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |Extension(Peer(addr))| addr.ip());
    let address = client_address(peer, headers, &app.config.trusted_proxies);
    app.link.subscribe(kind, filter, address).map_err(|refused| match refused {
        Refused::Full => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many stream clients; try again later",
        ),
        Refused::AddressFull => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many streams from {address}: at most {} at once \
                 (MESH_API_MAX_STREAMS_PER_ADDRESS)",
                app.config.max_streams_per_address
            ),
        ),
    })
}

/// `GET /api/mesh/stream?blockchain=&asset=`: Server-Sent Events, one per update, named by
/// type (`event: price`), with the JSON in `data:`.
pub(super) async fn sse(
    State(app): State<Arc<AppState>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    query: Result<Query<PriceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let subscriber = attach(&app, StreamKind::Sse, query.into_filter(), peer, &headers)?;
    let keep_alive = KeepAlive::new().interval(app.config.sse_keep_alive).text("keep-alive");
    let mut response = Sse::new(sse_events(app, subscriber)).keep_alive(keep_alive).into_response();
    // Reverse proxies (nginx) must pass events on at once.
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

struct SseState {
    app: Arc<AppState>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    subscriber: Subscriber,
    ready: VecDeque<Item>,
    done: bool,
}

fn sse_events(
    app: Arc<AppState>,
    subscriber: Subscriber,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let sent = app.metrics.stream_events(StreamKind::Sse);
    let shutdown = Box::pin(app.cancel.clone().cancelled_owned());
    let state = SseState { app, shutdown, subscriber, ready: VecDeque::new(), done: false };
    futures::stream::unfold(state, move |mut s| {
        let sent = sent.clone();
        async move {
            loop {
                if let Some(item) = s.ready.pop_front() {
                    sent.increment(1);
                    return Some((
                        Ok(SseEvent::default().event(item.name).data(item.text.as_str())),
                        s,
                    ));
                }
                if s.done {
                    return None;
                }
                let next = tokio::select! {
                    () = &mut s.shutdown => Next::Closed("server shutting down".to_owned()),
                    next = s.subscriber.next() => next,
                };
                match next {
                    Next::Items(items) => s.ready.extend(items),
                    Next::Closed(reason) => {
                        let why = if s.app.cancel.is_cancelled() { "shutdown" } else { "slow" };
                        s.app.metrics.stream_closed(StreamKind::Sse, why);
                        s.done = true;
                        let data =
                            serde_json::json!({ "type": "close", "data": { "reason": reason } });
                        return Some((
                            Ok(SseEvent::default().event("close").data(data.to_string())),
                            s,
                        ));
                    }
                }
            }
        }
    })
}

/// `GET /api/mesh/ws?blockchain=&asset=`: a WebSocket carrying the same JSON events as text
/// messages. The server pings every `ws_ping_interval` and closes a client silent for two.
pub(super) async fn ws(
    State(app): State<Arc<AppState>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    query: Result<Query<PriceQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let Query(query) = query.map_err(query_error)?;
    let subscriber = attach(&app, StreamKind::Ws, query.into_filter(), peer, &headers)?;
    Ok(upgrade
        // Clients only send pongs: a small read buffer keeps idle connections cheap (the
        // default is 128 KiB each). tungstenite zero-fills this much on every read attempt,
        // and the session tries a read each time it wakes to send, so it is kept to one
        // pong's worth; a larger message (up to the limit below) takes a few reads.
        .read_buffer_size(READ_CHUNK)
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        // What waits in user space for a client whose socket is full is bounded too.
        .max_write_buffer_size(1024 * 1024)
        .on_upgrade(move |socket| ws_session(app, socket, subscriber)))
}

/// Why a session ended: the metric label, and the close frame to send (if the peer can take one).
struct Ending {
    reason: &'static str,
    close: Option<(u16, String)>,
}

async fn ws_session(app: Arc<AppState>, mut socket: WebSocket, subscriber: Subscriber) {
    let kind = subscriber.kind();
    let sent = app.metrics.stream_events(kind);
    let write_timeout = app.config.client_write_timeout;
    let ping_every = app.config.ws_ping_interval;
    // One socket for both directions (no split and its lock): `select!` drops the read
    // future before a branch writes.
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut heard = Instant::now();
    // Registered once, not on every turn: the token's waiter list is shared by every client.
    let shutdown = app.cancel.cancelled();
    tokio::pin!(shutdown);
    let ending = loop {
        tokio::select! {
            () = &mut shutdown => {
                break Ending { reason: "shutdown", close: Some((close_code::AWAY, "server shutting down".into())) };
            }
            next = subscriber.next() => match next {
                Next::Items(items) => {
                    let count = items.len() as u64;
                    let write = async {
                        for item in items {
                            socket.feed(Message::Text(item.text)).await?;
                        }
                        socket.flush().await
                    };
                    tokio::pin!(write);
                    // Most writes complete at once; only one that waits starts the timer.
                    let written = match futures::poll!(&mut write) {
                        Poll::Ready(result) => Ok(result),
                        Poll::Pending => tokio::time::timeout(write_timeout, write).await,
                    };
                    match written {
                        Ok(Ok(())) => sent.increment(count),
                        Ok(Err(_)) => break Ending { reason: "gone", close: None },
                        Err(_) => break Ending {
                            reason: "slow",
                            close: Some((close_code::POLICY, format!("client too slow: events not taken within {write_timeout:?}"))),
                        },
                    }
                }
                Next::Closed(reason) => break Ending { reason: "slow", close: Some((close_code::POLICY, reason)) },
            },
            _ = ping.tick() => {
                if heard.elapsed() > ping_every * 2 {
                    break Ending { reason: "dead", close: Some((close_code::AWAY, "no pong received".into())) };
                }
                match tokio::time::timeout(write_timeout, socket.send(Message::Ping(Default::default()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break Ending { reason: "gone", close: None },
                    Err(_) => break Ending { reason: "dead", close: None },
                }
            }
            message = socket.next() => match message {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    break Ending { reason: "client", close: None };
                }
                Some(Ok(_)) => heard = Instant::now(),
            },
        }
    };
    if let Some((code, reason)) = ending.close {
        // A close frame's reason is at most 123 bytes.
        let reason: String = reason.chars().take(120).collect();
        let frame = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), socket.send(frame)).await;
    }
    if ending.reason != "client" {
        app.metrics.stream_closed(kind, ending.reason);
    }
    tracing::debug!(reason = ending.reason, "WebSocket client closed");
}
