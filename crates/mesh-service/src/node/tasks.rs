//! The node's long-running tasks, started by [`super::Node::start`].

use std::sync::Arc;
use std::time::Duration;

use mesh_coordination::Reference;
use mesh_ipc::Event;
use mesh_protocol::{Body, Envelope, NodeId, Payload};
use mesh_relay::Delivery;
use mesh_storage::PriceRow;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::now_ms;
use crate::providers::BatchClaim;

use super::Shared;

/// The task that owns the price book: every delivered message goes through here. At shutdown
/// it stops taking new deliveries and applies the ones already queued (at most the relay's
/// delivery queue), so that their rows reach the stores' final flush; `done` is cancelled when
/// it has.
pub(super) async fn run_state(
    shared: Arc<Shared>,
    mut deliveries: mpsc::Receiver<Delivery>,
    cancel: CancellationToken,
    done: CancellationToken,
) {
    let _done = done.drop_guard();
    loop {
        let delivery = tokio::select! {
            () = cancel.cancelled() => break,
            d = deliveries.recv() => match d {
                Some(d) => d,
                None => return,
            },
        };
        apply_delivery(&shared, delivery);
    }
    deliveries.close();
    while let Some(delivery) = deliveries.recv().await {
        apply_delivery(&shared, delivery);
    }
}

/// Applies one delivered message to the book and hands its rows to the stores.
fn apply_delivery(shared: &Shared, delivery: Delivery) {
    let seen_ttl = shared.config.seen_ttl;
    let now = now_ms();
    let body = &delivery.message.body;
    let origin = body.origin;
    let own = delivery.from.is_none();
    let hops = if own { 0 } else { delivery.message.envelope.hop_count };
    // Another node's fresh message says what time it is there (the clock check).
    let local = now.saturating_add(shared.config.clock_offset_ms);
    if !own && origin != shared.identity.node_id() && local.abs_diff(body.created_at_ms) < 60_000 {
        shared.clock_check.lock().unwrap_or_else(std::sync::PoisonError::into_inner).observe(
            Reference::Peer(origin),
            body.created_at_ms,
            local,
        );
    }
    match &body.payload {
        Payload::ProviderAnnounce { .. } => {
            let _ = shared.tracker.lock().heard(origin, hops, None, now);
        }
        Payload::PriceBatch { round, prices } => {
            let claim = BatchClaim { round: *round, created_at_ms: body.created_at_ms, prices };
            if let Err(why) = shared.tracker.lock().heard(origin, hops, Some(claim), now) {
                // Prices still count; only the round is not taken as delivered.
                metrics::counter!("mesh_network_round_claims_ignored_total", "reason" => why.label())
                    .increment(1);
                tracing::debug!(
                    source_node_id = %origin,
                    round,
                    reason = why.label(),
                    "batch does not count as its round's delivery"
                );
            }
            // Events leave while the book is held, so that a view the expiry task made
            // just before cannot overtake this newer one on its way to subscribers.
            let applied = {
                let mut book = shared.book();
                let mut applied = book.apply(origin, hops, prices, now);
                for d in &applied.discrepancies {
                    shared.emit(Event::Discrepancy(d.clone()));
                }
                for view in applied.changed.drain(..) {
                    shared.emit(Event::Price(view));
                }
                applied
            };
            tracing::info!(
                source_node_id = %origin,
                round,
                prices = prices.len(),
                hop_count = hops,
                changed = applied.changed_count,
                "price update received"
            );
            for d in &applied.discrepancies {
                warn!(
                    asset = %d.asset,
                    blockchain = %d.blockchain,
                    node_a = %d.node_a,
                    price_a = %d.price_a,
                    node_b = %d.node_b,
                    price_b = %d.price_b,
                    difference_percent = %d.difference_percent,
                    "price discrepancy detected"
                );
                metrics::counter!("mesh_price_discrepancies_total").increment(1);
            }
            // Only what the book took: the stores are bounded as the book is. They keep one
            // time per price: when it was true (the source's update time when given), so that
            // a reloaded price keeps its real age.
            let rows = applied
                .accepted
                .iter()
                .filter_map(|&i| prices.get(i))
                .map(|p| {
                    let mut row = PriceRow::from_update(p, origin);
                    row.timestamp_ms = p.observed_ms();
                    if let std::borrow::Cow::Owned(canonical) =
                        mesh_protocol::canonical_asset(&row.asset)
                    {
                        row.asset = canonical;
                    }
                    row
                })
                .collect();
            shared.persistence.record(rows, delivery.message.id, seen_ttl);
        }
    }
}

/// How often the expiry task looks for prices whose flags changed with time alone.
const EXPIRY_TICK: Duration = Duration::from_millis(250);

/// Tells subscribers when a price's clock-dependent flags change with no new quote (it turned
/// stale, a disagreeing quote expired): the book knows when each asset's next change is due.
pub(super) async fn run_expiry(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut book = shared.book();
        for view in book.expire(now_ms()) {
            shared.emit(Event::Price(view));
        }
    }
}

