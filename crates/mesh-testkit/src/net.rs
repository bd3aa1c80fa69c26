//! [`TestNet`]: many real relays in one process, linked in a chosen topology.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_protocol::{Envelope, Identity, MessageId};
use mesh_relay::{Config, Delivery, Multiaddr, PeerId, Relay};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::eventually::eventually;
use crate::topology::Topology;

/// How test nodes reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// libp2p's in-memory transport: no sockets, no ports (default).
    Memory,
    /// TCP on 127.0.0.1 with a port chosen by the system.
    Tcp,
}

/// What one node has delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// How many times the message was delivered (must stay 1).
    pub count: u32,
    /// Hop count of the first delivery.
    pub hop_count: u8,
    /// When it was first delivered.
    pub at: tokio::time::Instant,
    /// The peer the first delivery came from (`None`: published here).
    pub from: Option<PeerId>,
}

#[derive(Debug, Default)]
struct Record {
    received: HashMap<MessageId, Received>,
}

/// One node of a [`TestNet`].
pub struct TestNode {
    /// Its index in the net.
    pub index: usize,
    /// Its key (kept across restarts).
    pub identity: Identity,
    relay: Option<Relay>,
    cancel: CancellationToken,
    listen: Multiaddr,
    record: Arc<Mutex<Record>>,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNode")
            .field("index", &self.index)
            .field("peer", &self.peer_id())
            .finish()
    }
}

impl TestNode {
    /// The node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    /// The running relay (`None` while stopped).
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// The running relay, or an error while stopped.
    pub fn running(&self) -> anyhow::Result<&Relay> {
        self.relay.as_ref().ok_or_else(|| anyhow::anyhow!("node {} is stopped", self.index))
    }

    /// Its dialable address (with `/p2p/<peer id>`).
    pub fn addr(&self) -> Multiaddr {
        self.listen.clone().with(mesh_relay::Protocol::P2p(self.peer_id()))
    }

    /// What it delivered of `id`.
    pub fn received(&self, id: &MessageId) -> Option<Received> {
        self.lock().received.get(id).copied()
    }

    /// How many distinct messages it delivered.
    pub fn received_count(&self) -> usize {
        self.lock().received.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Adjusts node `i`'s relay settings.
type Configure = Box<dyn Fn(usize, &mut Config) + Send + Sync>;

/// Builds a [`TestNet`].
pub struct TestNetBuilder {
    nodes: usize,
    topology: Topology,
    transport: Transport,
    seed: u64,
    configure: Option<Configure>,
    tcp_ip: Option<TcpIp>,
}

/// The loopback IPv4 address node `i` listens (and dials from) on over TCP.
type TcpIp = Box<dyn Fn(usize) -> std::net::Ipv4Addr + Send + Sync>;

impl std::fmt::Debug for TestNetBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNetBuilder")
            .field("nodes", &self.nodes)
            .field("topology", &self.topology)
            .field("transport", &self.transport)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

/// The relay settings a test node starts from: no automatic dialing and no exploring (the
/// topology is exactly what the test asked for), no peer exchange, short ticks and backoffs,
/// and loopback and memory-transport addresses allowed ([`mesh_relay::AddrFilter::lab`]).
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.listen_addrs.clear();
    config.peers.min_peers = 0;
    config.peers.max_peers = 64;
    config.peers.prune_grace = Duration::from_secs(3600);
    config.peers.redial_backoff = Duration::from_millis(100);
    config.peers.explore_interval = None;
    config.peers.addr_filter = mesh_relay::AddrFilter::lab();
    config.peer_exchange = false;
    config.tick_interval = Duration::from_millis(100);
    config.stream_backoff = (Duration::from_millis(20), Duration::from_millis(500));
    config
}

impl TestNetBuilder {
    /// How many nodes.
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// How they are linked.
    pub fn topology(mut self, topology: Topology) -> Self {
        self.topology = topology;
        self
    }

    /// How they reach each other.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Seed of the random topology.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Over TCP, node `i` listens on `ip(i)` instead of 127.0.0.1 (any address of
    /// 127.0.0.0/8 works on Linux without setup), and its dials leave from there too (libp2p
    /// reuses the listening port): so nodes can sit in networks of their own, as the
    /// per-network bounds see them.
    pub fn tcp_ip(
        mut self,
        ip: impl Fn(usize) -> std::net::Ipv4Addr + Send + Sync + 'static,
    ) -> Self {
        self.tcp_ip = Some(Box::new(ip));
        self
    }

