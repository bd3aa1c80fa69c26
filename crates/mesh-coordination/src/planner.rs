//! The round loop's decision: which round is next, this node's rank in it, and whether it
//! fetches.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_protocol::NodeId;
use sha2::{Digest, Sha256};

use crate::clock::{ClockCheck, ClockVerdict, Reference};
use crate::{Coordination, Error, Lease, MeshView, Result};

/// Wall-clock time in Unix milliseconds: rounds are numbered by the wall clock, which every
/// provider shares, while the planner sleeps with `tokio::time`.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn unix_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// The system's wall clock shifted by a fixed offset: a node playing a wrong clock in tests
/// (the node configuration's `clock_offset_ms`); `OffsetClock(0)` is [`SystemClock`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OffsetClock(pub i64);

impl Clock for OffsetClock {
    fn unix_ms(&self) -> u64 {
        (SystemClock.unix_ms() as i64).saturating_add(self.0).max(0) as u64
    }
}

/// A wall clock that moves with `tokio::time` (from a given start), so that tests with paused
/// time run many rounds in no time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start_unix_ms: u64,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `start_unix_ms` now.
    pub fn starting_at(start_unix_ms: u64) -> Self {
        Self { start_unix_ms, start: tokio::time::Instant::now() }
    }
}

impl Clock for TokioClock {
    fn unix_ms(&self) -> u64 {
        self.start_unix_ms + self.start.elapsed().as_millis() as u64
    }
}

/// Round timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannerConfig {
    /// Length of a round (`MESH_PROVIDER_FETCH_INTERVAL_SECS`, 10-300 s in production).
    pub interval: Duration,
    /// Delay between consecutive ranks (`MESH_COORDINATION_WINDOW_SECS`, 2-30 s).
    pub window: Duration,
    /// How long a heartbeat keeps a provider registered; renewed every round.
    pub heartbeat_ttl: Duration,
}

impl PlannerConfig {
    /// Rounds of `interval`, ranks `window` apart, heartbeats valid for three rounds.
    pub fn new(interval: Duration, window: Duration) -> Self {
        Self { interval, window, heartbeat_ttl: interval * 3 }
    }

    /// Checks that the timing can work: a window of at least 1 ms, shorter than the interval,
    /// and a heartbeat that outlives a round.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, value: Duration, reason: &str| Error::Config {
            name,
            value: format!("{value:?}"),
            reason: reason.to_owned(),
        };
        if self.window < Duration::from_millis(1) {
            return Err(bad("window", self.window, "must be at least 1 ms"));
        }
        if self.window >= self.interval {
            return Err(bad("window", self.window, "must be shorter than the fetch interval"));
        }
        if self.heartbeat_ttl <= self.interval {
            return Err(bad("heartbeat_ttl", self.heartbeat_ttl, "must exceed the fetch interval"));
        }
        Ok(())
    }

    fn interval_ms(&self) -> u64 {
        (self.interval.as_millis() as u64).max(1)
    }

    fn window_ms(&self) -> u64 {
        (self.window.as_millis() as u64).max(1)
    }

    /// Delay of `rank` after the round start: `rank x window`, but never past the last window
    /// of the round (ranks beyond it all try there, and the lease picks one).
    fn slot_offset_ms(&self, rank: usize) -> u64 {
        let last = (self.interval_ms() - 1) / self.window_ms() * self.window_ms();
        (rank as u64).saturating_mul(self.window_ms()).min(last)
    }
}

/// How a decision was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through the round lease of the coordination store.
    Lease,
    /// Store unavailable: ranked over the providers known from the mesh.
    Mesh,
    /// Store unavailable and no other provider known: this node alone.
    Single,
}

/// Why a round is not fetched by this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Another provider holds the round's lease.
    LeaseHeld,
    /// A fresh batch for the round already arrived through the mesh.
    Fulfilled,
    /// This node's clock is off by more than the allowed skew ([`ClockCheck`]): it takes no
    /// lease and publishes nothing.
    ClockSkew,
}

/// Why a round leased to another provider counts as undelivered (and is taken over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undelivered {
    /// No valid batch of the round arrived one window after the lease was taken.
    NotDelivered,
    /// The lease is held by no registered provider (a stale or hand-written key).
    Unregistered,
    /// The key carries no lease's expiry: it was not taken by a provider (squatted).
    NoExpiry,
}

impl Undelivered {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Undelivered::NotDelivered => "not_delivered",
            Undelivered::Unregistered => "unregistered",
            Undelivered::NoExpiry => "no_expiry",
        }
    }
}

/// What the planner knows at its slot when the round's lease is held by someone else.
#[derive(Debug, Clone, Copy)]
pub struct LeaseObservation<'a> {
    /// The lease as read (at `observed_at_ms`).
    pub lease: &'a Lease,
    /// When it was read (this node's clock, Unix ms).
    pub observed_at_ms: u64,
    /// The registered providers (the ranking).
    pub registered: &'a [NodeId],
    /// `true` when a valid batch of the round from a ranked provider arrived.
    pub delivered: bool,
    /// The rank window: how long a holder has to deliver after taking the lease.
    pub window: Duration,
    /// The end of the round (this node's clock, Unix ms): no take-over after it.
    pub round_end_ms: u64,
}

/// The lease decision at `now_ms` ([`lease_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStep {
    /// This node holds the lease: fetch.
    Fetch,
    /// The round's batch arrived (or the round is over): nothing to do.
    Skip(SkipReason),
    /// The holder still has this long to deliver: look again then.
    Wait(Duration),
    /// The holder did not deliver (or cannot): take the round over and fetch.
    TakeOver(Undelivered),
}

