//! The provider round loop: every round, ask coordination whether this node fetches; if so,
//! fetch the configured assets, sign one `PriceBatch` carrying the round number and hand it to
//! the [`Broadcast`]er.
//!
//! Failure rules (ARCHITECTURE section 7): 401/403 stop provider mode with a readable reason
//! (`Invalid API key`); 429/5xx/timeouts are retried by the client within the round; a round
//! that still fails is counted and nothing is sent for it: old prices are never re-sent under
//! a new timestamp.

mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_coordination::{
    ClockCheck, ClockVerdict, Coordination, MemoryCoordination, MeshView, NoMesh, OffsetClock,
    PlannerConfig, Reference, RoundDecision, RoundPlanner, SkipReason, Via,
};
use mesh_protocol::{Body, Envelope, Identity, NodeId, Payload, PriceUpdate};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use status::{FetchOutcome, ProviderStatus};

use crate::broadcast::Broadcast;
use crate::client::{self, ApiKey, BirdeyeClient, unix_ms_now};
use crate::config::Settings;
use crate::{Error, Result, telemetry};

/// What one round of this node came to (also the status's `last_fetch`).
#[derive(Debug)]
enum RoundOutcome {
    Fetched { assets: usize, missing: usize, peers: usize },
    Failed(Error),
    KeyRejected(client::Error),
}

/// Builds a [`Provider`].
pub struct ProviderBuilder {
    identity: Identity,
    settings: Settings,
    broadcast: Arc<dyn Broadcast>,
    coordination: Arc<dyn Coordination>,
    mesh: Arc<dyn MeshView>,
    cancel: CancellationToken,
    clock_check: Option<Arc<Mutex<ClockCheck>>>,
}

impl ProviderBuilder {
    /// The clock check shared with the node, which feeds it peers' timestamps (default: one
    /// of the provider's own, fed by Birdeye's `Date` and the store's `TIME`).
    pub fn clock_check(mut self, check: Arc<Mutex<ClockCheck>>) -> Self {
        self.clock_check = Some(check);
        self
    }

    /// The registry and leases shared with other providers (default: in memory, this node
    /// alone).
    pub fn coordination(mut self, coordination: Arc<dyn Coordination>) -> Self {
        self.coordination = coordination;
        self
    }

    /// What the node learned from the mesh, used while coordination is down (default:
    /// nothing).
    pub fn mesh(mut self, mesh: Arc<dyn MeshView>) -> Self {
        self.mesh = mesh;
        self
    }

    /// The parent token: cancelling it stops the loop for good (the node's root token).
    pub fn cancel(mut self, parent: CancellationToken) -> Self {
        self.cancel = parent;
        self
    }

    /// The provider, disabled until [`Provider::enable`].
    pub fn build(self) -> Provider {
        let node_id = self.identity.node_id();
        let (status, _) = tokio::sync::watch::channel(ProviderStatus::disabled(node_id));
        let skew_ms = self.settings.max_clock_skew.as_millis() as i64;
        let clock_check =
            self.clock_check.unwrap_or_else(|| Arc::new(Mutex::new(ClockCheck::new(skew_ms))));
        Provider {
            inner: Arc::new(Inner {
                identity: self.identity,
                settings: self.settings,
                broadcast: self.broadcast,
                coordination: self.coordination,
                mesh: self.mesh,
                // A child, so that shutting the provider down leaves the parent alone.
                cancel: self.cancel.child_token(),
                tracker: TaskTracker::new(),
                status,
                running: tokio::sync::Mutex::new(None),
                last_timestamps: Mutex::new(HashMap::new()),
                clock_check,
            }),
        }
    }
}

/// A node's provider mode: enable it with a key, disable it, read its status. Cheap to clone.
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("node_id", &self.inner.identity.node_id())
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    identity: Identity,
    settings: Settings,
    broadcast: Arc<dyn Broadcast>,
    coordination: Arc<dyn Coordination>,
    mesh: Arc<dyn MeshView>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    status: tokio::sync::watch::Sender<ProviderStatus>,
    running: tokio::sync::Mutex<Option<Running>>,
    /// Newest timestamp sent per (chain, address): kept across enable/disable so timestamps
    /// only ever grow.
    last_timestamps: Mutex<HashMap<(String, String), i64>>,
    /// Is this node's clock right (issue 34)?
    clock_check: Arc<Mutex<ClockCheck>>,
}

