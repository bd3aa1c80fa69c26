//! The write-behind queue between the relay path and the database.
//!
//! Callers hand rows over with [`WriteBehind::submit`], which never waits: it is a `try_send`
//! into a bounded channel, and a row that does not fit is dropped and counted
//! (`mesh_store_dropped_total`). One [`Worker`] task owns the other end. It holds rows by key
//! (a newer price of an asset replaces the held one, so a long outage costs one slot per asset,
//! not one per update), writes them in batches of up to `max_batch` rows, one statement each,
//! after at most `flush_interval`, and when a write fails keeps what it holds (up to
//! `max_pending` keys), retries with exponential backoff, and logs `Database write failed` once
//! per outage and `Database write recovered` once when a write succeeds again.
//!
//! A row the store refuses is not an outage: it would fail every retry and hold back every row
//! batched with it. A row the sink says it can never hold ([`Sink::check`]) is set aside before
//! the write; when a write fails with an error that refuses rows ([`crate::Error::refuses_rows`])
//! the batch is split in halves and retried until the refused row is alone, and that row is set
//! aside. Either way the row is counted in `mesh_store_dropped_total{queue, reason}`, logged at
//! warn the first time its reason occurs (at debug after that), and the rest lands.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use mesh_protocol::MessageId;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::row::{PriceRow, SeenRow};

/// Why rows were dropped: the `reason` label of `mesh_store_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The channel between callers and the worker was full.
    QueueFull,
    /// The worker held `max_pending` keys already (the database slow or down).
    PendingFull,
    /// The queue stopped with rows it could not write.
    Shutdown,
    /// A field is longer than its column.
    TooLong,
    /// A time no store can hold.
    TimeOutOfRange,
    /// The store refused the row when it was written alone.
    Refused,
}

impl DropReason {
    /// Every reason, for documentation and for pre-registering metric labels.
    pub const ALL: [DropReason; 6] = [
        Self::QueueFull,
        Self::PendingFull,
        Self::Shutdown,
        Self::TooLong,
        Self::TimeOutOfRange,
        Self::Refused,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::PendingFull => "pending_full",
            Self::Shutdown => "shutdown",
            Self::TooLong => "too_long",
            Self::TimeOutOfRange => "time_out_of_range",
            Self::Refused => "refused",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts `n` dropped rows of `queue` in `mesh_store_dropped_total{queue, reason}`.
pub fn count_dropped(queue: &'static str, reason: DropReason, n: u64) {
    metrics::counter!("mesh_store_dropped_total", "queue" => queue, "reason" => reason.as_str())
        .increment(n);
}

/// Where the worker writes a batch: a [`crate::PriceStore`], a [`crate::SeenStore`], or a test
/// double.
#[async_trait::async_trait]
pub trait Sink<T>: Send + Sync + 'static {
    /// Writes the whole batch, or fails as a whole.
    async fn write(&self, batch: &[T]) -> Result<u64>;

    /// Whether the sink can ever hold `row`; a row it cannot is set aside before the write
    /// (no round trip, no split). Every row can, unless the sink says otherwise.
    fn check(&self, _row: &T) -> std::result::Result<(), DropReason> {
        Ok(())
    }
}

/// How held rows merge: rows with the same key are one row in the database.
pub trait Coalesce: Send + 'static {
    /// The primary key.
    type Key: Eq + Hash + Clone + Send + 'static;
    /// This row's key.
    fn key(&self) -> Self::Key;
    /// `true` when this row should replace `held`, the row of the same key already waiting.
    fn supersedes(&self, held: &Self) -> bool;
}

impl Coalesce for PriceRow {
    /// (blockchain, asset): one address on two chains is two prices.
    type Key = (String, String);
    fn key(&self) -> (String, String) {
        (self.blockchain.clone(), self.asset.clone())
    }
    fn supersedes(&self, held: &Self) -> bool {
        self.is_newer_than(held)
    }
}

