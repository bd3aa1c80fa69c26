//! Validation of received messages: one typed [`RejectReason`] per rule of ARCHITECTURE
//! section 4, checked cheapest first.
//!
//! A relay runs the stages separately so it can look the message id up in its seen cache
//! between them: [`decode_frame`] (frame size, decode, version, TTL bounds), then
//! [`Validator::verify`] (signature, origin/key, allow-list, clock: no timestamp later than
//! now plus the allowed skew nor earlier than now minus [`MAX_MESSAGE_AGE_MS`], payload
//! rules), then [`HighWaterMarks::admit`] (replays). [`Validator::validate`] runs all three
//! in order.
//!
//! Which rejections are the sending peer's fault, and so charged to it, is decided once, in
//! [`RejectReason::is_senders_fault`].

use std::collections::{HashMap, HashSet};
use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};

use crate::codec::{self, CodecError, MAX_FRAME_LEN};
use crate::identity::NodeId;
use crate::message::{
    Body, BodyDigest, Envelope, MAX_PRICES_PER_BATCH, MAX_TTL, MAX_TTL_PLUS_HOPS,
    MIN_PROTOCOL_VERSION, MessageId, PROTOCOL_VERSION, Payload,
};

/// Longest asset identifier, in characters.
pub const MAX_ASSET_LEN: usize = 255;
/// Longest blockchain name, in characters.
pub const MAX_BLOCKCHAIN_LEN: usize = 50;
/// Longest 24-hour change, in characters: the guide's `mesh_price_cache.change_24h` is
/// `VARCHAR(50)`, and a price every store cannot hold would stop the batch it travels in.
pub const MAX_CHANGE_24H_LEN: usize = 50;
/// Longest price, in characters (the guide's `mesh_price_cache.price VARCHAR(255)`). Every
/// [`crate::Decimal`] fits, which the assertion below keeps true.
pub const MAX_PRICE_LEN: usize = 255;
const _: () = assert!(crate::Decimal::MAX_LEN <= MAX_PRICE_LEN);
/// Earliest price timestamp accepted (the Unix epoch): every store holds any time from here to
/// the far future, while times far in the past fail in some (PostgreSQL's `TIMESTAMPTZ` ends
/// at 4713 BC, the `time` crate at year -9999).
pub const MIN_TIMESTAMP_MS: i64 = 0;
/// Default tolerance for clocks that run ahead (`MESH_MAX_CLOCK_SKEW_SECS`).
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: u32 = 5;
/// The oldest a message may be, in milliseconds: 10 minutes, the seen cache's default
/// lifetime. `created_at` and every price timestamp must be at least now minus this, checked
/// before a message is forwarded. A protocol constant rather than a setting, so that every
/// node applies the same bound and none forwards what its neighbours refuse: a restarted
/// node, whose replay marks are gone, refuses captured old messages instead of passing them
/// on. It also bounds what a store holds (no timestamp too old for its columns).
pub const MAX_MESSAGE_AGE_MS: i64 = 600_000;

/// Why a message was rejected: one variant per validation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The frame is longer than [`MAX_FRAME_LEN`].
    FrameTooLarge,
    /// The frame or the body is not a valid encoding (trailing bytes included).
    Malformed,
    /// The envelope's version is outside [`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// `ttl` is 0 or above [`MAX_TTL`], or `ttl + hop_count` is above [`MAX_TTL_PLUS_HOPS`].
    TtlOutOfBounds,
    /// The signature does not verify against `origin_key`.
    BadSignature,
    /// `origin` is not the node id derived from `origin_key`.
    OriginKeyMismatch,
    /// The origin is not on the configured provider allow-list.
    UntrustedProvider,
    /// `created_at` or a price timestamp is later than now plus the allowed clock skew.
    FutureTimestamp,
    /// `created_at` or a price timestamp is earlier than now minus [`MAX_MESSAGE_AGE_MS`].
    TooOld,
    /// A price is zero or negative.
    NonPositivePrice,
    /// An asset is empty, longer than 255 characters or not printable ASCII.
    BadAsset,
    /// A blockchain is empty, longer than 50 characters or not printable ASCII.
    BadBlockchain,
    /// A batch carries more than [`MAX_PRICES_PER_BATCH`] prices.
    TooManyPrices,
    /// A batch carries no price: it says nothing, and with no asset the replay marks could not
    /// tell a replay of it from a new one.
    EmptyBatch,
    /// A batch names the same (blockchain, asset) twice.
    DuplicateAsset,
    /// A 24-hour change is longer than [`MAX_CHANGE_24H_LEN`] characters (the guide's column).
    BadChange24h,
    /// A price timestamp is before [`MIN_TIMESTAMP_MS`], where not every store can hold it.
    TimestampOutOfRange,
    /// A timestamp is not newer than the last one accepted from the same origin.
    Replay,
}

