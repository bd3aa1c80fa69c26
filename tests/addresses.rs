//! Addresses a peer hands out (issue 34, items 5 and 6): a lying peer pushes, through peer
//! exchange and identify, the address of a local TCP listener the test owns (a stand-in for a
//! Redis port on 127.0.0.2), or floods answers about a node's bootstrap peer. With the default
//! filter nobody connects to the listener; the bootstrap address survives the flood. The lying
//! peer is `mesh_testkit::hostile::HostilePeer`, as in every attack test.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_relay::{AddrFilter, Multiaddr, PeerId, Protocol, pex};
use mesh_testkit::hostile::{HostileConfig, HostilePeer};
use mesh_testkit::{TestNet, Topology, Transport, WAIT, eventually};
use mesh_tests::reliability::report;
use mesh_tests::tcp_addr;
use serde_json::json;

/// A peer that passes as a mesh node (identify), connects to each of `victims` and answers
/// every peer-exchange request with `answer`; identify reports `reported` as its own addresses.
async fn pex_liar(
    answer: &[pex::Entry],
    reported: Vec<Multiaddr>,
    victims: &[Multiaddr],
) -> anyhow::Result<HostilePeer> {
    let liar = HostilePeer::start(HostileConfig {
        want_announced: false,
        reported_addrs: reported,
        pex_answer: Some(answer.to_vec()),
        ..HostileConfig::default()
    })
    .await?;
    for victim in victims {
        liar.connect(victim).await?;
    }
    Ok(liar)
}

/// A TCP listener that counts the connections it accepts (and closes them).
struct CountingListener {
    addr: Multiaddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingListener {
    async fn bind(ip: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Ok(Self { addr: format!("/ip4/{ip}/tcp/{port}").parse()?, accepted, task })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn random_peer() -> PeerId {
    libp2p::identity::Keypair::generate_ed25519().public().to_peer_id()
}

fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect()
}

/// Three nodes (a line) with `filter`, asking for peers and short of their minimum (so they
/// ask again every few seconds), and a liar connected to each that answers with 32 made-up
/// peers at the listener's address (one of them twice) and reports that address as its own.
async fn pushed_at(
    filter: AddrFilter,
    listener: &CountingListener,
) -> anyhow::Result<(TestNet, HostilePeer)> {
    let net = TestNet::builder()
        .nodes(3)
        .topology(Topology::Line)
        .transport(Transport::Tcp)
        .configure(move |_, c| {
            c.peers.addr_filter = filter;
            c.peers.min_peers = 8;
            c.peer_exchange = true;
            c.eager_peer_exchange = true;
        })
        .build()
        .await?;
    net.wait_linked().await?;
    let mut answer: Vec<pex::Entry> =
        (0..31).map(|_| (random_peer(), vec![listener.addr.clone()])).collect();
    answer.push(answer[0].clone());
    let mut victims = Vec::new();
    for node in net.nodes() {
        victims.push(tcp_addr(node.running()?).await?);
    }
    let liar = pex_liar(&answer, vec![listener.addr.clone()], &victims).await?;
    Ok((net, liar))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_pushed_through_peer_exchange_and_identify_are_not_dialed_by_default()
-> anyhow::Result<()> {
    // First the attack, in a lab that allows loopback: the nodes connect to the "Redis port".
    let redis = CountingListener::bind("127.0.0.2").await?;
    let (net, liar) = pushed_at(AddrFilter::lab(), &redis).await?;
    eventually(WAIT, "a node connected to the pushed address", || redis.accepted() > 0).await?;
    let lab_accepts = redis.accepted();
    drop(liar);
    net.shutdown().await;

    // With the default filter: each node got the answer three times (the first was handled,
    // and any dial made, at least one asking interval, 5 s, before the third), and nobody
    // connected to the listener.
    let redis = CountingListener::bind("127.0.0.2").await?;
    let (net, liar) = pushed_at(AddrFilter::default(), &redis).await?;
    let peers: Vec<PeerId> = net.nodes().iter().map(|n| n.peer_id()).collect();
    eventually(WAIT, "three answers at every node", || {
        peers.iter().all(|p| liar.pex_answered(p) >= 3)
    })
    .await?;
    let known: Vec<usize> =
        net.nodes().iter().map(|n| n.relay().map_or(0, |r| r.status().known_peers)).collect();
    report(
        "pushed_private_addresses",
        json!({
            "nodes": 3,
            "entries_per_answer": 32,
            "answers_per_node": peers.iter().map(|p| liar.pex_answered(p)).collect::<Vec<_>>(),
            "accepts_in_a_lab": lab_accepts,
            "accepts_by_default": redis.accepted(),
            "known_peers_by_default": known,
        }),
    );
    assert_eq!(redis.accepted(), 0, "a node dialed an address a peer pushed");
    assert!(known.iter().all(|k| *k <= 3), "made-up peers entered the known table: {known:?}");
    drop(liar);
    net.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_answers_about_a_bootstrap_peer_does_not_cost_its_address() -> anyhow::Result<()>
{
    // The victim (node 1) allows loopback, so the flood's addresses are taken in, not refused.
    let mut net = TestNet::builder()
        .nodes(2)
        .topology(Topology::None)
        .transport(Transport::Tcp)
        .configure(|i, c| {
            if i == 1 {
                c.peers.addr_filter = AddrFilter::lab();
                c.peers.min_peers = 3;
                c.peer_exchange = true;
                c.eager_peer_exchange = true;
            }
        })
        .build()
        .await?;
    let boot = net.node(0).peer_id();
    let boot_addr = without_p2p(&net.node(0).addr());
    let victim = net.node(1).running()?.clone();
    victim.add_bootstrap(boot, vec![boot_addr]).await?;
    let linked =
        |victim: &mesh_relay::Relay| victim.status().peers.iter().any(|p| p.peer_id == boot);
    eventually(WAIT, "the victim reaches its bootstrap peer", || linked(&victim)).await?;

    // 32 entries about the bootstrap peer, four addresses each where nothing listens: 128
    // addresses per answer, again and again.
    let answer: Vec<pex::Entry> = (0..32u16)
        .map(|i| {
            let addrs = (0..4u16)
                .map(|j| format!("/ip4/127.0.0.3/tcp/{}", 1 + i * 4 + j).parse().unwrap())
                .collect();
            (boot, addrs)
        })
        .collect();
    let liar = pex_liar(&answer, Vec::new(), &[tcp_addr(&victim).await?]).await?;
    let victim_peer = victim.peer_id();
    eventually(WAIT, "two answers at the victim", || liar.pex_answered(&victim_peer) >= 2).await?;

    // The bootstrap peer goes away and comes back on the same address, while the flood goes on.
    net.stop(0).await?;
    eventually(WAIT, "the victim saw its bootstrap peer go", || !linked(&victim)).await?;
    let asked = liar.pex_answered(&victim_peer);
    eventually(WAIT, "another answer while it is away", || liar.pex_answered(&victim_peer) > asked)
        .await?;
    let restarted = tokio::time::Instant::now();
    net.start(0).await?;
    eventually(WAIT, "the victim is back with its bootstrap peer", || linked(&victim)).await?;
    report(
        "bootstrap_address_flood",
        json!({
            "addresses_per_answer": 128,
            "answers": liar.pex_answered(&victim_peer),
            "reconnected_ms": restarted.elapsed().as_millis() as u64,
        }),
    );
    drop(liar);
    net.shutdown().await;
    Ok(())
}
