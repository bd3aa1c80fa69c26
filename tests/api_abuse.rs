//! mesh-api under abuse, over real HTTP against a node stand-in behind a real mesh-ipc socket:
//! oversized bodies, malformed requests, slow clients (slowloris) and 10,000 WebSocket
//! subscriptions from one client. Client errors get 4xx (with the JSON envelope wherever the
//! request reaches the router), never 5xx; slow clients are cut off; memory stays bounded; and
//! a normal client keeps getting prompt answers throughout.
//!
//! The figures (latencies, RSS) are printed for docs/reliability-fuzzing-and-abuse.md; run with
//! `--nocapture` to see them. The bounds asserted are generous: they catch unbounded growth
//! and starvation, not a slow machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use mesh_tests::api::{FakeNode, NodeSocket, price, start_api};
use mesh_tests::eventually;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

fn book() -> Vec<mesh_ipc::PriceView> {
    vec![
        price("solana", "So11111111111111111111111111111111111111112", "150.5"),
        price("solana", "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263", "0.000016"),
        price("ethereum", "USDC", "0.9998"),
    ]
}

/// Resident memory of this process (the API server, the node stand-in and the test's own
/// clients all live here), from /proc/self/status.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

const MIB: u64 = 1024 * 1024;

/// An answer read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    /// The JSON envelope of an error: `{"success": false, "error": "..."}`.
    fn assert_error_envelope(&self, what: &str) {
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/json"),
            "{what}: {} without the JSON envelope",
            self.status
        );
        let body: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {:?}", self.body));
        assert_eq!(body["success"], false, "{what}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {body}");
    }
}

/// Sends `request` as it is on a fresh connection and reads the answer until the server
/// closes (the requests say `Connection: close`), within 10 s.
async fn raw(addr: SocketAddr, request: &[u8]) -> Answer {
    raw_or_closed(addr, request)
        .await
        .unwrap_or_else(|| panic!("no HTTP answer to {:?}", String::from_utf8_lossy(request)))
}

/// Like [`raw`], `None` when the server closed without an answer. Reads until the server
/// closes or the answer is complete: its `Content-Length` is in, or it is a stream (101 or
/// Server-Sent Events), whose head is enough.
async fn raw_or_closed(addr: SocketAddr, request: &[u8]) -> Option<Answer> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
            assert!(bytes.len() < 4 << 20, "answer larger than 4 MiB");
            if answer_complete(&bytes) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the server answered");
    if bytes.is_empty() {
        return None;
    }
    Some(parse_answer(&bytes).unwrap_or_else(|| panic!("not an HTTP answer: {bytes:?}")))
}

fn answer_complete(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    if head.starts_with("http/1.1 101") || head.contains("text/event-stream") {
        return true;
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| bytes.len() >= end + 4 + len)
}

fn parse_answer(bytes: &[u8]) -> Option<Answer> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut content_type = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_owned());
        }
        if name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = bytes[end + 4..].to_vec();
    if chunked {
        // A stream's answer may end mid-chunk: keep what is complete.
        let mut plain = Vec::new();
        let mut rest = &body[..];
        while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
            let text = std::str::from_utf8(&rest[..line_end]).ok()?;
            let size = usize::from_str_radix(text, 16).ok()?;
            let Some(chunk) = rest.get(line_end + 2..line_end + 2 + size) else { break };
            if size == 0 {
                break;
            }
            plain.extend_from_slice(chunk);
            let Some(next) = rest.get(line_end + 4 + size..) else { break };
            rest = next;
        }
        body = plain;
    }
    Some(Answer { status, content_type, body })
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n").into_bytes()
}

