//! Lazy push: a relay sends a new message in full to a few peers and only its id to the others.
//!
//! Flooding sends every message to every neighbour but the sender, so a node receives one copy
//! per neighbour that got the message before it did: about `degree - 2` copies, all but one
//! wasted, each one decrypted, framed and hashed for nothing. With lazy push some peers get
//! the message and the rest get a `HAVE` control frame with its id (17 bytes on the wire
//! instead of about 4 KB).
//!
//! **Tree push** ([`LazyPush::tree`], on by default) decides who gets the message, with one
//! tree per origin (plumtree's eager and lazy links, kept per source):
//!
//! - The first message of an origin that a node relays goes in full to
//!   [`LazyPush::eager_peers`] of the peers that may still need it, picked at random. They
//!   become the origin's children at this node ([`Trees`]). The publisher sends each of its
//!   own messages in full to every peer: all its peers are its tree's first hop, a peer that
//!   connects later included.
//! - A node that gets a full copy it already had answers the sender with a `PRUNE`: the sender
//!   drops it from that origin's children. A copy with more TTL than the first is re-forwarded
//!   (once per id) but prunes nobody: the hop fields are not signed, so any peer could send
//!   such a copy and cut a node from its honest tree parent. Copies of the first message of
//!   an origin a node relays are not pruned: many origins publish once (a flood of them would
//!   cost two `PRUNE`s per node per message for nothing), and a provider publishes again.
//! - What is left after the second message is the path each node's copy took: a tree rooted
//!   at the origin. The origin's next messages follow it, and each node gets one full copy.
//! - A node that asks for a message (`WANT`, below) becomes a child of the peer it asked, so a
//!   broken tree mends itself with the first message that had to be asked for.
//!
//! Trees are per origin, not one shared tree, because a shared tree is a shortest-path tree
//! for at most one origin: paths from the others grow longer than the hop TTL allows (at 300
//! nodes, TTL 10, a shared tree left nodes without the message until they asked, and each ask
//! reshaped the tree for everyone). A mesh has a few providers, each publishing every round.
//!
//! Without tree push, each relayed message goes in full to `eager_peers` random peers.
//!
//! `HAVE`s of messages that follow a tree are held for [`LazyPush::have_delay`] and then sent
//! together, one frame per peer, and not for ids the peer has announced or sent to us
//! meanwhile: while the full copies spread, the CPUs are theirs. Those of an origin's first
//! message go at once, since the nodes it does not reach in full can only ask. `PRUNE`s are
//! held the same way.
//!
//! A node that gets a `HAVE` for an id it has not seen waits [`LazyPush::want_delay`] (a full
//! copy is usually on its way from another neighbour), or not at all once every connected peer
//! has announced the id (each peer sends a message once, in full or as a `HAVE`, so then no
//! copy is coming), then asks the announcer with a `WANT`;
//! the announcer answers with its forwarded copy (the same bytes an eager push would have sent,
//! TTL already lowered). When that copy does not come within [`LazyPush::want_timeout`], the
//! next announcer is asked. Every choice of eager peers thus has the whole neighbourhood as a
//! fallback, and delivery stays complete. Each peer has an equal share of the ids waiting
//! ([`Wanted`]), so one announcing ids it never serves cannot crowd out honest announcements,
//! and the announcers of an id given up (asked, none sent it) are counted
//! (`mesh_relay_lazy_total{event="want_unserved"}`) and charged once per 16 such ids.
//!
//! A node whose only copy of a message came with TTL 1 (delivered, but not passed on) treats a
//! `HAVE` for it as one for an unseen id: the announcer's copy may carry more TTL, and then it
//! is re-forwarded like any duplicate with more TTL. Without this, a nearly expired first copy
//! would hide a fresher copy that was only announced, and nodes within the TTL's reach could
//! miss the message.
//!
//! Control frames travel on the relay stream beside envelopes. They start with a tag byte that
//! no envelope starts with (an envelope starts with its version, 1), then 1 to [`MAX_IDS`]
//! message ids of 16 bytes. A malformed one is rejected as `malformed` and charged to the peer,
//! like any invalid frame.
//!
//! A message this node rejected for a reason bound to its id ([`RejectedIds`]: a timestamp in
//! its future, a replay, a broken price rule...) is remembered, and `HAVE`s for it are
//! ignored: asking every announcer in turn for a message that will be rejected again was a
//! loop of `WANT`s for a node whose clock is behind.
//!
//! Everything here is bounded: the ids waiting to be asked for ([`LazyPush::max_wanted`]), the
//! announcers remembered per id ([`MAX_ANNOUNCERS`]), the forwarded copies kept to answer
//! `WANT`s and `PRUNE`s ([`LazyPush::keep_frames`], each for at most [`LazyPush::keep`]), the
//! `HAVE`s held (a frame's worth per peer), the trees ([`LazyPush::max_trees`]) and the
//! rejected ids ([`RejectedIds::DEFAULT_CAPACITY`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use mesh_protocol::{MessageId, NodeId, RejectReason};
use tokio::time::Instant;

