//! Is this node's wall clock right? An estimate of its offset from independent references it
//! already talks to (issue 34 item 2), without I/O: the caller feeds readings with the local
//! time they were taken at and asks for a verdict with the time as an argument.
//!
//! References: the `Date` header of Birdeye's answers (one-second resolution), Redis `TIME`
//! (the coordination store's scripts answer it), and the creation times of fresh messages
//! from other nodes. Each reference gives `offset = local - reference`; the estimate is the
//! median over the references heard from in the last [`FRESH_MS`] (Birdeye, the store, and
//! the median of at least [`MIN_PEERS`] peers counting as one), and of two the one nearer
//! zero, so that a single wrong reference never stops an honest node. Peers are bounded
//! ([`MAX_PEERS`], the stalest replaced).
//!
//! A node whose estimate is further off than the allowed skew (`MESH_MAX_CLOCK_SKEW_SECS`)
//! takes no leases and publishes nothing: every node would refuse its batches as future (or
//! its rounds would come from the wrong time). It is back when the estimate is within four
//! fifths of the skew.

use std::collections::HashMap;

use mesh_protocol::NodeId;

/// Readings older than this (local ms) are forgotten.
pub const FRESH_MS: i64 = 10 * 60_000;
/// Peers needed before their median counts as a reference.
pub const MIN_PEERS: usize = 3;
/// Peers remembered.
pub const MAX_PEERS: usize = 64;
/// The smallest skew judged: Birdeye's `Date` has whole seconds, so a smaller allowed skew
/// (`MESH_MAX_CLOCK_SKEW_SECS=0`) would find every clock off.
pub const MIN_SKEW_MS: i64 = 1_500;

/// Where a reading comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reference {
    /// The `Date` header of a Birdeye answer.
    Birdeye,
    /// The coordination store's clock (Redis `TIME`).
    Store,
    /// The creation time of a fresh message from another node.
    Peer(NodeId),
}

#[derive(Debug, Clone, Copy)]
struct Reading {
    offset_ms: i64,
    at_ms: i64,
}

/// What [`ClockCheck::verdict`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockVerdict {
    /// The estimated offset (local minus references), ms; `None` before any reference.
    pub offset_ms: Option<i64>,
    /// `true` while the clock is off by more than the allowed skew.
    pub off: bool,
    /// `true` when `off` changed with this verdict (to log it once).
    pub changed: bool,
}

/// The offset estimate and the off/on decision.
#[derive(Debug, Clone)]
pub struct ClockCheck {
    max_skew_ms: i64,
    birdeye: Option<Reading>,
    store: Option<Reading>,
    peers: HashMap<NodeId, Reading>,
    off: bool,
}

impl ClockCheck {
    /// A check allowing `max_skew_ms` (`MESH_MAX_CLOCK_SKEW_SECS` x 1000).
    pub fn new(max_skew_ms: i64) -> Self {
        Self {
            max_skew_ms: max_skew_ms.max(0),
            birdeye: None,
            store: None,
            peers: HashMap::new(),
            off: false,
        }
    }

    /// The allowed skew, ms.
    pub fn max_skew_ms(&self) -> i64 {
        self.max_skew_ms
    }

    /// `reference` read `reference_ms` when this node's clock read `local_ms`.
    pub fn observe(&mut self, reference: Reference, reference_ms: i64, local_ms: i64) {
        let reading = Reading { offset_ms: local_ms.saturating_sub(reference_ms), at_ms: local_ms };
        match reference {
            Reference::Birdeye => self.birdeye = Some(reading),
            Reference::Store => self.store = Some(reading),
            Reference::Peer(node) => {
                if !self.peers.contains_key(&node) && self.peers.len() >= MAX_PEERS {
                    let stalest = self.peers.iter().min_by_key(|(_, r)| r.at_ms).map(|(n, _)| *n);
                    if let Some(stalest) = stalest {
                        self.peers.remove(&stalest);
                    }
                }
                self.peers.insert(node, reading);
            }
        }
    }

    /// The estimated offset at `now_ms` (local minus references), `None` without a fresh
    /// reference.
    pub fn offset_ms(&self, now_ms: i64) -> Option<i64> {
        let fresh = |r: &Reading| now_ms.saturating_sub(r.at_ms) <= FRESH_MS;
        let mut sources: Vec<i64> = [self.birdeye, self.store]
            .into_iter()
            .flatten()
            .filter(fresh)
            .map(|r| r.offset_ms)
            .collect();
        let peers: Vec<i64> =
            self.peers.values().filter(|r| fresh(r)).map(|r| r.offset_ms).collect();
        if peers.len() >= MIN_PEERS {
            sources.push(cautious_median(peers));
        }
        (!sources.is_empty()).then(|| cautious_median(sources))
    }

