//! Wire protocol of the mesh price network: node identity, message types, the codec,
//! signing and the validation rules (ARCHITECTURE sections 3 and 4).
//!
//! This crate does no networking and keeps no clock: callers pass `now` in. Other programs can
//! use it alone, for example to decode and check messages captured from the mesh.
//!
//! ```
//! use mesh_protocol::{Body, Envelope, HighWaterMarks, Identity, Payload, PriceUpdate, Validator};
//!
//! let provider = Identity::generate();
//! let now_ms = 1_750_000_000_000;
//! let prices = vec![PriceUpdate {
//!     asset: "So11111111111111111111111111111111111111112".into(),
//!     blockchain: "solana".into(),
//!     price: "151.25".parse()?,
//!     timestamp_ms: now_ms,
//!     change_24h: None,
//! }];
//! let body = Body::new(&provider, now_ms, Payload::PriceBatch { round: 58_333_333, prices });
//! let frame = mesh_protocol::encode_envelope(&Envelope::seal(&provider, &body, 10)?)?;
//!
//! // A receiver checks every rule, replays included.
//! let mut marks = HighWaterMarks::default();
//! let message = Validator::default().validate(&frame, now_ms, &mut marks)?;
//! assert_eq!(message.body.origin, provider.node_id());
//! let replay = Validator::default().validate(&frame, now_ms, &mut marks).unwrap_err();
//! assert_eq!(replay.reason, mesh_protocol::RejectReason::Replay);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod addr_filter;
pub mod codec;
pub mod decimal;
pub mod identity;
pub mod message;
pub mod validate;

pub use addr_filter::AddrFilter;
pub use codec::{
    CodecError, MAX_FRAME_LEN, decode_body, decode_envelope, encode_body, encode_envelope,
};
pub use decimal::{Decimal, DecimalError};
pub use identity::{Identity, IdentityError, NodeId};
pub use libp2p_identity::PeerId;
pub use message::{
    Body, BodyDigest, Envelope, MAX_PRICES_PER_BATCH, MAX_TTL, MessageId, PROTOCOL_VERSION,
    Payload, PriceUpdate,
};
pub use validate::{
    Decoded, HighWaterMarks, Identified, MAX_MESSAGE_AGE_MS, RejectReason, Rejection, Validator,
    VerifiedMessage, decode_frame,
};
