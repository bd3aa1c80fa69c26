//! Waiting for a condition without fixed sleeps.

use std::time::Duration;

/// [`mesh_testkit::eventually_async`] with the description first, as these tests call it.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    mesh_testkit::eventually_async(timeout, what, check).await
}
