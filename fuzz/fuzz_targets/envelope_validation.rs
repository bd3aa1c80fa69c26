//! The envelope validation path (`Validator::validate` with `HighWaterMarks`), two ways:
//!
//! - arbitrary frames, as a hostile peer sends them;
//! - structure-aware: sequences of messages built from the input and signed with real keys (so
//!   the rules behind the signature check are reached), some with a wrong origin, some then
//!   mutated byte by byte after signing, validated against one small set of marks (so that
//!   eviction happens).
//!
//! Beyond "no panic", it checks what validation promises: an accepted message keeps every rule
//! of ARCHITECTURE section 4; a frame whose body or signature bytes were changed after signing
//! is never accepted; and a message accepted once is never accepted again (replays stay out
//! across eviction of the marks).
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_protocol::validate::{
    Config, MAX_ASSET_LEN, MAX_BLOCKCHAIN_LEN, MAX_CHANGE_24H_LEN, MIN_TIMESTAMP_MS,
};
use mesh_protocol::{
    Body, Decimal, Envelope, HighWaterMarks, Identity, MAX_PRICES_PER_BATCH, MAX_TTL, MessageId,
    MIN_PROTOCOL_VERSION, NodeId, PROTOCOL_VERSION, Payload, PriceUpdate, RejectReason, Validator, decode_envelope,
    encode_body, encode_envelope,
};

/// Clock skew the validators allow (the default, 5 s).
const SKEW_MS: i64 = 5_000;
/// Most messages one input builds (each is signed: keep an execution cheap).
const MAX_MESSAGES: usize = 6;
/// Most prices one generated batch carries (more than a few adds nothing but time).
const MAX_GENERATED_PRICES: usize = 12;

struct Keys {
    identities: Vec<Identity>,
    open: Validator,
    /// Trusts only the first identity.
    restricted: Validator,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let identities: Vec<Identity> = (1..=3u8).map(|i| Identity::from_seed([i; 32])).collect();
        let trusted: HashSet<NodeId> = [identities[0].node_id()].into_iter().collect();
        Keys {
            open: Validator::default(),
            restricted: Validator::new(Config {
                trusted_providers: Some(trusted),
                ..Config::default()
            }),
            identities,
        }
    })
}

#[derive(Debug, Arbitrary)]
enum Input {
    /// Bytes as received, with the receiver's clock.
    Raw { frame: Vec<u8>, now_ms: i64, restricted: bool },
    /// Messages built and signed from the input.
    Signed { messages: Vec<Message>, now_ms: i64, capacity: u8, restricted: bool },
}

#[derive(Debug, Arbitrary)]
struct Message {
    signer: u8,
    /// Claims the node id of this key instead of the signer's.
    claimed_key: Option<[u8; 32]>,
    /// `created_at` relative to the receiver's clock.
    created_offset_ms: i16,
    payload: GenPayload,
    version: u8,
    ttl: u8,
    hop_count: u8,
    /// Bytes XORed into the signed frame: (position, value).
    mutations: Vec<(u16, u8)>,
}

#[derive(Debug, Arbitrary)]
enum GenPayload {
    Batch { round: u64, prices: Vec<GenPrice> },
    Announce { fetch_interval_secs: u32, assets: u32, round: u64 },
}

#[derive(Debug, Arbitrary)]
struct GenPrice {
    asset: Name,
    blockchain: Name,
    price: GenDecimal,
    /// Timestamp relative to the receiver's clock.
    offset_ms: i16,
    change_24h: Option<GenDecimal>,
}

/// Mostly plausible names, sometimes anything.
#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8),
    Any(String),
}

impl Name {
    fn text(&self) -> String {
        match self {
            Name::Known(i) => {
                ["SOL", "BONK", "solana", "ethereum", "USDC", "x"][usize::from(*i % 6)].to_owned()
            }
            Name::Any(s) => s.clone(),
        }
    }
}

/// A decimal in plain notation: sign, integer and fraction digits.
#[derive(Debug, Arbitrary)]
struct GenDecimal {
    negative: bool,
    int: u64,
    frac: Option<u32>,
}

impl GenDecimal {
    fn value(&self) -> Decimal {
        let sign = if self.negative { "-" } else { "" };
        let text = match self.frac {
            Some(frac) => format!("{sign}{}.{frac}", self.int),
            None => format!("{sign}{}", self.int),
        };
        text.parse().expect("generated plain decimal text parses")
    }
}

fuzz_target!(|input: Input| {
    let keys = keys();
    match input {
        Input::Raw { frame, now_ms, restricted } => {
            let validator = if restricted { &keys.restricted } else { &keys.open };
            let mut marks = HighWaterMarks::with_capacity(4);
            if let Ok(message) = validator.validate(&frame, now_ms, &mut marks) {
                check_accepted(&message.envelope, &message.body, message.id, now_ms, restricted);
                assert_replay(validator.validate(&frame, now_ms, &mut marks), &message.body);
            }
        }
        Input::Signed { messages, now_ms, capacity, restricted } => {
            // Keep the generated timestamps away from the ends of the i64 range.
            let now_ms = now_ms.clamp(-(1 << 60), 1 << 60);
            let validator = if restricted { &keys.restricted } else { &keys.open };
            let mut marks = HighWaterMarks::with_capacity(usize::from(capacity % 8));
            let mut accepted: Vec<(Vec<u8>, Body)> = Vec::new();
            for message in messages.iter().take(MAX_MESSAGES) {
                let (signed, frame) = build(keys, message, now_ms);
                match validator.validate(&frame, now_ms, &mut marks) {
                    Ok(verified) => {
                        check_accepted(
                            &verified.envelope,
                            &verified.body,
                            verified.id,
                            now_ms,
                            restricted,
                        );
                        // Only the hop fields sit outside the signature.
                        assert_eq!(verified.envelope.body, signed.body, "body bytes changed");
                        assert_eq!(verified.envelope.signature, signed.signature, "forged");
                        accepted.push((frame, verified.body));
                    }
                    Err(rejection) => {
                        if frame == encode_envelope(&signed).expect("signed frame encodes")
                            && rejection.reason == RejectReason::BadSignature
                        {
                            panic!("an unmodified signed frame failed its signature check");
                        }
                    }
                }
            }
            // Nothing accepted once is accepted again, whatever was evicted meanwhile.
            for (frame, body) in &accepted {
                assert_replay(validator.validate(frame, now_ms, &mut marks), body);
            }
        }
    }
});

