//! Multi-node relay tests on real libp2p swarms (memory transport) in one process.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use mesh_protocol::{
    Body, Envelope, Identity, Payload, PriceUpdate, RejectReason, encode_envelope,
};
use mesh_relay::StatsSnapshot;
use mesh_testkit::{TestNet, Topology, WAIT, eventually, eventually_async, now_ms, price_batch};

fn provider(n: u8) -> Identity {
    Identity::from_seed([n; 32])
}

/// Publishes a message from node 0 to the whole (connected) net and waits until everyone has
/// it. Links are FIFO, so once this barrier arrived, every earlier message that was going to
/// arrive has arrived.
async fn barrier(net: &TestNet, from: usize, round: u64) -> anyhow::Result<()> {
    let m = price_batch(&provider(200), round, now_ms(), 1, 20)?;
    net.publish(from, &m).await?;
    net.wait_delivered_everywhere(&m.message_id()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_k_reaches_exactly_k_hops_on_a_line_of_20() -> anyhow::Result<()> {
    let net = TestNet::builder().nodes(20).topology(Topology::Line).build().await?;
    let p = provider(1);
    for (round, ttl) in [(1u64, 5u8), (2, 1), (3, 12)] {
        let m = price_batch(&p, round, now_ms(), 3, ttl)?;
        net.publish(0, &m).await?;
        let id = m.message_id();
        let reached: Vec<usize> = (0..=usize::from(ttl)).collect();
        net.wait_delivered(&id, &reached).await?;
        barrier(&net, 0, 1000 + round).await?;
        assert_eq!(net.delivered_by(&id), reached, "ttl {ttl}");
        // Hop counts grow one per link.
        for i in 1..=usize::from(ttl) {
            assert_eq!(net.node(i).received(&id).unwrap().hop_count as usize, i);
        }
    }
    // TTL 19 reaches all 20 nodes of the line.
    let m = price_batch(&p, 4, now_ms(), 3, 19)?;
    net.publish(0, &m).await?;
    net.wait_delivered_everywhere(&m.message_id()).await?;
    assert_eq!(net.delivered_by(&m.message_id()).len(), 20);
    net.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_of_a_random_6_regular_graph_delivers_every_message_once() -> anyhow::Result<()>
{
    let net = TestNet::builder()
        .nodes(50)
        .topology(Topology::RandomRegular { degree: 6 })
        .seed(11)
        .build()
        .await?;
    // Ten providers publish at once from different nodes.
    let mut ids = Vec::new();
    for round in 0..10u64 {
        let from = (round as usize * 17) % 50;
        let m = price_batch(&provider(20 + round as u8), round, now_ms(), 50, 10)?;
        net.publish(from, &m).await?;
        ids.push(m.message_id());
    }
    for id in &ids {
        net.wait_delivered_everywhere(id).await?;
    }
    barrier(&net, 0, 999).await?;
    for node in net.nodes() {
        for id in &ids {
            assert_eq!(
                node.received(id).unwrap().count,
                1,
                "node {} delivered {id} more than once",
                node.index
            );
        }
        let stats = node.running()?.stats();
        assert_eq!(stats.rejected_total(), 0, "node {}: {stats:?}", node.index);
    }
    // Flooding sends each node at most about one copy per neighbour.
    let copies: u64 = net.nodes().iter().map(|n| n.running().unwrap().stats().duplicates).sum();
    let per_node_per_message = copies as f64 / (50.0 * ids.len() as f64 + 50.0);
    assert!(
        per_node_per_message <= 6.0,
        "{per_node_per_message} duplicate copies per node per message"
    );
    net.shutdown().await;
    Ok(())
}

/// Lazy push at its most extreme: each relay sends a message in full to one peer only and
/// its id to the others, so most nodes of a 6-regular graph get it only by asking
/// (`WANT`) after an announcement (`HAVE`). Every node must still deliver every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_eager_peer_every_node_still_delivers_every_message_once() -> anyhow::Result<()> {
    let lazy = mesh_relay::LazyPush {
        eager_peers: 1,
        want_delay: Duration::from_millis(5),
        ..mesh_relay::LazyPush::default()
    };
    let net = TestNet::builder()
        .nodes(30)
        .topology(Topology::RandomRegular { degree: 6 })
        .seed(5)
        .configure(move |_, c| c.lazy = lazy)
        .build()
        .await?;
    let mut ids = Vec::new();
    for round in 0..8u64 {
        let from = (round as usize * 7) % 30;
        let m = price_batch(&provider(60 + round as u8), round, now_ms(), 5, 10)?;
        net.publish(from, &m).await?;
        ids.push(m.message_id());
    }
    for id in &ids {
        net.wait_delivered_everywhere(id).await?;
    }
    let all: Vec<StatsSnapshot> =
        net.nodes().iter().map(|n| n.running().unwrap().stats()).collect();
    for (node, stats) in net.nodes().iter().zip(&all) {
        for id in &ids {
            assert_eq!(node.received(id).unwrap().count, 1, "node {} delivered {id}", node.index);
        }
        assert_eq!(stats.rejected_total(), 0, "node {}: {stats:?}", node.index);
    }
    let sum = |f: fn(&StatsSnapshot) -> u64| all.iter().map(f).sum::<u64>();
    assert!(sum(|s| s.haves_sent) > 0, "no id was announced");
    assert!(sum(|s| s.wants_served) > 0, "no announced message was asked for and sent");
    assert!(sum(|s| s.wants_served) <= sum(|s| s.wants_sent));
    net.shutdown().await;
    Ok(())
}

/// Tree push. The first message of an origin goes to a few random peers at each hop, and from
/// the second on each copy a node did not need prunes its sender from the origin's tree, so
/// what is left is the path each node's first copy took: a tree rooted at the origin. The
/// origin's next messages travel along it: every node gets about one full copy, and the other
/// links carry only ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origins_messages_settle_on_a_tree_that_carries_one_copy_per_node() -> anyhow::Result<()>
{
    // A long wait before asking: no node asks for a message while the tree is whole. (Copies
    // are kept longer than that, to be there when asked for.) `PRUNE`s and `HAVE`s go at
    // once, so that the test sees when every `PRUNE` has arrived.
    let lazy = mesh_relay::LazyPush {
        want_delay: Duration::from_secs(1),
        have_delay: Duration::ZERO,
        keep: Duration::from_secs(10),
        ..mesh_relay::LazyPush::default()
    };
    assert!(lazy.tree, "tree push is the default");
    let n = 30;
    let net = TestNet::builder()
        .nodes(n)
        .topology(Topology::RandomRegular { degree: 6 })
        .seed(9)
        .configure(move |_, c| c.lazy = lazy)
        .build()
        .await?;
    let stats = || -> Vec<StatsSnapshot> {
        net.nodes().iter().map(|n| n.running().unwrap().stats()).collect()
    };
    let total =
        |all: &[StatsSnapshot], f: fn(&StatsSnapshot) -> u64| all.iter().map(f).sum::<u64>();
    let quiet = |what: &'static str| {
        eventually(WAIT, what, move || {
            let all = stats();
            total(&all, |s| s.frames_queued)
                == total(&all, |s| s.frames_sent + s.suppressed + s.dropped_stream_lost)
        })
    };
    // One provider, publishing from node 0 as a provider node does.
    let (origin, base) = (provider(90), now_ms());
    let send = |round: u64| {
        let (origin, net) = (&origin, &net);
        async move {
            let m = price_batch(origin, round, base + round as i64, 5, 10)?;
            net.publish(0, &m).await?;
            net.wait_delivered_everywhere(&m.message_id()).await?;
            anyhow::Ok(m.message_id())
        }
    };

    // Three messages first. Copies of an origin's first message are not pruned (many origins
    // publish once); those of the next ones prune their senders.
    for round in 0..3 {
        send(round).await?;
        quiet("the message and its PRUNEs were written").await?;
        let prunes = total(&stats(), |s| s.prunes_sent);
        eventually(WAIT, "every PRUNE arrived", || {
            total(&stats(), |s| s.prunes_received) == prunes
        })
        .await?;
    }
    assert!(total(&stats(), |s| s.prunes_sent) > 0, "no copy was pruned");

    // Five more: about one full copy per node, no asking.
    let before = stats();
    let mut ids = Vec::new();
    for round in 3..=7u64 {
        ids.push(send(round).await?);
    }
    quiet("the HAVEs were written").await?;
    let after = stats();
    let delta = |f: fn(&StatsSnapshot) -> u64| total(&after, f) - total(&before, f);
    assert_eq!(delta(|s| s.delivered), 5 * (n as u64 - 1));
    // A copy the writer dropped because the peer had sent us the message first is pruned
    // only when a later message reaches that peer twice: a few such copies are left (4 to 17
    // in runs here, against about 120 in the first three messages).
    let extra = delta(|s| s.duplicates + s.reforwarded);
    assert!(extra <= n as u64, "{extra} extra copies in 5 messages to {n} nodes");
    assert_eq!(delta(|s| s.wants_sent), 0, "a node had to ask");
    assert!(delta(|s| s.haves_sent) > 0, "no id was announced");
    for node in net.nodes() {
        for id in &ids {
            assert_eq!(node.received(id).unwrap().count, 1, "node {} delivered {id}", node.index);
        }
    }

    net.shutdown().await;
    Ok(())
}

/// Tree push mends itself. Triangle 0 - 1 - 2 - 0, provider at node 0: once the tree has
/// settled, node 2 gets each message in full from one peer (its parent) and only a `HAVE`
/// from the other. With the link to its parent cut, node 2 asks the other for the message
/// (`WANT`), and that makes it the other's child: the next message reaches it in full
/// without asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_its_tree_parent_asks_once_and_is_grafted() -> anyhow::Result<()> {
    let net = TestNet::builder()
        .nodes(3)
        .topology(Topology::Custom(vec![(0, 1), (1, 2), (0, 2)]))
        .build()
        .await?;
    let stats = |i: usize| net.node(i).running().unwrap().stats();
    let (origin, base) = (provider(95), now_ms());
    let send = |round: u64| {
        let (origin, net) = (&origin, &net);
        async move {
            // Timestamps rise with the round even within one millisecond.
            let m = price_batch(origin, round, base + round as i64, 2, 10)?;
            net.publish(0, &m).await?;
            net.wait_delivered_everywhere(&m.message_id()).await?;
            anyhow::Ok(m.message_id())
        }
    };
    // Copies that reached 1 or 2 twice, or that a writer dropped because the peer had the
    // message already (that peer is still a child and does not know it).
    let dups =
        || (1..3).map(stats).map(|s| s.duplicates + s.reforwarded + s.suppressed).sum::<u64>();
    // Until two messages in a row reach 1 and 2 once each (1 and 2 are then no longer each
    // other's children). A late copy of one message shows by the end of the next.
    let (mut round, mut clean) = (0, 0);
    while clean < 2 {
        anyhow::ensure!(round < 20, "the tree did not settle in 20 messages");
        let before = dups();
        send(round).await?;
        round += 1;
        eventually(WAIT, "every frame written", || {
            (0..3).map(stats).all(|s| s.frames_queued == s.frames_sent + s.suppressed)
        })
        .await?;
        clean = if round > 1 && dups() == before { clean + 1 } else { 0 };
    }
    // Node 2's parent: 0, or 1 when the copy over 1 came first when the tree formed.
    let id = send(round).await?;
    let parent = net.index_of(&net.node(2).received(&id).unwrap().from.unwrap()).unwrap();
    let other = 1 - parent;

    net.cut(parent, 2).await?;
    let (w, g) = (stats(2).wants_sent, stats(other).grafts);
    let id = send(round + 1).await?;
    assert_eq!(stats(2).wants_sent, w + 1, "node 2 asked once: {:?}", stats(2));
    assert_eq!(stats(other).grafts, g + 1, "node {other} took node 2 as its child");
    assert_eq!(net.node(2).received(&id).unwrap().count, 1);
    let id = send(round + 2).await?;
    assert_eq!(stats(2).wants_sent, w + 1, "no asking for the next message");
    assert_eq!(net.node(2).received(&id).unwrap().from, Some(net.node(other).peer_id()));
    net.shutdown().await;
    Ok(())
}

