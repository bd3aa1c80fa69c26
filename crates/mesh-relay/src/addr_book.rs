//! The address book: where each known peer can be dialed, kept so that no peer can overwrite
//! what the operator or the peer itself said (STYLE "Bounds and blame").
//!
//! Per peer it keeps four lists apart:
//! - **configured** by the operator (`MESH_BOOTSTRAP_PEERS`, [`crate::Relay::dial`]): never
//!   evicted, never filtered;
//! - **reported** by the peer itself (its listen addresses over identify): replaced by its next
//!   report, at most [`MAX_REPORTED`];
//! - **confirmed**: addresses we dialed the peer at successfully (libp2p checked its key), at
//!   most [`MAX_CONFIRMED`], the most recent first; only these are passed on in peer exchange;
//! - **claimed** by third parties (a peer-exchange answer, an mDNS or BLE record, whose
//!   `peer_id` nobody vouches for): at most [`MAX_CLAIMS_PER_PEER`] per peer, of which one
//!   claimant holds at most [`MAX_CLAIMS_PER_CLAIMANT_AND_PEER`], and at most
//!   [`MAX_CLAIMS_PER_CLAIMANT`] over all peers ([`MAX_LAN_CLAIMS`] for local discovery), so
//!   that one claimant only ever evicts its own claims (Bitcoin Core's addrman keeps addresses in buckets per source for the same reason).
//!
//! Dials try confirmed addresses first, then configured, reported and claimed ones. Every
//! address learned from the network passes the node's [`AddrFilter`] first. Sans-I/O, and no
//! clock either: the age of a claim is its place in the order claims arrived.

use std::collections::{HashMap, HashSet, VecDeque};

use libp2p::{Multiaddr, PeerId};
use mesh_protocol::AddrFilter;

/// Most addresses a peer's own report keeps.
pub const MAX_REPORTED: usize = 8;
/// Most confirmed (dialed successfully) addresses kept per peer.
pub const MAX_CONFIRMED: usize = 4;
/// Most third-party claims kept per peer.
pub const MAX_CLAIMS_PER_PEER: usize = 16;
/// Most claims one claimant holds about one peer (the addresses of one peer-exchange entry).
pub const MAX_CLAIMS_PER_CLAIMANT_AND_PEER: usize = 4;
/// Most claims one claimant holds over all peers (one full peer-exchange answer: 32 peers with
/// 4 addresses each).
pub const MAX_CLAIMS_PER_CLAIMANT: usize = 128;
/// Most claims local discovery (mDNS and BLE together, one claimant) holds over all peers: a
/// LAN may hold more nodes than one peer-exchange answer names.
pub const MAX_LAN_CLAIMS: usize = 512;
/// Most addresses handed to one dial.
pub const MAX_DIAL_ADDRS: usize = 8;

/// Who said where a peer is, when it is neither the operator nor the peer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Claimant {
    /// A connected peer, in a peer-exchange answer.
    Peer(PeerId),
    /// Local discovery (mDNS, BLE): records anyone on the link can send.
    Lan,
}

#[derive(Debug, Clone)]
struct Claim {
    addr: Multiaddr,
    by: Claimant,
    /// Arrival order (higher: newer).
    seq: u64,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    configured: Vec<Multiaddr>,
    reported: Vec<Multiaddr>,
    confirmed: Vec<Multiaddr>,
    claims: Vec<Claim>,
}

impl Entry {
    fn holds(&self, addr: &Multiaddr) -> bool {
        self.configured.contains(addr)
            || self.reported.contains(addr)
            || self.confirmed.contains(addr)
            || self.claims.iter().any(|c| c.addr == *addr)
    }

    fn is_empty(&self) -> bool {
        self.configured.is_empty()
            && self.reported.is_empty()
            && self.confirmed.is_empty()
            && self.claims.is_empty()
    }
}

/// What a batch of claims did (for counting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClaimOutcome {
    /// New claims kept.
    pub kept: usize,
    /// Addresses the filter refused.
    pub refused: usize,
    /// Entries left out as repeats (of a peer already in the answer, or of a known address).
    pub repeated: usize,
}

/// Addresses of known peers, by source. See the module docs.
#[derive(Debug, Default)]
pub struct AddrBook {
    filter: AddrFilter,
    entries: HashMap<PeerId, Entry>,
    /// Per claimant, its claims oldest first (peer, address): the bound per claimant, and
    /// which claim goes when it is reached.
    by_claimant: HashMap<Claimant, VecDeque<(PeerId, Multiaddr)>>,
    /// Claims so far (the next claim's `seq`).
    seq: u64,
}

