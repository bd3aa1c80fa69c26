//! mDNS with mdns-sd: the node advertises `_mesh-price._udp.local.` with its TXT record
//! ([`crate::txt`]) and browses for the advertisements of other nodes.
//!
//! # Interfaces
//!
//! By default mDNS runs on every interface, which is what it is for. With
//! `MESH_MDNS_INTERFACES` the daemon's interface selection is set to all-off, then on for the
//! listed ones, before any query or announcement is queued, so mDNS packets go out on the
//! listed interfaces only. One thing the selection cannot prevent: when mdns-sd starts it joins
//! the mDNS multicast groups (224.0.0.251, ff02::fb) on every interface that is up, and leaves
//! them again when the selection is applied; the kernel announces each join and leave with an
//! IGMP/MLD membership report on that interface. No mDNS packet is sent there. Tests, demos
//! and benchmarks that must not touch any interface but loopback therefore run discovery in a
//! private network namespace (the integration tests do), or turn mDNS off.
//!
//! Multicast works on the loopback interface even though Linux does not set the `MULTICAST`
//! flag on it: mdns-sd sends with `IP_MULTICAST_IF` set to the loopback address and the
//! kernel delivers the packets to every socket that joined the group on `lo`.

use std::collections::{HashMap, HashSet};
use std::future::pending;
use std::time::Duration;

use libp2p_identity::PeerId;
use mdns_sd::{
    DaemonEvent, IfKind, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo,
};
use multiaddr::{Multiaddr, Protocol};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::addrs;
use crate::config::Config;
use crate::event::{DiscoveryEvent, Source};
use crate::txt::{Advertisement, MAX_ADDRS};
use crate::{Error, Result};

/// The DNS-SD service type of the mesh.
pub const SERVICE_TYPE: &str = "_mesh-price._udp.local.";
/// How often the advertisement is recomputed even without a change (interface addresses of an
/// unspecified listener may change).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Wait before browsing again when the daemon ended a subscription (it does when its event
/// channel is full).
const REBROWSE_DELAY: Duration = Duration::from_secs(1);
/// Bound on waiting for the daemon while stopping.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts the mdns-sd daemon on `config.mdns_port` with the configured interface selection
/// applied before anything else is queued.
pub(crate) fn start_daemon(config: &Config) -> Result<ServiceDaemon> {
    let mdns = |action| move |source| Error::Mdns { action, source };
    let daemon =
        ServiceDaemon::new_with_port(config.mdns_port).map_err(mdns("starting the mDNS daemon"))?;
    if !config.mdns_interfaces.is_empty() {
        let kinds: Vec<IfKind> = config.mdns_interfaces.iter().flat_map(|i| i.if_kinds()).collect();
        // The daemon runs the commands in order: the selection applies before any browse or
        // registration is queued.
        let selected = daemon
            .disable_interface(IfKind::All)
            .map_err(mdns("disabling the mDNS interfaces"))
            .and_then(|()| {
                daemon.enable_interface(kinds).map_err(mdns("enabling the chosen mDNS interfaces"))
            });
        if let Err(e) = selected {
            // Never leave a daemon running on every interface.
            let _ = daemon.shutdown();
            return Err(e);
        }
    }
    Ok(daemon)
}

/// The first TCP or UDP port of the addresses (for the SRV record; the TXT record is what
/// mesh nodes read).
fn srv_port(addrs: &[Multiaddr]) -> u16 {
    addrs
        .iter()
        .flat_map(|a| a.iter())
        .find_map(|p| match p {
            Protocol::Tcp(port) | Protocol::Udp(port) => Some(port),
            _ => None,
        })
        .unwrap_or(0)
}

/// Indexes of the loopback interfaces of this host.
fn loopback_interfaces() -> HashSet<u32> {
    if_addrs::get_if_addrs()
        .map(|list| list.into_iter().filter(|i| i.is_loopback()).filter_map(|i| i.index).collect())
        .unwrap_or_default()
}

