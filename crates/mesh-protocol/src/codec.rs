//! The one module that knows the byte encoding (bincode 2, standard configuration).
//!
//! bincode is flagged unmaintained (RUSTSEC-2025-0141), so nothing outside this module names
//! it; swapping the encoding means changing this file only. Untrusted bytes are always decoded
//! with a byte limit ([`MAX_FRAME_LEN`]) so that a forged length prefix cannot make the decoder
//! allocate more than a frame, and trailing bytes after a value are an error.

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use serde::Deserialize;

use crate::decimal::Decimal;
use crate::identity::{NodeId, PUBLIC_KEY_LEN};
use crate::message::{Body, Envelope, Payload, PriceUpdate};

/// Largest frame (one encoded [`Envelope`]) a node sends or accepts: 64 KiB.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

type LimitedConfig = Configuration<LittleEndian, Varint, Limit<MAX_FRAME_LEN>>;

const fn wire_config() -> LimitedConfig {
    config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Why bytes could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The input (or the encoded output) is longer than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLarge(usize),
    /// The bytes are not a valid encoding.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A valid value was followed by more bytes.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A value could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, wire_config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge(bytes.len()));
    }
    Ok(bytes)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge(bytes.len()));
    }
    let (value, read) = bincode::serde::decode_from_slice(bytes, wire_config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if read != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - read));
    }
    Ok(value)
}

/// Encodes an envelope into one frame's bytes.
pub fn encode_envelope(envelope: &Envelope) -> Result<Vec<u8>, CodecError> {
    encode(envelope)
}

/// Decodes one frame's bytes into an envelope (the body stays opaque bytes).
pub fn decode_envelope(frame: &[u8]) -> Result<Envelope, CodecError> {
    decode(frame)
}

/// Encodes a body: these are the bytes that get signed and hashed into the message id.
///
/// A price batch whose prices carry no source time is encoded exactly as protocol version 1
/// wrote it (kind 0, prices without the field), so nodes of version 1 read it; one with source
/// times is kind 2 with the field (protocol version 2, see [`Body::wire_version`]).
pub fn encode_body(body: &Body) -> Result<Vec<u8>, CodecError> {
    encode(&WireBody::of(body))
}

/// Decodes body bytes taken from an envelope (either version: the kind tells which).
pub fn decode_body(bytes: &[u8]) -> Result<Body, CodecError> {
    decode::<WireBody>(bytes).map(WireBody::into_body)
}

/// The body as it is laid out on the wire. The variant order is the wire's kind number and
/// must never change: 0 and 1 are protocol version 1's, 2 was added by version 2.
#[derive(Serialize, Deserialize)]
struct WireBody {
    origin: NodeId,
    origin_key: [u8; PUBLIC_KEY_LEN],
    created_at_ms: i64,
    payload: WirePayload,
}

#[derive(Serialize, Deserialize)]
enum WirePayload {
    /// Kind 0: a price batch as version 1 wrote it.
    PriceBatch { round: u64, prices: Vec<PriceV1> },
    /// Kind 1.
    ProviderAnnounce { fetch_interval_secs: u32, assets: u32, round: u64 },
    /// Kind 2 (version 2): a price batch whose prices carry source times.
    TimedPriceBatch { round: u64, prices: Vec<PriceV2> },
}

/// A price as version 1 wrote it.
#[derive(Serialize, Deserialize)]
struct PriceV1 {
    asset: String,
    blockchain: String,
    price: Decimal,
    timestamp_ms: i64,
    change_24h: Option<Decimal>,
}

/// A price of version 2: version 1's fields, then the source time.
#[derive(Serialize, Deserialize)]
struct PriceV2 {
    asset: String,
    blockchain: String,
    price: Decimal,
    timestamp_ms: i64,
    change_24h: Option<Decimal>,
    source_timestamp_ms: Option<i64>,
}

