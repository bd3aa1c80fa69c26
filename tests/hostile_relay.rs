//! Hostile peers against the relay's own tables (issue 31, items 4, 6 and 7): hop counts that
//! lie, origins that publish without limit, announcements never served and copies replayed
//! with rising TTLs. Real relays on the memory transport, in this process; the hostile peers
//! are relays of the same net that send raw frames.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_protocol::{Envelope, encode_envelope};
use mesh_testkit::{TestNet, Topology, WAIT, eventually, now_ms, price_batch};

fn frame_with(envelope: &Envelope, ttl: u8, hop_count: u8) -> Vec<u8> {
    let mut f = encode_envelope(envelope).unwrap();
    f[1] = ttl;
    f[2] = hop_count;
    f
}

/// Five peers claim to be next to every provider (hop count 0) with copies of the provider's
/// messages, duplicates and a first copy alike. The victim's view of who is near a provider,
/// which decides the peers it keeps above its maximum, stays that of its honest links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_peers_claiming_hop_zero_do_not_displace_honest_links() -> anyhow::Result<()> {
    // 0 = the provider, 1..=3 its honest neighbours, 4 the victim (linked to 1..=3), 5..=9 the
    // hostile peers (linked to the victim only).
    const VICTIM: usize = 4;
    let hostile: Vec<usize> = (5..10).collect();
    let mut edges = vec![(0, 1), (0, 2), (0, 3), (1, VICTIM), (2, VICTIM), (3, VICTIM)];
    edges.extend(hostile.iter().map(|&h| (VICTIM, h)));
    let net = TestNet::builder().nodes(10).topology(Topology::Custom(edges)).build().await?;
    let provider = net.node(0).identity.clone();
    let victim = net.node(VICTIM).running()?.clone();

    // An honest message: the victim learns its honest peers are one hop from the provider,
    // and the hostile peers get a copy to play with.
    let honest = price_batch(&provider, 1, now_ms(), 2, 10)?;
    net.publish(0, &honest).await?;
    net.wait_delivered_everywhere(&honest.message_id()).await?;
    let before = victim.stats();
    // Duplicates claiming hop 0, and one first copy of a new provider message claiming it too.
    let fresh = price_batch(&provider, 2, now_ms(), 2, 10)?;
    for &h in &hostile {
        let relay = net.node(h).running()?;
        relay.send_raw_frame(victim.peer_id(), frame_with(&honest, 1, 0)).await?;
    }
    net.node(hostile[0])
        .running()?
        .send_raw_frame(victim.peer_id(), frame_with(&fresh, 9, 0))
        .await?;
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
        if let Some(i) = hostile.iter().find(|&&h| net.node(h).peer_id() == p.peer_id) {
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