/// Tag byte of a `HAVE` frame: "I have these messages".
pub const HAVE_TAG: u8 = 0xF1;
/// Tag byte of a `WANT` frame: "send me these messages".
pub const WANT_TAG: u8 = 0xF2;
/// Tag byte of a `PRUNE` frame: "these messages reached me twice; send me only their ids from
/// now on" (tree push).
pub const PRUNE_TAG: u8 = 0xF3;
/// Most ids in one control frame.
pub const MAX_IDS: usize = 64;
/// Most announcers remembered for one id (asked one after the other).
pub const MAX_ANNOUNCERS: usize = 4;

/// Lazy-push settings (part of [`crate::Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyPush {
    /// How many peers a relayed message is sent to in full, chosen at random among the peers
    /// that have not sent it to us; the others get its id. Under tree push this is for the
    /// first message of an origin only; its tree decides for the next. `usize::MAX` without
    /// tree push floods (every peer gets the message, nobody gets an id).
    pub eager_peers: usize,
    /// Tree push: one tree per origin. The first message of an origin a node relays goes in
    /// full to [`LazyPush::eager_peers`] random peers (the publisher: to all), and those peers
    /// become the origin's children at this node. A child that gets a full copy it already had
    /// answers with a `PRUNE` and gets only ids of that origin's messages from then on; one that
    /// asks for a message (`WANT`) becomes a child again. Each node then gets one full copy of
    /// each message, over the path its copies came first. Off: each message goes in full to
    /// `eager_peers` peers picked at random.
    pub tree: bool,
    /// Most origins a tree is kept for (the oldest is forgotten first; its next message starts
    /// a new tree).
    pub max_trees: usize,
    /// How long `HAVE`s of messages that follow a tree, and `PRUNE`s, are held before they are
    /// sent, so that they do not compete with the full copies still spreading for the CPU,
    /// and so that ids of messages a peer announced to us in the meantime are not announced
    /// back. The ids held for one peer go out in one frame. Zero sends each at once.
    pub have_delay: Duration,
    /// How long a node waits after a `HAVE` for an unseen id before it asks for the message.
    /// Most waits end with a copy from an eager neighbour, which can lag the `HAVE` by the
    /// time a burst of relaying keeps the CPUs busy: at 300 nodes on two cores, 20 ms sent
    /// about 28 needless `WANT`s per message (each answered with one more full copy), 50 ms
    /// 8 to 18 per 100 messages.
    pub want_delay: Duration,
    /// How long a node waits for an asked-for message before it asks the next announcer.
    pub want_timeout: Duration,
    /// Most ids waiting to be asked for; `HAVE`s beyond it, or beyond the announcer's share
    /// of it (an equal share per connected peer), are ignored (and counted).
    pub max_wanted: usize,
    /// How long a forwarded copy is kept to answer `WANT`s.
    pub keep: Duration,
    /// Most forwarded copies kept to answer `WANT`s (and to tell a `PRUNE`'s origin).
    pub keep_frames: usize,
}

impl LazyPush {
    /// Flooding: every peer gets every message in full.
    pub const FLOOD: Self = Self { eager_peers: usize::MAX, tree: false, ..Self::DEFAULT };

    const DEFAULT: Self = Self {
        eager_peers: 4,
        tree: true,
        max_trees: 1024,
        have_delay: Duration::from_millis(20),
        want_delay: Duration::from_millis(50),
        want_timeout: Duration::from_millis(250),
        max_wanted: 4096,
        keep: Duration::from_secs(2),
        keep_frames: 512,
    };

    /// Whether some peers get ids instead of messages.
    pub fn is_lazy(&self) -> bool {
        self.tree || self.eager_peers != usize::MAX
    }
}