/// Line 0 - 1 - 2, node 0 playing a peer that speaks the lazy-push control frames by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_push_control_frames_are_answered_once_and_malformed_ones_charged()
-> anyhow::Result<()> {
    use mesh_relay::lazy::{ControlFrame, HAVE_TAG};
    let lazy = mesh_relay::LazyPush {
        want_delay: Duration::from_millis(5),
        ..mesh_relay::LazyPush::default()
    };
    let net = TestNet::builder()
        .nodes(3)
        .topology(Topology::Line)
        .configure(move |_, c| c.lazy = lazy)
        .build()
        .await?;
    let (tester, node1) = (net.node(0).running()?, net.node(1).running()?);
    let node1_peer = net.node(1).peer_id();

    // Node 2 publishes; node 1 relays it to node 0 and keeps its copy for a while.
    let m = price_batch(&provider(70), 1, now_ms(), 2, 10)?;
    net.publish(2, &m).await?;
    net.wait_delivered_everywhere(&m.message_id()).await?;
    let before = tester.stats().duplicates;
    // Node 0 asks for it (twice): node 1 sends it once more, then no more.
    let want = ControlFrame::Want(vec![m.message_id()]).encode();
    tester.send_raw_frame(node1_peer, want.clone()).await?;
    tester.send_raw_frame(node1_peer, want).await?;
    eventually(WAIT, "the asked-for copy arrived", || tester.stats().duplicates == before + 1)
        .await?;
    barrier(&net, 2, 2).await?;
    assert_eq!(node1.stats().wants_served, 1, "{:?}", node1.stats());
    assert_eq!(tester.stats().duplicates, before + 1);

    // An announcement of a message node 1 has not seen: it asks node 0 for it, which does
    // not have it (it only counts the request).
    let unknown = mesh_protocol::MessageId::of_body(b"never published");
    tester.send_raw_frame(node1_peer, ControlFrame::Have(vec![unknown]).encode()).await?;
    eventually(WAIT, "node 1 asked for the announced message", || {
        node1.stats().wants_sent == 1 && tester.stats().wants_unknown == 1
    })
    .await?;

    // A control frame without ids is malformed: rejected and charged like a bad message.
    tester.send_raw_frame(node1_peer, vec![HAVE_TAG]).await?;
    eventually(WAIT, "malformed control frame rejected", || {
        node1.stats().rejected(RejectReason::Malformed) == 1
    })
    .await?;
    assert_eq!(node1.stats().delivered, 2, "{:?}", node1.stats());
    net.shutdown().await;
    Ok(())
}