impl RejectReason {
    /// Every reason, for documentation and for pre-registering metric labels.
    pub const ALL: [RejectReason; 18] = [
        Self::FrameTooLarge,
        Self::Malformed,
        Self::UnsupportedVersion,
        Self::TtlOutOfBounds,
        Self::BadSignature,
        Self::OriginKeyMismatch,
        Self::UntrustedProvider,
        Self::FutureTimestamp,
        Self::TooOld,
        Self::NonPositivePrice,
        Self::BadAsset,
        Self::BadBlockchain,
        Self::TooManyPrices,
        Self::EmptyBatch,
        Self::DuplicateAsset,
        Self::BadChange24h,
        Self::TimestampOutOfRange,
        Self::Replay,
    ];

    /// Whether the peer that sent the message alone can have caused this rejection, so that
    /// it may be charged for it (and banned past its budget).
    ///
    /// The rule: a fault is the sender's when every honest node applies the same check with
    /// the same result, so an honest relay, which forwards only what passed its own checks,
    /// can never pass such a message on. That holds for the frame, its encoding, the TTL
    /// bounds, the signature, the origin/key match and the payload rules, all protocol
    /// constants. It does not hold for a rejection that depends on this node's clock
    /// ([`RejectReason::FutureTimestamp`] and [`RejectReason::TooOld`]: clocks differ by up to
    /// the allowed skew, the skew setting itself differs between nodes, and a message that
    /// left a neighbour just in time arrives here a moment too old), on its configuration
    /// ([`RejectReason::UntrustedProvider`]: a neighbour without the same allow-list
    /// forwards other providers honestly) or on what it remembers
    /// ([`RejectReason::Replay`]: a restarted neighbour, or one whose seen cache forgot
    /// sooner, accepts a message this node has newer marks for), nor for a version this node
    /// does not read ([`RejectReason::UnsupportedVersion`]: a neighbour of a newer release
    /// relays newer messages honestly). Those are counted and logged, never charged.
    pub const fn is_senders_fault(self) -> bool {
        match self {
            Self::FrameTooLarge
            | Self::Malformed
            | Self::TtlOutOfBounds
            | Self::BadSignature
            | Self::OriginKeyMismatch
            | Self::NonPositivePrice
            | Self::BadAsset
            | Self::BadBlockchain
            | Self::TooManyPrices
            | Self::EmptyBatch
            | Self::DuplicateAsset
            | Self::BadChange24h
            | Self::TimestampOutOfRange => true,
            Self::UnsupportedVersion
            | Self::UntrustedProvider
            | Self::FutureTimestamp
            | Self::TooOld
            | Self::Replay => false,
        }
    }

    /// The label used in logs and in `mesh_validation_failures_total{reason}`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FrameTooLarge => "frame_too_large",
            Self::Malformed => "malformed",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TtlOutOfBounds => "ttl_out_of_bounds",
            Self::BadSignature => "bad_signature",
            Self::OriginKeyMismatch => "origin_key_mismatch",
            Self::UntrustedProvider => "untrusted_provider",
            Self::FutureTimestamp => "future_timestamp",
            Self::TooOld => "too_old",
            Self::NonPositivePrice => "non_positive_price",
            Self::BadAsset => "bad_asset",
            Self::BadBlockchain => "bad_blockchain",
            Self::TooManyPrices => "too_many_prices",
            Self::EmptyBatch => "empty_batch",
            Self::DuplicateAsset => "duplicate_asset",
            Self::BadChange24h => "bad_change_24h",
            Self::TimestampOutOfRange => "timestamp_out_of_range",
            Self::Replay => "replay",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected message: the rule it broke and, once the body could be read, its claimed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The rule.
    pub reason: RejectReason,
    /// The `origin` the body claims (`None` when the body was never decoded). Note that for
    /// [`RejectReason::BadSignature`] and [`RejectReason::OriginKeyMismatch`] it is unproven.
    pub source_node_id: Option<NodeId>,
}

