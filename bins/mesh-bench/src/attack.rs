//! `mesh-bench attack --kind K`: one hostile peer ([`mesh_testkit::hostile::HostilePeer`])
//! attacks one node (the victim, node 0) of an in-process mesh of honest relays over TCP on
//! loopback while three honest publishers send price batches. The same mesh runs once without
//! the attack (baseline) and once with it; each run reports the share of honest messages
//! delivered to every honest node (`attack_honest_delivery_ratio`, goal 1.0) and at the
//! victim, and how much this process's resident memory grew (all nodes live in this process,
//! so it is the mesh's memory, the victim's included). The parameters also give, per run,
//! the messages delivered, rate-limited and dropped on full queues over all honest nodes.
//! With `MESH_BENCH_DEBUG` set, each honest message still missing somewhere after the run is
//! printed on stderr with the nodes that lack it, then the victim's counters.
//!
//! The provider-coordination kinds (`skewed-provider`, `lease-squat`) run on whole nodes with
//! providers instead: see [`crate::attack_rounds`].

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::AsyncWriteExt;
use mesh_protocol::{Envelope, Identity, MessageId};
use mesh_relay::network::RELAY_PROTOCOL;
use mesh_relay::{Config, StatsSnapshot};
use mesh_testkit::hostile::{self, HostileConfig, HostilePeer};
use mesh_testkit::{TestNet, Topology, Transport, eventually, now_ms, price_batch};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::report::{Figure, Report};

/// Which attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Well-formed batches whose signature does not verify.
    BadSignatureFlood,
    /// Validly signed batches from 50 throwaway keys, each publishing at full speed.
    ThrowawayKeys,
    /// 60 batches of 1,000 assets each, dated 4 s ahead (moving replay floors).
    ReplayMarks,
    /// Tiny batches claiming every round around now, and `u64::MAX`.
    RoundClaims,
    /// `HAVE`s of 10,000 ids that are never served, again and again.
    FakeHaves,
    /// Copies of one message with the TTL raised step by step, for every new message.
    RisingTtl,
    /// Copies (own and captured honest messages) claiming hop 0.
    HopZero,
    /// 200 stalled handshakes and fresh keys connecting, from one address (127.0.0.2).
    ConnFlood,
    /// 500 streams opened and filled on one connection, again and again.
    StreamFlood,
    /// Two providers sharing Redis, one with its clock 8 s ahead (whole nodes, see
    /// `--rounds`).
    SkewedProvider,
    /// The lease keys of the next five rounds written into Redis ahead of the providers
    /// (whole nodes, see `--rounds`).
    LeaseSquat,
}

impl Kind {
    /// The kinds that attack the providers' round coordination on whole nodes.
    fn coordination(self) -> bool {
        matches!(self, Self::SkewedProvider | Self::LeaseSquat)
    }
}

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The attack.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Honest nodes (relay kinds).
    #[arg(long, default_value_t = 50)]
    pub nodes: usize,
    /// Links per honest node (random regular graph; relay kinds).
    #[arg(long, default_value_t = 6)]
    pub degree: usize,
    /// Seconds of honest traffic in each run (relay kinds).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Attack frames a second (frame attacks).
    #[arg(long, default_value_t = 5_000)]
    pub rate: u32,
    /// Honest batches a second (three publishers in turn).
    #[arg(long, default_value_t = 10)]
    pub honest_rate: u32,
    /// Graph seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rounds of 2 s measured in each run (coordination kinds, which use the Redis at
    /// `MESH_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`, under a prefix of their own).
    #[arg(long, default_value_t = 15)]
    pub rounds: u64,
    /// Consumer nodes next to the two providers (coordination kinds).
    #[arg(long, default_value_t = 3)]
    pub consumers: usize,
}

/// The attacker's address for the connection attacks.
const ATTACKER_IP: [u8; 4] = [127, 0, 0, 2];
const VICTIM: usize = 0;

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    if args.kind.coordination() {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return rt.block_on(crate::attack_rounds::measure(args));
    }
    anyhow::ensure!(args.nodes > args.degree + 3, "--nodes must exceed --degree + 3");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(measure(args))
}

