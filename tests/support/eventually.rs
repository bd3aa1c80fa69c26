//! Waiting for a condition without fixed sleeps.

use std::time::Duration;

use tokio::time::Instant;

/// Polls `check` every 20 ms until it returns `true`; fails after `timeout` with `what`.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
