//! The network layer: the libp2p swarm and the tasks that move frames, one file per role.
//!
//! Tasks of one relay, all tracked and cancelled together:
//! - the **swarm task** (`swarm.rs`) owns the [`Swarm`](libp2p::Swarm) and the
//!   [`PeerManager`]; it never awaits anything but its
//!   inputs, and creates or removes each peer's link when the first connection opens or the
//!   last one closes;
//! - the **accept task** and the **readers** (`reader.rs`): every inbound relay stream is
//!   taken at once (libp2p-stream drops streams when its accept loop falls behind) and gets a
//!   reader; one stream per peer, a newer one replaces the older. Readers cut frames out of
//!   the stream, decode them and, for the first copy of a message from a known origin, check
//!   its signature (in parallel, off the core task: the `prepare` module), then queue them to
//!   the core; a reader that has more whole frames buffered behind a first copy checks that
//!   copy on a short **check task** of its own (at most `PIPELINE_DEPTH`, 8, per reader) and
//!   reads on, queueing the results in the order the frames came;
//! - the **core task** (`core_task.rs`) owns the [`RelayCore`]: seen check, replay marks, the
//!   checks the readers left (later copies, unknown origins after their budget), delivery,
//!   forwarding (in full to a few peers, as an announced id to the others: [`crate::lazy`]),
//!   and the lazy-push requests; `uncharged.rs` rate-limits its log of rejections that are
//!   not the sender's fault;
//! - **writers** (`writer.rs`), one per peer, keep one outbound stream open (reopened with
//!   backoff) and drain the peer's bounded queue into it; a full queue drops the frame and
//!   counts it;
//! - the **peer-exchange task** (`exchange.rs`) answers `/mesh/pex/1.0.0` requests.
//!
//! This file holds the handle ([`Relay`]), what the tasks share (`Context`, the links, the
//! inputs of the swarm and core tasks) and the start-up that wires them together.

mod core_task;
mod exchange;
mod reader;
mod swarm;
mod uncharged;
mod writer;

use core_task::CoreTask;
use exchange::answer_peer_exchange;
use reader::accept_relay_streams;
use swarm::{SwarmTask, build_swarm};
use uncharged::UnchargedLog;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use libp2p::{Multiaddr, PeerId, StreamProtocol};
use libp2p_stream::Control;
use mesh_protocol::{Envelope, Identity, MessageId, NodeId, Rejection, VerifiedMessage};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::core::{Prepared, RelayCore};
use crate::lazy::{HeldIds, Kept, Trees, Wanted};
use crate::peer_manager::{self, PeerManager};
use crate::pex;
use crate::prepare::{Preparer, RecentIds};
use crate::stats::{Stats, StatsSnapshot};

/// The relay protocol.
pub const RELAY_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/relay/1.0.0");
/// The peer-exchange protocol.
pub const PEX_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/pex/1.0.0");
/// What identify announces; peers announcing something else are not mesh nodes.
pub const IDENTIFY_PROTOCOL: &str = "/mesh/1.0.0";

/// Errors of starting or using a relay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport could not be built.
    #[error("building the libp2p transport: {0}")]
    Transport(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A message could not be encoded.
    #[error(transparent)]
    Codec(#[from] mesh_protocol::CodecError),
    /// Our own message broke a validation rule.
    #[error("own message rejected: {0}")]
    Rejected(Rejection),
    /// A dial was refused at once.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The relay is shutting down.
    #[error("the relay has stopped")]
    Stopped,
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A new valid message for the local node.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message (hop fields of the copy that arrived first).
    pub message: VerifiedMessage,
    /// The peer it came from; `None` for a message this node published.
    pub from: Option<PeerId>,
    /// When it arrived.
    pub received_at: Instant,
}

/// One connected peer, as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its id.
    pub peer_id: PeerId,
    /// Hops from it to the nearest provider, when known.
    pub provider_distance: Option<u8>,
}

/// The relay's view of the network.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Addresses we listen on.
    pub listen_addrs: Vec<Multiaddr>,
    /// Connected peers.
    pub peers: Vec<PeerStatus>,
    /// Peers known with addresses (connected or not).
    pub known_peers: usize,
    /// Of those, how many each network holds (an IPv4 /24, an IPv6 /48; loopback only where
    /// it counts as one): bounded by `peers.max_known_per_subnet`.
    pub known_by_subnet: std::collections::BTreeMap<crate::subnet::Subnet, usize>,
    /// Our hop distance to the nearest provider (0 when we are one).
    pub own_distance: Option<u8>,
    /// Bans issued so far.
    pub bans: u64,
}

