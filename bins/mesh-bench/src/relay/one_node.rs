//! Unique messages one relay validates and forwards per second.
//!
//! A line A - B - C: A and B are real relays (`mesh_testkit::TestNet`), C is a bare libp2p
//! peer that takes B's relay stream and only counts the frames on it, so that C's work does
//! not compete with B's for the cores. A sends distinct valid 50-price batches to B with
//! `send_raw_frame` (A checks nothing), keeping at most [`WINDOW`] of them ahead of what B has
//! delivered, so B is never idle and no queue overflows. B decodes, verifies and checks each,
//! delivers it locally and forwards it to C (not back to A, which sent it). The rate is taken
//! at C over the last 90 % of the frames (the first 10 % warm up).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade;
use libp2p::{Multiaddr, SwarmBuilder, Transport, noise, yamux};
use mesh_protocol::Identity;
use mesh_relay::framing::read_frame;
use mesh_testkit::{TestNet, Topology};
use rand::Rng;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Args, poll_until};

/// Frames A keeps in flight ahead of B's deliveries: enough to keep B busy between two polls,
/// well under the relay's queues (1,024 frames each), so nothing is dropped.
const WINDOW: u64 = 512;
/// The byte mesh-relay's stream reader sends when it takes a stream (`STREAM_READY` in
/// mesh-relay's network module); the writer waits for it before sending frames.
const STREAM_READY: u8 = 0x01;
/// C records the time every this many frames.
const MARK_EVERY: u64 = 500;

/// The measured rates.
#[derive(Debug)]
pub struct RelayRate {
    /// Unique messages B forwarded per second (counted at C).
    pub forwarded_per_sec: f64,
    /// Unique messages B validated and delivered per second.
    pub validated_per_sec: f64,
    /// Counts and timings.
    pub details: serde_json::Value,
}

#[derive(Debug, Default)]
struct SinkState {
    streams: AtomicU64,
    frames: AtomicU64,
    marks: Mutex<Vec<(u64, Instant)>>,
}

impl SinkState {
    fn marks(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Instant)>> {
        self.marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts C: a swarm with only `libp2p-stream`, taking relay streams and counting frames.
fn start_sink(cancel: &CancellationToken) -> anyhow::Result<(Multiaddr, Arc<SinkState>)> {
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let mut swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(MemoryTransport::default()
                .upgrade(upgrade::Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    let mut incoming = swarm
        .behaviour()
        .new_control()
        .accept(mesh_relay::network::RELAY_PROTOCOL)
        .map_err(|e| anyhow::anyhow!("registering the relay protocol: {e}"))?;
    let listen: Multiaddr =
        format!("/memory/{}", rand::thread_rng().gen_range(1u64..u64::MAX / 2)).parse()?;
    swarm.listen_on(listen.clone())?;
    let addr = listen.with(libp2p::multiaddr::Protocol::P2p(*swarm.local_peer_id()));
    let state = Arc::new(SinkState::default());

    let stop = cancel.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = swarm.select_next_some() => {}
            }
        }
    });
    let stop = cancel.clone();
    let sink = state.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => break,
                n = incoming.next() => n,
            };
            let Some((_peer, mut stream)) = next else { break };
            sink.streams.fetch_add(1, Ordering::Relaxed);
            let sink = sink.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                if stream.write_all(&[STREAM_READY]).await.is_err() || stream.flush().await.is_err()
                {
                    return;
                }
                let mut buf = Vec::new();
                loop {
                    let read = tokio::select! {
                        () = stop.cancelled() => break,
                        r = read_frame(&mut stream, &mut buf) => r,
                    };
                    if read.is_err() {
                        break;
                    }
                    let n = sink.frames.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_multiple_of(MARK_EVERY) {
                        sink.marks().push((n, Instant::now()));
                    }
                }
            });
        }
    });
    Ok((addr, state))
}

