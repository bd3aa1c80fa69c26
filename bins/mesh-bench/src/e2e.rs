//! End-to-end benchmark (issue 9 point 5): birdeye-sim → provider → mesh of full nodes →
//! `mesh-api` → WebSocket client, on loopback in one process.
//!
//! The mesh is `mesh_testkit::LocalMesh` (one provider and `--nodes - 1` consumers, TCP on
//! 127.0.0.1, SQLite stores, the in-process simulator). Each of the last `--clients`
//! consumers gets its own `mesh_api::ApiServer` on its socket, and one WebSocket client on
//! `/api/mesh/ws`. A round starts at `round × interval` (wall clock); the provider fetches
//! then, signs and broadcasts. Per round and client, the latency is from the round's start to
//! the client's first price event of that round. The same is taken at the provider's own book
//! and at each consumer's book, which splits the total into fetch + sign, mesh, and API.
//!
//! Run with `cargo run --release -p mesh-bench -- e2e` (about a minute).

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use mesh_ipc::{Event, Handler};
use mesh_testkit::LocalMesh;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::relay::{load_average, percentile};
use crate::report::{Figure, Report};

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Nodes in the mesh (one provider, the rest consumers).
    #[arg(long, default_value_t = 20)]
    pub nodes: usize,
    /// Consumers with an API server and a WebSocket client (the last ones started).
    #[arg(long, default_value_t = 19)]
    pub clients: usize,
    /// Rounds measured.
    #[arg(long, default_value_t = 20)]
    pub rounds: i64,
    /// Round length, seconds.
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
}

/// Wall clock in microseconds.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// First arrival per round (round → µs after the round's start), and the hop count seen.
type Firsts = HashMap<i64, (i64, u8)>;

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(measure(args))
}

async fn measure(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.nodes >= 2, "--nodes must be at least 2");
    anyhow::ensure!(args.rounds >= 1 && args.interval >= 1, "--rounds and --interval must be >= 1");
    let load_before = load_average();
    let clients = args.clients.clamp(1, args.nodes - 1);
    let mesh = LocalMesh::builder()
        .providers(1)
        .consumers(args.nodes - 1)
        .rounds(args.interval, 1)
        .start()
        .await?;
    let result = measure_on(args, &mesh, clients).await;
    let stopped = mesh.shutdown().await;
    let (figures, params) = result?;
    stopped?;
    let mut params = params;
    params["load_average_before"] = json!(load_before);
    params["load_average_after"] = json!(load_average());
    Ok(Report { bench: "e2e", params, figures })
}

