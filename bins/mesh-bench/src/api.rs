//! API benchmark: `GET /api/mesh/prices` (50 assets) under a loopback load generator, and
//! WebSocket fan-out to many clients.
//!
//! The API (`mesh_api::ApiServer`) follows a stand-in node served by a real `mesh_ipc::Server`
//! on a temporary socket. The load generator is in this process: `--connections` keep-alive
//! HTTP/1.1 connections, each sending one request at a time and timing it; when `wrk` is on
//! the PATH it is run as well and its figures are reported next to ours. The server and the
//! load generator run on separate runtimes but share the machine's cores.
//!
//! Fan-out: `--ws-clients` WebSocket clients connect to `/api/mesh/ws`; the node publishes
//! `--ws-events` price events, each carrying its publish time (microseconds since the start,
//! in `timestamp_ms`); every client records publish-to-receipt latency, and the API server's
//! threads' CPU time per client per event is read from `/proc`.
//!
//! Floor: the same events go to as many bare TCP clients from plain sender threads (no HTTP,
//! no WebSocket, no async server), so that the fan-out figures can be read against what the
//! kernel's loopback TCP costs on this machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hdrhistogram::Histogram;
use mesh_ipc::{
    DataFreshness, Event, Handler, NetworkStatus, PriceView, ProviderStatusView, Request, Response,
    Server, ServerConfig, Snapshot,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::relay::{thread_cpu_time, threads_cpu_time};
use crate::report::{Figure, Report, per_sec};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Prices in the book.
    #[arg(long, default_value_t = 50)]
    pub assets: usize,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Measured seconds of load (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// WebSocket clients of the fan-out test.
    #[arg(long, default_value_t = 1000)]
    pub ws_clients: usize,
    /// Events published in the fan-out test.
    #[arg(long, default_value_t = 100)]
    pub ws_events: usize,
    /// Milliseconds between two published events.
    #[arg(long, default_value_t = 100)]
    pub ws_interval_ms: u64,
    /// Worker threads of the API server's runtime.
    #[arg(long, default_value_t = 2)]
    pub server_threads: usize,
    /// Skip wrk even when it is installed.
    #[arg(long)]
    pub no_wrk: bool,
}

/// Thread name of the API server's runtime (its CPU time is read by this name).
const SERVER_THREADS: &str = "api-server";

/// A node stand-in with a fixed book that publishes what the benchmark tells it to.
struct BenchNode {
    prices: Vec<PriceView>,
    events: broadcast::Sender<Event>,
}

fn node_id() -> mesh_protocol::NodeId {
    mesh_protocol::NodeId::from_public_key(&[7; 32])
}

fn price(i: usize, value: &str, timestamp_ms: i64) -> anyhow::Result<PriceView> {
    Ok(PriceView {
        asset: format!("Asset{i:02}{}", "x".repeat(32)),
        blockchain: "solana".into(),
        price: value.parse().map_err(|e| anyhow::anyhow!("price {value}: {e:?}"))?,
        change_24h: Some("-1.25".parse().map_err(|e| anyhow::anyhow!("{e:?}"))?),
        timestamp: "2026-01-01T00:00:00Z".into(),
        timestamp_ms,
        source_timestamp: None,
        source_timestamp_ms: None,
        source_node_id: node_id(),
        age_secs: 1,
        stale: false,
        hop_count: Some(2),
        providers_reporting: 2,
        providers_agreeing: 2,
        discrepancy: false,
    })
}

impl BenchNode {
    fn network(&self) -> NetworkStatus {
        NetworkStatus {
            node_id: node_id(),
            peer_id: "12D3KooWBench".into(),
            connected_peers: 5,
            active_providers: vec![],
            data_freshness: DataFreshness::Fresh,
            last_update_time: None,
            degraded: false,
            degraded_components: vec![],
            listen_addrs: vec![],
        }
    }

    fn provider(&self) -> ProviderStatusView {
        ProviderStatusView {
            enabled: false,
            node_id: node_id(),
            reason: None,
            last_fetch_time: None,
            last_fetch_result: None,
            last_error: None,
            next_round: None,
            next_round_time: None,
            rounds_fetched: 0,
            rounds_skipped: 0,
            rounds_failed: 0,
            degraded: false,
            revision: 0,
            rejected_key_file: None,
        }
    }
}

#[async_trait::async_trait]
impl Handler for BenchNode {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::GetNetworkStatus => Response::NetworkStatus(self.network()),
            Request::GetPrices(_) => Response::Prices(self.prices.clone()),
            _ => Response::ProviderStatus(self.provider()),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot { prices: self.prices.clone(), network: self.network(), provider: self.provider() }
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads.max(1))
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load")
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let prices = (0..args.assets)
        .map(|i| price(i, &format!("{}.25", 100 + i), 0))
        .collect::<anyhow::Result<_>>()?;
    let (events, _) = broadcast::channel(4096);
    let node = Arc::new(BenchNode { prices, events });
    let cancel = CancellationToken::new();
    let socket = dir.path().join("node.sock");
    let api = server_rt.block_on(async {
        let server = Server::bind(ServerConfig::new(&socket)).await?;
        let handler: Arc<dyn Handler> = node.clone();
        tokio::spawn(server.run(handler, cancel.clone()));
        let config = mesh_api::Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            node_socket: socket.clone(),
            ..mesh_api::Config::default()
        };
        let api = mesh_api::ApiServer::start(config).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !api.node_connected() {
            anyhow::ensure!(Instant::now() < deadline, "the API did not reach the node");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(api)
    })?;
    let addr = api.local_addr();

    let load = client_rt.block_on(http_load(addr, args))?;
    let wrk = if args.no_wrk { None } else { run_wrk(addr, args)? };
    let fanout = client_rt.block_on(ws_fanout(addr, args, &node))?;
    let floor = client_rt.block_on(tcp_floor(args))?;

    server_rt.block_on(async {
        api.shutdown(Duration::from_secs(5)).await;
        cancel.cancel();
    });
    let mut figures = vec![
        Figure::at_least("prices_requests_per_sec", load.rate, "req/s", 50_000.0),
        Figure::plain("prices_p50_us", load.p50_us, "us"),
        Figure::at_most("prices_p99_us", load.p99_us, "us", 1000.0),
        Figure::plain("prices_errors", load.errors as f64, "requests"),
        Figure::plain("prices_body_bytes", load.body_bytes as f64, "bytes"),
    ];
    if let Some(wrk) = &wrk {
        figures.push(Figure::at_least("wrk_requests_per_sec", wrk.rate, "req/s", 50_000.0));
        figures.push(Figure::plain("wrk_p50_us", wrk.p50_us, "us"));
        figures.push(Figure::at_most("wrk_p99_us", wrk.p99_us, "us", 1000.0));
    }
    figures.extend([
        Figure::plain("ws_publish_to_client_p50_ms", fanout.latency.p50_ms, "ms"),
        Figure::at_most("ws_publish_to_client_p99_ms", fanout.latency.p99_ms, "ms", 5.0),
        Figure::plain("ws_publish_to_client_max_ms", fanout.latency.max_ms, "ms"),
        Figure::at_least("ws_delivery_ratio", fanout.delivery, "ratio", 1.0),
        Figure::plain("ws_server_cpu_us_per_client", fanout.server_cpu_us_per_client, "us"),
        Figure::plain("tcp_floor_publish_to_client_p50_ms", floor.latency.p50_ms, "ms"),
        Figure::plain("tcp_floor_publish_to_client_p99_ms", floor.latency.p99_ms, "ms"),
        Figure::plain("tcp_floor_publish_to_client_max_ms", floor.latency.max_ms, "ms"),
        Figure::plain("tcp_floor_sender_cpu_us_per_client", floor.sender_cpu_us_per_client, "us"),
    ]);
    Ok(Report {
        bench: "api",
        params: json!({
            "assets": args.assets,
            "connections": args.connections,
            "seconds": args.seconds,
            "requests": load.requests,
            "wrk": wrk.is_some(),
            "ws_clients": args.ws_clients,
            "ws_events": args.ws_events,
            "ws_interval_ms": args.ws_interval_ms,
            "server_threads": args.server_threads,
            "load_threads": 2,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        }),
        figures,
    })
}