    /// Adjusts each node's relay settings (starting from [`test_config`]).
    pub fn configure(mut self, f: impl Fn(usize, &mut Config) + Send + Sync + 'static) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    /// Starts every node, links them, and waits until every link carries a connection.
    pub async fn build(self) -> anyhow::Result<TestNet> {
        let edges = self.topology.edges(self.nodes, self.seed)?;
        let mut net = TestNet {
            nodes: Vec::with_capacity(self.nodes),
            edges,
            transport: self.transport,
            configure: self.configure,
        };
        for index in 0..self.nodes {
            let identity = Identity::from_seed(node_seed(self.seed, index));
            let listen = match self.transport {
                Transport::Memory => {
                    format!("/memory/{}", rand::thread_rng().gen_range(1u64..u64::MAX / 2))
                        .parse()?
                }
                Transport::Tcp => {
                    let ip = self.tcp_ip.as_ref().map_or([127, 0, 0, 1].into(), |f| f(index));
                    format!("/ip4/{ip}/tcp/0").parse()?
                }
            };
            net.nodes.push(TestNode {
                index,
                identity,
                relay: None,
                cancel: CancellationToken::new(),
                listen,
                record: Arc::default(),
            });
            net.start_node(index).await?;
        }
        net.link_all().await?;
        Ok(net)
    }
}

fn node_seed(seed: u64, index: usize) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    s[16] = 0x5e;
    s
}

/// Many relays in one process.
pub struct TestNet {
    nodes: Vec<TestNode>,
    edges: Vec<(usize, usize)>,
    transport: Transport,
    configure: Option<Configure>,
}

impl std::fmt::Debug for TestNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNet")
            .field("nodes", &self.nodes.len())
            .field("edges", &self.edges.len())
            .finish()
    }
}

/// Default patience of the harness's waits.
pub const WAIT: Duration = Duration::from_secs(30);

