//! The accept task and the readers of inbound relay streams.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use libp2p_stream::IncomingStreams;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::framing::{self, ReadError};
use crate::prepare::Started;
use crate::stats::bump;

use super::{Context, CoreInput, PIPELINE_DEPTH, READ_BUFFER, STREAM_READY, now_ms};

/// Takes inbound relay streams as fast as they come and starts a reader for each.
pub(super) async fn accept_relay_streams(mut incoming: IncomingStreams, ctx: Context) {
    let readers: Arc<Mutex<HashMap<PeerId, (u64, CancellationToken)>>> = Arc::default();
    let mut generation = 0u64;
    loop {
        let next = tokio::select! {
            () = ctx.cancel.cancelled() => return,
            n = incoming.next() => n,
        };
        let Some((peer, stream)) = next else { return };
        generation += 1;
        let token = ctx.cancel.child_token();
        let replaced = readers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(peer, (generation, token.clone()));
        if let Some((_, old)) = replaced {
            old.cancel();
            bump(&ctx.stats.inbound_streams_replaced);
        }
        let reader = Reader { peer, generation, token, readers: readers.clone(), ctx: ctx.clone() };
        ctx.tracker.spawn(reader.run(stream).instrument(info_span!("reader", %peer)));
    }
}

struct Reader {
    peer: PeerId,
    generation: u64,
    token: CancellationToken,
    readers: Arc<Mutex<HashMap<PeerId, (u64, CancellationToken)>>>,
    ctx: Context,
}

impl Reader {
    async fn run(self, stream: libp2p::Stream) {
        let mut stream = futures::io::BufReader::with_capacity(READ_BUFFER, stream);
        let mut buf = Vec::new();
        let ready = async {
            stream.write_all(&[STREAM_READY]).await?;
            stream.flush().await
        };
        if ready.await.is_err() {
            return;
        }
        // Frames handed to other tasks for preparation, oldest first.
        let mut pipeline = VecDeque::new();
        let cancelled = self.token.cancelled();
        tokio::pin!(cancelled);
        loop {
            // Before waiting on the stream, pass on what the pipeline holds: a frame never
            // waits for the next one to arrive.
            if !pipeline.is_empty()
                && !framing::whole_frame_buffered(stream.buffer())
                && !self.drain(&mut pipeline, cancelled.as_mut()).await
            {
                break;
            }
            // Not biased: reading a stream is not budgeted by tokio, so a peer that keeps the
            // stream full would otherwise keep a replaced or stopped reader alive.
            let read = tokio::select! {
                () = &mut cancelled => break,
                r = framing::read_frame(&mut stream, &mut buf) => r,
            };
            let input = match read {
                Ok(()) => {
                    let frame = std::mem::take(&mut buf);
                    let now = now_ms() + self.ctx.config.clock_offset_ms;
                    match self.ctx.preparer.start(&frame) {
                        Started::Done(prepared) => CoreInput::Frame {
                            peer: self.peer,
                            frame,
                            prepared: prepared.map(Box::new),
                        },
                        Started::Claimed(identified)
                            if framing::whole_frame_buffered(stream.buffer()) =>
                        {
                            // More frames wait behind this first copy: check it on another
                            // task, so that a busy link keeps every core checking signatures,
                            // and read on.
                            let (preparer, peer) = (self.ctx.preparer.clone(), self.peer);
                            let task = async move {
                                let prepared =
                                    Some(Box::new(preparer.finish(&peer, identified, now)));
                                CoreInput::Frame { peer, frame, prepared }
                            };
                            pipeline.push_back(self.ctx.tracker.spawn(task));
                            bump(&self.ctx.stats.prepared_in_parallel);
                            if pipeline.len() >= PIPELINE_DEPTH
                                && let Some(task) = pipeline.pop_front()
                                && !self.pass_on_spawned(task, cancelled.as_mut()).await
                            {
                                break;
                            }
                            continue;
                        }
                        Started::Claimed(identified) => {
                            let prepared = Some(Box::new(
                                self.ctx.preparer.finish(&self.peer, identified, now),
                            ));
                            CoreInput::Frame { peer: self.peer, frame, prepared }
                        }
                    }
                }
                Err(ReadError::TooLarge(_)) => CoreInput::Oversized { peer: self.peer },
                Err(ReadError::Io(_)) => break,
            };
            // In order: what the pipeline holds came first.
            if !self.drain(&mut pipeline, cancelled.as_mut()).await {
                break;
            }
            let oversized = matches!(input, CoreInput::Oversized { .. });
            if !self.pass_on(input, cancelled.as_mut()).await || oversized {
                // After an oversized prefix the stream is out of step: drop it.
                break;
            }
        }
        let _ = stream.close().await;
        let mut readers = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if readers.get(&self.peer).is_some_and(|(g, _)| *g == self.generation) {
            readers.remove(&self.peer);
        }
    }

    /// Sends `input` to the core; `false` when the reader should stop.
    async fn pass_on(
        &self,
        input: CoreInput,
        cancelled: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ) -> bool {
        tokio::select! {
            biased;
            sent = self.ctx.core_tx.send(input) => sent.is_ok(),
            () = cancelled => false,
        }
    }

    /// Passes on everything in `pipeline`, oldest first; `false` when the reader should stop.
    async fn drain(
        &self,
        pipeline: &mut VecDeque<tokio::task::JoinHandle<CoreInput>>,
        mut cancelled: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ) -> bool {
        while let Some(task) = pipeline.pop_front() {
            if !self.pass_on_spawned(task, cancelled.as_mut()).await {
                return false;
            }
        }
        true
    }

    /// Waits for a frame prepared on another task and sends it to the core.
    async fn pass_on_spawned(
        &self,
        task: tokio::task::JoinHandle<CoreInput>,
        cancelled: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ) -> bool {
        match task.await {
            Ok(input) => self.pass_on(input, cancelled).await,
            Err(e) => {
                // Only a panic in the decoder or the checks gets here: drop the link, as for
                // a broken stream.
                warn!("preparing a frame failed: {e}");
                false
            }
        }
    }
}