impl Coalesce for SeenRow {
    type Key = MessageId;
    fn key(&self) -> MessageId {
        self.id
    }
    /// The database keeps the first record of an id; so does the queue.
    fn supersedes(&self, _held: &Self) -> bool {
        false
    }
}

/// Sizes and timings of a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Name in logs and in the `queue` label of the metrics (`prices`, `seen`).
    pub name: &'static str,
    /// Rows the channel between callers and the worker holds.
    pub channel_capacity: usize,
    /// Distinct keys the worker holds (the batch being written included) while the database
    /// is slow or down; beyond it new keys are dropped and counted.
    pub max_pending: usize,
    /// Most rows per statement.
    pub max_batch: usize,
    /// Longest wait for more rows before a partial batch is written.
    pub flush_interval: Duration,
    /// First retry delay after a failed write; doubled after each failure.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl QueueConfig {
    /// The defaults, under `name`.
    pub fn named(name: &'static str) -> Self {
        Self {
            name,
            channel_capacity: 4_096,
            max_pending: 10_000,
            max_batch: 1_000,
            flush_interval: Duration::from_millis(50),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// Counters of a queue, for status pages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Rows written to the database.
    pub written: u64,
    /// Rows dropped: the channel or the held set was full, the queue stopped with them, or the
    /// store refused them (`mesh_store_dropped_total`).
    pub dropped: u64,
    /// Of `dropped`, rows set aside because the store refused them (or could never hold them).
    pub refused: u64,
    /// Rows waiting: in the channel plus held by the worker.
    pub pending: usize,
    /// `true` from a failed write until the next successful one.
    pub degraded: bool,
    /// Outages seen (each logged `Database write failed` once).
    pub outages: u64,
    /// Failed write attempts, retries included.
    pub failed_writes: u64,
}

#[derive(Debug)]
struct Shared {
    name: &'static str,
    written: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    held: AtomicUsize,
    degraded: AtomicBool,
    outages: AtomicU64,
    failed_writes: AtomicU64,
}

impl Shared {
    fn count_dropped(&self, reason: DropReason, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        if matches!(reason, DropReason::TooLong | DropReason::TimeOutOfRange | DropReason::Refused)
        {
            self.refused.fetch_add(n, Ordering::Relaxed);
        }
        count_dropped(self.name, reason, n);
    }
}

/// The callers' handle of a queue. Cloning is cheap; every clone feeds the same worker.
#[derive(Debug)]
pub struct WriteBehind<T> {
    tx: mpsc::Sender<T>,
    shared: Arc<Shared>,
}

impl<T> Clone for WriteBehind<T> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), shared: Arc::clone(&self.shared) }
    }
}

impl<T: Coalesce> WriteBehind<T> {
    /// A queue writing into `sink`, and the worker to spawn (see [`Worker::run`]).
    pub fn new(sink: Arc<dyn Sink<T>>, config: QueueConfig) -> (Self, Worker<T>) {
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let shared = Arc::new(Shared {
            name: config.name,
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            held: AtomicUsize::new(0),
            degraded: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
        });
        let worker = Worker {
            rx,
            sink,
            config,
            shared: Arc::clone(&shared),
            held: HashMap::new(),
            in_flight: 0,
            logged_reasons: Vec::new(),
        };
        (Self { tx, shared }, worker)
    }

    /// Queues `row` without waiting. Returns `false` when it was dropped (queue full or
    /// stopped); the drop is counted.
    pub fn submit(&self, row: T) -> bool {
        match self.tx.try_send(row) {
            Ok(()) => true,
            Err(_) => {
                self.shared.count_dropped(DropReason::QueueFull, 1);
                false
            }
        }
    }

    /// Queues every row without waiting; returns how many were accepted.
    pub fn submit_all(&self, rows: impl IntoIterator<Item = T>) -> usize {
        rows.into_iter().map(|row| self.submit(row)).filter(|accepted| *accepted).count()
    }

