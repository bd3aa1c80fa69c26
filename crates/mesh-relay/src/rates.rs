//! Per-origin rates ([`OriginRate`]): how many messages, and prices, of each origin a peer may
//! bring per second, and how many of all the young origins together.
//!
//! Once an origin is known (its first messages passed the budget of unknown origins,
//! [`crate::OriginBudget`]), nothing else limited it: a throwaway key, once accepted, could
//! publish without limit, and every node verified, delivered, stored and forwarded all of it.
//! Each (peer, origin) pair now has a token bucket for messages and one for prices. The
//! buckets are per peer, not per origin alone, because the check comes before the signature
//! check (the origin is claimed, not proven, at that point): a peer sending forgeries in an
//! honest provider's name uses up only its own share of that provider's rate, never the share
//! of the honest links. The excess is dropped unchecked and counted
//! (`mesh_relay_dropped_total{reason="origin_rate"}`), never charged: an honest relay may be
//! passing on someone else's flood. An honest relay passes on no more than it accepted itself,
//! so a flood from one origin is cut to the rate at its first hop and stays within it beyond.
//!
//! **Young origins share one budget per peer.** A rate per origin alone lets a peer that
//! brings 50 fresh keys bring 50 rates of valid junk: each key within its own, all of them
//! filling the node's one core queue. So an origin is *young* until this node first accepted
//! one of its messages [`OriginRate::young_for`] ago (ten minutes by default), and the messages
//! of every young origin a peer brings also take from one bucket of that peer
//! ([`OriginRate::young_messages_per_sec`] and the fields after it). A peer that introduces
//! many keys gets one share, not one per key; the established providers of the mesh, older
//! than the window, never touch it. The age comes from accepted (verified) messages only, so
//! forgeries cannot age a key, and it is kept for at most [`OriginRate::max_aged_origins`]
//! origins: young ones and those silent for ten windows are forgotten first, and an origin
//! without room stays young. The cost: during such a flood, a provider that joined less than
//! the window ago shares the flooding link's young budget (its other links are untouched).
//!
//! Memory is bounded per source: each peer has at most [`OriginRate::max_origins_per_peer`]
//! buckets, and at most [`OriginRate::max_peers`] peers have any. A full bucket (one that has
//! refilled) is the same as a missing one, so those are forgotten first; when a peer's every
//! bucket is in use, the messages of its further origins share one overflow bucket of that
//! peer (forgetting a bucket in use would hand its origin a fresh burst). The peer heard from
//! least recently is forgotten when a new one needs room.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use mesh_protocol::NodeId;

/// How fast each origin's messages may come through one peer, and all young origins' together
/// (part of [`crate::CoreConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OriginRate {
    /// Messages of one origin per second from one peer.
    pub messages_per_sec: f64,
    /// Most messages of one origin a peer may bring at once.
    pub message_burst: f64,
    /// Prices (entries of price batches) of one origin per second from one peer.
    pub prices_per_sec: f64,
    /// Most prices of one origin a peer may bring at once (a batch larger than this costs
    /// this much).
    pub price_burst: f64,
    /// How long after this node first accepted one of its messages an origin counts as young.
    pub young_for: Duration,
    /// Messages of all young origins together per second from one peer.
    pub young_messages_per_sec: f64,
    /// Most messages of young origins a peer may bring at once.
    pub young_message_burst: f64,
    /// Prices of all young origins together per second from one peer.
    pub young_prices_per_sec: f64,
    /// Most prices of young origins a peer may bring at once.
    pub young_price_burst: f64,
    /// Most origins whose age is kept (the others are young).
    pub max_aged_origins: usize,
    /// Most origins with a bucket of their own per peer; the others share one.
    pub max_origins_per_peer: usize,
    /// Most peers with buckets (the one heard from least recently is forgotten).
    pub max_peers: usize,
}

