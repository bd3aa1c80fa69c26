//! [`HostilePeer`]: one libp2p peer that speaks the relay's wire protocol and nothing of its
//! rules, for the attack tests and `mesh-bench attack`. It sends any frame (envelopes with any
//! key, signature, TTL and hop count; the lazy-push control frames `HAVE`, `WANT`, `PRUNE`;
//! bytes that are no frame at all) at any rate, opens as many connections and streams as it
//! likes, and can dial from a chosen source address (`127.0.0.2` is another IP than the
//! honest nodes' `127.0.0.1` on Linux loopback). It also accepts the relay streams its victims
//! open to it and keeps what they send, so captured messages can be replayed, and can lie about
//! addresses: report any as its own over identify, and answer every peer-exchange request with
//! made-up entries.
//!
//! ```no_run
//! # async fn demo(victim: mesh_relay::Multiaddr) -> anyhow::Result<()> {
//! use mesh_protocol::Identity;
//! use mesh_testkit::hostile::{self, HostilePeer};
//! use mesh_testkit::{now_ms, price_batch};
//!
//! let attacker = HostilePeer::start(Default::default()).await?;
//! let peer = attacker.connect(&victim).await?;
//! let junk = hostile::bad_signature(price_batch(&Identity::generate(), 1, now_ms(), 1, 10)?);
//! attacker.send(peer, hostile::frame(&junk, 20, 0)?).await?;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt, StreamExt};
use libp2p::core::transport::{
    DialOpts as TransportDialOpts, ListenerId, MemoryTransport, TransportError, TransportEvent,
};
use libp2p::core::upgrade;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{StreamProtocol, SwarmBuilder, Transport, identify, noise, ping, yamux};
use mesh_protocol::{Envelope, Identity, MessageId, NodeId, Payload};
use mesh_relay::lazy::{ControlFrame, MAX_IDS};
use mesh_relay::network::{IDENTIFY_PROTOCOL, PEX_PROTOCOL, RELAY_PROTOCOL};
use mesh_relay::{Multiaddr, PeerId, framing, pex};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The byte a relay's reader sends when it has taken a stream (see `mesh_relay::network`).
const STREAM_READY: u8 = 0x01;
/// Most envelopes kept from what victims sent (oldest dropped first).
const MAX_CAPTURED: usize = 10_000;
/// How long opening a stream or a connection may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How a [`HostilePeer`] starts.
#[derive(Debug, Clone)]
pub struct HostileConfig {
    /// Its key (a fresh one when `None`).
    pub identity: Option<Identity>,
    /// The source address of its TCP connections (`None`: the system's choice).
    pub source_ip: Option<IpAddr>,
    /// Ask with a `WANT` for every id a victim announces with a `HAVE`, so that full copies
    /// are captured even under lazy push.
    pub want_announced: bool,
    /// Announce the mesh's identify protocol (a peer that does not is dropped by relays).
    pub pose_as_node: bool,
    /// Addresses it reports as its own over identify (with `pose_as_node`).
    pub reported_addrs: Vec<Multiaddr>,
    /// Answers every peer-exchange request with these entries, as they are (repeats
    /// included); `None`: it takes no peer-exchange requests.
    pub pex_answer: Option<Vec<pex::Entry>>,
}

impl Default for HostileConfig {
    fn default() -> Self {
        Self {
            identity: None,
            source_ip: None,
            want_announced: true,
            pose_as_node: true,
            reported_addrs: Vec::new(),
            pex_answer: None,
        }
    }
}

/// Control frames received from victims.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlCounts {
    /// `HAVE` frames.
    pub haves: u64,
    /// `WANT` frames.
    pub wants: u64,
    /// `PRUNE` frames.
    pub prunes: u64,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: libp2p::swarm::behaviour::toggle::Toggle<identify::Behaviour>,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
}

enum Command {
    Dial(DialOpts, oneshot::Sender<anyhow::Result<PeerId>>),
    Disconnect(PeerId),
}