fn with_hops(frame: &[u8], ttl: u8, hop_count: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[1] = ttl;
    f[2] = hop_count;
    f
}

/// Line H - C - D - E. H (playing a peer that got the message late) first hands C a copy with
/// TTL 1: C delivers it but may not forward it. Then a copy with TTL 3 arrives: C forwards it
/// again (not delivering it twice), so D and E get the message after all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_with_more_ttl_is_forwarded_again_but_not_delivered_twice() -> anyhow::Result<()>
{
    let net = TestNet::builder().nodes(4).topology(Topology::Line).build().await?;
    let (h, c) = (net.node(0).running()?, net.node(1).peer_id());
    let m = price_batch(&provider(5), 1, now_ms(), 2, 10)?;
    let id = m.message_id();
    let frame = encode_envelope(&m)?;

    h.send_raw_frame(c, with_hops(&frame, 1, 9)).await?;
    net.wait_delivered(&id, &[1]).await?;
    barrier(&net, 1, 100).await?;
    assert_eq!(net.delivered_by(&id), vec![1], "TTL 1 stops at C");

    h.send_raw_frame(c, with_hops(&frame, 3, 7)).await?;
    net.wait_delivered(&id, &[2, 3]).await?;
    barrier(&net, 1, 101).await?;
    assert_eq!(net.node(1).received(&id).unwrap().count, 1, "C delivered once");
    assert_eq!(net.node(1).running()?.stats().reforwarded, 1);
    assert_eq!(net.node(3).received(&id).unwrap().hop_count, 9);
    // The same TTL again is a plain duplicate.
    h.send_raw_frame(c, with_hops(&frame, 3, 7)).await?;
    let cr = net.node(1).running()?;
    eventually(WAIT, "duplicate counted", || cr.stats().duplicates >= 1).await?;
    assert_eq!(cr.stats().reforwarded, 1);
    net.shutdown().await;
    Ok(())
}

