//! Multi-node relay tests on real libp2p swarms (memory transport) in one process.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use mesh_protocol::{
    Body, Envelope, Identity, Payload, PriceUpdate, RejectReason, encode_envelope,
};
use mesh_relay::StatsSnapshot;
use mesh_testkit::hostile::{HostileConfig, HostilePeer};
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
    // once, so that the test sees when every `PRUNE` has arrived. One second was not enough
    // under CI's load: once a full copy came more than a second after a `HAVE`, and its node
    // asked. Asking is not expected here, so the wait costs the test nothing.
    let lazy = mesh_relay::LazyPush {
        want_delay: Duration::from_secs(8),
        have_delay: Duration::ZERO,
        keep: Duration::from_secs(60),
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
    // One origin at full speed: more than its rate allows ([`mesh_relay::OriginRate`]).
    let net = TestNet::builder()
        .nodes(3)
        .topology(Topology::Line)
        .configure(|_, c| c.core.origin_rate = None)
        .build()
        .await?;
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

/// Every kind of bad message from a hostile peer is rejected with its reason and not
/// forwarded; those only the sender can have caused are charged (a future timestamp and a
/// message too old depend on the victim's clock: not charged); past its budget the peer is
/// banned and cannot reconnect until the ban ends. The hostile peer is
/// `mesh_testkit::hostile::HostilePeer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_rejected_not_forwarded_charged_and_the_sender_banned()
-> anyhow::Result<()> {
    // 0 = victim, 1 = the victim's other neighbour; the hostile peer connects to the victim.
    let net = TestNet::builder()
        .nodes(2)
        .topology(Topology::Line)
        .configure(|i, c| {
            if i == 0 {
                c.peers.misbehaviour_budget = 7;
                c.peers.ban_duration = Duration::from_secs(6);
            }
        })
        .build()
        .await?;
    let victim_peer = net.node(0).peer_id();
    let victim = net.node(0).running()?;
    let victim_addr = net.node(0).addr();
    let hostile =
        HostilePeer::start(HostileConfig { want_announced: false, ..Default::default() }).await?;
    hostile.connect(&victim_addr).await?;
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
    // A captured message from two hours ago: older than the maximum message age.
    let valid = sealed(&p, &body_with(&p, now, vec![update("F", "1", now)]));
    let two_hours_ago = now - 7_200_000;
    let older = sealed(&p, &body_with(&p, two_hours_ago, vec![update("F", "2", two_hours_ago)]));
    // Oversized frame: the length prefix alone is refused, so the prefix is all that is sent.
    let oversized_prefix = u32::try_from(mesh_protocol::MAX_FRAME_LEN + 1)?.to_be_bytes();

    for (_, frame) in &cases {
        hostile.send(victim_peer, frame.clone()).await?;
    }
    hostile.send(victim_peer, valid).await?;
    hostile.send(victim_peer, older).await?;
    eventually(WAIT, "victim rejected every bad message", || {
        let s = victim.stats();
        cases.iter().all(|(r, _)| s.rejected(*r) >= 1) && s.rejected(RejectReason::TooOld) >= 1
    })
    .await?;
    let s: StatsSnapshot = victim.stats();
    assert_eq!(s.delivered, 1, "only the one valid message was delivered: {s:?}");
    assert_eq!(s.rejected_total(), 6);
    assert_eq!(s.charged, 4, "the forgery, the mismatch, the negative price and the TTL");

    // The oversized frame ends the stream (the next send reopens it).
    hostile.send_bytes(victim_peer, &oversized_prefix).await?;
    eventually(WAIT, "oversized frame rejected", || {
        victim.stats().rejected(RejectReason::FrameTooLarge) == 1
    })
    .await?;

    // Nothing bad was forwarded: the victim's other neighbour saw only the valid message.
    barrier(&net, 0, 77).await?;
    assert_eq!(net.node(1).running()?.stats().rejected_total(), 0);
    assert_eq!(net.node(1).received_count(), 2, "the valid message and the barrier");

    // 5 charges so far (with the oversized frame): the budget is 7, so more bad messages get
    // the hostile peer banned.
    // (The oversized frame made the victim drop the stream; frames sent right after it can be
    // lost until the hostile peer notices and reopens, so keep sending.)
    let h0 = hostile.peer_id();
    eventually_async(WAIT, "hostile peer banned and disconnected", || async {
        if victim.stats().bans == 0 {
            let _ = hostile.send(victim_peer, cases[0].1.clone()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        victim.stats().bans == 1 && !victim.status().peers.iter().any(|p| p.peer_id == h0)
    })
    .await?;
    // While banned it cannot come back: watch it try for a second (each try bounded, so the
    // watch ends inside the ban).
    let connected = || victim.status().peers.iter().any(|p| p.peer_id == h0);
    let try_connect =
        || tokio::time::timeout(Duration::from_millis(200), hostile.connect(&victim_addr));
    let window_end = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < window_end {
        let _ = try_connect().await;
        assert!(!connected(), "a banned peer reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the ban expired (6 s: the second of watching above must end inside it even on a
    // machine that stalls the test for a few seconds), it can.
    eventually_async(Duration::from_secs(20), "hostile peer reconnected after its ban", || async {
        let _ = try_connect().await;
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

/// Whether nodes `a` and `b` of `net` are linked, as `a` sees it.
fn linked(net: &TestNet, a: usize, b: usize) -> bool {
    let pb = net.node(b).peer_id();
    net.node(a).running().unwrap().status().peers.iter().any(|p| p.peer_id == pb)
}

/// Honest nodes whose clocks sit at the two ends of the allowed skew, and a relay configured
/// with a wider skew between them: node 0 runs 5 s ahead and publishes, node 1 is on time
/// with `MESH_MAX_CLOCK_SKEW_SECS=10` (so it accepts and forwards node 0's messages), node 2
/// runs 5 s behind, so every message of node 0 is 10 s in its future, whoever brings it.
/// Node 2 rejects them all as `future_timestamp`, but that depends on its own clock: it
/// charges nobody, and no link drops (before, past 20 such messages in a minute, it banned
/// both neighbours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_nodes_at_the_ends_of_the_allowed_skew_never_ban_each_other() -> anyhow::Result<()> {
    let net = TestNet::builder()
        .nodes(3)
        .topology(Topology::Ring)
        .configure(|i, c| match i {
            0 => c.clock_offset_ms = 5_000,
            1 => c.core.validation.max_clock_skew_secs = 10,
            _ => c.clock_offset_ms = -5_000,
        })
        .build()
        .await?;
    let p = provider(1);
    // Well past the default budget of 20 charges a minute.
    let count = 40u64;
    for round in 0..count {
        let m = price_batch(&p, round, now_ms() + 5_000 + round as i64, 3, 10)?;
        net.publish(0, &m).await?;
        net.wait_delivered(&m.message_id(), &[0, 1]).await?;
    }
    eventually(WAIT, "node 2 rejected every message as future-dated", || {
        net.node(2).running().unwrap().stats().rejected(RejectReason::FutureTimestamp) >= count
    })
    .await?;
    // Node 2's own messages still reach both (for them they are 5 and 10 s old).
    let m = price_batch(&provider(2), 1, now_ms() - 5_000, 3, 10)?;
    net.publish(2, &m).await?;
    net.wait_delivered_everywhere(&m.message_id()).await?;
    for i in 0..3 {
        let s = net.node(i).running()?.stats();
        assert_eq!((s.charged, s.bans), (0, 0), "node {i}: {s:?}");
    }
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        assert!(linked(&net, a, b) && linked(&net, b, a), "link {a}-{b} dropped");
    }
    net.shutdown().await;
    Ok(())
}

/// A signed batch of `count` assets named `{prefix}{i}` from `key`, all stamped `ts`.
fn wide_batch(key: &Identity, prefix: &str, count: usize, ts: i64) -> anyhow::Result<Envelope> {
    let prices = (0..count).map(|i| update(&format!("{prefix}{i:04}"), "1.5", ts)).collect();
    Ok(Envelope::seal(key, &body_with(key, ts, prices), 10)?)
}

/// Replay marks are kept per origin: a key that sends 60 batches of 1,000 new assets stamped
/// ahead of time (60,000 marks, more than the 50,000 a node holds) evicts only its own, and
/// an honest provider's next batch is accepted on every node. (With one eviction floor for
/// all origins, the floor rose to the attacker's timestamps and every node dropped the
/// honest batch as a replay.) The attacker stamps 25 s ahead, with a skew of 30 s allowed,
/// so that however slowly this machine relays the flood, the honest batch after it is still
/// older than the attacker's stamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_marks_stamped_ahead_does_not_stop_an_honest_provider() -> anyhow::Result<()> {
    let net = TestNet::builder()
        .nodes(5)
        .topology(Topology::Ring)
        .configure(|_, c| {
            c.core.validation.max_clock_skew_secs = 30;
            // The marks are under test, not the per-origin rate (which would hold one key's
            // 60,000 prices back; 60 keys of one batch each move the marks all the same).
            c.core.origin_rate = None;
        })
        .build()
        .await?;
    let honest = provider(1);
    let first = price_batch(&honest, 1, now_ms(), 9, 10)?;
    net.publish(0, &first).await?;
    net.wait_delivered_everywhere(&first.message_id()).await?;

    let hostile = provider(66);
    let (mut last, mut ts) = (None, 0);
    for b in 0..60 {
        ts = (now_ms() + 25_000).max(ts + 1);
        let m = wide_batch(&hostile, &format!("X{b:02}-"), 1_000, ts)?;
        net.publish(2, &m).await?;
        last = Some(m.message_id());
    }
    if let Some(id) = last {
        net.wait_delivered_everywhere(&id).await?;
    }
    let next = price_batch(&honest, 2, now_ms(), 9, 10)?;
    net.publish(0, &next).await?;
    net.wait_delivered_everywhere(&next.message_id()).await?;
    for i in 0..5 {
        let s = net.node(i).running()?.stats();
        assert_eq!(s.rejected(RejectReason::Replay) + s.stale, 0, "node {i}: {s:?}");
    }
    net.shutdown().await;
    Ok(())
}

/// A restarted node has lost its replay marks. Captured traffic fed to it by a hostile peer
/// (batches older than the maximum message age, and recent ones its neighbours accepted
/// already) must not get it banned by its honest neighbours: the old batches are refused by
/// age before they are forwarded, and what it does forward honestly (the recent ones, which
/// its neighbours judge by their replay marks since their seen caches are tiny) is not
/// charged. (Before: the restarted node accepted and forwarded the old batches, and both
/// neighbours charged it one replay each and banned it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_fed_old_captured_traffic_is_not_banned_by_its_neighbours()
-> anyhow::Result<()> {
    // 0, 1, 2: an honest triangle; the hostile peer (`HostilePeer`) connects to 1 only.
    // Flooding, so that a barrier behind the frames on a link comes after all of them.
    let mut net = TestNet::builder()
        .nodes(3)
        .topology(Topology::Custom(vec![(0, 1), (1, 2), (0, 2)]))
        .configure(|i, c| {
            c.lazy = mesh_relay::LazyPush::FLOOD;
            if i == 0 || i == 2 {
                c.core.seen.capacity = 4;
            }
        })
        .build()
        .await?;
    let p = provider(1);
    let count = 30;
    let old_base = now_ms() - mesh_protocol::MAX_MESSAGE_AGE_MS - 60_000;
    let mut captured = Vec::new();
    for r in 0..count {
        captured.push(price_batch(&p, r, old_base + r as i64, 3, 10)?);
    }
    for r in 0..count {
        let m = price_batch(&p, 100 + r, now_ms() - 60_000 + r as i64, 3, 10)?;
        net.publish(0, &m).await?;
        net.wait_delivered(&m.message_id(), &[0, 1, 2]).await?;
        captured.push(m);
    }

    net.stop(1).await?;
    net.start(1).await?;
    let restarted = net.node(1).running()?.clone();
    let hostile =
        HostilePeer::start(HostileConfig { want_announced: false, ..Default::default() }).await?;
    hostile.connect(&net.node(1).addr()).await?;
    let before = restarted.stats();
    for m in &captured {
        hostile.send(net.node(1).peer_id(), encode_envelope(m)?).await?;
    }
    eventually(WAIT, "the restarted node judged every captured frame", || {
        let s = restarted.stats();
        let judged = s.delivered + s.rejected_total() + s.stale + s.duplicates;
        judged >= before.delivered + before.rejected_total() + 2 * count
    })
    .await?;
    barrier(&net, 1, 999).await?;
    for i in 0..3 {
        let s = net.node(i).running()?.stats();
        assert_eq!((s.charged, s.bans), (0, 0), "node {i}: {s:?}");
        if i != 1 {
            assert_eq!(s.rejected(RejectReason::TooOld), 0, "node {i} got an old batch: {s:?}");
        }
    }
    for (a, b) in [(0, 1), (1, 2)] {
        assert!(linked(&net, a, b) && linked(&net, b, a), "link {a}-{b} dropped");
    }
    assert_eq!(restarted.stats().rejected(RejectReason::TooOld), count);
    net.shutdown().await;
    Ok(())
}

/// A consumer whose clock is 10 s behind finds every message of the mesh in its future
/// (beyond the 5 s skew). It refuses them as `future_timestamp`, which depends on its own
/// clock: it charges nobody and keeps its links. It remembers the ids it refused, so the
/// `HAVE`s its other neighbours send for them are ignored and it asks for none of them more
/// than once (before, it asked each announcer in turn, and each answer was refused again).
/// A full copy is still checked when it comes, so messages that are no longer in its future
/// (here one stamped 10 s ago) are delivered as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_10_s_behind_keeps_its_links_and_does_not_ask_again() -> anyhow::Result<()> {
    // Node 0 publishes; node 4 (10 s behind) is linked to 1, 2 and 3, not to 0. Each relay
    // sends a message in full to one peer and its id to the others, so node 4 gets `HAVE`s.
    let mut edges = Vec::new();
    for a in 0..5 {
        for b in a + 1..5 {
            if (a, b) != (0, 4) {
                edges.push((a, b));
            }
        }
    }
    let net = TestNet::builder()
        .nodes(5)
        .topology(Topology::Custom(edges))
        .configure(|i, c| {
            c.lazy = mesh_relay::LazyPush { eager_peers: 1, tree: false, ..Default::default() };
            if i == 4 {
                c.clock_offset_ms = -10_000;
                // Short waits, so that asking in turn would show within the quiet period below.
                c.lazy.want_delay = Duration::from_millis(10);
                c.lazy.want_timeout = Duration::from_millis(50);
            }
        })
        .build()
        .await?;
    let p = provider(1);
    let count = 30u64;
    let mut ts = 0;
    for round in 0..count {
        ts = now_ms().max(ts + 1);
        let m = price_batch(&p, round, ts, 3, 10)?;
        net.publish(0, &m).await?;
        net.wait_delivered(&m.message_id(), &[0, 1, 2, 3]).await?;
    }
    let behind = net.node(4).running()?;
    eventually(WAIT, "node 4 refused every message", || {
        behind.stats().rejected(RejectReason::FutureTimestamp) >= count
    })
    .await?;
    // Not in its future: delivered.
    let past = price_batch(&provider(2), 1, now_ms() - 10_000, 3, 10)?;
    net.publish(0, &past).await?;
    net.wait_delivered_everywhere(&past.message_id()).await?;
    // Until node 4 has neither asked nor refused anything for 300 ms (six of its want
    // timeouts, longer than asking three announcers in turn).
    let mut last = (u64::MAX, u64::MAX, tokio::time::Instant::now());
    eventually(WAIT, "node 4 quiet", || {
        let s = behind.stats();
        let now = (s.wants_sent, s.rejected_total());
        if now != (last.0, last.1) {
            last = (now.0, now.1, tokio::time::Instant::now());
        }
        last.2.elapsed() >= Duration::from_millis(300)
    })
    .await?;

    let s = behind.stats();
    assert!(s.haves_received >= count / 2, "node 4 got few HAVEs: {s:?}");
    assert!(s.wants_sent <= count, "node 4 asked again for refused messages: {s:?}");
    for i in 0..5 {
        let s = net.node(i).running()?.stats();
        assert_eq!((s.charged, s.bans), (0, 0), "node {i}: {s:?}");
    }
    for a in 1..4 {
        assert!(linked(&net, a, 4) && linked(&net, 4, a), "link {a}-4 dropped");
    }
    net.shutdown().await;
    Ok(())
}
