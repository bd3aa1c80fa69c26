//! One test per validation rule: each message breaks exactly one rule and must be rejected
//! with that rule's reason (so removing the rule makes its test fail), plus signing and
//! message-id properties.
#![allow(clippy::unwrap_used)] // test data builders

use std::collections::HashSet;

use mesh_protocol::validate::Config;
use mesh_protocol::{
    Body, BodyDigest, Envelope, HighWaterMarks, Identity, MAX_FRAME_LEN, MessageId, Payload,
    PriceUpdate, RejectReason, Validator, codec, decode_frame,
};

const NOW: i64 = 1_750_000_000_000;

fn provider() -> Identity {
    Identity::from_seed([11; 32])
}

fn price(asset: &str, price: &str, ts: i64) -> PriceUpdate {
    PriceUpdate {
        asset: asset.into(),
        blockchain: "solana".into(),
        price: price.parse().unwrap(),
        timestamp_ms: ts,
        change_24h: Some("2.5".parse().unwrap()),
        source_timestamp_ms: None,
    }
}

fn batch(prices: Vec<PriceUpdate>) -> Body {
    Body::new(&provider(), NOW, Payload::PriceBatch { round: 1, prices })
}

fn frame_of(env: &Envelope) -> Vec<u8> {
    codec::encode_envelope(env).unwrap()
}

fn sealed(body: &Body) -> Vec<u8> {
    frame_of(&Envelope::seal(&provider(), body, 10).unwrap())
}

fn reason(frame: &[u8]) -> Option<RejectReason> {
    reason_with(&Validator::default(), frame)
}

fn reason_with(validator: &Validator, frame: &[u8]) -> Option<RejectReason> {
    validator.validate(frame, NOW, &mut HighWaterMarks::default()).err().map(|r| r.reason)
}

#[test]
fn a_valid_batch_passes() {
    let body = batch(vec![price("SOL", "151.2", NOW), price("BONK", "0.000016", NOW)]);
    let msg =
        Validator::default().validate(&sealed(&body), NOW, &mut HighWaterMarks::default()).unwrap();
    assert_eq!(msg.body, body);
    assert_eq!(msg.envelope.hop_count, 1);
}

#[test]
fn frame_too_large() {
    assert_eq!(reason(&vec![0u8; MAX_FRAME_LEN + 1]), Some(RejectReason::FrameTooLarge));
}

#[test]
fn malformed_frame_and_malformed_body() {
    assert_eq!(reason(&[1, 2, 3]), Some(RejectReason::Malformed));
    let mut trailing = sealed(&batch(vec![price("SOL", "1", NOW)]));
    trailing.push(7);
    assert_eq!(reason(&trailing), Some(RejectReason::Malformed));
    // A well-formed envelope whose body bytes are garbage, correctly signed.
    let id = provider();
    let garbage = vec![0xff; 40];
    let env = Envelope {
        version: 1,
        ttl: 5,
        hop_count: 1,
        signature: id.sign_body(&garbage),
        body: garbage,
    };
    assert_eq!(reason(&frame_of(&env)), Some(RejectReason::Malformed));
}

#[test]
fn unsupported_version() {
    let mut env = Envelope::seal(&provider(), &batch(vec![price("SOL", "1", NOW)]), 5).unwrap();
    for version in [0, 3, 255] {
        env.version = version;
        assert_eq!(reason(&frame_of(&env)), Some(RejectReason::UnsupportedVersion), "{version}");
    }
    // Versions 1 and 2 are read; a batch with a source time is sealed as version 2.
    env.version = 2;
    assert_eq!(reason(&frame_of(&env)), None);
    let mut timed = price("SOL", "1", NOW);
    timed.source_timestamp_ms = Some(NOW - 7_200_000);
    let env = Envelope::seal(&provider(), &batch(vec![timed.clone()]), 5).unwrap();
    assert_eq!(env.version, 2);
    let msg = Validator::default().validate(&frame_of(&env), NOW, &mut HighWaterMarks::default());
    assert_eq!(msg.unwrap().body.payload, Payload::PriceBatch { round: 1, prices: vec![timed] });
}

