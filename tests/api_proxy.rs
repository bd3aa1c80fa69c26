//! mesh-api behind a real nginx running the shipped site (`deploy/nginx/mesh-api.conf`), as the
//! guide deploys it: who may switch provider mode, with and without `MESH_API_TOKEN`, and that
//! the read endpoints and the event stream pass through.
//!
//! nginx is Debian's, unpacked by scripts/test into `/var/tmp/mesh-tools` (`MESH_TOOLS_DIR`)
//! when it is not installed; the site is used as shipped, with only its addresses (a loopback
//! port for the HTTPS server, the test API as upstream) and a throwaway certificate put in.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_tests::api::{FakeNode, NodeSocket, price, start_api};
use mesh_tests::eventually;
use serde_json::{Value, json};

/// The nginx binary: on the PATH, or where scripts/test unpacks it.
fn nginx_binary() -> PathBuf {
    let tools = std::env::var("MESH_TOOLS_DIR").unwrap_or_else(|_| "/var/tmp/mesh-tools".into());
    let unpacked = Path::new(&tools).join("nginx/usr/sbin/nginx");
    if unpacked.exists() {
        return unpacked;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.exists());
    on_path.expect("nginx not found: run scripts/test (it unpacks Debian's nginx) or install nginx")
}

/// A free loopback port (bound and released; nginx binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// nginx serving the shipped site on `127.0.0.1:<port>` in front of `upstream`, over HTTPS, or
/// with `tls` false over plain HTTP (the same server block without `ssl` on its listen line:
/// this test's WebSocket client has no TLS); killed on drop.
struct Proxy {
    child: Child,
    port: u16,
    tls: bool,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(upstream: std::net::SocketAddr) -> Proxy {
        Proxy::start_with(upstream, true)
    }

    fn start_with(upstream: std::net::SocketAddr, tls: bool) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("logs")).unwrap();
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=mesh.example.com", "-keyout"])
            .arg(d.join("key.pem"))
            .arg("-out")
            .arg(d.join("cert.pem"))
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed for the proxy's certificate");
        assert!(made.success());
        let (port, plain) = (free_port(), free_port());
        let site = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/mesh-api.conf"),
        )
        .unwrap();
        let replacements = [
            ("server 127.0.0.1:8080;", format!("server {upstream};")),
            (
                "listen 443 ssl http2;",
                format!("listen 127.0.0.1:{port}{};", if tls { " ssl" } else { "" }),
            ),
            ("listen [::]:443 ssl http2;", String::new()),
            ("listen 80;", format!("listen 127.0.0.1:{plain};")),
            ("listen [::]:80;", String::new()),
            ("/etc/ssl/certs/ssl-cert-snakeoil.pem", d.join("cert.pem").display().to_string()),
            ("/etc/ssl/private/ssl-cert-snakeoil.key", d.join("key.pem").display().to_string()),
        ];
        let mut site = site;
        for (from, to) in replacements {
            assert!(site.contains(from), "the shipped site no longer has {from:?}");
            site = site.replace(from, &to);
        }
        std::fs::write(d.join("mesh-api.conf"), site).unwrap();
        let p = d.display();
        std::fs::write(
            d.join("nginx.conf"),
            format!(
                "pid {p}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n    access_log off;\n    \
                 client_body_temp_path {p}/client_body;\n    proxy_temp_path {p}/proxy;\n    \
                 fastcgi_temp_path {p}/fastcgi;\n    uwsgi_temp_path {p}/uwsgi;\n    \
                 scgi_temp_path {p}/scgi;\n    include {p}/mesh-api.conf;\n}}\n"
            ),
        )
        .unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(d)
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .args(["-g", "daemon off; master_process off;"])
            .stdout(Stdio::null())
            .spawn()
            .expect("nginx starts");
        Proxy { child, port, tls, _dir: dir }
    }

    fn base(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "https" } else { "http" }, self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that accepts the throwaway certificate.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request =
        client().post(url).header("content-type", "application/json").body(r#"{"api_key": "k"}"#);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })))
}

