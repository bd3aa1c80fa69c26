//! The core task: owns the [`RelayCore`] and acts on its decisions.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use libp2p::PeerId;
use mesh_protocol::{MessageId, NodeId, RejectReason, Rejection, VerifiedMessage};
use mesh_seen_cache::Lookup;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::core::{Forward, Outcome, Prepared, RelayCore};
use crate::lazy::{ControlFrame, HeldIds, Kept, Trees, Wanted};
use crate::stats::{add, bump};

use super::uncharged::UnchargedLog;
use super::{Context, CoreInput, Delivery, Error, Link, Result, SwarmCommand, now_ms, read_links};

/// What a verified first copy that `peer` sent tells of the peer's distance to a provider, as a
/// hop count. Every message is a provider's (a price batch or an announce). The hop fields are
/// outside the signature, so any sender can lower them; a copy claiming to come straight from
/// its origin (hop count 1, or an impossible 0) is taken as such only from the origin itself,
/// and from anyone else as one hop further (the nearest such a peer can honestly be).
fn provider_hops(peer: &PeerId, message: &VerifiedMessage) -> u8 {
    let hops = message.envelope.hop_count;
    if hops > 1 {
        return hops;
    }
    if is_key_of(peer, &message.body.origin_key) { 1 } else { 2 }
}

/// Whether `peer` is the peer id of the ed25519 key `key`, without decoding the key (a point
/// decompression cost a sixth of one relay's rate when done for every message): an ed25519
/// peer id is the key itself, protobuf-encoded under the identity multihash.
fn is_key_of(peer: &PeerId, key: &[u8]) -> bool {
    // Protobuf `PublicKey { Type = Ed25519 (1), Data = 32 bytes }`.
    const PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];
    let hash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    let digest = hash.digest();
    hash.code() == 0
        && digest.len() == PREFIX.len() + key.len()
        && digest[..4] == PREFIX
        && digest[4..] == key[..]
}

/// Announced ids a peer did not send when asked, per charge ([`CoreTask::unserved`]).
const UNSERVED_PER_CHARGE: u32 = 16;
/// Peers whose unserved asks are counted at once (the counts start over beyond it).
const MAX_UNSERVED_PEERS: usize = 1024;

/// How long a reported hop distance stands before a longer one is reported again (paths change).
const HOP_REPORT_PERIOD: Duration = Duration::from_secs(30);

pub(super) struct CoreTask {
    pub(super) core: RelayCore<PeerId>,
    /// Rate limit of the log lines of uncharged rejections.
    pub(super) uncharged_log: UnchargedLog,
    pub(super) hops_reported: HashMap<PeerId, u8>,
    pub(super) hops_reset: Instant,
    /// Announced ids not seen yet (lazy push).
    pub(super) wanted: Wanted<PeerId>,
    /// Per peer, asks it did not serve since its last charge.
    pub(super) unserved: HashMap<PeerId, u32>,
    /// Forwarded copies kept to answer `WANT`s.
    pub(super) kept: Kept,
    /// `HAVE`s held back before they are sent.
    pub(super) held: HeldIds<PeerId>,
    /// `PRUNE`s held back before they are sent.
    pub(super) held_prunes: HeldIds<PeerId>,
    /// Tree push: per origin, the peers that get its messages in full.
    pub(super) trees: Trees<PeerId>,
    /// Picks the eager peers of each relayed message.
    pub(super) rng: StdRng,
    pub(super) inputs: mpsc::Receiver<CoreInput>,
    pub(super) deliveries: mpsc::Sender<Delivery>,
    pub(super) ctx: Context,
}