impl Default for OriginRate {
    /// 20 messages a second with bursts of 200, and 2,000 prices a second with bursts of
    /// 20,000, per origin and peer: a real provider sends one batch of up to 1,000 prices
    /// every 10 s and an announce; the relay benchmark's busiest origins send 2 batches of 50
    /// prices a second. Young origins (first accepted less than ten minutes ago) together:
    /// 100 messages a second with bursts of 1,000, and 10,000 prices a second with bursts of
    /// 50,000, per peer: five times one origin's rate, twice what the relay benchmark's 100
    /// new publishers send together. Buckets for 1,024 origins per peer and 64 peers: at most
    /// 65,536 buckets of about 50 bytes, some 3 MiB; ages of 10,000 origins, some 0.5 MiB.
    fn default() -> Self {
        Self {
            messages_per_sec: 20.0,
            message_burst: 200.0,
            prices_per_sec: 2_000.0,
            price_burst: 20_000.0,
            young_for: Duration::from_secs(600),
            young_messages_per_sec: 100.0,
            young_message_burst: 1_000.0,
            young_prices_per_sec: 10_000.0,
            young_price_burst: 50_000.0,
            max_aged_origins: 10_000,
            max_origins_per_peer: 1024,
            max_peers: 64,
        }
    }
}

/// One token bucket's rates: an origin's ([`OriginRate::per_origin`]) or the young origins'
/// ([`OriginRate::young`]).
#[derive(Debug, Clone, Copy)]
struct Limit {
    messages_per_sec: f64,
    message_burst: f64,
    prices_per_sec: f64,
    price_burst: f64,
}

impl OriginRate {
    fn per_origin(&self) -> Limit {
        Limit {
            messages_per_sec: self.messages_per_sec,
            message_burst: self.message_burst,
            prices_per_sec: self.prices_per_sec,
            price_burst: self.price_burst,
        }
    }

    fn young(&self) -> Limit {
        Limit {
            messages_per_sec: self.young_messages_per_sec,
            message_burst: self.young_message_burst,
            prices_per_sec: self.young_prices_per_sec,
            price_burst: self.young_price_burst,
        }
    }

    fn young_for_ms(&self) -> i64 {
        i64::try_from(self.young_for.as_millis()).unwrap_or(i64::MAX)
    }
}

/// One bucket's tokens, as of `at_ms`.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    messages: f64,
    prices: f64,
    at_ms: i64,
}

impl Tokens {
    fn full(limit: &Limit, now_ms: i64) -> Self {
        Self { messages: limit.message_burst, prices: limit.price_burst, at_ms: now_ms }
    }

    fn refill(&mut self, limit: &Limit, now_ms: i64) {
        let secs = (now_ms - self.at_ms).max(0) as f64 / 1000.0;
        self.messages = (self.messages + secs * limit.messages_per_sec).min(limit.message_burst);
        self.prices = (self.prices + secs * limit.prices_per_sec).min(limit.price_burst);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn is_full(&self, limit: &Limit, now_ms: i64) -> bool {
        let mut t = *self;
        t.refill(limit, now_ms);
        t.messages >= limit.message_burst && t.prices >= limit.price_burst
    }

    /// Whether one message costing `prices` could be taken (after a refill).
    fn has(&mut self, limit: &Limit, prices: f64, now_ms: i64) -> bool {
        self.refill(limit, now_ms);
        self.messages >= 1.0 && self.prices >= prices.min(limit.price_burst)
    }

    /// Takes one message costing `prices`, which [`Tokens::has`] allowed just before.
    fn spend(&mut self, limit: &Limit, prices: f64) {
        self.messages -= 1.0;
        self.prices -= prices.min(limit.price_burst);
    }
}

/// One peer's buckets.
#[derive(Debug)]
struct PeerTokens {
    origins: HashMap<NodeId, Tokens>,
    /// Shared by the origins beyond `max_origins_per_peer`.
    overflow: Tokens,
    /// Shared by every young origin (on top of each one's own bucket).
    young: Tokens,
    /// When this peer last brought a message (for forgetting the least recent peer).
    used_ms: i64,
    /// No sweep for full buckets before this (a peer whose buckets are all in use would
    /// otherwise cost a sweep per message).
    sweep_at_ms: i64,
}

impl PeerTokens {
    fn is_full(&self, rate: &OriginRate, now_ms: i64) -> bool {
        let limit = rate.per_origin();
        self.overflow.is_full(&limit, now_ms)
            && self.young.is_full(&rate.young(), now_ms)
            && self.origins.values().all(|t| t.is_full(&limit, now_ms))
    }
}

/// When this node first and last accepted a message of each origin it keeps an age for.
#[derive(Debug, Default)]
struct Ages {
    /// Origin to (first, last) accepted, Unix ms.
    seen: HashMap<NodeId, (i64, i64)>,
    /// No sweep for room before this.
    sweep_at_ms: i64,
}

/// The buckets of every peer.
#[derive(Debug)]
pub(crate) struct OriginRates<P> {
    rate: OriginRate,
    peers: HashMap<P, PeerTokens>,
    ages: Ages,
}

impl<P: Clone + Eq + Hash> OriginRates<P> {
    /// Empty tables for `rate`.
    pub(crate) fn new(rate: OriginRate) -> Self {
        Self { rate, peers: HashMap::new(), ages: Ages::default() }
    }