/// A burst of frames on one link: the reader prepares frames on other tasks while it reads on
/// (so a busy link keeps both cores checking signatures), and still hands them to the core in
/// the order they came. Every message is delivered once and in order: an older message of the
/// origin overtaken by a newer one would be dropped as `stale`. The forged ones in the middle
/// are rejected and the rest are forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_one_link_is_checked_in_parallel_and_delivered_in_order() -> anyhow::Result<()> {
    const BURST: u64 = 400;
    let net = TestNet::builder().nodes(3).topology(Topology::Line).build().await?;
    let (sender, relay_peer) = (net.node(0).running()?, net.node(1).peer_id());
    let p = provider(40);
    let base = now_ms() - 10_000;
    let mut ids = Vec::new();
    for k in 0..BURST {
        let mut envelope = price_batch(&p, k, base + k as i64, 50, 10)?;
        if k % 100 == 50 {
            envelope.signature = provider(41).sign_body(&envelope.body);
        } else {
            ids.push(envelope.message_id());
        }
        sender.send_raw_frame(relay_peer, encode_envelope(&envelope)?).await?;
    }
    let expected = ids.len();
    eventually(WAIT, "the burst delivered by nodes 1 and 2", || {
        net.node(1).received_count() == expected && net.node(2).received_count() == expected
    })
    .await?;

    let relay = net.node(1).running()?.stats();
    assert_eq!(relay.delivered, expected as u64, "{relay:?}");
    assert_eq!(relay.rejected(RejectReason::BadSignature), 4, "{relay:?}");
    assert_eq!(relay.rejected_total(), 4, "{relay:?}");
    assert_eq!(relay.stale, 0, "no message overtook an older one: {relay:?}");
    assert!(relay.prepared_in_parallel > 0, "frames waited behind others: {relay:?}");
    let arrivals: Vec<_> = ids.iter().map(|id| net.node(1).received(id).unwrap()).collect();
    assert!(arrivals.iter().all(|r| r.count == 1));
    assert!(arrivals.windows(2).all(|w| w[0].at <= w[1].at), "delivered in order");
    net.shutdown().await;
    Ok(())
}

