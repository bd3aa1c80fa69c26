//! [`RelayCore`]: the relay rules of ARCHITECTURE section 5 with no networking.
//!
//! The network layer hands every received frame to [`RelayCore::on_frame`] and carries out the
//! [`Outcome`]: deliver the message locally, forward a copy to every peer but the listed ones,
//! or drop it (and charge the sender when it was invalid).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_protocol::codec::forward_in_place;
use mesh_protocol::validate::{self, Validator};
use mesh_protocol::{
    Decoded, HighWaterMarks, Identified, MessageId, NodeId, Payload, RejectReason, Rejection,
    VerifiedMessage, decode_frame,
};
use mesh_seen_cache::{Lookup, SeenCache};

use crate::lazy::RejectedIds;
pub use crate::rates::OriginRate;
use crate::rates::OriginRates;

/// What to send on: the forwarded copy of a frame and the peers not to send it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward<P> {
    /// The message id (the network layer skips peers that have sent it to us meanwhile).
    pub id: MessageId,
    /// The message's origin (tree push keeps one tree per origin).
    pub origin: NodeId,
    /// The frame with `ttl - 1` and `hop_count + 1` (body and signature unchanged).
    pub frame: Vec<u8>,
    /// Peers that must not get it: the senders of this message so far.
    pub except: Vec<P>,
}

/// What the network layer must do with a received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<P> {
    /// A new valid message: hand it to the local subscriber, then forward when `Some`.
    Deliver {
        /// The verified message, hop fields as received.
        message: VerifiedMessage,
        /// The copy to forward (`None` when its TTL is used up).
        forward: Option<Forward<P>>,
    },
    /// A duplicate that carries more remaining TTL than any copy seen so far, the first such
    /// for its id: forward it again (it is not delivered twice; later copies are duplicates
    /// whatever their TTL).
    Reforward(Forward<P>),
    /// A duplicate: drop it.
    Duplicate {
        /// The id.
        id: MessageId,
        /// Hop count of this copy (it tells how far the sender is from the origin).
        hop_count: u8,
    },
    /// A valid message that is older than one already accepted from its origin, but recent
    /// enough to be a late copy rather than a replay (it raced a newer one through another
    /// path): drop it without charging the sender.
    Stale {
        /// The id.
        id: MessageId,
    },
    /// A new message from an origin this node has accepted nothing from yet, while the
    /// sender has used up its budget of such messages ([`OriginBudget`]): dropped before its
    /// signature is checked, not remembered, not charged (an honest relay may be passing on
    /// someone else's flood).
    Throttled {
        /// The id.
        id: MessageId,
    },
    /// A new message of an origin that the sender has brought faster than the origin's rate
    /// ([`OriginRate`]): dropped before its signature is checked, not remembered, not
    /// charged.
    RateLimited {
        /// The id.
        id: MessageId,
    },
    /// An invalid message: drop it and charge the sender.
    Rejected(Rejection),
}

/// How many messages from unknown origins (origins this node has accepted nothing from yet)
/// each peer may hand over: a token bucket per peer.
///
/// Every new message costs a signature check before it can be judged, and a validly signed
/// flood from throwaway keys is made only of unknown origins: without a budget, one peer
/// makes every node of the mesh verify, deliver and forward all of it. Messages of known
/// origins (the providers of the mesh) never touch the budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OriginBudget {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Most tokens a peer holds; a new peer starts full.
    pub burst: f64,
}

impl Default for OriginBudget {
    /// 10 a second with bursts of 50 from each peer: a node meeting a mesh of dozens of
    /// providers for the first time (an announce and a batch each per round) stays within it.
    fn default() -> Self {
        Self { per_sec: 10.0, burst: 50.0 }
    }
}

/// Relay settings that the core needs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Seen-cache size and lifetime.
    pub seen: mesh_seen_cache::Config,
    /// Validation settings (clock skew, trusted providers).
    pub validation: validate::Config,
    /// How many recent messages remember who sent them (for re-forward exclusions).
    pub sender_memory: usize,
    /// Budget per peer for messages of unknown origins (`None`: unlimited).
    pub unknown_origins: Option<OriginBudget>,
    /// How many origins are remembered as known (the least recently heard is forgotten).
    pub known_origins: usize,
    /// Rate of every origin's messages and prices per peer (`None`: unlimited).
    pub origin_rate: Option<OriginRate>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            seen: mesh_seen_cache::Config::default(),
            validation: validate::Config::default(),
            sender_memory: 4096,
            unknown_origins: Some(OriginBudget::default()),
            known_origins: 10_000,
            origin_rate: Some(OriginRate::default()),
        }
    }
}

/// Origins of accepted messages, least recently heard forgotten first.
#[derive(Debug)]
struct KnownOrigins {
    last: HashMap<NodeId, u64>,
    /// Origins in the order they were heard; an element whose number no longer matches
    /// `last` was heard again later and is skipped.
    order: VecDeque<(NodeId, u64)>,
    next: u64,
    capacity: usize,
}

