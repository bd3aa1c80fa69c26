//! The peer manager: which peers to dial, which to drop, who is banned. Pure bookkeeping; the
//! swarm task carries out the [`Action`]s it returns.
//!
//! Below `MESH_MIN_PEER_CONNECTIONS` it dials known addresses, preferring peers closer to a
//! provider (hop distance learned from provider messages received through them, or announced
//! in discovery records). Above `MESH_MAX_PEER_CONNECTIONS` it drops peers with the highest
//! distance, with some randomness so that the mesh does not converge on one shape. Between the
//! two it dials one known peer at random now and then (`explore_interval`), so that the parts
//! of a mesh that lost every link between them (a network partition) find each other again
//! once the network heals, even when every node kept its minimum on its own side. From the
//! midpoint between the two on ([`PeerManager::target`]) an explored link replaces older ones:
//! once it is up, the node drops peers (chosen as above the maximum) down to the midpoint. So
//! exploring renews links without piling them up, and the peer count stays near the midpoint
//! (peers dialing in push it up between two explores) instead of drifting up to the maximum.
//! A peer that sends more invalid messages than its budget allows within a window is banned
//! for a while.
//!
//! Where peers can be dialed is the [`AddrBook`]'s business: configured, self-reported,
//! confirmed and third-party addresses kept apart, every learned address filtered. The manager
//! keeps at most [`Config::max_dials_per_ip`] dials in flight to one IP (loopback aside, which
//! only a lab allows and where every node shares it), so that addresses a peer hands out
//! cannot turn the mesh against one host, and it dials a peer that dialed in once at an
//! address it reported ([`Action::Confirm`]), so that peer exchange passes on only addresses
//! somebody reached.
//!
//! What one network (an IPv4 /24, an IPv6 /48: [`crate::subnet`]) can hold of the node is
//! bounded, so that a crowd of peers from one place cannot surround it (an eclipse attack; the
//! rules follow Bitcoin Core's address manager, which buckets addresses by their network and by
//! the network of whoever told of them):
//! - the known table holds at most [`Config::max_known_per_subnet`] peers of one network, and
//!   at most [`Config::max_known_per_source_subnet`] peers that peers of one network told of
//!   (peer exchange); one peer's own claims are bounded by the [`AddrBook`];
//! - the node dials into a network only while fewer than [`Config::max_dials_per_subnet`] of
//!   its connected or dialing peers are there (inbound connections are bounded per network by
//!   [`crate::InboundLimits`]);
//! - slots are kept: bootstrap (pinned) peers are never evicted or pruned; peers this node
//!   reached by dialing are never evicted to make room for peers only told of; the
//!   [`Config::protected_long_lived`] peers connected longest are never pruned.
//!
//! Loopback addresses belong to no network unless [`Config::subnet_loopback`] is set (a lab on
//! one host shares one loopback network).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use mesh_protocol::AddrFilter;
use rand::seq::SliceRandom;
use tokio::time::Instant;

use crate::addr_book::{AddrBook, ClaimOutcome, Claimant};
use crate::subnet::{self, Subnet};

/// Peer manager settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Dial known peers while fewer are connected (`MESH_MIN_PEER_CONNECTIONS`).
    pub min_peers: usize,
    /// Drop peers while more are connected (`MESH_MAX_PEER_CONNECTIONS`).
    pub max_peers: usize,
    /// Invalid messages a peer may send within `budget_window` before it is banned.
    pub misbehaviour_budget: u32,
    /// The window of the budget.
    pub budget_window: Duration,
    /// How long a ban lasts.
    pub ban_duration: Duration,
    /// A new connection is not pruned during this grace period.
    pub prune_grace: Duration,
    /// First wait before dialing a peer again after a failed dial (doubles per failure).
    pub redial_backoff: Duration,
    /// Most known (not connected) peers remembered.
    pub max_known_peers: usize,
    /// While at or above the minimum and below the maximum, dial one known peer picked at
    /// random about this often (between half and one and a half times it); `None` never. From
    /// [`PeerManager::target`] on, each such link replaces older ones (down to the target).
    pub explore_interval: Option<Duration>,
    /// Which learned addresses may be dialed and passed on (`MESH_ALLOW_PRIVATE_ADDRS`).
    pub addr_filter: AddrFilter,
    /// Dials in flight to one IP (loopback excepted).
    pub max_dials_per_ip: usize,
    /// Dial a peer that dialed in at an address it reported, once, to confirm the address
    /// for peer exchange (on whenever peer exchange is).
    pub confirm_reported: bool,
    /// Most known peers (bootstrap peers aside) whose address is in one network.
    pub max_known_per_subnet: usize,
    /// Most known peers that peers of one network told of through peer exchange.
    pub max_known_per_source_subnet: usize,
    /// Dial into a network only while fewer of the connected and dialing peers are in it.
    pub max_dials_per_subnet: usize,
    /// This many peers, those connected longest, are never pruned.
    pub protected_long_lived: usize,
    /// Whether loopback addresses count as a network for these bounds (labs that play
    /// attacker from other loopback addresses; off by default).
    pub subnet_loopback: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_peers: 3,
            max_peers: 10,
            misbehaviour_budget: 20,
            budget_window: Duration::from_secs(60),
            ban_duration: Duration::from_secs(600),
            prune_grace: Duration::from_secs(10),
            redial_backoff: Duration::from_secs(1),
            max_known_peers: 1000,
            explore_interval: Some(Duration::from_secs(30)),
            addr_filter: AddrFilter::default(),
            max_dials_per_ip: 2,
            confirm_reported: true,
            max_known_per_subnet: 32,
            max_known_per_source_subnet: 64,
            max_dials_per_subnet: 2,
            protected_long_lived: 2,
            subnet_loopback: false,
        }
    }
}

/// What the swarm task must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Dial this peer at these addresses.
    Dial(PeerId, Vec<Multiaddr>),
    /// Close every connection to this peer (pruning).
    Disconnect(PeerId),
    /// Ban: block and disconnect the peer.
    Ban(PeerId),
    /// The ban of this peer expired: unblock it.
    Unban(PeerId),
    /// Ask this connected peer for the peers it knows (peer exchange).
    AskPeers(PeerId),
    /// Dial this connected peer once more at an address it reported, and close that extra
    /// connection when it is up: the address is then confirmed
    /// ([`PeerManager::on_confirm_result`]).
    Confirm(PeerId, Multiaddr),
}

/// Confirming dials in flight at once.
const MAX_CONFIRMS: usize = 2;
/// Confirming dials per connection of a peer.
const CONFIRMS_PER_PEER: usize = 2;
/// A confirming dial with no result by then is given up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// While below the minimum, how often a connected peer is asked again for its peers.
const ASK_AGAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
struct Connected {
    since: Instant,
    /// Hops from this peer's side to the nearest provider (1 = it is a provider's neighbour
    /// ... as seen in `hop_count` of provider messages it sent us).
    distance: Option<u8>,
    /// When we last asked this peer for its peers (peer exchange).
    asked_at: Option<Instant>,
    /// Confirming dials made during this connection.
    confirms: usize,
    /// The network of the connection's remote address.
    subnet: Option<Subnet>,
}