#[test]
fn ttl_bounds() {
    let good = Envelope::seal(&provider(), &batch(vec![price("SOL", "1", NOW)]), 5).unwrap();
    for (ttl, hops, ok) in [
        (0, 1, false),
        (20, 1, true),
        (21, 0, false),
        (255, 1, false),
        (15, 6, true),
        (15, 7, false),
    ] {
        let env = Envelope { ttl, hop_count: hops, ..good.clone() };
        let got = reason(&frame_of(&env));
        if ok {
            assert_eq!(got, None, "ttl {ttl} hops {hops}");
        } else {
            assert_eq!(got, Some(RejectReason::TtlOutOfBounds), "ttl {ttl} hops {hops}");
        }
    }
}

#[test]
fn signature_from_another_key_fails() {
    let body = batch(vec![price("SOL", "1", NOW)]);
    let mut env = Envelope::seal(&provider(), &body, 5).unwrap();
    env.signature = Identity::from_seed([99; 32]).sign_body(&env.body);
    assert_eq!(reason(&frame_of(&env)), Some(RejectReason::BadSignature));
}

#[test]
fn the_signature_covers_the_context_and_the_body_digest_only() {
    let id = provider();
    let body = batch(vec![price("SOL", "1", NOW)]);
    let env = Envelope::seal(&id, &body, 5).unwrap();
    let digest = BodyDigest::of(&env.body);
    // What is signed: the context, then the SHA-256 of the body bytes.
    let input = digest.signing_input();
    assert_eq!(&input[..16], b"mesh/relay/1 msg");
    assert_eq!(&input[16..], digest.as_bytes());
    assert_eq!(env.signature, id.sign(&input));
    assert_eq!(digest.message_id(), env.message_id());
    // A plain ed25519 signature of the body bytes (or of the bare digest) is not the
    // envelope signature.
    for other in [id.sign(&env.body), id.sign(digest.as_bytes())] {
        let forged = Envelope { signature: other, ..env.clone() };
        assert_eq!(reason(&frame_of(&forged)), Some(RejectReason::BadSignature));
    }
}

#[test]
fn one_changed_body_byte_fails_verification_and_changes_the_id() {
    let body = batch(vec![price("SOL", "151.25", NOW)]);
    let env = Envelope::seal(&provider(), &body, 5).unwrap();
    let original_id = env.message_id();
    // Flip a byte of the price text so the body still decodes.
    let mut tampered = env.clone();
    let pos = tampered.body.windows(6).position(|w| w == b"151.25").unwrap();
    tampered.body[pos] = b'9';
    assert!(codec::decode_body(&tampered.body).is_ok(), "tampered body still decodes");
    assert_ne!(tampered.message_id(), original_id);
    assert_eq!(reason(&frame_of(&tampered)), Some(RejectReason::BadSignature));
    // The id ignores the hop fields.
    assert_eq!(env.forwarded().message_id(), original_id);
    assert_eq!(original_id, MessageId::of_body(&env.body));
    assert_eq!(original_id.as_uuid().get_version_num(), 8);
}

#[test]
fn origin_key_mismatch() {
    // Signed correctly by the key it carries, but claiming another node's id.
    let signer = provider();
    let mut body = batch(vec![price("SOL", "1", NOW)]);
    body.origin = Identity::from_seed([5; 32]).node_id();
    let env = Envelope::seal(&signer, &body, 5).unwrap();
    let rejection = Validator::default()
        .validate(&frame_of(&env), NOW, &mut HighWaterMarks::default())
        .unwrap_err();
    assert_eq!(rejection.reason, RejectReason::OriginKeyMismatch);
    assert_eq!(rejection.source_node_id, Some(body.origin));
}

#[test]
fn untrusted_provider() {
    let frame = sealed(&batch(vec![price("SOL", "1", NOW)]));
    let trusted = HashSet::from([Identity::from_seed([1; 32]).node_id()]);
    let strict = Validator::new(Config { trusted_providers: Some(trusted), ..Config::default() });
    assert_eq!(reason_with(&strict, &frame), Some(RejectReason::UntrustedProvider));
    let listed = HashSet::from([provider().node_id()]);
    let open = Validator::new(Config { trusted_providers: Some(listed), ..Config::default() });
    assert_eq!(reason_with(&open, &frame), None);
}