#[derive(Default)]
struct Shared {
    connected: Mutex<HashSet<PeerId>>,
    captured: Mutex<VecDeque<Envelope>>,
    control: Mutex<ControlCounts>,
    /// One relay stream per victim for [`HostilePeer::send`].
    outbound: tokio::sync::Mutex<HashMap<PeerId, libp2p::Stream>>,
    /// Peer-exchange answers written, per victim.
    pex_answered: Mutex<HashMap<PeerId, usize>>,
}

/// A peer that plays by none of the relay's rules. Cheap to clone; everything stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct HostilePeer {
    identity: Identity,
    peer_id: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    _guard: Arc<tokio_util::sync::DropGuard>,
}

impl std::fmt::Debug for HostilePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostilePeer").field("peer_id", &self.peer_id).finish_non_exhaustive()
    }
}

impl HostilePeer {
    /// Starts the peer (it listens nowhere; it only dials).
    pub async fn start(config: HostileConfig) -> anyhow::Result<Self> {
        let identity = config.identity.clone().unwrap_or_else(Identity::generate);
        let source_ip = config.source_ip;
        let pose = config.pose_as_node;
        let mut swarm = SwarmBuilder::with_existing_identity(identity.libp2p_keypair())
            .with_tokio()
            .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(BoundTcp { source_ip }
                    .upgrade(upgrade::Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()))
            })?
            .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(MemoryTransport::default()
                    .upgrade(upgrade::Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()))
            })?
            .with_behaviour(|key| Behaviour {
                identify: pose
                    .then(|| {
                        identify::Behaviour::new(identify::Config::new(
                            IDENTIFY_PROTOCOL.to_owned(),
                            key.public(),
                        ))
                    })
                    .into(),
                ping: ping::Behaviour::default(),
                stream: libp2p_stream::Behaviour::new(),
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        for addr in &config.reported_addrs {
            swarm.add_external_address(addr.clone());
        }
        let peer_id = *swarm.local_peer_id();
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control.accept(RELAY_PROTOCOL)?;
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared::default());
        if let Some(answer) = &config.pex_answer {
            let requests = control.accept(PEX_PROTOCOL)?;
            let answer = pex::encode(answer);
            tokio::spawn(answer_pex(requests, answer, shared.clone(), cancel.clone()));
        }
        let (commands, mut command_rx) = mpsc::channel::<Command>(64);

        let stop = cancel.clone();
        let state = shared.clone();
        tokio::spawn(async move {
            let mut dials: HashMap<ConnectionId, oneshot::Sender<anyhow::Result<PeerId>>> =
                HashMap::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    Some(command) = command_rx.recv() => match command {
                        Command::Dial(opts, reply) => {
                            let id = opts.connection_id();
                            match swarm.dial(opts) {
                                Ok(()) => { dials.insert(id, reply); }
                                Err(e) => { let _ = reply.send(Err(e.into())); }
                            }
                        }
                        Command::Disconnect(peer) => { let _ = swarm.disconnect_peer_id(peer); }
                    },
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::ConnectionEstablished { peer_id, connection_id, .. } => {
                            lock(&state.connected).insert(peer_id);
                            if let Some(reply) = dials.remove(&connection_id) {
                                let _ = reply.send(Ok(peer_id));
                            }
                        }
                        SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                            if let Some(reply) = dials.remove(&connection_id) {
                                let _ = reply.send(Err(error.into()));
                            }
                        }
                        SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                            lock(&state.connected).remove(&peer_id);
                        }
                        _ => {}
                    },
                }
            }
        });

        let peer = Self {
            identity,
            peer_id,
            control,
            commands,
            shared,
            _guard: Arc::new(cancel.clone().drop_guard()),
        };
        tokio::spawn(peer.clone_weak().take_inbound(incoming, config.want_announced, cancel));
        Ok(peer)
    }

    /// A handle for the inbound task that does not keep the peer alive.
    fn clone_weak(&self) -> InboundCtx {
        InboundCtx { control: self.control.clone(), shared: self.shared.clone() }
    }

    /// Its key.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Its libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Opens a new connection to `addr` (another one even when connected already) and returns
    /// the peer at the other end once the connection is established.
    pub async fn connect(&self, addr: &Multiaddr) -> anyhow::Result<PeerId> {
        let peer = addr.iter().find_map(|p| match p {
            Protocol::P2p(peer) => Some(peer),
            _ => None,
        });
        let opts = match peer {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::Always)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Dial(opts, reply))
            .await
            .map_err(|_| anyhow::anyhow!("hostile peer stopped"))?;
        tokio::time::timeout(OPEN_TIMEOUT * 2, answer)
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))??
    }

    /// Whether a connection to `peer` is open.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        lock(&self.shared.connected).contains(peer)
    }

    /// Closes every connection to `peer`.
    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Disconnect(peer)).await;
    }

    /// Opens a stream of any protocol and hands it over as it is.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> anyhow::Result<libp2p::Stream> {
        let mut control = self.control.clone();
        Ok(tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, protocol)).await??)
    }

    /// Opens a relay stream and waits until the victim's reader has taken it.
    pub async fn open_relay_stream(&self, peer: PeerId) -> anyhow::Result<libp2p::Stream> {
        let mut stream = self.open_stream(peer, RELAY_PROTOCOL).await?;
        let mut ready = [0u8; 1];
        tokio::time::timeout(OPEN_TIMEOUT, stream.read_exact(&mut ready)).await??;
        anyhow::ensure!(ready[0] == STREAM_READY, "unexpected ready byte {}", ready[0]);
        Ok(stream)
    }

    /// Opens a peer-exchange stream (never read by this peer unless the caller does).
    pub async fn open_pex_stream(&self, peer: PeerId) -> anyhow::Result<libp2p::Stream> {
        self.open_stream(peer, PEX_PROTOCOL).await
    }

    /// Sends `frame` (any bytes) as one length-prefixed frame on the relay stream kept for
    /// `peer` (opened on first use, reopened once when it broke).
    pub async fn send(&self, peer: PeerId, frame: Vec<u8>) -> anyhow::Result<()> {
        self.send_all(peer, std::slice::from_ref(&frame)).await
    }

    /// Sends several frames in one write (a flood's batch).
    pub async fn send_all(&self, peer: PeerId, frames: &[Vec<u8>]) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(frames.iter().map(|f| f.len() + 4).sum());
        for f in frames {
            framing::put_frame(&mut out, f)?;
        }
        self.send_bytes(peer, &out).await
    }

    /// Writes raw bytes on the relay stream kept for `peer`: prefixes of any length, frames
    /// cut in the middle.
    pub async fn send_bytes(&self, peer: PeerId, bytes: &[u8]) -> anyhow::Result<()> {
        let mut streams = self.shared.outbound.lock().await;
        for attempt in 0..2 {
            // A victim that gave up on the stream (a refused frame, a newer stream) closes
            // its end; what is written after that is read by nobody, so open a new one. It
            // never writes after the ready byte: anything readable is that close.
            if let Some(s) = streams.get_mut(&peer) {
                let mut probe = [0u8; 1];
                if s.read(&mut probe).now_or_never().is_some() {
                    streams.remove(&peer);
                }
            }
            let stream = match streams.entry(peer) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.open_relay_stream(peer).await?)
                }
            };
            let written = async {
                stream.write_all(bytes).await?;
                stream.flush().await
            };
            match tokio::time::timeout(OPEN_TIMEOUT, written).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if attempt == 0 => {
                    tracing::debug!(%peer, error = %e, "relay stream broke; reopening");
                    streams.remove(&peer);
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => anyhow::bail!("writing to {peer} timed out"),
            }
        }
        anyhow::bail!("cannot write to {peer}")
    }

    /// Sends `frames` at `per_second` (in slices every 10 ms), round robin over `targets`,
    /// until they run out or a send fails; returns how many were sent.
    pub async fn flood(
        &self,
        targets: &[PeerId],
        frames: impl IntoIterator<Item = Vec<u8>>,
        per_second: u32,
    ) -> usize {
        if targets.is_empty() {
            return 0;
        }
        let per_slice = (per_second as usize / 100).max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut frames = frames.into_iter().peekable();
        let mut sent = 0;
        while frames.peek().is_some() {
            tick.tick().await;
            let mut slices: Vec<Vec<Vec<u8>>> = vec![Vec::new(); targets.len()];
            for (i, f) in frames.by_ref().take(per_slice).enumerate() {
                slices[(sent + i) % targets.len()].push(f);
            }
            for (target, slice) in targets.iter().zip(&slices) {
                if slice.is_empty() {
                    continue;
                }
                if self.send_all(*target, slice).await.is_err() {
                    return sent;
                }
                sent += slice.len();
            }
        }
        sent
    }

    /// Envelopes received from victims (the most recent 10,000 at most).
    pub fn captured(&self) -> Vec<Envelope> {
        lock(&self.shared.captured).iter().cloned().collect()
    }

    /// Captured price batches of `origin`.
    pub fn captured_batches(&self, origin: NodeId) -> Vec<Envelope> {
        self.captured()
            .into_iter()
            .filter(|e| {
                mesh_protocol::decode_body(&e.body).is_ok_and(|b| {
                    b.origin == origin && matches!(b.payload, Payload::PriceBatch { .. })
                })
            })
            .collect()
    }

    /// Control frames received from victims so far.
    pub fn control_received(&self) -> ControlCounts {
        *lock(&self.shared.control)
    }

    /// Peer-exchange answers written to `peer` so far (with [`HostileConfig::pex_answer`]).
    pub fn pex_answered(&self, peer: &PeerId) -> usize {
        lock(&self.shared.pex_answered).get(peer).copied().unwrap_or(0)
    }
}

