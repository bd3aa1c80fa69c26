//! Hostile peers against the relay's own tables (issue 31, items 4, 6 and 7): hop counts that
//! lie, origins that publish without limit, announcements never served and copies replayed
//! with rising TTLs. Real relays on the memory transport, in this process; the hostile peers
//! are `mesh_testkit::hostile::HostilePeer`s connected to the victim, as in every attack test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mesh_protocol::{Envelope, Identity, MessageId, encode_envelope};
use mesh_relay::OriginRate;
use mesh_testkit::hostile::{self, HostileConfig, HostilePeer};
use mesh_testkit::{TestNet, Topology, WAIT, eventually, now_ms, price_batch};
use mesh_tests::reliability::report;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn frame_with(envelope: &Envelope, ttl: u8, hop_count: u8) -> Vec<u8> {
    hostile::frame(envelope, ttl, hop_count).unwrap()
}

/// A hostile peer connected to node `victim` of `net`.
async fn hostile_at(net: &TestNet, victim: usize) -> anyhow::Result<HostilePeer> {
    let peer = HostilePeer::start(HostileConfig::default()).await?;
    peer.connect(&net.node(victim).addr()).await?;
    Ok(peer)
}

/// Five peers claim to be next to every provider (hop count 0) with copies of the provider's
/// messages, duplicates and a first copy alike. The victim's view of who is near a provider,
/// which decides the peers it keeps above its maximum, stays that of its honest links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_peers_claiming_hop_zero_do_not_displace_honest_links() -> anyhow::Result<()> {
    // 0 = the provider, 1..=3 its honest neighbours, 4 the victim (linked to 1..=3), and five
    // hostile peers connected to the victim only.
    const VICTIM: usize = 4;
    let edges = vec![(0, 1), (0, 2), (0, 3), (1, VICTIM), (2, VICTIM), (3, VICTIM)];
    let net = TestNet::builder().nodes(5).topology(Topology::Custom(edges)).build().await?;
    let provider = net.node(0).identity.clone();
    let victim = net.node(VICTIM).running()?.clone();
    let mut hostile = Vec::new();
    for _ in 0..5 {
        hostile.push(hostile_at(&net, VICTIM).await?);
    }

    // An honest message: the victim learns its honest peers are one hop from the provider,
    // and the hostile peers get a copy to play with.
    let honest = price_batch(&provider, 1, now_ms(), 2, 10)?;
    net.publish(0, &honest).await?;
    net.wait_delivered_everywhere(&honest.message_id()).await?;
    let before = victim.stats();
    // Duplicates claiming hop 0, and one first copy of a new provider message claiming it too.
    let fresh = price_batch(&provider, 2, now_ms(), 2, 10)?;
    for h in &hostile {
        h.send(victim.peer_id(), frame_with(&honest, 1, 0)).await?;
    }
    hostile[0].send(victim.peer_id(), frame_with(&fresh, 9, 0)).await?;
    net.wait_delivered(&fresh.message_id(), &[VICTIM]).await?;
    eventually(WAIT, "the victim took every hostile copy", || {
        victim.stats().duplicates >= before.duplicates + hostile.len() as u64
    })
    .await?;
    // The peer manager hears of distances on the swarm task: one more message through the
    // honest links, and a status refresh, come after the hostile copies.
    let barrier = price_batch(&provider, 3, now_ms(), 2, 10)?;
    net.publish(0, &barrier).await?;
    net.wait_delivered(&barrier.message_id(), &[VICTIM]).await?;
    // Only first copies teach a distance: under tree push, the honest peer the provider's
    // messages come through (at least one of the three).
    let honest_peers: Vec<_> = (1..=3).map(|i| net.node(i).peer_id()).collect();
    eventually(WAIT, "the victim's distances", || {
        let status = victim.status();
        status.peers.len() == 8
            && status
                .peers
                .iter()
                .any(|p| honest_peers.contains(&p.peer_id) && p.provider_distance == Some(1))
    })
    .await?;
    let status = victim.status();
    for p in &status.peers {
        if let Some(i) = hostile.iter().position(|h| h.peer_id() == p.peer_id) {
            // Never nearer than the honest links: unknown (duplicates teach nothing), or one
            // hop (a first copy from a peer that is not its origin).
            assert!(
                p.provider_distance.is_none_or(|d| d >= 1),
                "hostile node {i} ranks nearer than the honest links: {status:?}"
            );
        }
    }
    assert_eq!(status.own_distance, Some(2), "{status:?}");
    net.shutdown().await;
    Ok(())
}