    /// The counters now.
    pub fn stats(&self) -> QueueStats {
        let queued = self.tx.max_capacity() - self.tx.capacity();
        QueueStats {
            written: self.shared.written.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
            pending: queued + self.shared.held.load(Ordering::Relaxed),
            degraded: self.is_degraded(),
            outages: self.shared.outages.load(Ordering::Relaxed),
            failed_writes: self.shared.failed_writes.load(Ordering::Relaxed),
        }
    }

    /// `true` while the database refuses writes.
    pub fn is_degraded(&self) -> bool {
        self.shared.degraded.load(Ordering::Relaxed)
    }
}

/// The task that owns the database end of a queue.
pub struct Worker<T: Coalesce> {
    rx: mpsc::Receiver<T>,
    sink: Arc<dyn Sink<T>>,
    config: QueueConfig,
    shared: Arc<Shared>,
    held: HashMap<T::Key, T>,
    /// Rows of the batch being written (they count against `max_pending`).
    in_flight: usize,
    /// Reasons already logged at warn (at most [`DropReason::ALL`] entries).
    logged_reasons: Vec<DropReason>,
}

impl<T: Coalesce> std::fmt::Debug for Worker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("held", &self.held.len())
            .finish()
    }
}

/// Why the worker stopped taking rows.
enum Stop {
    /// Shutdown was requested.
    Cancelled,
    /// Every [`WriteBehind`] handle is gone.
    Closed,
}