    /// Whether `origin` is young at `now_ms`: no message of it accepted, or the first less
    /// than [`OriginRate::young_for`] ago.
    pub(crate) fn is_young(&self, origin: &NodeId, now_ms: i64) -> bool {
        self.ages
            .seen
            .get(origin)
            .is_none_or(|(first, _)| now_ms.saturating_sub(*first) < self.rate.young_for_ms())
    }

    /// This node accepted a (verified) message of `origin` at `now_ms`: its age starts, or its
    /// last message moves on.
    pub(crate) fn accepted(&mut self, origin: NodeId, now_ms: i64) {
        if let Some((_, last)) = self.ages.seen.get_mut(&origin) {
            *last = (*last).max(now_ms);
            return;
        }
        let cap = self.rate.max_aged_origins.max(1);
        if self.ages.seen.len() >= cap && now_ms >= self.ages.sweep_at_ms {
            // Young origins lose nothing by being forgotten (they start again as young), nor
            // do origins silent for ten windows; established ones that still speak are kept.
            let young_for = self.rate.young_for_ms();
            let silent_for = young_for.saturating_mul(10);
            self.ages.seen.retain(|_, (first, last)| {
                now_ms.saturating_sub(*first) >= young_for
                    && now_ms.saturating_sub(*last) < silent_for
            });
            self.ages.sweep_at_ms = now_ms + 1000;
        }
        if self.ages.seen.len() < cap {
            self.ages.seen.insert(origin, (now_ms, now_ms));
        }
    }

    /// Takes a message of `origin` carrying `prices` prices from `peer`'s share (and from its
    /// young origins' share while `origin` is young); `false` when the peer has brought that
    /// origin's messages, or young origins' messages, faster than the rate (nothing is taken).
    pub(crate) fn take(&mut self, peer: &P, origin: NodeId, prices: usize, now_ms: i64) -> bool {
        let rate = self.rate;
        let young = self.is_young(&origin, now_ms);
        if !self.peers.contains_key(peer) {
            self.make_room(now_ms);
        }
        let (limit, young_limit) = (rate.per_origin(), rate.young());
        let tokens = self.peers.entry(peer.clone()).or_insert_with(|| PeerTokens {
            origins: HashMap::new(),
            overflow: Tokens::full(&limit, now_ms),
            young: Tokens::full(&young_limit, now_ms),
            used_ms: now_ms,
            sweep_at_ms: now_ms,
        });
        tokens.used_ms = tokens.used_ms.max(now_ms);
        let cap = rate.max_origins_per_peer.max(1);
        if !tokens.origins.contains_key(&origin)
            && tokens.origins.len() >= cap
            && now_ms >= tokens.sweep_at_ms
        {
            // Full buckets are the same as missing ones: forgetting them loses nothing.
            tokens.origins.retain(|_, t| !t.is_full(&limit, now_ms));
            tokens.sweep_at_ms = now_ms + 1000;
        }
        let prices = prices as f64;
        if young && !tokens.young.has(&young_limit, prices, now_ms) {
            return false;
        }
        let bucket = if let Some(t) = tokens.origins.get_mut(&origin) {
            t
        } else if tokens.origins.len() < cap {
            tokens.origins.entry(origin).or_insert(Tokens::full(&limit, now_ms))
        } else {
            &mut tokens.overflow
        };
        if !bucket.has(&limit, prices, now_ms) {
            return false;
        }
        bucket.spend(&limit, prices);
        if young {
            tokens.young.spend(&young_limit, prices);
        }
        true
    }