impl Rejection {
    fn new(reason: RejectReason) -> Self {
        Self { reason, source_node_id: None }
    }

    fn from(reason: RejectReason, origin: NodeId) -> Self {
        Self { reason, source_node_id: Some(origin) }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source_node_id {
            Some(id) => write!(f, "{} (source_node_id {id})", self.reason),
            None => write!(f, "{}", self.reason),
        }
    }
}

impl std::error::Error for Rejection {}

impl From<CodecError> for Rejection {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::FrameTooLarge(_) => Self::new(RejectReason::FrameTooLarge),
            _ => Self::new(RejectReason::Malformed),
        }
    }
}

/// Stage 1: frame size, decoding, version and TTL bounds. Needs no key and no clock.
pub fn decode_frame(frame: &[u8]) -> Result<Envelope, Rejection> {
    if frame.len() > MAX_FRAME_LEN {
        return Err(Rejection::new(RejectReason::FrameTooLarge));
    }
    let envelope = codec::decode_envelope(frame)?;
    check_envelope_header(&envelope)?;
    Ok(envelope)
}

fn check_envelope_header(envelope: &Envelope) -> Result<(), Rejection> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&envelope.version) {
        return Err(Rejection::new(RejectReason::UnsupportedVersion));
    }
    let hops = u16::from(envelope.ttl) + u16::from(envelope.hop_count);
    if envelope.ttl == 0 || envelope.ttl > MAX_TTL || hops > MAX_TTL_PLUS_HOPS {
        return Err(Rejection::new(RejectReason::TtlOutOfBounds));
    }
    Ok(())
}

/// A decoded envelope with the digest of its body, taken once: the digest gives the message id
/// (for the seen-cache lookup) and is what the signature covers. The digest can only be made
/// from the envelope itself, so it always belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    envelope: Envelope,
    digest: BodyDigest,
}

impl Identified {
    /// Hashes the envelope's body.
    pub fn new(envelope: Envelope) -> Self {
        let digest = envelope.digest();
        Self { envelope, digest }
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.digest.message_id()
    }

    /// The envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Decodes the body (and checks the envelope's header again): the origin becomes known
    /// before the signature is checked, so that a caller can drop a message of an unwanted
    /// origin without paying for [`Validator::verify_decoded`].
    pub fn decode(self) -> Result<Decoded, Rejection> {
        check_envelope_header(&self.envelope)?;
        let body = codec::decode_body(&self.envelope.body)?;
        Ok(Decoded { identified: self, body })
    }
}

/// An [`Identified`] envelope with its body decoded, not verified. Made only by
/// [`Identified::decode`], so the body always is the envelope's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    identified: Identified,
    body: Body,
}

impl Decoded {
    /// The message id.
    pub fn id(&self) -> MessageId {
        self.identified.id()
    }

    /// The envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.identified.envelope
    }

    /// The decoded body: what the origin claims, not checked yet.
    pub fn body(&self) -> &Body {
        &self.body
    }
}

/// A message that passed every stateless rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedMessage {
    /// Its id (from the body bytes).
    pub id: MessageId,
    /// The envelope as received (hop fields of this copy, original body bytes).
    pub envelope: Envelope,
    /// The decoded, verified body.
    pub body: Body,
}

/// Validation settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How far ahead of our clock a timestamp may be (`MESH_MAX_CLOCK_SKEW_SECS`).
    pub max_clock_skew_secs: u32,
    /// When set, only these origins are accepted (`MESH_TRUSTED_PROVIDERS`).
    pub trusted_providers: Option<HashSet<NodeId>>,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_clock_skew_secs: DEFAULT_MAX_CLOCK_SKEW_SECS, trusted_providers: None }
    }
}

/// Runs the stateless rules.
#[derive(Debug, Default)]
pub struct Validator {
    config: Config,
    keys: KeyCache,
}