impl<T: Coalesce> Worker<T> {
    /// Runs until `shutdown` is cancelled or every [`WriteBehind`] handle is dropped, then
    /// makes one last attempt to write what it holds; rows it cannot write then are counted as
    /// dropped. Spawn it on the node's task tracker.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = self.config.retry_initial;
        let mut outage_since: Option<Instant> = None;
        loop {
            if let Err(stop) = self.gather(&shutdown).await {
                self.finish(stop).await;
                return;
            }
            let batch = self.take_batch();
            match self.write_isolating(batch).await {
                Ok(rows) => {
                    self.shared.written.fetch_add(rows, Ordering::Relaxed);
                    metrics::counter!("mesh_store_written_total", "queue" => self.config.name)
                        .increment(rows);
                    backoff = self.config.retry_initial;
                    if let Some(since) = outage_since.take() {
                        self.shared.degraded.store(false, Ordering::Relaxed);
                        tracing::info!(
                            queue = self.config.name,
                            outage_ms = since.elapsed().as_millis() as u64,
                            held = self.held.len(),
                            "Database write recovered"
                        );
                    }
                }
                Err((error, unwritten)) => {
                    self.shared.failed_writes.fetch_add(1, Ordering::Relaxed);
                    self.put_back(unwritten);
                    if outage_since.is_none() {
                        outage_since = Some(Instant::now());
                        self.shared.degraded.store(true, Ordering::Relaxed);
                        self.shared.outages.fetch_add(1, Ordering::Relaxed);
                        let hint = mesh_health::tls_hint(
                            &error.to_string(),
                            "sslrootcert in DATABASE_URL",
                        );
                        tracing::error!(
                            queue = self.config.name,
                            %error,
                            held = self.held.len(),
                            "Database write failed{hint}"
                        );
                    } else {
                        tracing::debug!(queue = self.config.name, %error, ?backoff, "retrying");
                    }
                    self.publish_held();
                    if let Err(stop) = self.hold_until(Instant::now() + backoff, &shutdown).await {
                        self.finish(stop).await;
                        return;
                    }
                    backoff = (backoff * 2).min(self.config.retry_max);
                }
            }
            self.publish_held();
        }
    }

    /// Waits for a first row when nothing is held, then for more until a batch is full or
    /// `flush_interval` has passed.
    async fn gather(&mut self, shutdown: &CancellationToken) -> Result<(), Stop> {
        if self.held.is_empty() {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Err(Stop::Cancelled),
                row = self.rx.recv() => match row {
                    Some(row) => self.hold(row),
                    None => return Err(Stop::Closed),
                },
            }
        }
        if self.held.len() < self.config.max_batch {
            self.hold_until(Instant::now() + self.config.flush_interval, shutdown).await?;
        }
        Ok(())
    }

    /// Takes rows from the channel until `deadline` (or until a batch is full when the
    /// database is up), so that the channel keeps draining while a retry waits.
    async fn hold_until(
        &mut self,
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        loop {
            if !self.shared.degraded.load(Ordering::Relaxed)
                && self.held.len() >= self.config.max_batch
            {
                return Ok(());
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Err(Stop::Cancelled),
                row = self.rx.recv() => match row {
                    Some(row) => self.hold(row),
                    None => return Err(Stop::Closed),
                },
                () = sleep_until(deadline) => return Ok(()),
            }
        }
    }

    /// Writes `batch` while still taking rows from the channel, so that a slow or hanging
    /// database does not fill the channel and make callers drop rows.
    async fn write_draining(&mut self, batch: &[T]) -> Result<u64> {
        let sink = Arc::clone(&self.sink);
        let write = sink.write(batch);
        tokio::pin!(write);
        self.in_flight = batch.len();
        self.publish_held();
        let mut open = true;
        let result = loop {
            tokio::select! {
                biased;
                result = &mut write => break result,
                row = self.rx.recv(), if open => match row {
                    Some(row) => self.hold(row),
                    // Every handle is gone: the next gather notices and stops the worker.
                    None => open = false,
                },
            }
        };
        self.in_flight = 0;
        result
    }

    /// Writes `batch`, setting aside every row the store refuses so that the others land:
    /// rows [`Sink::check`] rejects before the write, then, while a write fails with an error
    /// that refuses rows, each half of the failed part on its own until the refused row is
    /// alone (one poison row among `n` costs about `2 log2 n` statements). Returns the rows
    /// written, or, on an outage, the error with every row not written yet (to put back).
    async fn write_isolating(&mut self, batch: Vec<T>) -> Result<u64, (crate::Error, Vec<T>)> {
        let mut storable = Vec::with_capacity(batch.len());
        for row in batch {
            match self.sink.check(&row) {
                Ok(()) => storable.push(row),
                Err(reason) => self.set_aside(reason, None),
            }
        }
        let mut written = 0;
        let mut parts = vec![storable];
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match self.write_draining(&part).await {
                Ok(_) => written += part.len() as u64,
                Err(error) if error.refuses_rows() && part.len() == 1 => {
                    self.set_aside(DropReason::Refused, Some(&error));
                }
                Err(error) if error.refuses_rows() => {
                    let mut first = part;
                    let second = first.split_off(first.len() / 2);
                    parts.push(second);
                    parts.push(first);
                }
                Err(error) => {
                    parts.push(part);
                    return Err((error, parts.into_iter().flatten().collect()));
                }
            }
        }
        Ok(written)
    }

    /// Counts a row the store refused; logs the first of each reason at warn.
    fn set_aside(&mut self, reason: DropReason, error: Option<&crate::Error>) {
        self.shared.count_dropped(reason, 1);
        let error = error.map(|e| e.to_string());
        if self.logged_reasons.contains(&reason) {
            tracing::debug!(queue = self.config.name, %reason, ?error, "row set aside");
        } else {
            self.logged_reasons.push(reason);
            tracing::warn!(
                queue = self.config.name,
                %reason,
                ?error,
                "Database refused a row: set aside, the rest of its batch is written \
                 (further rows refused for this reason are logged at debug)"
            );
        }
    }

    fn hold(&mut self, row: T) {
        let full = self.held.len() + self.in_flight >= self.config.max_pending;
        match self.held.entry(row.key()) {
            Entry::Occupied(mut held) => {
                if row.supersedes(held.get()) {
                    held.insert(row);
                }
            }
            Entry::Vacant(slot) if !full => {
                slot.insert(row);
            }
            Entry::Vacant(_) => self.shared.count_dropped(DropReason::PendingFull, 1),
        }
        self.publish_held();
    }

    /// Puts a batch that failed back, unless a newer row of the same key arrived meanwhile.
    fn put_back(&mut self, batch: Vec<T>) {
        for row in batch {
            match self.held.entry(row.key()) {
                Entry::Occupied(mut held) => {
                    if row.supersedes(held.get()) {
                        held.insert(row);
                    }
                }
                Entry::Vacant(slot) => {
                    slot.insert(row);
                }
            }
        }
    }

    fn take_batch(&mut self) -> Vec<T> {
        if self.held.len() <= self.config.max_batch {
            return self.held.drain().map(|(_, row)| row).collect();
        }
        let keys: Vec<T::Key> = self.held.keys().take(self.config.max_batch).cloned().collect();
        keys.iter().filter_map(|key| self.held.remove(key)).collect()
    }

    fn publish_held(&self) {
        self.shared.held.store(self.held.len() + self.in_flight, Ordering::Relaxed);
    }

    /// One last attempt to write everything held and queued; what fails is counted as dropped.
    async fn finish(&mut self, stop: Stop) {
        self.rx.close();
        while let Ok(row) = self.rx.try_recv() {
            self.hold(row);
        }
        while !self.held.is_empty() {
            let batch = self.take_batch();
            match self.write_isolating(batch).await {
                Ok(rows) => {
                    self.shared.written.fetch_add(rows, Ordering::Relaxed);
                }
                Err((error, unwritten)) => {
                    let lost = unwritten.len() as u64 + self.held.len() as u64;
                    self.held.clear();
                    self.shared.count_dropped(DropReason::Shutdown, lost);
                    tracing::warn!(
                        queue = self.config.name,
                        %error,
                        lost,
                        "write-behind queue stopped with rows it could not write"
                    );
                }
            }
        }
        self.publish_held();
        let reason = match stop {
            Stop::Cancelled => "shutdown",
            Stop::Closed => "all handles dropped",
        };
        tracing::debug!(queue = self.config.name, reason, "write-behind queue stopped");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use mesh_protocol::NodeId;

    use super::*;
    use crate::Error;

    /// A database double that can be switched off.
    #[derive(Default)]
    struct FakeDb {
        down: AtomicBool,
        rows: Mutex<HashMap<String, i64>>,
        batches: Mutex<Vec<usize>>,
        refusals: Mutex<Vec<usize>>,
    }

    #[async_trait::async_trait]
    impl Sink<PriceRow> for FakeDb {
        async fn write(&self, batch: &[PriceRow]) -> Result<u64> {
            if self.down.load(Ordering::Relaxed) {
                return Err(Error::Database(sqlx::Error::PoolTimedOut));
            }
            // A row the database refuses fails the whole statement, as PostgreSQL does.
            if let Some(poison) = batch.iter().find(|r| r.asset.starts_with("poison")) {
                self.refusals.lock().unwrap().push(batch.len());
                return Err(Error::TimeOutOfRange(poison.timestamp_ms.into()));
            }
            self.batches.lock().unwrap().push(batch.len());
            let mut rows = self.rows.lock().unwrap();
            for row in batch {
                let held = rows.entry(row.asset.clone()).or_insert(row.timestamp_ms);
                *held = (*held).max(row.timestamp_ms);
            }
            Ok(batch.len() as u64)
        }
    }

    fn row(asset: usize, ts: i64) -> PriceRow {
        PriceRow {
            asset: format!("asset-{asset}"),
            blockchain: "solana".into(),
            price: "1".parse().unwrap(),
            timestamp_ms: ts,
            source_node_id: NodeId::from_uuid(uuid::Uuid::nil()),
            change_24h: None,
        }
    }

    fn config() -> QueueConfig {
        QueueConfig {
            channel_capacity: 64,
            max_pending: 10_000,
            max_batch: 1_000,
            ..QueueConfig::named("test")
        }
    }

    fn start(db: &Arc<FakeDb>, config: QueueConfig) -> (WriteBehind<PriceRow>, CancellationToken) {
        let (queue, worker) = WriteBehind::new(Arc::clone(db) as Arc<dyn Sink<PriceRow>>, config);
        let shutdown = CancellationToken::new();
        tokio::spawn(worker.run(shutdown.clone()));
        (queue, shutdown)
    }

    /// Submits `rows`, letting the worker drain the channel as callers would between bursts.
    async fn feed(
        queue: &WriteBehind<PriceRow>,
        rows: impl IntoIterator<Item = PriceRow>,
    ) -> usize {
        let mut accepted = 0;
        for (i, row) in rows.into_iter().enumerate() {
            accepted += usize::from(queue.submit(row));
            if i % 4 == 3 {
                tokio::task::yield_now().await;
            }
        }
        accepted
    }

    /// Waits (in paused time) until `done` holds; panics after a simulated minute.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..6_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test(start_paused = true)]
    async fn rows_are_written_in_batches_of_at_most_max_batch() {
        let db = Arc::new(FakeDb::default());
        let (queue, _shutdown) = start(&db, config());
        assert_eq!(feed(&queue, (0..2_500).map(|i| row(i, 1))).await, 2_500);
        until("all written", || queue.stats().written == 2_500).await;
        let batches = db.batches.lock().unwrap().clone();
        assert!(batches.iter().all(|&n| n <= 1_000), "{batches:?}");
        assert!(batches.len() >= 3, "{batches:?}");

        // A few rows are not left waiting for a full batch.
        let before = Instant::now();
        feed(&queue, (0..3).map(|i| row(i, 2))).await;
        until("the partial batch", || queue.stats().written == 2_503).await;
        assert!(before.elapsed() < Duration::from_millis(200));
        assert_eq!(queue.stats().pending, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_holds_rows_retries_and_writes_them_after_recovery() {
        let db = Arc::new(FakeDb::default());
        db.down.store(true, Ordering::Relaxed);
        let (queue, _shutdown) = start(&db, config());
        assert_eq!(feed(&queue, (0..100).map(|i| row(i, 1))).await, 100);
        until("several retries", || queue.stats().failed_writes >= 5).await;
        let stats = queue.stats();
        assert!(stats.degraded);
        assert_eq!((stats.written, stats.dropped, stats.pending, stats.outages), (0, 0, 100, 1));

        // Newer prices of held assets replace the held ones: no slot used, nothing dropped.
        feed(&queue, (0..100).map(|i| row(i, 2))).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(queue.stats().outages, 1, "one outage, however many retries");

        db.down.store(false, Ordering::Relaxed);
        until("recovery", || !queue.is_degraded() && queue.stats().pending == 0).await;
        let stats = queue.stats();
        assert_eq!((stats.written, stats.dropped, stats.outages), (100, 0, 1));
        assert!(db.rows.lock().unwrap().values().all(|&ts| ts == 2));
        assert_eq!(db.rows.lock().unwrap().len(), 100);
    }

    fn poison(ts: i64) -> PriceRow {
        PriceRow { asset: "poison".into(), ..row(0, ts) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_row_is_set_aside_and_the_rest_of_its_batch_lands() {
        let db = Arc::new(FakeDb::default());
        let (queue, _shutdown) = start(&db, config());
        let rows: Vec<PriceRow> = (0..500)
            .map(|i| row(i, 1))
            .chain([poison(1)])
            .chain((500..999).map(|i| row(i, 1)))
            .collect();
        assert_eq!(feed(&queue, rows).await, 1_000);
        until("the good rows written", || queue.stats().written == 999).await;
        let stats = queue.stats();
        assert_eq!((stats.dropped, stats.refused, stats.pending), (1, 1, 0));
        assert_eq!((stats.outages, stats.degraded), (0, false), "a refused row is no outage");
        assert_eq!(db.rows.lock().unwrap().len(), 999);
        // Bisection: about two statements per halving, not one per row.
        let refusals = db.refusals.lock().unwrap().len();
        assert!(refusals <= 12, "{refusals} refused statements");

        // The queue keeps working, and is not stuck on the poison row.
        feed(&queue, (0..10).map(|i| row(i, 2))).await;
        until("later rows", || queue.stats().written == 1_009).await;
        assert_eq!(queue.stats().dropped, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_during_isolation_keeps_every_unwritten_row() {
        let db = Arc::new(FakeDb::default());
        let (queue, _shutdown) = start(&db, config());
        db.down.store(true, Ordering::Relaxed);
        feed(&queue, (0..50).map(|i| row(i, 1)).chain([poison(1)])).await;
        until("several retries", || queue.stats().failed_writes >= 3).await;
        assert_eq!((queue.stats().pending, queue.stats().dropped), (51, 0));
        db.down.store(false, Ordering::Relaxed);
        until("recovery", || queue.stats().pending == 0).await;
        let stats = queue.stats();
        assert_eq!((stats.written, stats.dropped, stats.refused), (50, 1, 1));
        assert!(!stats.degraded);
    }

    #[tokio::test(start_paused = true)]
    async fn rows_the_sink_can_never_hold_are_set_aside_before_the_write() {
        struct Strict(FakeDb);
        #[async_trait::async_trait]
        impl Sink<PriceRow> for Strict {
            async fn write(&self, batch: &[PriceRow]) -> Result<u64> {
                self.0.write(batch).await
            }
            fn check(&self, row: &PriceRow) -> std::result::Result<(), DropReason> {
                row.storable()
            }
        }
        let db = Arc::new(Strict(FakeDb::default()));
        let (queue, worker) =
            WriteBehind::new(Arc::clone(&db) as Arc<dyn Sink<PriceRow>>, config());
        let shutdown = CancellationToken::new();
        tokio::spawn(worker.run(shutdown.clone()));
        let mut long_change = row(1, 1);
        long_change.change_24h = Some("1".repeat(52).parse().unwrap());
        feed(&queue, [row(0, 1), long_change, row(2, i64::MIN), row(3, 1)]).await;
        until("written", || queue.stats().written == 2).await;
        assert_eq!(queue.stats().refused, 2);
        assert!(db.0.refusals.lock().unwrap().is_empty(), "no statement was refused");
    }

    #[tokio::test(start_paused = true)]
    async fn rows_beyond_capacity_are_dropped_and_counted() {
        let db = Arc::new(FakeDb::default());
        db.down.store(true, Ordering::Relaxed);
        let (queue, _shutdown) =
            start(&db, QueueConfig { channel_capacity: 8, max_pending: 50, ..config() });
        let accepted = feed(&queue, (0..200).map(|i| row(i, 1))).await;
        until("the channel drained", || queue.stats().pending == 50).await;
        let stats = queue.stats();
        assert_eq!(stats.dropped, 150, "accepted {accepted}");

        db.down.store(false, Ordering::Relaxed);
        until("recovery", || queue.stats().written == 50).await;
        assert_eq!(db.rows.lock().unwrap().len(), 50);
        assert_eq!(queue.stats().dropped + queue.stats().written, 200);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_writes_what_is_held_or_counts_it() {
        let db = Arc::new(FakeDb::default());
        let (queue, worker) =
            WriteBehind::new(Arc::clone(&db) as Arc<dyn Sink<PriceRow>>, config());
        let shutdown = CancellationToken::new();
        feed(&queue, (0..10).map(|i| row(i, 1))).await;
        shutdown.cancel();
        worker.run(shutdown).await;
        assert_eq!(queue.stats().written, 10);
        assert!(!queue.submit(row(0, 5)), "a stopped queue takes nothing");
        assert_eq!(queue.stats().dropped, 1);

        // Stopping while the database is down: the held rows are counted as dropped.
        let db = Arc::new(FakeDb::default());
        db.down.store(true, Ordering::Relaxed);
        let (queue, worker) =
            WriteBehind::new(Arc::clone(&db) as Arc<dyn Sink<PriceRow>>, config());
        feed(&queue, (0..10).map(|i| row(i, 1))).await;
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        worker.run(shutdown).await;
        assert_eq!((queue.stats().written, queue.stats().dropped), (0, 10));
    }
}
