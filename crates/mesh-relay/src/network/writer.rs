//! Writers: one per peer, keeping one outbound relay stream open and draining the peer's queue
//! into it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use mesh_protocol::MessageId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::framing;
use crate::prepare::RecentIds;
use crate::stats::{add, bump};

use super::{Context, READY_TIMEOUT, RELAY_PROTOCOL, STREAM_READY};

pub(super) struct Writer {
    pub(super) peer: PeerId,
    pub(super) frames: mpsc::Receiver<(Option<MessageId>, Bytes)>,
    pub(super) sent_us: Arc<RecentIds>,
    pub(super) cancel: CancellationToken,
    pub(super) ctx: Context,
}

impl Writer {
    /// Most frames written before a flush.
    const BATCH: usize = 64;

    pub(super) async fn run(mut self) {
        let (min_backoff, max_backoff) = self.ctx.config.stream_backoff;
        let mut backoff = min_backoff;
        // Frames taken from the queue but not yet written: kept across a reopen, so a broken
        // stream loses nothing (the receiver drops any copy it already had as a duplicate).
        let mut pending: Vec<Bytes> = Vec::new();
        // One wait for the whole life of the task, not one per frame: each new one would
        // register with the token and unregister again.
        let cancel = self.cancel.clone();
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        loop {
            let opened = tokio::select! {
                () = &mut cancelled => break,
                r = tokio::time::timeout(READY_TIMEOUT, self.open()) => r,
            };
            let stream = match opened {
                Ok(Ok(stream)) => {
                    bump(&self.ctx.stats.streams_opened);
                    backoff = min_backoff;
                    stream
                }
                Ok(Err(e)) => {
                    debug!(error = %e, "cannot open relay stream");
                    bump(&self.ctx.stats.stream_open_failures);
                    if !self.pause(&mut backoff, max_backoff).await {
                        break;
                    }
                    continue;
                }
                Err(_) => {
                    debug!("relay stream not taken by the peer in time");
                    bump(&self.ctx.stats.stream_open_failures);
                    if !self.pause(&mut backoff, max_backoff).await {
                        break;
                    }
                    continue;
                }
            };
            // Write until the stream breaks or the peer closes it, then reopen. The peer never
            // writes on this stream after the ready byte, so anything readable is its end
            // closing (a reader replaced by a newer stream, or one that gave up on us).
            let (mut closed_by_peer, mut stream) = stream.split();
            let mut probe = [0u8; 1];
            // One read for the stream's life, polled last: a frame that is ready is taken
            // without touching the stream's read side (a lock and a yamux poll each time);
            // tokio's task budget makes `recv` yield now and then, so the token and the
            // peer's close are still seen under a steady stream of frames.
            let closed = closed_by_peer.read(&mut probe);
            tokio::pin!(closed);
            loop {
                if pending.is_empty() {
                    let frame = tokio::select! {
                        biased;
                        f = self.frames.recv() => match f {
                            Some(f) => f,
                            None => return,
                        },
                        () = &mut cancelled => {
                            let _ = stream.close().await;
                            return;
                        }
                        _ = &mut closed => {
                            debug!("relay stream closed by the peer; reopening");
                            break;
                        }
                    };
                    self.take(&mut pending, frame);
                    while pending.len() < Self::BATCH {
                        match self.frames.try_recv() {
                            Ok(f) => self.take(&mut pending, f),
                            Err(_) => break,
                        }
                    }
                    if pending.is_empty() {
                        continue;
                    }
                }
                match write_all(&mut stream, &pending).await {
                    Ok(bytes) => {
                        let stats = &self.ctx.stats;
                        let count = pending.len() as u64;
                        add(&stats.frames_sent, count);
                        add(&stats.bytes_sent, bytes);
                        metrics::counter!("mesh_relay_frames_sent_total").increment(count);
                        metrics::counter!("mesh_relay_bytes_sent_total").increment(bytes);
                        pending.clear();
                    }
                    Err(e) => {
                        debug!(error = %e, "relay stream broke; reopening");
                        break;
                    }
                }
            }
        }
        if !pending.is_empty() {
            let lost = pending.len() as u64;
            add(&self.ctx.stats.dropped_stream_lost, lost);
            metrics::counter!("mesh_relay_dropped_total", "reason" => "stream_lost")
                .increment(lost);
        }
    }

    /// Adds a queued frame to the batch, unless the peer has sent us that message meanwhile.
    fn take(&self, pending: &mut Vec<Bytes>, (id, frame): (Option<MessageId>, Bytes)) {
        if id.is_some_and(|id| self.sent_us.contains(&id)) {
            bump(&self.ctx.stats.suppressed);
            metrics::counter!("mesh_relay_suppressed_total").increment(1);
        } else {
            pending.push(frame);
        }
    }

    /// Opens a stream and waits until the peer's reader has taken it.
    async fn open(&mut self) -> std::io::Result<libp2p::Stream> {
        let mut stream = self
            .ctx
            .control
            .open_stream(self.peer, RELAY_PROTOCOL)
            .await
            .map_err(std::io::Error::other)?;
        let mut ready = [0u8; 1];
        stream.read_exact(&mut ready).await?;
        if ready[0] != STREAM_READY {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad ready byte"));
        }
        Ok(stream)
    }

    /// Waits out the backoff (with jitter); `false` when cancelled meanwhile.
    async fn pause(&self, backoff: &mut Duration, max: Duration) -> bool {
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        let wait = backoff.mul_f64(jitter);
        *backoff = (*backoff * 2).min(max);
        tokio::select! {
            () = self.cancel.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }
}

/// Writes the frames in one buffer and flushes once; returns the bytes written.
async fn write_all<W: futures::AsyncWrite + Unpin>(
    stream: &mut W,
    frames: &[Bytes],
) -> std::io::Result<u64> {
    let mut out = Vec::with_capacity(frames.iter().map(|f| 4 + f.len()).sum());
    for f in frames {
        framing::put_frame(&mut out, f)?;
    }
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(out.len() as u64)
}