impl TestNet {
    /// A builder: `TestNet::builder().nodes(20).topology(Topology::Line).build().await`.
    pub fn builder() -> TestNetBuilder {
        TestNetBuilder {
            nodes: 2,
            topology: Topology::Line,
            transport: Transport::Memory,
            seed: 1,
            configure: None,
            tcp_ip: None,
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// `true` for a net without nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The links.
    pub fn edges(&self) -> &[(usize, usize)] {
        &self.edges
    }

    /// One node.
    pub fn node(&self, index: usize) -> &TestNode {
        &self.nodes[index]
    }

    /// Every node.
    pub fn nodes(&self) -> &[TestNode] {
        &self.nodes
    }

    /// Index of the node with this peer id.
    pub fn index_of(&self, peer: &PeerId) -> Option<usize> {
        self.nodes.iter().position(|n| n.peer_id() == *peer)
    }

    async fn start_node(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        let mut config = test_config();
        config.listen_addrs = vec![node.listen.clone()];
        if let Some(f) = &self.configure {
            f(index, &mut config);
        }
        node.cancel = CancellationToken::new();
        let span = tracing::info_span!("node", index);
        let (relay, deliveries) = Relay::start(&node.identity, config, node.cancel.clone())
            .instrument(span.clone())
            .await?;
        let addrs = relay.listen_addrs().await?;
        let listen_ip = node.listen.iter().next().map(|p| p.to_string());
        if self.transport == Transport::Tcp
            && let Some(a) = addrs.iter().find(|a| {
                a.iter().next().map(|p| p.to_string()) == listen_ip
                    && matches!(a.iter().nth(1), Some(mesh_relay::Protocol::Tcp(_)))
            })
        {
            // Keep the port the system chose, so a restart listens on it again.
            node.listen = a.clone();
        }
        tokio::spawn(collect(deliveries, node.record.clone()).instrument(span));
        node.relay = Some(relay);
        Ok(())
    }

    /// Dials every link whose two ends run and are not yet connected; waits for all of them.
    pub async fn link_all(&self) -> anyhow::Result<()> {
        for &(a, b) in &self.edges {
            self.link(a, b).await?;
        }
        self.wait_linked().await
    }

    async fn link(&self, a: usize, b: usize) -> anyhow::Result<()> {
        let (Some(ra), Some(_)) = (self.nodes[a].relay(), self.nodes[b].relay()) else {
            return Ok(());
        };
        ra.dial(self.nodes[b].addr()).await?;
        Ok(())
    }

    /// Waits until every link between running nodes carries a connection.
    pub async fn wait_linked(&self) -> anyhow::Result<()> {
        eventually(WAIT, "every link connected", || {
            self.edges.iter().all(|&(a, b)| match (self.nodes[a].relay(), self.nodes[b].relay()) {
                (Some(ra), Some(_)) => {
                    let pb = self.nodes[b].peer_id();
                    ra.status().peers.iter().any(|p| p.peer_id == pb)
                }
                _ => true,
            })
        })
        .await
    }

    /// Publishes `envelope` from node `index`; returns the peers it was queued to.
    pub async fn publish(&self, index: usize, envelope: &Envelope) -> anyhow::Result<usize> {
        Ok(self.nodes[index].running()?.publish(envelope).await?)
    }

    /// Indexes of the nodes that delivered `id`.
    pub fn delivered_by(&self, id: &MessageId) -> Vec<usize> {
        self.nodes.iter().filter(|n| n.received(id).is_some()).map(|n| n.index).collect()
    }

    /// Waits until each of `indexes` delivered `id`.
    pub async fn wait_delivered(&self, id: &MessageId, indexes: &[usize]) -> anyhow::Result<()> {
        eventually(WAIT, &format!("message {id} delivered by nodes {indexes:?}"), || {
            indexes.iter().all(|&i| self.nodes[i].received(id).is_some())
        })
        .await
    }

    /// Waits until every running node delivered `id`.
    pub async fn wait_delivered_everywhere(&self, id: &MessageId) -> anyhow::Result<()> {
        let running: Vec<usize> =
            self.nodes.iter().filter(|n| n.relay.is_some()).map(|n| n.index).collect();
        self.wait_delivered(id, &running).await
    }

    /// Stops node `index` (its key and address are kept for [`TestNet::start`]).
    pub async fn stop(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        if let Some(relay) = node.relay.take() {
            relay.shutdown(Duration::from_secs(5)).await;
        }
        node.cancel.cancel();
        Ok(())
    }

    /// Starts a stopped node again with the same key and address, and relinks its links.
    pub async fn start(&mut self, index: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[index].relay.is_none(), "node {index} is running");
        self.start_node(index).await?;
        let links: Vec<(usize, usize)> =
            self.edges.iter().copied().filter(|&(a, b)| a == index || b == index).collect();
        for (a, b) in links {
            let (from, to) = if a == index { (a, b) } else { (b, a) };
            self.link(from, to).await?;
        }
        self.wait_linked().await
    }

    /// Cuts the link between `a` and `b`: both block the other, so no copy crosses it.
    pub async fn cut(&self, a: usize, b: usize) -> anyhow::Result<()> {
        let (ra, rb) = (self.nodes[a].running()?, self.nodes[b].running()?);
        ra.block(self.nodes[b].peer_id()).await?;
        rb.block(self.nodes[a].peer_id()).await?;
        let (pa, pb) = (self.nodes[a].peer_id(), self.nodes[b].peer_id());
        eventually(WAIT, &format!("link {a}-{b} cut"), || {
            !ra.status().peers.iter().any(|p| p.peer_id == pb)
                && !rb.status().peers.iter().any(|p| p.peer_id == pa)
        })
        .await
    }

    /// Heals a cut link and reconnects it.
    pub async fn heal(&self, a: usize, b: usize) -> anyhow::Result<()> {
        let (ra, rb) = (self.nodes[a].running()?, self.nodes[b].running()?);
        ra.unblock(self.nodes[b].peer_id()).await?;
        rb.unblock(self.nodes[a].peer_id()).await?;
        self.link(a, b).await?;
        let pb = self.nodes[b].peer_id();
        eventually(WAIT, &format!("link {a}-{b} healed"), || {
            ra.status().peers.iter().any(|p| p.peer_id == pb)
        })
        .await
    }

    /// Cuts every link between `side` and the other nodes; returns the links cut.
    pub async fn partition(&self, side: &[usize]) -> anyhow::Result<Vec<(usize, usize)>> {
        let crossing: Vec<(usize, usize)> = self
            .edges
            .iter()
            .copied()
            .filter(|&(a, b)| side.contains(&a) != side.contains(&b))
            .collect();
        for &(a, b) in &crossing {
            self.cut(a, b).await?;
        }
        Ok(crossing)
    }

    /// Stops every node.
    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.stop(i).await;
        }
    }
}

async fn collect(mut deliveries: mpsc::Receiver<Delivery>, record: Arc<Mutex<Record>>) {
    while let Some(d) = deliveries.recv().await {
        let mut r = record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        r.received.entry(d.message.id).and_modify(|x| x.count += 1).or_insert(Received {
            count: 1,
            hop_count: d.message.envelope.hop_count,
            at: d.received_at,
            from: d.from,
        });
    }
}
