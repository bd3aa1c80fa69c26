//! The node's side: a Unix socket server that answers [`Request`]s through a [`Handler`] and
//! streams [`Event`]s to subscribers.
//!
//! Every connection has its own task. A subscriber gets a [`Snapshot`] first, then events from a
//! bounded broadcast channel; one that falls behind gets a fresh snapshot in place of the events
//! it missed (conflation), and one that stops reading for [`ServerConfig::write_timeout`] is
//! dropped. The node never waits for a subscriber.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::{self, Access, Peer};
use crate::frame::{self, MAX_REQUEST_LEN, PART_PRICES};
use crate::types::{ErrorKind, Event, PriceView, Request, Response, Snapshot};
use crate::{Error, Result};

/// What the node provides to the server.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Answers one request (never [`Request::Subscribe`], which the server handles).
    async fn handle(&self, request: Request) -> Response;
    /// The current full state.
    fn snapshot(&self) -> Snapshot;
    /// A receiver of every event from now on.
    fn events(&self) -> broadcast::Receiver<Event>;
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket path (`MESH_NODE_SOCKET`).
    pub path: PathBuf,
    /// Permission bits of the socket file: owner and group may connect.
    pub mode: u32,
    /// A group whose members may connect besides the node's own user and root
    /// (`MESH_NODE_SOCKET_GROUP`, resolved with [`crate::resolve_group`]); the socket file and
    /// a directory the server creates belong to it.
    pub group: Option<u32>,
    /// Most connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A subscriber that does not take an event within this time is dropped.
    pub write_timeout: Duration,
    /// A connection that does not send a complete request within this time (from its start or
    /// from the previous answer) is closed, so that idle or stalled clients cannot hold the
    /// `max_connections` slots. A subscription, once asked for, is not subject to it.
    pub request_timeout: Duration,
}

impl ServerConfig {
    /// Defaults for a socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            mode: 0o660,
            group: None,
            max_connections: 256,
            write_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A bound socket, ready to serve.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    config: ServerConfig,
    access: Access,
}

impl Server {
    /// Binds the socket: creates the parent directory closed to other users (or closes an
    /// open one of ours, see [`crate::access`]), removes a stale socket file left by a process
    /// that is gone (refuses when another process still answers on it), and sets the file's
    /// mode and group.
    pub async fn bind(config: ServerConfig) -> Result<Self> {
        let path = &config.path;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            access::prepare_dir(parent, config.group)
                .map_err(|e| Error::Socket { path: path.clone(), source: e })?;
        }
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(Error::InUse(path.clone()));
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::Socket { path: path.clone(), source: e })?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::Socket { path: path.clone(), source: e })?;
        set_mode(path, config.mode)?;
        if let Some(group) = config.group {
            std::os::unix::fs::chown(path, None, Some(group))
                .map_err(|e| Error::Socket { path: path.clone(), source: e })?;
        }
        info!(socket = %path.display(), group = ?config.group, "IPC socket listening");
        let access = Access::new(config.group);
        Ok(Self { listener, config, access })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.config.path
    }

    /// Serves until `cancel` fires, then waits for the connections to finish and removes the
    /// socket file.
    pub async fn run(self, handler: Arc<dyn Handler>, cancel: CancellationToken) {
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(self.config.max_connections.max(1)));
        let config = Arc::new(self.config);
        let access = self.access;
        let mut next_id = 0u64;
        loop {
            let permit = tokio::select! {
                () = cancel.cancelled() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((mut stream, _)) => {
                    if let Some(peer) = refused(&access, &stream) {
                        access.count_refusal(&peer);
                        let answer = Response::Error {
                            kind: ErrorKind::PermissionDenied,
                            message: access.refusal(&peer),
                        };
                        // One frame, bounded in time, on a task of its own: the accept loop
                        // never waits for a refused process.
                        let timeout = config.write_timeout;
                        tracker.spawn(async move {
                            let _ =
                                tokio::time::timeout(timeout, frame::write(&mut stream, &answer))
                                    .await;
                            drop(permit);
                        });
                        continue;
                    }
                    next_id += 1;
                    let connection = Connection {
                        handler: handler.clone(),
                        config: config.clone(),
                        cancel: cancel.clone(),
                    };
                    tracker.spawn(
                        async move {
                            connection.serve(stream).await;
                            drop(permit);
                        }
                        .instrument(info_span!("ipc_connection", id = next_id)),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "IPC accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        let _ = std::fs::remove_file(&config.path);
    }
}

/// The connecting process's credentials when the rule refuses them; `None` when it may
/// connect. A connection whose credentials cannot be read is refused (as the user id the
/// kernel would never give: `u32::MAX`).
fn refused(access: &Access, stream: &UnixStream) -> Option<Peer> {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer { uid: c.uid(), gid: c.gid(), pid: c.pid() },
        Err(e) => {
            debug!(error = %e, "no peer credentials on a node socket connection");
            Peer { uid: u32::MAX, gid: u32::MAX, pid: None }
        }
    };
    (!access.allows(&peer)).then_some(peer)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Socket { path: path.to_path_buf(), source: e })
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}