struct Load {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    errors: u64,
    body_bytes: usize,
}

/// Keep-alive HTTP/1.1 connections, one request in flight each.
async fn http_load(addr: SocketAddr, args: &Args) -> anyhow::Result<Load> {
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(args.seconds.max(1));
    let start = Instant::now();
    let measure_from = start + warmup;
    let measure_until = measure_from + measure;
    let mut tasks = Vec::new();
    for _ in 0..args.connections.max(1) {
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let request = format!("GET /api/mesh/prices HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            let mut buffer = Vec::with_capacity(64 * 1024);
            let (mut errors, mut body_bytes) = (0u64, 0usize);
            loop {
                let sent = Instant::now();
                if sent >= measure_until {
                    break;
                }
                stream.write_all(request.as_bytes()).await?;
                let (status, body) = read_response(&mut stream, &mut buffer).await?;
                let took = sent.elapsed();
                if status != 200 {
                    errors += 1;
                }
                body_bytes = body;
                if sent >= measure_from {
                    histogram.record(took.as_micros().max(1) as u64)?;
                }
            }
            anyhow::Ok((histogram, errors, body_bytes))
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut errors, mut body_bytes) = (0, 0);
    for task in tasks {
        let (histogram, e, b) = task.await??;
        total.add(histogram)?;
        errors += e;
        body_bytes = b;
    }
    let requests = total.len();
    Ok(Load {
        rate: per_sec(requests as usize, measure),
        p50_us: total.value_at_quantile(0.50) as f64,
        p99_us: total.value_at_quantile(0.99) as f64,
        requests,
        errors,
        body_bytes,
    })
}

/// Reads one response (`Content-Length` bodies only, as the API sends for JSON); returns the
/// status and the body length. `buffer` keeps bytes of the next response, if any.
async fn read_response(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> anyhow::Result<(u16, usize)> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end])?;
            let status: u16 = head.get(9..12).unwrap_or("0").parse()?;
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .ok_or_else(|| anyhow::anyhow!("response without Content-Length"))?;
            let total = end + 4 + length;
            while buffer.len() < total {
                let n = stream.read(&mut chunk).await?;
                anyhow::ensure!(n > 0, "connection closed mid-response");
                buffer.extend_from_slice(&chunk[..n]);
            }
            buffer.drain(..total);
            return Ok((status, length));
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Runs `wrk --latency` with as many connections when it is installed.
fn run_wrk(addr: SocketAddr, args: &Args) -> anyhow::Result<Option<Load>> {
    let found = std::process::Command::new("sh").args(["-c", "command -v wrk"]).output()?;
    if !found.status.success() {
        return Ok(None);
    }
    let output = std::process::Command::new("wrk")
        .args(["--latency", "-t", "2", "-c"])
        .arg(args.connections.max(2).to_string())
        .arg("-d")
        .arg(format!("{}s", args.seconds.max(1)))
        .arg(format!("http://{addr}/api/mesh/prices"))
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |label: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
        let value = line.split_whitespace().nth(1)?;
        let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic())?);
        let number: f64 = number.parse().ok()?;
        Some(match unit {
            "us" => number,
            "ms" => number * 1000.0,
            "s" => number * 1_000_000.0,
            _ => return None,
        })
    };
    let rate = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok());
    match (rate, field("50%"), field("99%")) {
        (Some(rate), Some(p50_us), Some(p99_us)) => {
            Ok(Some(Load { rate, p50_us, p99_us, requests: 0, errors: 0, body_bytes: 0 }))
        }
        _ => anyhow::bail!("could not read wrk's output:\n{text}"),
    }
}