impl AddrBook {
    /// An empty book applying `filter` to every address learned from the network.
    pub fn new(filter: AddrFilter) -> Self {
        Self { filter, ..Self::default() }
    }

    /// The filter.
    pub fn filter(&self) -> AddrFilter {
        self.filter
    }

    /// Whether any address of `peer` is known.
    pub fn has_addrs(&self, peer: &PeerId) -> bool {
        self.entries.get(peer).is_some_and(|e| !e.is_empty())
    }

    /// Whether the operator configured `peer`.
    pub fn is_configured(&self, peer: &PeerId) -> bool {
        self.entries.get(peer).is_some_and(|e| !e.configured.is_empty())
    }

    /// Operator-given addresses of `peer`: kept for good, never filtered.
    pub fn configure(&mut self, peer: PeerId, addrs: impl IntoIterator<Item = Multiaddr>) {
        let entry = self.entries.entry(peer).or_default();
        for addr in addrs {
            if !entry.configured.contains(&addr) {
                entry.configured.push(addr);
            }
        }
    }

    /// `peer`'s own listen addresses (identify): replace its previous report. Returns how many
    /// the filter refused.
    pub fn report(&mut self, peer: PeerId, addrs: impl IntoIterator<Item = Multiaddr>) -> usize {
        let mut refused = 0;
        let mut kept = Vec::new();
        for addr in addrs {
            if !self.filter.allows(&addr) {
                refused += 1;
            } else if !kept.contains(&addr) && kept.len() < MAX_REPORTED {
                kept.push(addr);
            }
        }
        let entry = self.entries.entry(peer).or_default();
        entry.reported = kept;
        refused
    }

    /// We dialed `peer` at `addr` and reached it: preferred for dials, and passed on in peer
    /// exchange. The connection proved the address, so no filter applies (a configured one may
    /// be anything the operator chose).
    pub fn confirm(&mut self, peer: PeerId, addr: Multiaddr) {
        let entry = self.entries.entry(peer).or_default();
        entry.confirmed.retain(|a| *a != addr);
        entry.confirmed.insert(0, addr);
        entry.confirmed.truncate(MAX_CONFIRMED);
    }

    /// A dial of `peer` at `addr` failed: the address is no longer confirmed, and a third
    /// party's claim of it is dropped.
    pub fn failed(&mut self, peer: &PeerId, addr: &Multiaddr) {
        let Some(entry) = self.entries.get_mut(peer) else { return };
        entry.confirmed.retain(|a| a != addr);
        let dropped: Vec<Claimant> =
            entry.claims.iter().filter(|c| c.addr == *addr).map(|c| c.by).collect();
        entry.claims.retain(|c| c.addr != *addr);
        for by in dropped {
            self.unlist(by, peer, addr);
        }
        self.drop_if_empty(peer);
    }

    /// A peer-exchange answer (or a discovery record) from `by`: claims about other peers.
    /// Only the first entry of each peer counts, `local` is skipped, and every address passes
    /// the filter (as a LAN address when `by` is [`Claimant::Lan`]).
    pub fn claim(
        &mut self,
        by: Claimant,
        local: PeerId,
        entries: impl IntoIterator<Item = (PeerId, Vec<Multiaddr>)>,
    ) -> ClaimOutcome {
        let mut outcome = ClaimOutcome::default();
        let mut seen = HashSet::new();
        for (peer, addrs) in entries {
            if peer == local || Claimant::Peer(peer) == by || !seen.insert(peer) {
                outcome.repeated += 1;
                continue;
            }
            for addr in addrs {
                let allowed = match by {
                    Claimant::Lan => self.filter.allows_from_lan(&addr),
                    Claimant::Peer(_) => self.filter.allows(&addr),
                };
                if !allowed {
                    outcome.refused += 1;
                } else if self.add_claim(by, peer, addr) {
                    outcome.kept += 1;
                } else {
                    outcome.repeated += 1;
                }
            }
        }
        outcome
    }