impl Default for LazyPush {
    /// Tree push (a new origin's first message to 4 random peers), `HAVE`s and `PRUNE`s held
    /// 20 ms, a `WANT` 50 ms after the first `HAVE`, the next announcer 250 ms later, copies
    /// kept 2 s.
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    /// The sender has these messages.
    Have(Vec<MessageId>),
    /// The sender asks for these messages (and, under tree push, for full copies of their
    /// origins' messages from now on).
    Want(Vec<MessageId>),
    /// The sender got these messages from us after it had them (tree push: send it only ids
    /// of their origins' messages).
    Prune(Vec<MessageId>),
}

impl ControlFrame {
    /// Reads a control frame: `None` when `frame` is not one (it is then an envelope),
    /// `Some(Err(()))` when it is a malformed one.
    #[allow(clippy::result_unit_err)]
    pub fn parse(frame: &[u8]) -> Option<Result<Self, ()>> {
        let (&tag, rest) = frame.split_first()?;
        if !matches!(tag, HAVE_TAG | WANT_TAG | PRUNE_TAG) {
            return None;
        }
        if rest.is_empty() || rest.len() % 16 != 0 || rest.len() / 16 > MAX_IDS {
            return Some(Err(()));
        }
        let ids = rest
            .chunks_exact(16)
            .map(|c| {
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(c);
                MessageId::from_uuid(uuid::Uuid::from_bytes(bytes))
            })
            .collect();
        Some(Ok(match tag {
            HAVE_TAG => Self::Have(ids),
            WANT_TAG => Self::Want(ids),
            _ => Self::Prune(ids),
        }))
    }

    /// Encodes the frame (at most [`MAX_IDS`] ids are written).
    pub fn encode(&self) -> Vec<u8> {
        let (tag, ids) = match self {
            Self::Have(ids) => (HAVE_TAG, ids),
            Self::Want(ids) => (WANT_TAG, ids),
            Self::Prune(ids) => (PRUNE_TAG, ids),
        };
        let ids = &ids[..ids.len().min(MAX_IDS)];
        let mut out = Vec::with_capacity(1 + 16 * ids.len());
        out.push(tag);
        for id in ids {
            out.extend_from_slice(id.as_uuid().as_bytes());
        }
        out
    }
}

/// Ids announced to us that we have not seen, with who announced them and when to ask.
///
/// Each peer has a fair share of the set: the ids it was the first to announce count against
/// it, and past `capacity / peers` its new ids are ignored, so a peer announcing ids it never
/// serves fills only its own share and honest announcements still get in. When an id is given
/// up (every announcer asked, none sent it within the timeout), each announcer asked is
/// reported ([`Wanted::take_unserved`]) so the relay can charge it: an honest announcer that
/// is only slow is not reported as long as another one sends the message.
#[derive(Debug)]
pub struct Wanted<P> {
    entries: crate::IdMap<Entry<P>>,
    due: BinaryHeap<Reverse<(Instant, MessageId)>>,
    capacity: usize,
    /// Ids waiting per first announcer.
    owned: std::collections::HashMap<P, usize>,
    /// Announcers asked for an id that was given up.
    unserved: Vec<P>,
}

#[derive(Debug)]
struct Entry<P> {
    announcers: VecDeque<P>,
    /// `HAVE`s received for the id (each peer sends one, or the message itself).
    heard: usize,
    due: Instant,
    /// The first announcer: the id counts against its share.
    owner: P,
    /// The announcers asked so far (at most [`MAX_ANNOUNCERS`]).
    asked: Vec<P>,
}