/// What one run measured.
#[derive(Debug)]
struct Run {
    messages: usize,
    delivery: f64,
    victim_delivery: f64,
    rss_growth: u64,
    attack_sent: usize,
    victim: StatsSnapshot,
    victim_peers: usize,
    /// Summed over every honest node: messages delivered (honest and junk), dropped for an
    /// origin's or the young origins' rate, and frames dropped on a full peer queue.
    mesh_delivered: u64,
    mesh_rate_limited: u64,
    mesh_queue_full: u64,
}

async fn measure(args: &Args) -> anyhow::Result<Report> {
    let baseline = one_run(args, None).await?;
    let attack = one_run(args, Some(args.kind)).await?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(Report {
        bench: "attack",
        params: json!({
            "kind": format!("{:?}", args.kind),
            "nodes": args.nodes,
            "degree": args.degree,
            "seconds": args.seconds,
            "attack_rate_per_s": args.rate,
            "honest_batches_per_s": args.honest_rate,
            "transport": "tcp",
            "victim": VICTIM,
            "honest_messages": [baseline.messages, attack.messages],
            "victim_rejected": attack.victim.rejected,
            "victim_throttled": attack.victim.throttled,
            "victim_bans": attack.victim.bans,
            "victim_connections_refused": attack.victim.connections_refused,
            "victim_peers_at_the_end": attack.victim_peers,
            "victim_rate_limited": attack.victim.rate_limited,
            "victim_delivered": attack.victim.delivered,
            "mesh_delivered": [baseline.mesh_delivered, attack.mesh_delivered],
            "mesh_rate_limited": [baseline.mesh_rate_limited, attack.mesh_rate_limited],
            "mesh_dropped_queue_full": [baseline.mesh_queue_full, attack.mesh_queue_full],
            "note": "memory is this process's: all nodes and the attacker",
        }),
        figures: vec![
            Figure::at_least("attack_honest_delivery_ratio", attack.delivery, "ratio", 1.0),
            Figure::plain("attack_victim_delivery_ratio", attack.victim_delivery, "ratio"),
            Figure::plain("baseline_honest_delivery_ratio", baseline.delivery, "ratio"),
            Figure::plain("attack_rss_growth", mib(attack.rss_growth), "MiB"),
            Figure::plain("baseline_rss_growth", mib(baseline.rss_growth), "MiB"),
            Figure::plain("attack_units_sent", attack.attack_sent as f64, "frames/conns/streams"),
        ],
    })
}

fn provider(n: u8) -> Identity {
    Identity::from_seed([n; 32])
}