/// Resident memory of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    hostile::resident_memory_bytes().unwrap_or(0) / 1024
}

/// Fifty throwaway keys, each accepted once (within the budget of unknown origins), then
/// publishing as fast as one hostile peer can send, with the young origins' shared budget out
/// of the way (every accepted origin counts as established at once): each key is held to its
/// rate at the first hop, every honest message still reaches every honest node, and the
/// victim's tables stay within their bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_known_keys_flooding_are_held_to_their_rate() -> anyhow::Result<()> {
    let rate = OriginRate {
        messages_per_sec: 5.0,
        message_burst: 20.0,
        young_for: Duration::ZERO,
        ..OriginRate::default()
    };
    // What the rate allows each key through the one hostile link: its first message, a burst,
    // and five a second for the flood (and the waits after it).
    let allowed = |secs: f64| KEYS as f64 * (1.0 + 20.0 + 5.0 * secs);
    flood_of_keys("flood_known_keys", rate, allowed).await
}

/// The same flood with the default window (ten minutes): the fifty keys are young, and all
/// of them together get one share of the hostile link (a burst of 100, then 20 a second here),
/// not one share each as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_young_keys_flooding_share_one_budget_of_the_link() -> anyhow::Result<()> {
    let rate = OriginRate {
        messages_per_sec: 5.0,
        message_burst: 20.0,
        young_messages_per_sec: 20.0,
        young_message_burst: 100.0,
        ..OriginRate::default()
    };
    // Each key's first message (the budget of unknown origins, before any rate), then the
    // young budget of the link.
    let allowed = |secs: f64| KEYS as f64 + 100.0 + 20.0 * secs;
    flood_of_keys("flood_young_keys", rate, allowed).await
}

const KEYS: usize = 50;