/// The lease decision, without I/O: held, delivered, or take over (issue 34 item 1).
///
/// A delivered round is skipped; a lease of this node is fetched; a lease held by no
/// registered provider, or without a lease's expiry, is taken over at once; a registered
/// holder gets one window from when it took the lease (by the store's clock, plus the time
/// since it was read) before the round is taken over. Nothing is taken over once the round
/// has ended.
pub fn lease_step(observation: &LeaseObservation<'_>, now_ms: u64) -> LeaseStep {
    let o = observation;
    if o.delivered {
        return LeaseStep::Skip(SkipReason::Fulfilled);
    }
    if o.lease.mine {
        return LeaseStep::Fetch;
    }
    if now_ms >= o.round_end_ms {
        return LeaseStep::Skip(SkipReason::LeaseHeld);
    }
    match o.lease.holder() {
        Some(holder) if o.registered.contains(&holder) => {}
        _ => return LeaseStep::TakeOver(Undelivered::Unregistered),
    }
    let Some(age) = o.lease.age else {
        return LeaseStep::TakeOver(Undelivered::NoExpiry);
    };
    let age = age + Duration::from_millis(now_ms.saturating_sub(o.observed_at_ms));
    if age >= o.window {
        return LeaseStep::TakeOver(Undelivered::NotDelivered);
    }
    let until_end = Duration::from_millis(o.round_end_ms - now_ms);
    LeaseStep::Wait((o.window - age).min(until_end))
}

/// What [`RoundPlanner::next`] decided for one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundDecision {
    /// The round.
    pub round: u64,
    /// This node's rank in it (0 fetches first).
    pub rank: usize,
    /// The providers ranked, this node included, rank 0 first.
    pub providers: Vec<NodeId>,
    /// `true` when this node fetches the round.
    pub fetch: bool,
    /// How the decision was reached.
    pub via: Via,
    /// Why not, when `fetch` is `false`.
    pub skip_reason: Option<SkipReason>,
    /// `true` when this node fetches a round whose lease another provider held and did not
    /// deliver.
    pub taken_over: bool,
    /// Set when the round's lease was held by another provider (or squatted) and its batch had
    /// not arrived in time: why.
    pub undelivered: Option<Undelivered>,
    /// The clock check at the slot (`None` without a [`ClockCheck`]).
    pub clock: Option<ClockVerdict>,
    /// When the round started (Unix ms).
    pub round_start_unix_ms: u64,
    /// When the decision was taken (Unix ms), at this node's slot.
    pub decided_at_unix_ms: u64,
}

/// Decides, round after round, whether this node fetches.
pub struct RoundPlanner {
    config: PlannerConfig,
    node: NodeId,
    coordination: Arc<dyn Coordination>,
    mesh: Arc<dyn MeshView>,
    clock: Arc<dyn Clock>,
    last_round: Mutex<Option<u64>>,
    falling_back: AtomicBool,
    clock_check: Option<Arc<Mutex<ClockCheck>>>,
    /// `true` while this node left the registry because its clock is off.
    withdrawn: AtomicBool,
}

impl std::fmt::Debug for RoundPlanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundPlanner")
            .field("config", &self.config)
            .field("node", &self.node)
            .field("last_round", &self.last_round)
            .finish_non_exhaustive()
    }
}

impl RoundPlanner {
    /// A planner for `node` using `coordination` and, while it fails, `mesh`.
    pub fn new(
        config: PlannerConfig,
        node: NodeId,
        coordination: Arc<dyn Coordination>,
        mesh: Arc<dyn MeshView>,
    ) -> Self {
        Self {
            config,
            node,
            coordination,
            mesh,
            clock: Arc::new(SystemClock),
            last_round: Mutex::new(None),
            falling_back: AtomicBool::new(false),
            clock_check: None,
            withdrawn: AtomicBool::new(false),
        }
    }

    /// The same planner judging its clock with `check` (fed here with the store's `TIME`):
    /// while the clock is off, it neither registers nor takes leases nor fetches.
    pub fn with_clock_check(mut self, check: Arc<Mutex<ClockCheck>>) -> Self {
        self.clock_check = Some(check);
        self
    }

    /// Feeds the store's last `TIME` to the clock check and judges the clock now.
    fn judge_clock(&self) -> Option<ClockVerdict> {
        let check = self.clock_check.as_ref()?;
        let mut check = check.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = self.clock.unix_ms() as i64;
        if let Some(time) = self.coordination.store_time() {
            // The reading was taken half a round trip before the answer arrived.
            let since = time.received.elapsed() + time.round_trip / 2;
            let local = now.saturating_sub(since.as_millis() as i64);
            check.observe(Reference::Store, time.unix_ms as i64, local);
        }
        Some(check.verdict(now))
    }

    fn clock_is_off(&self) -> bool {
        self.clock_check.as_ref().is_some_and(|check| {
            let mut check = check.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            check.verdict(self.clock.unix_ms() as i64).off
        })
    }

    /// The same planner reading the wall clock from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// This node.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The timing.
    pub fn config(&self) -> PlannerConfig {
        self.config
    }

    /// `true` while the coordination store is unavailable (decisions then come from the mesh).
    pub fn is_degraded(&self) -> bool {
        self.coordination.is_degraded()
    }

    /// The round of a Unix time: `floor(unix_secs / interval_secs)`.
    pub fn round_of(unix_secs: u64, interval_secs: u64) -> u64 {
        unix_secs / interval_secs.max(1)
    }

    /// The round of a Unix time in milliseconds with this planner's interval (the same number
    /// as [`RoundPlanner::round_of`] for whole-second intervals; sub-second ones serve tests).
    pub fn round_at(&self, unix_ms: u64) -> u64 {
        unix_ms / self.config.interval_ms()
    }