#[derive(Debug, Clone, Default)]
struct Known {
    distance: Option<u8>,
    failures: u32,
    retry_at: Option<Instant>,
    /// Always worth dialing again (bootstrap peers).
    pinned: bool,
    /// We reached it by dialing once: never evicted for a peer only told of.
    tried: bool,
    /// The network of its address when it entered the table.
    subnet: Option<Subnet>,
    /// The network of the peer that told of it (peer exchange).
    source: Option<Subnet>,
}

/// Peer bookkeeping.
#[derive(Debug)]
pub struct PeerManager {
    config: Config,
    local: PeerId,
    connected: HashMap<PeerId, Connected>,
    known: HashMap<PeerId, Known>,
    book: AddrBook,
    dialing: HashSet<PeerId>,
    /// The IPs each dial in flight goes to (the per-IP bound).
    dial_ips: HashMap<PeerId, Vec<IpAddr>>,
    /// Confirming dials in flight: peer, address, since when.
    confirming: HashMap<PeerId, (Multiaddr, Instant)>,
    bans: HashMap<PeerId, Instant>,
    charges: HashMap<PeerId, VecDeque<Instant>>,
    bans_total: u64,
    /// When to dial a random known peer next (`explore_interval`).
    explore_at: Option<Instant>,
    /// The peer an explore dialed at or above the target: once connected, an older link goes.
    replacing: Option<PeerId>,
    /// See [`PeerManager::exchange_version`].
    exchange_version: u64,
    /// Peers kept out of the known table by the per-network bounds, not yet taken by
    /// [`PeerManager::take_table_refusals`].
    table_refusals: u64,
}

impl PeerManager {
    /// A manager for the node `local`.
    pub fn new(local: PeerId, config: Config) -> Self {
        Self {
            local,
            connected: HashMap::new(),
            known: HashMap::new(),
            book: AddrBook::new(config.addr_filter),
            dialing: HashSet::new(),
            dial_ips: HashMap::new(),
            confirming: HashMap::new(),
            bans: HashMap::new(),
            charges: HashMap::new(),
            bans_total: 0,
            explore_at: None,
            replacing: None,
            exchange_version: 0,
            table_refusals: 0,
            config,
        }
    }

    /// The address book.
    pub fn book(&self) -> &AddrBook {
        &self.book
    }

    /// A number that changes whenever [`PeerManager::exchange_list`] may give another answer
    /// (a peer connected or left, or addresses were added), so that callers rebuild the list
    /// only then.
    pub fn exchange_version(&self) -> u64 {
        self.exchange_version
    }

    /// The peer count that exploring keeps: the midpoint between the minimum and the maximum
    /// (rounded up). Below it an explored link is added; from it on, once the explored link is
    /// up, older ones are dropped down to it.
    pub fn target(&self) -> usize {
        (self.config.min_peers + self.config.max_peers).div_ceil(2)
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Connected peers.
    pub fn connected(&self) -> impl Iterator<Item = &PeerId> {
        self.connected.keys()
    }

    /// Number of connected peers.
    pub fn connected_count(&self) -> usize {
        self.connected.len()
    }

    /// Number of known peers (connected or not).
    pub fn known_count(&self) -> usize {
        self.known.len()
    }

    /// Known peers per network, for the status (networks with at least one).
    pub fn known_by_subnet(&self) -> std::collections::BTreeMap<Subnet, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for k in self.known.values() {
            if let Some(n) = k.subnet {
                *counts.entry(n).or_default() += 1;
            }
        }
        counts
    }

    /// Peers the per-network bounds kept out of the known table since the last call.
    pub fn take_table_refusals(&mut self) -> u64 {
        std::mem::take(&mut self.table_refusals)
    }

    /// Bans issued so far.
    pub fn bans_total(&self) -> u64 {
        self.bans_total
    }