fn post(path: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// One normal request's time, with its own connection.
async fn timed_status(client: &reqwest::Client, base: &str) -> Duration {
    let started = Instant::now();
    let response = client.get(format!("{base}/api/mesh/network/status")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    started.elapsed()
}

fn fresh_connections() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn ready(base: &str) {
    eventually("the API is ready", Duration::from_secs(10), async || {
        reqwest::get(format!("{base}/readyz")).await.is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn oversized_bodies_get_413_with_the_envelope_before_they_are_read() {
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let addr = api.local_addr();
    let base = format!("http://{addr}");
    ready(&base).await;

    for path in ["/api/mesh/provider/enable", "/api/mesh/provider/disable"] {
        for size in [16 * 1024 + 1, 64 * 1024, 1024 * 1024] {
            let body = format!(r#"{{"api_key": "{}"}}"#, "k".repeat(size));
            let answer = raw(addr, &post(path, "", body.as_bytes())).await;
            assert_eq!(answer.status, 413, "{path} with {size} bytes");
            answer.assert_error_envelope(&format!("{path} with {size} bytes"));
        }
    }
    // A length announced far beyond the limit is refused on the header alone: the server
    // neither waits for the terabyte nor reads it.
    let started = Instant::now();
    let mut request = post("/api/mesh/provider/enable", "", b"");
    let announced = String::from_utf8(request.clone())
        .unwrap()
        .replace("Content-Length: 0", "Content-Length: 1099511627776");
    request = announced.into_bytes();
    let answer = raw(addr, &request).await;
    assert_eq!(answer.status, 413);
    answer.assert_error_envelope("1 TiB announced");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    // A chunked body (no length announced) that grows past the limit.
    let mut request = b"POST /api/mesh/provider/enable HTTP/1.1\r\nHost: mesh\r\n\
        Connection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..8 {
        request.extend_from_slice(format!("{:x}\r\n{}\r\n", 4096, "k".repeat(4096)).as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(addr, &request).await;
    assert_eq!(answer.status, 413);
    answer.assert_error_envelope("a chunked body of 32 KiB");
    // Just under the limit is read and judged on its content.
    let body = format!(r#"{{"api_key": "{}"}}"#, "k".repeat(16 * 1024 - 20));
    let answer = raw(addr, &post("/api/mesh/provider/enable", "", body.as_bytes())).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(raw(addr, &get("/api/mesh/prices")).await.status, 200);
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn malformed_json_query_strings_and_requests_get_4xx_never_5xx() {
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api = start_api(node.path(), |c| c.api_token = Some("s3cret".into())).await.unwrap();
    let addr = api.local_addr();
    let base = format!("http://{addr}");
    ready(&base).await;
    let auth = "Authorization: Bearer s3cret\r\n";
    let ws_headers = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    // Requests that reach the router: the answer is a 4xx with the JSON envelope (or a 2xx
    // when a lenient decoder made sense of it).
    let mut routed: Vec<(String, Vec<u8>)> = Vec::new();
    for query in [
        "blockchain=%ZZ",
        "blockchain=%FF%FE",
        "blockchain=a&blockchain=b",
        "asset=x&asset=y",
        "blockchain[]=solana",
        "&&&=&=&",
        "%00=%00",
        "blockchain=%00%0A%0D",
        "asset=%F0%9F%92%A9",
        "blockchain=",
        "=solana",
        "a=b=c",
    ] {
        for path in ["/api/mesh/prices", "/api/mesh/prices/USDC", "/api/mesh/stream"] {
            let target = format!("{path}?{query}");
            routed.push((format!("GET {target}"), get(&target)));
        }
        let target = format!("/api/mesh/ws?{query}");
        let request = format!("GET {target} HTTP/1.1\r\nHost: mesh\r\n{ws_headers}\r\n");
        routed.push((format!("WebSocket {target}"), request.into_bytes()));
    }
    let long_query = format!("/api/mesh/prices?blockchain={}", "a".repeat(20_000));
    routed.push(("a 20 KB query".into(), get(&long_query)));
    for path in [
        "/api/mesh/prices/%FF",
        "/api/mesh/prices/%ZZ",
        "/api/mesh/prices/%00",
        "/api/mesh/prices/a%2Fb",
        "/api/mesh/prices/..%2F..%2Fetc%2Fpasswd",
        "/api/mesh/prices//",
        "/api/mesh/../../etc/passwd",
        "/api/mesh/network/status/extra",
        "/%2e%2e/",
    ] {
        routed.push((format!("GET {path}"), get(path)));
    }
    let deep = "[".repeat(10_000);
    let mut bodies: Vec<Vec<u8>> = [
        r#"{"api_key": "#,
        r#"{"api_key": "\ud800"}"#,
        r#"{"api_key": "x", "api_key": "y"}"#,
        r#"{"api_key": null}"#,
        r#"{"api_key": ["x"]}"#,
        r#"{"api_key": {"$ne": ""}}"#,
        r#"{"api_key": 1e999}"#,
        r#"{"api_key": "k\u00e9y"}"#,
        r#"{"api_key": "k\u0007y"}"#,
        r#"[]"#,
        r#""api_key""#,
        "\u{0}",
        deep.as_str(),
    ]
    .iter()
    .map(|b| b.as_bytes().to_vec())
    .collect();
    bodies.push(vec![0xff, 0xfe, b'{', 0x80]);
    bodies.push(b"{\"api_key\": \"\xff\xfe\"}".to_vec());
    for body in &bodies {
        let what =
            format!("POST enable {:?}", String::from_utf8_lossy(&body[..body.len().min(40)]));
        routed.push((what, post("/api/mesh/provider/enable", auth, body)));
    }
    routed.push((
        "a bearer token that is not text".into(),
        post("/api/mesh/provider/disable", "Authorization: Bearer \u{e9}\r\n", b""),
    ));
    let mut latin1 = post("/api/mesh/provider/disable", "Authorization: Bearer XX\r\n", b"");
    let at = latin1.windows(2).position(|w| w == b"XX").unwrap();
    latin1[at] = 0xe9;
    latin1[at + 1] = 0xff;
    routed.push(("a bearer token with bytes above 0x7f".into(), latin1));
    routed.push(("an unknown method".into(), get("/api/mesh/prices").replace_text("GET", "BREW")));
    routed.push(("DELETE".into(), get("/api/mesh/prices").replace_text("GET", "DELETE")));
    routed.push(("POST to a GET route".into(), post("/api/mesh/prices", "", b"{}")));
    routed.push(("GET the WebSocket route".into(), get("/api/mesh/ws")));

    let (mut client_errors, mut accepted) = (0, 0);
    for (what, request) in &routed {
        let answer = raw(addr, request).await;
        assert!(
            answer.status < 500,
            "{what}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        if answer.status >= 400 {
            answer.assert_error_envelope(what);
            client_errors += 1;
        } else {
            accepted += 1;
        }
    }
    eprintln!(
        "api malformed: {} requests, {client_errors} 4xx, {accepted} 2xx, 0 5xx",
        routed.len()
    );
    assert!(client_errors >= routed.len() / 2, "most of these are client errors");

    // Requests hyper refuses before the router (no envelope there): still 4xx, never 5xx.
    let refused: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01\x02\x03 garbage\r\n\r\n".to_vec()),
        ("a header without a colon", b"GET / HTTP/1.1\r\nHost: mesh\r\nnocolon\r\n\r\n".to_vec()),
        (
            "a length that is not a number",
            post("/api/mesh/provider/enable", "", b"")
                .replace_text("Content-Length: 0", "Content-Length: abc"),
        ),
        ("two lengths", post("/api/mesh/provider/enable", "Content-Length: 5\r\n", b"")),
        (
            "a length and chunked",
            post("/api/mesh/provider/enable", "Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        ),
        ("a 64 KB query", get(&format!("/api/mesh/prices?asset={}", "a".repeat(64 * 1024)))),
        ("200 headers", {
            let mut r = b"GET /api/mesh/prices HTTP/1.1\r\nHost: mesh\r\n".to_vec();
            for i in 0..200 {
                r.extend_from_slice(format!("X-H{i}: {i}\r\n").as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            r
        }),
        ("a bad version", b"GET / HTTP/9.9\r\nHost: mesh\r\n\r\n".to_vec()),
    ];
    for (what, request) in &refused {
        let answer = raw(addr, request).await;
        assert!((400..500).contains(&answer.status), "{what}: {}", answer.status);
    }
    // An HTTP/2 preface on this HTTP/1 server: hyper closes without an answer (no 505).
    let preface = raw_or_closed(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert!(preface.as_ref().is_none_or(|a| (400..500).contains(&a.status)), "{preface:?}");

    let answer = raw(addr, &get("/api/mesh/prices")).await;
    assert_eq!(answer.status, 200, "the server still answers");
    api.shutdown(Duration::from_secs(5)).await;
}

/// Byte-level text replacement for raw requests.
trait ReplaceText {
    fn replace_text(self, from: &str, to: &str) -> Vec<u8>;
}

impl ReplaceText for Vec<u8> {
    fn replace_text(self, from: &str, to: &str) -> Vec<u8> {
        String::from_utf8(self).unwrap().replacen(from, to, 1).into_bytes()
    }
}

/// The two load tests run one at a time: each measures this process's resident memory and
/// tail latency, and both ends of thousands of connections live in it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_never_starve_the_others() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const SLOW: usize = 800;
    let header_read_timeout = Duration::from_secs(2);
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api = start_api(node.path(), |c| {
        c.header_read_timeout = header_read_timeout;
        // Fewer slots than slow clients: they must not be able to take them all for good.
        c.max_request_connections = 512;
    })
    .await
    .unwrap();
    let addr = api.local_addr();
    let base = format!("http://{addr}");
    ready(&base).await;
    let normal = fresh_connections();
    for _ in 0..20 {
        timed_status(&normal, &base).await;
    }
    let rss_before = rss_bytes();

    // Slowloris: each client sends a request line, then one header byte every 100 ms, never
    // finishing; it stops when the server closes on it (or after 15 s, which fails the test).
    // Clients connect in waves of 100, below the listen backlog (128 here): a burst beyond it
    // leaves connections the kernel dropped on the server side while the client believes
    // them open, which would measure the kernel's queue rather than the server.
    // Silent clients: connect and say nothing at all.
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let closed_after = Arc::new(std::sync::Mutex::new(Vec::with_capacity(SLOW)));
    let mut slow = Vec::with_capacity(SLOW);
    for i in 0..SLOW {
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let closed_after = closed_after.clone();
        slow.push(tokio::spawn(async move {
            let started = Instant::now();
            let Ok(mut stream) = TcpStream::connect(addr).await else { return };
            let _ =
                stream.write_all(b"GET /api/mesh/prices HTTP/1.1\r\nHost: mesh\r\nX-Slow: ").await;
            let mut buf = [0u8; 1024];
            let deadline = started + Duration::from_secs(15);
            while Instant::now() < deadline {
                tokio::select! {
                    read = stream.read(&mut buf) => {
                        if matches!(read, Ok(0) | Err(_)) { break; }
                    }
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if stream.write_all(b"a").await.is_err() { break; }
                    }
                }
            }
            closed_after.lock().unwrap().push(started.elapsed());
        }));
    }

    // Meanwhile a normal client asks every 50 ms on a new connection.
    let mut latencies = Vec::new();
    let mut rss_peak = rss_bytes();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        latencies.push(timed_status(&normal, &base).await);
        rss_peak = rss_peak.max(rss_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in slow {
        tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap();
    }
    let mut closed_after = closed_after.lock().unwrap().clone();
    closed_after.sort();
    let closed = futures::future::join_all(silent.iter_mut().map(|stream| async move {
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(8), stream.read(&mut byte)).await.is_ok()
    }))
    .await;
    let silent_open = closed.iter().filter(|closed| !**closed).count();

    latencies.sort();
    let (p50, p99, max) =
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99), *latencies.last().unwrap());
    let longest_slow = *closed_after.last().unwrap();
    eprintln!(
        "api slowloris: {SLOW} slow + 100 silent connections; normal GET p50 {p50:?} p99 {p99:?} \
         max {max:?} over {} requests; slow clients closed after at most {longest_slow:?} \
         (header_read_timeout {header_read_timeout:?}); RSS {} MiB -> peak {} MiB",
        latencies.len(),
        rss_before / MIB,
        rss_peak / MIB
    );
    assert_eq!(closed_after.len(), SLOW, "every slow client finished");
    assert!(
        longest_slow < header_read_timeout + Duration::from_secs(5),
        "a slow client was held {longest_slow:?}"
    );
    assert_eq!(silent_open, 0, "silent connections are closed too");
    assert!(max < Duration::from_secs(2), "a normal request took {max:?} during the slowloris");
    assert!(
        rss_peak.saturating_sub(rss_before) < 200 * MIB,
        "RSS grew {} MiB",
        rss_peak.saturating_sub(rss_before) / MIB
    );
    assert!(!api.node_connected() || timed_status(&normal, &base).await < Duration::from_secs(2));
    api.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_websocket_subscriptions_from_one_client_stay_within_the_limit() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const ATTEMPTS: usize = 10_000;
    // Below the default (10,000) only to keep this process under its file-descriptor limit:
    // both ends of every connection live here.
    const LIMIT: usize = 4_000;
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    // Every connection comes from 127.0.0.1: the per-address share is lifted to test the
    // total (the per-address limit has its own test above).
    let api = start_api(node.path(), |c| {
        c.max_stream_clients = LIMIT;
        c.max_streams_per_address = ATTEMPTS;
    })
    .await
    .unwrap();
    let addr = api.local_addr();
    let base = format!("http://{addr}");
    ready(&base).await;
    let normal = fresh_connections();
    let rss_before = rss_bytes();

    let refused = Arc::new(AtomicUsize::new(0));
    let refused_with_envelope = Arc::new(AtomicUsize::new(0));
    let mut open = Vec::with_capacity(LIMIT);
    let mut latencies = Vec::new();
    let started = Instant::now();
    // In waves of 100 concurrent handshakes, with a normal request between waves.
    for wave in 0..ATTEMPTS / 100 {
        let mut handshakes = Vec::with_capacity(100);
        for _ in 0..100 {
            let (refused, refused_with_envelope) = (refused.clone(), refused_with_envelope.clone());
            handshakes.push(tokio::spawn(async move {
                let url = format!("ws://{addr}/api/mesh/ws");
                match tokio_tungstenite::connect_async(url).await {
                    Ok((socket, _)) => Some(socket),
                    Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                        assert_eq!(response.status(), 503);
                        refused.fetch_add(1, Ordering::Relaxed);
                        let body: Value =
                            serde_json::from_slice(response.body().as_deref().unwrap_or(b""))
                                .unwrap();
                        if body["success"] == false
                            && body["error"].as_str().unwrap().contains("too many stream clients")
                        {
                            refused_with_envelope.fetch_add(1, Ordering::Relaxed);
                        }
                        None
                    }
                    Err(e) => panic!("handshake failed: {e}"),
                }
            }));
        }
        for handshake in handshakes {
            if let Some(socket) = handshake.await.unwrap() {
                open.push(socket);
            }
        }
        if wave % 10 == 0 {
            latencies.push(timed_status(&normal, &base).await);
        }
    }
    let elapsed = started.elapsed();
    let rss_open = rss_bytes();
    let refused = refused.load(Ordering::Relaxed);
    assert_eq!(open.len(), LIMIT, "exactly the limit is served");
    assert_eq!(refused, ATTEMPTS - LIMIT, "the rest is refused with 503");
    assert_eq!(refused_with_envelope.load(Ordering::Relaxed), refused, "503 with the envelope");
    assert_eq!(api.stream_clients().len(), LIMIT);

    // The open ones are live: a sample gets its snapshot and then a new price.
    node.node.set_price(price("solana", "NEW", "1.5"));
    for socket in open.iter_mut().step_by(LIMIT / 40) {
        let mut saw_new = false;
        let read = async {
            while let Some(Ok(message)) = socket.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = message
                    && text.contains("\"NEW\"")
                {
                    saw_new = true;
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read).await.unwrap();
        assert!(saw_new);
    }
    latencies.push(timed_status(&normal, &base).await);

    // Closing them frees every slot.
    for mut socket in open.drain(..) {
        let _ = socket.close(None).await;
    }
    eventually("every stream client is gone", Duration::from_secs(20), async || {
        api.stream_clients().is_empty()
    })
    .await
    .unwrap();
    let after = tokio_tungstenite::connect_async(format!("ws://{addr}/api/mesh/ws")).await;
    assert!(after.is_ok(), "a new client is served again");

    latencies.sort();
    let delta = rss_open.saturating_sub(rss_before);
    eprintln!(
        "api websockets: {ATTEMPTS} attempts in {elapsed:?}: {LIMIT} served, {refused} refused \
         with 503; RSS {} MiB -> {} MiB with {LIMIT} open (both ends in this process: {} KiB \
         per connection); normal GET max {:?} over {} requests",
        rss_before / MIB,
        rss_open / MIB,
        delta / 1024 / LIMIT as u64,
        latencies.last().unwrap(),
        latencies.len()
    );
    assert!(delta < 400 * MIB, "RSS grew {} MiB with {LIMIT} WebSockets", delta / MIB);
    assert!(*latencies.last().unwrap() < Duration::from_secs(2));
    api.shutdown(Duration::from_secs(10)).await;
}

/// What a page of another site can make an operator's browser send (a form, a `text/plain`
/// fetch, any fetch with its `Origin`) is refused on the state-changing endpoints, with the
/// JSON envelope; the guide's curl commands (JSON, no `Origin`), the API's own page
/// (same origin) and configured origins pass. Before, the enable endpoint read the raw bytes
/// whatever their type: a cross-site `text/plain` form switched the node into provider mode.
#[tokio::test]
async fn cross_site_requests_to_state_changing_endpoints_are_refused() {
    let fake = FakeNode::new(book());
    let node = NodeSocket::start(fake.clone()).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let allowing = start_api(node.path(), |c| {
        c.allowed_origins = vec!["https://dash.example".into()];
    })
    .await
    .unwrap();
    let addr = api.local_addr();
    ready(&format!("http://{addr}")).await;
    ready(&format!("http://{}", allowing.local_addr())).await;
    let key = br#"{"api_key": "k-from-a-form"}"#;
    let with_type = |path: &str, content_type: &str, extra: &str, body: &[u8]| {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    };
    let untyped = |path: &str, body: &[u8]| {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    };
    for path in ["/api/mesh/provider/enable", "/api/mesh/provider/disable"] {
        for (what, request, status) in [
            ("text/plain", with_type(path, "text/plain", "", key), 415),
            (
                "a form",
                with_type(path, "application/x-www-form-urlencoded", "", b"api_key=k-from-a-form"),
                415,
            ),
            ("multipart", with_type(path, "multipart/form-data; boundary=x", "", key), 415),
            ("a body without a type", untyped(path, key), 415),
            (
                "another site's fetch",
                with_type(path, "application/json", "Origin: https://evil.example\r\n", key),
                403,
            ),
            ("an opaque origin", with_type(path, "application/json", "Origin: null\r\n", key), 403),
            (
                "a look-alike host",
                with_type(path, "application/json", "Origin: http://mesh.evil.example\r\n", key),
                403,
            ),
        ] {
            let answer = raw(addr, &request).await;
            assert_eq!(answer.status, status, "{path}, {what}: {:?}", answer.body);
            answer.assert_error_envelope(&format!("{path}, {what}"));
        }
    }
    assert!(fake.keys.lock().unwrap().is_empty(), "no refused request reached the node");
    // What passes: the guide's curl, the API's own page, a typed charset, a bare disable.
    for (what, request) in [
        ("the guide's curl", post("/api/mesh/provider/enable", "", key)),
        ("the API's own page", post("/api/mesh/provider/enable", "Origin: http://mesh\r\n", key)),
        (
            "JSON with a charset",
            with_type("/api/mesh/provider/enable", "application/json; charset=utf-8", "", key),
        ),
        ("a disable without a body", untyped("/api/mesh/provider/disable", b"")),
        ("a disable with {}", post("/api/mesh/provider/disable", "", b"{}")),
    ] {
        let answer = raw(addr, &request).await;
        assert_eq!(answer.status, 200, "{what}: {:?}", String::from_utf8_lossy(&answer.body));
    }
    // An origin the operator allowed.
    let dash = post("/api/mesh/provider/enable", "Origin: https://dash.example\r\n", key);
    assert_eq!(raw(allowing.local_addr(), &dash).await.status, 200);
    let other = post("/api/mesh/provider/enable", "Origin: https://evil.example\r\n", key);
    assert_eq!(raw(allowing.local_addr(), &other).await.status, 403);
    api.shutdown(Duration::from_secs(5)).await;
    allowing.shutdown(Duration::from_secs(5)).await;
}

/// Opens an SSE stream and reads its head; the connection stays open while the stream lives.
async fn open_sse(addr: SocketAddr, extra_headers: &str) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /api/mesh/stream HTTP/1.1\r\nHost: mesh\r\nAccept: text/event-stream\r\n\
         {extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the head: {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    (status, stream)
}

/// One address cannot take every stream slot: past `MESH_API_MAX_STREAMS_PER_ADDRESS` it gets
/// 429 while others still get streams. Behind a trusted proxy (loopback by default) the address
/// is the client the proxy names in `X-Forwarded-For`; from any other peer the header is
/// ignored.
#[tokio::test]
async fn streams_are_limited_per_client_address() {
    let node = NodeSocket::start(FakeNode::new(book())).await.unwrap();
    let api = start_api(node.path(), |c| c.max_streams_per_address = 2).await.unwrap();
    let untrusting = start_api(node.path(), |c| {
        c.max_streams_per_address = 2;
        c.trusted_proxies = Vec::new();
    })
    .await
    .unwrap();
    let addr = api.local_addr();
    ready(&format!("http://{addr}")).await;
    let client_a = "X-Forwarded-For: 203.0.113.9, 198.51.100.1\r\n";
    let client_b = "X-Forwarded-For: 198.51.100.2\r\n";
    let (first, _a1) = open_sse(addr, client_a).await;
    let (second, a2) = open_sse(addr, client_a).await;
    assert_eq!((first, second), (200, 200));
    // The client's own claim (203.0.113.9) is not what counts: the proxy's entry is.
    let third = raw(addr, &get_with("/api/mesh/stream", client_a)).await;
    assert_eq!(third.status, 429);
    third.assert_error_envelope("a third stream from one address");
    let (other, _b) = open_sse(addr, client_b).await;
    assert_eq!(other, 200, "another address still gets a stream");
    // A stream that ends frees its share.
    drop(a2);
    eventually("the closed stream leaves", Duration::from_secs(10), async || {
        api.stream_clients().len() == 2
    })
    .await
    .unwrap();
    let (again, _a3) = open_sse(addr, client_a).await;
    assert_eq!(again, 200);

    // Without trusted proxies every connection from here is 127.0.0.1, whatever it claims.
    let addr = untrusting.local_addr();
    let (one, _u1) = open_sse(addr, client_a).await;
    let (two, _u2) = open_sse(addr, client_b).await;
    assert_eq!((one, two), (200, 200));
    let refused = raw(addr, &get_with("/api/mesh/stream", "X-Forwarded-For: 192.0.2.50\r\n")).await;
    assert_eq!(refused.status, 429);
    api.shutdown(Duration::from_secs(5)).await;
    untrusting.shutdown(Duration::from_secs(5)).await;
}

fn get_with(path: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n{extra_headers}\r\n")
        .into_bytes()
}

/// An SSE client that stops reading is closed once the server could not write to it for the
/// write timeout, and its slot is freed. Before, only a backlog of more than `client_buffer`
/// distinct updates closed one: with a book of fewer assets, updates conflate, and a stalled
/// client held its slot and socket buffers for as long as its connection lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_client_that_stops_reading_is_closed_by_the_write_timeout() {
    let fake = FakeNode::new(book());
    let node = NodeSocket::start(fake.clone()).await.unwrap();
    let api =
        start_api(node.path(), |c| c.client_write_timeout = Duration::from_secs(1)).await.unwrap();
    let addr = api.local_addr();
    ready(&format!("http://{addr}")).await;
    // A small receive window, and never a read after the head.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    stalled
        .write_all(
            b"GET /api/mesh/stream HTTP/1.1\r\nHost: mesh\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
    eventually("the stalled client is registered", Duration::from_secs(10), async || {
        api.stream_clients().len() == 1
    })
    .await
    .unwrap();
    // 500 assets with 255-character names, updated over and over: about 350 KB a round, and
    // never more than 500 distinct updates pending (far below `client_buffer`).
    let feeding = tokio::spawn({
        let fake = fake.clone();
        async move {
            for round in 0..200u32 {
                for i in 0..500 {
                    let name = format!("{i:0>255}");
                    fake.emit(mesh_ipc::Event::Price(price(
                        "solana",
                        &name,
                        &format!("{round}.5"),
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    eventually("the stalled client is closed", Duration::from_secs(60), async || {
        api.stream_clients().is_empty()
    })
    .await
    .unwrap();
    feeding.abort();
    drop(stalled);
    api.shutdown(Duration::from_secs(5)).await;
}

/// A node whose book is at its limit (100,000 assets, `BookConfig::max_assets`, each named
/// with 255 characters) is followed and served. Its snapshot is about 60 MB of JSON: as one
/// IPC frame it exceeded the 16 MiB limit, the API's subscription failed on every attempt and
/// every read answered 503, for as long as the book stayed that large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_book_at_its_maximum_is_served_not_503() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let book: Vec<mesh_ipc::PriceView> =
        (0..100_000).map(|i| price("solana", &format!("{i:0>255}"), "1.5")).collect();
    let node = NodeSocket::start(FakeNode::new(book)).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    eventually("the API follows the node", Duration::from_secs(60), async || api.node_connected())
        .await
        .unwrap();
    let base = format!("http://{}", api.local_addr());
    let response = reqwest::get(format!("{base}/api/mesh/prices")).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().map(Vec::len), Some(100_000));
    let one = reqwest::get(format!("{base}/api/mesh/prices/{:0>255}", 99_999)).await.unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(reqwest::get(format!("{base}/readyz")).await.unwrap().status(), 200);
    api.shutdown(Duration::from_secs(5)).await;
}