enum SwarmCommand {
    Dial(Multiaddr, oneshot::Sender<Result<()>>),
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        pinned: bool,
        distance: Option<u8>,
    },
    Charge(PeerId),
    ProviderHops(PeerId, u8),
    Block(PeerId),
    Unblock(PeerId),
    /// A peer-exchange answer and the peer that gave it.
    PeerExchangeAnswer(PeerId, Vec<pex::Entry>),
    SetProvider(bool),
}

enum CoreInput {
    /// A frame and what its reader made of it (`None`: not an envelope; boxed, as a verified
    /// message is large and the queue holds many inputs).
    Frame {
        peer: PeerId,
        frame: Vec<u8>,
        prepared: Option<Box<Result<Prepared, Rejection>>>,
    },
    Oversized {
        peer: PeerId,
    },
    Publish {
        frame: Vec<u8>,
        reply: oneshot::Sender<Result<usize>>,
    },
    SendRaw {
        peer: PeerId,
        frame: Vec<u8>,
    },
}

struct Link {
    /// Frames for the peer with their message id (`None` for raw frames).
    queue: mpsc::Sender<(Option<MessageId>, Bytes)>,
    /// Ids this peer sent us lately: a queued copy of one of them is not sent back.
    sent_us: Arc<RecentIds>,
    cancel: CancellationToken,
}

type Links = Arc<RwLock<HashMap<PeerId, Link>>>;

struct Inner {
    peer_id: PeerId,
    node_id: NodeId,
    swarm_tx: mpsc::Sender<SwarmCommand>,
    core_tx: mpsc::Sender<CoreInput>,
    status: watch::Receiver<Status>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Handle to a running relay. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("peer_id", &self.inner.peer_id).finish_non_exhaustive()
    }
}

