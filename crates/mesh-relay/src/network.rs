//! The network layer: the libp2p swarm and the tasks that move frames.
//!
//! Tasks of one relay, all tracked and cancelled together:
//! - the **swarm task** owns the [`Swarm`] and the [`PeerManager`]; it never awaits anything
//!   but its inputs, and creates or removes each peer's link when the first connection opens
//!   or the last one closes;
//! - the **accept task** takes every inbound relay stream at once (libp2p-stream drops streams
//!   when its accept loop falls behind) and starts a reader for it; one stream per peer, a
//!   newer one replaces the older;
//! - **readers** cut frames out of inbound streams, decode them and, for the first copy of a
//!   message from a known origin, check its signature (in parallel, off the core task: see
//!   the `prepare` module), then queue them to the core; a reader that has more whole frames
//!   buffered behind a first copy checks that copy on a short **check task** of its own (at
//!   most 8 per reader) and reads on, queueing the results in the order the frames came;
//! - the **core task** owns the [`RelayCore`]: seen check, replay marks, the checks the
//!   readers left (later copies, unknown origins after their budget), delivery, forwarding
//!   (in full to a few peers, as an announced id to the others: [`crate::lazy`]), and the
//!   lazy-push requests;
//! - **writers**, one per peer, keep one outbound stream open (reopened with backoff) and
//!   drain the peer's bounded queue into it; a full queue drops the frame and counts it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, Transport, allow_block_list,
    connection_limits, identify, noise, ping, tcp, yamux,
};
use libp2p_stream::{Control, IncomingStreams};
use mesh_protocol::{
    Envelope, Identity, MessageId, NodeId, RejectReason, Rejection, VerifiedMessage,
};
use mesh_seen_cache::Lookup;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::core::{Forward, Outcome, Prepared, RelayCore};
use crate::framing::{self, ReadError};
use crate::inbound::{self, RefusalReason};
use crate::lazy::{ControlFrame, HeldIds, Kept, Trees, Wanted};
use crate::peer_manager::{self, Action, PeerManager};
use crate::pex;
use crate::prepare::{Preparer, RecentIds, Started};
use crate::stats::{Stats, StatsSnapshot, add, bump};

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
    /// Our hop distance to the nearest provider (0 when we are one).
    pub own_distance: Option<u8>,
    /// Bans issued so far.
    pub bans: u64,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// First: refuses by remote address before the others count a connection.
    inbound: inbound::Behaviour,
    limits: connection_limits::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
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

/// The yamux settings of every connection: [`MAX_STREAMS_PER_CONNECTION`].
fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_STREAMS_PER_CONNECTION);
    c
}

fn build_swarm(
    identity: &Identity,
    config: &Config,
    stats: Arc<Stats>,
) -> Result<Swarm<Behaviour>> {
    let keypair = identity.libp2p_keypair();
    let transport_err = |e: &dyn std::fmt::Display| Error::Transport(e.to_string());
    // Inbound connections have their own cap (the maximum of peers plus 5, room for the peer
    // manager to take newcomers and prune the farthest, which is how peers that only know a
    // bootstrap node get in; and per address: the `inbound` behaviour); outbound ones have as
    // many slots of their own, so a crowd of inbound connections never keeps the node from
    // dialing its bootstrap and chosen peers.
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_outgoing(Some((config.peers.max_peers + 5) as u32))
        .with_max_established_per_peer(Some(2))
        .with_max_pending_outgoing(Some(16));
    let max_inbound = (config.peers.max_peers + 5).try_into().unwrap_or(u32::MAX);
    let idle = config.idle_connection_timeout;
    let builder = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux_config)
        .map_err(|e| transport_err(&e))?;
    #[cfg(feature = "quic")]
    let builder = builder.with_quic();
    let swarm = builder
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(MemoryTransport::default()
                .upgrade(upgrade::Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux_config()))
        })
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|key| Behaviour {
            inbound: inbound::Behaviour::new(config.inbound.clone(), max_inbound, stats),
            limits: connection_limits::Behaviour::new(limits),
            blocked: allow_block_list::Behaviour::default(),
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                    .with_agent_version(format!("mesh/{}", env!("CARGO_PKG_VERSION")))
                    .with_push_listen_addr_updates(true)
                    // No cache of peers' unfiltered listen addresses for the swarm to dial:
                    // dials go only where the peer manager's address book says.
                    .with_cache_size(0),
            ),
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(jittered(config.ping_interval))
                    .with_timeout(config.ping_timeout),
            ),
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle)
                .with_max_negotiating_inbound_streams(MAX_NEGOTIATING_INBOUND_STREAMS)
        })
        // A stalled handshake holds a pending slot until this runs out.
        .with_connection_timeout(config.inbound.handshake_timeout)
        .build();
    Ok(swarm)
}

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

struct SwarmTask {
    swarm: Swarm<Behaviour>,
    listeners: Vec<libp2p::core::transport::ListenerId>,
    peers: PeerManager,
    commands: mpsc::Receiver<SwarmCommand>,
    status: watch::Sender<Status>,
    exchange: Arc<Mutex<Vec<pex::Entry>>>,
    /// [`PeerManager::exchange_version`] of the list in `exchange` (0: the empty list of a
    /// new manager).
    exchange_version: u64,
    /// Confirming dials in flight ([`Action::Confirm`]), by connection.
    confirming: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    /// Whether refused learned addresses were logged yet (once; then only counted).
    refused_logged: bool,
    is_provider: bool,
    ctx: Context,
}