impl Clone for Validator {
    fn clone(&self) -> Self {
        Self::new(self.config.clone())
    }
}

/// Decompressed public keys of recent origins: decompressing a key costs about a fifth of a
/// verification, and a mesh has few origins. Bounded; cleared when full.
#[derive(Debug, Default)]
struct KeyCache(std::sync::Mutex<HashMap<[u8; 32], VerifyingKey>>);

impl KeyCache {
    const CAPACITY: usize = 1024;

    fn get(&self, bytes: &[u8; 32]) -> Option<VerifyingKey> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still a
        // valid cache, so keep using it.
        let mut keys = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(key) = keys.get(bytes) {
            return Some(*key);
        }
        let key = VerifyingKey::from_bytes(bytes).ok()?;
        if keys.len() >= Self::CAPACITY {
            keys.clear();
        }
        keys.insert(*bytes, key);
        Some(key)
    }
}

impl Validator {
    /// A validator with these settings.
    pub fn new(config: Config) -> Self {
        Self { config, keys: KeyCache::default() }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// All rules in order: [`decode_frame`], [`Validator::verify`], [`HighWaterMarks::admit`].
    pub fn validate(
        &self,
        frame: &[u8],
        now_ms: i64,
        marks: &mut HighWaterMarks,
    ) -> Result<VerifiedMessage, Rejection> {
        let envelope = decode_frame(frame)?;
        let verified = self.verify(envelope, now_ms)?;
        marks.admit(&verified, now_ms)?;
        Ok(verified)
    }

    /// Stage 2: body decoding, signature, origin/key match, allow-list, clock and payload rules.
    pub fn verify(&self, envelope: Envelope, now_ms: i64) -> Result<VerifiedMessage, Rejection> {
        self.verify_identified(Identified::new(envelope), now_ms)
    }

    /// [`Validator::verify`] of an envelope whose body digest (and so id) was taken already.
    pub fn verify_identified(
        &self,
        identified: Identified,
        now_ms: i64,
    ) -> Result<VerifiedMessage, Rejection> {
        self.verify_decoded(identified.decode()?, now_ms)
    }

    /// [`Validator::verify`] of an envelope whose body was decoded already.
    pub fn verify_decoded(
        &self,
        decoded: Decoded,
        now_ms: i64,
    ) -> Result<VerifiedMessage, Rejection> {
        let Decoded { identified: Identified { envelope, digest }, body } = decoded;
        let origin = body.origin;
        let reject = |reason| Rejection::from(reason, origin);

        let key = self.keys.get(&body.origin_key).ok_or(reject(RejectReason::BadSignature))?;
        let signature = Signature::from_bytes(&envelope.signature);
        key.verify_strict(&digest.signing_input(), &signature)
            .map_err(|_| reject(RejectReason::BadSignature))?;
        if NodeId::from_public_key(&body.origin_key) != origin {
            return Err(reject(RejectReason::OriginKeyMismatch));
        }
        if let Some(trusted) = &self.config.trusted_providers
            && !trusted.contains(&origin)
        {
            return Err(reject(RejectReason::UntrustedProvider));
        }

        let latest_ms = now_ms.saturating_add(i64::from(self.config.max_clock_skew_secs) * 1000);
        let earliest_ms = now_ms.saturating_sub(MAX_MESSAGE_AGE_MS);
        if body.created_at_ms > latest_ms {
            return Err(reject(RejectReason::FutureTimestamp));
        }
        if body.created_at_ms < earliest_ms {
            return Err(reject(RejectReason::TooOld));
        }
        if let Payload::PriceBatch { prices, .. } = &body.payload {
            check_prices(prices, latest_ms).map_err(reject)?;
            if prices.iter().any(|p| p.timestamp_ms < earliest_ms) {
                return Err(reject(RejectReason::TooOld));
            }
        }
        Ok(VerifiedMessage { id: digest.message_id(), envelope, body })
    }
}

fn check_prices(prices: &[crate::PriceUpdate], latest_ms: i64) -> Result<(), RejectReason> {
    if prices.len() > MAX_PRICES_PER_BATCH {
        return Err(RejectReason::TooManyPrices);
    }
    if prices.is_empty() {
        return Err(RejectReason::EmptyBatch);
    }
    for p in prices {
        check_price(p, latest_ms)?;
    }
    let mut names = HashSet::with_capacity(prices.len());
    if !prices.iter().all(|p| names.insert((p.blockchain.as_str(), p.asset.as_str()))) {
        return Err(RejectReason::DuplicateAsset);
    }
    Ok(())
}

/// The rules of one price, as a received batch applies them: a timestamp from
/// [`MIN_TIMESTAMP_MS`] to `latest_ms` (now plus the allowed clock skew), a positive price,
/// an asset and a blockchain of printable characters within their lengths, a 24-hour change
/// within [`MAX_CHANGE_24H_LEN`]. Together they bound every field to what every store holds.
///
/// Public so that prices that did not arrive in a message (reloaded from a store or the Redis
/// mirror at start) pass the same rules.
pub fn check_price(p: &crate::PriceUpdate, latest_ms: i64) -> Result<(), RejectReason> {
    if p.timestamp_ms > latest_ms || p.source_timestamp_ms.is_some_and(|s| s > latest_ms) {
        return Err(RejectReason::FutureTimestamp);
    }
    if p.timestamp_ms < MIN_TIMESTAMP_MS
        || p.source_timestamp_ms.is_some_and(|s| s < MIN_TIMESTAMP_MS)
    {
        return Err(RejectReason::TimestampOutOfRange);
    }
    if !p.price.is_positive() {
        return Err(RejectReason::NonPositivePrice);
    }
    if !is_printable(&p.asset, MAX_ASSET_LEN) {
        return Err(RejectReason::BadAsset);
    }
    if !is_printable(&p.blockchain, MAX_BLOCKCHAIN_LEN) {
        return Err(RejectReason::BadBlockchain);
    }
    if p.change_24h.as_ref().is_some_and(|c| c.as_str().len() > MAX_CHANGE_24H_LEN) {
        return Err(RejectReason::BadChange24h);
    }
    Ok(())
}

/// 1..=`max` characters, each printable ASCII (no spaces, no control characters).
fn is_printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Sets the mark of `asset` to `ts`; `true` when the asset had none (a new key).
fn mark(assets: &mut HashMap<String, i64>, asset: &str, ts: i64) -> bool {
    match assets.get_mut(asset) {
        Some(mark) => {
            *mark = ts;
            false
        }
        None => {
            assets.insert(asset.to_owned(), ts);
            true
        }
    }
}

/// Consecutive prices on the same chain, in order.
fn chain_runs(prices: &[crate::PriceUpdate]) -> impl Iterator<Item = &[crate::PriceUpdate]> {
    prices.chunk_by(|a, b| a.blockchain == b.blockchain)
}

/// Marks of one origin: blockchain -> asset -> newest accepted timestamp (nested maps let the
/// hot path look keys up by `&str` without copying them), and the origin's own floor.
#[derive(Debug, Clone)]
struct OriginMarks {
    chains: HashMap<String, HashMap<String, i64>>,
    len: usize,
    /// Newest timestamp among this origin's evicted marks: a key of this origin that is not
    /// held must be newer. It holds only this origin's own (accepted, so not future-dated)
    /// timestamps, so it can only ever hold back this origin's replays.
    floor_ms: i64,
    /// When this origin last had a message admitted (a counter, not a clock).
    last_admitted: u64,
}

impl OriginMarks {
    fn new(floor_ms: i64) -> Self {
        Self { chains: HashMap::new(), len: 0, floor_ms, last_admitted: 0 }
    }

