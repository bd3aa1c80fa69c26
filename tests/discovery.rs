//! mDNS discovery on the loopback interface, end to end with real relays.
//!
//! Each test runs in a private network namespace of its own (`mesh_tests::netns`): mdns-sd
//! joins its multicast groups on every interface when it starts, and only there is "every
//! interface" the test's own loopback (and the link the test creates). Nothing reaches the
//! machine's real interfaces, and parallel runs cannot hear each other.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_discovery::{Config, Discovery, DiscoveryEvent, MdnsInterface, PeerId, Role, Source};
use mesh_protocol::Identity;
use mesh_relay::{Delivery, Relay};
use mesh_testkit::{eventually, test_config};
use mesh_tests::free_port;
use mesh_tests::netns::{in_private_netns, ip};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);
const GRACE: Duration = Duration::from_secs(3);

type Seen = Arc<Mutex<Vec<DiscoveryEvent>>>;

/// Records every event; with a relay, also does what the node does with `PeerFound`.
fn collect(mut events: mpsc::Receiver<DiscoveryEvent>, relay: Option<Relay>) -> Seen {
    let seen = Seen::default();
    let out = seen.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let (Some(relay), DiscoveryEvent::PeerFound { peer_id, addrs, hop_distance, .. }) =
                (&relay, &event)
            {
                relay.add_peer_addresses(*peer_id, addrs.clone(), *hop_distance).await.unwrap();
            }
            out.lock().unwrap().push(event);
        }
    });
    seen
}

fn events(seen: &Seen) -> Vec<DiscoveryEvent> {
    seen.lock().unwrap().clone()
}

fn found(seen: &Seen, peer: PeerId) -> bool {
    events(seen)
        .iter()
        .any(|e| matches!(e, DiscoveryEvent::PeerFound { peer_id, .. } if *peer_id == peer))
}

fn connected(relay: &Relay, peer: PeerId) -> bool {
    relay.status().peers.iter().any(|p| p.peer_id == peer)
}

struct Node {
    relay: Relay,
    discovery: Discovery,
    seen: Seen,
    _deliveries: mpsc::Receiver<Delivery>,
}

/// A relay on 127.0.0.1 that wants one peer, and a discovery on loopback advertising it.
async fn node(port: u16, cancel: &CancellationToken) -> anyhow::Result<Node> {
    let mut config = test_config();
    config.listen_addrs = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.peers.min_peers = 1;
    let (relay, deliveries) = Relay::start(&Identity::generate(), config, cancel.clone()).await?;
    let (discovery, events) =
        Discovery::start(relay.peer_id(), Config::loopback(port), cancel.clone()).await?;
    discovery.set_listen_addrs(relay.listen_addrs().await?);
    let seen = collect(events, Some(relay.clone()));
    Ok(Node { relay, discovery, seen, _deliveries: deliveries })
}

#[test]
fn two_relays_find_each_other_through_mdns_on_loopback() -> anyhow::Result<()> {
    in_private_netns(|| async {
        let port = free_port()?;
        let cancel = CancellationToken::new();
        let a = node(port, &cancel).await?;
        let b = node(port, &cancel).await?;
        let (pa, pb) = (a.relay.peer_id(), b.relay.peer_id());

        eventually(WAIT, "each finds the other through mDNS and the relays connect", || {
            found(&a.seen, pb)
                && found(&b.seen, pa)
                && connected(&a.relay, pb)
                && connected(&b.relay, pa)
        })
        .await?;
        let b_addrs = b.relay.listen_addrs().await?;
        let expected = DiscoveryEvent::PeerFound {
            peer_id: pb,
            addrs: b_addrs,
            role: Some(Role::Consumer),
            hop_distance: None,
            source: Source::Mdns,
        };
        assert!(events(&a.seen).contains(&expected), "{:?}", events(&a.seen));
        for n in [&a, &b] {
            let own = n.relay.peer_id();
            assert!(
                events(&n.seen).iter().all(|e| e.peer_id() != own),
                "own advertisement ignored"
            );
        }

        // A change of b's advertisement at run time reaches a.
        b.discovery.set_role(Role::Provider);
        b.discovery.set_hop_distance(Some(0));
        eventually(WAIT, "a sees b as a provider at hop 0", || {
            events(&a.seen).iter().any(|e| {
                matches!(e, DiscoveryEvent::PeerFound { peer_id, role: Some(Role::Provider), hop_distance: Some(0), .. } if *peer_id == pb)
            })
        })
        .await?;

        // b withdraws its advertisement when it stops: a hears the goodbye.
        b.discovery.shutdown(GRACE).await;
        eventually(WAIT, "a sees b expire", || {
            events(&a.seen).contains(&DiscoveryEvent::PeerExpired { peer_id: pb })
        })
        .await?;

        a.discovery.shutdown(GRACE).await;
        a.relay.shutdown(GRACE).await;
        b.relay.shutdown(GRACE).await;
        cancel.cancel();
        Ok(())
    })
}

