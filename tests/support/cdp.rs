//! A minimal Chrome DevTools Protocol client for the browser test: launches the machine's
//! headless Chromium with a fresh profile, opens one page and drives it (navigate, evaluate
//! JavaScript, screenshots) over the DevTools WebSocket. Only loopback addresses are used.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The Chromium program: `MESH_CHROMIUM`, else the first of `chromium`, `chromium-browser`,
/// `google-chrome` found on `PATH`.
pub fn chromium_path() -> anyhow::Result<std::path::PathBuf> {
    if let Ok(path) = std::env::var("MESH_CHROMIUM") {
        return Ok(path.into());
    }
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&dirs) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "Chromium is not installed: scripts/test installs Debian's chromium (apt-get install chromium)"
    )
}

/// A headless Chromium with one page attached.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Launches Chromium with the flags of issue 7 and a fresh `--user-data-dir`.
    pub async fn launch() -> anyhow::Result<Self> {
        let exe = chromium_path()?;
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stderr = child.stderr.take().context("chromium stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let find = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(at) = line.find("ws://") {
                    return Ok(line[at..].trim().to_owned());
                }
            }
            bail!("chromium exited without a DevTools address")
        };
        let url = tokio::time::timeout(Duration::from_secs(30), find)
            .await
            .context("chromium printed no DevTools address within 30 s")??;
        // Keep draining stderr so that Chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .with_context(|| format!("connecting to DevTools at {url}"))?;
        let mut browser =
            Self { child, _profile: profile, socket, session: String::new(), next_id: 0 };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" })).await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = browser
            .call("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true }))
            .await?;
        browser.session = attached["sessionId"].as_str().context("sessionId")?.to_owned();
        Ok(browser)
    }

    /// Sends a command (to the page once attached) and waits for its result.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket.send(Message::text(message.to_string())).await?;
        let answer = async {
            while let Some(frame) = self.socket.next().await {
                let Message::Text(text) = frame? else { continue };
                let value: Value = serde_json::from_str(text.as_str())?;
                if value["id"].as_u64() == Some(id) {
                    if let Some(error) = value.get("error") {
                        bail!("{method} failed: {error}");
                    }
                    return Ok(value["result"].clone());
                }
            }
            bail!("DevTools connection closed")
        };
        tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .with_context(|| format!("{method}: no answer within 30 s"))?
    }

    /// Loads `url` in the page.
    pub async fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        let result = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = result.get("errorText") {
            bail!("navigating to {url}: {error}");
        }
        Ok(())
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(details) = result.get("exceptionDetails") {
            bail!("{expression} threw: {details}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Evaluates `expression` every 50 ms until it is truthy (not `false`, `null`, `0` or
    /// `""`), and returns that value.
    pub async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.eval(expression).await?;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting until {what} ({expression} = {value})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sets the viewport (CSS pixels); `mobile` emulates a phone.
    pub async fn viewport(&mut self, width: u32, height: u32, mobile: bool) -> anyhow::Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await?;
        Ok(())
    }

    /// Saves a PNG of the page (the whole page, not only the viewport).
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await?;
        let data = shot["data"].as_str().context("screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Closes the browser and waits for it to exit.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let _ = self.socket.close(None).await;
        self.child.kill().await?;
        Ok(())
    }
}
