//! The baseline: libp2p gossipsub on the same graph, with the same messages, validated as
//! strictly as ours.
//!
//! Each node is a swarm with the memory transport, noise and yamux (as our relay's), and only
//! the gossipsub behaviour, driven by one task. Messages are signed by the publishing peer
//! (`ValidationMode::Strict`), and every new message is checked by `mesh_protocol::Validator`
//! and the replay marks, in that task, before `report_message_validation_result` lets
//! gossipsub forward it. Copies received (duplicates included) and message bytes sent come
//! from gossipsub's own metrics (`topic_msg_recv_counts_unfiltered`, `topic_msg_sent_bytes`),
//! one registry per node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, ValidationMode};
use libp2p::metrics::Registry;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm, SwarmBuilder, Transport, noise, yamux};
use mesh_protocol::{HighWaterMarks, MessageId, RejectReason, Validator};
use rand::Rng;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Args, NetResult, Workload, cpu_time, poll_until};

/// Gossipsub's heartbeat (its default): meshes are repaired and IHAVE gossip is sent this often.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// The one topic every node subscribes to.
const TOPIC: &str = "mesh/prices";
/// How long to wait for the graph to connect.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the meshes may take to reach `mesh_n_low` (see [`measure`]).
const MESH_TIMEOUT: Duration = Duration::from_secs(150);

/// `(mesh_n_low, mesh_n_high, mesh_outbound_min)` for `--mesh-n` on a graph of `--degree`:
/// low is two thirds of mesh_n (4 for 6, gossipsub's default), high is the degree (a node has
/// no more peers than that), outbound_min a third of mesh_n (2 for 6).
pub fn mesh_params(args: &Args) -> (usize, usize, usize) {
    let low = (args.mesh_n * 2 / 3).max(1);
    let high = args.degree.max(args.mesh_n);
    let outbound = (args.mesh_n / 3).min(low);
    (low, high, outbound)
}

/// The gossipsub settings; checked here, since `ConfigBuilder::build` does not check the
/// default mesh parameters.
fn config(args: &Args) -> anyhow::Result<gossipsub::Config> {
    let (low, high, outbound) = mesh_params(args);
    anyhow::ensure!(
        outbound <= low && low <= args.mesh_n && args.mesh_n <= high && outbound * 2 <= args.mesh_n,
        "inconsistent gossipsub mesh parameters: outbound_min {outbound}, low {low}, n {}, high {high}",
        args.mesh_n
    );
    let config = gossipsub::ConfigBuilder::default()
        .mesh_n(args.mesh_n)
        .mesh_n_low(low)
        .mesh_n_high(high)
        .mesh_outbound_min(outbound)
        .gossip_lazy(args.mesh_n)
        .heartbeat_interval(HEARTBEAT)
        .heartbeat_initial_delay(Duration::from_millis(100))
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(mesh_protocol::MAX_FRAME_LEN + 1024)
        .build()?;
    Ok(config)
}

/// What a node's task shares with the benchmark.
#[derive(Debug, Default)]
struct Shared {
    /// Peers with at least one connection.
    connected: AtomicUsize,
    /// Peers in the node's mesh for the topic.
    mesh: AtomicUsize,
    /// First delivery (validated and accepted) of each message.
    delivered: Mutex<HashMap<MessageId, Instant>>,
    /// Messages our validation refused (replays ignored, other rejections).
    ignored: AtomicU64,
    rejected: AtomicU64,
    /// Publishes gossipsub refused.
    publish_errors: AtomicU64,
}

impl Shared {
    fn delivered(&self) -> std::sync::MutexGuard<'_, HashMap<MessageId, Instant>> {
        self.delivered.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Publish(Vec<u8>, oneshot::Sender<Result<(), String>>),
}

/// One gossipsub node.
struct Node {
    addr: Multiaddr,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    registry: Registry,
    task: JoinHandle<()>,
}

type Behaviour = gossipsub::Behaviour;

fn build_node(config: &gossipsub::Config, cancel: &CancellationToken) -> anyhow::Result<Node> {
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let mut registry = Registry::default();
    let mut swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(MemoryTransport::default()
                .upgrade(upgrade::Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })?
        .with_behaviour(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(Behaviour::new(MessageAuthenticity::Signed(key.clone()), config.clone())?
                .with_metrics(&mut registry, gossipsub::MetricsConfig::default()))
        })?
        // Gossipsub keeps only mesh links alive; the benchmark's graph must not thin out.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    let topic = IdentTopic::new(TOPIC);
    swarm.behaviour_mut().subscribe(&topic)?;
    let listen: Multiaddr =
        format!("/memory/{}", rand::thread_rng().gen_range(1u64..u64::MAX / 2)).parse()?;
    swarm.listen_on(listen.clone())?;
    let addr = listen.with(libp2p::multiaddr::Protocol::P2p(*swarm.local_peer_id()));
    let (commands, inputs) = mpsc::channel(64);
    let shared = Arc::new(Shared::default());
    let task = tokio::spawn(drive(swarm, topic, inputs, shared.clone(), cancel.clone()));
    Ok(Node { addr, commands, shared, registry, task })
}

