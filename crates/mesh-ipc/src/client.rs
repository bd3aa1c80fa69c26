//! The API's side: requests over short connections and a subscription over a long one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

use crate::frame::{self, MAX_JOINED_PRICES, MAX_RESPONSE_LEN};
use crate::types::{
    Event, NetworkStatus, PriceFilter, PriceView, ProviderStatusView, QuoteView, Request, Response,
};
use crate::{Error, Result};

/// A client of the node's socket. Cheap to clone; each request uses its own connection.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the socket at `path` with a 30-second request timeout (enabling provider
    /// mode checks the key against Birdeye, which can take a while).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), timeout: Duration::from_secs(30) }
    }

    /// Changes the request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn connect(&self) -> Result<UnixStream> {
        UnixStream::connect(&self.path)
            .await
            .map_err(|e| Error::Unreachable { path: self.path.clone(), source: e })
    }

    /// Sends one request and waits for its answer.
    pub async fn request(&self, request: &Request) -> Result<Response> {
        let exchange = async {
            let mut stream = self.connect().await?;
            frame::write(&mut stream, request).await?;
            // A long price list comes in parts (see `frame`): join them.
            let mut parts = Vec::new();
            loop {
                let answer = frame::read::<Response, _>(&mut stream, MAX_RESPONSE_LEN)
                    .await?
                    .ok_or(Error::Closed)?;
                match answer {
                    Response::PricesPart(part) => join(&mut parts, part)?,
                    Response::Prices(last) if !parts.is_empty() => {
                        join(&mut parts, last)?;
                        return Ok(Response::Prices(parts));
                    }
                    answer if parts.is_empty() => return Ok(answer),
                    _ => {
                        return Err(Error::Malformed(
                            "an answer other than prices after price parts".into(),
                        ));
                    }
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| Error::Timeout)?
    }

    /// Prices matching `filter`.
    pub async fn prices(&self, filter: PriceFilter) -> Result<Vec<PriceView>> {
        match self.request(&Request::GetPrices(filter)).await? {
            Response::Prices(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Every provider's latest quote of the assets matching `filter`.
    pub async fn quotes(&self, filter: PriceFilter) -> Result<Vec<QuoteView>> {
        match self.request(&Request::GetQuotes(filter)).await? {
            Response::Quotes(q) => Ok(q),
            other => Err(unexpected(other)),
        }
    }

    /// The network status.
    pub async fn network_status(&self) -> Result<NetworkStatus> {
        match self.request(&Request::GetNetworkStatus).await? {
            Response::NetworkStatus(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Provider mode status.
    pub async fn provider_status(&self) -> Result<ProviderStatusView> {
        match self.request(&Request::GetProviderStatus).await? {
            Response::ProviderStatus(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// The node's metrics (Prometheus text format).
    pub async fn metrics(&self) -> Result<String> {
        match self.request(&Request::GetMetrics).await? {
            Response::Metrics(text) => Ok(text),
            other => Err(unexpected(other)),
        }
    }

    /// Opens a subscription: the first event is a snapshot.
    pub async fn subscribe(&self) -> Result<Subscription> {
        let mut stream = self.connect().await?;
        tokio::time::timeout(self.timeout, frame::write(&mut stream, &Request::Subscribe))
            .await
            .map_err(|_| Error::Timeout)??;
        Ok(Subscription { stream, parts: Vec::new() })
    }
}

/// Appends a part to the prices joined so far, within [`MAX_JOINED_PRICES`].
fn join(joined: &mut Vec<PriceView>, mut part: Vec<PriceView>) -> Result<()> {
    if joined.len() + part.len() > MAX_JOINED_PRICES {
        return Err(Error::Malformed(format!(
            "more than {MAX_JOINED_PRICES} prices in parts; giving up"
        )));
    }
    joined.append(&mut part);
    Ok(())
}

fn unexpected(response: Response) -> Error {
    match response {
        Response::Error { kind, message } => Error::Remote { kind, message },
        other => Error::Malformed(format!("unexpected answer {other:?}")),
    }
}

/// A stream of events from the node.
#[derive(Debug)]
pub struct Subscription {
    stream: UnixStream,
    /// Prices of the snapshot being received in parts.
    parts: Vec<PriceView>,
}

impl Subscription {
    /// The next event; `Ok(None)` when the node closed the stream (it stopped). A snapshot sent
    /// in parts is returned whole, as one [`Event::Snapshot`].
    pub async fn next(&mut self) -> Result<Option<Event>> {
        loop {
            let Some(body) = frame::read_body(&mut self.stream, MAX_RESPONSE_LEN).await? else {
                if self.parts.is_empty() {
                    return Ok(None);
                }
                return Err(Error::Malformed("the stream ended inside a snapshot".into()));
            };
            let event = match frame::decode::<Event>(&body) {
                Ok(event) => event,
                // The node refused the subscription (for example this process's user).
                Err(e) => match frame::decode::<Response>(&body) {
                    Ok(Response::Error { kind, message }) => {
                        return Err(Error::Remote { kind, message });
                    }
                    _ => return Err(e),
                },
            };
            match event {
                Event::SnapshotPart(part) => join(&mut self.parts, part)?,
                Event::Snapshot(mut snapshot) => {
                    if !self.parts.is_empty() {
                        let mut prices = std::mem::take(&mut self.parts);
                        join(&mut prices, std::mem::take(&mut snapshot.prices))?;
                        snapshot.prices = prices;
                    }
                    return Ok(Some(Event::Snapshot(snapshot)));
                }
                event if self.parts.is_empty() => return Ok(Some(event)),
                _ => {
                    self.parts = Vec::new();
                    return Err(Error::Malformed(
                        "an event other than a snapshot part inside a snapshot".into(),
                    ));
                }
            }
        }
    }
}