    fn newest(&self) -> i64 {
        self.chains.values().flat_map(|c| c.values().copied()).fold(self.floor_ms, i64::max)
    }

    /// Evicts the older half of this origin's marks and raises its floor; how many went.
    fn evict_older_half(&mut self) -> usize {
        let mut stamps: Vec<i64> = self.chains.values().flat_map(|c| c.values().copied()).collect();
        if stamps.is_empty() {
            return 0;
        }
        let middle = stamps.len() / 2;
        let (_, cutoff, _) = stamps.select_nth_unstable(middle);
        let cutoff = *cutoff;
        let mut kept = 0;
        for assets in self.chains.values_mut() {
            assets.retain(|_, ts| *ts > cutoff);
            kept += assets.len();
        }
        self.chains.retain(|_, assets| !assets.is_empty());
        let evicted = self.len - kept;
        self.len = kept;
        self.floor_ms = self.floor_ms.max(cutoff);
        evicted
    }
}

/// Per (origin, blockchain, asset), the newest timestamp accepted so far.
///
/// A message whose timestamps are not all newer is a replay. Memory is bounded, and one
/// origin cannot push out another's marks:
/// - each origin holds at most `per_origin` keys; past that it evicts the older half of its
///   own, and its keys not held must then be newer than its own floor (the newest evicted
///   timestamp), so eviction never re-opens the door to its old messages;
/// - past `capacity` keys in all, the origin holding the most evicts the older half of its
///   own the same way;
/// - at most `max_origins` origins are held; past that the one admitted least recently is
///   forgotten whole. An origin not held (new or forgotten) must be newer than the newest
///   mark of the forgotten ones, but that floor is never taken above `now` minus
///   [`MAX_MESSAGE_AGE_MS`]: what is older is refused by age anyway, and a flood of keys
///   stamping their messages ahead of time cannot lift it over honest messages.
///
/// A provider's announces are marked by their `created_at` under the empty blockchain name.
#[derive(Debug, Clone)]
pub struct HighWaterMarks {
    marks: HashMap<NodeId, OriginMarks>,
    len: usize,
    capacity: usize,
    per_origin: usize,
    max_origins: usize,
    /// Newest mark of the origins forgotten whole (applied capped, see the type's docs).
    forgotten_floor_ms: i64,
    admitted: u64,
    evicted: u64,
}

impl Default for HighWaterMarks {
    fn default() -> Self {
        Self::with_limits(
            Self::DEFAULT_CAPACITY,
            Self::DEFAULT_PER_ORIGIN,
            Self::DEFAULT_MAX_ORIGINS,
        )
    }
}

impl HighWaterMarks {
    /// Default number of keys kept in all.
    pub const DEFAULT_CAPACITY: usize = 50_000;
    /// Default number of keys kept per origin (a provider covering more assets loses only the
    /// precision of its own oldest marks).
    pub const DEFAULT_PER_ORIGIN: usize = 10_000;
    /// Default number of origins held.
    pub const DEFAULT_MAX_ORIGINS: usize = 1_024;

