//! The running discovery: its tasks and the handle that updates our advertisement.

use std::sync::Arc;
use std::time::Duration;

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::Result;
use crate::bootstrap;
use crate::config::Config;
use crate::event::{DiscoveryEvent, Role, Source};
use crate::mdns::{self, MdnsTask};
use crate::txt::Advertisement;

struct Inner {
    local: PeerId,
    advert: watch::Sender<Advertisement>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Handle to a running discovery. Cheap to clone; the tasks run until the token given to
/// [`Discovery::start`] is cancelled or [`Discovery::shutdown`] is called.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").field("peer_id", &self.inner.local).finish_non_exhaustive()
    }
}

impl Discovery {
    /// Starts discovery for the node `local_peer`: reports the bootstrap peers, browses and
    /// advertises over mDNS (when enabled) and scans BLE (when enabled and built in).
    ///
    /// The advertisement starts as a consumer with an unknown hop distance and no address;
    /// nothing is advertised until [`Discovery::set_listen_addrs`] gives an address. Events
    /// arrive on the returned receiver, which holds at most `config.event_queue_len`; when it
    /// is full discovery waits for the node to catch up.
    ///
    /// Fails on an invalid configuration or when the mDNS daemon cannot start. A BLE failure
    /// is not an error: BLE is then off (logged once).
    pub async fn start(
        local_peer: PeerId,
        config: Config,
        cancel: CancellationToken,
    ) -> Result<(Discovery, mpsc::Receiver<DiscoveryEvent>)> {
        config.validate()?;
        let cancel = cancel.child_token();
        let tracker = TaskTracker::new();
        let (events, receiver) = mpsc::channel(config.event_queue_len);
        let initial = Advertisement {
            peer_id: local_peer,
            role: Role::Consumer,
            hop_distance: None,
            addrs: Vec::new(),
        };
        let (advert, advert_rx) = watch::channel(initial);

        if config.mdns_enabled {
            let daemon = mdns::start_daemon(&config)?;
            let task = MdnsTask::new(daemon, local_peer, config.clone(), events.clone());
            let span = info_span!("discovery_mdns", peer = %local_peer, port = config.mdns_port);
            tracker.spawn(task.run(advert_rx, cancel.clone()).instrument(span));
        }
        let peers = bootstrap::by_peer(&config.bootstrap_peers);
        if !peers.is_empty() {
            let span = info_span!("discovery_bootstrap", peer = %local_peer);
            tracker.spawn(
                announce_bootstrap(local_peer, peers, events.clone(), cancel.clone())
                    .instrument(span),
            );
        }
        #[cfg(feature = "ble")]
        if config.ble_enabled {
            let span = info_span!("discovery_ble", peer = %local_peer);
            let limits = crate::ble::scanner::Limits {
                max_addrs: config.max_addrs_per_peer,
                max_tracked: config.max_tracked_peers,
                addr_filter: config.addr_filter,
            };
            tracker.spawn(
                crate::ble::scanner::run(local_peer, events.clone(), cancel.clone(), limits)
                    .instrument(span),
            );
        }
        tracker.close();
        let inner = Inner { local: local_peer, advert, cancel, tracker };
        Ok((Discovery { inner: Arc::new(inner) }, receiver))
    }

    /// Our peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.inner.local
    }

    /// What we currently advertise (before address expansion and limits).
    pub fn advertisement(&self) -> Advertisement {
        self.inner.advert.borrow().clone()
    }

    /// Advertises us as a provider or a consumer.
    pub fn set_role(&self, role: Role) {
        self.inner.advert.send_if_modified(|a| std::mem::replace(&mut a.role, role) != role);
    }

    /// Advertises our hop distance to the nearest provider (`relay::Status::own_distance`).
    pub fn set_hop_distance(&self, hop_distance: Option<u8>) {
        self.inner.advert.send_if_modified(|a| {
            std::mem::replace(&mut a.hop_distance, hop_distance) != hop_distance
        });
    }

    /// Advertises these listen addresses (`Relay::listen_addrs`). Unspecified ones
    /// (`0.0.0.0`, `::`) are replaced by the addresses of the mDNS interfaces; `/p2p`
    /// suffixes are dropped. An empty list withdraws the advertisement.
    pub fn set_listen_addrs(&self, addrs: Vec<Multiaddr>) {
        self.inner.advert.send_if_modified(|a| {
            let changed = a.addrs != addrs;
            a.addrs = addrs;
            changed
        });
    }

    /// Stops every task (withdrawing the mDNS advertisement) and waits for them, bounded by
    /// `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.cancel.cancel();
        if tokio::time::timeout(grace, self.inner.tracker.wait()).await.is_err() {
            warn!(grace = ?grace, "discovery tasks did not stop in time");
        }
    }
}

