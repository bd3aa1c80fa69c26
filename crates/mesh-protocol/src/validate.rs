//! Validation of received messages: one typed [`RejectReason`] per rule of ARCHITECTURE
//! section 4, checked cheapest first.
//!
//! A relay runs the stages separately so it can look the message id up in its seen cache
//! between them: [`decode_frame`] (frame size, decode, version, TTL bounds), then
//! [`Validator::verify`] (signature, origin/key, allow-list, clock, payload rules), then
//! [`HighWaterMarks::admit`] (replays). [`Validator::validate`] runs all three in order.

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
/// Default tolerance for clocks that run ahead (`MESH_MAX_CLOCK_SKEW_SECS`).
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: u32 = 5;

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
    /// A timestamp is not newer than the last one accepted from the same origin.
    Replay,
}

impl RejectReason {
    /// Every reason, for documentation and for pre-registering metric labels.
    pub const ALL: [RejectReason; 15] = [
        Self::FrameTooLarge,
        Self::Malformed,
        Self::UnsupportedVersion,
        Self::TtlOutOfBounds,
        Self::BadSignature,
        Self::OriginKeyMismatch,
        Self::UntrustedProvider,
        Self::FutureTimestamp,
        Self::NonPositivePrice,
        Self::BadAsset,
        Self::BadBlockchain,
        Self::TooManyPrices,
        Self::EmptyBatch,
        Self::DuplicateAsset,
        Self::Replay,
    ];

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
            Self::NonPositivePrice => "non_positive_price",
            Self::BadAsset => "bad_asset",
            Self::BadBlockchain => "bad_blockchain",
            Self::TooManyPrices => "too_many_prices",
            Self::EmptyBatch => "empty_batch",
            Self::DuplicateAsset => "duplicate_asset",
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
        marks.admit(&verified)?;
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
        if body.created_at_ms > latest_ms {
            return Err(reject(RejectReason::FutureTimestamp));
        }
        if let Payload::PriceBatch { prices, .. } = &body.payload {
            check_prices(prices, latest_ms).map_err(reject)?;
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
        if p.timestamp_ms > latest_ms || p.source_timestamp_ms.is_some_and(|s| s > latest_ms) {
            return Err(RejectReason::FutureTimestamp);
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
    }
    let mut names = HashSet::with_capacity(prices.len());
    if !prices.iter().all(|p| names.insert((p.blockchain.as_str(), p.asset.as_str()))) {
        return Err(RejectReason::DuplicateAsset);
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

/// Marks of one origin: blockchain -> asset -> newest accepted timestamp. Nested maps let the
/// hot path look keys up by `&str` without copying them.
type OriginMarks = HashMap<String, HashMap<String, i64>>;

/// Per (origin, blockchain, asset), the newest timestamp accepted so far.
///
/// A message whose timestamps are not all newer is a replay. Memory is bounded: past
/// `capacity` keys the older half is evicted, and every key not present must then be newer
/// than the newest evicted timestamp, so eviction never re-opens the door to old messages.
/// A provider's announces are marked by their `created_at` under the empty blockchain name.
#[derive(Debug, Clone)]
pub struct HighWaterMarks {
    marks: HashMap<NodeId, OriginMarks>,
    len: usize,
    capacity: usize,
    evicted_floor_ms: i64,
    evicted: u64,
}

impl Default for HighWaterMarks {
    fn default() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

impl HighWaterMarks {
    /// Default number of keys kept.
    pub const DEFAULT_CAPACITY: usize = 50_000;

    /// An empty set of marks holding at most `capacity` keys (at least 2).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            marks: HashMap::new(),
            len: 0,
            capacity: capacity.max(2),
            evicted_floor_ms: i64::MIN,
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

    /// Keys evicted so far to stay within capacity.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn last(&self, origin: &NodeId, blockchain: &str, asset: &str) -> i64 {
        self.marks
            .get(origin)
            .and_then(|o| o.get(blockchain))
            .and_then(|c| c.get(asset))
            .copied()
            .unwrap_or(self.evicted_floor_ms)
    }

    /// Whether any price is not newer than its mark. The origin is looked up once and each
    /// run of prices on the same chain shares one chain lookup (a batch is usually one chain),
    /// which halves the hashing of a 50-price batch.
    fn any_replayed(&self, origin: &NodeId, prices: &[crate::PriceUpdate]) -> bool {
        let floor = self.evicted_floor_ms;
        let Some(chains) = self.marks.get(origin) else {
            return prices.iter().any(|p| p.timestamp_ms <= floor);
        };
        chain_runs(prices).any(|run| {
            let assets = chains.get(run[0].blockchain.as_str());
            run.iter().any(|p| {
                let last = assets.and_then(|a| a.get(p.asset.as_str())).copied();
                p.timestamp_ms <= last.unwrap_or(floor)
            })
        })
    }

    /// Sets the marks of every price (after [`HighWaterMarks::any_replayed`] said none is old).
    fn set_all(&mut self, origin: NodeId, prices: &[crate::PriceUpdate]) {
        let chains = self.marks.entry(origin).or_default();
        let mut added = 0;
        for run in chain_runs(prices) {
            let chain = run[0].blockchain.as_str();
            let assets = match chains.get_mut(chain) {
                Some(assets) => assets,
                None => chains.entry(chain.to_owned()).or_default(),
            };
            added += run.iter().filter(|p| mark(assets, &p.asset, p.timestamp_ms)).count();
        }
        self.len += added;
    }

    fn set(&mut self, origin: NodeId, blockchain: &str, asset: &str, ts: i64) {
        let chains = self.marks.entry(origin).or_default();
        let assets = match chains.get_mut(blockchain) {
            Some(assets) => assets,
            None => chains.entry(blockchain.to_owned()).or_default(),
        };
        if mark(assets, asset, ts) {
            self.len += 1;
        }
    }

    /// Stage 3: rejects a replay, otherwise records the message's timestamps.
    pub fn admit(&mut self, message: &VerifiedMessage) -> Result<(), Rejection> {
        let origin = message.body.origin;
        let replay = Rejection::from(RejectReason::Replay, origin);
        match &message.body.payload {
            Payload::PriceBatch { prices, .. } => {
                if self.any_replayed(&origin, prices) {
                    return Err(replay);
                }
                self.set_all(origin, prices);
            }
            Payload::ProviderAnnounce { .. } => {
                if message.body.created_at_ms <= self.last(&origin, "", "") {
                    return Err(replay);
                }
                self.set(origin, "", "", message.body.created_at_ms);
            }
        }
        if self.len > self.capacity {
            self.evict_older_half();
        }
        Ok(())
    }

    fn evict_older_half(&mut self) {
        let mut stamps: Vec<i64> = self
            .marks
            .values()
            .flat_map(|o| o.values())
            .flat_map(|c| c.values().copied())
            .collect();
        let middle = stamps.len() / 2;
        let (_, cutoff, _) = stamps.select_nth_unstable(middle);
        let cutoff = *cutoff;
        let mut kept = 0;
        for chains in self.marks.values_mut() {
            for assets in chains.values_mut() {
                assets.retain(|_, ts| *ts > cutoff);
                kept += assets.len();
            }
            chains.retain(|_, assets| !assets.is_empty());
        }
        self.marks.retain(|_, chains| !chains.is_empty());
        self.evicted += (self.len - kept) as u64;
        self.len = kept;
        self.evicted_floor_ms = self.evicted_floor_ms.max(cutoff);
    }
}