    /// An empty set of marks holding at most `capacity` keys (at least 2), of any one origin
    /// too, and the default number of origins.
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_limits(capacity, capacity, Self::DEFAULT_MAX_ORIGINS)
    }

    /// An empty set of marks holding at most `capacity` keys in all, `per_origin` of one
    /// origin and `max_origins` origins (each at least 1, `capacity` at least 2).
    pub fn with_limits(capacity: usize, per_origin: usize, max_origins: usize) -> Self {
        Self {
            marks: HashMap::new(),
            len: 0,
            capacity: capacity.max(2),
            per_origin: per_origin.max(1),
            max_origins: max_origins.max(1),
            forgotten_floor_ms: i64::MIN,
            admitted: 0,
            evicted: 0,
        }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when no mark is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of origins held.
    pub fn origins(&self) -> usize {
        self.marks.len()
    }

    /// Keys evicted so far to stay within the limits (forgotten origins included).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// The floor for keys of `origin` that are not held.
    fn floor(&self, origin: &NodeId, now_ms: i64) -> i64 {
        match self.marks.get(origin) {
            Some(o) => o.floor_ms,
            None => self.forgotten_floor_ms.min(now_ms.saturating_sub(MAX_MESSAGE_AGE_MS)),
        }
    }

    /// Whether any price is not newer than its mark. The origin is looked up once and each
    /// run of prices on the same chain shares one chain lookup (a batch is usually one chain),
    /// which halves the hashing of a 50-price batch.
    fn any_replayed(&self, origin: &NodeId, prices: &[crate::PriceUpdate], now_ms: i64) -> bool {
        let floor = self.floor(origin, now_ms);
        let Some(marks) = self.marks.get(origin) else {
            return prices.iter().any(|p| p.timestamp_ms <= floor);
        };
        chain_runs(prices).any(|run| {
            let assets = marks.chains.get(run[0].blockchain.as_str());
            run.iter().any(|p| {
                let last = assets.and_then(|a| a.get(p.asset.as_str())).copied();
                p.timestamp_ms <= last.unwrap_or(floor)
            })
        })
    }

    /// The marks of `origin`, made (at `floor_ms`) when it has none; forgets the origin
    /// admitted least recently when a new one would be one too many.
    fn origin_mut(&mut self, origin: NodeId, floor_ms: i64) -> &mut OriginMarks {
        if !self.marks.contains_key(&origin) && self.marks.len() >= self.max_origins {
            self.forget_least_recent();
        }
        self.admitted += 1;
        let admitted = self.admitted;
        let marks = self.marks.entry(origin).or_insert_with(|| OriginMarks::new(floor_ms));
        marks.last_admitted = admitted;
        marks
    }

    fn forget_least_recent(&mut self) {
        let Some(oldest) =
            self.marks.iter().min_by_key(|(_, o)| o.last_admitted).map(|(id, _)| *id)
        else {
            return;
        };
        if let Some(gone) = self.marks.remove(&oldest) {
            self.forgotten_floor_ms = self.forgotten_floor_ms.max(gone.newest());
            self.len -= gone.len;
            self.evicted += gone.len as u64;
        }
    }

    /// Sets the marks of every price (after [`HighWaterMarks::any_replayed`] said none is old).
    fn set_all(&mut self, origin: NodeId, prices: &[crate::PriceUpdate], floor_ms: i64) {
        let marks = self.origin_mut(origin, floor_ms);
        let mut added = 0;
        for run in chain_runs(prices) {
            let chain = run[0].blockchain.as_str();
            let assets = match marks.chains.get_mut(chain) {
                Some(assets) => assets,
                None => marks.chains.entry(chain.to_owned()).or_default(),
            };
            added += run.iter().filter(|p| mark(assets, &p.asset, p.timestamp_ms)).count();
        }
        marks.len += added;
        self.len += added;
    }

    fn set(&mut self, origin: NodeId, blockchain: &str, asset: &str, ts: i64, floor_ms: i64) {
        let marks = self.origin_mut(origin, floor_ms);
        let assets = match marks.chains.get_mut(blockchain) {
            Some(assets) => assets,
            None => marks.chains.entry(blockchain.to_owned()).or_default(),
        };
        if mark(assets, asset, ts) {
            marks.len += 1;
            self.len += 1;
        }
    }

    /// Stage 3: rejects a replay, otherwise records the message's timestamps. `now_ms` (Unix
    /// ms) caps the floor that applies to origins not held.
    pub fn admit(&mut self, message: &VerifiedMessage, now_ms: i64) -> Result<(), Rejection> {
        let origin = message.body.origin;
        let replay = Rejection::from(RejectReason::Replay, origin);
        let floor = self.floor(&origin, now_ms);
        match &message.body.payload {
            Payload::PriceBatch { prices, .. } => {
                if self.any_replayed(&origin, prices, now_ms) {
                    return Err(replay);
                }
                self.set_all(origin, prices, floor);
            }
            Payload::ProviderAnnounce { .. } => {
                let last = self
                    .marks
                    .get(&origin)
                    .and_then(|o| o.chains.get(""))
                    .and_then(|c| c.get(""))
                    .copied()
                    .unwrap_or(floor);
                if message.body.created_at_ms <= last {
                    return Err(replay);
                }
                self.set(origin, "", "", message.body.created_at_ms, floor);
            }
        }
        self.enforce_limits(&origin);
        Ok(())
    }

    /// Evicts within `origin` past its own limit, then within the largest origin while the
    /// total is over capacity.
    fn enforce_limits(&mut self, origin: &NodeId) {
        if let Some(marks) = self.marks.get_mut(origin)
            && marks.len > self.per_origin
        {
            let evicted = marks.evict_older_half();
            self.len -= evicted;
            self.evicted += evicted as u64;
        }
        while self.len > self.capacity {
            let Some(largest) = self.marks.values_mut().max_by_key(|o| o.len) else { break };
            let evicted = largest.evict_older_half();
            if evicted == 0 {
                break;
            }
            self.len -= evicted;
            self.evicted += evicted as u64;
        }
    }
}