/// The flood of [`fifty_known_keys_flooding_are_held_to_their_rate`] with `rate` at every
/// node; at most `allowed(seconds since the flood began)` junk messages may be accepted at the
/// victim.
async fn flood_of_keys(
    name: &str,
    rate: OriginRate,
    allowed: impl Fn(f64) -> f64,
) -> anyhow::Result<()> {
    const HONEST: usize = 10;
    const VICTIM: usize = 0;
    const PUBLISHER: usize = 5;
    const PER_KEY: usize = 200;
    let edges = Topology::RandomRegular { degree: 4 }.edges(HONEST, 5)?;
    let net = TestNet::builder()
        .nodes(HONEST)
        .topology(Topology::Custom(edges))
        .configure(move |_, c| c.core.origin_rate = Some(rate))
        .build()
        .await?;
    let victim = net.node(VICTIM).running()?.clone();
    let hostile = hostile_at(&net, VICTIM).await?;
    let vp = victim.peer_id();

    // The keys and their messages (signing is CPU work: on the blocking pool).
    let base = now_ms() - 5_000;
    let (firsts, flood, junk) = tokio::task::spawn_blocking(move || {
        let keys: Vec<Identity> = (0..KEYS).map(|_| Identity::generate()).collect();
        let mut junk: Vec<MessageId> = Vec::new();
        let mut frame = |key: &Identity, k: usize| {
            let m = price_batch(key, k as u64, base + k as i64, 1, 10).unwrap();
            junk.push(m.message_id());
            encode_envelope(&m).unwrap()
        };
        let firsts: Vec<Vec<u8>> = keys.iter().map(|key| frame(key, 0)).collect();
        let mut flood = Vec::with_capacity(KEYS * PER_KEY);
        for k in 1..=PER_KEY {
            for key in &keys {
                flood.push(frame(key, k));
            }
        }
        (firsts, flood, junk)
    })
    .await?;

    // Each key is accepted once: they are known origins from now on.
    let started = Instant::now();
    for f in firsts {
        hostile.send(vp, f).await?;
    }
    eventually(WAIT, "the fifty keys accepted", || victim.stats().delivered >= KEYS as u64).await?;

    let rss_before = rss_kib();
    let before = victim.stats();
    let flood_started = Instant::now();
    let sender = tokio::spawn(async move {
        for f in flood {
            if hostile.send(vp, f).await.is_err() {
                break;
            }
        }
    });
    // Honest traffic meanwhile: two batches a second for three seconds.
    let provider = net.node(PUBLISHER).identity.clone();
    let mut honest = Vec::new();
    for round in 0..6u64 {
        let m = price_batch(&provider, round, now_ms(), 20, 10)?;
        net.publish(PUBLISHER, &m).await?;
        honest.push(m.message_id());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sender.await?;
    let flood_secs = flood_started.elapsed().as_secs_f64();
    for id in &honest {
        net.wait_delivered(id, &(0..HONEST).collect::<Vec<_>>()).await?;
    }
    let after = victim.stats();
    let accepted = junk.iter().filter(|id| net.node(VICTIM).received(id).is_some()).count();
    let allowed = allowed(started.elapsed().as_secs_f64());
    let rss_growth_kib = rss_kib().saturating_sub(rss_before);
    report(
        name,
        json!({
            "keys": KEYS,
            "junk_sent": KEYS * (PER_KEY + 1),
            "flood_s": flood_secs,
            "junk_accepted_at_victim": accepted,
            "allowed_by_rate": allowed,
            "rate_limited_at_victim": after.rate_limited - before.rate_limited,
            "honest_messages": honest.len(),
            "process_rss_growth_kib": rss_growth_kib,
        }),
    );
    assert!(after.rate_limited - before.rate_limited > 1_000, "{after:?}");
    assert!(accepted as f64 <= allowed, "{accepted} junk messages accepted, {allowed} allowed");
    // The rate tables: at most 64 peers x 1,026 buckets of some 50 bytes (3 MiB) by
    // construction; the whole process (eleven relays and the attacker's 10,050 frames) grows
    // by far less than this loose bound.
    assert!(rss_growth_kib < 256 * 1024, "grew by {rss_growth_kib} KiB");
    net.shutdown().await;
    Ok(())
}

/// A hostile peer announces 10,000 ids it never serves, again and again, and replays copies of
/// honest messages with rising TTLs. The victim hears of honest messages only through
/// announcements (its honest neighbours send ids, never messages), so an announcement table
/// full of the attacker's ids would lose them. The attacker fills only its share, is charged
/// for what it does not serve, and each honest id is re-forwarded at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_announcements_and_rising_ttls_do_not_cost_honest_messages() -> anyhow::Result<()> {
    // 0 = the publisher, 2 and 3 announce only, 1 = the victim, 4 beyond it, and a hostile
    // peer connected to the victim.
    const VICTIM: usize = 1;
    let edges = vec![(0, 2), (0, 3), (2, VICTIM), (3, VICTIM), (VICTIM, 4)];
    let net = TestNet::builder()
        .nodes(5)
        .topology(Topology::Custom(edges))
        .configure(|i, c| {
            if i == 2 || i == 3 {
                c.lazy.tree = false;
                c.lazy.eager_peers = 0;
            }
        })
        .build()
        .await?;
    let victim = net.node(VICTIM).running()?.clone();
    let hostile = hostile_at(&net, VICTIM).await?;
    let vp = victim.peer_id();
    let provider = net.node(0).identity.clone();
    let honest_nodes = [1usize, 2, 3, 4];

    // Rising TTLs: each honest message, once the victim has it, comes back from the hostile
    // peer with every TTL up to the highest.
    let mut ids = Vec::new();
    let before = victim.stats();
    for round in 0..3u64 {
        let m = price_batch(&provider, round, now_ms(), 5, 10)?;
        net.publish(0, &m).await?;
        net.wait_delivered(&m.message_id(), &honest_nodes).await?;
        for ttl in 2..=mesh_protocol::MAX_TTL {
            hostile.send(vp, frame_with(&m, ttl, 1)).await?;
        }
        ids.push(m.message_id());
    }
    eventually(WAIT, "the victim took every replayed copy", || {
        let s = victim.stats();
        s.duplicates + s.reforwarded >= before.duplicates + before.reforwarded + 3 * 19
    })
    .await?;
    let reforwarded = victim.stats().reforwarded - before.reforwarded;
    assert!(reforwarded <= 3, "{reforwarded} re-forwards for 3 ids");

    // Fake announcements, 10,000 new ids every 100 ms, while honest messages flow.
    let flooding = CancellationToken::new();
    let stop = flooding.clone();
    let announcer = hostile.clone();
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        while !stop.is_cancelled() && sent < 200_000 {
            let fake: Vec<MessageId> = hostile::random_ids(10_000);
            for frame in hostile::haves(&fake) {
                if announcer.send(vp, frame).await.is_err() {
                    return sent;
                }
            }
            sent += fake.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for round in 10..20u64 {
        let m = price_batch(&provider, round, now_ms(), 5, 10)?;
        net.publish(0, &m).await?;
        ids.push(m.message_id());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        net.wait_delivered(id, &honest_nodes).await?;
    }
    flooding.cancel();
    let announced = flood.await?;
    let after = victim.stats();
    report(
        "fake_announcements_and_rising_ttls",
        json!({
            "fake_ids_announced": announced,
            "honest_messages": ids.len(),
            "reforwards_for_3_replayed_ids": reforwarded,
            "wanted_full_at_victim": after.wanted_full - before.wanted_full,
            "unserved_at_victim": after.wants_unserved - before.wants_unserved,
            "victim_bans": after.bans,
        }),
    );
    assert!(after.wants_unserved - before.wants_unserved >= 16, "{after:?}");
    assert!(after.bans >= 1, "the announcer of ids it never serves is banned: {after:?}");
    net.shutdown().await;
    Ok(())
}

/// An eclipse attempt (issue 28, item 3). Thirty Sybil peers from one /24 (127.66.0.1 to
/// 127.66.0.30) join a 10-node mesh at its node 0, and answer every peer-exchange request with
/// each other only (at addresses of that /24; nothing listens there). The honest nodes sit in
/// networks of their own (127.0.10.0/24 ...), three of them linked to the victim, which dialed
/// none of them (no link of its own is pinned), asks every new peer for its peers at once,
/// explores every 2 s and keeps 4 to 8 peers. The per-network bounds hold: the victim keeps its
/// honest links and receives every round (each round is awaited at the victim), and the
/// Sybils' network never holds more than its share of the known table nor more than its share
/// of the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_sybils_of_one_network_cannot_surround_a_node() -> anyhow::Result<()> {
    const VICTIM: usize = 0;
    const SYBILS: u8 = 30;
    let share = mesh_relay::peer_manager::Config::default().max_known_per_subnet;
    // The victim's three honest peers dial it; the other honest nodes form a ring with chords.
    let mut edges = vec![(1, VICTIM), (2, VICTIM), (3, VICTIM)];
    for i in 1..10 {
        edges.push((i, i % 9 + 1));
        edges.push((i, (i + 3) % 9 + 1));
    }
    let net = TestNet::builder()
        .nodes(10)
        .transport(mesh_testkit::Transport::Tcp)
        .tcp_ip(|i| std::net::Ipv4Addr::new(127, 0, 10 + i as u8, 1))
        .topology(Topology::Custom(edges))
        .configure(|i, c| {
            c.peer_exchange = true;
            if i == VICTIM {
                c.eager_peer_exchange = true;
                c.peers.min_peers = 4;
                c.peers.max_peers = 8;
                c.peers.prune_grace = Duration::from_secs(1);
                c.peers.explore_interval = Some(Duration::from_secs(2));
                c.peers.subnet_loopback = true;
                c.inbound.limit_loopback = true;
            }
        })
        .build()
        .await?;
    let victim = net.node(VICTIM).running()?.clone();
    let honest: Vec<mesh_relay::PeerId> = (1..10).map(|i| net.node(i).peer_id()).collect();

    // The Sybils' keys: 30 that connect, and 170 more that only exist in their answers. Each
    // answers with 32 of them (a full answer), a different slice each, all in its network.
    let keys: Vec<Identity> = (0..200).map(|_| Identity::generate()).collect();
    let sybil_addr = |k: usize| -> mesh_relay::Multiaddr {
        format!("/ip4/127.66.0.{}/tcp/4001", k % 250 + 1).parse().unwrap()
    };
    let pool: Vec<mesh_relay::pex::Entry> =
        keys.iter().enumerate().map(|(k, id)| (id.peer_id(), vec![sybil_addr(k)])).collect();
    let mut sybils = Vec::new();
    for (k, key) in keys.iter().take(SYBILS as usize).enumerate() {
        let others: Vec<mesh_relay::pex::Entry> = pool
            .iter()
            .cycle()
            .skip(k * 32)
            .filter(|(p, _)| *p != key.peer_id())
            .take(32)
            .cloned()
            .collect();
        let sybil = HostilePeer::start(HostileConfig {
            identity: Some(key.clone()),
            source_ip: Some(std::net::IpAddr::from([127, 66, 0, k as u8 + 1])),
            want_announced: false,
            reported_addrs: vec![sybil_addr(k)],
            pex_answer: Some(others),
            ..HostileConfig::default()
        })
        .await?;
        // Refused past the per-network inbound share: that is the point.
        let _ = sybil.connect(&net.node(VICTIM).addr()).await;
        sybils.push(sybil);
    }

    // Rounds under attack: a provider publishes at node 5, far from the victim, once a second.
    let provider = Identity::generate();
    let sybil_net = mesh_relay::subnet::subnet([127, 66, 0, 1].into());
    let sybil_ids: Vec<mesh_relay::PeerId> = keys.iter().map(Identity::peer_id).collect();
    let (mut most_known, mut most_linked, mut fewest_honest) = (0usize, 0usize, usize::MAX);
    let rounds = 12u64;
    for round in 1..=rounds {
        let m = price_batch(&provider, round, now_ms(), 3, 10)?;
        net.publish(5, &m).await?;
        net.wait_delivered(&m.message_id(), &[VICTIM]).await?;
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let status = victim.status();
            most_known =
                most_known.max(status.known_by_subnet.get(&sybil_net).copied().unwrap_or(0));
            let linked = |ids: &[mesh_relay::PeerId]| {
                status.peers.iter().filter(|p| ids.contains(&p.peer_id)).count()
            };
            most_linked = most_linked.max(linked(&sybil_ids));
            fewest_honest = fewest_honest.min(linked(&honest));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let answered: usize = sybils.iter().map(|s| s.pex_answered(&victim.peer_id())).sum();
    let limits = mesh_relay::InboundLimits::default();
    report(
        "eclipse_one_network",
        json!({
            "sybils": SYBILS,
            "sybil_pex_answers_taken": answered,
            "rounds": rounds,
            "rounds_received": rounds,
            "most_known_from_the_sybil_network": most_known,
            "known_share_per_network": share,
            "most_sybil_links_at_once": most_linked,
            "fewest_honest_links": fewest_honest,
        }),
    );
    // Two answers name more peers of the network than its share: the bound was put to work.
    assert!(answered >= 2, "{answered} Sybil answers taken: the attack did not happen");
    assert!(most_known <= share, "{most_known} known peers of one network, share {share}");
    assert!(
        most_linked <= limits.max_per_subnet as usize,
        "{most_linked} Sybil links, at most {} inbound per network",
        limits.max_per_subnet
    );
    assert!(fewest_honest >= 2, "the victim fell to {fewest_honest} honest links");
    drop(sybils);
    net.shutdown().await;
    Ok(())
}