/// Latency quantiles of a histogram of microseconds, in milliseconds.
struct Spread {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Spread {
    fn of(us: &Histogram<u64>) -> Self {
        let ms = |q: f64| us.value_at_quantile(q) as f64 / 1000.0;
        Self { p50_ms: ms(0.50), p99_ms: ms(0.99), max_ms: us.max() as f64 / 1000.0 }
    }
}

struct Fanout {
    latency: Spread,
    delivery: f64,
    /// CPU time of the API server's threads per client per event.
    server_cpu_us_per_client: f64,
}

/// Connects the clients, publishes events with their publish time, collects latencies.
async fn ws_fanout(addr: SocketAddr, args: &Args, node: &BenchNode) -> anyhow::Result<Fanout> {
    let epoch = Instant::now();
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cancel = CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.ws_clients.max(1));
    let mut clients = Vec::new();
    let url = format!("ws://{addr}/api/mesh/ws");
    // tungstenite zero-fills its whole read buffer (128 KiB by default) on every read: with a
    // thousand clients that memset, not the server, would dominate the machine. A price event
    // is a few hundred bytes.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(2 * 1024);
    for _ in 0..args.ws_clients {
        let (socket, _) =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true).await?;
        let (histogram, received, cancel, ready) =
            (histogram.clone(), received.clone(), cancel.clone(), ready_tx.clone());
        clients.push(tokio::spawn(async move {
            let mut socket = socket;
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut count = 0u64;
            // Registered once: the token's waiter list is shared by every client.
            let cancelled = cancel.cancelled();
            tokio::pin!(cancelled);
            loop {
                let message = tokio::select! {
                    () = &mut cancelled => break,
                    m = socket.next() => m,
                };
                let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = message else {
                    continue;
                };
                let text = text.as_str();
                if text.starts_with(r#"{"type":"snapshot""#) {
                    let _ = ready.send(()).await;
                    continue;
                }
                if let Some(sent_us) = published_at(text) {
                    let now_us = epoch.elapsed().as_micros() as u64;
                    local.record(now_us.saturating_sub(sent_us).max(1))?;
                    count += 1;
                }
            }
            histogram.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.add(local)?;
            received.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
            anyhow::Ok(())
        }));
    }
    drop(ready_tx);
    for _ in 0..args.ws_clients {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("not every client got its snapshot within 30 s"))?;
    }
    let server_cpu_start = threads_cpu_time(SERVER_THREADS)?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.ws_interval_ms.max(1)));
    let mut last: HashMap<usize, u32> = HashMap::new();
    for i in 0..args.ws_events {
        tick.tick().await;
        let asset = i % args.assets.max(1);
        let n = last.entry(asset).or_default();
        *n += 1;
        let sent_us = epoch.elapsed().as_micros() as i64;
        let _ =
            node.events.send(Event::Price(price(asset, &format!("{}.{n}", 100 + asset), sent_us)?));
    }
    // Let the last events arrive, then stop the clients.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_cpu = threads_cpu_time(SERVER_THREADS)?.saturating_sub(server_cpu_start);
    cancel.cancel();
    for client in clients {
        client.await??;
    }
    let total = histogram.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let expected = (args.ws_clients * args.ws_events) as f64;
    Ok(Fanout {
        latency: Spread::of(&total),
        delivery: received.load(std::sync::atomic::Ordering::Relaxed) as f64 / expected.max(1.0),
        server_cpu_us_per_client: server_cpu.as_secs_f64() * 1e6 / expected.max(1.0),
    })
}