/// Whether `addr` is a QUIC address (`/udp/<port>/quic-v1`).
fn is_quic(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    addr.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// `interval` stretched by a random share of up to a third of it.
fn jittered(interval: Duration) -> Duration {
    interval + interval.mul_f64(rand::random::<f64>() / 3.0)
}

/// Streams one connection may hold at once. The relay needs a few: its stream each way,
/// identify, ping and a peer-exchange request each way; yamux's default is 512, at 256 KiB of
/// receive window each (docs/security.md: memory per connection).
pub const MAX_STREAMS_PER_CONNECTION: usize = 16;
/// Inbound streams of one connection still negotiating their protocol (libp2p's default: 128).
pub const MAX_NEGOTIATING_INBOUND_STREAMS: usize = 8;

impl Relay {
    /// Starts a relay for `identity`: listens, then runs until [`Relay::shutdown`] or until
    /// `cancel` fires. New valid messages (from peers and our own) arrive on the returned
    /// receiver, each exactly once.
    pub async fn start(
        identity: &Identity,
        config: Config,
        cancel: CancellationToken,
    ) -> Result<(Relay, mpsc::Receiver<Delivery>)> {
        let stats = Arc::new(Stats::default());
        let mut swarm = build_swarm(identity, &config, stats.clone())?;
        let mut listeners = Vec::new();
        for addr in &config.listen_addrs {
            if is_quic(addr) && !cfg!(feature = "quic") {
                warn!(
                    "not listening on {addr}: this build has no QUIC (cargo feature `quic`, on \
                     in mesh-node's default build)"
                );
                continue;
            }
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| Error::Listen { addr: addr.clone(), reason: format!("{e:?}") })?;
            listeners.push(id);
        }
        if listeners.is_empty() && !config.listen_addrs.is_empty() {
            return Err(Error::Transport(
                "no listen address this build supports (QUIC needs the cargo feature `quic`)"
                    .into(),
            ));
        }
        let peer_id = *swarm.local_peer_id();
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control
            .accept(RELAY_PROTOCOL)
            .map_err(|e| Error::Transport(format!("registering {RELAY_PROTOCOL}: {e}")))?;
        let pex_incoming = if config.peer_exchange {
            Some(
                control
                    .accept(PEX_PROTOCOL)
                    .map_err(|e| Error::Transport(format!("registering {PEX_PROTOCOL}: {e}")))?,
            )
        } else {
            None
        };

        let (swarm_tx, swarm_rx) = mpsc::channel(1024);
        let (core_tx, core_rx) = mpsc::channel(config.inbound_queue_len.max(1));
        let (delivery_tx, delivery_rx) = mpsc::channel(config.delivery_queue_len.max(1));
        let (status_tx, status_rx) = watch::channel(Status::default());
        let links: Links = Arc::default();
        let exchange: Arc<Mutex<Vec<pex::Entry>>> = Arc::default();
        let tracker = TaskTracker::new();

        let mut core = RelayCore::new(config.core.clone());
        let loaded = core.seen_mut().load(&config.seen_preload, mesh_protocol::MAX_TTL);
        if loaded > 0 {
            info!(loaded, "seen message ids reloaded");
        }

        let span = info_span!("relay", peer = %peer_id);
        // Claims only need to outlive the spread of one message's copies (seconds): a
        // forgotten claim costs one more signature check, never a wrong outcome.
        let claims = mesh_seen_cache::Config {
            capacity: config.core.seen.capacity.min(16_384),
            ttl: config.core.seen.ttl.min(Duration::from_secs(60)),
        };
        let preparer = Preparer::new(
            config.core.validation.clone(),
            claims,
            config.core.known_origins,
            core.origin_rates(),
        );
        let ctx = Context {
            preparer: Arc::new(preparer),
            control: control.clone(),
            core_tx: core_tx.clone(),
            swarm_tx: swarm_tx.clone(),
            stats: stats.clone(),
            links: links.clone(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            config: Arc::new(config),
        };
        tracker.spawn(
            SwarmTask {
                swarm,
                listeners,
                peers: PeerManager::new(
                    peer_id,
                    peer_manager::Config {
                        // Addresses are confirmed only to be passed on.
                        confirm_reported: ctx.config.peers.confirm_reported
                            && ctx.config.peer_exchange,
                        ..ctx.config.peers.clone()
                    },
                ),
                confirming: HashMap::new(),
                refused_logged: false,
                commands: swarm_rx,
                status: status_tx,
                exchange: exchange.clone(),
                exchange_version: 0,
                is_provider: false,
                ctx: ctx.clone(),
            }
            .run()
            .instrument(info_span!(parent: &span, "swarm")),
        );
        tracker.spawn(
            accept_relay_streams(incoming, ctx.clone())
                .instrument(info_span!(parent: &span, "accept")),
        );
        if let Some(pex_incoming) = pex_incoming {
            tracker.spawn(
                answer_peer_exchange(pex_incoming, exchange, ctx.clone())
                    .instrument(info_span!(parent: &span, "pex")),
            );
        }
        tracker.spawn(
            CoreTask {
                core,
                uncharged_log: UnchargedLog::default(),
                hops_reported: HashMap::new(),
                hops_reset: Instant::now(),
                wanted: Wanted::new(ctx.config.lazy.max_wanted),
                unserved: HashMap::new(),
                kept: Kept::new(ctx.config.lazy.keep, ctx.config.lazy.keep_frames),
                held: HeldIds::default(),
                held_prunes: HeldIds::default(),
                trees: Trees::new(ctx.config.lazy.max_trees),
                rng: StdRng::from_entropy(),
                inputs: core_rx,
                deliveries: delivery_tx,
                ctx: ctx.clone(),
            }
            .run()
            .instrument(info_span!(parent: &span, "core")),
        );

        let relay = Relay {
            inner: Arc::new(Inner {
                peer_id,
                node_id: identity.node_id(),
                swarm_tx,
                core_tx,
                status: status_rx,
                stats,
                cancel,
                tracker,
            }),
        };
        Ok((relay, delivery_rx))
    }

    /// Our libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// Our node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The current network status (updated as peers come and go).
    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.inner.status.clone()
    }

    /// Number of connected peers.
    pub fn connected_peers(&self) -> usize {
        self.inner.status.borrow().peers.len()
    }

    /// The relay's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Waits until the relay listens on at least one address and returns them.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        let mut status = self.inner.status.clone();
        let status =
            status.wait_for(|s| !s.listen_addrs.is_empty()).await.map_err(|_| Error::Stopped)?;
        Ok(status.listen_addrs.clone())
    }

    /// Publishes a message this node originates. Returns the number of peers it was queued
    /// to. It is also delivered locally, like a message from a peer.
    pub async fn publish(&self, envelope: &Envelope) -> Result<usize> {
        let frame = mesh_protocol::encode_envelope(envelope)?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .core_tx
            .send(CoreInput::Publish { frame, reply })
            .await
            .map_err(|_| Error::Stopped)?;
        answer.await.map_err(|_| Error::Stopped)?
    }

    /// Dials an address (with `/p2p/<peer id>` when known; such peers are kept and redialed).
    pub async fn dial(&self, addr: Multiaddr) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.command(SwarmCommand::Dial(addr, reply)).await?;
        answer.await.map_err(|_| Error::Stopped)?
    }

    /// Tells the peer manager about a peer's addresses (from local discovery: mDNS, BLE).
    /// They are claims anyone on the link can make: filtered ([`crate::AddrFilter`], private LAN
    /// addresses allowed), bounded, and never displacing what the operator or the peer itself
    /// said ([`crate::AddrBook`]). `distance` is the peer's advertised hop distance to a
    /// provider.
    pub async fn add_peer_addresses(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        distance: Option<u8>,
    ) -> Result<()> {
        self.command(SwarmCommand::AddAddresses { peer, addrs, pinned: false, distance }).await
    }

    /// Adds a bootstrap peer: kept, and redialed whenever the node is below its minimum.
    pub async fn add_bootstrap(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<()> {
        self.command(SwarmCommand::AddAddresses { peer, addrs, pinned: true, distance: None }).await
    }

    /// Whether this node is a provider (its own hop distance is then 0).
    pub async fn set_provider(&self, provider: bool) -> Result<()> {
        self.command(SwarmCommand::SetProvider(provider)).await
    }

    /// Blocks a peer: closes its connections and refuses new ones until [`Relay::unblock`]
    /// (operators, and the test harness to cut links).
    pub async fn block(&self, peer: PeerId) -> Result<()> {
        self.command(SwarmCommand::Block(peer)).await
    }

    /// Lifts a [`Relay::block`] (or a ban).
    pub async fn unblock(&self, peer: PeerId) -> Result<()> {
        self.command(SwarmCommand::Unblock(peer)).await
    }

    /// Sends raw bytes as one frame to a connected peer, bypassing every check. For
    /// diagnostics and for tests that play a hostile peer; a peer that receives garbage from
    /// us will charge and eventually ban us.
    pub async fn send_raw_frame(&self, peer: PeerId, frame: Vec<u8>) -> Result<()> {
        self.inner
            .core_tx
            .send(CoreInput::SendRaw { peer, frame })
            .await
            .map_err(|_| Error::Stopped)
    }

    async fn command(&self, command: SwarmCommand) -> Result<()> {
        self.inner.swarm_tx.send(command).await.map_err(|_| Error::Stopped)
    }

    /// Stops every task of the relay and waits for them (bounded by `grace`).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(grace, self.inner.tracker.wait()).await.is_err() {
            warn!("relay tasks did not stop within {grace:?}");
        }
    }
}