/// The hop-TTL trap under lazy push. X (1) first gets a copy with TTL 1: it delivers it but
/// may not pass it on, so Z (2) gets nothing. Then Y (3), which only announces messages
/// (`eager_peers` 0), gets a copy with TTL 5 and sends X a `HAVE`. X's copy is spent, so it
/// asks Y for its copy, which carries more TTL, and forwards that one to Z.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_copy_does_not_hide_a_fresher_announced_one() -> anyhow::Result<()> {
    // T = 0, X = 1, Z = 2, Y = 3: T - X - Z, T - Y - X.
    let net = TestNet::builder()
        .nodes(4)
        .topology(Topology::Custom(vec![(0, 1), (1, 2), (0, 3), (3, 1)]))
        .configure(|i, c| {
            if i == 3 {
                c.lazy.eager_peers = 0;
            }
        })
        .build()
        .await?;
    let t = net.node(0).running()?;
    let m = price_batch(&provider(60), 1, now_ms(), 2, 10)?;
    let id = m.message_id();
    let frame = encode_envelope(&m)?;

    t.send_raw_frame(net.node(1).peer_id(), with_hops(&frame, 1, 9)).await?;
    net.wait_delivered(&id, &[1]).await?;
    barrier(&net, 1, 300).await?;
    assert!(net.node(2).received(&id).is_none(), "TTL 1 stops at X");

    let (x0, y0) = (net.node(1).running()?.stats(), net.node(3).running()?.stats());
    t.send_raw_frame(net.node(3).peer_id(), with_hops(&frame, 5, 5)).await?;
    net.wait_delivered(&id, &[2, 3]).await?;
    let (x, y) = (net.node(1).running()?.stats(), net.node(3).running()?.stats());
    assert_eq!(y.haves_sent - y0.haves_sent, 1, "Y only announced it: {y:?}");
    assert_eq!(y.wants_served - y0.wants_served, 1, "and sent it when asked: {y:?}");
    assert_eq!(x.wants_sent - x0.wants_sent, 1, "X asked Y for it: {x:?}");
    assert_eq!(x.reforwarded - x0.reforwarded, 1, "{x:?}");
    assert_eq!(net.node(1).received(&id).unwrap().count, 1, "X delivered it once");
    assert_eq!(net.node(2).received(&id).unwrap().hop_count, 7);
    net.shutdown().await;
    Ok(())
}

fn body_with(identity: &Identity, created_at_ms: i64, prices: Vec<PriceUpdate>) -> Body {
    Body::new(identity, created_at_ms, Payload::PriceBatch { round: 1, prices })
}

fn update(asset: &str, price: &str, ts: i64) -> PriceUpdate {
    PriceUpdate {
        asset: asset.into(),
        blockchain: "solana".into(),
        price: price.parse().unwrap(),
        timestamp_ms: ts,
        change_24h: None,
        source_timestamp_ms: None,
    }
}

fn sealed(identity: &Identity, body: &Body) -> Vec<u8> {
    encode_envelope(&Envelope::seal(identity, body, 10).unwrap()).unwrap()
}

