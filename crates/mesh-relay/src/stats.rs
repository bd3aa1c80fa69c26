//! Counters of one relay, readable by its owner (tests, status pages). They mirror the
//! process-wide metrics, which cannot tell nodes apart when many run in one process.

use std::sync::atomic::{AtomicU64, Ordering};

use mesh_protocol::RejectReason;

/// Live counters, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) delivered: AtomicU64,
    pub(crate) published: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) reforwarded: AtomicU64,
    pub(crate) stale: AtomicU64,
    pub(crate) throttled: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) rejected: [AtomicU64; RejectReason::ALL.len()],
    pub(crate) frames_queued: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) suppressed: AtomicU64,
    pub(crate) haves_sent: AtomicU64,
    pub(crate) haves_received: AtomicU64,
    pub(crate) wants_sent: AtomicU64,
    pub(crate) wants_served: AtomicU64,
    pub(crate) wants_unknown: AtomicU64,
    pub(crate) wants_unserved: AtomicU64,
    pub(crate) wanted_full: AtomicU64,
    pub(crate) prunes_sent: AtomicU64,
    pub(crate) prunes_received: AtomicU64,
    pub(crate) grafts: AtomicU64,
    pub(crate) dropped_subscriber: AtomicU64,
    pub(crate) dropped_stream_lost: AtomicU64,
    pub(crate) streams_opened: AtomicU64,
    pub(crate) stream_open_failures: AtomicU64,
    pub(crate) inbound_streams_replaced: AtomicU64,
    pub(crate) prepared_in_parallel: AtomicU64,
    pub(crate) charged: AtomicU64,
    pub(crate) bans: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// New valid messages from peers handed to the local subscriber.
    pub delivered: u64,
    /// Messages this node originated.
    pub published: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Duplicates forwarded again because they carried more TTL.
    pub reforwarded: u64,
    /// Older messages that lost a race with a newer one from the same origin (not charged).
    pub stale: u64,
    /// New messages of unknown origins dropped unchecked because their sender had used up its
    /// budget of them (not charged).
    pub throttled: u64,
    /// New messages dropped unchecked because their sender brought their origin's messages
    /// faster than its rate ([`crate::OriginRate`]; not charged).
    pub rate_limited: u64,
    /// Rejections per reason (label, count), reasons with a zero count left out.
    pub rejected: Vec<(&'static str, u64)>,
    /// Frames put on peer queues (messages and lazy-push control frames); each is later
    /// sent, suppressed or lost with its stream.
    pub frames_queued: u64,
    /// Frames written to streams.
    pub frames_sent: u64,
    /// Bytes written to streams, length prefixes included.
    pub bytes_sent: u64,
    /// Frames dropped because a peer's queue was full.
    pub dropped_queue_full: u64,
    /// Queued copies not sent because the peer had sent us the message meanwhile.
    pub suppressed: u64,
    /// Message ids announced to peers instead of the message (`HAVE`, lazy push).
    pub haves_sent: u64,
    /// Message ids peers announced to us.
    pub haves_received: u64,
    /// Announced messages asked for (`WANT`) because no copy came in time.
    pub wants_sent: u64,
    /// Messages sent to peers that asked for them.
    pub wants_served: u64,
    /// Asked-for messages we no longer had (or never had).
    pub wants_unknown: u64,
    /// Announced messages given up (every announcer asked, none sent it in time), counted
    /// once per announcer asked.
    pub wants_unserved: u64,
    /// Announcements ignored because too many ids were already waiting.
    pub wanted_full: u64,
    /// Tree push: ids sent in `PRUNE`s (copies of messages we already had).
    pub prunes_sent: u64,
    /// Tree push: ids peers sent us in `PRUNE`s.
    pub prunes_received: u64,
    /// Tree push: pruned links made eager again by a `WANT` either way.
    pub grafts: u64,
    /// Deliveries dropped because the local subscriber was not keeping up.
    pub dropped_subscriber: u64,
    /// Frames lost when a stream broke.
    pub dropped_stream_lost: u64,
    /// Outbound relay streams opened.
    pub streams_opened: u64,
    /// Failed attempts to open an outbound relay stream.
    pub stream_open_failures: u64,
    /// Inbound streams that replaced an older one from the same peer.
    pub inbound_streams_replaced: u64,
    /// First copies of messages decoded and checked on a task of their own, beside their
    /// reader, because more frames of the same link were waiting behind them.
    pub prepared_in_parallel: u64,
    /// Rejections charged to the peer that sent them (only faults it alone can have caused:
    /// [`RejectReason::is_senders_fault`]).
    pub charged: u64,
    /// Peers banned.
    pub bans: u64,
    /// Inbound connections refused by a connection limit or a ban
    /// (`mesh_relay_connections_refused_total`).
    pub connections_refused: u64,
}

impl StatsSnapshot {
    /// Rejections for one reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected.iter().find(|(r, _)| *r == reason.as_str()).map_or(0, |(_, n)| *n)
    }

    /// Rejections for every reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    add(counter, 1);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub(crate) fn reject(&self, reason: RejectReason) {
        if let Some(i) = RejectReason::ALL.iter().position(|r| *r == reason) {
            bump(&self.rejected[i]);
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            delivered: get(&self.delivered),
            published: get(&self.published),
            duplicates: get(&self.duplicates),
            reforwarded: get(&self.reforwarded),
            stale: get(&self.stale),
            throttled: get(&self.throttled),
            rate_limited: get(&self.rate_limited),
            rejected: RejectReason::ALL
                .iter()
                .zip(&self.rejected)
                .map(|(r, c)| (r.as_str(), get(c)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            frames_queued: get(&self.frames_queued),
            frames_sent: get(&self.frames_sent),
            bytes_sent: get(&self.bytes_sent),
            dropped_queue_full: get(&self.dropped_queue_full),
            suppressed: get(&self.suppressed),
            haves_sent: get(&self.haves_sent),
            haves_received: get(&self.haves_received),
            wants_sent: get(&self.wants_sent),
            wants_served: get(&self.wants_served),
            wants_unknown: get(&self.wants_unknown),
            wants_unserved: get(&self.wants_unserved),
            wanted_full: get(&self.wanted_full),
            prunes_sent: get(&self.prunes_sent),
            prunes_received: get(&self.prunes_received),
            grafts: get(&self.grafts),
            dropped_subscriber: get(&self.dropped_subscriber),
            dropped_stream_lost: get(&self.dropped_stream_lost),
            streams_opened: get(&self.streams_opened),
            stream_open_failures: get(&self.stream_open_failures),
            inbound_streams_replaced: get(&self.inbound_streams_replaced),
            prepared_in_parallel: get(&self.prepared_in_parallel),
            charged: get(&self.charged),
            bans: get(&self.bans),
            connections_refused: get(&self.connections_refused),
        }
    }
}
