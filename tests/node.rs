//! Whole nodes (`mesh-service`) in one process on loopback, against birdeye-sim and the real
//! PostgreSQL and Redis: convergence, one fetch per round, restarts, outages, discrepancies and
//! skewed clocks.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use mesh_ipc::PriceFilter;
use mesh_testkit::{LocalMesh, eventually, eventually_async};
use mesh_tests::{PgCluster, RedisServer, redis_url};

const WAIT: Duration = Duration::from_secs(60);

/// Every node's price for every asset, by node.
fn books(mesh: &LocalMesh) -> Vec<HashMap<(String, String), String>> {
    (0..mesh.len())
        .map(|i| match mesh.node(i) {
            Some(node) => node
                .prices()
                .into_iter()
                .map(|p| ((p.blockchain, p.asset), p.price.to_string()))
                .collect(),
            None => HashMap::new(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_converge_on_the_simulators_prices_with_one_fetch_per_round() -> anyhow::Result<()>
{
    let redis = redis_url();
    let mesh = LocalMesh::builder()
        .providers(2)
        .consumers(8)
        .rounds(2, 1)
        .redis(redis.clone())
        .start()
        .await?;
    let sim = &mesh.simulators()[0];
    // Nine fixture assets on two chains reach every node.
    eventually(WAIT, "every node holds the nine fixture prices", || {
        books(&mesh).iter().all(|b| b.len() == 9)
    })
    .await?;

    // Freeze the market: after the next round every node must hold exactly its prices.
    sim.set_frozen(true);
    let frozen_at = mesh_service::now_ms();
    eventually(WAIT, "every node holds the simulator's frozen prices", || {
        let expected: HashMap<(String, String), String> = books(&mesh)[0]
            .keys()
            .filter_map(|(chain, asset)| {
                Some(((chain.clone(), asset.clone()), sim.price_text(chain, asset)?))
            })
            .collect();
        let fresh = mesh.node(0).unwrap().prices().iter().all(|p| p.timestamp_ms > frozen_at);
        fresh
            && expected.len() == 9
            && books(&mesh).iter().all(|b| {
                b.iter().all(|(k, v)| {
                    expected.get(k).is_some_and(|e| e.parse::<f64>().ok() == v.parse::<f64>().ok())
                })
            })
    })
    .await?;

    // One fetch per round: every round seen at a consumer carried exactly one provider's
    // batch, and the simulator answered two multi-price calls (two chains) per round.
    let before = sim.stats().multi_price_requests();
    let consumer = mesh.node(5).unwrap();
    eventually(WAIT, "consumer 5 has seen a round", || !consumer.rounds_received().is_empty())
        .await?;
    let first = consumer.rounds_received().last().map(|(r, _)| *r).unwrap();
    eventually(WAIT, "four more rounds", || {
        mesh.node(5).unwrap().rounds_received().last().is_some_and(|(r, _)| *r >= first + 4)
    })
    .await?;
    let rounds = mesh.node(5).unwrap().rounds_received();
    let last = rounds.last().map(|(r, _)| *r).unwrap();
    for (round, origins) in rounds.iter().filter(|(r, _)| *r > first && *r <= last) {
        assert_eq!(origins.len(), 1, "round {round} fetched by {origins:?}");
    }
    let fetched = last - first;
    let calls = sim.stats().multi_price_requests() - before;
    assert!(
        calls >= 2 * fetched && calls <= 2 * (fetched + 1),
        "{calls} calls for {fetched} rounds"
    );
    // A provider is active once it has delivered: the providers take turns at random, so the
    // second may need a few more rounds for its first turn.
    eventually(WAIT, "both providers delivered and are active", || {
        mesh.node(5).unwrap().network_status().active_providers.len() == 2
    })
    .await?;
    let status = mesh.node(5).unwrap().network_status();
    assert!(status.active_providers.iter().all(|p| p.hop_count >= 1));
    assert_eq!(status.data_freshness, mesh_ipc::DataFreshness::Fresh);
    mesh.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_serves_its_stored_prices_at_once() -> anyhow::Result<()> {
    let mut mesh = LocalMesh::builder().providers(1).consumers(2).rounds(2, 1).start().await?;
    eventually(WAIT, "consumer 2 holds nine prices", || mesh.node(2).unwrap().prices().len() == 9)
        .await?;
    // Stop the provider: from now on nothing new arrives.
    mesh.stop(0).await?;
    let held = mesh.node(2).unwrap().prices();
    // Give the write-behind queue time to write what it holds (it flushes within 50 ms).
    let queue = mesh.node(2).unwrap().persistence().prices.clone();
    eventually(WAIT, "the price queue is empty", || queue.stats().pending == 0).await?;
    mesh.stop(2).await?;
    mesh.restart(2).await?;
    let reloaded = mesh.node(2).unwrap().prices();
    let pairs = |v: &[mesh_ipc::PriceView]| {
        // The store keeps when each price was true (its source's time when given).
        let observed = |p: &mesh_ipc::PriceView| p.source_timestamp_ms.unwrap_or(p.timestamp_ms);
        v.iter().map(|p| (p.asset.clone(), p.price.to_string(), observed(p))).collect::<Vec<_>>()
    };
    assert_eq!(
        pairs(&reloaded),
        pairs(&held),
        "prices served from the store right after the restart"
    );
    mesh.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_rounds_go_on_through_the_mesh_and_the_degraded_flag_follows()
-> anyhow::Result<()> {
    let mut redis = RedisServer::start(None).await?;
    let mesh = LocalMesh::builder()
        .providers(2)
        .consumers(2)
        .rounds(2, 1)
        .redis(redis.url())
        .start()
        .await?;
    let consumer = mesh.node(3).unwrap();
    let provider = mesh.node(0).unwrap();
    eventually(WAIT, "prices arrive", || consumer.prices().len() == 9).await?;
    assert!(!provider.network_status().degraded);

    redis.kill();
    let killed_at = consumer.rounds_received().last().map(|(r, _)| *r).unwrap_or(0);
    eventually(WAIT, "the provider reports coordination degraded", || {
        let s = provider.network_status();
        s.degraded && s.degraded_components.iter().any(|c| c == "coordination")
    })
    .await?;
    eventually(WAIT, "three more rounds arrive while Redis is down", || {
        consumer.rounds_received().last().is_some_and(|(r, _)| *r >= killed_at + 3)
    })
    .await?;
    // No round was missed.
    let rounds: Vec<u64> =
        consumer.rounds_received().into_iter().map(|(r, _)| r).filter(|r| *r > killed_at).collect();
    for pair in rounds.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "round missed during the outage: {rounds:?}");
    }

    redis.restart().await?;
    eventually(WAIT, "the degraded flag clears once Redis is back", || {
        !provider.network_status().degraded
    })
    .await?;
    mesh.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_down_the_node_serves_and_later_writes_every_row()
-> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    let url = pg.url("postgres");
    let consumer_url = url.clone();
    let mut mesh = LocalMesh::builder()
        .providers(1)
        .consumers(1)
        .rounds(2, 1)
        .per_node(move |i, o| {
            if i == 1 {
                o.insert("DATABASE_URL".into(), consumer_url.clone());
            }
        })
        .start()
        .await?;
    let consumer = mesh.node(1).unwrap();
    eventually(WAIT, "prices arrive", || consumer.prices().len() == 9).await?;
    let store = consumer.persistence().price_store().clone();
    eventually_async(WAIT, "rows reach PostgreSQL", || async {
        store.load_all().await.map(|r| r.len() == 9).unwrap_or(false)
    })
    .await?;

    pg.stop()?;
    let round_at_stop = consumer.rounds_received().last().map(|(r, _)| *r).unwrap();
    eventually(WAIT, "the queue reports the outage", || {
        consumer.persistence().prices.is_degraded()
    })
    .await?;
    eventually(WAIT, "two rounds arrive while the database is down", || {
        consumer.rounds_received().last().is_some_and(|(r, _)| *r >= round_at_stop + 2)
    })
    .await?;
    // Still serving, over IPC too.
    let client = mesh_ipc::Client::new(consumer.socket());
    assert_eq!(client.prices(PriceFilter::default()).await?.len(), 9);
    assert!(client.network_status().await?.degraded_components.contains(&"database".to_owned()));

    // Stop the provider so the book stops moving, bring the database back, and compare.
    mesh.stop(0).await?;
    pg.start_again()?;
    let consumer = mesh.node(1).unwrap();
    let queue = consumer.persistence().prices.clone();
    eventually(WAIT, "the queue drains after recovery", || {
        !queue.is_degraded() && queue.stats().pending == 0
    })
    .await?;
    let book: Vec<(String, String, i64)> = consumer
        .prices()
        .into_iter()
        // A row's time is when the price was true (its source's time when given).
        .map(|p| (p.asset, p.price.to_string(), p.source_timestamp_ms.unwrap_or(p.timestamp_ms)))
        .collect();
    let mut rows: Vec<(String, String, i64)> = store
        .load_all()
        .await?
        .into_iter()
        .map(|r| (r.asset, r.price.to_string(), r.timestamp_ms))
        .collect();
    rows.sort();
    let mut book_sorted = book.clone();
    book_sorted.sort();
    assert_eq!(rows, book_sorted, "every newest price written, none lost");
    assert_eq!(queue.stats().dropped, 0);
    mesh.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_ten_percent_off_is_flagged_within_one_round() -> anyhow::Result<()> {
    let mesh = LocalMesh::builder()
        .providers(2)
        .consumers(1)
        .rounds(2, 1)
        .simulator_per_provider()
        .start()
        .await?;
    // Without Redis both providers fetch while they have not heard of each other; once they
    // have, they alternate. Make them disagree, then wait at most two rounds.
    mesh.simulators()[1].set_offset_percent(10.0);
    let consumer = mesh.node(2).unwrap();
    eventually(WAIT, "the discrepancy is flagged", || {
        consumer.prices().iter().any(|p| p.discrepancy && p.providers_reporting == 2)
    })
    .await?;
    mesh.shutdown().await
}

/// A provider whose clock runs a minute ahead finds out (Birdeye's `Date`, its peers) and
/// sends nothing: every node would refuse its batches as future-dated (issue 34). Its prices
/// are never served; the honest provider's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_sixty_seconds_ahead_sends_nothing_and_is_never_served() -> anyhow::Result<()> {
    let mesh = LocalMesh::builder()
        .providers(2)
        .consumers(2)
        .rounds(2, 1)
        .configure(|i, c| {
            if i == 1 {
                c.clock_offset_ms = 60_000;
            }
        })
        .start()
        .await?;
    let skewed = mesh.node(1).unwrap().node_id();
    let consumer = mesh.node(3).unwrap();
    eventually(WAIT, "the skewed provider finds its clock off", || {
        mesh.node(1)
            .unwrap()
            .provider()
            .status()
            .last_error
            .is_some_and(|e| e.contains("MESH_MAX_CLOCK_SKEW_SECS"))
    })
    .await?;
    assert_eq!(mesh.node(1).unwrap().provider().status().rounds_fetched, 0);
    eventually(WAIT, "the honest provider's prices arrive", || consumer.prices().len() == 9)
        .await?;
    for i in 2..4 {
        assert!(
            mesh.node(i).unwrap().prices().iter().all(|p| p.source_node_id != skewed),
            "node {i} served a price from the future"
        );
    }
    mesh.shutdown().await
}

/// What a process of user `uid` (group `gid`, no other group) gets from the node socket at
/// `socket`: the answer to one request, or `CONNECT_ERROR: ...`. The client is `perl`, run
/// under that user and group by `setpriv` (perl-base and util-linux are part of every Debian
/// system).
fn socket_answer_as(uid: u32, gid: u32, socket: &std::path::Path) -> anyhow::Result<String> {
    const CLIENT: &str = r#"
        use IO::Socket::UNIX;
        $SIG{PIPE} = 'IGNORE'; # a refused client's request may meet a closed socket
        my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0])
            or do { print "CONNECT_ERROR: $!"; exit 0 };
        my $body = '{"type":"get_network_status"}';
        print $s pack("N", length $body) . $body;
        my $len; read($s, $len, 4) == 4 or do { print "CLOSED"; exit 0 };
        my $answer; read($s, $answer, unpack("N", $len));
        print $answer;
    "#;
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["perl", "-e", CLIENT])
        .arg(socket)
        .current_dir("/")
        .output()?;
    anyhow::ensure!(out.status.success(), "perl failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The node socket lets in the node's own user, root and the members of
/// `MESH_NODE_SOCKET_GROUP`, and nobody else, even when its file and directory modes were
/// loosened: a real `mesh-node`, clients of other users, the refusals counted in the node's
/// metrics and logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_socket_refuses_other_users_and_counts_it() -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running clients as other users needs root (CI runs as root)");
        return Ok(());
    }
    // 65534 is nobody/nogroup: the configured group. 65533 is a user of no group we name.
    let (member, stranger) = (65534u32, 65533u32);
    let dir = tempfile::tempdir()?;
    // Others may walk through the test's directory; the socket's own directory is the node's.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let socket = dir.path().join("run/node.sock");
    let metrics_port = mesh_tests::free_port()?;
    let mut node = std::process::Command::new(mesh_tests::mesh_node_bin()?)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MESH_DATA_DIR", dir.path().join("data"))
        .env("MESH_LOG_DIR", dir.path().join("logs"))
        .env("MESH_NODE_SOCKET", &socket)
        .env("MESH_NODE_SOCKET_GROUP", member.to_string())
        .env("MESH_LISTEN_ADDRS", "/ip4/127.0.0.1/tcp/0")
        .env("MESH_MDNS_ENABLED", "false")
        .env("MESH_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let result = async {
        eventually(WAIT, "the node socket", || socket.exists()).await?;
        let run = socket.parent().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| (m.mode() & 0o777, m.gid()));
        assert_eq!(mode(run)?, (0o750, member), "the socket's directory");
        assert_eq!(mode(&socket)?, (0o660, member), "the socket");

        // A member of the group is served; root (this test) too.
        let answer = socket_answer_as(member, member, &socket)?;
        assert!(answer.contains("connected_peers"), "the group's member: {answer}");
        assert!(mesh_ipc::Client::new(&socket).network_status().await.is_ok(), "root");
        // Anyone else cannot even reach the file.
        let answer = socket_answer_as(stranger, stranger, &socket)?;
        assert!(answer.contains("CONNECT_ERROR"), "a stranger with the modes as set: {answer}");

        // An operator loosens both modes: the credential check still refuses, twice.
        std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
        for _ in 0..2 {
            let answer = socket_answer_as(stranger, stranger, &socket)?;
            assert!(
                answer.contains("permission_denied") && answer.contains("refused user id 65533"),
                "a stranger with the modes loosened: {answer}"
            );
        }
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let refused = r#"mesh_ipc_connections_refused_total{reason="peer_credentials"} 2"#;
        eventually_async(WAIT, "both refusals counted", || async {
            let text = match reqwest::get(&url).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            text.lines().any(|l| l == refused)
        })
        .await?;
        let log = std::fs::read_to_string(dir.path().join("logs/app.log"))?;
        let lines = log.lines().filter(|l| l.contains("refused user id 65533")).count();
        assert_eq!(lines, 1, "one log line for the two refusals of one user:\n{log}");
        anyhow::Ok(())
    }
    .await;
    let _ = node.kill();
    let _ = node.wait();
    result
}