async fn one_run(args: &Args, kind: Option<Kind>) -> anyhow::Result<Run> {
    let connection_attack = matches!(kind, Some(Kind::ConnFlood));
    let net = TestNet::builder()
        .nodes(args.nodes)
        .transport(Transport::Tcp)
        .seed(args.seed)
        .topology(Topology::RandomRegular { degree: args.degree })
        .configure(move |i, c: &mut Config| {
            if i == VICTIM && connection_attack {
                // The attacker's 127.0.0.2 shares loopback's /24 with the honest nodes.
                c.inbound.limit_loopback = true;
                c.inbound.max_pending_per_subnet = 1_000;
                c.inbound.max_per_subnet = 1_000;
            }
        })
        .build()
        .await?;
    let victim = net.node(VICTIM).running()?.clone();
    let victim_addr = net.node(VICTIM).addr();
    let stop = CancellationToken::new();
    let sent = Arc::new(AtomicUsize::new(0));
    let attacker = match kind {
        Some(kind) => {
            let hostile = HostilePeer::start(HostileConfig::default()).await?;
            let peer = hostile.connect(&victim_addr).await?;
            let own = hostile.identity().clone();
            let (rate, seconds) = (args.rate, args.seconds + 2);
            let t0 = now_ms();
            let frames =
                tokio::task::spawn_blocking(move || frames_for(kind, &own, rate, seconds, t0))
                    .await??;
            let (stop, sent, addr) = (stop.clone(), sent.clone(), victim_addr.clone());
            Some(tokio::spawn(async move {
                let plan = (rate, frames);
                if let Err(e) = attack(kind, &hostile, peer, &addr, plan, &sent, &stop).await {
                    eprintln!("attack ended: {e:#}");
                }
                drop(hostile);
            }))
        }
        None => None,
    };
    // From here: the attack's frames are made (the attacker's memory, not the mesh's).
    let rss_before = hostile::resident_memory_bytes().unwrap_or(0);
    let publishers = [args.nodes / 4, args.nodes / 2, 3 * args.nodes / 4];
    let keys: Vec<Identity> = (1..=3).map(provider).collect();
    let mut ids: Vec<(usize, MessageId)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.honest_rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut round = 0u64;
    let mut last_ts = 0;
    while Instant::now() < end {
        tick.tick().await;
        let p = (round % 3) as usize;
        let ts = now_ms().max(last_ts + 1);
        last_ts = ts;
        let m = price_batch(&keys[p], round, ts, 20, 10)?;
        round += 1;
        net.publish(publishers[p], &m).await?;
        ids.push((publishers[p], m.message_id()));
    }
    stop.cancel();
    if let Some(a) = attacker {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    let everywhere = || {
        ids.iter().all(|(from, id)| {
            (0..net.len()).all(|i| i == *from || net.node(i).received(id).is_some())
        })
    };
    // Bounded wait: what has not arrived by then counts as lost.
    let _ = eventually(Duration::from_secs(10), "honest messages delivered", everywhere).await;
    if std::env::var_os("MESH_BENCH_DEBUG").is_some() {
        for (from, id) in &ids {
            let missing: Vec<usize> = (0..net.len())
                .filter(|i| i != from && net.node(*i).received(id).is_none())
                .collect();
            if !missing.is_empty() {
                eprintln!("{id:?} from node {from}: missing at {missing:?}");
            }
        }
        eprintln!("victim: {:?}", victim.stats());
    }
    let mut delivered = 0usize;
    let mut expected = 0usize;
    let mut at_victim = 0usize;
    for (from, id) in &ids {
        for i in (0..net.len()).filter(|i| i != from) {
            expected += 1;
            if net.node(i).received(id).is_some() {
                delivered += 1;
                at_victim += usize::from(i == VICTIM);
            }
        }
    }
    let rss_growth = hostile::resident_memory_bytes().unwrap_or(0).saturating_sub(rss_before);
    let all: Vec<StatsSnapshot> =
        (0..net.len()).filter_map(|i| Some(net.node(i).running().ok()?.stats())).collect();
    let run = Run {
        mesh_delivered: all.iter().map(|s| s.delivered).sum(),
        mesh_rate_limited: all.iter().map(|s| s.rate_limited).sum(),
        mesh_queue_full: all.iter().map(|s| s.dropped_queue_full).sum(),
        messages: ids.len(),
        delivery: delivered as f64 / expected.max(1) as f64,
        victim_delivery: at_victim as f64 / ids.len().max(1) as f64,
        rss_growth,
        attack_sent: sent.load(Ordering::Relaxed),
        victim: victim.stats(),
        victim_peers: victim.status().peers.len(),
    };
    net.shutdown().await;
    Ok(run)
}

/// Sends `frames` (slices of them, each slice sent in one write) at `rate` frames a second
/// until they run out, `stop`, or a send fails; `live` may add frames to each slice.
async fn send_at_rate(
    hostile: &HostilePeer,
    peer: mesh_relay::PeerId,
    rate: u32,
    frames: Vec<Vec<u8>>,
    sent: &AtomicUsize,
    stop: &CancellationToken,
    mut live: impl FnMut(usize) -> anyhow::Result<Vec<Vec<u8>>>,
) -> anyhow::Result<()> {
    let per_slice = (rate as usize / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut frames = frames.into_iter();
    let mut i = 0;
    while !stop.is_cancelled() {
        tick.tick().await;
        let mut slice: Vec<Vec<u8>> = frames.by_ref().take(per_slice).collect();
        if slice.is_empty() {
            return Ok(());
        }
        slice.extend(live(i)?);
        i += 1;
        hostile.send_all(peer, &slice).await?;
        sent.fetch_add(slice.len(), Ordering::Relaxed);
    }
    Ok(())
}

/// The frames of a frame attack for `seconds` at `rate`, made before the run on the blocking
/// pool (signing is CPU work the attacker would do on its own machine). Timestamps follow the
/// schedule the frames will be sent on, from `t0`.
fn frames_for(
    kind: Kind,
    own: &Identity,
    rate: u32,
    seconds: u64,
    t0: i64,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let rate = match kind {
        Kind::ReplayMarks => rate.min(60),
        Kind::RoundClaims => rate.min(1_000),
        _ => rate,
    }
    .max(1);
    let count = rate as usize * seconds as usize;
    // When frame `i` goes out, in Unix ms.
    let at = |i: usize| t0 + (i as i64 * 1_000) / rate as i64;
    let mut out = Vec::with_capacity(count);
    match kind {
        Kind::BadSignatureFlood => {
            let forger = provider(66);
            for i in 0..count {
                let m = price_batch(&forger, i as u64, at(i), 1, 10)?;
                out.push(hostile::frame(&hostile::bad_signature(m), 10, 1)?);
            }
        }
        Kind::ThrowawayKeys => {
            let keys: Vec<Identity> = (0..50).map(|_| Identity::generate()).collect();
            for i in 0..count {
                // Each key's timestamps rise: one ms apart at least.
                let m = price_batch(&keys[i % keys.len()], i as u64, at(i) + i as i64, 10, 10)?;
                out.push(hostile::frame(&m, 10, 1)?);
            }
        }
        Kind::ReplayMarks => {
            // Batches of 1,000 assets dated 4 s ahead of their sending (within the skew).
            for i in 0..count {
                out.push(hostile::frame(&big_batch(own, i as u64, at(i) + 4_000)?, 10, 1)?);
            }
        }
        Kind::RoundClaims => {
            for i in 0..count {
                let now_round = (at(i).max(0) as u64) / 2_000;
                let round = match i % 4 {
                    0 => u64::MAX,
                    k => now_round + k as u64 - 1,
                };
                out.push(hostile::frame(
                    &price_batch(own, round, at(i) + i as i64, 1, 10)?,
                    10,
                    1,
                )?);
            }
        }
        Kind::FakeHaves => {
            let haves = hostile::haves(&hostile::random_ids(10_000));
            out.extend(haves.iter().cycle().take(count).cloned());
        }
        Kind::RisingTtl => {
            let ttls = mesh_protocol::MAX_TTL as usize;
            for n in 0..count / ttls {
                let m = price_batch(own, n as u64, at(n * ttls) + n as i64, 5, 1)?;
                for ttl in 1..=mesh_protocol::MAX_TTL {
                    out.push(hostile::frame(&m, ttl, 1)?);
                }
            }
        }
        Kind::HopZero => {
            for i in 0..count / 2 {
                let m = price_batch(own, i as u64, at(2 * i) + i as i64, 1, 20)?;
                out.push(hostile::frame(&m, 20, 0)?);
            }
        }
        Kind::ConnFlood | Kind::StreamFlood | Kind::SkewedProvider | Kind::LeaseSquat => {}
    }
    Ok(out)
}

async fn attack(
    kind: Kind,
    hostile: &HostilePeer,
    peer: mesh_relay::PeerId,
    addr: &mesh_relay::Multiaddr,
    (rate, frames): (u32, Vec<Vec<u8>>),
    sent: &AtomicUsize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let rate = match kind {
        Kind::ReplayMarks => rate.min(60),
        Kind::RoundClaims => rate.min(1_000),
        Kind::HopZero => rate / 2,
        _ => rate,
    };
    match kind {
        Kind::ConnFlood => conn_flood(addr, sent, stop).await,
        Kind::StreamFlood => stream_flood(hostile, peer, sent, stop).await,
        Kind::HopZero => {
            // Besides its own messages, copies of the honest ones it captured, claiming hop 0.
            let mut captured: Vec<Envelope> = Vec::new();
            send_at_rate(hostile, peer, rate, frames, sent, stop, |i| {
                if i % 10 == 0 {
                    captured = hostile.captured();
                }
                captured.iter().rev().take(1).map(|e| hostile::frame(e, 20, 0)).collect()
            })
            .await
        }
        _ => send_at_rate(hostile, peer, rate, frames, sent, stop, |_| Ok(Vec::new())).await,
    }
}

/// A batch of 1,000 assets.
fn big_batch(key: &Identity, round: u64, ts: i64) -> anyhow::Result<Envelope> {
    price_batch(key, round, ts, mesh_protocol::MAX_PRICES_PER_BATCH, 10)
}

async fn conn_flood(
    addr: &mesh_relay::Multiaddr,
    sent: &AtomicUsize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let target = hostile::socket_addr(addr).ok_or_else(|| anyhow::anyhow!("not TCP: {addr}"))?;
    let source = IpAddr::from(ATTACKER_IP);
    let mut held: Vec<Option<tokio::net::TcpStream>> = (0..200).map(|_| None).collect();
    let mut sybils: Vec<HostilePeer> = Vec::new();
    while !stop.is_cancelled() {
        for slot in held.iter_mut() {
            let open = slot.as_ref().is_some_and(|s| {
                matches!(s.try_read(&mut [0u8; 1]), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            if !open {
                *slot = hostile::stalled_tcp(target, Some(source)).await.ok();
                sent.fetch_add(usize::from(slot.is_some()), Ordering::Relaxed);
            }
        }
        // Ten fresh keys a round, at most 50 held.
        sybils.retain(|s| s.is_connected(&addr_peer(addr)));
        for _ in 0..10 {
            if sybils.len() >= 50 {
                break;
            }
            let config = HostileConfig { source_ip: Some(source), ..Default::default() };
            let s = HostilePeer::start(config).await?;
            sent.fetch_add(1, Ordering::Relaxed);
            if s.connect(addr).await.is_ok() {
                sybils.push(s);
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    Ok(())
}

fn addr_peer(addr: &mesh_relay::Multiaddr) -> mesh_relay::PeerId {
    addr.iter()
        .find_map(|p| match p {
            mesh_relay::Protocol::P2p(peer) => Some(peer),
            _ => None,
        })
        .unwrap_or(mesh_relay::PeerId::random())
}

async fn stream_flood(
    hostile: &HostilePeer,
    peer: mesh_relay::PeerId,
    sent: &AtomicUsize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    // A frame announced at the largest length and sent but for its last byte: the victim's
    // reader waits for it and is never handed anything to charge for. Every tenth stream is
    // a peer-exchange request filled with the same bytes (never read by the victim).
    let len = mesh_protocol::MAX_FRAME_LEN;
    let fill = Arc::new(vec![7u8; len - 1]);
    while !stop.is_cancelled() {
        let opened = futures::future::join_all((0..500).map(|n| {
            let fill = fill.clone();
            async move {
                let mut s = if n % 10 == 9 {
                    hostile.open_pex_stream(peer).await.ok()?
                } else {
                    hostile.open_stream(peer, RELAY_PROTOCOL).await.ok()?
                };
                let write = async {
                    s.write_all(&(len as u32).to_be_bytes()).await?;
                    s.write_all(&fill).await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
                Some(s)
            }
        }))
        .await;
        sent.fetch_add(opened.iter().flatten().count(), Ordering::Relaxed);
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        drop(opened);
    }
    Ok(())
}