struct Running {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Provider {
    /// Starts building the provider of `identity` that hands its batches to `broadcast`.
    pub fn builder(
        identity: Identity,
        settings: Settings,
        broadcast: Arc<dyn Broadcast>,
    ) -> ProviderBuilder {
        ProviderBuilder {
            identity,
            settings,
            broadcast,
            coordination: Arc::new(MemoryCoordination::new()),
            mesh: Arc::new(NoMesh),
            cancel: CancellationToken::new(),
            clock_check: None,
        }
    }

    /// This node.
    pub fn node_id(&self) -> NodeId {
        self.inner.identity.node_id()
    }

    /// A snapshot of the status.
    pub fn status(&self) -> ProviderStatus {
        self.inner.status.borrow().clone()
    }

    /// The status as it changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<ProviderStatus> {
        self.inner.status.subscribe()
    }

    /// Checks `key` with Birdeye ([`BirdeyeClient::validate_key`]) and starts the round loop
    /// with it. A refused key leaves provider mode off with the reason in the status
    /// (`Invalid API key` for 401) and is returned as the error.
    ///
    /// A key refused while provider mode runs with another key leaves it running: the status
    /// keeps saying enabled, with no reason (the refusal is the caller's answer and the last
    /// error), since that is what the provider is doing.
    pub async fn enable(&self, key: ApiKey) -> Result<()> {
        let client = BirdeyeClient::with_config(key, self.inner.settings.client.clone())?;
        let validated = client.validate_key().await;
        self.inner.observe_birdeye_date(&client);
        if let Err(error) = validated {
            if error.is_key_rejected() {
                self.refused(&error);
            }
            return Err(error.into());
        }
        self.start(client).await
    }

    /// Starts the round loop with `key` remembered from before a restart. The key is checked
    /// first, so that a key revoked in the meantime never shows as enabled: a refused key
    /// leaves provider mode off with the reason in the status and returns `Ok(false)`. When
    /// Birdeye cannot be asked (unreachable, 5xx), the loop starts all the same and a refused
    /// key stops it at its first fetch. `Ok(true)`: the loop runs.
    pub async fn resume(&self, key: ApiKey) -> Result<bool> {
        let client = BirdeyeClient::with_config(key, self.inner.settings.client.clone())?;
        match client.validate_key().await {
            Err(error) if error.is_key_rejected() => {
                tracing::error!(reason = %error, "the stored Birdeye key was refused; provider mode stays off");
                count_key_rejection(&error);
                self.refused(&error);
                Ok(false)
            }
            Err(error) => {
                tracing::info!(%error, "Birdeye could not check the stored key; provider mode resumes");
                self.start(client).await.map(|()| true)
            }
            Ok(()) => self.start(client).await.map(|()| true),
        }
    }

    /// Records a key Birdeye refused: the last error always, and the reason provider mode is
    /// off only when it is off (a running loop keeps its own key).
    fn refused(&self, error: &crate::client::Error) {
        let reason = error.to_string();
        modify(&self.inner.status, |s| {
            if !s.enabled {
                s.reason = Some(reason.clone());
            }
            s.last_error = Some(reason.clone());
        });
    }

    async fn start(&self, client: BirdeyeClient) -> Result<()> {
        if self.inner.cancel.is_cancelled() {
            return Err(Error::ShutDown);
        }
        let mut running = self.inner.running.lock().await;
        if let Some(previous) = running.take() {
            stop(previous).await;
        }
        PlannerConfig::new(self.inner.settings.interval, self.inner.settings.window).validate()?;
        metrics::gauge!(telemetry::KEY_REJECTED).set(0.0);
        let cancel = self.inner.cancel.child_token();
        modify(&self.inner.status, |s| {
            s.enabled = true;
            s.reason = None;
        });
        let inner = self.inner.clone();
        let span = tracing::info_span!("provider_loop", node_id = %self.node_id());
        let task = self.inner.tracker.spawn(run(inner, client, cancel.clone()).instrument(span));
        *running = Some(Running { cancel, task });
        tracing::info!(node_id = %self.node_id(), "provider mode enabled");
        Ok(())
    }

    /// Stops the round loop and leaves the provider registry. Idempotent.
    pub async fn disable(&self) {
        let previous = self.inner.running.lock().await.take();
        if let Some(previous) = previous {
            stop(previous).await;
            tracing::info!(node_id = %self.node_id(), "provider mode disabled");
        }
        modify(&self.inner.status, |s| {
            s.enabled = false;
            s.next_round = None;
            s.next_round_unix_ms = None;
        });
    }

