//! The wire types of `/mesh/relay/1.0.0` (ARCHITECTURE section 4).
//!
//! An [`Envelope`] carries the encoded [`Body`] as opaque bytes plus the signature over exactly
//! those bytes. Relays change only `ttl` and `hop_count`, which sit outside the signature, and
//! forward the body bytes unchanged, so nothing is ever re-encoded on the way.
//!
//! One SHA-256 of the body bytes ([`BodyDigest`]) serves both the message id (its first 16
//! bytes) and the signature, which signs a short domain-separated text holding the whole
//! digest ([`BodyDigest::signing_input`]) rather than the body itself. A receiver thus hashes
//! a 4 KB batch once, with SHA-256 (hardware-accelerated on current x86 and ARM cores), instead
//! of once for the id and again with SHA-512 inside ed25519. The signature still binds every
//! body byte, through the collision resistance of SHA-256, on which the message id already
//! relies. Nostr signs its event ids the same way.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::decimal::Decimal;
use crate::identity::{Identity, NodeId, PUBLIC_KEY_LEN, SIGNATURE_LEN, uuid_from_digest};

/// The newest protocol version this crate speaks: 2, whose price batches may carry the
/// source's own update time ([`PriceUpdate::source_timestamp_ms`]). See the crate docs
/// ("Versions") for how nodes of versions 1 and 2 interoperate.
pub const PROTOCOL_VERSION: u8 = 2;
/// The oldest protocol version this crate still reads and writes: 1, the version of every
/// message that carries no source time.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// Highest TTL a receiver accepts.
pub const MAX_TTL: u8 = 20;
/// Highest `ttl + hop_count` a receiver accepts: an originator sends `hop_count = 1` with at
/// most [`MAX_TTL`], and every hop moves one unit from `ttl` to `hop_count`.
pub const MAX_TTL_PLUS_HOPS: u16 = MAX_TTL as u16 + 1;
/// Most prices one batch may carry.
pub const MAX_PRICES_PER_BATCH: usize = 1000;

/// What travels in one frame: the signed body bytes plus the hop fields relays rewrite.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub version: u8,
    /// Hops this copy may still travel, the receiving one included.
    pub ttl: u8,
    /// Links this copy has crossed, the last one included (1 at the originator's neighbours).
    pub hop_count: u8,
    /// The encoded [`Body`], exactly as signed.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// ed25519 signature by `Body::origin_key` of the body's [`BodyDigest::signing_input`].
    #[serde(with = "serde_bytes")]
    pub signature: [u8; SIGNATURE_LEN],
}

impl Envelope {
    /// Encodes and signs `body` as a fresh message of `identity` with `ttl`.
    ///
    /// The caller builds `body` with `identity`'s node id and key; see [`Body::new`].
    pub fn seal(identity: &Identity, body: &Body, ttl: u8) -> Result<Self, crate::CodecError> {
        let bytes = crate::codec::encode_body(body)?;
        let signature = identity.sign_body(&bytes);
        Ok(Self { version: body.wire_version(), ttl, hop_count: 1, body: bytes, signature })
    }

    /// The id of this message: bound to the signed body bytes, not to the hop fields.
    pub fn message_id(&self) -> MessageId {
        MessageId::of_body(&self.body)
    }

    /// The digest of the body (one SHA-256 pass; keep it rather than hash twice).
    pub fn digest(&self) -> BodyDigest {
        BodyDigest::of(&self.body)
    }

    /// The copy a relay forwards: one hop less to live, one more travelled.
    pub fn forwarded(&self) -> Self {
        Self {
            ttl: self.ttl.saturating_sub(1),
            hop_count: self.hop_count.saturating_add(1),
            ..self.clone()
        }
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("version", &self.version)
            .field("ttl", &self.ttl)
            .field("hop_count", &self.hop_count)
            .field("body_len", &self.body.len())
            .field("message_id", &self.message_id())
            .finish()
    }
}

/// The signed content of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// Node id of the originator; must equal `NodeId::from_public_key(origin_key)`.
    pub origin: NodeId,
    /// The originator's ed25519 public key.
    pub origin_key: [u8; PUBLIC_KEY_LEN],
    /// When the originator created the message (Unix milliseconds).
    pub created_at_ms: i64,
    /// What the message says.
    pub payload: Payload,
}