/// What the tasks of one relay share.
#[derive(Clone)]
struct Context {
    control: Control,
    /// Decodes and checks frames on the reader tasks.
    preparer: Arc<Preparer>,
    core_tx: mpsc::Sender<CoreInput>,
    swarm_tx: mpsc::Sender<SwarmCommand>,
    stats: Arc<Stats>,
    links: Links,
    cancel: CancellationToken,
    tracker: TaskTracker,
    config: Arc<Config>,
}

fn write_links(links: &Links) -> std::sync::RwLockWriteGuard<'_, HashMap<PeerId, Link>> {
    links.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_links(links: &Links) -> std::sync::RwLockReadGuard<'_, HashMap<PeerId, Link>> {
    links.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The byte a reader sends when it has taken a stream: libp2p-stream drops inbound streams
/// its accept loop could not take in time (libp2p#5651), and the opener only learns of it from
/// this byte (or its absence).
const STREAM_READY: u8 = 0x01;
/// Bytes a reader takes from its stream at once. A few frames of a busy link arrive together,
/// and the reader can see that the next one is there before it prepares the current one.
const READ_BUFFER: usize = 16 * 1024;
/// Frames of one link being prepared on other tasks at most (while more wait in the buffer).
const PIPELINE_DEPTH: usize = 8;
/// How long a writer waits for [`STREAM_READY`].
const READY_TIMEOUT: Duration = Duration::from_secs(5);