    /// Disables provider mode for good and waits for the loop to finish; later
    /// [`Provider::enable`] calls fail with [`Error::ShutDown`].
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.disable().await;
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

/// Changes the status and bumps its revision.
fn modify(
    status: &tokio::sync::watch::Sender<ProviderStatus>,
    change: impl FnOnce(&mut ProviderStatus),
) {
    status.send_modify(|s| {
        change(s);
        s.revision += 1;
    });
}

async fn stop(running: Running) {
    running.cancel.cancel();
    // The loop leaves the registry itself on cancellation; a join error is a panic in it,
    // which has already been reported by the runtime.
    if let Err(error) = running.task.await {
        tracing::error!(%error, "provider loop ended abnormally");
    }
}

/// The loop: one decision per round until cancelled or the key is refused.
async fn run(inner: Arc<Inner>, client: BirdeyeClient, cancel: CancellationToken) {
    let settings = &inner.settings;
    let node = inner.identity.node_id();
    let planner = RoundPlanner::new(
        PlannerConfig::new(settings.interval, settings.window),
        node,
        inner.coordination.clone(),
        inner.mesh.clone(),
    )
    .with_clock(Arc::new(OffsetClock(settings.clock_offset_ms)))
    .with_clock_check(inner.clock_check.clone());
    let interval_ms = settings.interval.as_millis().max(1) as i64;
    let mut next_round = planner.round_at(inner.now_ms().max(0) as u64);
    loop {
        modify(&inner.status, |s| {
            s.next_round = Some(next_round);
            s.next_round_unix_ms = Some(next_round as i64 * interval_ms);
            s.degraded = planner.is_degraded();
        });
        let decision = tokio::select! {
            _ = cancel.cancelled() => break,
            decision = planner.next() => decision,
        };
        next_round = decision.round + 1;
        if let Some(verdict) = decision.clock {
            inner.report_clock(verdict);
        }
        if let Some(why) = decision.undelivered {
            metrics::counter!(telemetry::ROUNDS_UNDELIVERED_TOTAL, "reason" => why.label())
                .increment(1);
        }
        if decision.taken_over {
            metrics::counter!(telemetry::ROUNDS_TAKEN_OVER_TOTAL).increment(1);
        }
        if !decision.fetch {
            let reason = match decision.skip_reason {
                Some(SkipReason::Fulfilled) => "fulfilled",
                Some(SkipReason::ClockSkew) => "clock_skew",
                _ => "lease_held",
            };
            metrics::counter!(telemetry::ROUNDS_SKIPPED_TOTAL, "reason" => reason).increment(1);
            tracing::debug!(round = decision.round, rank = decision.rank, reason, "round skipped");
            modify(&inner.status, |s| s.rounds_skipped += 1);
            continue;
        }
        let outcome = tokio::select! {
            _ = cancel.cancelled() => break,
            outcome = fetch_round(&inner, &client, &decision) => outcome,
        };
        let stop = record(&inner, &decision, outcome);
        if stop {
            break;
        }
    }
    if cancel.is_cancelled() {
        modify(&inner.status, |s| {
            s.enabled = false;
            s.next_round = None;
            s.next_round_unix_ms = None;
        });
    }
    planner.leave().await;
}

/// Fetches, signs and broadcasts one round.
async fn fetch_round(
    inner: &Inner,
    client: &BirdeyeClient,
    decision: &RoundDecision,
) -> RoundOutcome {
    let settings = &inner.settings;
    tracing::info!(
        round = decision.round,
        rank = decision.rank,
        via = ?decision.via,
        assets = settings.assets.len(),
        "Provider node fetching price data"
    );
    metrics::counter!(telemetry::FETCH_ATTEMPTS_TOTAL).increment(1);
    // The batch must belong to its round: stop trying when the round is over.
    let round_end_ms = decision.round_start_unix_ms as i64 + settings.interval.as_millis() as i64;
    let budget = Duration::from_millis((round_end_ms - inner.now_ms()).max(100) as u64);
    let fetched = tokio::time::timeout(budget, client.prices(settings.assets.as_slice())).await;
    // Birdeye's answer says what time it is: a batch stamped by a clock found off is not sent.
    inner.observe_birdeye_date(client);
    let verdict = inner.judge_clock();
    inner.report_clock(verdict);
    if verdict.off {
        return RoundOutcome::Failed(Error::ClockSkew {
            offset_ms: verdict.offset_ms.unwrap_or(0),
            max_ms: settings.max_clock_skew.as_millis() as i64,
        });
    }
    let set = match fetched {
        Ok(Ok(set)) => set,
        Ok(Err(error)) if error.is_key_rejected() => return RoundOutcome::KeyRejected(error),
        Ok(Err(error)) => return RoundOutcome::Failed(error.into()),
        Err(_) => return RoundOutcome::Failed(Error::RoundOver { round: decision.round }),
    };
    if !set.missing.is_empty() {
        metrics::counter!(telemetry::MISSING_PRICES_TOTAL).increment(set.missing.len() as u64);
        tracing::warn!(
            round = decision.round,
            missing = set.missing.len(),
            first = %format_args!("{}:{}", set.missing[0].chain, set.missing[0].address),
            "Birdeye had no price for some assets"
        );
    }
    if set.prices.is_empty() {
        return RoundOutcome::Failed(Error::NoPrices { round: decision.round });
    }
    let prices = inner.stamp(set.prices);
    let created_at_ms =
        prices.iter().map(|p| p.timestamp_ms).max().unwrap_or_else(|| inner.now_ms());
    let assets = prices.len();
    let body = Body::new(
        &inner.identity,
        created_at_ms,
        Payload::PriceBatch { round: decision.round, prices },
    );
    let envelope = match Envelope::seal(&inner.identity, &body, settings.message_ttl) {
        Ok(envelope) => envelope,
        Err(error) => return RoundOutcome::Failed(error.into()),
    };
    metrics::counter!(telemetry::FETCH_SUCCESS_TOTAL).increment(1);
    metrics::counter!(telemetry::BROADCAST_ATTEMPTS_TOTAL).increment(1);
    match inner.broadcast.broadcast(envelope).await {
        Ok(peers) => {
            metrics::counter!(telemetry::BROADCAST_SUCCESS_TOTAL).increment(1);
            tracing::info!(
                round = decision.round,
                assets,
                peers,
                "Provider node broadcast complete: {assets} assets to {peers} peers"
            );
            RoundOutcome::Fetched { assets, missing: set.missing.len(), peers }
        }
        Err(error) => RoundOutcome::Failed(error.into()),
    }
}

impl Inner {
    /// This node's wall clock (with the configured test offset), Unix ms.
    fn now_ms(&self) -> i64 {
        unix_ms_now().saturating_add(self.settings.clock_offset_ms)
    }

