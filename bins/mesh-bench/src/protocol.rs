//! Protocol benchmark: how many 50-price batches one core can seal (encode + sign) and check
//! (decode + verify + validate, replay marks included). Goal: 15,000 checked batches/s.

use std::time::Instant;

use mesh_protocol::{
    Body, Envelope, HighWaterMarks, Identity, Payload, PriceUpdate, Validator, decode_body,
    decode_frame, encode_envelope,
};
use serde_json::json;

use crate::report::{Figure, Report, per_sec};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Batches to seal and check.
    #[arg(long, default_value_t = 20_000)]
    pub batches: usize,
    /// Prices per batch.
    #[arg(long, default_value_t = 50)]
    pub prices: usize,
}

const NOW_MS: i64 = 1_750_000_000_000;

fn body(identity: &Identity, n: usize, prices: usize) -> anyhow::Result<Body> {
    // Within the maximum message age (10 minutes) for up to 500,000 batches.
    let ts = NOW_MS - 500_000 + n as i64;
    let prices = (0..prices)
        .map(|i| {
            Ok(PriceUpdate {
                asset: format!("So1111111111111111111111111111111111111{i:04}"),
                blockchain: "solana".into(),
                price: format!("{}.{:06}", 100 + i, n % 1_000_000).parse()?,
                timestamp_ms: ts,
                change_24h: Some("-1.25".parse()?),
                source_timestamp_ms: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Body::new(identity, ts, Payload::PriceBatch { round: n as u64, prices }))
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let identity = Identity::from_seed([42; 32]);
    let bodies = (0..args.batches)
        .map(|n| body(&identity, n, args.prices))
        .collect::<Result<Vec<_>, _>>()?;

    let started = Instant::now();
    let mut frames = Vec::with_capacity(bodies.len());
    for b in &bodies {
        frames.push(encode_envelope(&Envelope::seal(&identity, b, 10)?)?);
    }
    let seal_rate = per_sec(bodies.len(), started.elapsed());

    let validator = Validator::default();
    let mut marks = HighWaterMarks::default();
    let started = Instant::now();
    for f in &frames {
        validator.validate(f, NOW_MS, &mut marks)?;
    }
    let check_rate = per_sec(frames.len(), started.elapsed());

    // The stages alone, to show where the time goes.
    let started = Instant::now();
    let envelopes = frames.iter().map(|f| decode_frame(f)).collect::<Result<Vec<_>, _>>()?;
    let decode_rate = per_sec(frames.len(), started.elapsed());
    let started = Instant::now();
    let digests = envelopes.iter().map(Envelope::digest).collect::<Vec<_>>();
    let digest_rate = per_sec(frames.len(), started.elapsed());
    // The validator keeps decompressed keys; so does this loop.
    let key = ed25519_dalek::VerifyingKey::from_bytes(&identity.public_key())?;
    let started = Instant::now();
    for (e, d) in envelopes.iter().zip(&digests) {
        let signature = ed25519_dalek::Signature::from_bytes(&e.signature);
        key.verify_strict(&d.signing_input(), &signature)?;
    }
    let verify_rate = per_sec(frames.len(), started.elapsed());
    let started = Instant::now();
    for e in &envelopes {
        std::hint::black_box(decode_body(&e.body)?);
    }
    let body_rate = per_sec(frames.len(), started.elapsed());
    let frame_bytes = frames.iter().map(Vec::len).sum::<usize>() / frames.len().max(1);

    Ok(Report {
        bench: "protocol",
        params: json!({ "batches": args.batches, "prices_per_batch": args.prices, "threads": 1 }),
        figures: vec![
            Figure::plain("encode_sign_batches_per_sec", seal_rate, "batches/s"),
            Figure::at_least(
                "decode_verify_validate_batches_per_sec",
                check_rate,
                "batches/s",
                15_000.0,
            ),
            Figure::plain("decode_frame_per_sec", decode_rate, "frames/s"),
            Figure::plain("body_sha256_per_sec", digest_rate, "bodies/s"),
            Figure::plain("ed25519_verify_only_per_sec", verify_rate, "signatures/s"),
            Figure::plain("decode_body_per_sec", body_rate, "bodies/s"),
            Figure::plain("frame_bytes", frame_bytes as f64, "bytes"),
        ],
    })
}