impl KnownOrigins {
    fn new(capacity: usize) -> Self {
        Self { last: HashMap::new(), order: VecDeque::new(), next: 0, capacity: capacity.max(1) }
    }

    fn contains(&self, origin: &NodeId) -> bool {
        self.last.contains_key(origin)
    }

    fn heard(&mut self, origin: NodeId) {
        self.next += 1;
        self.last.insert(origin, self.next);
        self.order.push_back((origin, self.next));
        while self.last.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((old, n)) = self.order.pop_front() else { break };
            if self.last.get(&old) == Some(&n) {
                self.last.remove(&old);
            }
        }
    }
}

/// One peer's tokens for messages of unknown origins.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// The buckets of the peers that used some of their budget; a peer without one is full.
#[derive(Debug)]
struct Budgets<P> {
    budget: OriginBudget,
    buckets: HashMap<P, Bucket>,
}

impl<P: Clone + Eq + Hash> Budgets<P> {
    /// Most buckets kept; full ones are dropped first (a missing bucket is a full one).
    const MAX_BUCKETS: usize = 4096;

    fn tokens(&self, peer: &P, now_ms: i64) -> f64 {
        match self.buckets.get(peer) {
            Some(b) => {
                let refill = (now_ms - b.at_ms).max(0) as f64 / 1000.0 * self.budget.per_sec;
                (b.tokens + refill).min(self.budget.burst)
            }
            None => self.budget.burst,
        }
    }

    fn is_full(&self, peer: &P, now_ms: i64) -> bool {
        self.tokens(peer, now_ms) >= self.budget.burst
    }

    /// Takes one token; `false` when the peer has none left.
    fn take(&mut self, peer: &P, now_ms: i64) -> bool {
        let tokens = self.tokens(peer, now_ms);
        if tokens < 1.0 {
            return false;
        }
        if self.buckets.len() >= Self::MAX_BUCKETS && !self.buckets.contains_key(peer) {
            let budget = self.budget;
            self.buckets.retain(|_, b| {
                let refill = (now_ms - b.at_ms).max(0) as f64 / 1000.0 * budget.per_sec;
                b.tokens + refill < budget.burst
            });
            if self.buckets.len() >= Self::MAX_BUCKETS {
                // Thousands of peers mid-flood at once: forget an arbitrary one (it starts
                // full again, which costs at most one burst).
                if let Some(victim) = self.buckets.keys().next().cloned() {
                    self.buckets.remove(&victim);
                }
            }
        }
        self.buckets.insert(peer.clone(), Bucket { tokens: tokens - 1.0, at_ms: now_ms });
        true
    }
}

/// Who sent each recent message: bounded, oldest forgotten first.
#[derive(Debug)]
struct RecentSenders<P> {
    senders: crate::IdMap<Vec<P>>,
    order: VecDeque<MessageId>,
    capacity: usize,
}

impl<P: Clone + PartialEq> RecentSenders<P> {
    /// Most senders remembered per message: a peer count, bounded by the connection limit.
    const MAX_PER_MESSAGE: usize = 32;