    /// Feeds the `Date` of Birdeye's last answer to the clock check (the date is whole
    /// seconds: its middle is the best guess).
    fn observe_birdeye_date(&self, client: &BirdeyeClient) {
        if let Some(date) = client.last_server_date() {
            let local = self.now_ms().saturating_sub(date.received.elapsed().as_millis() as i64);
            let mut check = self.clock_check.lock().unwrap_or_else(|p| p.into_inner());
            check.observe(Reference::Birdeye, date.unix_ms + 500, local);
        }
    }

    fn judge_clock(&self) -> ClockVerdict {
        let mut check = self.clock_check.lock().unwrap_or_else(|p| p.into_inner());
        check.verdict(self.now_ms())
    }

    /// The gauge every time; the log and the status once per change.
    fn report_clock(&self, verdict: ClockVerdict) {
        let max_secs = self.settings.max_clock_skew.as_secs();
        metrics::gauge!(telemetry::CLOCK_MAX_SKEW_SECONDS).set(max_secs as f64);
        if let Some(offset) = verdict.offset_ms {
            metrics::gauge!(telemetry::CLOCK_OFFSET_SECONDS).set(offset as f64 / 1000.0);
        }
        if !verdict.changed {
            return;
        }
        let offset_secs = verdict.offset_ms.unwrap_or(0) as f64 / 1000.0;
        if verdict.off {
            let message = format!(
                "wall clock is off by {offset_secs:+.1} s, more than MESH_MAX_CLOCK_SKEW_SECS={max_secs}: not taking round leases or publishing until it is right"
            );
            tracing::warn!(offset_secs, max_clock_skew_secs = max_secs, "{message}");
            self.status.send_modify(|s| s.last_error = Some(message));
        } else {
            tracing::info!(
                offset_secs,
                max_clock_skew_secs = max_secs,
                "wall clock is right again; taking rounds"
            );
        }
    }

