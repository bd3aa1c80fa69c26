//! Starting and stopping the server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use mesh_ipc::Client;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span};

use crate::hub::{Hub, StreamClientStats};
use crate::metrics::Metrics;
use crate::node::NodeLink;
use crate::routes::{AppState, Peer, router};
use crate::{Config, Error, Result};

/// Largest buffer a connection may fill with one request's header section (hyper's default
/// is about 400 KiB): with [`Config::header_read_timeout`] and the connection limit, it bounds
/// what slow or hostile clients make the server hold. Larger headers get `431`.
const MAX_HEADER_BUFFER: usize = 32 * 1024;

/// How many connections the accept loop serves and how long each may take to send headers.
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    max_connections: usize,
    header_read_timeout: Duration,
    write_timeout: Duration,
}

/// A connection whose writes may wait at most `timeout` for the client to take bytes: then
/// they fail and hyper closes the connection. A stream client (SSE above all: WebSocket has
/// its own timer) that stops reading otherwise held its slot, its queue and its socket
/// buffers for as long as its TCP connection lived. The timer runs only while a write waits:
/// an idle connection is not affected.
struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    waiting: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout, waiting: None }
    }

    /// After the inner write returned `pending`: starts the timer (first time) and fails once
    /// it has run out. Polling the timer registers the task, so it wakes at the deadline even
    /// when the socket never becomes writable.
    fn check<T>(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<T>> {
        let timeout = self.timeout;
        let sleep = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("client took no bytes for {timeout:?}"),
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(cx, buf) {
            std::task::Poll::Pending => self.check(cx),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            std::task::Poll::Pending => self.check(cx),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_flush(cx) {
            std::task::Poll::Pending => self.check(cx),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts HTTP/1 connections until `cancel` fires, at most `limits.max_connections` at once
/// (more wait in the listen backlog), each closed when a request's headers take longer than
/// `limits.header_read_timeout`. `axum::serve` has neither bound: without a timer, hyper's
/// header timeout never fires, so a client that never finishes its headers held its
/// connection forever. WebSocket upgrades go through; an upgraded connection leaves this
/// count (stream clients are bounded by the hub).
async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to be released
                    // rather than spin.
                    error!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY not set");
        }
        // Handlers see the TCP peer (per-address stream limits).
        let app = app.clone();
        let service = TowerToHyperService::new(tower::service_fn(
            move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(Peer(peer));
                tower::ServiceExt::oneshot(app.clone(), request)
            },
        ));
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_HEADER_BUFFER);
            let stream = WriteTimeout::new(stream, limits.write_timeout);
            let connection =
                builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

/// A running API server: the HTTP listener and the task that follows the node.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    state: Arc<AppState>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("config", &self.config).finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Validates `config`, binds [`Config::listen`] and starts serving.
    pub async fn start(config: Config) -> Result<Self> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Bind { addr: config.listen, source: e })?;
        Self::serve(listener, config)
    }

    /// Starts serving on a listener bound by the caller ([`Config::listen`] is not used).
    pub fn serve(listener: TcpListener, config: Config) -> Result<Self> {
        config.validate()?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new()?);
        let hub = Arc::new(Hub::new(
            config.max_stream_clients,
            config.max_streams_per_address,
            config.client_buffer,
            metrics.clone(),
        ));
        let client = Client::new(&config.node_socket).with_timeout(config.node_timeout);
        let link = Arc::new(NodeLink::new(client, hub, metrics.clone()));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(
            link.clone()
                .run(config.reconnect_min, config.reconnect_max, cancel.clone())
                .instrument(info_span!("node_link")),
        );
        let state = Arc::new(AppState::new(link, metrics, config, cancel.clone()));
        let app = router(state.clone());
        let limits = ConnectionLimits {
            max_connections: state
                .config
                .max_stream_clients
                .saturating_add(state.config.max_request_connections),
            header_read_timeout: state.config.header_read_timeout,
            // A second more than the WebSocket session's own timer, which closes its client
            // properly (close frame, `reason="slow"`) first; SSE and REST answers have only this.
            write_timeout: state.config.client_write_timeout + Duration::from_secs(1),
        };
        tracker.spawn(
            accept_loop(listener, app, limits, cancel.clone(), tracker.clone())
                .instrument(info_span!("http", %addr)),
        );
        info!(%addr, socket = %state.config.node_socket.display(), "mesh API listening");
        Ok(Self { addr, cancel, tracker, state })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The subscription to the node is live.
    pub fn node_connected(&self) -> bool {
        self.state.link.connected()
    }

    /// Figures of every stream client connected now.
    pub fn stream_clients(&self) -> Vec<StreamClientStats> {
        self.state.link.stream_stats()
    }

    /// Stops accepting, closes the streams, lets requests in flight finish within `grace`.
    /// Returns `false` when something was still running after `grace` (it is then abandoned).
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        let finished = tokio::time::timeout(grace, self.tracker.wait()).await.is_ok();
        info!(finished, "mesh API stopped");
        finished
    }
}