/// Reports the bootstrap peers once, waiting for room in the queue.
async fn announce_bootstrap(
    local: PeerId,
    peers: Vec<(PeerId, Vec<Multiaddr>)>,
    events: mpsc::Sender<DiscoveryEvent>,
    cancel: CancellationToken,
) {
    for (peer_id, addrs) in peers {
        if peer_id == local {
            debug!("skipping ourselves in the bootstrap list");
            continue;
        }
        let event = DiscoveryEvent::PeerFound {
            peer_id,
            addrs,
            role: None,
            hop_distance: None,
            source: Source::Bootstrap,
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            sent = events.send(event) => if sent.is_err() { return },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bootstrap::BootstrapPeer;

    fn no_network() -> Config {
        Config { mdns_enabled: false, ble_enabled: false, ..Config::default() }
    }

    #[tokio::test]
    async fn bootstrap_peers_are_reported_once_grouped_and_without_ourselves() {
        let local = PeerId::random();
        let (a, b) = (PeerId::random(), PeerId::random());
        let entry = |peer: PeerId, port: u16| BootstrapPeer {
            peer_id: peer,
            addr: format!("/ip4/203.0.113.1/tcp/{port}").parse().unwrap(),
        };
        let config = Config {
            bootstrap_peers: vec![entry(a, 1), entry(local, 2), entry(b, 3), entry(a, 4)],
            event_queue_len: 1, // smaller than the list: discovery waits for room
            ..no_network()
        };
        let (discovery, mut events) =
            Discovery::start(local, config, CancellationToken::new()).await.unwrap();
        let first = events.recv().await.unwrap();
        let second = events.recv().await.unwrap();
        assert_eq!(
            first,
            DiscoveryEvent::PeerFound {
                peer_id: a,
                addrs: vec![
                    "/ip4/203.0.113.1/tcp/1".parse().unwrap(),
                    "/ip4/203.0.113.1/tcp/4".parse().unwrap()
                ],
                role: None,
                hop_distance: None,
                source: Source::Bootstrap,
            }
        );
        assert_eq!(second.peer_id(), b);
        discovery.shutdown(Duration::from_secs(1)).await;
        assert!(events.recv().await.is_none(), "nothing more, and the channel closes");
    }

    #[tokio::test]
    async fn an_invalid_configuration_is_refused_with_every_error() {
        let config = Config { event_queue_len: 0, max_addrs_per_peer: 0, ..no_network() };
        let err =
            Discovery::start(PeerId::random(), config, CancellationToken::new()).await.unwrap_err();
        match err {
            crate::Error::Config(errors) => assert_eq!(errors.0.len(), 2),
            other => panic!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn the_handle_updates_the_advertisement() {
        let local = PeerId::random();
        let (discovery, _events) =
            Discovery::start(local, no_network(), CancellationToken::new()).await.unwrap();
        let mut watch = discovery.inner.advert.subscribe();
        discovery.set_role(Role::Provider);
        discovery.set_hop_distance(Some(0));
        discovery.set_listen_addrs(vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()]);
        assert!(watch.has_changed().unwrap());
        let advert = discovery.advertisement();
        assert_eq!(advert.peer_id, local);
        assert_eq!(advert.role, Role::Provider);
        assert_eq!(advert.hop_distance, Some(0));
        assert_eq!(advert.addrs.len(), 1);
        watch.mark_unchanged();
        discovery.set_role(Role::Provider);
        discovery.set_hop_distance(Some(0));
        assert!(!watch.has_changed().unwrap(), "setting the same values is not a change");
        discovery.shutdown(Duration::from_secs(1)).await;
    }
}