    fn add_claim(&mut self, by: Claimant, peer: PeerId, addr: Multiaddr) -> bool {
        let entry = self.entries.entry(peer).or_default();
        if entry.holds(&addr) {
            return false;
        }
        // This claimant's own claims about this peer: the oldest of its own goes.
        let mine = entry.claims.iter().filter(|c| c.by == by).count();
        if mine >= MAX_CLAIMS_PER_CLAIMANT_AND_PEER {
            if let Some(i) = entry.claims.iter().position(|c| c.by == by) {
                let old = entry.claims.remove(i);
                self.unlist(by, &peer, &old.addr);
            }
        } else if entry.claims.len() >= MAX_CLAIMS_PER_PEER {
            // Full: the oldest claim of whoever holds the most about this peer goes (so a
            // claimant with fewer than its share never loses one to a busier one).
            let mut counts: HashMap<Claimant, usize> = HashMap::new();
            for c in &entry.claims {
                *counts.entry(c.by).or_default() += 1;
            }
            let most = counts.values().copied().max().unwrap_or(0);
            let victim = entry
                .claims
                .iter()
                .enumerate()
                .filter(|(_, c)| counts.get(&c.by) == Some(&most))
                .min_by_key(|(_, c)| c.seq)
                .map(|(i, _)| i);
            if let Some(i) = victim {
                let old = entry.claims.remove(i);
                self.unlist(old.by, &peer, &old.addr);
            }
        }
        let entry = self.entries.entry(peer).or_default();
        self.seq += 1;
        entry.claims.push(Claim { addr: addr.clone(), by, seq: self.seq });
        let list = self.by_claimant.entry(by).or_default();
        list.push_back((peer, addr));
        // Over the claimant's bound: its own oldest claim goes.
        let bound = match by {
            Claimant::Peer(_) => MAX_CLAIMS_PER_CLAIMANT,
            Claimant::Lan => MAX_LAN_CLAIMS,
        };
        if list.len() > bound
            && let Some((old_peer, old_addr)) = list.pop_front()
        {
            if let Some(e) = self.entries.get_mut(&old_peer) {
                e.claims.retain(|c| !(c.by == by && c.addr == old_addr));
            }
            self.drop_if_empty(&old_peer);
        }
        true
    }

    /// Removes (peer, addr) from `by`'s list.
    fn unlist(&mut self, by: Claimant, peer: &PeerId, addr: &Multiaddr) {
        if let Some(list) = self.by_claimant.get_mut(&by) {
            if let Some(i) = list.iter().position(|(p, a)| p == peer && a == addr) {
                list.remove(i);
            }
            if list.is_empty() {
                self.by_claimant.remove(&by);
            }
        }
    }

    fn drop_if_empty(&mut self, peer: &PeerId) {
        if self.entries.get(peer).is_some_and(Entry::is_empty) {
            self.entries.remove(peer);
        }
    }

    /// Forgets every claim `by` made (it was banned).
    pub fn forget_claims_by(&mut self, by: Claimant) {
        for (peer, addr) in self.by_claimant.remove(&by).unwrap_or_default() {
            if let Some(e) = self.entries.get_mut(&peer) {
                e.claims.retain(|c| !(c.by == by && c.addr == addr));
            }
            self.drop_if_empty(&peer);
        }
    }

    /// Forgets `peer`, except what the operator configured.
    pub fn forget(&mut self, peer: &PeerId) {
        let Some(entry) = self.entries.get_mut(peer) else { return };
        entry.reported.clear();
        entry.confirmed.clear();
        let claims: Vec<Claim> = std::mem::take(&mut entry.claims);
        for c in claims {
            self.unlist(c.by, peer, &c.addr);
        }
        self.drop_if_empty(peer);
    }

    /// Where to dial `peer`: confirmed addresses first, then configured, reported and claimed
    /// ones (newest first), each once, at most [`MAX_DIAL_ADDRS`].
    pub fn dial_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let Some(e) = self.entries.get(peer) else { return Vec::new() };
        let mut claims: Vec<&Claim> = e.claims.iter().collect();
        claims.sort_by_key(|c| std::cmp::Reverse(c.seq));
        let all = e
            .confirmed
            .iter()
            .chain(&e.configured)
            .chain(&e.reported)
            .chain(claims.into_iter().map(|c| &c.addr));
        let mut out: Vec<Multiaddr> = Vec::new();
        for a in all {
            if out.len() >= MAX_DIAL_ADDRS {
                break;
            }
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }

    /// What peer exchange may pass on about `peer`: only addresses we reached it at.
    pub fn exchange_addrs(&self, peer: &PeerId) -> &[Multiaddr] {
        self.entries.get(peer).map_or(&[], |e| &e.confirmed)
    }