/// Signs the message as built, then applies its mutations to the encoded frame.
fn build(keys: &Keys, message: &Message, now_ms: i64) -> (Envelope, Vec<u8>) {
    let signer = &keys.identities[usize::from(message.signer) % keys.identities.len()];
    let at = |offset: i16| now_ms + i64::from(offset);
    let payload = match &message.payload {
        GenPayload::Batch { round, prices } => Payload::PriceBatch {
            round: *round,
            prices: prices
                .iter()
                .take(MAX_GENERATED_PRICES)
                .map(|p| PriceUpdate {
                    asset: p.asset.text(),
                    blockchain: p.blockchain.text(),
                    price: p.price.value(),
                    timestamp_ms: at(p.offset_ms),
                    change_24h: p.change_24h.as_ref().map(GenDecimal::value), source_timestamp_ms: None,
                })
                .collect(),
        },
        GenPayload::Announce { fetch_interval_secs, assets, round } => Payload::ProviderAnnounce {
            fetch_interval_secs: *fetch_interval_secs,
            assets: *assets,
            round: *round,
        },
    };
    let mut body = Body::new(signer, at(message.created_offset_ms), payload);
    if let Some(key) = &message.claimed_key {
        body.origin = NodeId::from_public_key(key);
    }
    let bytes = encode_body(&body).expect("a generated body fits a frame");
    let envelope = Envelope {
        // Mostly the real version and sane hop fields, so that the later rules are reached.
        version: if message.version < 200 { PROTOCOL_VERSION } else { message.version },
        ttl: if message.ttl < 200 { message.ttl % (MAX_TTL + 1) } else { message.ttl },
        hop_count: if message.hop_count < 200 { message.hop_count % 3 } else { message.hop_count },
        signature: signer.sign_body(&bytes),
        body: bytes,
    };
    let mut frame = encode_envelope(&envelope).expect("a generated envelope fits a frame");
    for &(at, value) in message.mutations.iter().take(8) {
        let at = usize::from(at) % frame.len();
        frame[at] ^= value;
    }
    (envelope, frame)
}

/// Every rule of ARCHITECTURE section 4 holds for an accepted message.
fn check_accepted(envelope: &Envelope, body: &Body, id: MessageId, now_ms: i64, restricted: bool) {
    assert!((MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&envelope.version));
    assert!((1..=MAX_TTL).contains(&envelope.ttl));
    assert!(u16::from(envelope.ttl) + u16::from(envelope.hop_count) <= u16::from(MAX_TTL) + 1);
    assert_eq!(id, MessageId::of_body(&envelope.body));
    assert_eq!(
        decode_envelope(&encode_envelope(envelope).expect("encodes")).as_ref(),
        Ok(envelope)
    );
    assert_eq!(body.origin, NodeId::from_public_key(&body.origin_key), "origin/key mismatch");
    if restricted {
        assert_eq!(body.origin, keys().identities[0].node_id(), "untrusted origin accepted");
    }
    let latest = now_ms.saturating_add(SKEW_MS);
    let earliest = now_ms.saturating_sub(mesh_protocol::MAX_MESSAGE_AGE_MS);
    assert!(body.created_at_ms <= latest, "future created_at accepted");
    assert!(body.created_at_ms >= earliest, "created_at older than the maximum age accepted");
    if let Payload::PriceBatch { prices, .. } = &body.payload {
        assert!(prices.len() <= MAX_PRICES_PER_BATCH);
        assert!(!prices.is_empty(), "empty price batch accepted");
        let mut names = HashSet::new();
        for p in prices {
            assert!(p.price.is_positive(), "non-positive price {} accepted", p.price);
            assert!(p.timestamp_ms <= latest, "future price timestamp accepted");
            assert!(p.timestamp_ms >= earliest, "price older than the maximum age accepted");
            assert!(p.timestamp_ms >= MIN_TIMESTAMP_MS, "pre-1970 price timestamp accepted");
            assert!(
                p.change_24h.as_ref().is_none_or(|c| c.as_str().len() <= MAX_CHANGE_24H_LEN),
                "change_24h longer than the stores' column accepted"
            );
            for (text, max) in [(&p.asset, MAX_ASSET_LEN), (&p.blockchain, MAX_BLOCKCHAIN_LEN)] {
                assert!(!text.is_empty() && text.len() <= max, "bad name {text:?} accepted");
                assert!(text.bytes().all(|b| b.is_ascii_graphic()), "bad name {text:?} accepted");
            }
            assert!(names.insert((&p.blockchain, &p.asset)), "duplicate asset accepted");
        }
    }
}

/// A message already accepted is refused as a replay (empty price batches, which name no
/// asset to hold a mark for, are refused by validation itself).
fn assert_replay(
    again: Result<mesh_protocol::VerifiedMessage, mesh_protocol::Rejection>,
    body: &Body,
) {
    match again {
        Err(rejection) => assert_eq!(rejection.reason, RejectReason::Replay),
        Ok(_) => panic!("a message was accepted twice: {body:?}"),
    }
}
