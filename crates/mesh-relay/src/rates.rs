//! Per-origin rates ([`OriginRate`]): how many messages, and prices, of each origin a peer may
//! bring per second.
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
//! Memory is bounded per source: each peer has at most [`OriginRate::max_origins_per_peer`]
//! buckets, and at most [`OriginRate::max_peers`] peers have any. A full bucket (one that has
//! refilled) is the same as a missing one, so those are forgotten first; when a peer's every
//! bucket is in use, the messages of its further origins share one overflow bucket of that
//! peer (forgetting a bucket in use would hand its origin a fresh burst). The peer heard from
//! least recently is forgotten when a new one needs room.

use std::collections::HashMap;
use std::hash::Hash;

use mesh_protocol::NodeId;

/// How fast each origin's messages may come through one peer (part of
/// [`crate::CoreConfig`]).
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
    /// Most origins with a bucket of their own per peer; the others share one.
    pub max_origins_per_peer: usize,
    /// Most peers with buckets (the one heard from least recently is forgotten).
    pub max_peers: usize,
}

impl Default for OriginRate {
    /// 20 messages a second with bursts of 200, and 2,000 prices a second with bursts of
    /// 20,000, per origin and peer: a real provider sends one batch of up to 1,000 prices
    /// every 10 s and an announce; the relay benchmark's busiest origins send 2 batches of 50
    /// prices a second. Buckets for 1,024 origins per peer and 64 peers: at most 65,536
    /// buckets of about 50 bytes, some 3 MiB.
    fn default() -> Self {
        Self {
            messages_per_sec: 20.0,
            message_burst: 200.0,
            prices_per_sec: 2_000.0,
            price_burst: 20_000.0,
            max_origins_per_peer: 1024,
            max_peers: 64,
        }
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
    fn full(rate: &OriginRate, now_ms: i64) -> Self {
        Self { messages: rate.message_burst, prices: rate.price_burst, at_ms: now_ms }
    }

    fn refill(&mut self, rate: &OriginRate, now_ms: i64) {
        let secs = (now_ms - self.at_ms).max(0) as f64 / 1000.0;
        self.messages = (self.messages + secs * rate.messages_per_sec).min(rate.message_burst);
        self.prices = (self.prices + secs * rate.prices_per_sec).min(rate.price_burst);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn is_full(&self, rate: &OriginRate, now_ms: i64) -> bool {
        let mut t = *self;
        t.refill(rate, now_ms);
        t.messages >= rate.message_burst && t.prices >= rate.price_burst
    }

    /// Takes one message costing `prices`; `false` (nothing taken) when either is short.
    fn take(&mut self, rate: &OriginRate, prices: f64, now_ms: i64) -> bool {
        self.refill(rate, now_ms);
        let prices = prices.min(rate.price_burst);
        if self.messages < 1.0 || self.prices < prices {
            return false;
        }
        self.messages -= 1.0;
        self.prices -= prices;
        true
    }
}

/// One peer's buckets.
#[derive(Debug)]
struct PeerTokens {
    origins: HashMap<NodeId, Tokens>,
    /// Shared by the origins beyond `max_origins_per_peer`.
    overflow: Tokens,
    /// When this peer last brought a message (for forgetting the least recent peer).
    used_ms: i64,
    /// No sweep for full buckets before this (a peer whose buckets are all in use would
    /// otherwise cost a sweep per message).
    sweep_at_ms: i64,
}

/// The buckets of every peer.
#[derive(Debug)]
pub(crate) struct OriginRates<P> {
    rate: OriginRate,
    peers: HashMap<P, PeerTokens>,
}

impl<P: Clone + Eq + Hash> OriginRates<P> {
    /// Empty tables for `rate`.
    pub(crate) fn new(rate: OriginRate) -> Self {
        Self { rate, peers: HashMap::new() }
    }

    /// Takes a message of `origin` carrying `prices` prices from `peer`'s share; `false` when
    /// the peer has brought that origin's messages faster than the rate (nothing is taken).
    pub(crate) fn take(&mut self, peer: &P, origin: NodeId, prices: usize, now_ms: i64) -> bool {
        let rate = self.rate;
        if !self.peers.contains_key(peer) {
            self.make_room(now_ms);
        }
        let tokens = self.peers.entry(peer.clone()).or_insert_with(|| PeerTokens {
            origins: HashMap::new(),
            overflow: Tokens::full(&rate, now_ms),
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
            tokens.origins.retain(|_, t| !t.is_full(&rate, now_ms));
            tokens.sweep_at_ms = now_ms + 1000;
        }
        let bucket = if let Some(t) = tokens.origins.get_mut(&origin) {
            t
        } else if tokens.origins.len() < cap {
            tokens.origins.entry(origin).or_insert(Tokens::full(&rate, now_ms))
        } else {
            &mut tokens.overflow
        };
        bucket.take(&rate, prices as f64, now_ms)
    }

    /// Forgets the peer heard from least recently when the table of peers is full.
    fn make_room(&mut self, now_ms: i64) {
        if self.peers.len() < self.rate.max_peers.max(1) {
            return;
        }
        let rate = self.rate;
        // Peers whose every bucket is full first (nothing is lost), else the least recent.
        self.peers.retain(|_, p| {
            !(p.overflow.is_full(&rate, now_ms)
                && p.origins.values().all(|t| t.is_full(&rate, now_ms)))
        });
        while self.peers.len() >= self.rate.max_peers.max(1) {
            let Some(oldest) =
                self.peers.iter().min_by_key(|(_, p)| p.used_ms).map(|(peer, _)| peer.clone())
            else {
                break;
            };
            self.peers.remove(&oldest);
        }
    }

    /// Buckets held, overflow buckets included (for tests and the memory bound).
    #[cfg(test)]
    pub(crate) fn buckets(&self) -> usize {
        self.peers.values().map(|p| p.origins.len() + 1).sum()
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
        }
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
        assert!(r.buckets() <= 3 + 1);
        // Once a bucket has refilled, it makes room for a new origin.
        assert!(r.take(&1, origin(200), 1, NOW + 10_000));
        assert!(r.peers[&1].origins.contains_key(&origin(200)));
        // Peers: at most two; the least recent goes.
        assert!(r.take(&2, origin(1), 1, NOW + 10_001));
        assert!(r.take(&3, origin(1), 1, NOW + 10_002));
        assert_eq!(r.peers.len(), 2);
        assert!(!r.peers.contains_key(&1) || !r.peers.contains_key(&2));
        assert!(r.buckets() <= 2 * (3 + 1));
    }
}