#[test]
fn future_timestamps_beyond_the_skew() {
    let skew_ms = 5_000;
    // created_at in the future.
    let mut body = batch(vec![price("SOL", "1", NOW)]);
    body.created_at_ms = NOW + skew_ms + 1;
    assert_eq!(reason(&sealed(&body)), Some(RejectReason::FutureTimestamp));
    body.created_at_ms = NOW + skew_ms;
    assert_eq!(reason(&sealed(&body)), None, "exactly at the skew is allowed");
    // One price timestamp in the future.
    let body = batch(vec![price("SOL", "1", NOW), price("JUP", "0.4", NOW + 60_000)]);
    assert_eq!(reason(&sealed(&body)), Some(RejectReason::FutureTimestamp));
    // The skew is configurable.
    let lenient = Validator::new(Config { max_clock_skew_secs: 120, ..Config::default() });
    assert_eq!(reason_with(&lenient, &sealed(&body)), None);
    // A source time in the future, too.
    let mut ahead = price("SOL", "1", NOW);
    ahead.source_timestamp_ms = Some(NOW + skew_ms + 1);
    assert_eq!(reason(&sealed(&batch(vec![ahead.clone()]))), Some(RejectReason::FutureTimestamp));
    ahead.source_timestamp_ms = Some(NOW + skew_ms);
    assert_eq!(reason(&sealed(&batch(vec![ahead]))), None);
}

#[test]
fn non_positive_prices() {
    for bad in ["-1", "0", "-0.000001", "0.000"] {
        let body = batch(vec![price("SOL", "1", NOW), price("JUP", bad, NOW)]);
        assert_eq!(reason(&sealed(&body)), Some(RejectReason::NonPositivePrice), "{bad}");
    }
}

#[test]
fn bad_asset() {
    for bad in [String::new(), "a".repeat(256), "has space".into(), "tab\t".into(), "é".into()] {
        let body = batch(vec![price(&bad, "1", NOW)]);
        assert_eq!(reason(&sealed(&body)), Some(RejectReason::BadAsset), "{bad:?}");
    }
    let body = batch(vec![price(&"a".repeat(255), "1", NOW)]);
    assert_eq!(reason(&sealed(&body)), None, "255 characters are allowed");
}

#[test]
fn bad_blockchain() {
    for bad in [String::new(), "c".repeat(51), "sol ana".into(), "\u{7f}".into()] {
        let mut p = price("SOL", "1", NOW);
        p.blockchain = bad.clone();
        assert_eq!(reason(&sealed(&batch(vec![p]))), Some(RejectReason::BadBlockchain), "{bad:?}");
    }
}

#[test]
fn too_many_prices() {
    let prices = |n: usize| (0..n).map(|i| price(&format!("A{i}"), "1", NOW)).collect();
    assert_eq!(reason(&sealed(&batch(prices(1000)))), None);
    assert_eq!(reason(&sealed(&batch(prices(1001)))), Some(RejectReason::TooManyPrices));
}

#[test]
fn empty_batch() {
    assert_eq!(reason(&sealed(&batch(vec![]))), Some(RejectReason::EmptyBatch));
}

#[test]
fn duplicate_asset_in_batch() {
    let body = batch(vec![price("SOL", "1", NOW), price("SOL", "2", NOW)]);
    assert_eq!(reason(&sealed(&body)), Some(RejectReason::DuplicateAsset));
    // The same address on two chains is two assets.
    let mut other_chain = price("SOL", "2", NOW);
    other_chain.blockchain = "ethereum".into();
    assert_eq!(reason(&sealed(&batch(vec![price("SOL", "1", NOW), other_chain]))), None);
}