async fn measure_on(
    args: &Args,
    mesh: &LocalMesh,
    clients: usize,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    // A formed mesh first: every consumer holds a price.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while (1..mesh.len()).any(|i| mesh.node(i).is_none_or(|n| n.prices().is_empty())) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the mesh did not form in 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let interval_us = args.interval as i64 * 1_000_000;
    let client_nodes: Vec<usize> = (mesh.len() - clients..mesh.len()).collect();
    let mut apis = Vec::new();
    for &i in &client_nodes {
        let config = mesh_api::Config {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            node_socket: mesh.running(i)?.socket().to_path_buf(),
            ..mesh_api::Config::default()
        };
        apis.push(mesh_api::ApiServer::start(config).await?);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !apis.iter().all(mesh_api::ApiServer::node_connected) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "an API did not reach its node");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start_round = now_us() / interval_us + 2;
    let end_round = start_round + args.rounds;
    let until = tokio::time::Instant::now()
        + Duration::from_micros(((end_round + 1) * interval_us - now_us()).max(0) as u64);

    let mut ws_tasks = Vec::new();
    for api in &apis {
        let url = format!("ws://{}/api/mesh/ws", api.local_addr());
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        ws_tasks.push(tokio::spawn(ws_client(socket, interval_us, until)));
    }
    let book_tasks: Vec<JoinHandle<Firsts>> = (0..mesh.len())
        .map(|i| {
            mesh.running(i)
                .map(|n| tokio::spawn(book_listener(n.shared().events(), interval_us, until)))
        })
        .collect::<anyhow::Result<_>>()?;

    let mut ws_firsts = Vec::new();
    for t in ws_tasks {
        ws_firsts.push(t.await??);
    }
    let mut book_firsts = Vec::new();
    for t in book_tasks {
        book_firsts.push(t.await?);
    }
    for api in apis {
        api.shutdown(Duration::from_secs(5)).await;
    }

    let rounds = start_round..end_round;
    let in_rounds = |f: &Firsts| -> Vec<f64> {
        f.iter().filter(|(r, _)| rounds.contains(r)).map(|(_, (us, _))| *us as f64 / 1e3).collect()
    };
    let provider = in_rounds(&book_firsts[0]);
    let books: Vec<f64> = book_firsts[1..].iter().flat_map(in_rounds).collect();
    let ws: Vec<f64> = ws_firsts.iter().flat_map(in_rounds).collect();
    // Mesh and API shares: per round and consumer, minus the provider's own book time.
    let provider_at: HashMap<i64, i64> =
        book_firsts[0].iter().map(|(r, (us, _))| (*r, *us)).collect();
    let mut mesh_ms = Vec::new();
    for f in &book_firsts[1..] {
        for (r, (us, _)) in f.iter().filter(|(r, _)| rounds.contains(r)) {
            if let Some(p) = provider_at.get(r) {
                mesh_ms.push((us - p) as f64 / 1e3);
            }
        }
    }
    let mut api_ms = Vec::new();
    for (k, &node) in client_nodes.iter().enumerate() {
        for (r, (us, _)) in ws_firsts[k].iter().filter(|(r, _)| rounds.contains(r)) {
            if let Some((book_us, _)) = book_firsts[node].get(r) {
                api_ms.push((us - book_us) as f64 / 1e3);
            }
        }
    }
    let max_hops = ws_firsts.iter().flat_map(|f| f.values().map(|(_, h)| *h)).max().unwrap_or(0);
    let expected_ws = (clients as i64 * args.rounds) as f64;
    let figures = vec![
        Figure::plain("round_start_to_client_p50", percentile(&ws, 0.5), "ms"),
        Figure::at_most("round_start_to_client_p99", percentile(&ws, 0.99), "ms", 50.0),
        Figure::plain("round_start_to_client_max", percentile(&ws, 1.0), "ms"),
        Figure::at_least("client_delivery_ratio", ws.len() as f64 / expected_ws, "ratio", 1.0),
        Figure::plain("round_start_to_provider_book_p50", percentile(&provider, 0.5), "ms"),
        Figure::plain("round_start_to_provider_book_p99", percentile(&provider, 0.99), "ms"),
        Figure::plain("round_start_to_consumer_book_p50", percentile(&books, 0.5), "ms"),
        Figure::plain("round_start_to_consumer_book_p99", percentile(&books, 0.99), "ms"),
        Figure::plain("provider_book_to_consumer_book_p50", percentile(&mesh_ms, 0.5), "ms"),
        Figure::plain("provider_book_to_consumer_book_p99", percentile(&mesh_ms, 0.99), "ms"),
        Figure::plain("consumer_book_to_client_p50", percentile(&api_ms, 0.5), "ms"),
        Figure::plain("consumer_book_to_client_p99", percentile(&api_ms, 0.99), "ms"),
        Figure::plain("max_hops_to_a_client_node", f64::from(max_hops), "hops"),
    ];
    let params = json!({
        "nodes": args.nodes,
        "providers": 1,
        "clients": clients,
        "client_nodes": client_nodes,
        "rounds": args.rounds,
        "interval_secs": args.interval,
        "samples": ws.len(),
        "transport": "TCP on 127.0.0.1, one process (LocalMesh + mesh_api::ApiServer + \
            tokio-tungstenite clients)",
        "clock": "wall clock, microseconds; a round starts at round x interval",
    });
    Ok((figures, params))
}

/// Records the first price event of each round in a node's book.
async fn book_listener(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    interval_us: i64,
    until: tokio::time::Instant,
) -> Firsts {
    let mut firsts = Firsts::new();
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            () = tokio::time::sleep_until(until) => break,
        };
        match event {
            // A price with no hop count was reloaded from the store, not delivered.
            Ok(Event::Price(p)) if p.hop_count.is_some() => {
                let at = now_us();
                let round = p.timestamp_ms * 1000 / interval_us;
                let hops = p.hop_count.unwrap_or_default();
                firsts.entry(round).or_insert((at - round * interval_us, hops));
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    firsts
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Records the first price event of each round a WebSocket client receives.
async fn ws_client(
    mut socket: WsStream,
    interval_us: i64,
    until: tokio::time::Instant,
) -> anyhow::Result<Firsts> {
    let mut firsts = Firsts::new();
    loop {
        let message = tokio::select! {
            m = socket.next() => m,
            () = tokio::time::sleep_until(until) => break,
        };
        let text = match message {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => break,
        };
        let at = now_us();
        let value: serde_json::Value = serde_json::from_str(text.as_str())?;
        if value["type"] != "price" {
            continue;
        }
        let data = &value["data"];
        let (Some(ts), Some(hops)) = (data["timestamp_ms"].as_i64(), data["hop_count"].as_u64())
        else {
            anyhow::bail!("price event without timestamp_ms or hop_count: {text}");
        };
        let round = ts * 1000 / interval_us;
        firsts.entry(round).or_insert((at - round * interval_us, hops as u8));
    }
    let _ = socket.close(None).await;
    Ok(firsts)
}