/// A loopback address that really came in over a loopback interface: the peer runs on this
/// host. (A LAN peer claiming 127.0.0.1 does not make us dial our own loopback.)
fn seen_on_loopback(addr: &ScopedIp, loopback: &HashSet<u32>) -> bool {
    if !addr.to_ip_addr().is_loopback() {
        return false;
    }
    match addr {
        ScopedIp::V4(v4) => v4.interface_ids().iter().any(|id| loopback.contains(&id.index)),
        ScopedIp::V6(v6) => loopback.contains(&v6.scope_id().index),
        _ => false,
    }
}

async fn recv<T>(rx: Option<&mdns_sd::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv_async().await.ok(),
        None => pending().await,
    }
}

async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => pending().await,
    }
}

/// The mDNS task's state: our registration and the peers we reported.
pub(crate) struct MdnsTask {
    daemon: ServiceDaemon,
    local: PeerId,
    instance: String,
    fullname: String,
    config: Config,
    events: mpsc::Sender<DiscoveryEvent>,
    /// Last `PeerFound` per service instance (lowercase full name).
    peers: HashMap<String, DiscoveryEvent>,
    /// TXT strings of our current registration.
    registered: Option<Vec<(String, String)>>,
    loopback: HashSet<u32>,
}

impl MdnsTask {
    pub(crate) fn new(
        daemon: ServiceDaemon,
        local: PeerId,
        config: Config,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Self {
        // A base58 peer id is 46 to 52 characters: within the 63-byte DNS label limit.
        let instance = local.to_base58();
        let fullname = format!("{instance}.{SERVICE_TYPE}");
        Self {
            daemon,
            local,
            instance,
            fullname,
            config,
            events,
            peers: HashMap::new(),
            registered: None,
            loopback: loopback_interfaces(),
        }
    }

    /// Runs until `cancel`: browses, and (re-)registers our advertisement when it changes, at
    /// most once per `readvertise_interval`. Then withdraws it and stops the daemon.
    pub(crate) async fn run(
        mut self,
        mut advert: watch::Receiver<Advertisement>,
        cancel: CancellationToken,
    ) {
        let mut browse = match self.daemon.browse(SERVICE_TYPE) {
            Ok(rx) => Some(rx),
            Err(e) => {
                warn!(error = %e, "cannot browse for mDNS peers; retrying");
                None
            }
        };
        let mut rebrowse_at = browse.is_none().then(|| Instant::now() + REBROWSE_DELAY);
        let mut monitor = self.daemon.monitor().ok();
        let mut advert_open = true;
        let mut due = Some(Instant::now());
        let mut last_advertised: Option<Instant> = None;
        let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.reset();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = advert.changed(), if advert_open => match changed {
                    Ok(()) => {
                        let earliest = last_advertised
                            .map_or_else(Instant::now, |t| t + self.config.readvertise_interval);
                        due.get_or_insert(earliest);
                    }
                    // Every handle is gone: the advertisement stays as it is.
                    Err(_) => advert_open = false,
                },
                () = at(due) => {
                    due = None;
                    let current = advert.borrow_and_update().clone();
                    if self.advertise(&current) {
                        last_advertised = Some(Instant::now());
                    }
                }
                _ = refresh.tick() => {
                    let current = advert.borrow().clone();
                    if due.is_none() && self.advertise(&current) {
                        last_advertised = Some(Instant::now());
                    }
                }
                event = recv(browse.as_ref()) => match event {
                    Some(event) => self.on_service_event(event, &cancel).await,
                    None => {
                        warn!("the mDNS browse subscription ended; browsing again");
                        browse = None;
                        rebrowse_at = Some(Instant::now() + REBROWSE_DELAY);
                    }
                },
                () = at(rebrowse_at) => match self.daemon.browse(SERVICE_TYPE) {
                    Ok(rx) => {
                        browse = Some(rx);
                        rebrowse_at = None;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot browse for mDNS peers; retrying");
                        rebrowse_at = Some(Instant::now() + REBROWSE_DELAY * 5);
                    }
                },
                event = recv(monitor.as_ref()) => match event {
                    Some(DaemonEvent::Error(e)) => warn!(error = %e, "mDNS daemon error"),
                    Some(other) => debug!(event = ?other, "mDNS daemon event"),
                    None => monitor = None,
                },
            }
        }
        self.stop().await;
    }

    /// Registers (or re-registers, or withdraws) our advertisement. Returns whether the
    /// daemon was asked to send anything.
    fn advertise(&mut self, advert: &Advertisement) -> bool {
        let local_ips = addrs::local_ips(&self.config.mdns_interfaces);
        let addrs = addrs::advertised(&advert.addrs, &local_ips, MAX_ADDRS);
        if addrs.is_empty() {
            if self.registered.take().is_some() {
                info!("mDNS advertisement withdrawn: no listen address to advertise");
                let _status = self.unregister();
                return true;
            }
            debug!("no listen address to advertise over mDNS yet");
            return false;
        }
        let port = srv_port(&addrs);
        let txt = Advertisement { addrs, ..advert.clone() }.to_txt();
        if self.registered.as_ref() == Some(&txt.properties) {
            return false;
        }
        if txt.dropped_addrs > 0 {
            warn!(
                dropped = txt.dropped_addrs,
                "listen addresses left out of the mDNS advertisement (TXT size limit)"
            );
        }
        let host = format!("{}.local.", self.instance);
        let info =
            ServiceInfo::new(SERVICE_TYPE, &self.instance, &host, "", port, &txt.properties[..])
                .map(|info| {
                    let mut info = info.enable_addr_auto();
                    if !self.config.mdns_interfaces.is_empty() {
                        info.set_interfaces(
                            self.config.mdns_interfaces.iter().flat_map(|i| i.if_kinds()).collect(),
                        );
                    }
                    info
                });
        match info.and_then(|info| self.daemon.register(info)) {
            Ok(()) => {
                let addrs = txt.properties.len()
                    - txt.properties.iter().take_while(|(k, _)| !k.starts_with("addr")).count();
                info!(
                    role = %advert.role,
                    hop_distance = ?advert.hop_distance,
                    addrs,
                    "mDNS advertisement registered"
                );
                self.registered = Some(txt.properties);
            }
            Err(e) => warn!(error = %e, "cannot register the mDNS advertisement"),
        }
        true
    }

    fn unregister(&self) -> Option<mdns_sd::Receiver<mdns_sd::UnregisterStatus>> {
        match self.daemon.unregister(&self.fullname) {
            Ok(status) => Some(status),
            Err(e) => {
                debug!(error = %e, "cannot withdraw the mDNS advertisement");
                None
            }
        }
    }

    async fn on_service_event(&mut self, event: ServiceEvent, cancel: &CancellationToken) {
        match event {
            ServiceEvent::ServiceResolved(service) => self.on_resolved(&service, cancel).await,
            ServiceEvent::ServiceRemoved(_, fullname) => self.on_removed(&fullname, cancel).await,
            _ => {}
        }
    }

    async fn on_resolved(&mut self, service: &ResolvedService, cancel: &CancellationToken) {
        let key = service.fullname.to_lowercase();
        if key == self.fullname.to_lowercase() {
            return;
        }
        let props = service.txt_properties.iter().map(|p| (p.key(), p.val()));
        let advert = match Advertisement::from_txt(props, self.config.max_addrs_per_peer) {
            Ok(advert) => advert,
            Err(e) => {
                debug!(fullname = %service.fullname, error = %e, "ignoring a malformed mesh advertisement");
                return;
            }
        };
        if advert.peer_id == self.local {
            return;
        }
        let same_host = service.addresses.iter().any(|a| seen_on_loopback(a, &self.loopback));
        let addrs = addrs::received(
            advert.addrs,
            same_host,
            self.config.addr_filter,
            self.config.max_addrs_per_peer,
        );
        if addrs.is_empty() {
            debug!(peer = %advert.peer_id, "mDNS peer advertises no address we can dial");
            return;
        }
        let event = DiscoveryEvent::PeerFound {
            peer_id: advert.peer_id,
            addrs,
            role: Some(advert.role),
            hop_distance: advert.hop_distance,
            source: Source::Mdns,
        };
        match self.peers.get(&key) {
            Some(previous) if *previous == event => return,
            Some(_) => {}
            None if self.peers.len() >= self.config.max_tracked_peers => {
                debug!(peer = %advert.peer_id, "too many mDNS peers tracked; ignoring one more");
                return;
            }
            None => {}
        }
        if let Some(previous) = self.peers.insert(key, event.clone()) {
            // The instance now names another peer: the old one is gone unless seen elsewhere.
            self.expire_if_gone(previous.peer_id(), advert.peer_id, cancel).await;
        }
        debug!(peer = %advert.peer_id, role = %advert.role, hop_distance = ?advert.hop_distance, "mDNS peer found");
        self.emit(event, cancel).await;
    }

    async fn on_removed(&mut self, fullname: &str, cancel: &CancellationToken) {
        if let Some(previous) = self.peers.remove(&fullname.to_lowercase()) {
            debug!(peer = %previous.peer_id(), "mDNS peer expired");
            self.expire_if_gone(previous.peer_id(), self.local, cancel).await;
        }
    }

    async fn expire_if_gone(&self, peer: PeerId, unless: PeerId, cancel: &CancellationToken) {
        if peer != unless && !self.peers.values().any(|e| e.peer_id() == peer) {
            self.emit(DiscoveryEvent::PeerExpired { peer_id: peer }, cancel).await;
        }
    }

    async fn emit(&self, event: DiscoveryEvent, cancel: &CancellationToken) {
        tokio::select! {
            _ = cancel.cancelled() => {}
            sent = self.events.send(event) => if sent.is_err() {
                debug!("discovery events receiver dropped");
            },
        }
    }

    /// Withdraws our advertisement (goodbye packets, so peers expire us at once) and stops
    /// the daemon thread, each bounded by [`STOP_TIMEOUT`].
    async fn stop(self) {
        if self.registered.is_some()
            && let Some(status) = self.unregister()
        {
            let _ = timeout(STOP_TIMEOUT, status.recv_async()).await;
        }
        match self.daemon.shutdown() {
            Ok(status) => {
                let _ = timeout(STOP_TIMEOUT, status.recv_async()).await;
            }
            Err(e) => debug!(error = %e, "mDNS daemon already stopped"),
        }
    }
}

impl Drop for MdnsTask {
    /// A task dropped without [`MdnsTask::stop`] (its runtime shut down) still ends the daemon
    /// thread; after `stop` this is a no-op.
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn srv_port_is_the_first_transport_port() {
        let addrs: Vec<Multiaddr> = vec![
            "/dns4/x.example/tcp/4001".parse().unwrap(),
            "/ip4/1.2.3.4/udp/9/quic-v1".parse().unwrap(),
        ];
        assert_eq!(srv_port(&addrs), 4001);
        assert_eq!(srv_port(&[]), 0);
    }

    #[test]
    fn the_service_type_fits_mdns_sd_limits() {
        // mdns-sd refuses service names longer than 15 bytes ("_mesh-price" is 11).
        let name = SERVICE_TYPE.split('.').next().unwrap();
        assert!(name.len() <= 15);
        let info =
            ServiceInfo::new(SERVICE_TYPE, &PeerId::random().to_base58(), "h.local.", "", 1, None);
        assert!(info.is_ok());
    }
}
