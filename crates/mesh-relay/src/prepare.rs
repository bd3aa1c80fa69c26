//! Work on received frames done by the per-peer reader tasks, in parallel, before the core
//! (one task) sees them: decoding, hashing, and for the first copy of a message from an origin
//! the node has accepted messages from, the signature check. The core is then left with the
//! seen check, the replay marks and the forwarding decisions, so one relay's throughput is no
//! longer bounded by one core's signature checks. A reader that finds more whole frames
//! waiting behind a first copy it has read runs [`Preparer::finish`] for it on a task of its
//! own and reads on, so one busy link is spread over the cores too; it hands the results to
//! the core in the order the frames came.
//!
//! Later copies of a message, and messages of unknown origins, are only decoded here: the core
//! drops duplicates without a check, and checks the rest itself after the budget of unknown
//! origins ([`crate::OriginBudget`]) has had its say, so a peer cannot make the readers verify
//! a flood from throwaway keys. When two copies race (the second reaches the core before the
//! first's check is done), the core checks the second itself: a wasted check, never a wrong
//! outcome, and a forged first copy cannot hide a valid second one.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use std::sync::Arc;

use libp2p::PeerId;
use mesh_protocol::validate::{self, Validator};
use mesh_protocol::{Identified, MessageId, NodeId, Payload, Rejection, decode_frame};
use mesh_seen_cache::SeenCache;

use crate::core::Prepared;
use crate::rates::OriginRates;

/// Shared by the readers of one relay and its core.
#[derive(Debug)]
pub(crate) struct Preparer {
    validator: Validator,
    /// Ids whose first copy a reader has taken on.
    claimed: RecentIds,
    /// Origins the core has accepted messages from (cleared when full).
    known: RwLock<HashSet<NodeId>>,
    known_capacity: usize,
    /// The core's per-origin rates: a first copy beyond its origin's rate through its peer is
    /// left to the core unchecked (it drops it).
    rates: Option<Arc<Mutex<OriginRates<PeerId>>>>,
}

impl Preparer {
    /// Checks with `validation` (the core's settings), remembers the claims on the last
    /// `claims` ids and at most `known_capacity` origins.
    pub(crate) fn new(
        validation: validate::Config,
        claims: mesh_seen_cache::Config,
        known_capacity: usize,
        rates: Option<Arc<Mutex<OriginRates<PeerId>>>>,
    ) -> Self {
        Self {
            validator: Validator::new(validation),
            claimed: RecentIds::new(claims),
            known: RwLock::default(),
            known_capacity: known_capacity.max(1),
            rates,
        }
    }

    /// What can be done with `frame` off the core's task, at `now_ms`; `None` when it is not
    /// an envelope (a control frame, or garbage the core rejects). Readers run its two parts,
    /// [`Preparer::start`] and [`Preparer::finish`], themselves.
    #[cfg(test)]
    pub(crate) fn prepare(
        &self,
        peer: &PeerId,
        frame: &[u8],
        now_ms: i64,
    ) -> Option<Result<Prepared, Rejection>> {
        match self.start(frame) {
            Started::Done(prepared) => prepared,
            Started::Claimed(identified) => Some(self.finish(peer, identified, now_ms)),
        }
    }

    /// The cheap first part of [`Preparer::prepare`]: decoding the envelope, hashing its body
    /// and claiming its id.
    pub(crate) fn start(&self, frame: &[u8]) -> Started {
        let Ok(envelope) = decode_frame(frame) else { return Started::Done(None) };
        let identified = Identified::new(envelope);
        if !self.claimed.claim(identified.id()) {
            return Started::Done(Some(Ok(Prepared::Identified(identified))));
        }
        Started::Claimed(identified)
    }

    /// The rest of [`Preparer::prepare`] for a claimed first copy from `peer`: decoding the
    /// body and, for an origin the core has accepted messages from and within its rate
    /// through `peer`, the checks.
    pub(crate) fn finish(
        &self,
        peer: &PeerId,
        identified: Identified,
        now_ms: i64,
    ) -> Result<Prepared, Rejection> {
        let decoded = identified.decode()?;
        let body = decoded.body();
        if !self.is_known(&body.origin) {
            return Ok(Prepared::Decoded(decoded));
        }
        if let Some(rates) = &self.rates {
            let prices = match &body.payload {
                Payload::PriceBatch { prices, .. } => prices.len(),
                Payload::ProviderAnnounce { .. } => 0,
            };
            let taken = rates.lock().unwrap_or_else(PoisonError::into_inner).take(
                peer,
                body.origin,
                prices,
                now_ms,
            );
            if !taken {
                return Ok(Prepared::Decoded(decoded));
            }
        }
        self.validator.verify_decoded(decoded, now_ms).map(Prepared::Verified)
    }

