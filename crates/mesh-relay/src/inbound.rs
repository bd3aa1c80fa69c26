//! Inbound connection limits by remote address: one address (or one /24, one IPv6 /48)
//! cannot hold all of a node's handshake slots or all of its inbound connections, and
//! inbound connections never take the slots kept for the node's own dials.
//!
//! libp2p's `connection_limits` counts per node and per PeerId only, and a PeerId costs nothing:
//! 16 stalled TCP connections from one address blocked every honest inbound connection, and a
//! few throwaway keys filled the shared established slots so outbound and bootstrap dials
//! failed. This behaviour refuses by remote IP at both steps (pending: before the handshake,
//! established: after it) and counts each refusal in `mesh_relay_connections_refused_total`
//! with its reason.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::{ConnectedPoint, Endpoint, Multiaddr, transport::PortUse};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};

use crate::stats::{Stats, bump};
use crate::subnet::subnet;

/// Inbound connection limits (part of [`crate::Config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundLimits {
    /// Inbound connections in their handshake at once, for the whole node.
    pub max_pending: u32,
    /// Inbound connections in their handshake at once from one IP address.
    pub max_pending_per_ip: u32,
    /// Inbound connections in their handshake at once from one /24 (IPv4) or /48 (IPv6).
    pub max_pending_per_subnet: u32,
    /// Established inbound connections from one IP address.
    pub max_per_ip: u32,
    /// Established inbound connections from one /24 (IPv4) or /48 (IPv6).
    pub max_per_subnet: u32,
    /// Whether the per-address limits apply to loopback peers too. Off by default: a node's
    /// loopback peers are its operator's own processes (a lab, or tests that run every node on
    /// 127.0.0.1); a lab that plays attacker from 127.0.0.2 turns it on.
    pub limit_loopback: bool,
    /// How long a connection may take from its first byte to an established, multiplexed
    /// link (TCP and the memory transport: Noise and yamux; QUIC has its own handshake
    /// timeout). libp2p's default is 10 s.
    pub handshake_timeout: Duration,
}

impl Default for InboundLimits {
    fn default() -> Self {
        Self {
            max_pending: 16,
            max_pending_per_ip: 2,
            max_pending_per_subnet: 4,
            max_per_ip: 3,
            max_per_subnet: 6,
            limit_loopback: false,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Why an inbound connection was refused: the `reason` label of
/// `mesh_relay_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The node's handshake slots were all taken.
    PendingTotal,
    /// The address held its share of handshake slots.
    PendingPerIp,
    /// The address's /24 or /48 held its share of handshake slots.
    PendingPerSubnet,
    /// The inbound slots (the maximum of peers) were all taken.
    InboundTotal,
    /// The address held its share of inbound connections.
    InboundPerIp,
    /// The address's /24 or /48 held its share of inbound connections.
    InboundPerSubnet,
    /// Two connections with that peer already (libp2p `connection_limits`).
    PerPeer,
    /// The peer is banned or blocked.
    Blocked,
}

impl RefusalReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingTotal => "pending_total",
            Self::PendingPerIp => "pending_per_ip",
            Self::PendingPerSubnet => "pending_per_subnet",
            Self::InboundTotal => "inbound_total",
            Self::InboundPerIp => "inbound_per_ip",
            Self::InboundPerSubnet => "inbound_per_subnet",
            Self::PerPeer => "per_peer",
            Self::Blocked => "blocked",
        }
    }
}

/// The error an inbound connection is denied with.
#[derive(Debug, thiserror::Error)]
#[error("inbound connection refused: {} (at most {limit})", reason.as_str())]
pub struct Refused {
    /// Which limit.
    pub reason: RefusalReason,
    /// Its value.
    pub limit: u32,
}

/// Counts a refusal in the relay's stats and the process metrics.
pub(crate) fn count_refusal(stats: &Stats, reason: RefusalReason) {
    bump(&stats.connections_refused);
    metrics::counter!("mesh_relay_connections_refused_total", "reason" => reason.as_str())
        .increment(1);
}

/// The remote IP of an address (`None` for the memory transport).
fn remote_ip(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a).to_canonical()),
        _ => None,
    })
}

