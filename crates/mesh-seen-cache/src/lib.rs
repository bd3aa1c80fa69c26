//! The seen-message cache: a bounded set of message ids with per-entry expiry.
//!
//! Every relay looks each incoming message id up here before spending a signature check on
//! it. Lookups and inserts are O(1); at capacity (`MESH_SEEN_MESSAGES_CACHE_SIZE`) the oldest
//! entry is evicted first. Each entry also remembers the highest TTL any copy of the message
//! arrived with, for the relay's re-forward rule (ARCHITECTURE section 5): a duplicate that
//! carries more remaining TTL than every copy seen before is forwarded again.
//!
//! Time comes from [`tokio::time::Instant`], so tests can pause and advance it. Persistent or
//! shared copies of the set (PostgreSQL, SQLite, Redis) implement [`SeenBackend`]; the cache
//! itself does no I/O.
//!
//! ```
//! use std::time::Duration;
//! use mesh_seen_cache::{Config, Lookup, SeenCache};
//!
//! let mut seen = SeenCache::new(Config { capacity: 10_000, ttl: Duration::from_secs(600) });
//! let id = 42u128;
//! assert_eq!(seen.lookup(&id), Lookup::New);
//! seen.insert(id, 7);
//! assert_eq!(seen.lookup(&id), Lookup::Seen { max_ttl: 7 });
//! assert!(!seen.raise_ttl(&id, 5)); // a copy with less TTL: drop it
//! assert!(seen.raise_ttl(&id, 9)); // more TTL than any copy so far: forward it again
//! ```

use std::collections::VecDeque;
use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::hash::Hash;
use std::time::{Duration, SystemTime};

use foldhash::fast::RandomState;
use tokio::time::Instant;

/// Default capacity (`MESH_SEEN_MESSAGES_CACHE_SIZE`).
pub const DEFAULT_CAPACITY: usize = 10_000;
/// Default lifetime of an entry.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// Cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Most ids held at once; the oldest is evicted beyond it (at least 1).
    pub capacity: usize,
    /// How long an id is remembered.
    pub ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self { capacity: DEFAULT_CAPACITY, ttl: DEFAULT_TTL }
    }
}

/// What the cache knows about an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Not seen, or seen so long ago that the entry expired.
    New,
    /// Seen and not expired; `max_ttl` is the highest TTL any copy arrived with.
    Seen {
        /// Highest remaining TTL among the copies seen.
        max_ttl: u8,
    },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    expires: Instant,
    max_ttl: u8,
    /// Insertion number; ties the entry to its place in `order`.
    seq: u64,
}

/// A bounded set of ids with expiry and the highest TTL seen per id.
#[derive(Debug)]
pub struct SeenCache<K> {
    config: Config,
    /// Hashed with foldhash (seeded at random per table): every relayed copy costs a few
    /// lookups here, and SipHash was a measurable part of a relay's CPU time.
    entries: HashMap<K, Entry, RandomState>,
    /// Ids in insertion order with their insertion number and expiry (so the purge reads
    /// only this line until it meets an expired id). An element whose number no longer
    /// matches the entry (the id expired and was inserted again) is skipped.
    order: VecDeque<(K, u64, Instant)>,
    next_seq: u64,
    evicted: u64,
}