struct Connection {
    handler: Arc<dyn Handler>,
    config: Arc<ServerConfig>,
    cancel: CancellationToken,
}

impl Connection {
    async fn serve(self, mut stream: UnixStream) {
        loop {
            let read = frame::read::<Request, _>(&mut stream, MAX_REQUEST_LEN);
            let request = tokio::select! {
                () = self.cancel.cancelled() => return,
                r = tokio::time::timeout(self.config.request_timeout, read) => r,
            };
            let request = match request {
                Err(_) => {
                    debug!("no complete request in time; closing the connection");
                    return;
                }
                Ok(r) => r,
            };
            let request = match request {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(Error::Io(_)) => return,
                Err(e) => {
                    // A malformed request gets an answer, then the connection is closed: the
                    // stream may be out of step.
                    let answer =
                        Response::Error { kind: ErrorKind::BadRequest, message: e.to_string() };
                    let _ = self.write(&mut stream, &answer).await;
                    return;
                }
            };
            if request == Request::Subscribe {
                self.stream_events(stream).await;
                return;
            }
            let answer = self.handler.handle(request).await;
            let written = match answer {
                Response::Prices(prices) => self.write_prices(&mut stream, prices).await,
                answer => self.write(&mut stream, &answer).await,
            };
            if written.is_err() {
                return;
            }
        }
    }

    async fn write<T: serde::Serialize>(&self, stream: &mut UnixStream, value: &T) -> Result<()> {
        match tokio::time::timeout(self.config.write_timeout, frame::write(stream, value)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Writes a price list answer, in parts when it is long (see [`crate::frame`]).
    async fn write_prices(
        &self,
        stream: &mut UnixStream,
        mut prices: Vec<PriceView>,
    ) -> Result<()> {
        let last = prices.split_off(last_part_start(prices.len()));
        for part in prices.chunks(PART_PRICES) {
            self.write(stream, &Part::PricesPart(part)).await?;
        }
        self.write(stream, &Response::Prices(last)).await
    }

    /// Writes a snapshot, in parts when the book is large (see [`crate::frame`]).
    async fn write_snapshot(&self, stream: &mut UnixStream, mut snapshot: Snapshot) -> Result<()> {
        let last = snapshot.prices.split_off(last_part_start(snapshot.prices.len()));
        for part in snapshot.prices.chunks(PART_PRICES) {
            self.write(stream, &Part::SnapshotPart(part)).await?;
        }
        snapshot.prices = last;
        self.write(stream, &Event::Snapshot(Box::new(snapshot))).await
    }

    async fn stream_events(&self, mut stream: UnixStream) {
        // Subscribe before taking the snapshot so nothing falls between the two.
        let mut events = self.handler.events();
        if self.write_snapshot(&mut stream, self.handler.snapshot()).await.is_err() {
            return;
        }
        debug!("subscriber attached");
        loop {
            let event = tokio::select! {
                () = self.cancel.cancelled() => return,
                e = events.recv() => e,
            };
            let written = match event {
                Ok(event) => self.write(&mut stream, &event).await,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    debug!(missed, "subscriber fell behind; sending a fresh snapshot");
                    events = events.resubscribe();
                    self.write_snapshot(&mut stream, self.handler.snapshot()).await
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if let Err(e) = written {
                debug!(error = %e, "subscriber dropped");
                return;
            }
        }
    }
}

/// The leading parts of a long list, borrowed: serialises exactly as
/// [`Event::SnapshotPart`] and [`Response::PricesPart`] do, without copying the prices.
#[derive(serde::Serialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
enum Part<'a> {
    SnapshotPart(&'a [PriceView]),
    PricesPart(&'a [PriceView]),
}

/// Where the final frame's prices start: the leading parts are full, the final frame holds
/// the rest (1..=[`PART_PRICES`] prices, or none for an empty list).
fn last_part_start(len: usize) -> usize {
    len.saturating_sub(1) / PART_PRICES * PART_PRICES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_full_and_the_final_frame_holds_the_rest() {
        assert_eq!(last_part_start(0), 0);
        assert_eq!(last_part_start(1), 0);
        assert_eq!(last_part_start(PART_PRICES), 0);
        assert_eq!(last_part_start(PART_PRICES + 1), PART_PRICES);
        assert_eq!(last_part_start(100_000), 99_000);
    }

    #[test]
    fn borrowed_parts_serialise_as_the_owned_variants() {
        let parts: Vec<PriceView> = Vec::new();
        let owned = serde_json::to_string(&Event::SnapshotPart(parts.clone())).unwrap_or_default();
        let borrowed = serde_json::to_string(&Part::SnapshotPart(&parts)).unwrap_or_default();
        assert_eq!(owned, borrowed);
        let owned = serde_json::to_string(&Response::PricesPart(parts.clone())).unwrap_or_default();
        let borrowed = serde_json::to_string(&Part::PricesPart(&parts)).unwrap_or_default();
        assert_eq!(owned, borrowed);
        assert!(owned.contains("prices_part"), "{owned}");
    }
}