    /// `true` while `peer` is banned.
    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.bans.get(peer).is_some_and(|until| *until > now)
    }

    /// Hop distance to a provider through `peer`, when known.
    pub fn distance(&self, peer: &PeerId) -> Option<u8> {
        self.connected.get(peer).and_then(|c| c.distance)
    }

    /// Addresses to hand out in peer exchange: connected peers at the addresses we reached
    /// them at (never what a third party or the peer alone said).
    pub fn exchange_list(&self, limit: usize) -> Vec<(PeerId, Vec<Multiaddr>)> {
        // Walks the few connected peers, not the (up to `max_known_peers`) known ones: this
        // runs on every tick of every relay.
        let mut list: Vec<(PeerId, Vec<Multiaddr>)> = self
            .connected
            .keys()
            .map(|peer| (*peer, self.book.exchange_addrs(peer)))
            .filter(|(_, addrs)| !addrs.is_empty())
            .map(|(peer, addrs)| (peer, addrs.to_vec()))
            .collect();
        list.shuffle(&mut rand::thread_rng());
        list.truncate(limit);
        list
    }

    /// Remembers addresses of `peer`: `pinned` ones are the operator's (bootstrap, dialed by
    /// hand), kept, never filtered and retried forever; others came from local discovery
    /// (mDNS, BLE), claims anyone on the link can make, filtered and bounded.
    pub fn add_addresses(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, pinned: bool) {
        if peer == self.local {
            return;
        }
        if pinned {
            if !self.make_room(peer, true) {
                return;
            }
            self.book.configure(peer, addrs);
            let subnet = self.peer_subnet(&peer);
            let known = self.known.entry(peer).or_default();
            known.pinned = true;
            known.subnet = known.subnet.or(subnet);
            self.sync_known(peer);
        } else {
            self.book.claim(Claimant::Lan, self.local, [(peer, addrs)]);
            self.admit(peer, None);
        }
    }

    /// `peer` said (identify) where it listens. Returns how many addresses the filter refused.
    pub fn on_identify(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) -> usize {
        if peer == self.local || !self.make_room(peer, true) {
            return addrs.len();
        }
        let refused = self.book.report(peer, addrs);
        let subnet = self.peer_subnet(&peer);
        if !self.room_in_subnet(peer, subnet) {
            // Connected all the same; it is just not remembered beyond this connection.
            self.table_refusals += 1;
            self.book.forget(&peer);
            return refused;
        }
        let known = self.known.entry(peer).or_default();
        known.subnet = known.subnet.or(subnet);
        self.sync_known(peer);
        refused
    }

    /// A peer-exchange answer from `from`: claims about other peers, de-duplicated, filtered
    /// and bounded per claimant.
    pub fn on_exchange_answer(
        &mut self,
        from: PeerId,
        entries: Vec<(PeerId, Vec<Multiaddr>)>,
    ) -> ClaimOutcome {
        let peers: Vec<PeerId> = entries.iter().map(|(p, _)| *p).collect();
        let outcome = self.book.claim(Claimant::Peer(from), self.local, entries);
        let source = self.connected.get(&from).and_then(|c| c.subnet);
        for peer in peers {
            if peer != self.local {
                self.admit(peer, source);
            }
        }
        outcome
    }

    /// After claims about `peer` (told of by a peer of network `source`, if known): a new peer
    /// with an address that passed the filter enters the known table when its network and its
    /// teller's network are within their bounds and there is room (else its claims go);
    /// filtered-out or repeated entries never push a known peer out.
    fn admit(&mut self, peer: PeerId, source: Option<Subnet>) {
        if !self.known.contains_key(&peer) && self.book.has_addrs(&peer) {
            let subnet = self.peer_subnet(&peer);
            let full = subnet.is_some_and(|n| self.known_in(n) >= self.config.max_known_per_subnet)
                || source.is_some_and(|s| {
                    self.known_told_by(s) >= self.config.max_known_per_source_subnet
                });
            if full {
                self.table_refusals += 1;
                self.book.forget(&peer);
            } else if self.make_room(peer, false) {
                self.known.insert(peer, Known { subnet, source, ..Known::default() });
            } else {
                self.book.forget(&peer);
            }
        }
        self.sync_known(peer);
    }

    /// The network of the address `peer` would be dialed at first.
    fn peer_subnet(&self, peer: &PeerId) -> Option<Subnet> {
        let first = self.book.dial_addrs(peer).into_iter().next()?;
        subnet::of_addr(&first, self.config.subnet_loopback)
    }

    /// Whether `peer`, of network `subnet`, may have a place in the known table as a peer we
    /// are or were connected to: it has one, or its network is below its share, or a peer of
    /// that network only told of (never reached, not pinned, connected or being dialed) gives
    /// up its place.
    fn room_in_subnet(&mut self, peer: PeerId, subnet: Option<Subnet>) -> bool {
        let Some(n) = subnet else { return true };
        if self.known.contains_key(&peer) || self.known_in(n) < self.config.max_known_per_subnet {
            return true;
        }
        let victim = self
            .known
            .iter()
            .find(|(p, k)| {
                k.subnet == Some(n)
                    && !k.pinned
                    && !k.tried
                    && !self.connected.contains_key(p)
                    && !self.dialing.contains(p)
            })
            .map(|(p, _)| *p);
        match victim {
            Some(v) => {
                self.known.remove(&v);
                self.book.forget(&v);
                true
            }
            None => false,
        }
    }

    /// Known peers of network `n`, bootstrap peers aside.
    fn known_in(&self, n: Subnet) -> usize {
        self.known.values().filter(|k| !k.pinned && k.subnet == Some(n)).count()
    }

    /// Known peers that peers of network `n` told of.
    fn known_told_by(&self, n: Subnet) -> usize {
        self.known.values().filter(|k| k.source == Some(n)).count()
    }

    /// We dialed `peer` at `addr` and it answered with its key: the address is confirmed.
    pub fn on_dialed(&mut self, peer: PeerId, addr: Multiaddr) {
        if peer == self.local || !self.make_room(peer, true) {
            return;
        }
        let subnet = subnet::of_addr(&addr, self.config.subnet_loopback);
        if !self.room_in_subnet(peer, subnet) {
            self.table_refusals += 1;
            return;
        }
        self.book.confirm(peer, strip_p2p(addr));
        let known = self.known.entry(peer).or_default();
        known.tried = true;
        known.subnet = known.subnet.or(subnet);
        self.exchange_version += 1;
    }

    /// The result of a confirming dial ([`Action::Confirm`]).
    pub fn on_confirm_result(&mut self, peer: PeerId, addr: Multiaddr, reached: bool) {
        if self.confirming.get(&peer).is_some_and(|(a, _)| *a == addr) {
            self.confirming.remove(&peer);
        }
        if reached {
            self.on_dialed(peer, addr);
        } else {
            self.book.failed(&peer, &addr);
        }
    }

    /// Room in the known table for `peer`: true when it is known or a peer that is neither
    /// pinned nor connected could go (those without any address first, then those never
    /// reached). A peer only told of (`reached` false) never pushes out one we reached.
    fn make_room(&mut self, peer: PeerId, reached: bool) -> bool {
        if self.known.contains_key(&peer) || self.known.len() < self.config.max_known_peers {
            return true;
        }
        let mut victim = None;
        let mut victim_rank = u8::MAX;
        for (p, k) in &self.known {
            if k.pinned
                || self.connected.contains_key(p)
                || self.dialing.contains(p)
                || (k.tried && !reached)
            {
                continue;
            }
            let rank = match (self.book.has_addrs(p), k.tried) {
                (false, _) => 0,
                (true, false) => 1,
                (true, true) => 2,
            };
            if rank < victim_rank {
                victim = Some(*p);
                victim_rank = rank;
                if rank == 0 {
                    break;
                }
            }
        }
        match victim {
            Some(v) => {
                self.known.remove(&v);
                self.book.forget(&v);
                true
            }
            None => false,
        }
    }

    /// Something about `peer` changed: the exchange list may change, and a peer the book no
    /// longer has any address of (its claims were evicted) leaves the known table unless
    /// it is connected.
    fn sync_known(&mut self, peer: PeerId) {
        self.exchange_version += 1;
        if !self.book.has_addrs(&peer)
            && !self.connected.contains_key(&peer)
            && !self.dialing.contains(&peer)
            && self.known.get(&peer).is_some_and(|k| !k.pinned)
        {
            self.known.remove(&peer);
        }
    }

    /// Records the hop distance to a provider advertised for a known peer (discovery TXT).
    pub fn set_known_distance(&mut self, peer: PeerId, distance: Option<u8>) {
        if let Some(k) = self.known.get_mut(&peer) {
            k.distance = distance;
        }
    }

    /// A connection to `peer` was established (the first one), with `remote` at the other end
    /// when known.
    pub fn on_connected(&mut self, peer: PeerId, remote: Option<&Multiaddr>, now: Instant) {
        let subnet = remote.and_then(|a| subnet::of_addr(a, self.config.subnet_loopback));
        self.exchange_version += 1;
        self.dialing.remove(&peer);
        self.dial_ips.remove(&peer);
        if let Some(k) = self.known.get_mut(&peer) {
            k.failures = 0;
            k.retry_at = None;
        }
        self.connected.entry(peer).or_insert(Connected {
            since: now,
            distance: self.known.get(&peer).and_then(|k| k.distance),
            asked_at: None,
            confirms: 0,
            subnet,
        });
    }

    /// The last connection to `peer` closed.
    pub fn on_disconnected(&mut self, peer: &PeerId, now: Instant) {
        self.exchange_version += 1;
        self.dialing.remove(peer);
        self.dial_ips.remove(peer);
        if let Some(c) = self.connected.remove(peer)
            && let Some(k) = self.known.get_mut(peer)
        {
            k.distance = c.distance;
            // Do not hammer a peer that just went away.
            k.retry_at = Some(now + self.config.redial_backoff);
            // A peer that came in while its network was at its bound stays known only while
            // connected.
            let over = k.subnet.filter(|_| !k.pinned).is_some_and(|n| {
                self.known.values().filter(|o| !o.pinned && o.subnet == Some(n)).count()
                    > self.config.max_known_per_subnet
            });
            if over {
                self.known.remove(peer);
                self.book.forget(peer);
            }
        }
    }

    /// A dial of `peer` failed.
    pub fn on_dial_failed(&mut self, peer: &PeerId, now: Instant) {
        self.dialing.remove(peer);
        self.dial_ips.remove(peer);
        if let Some(k) = self.known.get_mut(peer) {
            k.failures = k.failures.saturating_add(1);
            let factor = 1u32 << k.failures.min(6);
            k.retry_at = Some(now + self.config.redial_backoff * factor);
        }
    }

    /// A dial of `peer` failed at `addr` (among others): the address loses its confirmation
    /// and a third party's claim of it goes.
    pub fn on_addr_failed(&mut self, peer: &PeerId, addr: &Multiaddr) {
        self.book.failed(peer, &strip_p2p(addr.clone()));
        self.exchange_version += 1;
    }

    /// A provider message arrived through `peer` with `hop_count`: the peer is
    /// `hop_count - 1` hops from that provider. Keeps the smallest distance seen.
    pub fn on_provider_hops(&mut self, peer: &PeerId, hop_count: u8) {
        if let Some(c) = self.connected.get_mut(peer) {
            let d = hop_count.saturating_sub(1);
            c.distance = Some(c.distance.map_or(d, |old| old.min(d)));
        }
    }

    /// Our own hop distance to the nearest provider: one more than the nearest peer's, or 0
    /// when `self_is_provider`.
    pub fn own_distance(&self, self_is_provider: bool) -> Option<u8> {
        if self_is_provider {
            return Some(0);
        }
        self.connected.values().filter_map(|c| c.distance).min().map(|d| d.saturating_add(1))
    }

    /// Charges `peer` for one invalid message; returns [`Action::Ban`] when it is past its
    /// budget.
    pub fn charge(&mut self, peer: PeerId, now: Instant) -> Option<Action> {
        if self.is_banned(&peer, now) {
            return None;
        }
        let window = self.config.budget_window;
        let charges = self.charges.entry(peer).or_default();
        while charges.front().is_some_and(|t| now.duration_since(*t) >= window) {
            charges.pop_front();
        }
        charges.push_back(now);
        if charges.len() as u64 > u64::from(self.config.misbehaviour_budget) {
            self.charges.remove(&peer);
            self.bans.insert(peer, now + self.config.ban_duration);
            self.bans_total += 1;
            self.connected.remove(&peer);
            self.exchange_version += 1;
            self.dialing.remove(&peer);
            self.dial_ips.remove(&peer);
            // What it claimed about others goes with it.
            self.book.forget_claims_by(Claimant::Peer(peer));
            return Some(Action::Ban(peer));
        }
        None
    }

    /// Periodic planning: unbans, dials below the minimum, prunes above the maximum, and asks
    /// peers for more peers while below the minimum.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let expired: Vec<PeerId> =
            self.bans.iter().filter(|(_, until)| **until <= now).map(|(p, _)| *p).collect();
        for peer in expired {
            self.bans.remove(&peer);
            actions.push(Action::Unban(peer));
        }
        self.charges.retain(|_, c| {
            c.back().is_some_and(|t| now.duration_since(*t) < self.config.budget_window)
        });

        let have = self.connected.len() + self.dialing.len();
        if have < self.config.min_peers {
            let mut candidates = self.dial_candidates(now);
            // Prefer lower distance to a provider; unknown distance last; random among equals.
            candidates.sort_by_key(|(_, k)| k.distance.unwrap_or(u8::MAX));
            let candidates: Vec<PeerId> = candidates.into_iter().map(|(p, _)| *p).collect();
            let mut wanted = self.config.min_peers - have;
            for peer in candidates {
                if wanted == 0 {
                    break;
                }
                if let Some(action) = self.start_dial(peer) {
                    actions.push(action);
                    wanted -= 1;
                }
            }
            // Still short of candidates: ask connected peers, again every `ASK_AGAIN` while
            // short (an answer can be lost: a busy peer drops requests, and an early answer
            // lists few peers).
            for (peer, c) in self.connected.iter_mut() {
                if c.asked_at.is_none_or(|t| now.duration_since(t) >= ASK_AGAIN) {
                    c.asked_at = Some(now);
                    actions.push(Action::AskPeers(*peer));
                }
            }
        }

        if let Some(peer) = self.replacing {
            if self.connected.contains_key(&peer) {
                // The explored link is up: older ones go, down to the target (more than one
                // when peers that dialed in took the count above it).
                self.replacing = None;
                let excess = self.connected.len().saturating_sub(self.target());
                if excess > 0 {
                    self.prune(excess, now, Some(peer), &mut actions);
                }
            } else if !self.dialing.contains(&peer) {
                self.replacing = None;
            }
        }

        if let Some(every) = self.config.explore_interval {
            self.explore(every, have, now, &mut actions);
        }

        if self.config.confirm_reported {
            self.confirm(now, &mut actions);
        }

        if self.connected.len() > self.config.max_peers {
            let excess = self.connected.len() - self.config.max_peers;
            self.prune(excess, now, None, &mut actions);
        }
        actions
    }

    /// Drops `count` connected peers other than `keep`, past their grace period and not pinned:
    /// the farthest from a provider, with some randomness.
    fn prune(
        &mut self,
        count: usize,
        now: Instant,
        keep: Option<PeerId>,
        actions: &mut Vec<Action>,
    ) {
        // The longest-connected peers stay: a crowd arriving later cannot push them out.
        let mut by_age: Vec<(&PeerId, Instant)> =
            self.connected.iter().map(|(p, c)| (p, c.since)).collect();
        by_age.sort_by_key(|(_, since)| *since);
        let protected: HashSet<PeerId> =
            by_age.iter().take(self.config.protected_long_lived).map(|(p, _)| **p).collect();
        let mut prunable: Vec<(PeerId, u8)> = self
            .connected
            .iter()
            .filter(|(p, _)| !protected.contains(p))
            .filter(|(_, c)| now.duration_since(c.since) >= self.config.prune_grace)
            .filter(|(p, _)| !self.known.get(p).is_some_and(|k| k.pinned))
            .filter(|(p, _)| keep != Some(**p))
            .map(|(p, c)| (*p, c.distance.unwrap_or(u8::MAX)))
            .collect();
        // The farthest twice-the-count, then a random choice among them, so a few far peers
        // survive and the mesh keeps some long links.
        prunable.shuffle(&mut rand::thread_rng());
        prunable.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
        prunable.truncate(count * 2);
        prunable.shuffle(&mut rand::thread_rng());
        for (peer, _) in prunable.into_iter().take(count) {
            self.connected.remove(&peer);
            self.exchange_version += 1;
            actions.push(Action::Disconnect(peer));
        }
    }

    /// Connected peers in network `n`, and peers being dialed there.
    fn links_in(&self, n: Subnet) -> usize {
        let connected = self.connected.values().filter(|c| c.subnet == Some(n)).count();
        let dialing = self
            .dialing
            .iter()
            .filter(|p| !self.connected.contains_key(p) && self.peer_subnet(p) == Some(n))
            .count();
        connected + dialing
    }

    /// IPs with dials in flight (normal and confirming), and how many each.
    fn ip_load(&self) -> HashMap<IpAddr, usize> {
        let mut load: HashMap<IpAddr, usize> = HashMap::new();
        let confirming = self.confirming.values().filter_map(|(a, _)| capped_ip(a));
        for ip in self.dial_ips.values().flatten().copied().chain(confirming) {
            *load.entry(ip).or_default() += 1;
        }
        load
    }

    /// The dial of `peer` at the addresses of the book whose IP is below its bound; `None`
    /// when every address is at the bound (the peer waits for a later tick).
    fn start_dial(&mut self, peer: PeerId) -> Option<Action> {
        if let Some(n) = self.peer_subnet(&peer)
            && self.links_in(n) >= self.config.max_dials_per_subnet
        {
            return None;
        }
        let mut load = self.ip_load();
        let mut ips = Vec::new();
        let addrs: Vec<Multiaddr> = self
            .book
            .dial_addrs(&peer)
            .into_iter()
            .filter(|a| match capped_ip(a) {
                None => true,
                Some(ip) => {
                    let n = load.entry(ip).or_default();
                    if *n >= self.config.max_dials_per_ip {
                        return false;
                    }
                    *n += 1;
                    ips.push(ip);
                    true
                }
            })
            .collect();
        if addrs.is_empty() {
            return None;
        }
        self.dialing.insert(peer);
        self.dial_ips.insert(peer, ips);
        Some(Action::Dial(peer, addrs))
    }

    /// Confirming dials: a connected peer none of whose addresses we reached (it dialed in) is
    /// dialed once at an address it reported, a few at a time.
    fn confirm(&mut self, now: Instant, actions: &mut Vec<Action>) {
        self.confirming.retain(|_, (_, since)| now.duration_since(*since) < CONFIRM_TIMEOUT);
        if self.confirming.len() >= MAX_CONFIRMS {
            return;
        }
        let load = self.ip_load();
        let mut picks = Vec::new();
        for (peer, c) in &self.connected {
            if picks.len() + self.confirming.len() >= MAX_CONFIRMS {
                break;
            }
            if c.confirms >= CONFIRMS_PER_PEER
                || self.confirming.contains_key(peer)
                || !self.book.exchange_addrs(peer).is_empty()
            {
                continue;
            }
            let addr = self.book.unconfirmed_reported(peer).find(|a| {
                capped_ip(a).is_none_or(|ip| {
                    load.get(&ip).copied().unwrap_or(0) < self.config.max_dials_per_ip
                })
            });
            if let Some(addr) = addr {
                picks.push((*peer, addr.clone()));
            }
        }
        for (peer, addr) in picks {
            if let Some(c) = self.connected.get_mut(&peer) {
                c.confirms += 1;
            }
            self.confirming.insert(peer, (addr.clone(), now));
            actions.push(Action::Confirm(peer, addr));
        }
    }

    /// Known peers that may be dialed now, in random order.
    fn dial_candidates(&self, now: Instant) -> Vec<(&PeerId, &Known)> {
        let mut candidates: Vec<(&PeerId, &Known)> = self
            .known
            .iter()
            .filter(|(p, k)| {
                self.book.has_addrs(p)
                    && !self.connected.contains_key(p)
                    && !self.dialing.contains(p)
                    && !self.bans.contains_key(p)
                    && k.retry_at.is_none_or(|t| t <= now)
            })
            .collect();
        candidates.shuffle(&mut rand::thread_rng());
        candidates
    }

    /// Every `every` or so, while `have` (connected and being dialed) is between the minimum
    /// (below it `tick` dials anyway) and the maximum, dials one known peer at random. Random,
    /// not nearest first: what heals a partition is a link to a part of the mesh this node
    /// has no path to, and nothing tells which peers those are. At or above the
    /// [`target`](Self::target), the new link will replace older ones.
    fn explore(&mut self, every: Duration, have: usize, now: Instant, actions: &mut Vec<Action>) {
        let due = *self.explore_at.get_or_insert_with(|| now + jittered(every));
        if now < due {
            return;
        }
        self.explore_at = Some(now + jittered(every));
        if have < self.config.min_peers || have >= self.config.max_peers {
            return;
        }
        let picks: Vec<PeerId> = self.dial_candidates(now).iter().map(|(p, _)| **p).collect();
        for peer in picks {
            if let Some(action) = self.start_dial(peer) {
                if self.connected.len() >= self.target() {
                    self.replacing = Some(peer);
                }
                actions.push(action);
                break;
            }
        }
    }

    /// A dial attempt is allowed for `peer` now (not banned, not already connected).
    pub fn may_dial(&self, peer: &PeerId, now: Instant) -> bool {
        !self.is_banned(peer, now) && !self.connected.contains_key(peer)
    }

    /// Marks `peer` as being dialed (dials requested from outside the manager).
    pub fn on_dialing(&mut self, peer: PeerId) {
        self.dialing.insert(peer);
    }
}