    /// Forgets the peer heard from least recently when the table of peers is full.
    fn make_room(&mut self, now_ms: i64) {
        if self.peers.len() < self.rate.max_peers.max(1) {
            return;
        }
        let rate = self.rate;
        // Peers whose every bucket is full first (nothing is lost), else the least recent.
        self.peers.retain(|_, p| !p.is_full(&rate, now_ms));
        while self.peers.len() >= self.rate.max_peers.max(1) {
            let Some(oldest) =
                self.peers.iter().min_by_key(|(_, p)| p.used_ms).map(|(peer, _)| peer.clone())
            else {
                break;
            };
            self.peers.remove(&oldest);
        }
    }

    /// Buckets held, overflow and young buckets included (for tests and the memory bound).
    #[cfg(test)]
    pub(crate) fn buckets(&self) -> usize {
        self.peers.values().map(|p| p.origins.len() + 2).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::Identity;

    const NOW: i64 = 1_750_000_000_000;

    fn origin(n: u32) -> NodeId {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&n.to_le_bytes());
        Identity::from_seed(seed).node_id()
    }

    fn rate() -> OriginRate {
        OriginRate {
            messages_per_sec: 2.0,
            message_burst: 4.0,
            prices_per_sec: 100.0,
            price_burst: 300.0,
            max_origins_per_peer: 3,
            max_peers: 2,
            // Out of the way, except in the tests of young origins.
            young_messages_per_sec: 1e9,
            young_message_burst: 1e9,
            young_prices_per_sec: 1e9,
            young_price_burst: 1e9,
            ..OriginRate::default()
        }
    }

    /// Young origins share 10 messages and 100 prices at once, then 5 and 50 a second.
    fn young_rate() -> OriginRate {
        OriginRate {
            young_for: Duration::from_secs(60),
            young_messages_per_sec: 5.0,
            young_message_burst: 10.0,
            young_prices_per_sec: 50.0,
            young_price_burst: 100.0,
            max_aged_origins: 4,
            max_origins_per_peer: 100,
            max_peers: 4,
            ..rate()
        }
    }

    #[test]
    fn young_origins_share_one_budget_per_peer_and_established_ones_do_not_touch_it() {
        let mut r = OriginRates::new(young_rate());
        // Ten keys never accepted before, four messages each allowed by their own buckets:
        // together they get the peer's ten.
        let taken: usize = (0..10)
            .flat_map(|o| (0..4).map(move |_| o))
            .filter(|&o| r.take(&1, origin(o), 1, NOW))
            .count();
        assert_eq!(taken, 10);
        // Another peer has a young budget of its own.
        assert!(r.take(&2, origin(3), 1, NOW));
        // Prices count too: 100 at once.
        assert!(r.take(&3, origin(1), 60, NOW));
        assert!(!r.take(&3, origin(2), 60, NOW), "only 40 young prices left");
        // An origin accepted a minute ago is established: only its own bucket counts.
        r.accepted(origin(50), NOW - 60_000);
        assert!(!r.is_young(&origin(50), NOW));
        for _ in 0..4 {
            assert!(r.take(&1, origin(50), 1, NOW));
        }
        // One accepted just now is still young, and the shared budget refills at its rate.
        r.accepted(origin(51), NOW);
        assert!(r.is_young(&origin(51), NOW + 59_999));
        assert!(!r.take(&1, origin(51), 1, NOW));
        assert!(r.take(&1, origin(51), 1, NOW + 200));
        assert!(!r.take(&1, origin(51), 1, NOW + 200));
        // Once past the window it is established.
        assert!(r.take(&1, origin(51), 1, NOW + 60_000));
        assert!(!r.is_young(&origin(51), NOW + 60_000));
    }