/// The behaviour: per-address counts of pending and established inbound connections.
pub(crate) struct Behaviour {
    limits: InboundLimits,
    /// Established inbound connections at most (the node's maximum of peers plus 5; outbound
    /// dials have slots of their own in `connection_limits`).
    max_inbound: u32,
    pending: HashMap<ConnectionId, Option<IpAddr>>,
    established: HashMap<ConnectionId, Option<IpAddr>>,
    stats: Arc<Stats>,
}

impl Behaviour {
    pub(crate) fn new(limits: InboundLimits, max_inbound: u32, stats: Arc<Stats>) -> Self {
        Self { limits, max_inbound, pending: HashMap::new(), established: HashMap::new(), stats }
    }

    fn limited(&self, ip: Option<IpAddr>) -> Option<IpAddr> {
        ip.filter(|ip| self.limits.limit_loopback || !ip.is_loopback())
    }

    fn refuse(&self, reason: RefusalReason, limit: u32) -> Result<(), ConnectionDenied> {
        count_refusal(&self.stats, reason);
        Err(ConnectionDenied::new(Refused { reason, limit }))
    }

    /// Checks `table` (with `total` at most) for one more connection from `ip`.
    fn check(
        &self,
        table: &HashMap<ConnectionId, Option<IpAddr>>,
        ip: Option<IpAddr>,
        (total, per_ip, per_subnet): (u32, u32, u32),
        reasons: [RefusalReason; 3],
    ) -> Result<(), ConnectionDenied> {
        if table.len() >= total as usize {
            return self.refuse(reasons[0], total);
        }
        let Some(ip) = self.limited(ip) else { return Ok(()) };
        let same_ip = table.values().filter(|v| **v == Some(ip)).count();
        if same_ip >= per_ip as usize {
            return self.refuse(reasons[1], per_ip);
        }
        let net = subnet(ip);
        let same_net = table.values().filter(|v| v.is_some_and(|v| subnet(v) == net)).count();
        if same_net >= per_subnet as usize {
            return self.refuse(reasons[2], per_subnet);
        }
        Ok(())
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let ip = remote_ip(remote);
        let l = &self.limits;
        self.check(
            &self.pending,
            ip,
            (l.max_pending, l.max_pending_per_ip, l.max_pending_per_subnet),
            [
                RefusalReason::PendingTotal,
                RefusalReason::PendingPerIp,
                RefusalReason::PendingPerSubnet,
            ],
        )?;
        self.pending.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.pending.remove(&connection_id);
        let l = &self.limits;
        self.check(
            &self.established,
            remote_ip(remote),
            (self.max_inbound, l.max_per_ip, l.max_per_subnet),
            [
                RefusalReason::InboundTotal,
                RefusalReason::InboundPerIp,
                RefusalReason::InboundPerSubnet,
            ],
        )?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                if let ConnectedPoint::Listener { send_back_addr, .. } = e.endpoint {
                    self.established.insert(e.connection_id, remote_ip(send_back_addr));
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.established.remove(&connection_id);
            }
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.pending.remove(&connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str) -> Multiaddr {
        format!("/ip4/{ip}/tcp/4001").parse().unwrap()
    }

    fn behaviour(limit_loopback: bool) -> Behaviour {
        let limits = InboundLimits { limit_loopback, ..InboundLimits::default() };
        Behaviour::new(limits, 10, Arc::default())
    }

    fn pending(b: &mut Behaviour, ip: &str) -> Result<ConnectionId, RefusalReason> {
        let id = ConnectionId::new_unchecked(rand::random::<u32>() as usize);
        b.handle_pending_inbound_connection(id, &addr("10.0.0.1"), &addr(ip))
            .map(|()| id)
            .map_err(|e| e.downcast::<Refused>().unwrap().reason)
    }

    fn established(b: &mut Behaviour, id: ConnectionId, ip: &str) -> Result<(), RefusalReason> {
        let remote = addr(ip);
        b.handle_established_inbound_connection(id, PeerId::random(), &addr("10.0.0.1"), &remote)
            .map_err(|e| e.downcast::<Refused>().unwrap().reason)?;
        let endpoint =
            ConnectedPoint::Listener { local_addr: addr("10.0.0.1"), send_back_addr: remote };
        b.on_swarm_event(FromSwarm::ConnectionEstablished(
            libp2p::swarm::behaviour::ConnectionEstablished {
                peer_id: PeerId::random(),
                connection_id: id,
                endpoint: &endpoint,
                failed_addresses: &[],
                other_established: 0,
            },
        ));
        Ok(())
    }

    #[test]
    fn one_address_gets_its_share_of_handshake_slots_and_others_still_get_in() {
        let mut b = behaviour(false);
        assert!(pending(&mut b, "203.0.113.7").is_ok());
        assert!(pending(&mut b, "203.0.113.7").is_ok());
        assert_eq!(pending(&mut b, "203.0.113.7"), Err(RefusalReason::PendingPerIp));
        assert!(pending(&mut b, "203.0.113.8").is_ok());
        assert!(pending(&mut b, "203.0.113.8").is_ok());
        assert_eq!(pending(&mut b, "203.0.113.9"), Err(RefusalReason::PendingPerSubnet));
        // Other networks fill the node's slots up to its total, then nobody gets in.
        for n in 0..12 {
            assert!(pending(&mut b, &format!("198.51.{n}.1")).is_ok(), "{n}");
        }
        assert_eq!(pending(&mut b, "192.0.2.1"), Err(RefusalReason::PendingTotal));
        assert_eq!(b.stats.snapshot().connections_refused, 3);
    }

    #[test]
    fn a_failed_or_finished_handshake_frees_its_slot() {
        let mut b = behaviour(false);
        let first = pending(&mut b, "203.0.113.7").unwrap();
        let second = pending(&mut b, "203.0.113.7").unwrap();
        assert!(pending(&mut b, "203.0.113.7").is_err());
        b.on_swarm_event(FromSwarm::ListenFailure(ListenFailure {
            local_addr: &addr("10.0.0.1"),
            send_back_addr: &addr("203.0.113.7"),
            error: &libp2p::swarm::ListenError::Aborted,
            connection_id: first,
            peer_id: None,
        }));
        let third = pending(&mut b, "203.0.113.7").unwrap();
        established(&mut b, second, "203.0.113.7").unwrap();
        assert!(pending(&mut b, "203.0.113.7").is_ok(), "an established one no longer pends");
        let _ = third;
    }

    #[test]
    fn established_inbound_is_capped_per_address_per_subnet_and_in_total() {
        let mut b = behaviour(false);
        let open = |b: &mut Behaviour, ip: &str| {
            let id = ConnectionId::new_unchecked(rand::random::<u32>() as usize);
            established(b, id, ip).map(|()| id)
        };
        for _ in 0..3 {
            open(&mut b, "203.0.113.7").unwrap();
        }
        assert_eq!(open(&mut b, "203.0.113.7"), Err(RefusalReason::InboundPerIp));
        for _ in 0..3 {
            open(&mut b, "203.0.113.8").unwrap();
        }
        assert_eq!(open(&mut b, "203.0.113.9"), Err(RefusalReason::InboundPerSubnet));
        let gone = open(&mut b, "198.51.100.1").unwrap();
        for n in 0..3 {
            open(&mut b, &format!("198.51.{n}.2")).unwrap();
        }
        assert_eq!(open(&mut b, "192.0.2.1"), Err(RefusalReason::InboundTotal), "10 inbound");
        b.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: PeerId::random(),
            connection_id: gone,
            endpoint: &ConnectedPoint::Listener {
                local_addr: addr("10.0.0.1"),
                send_back_addr: addr("198.51.100.1"),
            },
            cause: None,
            remaining_established: 0,
        }));
        assert!(open(&mut b, "192.0.2.1").is_ok(), "a closed one frees its slot");
    }

    #[test]
    fn loopback_is_exempt_unless_asked_and_ipv6_counts_by_48() {
        let mut b = behaviour(false);
        for _ in 0..5 {
            pending(&mut b, "127.0.0.1").unwrap();
        }
        let mut b = behaviour(true);
        pending(&mut b, "127.0.0.2").unwrap();
        pending(&mut b, "127.0.0.2").unwrap();
        assert_eq!(pending(&mut b, "127.0.0.2"), Err(RefusalReason::PendingPerIp));
        let v6 = |s: &str| -> Multiaddr { format!("/ip6/{s}/tcp/1").parse().unwrap() };
        assert_eq!(remote_ip(&v6("::ffff:192.0.2.1")), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(remote_ip(&"/memory/5".parse().unwrap()), None);
    }
}
