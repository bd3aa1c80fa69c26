//! The swarm task: owns the libp2p [`Swarm`] and the [`PeerManager`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, SwarmBuilder, Transport, allow_block_list, connection_limits,
    identify, noise, ping, tcp, yamux,
};
use mesh_protocol::Identity;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::framing;
use crate::inbound::{self, RefusalReason};
use crate::peer_manager::{Action, PeerManager};
use crate::pex;
use crate::prepare::RecentIds;
use crate::stats::{Stats, bump};

use super::writer::Writer;
use super::{
    Context, Error, IDENTIFY_PROTOCOL, Link, MAX_NEGOTIATING_INBOUND_STREAMS,
    MAX_STREAMS_PER_CONNECTION, PEX_PROTOCOL, PeerStatus, Result, Status, SwarmCommand, jittered,
    write_links,
};

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// First: refuses by remote address before the others count a connection.
    inbound: inbound::Behaviour,
    limits: connection_limits::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    pub(super) stream: libp2p_stream::Behaviour,
}

/// The yamux settings of every connection: [`MAX_STREAMS_PER_CONNECTION`].
fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_STREAMS_PER_CONNECTION);
    c
}

pub(super) fn build_swarm(
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

pub(super) struct SwarmTask {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) listeners: Vec<libp2p::core::transport::ListenerId>,
    pub(super) peers: PeerManager,
    pub(super) commands: mpsc::Receiver<SwarmCommand>,
    pub(super) status: watch::Sender<Status>,
    pub(super) exchange: Arc<Mutex<Vec<pex::Entry>>>,
    /// [`PeerManager::exchange_version`] of the list in `exchange` (0: the empty list of a
    /// new manager).
    pub(super) exchange_version: u64,
    /// Confirming dials in flight ([`Action::Confirm`]), by connection.
    pub(super) confirming: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    /// Whether refused learned addresses were logged yet (once; then only counted).
    pub(super) refused_logged: bool,
    pub(super) is_provider: bool,
    pub(super) ctx: Context,
}

impl SwarmTask {
    pub(super) async fn run(mut self) {
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
        let known_by_subnet = self.peers.known_by_subnet();
        let bans = self.peers.bans_total();
        self.status.send_if_modified(|s| {
            let changed = s.peers != peers
                || s.own_distance != own_distance
                || s.known_peers != known_peers
                || s.known_by_subnet != known_by_subnet
                || s.bans != bans;
            s.peers = peers;
            s.own_distance = own_distance;
            s.known_peers = known_peers;
            s.known_by_subnet = known_by_subnet;
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

    /// Counts the peers the per-network bounds kept out of the known table.
    fn count_table_refusals(&mut self) {
        let refused = self.peers.take_table_refusals();
        if refused > 0 {
            metrics::counter!("mesh_relay_known_peers_refused_total", "reason" => "subnet")
                .increment(refused);
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
                self.count_table_refusals();
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
                self.count_table_refusals();
                self.publish_status();
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
                    self.peers.on_connected(peer_id, Some(endpoint.get_remote_address()), now);
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
