//! The btleplug scanner (feature `ble`). One attempt: every error on the way (no D-Bus, no
//! BlueZ, no adapter, a scan refused, the event stream ending) means "BLE off", logged once at
//! info level, and the task ends. There is no retry, so no retry storm.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use btleplug::api::{Central, CentralEvent, Manager as _, ScanFilter};
use btleplug::platform::Manager;
use futures::StreamExt;
use libp2p_identity::PeerId;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{BlePayload, SERVICE_UUID, parse_payload};
use crate::addrs;
use crate::event::{DiscoveryEvent, Source};

/// Bound on each setup step (D-Bus connection, adapter list, scan start).
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// An unchanged advertisement of a peer is reported again after this long.
pub(crate) const REPEAT_AFTER: Duration = Duration::from_secs(60);

/// Bounds of the scanner.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Addresses kept per peer.
    pub max_addrs: usize,
    /// Peers remembered for de-duplication.
    pub max_tracked: usize,
    /// Which advertised addresses are kept (BLE reaches a few metres: as mDNS, the LAN).
    pub addr_filter: mesh_protocol::AddrFilter,
}

/// Why the scanner stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// BLE is off, for this reason.
    Off(String),
    /// Discovery is shutting down.
    Cancelled,
}

/// Runs the scanner until cancelled or until BLE turns out to be off; logs the outcome once.
pub(crate) async fn run(
    local: PeerId,
    events: mpsc::Sender<DiscoveryEvent>,
    cancel: CancellationToken,
    limits: Limits,
) {
    match scan(local, events, cancel, limits).await {
        Stopped::Off(reason) => info!(%reason, "BLE off"),
        Stopped::Cancelled => debug!("BLE scan stopped"),
    }
}

async fn step<T, E: Display>(
    what: &str,
    cancel: &CancellationToken,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, Stopped> {
    tokio::select! {
        _ = cancel.cancelled() => Err(Stopped::Cancelled),
        result = timeout(SETUP_TIMEOUT, fut) => match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Stopped::Off(format!("{what}: {e}"))),
            Err(_) => Err(Stopped::Off(format!("{what}: no answer within {SETUP_TIMEOUT:?}"))),
        },
    }
}

pub(crate) async fn scan(
    local: PeerId,
    events: mpsc::Sender<DiscoveryEvent>,
    cancel: CancellationToken,
    limits: Limits,
) -> Stopped {
    match scan_inner(local, events, &cancel, limits).await {
        Ok(stopped) | Err(stopped) => stopped,
    }
}

async fn scan_inner(
    local: PeerId,
    events: mpsc::Sender<DiscoveryEvent>,
    cancel: &CancellationToken,
    limits: Limits,
) -> Result<Stopped, Stopped> {
    let manager =
        step("connecting to BlueZ over the D-Bus system bus", cancel, Manager::new()).await?;
    let adapters = step("listing Bluetooth adapters", cancel, manager.adapters()).await?;
    let Some(adapter) = adapters.into_iter().next() else {
        return Err(Stopped::Off("no Bluetooth adapter".into()));
    };
    let mut stream = step("subscribing to adapter events", cancel, adapter.events()).await?;
    let filter = ScanFilter { services: vec![SERVICE_UUID] };
    step("starting a scan", cancel, adapter.start_scan(filter)).await?;
    info!(service_uuid = %SERVICE_UUID, "BLE scanning for mesh peers");
    let mut recent = Recent::new(limits.max_tracked);
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = timeout(SETUP_TIMEOUT, adapter.stop_scan()).await;
                return Ok(Stopped::Cancelled);
            }
            event = stream.next() => event,
        };
        let Some(event) = event else {
            return Err(Stopped::Off("the adapter's event stream ended".into()));
        };
        let CentralEvent::ServiceDataAdvertisement { service_data, .. } = event else {
            continue;
        };
        let Some(bytes) = service_data.get(&SERVICE_UUID) else {
            continue;
        };
        let payload = match parse_payload(bytes) {
            Ok(payload) => payload,
            Err(e) => {
                debug!(error = %e, "ignoring a malformed mesh BLE payload");
                continue;
            }
        };
        if payload.peer_id == local || !recent.is_news(&payload, Instant::now()) {
            continue;
        }
        let event = DiscoveryEvent::PeerFound {
            peer_id: payload.peer_id,
            addrs: addrs::received(payload.addrs, false, limits.addr_filter, limits.max_addrs),
            role: Some(payload.role),
            hop_distance: payload.hop_distance,
            source: Source::Ble,
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(Stopped::Cancelled),
            sent = events.send(event) => if sent.is_err() { return Ok(Stopped::Cancelled) },
        }
    }
}

/// Advertisements repeat many times a second: only a changed payload, or the same one after
/// [`REPEAT_AFTER`], is news. Remembers at most `max` peers.
pub(crate) struct Recent {
    seen: HashMap<PeerId, (BlePayload, Instant)>,
    max: usize,
}

impl Recent {
    pub(crate) fn new(max: usize) -> Self {
        Self { seen: HashMap::new(), max }
    }

    pub(crate) fn is_news(&mut self, payload: &BlePayload, now: Instant) -> bool {
        if let Some((last, at)) = self.seen.get(&payload.peer_id) {
            if last == payload && now.duration_since(*at) < REPEAT_AFTER {
                return false;
            }
        } else if self.seen.len() >= self.max {
            self.seen.retain(|_, (_, at)| now.duration_since(*at) < REPEAT_AFTER);
            if self.seen.len() >= self.max {
                return false;
            }
        }
        self.seen.insert(payload.peer_id, (payload.clone(), now));
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::event::Role;

    fn payload(hop: Option<u8>) -> BlePayload {
        BlePayload {
            peer_id: PeerId::random(),
            role: Role::Consumer,
            hop_distance: hop,
            addrs: vec![],
        }
    }

    #[test]
    fn repeats_are_not_news_until_they_change_or_age() {
        let mut recent = Recent::new(2);
        let t0 = Instant::now();
        let a = payload(Some(1));
        assert!(recent.is_news(&a, t0));
        assert!(!recent.is_news(&a, t0 + Duration::from_secs(1)));
        let changed = BlePayload { hop_distance: Some(2), ..a.clone() };
        assert!(recent.is_news(&changed, t0 + Duration::from_secs(2)));
        assert!(recent.is_news(&changed, t0 + Duration::from_secs(2) + REPEAT_AFTER));
        // Bounded at two peers: a second one fits, a third is dropped while both are fresh...
        let now = t0 + Duration::from_secs(3) + REPEAT_AFTER;
        assert!(recent.is_news(&payload(None), now));
        assert!(!recent.is_news(&payload(None), now));
        // ...and admitted once they aged out.
        assert!(recent.is_news(&payload(None), now + REPEAT_AFTER * 2));
    }

    /// On a machine without D-Bus, BlueZ or an adapter (CI, servers) the scanner reports BLE
    /// off and returns at once; with a working adapter it scans until cancelled. It never
    /// panics or hangs.
    #[tokio::test]
    async fn without_bluetooth_the_scanner_turns_ble_off_and_returns() {
        let (events, _rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let stopper = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            stopper.cancel();
        });
        let limits = Limits {
            max_addrs: 16,
            max_tracked: 16,
            addr_filter: mesh_protocol::AddrFilter::lab(),
        };
        let stopped =
            timeout(Duration::from_secs(30), scan(PeerId::random(), events, cancel, limits))
                .await
                .expect("the scanner returns");
        println!("scanner stopped: {stopped:?}");
        if let Stopped::Off(reason) = &stopped {
            assert!(!reason.is_empty());
        }
    }
}