#[test]
fn replays_of_older_or_equal_timestamps_are_rejected() {
    let validator = Validator::default();
    let mut marks = HighWaterMarks::default();
    let first = sealed(&batch(vec![price("SOL", "1", NOW - 10)]));
    validator.validate(&first, NOW, &mut marks).unwrap();
    // The very same message again (as after the seen cache forgot it).
    assert_eq!(
        validator.validate(&first, NOW, &mut marks).unwrap_err().reason,
        RejectReason::Replay
    );
    // A different message (other round) carrying an older timestamp for the asset.
    let older = Body::new(
        &provider(),
        NOW,
        Payload::PriceBatch { round: 2, prices: vec![price("SOL", "2", NOW - 20)] },
    );
    assert_eq!(
        validator.validate(&sealed(&older), NOW, &mut marks).unwrap_err().reason,
        RejectReason::Replay
    );
    // Newer passes; another origin has marks of its own.
    let newer = sealed(&batch(vec![price("SOL", "3", NOW - 5)]));
    validator.validate(&newer, NOW, &mut marks).unwrap();
    let other = Identity::from_seed([12; 32]);
    let theirs = Body::new(
        &other,
        NOW,
        Payload::PriceBatch { round: 1, prices: vec![price("SOL", "3", NOW - 30)] },
    );
    let frame = frame_of(&Envelope::seal(&other, &theirs, 5).unwrap());
    validator.validate(&frame, NOW, &mut marks).unwrap();
}

#[test]
fn marks_are_kept_per_chain_in_batches_that_mix_chains() {
    let on = |chain: &str, asset: &str, ts: i64| PriceUpdate {
        blockchain: chain.into(),
        ..price(asset, "1", ts)
    };
    let validator = Validator::default();
    let mut marks = HighWaterMarks::default();
    let mixed = |ts: [i64; 4]| {
        sealed(&batch(vec![
            on("solana", "A", ts[0]),
            on("ethereum", "A", ts[1]),
            on("ethereum", "B", ts[2]),
            on("solana", "B", ts[3]),
        ]))
    };
    validator.validate(&mixed([NOW - 40, NOW - 40, NOW - 40, NOW - 40]), NOW, &mut marks).unwrap();
    assert_eq!(marks.len(), 4);
    // One price not newer, in any run of chains, makes the batch a replay and sets nothing.
    for stale in 0..4 {
        let mut ts = [NOW - 30; 4];
        ts[stale] = NOW - 40;
        let err = validator.validate(&mixed(ts), NOW, &mut marks).unwrap_err();
        assert_eq!(err.reason, RejectReason::Replay, "price {stale} not newer");
    }
    validator.validate(&mixed([NOW - 30; 4]), NOW, &mut marks).unwrap();
    // The marks moved to NOW - 30 for all four keys, each on its own chain.
    for stale in 0..4 {
        let mut ts = [NOW - 20; 4];
        ts[stale] = NOW - 30;
        let err = validator.validate(&mixed(ts), NOW, &mut marks).unwrap_err();
        assert_eq!(err.reason, RejectReason::Replay, "price {stale} equal to its mark");
    }
    assert_eq!(marks.len(), 4);
}

#[test]
fn announce_replays_are_rejected() {
    let validator = Validator::default();
    let mut marks = HighWaterMarks::default();
    let announce = |at| {
        sealed(&Body::new(
            &provider(),
            at,
            Payload::ProviderAnnounce { fetch_interval_secs: 30, assets: 9, round: 1 },
        ))
    };
    validator.validate(&announce(NOW - 1), NOW, &mut marks).unwrap();
    assert_eq!(
        validator.validate(&announce(NOW - 1), NOW, &mut marks).unwrap_err().reason,
        RejectReason::Replay
    );
    validator.validate(&announce(NOW), NOW, &mut marks).unwrap();
}

#[test]
fn eviction_keeps_the_replay_floor() {
    let validator = Validator::default();
    let mut marks = HighWaterMarks::with_capacity(4);
    for i in 0..10 {
        let frame = sealed(&batch(vec![price(&format!("A{i}"), "1", NOW - 100 + i)]));
        validator.validate(&frame, NOW, &mut marks).unwrap();
    }
    assert!(marks.len() <= 4 && marks.evicted() >= 6);
    // A0 was evicted long ago; an old message for it is still a replay.
    let old = Body::new(
        &provider(),
        NOW,
        Payload::PriceBatch { round: 3, prices: vec![price("A0", "1", NOW - 100)] },
    );
    assert_eq!(
        validator.validate(&sealed(&old), NOW, &mut marks).unwrap_err().reason,
        RejectReason::Replay
    );
}

#[test]
fn stage_one_needs_no_key() {
    let env = Envelope::seal(&provider(), &batch(vec![price("SOL", "1", NOW)]), 7).unwrap();
    let decoded = decode_frame(&frame_of(&env)).unwrap();
    assert_eq!(decoded, env);
}