    /// The verdict at `now_ms`: off beyond the allowed skew, on again within four fifths of it.
    pub fn verdict(&mut self, now_ms: i64) -> ClockVerdict {
        let offset_ms = self.offset_ms(now_ms);
        let was = self.off;
        if let Some(offset) = offset_ms {
            let size = offset.saturating_abs();
            if size > self.max_skew_ms {
                self.off = true;
            } else if size <= self.max_skew_ms * 4 / 5 {
                self.off = false;
            }
        } else {
            // Nothing to judge by: assume right (a node without references behaves as before).
            self.off = false;
        }
        ClockVerdict { offset_ms, off: self.off, changed: self.off != was }
    }
}

/// The median; of an even count, the middle value nearer zero.
fn cautious_median(mut values: Vec<i64>) -> i64 {
    values.sort_unstable();
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        let (a, b) = (values[n / 2 - 1], values[n / 2]);
        if a.saturating_abs() <= b.saturating_abs() { a } else { b }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    fn peer(n: u128) -> Reference {
        Reference::Peer(NodeId::from_uuid(uuid::Uuid::from_u128(n)))
    }

    #[test]
    fn without_references_the_clock_is_taken_as_right() {
        let mut check = ClockCheck::new(5_000);
        assert_eq!(
            check.verdict(NOW),
            ClockVerdict { offset_ms: None, off: false, changed: false }
        );
    }

    #[test]
    fn eight_seconds_ahead_is_off_and_back_when_right() {
        let mut check = ClockCheck::new(5_000);
        // Local 8 s ahead of Birdeye and Redis.
        check.observe(Reference::Birdeye, NOW - 8_000, NOW);
        check.observe(Reference::Store, NOW - 8_050, NOW);
        let v = check.verdict(NOW);
        assert!(v.off && v.changed, "{v:?}");
        assert!((8_000..=8_050).contains(&v.offset_ms.unwrap()));
        assert!(!check.verdict(NOW).changed, "said once");
        // Within the skew but not four fifths of it: still off (no flapping at the edge).
        check.observe(Reference::Birdeye, NOW - 4_500, NOW);
        check.observe(Reference::Store, NOW - 4_500, NOW);
        assert!(check.verdict(NOW).off);
        check.observe(Reference::Birdeye, NOW - 100, NOW + 1);
        check.observe(Reference::Store, NOW - 50, NOW + 1);
        let v = check.verdict(NOW + 1);
        assert!(!v.off && v.changed, "{v:?}");
    }

    #[test]
    fn one_wrong_reference_stops_nobody() {
        let mut check = ClockCheck::new(5_000);
        // Redis says right, Birdeye says 20 s off: of two, the one nearer zero.
        check.observe(Reference::Birdeye, NOW - 20_000, NOW);
        check.observe(Reference::Store, NOW, NOW);
        assert!(!check.verdict(NOW).off);
        // Peers: two lying ones do not count (fewer than three); with three honest, the median.
        for n in 0..2 {
            check.observe(peer(n), NOW + 60_000, NOW);
        }
        assert_eq!(check.offset_ms(NOW), Some(0));
        for n in 2..5 {
            check.observe(peer(n), NOW - 30, NOW);
        }
        // Sources: Birdeye 20 s, store 0, peers' median 30 ms: median 30.
        assert_eq!(check.offset_ms(NOW), Some(30));
        assert!(!check.verdict(NOW).off);
    }

    #[test]
    fn old_readings_are_forgotten_and_peers_bounded() {
        let mut check = ClockCheck::new(5_000);
        check.observe(Reference::Store, NOW - 9_000, NOW);
        assert!(check.verdict(NOW).off);
        assert_eq!(check.offset_ms(NOW + FRESH_MS + 1), None);
        assert!(!check.verdict(NOW + FRESH_MS + 1).off);
        for n in 0..1_000 {
            check.observe(peer(n), NOW, NOW + n as i64);
        }
        assert_eq!(check.peers.len(), MAX_PEERS);
        assert!(check.peers.values().all(|r| r.at_ms >= NOW + 1_000 - MAX_PEERS as i64));
    }
}
