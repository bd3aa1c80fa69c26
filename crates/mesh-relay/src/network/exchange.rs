//! Answers to peer-exchange requests (`/mesh/pex/1.0.0`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p_stream::IncomingStreams;

use crate::framing;
use crate::pex;

use super::Context;

/// Answers peer-exchange requests with the current list of peers and their addresses.
pub(super) async fn answer_peer_exchange(
    mut incoming: IncomingStreams,
    exchange: Arc<Mutex<Vec<pex::Entry>>>,
    ctx: Context,
) {
    // At most a few answers at once; requests beyond that are dropped.
    let permits = Arc::new(tokio::sync::Semaphore::new(8));
    loop {
        let next = tokio::select! {
            () = ctx.cancel.cancelled() => return,
            n = incoming.next() => n,
        };
        let Some((peer, mut stream)) = next else { return };
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        let answer = {
            let list = exchange.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let entries: Vec<pex::Entry> =
                list.iter().filter(|(p, _)| *p != peer).cloned().collect();
            pex::encode(&entries)
        };
        ctx.tracker.spawn(async move {
            let write = async {
                framing::write_frame(&mut stream, &answer).await?;
                stream.close().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), write).await;
            drop(permit);
        });
    }
}