    /// `peer`'s own reported addresses not yet confirmed (candidates for a confirming dial).
    pub fn unconfirmed_reported(&self, peer: &PeerId) -> impl Iterator<Item = &Multiaddr> {
        self.entries
            .get(peer)
            .into_iter()
            .flat_map(|e| e.reported.iter().filter(|a| !e.confirmed.contains(a)))
    }

    /// Claims held by `by` (for tests and status).
    pub fn claims_by(&self, by: Claimant) -> usize {
        self.by_claimant.get(&by).map_or(0, VecDeque::len)
    }

    /// Third-party claims held about `peer`.
    pub fn claims_of(&self, peer: &PeerId) -> usize {
        self.entries.get(peer).map_or(0, |e| e.claims.len())
    }

    /// Peers with at least one address.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No peer has an address.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn public(n: u32) -> Multiaddr {
        let ip = std::net::Ipv4Addr::from(0x0b00_0000 + n); // 11.0.0.0/8: public
        format!("/ip4/{ip}/tcp/4001").parse().unwrap()
    }

    #[test]
    fn a_flood_of_claims_evicts_neither_configured_nor_reported_addresses() {
        let mut book = AddrBook::new(AddrFilter::PUBLIC);
        let local = PeerId::random();
        let (boot, honest) = (PeerId::random(), PeerId::random());
        let boot_addr = ma("/ip4/10.1.1.1/tcp/4001"); // configured: even a private one stays
        book.configure(boot, [boot_addr.clone()]);
        book.report(honest, [public(1), public(2)]);
        // 50 attackers each send 100 full answers about the same two peers, all different
        // addresses.
        let mut n = 1000;
        for _ in 0..50 {
            let by = Claimant::Peer(PeerId::random());
            for _ in 0..100 {
                let answer: Vec<(PeerId, Vec<Multiaddr>)> = [boot, honest]
                    .iter()
                    .map(|p| {
                        n += 4;
                        (*p, (0..4).map(|i| public(n + i)).collect())
                    })
                    .collect();
                book.claim(by, local, answer);
                assert!(book.claims_by(by) <= MAX_CLAIMS_PER_CLAIMANT);
            }
        }
        assert_eq!(book.dial_addrs(&boot)[0], boot_addr, "the configured address first");
        assert!(book.is_configured(&boot));
        let honest_addrs = book.dial_addrs(&honest);
        assert_eq!(honest_addrs[..2], [public(1), public(2)], "the peer's own report first");
        // Claims stay bounded per peer, dials too.
        assert_eq!(book.claims_of(&boot), MAX_CLAIMS_PER_PEER);
        assert_eq!(book.dial_addrs(&boot).len(), MAX_DIAL_ADDRS);
        // Nothing claimed is passed on.
        assert!(book.exchange_addrs(&boot).is_empty());
    }

    #[test]
    fn one_claimant_cannot_evict_others_claims_beyond_its_share() {
        let mut book = AddrBook::new(AddrFilter::PUBLIC);
        let (local, target) = (PeerId::random(), PeerId::random());
        let honest = Claimant::Peer(PeerId::random());
        book.claim(honest, local, [(target, vec![public(1)])]);
        let flooder = Claimant::Peer(PeerId::random());
        for i in 0..1000 {
            book.claim(flooder, local, [(target, vec![public(100 + i)])]);
        }
        assert!(book.dial_addrs(&target).contains(&public(1)), "the honest claim stays");
        assert_eq!(book.claims_by(flooder), MAX_CLAIMS_PER_CLAIMANT_AND_PEER);
        // Many claimants: the peer's claims stay bounded, and each sybil keeps at most its share.
        for i in 0..100 {
            book.claim(Claimant::Peer(PeerId::random()), local, [(target, vec![public(5000 + i)])]);
        }
        assert_eq!(book.claims_of(&target), MAX_CLAIMS_PER_PEER);
    }

    #[test]
    fn a_claimant_is_bounded_over_all_peers() {
        let mut book = AddrBook::new(AddrFilter::PUBLIC);
        let local = PeerId::random();
        let by = Claimant::Peer(PeerId::random());
        for i in 0..1000 {
            book.claim(by, local, [(PeerId::random(), vec![public(i)])]);
        }
        assert!(book.claims_by(Claimant::Lan) == 0);
        assert_eq!(book.claims_by(by), MAX_CLAIMS_PER_CLAIMANT);
        assert_eq!(book.len(), MAX_CLAIMS_PER_CLAIMANT, "peers known only through it go too");
        book.forget_claims_by(by);
        assert!(book.is_empty());
        for i in 0..1000 {
            book.claim(Claimant::Lan, local, [(PeerId::random(), vec![public(i)])]);
        }
        assert_eq!(book.claims_by(Claimant::Lan), MAX_LAN_CLAIMS);
    }

    #[test]
    fn an_answer_repeating_one_peer_is_deduplicated() {
        let mut book = AddrBook::new(AddrFilter::PUBLIC);
        let (local, target) = (PeerId::random(), PeerId::random());
        let by = Claimant::Peer(PeerId::random());
        let answer: Vec<(PeerId, Vec<Multiaddr>)> =
            (0..32).map(|i| (target, vec![public(i * 4), public(i * 4 + 1)])).collect();
        let outcome = book.claim(by, local, answer);
        assert_eq!(outcome, ClaimOutcome { kept: 2, refused: 0, repeated: 31 });
        assert_eq!(book.dial_addrs(&target), vec![public(1), public(0)], "newest first");
        // The same address again, from anyone, is no new claim.
        let other = Claimant::Peer(PeerId::random());
        let again = book.claim(other, local, [(target, vec![public(0)])]);
        assert_eq!(again.kept, 0);
    }

    #[test]
    fn learned_addresses_pass_the_filter_and_configured_ones_need_not() {
        let mut book = AddrBook::new(AddrFilter::PUBLIC);
        let (local, p) = (PeerId::random(), PeerId::random());
        let by = Claimant::Peer(PeerId::random());
        let bad = [
            ma("/ip4/127.0.0.2/tcp/6379"),
            ma("/ip4/169.254.169.254/tcp/80"),
            ma("/ip4/10.0.0.1/tcp/5432"),
            ma("/dns4/localhost/tcp/6379"),
        ];
        let outcome = book.claim(by, local, [(p, bad.to_vec())]);
        assert_eq!(outcome.refused, 4);
        assert_eq!(book.report(p, bad.clone()), 4);
        assert!(!book.has_addrs(&p));
        // mDNS may bring a LAN address, never loopback.
        let lan = book.claim(
            Claimant::Lan,
            local,
            [(p, vec![ma("/ip4/192.168.1.9/tcp/4001"), ma("/ip4/127.0.0.1/tcp/4001")])],
        );
        assert_eq!((lan.kept, lan.refused), (1, 1));
        // Ourselves and the claimant itself are skipped.
        let me = book.claim(by, local, [(local, vec![public(1)])]);
        assert_eq!(me.kept, 0);
        // A lab allows loopback.
        let mut lab = AddrBook::new(AddrFilter::lab());
        lab.report(p, [ma("/ip4/127.0.0.1/tcp/4001")]);
        assert!(lab.has_addrs(&p));
    }

    #[test]
    fn dialed_addresses_are_preferred_and_alone_passed_on() {
        let mut book = AddrBook::new(AddrFilter::PUBLIC);
        let p = PeerId::random();
        book.report(p, [public(1), public(2)]);
        book.claim(Claimant::Lan, PeerId::random(), [(p, vec![public(3)])]);
        assert!(book.exchange_addrs(&p).is_empty());
        assert_eq!(book.unconfirmed_reported(&p).count(), 2);
        book.confirm(p, public(2));
        assert_eq!(book.dial_addrs(&p), vec![public(2), public(1), public(3)]);
        assert_eq!(book.exchange_addrs(&p), [public(2)]);
        assert_eq!(book.unconfirmed_reported(&p).cloned().collect::<Vec<_>>(), vec![public(1)]);
        book.failed(&p, &public(2));
        assert!(book.exchange_addrs(&p).is_empty());
        book.failed(&p, &public(3));
        assert_eq!(book.dial_addrs(&p), vec![public(1), public(2)]);
    }

    #[test]
    fn forgetting_keeps_configured_addresses() {
        let mut book = AddrBook::new(AddrFilter::PUBLIC);
        let p = PeerId::random();
        book.configure(p, [public(1)]);
        book.report(p, [public(2)]);
        book.forget(&p);
        assert_eq!(book.dial_addrs(&p), vec![public(1)]);
    }
}