impl<K: Copy + Eq + Hash> SeenCache<K> {
    /// An empty cache. It grows with the ids it holds rather than reserving its capacity: a
    /// relay keeps one per link besides its own, mostly far from full, and small tables keep
    /// their lookups in the CPU's caches.
    pub fn new(config: Config) -> Self {
        let config = Config { capacity: config.capacity.max(1), ..config };
        Self {
            config,
            entries: HashMap::default(),
            order: VecDeque::new(),
            next_seq: 0,
            evicted: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> Config {
        self.config
    }

    /// Number of ids held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when no id is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Ids evicted at capacity before they expired, since the cache was made.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Looks `id` up without changing anything.
    pub fn lookup(&self, id: &K) -> Lookup {
        match self.entries.get(id) {
            Some(e) if e.expires > Instant::now() => Lookup::Seen { max_ttl: e.max_ttl },
            _ => Lookup::New,
        }
    }

    /// `true` when `id` is held and not expired.
    pub fn contains(&self, id: &K) -> bool {
        matches!(self.lookup(id), Lookup::Seen { .. })
    }

    /// Records `id` as seen now with a copy of `ttl`, for the configured lifetime.
    /// `true` when the id was not held (or had expired): a check and an insert in one lookup.
    pub fn insert(&mut self, id: K, ttl: u8) -> bool {
        let expires = Instant::now() + self.config.ttl;
        self.insert_until(id, ttl, expires)
    }

    /// Records `id` with an explicit expiry (ids reloaded from a store keep theirs).
    /// An id already held keeps its expiry and its place in line, and takes the higher TTL:
    /// an id lives for one lifetime from the first copy. Entries are purged from the front of
    /// the line, so the line must also be expiry order: with one lifetime for every id (and
    /// [`SeenCache::load`] sorting what it reloads) it is, and then expired ids never count
    /// against the capacity. `true` when the id was recorded anew, `false` when it was held
    /// already or `expires` has passed.
    pub fn insert_until(&mut self, id: K, ttl: u8, expires: Instant) -> bool {
        let now = Instant::now();
        if expires <= now {
            return false;
        }
        self.purge_expired_at(now);
        let seq = self.next_seq;
        match self.entries.entry(id) {
            MapEntry::Occupied(mut occupied) if occupied.get().expires > now => {
                let e = occupied.get_mut();
                e.max_ttl = e.max_ttl.max(ttl);
                return false;
            }
            MapEntry::Occupied(mut occupied) => {
                // Expired but not yet purged: a new life for the id.
                *occupied.get_mut() = Entry { expires, max_ttl: ttl, seq };
            }
            MapEntry::Vacant(vacant) => {
                vacant.insert(Entry { expires, max_ttl: ttl, seq });
            }
        }
        self.next_seq += 1;
        self.order.push_back((id, seq, expires));
        while self.entries.len() > self.config.capacity {
            if self.pop_oldest().is_some() {
                self.evicted += 1;
            }
        }
        if self.order.len() > 2 * self.config.capacity {
            self.compact_order();
        }
        true
    }

    /// For a duplicate of `id` arriving with `ttl`: returns `true` and remembers `ttl` when it
    /// is higher than every copy seen so far (the relay forwards such a copy again). Returns
    /// `false` for an id that is not held.
    pub fn raise_ttl(&mut self, id: &K, ttl: u8) -> bool {
        let now = Instant::now();
        match self.entries.get_mut(id) {
            Some(e) if e.expires > now && ttl > e.max_ttl => {
                e.max_ttl = ttl;
                true
            }
            _ => false,
        }
    }

    /// Drops every expired id; returns how many.
    pub fn purge_expired(&mut self) -> usize {
        self.purge_expired_at(Instant::now())
    }

    /// Entries are mostly in expiry order (one lifetime for all), so expired ones sit at the
    /// front; an entry with a longer explicit expiry stops the sweep early, which is harmless:
    /// lookups check expiry themselves and capacity bounds the memory.
    fn purge_expired_at(&mut self, now: Instant) -> usize {
        let mut purged = 0;
        while let Some(&(id, seq, expires)) = self.order.front() {
            if expires > now {
                break;
            }
            if self.entries.get(&id).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&id);
                purged += 1;
            }
            self.order.pop_front();
        }
        purged
    }

    /// Removes the oldest live entry; returns its id.
    fn pop_oldest(&mut self) -> Option<K> {
        while let Some((id, seq, _)) = self.order.pop_front() {
            if self.entries.get(&id).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&id);
                return Some(id);
            }
        }
        None
    }

    fn compact_order(&mut self) {
        let entries = &self.entries;
        self.order.retain(|(id, seq, _)| entries.get(id).is_some_and(|e| e.seq == *seq));
    }

    /// Every live id with its expiry, for persisting (order unspecified).
    pub fn snapshot(&self) -> Vec<(K, Instant)> {
        let now = Instant::now();
        self.entries.iter().filter(|(_, e)| e.expires > now).map(|(k, e)| (*k, e.expires)).collect()
    }
}

/// One id as kept by a backing store, with wall-clock times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenRecord<K> {
    /// The message id.
    pub id: K,
    /// When it was first seen.
    pub seen_at: SystemTime,
    /// When it may be forgotten.
    pub expires_at: SystemTime,
}

/// Error of a backing store, whatever the store.
#[derive(Debug, thiserror::Error)]
#[error("seen-id store: {0}")]
pub struct BackendError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// A persistent or shared copy of the seen set (database table, Redis keys).
///
/// The relay never waits on it: the node records ids in the background and loads the
/// unexpired ones into the memory cache at start-up.
#[async_trait::async_trait]
pub trait SeenBackend<K>: Send + Sync {
    /// Records ids; an id already present is left as it is.
    async fn record(&self, records: &[SeenRecord<K>]) -> Result<(), BackendError>;
    /// Every id whose `expires_at` is in the future.
    async fn load_unexpired(&self) -> Result<Vec<SeenRecord<K>>, BackendError>;
}

