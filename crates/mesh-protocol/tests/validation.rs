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
fn timestamps_older_than_the_maximum_age() {
    let age = mesh_protocol::MAX_MESSAGE_AGE_MS;
    // created_at too old.
    let mut body = batch(vec![price("SOL", "1", NOW)]);
    body.created_at_ms = NOW - age - 1;
    assert_eq!(reason(&sealed(&body)), Some(RejectReason::TooOld));
    body.created_at_ms = NOW - age;
    assert_eq!(reason(&sealed(&body)), None, "exactly at the age is allowed");
    // One price timestamp too old.
    let body = batch(vec![price("SOL", "1", NOW), price("JUP", "0.4", NOW - age - 1)]);
    assert_eq!(reason(&sealed(&body)), Some(RejectReason::TooOld));
    // An announce too.
    let announce = Body::new(
        &provider(),
        NOW - age - 1,
        Payload::ProviderAnnounce { fetch_interval_secs: 30, assets: 9, round: 1 },
    );
    assert_eq!(reason(&sealed(&announce)), Some(RejectReason::TooOld));
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

#[test]
fn only_faults_every_honest_node_would_catch_are_the_senders() {
    // Clock, allow-list and replay marks are this node's own: an honest neighbour can pass
    // such a message on, so it is never charged for it.
    let not_charged = [
        RejectReason::FutureTimestamp,
        RejectReason::TooOld,
        RejectReason::UntrustedProvider,
        RejectReason::Replay,
        // A newer release's honest relays pass on versions this one does not read.
        RejectReason::UnsupportedVersion,
    ];
    for reason in RejectReason::ALL {
        assert_eq!(reason.is_senders_fault(), !not_charged.contains(&reason), "{reason}");
    }
}

/// A signed batch of `count` assets named `{prefix}{i}` from `key`, all stamped `ts`.
fn wide_batch(key: &Identity, prefix: &str, count: usize, ts: i64) -> Vec<u8> {
    let prices = (0..count).map(|i| price(&format!("{prefix}{i}"), "1", ts)).collect();
    let body = Body::new(key, ts.min(NOW), Payload::PriceBatch { round: 1, prices });
    frame_of(&Envelope::seal(key, &body, 10).unwrap())
}

#[test]
fn a_flood_of_marks_stamped_ahead_evicts_only_its_own_origin() {
    let validator = Validator::default();
    let mut marks = HighWaterMarks::default();
    let honest = provider();
    validator.validate(&wide_batch(&honest, "H", 9, NOW - 30_000), NOW, &mut marks).unwrap();
    // 60 batches of 1,000 new assets, 3 s ahead (within the skew): 60,000 marks, more than
    // the 50,000 held in all. Before marks were kept per origin, the older half of all marks
    // went and every origin's floor rose to the attacker's timestamps.
    let hostile = Identity::from_seed([66; 32]);
    for b in 0..60 {
        let frame = wide_batch(&hostile, &format!("X{b}-"), 1_000, NOW + 3_000 + b);
        validator.validate(&frame, NOW, &mut marks).unwrap();
    }
    assert!(marks.len() <= HighWaterMarks::DEFAULT_PER_ORIGIN + 9, "{} marks", marks.len());
    assert!(marks.evicted() >= 50_000);
    // The honest provider's next batch is newer than its own marks: accepted.
    validator.validate(&wide_batch(&honest, "H", 9, NOW - 20_000), NOW, &mut marks).unwrap();
    // Its marks were kept: an older one is still a replay.
    let err = validator.validate(&wide_batch(&honest, "H", 9, NOW - 25_000), NOW, &mut marks);
    assert_eq!(err.unwrap_err().reason, RejectReason::Replay);
    // The attacker's own evicted assets stay closed to its old timestamps.
    let err = validator.validate(&wide_batch(&hostile, "X0-", 1, NOW + 3_000), NOW, &mut marks);
    assert_eq!(err.unwrap_err().reason, RejectReason::Replay);
}

#[test]
fn past_the_total_the_largest_origin_evicts_its_own() {
    let validator = Validator::default();
    let mut marks = HighWaterMarks::with_limits(20, 20, 10);
    let honest = provider();
    validator.validate(&wide_batch(&honest, "H", 5, NOW - 30_000), NOW, &mut marks).unwrap();
    let hostile = Identity::from_seed([66; 32]);
    for b in 0..10 {
        let frame = wide_batch(&hostile, &format!("X{b}-"), 4, NOW + 1_000 + b);
        validator.validate(&frame, NOW, &mut marks).unwrap();
    }
    assert!(marks.len() <= 20);
    // The honest marks are still held: the same timestamps are a replay, newer ones pass.
    let err = validator.validate(&wide_batch(&honest, "H", 5, NOW - 30_000), NOW, &mut marks);
    assert_eq!(err.unwrap_err().reason, RejectReason::Replay);
    validator.validate(&wide_batch(&honest, "H", 5, NOW - 29_999), NOW, &mut marks).unwrap();
}

#[test]
fn forgotten_origins_fall_back_to_a_floor_no_newer_than_the_age_limit() {
    let validator = Validator::default();
    let mut marks = HighWaterMarks::with_limits(1_000, 100, 4);
    // Throwaway keys stamping ahead of time fill the origin table over and over.
    for k in 0..20u8 {
        let key = Identity::from_seed([100 + k; 32]);
        validator.validate(&wide_batch(&key, "X", 10, NOW + 4_000), NOW, &mut marks).unwrap();
        assert!(marks.origins() <= 4);
    }
    // A new (or forgotten) honest origin is not held back by their timestamps.
    let honest = provider();
    validator.validate(&wide_batch(&honest, "H", 3, NOW - 60_000), NOW, &mut marks).unwrap();
    // A forgotten origin's messages older than the age limit stay closed.
    let first = Identity::from_seed([100; 32]);
    let old = wide_batch(&first, "X", 10, NOW - HIGH_AGE);
    let old = validator.verify(decode_frame(&old).unwrap(), NOW - HIGH_AGE).unwrap();
    assert_eq!(marks.admit(&old, NOW).unwrap_err().reason, RejectReason::Replay);
}

/// Older than the maximum message age.
const HIGH_AGE: i64 = mesh_protocol::MAX_MESSAGE_AGE_MS + 1;

#[test]
fn change_24h_longer_than_the_stores_column() {
    // 50 characters fit the guide's change_24h VARCHAR(50); 51 and a 52-digit change do not.
    let fits = format!("-{}", "9".repeat(49));
    let mut p = price("SOL", "1", NOW);
    p.change_24h = Some(fits.parse().unwrap());
    assert_eq!(reason(&sealed(&batch(vec![p]))), None);
    for bad in ["9".repeat(51), "1".repeat(52), format!("0.{}", "1".repeat(60))] {
        let mut p = price("SOL", "1", NOW);
        p.change_24h = Some(bad.parse().unwrap());
        assert_eq!(
            reason(&sealed(&batch(vec![price("JUP", "1", NOW), p]))),
            Some(RejectReason::BadChange24h),
            "{bad}"
        );
    }
}

#[test]
fn timestamps_before_the_epoch_are_out_of_range() {
    for bad in [-1, -62_000_000_000_000, i64::MIN] {
        let body = batch(vec![price("SOL", "1", NOW), price("JUP", "1", bad)]);
        assert_eq!(reason(&sealed(&body)), Some(RejectReason::TimestampOutOfRange), "{bad}");
    }
    // The epoch itself fits every store; a received message that old is refused by its age.
    let epoch = price("SOL", "1", 0);
    assert_eq!(mesh_protocol::validate::check_price(&epoch, NOW), Ok(()));
    assert_eq!(reason(&sealed(&batch(vec![epoch]))), Some(RejectReason::TooOld));
}

#[test]
fn check_price_applies_the_batch_rules_to_one_price() {
    use mesh_protocol::validate::check_price;
    assert_eq!(check_price(&price("SOL", "1", NOW), NOW), Ok(()));
    assert_eq!(check_price(&price("SOL", "1", NOW + 1), NOW), Err(RejectReason::FutureTimestamp));
    assert_eq!(check_price(&price("SOL", "0", NOW), NOW), Err(RejectReason::NonPositivePrice));
    assert_eq!(check_price(&price("S O L", "1", NOW), NOW), Err(RejectReason::BadAsset));
    assert_eq!(check_price(&price("SOL", "1", -5), NOW), Err(RejectReason::TimestampOutOfRange));
}
