//! Shared by the fault and hostile-peer tests (`tests/faults.rs`, `tests/hostile.rs`): bounded
//! or long parameters, figures printed as JSON lines, latency percentiles, and an HTTP poller
//! that proves the API answered throughout a fault.
//!
//! Every test runs a bounded version by default (seconds, for CI). With `MESH_LONG_FAULTS=1`
//! the same tests run with the durations of the reliability issue (Redis down 60 s, PostgreSQL
//! down for minutes, more churn cycles, longer floods); RELIABILITY.md records both.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// `true` when `MESH_LONG_FAULTS=1`: run the long versions.
pub fn long_runs() -> bool {
    std::env::var("MESH_LONG_FAULTS").is_ok_and(|v| v == "1")
}

/// `bounded` normally, `long` with `MESH_LONG_FAULTS=1`.
pub fn pick<T>(bounded: T, long: T) -> T {
    if long_runs() { long } else { bounded }
}

/// Prints one line `RELIABILITY {"test": .., "mode": .., ...figures}` (run the tests with
/// `--nocapture` to see them; RELIABILITY.md quotes them).
pub fn report(test: &str, figures: Value) {
    let mut line = serde_json::json!({
        "test": test,
        "mode": if long_runs() { "long" } else { "bounded" },
    });
    if let (Some(line), Value::Object(figures)) = (line.as_object_mut(), figures) {
        line.extend(figures);
    }
    println!("RELIABILITY {line}");
}

/// The `p`-th percentile (0..=100) of `samples` (sorted here), nearest rank; zero when empty.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Milliseconds with two decimals, for the JSON lines.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// What an [`ApiPoller`] saw.
#[derive(Debug, Clone, Default)]
pub struct Availability {
    /// Requests made.
    pub polls: u64,
    /// Answers with status 200 and `"success": true`.
    pub ok: u64,
    /// Everything else, as `status: body` or the transport error (first 20 kept).
    pub failures: Vec<String>,
    /// Failed requests in total.
    pub failed: u64,
    /// Slowest answer.
    pub slowest: Duration,
}

impl Availability {
    /// Fails unless every poll got a 200 and there were at least `min_polls` of them.
    pub fn assert_always_ok(&self, min_polls: u64) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.failed == 0 && self.ok == self.polls,
            "the API failed {} of {} polls: {:?}",
            self.failed,
            self.polls,
            self.failures
        );
        anyhow::ensure!(self.polls >= min_polls, "only {} polls", self.polls);
        Ok(())
    }

    /// The figures for a report.
    pub fn json(&self) -> Value {
        serde_json::json!({
            "api_polls": self.polls,
            "api_ok": self.ok,
            "api_failed": self.failed,
            "api_slowest_ms": ms(self.slowest),
        })
    }
}

/// Polls `GET url` every `every` until [`ApiPoller::stop`]; each request has a 5 s timeout.
pub struct ApiPoller {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Availability>,
}

impl ApiPoller {
    /// Starts polling.
    pub fn start(url: String, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_else(|_| reqwest::Client::new());
            let mut seen = Availability::default();
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = match client.get(&url).send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let body: Value = response.json().await.unwrap_or(Value::Null);
                        if status == 200 && body["success"] == Value::Bool(true) {
                            Ok(())
                        } else {
                            Err(format!("{status}: {body}"))
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                seen.polls += 1;
                seen.slowest = seen.slowest.max(started.elapsed());
                match outcome {
                    Ok(()) => seen.ok += 1,
                    Err(e) => {
                        seen.failed += 1;
                        if seen.failures.len() < 20 {
                            seen.failures.push(e);
                        }
                    }
                }
                tokio::time::sleep(every).await;
            }
            seen
        });
        Self { stop, task }
    }

    /// Stops and returns what it saw.
    pub async fn stop(self) -> anyhow::Result<Availability> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&mut v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&mut v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&mut [], 99.0), Duration::ZERO);
        assert_eq!(percentile(&mut [Duration::from_millis(7)], 1.0), Duration::from_millis(7));
    }
}