impl<P: Clone + Eq + std::hash::Hash> Wanted<P> {
    /// An empty set that holds at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: crate::IdMap::default(),
            due: BinaryHeap::new(),
            capacity: capacity.max(1),
            owned: std::collections::HashMap::new(),
            unserved: Vec::new(),
        }
    }

    /// The announcers asked for each id given up since the last call (an id no announcer sent
    /// within the timeout).
    pub fn take_unserved(&mut self) -> Vec<P> {
        std::mem::take(&mut self.unserved)
    }

    /// Removes `id`, and its count from its owner's share.
    fn remove(&mut self, id: &MessageId) -> Option<Entry<P>> {
        let entry = self.entries.remove(id)?;
        if let Some(n) = self.owned.get_mut(&entry.owner) {
            *n -= 1;
            if *n == 0 {
                self.owned.remove(&entry.owner);
            }
        }
        Some(entry)
    }

    /// Ids waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no id waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records that `peer` has `id`: a new id is asked for at `now + delay`, or at once when
    /// `peers` announcements have come (every peer sends a message once, in full or as a
    /// `HAVE`: when all of them announced it, no copy is on its way and waiting is pointless).
    /// `false` when the set, or the peer's share of it (`capacity / peers`), is full and the
    /// id was not recorded.
    pub fn announce(
        &mut self,
        id: MessageId,
        peer: &P,
        now: Instant,
        delay: Duration,
        peers: usize,
    ) -> bool {
        let entry = match self.entries.get_mut(&id) {
            Some(entry) => {
                if !entry.announcers.contains(peer) {
                    entry.heard += 1;
                    if entry.announcers.len() < MAX_ANNOUNCERS {
                        entry.announcers.push_back(peer.clone());
                    }
                }
                entry
            }
            None => {
                let share = (self.capacity / peers.max(1)).max(1);
                let owned = self.owned.get(peer).copied().unwrap_or(0);
                if self.entries.len() >= self.capacity || owned >= share {
                    return false;
                }
                *self.owned.entry(peer.clone()).or_default() += 1;
                let due = now + delay;
                self.due.push(Reverse((due, id)));
                let announcers = VecDeque::from([peer.clone()]);
                let entry =
                    Entry { announcers, heard: 1, due, owner: peer.clone(), asked: Vec::new() };
                self.entries.entry(id).or_insert(entry)
            }
        };
        if entry.heard >= peers && entry.due > now {
            entry.due = now;
            self.due.push(Reverse((now, id)));
        }
        true
    }

    /// Forgets `id` (the message arrived). Whether it was waiting.
    pub fn arrived(&mut self, id: &MessageId) -> bool {
        self.remove(id).is_some()
    }

    /// When the next id is due, if any.
    pub fn next_due(&mut self) -> Option<Instant> {
        // Drop heap items of ids that arrived meanwhile, so an idle relay does not wake up
        // for nothing.
        while let Some(Reverse((due, id))) = self.due.peek() {
            match self.entries.get(id) {
                Some(entry) if entry.due == *due => return Some(*due),
                _ => {
                    self.due.pop();
                }
            }
        }
        None
    }

    /// The (announcer, id) pairs to ask now. An id whose announcers have all been asked is
    /// given up; the others are due again at `now + timeout`, for the next announcer.
    pub fn take_due(&mut self, now: Instant, timeout: Duration) -> Vec<(P, MessageId)> {
        let mut asks = Vec::new();
        while let Some(&Reverse((due, id))) = self.due.peek() {
            if due > now {
                break;
            }
            self.due.pop();
            let Some(entry) = self.entries.get_mut(&id) else { continue };
            if entry.due != due {
                continue;
            }
            match entry.announcers.pop_front() {
                Some(peer) => {
                    asks.push((peer.clone(), id));
                    entry.asked.push(peer);
                    entry.due = now + timeout;
                    self.due.push(Reverse((entry.due, id)));
                }
                None => {
                    if let Some(entry) = self.remove(&id) {
                        self.unserved.extend(entry.asked);
                    }
                }
            }
        }
        asks
    }
}

/// Ids of messages this node rejected for a reason that every copy shares, so that a `HAVE`
/// for one is ignored and it is never asked for (`WANT`) again: without this, each neighbour
/// that announced a message this node finds in its future (its clock is behind) or a replay
/// was asked for it in turn, and each answer was checked and rejected again.
///
/// Only reasons bound to the message id, that is to the signed body, count
/// ([`RejectedIds::binds_the_id`]): a bad signature or TTL sits outside the body, so a peer
/// could otherwise send a broken copy of an honest message first and have its id ignored.
/// A full copy pushed later is still checked (a message in our future may no longer be).
/// Bounded: the oldest id is forgotten first (a forgotten one costs at most one more `WANT`).
#[derive(Debug)]
pub struct RejectedIds {
    ids: crate::IdMap<()>,
    order: VecDeque<MessageId>,
    capacity: usize,
}

impl RejectedIds {
    /// Ids remembered by default.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// An empty memory of at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Self { ids: crate::IdMap::default(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// Whether a rejection for `reason` holds for every copy of the message: the reason
    /// depends only on the signed body (and on this node's clock, list or marks), not on the
    /// envelope the copy came in.
    pub fn binds_the_id(reason: RejectReason) -> bool {
        matches!(
            reason,
            RejectReason::OriginKeyMismatch
                | RejectReason::UntrustedProvider
                | RejectReason::FutureTimestamp
                | RejectReason::TooOld
                | RejectReason::NonPositivePrice
                | RejectReason::BadAsset
                | RejectReason::BadBlockchain
                | RejectReason::TooManyPrices
                | RejectReason::EmptyBatch
                | RejectReason::DuplicateAsset
                | RejectReason::Replay
        )
    }