impl CoreTask {
    pub(super) async fn run(mut self) {
        // One timer, moved to the next id due to be asked for (lazy push) when that changes.
        let far = || Instant::now() + Duration::from_secs(86_400);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        // A second one for the held `HAVE`s and `PRUNE`s.
        let have_timer = tokio::time::sleep_until(far());
        tokio::pin!(have_timer);
        let mut have_armed: Option<Instant> = None;
        let cancelled = self.ctx.cancel.clone().cancelled_owned();
        tokio::pin!(cancelled);
        loop {
            let due = self.wanted.next_due();
            if due != armed {
                timer.as_mut().reset(due.unwrap_or_else(far));
                armed = due;
            }
            let have_due = match (self.held.due(), self.held_prunes.due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if have_due != have_armed {
                have_timer.as_mut().reset(have_due.unwrap_or_else(far));
                have_armed = have_due;
            }
            // Biased: a due timer first (inputs never starve it), the token last (it is
            // checked under a lock; tokio's task budget makes `recv` yield now and then, so
            // the token is still seen under a steady stream of inputs).
            let input = tokio::select! {
                biased;
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    self.ask_for_wanted();
                    continue;
                }
                () = &mut have_timer, if have_armed.is_some() => {
                    have_armed = None;
                    self.send_held_haves();
                    self.send_held_prunes();
                    continue;
                }
                i = self.inputs.recv() => match i {
                    Some(i) => i,
                    None => return,
                },
                () = &mut cancelled => return,
            };
            match input {
                CoreInput::Frame { peer, frame, prepared } => self.on_frame(peer, &frame, prepared),
                CoreInput::Oversized { peer } => self.reject(
                    peer,
                    &Rejection { reason: RejectReason::FrameTooLarge, source_node_id: None },
                ),
                CoreInput::Publish { frame, reply } => {
                    let _ = reply.send(self.publish(frame));
                }
                CoreInput::SendRaw { peer, frame } => {
                    if let Some(link) = read_links(&self.ctx.links).get(&peer) {
                        let _ = link.queue.try_send((None, Bytes::from(frame)));
                    }
                }
            }
        }
    }

    fn on_frame(
        &mut self,
        peer: PeerId,
        frame: &[u8],
        prepared: Option<Box<Result<Prepared, Rejection>>>,
    ) {
        let now = now_ms() + self.ctx.config.clock_offset_ms;
        if let Some(prepared) = prepared {
            let outcome = self.core.on_prepared(&peer, frame, *prepared, now);
            return self.on_outcome(peer, outcome, now);
        }
        match ControlFrame::parse(frame) {
            None => {}
            Some(Ok(ControlFrame::Have(ids))) => return self.on_have(peer, &ids),
            Some(Ok(ControlFrame::Want(ids))) => return self.on_want(peer, &ids),
            Some(Ok(ControlFrame::Prune(ids))) => return self.on_prune(peer, &ids),
            Some(Err(())) => {
                return self.reject(
                    peer,
                    &Rejection { reason: RejectReason::Malformed, source_node_id: None },
                );
            }
        }
        let outcome = self.core.on_frame(&peer, frame, now);
        self.on_outcome(peer, outcome, now);
    }

    fn on_outcome(&mut self, peer: PeerId, outcome: Outcome<PeerId>, now: i64) {
        let id = match &outcome {
            Outcome::Deliver { message, .. } => Some(message.id),
            Outcome::Reforward(f) => Some(f.id),
            Outcome::Duplicate { id, .. }
            | Outcome::Stale { id }
            | Outcome::Throttled { id }
            | Outcome::RateLimited { id } => Some(*id),
            Outcome::Rejected(_) => None,
        };
        if let Some(id) = id {
            if let Some(link) = read_links(&self.ctx.links).get(&peer) {
                link.sent_us.record(id);
            }
            // Only a copy we can pass on ends the wait for an announced id (the lookup is
            // skipped in the common case of nothing announced and missing).
            if !self.wanted.is_empty() && !self.holds_spent_copy(&id) {
                self.wanted.arrived(&id);
            }
        }
        match outcome {
            Outcome::Deliver { message, forward } => {
                // Distance is learned only here, from verified first copies: the hop fields are
                // not signed, and a duplicate is not verified at all.
                self.report_hops(peer, provider_hops(&peer, &message));
                let latency_ms = (now - message.body.created_at_ms).max(0);
                metrics::histogram!("mesh_message_propagation_latency_seconds")
                    .record(latency_ms as f64 / 1000.0);
                metrics::counter!("mesh_relay_messages_total", "outcome" => "delivered")
                    .increment(1);
                metrics::gauge!("mesh_seen_messages_cache_size").set(self.core.seen().len() as f64);
                bump(&self.ctx.stats.delivered);
                self.ctx.preparer.heard(message.body.origin);
                self.deliver(Delivery { message, from: Some(peer), received_at: Instant::now() });
                if let Some(forward) = forward {
                    self.relay(forward);
                }
            }
            Outcome::Reforward(forward) => {
                bump(&self.ctx.stats.reforwarded);
                metrics::counter!("mesh_relay_messages_total", "outcome" => "reforwarded")
                    .increment(1);
                // Nobody is pruned for it: the TTL is not signed, so any peer can send such a
                // copy, and pruning the first copy's sender would cut us from an honest tree
                // parent.
                self.relay(forward);
            }
            Outcome::Duplicate { id, .. } => {
                bump(&self.ctx.stats.duplicates);
                metrics::counter!("mesh_relay_messages_total", "outcome" => "duplicate")
                    .increment(1);
                // Not for the first message of an origin (see `crate::lazy`).
                if self.ctx.config.lazy.tree && !self.kept.is_first(&id) {
                    self.prune(peer, id);
                }
            }
            Outcome::Stale { id } => {
                debug!(%peer, %id, "older than a message already accepted from its origin; dropped");
                bump(&self.ctx.stats.stale);
                metrics::counter!("mesh_relay_messages_total", "outcome" => "stale").increment(1);
            }
            Outcome::Throttled { id } => {
                debug!(%peer, %id, "unknown origin beyond the peer's budget; dropped unchecked");
                bump(&self.ctx.stats.throttled);
                metrics::counter!("mesh_relay_dropped_total", "reason" => "origin_budget")
                    .increment(1);
            }
            Outcome::RateLimited { id } => {
                debug!(%peer, %id, "origin beyond its rate through this peer; dropped unchecked");
                bump(&self.ctx.stats.rate_limited);
                metrics::counter!("mesh_relay_dropped_total", "reason" => "origin_rate")
                    .increment(1);
            }
            Outcome::Rejected(rejection) => self.reject(peer, &rejection),
        }
    }