impl Body {
    /// A body originated by `identity` at `created_at_ms`.
    pub fn new(identity: &Identity, created_at_ms: i64, payload: Payload) -> Self {
        Self {
            origin: identity.node_id(),
            origin_key: identity.public_key(),
            created_at_ms,
            payload,
        }
    }
}

impl Body {
    /// The lowest protocol version that can carry this body: 2 when a price carries a source
    /// time, else 1 (so that nodes of version 1 still read it).
    pub fn wire_version(&self) -> u8 {
        match &self.payload {
            Payload::PriceBatch { prices, .. }
                if prices.iter().any(|p| p.source_timestamp_ms.is_some()) =>
            {
                PROTOCOL_VERSION
            }
            _ => MIN_PROTOCOL_VERSION,
        }
    }
}

/// The message kinds.
///
/// The wire encoding is [`crate::codec`]'s, not this type's serde derive: a price batch whose
/// prices carry source times goes on the wire as a kind of its own (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Prices fetched by a provider in one round.
    PriceBatch {
        /// The fetch round: `floor(unix_secs / fetch_interval_secs)`.
        round: u64,
        /// The prices, at most [`MAX_PRICES_PER_BATCH`], each asset once.
        prices: Vec<PriceUpdate>,
    },
    /// A provider telling the mesh it exists (coordination without Redis).
    ProviderAnnounce {
        /// Its fetch interval.
        fetch_interval_secs: u32,
        /// How many assets it fetches.
        assets: u32,
        /// The round it is in.
        round: u64,
    },
}

impl Payload {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::PriceBatch { .. } => "price_batch",
            Payload::ProviderAnnounce { .. } => "provider_announce",
        }
    }
}

/// One asset's price as observed by a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceUpdate {
    /// The asset (its token address on `blockchain`), 1..=255 printable ASCII characters.
    pub asset: String,
    /// The chain (`solana`, `ethereum`, ...), 1..=50 printable ASCII characters.
    pub blockchain: String,
    /// The price in USD, exact; must be greater than zero.
    pub price: Decimal,
    /// When the provider observed the price (Unix milliseconds).
    pub timestamp_ms: i64,
    /// Change over 24 hours in percent, when the source gave one.
    pub change_24h: Option<Decimal>,
    /// When the source last updated the price (Unix milliseconds; Birdeye's `updateUnixTime`),
    /// when it said. Never later than `timestamp_ms` plus the allowed clock skew. Age and
    /// staleness count from it: a token the source stopped updating is old however recently
    /// it was fetched. Carried by protocol version 2 only.
    #[serde(default)]
    pub source_timestamp_ms: Option<i64>,
}

impl PriceUpdate {
    /// When the price was true: the source's update time when it gave one (never later than
    /// the fetch), else the fetch. Ages and staleness count from here.
    pub fn observed_ms(&self) -> i64 {
        self.source_timestamp_ms.map_or(self.timestamp_ms, |s| s.min(self.timestamp_ms))
    }
}

/// SHA-256 of a message's encoded body: what its id is taken from and what its signature
/// covers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BodyDigest([u8; 32]);

impl BodyDigest {
    /// The text before the digest in [`BodyDigest::signing_input`]: it names the protocol and
    /// what is signed, so that a signature made here means nothing in any other context.
    pub const SIGNING_CONTEXT: &'static [u8; 16] = b"mesh/relay/1 msg";
    /// Length of [`BodyDigest::signing_input`].
    pub const SIGNING_INPUT_LEN: usize = 16 + 32;

    /// The digest of `body` (encoded body bytes).
    pub fn of(body: &[u8]) -> Self {
        Self(Sha256::digest(body).into())
    }

    /// The id of the message with this body digest.
    pub fn message_id(&self) -> MessageId {
        MessageId(uuid_from_digest(&self.0))
    }

    /// The bytes the originator signs: [`BodyDigest::SIGNING_CONTEXT`] then the 32-byte digest.
    pub fn signing_input(&self) -> [u8; Self::SIGNING_INPUT_LEN] {
        let mut input = [0u8; Self::SIGNING_INPUT_LEN];
        input[..16].copy_from_slice(Self::SIGNING_CONTEXT);
        input[16..].copy_from_slice(&self.0);
        input
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for BodyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BodyDigest(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// The id of a message: a version 8 UUID from the SHA-256 of its body bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// The id of the message whose encoded body is `body`.
    pub fn of_body(body: &[u8]) -> Self {
        BodyDigest::of(body).message_id()
    }

    /// Wraps a UUID read back from storage.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID, as stored in `mesh_seen_messages.message_id`.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}