    /// Remembers `id`, forgetting the oldest one when full.
    pub fn insert(&mut self, id: MessageId) {
        if self.ids.insert(id, ()).is_some() {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    /// Whether `id` was rejected (and is still remembered).
    pub fn contains(&self, id: &MessageId) -> bool {
        self.ids.contains_key(id)
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Ids of `HAVE`s (or of `PRUNE`s) held back for a while, per peer ([`LazyPush::have_delay`]).
#[derive(Debug)]
pub struct HeldIds<P> {
    ids: std::collections::HashMap<P, Vec<MessageId>>,
    due: Option<Instant>,
}

impl<P: Clone + Eq + std::hash::Hash> Default for HeldIds<P> {
    fn default() -> Self {
        Self { ids: std::collections::HashMap::new(), due: None }
    }
}

impl<P: Clone + Eq + std::hash::Hash> HeldIds<P> {
    /// Holds `id` for `peer` until `now + delay` (or the due time of ids held before it).
    /// Returns the peer's ids to send at once when they fill a frame ([`MAX_IDS`]), which
    /// bounds what is held.
    pub fn hold(
        &mut self,
        peer: &P,
        id: MessageId,
        now: Instant,
        delay: Duration,
    ) -> Option<Vec<MessageId>> {
        self.due.get_or_insert(now + delay);
        let ids = self.ids.entry(peer.clone()).or_default();
        ids.push(id);
        (ids.len() >= MAX_IDS).then(|| std::mem::take(ids))
    }

    /// When the held ids are due, if any are held.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Takes every held id, per peer.
    pub fn take(&mut self) -> Vec<(P, Vec<MessageId>)> {
        self.due = None;
        self.ids.drain().filter(|(_, ids)| !ids.is_empty()).collect()
    }
}

/// Tree push: per origin, the peers that get its messages in full from this node.
#[derive(Debug)]
pub struct Trees<P> {
    children: std::collections::HashMap<NodeId, Vec<P>>,
    order: VecDeque<NodeId>,
    capacity: usize,
}

impl<P: Clone + PartialEq> Trees<P> {
    /// Keeps the trees of at most `capacity` origins.
    pub fn new(capacity: usize) -> Self {
        Self {
            children: std::collections::HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Origins with a tree.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether no tree is kept.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// The origin's children, if it has a tree here.
    pub fn children(&self, origin: &NodeId) -> Option<&[P]> {
        self.children.get(origin).map(Vec::as_slice)
    }

    /// Starts the origin's tree with these children, forgetting the oldest tree when full.
    pub fn plant(&mut self, origin: NodeId, children: Vec<P>) {
        if !self.children.contains_key(&origin) {
            if self.children.len() >= self.capacity
                && let Some(old) = self.order.pop_front()
            {
                self.children.remove(&old);
            }
            self.order.push_back(origin);
        }
        self.children.insert(origin, children);
    }

    /// The peer gets only ids of the origin's messages. Whether it was a child.
    pub fn prune(&mut self, origin: &NodeId, peer: &P) -> bool {
        let Some(children) = self.children.get_mut(origin) else { return false };
        let before = children.len();
        children.retain(|c| c != peer);
        children.len() != before
    }

    /// The peer gets the origin's messages in full again (when the origin has a tree here).
    /// Whether it was not a child.
    pub fn graft(&mut self, origin: &NodeId, peer: &P) -> bool {
        let Some(children) = self.children.get_mut(origin) else { return false };
        if children.contains(peer) {
            return false;
        }
        children.push(peer.clone());
        true
    }
}

/// Forwarded copies kept for a while to answer `WANT`s, with their origins and whether each
/// was the first of its origin that this node relayed.
#[derive(Debug)]
pub struct Kept {
    frames: crate::IdMap<(NodeId, Bytes, bool)>,
    order: VecDeque<(Instant, MessageId)>,
    keep: Duration,
    capacity: usize,
}

impl Kept {
    /// Keeps at most `capacity` frames, each for at most `keep`.
    pub fn new(keep: Duration, capacity: usize) -> Self {
        Self { frames: crate::IdMap::default(), order: VecDeque::new(), keep, capacity }
    }

    /// Frames kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Keeps `frame`, forgetting expired ones and, when full, the oldest. `first`: the first
    /// message of its origin this node relays.
    pub fn insert(
        &mut self,
        id: MessageId,
        origin: NodeId,
        frame: Bytes,
        first: bool,
        now: Instant,
    ) {
        if self.capacity == 0 {
            return;
        }
        self.expire(now);
        if self.frames.len() >= self.capacity
            && let Some((_, old)) = self.order.pop_front()
        {
            self.frames.remove(&old);
        }
        if self.frames.insert(id, (origin, frame, first)).is_none() {
            self.order.push_back((now, id));
        }
    }

    /// The kept copy of `id` and its origin, if it is still kept.
    pub fn get(&mut self, id: &MessageId, now: Instant) -> Option<(NodeId, Bytes)> {
        self.expire(now);
        self.frames.get(id).map(|(origin, frame, _)| (*origin, frame.clone()))
    }

    /// Whether `id` is kept as the first message of its origin this node relayed.
    pub fn is_first(&self, id: &MessageId) -> bool {
        self.frames.get(id).is_some_and(|(_, _, first)| *first)
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.order.front() {
            if now.duration_since(at) < self.keep {
                break;
            }
            self.order.pop_front();
            self.frames.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MessageId {
        MessageId::of_body(&[n])
    }

    fn origin(n: u8) -> NodeId {
        mesh_protocol::Identity::from_seed([n; 32]).node_id()
    }

    #[test]
    fn rejected_ids_are_bounded_and_only_for_reasons_bound_to_the_body() {
        let mut rejected = RejectedIds::new(2);
        rejected.insert(id(1));
        rejected.insert(id(1));
        rejected.insert(id(2));
        assert!(rejected.contains(&id(1)) && rejected.contains(&id(2)));
        rejected.insert(id(3));
        assert_eq!(rejected.len(), 2);
        assert!(!rejected.contains(&id(1)), "the oldest is forgotten first");
        // Outside the signed body, or no id at all: a copy could differ.
        for reason in [
            RejectReason::FrameTooLarge,
            RejectReason::Malformed,
            RejectReason::UnsupportedVersion,
            RejectReason::TtlOutOfBounds,
            RejectReason::BadSignature,
        ] {
            assert!(!RejectedIds::binds_the_id(reason), "{reason}");
        }
        assert!(RejectedIds::binds_the_id(RejectReason::FutureTimestamp));
        assert!(RejectedIds::binds_the_id(RejectReason::Replay));
    }

    #[test]
    fn trees_are_kept_per_origin_pruned_grafted_and_bounded() {
        let mut trees = Trees::new(2);
        let (a, b, c) = (origin(1), origin(2), origin(3));
        assert_eq!(trees.children(&a), None);
        trees.plant(a, vec![1, 2, 3]);
        trees.plant(b, vec![1]);
        assert!(trees.prune(&a, &2));
        assert!(!trees.prune(&a, &2), "pruned already");
        assert_eq!(trees.children(&a), Some(&[1, 3][..]));
        assert_eq!(trees.children(&b), Some(&[1][..]), "other origins keep their trees");
        assert!(trees.graft(&a, &2));
        assert!(!trees.graft(&a, &2), "a child already");
        assert_eq!(trees.children(&a), Some(&[1, 3, 2][..]));
        assert!(!trees.graft(&c, &1), "no tree to graft onto");
        assert_eq!(trees.children(&c), None);
        // A third origin makes room by forgetting the oldest tree.
        trees.plant(c, vec![4]);
        assert_eq!(trees.len(), 2);
        assert_eq!(trees.children(&a), None);
        assert_eq!(trees.children(&c), Some(&[4][..]));
        // Planting again replaces the children without forgetting another tree.
        trees.plant(c, vec![5]);
        assert_eq!((trees.len(), trees.children(&b).is_some()), (2, true));
    }

    #[test]
    fn control_frames_round_trip_and_malformed_ones_are_refused() {
        let have = ControlFrame::Have(vec![id(1), id(2)]);
        let bytes = have.encode();
        assert_eq!(bytes.len(), 1 + 32);
        assert_eq!(ControlFrame::parse(&bytes), Some(Ok(have)));
        let want = ControlFrame::Want(vec![id(3)]);
        assert_eq!(ControlFrame::parse(&want.encode()), Some(Ok(want)));
        let prune = ControlFrame::Prune(vec![id(4)]);
        assert_eq!(prune.encode()[0], PRUNE_TAG);
        assert_eq!(ControlFrame::parse(&prune.encode()), Some(Ok(prune)));
        assert_eq!(ControlFrame::parse(&[PRUNE_TAG, 1]), Some(Err(())));

        // An envelope (version 1 first) is not a control frame; an empty frame neither.
        assert_eq!(ControlFrame::parse(&[1, 10, 0]), None);
        assert_eq!(ControlFrame::parse(&[]), None);
        // No ids, a partial id, too many ids.
        assert_eq!(ControlFrame::parse(&[HAVE_TAG]), Some(Err(())));
        assert_eq!(ControlFrame::parse(&[WANT_TAG, 1, 2, 3]), Some(Err(())));
        let mut long = vec![HAVE_TAG];
        long.resize(1 + 16 * (MAX_IDS + 1), 7);
        assert_eq!(ControlFrame::parse(&long), Some(Err(())));
        // Encoding never writes more than MAX_IDS ids.
        let many = ControlFrame::Want((0..100).map(id).collect());
        assert_eq!(many.encode().len(), 1 + 16 * MAX_IDS);
    }

    #[test]
    fn an_announced_id_is_asked_of_each_announcer_in_turn_then_given_up() {
        let t0 = Instant::now();
        let (delay, timeout) = (Duration::from_millis(20), Duration::from_millis(250));
        let mut wanted = Wanted::new(16);
        assert!(wanted.announce(id(1), &"a", t0, delay, usize::MAX));
        assert!(wanted.announce(id(1), &"b", t0, delay, usize::MAX));
        assert!(
            wanted.announce(id(1), &"a", t0, delay, usize::MAX),
            "a repeated announcer is kept once"
        );
        assert_eq!(wanted.next_due(), Some(t0 + delay));
        assert!(wanted.take_due(t0 + Duration::from_millis(19), timeout).is_empty());
        assert_eq!(wanted.take_due(t0 + delay, timeout), vec![("a", id(1))]);
        assert_eq!(wanted.next_due(), Some(t0 + delay + timeout));
        assert_eq!(wanted.take_due(t0 + delay + timeout, timeout), vec![("b", id(1))]);
        // Nobody left to ask: given up at the next due time.
        assert!(wanted.take_due(t0 + delay + 2 * timeout, timeout).is_empty());
        assert!(wanted.is_empty());
        assert_eq!(wanted.next_due(), None);
    }

    #[test]
    fn an_id_every_peer_announced_is_asked_for_at_once() {
        let t0 = Instant::now();
        let (delay, timeout) = (Duration::from_millis(20), Duration::from_millis(250));
        let mut wanted = Wanted::new(16);
        // Three peers: after two announcements a copy may still come from the third.
        assert!(wanted.announce(id(1), &"a", t0, delay, 3));
        assert!(wanted.announce(id(1), &"a", t0, delay, 3), "a repeat is not a second peer");
        assert!(wanted.announce(id(1), &"b", t0, delay, 3));
        assert_eq!(wanted.next_due(), Some(t0 + delay));
        // The third announced too: nothing is on its way, ask now.
        let t1 = t0 + Duration::from_millis(2);
        assert!(wanted.announce(id(1), &"c", t1, delay, 3));
        assert_eq!(wanted.next_due(), Some(t1));
        assert_eq!(wanted.take_due(t1, timeout), vec![("a", id(1))]);
        // The next announcer only after the timeout, as before.
        assert_eq!(wanted.next_due(), Some(t1 + timeout));
    }

    #[test]
    fn an_arrived_id_is_not_asked_for_and_the_set_is_bounded() {
        let t0 = Instant::now();
        let delay = Duration::from_millis(20);
        let mut wanted = Wanted::new(2);
        assert!(wanted.announce(id(1), &1u32, t0, delay, usize::MAX));
        assert!(wanted.announce(id(2), &2u32, t0, delay, usize::MAX));
        assert!(!wanted.announce(id(3), &3u32, t0, delay, usize::MAX), "full");
        assert!(wanted.arrived(&id(1)));
        assert!(!wanted.arrived(&id(1)));
        assert_eq!(wanted.take_due(t0 + delay, delay), vec![(2, id(2))]);
        assert_eq!(wanted.len(), 1);
        for n in 0..MAX_ANNOUNCERS as u32 + 3 {
            wanted.announce(id(2), &(n + 10), t0, delay, usize::MAX);
        }
        assert!(wanted.entries[&id(2)].announcers.len() <= MAX_ANNOUNCERS);
    }

    #[test]
    fn each_peer_fills_only_its_share_and_unserved_asks_are_reported() {
        let t0 = Instant::now();
        let (delay, timeout) = (Duration::from_millis(20), Duration::from_millis(250));
        let mut wanted = Wanted::new(8);
        // Two peers: four ids each. The hostile one announces 100 it will never serve.
        let mut taken = 0;
        for n in 0..100u8 {
            taken += usize::from(wanted.announce(id(n), &"hostile", t0, delay, 2));
        }
        assert_eq!(taken, 4);
        for n in 100..104u8 {
            assert!(wanted.announce(id(n), &"honest", t0, delay, 2), "honest id {n}");
        }
        assert!(!wanted.announce(id(104), &"honest", t0, delay, 2), "its share is full too");
        // Announcing an id another peer owns costs no share.
        assert!(wanted.announce(id(0), &"honest", t0, delay, 2));
        // Every id asked of its first announcer; the honest ones arrive.
        let asks = wanted.take_due(t0 + delay, timeout);
        assert_eq!(asks.len(), 8);
        for n in 100..104u8 {
            assert!(wanted.arrived(&id(n)));
        }
        assert!(wanted.take_unserved().is_empty(), "nothing is late yet");
        // The hostile peer's four are late: its three are given up and it is reported for
        // each; id 0 goes to its next announcer, and is no fault of anyone's once it comes.
        let asks = wanted.take_due(t0 + delay + timeout, timeout);
        assert_eq!(asks, vec![("honest", id(0))]);
        assert_eq!(wanted.take_unserved(), vec!["hostile"; 3]);
        // The given-up ids left the hostile peer's share: it may announce again.
        assert!(wanted.announce(id(200), &"hostile", t0, delay, 2));
        assert!(wanted.arrived(&id(0)), "served by the honest peer");
        assert!(wanted.take_due(t0 + delay + 2 * timeout, timeout).len() <= 1);
        assert!(wanted.take_unserved().is_empty());
    }

    #[test]
    fn held_haves_go_out_together_when_due_or_when_a_frame_is_full() {
        let t0 = Instant::now();
        let delay = Duration::from_millis(20);
        let mut held = HeldIds::default();
        assert_eq!(held.due(), None);
        assert_eq!(held.hold(&"a", id(1), t0, delay), None);
        assert_eq!(held.hold(&"b", id(1), t0 + Duration::from_millis(5), delay), None);
        assert_eq!(held.hold(&"a", id(2), t0 + Duration::from_millis(9), delay), None);
        assert_eq!(held.due(), Some(t0 + delay), "due with the first id held");
        let mut taken = held.take();
        taken.sort();
        assert_eq!(taken, vec![("a", vec![id(1), id(2)]), ("b", vec![id(1)])]);
        assert_eq!(held.due(), None);
        assert!(held.take().is_empty());
        // A full frame's worth for one peer is handed back at once.
        let full: Vec<_> = (0..MAX_IDS as u8).map(|n| held.hold(&"c", id(n), t0, delay)).collect();
        assert!(full[..MAX_IDS - 1].iter().all(Option::is_none));
        assert_eq!(full[MAX_IDS - 1].as_ref().map(Vec::len), Some(MAX_IDS));
        assert!(held.take().is_empty(), "nothing left held");
    }

    #[test]
    fn kept_copies_expire_and_are_bounded() {
        let t0 = Instant::now();
        let mut kept = Kept::new(Duration::from_secs(2), 2);
        let o = origin(1);
        kept.insert(id(1), o, Bytes::from_static(b"one"), true, t0);
        kept.insert(id(2), o, Bytes::from_static(b"two"), true, t0 + Duration::from_secs(1));
        kept.insert(id(3), o, Bytes::from_static(b"three"), false, t0 + Duration::from_secs(1));
        assert!(kept.is_first(&id(2)) && !kept.is_first(&id(3)));
        assert_eq!(kept.len(), 2, "the oldest made room");
        assert_eq!(kept.get(&id(1), t0 + Duration::from_secs(1)), None);
        assert_eq!(
            kept.get(&id(2), t0 + Duration::from_secs(1)),
            Some((o, Bytes::from_static(b"two")))
        );
        assert_eq!(kept.get(&id(3), t0 + Duration::from_secs(3)), None, "expired");
        assert!(kept.is_empty());
    }
}