impl SwarmTask {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.ctx.config.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cancelled = self.ctx.cancel.clone().cancelled_owned();
        tokio::pin!(cancelled);
        loop {
            tokio::select! {
                () = &mut cancelled => break,
                event = self.swarm.select_next_some() => self.on_event(event),
                Some(command) = self.commands.recv() => self.on_command(command),
                _ = tick.tick() => self.on_tick(),
            }
        }
        let links: Vec<Link> = write_links(&self.ctx.links).drain().map(|(_, l)| l).collect();
        for link in links {
            link.cancel.cancel();
        }
        // Close the listeners explicitly: the memory transport keeps a port registered until
        // its listener is removed, even after the swarm is dropped, and a restarted node must
        // be able to listen on the same address again.
        for id in self.listeners.drain(..) {
            self.swarm.remove_listener(id);
        }
    }

    fn on_tick(&mut self) {
        let actions = self.peers.tick(Instant::now());
        for action in actions {
            self.apply(action);
        }
        // Rebuilt only when it may have changed: every relay rebuilt it every second, the
        // largest item of an idle relay's own tasks in a profile of 100 nodes.
        let version = self.peers.exchange_version();
        if self.exchange_version != version {
            self.exchange_version = version;
            let list = self.peers.exchange_list(pex::MAX_ENTRIES);
            *self.exchange.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = list;
        }
        self.publish_status();
    }

    fn publish_status(&self) {
        let peers: Vec<PeerStatus> = self
            .peers
            .connected()
            .map(|p| PeerStatus { peer_id: *p, provider_distance: self.peers.distance(p) })
            .collect();
        metrics::gauge!("mesh_network_connected_peers").set(peers.len() as f64);
        let own_distance = self.peers.own_distance(self.is_provider);
        let known_peers = self.peers.known_count();
        let bans = self.peers.bans_total();
        self.status.send_if_modified(|s| {
            let changed = s.peers != peers
                || s.own_distance != own_distance
                || s.known_peers != known_peers
                || s.bans != bans;
            s.peers = peers;
            s.own_distance = own_distance;
            s.known_peers = known_peers;
            s.bans = bans;
            changed
        });
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Dial(peer, addrs) => {
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    debug!(%peer, error = %e, "dial refused");
                    self.peers.on_dial_failed(&peer, Instant::now());
                }
            }
            Action::Disconnect(peer) => {
                debug!(%peer, "pruning peer (above the maximum, or replaced by an explored one)");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Action::Ban(peer) => {
                warn!(%peer, "peer banned: too many invalid messages");
                bump(&self.ctx.stats.bans);
                metrics::counter!("mesh_relay_bans_total").increment(1);
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.publish_status();
            }
            Action::Unban(peer) => {
                info!(%peer, "peer ban expired");
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
            Action::AskPeers(peer) => self.ask_peers(peer),
            Action::Confirm(peer, addr) => {
                // A second connection to a peer that dialed in, only to prove the address it
                // reported; closed as soon as it is up.
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::Always)
                    .build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        // Bounded by the manager (a few at a time); this only guards against
                        // results that never come.
                        if self.confirming.len() >= 64 {
                            self.confirming.clear();
                        }
                        self.confirming.insert(id, (peer, addr));
                    }
                    Err(_) => self.peers.on_confirm_result(peer, addr, false),
                }
            }
        }
    }

    /// Learned addresses the filter refused: counted, and logged the first time.
    fn count_refused(&mut self, peer: PeerId, how: &'static str, refused: usize) {
        if refused == 0 {
            return;
        }
        metrics::counter!("mesh_relay_addrs_refused_total").increment(refused as u64);
        if self.refused_logged {
            debug!(%peer, refused, how, "learned addresses refused");
        } else {
            self.refused_logged = true;
            info!(
                %peer, refused, how,
                "learned addresses refused: not public (MESH_ALLOW_PRIVATE_ADDRS=false), \
                 link-local or DNS names; further refusals are only counted \
                 (mesh_relay_addrs_refused_total)"
            );
        }
    }

    fn ask_peers(&self, peer: PeerId) {
        if !self.ctx.config.peer_exchange {
            return;
        }
        let mut control = self.ctx.control.clone();
        let swarm_tx = self.ctx.swarm_tx.clone();
        let cancel = self.ctx.cancel.clone();
        self.ctx.tracker.spawn(
            async move {
                let ask = async {
                    let mut stream = control.open_stream(peer, PEX_PROTOCOL).await.ok()?;
                    let mut buf = Vec::new();
                    framing::read_frame(&mut stream, &mut buf).await.ok()?;
                    let _ = stream.close().await;
                    pex::decode(&buf).ok()
                };
                let answer = tokio::select! {
                    () = cancel.cancelled() => None,
                    a = tokio::time::timeout(Duration::from_secs(10), ask) => a.ok().flatten(),
                };
                if let Some(entries) = answer {
                    debug!(%peer, entries = entries.len(), "peer exchange answer");
                    let _ = swarm_tx.try_send(SwarmCommand::PeerExchangeAnswer(peer, entries));
                }
            }
            .instrument(info_span!("pex_ask", %peer)),
        );
    }

    fn on_command(&mut self, command: SwarmCommand) {
        match command {
            SwarmCommand::Dial(addr, reply) => {
                let _ = reply.send(self.dial_addr(addr));
            }
            SwarmCommand::AddAddresses { peer, addrs, pinned, distance } => {
                // Only the peer manager's address book feeds dials: no address goes to the
                // swarm's own (unfiltered) address lists.
                self.peers.add_addresses(peer, addrs, pinned);
                if distance.is_some() {
                    self.peers.set_known_distance(peer, distance);
                }
            }
            SwarmCommand::Charge(peer) => {
                if let Some(action) = self.peers.charge(peer, Instant::now()) {
                    self.apply(action);
                }
            }
            SwarmCommand::ProviderHops(peer, hops) => self.peers.on_provider_hops(&peer, hops),
            SwarmCommand::Block(peer) => {
                self.swarm.behaviour_mut().blocked.block_peer(peer);
            }
            SwarmCommand::Unblock(peer) => {
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
            SwarmCommand::PeerExchangeAnswer(from, entries) => {
                let outcome = self.peers.on_exchange_answer(from, entries);
                if outcome.repeated > 0 {
                    metrics::counter!("mesh_relay_pex_repeats_total")
                        .increment(outcome.repeated as u64);
                }
                self.count_refused(from, "peer exchange", outcome.refused);
            }
            SwarmCommand::SetProvider(provider) => {
                self.is_provider = provider;
                self.publish_status();
            }
        }
    }

    fn dial_addr(&mut self, addr: Multiaddr) -> Result<()> {
        let peer = addr.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
            _ => None,
        });
        let dial_err =
            |e: &dyn std::fmt::Display| Error::Dial { addr: addr.clone(), reason: e.to_string() };
        match peer {
            Some(peer) => {
                if !self.peers.may_dial(&peer, Instant::now()) {
                    return Ok(()); // connected already, or banned
                }
                self.peers.add_addresses(peer, vec![addr.clone()], true);
                self.peers.on_dialing(peer);
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                self.swarm.dial(opts).map_err(|e| dial_err(&e))
            }
            None => self.swarm.dial(addr.clone()).map_err(|e| dial_err(&e)),
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        let now = Instant::now();
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.status.send_modify(|s| s.listen_addrs.push(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.status.send_modify(|s| s.listen_addrs.retain(|a| *a != address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                connection_id,
                ..
            } => {
                if let Some((peer, addr)) = self.confirming.remove(&connection_id) {
                    self.peers.on_confirm_result(peer, addr, true);
                    if num_established.get() > 1 {
                        self.swarm.close_connection(connection_id);
                        return;
                    }
                    // The first link went meanwhile: this one is the link now.
                } else if endpoint.is_dialer() {
                    self.peers.on_dialed(peer_id, endpoint.get_remote_address().clone());
                }
                if num_established.get() == 1 {
                    debug!(peer = %peer_id, "peer connected");
                    self.peers.on_connected(peer_id, now);
                    self.open_link(peer_id);
                    if self.ctx.config.eager_peer_exchange {
                        self.ask_peers(peer_id);
                    }
                    self.publish_status();
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                debug!(peer = %peer_id, "peer disconnected");
                self.peers.on_disconnected(&peer_id, now);
                if let Some(link) = write_links(&self.ctx.links).remove(&peer_id) {
                    link.cancel.cancel();
                }
                self.publish_status();
            }
            SwarmEvent::OutgoingConnectionError { connection_id, .. }
                if self.confirming.contains_key(&connection_id) =>
            {
                if let Some((peer, addr)) = self.confirming.remove(&connection_id) {
                    debug!(%peer, %addr, "reported address not confirmed");
                    self.peers.on_confirm_result(peer, addr, false);
                }
            }
            SwarmEvent::IncomingConnectionError {
                error: libp2p::swarm::ListenError::Denied { cause },
                send_back_addr,
                ..
            } => {
                // The `inbound` behaviour counts its own refusals; these are the others'.
                let reason = if cause.downcast_ref::<connection_limits::Exceeded>().is_some() {
                    Some(RefusalReason::PerPeer)
                } else if cause.downcast_ref::<allow_block_list::Blocked>().is_some() {
                    Some(RefusalReason::Blocked)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    inbound::count_refusal(&self.ctx.stats, reason);
                }
                debug!(remote = %send_back_addr, %cause, "inbound connection refused");
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                debug!(%peer, %error, "dial failed");
                if let libp2p::swarm::DialError::Transport(failed) = &error {
                    for (addr, _) in failed {
                        self.peers.on_addr_failed(&peer, addr);
                    }
                }
                self.peers.on_dial_failed(&peer, now);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocol_version != IDENTIFY_PROTOCOL {
                    debug!(peer = %peer_id, version = %info.protocol_version, "not a mesh node");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let addrs: Vec<Multiaddr> = info.listen_addrs.into_iter().take(16).collect();
                let refused = self.peers.on_identify(peer_id, addrs);
                self.count_refused(peer_id, "identify", refused);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(error),
            })) if !matches!(error, ping::Failure::Unsupported) => {
                // libp2p's ping reports only the second failure in a row. A peer that does
                // not speak ping at all (reported once) keeps its connection: it is no sign
                // of a dead link.
                info!(%peer, %error, "peer stopped answering pings; closing the connection");
                self.swarm.close_connection(connection);
            }
            _ => {}
        }
    }

    /// Creates the peer's queue and starts its writer.
    fn open_link(&mut self, peer: PeerId) {
        let (queue, frames) = mpsc::channel(self.ctx.config.peer_queue_len.max(1));
        let cancel = self.ctx.cancel.child_token();
        let sent_us = Arc::new(RecentIds::default());
        let link = Link { queue, sent_us: sent_us.clone(), cancel: cancel.clone() };
        let previous = write_links(&self.ctx.links).insert(peer, link);
        if let Some(old) = previous {
            old.cancel.cancel();
        }
        let writer = Writer { peer, frames, sent_us, cancel, ctx: self.ctx.clone() };
        self.ctx.tracker.spawn(writer.run().instrument(info_span!("writer", %peer)));
    }
}

fn write_links(links: &Links) -> std::sync::RwLockWriteGuard<'_, HashMap<PeerId, Link>> {
    links.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_links(links: &Links) -> std::sync::RwLockReadGuard<'_, HashMap<PeerId, Link>> {
    links.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Writer {
    peer: PeerId,
    frames: mpsc::Receiver<(Option<MessageId>, Bytes)>,
    sent_us: Arc<RecentIds>,
    cancel: CancellationToken,
    ctx: Context,
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

impl Writer {
    /// Most frames written before a flush.
    const BATCH: usize = 64;

    async fn run(mut self) {
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

/// Takes inbound relay streams as fast as they come and starts a reader for each.
async fn accept_relay_streams(mut incoming: IncomingStreams, ctx: Context) {
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

/// Answers peer-exchange requests with the current list of peers and their addresses.
async fn answer_peer_exchange(
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

/// What a verified first copy that `peer` sent tells of the peer's distance to a provider, as a
/// hop count. Every message is a provider's (a price batch or an announce). The hop fields are
/// outside the signature, so any sender can lower them; a copy claiming to come straight from
/// its origin (hop count 1, or an impossible 0) is taken as such only from the origin itself,
/// and from anyone else as one hop further (the nearest such a peer can honestly be).
fn provider_hops(peer: &PeerId, message: &VerifiedMessage) -> u8 {
    let hops = message.envelope.hop_count;
    if hops > 1 {
        return hops;
    }
    if is_key_of(peer, &message.body.origin_key) { 1 } else { 2 }
}

/// Whether `peer` is the peer id of the ed25519 key `key`, without decoding the key (a point
/// decompression cost a sixth of one relay's rate when done for every message): an ed25519
/// peer id is the key itself, protobuf-encoded under the identity multihash.
fn is_key_of(peer: &PeerId, key: &[u8]) -> bool {
    // Protobuf `PublicKey { Type = Ed25519 (1), Data = 32 bytes }`.
    const PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];
    let hash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    let digest = hash.digest();
    hash.code() == 0
        && digest.len() == PREFIX.len() + key.len()
        && digest[..4] == PREFIX
        && digest[4..] == key[..]
}

/// Announced ids a peer did not send when asked, per charge ([`CoreTask::unserved`]).
const UNSERVED_PER_CHARGE: u32 = 16;
/// Peers whose unserved asks are counted at once (the counts start over beyond it).
const MAX_UNSERVED_PEERS: usize = 1024;

/// How long a reported hop distance stands before a longer one is reported again (paths change).
const HOP_REPORT_PERIOD: Duration = Duration::from_secs(30);

/// How often a rejection that is not charged ([`RejectReason::is_senders_fault`]) is logged
/// at `warn`, per reason.
const UNCHARGED_LOG_PERIOD: Duration = Duration::from_secs(60);

/// When each uncharged reason was last logged, and how many came since: one table entry per
/// reason, so it cannot grow.
#[derive(Debug, Default)]
struct UnchargedLog {
    last: HashMap<RejectReason, (Instant, u64)>,
}

impl UnchargedLog {
    /// `Some(count since the last line)` when a line is due for `reason`.
    fn due(&mut self, reason: RejectReason, now: Instant) -> Option<u64> {
        match self.last.get_mut(&reason) {
            Some((at, since)) if now.duration_since(*at) < UNCHARGED_LOG_PERIOD => {
                *since += 1;
                None
            }
            Some((at, since)) => {
                let count = *since;
                *at = now;
                *since = 0;
                Some(count)
            }
            None => {
                self.last.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

struct CoreTask {
    core: RelayCore<PeerId>,
    /// Rate limit of the log lines of uncharged rejections.
    uncharged_log: UnchargedLog,
    hops_reported: HashMap<PeerId, u8>,
    hops_reset: Instant,
    /// Announced ids not seen yet (lazy push).
    wanted: Wanted<PeerId>,
    /// Per peer, asks it did not serve since its last charge.
    unserved: HashMap<PeerId, u32>,
    /// Forwarded copies kept to answer `WANT`s.
    kept: Kept,
    /// `HAVE`s held back before they are sent.
    held: HeldIds<PeerId>,
    /// `PRUNE`s held back before they are sent.
    held_prunes: HeldIds<PeerId>,
    /// Tree push: per origin, the peers that get its messages in full.
    trees: Trees<PeerId>,
    /// Picks the eager peers of each relayed message.
    rng: StdRng,
    inputs: mpsc::Receiver<CoreInput>,
    deliveries: mpsc::Sender<Delivery>,
    ctx: Context,
}

impl CoreTask {
    async fn run(mut self) {
        // One timer, moved to the next id due to be asked for (lazy push) when that changes.
        let far = || Instant::now() + Duration::from_secs(86_400);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        // A second one for the held `HAVE`s and `PRUNE`s.
        let have_timer = tokio::time::sleep_until(far());
        tokio::pin!(have_timer);
        let mut have_armed: Option<Instant> = None;
        let cancelled = self.ctx.cancel.clone().cancelled_owned();
        tokio::pin!(cancelled);
        loop {
            let due = self.wanted.next_due();
            if due != armed {
                timer.as_mut().reset(due.unwrap_or_else(far));
                armed = due;
            }
            let have_due = match (self.held.due(), self.held_prunes.due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if have_due != have_armed {
                have_timer.as_mut().reset(have_due.unwrap_or_else(far));
                have_armed = have_due;
            }
            // Biased: a due timer first (inputs never starve it), the token last (it is
            // checked under a lock; tokio's task budget makes `recv` yield now and then, so
            // the token is still seen under a steady stream of inputs).
            let input = tokio::select! {
                biased;
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    self.ask_for_wanted();
                    continue;
                }
                () = &mut have_timer, if have_armed.is_some() => {
                    have_armed = None;
                    self.send_held_haves();
                    self.send_held_prunes();
                    continue;
                }
                i = self.inputs.recv() => match i {
                    Some(i) => i,
                    None => return,
                },
                () = &mut cancelled => return,
            };
            match input {
                CoreInput::Frame { peer, frame, prepared } => self.on_frame(peer, &frame, prepared),
                CoreInput::Oversized { peer } => self.reject(
                    peer,
                    &Rejection { reason: RejectReason::FrameTooLarge, source_node_id: None },
                ),
                CoreInput::Publish { frame, reply } => {
                    let _ = reply.send(self.publish(frame));
                }
                CoreInput::SendRaw { peer, frame } => {
                    if let Some(link) = read_links(&self.ctx.links).get(&peer) {
                        let _ = link.queue.try_send((None, Bytes::from(frame)));
                    }
                }
            }
        }
    }

    fn on_frame(
        &mut self,
        peer: PeerId,
        frame: &[u8],
        prepared: Option<Box<Result<Prepared, Rejection>>>,
    ) {
        let now = now_ms() + self.ctx.config.clock_offset_ms;
        if let Some(prepared) = prepared {
            let outcome = self.core.on_prepared(&peer, frame, *prepared, now);
            return self.on_outcome(peer, outcome, now);
        }
        match ControlFrame::parse(frame) {
            None => {}
            Some(Ok(ControlFrame::Have(ids))) => return self.on_have(peer, &ids),
            Some(Ok(ControlFrame::Want(ids))) => return self.on_want(peer, &ids),
            Some(Ok(ControlFrame::Prune(ids))) => return self.on_prune(peer, &ids),
            Some(Err(())) => {
                return self.reject(
                    peer,
                    &Rejection { reason: RejectReason::Malformed, source_node_id: None },
                );
            }
        }
        let outcome = self.core.on_frame(&peer, frame, now);
        self.on_outcome(peer, outcome, now);
    }

    fn on_outcome(&mut self, peer: PeerId, outcome: Outcome<PeerId>, now: i64) {
        let id = match &outcome {
            Outcome::Deliver { message, .. } => Some(message.id),
            Outcome::Reforward(f) => Some(f.id),
            Outcome::Duplicate { id, .. }
            | Outcome::Stale { id }
            | Outcome::Throttled { id }
            | Outcome::RateLimited { id } => Some(*id),
            Outcome::Rejected(_) => None,
        };
        if let Some(id) = id {
            if let Some(link) = read_links(&self.ctx.links).get(&peer) {
                link.sent_us.record(id);
            }
            // Only a copy we can pass on ends the wait for an announced id (the lookup is
            // skipped in the common case of nothing announced and missing).
            if !self.wanted.is_empty() && !self.holds_spent_copy(&id) {
                self.wanted.arrived(&id);
            }
        }
        match outcome {
            Outcome::Deliver { message, forward } => {
                // Distance is learned only here, from verified first copies: the hop fields are
                // not signed, and a duplicate is not verified at all.
                self.report_hops(peer, provider_hops(&peer, &message));
                let latency_ms = (now - message.body.created_at_ms).max(0);
                metrics::histogram!("mesh_message_propagation_latency_seconds")
                    .record(latency_ms as f64 / 1000.0);
                metrics::counter!("mesh_relay_messages_total", "outcome" => "delivered")
                    .increment(1);
                metrics::gauge!("mesh_seen_messages_cache_size").set(self.core.seen().len() as f64);
                bump(&self.ctx.stats.delivered);
                self.ctx.preparer.heard(message.body.origin);
                self.deliver(Delivery { message, from: Some(peer), received_at: Instant::now() });
                if let Some(forward) = forward {
                    self.relay(forward);
                }
            }
            Outcome::Reforward(forward) => {
                bump(&self.ctx.stats.reforwarded);
                metrics::counter!("mesh_relay_messages_total", "outcome" => "reforwarded")
                    .increment(1);
                // Nobody is pruned for it: the TTL is not signed, so any peer can send such a
                // copy, and pruning the first copy's sender would cut us from an honest tree
                // parent.
                self.relay(forward);
            }
            Outcome::Duplicate { id, .. } => {
                bump(&self.ctx.stats.duplicates);
                metrics::counter!("mesh_relay_messages_total", "outcome" => "duplicate")
                    .increment(1);
                // Not for the first message of an origin (see `crate::lazy`).
                if self.ctx.config.lazy.tree && !self.kept.is_first(&id) {
                    self.prune(peer, id);
                }
            }
            Outcome::Stale { id } => {
                debug!(%peer, %id, "older than a message already accepted from its origin; dropped");
                bump(&self.ctx.stats.stale);
                metrics::counter!("mesh_relay_messages_total", "outcome" => "stale").increment(1);
            }
            Outcome::Throttled { id } => {
                debug!(%peer, %id, "unknown origin beyond the peer's budget; dropped unchecked");
                bump(&self.ctx.stats.throttled);
                metrics::counter!("mesh_relay_dropped_total", "reason" => "origin_budget")
                    .increment(1);
            }
            Outcome::RateLimited { id } => {
                debug!(%peer, %id, "origin beyond its rate through this peer; dropped unchecked");
                bump(&self.ctx.stats.rate_limited);
                metrics::counter!("mesh_relay_dropped_total", "reason" => "origin_rate")
                    .increment(1);
            }
            Outcome::Rejected(rejection) => self.reject(peer, &rejection),
        }
    }

    /// Tells the peer manager a peer's distance to a provider when it is new or shorter than
    /// reported in the current period (reporting every copy cost a channel send each).
    fn report_hops(&mut self, peer: PeerId, hop_count: u8) {
        if self.hops_reset.elapsed() >= HOP_REPORT_PERIOD {
            self.hops_reported.clear();
            self.hops_reset = Instant::now();
        }
        let known = self.hops_reported.get(&peer).copied();
        if known.is_none_or(|h| hop_count < h) {
            self.hops_reported.insert(peer, hop_count);
            let _ = self.ctx.swarm_tx.try_send(SwarmCommand::ProviderHops(peer, hop_count));
        }
    }

    /// Counts and logs a rejection, and charges the peer only when the fault is its own
    /// ([`RejectReason::is_senders_fault`]). A rejection that depends on this node's clock,
    /// configuration or memory can come from an honest neighbour, many times a second (a
    /// node whose clock is behind finds every message in its future): it is logged at
    /// most once per reason per [`UNCHARGED_LOG_PERIOD`], with how many came since.
    fn reject(&mut self, peer: PeerId, rejection: &Rejection) {
        let reason = rejection.reason.as_str();
        let charged = rejection.reason.is_senders_fault();
        let source = rejection.source_node_id.map(|s| s.to_string());
        let source = source.as_deref().unwrap_or("unknown");
        if charged {
            warn!(%peer, reason, source_node_id = %source, "validation failed");
        } else if let Some(since) = self.uncharged_log.due(rejection.reason, Instant::now()) {
            warn!(
                %peer,
                reason,
                same_reason_since_last_line = since,
                charged = false,
                source_node_id = %source,
                "validation failed"
            );
        } else {
            debug!(%peer, reason, charged = false, source_node_id = %source, "validation failed");
        }
        self.ctx.stats.reject(rejection.reason);
        metrics::counter!("mesh_validation_failures_total", "reason" => reason).increment(1);
        metrics::counter!("mesh_relay_messages_total", "outcome" => "rejected").increment(1);
        if charged {
            bump(&self.ctx.stats.charged);
            let _ = self.ctx.swarm_tx.try_send(SwarmCommand::Charge(peer));
        }
    }

    fn deliver(&self, delivery: Delivery) {
        if self.deliveries.try_send(delivery).is_err() {
            bump(&self.ctx.stats.dropped_subscriber);
            metrics::counter!("mesh_relay_dropped_total", "reason" => "subscriber_full")
                .increment(1);
        }
    }

    /// Queues `frame` to every peer but the excluded and those that have sent us the message:
    /// in full to `eager` of them picked at random, or under tree push to the origin's children
    /// once it has a tree here, and as a `HAVE` to the others (lazy push). `None` sends the
    /// frame to all (a publisher's own message). Returns how many took the frame.
    fn send_to_peers(
        &mut self,
        id: MessageId,
        origin: NodeId,
        frame: Bytes,
        except: &[PeerId],
        eager: Option<usize>,
    ) -> u64 {
        let lazy = self.ctx.config.lazy;
        let (eager, tree_push) = match eager {
            Some(eager) => (eager, lazy.tree),
            None => (usize::MAX, false),
        };
        let links = read_links(&self.ctx.links);
        let mut candidates: Vec<(&PeerId, &Link)> = links
            .iter()
            .filter(|(peer, link)| !except.contains(peer) && !link.sent_us.contains(&id))
            .collect();
        let tree = if tree_push { self.trees.children(&origin) } else { None };
        // `HAVE`s are held only behind a tree's copies: nodes that a new origin's first
        // message does not reach in full learn of it at once.
        let hold = tree.is_some() && !lazy.have_delay.is_zero();
        let eager = match tree {
            Some(children) => {
                candidates.sort_by_key(|(peer, _)| !children.contains(peer));
                candidates.iter().take_while(|(peer, _)| children.contains(peer)).count()
            }
            None => {
                let eager = eager.min(candidates.len());
                if eager < candidates.len() {
                    candidates.partial_shuffle(&mut self.rng, eager);
                }
                if tree_push {
                    let children = candidates[..eager].iter().map(|(peer, _)| **peer).collect();
                    self.trees.plant(origin, children);
                }
                eager
            }
        };
        let now = Instant::now();
        let have = if eager < candidates.len() && !hold {
            Bytes::from(ControlFrame::Have(vec![id]).encode())
        } else {
            Bytes::new()
        };
        let (mut queued, mut announced) = (0u64, 0u64);
        let mut full = Vec::new();
        for (i, (peer, link)) in candidates.iter().enumerate() {
            if i >= eager && hold {
                if let Some(ids) = self.held.hold(peer, id, now, lazy.have_delay) {
                    full.push((**peer, ids));
                }
                continue;
            }
            let (frame, count) = if i < eager {
                (frame.clone(), &mut queued)
            } else {
                (have.clone(), &mut announced)
            };
            match link.queue.try_send((Some(id), frame)) {
                Ok(()) => *count += 1,
                Err(_) => self.count_queue_full(),
            }
        }
        let stats = &self.ctx.stats;
        add(&stats.frames_queued, queued + announced);
        self.count_haves(announced);
        for (peer, ids) in full {
            if let Some(link) = links.get(&peer) {
                self.send_haves(link, ids);
            }
        }
        queued
    }

    fn count_haves(&self, announced: u64) {
        if announced > 0 {
            add(&self.ctx.stats.haves_sent, announced);
            metrics::counter!("mesh_relay_lazy_total", "event" => "have_sent").increment(announced);
        }
    }

    /// Sends a peer one `HAVE` with those of `ids` it has not sent or announced to us
    /// meanwhile.
    fn send_haves(&self, link: &Link, mut ids: Vec<MessageId>) {
        ids.retain(|id| !link.sent_us.contains(id));
        if ids.is_empty() {
            return;
        }
        let frame = Bytes::from(ControlFrame::Have(ids.clone()).encode());
        if link.queue.try_send((None, frame)).is_ok() {
            bump(&self.ctx.stats.frames_queued);
            self.count_haves(ids.len() as u64);
        } else {
            self.count_queue_full();
        }
    }

    /// Sends the `HAVE`s held back.
    fn send_held_haves(&mut self) {
        let held = self.held.take();
        let links = read_links(&self.ctx.links);
        for (peer, ids) in held {
            if let Some(link) = links.get(&peer) {
                self.send_haves(link, ids);
            }
        }
    }

    /// Tree push: `peer` sent us a copy of `id` we did not need, so it is asked to send only
    /// ids of that origin's messages (`PRUNE`, held like `HAVE`s).
    fn prune(&mut self, peer: PeerId, id: MessageId) {
        let delay = self.ctx.config.lazy.have_delay;
        let ids = if delay.is_zero() {
            vec![id]
        } else {
            match self.held_prunes.hold(&peer, id, Instant::now(), delay) {
                Some(ids) => ids,
                None => return,
            }
        };
        self.send_prunes(peer, ids);
    }

    fn send_prunes(&self, peer: PeerId, ids: Vec<MessageId>) {
        let links = read_links(&self.ctx.links);
        let Some(link) = links.get(&peer) else { return };
        let n = ids.len() as u64;
        let frame = Bytes::from(ControlFrame::Prune(ids).encode());
        if link.queue.try_send((None, frame)).is_ok() {
            bump(&self.ctx.stats.frames_queued);
            add(&self.ctx.stats.prunes_sent, n);
            metrics::counter!("mesh_relay_lazy_total", "event" => "prune_sent").increment(n);
        } else {
            self.count_queue_full();
        }
    }

    /// Sends the `PRUNE`s held back.
    fn send_held_prunes(&mut self) {
        for (peer, ids) in self.held_prunes.take() {
            self.send_prunes(peer, ids);
        }
    }

    /// A peer needed no full copies of these messages: it leaves their origins' trees here.
    /// (Ids we no longer keep are ignored: their origins are unknown by then.)
    fn on_prune(&mut self, peer: PeerId, ids: &[MessageId]) {
        add(&self.ctx.stats.prunes_received, ids.len() as u64);
        let now = Instant::now();
        for id in ids {
            if let Some((origin, _)) = self.kept.get(id, now) {
                self.trees.prune(&origin, &peer);
            }
        }
    }

    fn count_queue_full(&self) {
        bump(&self.ctx.stats.dropped_queue_full);
        metrics::counter!("mesh_relay_dropped_total", "reason" => "queue_full").increment(1);
    }

    /// Relays a new message, or a duplicate with more TTL: in full to `eager_peers` random
    /// peers of those that may still need it, as a `HAVE` to the others (see [`crate::lazy`]).
    fn relay(&mut self, forward: Forward<PeerId>) {
        let lazy = self.ctx.config.lazy;
        let frame = Bytes::from(forward.frame);
        if lazy.is_lazy() {
            let first = lazy.tree && self.trees.children(&forward.origin).is_none();
            self.kept.insert(forward.id, forward.origin, frame.clone(), first, Instant::now());
        }
        let eager = Some(lazy.eager_peers);
        self.send_to_peers(forward.id, forward.origin, frame, &forward.except, eager);
    }

    /// A peer announced messages: it needs none of them from us, and the ones we have not
    /// seen (or hold only with their TTL spent) are asked of it later unless a copy comes
    /// first.
    fn on_have(&mut self, peer: PeerId, ids: &[MessageId]) {
        let stats = &self.ctx.stats;
        add(&stats.haves_received, ids.len() as u64);
        let peers = {
            let links = read_links(&self.ctx.links);
            if let Some(link) = links.get(&peer) {
                for id in ids {
                    link.sent_us.record(*id);
                }
            }
            links.len()
        };
        let now = Instant::now();
        let delay = self.ctx.config.lazy.want_delay;
        for id in ids {
            if self.could_use(id) && !self.wanted.announce(*id, &peer, now, delay, peers) {
                bump(&stats.wanted_full);
            }
        }
    }

    /// Whether a peer's copy of `id` would be of use: we have none, or ours came with its TTL
    /// spent, so we could not pass it on, and the peer's copy may carry more (the hop-TTL
    /// trap: a nearly expired first copy would otherwise hide a fresher one that a neighbour
    /// only announced, and nodes within the TTL's reach would miss the message); and we did
    /// not reject a copy of it for a reason every copy shares ([`crate::lazy::RejectedIds`]).
    fn could_use(&self, id: &MessageId) -> bool {
        self.seen_ttl(id).is_none_or(|ttl| ttl <= 1) && !self.core.was_rejected(id)
    }

    /// Whether our only copies of `id` came with TTL 1 (delivered, but not forwarded).
    fn holds_spent_copy(&self, id: &MessageId) -> bool {
        self.seen_ttl(id).is_some_and(|ttl| ttl <= 1)
    }

    /// The highest TTL a copy of `id` came with, if we have seen it.
    fn seen_ttl(&self, id: &MessageId) -> Option<u8> {
        match self.core.seen().lookup(id) {
            Lookup::New => None,
            Lookup::Seen { max_ttl } => Some(max_ttl),
        }
    }

    /// A peer asked for messages: each kept one is sent once to it, and under tree push the
    /// peer gets the messages of its origin in full from now on.
    fn on_want(&mut self, peer: PeerId, ids: &[MessageId]) {
        let links = read_links(&self.ctx.links);
        let Some(link) = links.get(&peer) else { return };
        let now = Instant::now();
        for id in ids {
            // Ids the peer sent or announced to us, or that we already sent it, are not sent.
            if link.sent_us.contains(id) {
                continue;
            }
            let Some((origin, frame)) = self.kept.get(id, now) else {
                bump(&self.ctx.stats.wants_unknown);
                continue;
            };
            if self.ctx.config.lazy.tree && self.trees.graft(&origin, &peer) {
                bump(&self.ctx.stats.grafts);
                metrics::counter!("mesh_relay_lazy_total", "event" => "graft").increment(1);
            }
            link.sent_us.record(*id);
            if link.queue.try_send((None, frame)).is_ok() {
                bump(&self.ctx.stats.frames_queued);
                bump(&self.ctx.stats.wants_served);
                metrics::counter!("mesh_relay_lazy_total", "event" => "want_served").increment(1);
            } else {
                self.count_queue_full();
            }
        }
    }

    /// Asks announcers for the announced messages still missing, one `WANT` per peer.
    fn ask_for_wanted(&mut self) {
        let due = self.wanted.take_due(Instant::now(), self.ctx.config.lazy.want_timeout);
        for peer in self.wanted.take_unserved() {
            self.unserved(peer);
        }
        let mut per_peer: HashMap<PeerId, Vec<MessageId>> = HashMap::new();
        for (peer, id) in due {
            if self.could_use(&id) {
                per_peer.entry(peer).or_default().push(id);
            }
        }
        let links = read_links(&self.ctx.links);
        for (peer, ids) in per_peer {
            let Some(link) = links.get(&peer) else { continue };
            for chunk in ids.chunks(crate::lazy::MAX_IDS) {
                let frame = Bytes::from(ControlFrame::Want(chunk.to_vec()).encode());
                if link.queue.try_send((None, frame)).is_ok() {
                    bump(&self.ctx.stats.frames_queued);
                    let n = chunk.len() as u64;
                    add(&self.ctx.stats.wants_sent, n);
                    metrics::counter!("mesh_relay_lazy_total", "event" => "want_sent").increment(n);
                }
            }
        }
    }

    /// A peer announced an id that was given up (no announcer sent it when asked): counted,
    /// and charged once per [`UNSERVED_PER_CHARGE`] (an honest peer can fail now and then,
    /// when its kept copy was forgotten or its queue was full; one announcing ids it never
    /// serves is banned within a few hundred).
    fn unserved(&mut self, peer: PeerId) {
        bump(&self.ctx.stats.wants_unserved);
        metrics::counter!("mesh_relay_lazy_total", "event" => "want_unserved").increment(1);
        if self.unserved.len() >= MAX_UNSERVED_PEERS && !self.unserved.contains_key(&peer) {
            self.unserved.clear();
        }
        let count = self.unserved.entry(peer).or_default();
        *count += 1;
        if *count >= UNSERVED_PER_CHARGE {
            *count = 0;
            debug!(%peer, "announced messages it did not send when asked; charged");
            let _ = self.ctx.swarm_tx.try_send(SwarmCommand::Charge(peer));
        }
    }

    fn publish(&mut self, frame: Vec<u8>) -> Result<usize> {
        let now = now_ms() + self.ctx.config.clock_offset_ms;
        let message = self.core.publish(&frame, now).map_err(Error::Rejected)?;
        bump(&self.ctx.stats.published);
        let frame = Bytes::from(frame);
        let origin = message.body.origin;
        // Every peer gets the message in full: each is a child of the origin's tree (and the
        // copy is kept for a peer whose copy is lost with its stream and that asks).
        if self.ctx.config.lazy.tree {
            self.kept.insert(message.id, origin, frame.clone(), false, Instant::now());
        }
        let queued = self.send_to_peers(message.id, origin, frame, &[], None) as usize;
        self.deliver(Delivery { message, from: None, received_at: Instant::now() });
        Ok(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::Identity;

    #[tokio::test(start_paused = true)]
    async fn uncharged_rejections_are_logged_once_a_period_per_reason_with_a_count() {
        let mut log = UnchargedLog::default();
        let t0 = Instant::now();
        assert_eq!(log.due(RejectReason::FutureTimestamp, t0), Some(0));
        for _ in 0..5 {
            assert_eq!(log.due(RejectReason::FutureTimestamp, t0), None);
        }
        assert_eq!(log.due(RejectReason::Replay, t0), Some(0), "each reason has its own line");
        let later = t0 + UNCHARGED_LOG_PERIOD;
        assert_eq!(log.due(RejectReason::FutureTimestamp, later), Some(5));
        assert_eq!(log.due(RejectReason::FutureTimestamp, later), None);
        assert!(log.last.len() <= RejectReason::ALL.len());
    }

    #[test]
    fn a_peer_id_is_matched_with_its_own_key_only() {
        let (a, b) = (Identity::generate(), Identity::generate());
        assert!(super::is_key_of(&a.peer_id(), &a.public_key()));
        assert!(!super::is_key_of(&a.peer_id(), &b.public_key()));
        assert!(!super::is_key_of(&libp2p::PeerId::random(), &a.public_key()));
    }
}