/// Every kind of bad message from a hostile peer is rejected with its reason, not forwarded,
/// and charged; past its budget the peer is banned and cannot reconnect until the ban ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_rejected_not_forwarded_charged_and_the_sender_banned()
-> anyhow::Result<()> {
    // 0 = hostile, 1 = victim, 2 = the victim's other neighbour.
    let net = TestNet::builder()
        .nodes(3)
        .topology(Topology::Line)
        .configure(|i, c| {
            if i == 1 {
                c.peers.misbehaviour_budget = 7;
                c.peers.ban_duration = Duration::from_secs(6);
            }
        })
        .build()
        .await?;
    let hostile = net.node(0).running()?;
    let victim_peer = net.node(1).peer_id();
    let victim = net.node(1).running()?;
    let now = now_ms();
    let p = provider(9);

    let mut cases: Vec<(RejectReason, Vec<u8>)> = Vec::new();
    // Forged signature: signed by another key.
    let mut env = Envelope::seal(&p, &body_with(&p, now, vec![update("A", "1", now)]), 10)?;
    env.signature = provider(10).sign_body(&env.body);
    cases.push((RejectReason::BadSignature, encode_envelope(&env)?));
    // Origin/key mismatch: a correct signature, but the origin claims another node.
    let mut body = body_with(&p, now, vec![update("B", "1", now)]);
    body.origin = provider(11).node_id();
    cases.push((RejectReason::OriginKeyMismatch, sealed(&p, &body)));
    // Future timestamp.
    cases.push((
        RejectReason::FutureTimestamp,
        sealed(&p, &body_with(&p, now, vec![update("C", "1", now + 60_000)])),
    ));
    // Negative price.
    cases.push((
        RejectReason::NonPositivePrice,
        sealed(&p, &body_with(&p, now, vec![update("D", "-4", now)])),
    ));
    // TTL 255.
    cases.push((
        RejectReason::TtlOutOfBounds,
        with_hops(&sealed(&p, &body_with(&p, now, vec![update("E", "1", now)])), 255, 1),
    ));
    // Replayed older timestamp: first a valid message, then a captured one from two hours ago
    // for the same asset (the seen cache no longer knows it).
    let valid = sealed(&p, &body_with(&p, now, vec![update("F", "1", now)]));
    let two_hours_ago = now - 7_200_000;
    let older = sealed(&p, &body_with(&p, two_hours_ago, vec![update("F", "2", two_hours_ago)]));
    // Oversized frame (the length prefix alone is refused).
    let oversized = vec![0u8; mesh_protocol::MAX_FRAME_LEN + 1];

    for (_, frame) in &cases {
        hostile.send_raw_frame(victim_peer, frame.clone()).await?;
    }
    hostile.send_raw_frame(victim_peer, valid).await?;
    hostile.send_raw_frame(victim_peer, older).await?;
    eventually(WAIT, "victim rejected every bad message", || {
        let s = victim.stats();
        cases.iter().all(|(r, _)| s.rejected(*r) >= 1) && s.rejected(RejectReason::Replay) >= 1
    })
    .await?;
    let s: StatsSnapshot = victim.stats();
    assert_eq!(s.delivered, 1, "only the one valid message was delivered: {s:?}");
    assert_eq!(s.rejected_total(), 6);

    // The oversized frame ends the stream (the writer reopens it).
    hostile.send_raw_frame(victim_peer, oversized).await?;
    eventually(WAIT, "oversized frame rejected", || {
        victim.stats().rejected(RejectReason::FrameTooLarge) == 1
    })
    .await?;

    // Nothing bad was forwarded: the victim's other neighbour saw only the valid message.
    barrier(&net, 1, 77).await?;
    assert_eq!(net.node(2).running()?.stats().rejected_total(), 0);
    assert_eq!(net.node(2).received_count(), 2, "the valid message and the barrier");

    // 7 charges so far: the budget is 7, so more bad messages get the hostile peer banned.
    // (The oversized frame made the victim drop the stream; frames sent right after it can be
    // lost until the hostile writer notices and reopens, so keep sending.)
    let h0 = net.node(0).peer_id();
    eventually_async(WAIT, "hostile peer banned and disconnected", || async {
        if victim.stats().bans == 0 {
            let _ = hostile.send_raw_frame(victim_peer, cases[0].1.clone()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        victim.stats().bans == 1 && !victim.status().peers.iter().any(|p| p.peer_id == h0)
    })
    .await?;
    // While banned it cannot come back: watch it try for a second.
    let victim_addr = net.node(1).addr();
    let connected = || victim.status().peers.iter().any(|p| p.peer_id == h0);
    let window_end = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < window_end {
        let _ = hostile.dial(victim_addr.clone()).await;
        assert!(!connected(), "a banned peer reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the ban expired (6 s: the second of watching above must end inside it even on a
    // machine that stalls the test for a few seconds), it can.
    eventually_async(Duration::from_secs(20), "hostile peer reconnected after its ban", || async {
        let _ = hostile.dial(victim_addr.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        connected()
    })
    .await?;
    net.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partition_heals_new_messages_reach_every_node() -> anyhow::Result<()> {
    // Two rings of 8 joined by three links.
    let mut edges: Vec<(usize, usize)> = (0..8).map(|i| (i, (i + 1) % 8)).collect();
    edges.extend((0..8).map(|i| (8 + i, 8 + (i + 1) % 8)));
    edges.extend([(0, 8), (3, 11), (5, 13)]);
    let net = TestNet::builder().nodes(16).topology(Topology::Custom(edges)).build().await?;
    let left: Vec<usize> = (0..8).collect();
    let cut = net.partition(&left).await?;
    assert_eq!(cut.len(), 3);
    // During the partition a message stays on its side.
    let m = price_batch(&provider(1), 1, now_ms(), 5, 20)?;
    net.publish(0, &m).await?;
    net.wait_delivered(&m.message_id(), &left).await?;
    let b = price_batch(&provider(2), 2, now_ms(), 1, 20)?;
    net.publish(8, &b).await?;
    net.wait_delivered(&b.message_id(), &(8..16).collect::<Vec<_>>()).await?;
    let reached: HashSet<usize> = net.delivered_by(&m.message_id()).into_iter().collect();
    assert!(reached.iter().all(|i| left.contains(i)), "crossed the partition: {reached:?}");

    for (a, b) in cut {
        net.heal(a, b).await?;
    }
    let after = price_batch(&provider(1), 3, now_ms(), 5, 20)?;
    net.publish(15, &after).await?;
    net.wait_delivered_everywhere(&after.message_id()).await?;
    net.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partition_heals_the_sides_relink_by_themselves() -> anyhow::Result<()> {
    // Two rings of 6 joined by two links; every node keeps its minimum of 2 peers on its own
    // side through the partition, so only exploring dials across again.
    let mut edges: Vec<(usize, usize)> = (0..6).map(|i| (i, (i + 1) % 6)).collect();
    edges.extend((0..6).map(|i| (6 + i, 6 + (i + 1) % 6)));
    edges.extend([(0, 6), (3, 9)]);
    let net = TestNet::builder()
        .nodes(12)
        .topology(Topology::Custom(edges))
        .configure(|_, c| {
            c.peers.min_peers = 2;
            c.peers.max_peers = 5;
            c.peers.explore_interval = Some(Duration::from_millis(300));
        })
        .build()
        .await?;
    let left: Vec<usize> = (0..6).collect();
    let cut = net.partition(&left).await?;
    assert_eq!(cut.len(), 2);
    // Unblocked, not redialed: the nodes must find each other.
    for &(a, b) in &cut {
        net.node(a).running()?.unblock(net.node(b).peer_id()).await?;
        net.node(b).running()?.unblock(net.node(a).peer_id()).await?;
    }
    eventually(WAIT, "a link across the healed partition", || {
        left.iter().any(|&a| {
            let peers = net.node(a).running().map(|r| r.status().peers).unwrap_or_default();
            (6..12).any(|b| peers.iter().any(|p| p.peer_id == net.node(b).peer_id()))
        })
    })
    .await?;
    let m = price_batch(&provider(1), 1, now_ms(), 5, 20)?;
    net.publish(11, &m).await?;
    net.wait_delivered_everywhere(&m.message_id()).await?;
    net.shutdown().await;
    Ok(())
}

/// Exploring renews links without piling them up: from the midpoint between the minimum and
/// the maximum on, an explored link replaces older ones, so the peer counts stay near the
/// midpoint (5 here) instead of drifting up to the maximum (8), which every node would reach
/// long before it had been linked to 8 different peers if exploring only added links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exploring_renews_links_and_keeps_the_peer_count_near_the_midpoint() -> anyhow::Result<()> {
    const N: usize = 12;
    let net = TestNet::builder()
        .nodes(N)
        .topology(Topology::Ring)
        .configure(|_, c| {
            c.peers.min_peers = 2;
            c.peers.max_peers = 8;
            c.peers.prune_grace = Duration::from_millis(300);
            c.peers.explore_interval = Some(Duration::from_millis(200));
        })
        .build()
        .await?;
    // Every node knows every other's address, as from discovery on a LAN.
    for node in net.nodes() {
        for other in net.nodes().iter().filter(|o| o.index != node.index) {
            let addr: mesh_relay::Multiaddr = other
                .addr()
                .iter()
                .filter(|p| !matches!(p, mesh_relay::Protocol::P2p(_)))
                .collect();
            node.running()?.add_peer_addresses(other.peer_id(), vec![addr], None).await?;
        }
    }
    let counts = || -> Vec<usize> {
        net.nodes().iter().map(|n| n.running().map_or(0, |r| r.status().peers.len())).collect()
    };
    let mut linked: Vec<HashSet<mesh_relay::PeerId>> = vec![HashSet::new(); N];
    eventually(WAIT, "every node linked to 8 different peers over time", || {
        for (i, node) in net.nodes().iter().enumerate() {
            if let Ok(running) = node.running() {
                linked[i].extend(running.status().peers.iter().map(|p| p.peer_id));
            }
        }
        linked.iter().all(|l| l.len() >= 8)
    })
    .await
    .inspect_err(|_| {
        let sizes: Vec<usize> = linked.iter().map(HashSet::len).collect();
        let known: Vec<usize> =
            net.nodes().iter().map(|n| n.running().map_or(0, |r| r.status().known_peers)).collect();
        eprintln!("linked {sizes:?} now {:?} known {known:?}", counts());
    })?;
    // The mean over two dozen samples, about a second (the counts move with every explore).
    let mut means = Vec::new();
    eventually(WAIT, "two dozen samples of the peer counts", || {
        let now = counts();
        means.push(now.iter().sum::<usize>() as f64 / N as f64);
        means.len() >= 24
    })
    .await?;
    let mean = means.iter().sum::<f64>() / means.len() as f64;
    eprintln!("mean peer count {mean:.2}");
    // Exploring that only added links gives 7.8-8.0 here; replacing them, 5.9-6.5.
    assert!(mean <= 7.0, "mean peer count {mean:.2}, target 5, maximum 8: {means:?}");
    net.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_the_same_key_rejoins_and_receives_again() -> anyhow::Result<()> {
    let mut net = TestNet::builder().nodes(6).topology(Topology::Ring).build().await?;
    let before = net.node(3).peer_id();
    net.stop(3).await?;
    let m = price_batch(&provider(1), 1, now_ms(), 5, 10)?;
    net.publish(0, &m).await?;
    net.wait_delivered(&m.message_id(), &[0, 1, 2, 4, 5]).await?;
    assert!(net.node(3).received(&m.message_id()).is_none());

    net.start(3).await?;
    assert_eq!(net.node(3).peer_id(), before, "same key, same peer id");
    let again = price_batch(&provider(1), 2, now_ms(), 5, 10)?;
    net.publish(0, &again).await?;
    net.wait_delivered_everywhere(&again.message_id()).await?;
    net.shutdown().await;
    Ok(())
}

/// Twenty nodes that only know node 0's address reach their minimum of three connections
/// through peer exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bootstrap_address_leads_to_the_minimum_connections_through_peer_exchange()
-> anyhow::Result<()> {
    let net = TestNet::builder()
        .nodes(20)
        .topology(Topology::None)
        .configure(|_, c| {
            c.peers.min_peers = 3;
            c.peers.max_peers = 10;
            c.peers.prune_grace = Duration::from_secs(1);
            c.peer_exchange = true;
        })
        .build()
        .await?;
    let (boot_peer, boot_addr) = (net.node(0).peer_id(), net.node(0).addr());
    let boot_listen: mesh_relay::Multiaddr =
        boot_addr.iter().filter(|p| !matches!(p, mesh_relay::Protocol::P2p(_))).collect();
    for node in &net.nodes()[1..] {
        node.running()?.add_bootstrap(boot_peer, vec![boot_listen.clone()]).await?;
    }
    let counts = || -> Vec<usize> {
        net.nodes().iter().map(|n| n.running().map_or(0, |r| r.connected_peers())).collect()
    };
    let reached =
        eventually(Duration::from_secs(60), "every node has at least 3 connections", || {
            counts().iter().all(|c| *c >= 3)
        })
        .await;
    if let Err(e) = reached {
        anyhow::bail!("{e}; connections per node: {:?}", counts());
    }
    // Most of them learned their peers from node 0's answers, not from node 0 alone.
    let beyond_bootstrap = net.nodes()[1..]
        .iter()
        .filter(|n| {
            n.running().is_ok_and(|r| r.status().peers.iter().any(|p| p.peer_id != boot_peer))
        })
        .count();
    assert_eq!(beyond_bootstrap, 19);
    let counts = counts();
    assert!(counts[0] <= 15, "the connection limit holds at the bootstrap node: {counts:?}");
    // The mesh carries messages to everyone.
    let m = price_batch(&provider(1), 1, now_ms(), 3, 20)?;
    net.publish(7, &m).await?;
    net.wait_delivered_everywhere(&m.message_id()).await?;
    net.shutdown().await;
    Ok(())
}

/// A TCP forwarder on 127.0.0.1 that can go silent: once frozen it keeps both sockets open but
/// reads and drops everything, like a link that died without closing anything. It records
/// which side closed its socket.
struct Blackhole {
    addr: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    closed: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
}

impl Blackhole {
    async fn start(target: std::net::SocketAddr) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hole = Self { addr, frozen: Default::default(), closed: Default::default() };
        let (frozen, closed) = (hole.frozen.clone(), hole.closed.clone());
        tokio::spawn(async move {
            // One connection is all the test makes.
            let Ok((client, _)) = listener.accept().await else { return };
            let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
            let (client_rx, client_tx) = client.into_split();
            let (server_rx, server_tx) = server.into_split();
            for (name, mut rx, mut tx) in
                [("dialer", client_rx, server_tx), ("listener", server_rx, client_tx)]
            {
                let (frozen, closed) = (frozen.clone(), closed.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match rx.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) if !frozen.load(Ordering::SeqCst) => {
                                if tx.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                    closed.lock().unwrap().push(name);
                    // Keep the other direction's socket half open: only the peers may close.
                    std::future::pending::<()>().await;
                });
            }
        });
        Ok(hole)
    }

    fn closed(&self) -> Vec<&'static str> {
        self.closed.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_link_goes_silent_is_closed_after_two_missed_pings() -> anyhow::Result<()>
{
    use mesh_relay::{Multiaddr, Protocol, Relay};
    use tokio_util::sync::CancellationToken;

    let cancel = CancellationToken::new();
    let config = || {
        let mut c = mesh_testkit::test_config();
        c.ping_interval = Duration::from_millis(300);
        c.ping_timeout = Duration::from_millis(500);
        c
    };
    let mut listening = config();
    listening.listen_addrs = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    let (b, _b_deliveries) = Relay::start(&Identity::generate(), listening, cancel.clone()).await?;
    let (a, _a_deliveries) = Relay::start(&Identity::generate(), config(), cancel.clone()).await?;
    let port = mesh_tests::tcp_addr(&b)
        .await?
        .iter()
        .find_map(|p| if let Protocol::Tcp(port) = p { Some(port) } else { None })
        .ok_or_else(|| anyhow::anyhow!("B listens on no TCP port"))?;
    let hole = Blackhole::start(([127, 0, 0, 1], port).into()).await?;
    let through: Multiaddr =
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", hole.addr.port(), b.peer_id()).parse()?;
    a.dial(through).await?;
    eventually(WAIT, "A and B connected through the forwarder", || {
        a.connected_peers() == 1 && b.connected_peers() == 1
    })
    .await?;
    // Pings pass while the link works.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(hole.closed().is_empty(), "closed while the link worked: {:?}", hole.closed());
    assert_eq!((a.connected_peers(), b.connected_peers()), (1, 1));

    hole.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    // Nothing else notices: no frames are sent, TCP sees live sockets. Only the pings fail.
    eventually(WAIT, "both ends closed the silent connection", || {
        let closed = hole.closed();
        closed.contains(&"dialer") && closed.contains(&"listener")
    })
    .await?;
    eventually(WAIT, "neither lists the other as connected", || {
        a.connected_peers() == 0 && b.connected_peers() == 0
    })
    .await?;
    cancel.cancel();
    Ok(())
}