    fn new(capacity: usize) -> Self {
        Self { senders: crate::IdMap::default(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    fn record(&mut self, id: MessageId, peer: &P) {
        let list = match self.senders.get_mut(&id) {
            Some(list) => list,
            None => {
                if self.order.len() >= self.capacity
                    && let Some(old) = self.order.pop_front()
                {
                    self.senders.remove(&old);
                }
                self.order.push_back(id);
                self.senders.entry(id).or_default()
            }
        };
        if list.len() < Self::MAX_PER_MESSAGE && !list.contains(peer) {
            list.push(peer.clone());
        }
    }

    fn get(&self, id: &MessageId) -> Vec<P> {
        self.senders.get(id).cloned().unwrap_or_default()
    }
}

/// A received frame decoded, and perhaps verified, before it reaches the core
/// ([`RelayCore::on_prepared`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// Decoded and hashed (the id is known), body not decoded.
    Identified(Identified),
    /// Body decoded too (the claimed origin is known), not verified.
    Decoded(Decoded),
    /// Passed [`Validator::verify`], with the origin's rate ([`OriginRate`]) taken from the
    /// sender's share by whoever verified it.
    Verified(VerifiedMessage),
}

impl Prepared {
    /// The message id, TTL and hop count.
    fn header(&self) -> (MessageId, u8, u8) {
        let (id, envelope) = match self {
            Prepared::Identified(i) => (i.id(), i.envelope()),
            Prepared::Decoded(d) => (d.id(), d.envelope()),
            Prepared::Verified(m) => (m.id, &m.envelope),
        };
        (id, envelope.ttl, envelope.hop_count)
    }
}

/// The relay's rules: seen check, validation, forwarding decisions.
#[derive(Debug)]
pub struct RelayCore<P> {
    seen: SeenCache<MessageId>,
    validator: Validator,
    marks: HighWaterMarks,
    senders: RecentSenders<P>,
    known: KnownOrigins,
    budgets: Option<Budgets<P>>,
    rejected: RejectedIds,
    /// Shared with the readers, which check it before the signatures they check.
    rates: Option<Arc<Mutex<OriginRates<P>>>>,
}

impl<P: Clone + PartialEq + Eq + Hash> RelayCore<P> {
    /// A core with empty caches.
    pub fn new(config: CoreConfig) -> Self {
        let sender_memory = if config.sender_memory == 0 { 4096 } else { config.sender_memory };
        Self {
            seen: SeenCache::new(config.seen),
            validator: Validator::new(config.validation),
            marks: HighWaterMarks::default(),
            senders: RecentSenders::new(sender_memory),
            known: KnownOrigins::new(config.known_origins),
            budgets: config
                .unknown_origins
                .map(|budget| Budgets { budget, buckets: HashMap::new() }),
            rejected: RejectedIds::new(RejectedIds::DEFAULT_CAPACITY),
            rates: config.origin_rate.map(|rate| Arc::new(Mutex::new(OriginRates::new(rate)))),
        }
    }

    /// The per-origin rates, for the readers that check signatures before the core sees a
    /// frame (they take from the same buckets).
    pub(crate) fn origin_rates(&self) -> Option<Arc<Mutex<OriginRates<P>>>> {
        self.rates.clone()
    }

    /// The seen cache (for reloading ids and reporting its size).
    pub fn seen(&self) -> &SeenCache<MessageId> {
        &self.seen
    }

    /// The seen cache, mutably (for reloading ids from a store).
    pub fn seen_mut(&mut self) -> &mut SeenCache<MessageId> {
        &mut self.seen
    }

    /// Decides what to do with `frame`, received from `from`, at `now_ms` (Unix ms).
    pub fn on_frame(&mut self, from: &P, frame: &[u8], now_ms: i64) -> Outcome<P> {
        let prepared = decode_frame(frame).map(|e| Prepared::Identified(Identified::new(e)));
        self.on_prepared(from, frame, prepared, now_ms)
    }

    /// [`RelayCore::on_frame`] for a frame that the caller decoded, and perhaps verified,
    /// already (the network layer does that on its reader tasks, in parallel): `prepared` is
    /// what came of `frame`, and a [`Prepared::Verified`] or a rejection must come from a
    /// [`Validator`] with this core's settings.
    pub fn on_prepared(
        &mut self,
        from: &P,
        frame: &[u8],
        prepared: Result<Prepared, Rejection>,
        now_ms: i64,
    ) -> Outcome<P> {
        let id = prepared.as_ref().ok().map(|p| p.header().0);
        let outcome = self.judge(from, frame, prepared, now_ms);
        if let (Outcome::Rejected(rejection), Some(id)) = (&outcome, id)
            && RejectedIds::binds_the_id(rejection.reason)
        {
            self.rejected.insert(id);
        }
        outcome
    }

    /// Whether a message with this id was rejected lately for a reason every copy of it
    /// shares ([`RejectedIds`]): a `HAVE` for it is not worth a `WANT`.
    pub fn was_rejected(&self, id: &MessageId) -> bool {
        self.rejected.contains(id)
    }

    fn judge(
        &mut self,
        from: &P,
        frame: &[u8],
        prepared: Result<Prepared, Rejection>,
        now_ms: i64,
    ) -> Outcome<P> {
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(rejection) => return Outcome::Rejected(rejection),
        };
        let (id, ttl, hop_count) = prepared.header();
        match self.seen.lookup(&id) {
            Lookup::Seen { max_ttl } => {
                self.senders.record(id, from);
                if ttl <= max_ttl {
                    return Outcome::Duplicate { id, hop_count };
                }
                // More TTL than any copy so far. The signature is outside the message id, so
                // check this copy before sending it on under our name.
                let origin = match self.verify(prepared, now_ms) {
                    Ok(message) => message.body.origin,
                    Err(rejection) => return Outcome::Rejected(rejection),
                };
                // Once per id: one re-forward gets a message past a nearly spent first copy
                // (the hop-TTL trap), and copies replayed with rising TTLs would otherwise
                // cost a signature check and a mesh-wide re-flood per TTL step. No copy
                // beats the highest TTL there is.
                self.seen.raise_ttl(&id, mesh_protocol::MAX_TTL.max(ttl));
                match forwarded(frame, ttl) {
                    Some(frame) => Outcome::Reforward(Forward {
                        id,
                        origin,
                        frame,
                        except: self.senders.get(&id),
                    }),
                    None => Outcome::Duplicate { id, hop_count },
                }
            }
            Lookup::New => self.on_new(from, frame, id, prepared, now_ms),
        }
    }

    /// A message whose id is not in the seen cache.
    fn on_new(
        &mut self,
        from: &P,
        frame: &[u8],
        id: MessageId,
        prepared: Prepared,
        now_ms: i64,
    ) -> Outcome<P> {
        // Cheap checks on the claimed origin before the signature check, when they can drop
        // the message: the allow-list, and the sender's budget of unknown origins once it has
        // started using it (a peer with a full budget, such as every honest peer, skips this
        // decode).
        let mut token_taken = false;
        let allow_list = self.validator.config().trusted_providers.is_some();
        let budget_in_use = self.budgets.as_ref().is_some_and(|b| !b.is_full(from, now_ms));
        let prepared = match prepared {
            Prepared::Identified(identified)
                if allow_list || budget_in_use || self.rates.is_some() =>
            {
                match identified.decode() {
                    Ok(decoded) => Prepared::Decoded(decoded),
                    Err(rejection) => return Outcome::Rejected(rejection),
                }
            }
            other => other,
        };
        let origin = match &prepared {
            Prepared::Decoded(d) => Some(d.body().origin),
            Prepared::Verified(m) => Some(m.body.origin),
            Prepared::Identified(_) => None,
        };
        if let Some(origin) = origin {
            if let Some(trusted) = &self.validator.config().trusted_providers
                && !trusted.contains(&origin)
            {
                return Outcome::Rejected(Rejection {
                    reason: RejectReason::UntrustedProvider,
                    source_node_id: Some(origin),
                });
            }
            if budget_in_use
                && !self.known.contains(&origin)
                && let Some(budgets) = &mut self.budgets
            {
                if !budgets.take(from, now_ms) {
                    return Outcome::Throttled { id };
                }
                token_taken = true;
            }
        }
        // The origin's rate through this peer, before the signature check. A message the
        // reader verified was charged there already.
        if let (Prepared::Decoded(decoded), Some(rates)) = (&prepared, &self.rates) {
            let prices = match &decoded.body().payload {
                Payload::PriceBatch { prices, .. } => prices.len(),
                Payload::ProviderAnnounce { .. } => 0,
            };
            let origin = decoded.body().origin;
            if !rates
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(from, origin, prices, now_ms)
            {
                return Outcome::RateLimited { id };
            }
        }
        let message = match self.verify(prepared, now_ms) {
            Ok(message) => message,
            Err(rejection) => return Outcome::Rejected(rejection),
        };
        let ttl = message.envelope.ttl;
        if let Err(rejection) = self.marks.admit(&message, now_ms) {
            // A replay older than the seen-cache lifetime is an attack (a captured message
            // sent again once the cache forgot it); a younger one lost a race.
            let window_ms = i64::try_from(self.seen.config().ttl.as_millis()).unwrap_or(i64::MAX);
            if message.body.created_at_ms >= now_ms.saturating_sub(window_ms) {
                self.seen.insert(id, ttl);
                return Outcome::Stale { id };
            }
            return Outcome::Rejected(rejection);
        }
        let origin = message.body.origin;
        if !token_taken
            && !self.known.contains(&origin)
            && let Some(budgets) = &mut self.budgets
        {
            // Verified already (the budget was full): it still counts.
            budgets.take(from, now_ms);
        }
        self.known.heard(origin);
        self.aged(origin, now_ms);
        self.seen.insert(id, ttl);
        self.senders.record(id, from);
        let forward = forwarded(frame, ttl).map(|frame| Forward {
            id,
            origin,
            frame,
            except: vec![from.clone()],
        });
        Outcome::Deliver { message, forward }
    }

    /// The signature and stateless checks, where the caller has not run them.
    fn verify(&self, prepared: Prepared, now_ms: i64) -> Result<VerifiedMessage, Rejection> {
        match prepared {
            Prepared::Identified(identified) => {
                self.validator.verify_identified(identified, now_ms)
            }
            Prepared::Decoded(decoded) => self.validator.verify_decoded(decoded, now_ms),
            Prepared::Verified(message) => Ok(message),
        }
    }

    /// Checks a message this node originates (it must pass our own rules too) and records it
    /// as seen. The frame is sent to every peer as it is.
    pub fn publish(&mut self, frame: &[u8], now_ms: i64) -> Result<VerifiedMessage, Rejection> {
        let envelope = decode_frame(frame)?;
        let message = self.validator.verify(envelope, now_ms)?;
        self.marks.admit(&message, now_ms)?;
        self.known.heard(message.body.origin);
        self.aged(message.body.origin, now_ms);
        self.seen.insert(message.id, message.envelope.ttl);
        Ok(message)
    }

    /// A message of `origin` was accepted: its age as the rates see it (young origins share a
    /// budget per peer, [`OriginRate::young_for`]) starts or goes on.
    fn aged(&self, origin: NodeId, now_ms: i64) {
        if let Some(rates) = &self.rates {
            rates.lock().unwrap_or_else(PoisonError::into_inner).accepted(origin, now_ms);
        }
    }
}

/// The forwarded copy of `frame`, or `None` when the TTL is used up here.
fn forwarded(frame: &[u8], ttl: u8) -> Option<Vec<u8>> {
    if ttl <= 1 {
        return None;
    }
    let mut copy = frame.to_vec();
    forward_in_place(&mut copy).then_some(copy)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mesh_protocol::{
        Body, Envelope, Identity, Payload, PriceUpdate, RejectReason, encode_envelope,
    };

    const NOW: i64 = 1_750_000_000_000;

    fn frame(ttl: u8, ts: i64) -> Vec<u8> {
        frame_created(ttl, NOW, ts)
    }

    fn with_hops(frame: &[u8], ttl: u8, hops: u8) -> Vec<u8> {
        let mut f = frame.to_vec();
        f[1] = ttl;
        f[2] = hops;
        f
    }

    fn core() -> RelayCore<u32> {
        RelayCore::new(CoreConfig::default())
    }

    #[tokio::test]
    async fn new_message_is_delivered_and_forwarded_to_all_but_the_sender() {
        let mut c = core();
        let f = frame(5, NOW);
        match c.on_frame(&7, &f, NOW) {
            Outcome::Deliver { message, forward: Some(fwd) } => {
                assert_eq!(message.envelope.ttl, 5);
                assert_eq!(fwd.except, vec![7]);
                assert_eq!(&fwd.frame[..3], &[1, 4, 2], "ttl - 1, hop_count + 1");
                assert_eq!(fwd.frame[3..], f[3..], "body and signature unchanged");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn ttl_one_is_delivered_but_not_forwarded() {
        let mut c = core();
        assert!(matches!(
            c.on_frame(&1, &frame(1, NOW), NOW),
            Outcome::Deliver { forward: None, .. }
        ));
    }

    #[tokio::test]
    async fn duplicates_are_dropped_unless_they_carry_more_ttl() {
        let mut c = core();
        let f = frame(10, NOW);
        let late = with_hops(&f, 3, 8);
        assert!(matches!(c.on_frame(&1, &late, NOW), Outcome::Deliver { .. }));
        // Same or less TTL: dropped.
        assert!(matches!(c.on_frame(&2, &late, NOW), Outcome::Duplicate { .. }));
        assert!(matches!(c.on_frame(&3, &with_hops(&f, 2, 9), NOW), Outcome::Duplicate { .. }));
        // More TTL: forwarded again, to everyone but the peers that sent it, not delivered.
        match c.on_frame(&4, &with_hops(&f, 6, 5), NOW) {
            Outcome::Reforward(fwd) => {
                assert_eq!(fwd.except, vec![1, 2, 3, 4]);
                assert_eq!(&fwd.frame[..3], &[1, 5, 6]);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Once re-forwarded, any copy is a plain duplicate, a higher TTL too (unchecked: a
        // broken signature is not even noticed).
        assert!(matches!(c.on_frame(&5, &with_hops(&f, 6, 5), NOW), Outcome::Duplicate { .. }));
        assert!(matches!(
            c.on_frame(&6, &broken(with_hops(&f, 9, 2)), NOW),
            Outcome::Duplicate { .. }
        ));
    }

    #[tokio::test]
    async fn a_higher_ttl_duplicate_with_a_forged_signature_is_rejected() {
        let mut c = core();
        let f = frame(10, NOW);
        assert!(matches!(c.on_frame(&1, &with_hops(&f, 3, 8), NOW), Outcome::Deliver { .. }));
        let mut forged = with_hops(&f, 9, 2);
        let last = forged.len() - 1;
        forged[last] ^= 0xff; // the signature is the frame's tail
        match c.on_frame(&2, &forged, NOW) {
            Outcome::Rejected(r) => assert_eq!(r.reason, RejectReason::BadSignature),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn invalid_messages_are_rejected_and_not_remembered() {
        let mut c = core();
        let mut f = frame(5, NOW);
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(matches!(c.on_frame(&1, &f, NOW), Outcome::Rejected(_)));
        assert!(c.seen().is_empty(), "only valid messages enter the seen cache");
        assert!(
            matches!(c.on_frame(&1, &with_hops(&frame(5, NOW), 255, 1), NOW), Outcome::Rejected(r) if r.reason == RejectReason::TtlOutOfBounds)
        );
    }

    /// A one-price batch of the origin with seed 4, created at `created_at_ms`, priced at `ts`.
    pub(crate) fn frame_created(ttl: u8, created_at_ms: i64, ts: i64) -> Vec<u8> {
        let id = Identity::from_seed([4; 32]);
        let body = Body::new(
            &id,
            created_at_ms,
            Payload::PriceBatch {
                round: 1,
                prices: vec![PriceUpdate {
                    asset: "SOL".into(),
                    blockchain: "solana".into(),
                    price: "150".parse().unwrap(),
                    timestamp_ms: ts,
                    change_24h: None,
                    source_timestamp_ms: None,
                }],
            },
        );
        encode_envelope(&Envelope::seal(&id, &body, ttl).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn replays_after_the_seen_cache_forgot_are_rejected() {
        let mut c = RelayCore::<u32>::new(CoreConfig {
            seen: mesh_seen_cache::Config { capacity: 1, ttl: std::time::Duration::from_secs(60) },
            ..Default::default()
        });
        // A message created five minutes ago (a captured one, older than the seen window,
        // within the maximum age) and a newer one.
        let old = frame_created(5, NOW - 300_000, NOW - 300_000);
        assert!(matches!(c.on_frame(&1, &old, NOW), Outcome::Deliver { .. }));
        assert!(matches!(c.on_frame(&1, &frame(5, NOW - 5), NOW), Outcome::Deliver { .. }));
        // `old` was evicted from the seen cache (capacity 1) but is still a replay.
        assert!(matches!(
            c.on_frame(&2, &old, NOW),
            Outcome::Rejected(r) if r.reason == RejectReason::Replay
        ));
    }

    #[tokio::test]
    async fn ids_rejected_for_their_body_are_remembered_those_of_broken_copies_are_not() {
        let mut c = core();
        let future = frame_created(5, NOW + 60_000, NOW);
        let id = decode_frame(&future).unwrap().digest().message_id();
        assert!(matches!(c.on_frame(&1, &future, NOW), Outcome::Rejected(_)));
        assert!(c.was_rejected(&id));
        // A copy of an honest message with a broken signature: the id stays open.
        let honest = frame(5, NOW);
        let mut forged = honest.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let honest_id = decode_frame(&honest).unwrap().digest().message_id();
        assert!(matches!(
            c.on_frame(&2, &forged, NOW),
            Outcome::Rejected(r) if r.reason == RejectReason::BadSignature
        ));
        assert!(!c.was_rejected(&honest_id));
        assert!(matches!(c.on_frame(&3, &honest, NOW), Outcome::Deliver { .. }));
    }

    #[tokio::test]
    async fn messages_older_than_the_maximum_age_are_refused_before_forwarding() {
        let mut c = core();
        let age = mesh_protocol::MAX_MESSAGE_AGE_MS;
        // Created too long ago, or created recently with a price too old.
        for (created, ts) in [(NOW - age - 1, NOW - age - 1), (NOW, NOW - age - 1)] {
            assert!(matches!(
                c.on_frame(&1, &frame_created(5, created, ts), NOW),
                Outcome::Rejected(r) if r.reason == RejectReason::TooOld
            ));
        }
        // Just within it: delivered and forwarded.
        let edge = frame_created(5, NOW - age, NOW - age);
        assert!(matches!(c.on_frame(&1, &edge, NOW), Outcome::Deliver { forward: Some(_), .. }));
    }

    #[tokio::test]
    async fn a_recent_older_message_that_lost_a_race_is_stale_not_an_attack() {
        let mut c = core();
        assert!(matches!(c.on_frame(&1, &frame(5, NOW - 5), NOW), Outcome::Deliver { .. }));
        let late = frame_created(5, NOW - 1000, NOW - 10);
        assert!(matches!(c.on_frame(&2, &late, NOW), Outcome::Stale { .. }));
        // Further copies are plain duplicates: no second signature check.
        assert!(matches!(c.on_frame(&3, &late, NOW), Outcome::Duplicate { .. }));
    }

    /// Every arrival order of five copies of one message (different peers, different remaining
    /// TTLs, 120 orders): delivered exactly once, forwarded once for the first copy and once
    /// more for the first copy that beats its TTL, never again whatever the TTL (copies
    /// replayed with rising TTLs cost one re-forward per id), never with a copy's lower TTL.
    #[tokio::test]
    async fn every_arrival_order_delivers_once_and_reforwards_a_higher_ttl_once() {
        let f = frame(10, NOW);
        let copies: Vec<(u32, u8)> = vec![(1, 3), (2, 7), (3, 7), (4, 2), (5, 9)];
        let mut orders = vec![vec![]];
        for _ in 0..copies.len() {
            let mut next = Vec::new();
            for order in &orders {
                for c in &copies {
                    if !order.contains(c) {
                        let mut o = order.clone();
                        o.push(*c);
                        next.push(o);
                    }
                }
            }
            orders = next;
        }
        assert_eq!(orders.len(), 120);
        for order in orders {
            let mut c = core();
            let (mut delivered, mut forwards, mut best) = (0, 0, 0u8);
            let mut reforwarded = false;
            for (peer, ttl) in &order {
                match c.on_frame(peer, &with_hops(&f, *ttl, 11 - ttl), NOW) {
                    Outcome::Deliver { forward, .. } => {
                        delivered += 1;
                        forwards += usize::from(forward.is_some());
                        assert_eq!(best, 0, "delivered after an earlier copy: {order:?}");
                        best = *ttl;
                    }
                    Outcome::Reforward(fwd) => {
                        forwards += 1;
                        assert!(!reforwarded, "re-forwarded twice: {order:?}");
                        assert!(*ttl > best, "re-forwarded a copy with no more TTL: {order:?}");
                        assert_eq!(fwd.frame[1], ttl - 1);
                        assert!(fwd.except.contains(peer));
                        reforwarded = true;
                        best = *ttl;
                    }
                    Outcome::Duplicate { .. } => {
                        assert!(*ttl <= best || reforwarded, "dropped a better copy: {order:?}")
                    }
                    other => panic!("unexpected {other:?} in {order:?}"),
                }
            }
            assert_eq!(delivered, 1, "{order:?}");
            let first = order[0].1;
            let beaten = order.iter().any(|(_, ttl)| *ttl > first);
            assert_eq!(forwards, 1 + usize::from(beaten), "{order:?}");
            let max_ttl = if beaten { mesh_protocol::MAX_TTL } else { first };
            assert_eq!(
                c.seen()
                    .lookup(&MessageId::of_body(&mesh_protocol::decode_envelope(&f).unwrap().body)),
                mesh_seen_cache::Lookup::Seen { max_ttl }
            );
        }
    }

    fn frame_of(seed: u8, ts: i64) -> Vec<u8> {
        let id = Identity::from_seed([seed; 32]);
        let prices = vec![PriceUpdate {
            asset: "SOL".into(),
            blockchain: "solana".into(),
            price: "150".parse().unwrap(),
            timestamp_ms: ts,
            change_24h: None,
            source_timestamp_ms: None,
        }];
        let body = Body::new(&id, NOW, Payload::PriceBatch { round: 1, prices });
        encode_envelope(&Envelope::seal(&id, &body, 5).unwrap()).unwrap()
    }

    fn broken(mut frame: Vec<u8>) -> Vec<u8> {
        let last = frame.len() - 1;
        frame[last] ^= 0xff; // the signature is the frame's tail
        frame
    }

    fn budget_core(per_sec: f64, burst: f64) -> RelayCore<u32> {
        RelayCore::new(CoreConfig {
            unknown_origins: Some(OriginBudget { per_sec, burst }),
            ..CoreConfig::default()
        })
    }

    #[tokio::test]
    async fn unknown_origins_beyond_a_peers_budget_are_dropped_before_the_signature_check() {
        let mut c = budget_core(1.0, 3.0);
        // Three throwaway keys use up peer 1's budget; the next ones are throttled.
        for seed in 10..13 {
            assert!(matches!(c.on_frame(&1, &frame_of(seed, NOW), NOW), Outcome::Deliver { .. }));
        }
        assert!(matches!(c.on_frame(&1, &frame_of(13, NOW), NOW), Outcome::Throttled { .. }));
        // Throttled unchecked: a broken signature is not even noticed (and not charged).
        assert!(matches!(
            c.on_frame(&1, &broken(frame_of(14, NOW)), NOW),
            Outcome::Throttled { .. }
        ));
        // Known origins never touch the budget.
        assert!(matches!(c.on_frame(&1, &frame_of(10, NOW + 1), NOW), Outcome::Deliver { .. }));
        // Another peer has a budget of its own, and a throttled message was not remembered.
        assert!(matches!(c.on_frame(&2, &frame_of(13, NOW), NOW), Outcome::Deliver { .. }));
        // Tokens come back with time: one a second here.
        assert!(matches!(c.on_frame(&1, &frame_of(15, NOW), NOW + 999), Outcome::Throttled { .. }));
        assert!(matches!(c.on_frame(&1, &frame_of(15, NOW), NOW + 1000), Outcome::Deliver { .. }));
        assert!(matches!(
            c.on_frame(&1, &frame_of(16, NOW), NOW + 1000),
            Outcome::Throttled { .. }
        ));
        // Without a budget nothing is throttled.
        let mut open =
            RelayCore::<u32>::new(CoreConfig { unknown_origins: None, ..CoreConfig::default() });
        for seed in 20..30 {
            assert!(matches!(
                open.on_frame(&1, &frame_of(seed, NOW), NOW),
                Outcome::Deliver { .. }
            ));
        }
    }

    #[tokio::test]
    async fn every_origin_has_a_rate_per_peer_checked_before_the_signature() {
        let mut c = RelayCore::<u32>::new(CoreConfig {
            origin_rate: Some(OriginRate {
                messages_per_sec: 1.0,
                message_burst: 3.0,
                ..OriginRate::default()
            }),
            ..CoreConfig::default()
        });
        // A known origin (accepted once) publishing without limit through peer 1.
        for ts in 0..3 {
            assert!(matches!(
                c.on_frame(&1, &frame_of(10, NOW + ts), NOW),
                Outcome::Deliver { .. }
            ));
        }
        assert!(matches!(c.on_frame(&1, &frame_of(10, NOW + 3), NOW), Outcome::RateLimited { .. }));
        // Unchecked: forgeries in its name beyond the rate are dropped, not charged.
        assert!(matches!(
            c.on_frame(&1, &broken(frame_of(10, NOW + 4)), NOW),
            Outcome::RateLimited { .. }
        ));
        // Forgeries through peer 1 used only peer 1's share: peer 2 still brings the origin's
        // messages (the rate-limited one too: it was not remembered).
        assert!(matches!(c.on_frame(&2, &frame_of(10, NOW + 3), NOW), Outcome::Deliver { .. }));
        // Other origins through peer 1 are not affected; tokens come back with time.
        assert!(matches!(c.on_frame(&1, &frame_of(11, NOW), NOW), Outcome::Deliver { .. }));
        assert!(matches!(
            c.on_frame(&1, &frame_of(10, NOW + 5), NOW + 1000),
            Outcome::Deliver { .. }
        ));
        // Without a rate nothing is limited.
        let mut open =
            RelayCore::<u32>::new(CoreConfig { origin_rate: None, ..CoreConfig::default() });
        for ts in 0..500 {
            assert!(matches!(
                open.on_frame(&1, &frame_of(10, NOW + ts), NOW),
                Outcome::Deliver { .. }
            ));
        }
    }

    #[tokio::test]
    async fn frames_prepared_by_a_reader_take_the_same_paths() {
        let mut c = budget_core(1.0, 3.0);
        let f = frame_of(10, NOW);
        let prepared = |f: &[u8]| Identified::new(decode_frame(f).unwrap());
        // A reader found the first copy forged: rejected, and the id is not taken.
        let forged = Rejection { reason: RejectReason::BadSignature, source_node_id: None };
        assert!(matches!(c.on_prepared(&1, &f, Err(forged), NOW), Outcome::Rejected(_)));
        // Verified by the reader: delivered without a check here.
        let verified = Validator::default().verify(decode_frame(&f).unwrap(), NOW).unwrap();
        let outcome = c.on_prepared(&2, &f, Ok(Prepared::Verified(verified.clone())), NOW);
        assert!(matches!(outcome, Outcome::Deliver { forward: Some(_), .. }));
        // Later copies are duplicates, however far they were prepared.
        assert!(matches!(
            c.on_prepared(&3, &f, Ok(Prepared::Verified(verified)), NOW),
            Outcome::Duplicate { .. }
        ));
        assert!(matches!(
            c.on_prepared(&4, &f, Ok(Prepared::Identified(prepared(&f))), NOW),
            Outcome::Duplicate { .. }
        ));
        // Decoded only (an origin unknown to the reader): checked here, budget included.
        for seed in 11..13 {
            let f = frame_of(seed, NOW);
            let decoded = prepared(&f).decode().unwrap();
            let outcome = c.on_prepared(&2, &f, Ok(Prepared::Decoded(decoded)), NOW);
            assert!(matches!(outcome, Outcome::Deliver { .. }), "{outcome:?}");
        }
        let f = frame_of(13, NOW);
        let decoded = prepared(&broken(f.clone())).decode().unwrap();
        let outcome = c.on_prepared(&2, &f, Ok(Prepared::Decoded(decoded)), NOW);
        assert!(matches!(outcome, Outcome::Throttled { .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_peer_within_its_budget_is_judged_as_before() {
        let mut c = budget_core(1.0, 3.0);
        // Invalid messages are rejected (and charged), not throttled, while tokens remain.
        match c.on_frame(&1, &broken(frame_of(10, NOW)), NOW) {
            Outcome::Rejected(r) => assert_eq!(r.reason, RejectReason::BadSignature),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(c.on_frame(&1, &frame_of(10, NOW), NOW), Outcome::Deliver { .. }));
    }

    #[tokio::test]
    async fn untrusted_origins_are_rejected_before_the_signature_check() {
        let trusted = Identity::from_seed([10; 32]).node_id();
        let mut c = RelayCore::<u32>::new(CoreConfig {
            validation: validate::Config {
                trusted_providers: Some([trusted].into_iter().collect()),
                ..validate::Config::default()
            },
            ..CoreConfig::default()
        });
        // A broken signature from an unlisted origin: the allow-list answers first.
        match c.on_frame(&1, &broken(frame_of(11, NOW)), NOW) {
            Outcome::Rejected(r) => {
                assert_eq!(r.reason, RejectReason::UntrustedProvider);
                assert_eq!(r.source_node_id, Some(Identity::from_seed([11; 32]).node_id()));
            }
            other => panic!("unexpected {other:?}"),
        }
        match c.on_frame(&1, &broken(frame_of(10, NOW)), NOW) {
            Outcome::Rejected(r) => assert_eq!(r.reason, RejectReason::BadSignature),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(c.on_frame(&1, &frame_of(10, NOW), NOW), Outcome::Deliver { .. }));
    }

    #[tokio::test]
    async fn known_origins_forget_the_least_recently_heard() {
        let mut k = KnownOrigins::new(2);
        let n = |s: u8| Identity::from_seed([s; 32]).node_id();
        k.heard(n(1));
        k.heard(n(2));
        k.heard(n(1));
        k.heard(n(3));
        assert!(k.contains(&n(1)) && k.contains(&n(3)) && !k.contains(&n(2)));
        for _ in 0..100 {
            k.heard(n(1));
        }
        assert!(k.order.len() <= 4, "stale entries are purged");
    }

    #[tokio::test]
    async fn own_messages_are_checked_and_marked_seen() {
        let mut c = core();
        let f = frame(5, NOW);
        let m = c.publish(&f, NOW).unwrap();
        assert!(
            matches!(c.on_frame(&1, &with_hops(&f, 4, 2), NOW), Outcome::Duplicate { id, .. } if id == m.id)
        );
        assert!(c.publish(&frame(5, NOW + 60_000), NOW).is_err(), "own future timestamps too");
    }
}
