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
//!     change_24h: None, source_timestamp_ms: None,
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

//!
//! # Versions
//!
//! The envelope's `version` byte (outside the signature) says how the body is laid out.
//!
//! - **Version 1**: price batches carry, per price, the asset, chain, price, the provider's
//!   fetch time (`timestamp_ms`) and the 24-hour change.
//! - **Version 2** adds the source's own update time ([`PriceUpdate::source_timestamp_ms`],
//!   Birdeye's `updateUnixTime`), so that a price the source stopped updating is not served
//!   as fresh because it was fetched recently. A batch whose prices carry it is encoded as a
//!   body kind of its own (kind 2, after version 1's price batch 0 and announce 1) and sealed
//!   under version 2. Every other message (announces, and batches without a source time) is
//!   encoded exactly as version 1 encoded it and sealed under version 1: same bytes, same
//!   message id, same signature.
//!
//! This crate reads both versions ([`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`]); the body
//! decoder tells the layouts apart by the body kind, not by the envelope byte. A node of
//! version 1 reads every version 1 message of a newer node, and drops a version 2 message at
//! its first validation stage as `unsupported_version` (counted in
//! `mesh_validation_failures_total{reason="unsupported_version"}`, and charged to the link
//! that brought it). So, in a mixed mesh: consumers and relays of version 2 read everything;
//! the prices of a version 2 provider whose source gives update times reach only version 2
//! nodes, and a version 1 node may disconnect a version 2 neighbour that relays many of them.
//! Upgrade relays and consumers first, providers last. From version 2 on, an
//! `unsupported_version` rejection is counted but never charged
//! ([`RejectReason::is_senders_fault`]), so a later version costs a mixed mesh no links.

pub mod addr_filter;
pub mod asset;
pub mod codec;
pub mod decimal;
pub mod identity;
pub mod message;
pub mod validate;

pub use addr_filter::AddrFilter;
pub use asset::{canonical_asset, is_evm_address, same_asset};
pub use codec::{
    CodecError, MAX_FRAME_LEN, decode_body, decode_envelope, encode_body, encode_envelope,
};
pub use decimal::{Decimal, DecimalError};
pub use identity::{Identity, IdentityError, NodeId};
pub use libp2p_identity::PeerId;
pub use message::{
    Body, BodyDigest, Envelope, MAX_PRICES_PER_BATCH, MAX_TTL, MIN_PROTOCOL_VERSION, MessageId,
    PROTOCOL_VERSION, Payload, PriceUpdate,
};
pub use validate::{
    Decoded, HighWaterMarks, Identified, MAX_MESSAGE_AGE_MS, RejectReason, Rejection, Validator,
    VerifiedMessage, decode_frame,
};