    /// Tells the peer manager a peer's distance to a provider when it is new or shorter than
    /// reported in the current period (reporting every copy cost a channel send each).
    fn report_hops(&mut self, peer: PeerId, hop_count: u8) {
        if self.hops_reset.elapsed() >= HOP_REPORT_PERIOD {
            self.hops_reported.clear();
            self.hops_reset = Instant::now();
        }
        let known = self.hops_reported.get(&peer).copied();
        if known.is_none_or(|h| hop_count < h) {
            self.hops_reported.insert(peer, hop_count);
            let _ = self.ctx.swarm_tx.try_send(SwarmCommand::ProviderHops(peer, hop_count));
        }
    }

    /// Counts and logs a rejection, and charges the peer only when the fault is its own
    /// ([`RejectReason::is_senders_fault`]). A rejection that depends on this node's clock,
    /// configuration or memory can come from an honest neighbour, many times a second (a
    /// node whose clock is behind finds every message in its future): it is logged at
    /// most once per reason per [`UNCHARGED_LOG_PERIOD`], with how many came since.
    fn reject(&mut self, peer: PeerId, rejection: &Rejection) {
        let reason = rejection.reason.as_str();
        let charged = rejection.reason.is_senders_fault();
        let source = rejection.source_node_id.map(|s| s.to_string());
        let source = source.as_deref().unwrap_or("unknown");
        if charged {
            warn!(%peer, reason, source_node_id = %source, "validation failed");
        } else if let Some(since) = self.uncharged_log.due(rejection.reason, Instant::now()) {
            warn!(
                %peer,
                reason,
                same_reason_since_last_line = since,
                charged = false,
                source_node_id = %source,
                "validation failed"
            );
        } else {
            debug!(%peer, reason, charged = false, source_node_id = %source, "validation failed");
        }
        self.ctx.stats.reject(rejection.reason);
        metrics::counter!("mesh_validation_failures_total", "reason" => reason).increment(1);
        metrics::counter!("mesh_relay_messages_total", "outcome" => "rejected").increment(1);
        if charged {
            bump(&self.ctx.stats.charged);
            let _ = self.ctx.swarm_tx.try_send(SwarmCommand::Charge(peer));
        }
    }

    fn deliver(&self, delivery: Delivery) {
        if self.deliveries.try_send(delivery).is_err() {
            bump(&self.ctx.stats.dropped_subscriber);
            metrics::counter!("mesh_relay_dropped_total", "reason" => "subscriber_full")
                .increment(1);
        }
    }