impl WireBody {
    fn of(body: &Body) -> Self {
        let payload = match &body.payload {
            Payload::PriceBatch { round, prices } if body.wire_version() > 1 => {
                WirePayload::TimedPriceBatch {
                    round: *round,
                    prices: prices
                        .iter()
                        .map(|p| PriceV2 {
                            asset: p.asset.clone(),
                            blockchain: p.blockchain.clone(),
                            price: p.price.clone(),
                            timestamp_ms: p.timestamp_ms,
                            change_24h: p.change_24h.clone(),
                            source_timestamp_ms: p.source_timestamp_ms,
                        })
                        .collect(),
                }
            }
            Payload::PriceBatch { round, prices } => WirePayload::PriceBatch {
                round: *round,
                prices: prices
                    .iter()
                    .map(|p| PriceV1 {
                        asset: p.asset.clone(),
                        blockchain: p.blockchain.clone(),
                        price: p.price.clone(),
                        timestamp_ms: p.timestamp_ms,
                        change_24h: p.change_24h.clone(),
                    })
                    .collect(),
            },
            Payload::ProviderAnnounce { fetch_interval_secs, assets, round } => {
                WirePayload::ProviderAnnounce {
                    fetch_interval_secs: *fetch_interval_secs,
                    assets: *assets,
                    round: *round,
                }
            }
        };
        Self {
            origin: body.origin,
            origin_key: body.origin_key,
            created_at_ms: body.created_at_ms,
            payload,
        }
    }

    fn into_body(self) -> Body {
        let payload = match self.payload {
            WirePayload::PriceBatch { round, prices } => Payload::PriceBatch {
                round,
                prices: prices
                    .into_iter()
                    .map(|p| PriceUpdate {
                        asset: p.asset,
                        blockchain: p.blockchain,
                        price: p.price,
                        timestamp_ms: p.timestamp_ms,
                        change_24h: p.change_24h,
                        source_timestamp_ms: None,
                    })
                    .collect(),
            },
            WirePayload::TimedPriceBatch { round, prices } => Payload::PriceBatch {
                round,
                prices: prices
                    .into_iter()
                    .map(|p| PriceUpdate {
                        asset: p.asset,
                        blockchain: p.blockchain,
                        price: p.price,
                        timestamp_ms: p.timestamp_ms,
                        change_24h: p.change_24h,
                        source_timestamp_ms: p.source_timestamp_ms,
                    })
                    .collect(),
            },
            WirePayload::ProviderAnnounce { fetch_interval_secs, assets, round } => {
                Payload::ProviderAnnounce { fetch_interval_secs, assets, round }
            }
        };
        Body {
            origin: self.origin,
            origin_key: self.origin_key,
            created_at_ms: self.created_at_ms,
            payload,
        }
    }
}

/// Offset of `ttl` and `hop_count` in an encoded envelope: `version`, `ttl` and `hop_count`
/// are single bytes at the start (bincode writes `u8` as one byte in every configuration).
const TTL_OFFSET: usize = 1;
const HOP_OFFSET: usize = 2;