    #[test]
    fn ages_are_bounded_and_forged_or_young_keys_cannot_crowd_out_established_ones() {
        let mut r: OriginRates<u32> = OriginRates::new(young_rate());
        // Two established providers, one of them silent for ten windows by the end.
        r.accepted(origin(1), NOW - 120_000);
        r.accepted(origin(2), NOW - 700_000);
        r.accepted(origin(1), NOW);
        // Taking never starts an age (the message is not verified yet).
        assert!(r.take(&1, origin(9), 1, NOW));
        assert!(r.ages.seen.len() == 2);
        // A flood of new keys fills the table (4), then each sweep forgets the young ones and
        // the silent one; the speaking provider stays established.
        for o in 100..200 {
            r.accepted(origin(o), NOW + i64::from(o) * 20);
            assert!(r.ages.seen.len() <= 4);
        }
        assert!(!r.is_young(&origin(1), NOW + 4_000));
        assert!(!r.ages.seen.contains_key(&origin(2)), "silent for ten windows: forgotten");
    }

    #[test]
    fn each_peer_has_its_own_share_of_each_origin() {
        let mut r = OriginRates::new(rate());
        for _ in 0..4 {
            assert!(r.take(&1, origin(1), 1, NOW));
        }
        assert!(!r.take(&1, origin(1), 1, NOW), "burst used up");
        // Another origin through the same peer, and the same origin through another peer.
        assert!(r.take(&1, origin(2), 1, NOW));
        assert!(r.take(&2, origin(1), 1, NOW));
        // Two messages a second come back.
        assert!(!r.take(&1, origin(1), 1, NOW + 499));
        assert!(r.take(&1, origin(1), 1, NOW + 500));
        assert!(!r.take(&1, origin(1), 1, NOW + 500));
    }

    #[test]
    fn prices_are_limited_too_and_a_huge_batch_costs_at_most_the_burst() {
        let mut r = OriginRates::new(rate());
        assert!(r.take(&1, origin(1), 200, NOW));
        assert!(!r.take(&1, origin(1), 200, NOW), "100 prices left");
        assert!(r.take(&1, origin(1), 100, NOW));
        // Three seconds refill the 300: a batch of 10,000 costs 300.
        assert!(r.take(&1, origin(1), 10_000, NOW + 3000));
    }

    #[test]
    fn tables_are_bounded_and_forgetting_never_refills_a_bucket_in_use() {
        let mut r = OriginRates::new(rate());
        // Peer 1 floods with many origins: three buckets of its own, then one shared one.
        for o in 0..3 {
            for _ in 0..4 {
                assert!(r.take(&1, origin(o), 1, NOW));
            }
        }
        let mut overflow_taken = 0;
        for o in 3..100 {
            overflow_taken += usize::from(r.take(&1, origin(o), 1, NOW));
        }
        assert_eq!(overflow_taken, 4, "origins beyond the cap share one burst");
        assert!(r.buckets() <= 3 + 2);
        // Once a bucket has refilled, it makes room for a new origin.
        assert!(r.take(&1, origin(200), 1, NOW + 10_000));
        assert!(r.peers[&1].origins.contains_key(&origin(200)));
        // Peers: at most two; the least recent goes.
        assert!(r.take(&2, origin(1), 1, NOW + 10_001));
        assert!(r.take(&3, origin(1), 1, NOW + 10_002));
        assert_eq!(r.peers.len(), 2);
        assert!(!r.peers.contains_key(&1) || !r.peers.contains_key(&2));
        assert!(r.buckets() <= 2 * (3 + 2));
    }
}
