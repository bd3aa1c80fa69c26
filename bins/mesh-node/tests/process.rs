//! The real `mesh-node` binary: a provider and a consumer as separate processes on loopback,
//! the consumer bootstrapping from the provider; prices checked over the IPC socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_ipc::{Client, PriceFilter};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-node");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn node(dir: &Path, port: u16, sim_url: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MESH_DATA_DIR", dir)
        .env("MESH_LOG_DIR", dir.join("logs"))
        .env("MESH_NODE_SOCKET", dir.join("node.sock"))
        .env("MESH_LISTEN_ADDRS", format!("/ip4/127.0.0.1/tcp/{port}"))
        .env("MESH_ALLOW_PRIVATE_ADDRS", "true")
        .env("MESH_MDNS_ENABLED", "false")
        .env("MESH_METRICS_LISTEN", "off")
        .env("MESH_BIRDEYE_BASE_URL", sim_url)
        .env("MESH_PROVIDER_FETCH_INTERVAL_SECS", "10")
        .env("MESH_COORDINATION_WINDOW_SECS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// SIGTERM, then the exit status within 20 s.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        for _ in 0..200 {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("mesh-node did not stop within 20 s of SIGTERM");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_and_a_consumer_process_exchange_prices() {
    let sim =
        birdeye_sim::Simulator::builder().keys(["demo-key"]).spawn("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (pdir, cdir) = (dir.path().join("provider"), dir.path().join("consumer"));
    let (pport, cport) = (free_port(), free_port());

    // The provider's peer id, for the consumer's bootstrap address.
    let id = node(&pdir, pport, &sim.base_url()).arg("id").stdout(Stdio::piped()).output().unwrap();
    assert!(id.status.success());
    let text = String::from_utf8(id.stdout).unwrap();
    let peer_id = text
        .lines()
        .find_map(|l| l.strip_prefix("peer_id: "))
        .expect("peer id printed")
        .trim()
        .to_owned();

    let provider = Running(
        node(&pdir, pport, &sim.base_url())
            .env("BIRDEYE_API_KEY", "demo-key")
            .arg("--provider")
            .spawn()
            .unwrap(),
    );
    let consumer = Running(
        node(&cdir, cport, &sim.base_url())
            .env("MESH_BOOTSTRAP_PEERS", format!("/ip4/127.0.0.1/tcp/{pport}/p2p/{peer_id}"))
            .spawn()
            .unwrap(),
    );

    let client = Client::new(cdir.join("node.sock")).with_timeout(Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let prices = loop {
        if let Ok(p) = client.prices(PriceFilter::default()).await
            && p.len() == 9
        {
            break p;
        }
        assert!(tokio::time::Instant::now() < deadline, "no prices at the consumer within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(prices.iter().all(|p| p.hop_count == Some(1) && p.price.is_positive()));
    let status = client.network_status().await.unwrap();
    assert_eq!(status.connected_peers, 1);
    assert_eq!(status.active_providers.len(), 1);
    assert_eq!(status.active_providers[0].hop_count, 1);

    let log = std::fs::read_to_string(pdir.join("logs/app.log")).unwrap();
    assert!(log.contains("Provider node fetching price data"));
    assert!(log.contains("Provider node broadcast complete: 9 assets to 1 peers"));
    assert!(!log.contains("demo-key"), "the API key never reaches the log");

    assert!(consumer.stop().success());
    assert!(provider.stop().success());
}
