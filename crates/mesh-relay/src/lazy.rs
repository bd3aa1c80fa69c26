//! Lazy push: a relay sends a new message in full to a few peers and only its id to the others.
//!
//! Flooding sends every message to every neighbour but the sender, so a node receives one copy
//! per neighbour that got the message before it did: about `degree - 2` copies, all but one
//! wasted, each one decrypted, framed and hashed for nothing. With lazy push a relay picks
//! [`LazyPush::eager_peers`] of the peers that may still need the message at random and sends
//! them the message; the rest get a `HAVE` control frame with the id (21 bytes on the wire
//! instead of about 4 KB). The publisher itself always sends to every peer, so the first hop
//! fans out fully.
//!
//! A node that gets a `HAVE` for an id it has not seen waits [`LazyPush::want_delay`] (a full
//! copy is usually on its way from another neighbour), or not at all once every connected peer
//! has announced the id (each peer sends a message once, in full or as a `HAVE`, so then no
//! copy is coming), then asks the announcer with a `WANT`;
//! the announcer answers with its forwarded copy (the same bytes an eager push would have sent,
//! TTL already lowered). When that copy does not come within [`LazyPush::want_timeout`], the
//! next announcer is asked. Every random choice of eager peers thus has the whole
//! neighbourhood as a fallback, and delivery stays complete.
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
//! Everything here is bounded: the ids waiting to be asked for ([`LazyPush::max_wanted`]), the
//! announcers remembered per id ([`MAX_ANNOUNCERS`]), and the forwarded copies kept to answer
//! `WANT`s ([`LazyPush::keep_frames`], each for at most [`LazyPush::keep`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use mesh_protocol::MessageId;
use tokio::time::Instant;

/// Tag byte of a `HAVE` frame: "I have these messages".
pub const HAVE_TAG: u8 = 0xF1;
/// Tag byte of a `WANT` frame: "send me these messages".
pub const WANT_TAG: u8 = 0xF2;
/// Most ids in one control frame.
pub const MAX_IDS: usize = 64;
/// Most announcers remembered for one id (asked one after the other).
pub const MAX_ANNOUNCERS: usize = 4;

/// Lazy-push settings (part of [`crate::Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyPush {
    /// How many peers a relayed message is sent to in full, chosen at random among the peers
    /// that have not sent it to us; the others get its id. `usize::MAX` floods (every peer
    /// gets the message, nobody gets an id).
    pub eager_peers: usize,
    /// How long a node waits after a `HAVE` for an unseen id before it asks for the message.
    /// Most waits end with a copy from an eager neighbour, which can lag the `HAVE` by the
    /// time a burst of relaying keeps the CPUs busy: at 300 nodes on two cores, 20 ms sent
    /// about 28 needless `WANT`s per message (each answered with one more full copy), 50 ms
    /// 8 to 18 per 100 messages.
    pub want_delay: Duration,
    /// How long a node waits for an asked-for message before it asks the next announcer.
    pub want_timeout: Duration,
    /// Most ids waiting to be asked for; `HAVE`s beyond it are ignored (and counted).
    pub max_wanted: usize,
    /// How long a forwarded copy is kept to answer `WANT`s.
    pub keep: Duration,
    /// Most forwarded copies kept to answer `WANT`s.
    pub keep_frames: usize,
}

impl LazyPush {
    /// Flooding: every peer gets every message in full.
    pub const FLOOD: Self = Self { eager_peers: usize::MAX, ..Self::DEFAULT };

    const DEFAULT: Self = Self {
        eager_peers: 4,
        want_delay: Duration::from_millis(50),
        want_timeout: Duration::from_millis(250),
        max_wanted: 4096,
        keep: Duration::from_secs(2),
        keep_frames: 512,
    };

    /// Whether some peers get ids instead of messages.
    pub fn is_lazy(&self) -> bool {
        self.eager_peers != usize::MAX
    }
}

impl Default for LazyPush {
    /// Four eager peers, a `WANT` 50 ms after the first `HAVE`, the next announcer 250 ms
    /// later, copies kept 2 s.
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    /// The sender has these messages.
    Have(Vec<MessageId>),
    /// The sender asks for these messages.
    Want(Vec<MessageId>),
}