    /// `providers` (duplicates removed) in rank order for `round`: by SHA-256 of the round
    /// (8 bytes, big-endian) followed by the node id's 16 bytes, lowest first.
    pub fn ranking(round: u64, providers: &[NodeId]) -> Vec<NodeId> {
        let mut keyed: Vec<([u8; 32], NodeId)> = providers
            .iter()
            .map(|node| {
                let mut hash = Sha256::new();
                hash.update(round.to_be_bytes());
                hash.update(node.as_uuid().as_bytes());
                (hash.finalize().into(), *node)
            })
            .collect();
        keyed.sort_unstable();
        keyed.dedup_by(|a, b| a.1 == b.1);
        keyed.into_iter().map(|(_, node)| node).collect()
    }

    /// The rank of `node` in `round` among `providers` (`node` counted even when absent).
    pub fn rank(round: u64, node: NodeId, providers: &[NodeId]) -> usize {
        let mut all = providers.to_vec();
        all.push(node);
        Self::ranking(round, &all).iter().position(|n| *n == node).unwrap_or(0)
    }

    /// Sleeps until the wall clock reads `slot`, in steps of at most a window that each read
    /// the clock again; `false` when the clock went back so far that `slot` is more than two
    /// rounds away (the caller plans again instead of sleeping for the length of the step).
    async fn sleep_until(&self, slot: u64) -> bool {
        let limit = 2 * self.config.interval_ms() + self.config.window_ms();
        // Each step sleeps a window or ends the wait: bounded by limit / window + 1 steps.
        for _ in 0..=limit / self.config.window_ms() + 1 {
            let now = self.clock.unix_ms();
            if slot <= now {
                return true;
            }
            let left = slot - now;
            if left > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(left.min(self.config.window_ms()))).await;
        }
        true
    }

    /// Renews this node's heartbeat now; `false` when the store is unavailable. [`Self::next`]
    /// does it every round; call it once at start so that others rank this node at once.
    pub async fn register(&self) -> bool {
        self.coordination.heartbeat(self.node, self.config.heartbeat_ttl).await.is_ok()
    }

    /// Removes this node from the registry (provider mode disabled). Errors are ignored: the
    /// heartbeat expires anyway.
    pub async fn leave(&self) {
        if let Err(error) = self.coordination.deregister(self.node).await {
            tracing::debug!(%error, "deregistering failed; the heartbeat will expire");
        }
    }

    /// Waits (with `tokio::time`) until this node's slot in the next round it has not decided
    /// yet, and decides whether it fetches that round. Never fails: when the coordination
    /// store does, the decision comes from the mesh view.
    pub async fn next(&self) -> RoundDecision {
        let interval_ms = self.config.interval_ms();
        let mut attempt = 0;
        let (round, round_start, ranking, rank, coordinated) = 'plan: loop {
            attempt += 1;
            let (providers, mut coordinated) = self.providers().await;
            let now = self.clock.unix_ms();
            let mut round = self.round_at(now);
            if let Some(last) = *self.lock_last() {
                if last > round + 1 {
                    // The wall clock went back by more than a round (an NTP step, a VM
                    // resumed): follow it rather than wait for the rounds already decided.
                    tracing::warn!(
                        last_round = last,
                        round,
                        "wall clock stepped back; rounds follow it"
                    );
                } else {
                    round = round.max(last + 1);
                }
            }
            let mut ranking = Self::ranking(round, &providers);
            let mut rank = position(&ranking, self.node);
            // Our slot in the current round is over (we came late): take the next round.
            if now
                >= round * interval_ms + self.config.slot_offset_ms(rank) + self.config.window_ms()
            {
                round += 1;
                ranking = Self::ranking(round, &providers);
                rank = position(&ranking, self.node);
            }
            let round_start = round * interval_ms;
            let mut slot = round_start + self.config.slot_offset_ms(rank);
            // The list was read up to a round ago: a provider that registered (or restarted)
            // since may rank before us. Read it again at our slot; if our rank changed, move
            // to the new slot (at once when it is earlier, after a wait when it is later).
            for refresh in 0..3 {
                if !self.sleep_until(slot).await && attempt < 4 {
                    *self.lock_last() = None;
                    continue 'plan;
                }
                if refresh == 2 {
                    break;
                }
                let (fresh, fresh_coordinated) = self.providers().await;
                coordinated = fresh_coordinated;
                let fresh_ranking = Self::ranking(round, &fresh);
                let unchanged = fresh_ranking == ranking;
                ranking = fresh_ranking;
                rank = position(&ranking, self.node);
                slot = round_start + self.config.slot_offset_ms(rank);
                if unchanged || slot <= self.clock.unix_ms() {
                    break;
                }
            }
            break (round, round_start, ranking, rank, coordinated);
        };
        // Only now: a call cancelled while it waited leaves its round to the next call.
        *self.lock_last() = Some(round);

        let round_end = round_start + interval_ms;
        let clock = self.judge_clock();
        let leased = if clock.is_some_and(|v| v.off) {
            // No lease, no fetch: every node would refuse the batch, or it would belong to the
            // wrong round.
            Some((false, Via::Lease, Some(SkipReason::ClockSkew), false, None))
        } else if coordinated {
            self.decide_by_lease(round, &ranking, round_end).await
        } else {
            None
        };
        let (fetch, via, skip_reason, taken_over, undelivered) = match leased {
            Some(outcome) => outcome,
            None => {
                let via = if ranking.len() > 1 { Via::Mesh } else { Via::Single };
                if self.delivered(round, &ranking) {
                    (false, via, Some(SkipReason::Fulfilled), false, None)
                } else {
                    (true, via, None, false, None)
                }
            }
        };
        let decision = RoundDecision {
            round,
            rank,
            providers: ranking,
            fetch,
            via,
            skip_reason,
            taken_over,
            undelivered,
            clock,
            round_start_unix_ms: round_start,
            decided_at_unix_ms: self.clock.unix_ms(),
        };
        tracing::debug!(
            round,
            rank,
            providers = decision.providers.len(),
            fetch,
            via = ?via,
            skip = ?skip_reason,
            taken_over,
            undelivered = ?undelivered,
            "round decided"
        );
        decision
    }

    /// The decision through the round's lease ([`lease_step`]), or `None` when the store
    /// fails (the mesh decides then).
    async fn decide_by_lease(
        &self,
        round: u64,
        ranking: &[NodeId],
        round_end: u64,
    ) -> Option<(bool, Via, Option<SkipReason>, bool, Option<Undelivered>)> {
        let mut undelivered = None;
        // Each pass either decides or waits for the holder's window; a window is shorter
        // than the round, and a failed take-over (another rank took it first) waits for the
        // new holder's window: a few passes end the round.
        for _ in 0..8 {
            let delivered = self.delivered(round, ranking);
            let lease = if delivered {
                // No need to ask the store.
                Lease { value: String::new(), mine: false, age: None }
            } else {
                match self
                    .coordination
                    .try_acquire_round(round, self.node, self.config.interval)
                    .await
                {
                    Ok(lease) => lease,
                    Err(error) => {
                        tracing::debug!(round, %error, "round lease unavailable; deciding from the mesh");
                        return None;
                    }
                }
            };
            let observation = LeaseObservation {
                lease: &lease,
                observed_at_ms: self.clock.unix_ms(),
                registered: ranking,
                delivered,
                window: self.config.window,
                round_end_ms: round_end,
            };
            match lease_step(&observation, self.clock.unix_ms()) {
                LeaseStep::Fetch => return Some((true, Via::Lease, None, false, undelivered)),
                LeaseStep::Skip(reason) => {
                    return Some((false, Via::Lease, Some(reason), false, undelivered));
                }
                LeaseStep::Wait(wait) => {
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await
                }
                LeaseStep::TakeOver(why) => {
                    undelivered = Some(why);
                    tracing::info!(
                        round,
                        holder = %lease.value,
                        reason = why.label(),
                        "round leased but not delivered; taking it over"
                    );
                    match self
                        .coordination
                        .take_over_round(round, self.node, &lease.value, self.config.interval)
                        .await
                    {
                        Ok(true) => return Some((true, Via::Lease, None, true, undelivered)),
                        // Another rank took it over first: its window starts now.
                        Ok(false) => {}
                        Err(error) => {
                            tracing::debug!(round, %error, "round take-over failed; deciding from the mesh");
                            return None;
                        }
                    }
                }
            }
        }
        Some((false, Via::Lease, Some(SkipReason::LeaseHeld), false, undelivered))
    }

    /// Renews the heartbeat and lists the registered providers (`true`), or, when the store
    /// fails, the providers the mesh announced (`false`); this node is always included.
    async fn providers(&self) -> (Vec<NodeId>, bool) {
        let registered = if self.clock_is_off() {
            // Out of the ranking while the clock is off, so that the others do not wait a
            // window for this node every round.
            if !self.withdrawn.swap(true, Ordering::Relaxed) {
                self.leave().await;
            }
            self.coordination.active_providers().await
        } else {
            self.withdrawn.store(false, Ordering::Relaxed);
            match self.coordination.heartbeat(self.node, self.config.heartbeat_ttl).await {
                Ok(()) => self.coordination.active_providers().await,
                Err(error) => Err(error),
            }
        };
        let (mut providers, coordinated) = match registered {
            Ok(mut providers) => {
                if self.withdrawn.load(Ordering::Relaxed) {
                    providers.retain(|n| *n != self.node);
                }
                if self.falling_back.swap(false, Ordering::Relaxed) {
                    tracing::info!("coordination store back; rounds decided by lease again");
                }
                (providers, true)
            }
            Err(crate::Error::NotConfigured) => {
                if !self.falling_back.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "no coordination store configured; rounds are coordinated through the mesh"
                    );
                }
                (self.mesh.providers(), false)
            }
            Err(error) => {
                if !self.falling_back.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "coordination store unavailable; ranking providers known from the mesh");
                }
                (self.mesh.providers(), false)
            }
        };
        if !providers.contains(&self.node) {
            providers.push(self.node);
        }
        (providers, coordinated)
    }

    /// `true` when a valid batch for `round` from a provider in `ranking` (other than this
    /// node) arrived: a batch from anyone else, however valid, does not stop this node.
    fn delivered(&self, round: u64, ranking: &[NodeId]) -> bool {
        self.mesh
            .round_origins(round)
            .iter()
            .any(|origin| *origin != self.node && ranking.contains(origin))
    }

    fn lock_last(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        // A plain number: valid even if a holder panicked.
        self.last_round.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn position(ranking: &[NodeId], node: NodeId) -> usize {
    ranking.iter().position(|n| *n == node).unwrap_or(ranking.len())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::clock::{ClockCheck, Reference};
    use crate::{MemoryCoordination, NoMesh};

    const START_MS: u64 = 1_750_000_000_000;

    fn node(n: u128) -> NodeId {
        NodeId::from_uuid(uuid::Uuid::from_u128(n))
    }

    fn config() -> PlannerConfig {
        PlannerConfig::new(Duration::from_secs(30), Duration::from_secs(5))
    }

    fn planner(
        config: PlannerConfig,
        id: NodeId,
        coordination: Arc<dyn Coordination>,
        mesh: Arc<dyn MeshView>,
        clock: TokioClock,
    ) -> Arc<RoundPlanner> {
        Arc::new(RoundPlanner::new(config, id, coordination, mesh).with_clock(Arc::new(clock)))
    }

    /// Runs `planner` until it has decided a round `>= until`, calling `on_fetch` for rounds
    /// it fetches (the broadcast, in tests with a mesh).
    fn run(
        planner: Arc<RoundPlanner>,
        until: u64,
        on_fetch: impl Fn(u64) + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<RoundDecision>> {
        tokio::spawn(async move {
            let mut decisions = Vec::new();
            loop {
                let decision = planner.next().await;
                if decision.fetch {
                    on_fetch(decision.round);
                }
                let round = decision.round;
                decisions.push(decision);
                if round >= until {
                    return decisions;
                }
            }
        })
    }

    fn winners_by_round(all: &[RoundDecision]) -> BTreeMap<u64, Vec<&RoundDecision>> {
        let mut rounds: BTreeMap<u64, Vec<&RoundDecision>> = BTreeMap::new();
        for d in all {
            let entry = rounds.entry(d.round).or_default();
            if d.fetch {
                entry.push(d);
            }
        }
        rounds
    }

    #[test]
    fn rounds_and_ranks_follow_the_formula() {
        assert_eq!(RoundPlanner::round_of(1_750_000_015, 30), 58_333_333);
        assert_eq!(RoundPlanner::round_of(1_750_000_020, 30), 58_333_334);
        let nodes: Vec<NodeId> = (1..=5).map(node).collect();
        let mut first_places = HashSet::new();
        for round in 0..200 {
            let ranking = RoundPlanner::ranking(round, &nodes);
            let mut sorted = ranking.clone();
            sorted.sort();
            assert_eq!(sorted, nodes, "a ranking is a permutation");
            assert_eq!(
                RoundPlanner::ranking(round, &[nodes.clone(), nodes.clone()].concat()),
                ranking
            );
            for (k, n) in ranking.iter().enumerate() {
                assert_eq!(RoundPlanner::rank(round, *n, &nodes), k);
            }
            first_places.insert(ranking[0]);
        }
        assert_eq!(first_places.len(), 5, "every provider is rank 0 in some rounds");
        // The hash input is the round's 8 big-endian bytes then the 16 id bytes.
        let mut hash = Sha256::new();
        hash.update(7u64.to_be_bytes());
        hash.update(node(1).as_uuid().as_bytes());
        let one: [u8; 32] = hash.finalize().into();
        let mut hash = Sha256::new();
        hash.update(7u64.to_be_bytes());
        hash.update(node(2).as_uuid().as_bytes());
        let two: [u8; 32] = hash.finalize().into();
        let expected = if one < two { vec![node(1), node(2)] } else { vec![node(2), node(1)] };
        assert_eq!(RoundPlanner::ranking(7, &[node(1), node(2)]), expected);
    }

    #[test]
    fn config_is_validated() {
        assert!(config().validate().is_ok());
        let mut bad = config();
        bad.window = bad.interval;
        assert!(
            bad.validate().unwrap_err().to_string().contains("shorter than the fetch interval")
        );
        let mut bad = config();
        bad.heartbeat_ttl = bad.interval;
        assert!(bad.validate().is_err());
        assert_eq!(config().slot_offset_ms(2), 10_000);
        assert_eq!(config().slot_offset_ms(100), 25_000, "capped at the last window");
    }

    #[tokio::test(start_paused = true)]
    async fn three_providers_take_turns_one_winner_per_round() {
        let clock = TokioClock::starting_at(START_MS);
        let shared: Arc<dyn Coordination> = Arc::new(MemoryCoordination::new());
        let mesh = Mesh::new(Vec::new());
        let planners: Vec<_> = (1..=3)
            .map(|n| planner(config(), node(n), Arc::clone(&shared), mesh.view(), clock))
            .collect();
        for p in &planners {
            assert!(p.register().await);
        }
        let first = planners[0].round_at(START_MS) + 1;
        let last = first + 49;
        let tasks: Vec<_> =
            planners.iter().map(|p| run(Arc::clone(p), last, mesh.delivers(p))).collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let rounds = winners_by_round(&all);
        let mut wins = BTreeMap::new();
        for round in first..=last {
            let winners = &rounds[&round];
            assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
            let w = winners[0];
            assert_eq!((w.rank, w.via), (0, Via::Lease));
            assert_eq!(w.decided_at_unix_ms, w.round_start_unix_ms, "rank 0 at the round start");
            assert_eq!(w.providers.len(), 3);
            *wins.entry(w.providers[0]).or_insert(0) += 1;
        }
        assert_eq!(wins.len(), 3, "every provider wins some rounds: {wins:?}");
        for d in all.iter().filter(|d| !d.fetch && d.round >= first) {
            assert_eq!(d.skip_reason, Some(SkipReason::Fulfilled));
            assert_eq!(d.undelivered, None);
            let offset = d.decided_at_unix_ms - d.round_start_unix_ms;
            assert_eq!(offset, d.rank as u64 * 5_000, "rank k decides k windows in");
        }
    }

    /// A provider that registers while another waits for a round (a restart after its
    /// registration expired) takes that round when it ranks first: the waiting one reads the
    /// list again at its slot and moves to rank 1.
    #[tokio::test(start_paused = true)]
    async fn a_provider_registered_during_the_wait_takes_its_round() {
        let clock = TokioClock::starting_at(START_MS);
        let shared: Arc<dyn Coordination> = Arc::new(MemoryCoordination::new());
        let mesh = Mesh::new(Vec::new());
        let early = planner(config(), node(1), Arc::clone(&shared), mesh.view(), clock);
        let late = planner(config(), node(2), Arc::clone(&shared), mesh.view(), clock);
        early.register().await;
        // A round ahead in which the late provider ranks first, at least a round away.
        let now_round = early.round_at(clock.unix_ms());
        let round = (now_round + 2..)
            .find(|r| RoundPlanner::ranking(*r, &[node(1), node(2)])[0] == node(2))
            .unwrap();
        // The early provider decides every round up to that one, alone until just before it.
        let early_task = run(Arc::clone(&early), round, mesh.delivers(&early));
        let round_start = round * 30_000;
        tokio::time::sleep(Duration::from_millis(round_start - 4_000 - clock.unix_ms())).await;
        late.register().await;
        let late_decision = late.next().await;
        (mesh.delivers(&late))(late_decision.round);
        let early_decisions = early_task.await.unwrap();
        let early_decision = early_decisions.iter().find(|d| d.round == round).unwrap();
        assert_eq!(late_decision.round, round);
        assert!(late_decision.fetch, "{late_decision:?}");
        assert_eq!(late_decision.rank, 0);
        assert!(!early_decision.fetch, "{early_decision:?}");
        assert_eq!(early_decision.rank, 1);
        assert_eq!(early_decision.skip_reason, Some(SkipReason::Fulfilled));
        assert_eq!(early_decision.decided_at_unix_ms, round_start + 5_000, "one window in");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_rank_zero_is_replaced_one_window_later() {
        let clock = TokioClock::starting_at(START_MS);
        // Long heartbeats: the dead provider stays registered while we watch.
        let config = PlannerConfig { heartbeat_ttl: Duration::from_secs(3_600), ..config() };
        let shared: Arc<dyn Coordination> = Arc::new(MemoryCoordination::new());
        let mesh = Mesh::new(Vec::new());
        let planners: Vec<_> = (1..=3)
            .map(|n| planner(config, node(n), Arc::clone(&shared), mesh.view(), clock))
            .collect();
        for p in &planners {
            p.register().await;
        }
        // node(1) never runs: registered, then dead.
        let first = planners[0].round_at(START_MS) + 1;
        let last = first + 29;
        let tasks: Vec<_> =
            planners[1..].iter().map(|p| run(Arc::clone(p), last, mesh.delivers(p))).collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let rounds = winners_by_round(&all);
        let mut taken_over = 0;
        for round in first..=last {
            let winners = &rounds[&round];
            assert_eq!(winners.len(), 1, "round {round}");
            let w = winners[0];
            let offset = w.decided_at_unix_ms - w.round_start_unix_ms;
            if w.providers[0] == node(1) {
                taken_over += 1;
                assert_eq!((w.rank, offset), (1, 5_000), "round {round}: one window later");
            } else {
                assert_eq!((w.rank, offset), (0, 0));
            }
        }
        assert!(taken_over >= 3, "node 1 was rank 0 in {taken_over} of 30 rounds");
    }

    #[test]
    fn the_lease_step_skips_fetches_waits_or_takes_over() {
        let registered = [node(1), node(2)];
        let held = |value: String, age_ms: Option<u64>| Lease {
            value,
            mine: false,
            age: age_ms.map(Duration::from_millis),
        };
        let by_one = held(node(1).to_string(), Some(2_000));
        let step = |lease: &Lease, delivered: bool, now_ms: u64| {
            let observation = LeaseObservation {
                lease,
                observed_at_ms: 100_000,
                registered: &registered,
                delivered,
                window: Duration::from_secs(5),
                round_end_ms: 130_000,
            };
            lease_step(&observation, now_ms)
        };
        assert_eq!(step(&by_one, true, 100_000), LeaseStep::Skip(SkipReason::Fulfilled));
        let mine = Lease { mine: true, ..by_one.clone() };
        assert_eq!(step(&mine, false, 100_000), LeaseStep::Fetch);
        // Taken 2 s ago: 3 s left to deliver, then 1 s after a 2 s pause, then none.
        assert_eq!(step(&by_one, false, 100_000), LeaseStep::Wait(Duration::from_secs(3)));
        assert_eq!(step(&by_one, false, 102_000), LeaseStep::Wait(Duration::from_secs(1)));
        assert_eq!(step(&by_one, false, 103_000), LeaseStep::TakeOver(Undelivered::NotDelivered));
        // Not a registered provider, or no expiry: at once.
        let stranger = held(node(7).to_string(), Some(0));
        assert_eq!(step(&stranger, false, 100_000), LeaseStep::TakeOver(Undelivered::Unregistered));
        let junk = held("junk".into(), Some(0));
        assert_eq!(step(&junk, false, 100_000), LeaseStep::TakeOver(Undelivered::Unregistered));
        let forever = held(node(2).to_string(), None);
        assert_eq!(step(&forever, false, 100_000), LeaseStep::TakeOver(Undelivered::NoExpiry));
        // The round is over: nothing is taken over, and a wait never outlasts the round.
        assert_eq!(step(&stranger, false, 130_000), LeaseStep::Skip(SkipReason::LeaseHeld));
        let late = LeaseObservation {
            lease: &by_one,
            observed_at_ms: 129_500,
            registered: &registered,
            delivered: false,
            window: Duration::from_secs(5),
            round_end_ms: 130_000,
        };
        assert_eq!(lease_step(&late, 129_500), LeaseStep::Wait(Duration::from_millis(500)));
    }

    /// Issue 34 item 1: a holder that takes the lease and never delivers (its Birdeye call
    /// failed, it crashed, its batch was refused) costs at most one window: the next rank
    /// takes the round over.
    #[tokio::test(start_paused = true)]
    async fn a_lease_holder_that_never_delivers_is_taken_over_one_window_later() {
        let clock = TokioClock::starting_at(START_MS);
        let shared: Arc<dyn Coordination> = Arc::new(MemoryCoordination::new());
        let mesh = Mesh::new(Vec::new());
        let planners: Vec<_> = (1..=3)
            .map(|n| planner(config(), node(n), Arc::clone(&shared), mesh.view(), clock))
            .collect();
        for p in &planners {
            p.register().await;
        }
        let first = planners[0].round_at(START_MS) + 1;
        let last = first + 29;
        // node(1) fetches when it wins but its batches never arrive.
        let tasks: Vec<_> = planners
            .iter()
            .map(|p| {
                let deliver = mesh.delivers(p);
                let silent = p.node_id() == node(1);
                run(Arc::clone(p), last, move |round| {
                    if !silent {
                        deliver(round);
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let rounds = winners_by_round(&all);
        let mut taken_over = 0;
        for round in first..=last {
            let winners = &rounds[&round];
            if winners[0].providers[0] == node(1) {
                // The silent holder and one taker, one window later.
                assert_eq!(winners.len(), 2, "round {round}: {winners:?}");
                let taker = winners.iter().find(|d| d.taken_over).unwrap();
                assert_eq!(taker.undelivered, Some(Undelivered::NotDelivered));
                assert_eq!(taker.decided_at_unix_ms - taker.round_start_unix_ms, 5_000);
                taken_over += 1;
            } else {
                assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
                assert!(!winners[0].taken_over);
            }
        }
        assert!(taken_over >= 3, "node 1 was rank 0 in {taken_over} of 30 rounds");
    }

    /// Round keys written ahead by someone with access to the store (a node id that is not
    /// registered, junk, a registered id without expiry) stop nobody: rank 0 takes them over.
    #[tokio::test(start_paused = true)]
    async fn squatted_round_keys_are_taken_over() {
        let clock = TokioClock::starting_at(START_MS);
        let store = Arc::new(MemoryCoordination::new());
        let shared: Arc<dyn Coordination> = store.clone();
        let mesh = Mesh::new(Vec::new());
        let planners: Vec<_> = (1..=2)
            .map(|n| planner(config(), node(n), Arc::clone(&shared), mesh.view(), clock))
            .collect();
        for p in &planners {
            p.register().await;
        }
        let first = planners[0].round_at(START_MS) + 1;
        let squats = [node(9).to_string(), "junk".to_owned(), node(2).to_string()];
        for (i, value) in squats.iter().enumerate() {
            let expiry = (i < 2).then_some(Duration::from_secs(3_600));
            store.set_lease(first + i as u64, value, Duration::ZERO, expiry);
        }
        let last = first + 2;
        let tasks: Vec<_> =
            planners.iter().map(|p| run(Arc::clone(p), last, mesh.delivers(p))).collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let rounds = winners_by_round(&all);
        for round in first..=last {
            let winners = &rounds[&round];
            assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
            let w = winners[0];
            assert!(w.taken_over && w.rank == 0, "round {round}: {w:?}");
            assert_eq!(w.decided_at_unix_ms, w.round_start_unix_ms, "at once");
        }
        let reasons: Vec<_> = (first..=last).map(|r| rounds[&r][0].undelivered).collect();
        assert_eq!(
            reasons,
            [Undelivered::Unregistered, Undelivered::Unregistered, Undelivered::NoExpiry].map(Some)
        );
    }

    /// A wall clock that can be stepped (an NTP step, a VM resumed).
    struct SteppedClock {
        base: TokioClock,
        shift_ms: std::sync::atomic::AtomicI64,
    }

    impl Clock for SteppedClock {
        fn unix_ms(&self) -> u64 {
            (self.base.unix_ms() as i64 + self.shift_ms.load(Ordering::SeqCst)) as u64
        }
    }

    /// Issue 34 item 2: a clock stepped back by an hour does not stall the provider for an
    /// hour: the next round follows the new clock.
    #[tokio::test(start_paused = true)]
    async fn a_backward_clock_step_costs_at_most_a_round_or_two() {
        let clock = Arc::new(SteppedClock {
            base: TokioClock::starting_at(START_MS),
            shift_ms: Default::default(),
        });
        let p = RoundPlanner::new(
            config(),
            node(1),
            Arc::new(MemoryCoordination::new()),
            Arc::new(NoMesh),
        )
        .with_clock(clock.clone());
        let before = p.next().await;
        assert!(before.fetch);
        let planned = p.next();
        tokio::pin!(planned);
        // Step back an hour while it waits for its next slot.
        assert!(tokio::time::timeout(Duration::from_secs(10), &mut planned).await.is_err());
        clock.shift_ms.store(-3_600_000, Ordering::SeqCst);
        let after = tokio::time::timeout(Duration::from_secs(65), planned)
            .await
            .expect("stalled for the length of the step");
        assert!(after.fetch);
        assert!(after.round + 100 < before.round, "rounds follow the clock: {after:?}");
        // And the next one comes a round later, not an hour.
        let next = tokio::time::timeout(Duration::from_secs(35), p.next()).await.expect("stalled");
        assert_eq!(next.round, after.round + 1);
    }

    /// Issue 34 item 2: with its clock 8 s off (by the store's and Birdeye's readings), a
    /// provider leaves the registry, takes no lease and fetches nothing; the others rank
    /// without it. Right again, it comes back.
    #[tokio::test(start_paused = true)]
    async fn a_provider_whose_clock_is_off_takes_no_lease() {
        let clock = Arc::new(TokioClock::starting_at(START_MS));
        let store = Arc::new(MemoryCoordination::new());
        let check = Arc::new(Mutex::new(ClockCheck::new(5_000)));
        let p = RoundPlanner::new(config(), node(1), store.clone(), Arc::new(NoMesh))
            .with_clock(clock.clone())
            .with_clock_check(check.clone());
        let now = clock.unix_ms() as i64;
        check.lock().unwrap().observe(Reference::Birdeye, now - 8_000, now);
        let d = p.next().await;
        assert!(!d.fetch);
        assert_eq!(d.skip_reason, Some(SkipReason::ClockSkew));
        let verdict = d.clock.unwrap();
        assert!(verdict.off && verdict.offset_ms == Some(8_000), "{verdict:?}");
        assert!(store.active_providers().await.unwrap().is_empty(), "left the registry");
        let lease = store.try_acquire_round(d.round, node(2), config().interval).await.unwrap();
        assert!(lease.mine, "the round's lease was left free");
        let now = clock.unix_ms() as i64;
        check.lock().unwrap().observe(Reference::Birdeye, now, now);
        let d = p.next().await;
        assert!(d.fetch, "{d:?}");
        assert_eq!(store.active_providers().await.unwrap(), vec![node(1)]);
    }

    /// A store that is down.
    struct Down;

    #[async_trait::async_trait]
    impl Coordination for Down {
        async fn heartbeat(&self, _: NodeId, _: Duration) -> Result<()> {
            Err(Error::Unavailable)
        }
        async fn deregister(&self, _: NodeId) -> Result<()> {
            Err(Error::Unavailable)
        }
        async fn active_providers(&self) -> Result<Vec<NodeId>> {
            Err(Error::Unavailable)
        }
        async fn try_acquire_round(&self, _: u64, _: NodeId, _: Duration) -> Result<Lease> {
            Err(Error::Unavailable)
        }
        async fn take_over_round(&self, _: u64, _: NodeId, _: &str, _: Duration) -> Result<bool> {
            Err(Error::Unavailable)
        }
        fn is_degraded(&self) -> bool {
            true
        }
    }

    /// The mesh as the providers see it: each other, and the rounds someone broadcast.
    struct Mesh {
        providers: Vec<NodeId>,
        fulfilled: Mutex<std::collections::HashMap<u64, Vec<NodeId>>>,
    }

    impl Mesh {
        fn new(providers: Vec<NodeId>) -> Arc<Self> {
            Arc::new(Mesh { providers, fulfilled: Mutex::default() })
        }

        fn view(self: &Arc<Self>) -> Arc<dyn MeshView> {
            Arc::clone(self) as Arc<dyn MeshView>
        }

        /// The broadcast of `planner`'s fetches: they reach everyone at once.
        fn delivers(self: &Arc<Self>, planner: &RoundPlanner) -> impl Fn(u64) + Send + 'static {
            let mesh = Arc::clone(self);
            let id = planner.node_id();
            move |round| mesh.fulfilled.lock().unwrap().entry(round).or_default().push(id)
        }
    }

    impl MeshView for Mesh {
        fn providers(&self) -> Vec<NodeId> {
            self.providers.clone()
        }
        fn round_origins(&self, round: u64) -> Vec<NodeId> {
            self.fulfilled.lock().unwrap().get(&round).cloned().unwrap_or_default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_store_the_mesh_decides_and_no_round_is_missed() {
        let clock = TokioClock::starting_at(START_MS);
        let mesh = Mesh::new((1..=3).map(node).collect());
        let planners: Vec<_> = (1..=3)
            .map(|n| {
                planner(config(), node(n), Arc::new(Down), mesh.clone() as Arc<dyn MeshView>, clock)
            })
            .collect();
        assert!(planners[0].is_degraded());
        let first = planners[0].round_at(START_MS) + 1;
        let last = first + 19;
        let tasks: Vec<_> = planners
            .iter()
            .map(|p| {
                let mesh = Arc::clone(&mesh);
                let id = p.node_id();
                run(Arc::clone(p), last, move |round| {
                    mesh.fulfilled.lock().unwrap().entry(round).or_default().push(id);
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let rounds = winners_by_round(&all);
        for round in first..=last {
            let winners = &rounds[&round];
            assert_eq!(winners.len(), 1, "round {round}: the batch arrives before rank 1's slot");
            assert_eq!((winners[0].rank, winners[0].via), (0, Via::Mesh));
        }
        assert!(
            all.iter().filter(|d| !d.fetch).all(|d| d.skip_reason == Some(SkipReason::Fulfilled))
        );

        // Alone, with no mesh knowledge: fetch every round.
        let alone = planner(config(), node(9), Arc::new(Down), Arc::new(NoMesh), clock);
        for _ in 0..3 {
            let d = alone.next().await;
            assert_eq!((d.fetch, d.via, d.rank), (true, Via::Single, 0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_start_waits_for_the_next_round_and_rounds_are_never_repeated() {
        // 12 s into a round: rank 0's slot (0-5 s) is over.
        let clock = TokioClock::starting_at(START_MS - START_MS % 30_000 + 12_000);
        let p = planner(
            config(),
            node(1),
            Arc::new(MemoryCoordination::new()),
            Arc::new(NoMesh),
            clock,
        );
        let now_round = p.round_at(clock.unix_ms());
        let d = p.next().await;
        assert_eq!(d.round, now_round + 1);
        assert_eq!(d.decided_at_unix_ms, d.round_start_unix_ms);
        let again = p.next().await;
        assert_eq!(again.round, d.round + 1, "the next call moves on to the next round");
        assert!(again.fetch && d.fetch);

        // A call cancelled while it waits for its slot gives the round back to the next call.
        let waiting = tokio::time::timeout(Duration::from_secs(1), p.next()).await;
        assert!(waiting.is_err(), "the slot is a round away");
        let resumed = p.next().await;
        assert_eq!(resumed.round, again.round + 1);
    }
}