/// Publishes the network status when it changes, and keeps the gauges current.
pub(super) async fn run_status(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut known_providers = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = shared.network_status();
        metrics::gauge!("mesh_network_active_providers").set(status.active_providers.len() as f64);
        let active: std::collections::HashSet<NodeId> =
            status.active_providers.iter().map(|p| p.node_id).collect();
        let joined = active.difference(&known_providers).count();
        let left = known_providers.difference(&active).count();
        if joined > 0 {
            info!(joined, providers = active.len(), "provider joined the network");
            metrics::counter!("mesh_network_providers_joined_total").increment(joined as u64);
        }
        if left > 0 {
            info!(left, providers = active.len(), "provider disconnected");
            metrics::counter!("mesh_network_providers_left_total").increment(left as u64);
        }
        known_providers = active;
        if let Some(ms) = shared.book().newest_timestamp_ms() {
            metrics::gauge!("mesh_cache_last_update_timestamp_seconds").set(ms as f64 / 1000.0);
        }
        metrics::gauge!("mesh_network_connected_peers").set(status.connected_peers as f64);
        if let Some(age) = shared.book().data_age(now_ms()) {
            metrics::gauge!("mesh_cache_data_age_seconds").set(age.as_secs_f64());
        }
        for component in ["database", "redis", "coordination"] {
            let degraded = status.degraded_components.iter().any(|c| c == component);
            metrics::gauge!("mesh_component_degraded", "component" => component).set(if degraded {
                1.0
            } else {
                0.0
            });
        }
        let changed = {
            let mut last =
                shared.last_network.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let changed = last.as_ref() != Some(&status);
            *last = Some(status.clone());
            changed
        };
        if changed {
            shared.emit(Event::Network(status));
        }
    }
}

/// While provider mode is on, tells the mesh about this provider once per round, so that
/// nodes without Redis can rank the providers (coordination without Redis).
pub(super) async fn run_announce(shared: Arc<Shared>, cancel: CancellationToken) {
    let interval = Duration::from_secs(shared.config.provider.fetch_interval_secs);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = shared.provider.subscribe();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                // Announce at once when provider mode turns on.
                if !status.borrow_and_update().enabled {
                    continue;
                }
            }
        }
        if !shared.provider.status().enabled {
            continue;
        }
        let now = now_ms();
        let round = (now.max(0) as u64 / 1000) / interval.as_secs().max(1);
        let payload = Payload::ProviderAnnounce {
            fetch_interval_secs: interval.as_secs() as u32,
            assets: shared.config.provider.assets.as_slice().len() as u32,
            round,
        };
        let body = Body::new(&shared.identity, now, payload);
        match Envelope::seal(&shared.identity, &body, shared.config.provider.message_ttl) {
            Ok(envelope) => {
                if let Err(e) = shared.relay.publish(&envelope).await {
                    tracing::debug!(error = %e, "provider announce not sent");
                }
            }
            Err(e) => warn!(error = %e, "provider announce not sealed"),
        }
    }
}

/// Feeds peers found by discovery to the relay, and keeps our advertisement current (listen
/// addresses, role, hop distance to a provider).
pub(super) async fn run_discovery(
    shared: Arc<Shared>,
    discovery: mesh_discovery::Discovery,
    mut found: mpsc::Receiver<mesh_discovery::DiscoveryEvent>,
    cancel: CancellationToken,
) {
    use mesh_discovery::{DiscoveryEvent, Role, Source};
    let mut relay_status = shared.relay.watch_status();
    let mut provider_status = shared.provider.subscribe();
    if let Ok(addrs) = shared.relay.listen_addrs().await {
        discovery.set_listen_addrs(addrs);
    }
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            event = found.recv() => match event {
                Some(DiscoveryEvent::PeerFound { peer_id, addrs, hop_distance, source, .. }) => {
                    let result = if source == Source::Bootstrap {
                        shared.relay.add_bootstrap(peer_id, addrs).await
                    } else {
                        shared.relay.add_peer_addresses(peer_id, addrs, hop_distance).await
                    };
                    if result.is_err() {
                        return;
                    }
                }
                Some(DiscoveryEvent::PeerExpired { .. }) => {}
                None => return,
            },
            changed = relay_status.changed() => {
                if changed.is_err() {
                    return;
                }
                let status = relay_status.borrow_and_update().clone();
                discovery.set_hop_distance(status.own_distance);
                discovery.set_listen_addrs(status.listen_addrs);
            }
            changed = provider_status.changed() => {
                if changed.is_err() {
                    return;
                }
                let enabled = provider_status.borrow_and_update().enabled;
                discovery.set_role(if enabled { Role::Provider } else { Role::Consumer });
            }
        }
    }
}

/// Forwards provider status changes to subscribers.
pub(super) async fn run_provider_events(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut status = shared.provider.subscribe();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let current = status.borrow_and_update().clone();
        if !current.enabled && current.reason.is_some() {
            // Stopped by Birdeye (key refused): the stored key, when it is the one refused, is
            // set aside, never loaded again but not lost (the operator may want to look at it).
            // A refused BIRDEYE_API_KEY stays where the operator put it, and so does a stored
            // key it was not.
            let from_store =
                shared.key_from_store.swap(false, std::sync::atomic::Ordering::Relaxed);
            let set_aside = if from_store { shared.keys.quarantine() } else { Ok(None) };
            match set_aside {
                Ok(Some(path)) => tracing::error!(
                    reason = current.reason.as_deref().unwrap_or_default(),
                    key_file = %path.display(),
                    "provider mode is off: Birdeye refused the API key; the key was set aside and \
                     is not used again. Enable provider mode with a valid key \
                     (POST /api/mesh/provider/enable)"
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "could not set the refused provider key aside")
                }
            }
            shared.tracker.lock().set_own_active(false, now_ms());
            let _ = shared.relay.set_provider(false).await;
        }
        shared.emit(Event::Provider(shared.view_of(&current)));
    }
}