    /// Queues `frame` to every peer but the excluded and those that have sent us the message:
    /// in full to `eager` of them picked at random, or under tree push to the origin's children
    /// once it has a tree here, and as a `HAVE` to the others (lazy push). `None` sends the
    /// frame to all (a publisher's own message). Returns how many took the frame.
    fn send_to_peers(
        &mut self,
        id: MessageId,
        origin: NodeId,
        frame: Bytes,
        except: &[PeerId],
        eager: Option<usize>,
    ) -> u64 {
        let lazy = self.ctx.config.lazy;
        let (eager, tree_push) = match eager {
            Some(eager) => (eager, lazy.tree),
            None => (usize::MAX, false),
        };
        let links = read_links(&self.ctx.links);
        let mut candidates: Vec<(&PeerId, &Link)> = links
            .iter()
            .filter(|(peer, link)| !except.contains(peer) && !link.sent_us.contains(&id))
            .collect();
        let tree = if tree_push { self.trees.children(&origin) } else { None };
        // `HAVE`s are held only behind a tree's copies: nodes that a new origin's first
        // message does not reach in full learn of it at once.
        let hold = tree.is_some() && !lazy.have_delay.is_zero();
        let eager = match tree {
            Some(children) => {
                candidates.sort_by_key(|(peer, _)| !children.contains(peer));
                candidates.iter().take_while(|(peer, _)| children.contains(peer)).count()
            }
            None => {
                let eager = eager.min(candidates.len());
                if eager < candidates.len() {
                    candidates.partial_shuffle(&mut self.rng, eager);
                }
                if tree_push {
                    let children = candidates[..eager].iter().map(|(peer, _)| **peer).collect();
                    self.trees.plant(origin, children);
                }
                eager
            }
        };
        let now = Instant::now();
        let have = if eager < candidates.len() && !hold {
            Bytes::from(ControlFrame::Have(vec![id]).encode())
        } else {
            Bytes::new()
        };
        let (mut queued, mut announced) = (0u64, 0u64);
        let mut full = Vec::new();
        for (i, (peer, link)) in candidates.iter().enumerate() {
            if i >= eager && hold {
                if let Some(ids) = self.held.hold(peer, id, now, lazy.have_delay) {
                    full.push((**peer, ids));
                }
                continue;
            }
            let (frame, count) = if i < eager {
                (frame.clone(), &mut queued)
            } else {
                (have.clone(), &mut announced)
            };
            match link.queue.try_send((Some(id), frame)) {
                Ok(()) => *count += 1,
                Err(_) => self.count_queue_full(),
            }
        }
        let stats = &self.ctx.stats;
        add(&stats.frames_queued, queued + announced);
        self.count_haves(announced);
        for (peer, ids) in full {
            if let Some(link) = links.get(&peer) {
                self.send_haves(link, ids);
            }
        }
        queued
    }

    fn count_haves(&self, announced: u64) {
        if announced > 0 {
            add(&self.ctx.stats.haves_sent, announced);
            metrics::counter!("mesh_relay_lazy_total", "event" => "have_sent").increment(announced);
        }
    }

    /// Sends a peer one `HAVE` with those of `ids` it has not sent or announced to us
    /// meanwhile.
    fn send_haves(&self, link: &Link, mut ids: Vec<MessageId>) {
        ids.retain(|id| !link.sent_us.contains(id));
        if ids.is_empty() {
            return;
        }
        let frame = Bytes::from(ControlFrame::Have(ids.clone()).encode());
        if link.queue.try_send((None, frame)).is_ok() {
            bump(&self.ctx.stats.frames_queued);
            self.count_haves(ids.len() as u64);
        } else {
            self.count_queue_full();
        }
    }

    /// Sends the `HAVE`s held back.
    fn send_held_haves(&mut self) {
        let held = self.held.take();
        let links = read_links(&self.ctx.links);
        for (peer, ids) in held {
            if let Some(link) = links.get(&peer) {
                self.send_haves(link, ids);
            }
        }
    }

    /// Tree push: `peer` sent us a copy of `id` we did not need, so it is asked to send only
    /// ids of that origin's messages (`PRUNE`, held like `HAVE`s).
    fn prune(&mut self, peer: PeerId, id: MessageId) {
        let delay = self.ctx.config.lazy.have_delay;
        let ids = if delay.is_zero() {
            vec![id]
        } else {
            match self.held_prunes.hold(&peer, id, Instant::now(), delay) {
                Some(ids) => ids,
                None => return,
            }
        };
        self.send_prunes(peer, ids);
    }