impl<K: Copy + Eq + Hash> SeenCache<K> {
    /// Loads records from a backing store, converting wall-clock expiry to [`Instant`]s.
    /// Records already expired are skipped; returns how many were inserted.
    pub fn load(&mut self, records: &[SeenRecord<K>], max_ttl: u8) -> usize {
        let wall_now = SystemTime::now();
        let now = Instant::now();
        let mut loaded = 0;
        // Earliest expiry first: the cache's line must be expiry order (see `insert_until`).
        let mut records: Vec<&SeenRecord<K>> = records.iter().collect();
        records.sort_by_key(|r| r.expires_at);
        for r in records {
            if let Ok(left) = r.expires_at.duration_since(wall_now)
                && !left.is_zero()
            {
                self.insert_until(r.id, max_ttl, now + left.min(self.config.ttl));
                loaded += 1;
            }
        }
        loaded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cache(capacity: usize, ttl_secs: u64) -> SeenCache<u32> {
        SeenCache::new(Config { capacity, ttl: Duration::from_secs(ttl_secs) })
    }

    #[tokio::test(start_paused = true)]
    async fn oldest_is_evicted_first_at_capacity() {
        let mut c = cache(3, 60);
        for id in 1..=3 {
            c.insert(id, 5);
        }
        c.insert(4, 5);
        assert_eq!(c.len(), 3);
        assert_eq!(c.lookup(&1), Lookup::New);
        assert!(c.contains(&2) && c.contains(&3) && c.contains(&4));
        assert_eq!(c.evicted(), 1);
        // A duplicate insert does not refresh the id's place in line.
        c.insert(2, 9);
        c.insert(5, 5);
        assert!(!c.contains(&2));
        assert!(c.contains(&3) && c.contains(&4) && c.contains(&5));
    }

    #[tokio::test(start_paused = true)]
    async fn insert_tells_whether_the_id_was_new() {
        let mut c = cache(100, 10);
        assert!(c.insert(1, 5));
        assert!(!c.insert(1, 7), "held: not new, only the TTL rises");
        assert_eq!(c.lookup(&1), Lookup::Seen { max_ttl: 7 });
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(c.insert(1, 5), "expired: a new life");
        assert!(!c.insert_until(2, 5, Instant::now()), "an expiry already passed is not kept");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_lifetime() {
        let mut c = cache(100, 10);
        c.insert(1, 5);
        tokio::time::advance(Duration::from_secs(5)).await;
        c.insert(2, 5);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(c.lookup(&1), Lookup::New, "expired exactly at its lifetime");
        assert!(c.contains(&2));
        assert_eq!(c.purge_expired(), 1);
        assert_eq!(c.len(), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(c.purge_expired(), 1);
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_id_can_be_inserted_again_and_stale_order_is_skipped() {
        let mut c = cache(2, 10);
        c.insert(1, 5);
        tokio::time::advance(Duration::from_secs(11)).await;
        c.insert(1, 6); // the old place in line is now stale
        c.insert(2, 5);
        c.insert(3, 5); // evicts the oldest live entry: the new life of 1
        assert!(!c.contains(&1));
        assert!(c.contains(&2) && c.contains(&3));
        assert_eq!(c.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn highest_ttl_is_remembered_and_only_a_higher_copy_is_reforwarded() {
        let mut c = cache(10, 60);
        assert!(!c.raise_ttl(&7, 9), "unknown id");
        c.insert(7, 4);
        assert!(!c.raise_ttl(&7, 4), "equal TTL is not more");
        assert!(!c.raise_ttl(&7, 2));
        assert!(c.raise_ttl(&7, 6));
        assert_eq!(c.lookup(&7), Lookup::Seen { max_ttl: 6 });
        assert!(!c.raise_ttl(&7, 5), "lower than the raised maximum");
        c.insert(7, 3); // a later insert keeps the maximum
        assert_eq!(c.lookup(&7), Lookup::Seen { max_ttl: 6 });
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!c.raise_ttl(&7, 9), "expired id");
    }

    #[tokio::test(start_paused = true)]
    async fn explicit_expiry_from_a_store_is_kept() {
        let mut c = cache(10, 600);
        let now = Instant::now();
        c.insert_until(1, 3, now + Duration::from_secs(5));
        c.insert_until(2, 3, now); // already expired: ignored
        assert!(c.contains(&1) && !c.contains(&2));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!c.contains(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn load_converts_wall_clock_expiry() {
        let mut c = cache(10, 600);
        let wall = SystemTime::now();
        let records = [
            SeenRecord { id: 1, seen_at: wall, expires_at: wall + Duration::from_secs(300) },
            SeenRecord { id: 2, seen_at: wall, expires_at: wall - Duration::from_secs(1) },
        ];
        assert_eq!(c.load(&records, 20), 1);
        assert!(c.contains(&1) && !c.contains(&2));
    }

    /// One step of the exhaustive test.
    #[derive(Debug, Clone, Copy)]
    enum Op {
        Insert(u32, u8),
        Raise(u32, u8),
        Advance,
        Purge,
    }

    /// The model: live entries in first-insertion order, with expiry (in half lifetimes) and
    /// the highest TTL. Expired entries are gone; capacity counts live entries only.
    #[derive(Debug, Default)]
    struct Model {
        entries: Vec<(u32, u32, u8)>,
        now: u32,
    }

    impl Model {
        fn expire(&mut self) {
            let now = self.now;
            self.entries.retain(|e| e.1 > now);
        }

        fn apply(&mut self, op: Op, cap: usize) -> Option<bool> {
            self.expire();
            match op {
                Op::Insert(id, ttl) => {
                    if let Some(e) = self.entries.iter_mut().find(|e| e.0 == id) {
                        e.2 = e.2.max(ttl);
                    } else {
                        self.entries.push((id, self.now + 2, ttl));
                        if self.entries.len() > cap {
                            self.entries.remove(0);
                        }
                    }
                    None
                }
                Op::Raise(id, ttl) => Some(match self.entries.iter_mut().find(|e| e.0 == id) {
                    Some(e) if ttl > e.2 => {
                        e.2 = ttl;
                        true
                    }
                    _ => false,
                }),
                Op::Advance => {
                    self.now += 1;
                    None
                }
                Op::Purge => None,
            }
        }

        fn lookup(&self, id: u32) -> Lookup {
            match self.entries.iter().find(|e| e.0 == id && e.1 > self.now) {
                Some(e) => Lookup::Seen { max_ttl: e.2 },
                None => Lookup::New,
            }
        }
    }

    /// Small-scope exhaustive check: every sequence of six operations over three ids
    /// (inserts with two TTLs, TTL raises, time passing half a lifetime, purges), at
    /// capacities 1, 2 and 3, against the model, after every step.
    #[tokio::test(start_paused = true)]
    async fn every_sequence_of_six_operations_matches_the_model() {
        let ops = [
            Op::Insert(0, 1),
            Op::Insert(1, 1),
            Op::Insert(2, 1),
            Op::Insert(0, 2),
            Op::Raise(0, 3),
            Op::Raise(1, 2),
            Op::Advance,
            Op::Purge,
        ];
        const LEN: u32 = 6;
        let total = ops.len().pow(LEN);
        let mut checked = 0;
        for cap in 1..=3 {
            for n in 0..total {
                let mut c = cache(cap, 10);
                let mut model = Model::default();
                let mut index = n;
                let mut trace = Vec::new();
                for _ in 0..LEN {
                    let op = ops[index % ops.len()];
                    index /= ops.len();
                    trace.push(op);
                    let expected = model.apply(op, cap);
                    let got = match op {
                        Op::Insert(id, ttl) => {
                            c.insert(id, ttl);
                            None
                        }
                        Op::Raise(id, ttl) => Some(c.raise_ttl(&id, ttl)),
                        Op::Advance => {
                            tokio::time::advance(Duration::from_secs(5)).await;
                            None
                        }
                        Op::Purge => {
                            c.purge_expired();
                            None
                        }
                    };
                    assert_eq!(got, expected, "capacity {cap}, {trace:?}");
                    for id in 0..3 {
                        assert_eq!(
                            c.lookup(&id),
                            model.lookup(id),
                            "id {id}, capacity {cap}, {trace:?}"
                        );
                    }
                    assert!(c.len() <= cap, "capacity {cap}, {trace:?}");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * total);
    }

    proptest! {
        /// Against a simple model: the cache never exceeds capacity, and holds exactly the
        /// most recently first-inserted `capacity` ids (no expiry within the test).
        #[test]
        fn matches_a_fifo_model(ops in proptest::collection::vec(0u32..50, 1..400), cap in 1usize..20) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let mut c = cache(cap, 3600);
                let mut model: VecDeque<u32> = VecDeque::new();
                for id in ops {
                    c.insert(id, 1);
                    if !model.contains(&id) {
                        model.push_back(id);
                        if model.len() > cap {
                            model.pop_front();
                        }
                    }
                    prop_assert!(c.len() <= cap);
                    prop_assert!(c.order.len() <= 2 * cap);
                }
                for id in 0u32..50 {
                    prop_assert_eq!(c.contains(&id), model.contains(&id), "id {}", id);
                }
                Ok(())
            })?;
        }
    }
}
