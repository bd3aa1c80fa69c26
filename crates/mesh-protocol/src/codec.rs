//! The one module that knows the byte encoding (bincode 2, standard configuration).
//!
//! bincode is flagged unmaintained (RUSTSEC-2025-0141), so nothing outside this module names
//! it; swapping the encoding means changing this file only. Untrusted bytes are always decoded
//! with a byte limit ([`MAX_FRAME_LEN`]) so that a forged length prefix cannot make the decoder
//! allocate more than a frame, and trailing bytes after a value are an error.

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::message::{Body, Envelope};

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
pub fn encode_body(body: &Body) -> Result<Vec<u8>, CodecError> {
    encode(body)
}

/// Decodes body bytes taken from an envelope.
pub fn decode_body(bytes: &[u8]) -> Result<Body, CodecError> {
    decode(bytes)
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
}