impl ControlFrame {
    /// Reads a control frame: `None` when `frame` is not one (it is then an envelope),
    /// `Some(Err(()))` when it is a malformed one.
    #[allow(clippy::result_unit_err)]
    pub fn parse(frame: &[u8]) -> Option<Result<Self, ()>> {
        let (&tag, rest) = frame.split_first()?;
        if tag != HAVE_TAG && tag != WANT_TAG {
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
        Some(Ok(if tag == HAVE_TAG { Self::Have(ids) } else { Self::Want(ids) }))
    }

    /// Encodes the frame (at most [`MAX_IDS`] ids are written).
    pub fn encode(&self) -> Vec<u8> {
        let (tag, ids) = match self {
            Self::Have(ids) => (HAVE_TAG, ids),
            Self::Want(ids) => (WANT_TAG, ids),
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
#[derive(Debug)]
pub struct Wanted<P> {
    entries: crate::IdMap<Entry<P>>,
    due: BinaryHeap<Reverse<(Instant, MessageId)>>,
    capacity: usize,
}

#[derive(Debug)]
struct Entry<P> {
    announcers: VecDeque<P>,
    /// `HAVE`s received for the id (each peer sends one, or the message itself).
    heard: usize,
    due: Instant,
}

impl<P: Clone + PartialEq> Wanted<P> {
    /// An empty set that holds at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Self { entries: crate::IdMap::default(), due: BinaryHeap::new(), capacity: capacity.max(1) }
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
    /// `false` when the set is full and the id was not recorded.
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
                if self.entries.len() >= self.capacity {
                    return false;
                }
                let due = now + delay;
                self.due.push(Reverse((due, id)));
                let announcers = VecDeque::from([peer.clone()]);
                self.entries.entry(id).or_insert(Entry { announcers, heard: 1, due })
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
        self.entries.remove(id).is_some()
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
                    asks.push((peer, id));
                    entry.due = now + timeout;
                    self.due.push(Reverse((entry.due, id)));
                }
                None => {
                    self.entries.remove(&id);
                }
            }
        }
        asks
    }
}

/// Forwarded copies kept for a while to answer `WANT`s.
#[derive(Debug)]
pub struct Kept {
    frames: crate::IdMap<Bytes>,
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

    /// Keeps `frame`, forgetting expired ones and, when full, the oldest.
    pub fn insert(&mut self, id: MessageId, frame: Bytes, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        self.expire(now);
        if self.frames.len() >= self.capacity
            && let Some((_, old)) = self.order.pop_front()
        {
            self.frames.remove(&old);
        }
        if self.frames.insert(id, frame).is_none() {
            self.order.push_back((now, id));
        }
    }

    /// The kept copy of `id`, if it is still kept.
    pub fn get(&mut self, id: &MessageId, now: Instant) -> Option<Bytes> {
        self.expire(now);
        self.frames.get(id).cloned()
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

    #[test]
    fn control_frames_round_trip_and_malformed_ones_are_refused() {
        let have = ControlFrame::Have(vec![id(1), id(2)]);
        let bytes = have.encode();
        assert_eq!(bytes.len(), 1 + 32);
        assert_eq!(ControlFrame::parse(&bytes), Some(Ok(have)));
        let want = ControlFrame::Want(vec![id(3)]);
        assert_eq!(ControlFrame::parse(&want.encode()), Some(Ok(want)));

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
        assert!(wanted.announce(id(2), &1u32, t0, delay, usize::MAX));
        assert!(!wanted.announce(id(3), &1u32, t0, delay, usize::MAX), "full");
        assert!(wanted.arrived(&id(1)));
        assert!(!wanted.arrived(&id(1)));
        assert_eq!(wanted.take_due(t0 + delay, delay), vec![(1, id(2))]);
        assert_eq!(wanted.len(), 1);
        for n in 0..MAX_ANNOUNCERS as u32 + 3 {
            wanted.announce(id(2), &(n + 10), t0, delay, usize::MAX);
        }
        assert!(wanted.entries[&id(2)].announcers.len() <= MAX_ANNOUNCERS);
    }

    #[test]
    fn kept_copies_expire_and_are_bounded() {
        let t0 = Instant::now();
        let mut kept = Kept::new(Duration::from_secs(2), 2);
        kept.insert(id(1), Bytes::from_static(b"one"), t0);
        kept.insert(id(2), Bytes::from_static(b"two"), t0 + Duration::from_secs(1));
        kept.insert(id(3), Bytes::from_static(b"three"), t0 + Duration::from_secs(1));
        assert_eq!(kept.len(), 2, "the oldest made room");
        assert_eq!(kept.get(&id(1), t0 + Duration::from_secs(1)), None);
        assert_eq!(kept.get(&id(2), t0 + Duration::from_secs(1)), Some(Bytes::from_static(b"two")));
        assert_eq!(kept.get(&id(3), t0 + Duration::from_secs(3)), None, "expired");
        assert!(kept.is_empty());
    }
}