    fn send_prunes(&self, peer: PeerId, ids: Vec<MessageId>) {
        let links = read_links(&self.ctx.links);
        let Some(link) = links.get(&peer) else { return };
        let n = ids.len() as u64;
        let frame = Bytes::from(ControlFrame::Prune(ids).encode());
        if link.queue.try_send((None, frame)).is_ok() {
            bump(&self.ctx.stats.frames_queued);
            add(&self.ctx.stats.prunes_sent, n);
            metrics::counter!("mesh_relay_lazy_total", "event" => "prune_sent").increment(n);
        } else {
            self.count_queue_full();
        }
    }

    /// Sends the `PRUNE`s held back.
    fn send_held_prunes(&mut self) {
        for (peer, ids) in self.held_prunes.take() {
            self.send_prunes(peer, ids);
        }
    }

    /// A peer needed no full copies of these messages: it leaves their origins' trees here.
    /// (Ids we no longer keep are ignored: their origins are unknown by then.)
    fn on_prune(&mut self, peer: PeerId, ids: &[MessageId]) {
        add(&self.ctx.stats.prunes_received, ids.len() as u64);
        let now = Instant::now();
        for id in ids {
            if let Some((origin, _)) = self.kept.get(id, now) {
                self.trees.prune(&origin, &peer);
            }
        }
    }

    fn count_queue_full(&self) {
        bump(&self.ctx.stats.dropped_queue_full);
        metrics::counter!("mesh_relay_dropped_total", "reason" => "queue_full").increment(1);
    }

    /// Relays a new message, or a duplicate with more TTL: in full to `eager_peers` random
    /// peers of those that may still need it, as a `HAVE` to the others (see [`crate::lazy`]).
    fn relay(&mut self, forward: Forward<PeerId>) {
        let lazy = self.ctx.config.lazy;
        let frame = Bytes::from(forward.frame);
        if lazy.is_lazy() {
            let first = lazy.tree && self.trees.children(&forward.origin).is_none();
            self.kept.insert(forward.id, forward.origin, frame.clone(), first, Instant::now());
        }
        let eager = Some(lazy.eager_peers);
        self.send_to_peers(forward.id, forward.origin, frame, &forward.except, eager);
    }

    /// A peer announced messages: it needs none of them from us, and the ones we have not
    /// seen (or hold only with their TTL spent) are asked of it later unless a copy comes
    /// first.
    fn on_have(&mut self, peer: PeerId, ids: &[MessageId]) {
        let stats = &self.ctx.stats;
        add(&stats.haves_received, ids.len() as u64);
        let peers = {
            let links = read_links(&self.ctx.links);
            if let Some(link) = links.get(&peer) {
                for id in ids {
                    link.sent_us.record(*id);
                }
            }
            links.len()
        };
        let now = Instant::now();
        let delay = self.ctx.config.lazy.want_delay;
        for id in ids {
            if self.could_use(id) && !self.wanted.announce(*id, &peer, now, delay, peers) {
                bump(&stats.wanted_full);
            }
        }
    }

    /// Whether a peer's copy of `id` would be of use: we have none, or ours came with its TTL
    /// spent, so we could not pass it on, and the peer's copy may carry more (the hop-TTL
    /// trap: a nearly expired first copy would otherwise hide a fresher one that a neighbour
    /// only announced, and nodes within the TTL's reach would miss the message); and we did
    /// not reject a copy of it for a reason every copy shares ([`crate::lazy::RejectedIds`]).
    fn could_use(&self, id: &MessageId) -> bool {
        self.seen_ttl(id).is_none_or(|ttl| ttl <= 1) && !self.core.was_rejected(id)
    }

    /// Whether our only copies of `id` came with TTL 1 (delivered, but not forwarded).
    fn holds_spent_copy(&self, id: &MessageId) -> bool {
        self.seen_ttl(id).is_some_and(|ttl| ttl <= 1)
    }

    /// The highest TTL a copy of `id` came with, if we have seen it.
    fn seen_ttl(&self, id: &MessageId) -> Option<u8> {
        match self.core.seen().lookup(id) {
            Lookup::New => None,
            Lookup::Seen { max_ttl } => Some(max_ttl),
        }
    }

