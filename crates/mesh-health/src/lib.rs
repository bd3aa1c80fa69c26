//! The health of one component that depends on a server (Redis here): a degraded flag that
//! callers can read cheaply, one log line when an outage starts (`Redis connection failed`) and
//! one when it ends, and the reconnect backoff. `mesh-storage` (price mirror, seen ids) and
//! `mesh-coordination` (registry, round leases) each keep one per component.
//!
//! ```
//! use mesh_health::Health;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let health = Health::new("redis price mirror");
//! assert!(health.should_try() && !health.is_degraded());
//! health.failed(&"connection refused"); // logs `Redis connection failed` once
//! assert!(health.is_degraded());
//! # }
//! ```

use std::fmt::Display;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Degraded flag, once-per-outage logging and reconnect backoff of one Redis component.
///
/// The component asks [`Health::should_try`] before each Redis call. While healthy that is
/// always `true`. After a failure ([`Health::failed`], which logs `Redis connection failed`
/// on the first failure of an outage) it is `true` once per backoff step (100 ms doubling to
/// 5 s by default): that call is the reconnect attempt, every other call uses memory at once.
/// The first success ([`Health::succeeded`]) ends the outage, logs `Redis connection
/// recovered` and tells the component to copy what it kept in memory back to Redis.
#[derive(Debug)]
pub struct Health {
    component: &'static str,
    degraded: AtomicBool,
    outages: AtomicU64,
    initial: Duration,
    max: Duration,
    retry: Mutex<Retry>,
}

#[derive(Debug)]
struct Retry {
    since: Option<Instant>,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

impl Health {
    /// Health of `component` (its name in logs) with the default backoff.
    pub fn new(component: &'static str) -> Self {
        Self::with_backoff(component, Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Health with reconnect attempts from `initial`, doubling, up to `max` apart.
    pub fn with_backoff(component: &'static str, initial: Duration, max: Duration) -> Self {
        Self {
            component,
            degraded: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            initial,
            max: max.max(initial),
            retry: Mutex::new(Retry { since: None, next_attempt: None, backoff: initial }),
        }
    }

    /// `true` while Redis is considered down (cheap: one atomic load).
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// How many outages began so far.
    pub fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// Whether to call Redis now. While degraded only one caller per backoff step gets `true`.
    pub fn should_try(&self) -> bool {
        if !self.is_degraded() {
            return true;
        }
        let mut retry = self.lock();
        let now = Instant::now();
        match retry.next_attempt {
            Some(at) if now < at => false,
            _ => {
                // Claim this attempt; `failed` or `succeeded` sets the next one.
                retry.next_attempt = Some(now + retry.backoff);
                true
            }
        }
    }

    /// Records a failed call. The first failure of an outage logs `Redis connection failed`
    /// and marks the component degraded; later ones double the time to the next attempt.
    pub fn failed(&self, error: &dyn Display) {
        let mut retry = self.lock();
        let now = Instant::now();
        if self.degraded.swap(true, Ordering::Relaxed) {
            retry.backoff = (retry.backoff * 2).min(self.max);
            tracing::debug!(component = self.component, %error, backoff = ?retry.backoff, "Redis still down");
        } else {
            self.outages.fetch_add(1, Ordering::Relaxed);
            retry.since = Some(now);
            retry.backoff = self.initial;
            let hint = tls_hint(&error.to_string(), "REDIS_CA_FILE");
            tracing::error!(component = self.component, %error, "Redis connection failed{hint}");
        }
        retry.next_attempt = Some(now + retry.backoff);
    }

    /// Records a successful call; `true` when it ends an outage (the caller then writes back
    /// what it kept in memory meanwhile).
    pub fn succeeded(&self) -> bool {
        if !self.is_degraded() {
            return false;
        }
        let mut retry = self.lock();
        if !self.degraded.swap(false, Ordering::Relaxed) {
            return false;
        }
        let outage_ms = retry.since.take().map_or(0, |since| since.elapsed().as_millis() as u64);
        retry.next_attempt = None;
        retry.backoff = self.initial;
        tracing::info!(component = self.component, outage_ms, "Redis connection recovered");
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Retry> {
        // The state is a few plain fields, valid even if a holder panicked.
        self.retry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The setting to check when `error` (a connection error's text) is a TLS certificate
/// failure, as a suffix for the line that reports the outage; empty otherwise. `setting` names
/// where the trusted authority is configured (`REDIS_CA_FILE`, `sslrootcert in DATABASE_URL`).
pub fn tls_hint(error: &str, setting: &str) -> String {
    let lower = error.to_ascii_lowercase();
    let tls = ["certificate", "unknownissuer", "notvalidforname", "invalid peer", "tls handshake"];
    if tls.iter().any(|t| lower.contains(t)) {
        format!(
            " (TLS: the server's certificate does not chain to the authority of {setting}, or \
             does not name the host of the URL)"
        )
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_failures_name_the_setting() {
        let refused = "invalid peer certificate: UnknownIssuer";
        assert!(tls_hint(refused, "REDIS_CA_FILE").contains("REDIS_CA_FILE"));
        assert_eq!(tls_hint("Connection refused (os error 111)", "REDIS_CA_FILE"), "");
    }

    #[tokio::test(start_paused = true)]
    async fn one_outage_is_one_transition_and_attempts_back_off() {
        let health =
            Health::with_backoff("test", Duration::from_millis(100), Duration::from_millis(400));
        assert!(health.should_try() && !health.is_degraded());
        assert!(!health.succeeded(), "a success while healthy ends nothing");

        health.failed(&"refused");
        health.failed(&"refused again");
        assert!(health.is_degraded());
        assert_eq!(health.outages(), 1);

        // The second failure doubled the wait to 200 ms.
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(!health.should_try());
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(health.should_try(), "the reconnect attempt");
        assert!(!health.should_try(), "only one caller gets it");

        for _ in 0..5 {
            health.failed(&"refused");
        }
        tokio::time::advance(Duration::from_millis(399)).await;
        assert!(!health.should_try(), "backoff is capped at 400 ms, not passed yet");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(health.should_try());

        assert!(health.succeeded());
        assert!(!health.is_degraded() && health.should_try());
        health.failed(&"down again");
        assert_eq!(health.outages(), 2);
    }
}
