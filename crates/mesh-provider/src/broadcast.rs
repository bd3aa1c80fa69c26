//! Where signed batches go: the [`Broadcast`] trait (the relay implements it) and a bounded
//! channel implementation for tests and embedding.

use mesh_protocol::Envelope;
use tokio::sync::mpsc;

/// Why a batch could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum BroadcastError {
    /// The receiving side is gone.
    #[error("the broadcaster is closed")]
    Closed,
    /// The broadcaster failed for its own reason.
    #[error("broadcast failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Sends an originated envelope to the mesh.
#[async_trait::async_trait]
pub trait Broadcast: Send + Sync + 'static {
    /// Sends `envelope` to every connected peer; returns how many peers it reached.
    async fn broadcast(&self, envelope: Envelope) -> Result<usize, BroadcastError>;
}

/// A [`Broadcast`] into a bounded channel: every envelope goes to the receiver returned by
/// [`ChannelBroadcast::new`], which counts as `peers` peers reached.
#[derive(Debug, Clone)]
pub struct ChannelBroadcast {
    sender: mpsc::Sender<Envelope>,
    peers: usize,
}

impl ChannelBroadcast {
    /// A channel of `capacity` envelopes; each send reports `peers` peers reached.
    pub fn new(capacity: usize, peers: usize) -> (Self, mpsc::Receiver<Envelope>) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        (Self { sender, peers }, receiver)
    }
}

#[async_trait::async_trait]
impl Broadcast for ChannelBroadcast {
    async fn broadcast(&self, envelope: Envelope) -> Result<usize, BroadcastError> {
        self.sender.send(envelope).await.map_err(|_| BroadcastError::Closed)?;
        Ok(self.peers)
    }
}
