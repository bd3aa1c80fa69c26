//! Signed test messages.

use std::time::{SystemTime, UNIX_EPOCH};

use mesh_protocol::{Body, Envelope, Identity, Payload, PriceUpdate};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A signed batch of `prices` prices from `provider`, all stamped `ts_ms`, sent with `ttl`.
pub fn price_batch(
    provider: &Identity,
    round: u64,
    ts_ms: i64,
    prices: usize,
    ttl: u8,
) -> anyhow::Result<Envelope> {
    let prices = (0..prices)
        .map(|i| {
            Ok(PriceUpdate {
                asset: format!("ASSET{i:04}"),
                blockchain: "solana".into(),
                price: format!("{}.{}", 100 + i, round % 1000).parse()?,
                timestamp_ms: ts_ms,
                change_24h: None,
                source_timestamp_ms: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let body = Body::new(provider, ts_ms, Payload::PriceBatch { round, prices });
    Ok(Envelope::seal(provider, &body, ttl)?)
}