/// Runs the measurement.
pub async fn run(args: &Args) -> anyhow::Result<RelayRate> {
    let total = args.relay_messages as u64;
    anyhow::ensure!(
        total >= 10 * MARK_EVERY,
        "--relay-messages must be at least {}",
        10 * MARK_EVERY
    );
    // Distinct valid messages of one provider with rising timestamps, all in the past.
    let provider = Identity::from_seed([0x51; 32]);
    let base = mesh_testkit::now_ms() - total as i64 - 1_000;
    let mut frames = Vec::with_capacity(args.relay_messages);
    let mut ids = Vec::with_capacity(args.relay_messages);
    for k in 0..total {
        let envelope =
            mesh_testkit::price_batch(&provider, k, base + k as i64, args.prices, args.ttl)?;
        ids.push(envelope.message_id());
        frames.push(mesh_protocol::encode_envelope(&envelope)?);
    }

    let cancel = CancellationToken::new();
    let (sink_addr, sink) = start_sink(&cancel)?;
    // One origin at full speed is what is measured: B's per-origin rate is off.
    let net = TestNet::builder()
        .nodes(2)
        .topology(Topology::Line)
        .configure(|_, c| c.core.origin_rate = None)
        .build()
        .await?;
    let result = measure(&net, frames, &ids, &sink_addr, &sink).await;
    net.shutdown().await;
    cancel.cancel();
    result
}

async fn measure(
    net: &TestNet,
    frames: Vec<Vec<u8>>,
    ids: &[mesh_protocol::MessageId],
    sink_addr: &Multiaddr,
    sink: &SinkState,
) -> anyhow::Result<RelayRate> {
    let total = frames.len() as u64;
    let a = net.node(0).running()?;
    let b = net.node(1).running()?;
    let b_peer = net.node(1).peer_id();
    b.dial(sink_addr.clone()).await?;
    let linked =
        poll_until(Duration::from_secs(30), || sink.streams.load(Ordering::Relaxed) >= 1).await;
    anyhow::ensure!(linked, "B did not open its relay stream to C");

    let started = Instant::now();
    let mut sent = 0u64;
    let mut frames = frames.into_iter();
    while sent < total {
        let delivered = b.stats().delivered;
        let budget = WINDOW.saturating_sub(sent.saturating_sub(delivered));
        if budget == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        for frame in frames.by_ref().take(budget as usize) {
            a.send_raw_frame(b_peer, frame).await?;
            sent += 1;
        }
    }
    let flooded_secs = started.elapsed().as_secs_f64();
    let done =
        poll_until(Duration::from_secs(60), || sink.frames.load(Ordering::Relaxed) >= total).await;
    let at_c = sink.frames.load(Ordering::Relaxed);

    // Forwarded: from the mark at 10 % to the last mark, at C.
    let marks = sink.marks().clone();
    let warm = marks.iter().find(|(n, _)| *n >= total / 10).copied();
    let last = marks.last().copied();
    let forwarded_per_sec = match (warm, last) {
        (Some((n1, t1)), Some((n2, t2))) if n2 > n1 => {
            (n2 - n1) as f64 / t2.saturating_duration_since(t1).as_secs_f64()
        }
        _ => 0.0,
    };
    // Validated and delivered: first to last delivery at B.
    let node_b = net.node(1);
    let first = ids.iter().find_map(|id| node_b.received(id)).map(|r| r.at);
    let last_b = ids.iter().rev().find_map(|id| node_b.received(id)).map(|r| r.at);
    let delivered_b = node_b.received_count() as u64;
    let validated_per_sec = match (first, last_b) {
        (Some(t1), Some(t2)) if t2 > t1 => {
            delivered_b.saturating_sub(1) as f64 / t2.duration_since(t1).as_secs_f64()
        }
        _ => 0.0,
    };
    let stats = b.stats();
    Ok(RelayRate {
        forwarded_per_sec,
        validated_per_sec,
        details: json!({
            "messages": total,
            "window": WINDOW,
            "all_arrived_at_c": done,
            "frames_at_c": at_c,
            "delivered_by_b": delivered_b,
            "flood_secs": flooded_secs,
            "b_duplicates": stats.duplicates,
            "b_rejected": stats.rejected_total(),
            "b_dropped_queue_full": stats.dropped_queue_full,
            "b_dropped_subscriber": stats.dropped_subscriber,
            "b_frames_sent": stats.frames_sent,
            "b_prepared_in_parallel": stats.prepared_in_parallel,
        }),
    })
}