    /// A peer asked for messages: each kept one is sent once to it, and under tree push the
    /// peer gets the messages of its origin in full from now on.
    fn on_want(&mut self, peer: PeerId, ids: &[MessageId]) {
        let links = read_links(&self.ctx.links);
        let Some(link) = links.get(&peer) else { return };
        let now = Instant::now();
        for id in ids {
            // Ids the peer sent or announced to us, or that we already sent it, are not sent.
            if link.sent_us.contains(id) {
                continue;
            }
            let Some((origin, frame)) = self.kept.get(id, now) else {
                bump(&self.ctx.stats.wants_unknown);
                continue;
            };
            if self.ctx.config.lazy.tree && self.trees.graft(&origin, &peer) {
                bump(&self.ctx.stats.grafts);
                metrics::counter!("mesh_relay_lazy_total", "event" => "graft").increment(1);
            }
            link.sent_us.record(*id);
            if link.queue.try_send((None, frame)).is_ok() {
                bump(&self.ctx.stats.frames_queued);
                bump(&self.ctx.stats.wants_served);
                metrics::counter!("mesh_relay_lazy_total", "event" => "want_served").increment(1);
            } else {
                self.count_queue_full();
            }
        }
    }

    /// Asks announcers for the announced messages still missing, one `WANT` per peer.
    fn ask_for_wanted(&mut self) {
        let due = self.wanted.take_due(Instant::now(), self.ctx.config.lazy.want_timeout);
        for peer in self.wanted.take_unserved() {
            self.unserved(peer);
        }
        let mut per_peer: HashMap<PeerId, Vec<MessageId>> = HashMap::new();
        for (peer, id) in due {
            if self.could_use(&id) {
                per_peer.entry(peer).or_default().push(id);
            }
        }
        let links = read_links(&self.ctx.links);
        for (peer, ids) in per_peer {
            let Some(link) = links.get(&peer) else { continue };
            for chunk in ids.chunks(crate::lazy::MAX_IDS) {
                let frame = Bytes::from(ControlFrame::Want(chunk.to_vec()).encode());
                if link.queue.try_send((None, frame)).is_ok() {
                    bump(&self.ctx.stats.frames_queued);
                    let n = chunk.len() as u64;
                    add(&self.ctx.stats.wants_sent, n);
                    metrics::counter!("mesh_relay_lazy_total", "event" => "want_sent").increment(n);
                }
            }
        }
    }

    /// A peer announced an id that was given up (no announcer sent it when asked): counted,
    /// and charged once per [`UNSERVED_PER_CHARGE`] (an honest peer can fail now and then,
    /// when its kept copy was forgotten or its queue was full; one announcing ids it never
    /// serves is banned within a few hundred).
    fn unserved(&mut self, peer: PeerId) {
        bump(&self.ctx.stats.wants_unserved);
        metrics::counter!("mesh_relay_lazy_total", "event" => "want_unserved").increment(1);
        if self.unserved.len() >= MAX_UNSERVED_PEERS && !self.unserved.contains_key(&peer) {
            self.unserved.clear();
        }
        let count = self.unserved.entry(peer).or_default();
        *count += 1;
        if *count >= UNSERVED_PER_CHARGE {
            *count = 0;
            debug!(%peer, "announced messages it did not send when asked; charged");
            let _ = self.ctx.swarm_tx.try_send(SwarmCommand::Charge(peer));
        }
    }

    fn publish(&mut self, frame: Vec<u8>) -> Result<usize> {
        let now = now_ms() + self.ctx.config.clock_offset_ms;
        let message = self.core.publish(&frame, now).map_err(Error::Rejected)?;
        bump(&self.ctx.stats.published);
        let frame = Bytes::from(frame);
        let origin = message.body.origin;
        // Every peer gets the message in full: each is a child of the origin's tree (and the
        // copy is kept for a peer whose copy is lost with its stream and that asks).
        if self.ctx.config.lazy.tree {
            self.kept.insert(message.id, origin, frame.clone(), false, Instant::now());
        }
        let queued = self.send_to_peers(message.id, origin, frame, &[], None) as usize;
        self.deliver(Delivery { message, from: None, received_at: Instant::now() });
        Ok(queued)
    }
}

#[cfg(test)]
mod tests {
    use mesh_protocol::Identity;

    #[test]
    fn a_peer_id_is_matched_with_its_own_key_only() {
        let (a, b) = (Identity::generate(), Identity::generate());
        assert!(super::is_key_of(&a.peer_id(), &a.public_key()));
        assert!(!super::is_key_of(&a.peer_id(), &b.public_key()));
        assert!(!super::is_key_of(&libp2p::PeerId::random(), &a.public_key()));
    }
}