async fn wait_ready(base: &str) {
    eventually("the API answers through the proxy", Duration::from_secs(15), async || {
        client().get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap();
}

/// Without a token, the provider POSTs are refused through the proxy (by nginx without an
/// `Authorization` header, by mesh-api with one) and accepted from the box itself; the read
/// endpoints and the event stream pass through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_provider_posts_are_for_the_box_itself() {
    let node =
        NodeSocket::start(FakeNode::new(vec![price("solana", "SOL", "150.5")])).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let proxy = Proxy::start(api.local_addr());
    let (via, direct) = (proxy.base(), format!("http://{}", api.local_addr()));
    wait_ready(&via).await;

    for path in ["/api/mesh/provider/enable", "/api/mesh/provider/disable"] {
        let (status, body) = post(&format!("{via}{path}"), None).await;
        assert_eq!(status, 401, "{path} through the proxy without credentials: {body}");
        assert!(body["error"].as_str().unwrap().contains("MESH_API_TOKEN"), "{body}");
        // With a header nginx passes it on; mesh-api, with no token of its own, sees a
        // proxied request and refuses it too.
        let (status, body) = post(&format!("{via}{path}"), Some("guess")).await;
        assert_eq!(status, 401, "{path} through the proxy with a made-up token: {body}");
        assert!(body["error"].as_str().unwrap().contains("MESH_API_TOKEN"), "{body}");
    }
    // The guide's curl on the box itself.
    let (status, body) = post(&format!("{direct}/api/mesh/provider/enable"), None).await;
    assert_eq!((status, body["data"]["enabled"].clone()), (200, json!(true)), "{body}");
    let (status, _) = post(&format!("{direct}/api/mesh/provider/disable"), None).await;
    assert_eq!(status, 200);

    // Reads and the event stream through the proxy.
    let prices: Value =
        client().get(format!("{via}/api/mesh/prices")).send().await.unwrap().json().await.unwrap();
    assert_eq!(prices["data"][0]["price"], "150.5", "{prices}");
    let status: Value = client()
        .get(format!("{via}/api/mesh/provider/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["success"], true, "{status}");
    let mut stream = client().get(format!("{via}/api/mesh/stream")).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await;
    let chunk = first.expect("an event within 10 s").unwrap().expect("the stream is open");
    let text = String::from_utf8_lossy(&chunk);
    assert!(text.contains("snapshot"), "the stream starts with a snapshot: {text}");
    drop(stream);
    drop(proxy);
    api.shutdown(Duration::from_secs(2)).await;
}

/// With a token, the right one passes through the proxy, a wrong one and a missing one get 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_only_the_right_one_passes_the_proxy() {
    let node =
        NodeSocket::start(FakeNode::new(vec![price("solana", "SOL", "150.5")])).await.unwrap();
    let api = start_api(node.path(), |c| c.api_token = Some("s3cret-token".into())).await.unwrap();
    let proxy = Proxy::start(api.local_addr());
    let via = proxy.base();
    wait_ready(&via).await;

    let enable = format!("{via}/api/mesh/provider/enable");
    let (status, body) = post(&enable, Some("s3cret-token")).await;
    assert_eq!((status, body["data"]["enabled"].clone()), (200, json!(true)), "{body}");
    let (status, body) = post(&enable, Some("wrong")).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = post(&enable, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) =
        post(&format!("{via}/api/mesh/provider/disable"), Some("s3cret-token")).await;
    assert_eq!((status, body["data"]["enabled"].clone()), (200, json!(false)), "{body}");
    // A token binds the box itself too.
    let direct = format!("http://{}/api/mesh/provider/enable", api.local_addr());
    assert_eq!(post(&direct, None).await.0, 401);
    drop(proxy);
    api.shutdown(Duration::from_secs(2)).await;
}

/// The WebSocket passes through the site's `/api/mesh/ws` location (upgrade headers on, the
/// forwarding headers repeated): the first event is the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_passes_through_the_proxy() {
    use futures::StreamExt;
    let node =
        NodeSocket::start(FakeNode::new(vec![price("solana", "SOL", "150.5")])).await.unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let proxy = Proxy::start_with(api.local_addr(), false);
    let via = proxy.base();
    wait_ready(&via).await;
    let url = format!("ws://127.0.0.1:{}/api/mesh/ws", proxy.port);
    let (mut ws, response) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let message = first.expect("an event within 10 s").expect("the socket is open").unwrap();
    let text = message.into_text().unwrap();
    assert!(text.contains("snapshot") && text.contains("150.5"), "{text}");
    drop(ws);
    drop(proxy);
    api.shutdown(Duration::from_secs(2)).await;
}