/// The IP an address goes to when the per-IP dial bound applies to it: not for loopback, which
/// only a lab allows and where every node shares one IP.
fn capped_ip(addr: &Multiaddr) -> Option<IpAddr> {
    let ip = match addr.iter().next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    (!ip.is_loopback()).then_some(ip)
}

/// `addr` without a trailing `/p2p/<peer id>`.
fn strip_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// Between half and one and a half times `every`, so that nodes started together do not
/// explore in step.
fn jittered(every: Duration) -> Duration {
    every.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    /// An address in a network of its own (per `n` modulo 250).
    fn addr(n: u16) -> Multiaddr {
        format!("/ip4/11.0.{}.1/tcp/{n}", n % 250).parse().unwrap()
    }

    /// The peers `actions` dial.
    fn dialed_by(actions: Vec<Action>) -> Vec<PeerId> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Dial(p, _) => Some(p),
                _ => None,
            })
            .collect()
    }

    /// Address `host` in the network 12.`net`.0.0/24.
    fn in_net(net: u8, host: u8) -> Multiaddr {
        format!("/ip4/12.{net}.0.{host}/tcp/4001").parse().unwrap()
    }

    fn manager(min: usize, max: usize) -> PeerManager {
        PeerManager::new(
            peer(),
            Config {
                min_peers: min,
                max_peers: max,
                prune_grace: Duration::ZERO,
                explore_interval: None,
                ..Config::default()
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn explores_one_random_known_peer_now_and_then_between_min_and_max() {
        let every = Duration::from_secs(30);
        let mut m = PeerManager::new(
            peer(),
            Config {
                min_peers: 1,
                max_peers: 3,
                explore_interval: Some(every),
                ..Config::default()
            },
        );
        let connected = peer();
        m.on_connected(connected, None, Instant::now());
        let others: Vec<PeerId> = (0..4).map(|_| peer()).collect();
        for (i, p) in others.iter().enumerate() {
            m.add_addresses(*p, vec![addr(i as u16 + 1)], false);
        }
        // Not before the first interval (at least half of it).
        assert!(m.tick(Instant::now()).is_empty());
        tokio::time::advance(every / 3).await;
        assert!(m.tick(Instant::now()).is_empty());
        // Within one and a half intervals: one dial, of a known peer.
        tokio::time::advance(every * 3 / 2).await;
        let dialed = match m.tick(Instant::now()).as_slice() {
            [Action::Dial(p, _)] => *p,
            other => panic!("unexpected {other:?}"),
        };
        assert!(others.contains(&dialed));
        assert!(m.tick(Instant::now()).is_empty(), "once per interval");
        m.on_connected(dialed, None, Instant::now());
        // At the maximum (three with a dial in flight) it stops.
        tokio::time::advance(every * 2).await;
        assert!(matches!(m.tick(Instant::now()).as_slice(), [Action::Dial(..)]));
        tokio::time::advance(every * 2).await;
        assert!(m.tick(Instant::now()).is_empty(), "two connected and one dialing: at the maximum");
        // Off: never.
        let mut off = manager(1, 3);
        off.on_connected(connected, None, Instant::now());
        off.add_addresses(others[0], vec![addr(9)], false);
        tokio::time::advance(every * 4).await;
        assert!(off.tick(Instant::now()).is_empty());
    }

    /// A manager between 3 and 10 peers (target 7) exploring every 30 s, with `connected`
    /// peers connected and one more known: returns it, the connected ones and the known one.
    fn exploring(connected: usize) -> (PeerManager, Vec<PeerId>, PeerId) {
        let mut m = PeerManager::new(
            peer(),
            Config {
                min_peers: 3,
                max_peers: 10,
                prune_grace: Duration::from_secs(10),
                explore_interval: Some(Duration::from_secs(30)),
                ..Config::default()
            },
        );
        let old: Vec<PeerId> = (0..connected).map(|_| peer()).collect();
        for p in &old {
            m.on_connected(*p, None, Instant::now());
        }
        let fresh = peer();
        m.add_addresses(fresh, vec![addr(1)], false);
        // The first tick schedules the first explore, 15 to 45 s on.
        assert!(m.tick(Instant::now()).is_empty());
        (m, old, fresh)
    }

    /// Lets the explore interval (and the old links' grace period) pass: the tick dials
    /// `fresh`, and does nothing else.
    async fn explores(m: &mut PeerManager, fresh: PeerId) {
        tokio::time::advance(Duration::from_secs(46)).await;
        assert_eq!(m.tick(Instant::now()), vec![Action::Dial(fresh, vec![addr(1)])]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_explored_link_replaces_an_older_one_from_the_target_on() {
        let (mut m, old, fresh) = exploring(7);
        assert_eq!(m.target(), 7);
        explores(&mut m, fresh).await;
        // Nothing goes while the dial is in flight.
        assert!(m.tick(Instant::now()).is_empty());
        m.on_connected(fresh, None, Instant::now());
        assert_eq!(m.connected_count(), 8);
        // Once it is up, one of the older links goes, and only one.
        let dropped = match m.tick(Instant::now()).as_slice() {
            [Action::Disconnect(p)] => *p,
            other => panic!("unexpected {other:?}"),
        };
        assert!(old.contains(&dropped), "an older link goes, not the new one");
        assert_eq!(m.connected_count(), 7);
        assert!(m.distance(&fresh).is_none() && m.connected().any(|p| *p == fresh));
        assert!(m.tick(Instant::now()).is_empty(), "one link per explored one");
    }

    #[tokio::test(start_paused = true)]
    async fn an_explored_link_trims_the_count_down_to_the_target() {
        // Nine peers (two dialed in above the target): the explored link makes ten, and three
        // older links go.
        let (mut m, old, fresh) = exploring(9);
        explores(&mut m, fresh).await;
        m.on_connected(fresh, None, Instant::now());
        let actions = m.tick(Instant::now());
        assert_eq!(actions.len(), 3, "{actions:?}");
        assert!(actions.iter().all(|a| matches!(a, Action::Disconnect(p) if old.contains(p))));
        assert_eq!(m.connected_count(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn an_explored_link_is_added_below_the_target() {
        let (mut m, _, fresh) = exploring(5);
        explores(&mut m, fresh).await;
        m.on_connected(fresh, None, Instant::now());
        assert!(m.tick(Instant::now()).is_empty(), "below the target nothing is dropped");
        assert_eq!(m.connected_count(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_explore_drops_nothing() {
        let (mut m, _, fresh) = exploring(8);
        explores(&mut m, fresh).await;
        m.on_dial_failed(&fresh, Instant::now());
        assert!(m.tick(Instant::now()).is_empty(), "no new link, so no old one goes");
        assert_eq!(m.connected_count(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn dials_below_the_minimum_preferring_closer_peers() {
        let mut m = manager(2, 5);
        let (near, far, unknown) = (peer(), peer(), peer());
        m.add_addresses(far, vec![addr(1)], false);
        m.add_addresses(near, vec![addr(2)], false);
        m.add_addresses(unknown, vec![addr(3)], false);
        m.set_known_distance(far, Some(5));
        m.set_known_distance(near, Some(1));
        let actions = m.tick(Instant::now());
        assert_eq!(
            actions,
            vec![Action::Dial(near, vec![addr(2)]), Action::Dial(far, vec![addr(1)])]
        );
        // Dials in flight count towards the minimum.
        assert!(m.tick(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn asks_for_peers_again_while_below_the_minimum() {
        let mut m = manager(3, 5);
        let p = peer();
        m.on_connected(p, None, Instant::now());
        assert_eq!(m.tick(Instant::now()), vec![Action::AskPeers(p)]);
        // Not at every tick: an answer may be on its way.
        assert!(m.tick(Instant::now()).is_empty());
        // But again later, since an answer can be lost or list too few peers.
        tokio::time::advance(ASK_AGAIN).await;
        assert_eq!(m.tick(Instant::now()), vec![Action::AskPeers(p)]);
        // At the minimum, nobody is asked.
        for _ in 0..2 {
            m.on_connected(peer(), None, Instant::now());
        }
        tokio::time::advance(ASK_AGAIN).await;
        assert!(m.tick(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_dials_back_off() {
        let mut m = manager(1, 5);
        let p = peer();
        m.add_addresses(p, vec![addr(1)], false);
        assert_eq!(m.tick(Instant::now()).len(), 1);
        m.on_dial_failed(&p, Instant::now());
        assert!(m.tick(Instant::now()).is_empty(), "backing off");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(m.tick(Instant::now()), vec![Action::Dial(p, vec![addr(1)])]);
    }

    #[tokio::test(start_paused = true)]
    async fn prunes_above_the_maximum_among_the_farthest() {
        let mut m = manager(0, 5);
        let peers: Vec<PeerId> = (0..6).map(|_| peer()).collect();
        for (i, p) in peers.iter().enumerate() {
            // One after the other: the first two, connected longest, are protected.
            tokio::time::advance(Duration::from_millis(1)).await;
            m.on_connected(*p, None, Instant::now());
            m.on_provider_hops(p, i as u8 + 1);
        }
        // One too many: the victim is one of the two farthest (distances 4 and 5).
        match m.tick(Instant::now()).as_slice() {
            [Action::Disconnect(p)] => assert!(*p == peers[4] || *p == peers[5]),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(m.connected_count(), 5);
        assert!(m.tick(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn budget_then_ban_then_unban() {
        let mut m = PeerManager::new(
            peer(),
            Config {
                misbehaviour_budget: 3,
                budget_window: Duration::from_secs(60),
                ban_duration: Duration::from_secs(30),
                ..Config::default()
            },
        );
        let bad = peer();
        m.on_connected(bad, None, Instant::now());
        for _ in 0..3 {
            assert_eq!(m.charge(bad, Instant::now()), None);
        }
        assert_eq!(m.charge(bad, Instant::now()), Some(Action::Ban(bad)));
        assert!(m.is_banned(&bad, Instant::now()));
        assert!(!m.may_dial(&bad, Instant::now()));
        assert_eq!(m.bans_total(), 1);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(m.tick(Instant::now()), vec![Action::Unban(bad)]);
        assert!(!m.is_banned(&bad, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn charges_outside_the_window_are_forgiven() {
        let mut m = PeerManager::new(
            peer(),
            Config {
                misbehaviour_budget: 2,
                budget_window: Duration::from_secs(10),
                ..Config::default()
            },
        );
        let p = peer();
        for _ in 0..10 {
            assert_eq!(m.charge(p, Instant::now()), None);
            tokio::time::advance(Duration::from_secs(6)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn own_distance_follows_the_nearest_peer() {
        let mut m = manager(0, 5);
        let (a, b) = (peer(), peer());
        m.on_connected(a, None, Instant::now());
        m.on_connected(b, None, Instant::now());
        assert_eq!(m.own_distance(false), None);
        m.on_provider_hops(&a, 3);
        m.on_provider_hops(&b, 1);
        assert_eq!(m.own_distance(false), Some(1));
        assert_eq!(m.own_distance(true), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn dials_to_one_ip_are_bounded() {
        let mut m = manager(6, 10);
        let ip_addr =
            |port: u16| -> Multiaddr { format!("/ip4/11.9.9.9/tcp/{port}").parse().unwrap() };
        // Five peers at one IP (a peer-exchange answer steering the mesh at one host) and one
        // elsewhere.
        let crowd: Vec<PeerId> = (0..5).map(|_| peer()).collect();
        for (i, p) in crowd.iter().enumerate() {
            m.add_addresses(*p, vec![ip_addr(4000 + i as u16)], false);
        }
        let other = peer();
        m.add_addresses(other, vec![addr(1)], false);
        let dialed = dialed_by(m.tick(Instant::now()));
        assert_eq!(dialed.iter().filter(|p| crowd.contains(p)).count(), 2, "{dialed:?}");
        assert!(dialed.contains(&other));
        // One finishes: one more to that IP.
        let first = *dialed.iter().find(|p| crowd.contains(p)).unwrap();
        m.on_dial_failed(&first, Instant::now());
        let next = m.tick(Instant::now());
        assert_eq!(next.len(), 1, "{next:?}");
        // Loopback is not bounded (a lab, where every node shares it).
        let mut lab = PeerManager::new(
            peer(),
            Config { min_peers: 6, addr_filter: AddrFilter::lab(), ..Config::default() },
        );
        for i in 0..5 {
            let a: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", 4000 + i).parse().unwrap();
            lab.add_addresses(peer(), vec![a], false);
        }
        assert_eq!(lab.tick(Instant::now()).len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_dialed_in_is_passed_on_only_once_a_dial_reached_it() {
        let mut m = manager(0, 10);
        let p = peer();
        m.on_connected(p, None, Instant::now());
        let refused = m.on_identify(p, vec![addr(1), "/ip4/10.0.0.1/tcp/1".parse().unwrap()]);
        assert_eq!(refused, 1, "a private address is refused by default");
        assert!(m.exchange_list(10).is_empty(), "reported, not reached");
        let actions = m.tick(Instant::now());
        assert_eq!(actions, vec![Action::Confirm(p, addr(1))]);
        assert!(m.tick(Instant::now()).is_empty(), "one confirming dial at a time per peer");
        m.on_confirm_result(p, addr(1), true);
        assert_eq!(m.exchange_list(10), vec![(p, vec![addr(1)])]);
        assert!(m.tick(Instant::now()).is_empty(), "confirmed: no more dials");
        // A peer whose reported address does not answer is not passed on, and is tried a
        // bounded number of times per connection.
        let q = peer();
        m.on_connected(q, None, Instant::now());
        m.on_identify(q, vec![addr(2)]);
        for _ in 0..CONFIRMS_PER_PEER {
            assert_eq!(m.tick(Instant::now()), vec![Action::Confirm(q, addr(2))]);
            m.on_confirm_result(q, addr(2), false);
        }
        assert!(m.tick(Instant::now()).is_empty());
        assert_eq!(m.exchange_list(10).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_or_repeated_entries_push_no_known_peer_out() {
        let mut m = PeerManager::new(peer(), Config { max_known_peers: 2, ..Config::default() });
        let (a, b) = (peer(), peer());
        m.add_addresses(a, vec![addr(1)], false);
        m.add_addresses(b, vec![addr(2)], false);
        let from = peer();
        let private: Vec<(PeerId, Vec<Multiaddr>)> =
            (0..32).map(|_| (peer(), vec!["/ip4/10.0.0.1/tcp/6379".parse().unwrap()])).collect();
        let outcome = m.on_exchange_answer(from, private);
        assert_eq!(outcome.refused, 32);
        let repeated: Vec<(PeerId, Vec<Multiaddr>)> = (0..32).map(|_| (a, vec![addr(1)])).collect();
        assert_eq!(m.on_exchange_answer(from, repeated).kept, 0);
        assert_eq!(m.known_count(), 2);
        assert!(m.book().has_addrs(&a) && m.book().has_addrs(&b));
    }

    /// The exchange list is rebuilt only when its version moves: every change to it must move
    /// the version, and a tick that changes nothing must not.
    #[tokio::test(start_paused = true)]
    async fn the_exchange_version_moves_with_every_change_to_the_exchange_list() {
        let mut m = manager(0, 2);
        let (a, b, c) = (peer(), peer(), peer());
        let mut last = m.exchange_version();
        let mut moved = |m: &PeerManager| {
            let v = m.exchange_version();
            let moved = v != last;
            last = v;
            moved
        };
        m.add_addresses(a, vec![addr(1)], false);
        assert!(moved(&m), "addresses added");
        m.on_connected(a, None, Instant::now());
        assert!(moved(&m), "a peer connected");
        assert!(m.exchange_list(10).is_empty(), "only addresses we reached it at are passed on");
        m.on_dialed(a, addr(1));
        assert!(moved(&m), "an address confirmed");
        assert_eq!(m.exchange_list(10), vec![(a, vec![addr(1)])]);
        assert!(m.tick(Instant::now()).is_empty());
        assert!(!moved(&m), "a tick that changed nothing");
        m.on_disconnected(&a, Instant::now());
        assert!(moved(&m), "a peer left");
        assert!(m.exchange_list(10).is_empty());
        // Pruned above the maximum (2): one of three goes.
        for p in [a, b, c] {
            m.on_dialed(p, addr(2));
            m.on_connected(p, None, Instant::now());
        }
        moved(&m);
        assert_eq!(m.tick(Instant::now()).len(), 1);
        assert!(moved(&m), "a peer pruned");
        assert_eq!(m.exchange_list(10).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn one_network_holds_at_most_its_share_of_the_known_table() {
        let mut m = manager(0, 10);
        let teller = peer();
        m.on_connected(teller, Some(&in_net(1, 1)), Instant::now());
        // 40 peers of network 12.7.0.0/24 in two answers, then one of another network.
        for chunk in [0u8..20, 20..40] {
            let entries = chunk.map(|h| (peer(), vec![in_net(7, h + 2)])).collect();
            m.on_exchange_answer(teller, entries);
        }
        let crowd = subnet::of_addr(&in_net(7, 2), false).unwrap();
        assert_eq!(m.known_by_subnet().get(&crowd), Some(&32));
        assert_eq!(m.take_table_refusals(), 8);
        m.on_exchange_answer(teller, vec![(peer(), vec![in_net(8, 2)])]);
        let other = subnet::of_addr(&in_net(8, 2), false).unwrap();
        assert_eq!(m.known_by_subnet().get(&other), Some(&1), "other networks still get in");
        assert_eq!(m.take_table_refusals(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_peers_of_one_network_tell_of_at_most_their_share() {
        let mut m = manager(0, 10);
        // Three tellers in one network, each naming 30 peers of networks all different.
        let tellers: Vec<PeerId> = (0..3).map(|_| peer()).collect();
        for (i, t) in tellers.iter().enumerate() {
            m.on_connected(*t, Some(&in_net(3, i as u8 + 1)), Instant::now());
            let entries = (0..30u16).map(|n| (peer(), vec![addr(n + 30 * i as u16)])).collect();
            m.on_exchange_answer(*t, entries);
        }
        assert_eq!(m.known_count(), 64, "64 of the 90 peers they named");
        assert_eq!(m.take_table_refusals(), 90 - 64);
        // A teller elsewhere is heard.
        let elsewhere = peer();
        m.on_connected(elsewhere, Some(&in_net(4, 1)), Instant::now());
        m.on_exchange_answer(elsewhere, vec![(peer(), vec![addr(200)])]);
        assert_eq!(m.known_count(), 65);
    }

    #[tokio::test(start_paused = true)]
    async fn peers_told_of_never_push_out_peers_reached_or_pinned() {
        let mut m = PeerManager::new(peer(), Config { max_known_peers: 3, ..Config::default() });
        let (reached, pinned, teller) = (peer(), peer(), peer());
        m.on_dialed(reached, addr(1));
        m.add_addresses(pinned, vec![addr(2)], true);
        m.on_connected(teller, Some(&addr(3)), Instant::now());
        m.on_exchange_answer(teller, (10..20).map(|n| (peer(), vec![addr(n)])).collect());
        // Told-of peers take each other's place, never the reached or the pinned one's.
        assert_eq!(m.known_count(), 3);
        assert!(m.book().has_addrs(&reached) && m.book().has_addrs(&pinned));
        // A peer reached by dialing takes the place of one only told of.
        let mut m = PeerManager::new(peer(), Config { max_known_peers: 2, ..Config::default() });
        let told = peer();
        m.add_addresses(told, vec![addr(5)], false);
        m.add_addresses(peer(), vec![addr(6)], false);
        m.on_dialed(reached, addr(1));
        assert!(m.book().has_addrs(&reached));
        assert_eq!(m.known_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn dials_into_one_network_are_bounded() {
        let mut m = manager(6, 10);
        // Five peers at five addresses of one network, one elsewhere.
        let crowd: Vec<PeerId> = (0..5).map(|_| peer()).collect();
        for (i, p) in crowd.iter().enumerate() {
            m.add_addresses(*p, vec![in_net(9, i as u8 + 1)], false);
        }
        let other = peer();
        m.add_addresses(other, vec![addr(1)], false);
        let dialed = dialed_by(m.tick(Instant::now()));
        assert_eq!(dialed.iter().filter(|p| crowd.contains(p)).count(), 2, "{dialed:?}");
        assert!(dialed.contains(&other));
        // Connected peers of that network count too: with two links there, no third dial.
        for p in dialed.iter().filter(|p| crowd.contains(p)) {
            let at = m.book().dial_addrs(p)[0].clone();
            m.on_connected(*p, Some(&at), Instant::now());
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let again = m.tick(Instant::now());
        assert!(
            !again.iter().any(|a| matches!(a, Action::Dial(p, _) if crowd.contains(p))),
            "{again:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_peers_connected_longest_are_never_pruned() {
        let mut m = PeerManager::new(
            peer(),
            Config {
                min_peers: 0,
                max_peers: 3,
                prune_grace: Duration::ZERO,
                explore_interval: None,
                ..Config::default()
            },
        );
        let old: Vec<PeerId> = (0..2).map(|_| peer()).collect();
        for p in &old {
            m.on_connected(*p, None, Instant::now());
            // Farther from a provider than anyone: first in line for pruning but for their age.
            m.on_provider_hops(p, 9);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..4 {
            let p = peer();
            m.on_connected(p, None, Instant::now());
            m.on_provider_hops(&p, 1);
        }
        let pruned = m.tick(Instant::now());
        assert_eq!(pruned.len(), 3, "{pruned:?}");
        assert!(pruned.iter().all(|a| matches!(a, Action::Disconnect(p) if !old.contains(p))));
    }
}
