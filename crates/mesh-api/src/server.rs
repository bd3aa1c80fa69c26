//! Starting and stopping the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_ipc::Client;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span};

use crate::hub::{Hub, StreamClientStats};
use crate::metrics::Metrics;
use crate::node::NodeLink;
use crate::routes::{AppState, router};
use crate::{Config, Error, Result};

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
        let hub =
            Arc::new(Hub::new(config.max_stream_clients, config.client_buffer, metrics.clone()));
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
        let stop = cancel.clone();
        tracker.spawn(
            async move {
                let serve =
                    axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
                if let Err(e) = serve.await {
                    error!(error = %e, "HTTP server failed");
                }
            }
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