/// The floor of a fan-out on this machine: the same number of clients, on the same client
/// runtime, reading bare TCP (no HTTP, no WebSocket framing), from two plain sender threads
/// (as many as the API server's workers by default) that write one event of the same size to
/// each socket in turn. Any server has to make at least these system calls; what the API adds
/// on top of this figure is its own cost.
struct Floor {
    latency: Spread,
    /// CPU time of the sender threads per client per event.
    sender_cpu_us_per_client: f64,
}

/// Event size of the floor measurement: about a price event's JSON.
const FLOOR_EVENT: usize = 400;

async fn tcp_floor(args: &Args) -> anyhow::Result<Floor> {
    let clients = args.ws_clients.max(1);
    let senders = args.server_threads.clamp(1, clients);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let accept = std::thread::spawn(move || -> anyhow::Result<Vec<std::net::TcpStream>> {
        let mut accepted = Vec::with_capacity(clients);
        for _ in 0..clients {
            let (stream, _) = listener.accept()?;
            stream.set_nodelay(true)?;
            accepted.push(stream);
        }
        Ok(accepted)
    });
    let epoch = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut stream = TcpStream::connect(addr).await?;
        let events = args.ws_events;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(events);
            let mut event = [0u8; FLOOR_EVENT];
            for _ in 0..events {
                stream.read_exact(&mut event).await?;
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&event[..8]);
                let now_us = epoch.elapsed().as_micros() as u64;
                latencies.push(now_us.saturating_sub(u64::from_le_bytes(sent)).max(1));
            }
            anyhow::Ok(latencies)
        }));
    }
    let accepted =
        accept.join().map_err(|_| anyhow::anyhow!("the floor's accept thread panicked"))??;
    let (interval, events) = (Duration::from_millis(args.ws_interval_ms.max(1)), args.ws_events);
    let chunk = clients.div_ceil(senders);
    let start = std::time::Instant::now();
    let mut threads = Vec::new();
    let mut groups = accepted.into_iter().peekable();
    while groups.peek().is_some() {
        let mut group: Vec<std::net::TcpStream> = groups.by_ref().take(chunk).collect();
        threads.push(std::thread::Builder::new().name("floor-send".into()).spawn(move || {
            use std::io::Write;
            let mut event = [b'x'; FLOOR_EVENT];
            for i in 0..events {
                let due = start + interval * (i as u32 + 1);
                std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                // Every sender stamps the same due time, as one publish would.
                let sent_us = due.duration_since(epoch).as_micros() as u64;
                event[..8].copy_from_slice(&sent_us.to_le_bytes());
                for stream in &mut group {
                    stream.write_all(&event)?;
                }
            }
            thread_cpu_time()
        })?);
    }
    let mut sender_cpu = Duration::ZERO;
    for thread in threads {
        let cpu = thread.join().map_err(|_| anyhow::anyhow!("a floor sender panicked"))??;
        sender_cpu += cpu;
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        let latencies =
            tokio::time::timeout(Duration::from_secs(30), task).await.map_err(|_| {
                anyhow::anyhow!("a floor client did not get every event within 30 s")
            })???;
        for us in latencies {
            total.record(us)?;
        }
    }
    Ok(Floor {
        latency: Spread::of(&total),
        sender_cpu_us_per_client: sender_cpu.as_secs_f64() * 1e6 / (clients * events).max(1) as f64,
    })
}

/// The publish time a benchmark event carries in `timestamp_ms` (microseconds since the
/// start); found by text search, so that the clients do not spend their time parsing JSON.
fn published_at(text: &str) -> Option<u64> {
    if !text.starts_with(r#"{"type":"price""#) {
        return None;
    }
    let at = text.find(r#""timestamp_ms":"#)? + r#""timestamp_ms":"#.len();
    let digits: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