    /// Turns fetched prices into updates stamped with the time they were observed, strictly
    /// later than anything this provider sent before for the same asset (receivers drop equal
    /// or older timestamps as replays).
    fn stamp(&self, prices: Vec<client::TokenPrice>) -> Vec<PriceUpdate> {
        let mut last = self.last_timestamps.lock().unwrap_or_else(|p| p.into_inner());
        prices
            .into_iter()
            .map(|price| {
                let slot = last.entry((price.chain.clone(), price.address.clone())).or_insert(0);
                let observed = price.observed_at_ms.saturating_add(self.settings.clock_offset_ms);
                // A floor further ahead than the allowed skew was stamped by a clock that has
                // since stepped back: every node refused it, so it holds nothing up.
                let skew_ms = self.settings.max_clock_skew.as_millis() as i64;
                if *slot > observed.saturating_add(skew_ms) {
                    *slot = 0;
                }
                let timestamp_ms = observed.max(*slot + 1);
                *slot = timestamp_ms;
                PriceUpdate {
                    asset: price.address,
                    blockchain: price.chain,
                    price: price.value,
                    timestamp_ms,
                    change_24h: price.change_24h,
                    source_timestamp_ms: source_time_ms(price.update_unix_time, timestamp_ms),
                }
            })
            .collect()
    }
}

/// The source's update time (`updateUnixTime`, seconds) in Unix milliseconds, never later
/// than the fetch: a source clock ahead of ours must not make a price look newer than it is
/// fetched, nor be rejected as from the future. `None` when absent or not a positive time.
fn source_time_ms(update_unix_time: Option<i64>, fetched_ms: i64) -> Option<i64> {
    let secs = update_unix_time.filter(|s| *s > 0)?;
    Some(secs.saturating_mul(1000).min(fetched_ms))
}

/// Counts a fetched round in the status and metrics; `true` when provider mode must stop.
fn record(inner: &Inner, decision: &RoundDecision, outcome: RoundOutcome) -> bool {
    let now = inner.now_ms();
    match outcome {
        RoundOutcome::Fetched { assets, missing, peers } => {
            let via = match decision.via {
                Via::Lease => "lease",
                Via::Mesh => "mesh",
                Via::Single => "single",
            };
            metrics::counter!(telemetry::ROUNDS_FETCHED_TOTAL, "via" => via).increment(1);
            modify(&inner.status, |s| {
                s.rounds_fetched += 1;
                if decision.via != Via::Lease {
                    s.rounds_fetched_uncoordinated += 1;
                }
                s.last_fetch_unix_ms = Some(now);
                s.last_fetch =
                    Some(FetchOutcome::Fetched { round: decision.round, assets, missing, peers });
            });
            false
        }
        RoundOutcome::Failed(error) => {
            let kind = error.kind();
            metrics::counter!(telemetry::ROUNDS_FAILED_TOTAL, "reason" => kind).increment(1);
            tracing::warn!(round = decision.round, error = %error, "provider round failed; nothing sent for it");
            let message = error.to_string();
            modify(&inner.status, |s| {
                s.rounds_failed += 1;
                s.last_fetch_unix_ms = Some(now);
                s.last_fetch =
                    Some(FetchOutcome::Failed { round: decision.round, error: message.clone() });
                s.last_error = Some(message);
            });
            false
        }
        RoundOutcome::KeyRejected(error) => {
            metrics::counter!(telemetry::ROUNDS_FAILED_TOTAL, "reason" => error.kind())
                .increment(1);
            count_key_rejection(&error);
            let reason = error.to_string();
            tracing::error!(round = decision.round, reason = %reason, "Birdeye refused the API key; provider mode stopped");
            modify(&inner.status, |s| {
                s.enabled = false;
                s.reason = Some(reason.clone());
                s.rounds_failed += 1;
                s.last_fetch_unix_ms = Some(now);
                s.last_fetch =
                    Some(FetchOutcome::Failed { round: decision.round, error: reason.clone() });
                s.last_error = Some(reason);
                s.next_round = None;
                s.next_round_unix_ms = None;
            });
            true
        }
    }
}

/// A key Birdeye refused while provider mode ran or resumed: provider mode is off for it, which
/// `mesh_provider_key_rejected` shows (alert `MeshProviderKeyRejected`).
fn count_key_rejection(error: &client::Error) {
    let status = match error {
        client::Error::InvalidKey => "401",
        _ => "403",
    };
    metrics::counter!(telemetry::KEY_REJECTIONS_TOTAL, "status" => status).increment(1);
    metrics::gauge!(telemetry::KEY_REJECTED).set(1.0);
}