/// The node's task: owns the swarm, validates every new message, runs the commands.
async fn drive(
    mut swarm: Swarm<Behaviour>,
    topic: IdentTopic,
    mut commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let validator = Validator::default();
    let mut marks = HighWaterMarks::default();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let hash = topic.hash();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(command) = commands.recv() => match command {
                Command::Dial(addr, reply) => {
                    let _ = reply.send(swarm.dial(addr).map_err(|e| e.to_string()));
                }
                Command::Publish(data, reply) => {
                    let result = swarm.behaviour_mut().publish(topic.clone(), data);
                    if result.is_err() {
                        shared.publish_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = reply.send(result.map(|_| ()).map_err(|e| e.to_string()));
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                }) => {
                    // The same checks our relay runs on a new message: decode, signature and
                    // every rule, then the replay marks.
                    let verdict = match validator.validate(
                        &message.data,
                        mesh_testkit::now_ms(),
                        &mut marks,
                    ) {
                        Ok(verified) => {
                            shared.delivered().entry(verified.id).or_insert_with(Instant::now);
                            MessageAcceptance::Accept
                        }
                        Err(r) if r.reason == RejectReason::Replay => {
                            shared.ignored.fetch_add(1, Ordering::Relaxed);
                            MessageAcceptance::Ignore
                        }
                        Err(_) => {
                            shared.rejected.fetch_add(1, Ordering::Relaxed);
                            MessageAcceptance::Reject
                        }
                    };
                    swarm.behaviour_mut().report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        verdict,
                    );
                }
                SwarmEvent::ConnectionEstablished { num_established, .. }
                    if num_established.get() == 1 =>
                {
                    shared.connected.fetch_add(1, Ordering::Relaxed);
                }
                SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                    shared.connected.fetch_sub(1, Ordering::Relaxed);
                }
                _ => {}
            },
            _ = tick.tick() => {
                shared.mesh.store(swarm.behaviour().mesh_peers(&hash).count(), Ordering::Relaxed);
            }
        }
    }
}

/// Sums of gossipsub's metrics over a node's registry.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    recv_unfiltered: u64,
    recv_unique: u64,
    sent: u64,
    sent_bytes: u64,
    iwant: u64,
    idontwant: u64,
    removed_queued: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Self) {
        self.recv_unfiltered += o.recv_unfiltered;
        self.recv_unique += o.recv_unique;
        self.sent += o.sent;
        self.sent_bytes += o.sent_bytes;
        self.iwant += o.iwant;
        self.idontwant += o.idontwant;
        self.removed_queued += o.removed_queued;
    }
}

fn counters(registry: &Registry) -> anyhow::Result<Counters> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    let mut c = Counters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else { continue };
        let name = name_labels.split('{').next().unwrap_or(name_labels);
        let name = name.strip_suffix("_total").unwrap_or(name);
        let Ok(value) = value.parse::<f64>() else { continue };
        let value = value as u64;
        match name {
            "topic_msg_recv_counts_unfiltered" => c.recv_unfiltered += value,
            "topic_msg_recv_counts" => c.recv_unique += value,
            "topic_msg_sent_counts" => c.sent += value,
            "topic_msg_sent_bytes" => c.sent_bytes += value,
            "topic_iwant_msgs" => c.iwant += value,
            "idontwant_msgs" => c.idontwant += value,
            "removed_queued_messages" => c.removed_queued += value,
            _ => {}
        }
    }
    Ok(c)
}

fn total(nodes: &[Node]) -> anyhow::Result<Counters> {
    let mut sum = Counters::default();
    for n in nodes {
        sum += counters(&n.registry)?;
    }
    Ok(sum)
}

/// Builds the gossipsub net on `edges`, publishes the workload, collects the figures.
pub async fn run(
    args: &Args,
    workload: &Workload,
    edges: &[(usize, usize)],
) -> anyhow::Result<NetResult> {
    let config = config(args)?;
    let cancel = CancellationToken::new();
    let nodes = (0..args.nodes)
        .map(|_| build_node(&config, &cancel))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let result = measure(args, workload, edges, &nodes).await;
    cancel.cancel();
    for node in nodes {
        let _ = tokio::time::timeout(Duration::from_secs(5), node.task).await;
    }
    result
}