/// Answers every peer-exchange request with `answer` (one frame, then the stream is closed)
/// until `cancel`.
async fn answer_pex(
    mut requests: libp2p_stream::IncomingStreams,
    answer: Vec<u8>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let (peer, mut stream) = tokio::select! {
            () = cancel.cancelled() => return,
            next = requests.next() => match next {
                Some(s) => s,
                None => return,
            },
        };
        let written = async {
            framing::write_frame(&mut stream, &answer).await?;
            stream.close().await
        };
        if matches!(tokio::time::timeout(OPEN_TIMEOUT, written).await, Ok(Ok(()))) {
            *lock(&shared.pex_answered).entry(peer).or_default() += 1;
        }
    }
}

/// What the task that takes victims' relay streams needs.
struct InboundCtx {
    control: libp2p_stream::Control,
    shared: Arc<Shared>,
}

impl InboundCtx {
    async fn take_inbound(
        self,
        mut incoming: libp2p_stream::IncomingStreams,
        want_announced: bool,
        cancel: CancellationToken,
    ) {
        let ctx = Arc::new(self);
        loop {
            let (peer, stream) = tokio::select! {
                () = cancel.cancelled() => return,
                next = incoming.next() => match next {
                    Some(s) => s,
                    None => return,
                },
            };
            let ctx = ctx.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = ctx.read(peer, stream, want_announced) => {}
                }
            });
        }
    }

    async fn read(&self, peer: PeerId, mut stream: libp2p::Stream, want_announced: bool) {
        if stream.write_all(&[STREAM_READY]).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        let mut buf = Vec::new();
        while framing::read_frame(&mut stream, &mut buf).await.is_ok() {
            match ControlFrame::parse(&buf) {
                Some(Ok(ControlFrame::Have(ids))) => {
                    lock(&self.shared.control).haves += 1;
                    if want_announced {
                        self.want(peer, ids).await;
                    }
                }
                Some(Ok(ControlFrame::Want(_))) => lock(&self.shared.control).wants += 1,
                Some(Ok(ControlFrame::Prune(_))) => lock(&self.shared.control).prunes += 1,
                Some(Err(())) => {}
                None => {
                    if let Ok(envelope) = mesh_protocol::decode_envelope(&buf) {
                        let mut captured = lock(&self.shared.captured);
                        if captured.len() >= MAX_CAPTURED {
                            captured.pop_front();
                        }
                        captured.push_back(envelope);
                    }
                }
            }
        }
    }

    async fn want(&self, peer: PeerId, ids: Vec<MessageId>) {
        let mut out = Vec::new();
        if framing::put_frame(&mut out, &ControlFrame::Want(ids).encode()).is_err() {
            return;
        }
        let mut streams = self.shared.outbound.lock().await;
        if let std::collections::hash_map::Entry::Vacant(slot) = streams.entry(peer) {
            let mut control = self.control.clone();
            let Ok(Ok(mut s)) =
                tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, RELAY_PROTOCOL)).await
            else {
                return;
            };
            let mut ready = [0u8; 1];
            if !matches!(
                tokio::time::timeout(OPEN_TIMEOUT, s.read_exact(&mut ready)).await,
                Ok(Ok(()))
            ) {
                return;
            }
            slot.insert(s);
        }
        if let Some(s) = streams.get_mut(&peer)
            && (s.write_all(&out).await.is_err() || s.flush().await.is_err())
        {
            streams.remove(&peer);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `envelope` as a frame with its hop fields set to anything (they are not signed).
pub fn frame(envelope: &Envelope, ttl: u8, hop_count: u8) -> anyhow::Result<Vec<u8>> {
    let mut f = mesh_protocol::encode_envelope(envelope)?;
    // The codec's layout: version, ttl, hop count, then the body and signature.
    f[1] = ttl;
    f[2] = hop_count;
    Ok(f)
}

/// `envelope` with a signature that does not verify.
pub fn bad_signature(mut envelope: Envelope) -> Envelope {
    envelope.signature[0] ^= 0x55;
    envelope
}

/// `HAVE` frames announcing `ids` ([`MAX_IDS`] a frame).
pub fn haves(ids: &[MessageId]) -> Vec<Vec<u8>> {
    ids.chunks(MAX_IDS).map(|c| ControlFrame::Have(c.to_vec()).encode()).collect()
}

/// `WANT` frames asking for `ids`.
pub fn wants(ids: &[MessageId]) -> Vec<Vec<u8>> {
    ids.chunks(MAX_IDS).map(|c| ControlFrame::Want(c.to_vec()).encode()).collect()
}

/// `PRUNE` frames for `ids`.
pub fn prunes(ids: &[MessageId]) -> Vec<Vec<u8>> {
    ids.chunks(MAX_IDS).map(|c| ControlFrame::Prune(c.to_vec()).encode()).collect()
}

/// `count` random message ids (announced, never served).
pub fn random_ids(count: usize) -> Vec<MessageId> {
    (0..count).map(|_| MessageId::from_uuid(uuid::Uuid::new_v4())).collect()
}

/// A TCP connection to `target` from `source_ip` that never says anything: it holds one of
/// the victim's pending (handshake) slots until the victim gives up on it.
pub async fn stalled_tcp(
    target: SocketAddr,
    source_ip: Option<IpAddr>,
) -> io::Result<tokio::net::TcpStream> {
    connect_from(target, source_ip).await
}

/// The TCP address of a `/ip4|ip6/../tcp/..` multiaddr.
pub fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(p) => port = Some(p),
            Protocol::P2p(_) => {}
            _ => return None,
        }
    }
    Some(SocketAddr::new(ip?, port?))
}

async fn connect_from(
    target: SocketAddr,
    source_ip: Option<IpAddr>,
) -> io::Result<tokio::net::TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(ip) = source_ip {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(OPEN_TIMEOUT, socket.connect(target))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Resident memory of this process in bytes (`VmRSS`), `None` where `/proc` is missing.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A dial-only TCP transport whose sockets are bound to a chosen source address (libp2p's own
/// binds to the listen port, or lets the system choose).
struct BoundTcp {
    source_ip: Option<IpAddr>,
}

impl Transport for BoundTcp {
    type Output = libp2p::tcp::tokio::TcpStream;
    type Error = io::Error;
    type ListenerUpgrade = futures::future::Pending<Result<Self::Output, io::Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, io::Error>>;

    fn listen_on(
        &mut self,
        _: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        Err(TransportError::MultiaddrNotSupported(addr))
    }

    fn remove_listener(&mut self, _: ListenerId) -> bool {
        false
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _: TransportDialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some(target) = socket_addr(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let source_ip = self.source_ip;
        Ok(async move { connect_from(target, source_ip).await.map(libp2p::tcp::tokio::TcpStream) }
            .boxed())
    }

    fn poll(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Poll::Pending
    }
}