/// Rewrites an encoded envelope in place into its forwarded copy (`ttl - 1`, `hop_count + 1`)
/// without decoding or re-encoding the body. Returns `false` (and leaves the frame alone) when
/// the frame is too short to be an envelope.
pub fn forward_in_place(frame: &mut [u8]) -> bool {
    if frame.len() <= HOP_OFFSET {
        return false;
    }
    frame[TTL_OFFSET] = frame[TTL_OFFSET].saturating_sub(1);
    frame[HOP_OFFSET] = frame[HOP_OFFSET].saturating_add(1);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;
    use crate::message::{Payload, PriceUpdate};

    fn sample() -> Envelope {
        let id = Identity::from_seed([3; 32]);
        let body = Body::new(
            &id,
            1_700_000_000_000,
            Payload::PriceBatch {
                round: 9,
                prices: vec![PriceUpdate {
                    asset: "So11111111111111111111111111111111111111112".into(),
                    blockchain: "solana".into(),
                    price: "151.25".parse().unwrap(),
                    timestamp_ms: 1_700_000_000_000,
                    change_24h: Some("-1.5".parse().unwrap()),
                    source_timestamp_ms: None,
                }],
            },
        );
        Envelope::seal(&id, &body, 10).unwrap()
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut frame = encode_envelope(&sample()).unwrap();
        frame.push(0);
        assert_eq!(decode_envelope(&frame), Err(CodecError::TrailingBytes(1)));
    }

    #[test]
    fn oversized_input_is_rejected_before_decoding() {
        let frame = vec![0u8; MAX_FRAME_LEN + 1];
        assert_eq!(decode_envelope(&frame), Err(CodecError::FrameTooLarge(MAX_FRAME_LEN + 1)));
    }

    #[test]
    fn oversized_value_is_not_encoded() {
        let mut env = sample();
        env.body = vec![0; MAX_FRAME_LEN];
        assert!(matches!(encode_envelope(&env), Err(CodecError::FrameTooLarge(_))));
    }

    #[test]
    fn in_place_forwarding_matches_decoded_forwarding() {
        let env = sample();
        let mut frame = encode_envelope(&env).unwrap();
        assert!(forward_in_place(&mut frame));
        assert_eq!(decode_envelope(&frame).unwrap(), env.forwarded());
        assert!(!forward_in_place(&mut [1, 2]));
    }

    /// The types exactly as protocol version 1 declared them: what a node of version 1
    /// decodes with.
    mod v1 {
        use serde::{Deserialize, Serialize};

        use crate::{Decimal, NodeId};

        #[derive(Debug, Serialize, Deserialize)]
        pub struct Body {
            pub origin: NodeId,
            pub origin_key: [u8; 32],
            pub created_at_ms: i64,
            pub payload: Payload,
        }

        #[derive(Debug, Serialize, Deserialize)]
        pub enum Payload {
            PriceBatch { round: u64, prices: Vec<PriceUpdate> },
            ProviderAnnounce { fetch_interval_secs: u32, assets: u32, round: u64 },
        }

        #[derive(Debug, Serialize, Deserialize)]
        pub struct PriceUpdate {
            pub asset: String,
            pub blockchain: String,
            pub price: Decimal,
            pub timestamp_ms: i64,
            pub change_24h: Option<Decimal>,
        }
    }

    fn body_with(source: Option<i64>) -> Body {
        let mut body = decode_body(&sample().body).unwrap();
        if let Payload::PriceBatch { prices, .. } = &mut body.payload {
            prices[0].source_timestamp_ms = source;
        }
        body
    }

    /// A batch without source times is byte for byte what version 1 wrote, under version 1:
    /// old nodes read it, and its message id and signature are the same as before.
    #[test]
    fn a_batch_without_source_times_is_version_1_on_the_wire() {
        let body = body_with(None);
        let id = Identity::from_seed([3; 32]);
        let old = v1::Body {
            origin: body.origin,
            origin_key: body.origin_key,
            created_at_ms: body.created_at_ms,
            payload: v1::Payload::PriceBatch {
                round: 9,
                prices: vec![v1::PriceUpdate {
                    asset: "So11111111111111111111111111111111111111112".into(),
                    blockchain: "solana".into(),
                    price: "151.25".parse().unwrap(),
                    timestamp_ms: 1_700_000_000_000,
                    change_24h: Some("-1.5".parse().unwrap()),
                }],
            },
        };
        assert_eq!(encode_body(&body).unwrap(), encode(&old).unwrap());
        assert_eq!(Envelope::seal(&id, &body, 10).unwrap().version, 1);
        let announce = Body::new(
            &id,
            1,
            Payload::ProviderAnnounce { fetch_interval_secs: 30, assets: 9, round: 4 },
        );
        assert_eq!(Envelope::seal(&id, &announce, 10).unwrap().version, 1);
        assert!(decode::<v1::Body>(&encode_body(&announce).unwrap()).is_ok());
    }

    /// A batch with source times is version 2, kind 2: it round-trips here, and a node of
    /// version 1 cannot read it (it stops at the version, and its decoder refuses kind 2).
    #[test]
    fn a_batch_with_source_times_is_version_2() {
        let body = body_with(Some(1_699_999_000_000));
        let id = Identity::from_seed([3; 32]);
        let envelope = Envelope::seal(&id, &body, 10).unwrap();
        assert_eq!(envelope.version, 2);
        assert_eq!(decode_body(&envelope.body).unwrap(), body);
        assert!(decode::<v1::Body>(&envelope.body).is_err());
        // Kind 2 with no source time at all reads as the same body as kind 0.
        let mut none = WireBody::of(&body);
        if let WirePayload::TimedPriceBatch { prices, .. } = &mut none.payload {
            prices[0].source_timestamp_ms = None;
        }
        let bytes = encode(&none).unwrap();
        assert_eq!(decode_body(&bytes).unwrap(), body_with(None));
        assert!(encode_body(&body_with(None)).unwrap().len() <= bytes.len());
    }
}
