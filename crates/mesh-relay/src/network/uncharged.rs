//! Rate limit of the log lines of rejections that are not charged to the sender.

use std::collections::HashMap;
use std::time::Duration;

use mesh_protocol::RejectReason;
use tokio::time::Instant;

/// How often a rejection that is not charged ([`RejectReason::is_senders_fault`]) is logged
/// at `warn`, per reason.
const UNCHARGED_LOG_PERIOD: Duration = Duration::from_secs(60);

/// When each uncharged reason was last logged, and how many came since: one table entry per
/// reason, so it cannot grow.
#[derive(Debug, Default)]
pub(super) struct UnchargedLog {
    last: HashMap<RejectReason, (Instant, u64)>,
}

impl UnchargedLog {
    /// `Some(count since the last line)` when a line is due for `reason`.
    pub(super) fn due(&mut self, reason: RejectReason, now: Instant) -> Option<u64> {
        match self.last.get_mut(&reason) {
            Some((at, since)) if now.duration_since(*at) < UNCHARGED_LOG_PERIOD => {
                *since += 1;
                None
            }
            Some((at, since)) => {
                let count = *since;
                *at = now;
                *since = 0;
                Some(count)
            }
            None => {
                self.last.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_protocol::RejectReason;
    use tokio::time::Instant;

    use super::{UNCHARGED_LOG_PERIOD, UnchargedLog};

    #[tokio::test(start_paused = true)]
    async fn uncharged_rejections_are_logged_once_a_period_per_reason_with_a_count() {
        let mut log = UnchargedLog::default();
        let t0 = Instant::now();
        assert_eq!(log.due(RejectReason::FutureTimestamp, t0), Some(0));
        for _ in 0..5 {
            assert_eq!(log.due(RejectReason::FutureTimestamp, t0), None);
        }
        assert_eq!(log.due(RejectReason::Replay, t0), Some(0), "each reason has its own line");
        let later = t0 + UNCHARGED_LOG_PERIOD;
        assert_eq!(log.due(RejectReason::FutureTimestamp, later), Some(5));
        assert_eq!(log.due(RejectReason::FutureTimestamp, later), None);
        assert!(log.last.len() <= RejectReason::ALL.len());
    }
}