async fn measure(
    args: &Args,
    workload: &Workload,
    edges: &[(usize, usize)],
    nodes: &[Node],
) -> anyhow::Result<NetResult> {
    // Exactly our graph: the same edges, dialled in the same direction.
    for &(a, b) in edges {
        let (reply, answer) = oneshot::channel();
        nodes[a].commands.send(Command::Dial(nodes[b].addr.clone(), reply)).await?;
        answer.await?.map_err(|e| anyhow::anyhow!("dial {a} -> {b}: {e}"))?;
    }
    let mut degrees = vec![0usize; nodes.len()];
    for &(a, b) in edges {
        degrees[a] += 1;
        degrees[b] += 1;
    }
    let linked = poll_until(SETUP_TIMEOUT, || {
        nodes.iter().zip(&degrees).all(|(n, d)| n.shared.connected.load(Ordering::Relaxed) == *d)
    })
    .await;
    anyhow::ensure!(linked, "gossipsub: not every link connected within {SETUP_TIMEOUT:?}");
    let (low, ..) = mesh_params(args);
    // A node whose GRAFT was refused (the peer's mesh was at mesh_n_high) waits out
    // gossipsub's prune backoff (60 s) before it asks that peer again: allow for two rounds.
    let meshing = std::time::Instant::now();
    let meshed = poll_until(MESH_TIMEOUT, || {
        nodes.iter().all(|n| n.shared.mesh.load(Ordering::Relaxed) >= low)
    })
    .await;
    if !meshed {
        let below: Vec<usize> = nodes
            .iter()
            .map(|n| n.shared.mesh.load(Ordering::Relaxed))
            .filter(|&m| m < low)
            .collect();
        anyhow::bail!(
            "gossipsub: {} of {} meshes still below mesh_n_low {low} after {MESH_TIMEOUT:?} \
             (their sizes: {below:?})",
            below.len(),
            nodes.len()
        );
    }
    let mesh_formed_secs = meshing.elapsed().as_secs_f64();
    let mesh_sizes: Vec<usize> =
        nodes.iter().map(|n| n.shared.mesh.load(Ordering::Relaxed)).collect();
    let before = total(nodes)?;

    let mut tick = tokio::time::interval(workload.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut published_at = Vec::with_capacity(workload.len());
    let cpu_before = cpu_time()?;
    let first = Instant::now();
    for (k, frame) in workload.frames.iter().enumerate() {
        tick.tick().await;
        let at = Instant::now();
        let (reply, answer) = oneshot::channel();
        nodes[workload.publishers[k]].commands.send(Command::Publish(frame.clone(), reply)).await?;
        answer.await?.map_err(|e| anyhow::anyhow!("gossipsub publish of message {k}: {e}"))?;
        published_at.push(at);
    }
    let publish_secs = first.elapsed().as_secs_f64();

    let expected = ((args.nodes - 1) * workload.len()) as u64;
    poll_until(Duration::from_secs(args.timeout_secs), || {
        nodes.iter().map(|n| n.shared.delivered().len() as u64).sum::<u64>() >= expected
    })
    .await;
    let complete_secs = first.elapsed().as_secs_f64();
    let cpu = cpu_time()?.saturating_sub(cpu_before);
    // Let the last duplicates land: wait until the copy counters stop moving for a while.
    let mut last = total(nodes)?;
    let mut still_since = Instant::now();
    let quiet_deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < quiet_deadline && still_since.elapsed() < Duration::from_millis(300) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = total(nodes)?;
        if now.recv_unfiltered != last.recv_unfiltered || now.sent != last.sent {
            still_since = Instant::now();
            last = now;
        }
    }

    let mut result =
        NetResult { expected, publish_secs, complete_secs, cpu, ..NetResult::default() };
    for (k, id) in workload.ids.iter().enumerate() {
        let publisher = workload.publishers[k];
        let mut latest = Some(published_at[k]);
        for (_, node) in nodes.iter().enumerate().filter(|(i, _)| *i != publisher) {
            match node.shared.delivered().get(id) {
                Some(at) => {
                    result.delivered += 1;
                    latest = latest.map(|l| l.max(*at));
                }
                None => latest = None,
            }
        }
        match latest {
            Some(l) => result.record_latency(
                workload,
                k,
                l.saturating_duration_since(published_at[k]).as_secs_f64() * 1000.0,
            ),
            None => result.incomplete += 1,
        }
    }
    let after = total(nodes)?;
    result.copies = after.recv_unfiltered - before.recv_unfiltered;
    result.bytes_sent = after.sent_bytes - before.sent_bytes;
    let sum = |f: fn(&Shared) -> u64| nodes.iter().map(|n| f(&n.shared)).sum::<u64>();
    result.details = json!({
        "messages_sent": after.sent - before.sent,
        "unique_received": after.recv_unique - before.recv_unique,
        "iwant_messages": after.iwant - before.iwant,
        "idontwant_messages": after.idontwant - before.idontwant,
        "queued_messages_removed": after.removed_queued - before.removed_queued,
        "ignored_replays": sum(|s| s.ignored.load(Ordering::Relaxed)),
        "rejected": sum(|s| s.rejected.load(Ordering::Relaxed)),
        "publish_errors": sum(|s| s.publish_errors.load(Ordering::Relaxed)),
        "mesh_size_min": mesh_sizes.iter().min(),
        "mesh_formed_secs": mesh_formed_secs,
        "mesh_size_max": mesh_sizes.iter().max(),
        "mesh_size_mean": mesh_sizes.iter().sum::<usize>() as f64 / mesh_sizes.len() as f64,
    });
    Ok(result)
}