    /// The core accepted a message of `origin`.
    pub(crate) fn heard(&self, origin: NodeId) {
        if self.is_known(&origin) {
            return;
        }
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= self.known_capacity {
            known.clear();
        }
        known.insert(origin);
    }

    fn is_known(&self, origin: &NodeId) -> bool {
        self.known.read().unwrap_or_else(PoisonError::into_inner).contains(origin)
    }
}

/// How far [`Preparer::start`] got.
pub(crate) enum Started {
    /// As far as a reader goes: the result for the core (`None`: not an envelope).
    Done(Option<Result<Prepared, Rejection>>),
    /// The first copy of a message, claimed: [`Preparer::finish`] does the costly rest.
    Claimed(Identified),
}

/// Message ids recorded lately, shared between tasks: a bounded seen cache behind a lock.
///
/// Each link has one (the default: the last 4,096 ids, for at most a minute) for the ids its
/// peer sent or announced to us: when a neighbour's own copy reaches us while ours still waits
/// in its queue, ours is pure waste, so the peer's writer skips queued frames whose id is
/// recorded (`mesh_relay_suppressed_total`). The [`Preparer`] keeps the readers' claims in one.
#[derive(Debug)]
pub(crate) struct RecentIds(Mutex<SeenCache<MessageId>>);

impl Default for RecentIds {
    fn default() -> Self {
        Self::new(mesh_seen_cache::Config { capacity: 4096, ttl: Duration::from_secs(60) })
    }
}

impl RecentIds {
    pub(crate) fn new(config: mesh_seen_cache::Config) -> Self {
        Self(Mutex::new(SeenCache::new(config)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeenCache<MessageId>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn record(&self, id: MessageId) {
        self.lock().insert(id, 0);
    }

    pub(crate) fn contains(&self, id: &MessageId) -> bool {
        self.lock().contains(id)
    }

    /// Records `id`; `true` when it was not recorded yet (the first claim on it).
    pub(crate) fn claim(&self, id: MessageId) -> bool {
        self.lock().insert(id, 0)
    }
}

#[cfg(test)]
mod tests {
    use mesh_protocol::{Identity, RejectReason};

    use super::*;
    use crate::core::tests::frame_created;

    const NOW: i64 = 1_750_000_000_000;
    static PEER: std::sync::LazyLock<PeerId> = std::sync::LazyLock::new(PeerId::random);

    fn preparer() -> Preparer {
        Preparer::new(validate::Config::default(), mesh_seen_cache::Config::default(), 2, None)
    }

    #[test]
    fn only_the_first_copy_of_a_known_origin_is_verified() {
        let p = preparer();
        let first = frame_created(5, NOW, NOW);
        // Origin not heard yet: decoded, left to the core and its budget.
        assert!(matches!(p.prepare(&PEER, &first, NOW), Some(Ok(Prepared::Decoded(_)))));
        p.heard(Identity::from_seed([4; 32]).node_id());
        let second = frame_created(5, NOW + 1, NOW + 1);
        match p.prepare(&PEER, &second, NOW + 1) {
            Some(Ok(Prepared::Verified(m))) => assert_eq!(m.body.created_at_ms, NOW + 1),
            other => panic!("unexpected {other:?}"),
        }
        // Another copy (other hop fields, same id): a duplicate, only hashed.
        let mut copy = second.clone();
        copy[1] = 4;
        copy[2] = 2;
        assert!(matches!(p.prepare(&PEER, &copy, NOW + 1), Some(Ok(Prepared::Identified(_)))));
    }

    #[test]
    fn a_forged_first_copy_is_rejected_and_control_frames_are_left_alone() {
        let p = preparer();
        p.heard(Identity::from_seed([4; 32]).node_id());
        let mut forged = frame_created(5, NOW, NOW);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        match p.prepare(&PEER, &forged, NOW) {
            Some(Err(rejection)) => assert_eq!(rejection.reason, RejectReason::BadSignature),
            other => panic!("unexpected {other:?}"),
        }
        // A future timestamp is checked against the clock given.
        let future = frame_created(5, NOW + 60_000, NOW);
        match p.prepare(&PEER, &future, NOW) {
            Some(Err(rejection)) => assert_eq!(rejection.reason, RejectReason::FutureTimestamp),
            other => panic!("unexpected {other:?}"),
        }
        assert!(p.prepare(&PEER, &[0xF1, 0, 0], NOW).is_none());
        assert!(p.prepare(&PEER, b"not a frame", NOW).is_none());
    }

    #[test]
    fn known_origins_are_bounded() {
        let p = preparer();
        for seed in 0..5u8 {
            p.heard(Identity::from_seed([seed; 32]).node_id());
        }
        assert!(p.known.read().unwrap().len() <= 2);
    }
}