/// The interface selection is what keeps mDNS on loopback: inside the namespace a veth link
/// stands for the LAN, with one node on each end. Loopback-only nodes find each other, the
/// LAN nodes find each other over the link, and neither pair ever hears the other.
#[test]
fn loopback_only_mdns_never_goes_out_on_another_interface() -> anyhow::Result<()> {
    in_private_netns(|| async {
        ip(&["link", "add", "mesh-v0", "type", "veth", "peer", "name", "mesh-v1"])?;
        ip(&["addr", "add", "10.99.0.1/24", "dev", "mesh-v0"])?;
        ip(&["addr", "add", "10.99.0.2/24", "dev", "mesh-v1"])?;
        ip(&["link", "set", "mesh-v0", "up"])?;
        ip(&["link", "set", "mesh-v1", "up"])?;
        eventually(WAIT, "the veth link is up", || {
            ["mesh-v0", "mesh-v1"].iter().all(|dev| {
                ip(&["-o", "link", "show", "dev", dev]).is_ok_and(|out| out.contains("state UP"))
            })
        })
        .await?;

        let port = free_port()?;
        let cancel = CancellationToken::new();
        let mut handles = Vec::new();
        let mut start = async |config: Config, addr: &str| -> anyhow::Result<(PeerId, Seen)> {
            let peer = Identity::generate().peer_id();
            let (discovery, events) = Discovery::start(peer, config, cancel.clone()).await?;
            discovery.set_listen_addrs(vec![addr.parse()?]);
            handles.push(discovery);
            Ok((peer, collect(events, None)))
        };
        let on = |name: &str| Config {
            mdns_interfaces: vec![MdnsInterface::Name(name.to_owned())],
            ..Config::loopback(port)
        };
        let (lo_a, seen_lo_a) = start(Config::loopback(port), "/ip4/127.0.0.1/tcp/4001").await?;
        let (lo_b, seen_lo_b) = start(Config::loopback(port), "/ip4/127.0.0.1/tcp/4002").await?;
        let (lan_c, seen_c) = start(on("mesh-v1"), "/ip4/10.99.0.2/tcp/4003").await?;
        let (lan_d, seen_d) = start(on("mesh-v0"), "/ip4/10.99.0.1/tcp/4004").await?;

        eventually(WAIT, "each pair finds each other", || {
            found(&seen_lo_a, lo_b)
                && found(&seen_lo_b, lo_a)
                && found(&seen_c, lan_d)
                && found(&seen_d, lan_c)
        })
        .await?;
        // Proving an absence takes a wait: by now every node has sent its probes, its first
        // announcement and its first queries; the second announcement follows within a second.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (seen, others) in [
            (&seen_c, [lo_a, lo_b]),
            (&seen_d, [lo_a, lo_b]),
            (&seen_lo_a, [lan_c, lan_d]),
            (&seen_lo_b, [lan_c, lan_d]),
        ] {
            let heard: Vec<_> = events(seen).iter().map(DiscoveryEvent::peer_id).collect();
            assert!(others.iter().all(|p| !heard.contains(p)), "crossed interfaces: {heard:?}");
        }
        for discovery in &handles {
            discovery.shutdown(GRACE).await;
        }
        cancel.cancel();
        Ok(())
    })
}
