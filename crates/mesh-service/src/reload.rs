//! Prices reloaded at start (from the database, or the Redis mirror when the database is empty
//! or down) pass the rules a received price passes: the validator's price rules
//! ([`mesh_protocol::validate::check_price`]: no future timestamp, a positive price, bounded
//! names and fields) and the provider allow-list (`MESH_TRUSTED_PROVIDERS`). A store or a mirror
//! that someone else can write to, or that an older version filled, is input like any other.

use std::collections::BTreeMap;
use std::collections::HashSet;

use mesh_protocol::validate::check_price;
use mesh_protocol::{NodeId, PriceUpdate, RejectReason};
use mesh_storage::PriceRow;
use tracing::warn;

/// The rows of `rows` that pass, as updates with their source. `now_ms` is the node's clock;
/// a timestamp up to `max_clock_skew_secs` ahead of it is allowed, as for received messages.
/// Rows refused are counted in `mesh_store_reload_rejected_total{reason}` and summed up in one
/// log line.
pub(crate) fn checked(
    rows: &[PriceRow],
    trusted: Option<&HashSet<NodeId>>,
    max_clock_skew_secs: u32,
    now_ms: i64,
) -> Vec<(NodeId, PriceUpdate)> {
    let latest_ms = now_ms.saturating_add(i64::from(max_clock_skew_secs) * 1000);
    let mut refused: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let update = PriceUpdate {
            asset: row.asset.clone(),
            blockchain: row.blockchain.clone(),
            price: row.price.clone(),
            timestamp_ms: row.timestamp_ms,
            change_24h: row.change_24h.clone(),
            // A store keeps one time per price, the one it was true at (see `apply_delivery`).
            source_timestamp_ms: None,
        };
        let verdict = match trusted {
            Some(trusted) if !trusted.contains(&row.source_node_id) => {
                Err(RejectReason::UntrustedProvider)
            }
            _ => check_price(&update, latest_ms),
        };
        match verdict {
            Ok(()) => out.push((row.source_node_id, update)),
            Err(reason) => {
                *refused.entry(reason.as_str()).or_default() += 1;
                metrics::counter!("mesh_store_reload_rejected_total", "reason" => reason.as_str())
                    .increment(1);
            }
        }
    }
    if !refused.is_empty() {
        let total: u64 = refused.values().sum();
        warn!(
            refused = total,
            reloaded = out.len(),
            reasons = ?refused,
            "stored prices refused at reload: they fail the rules of received prices"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    fn node(n: u8) -> NodeId {
        format!("00000000-0000-8000-8000-0000000000{n:02x}").parse().expect("test node id")
    }

    fn row(asset: &str, price: &str, ts: i64, source: u8) -> PriceRow {
        PriceRow {
            asset: asset.into(),
            blockchain: "solana".into(),
            price: price.parse().unwrap_or_else(|_| panic!("test price {price}")),
            timestamp_ms: ts,
            source_node_id: node(source),
            change_24h: None,
        }
    }

    #[test]
    fn only_rows_a_received_message_could_carry_are_reloaded() {
        let rows = vec![
            row("good", "1.5", NOW - 1_000, 1),
            row("skewed", "1.5", NOW + 4_000, 1),
            row("future", "1.5", NOW + 3_600_000, 1),
            row("negative", "-1", NOW, 1),
            row("zero", "0", NOW, 1),
            row("has space", "1", NOW, 1),
            row("ancient", "1", -5, 1),
            row("stranger", "1", NOW, 2),
        ];
        let kept = |trusted: Option<&HashSet<NodeId>>| -> Vec<String> {
            checked(&rows, trusted, 5, NOW).into_iter().map(|(_, u)| u.asset).collect()
        };
        assert_eq!(kept(None), ["good", "skewed", "stranger"]);
        let trusted: HashSet<NodeId> = [node(1)].into();
        assert_eq!(kept(Some(&trusted)), ["good", "skewed"]);
    }
}
