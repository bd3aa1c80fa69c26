//! The web page in headless Chromium (Debian's `chromium`; scripts/test installs it), driven
//! over the DevTools protocol: prices appear and update live over the WebSocket, the network
//! panel, discrepancy badges and the stale banner show, and Settings → Mesh Network switches
//! Provider Mode on with a key (a refused key shows the error). Screenshots (desktop and phone)
//! are saved under the target directory and their paths printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use mesh_ipc::{DataFreshness, Discrepancy, Event};
use mesh_tests::api::{
    BAD_KEY, FakeNode, NODE_ID, NodeSocket, PROVIDER_ID, network, price, start_api,
};
use mesh_tests::cdp::Browser;
use mesh_tests::eventually;
use serde_json::Value;

const SOL: &str = "So11111111111111111111111111111111111111112";
const WAIT: Duration = Duration::from_secs(15);

fn js(id: &str) -> String {
    format!("document.getElementById({id:?})")
}

/// Waits until the page shows provider mode on and settled, and returns the status line. The
/// node's provider event may come over the WebSocket before the POST's answer: the wait covers
/// both.
async fn provider_mode_on(browser: &mut Browser) -> serde_json::Value {
    browser
        .wait_for(
            "provider mode on",
            &format!(
                "{0}.dataset.enabled === 'true' && {0}.dataset.state === 'idle' && {0}.textContent",
                js("provider-status")
            ),
            WAIT,
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_live_prices_and_switches_provider_mode_on() {
    let node = NodeSocket::start(FakeNode::new(vec![
        price("solana", SOL, "150.5"),
        price("solana", "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263", "0.000016"),
        price("ethereum", "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2", "3100.25"),
    ]))
    .await
    .unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    eventually("the API follows the node", WAIT, async || api.node_connected()).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mesh-api-browser");

    let mut browser = Browser::launch().await.unwrap();
    browser.viewport(1280, 900, false).await.unwrap();
    browser.navigate(&format!("{base}/")).await.unwrap();

    // Prices appear over the WebSocket, with every column.
    browser
        .wait_for(
            "three price rows",
            "document.querySelectorAll('#prices tbody tr[data-asset]').length === 3",
            WAIT,
        )
        .await
        .unwrap();
    let row = format!("document.querySelector('#prices tbody tr[data-asset=\"{SOL}\"]')");
    let cells = browser
        .eval(&format!(
            "Object.fromEntries([...{row}.querySelectorAll('td')].map(td => [td.dataset.field, td.textContent]))"
        ))
        .await
        .unwrap();
    assert_eq!(cells["price"], "150.5");
    assert_eq!(cells["blockchain"], "solana");
    assert_eq!(cells["change_24h"], "-1.25%");
    assert_eq!(cells["hops"], "1");
    assert_eq!(cells["providers"], "1");
    assert!(cells["age"].as_str().unwrap().ends_with('s'), "{cells}");
    assert!(cells["asset"].as_str().unwrap().starts_with("So1111"), "{cells}");
    assert_eq!(browser.eval(&format!("{}.dataset.state", js("connection"))).await.unwrap(), "live");

    // A new price from the node shows within the wait.
    node.node.set_price(price("solana", SOL, "155.25"));
    browser
        .wait_for(
            "the new SOL price",
            &format!("{row}.querySelector('[data-field=price]').textContent === '155.25'"),
            WAIT,
        )
        .await
        .unwrap();

    // Prices are plain decimals rounded on their digits (issue 33): never `1.2345679e-7`,
    // and no digits of a long price lost to a float.
    let formatted = browser
        .eval(
            "['0.000000123456789123', '99999999.999999999', '123456789012345678901234', \
              '-0.000000123456789123', '149.948082778283', '0.000016'].map(priceText)",
        )
        .await
        .unwrap();
    assert_eq!(
        formatted,
        serde_json::json!([
            "0.00000012345679",
            "100000000",
            "123456790000000000000000",
            "-0.00000012345679",
            "149.94808",
            "0.000016"
        ])
    );
    let bonk = "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263";
    node.node.set_price(price("solana", bonk, "0.000000123456789123"));
    browser
        .wait_for(
            "a tiny price as a plain decimal",
            &format!(
                "document.querySelector('#prices tbody tr[data-asset=\"{bonk}\"] [data-field=price]').textContent === '0.00000012345679'"
            ),
            WAIT,
        )
        .await
        .unwrap();

    // Network panel: peers and providers with their hop counts.
    assert_eq!(browser.eval(&format!("{}.textContent", js("net-peers"))).await.unwrap(), "3");
    assert_eq!(browser.eval(&format!("{}.textContent", js("net-node-id"))).await.unwrap(), NODE_ID);
    let providers = browser
        .eval("[...document.querySelectorAll('#net-providers li')].map(li => [li.dataset.nodeId, li.querySelector('[data-field=hop_count]').textContent])")
        .await
        .unwrap();
    assert_eq!(providers, serde_json::json!([[PROVIDER_ID, "2 hops"]]));

    // A discrepancy puts a badge on the asset.
    node.node.emit(Event::Discrepancy(Discrepancy {
        asset: SOL.into(),
        blockchain: "solana".into(),
        node_a: NODE_ID.parse().unwrap(),
        price_a: "150".parse().unwrap(),
        node_b: PROVIDER_ID.parse().unwrap(),
        price_b: "160".parse().unwrap(),
        difference_percent: "6.67".into(),
        detected_at: "2026-01-01T00:00:00Z".into(),
    }));
    browser
        .wait_for(
            "a discrepancy badge",
            &format!("{row}.querySelector('[data-discrepancy]') !== null"),
            WAIT,
        )
        .await
        .unwrap();

    // Stale data: the banner says how old.
    assert_eq!(browser.eval(&format!("{}.hidden", js("stale-banner"))).await.unwrap(), true);
    let mut stale = network(3);
    stale.data_freshness = DataFreshness::HoursAgo(3);
    node.node.set_network(stale);
    let banner = browser
        .wait_for(
            "the stale banner",
            &format!("!{0}.hidden && {0}.textContent", js("stale-banner")),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(banner, "Data is 3 hours old");
    let desktop = shots.join("prices-desktop.png");
    browser.screenshot(&desktop).await.unwrap();
    println!("screenshot: {}", desktop.display());

    // Settings → Mesh Network: Provider Mode on, a refused key, then a good one.
    browser.eval(&format!("{}.click()", js("tab-settings"))).await.unwrap();
    let title = browser.eval(&format!("{}.textContent", js("settings-title"))).await.unwrap();
    assert_eq!(title, "Settings → Mesh Network");
    assert_eq!(
        browser.eval(&format!("{}.dataset.enabled", js("provider-status"))).await.unwrap(),
        "false"
    );
    browser.eval(&format!("{}.click()", js("provider-toggle"))).await.unwrap();
    browser
        .wait_for("the key form", &format!("!{}.hidden", js("provider-form")), WAIT)
        .await
        .unwrap();
    assert_eq!(
        browser.eval(&format!("{}.textContent", js("provider-enable"))).await.unwrap(),
        "Enable"
    );
    browser
        .eval(&format!("{}.value = {BAD_KEY:?}; {}.click()", js("api-key"), js("provider-enable")))
        .await
        .unwrap();
    let error = browser
        .wait_for(
            "the refusal",
            &format!("{0}.dataset.state === 'error' && {0}.textContent", js("provider-status")),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(error, "Invalid API key");
    browser
        .eval(&format!("{}.value = 'good-key'; {}.click()", js("api-key"), js("provider-enable")))
        .await
        .unwrap();
    let status = provider_mode_on(&mut browser).await;
    assert_eq!(status, "Provider mode is on.");
    assert_eq!(node.node.keys.lock().unwrap().as_slice(), [BAD_KEY, "good-key"]);
    let api_status: Value = reqwest::get(format!("{base}/api/mesh/provider/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api_status["data"]["enabled"], true);

    // Phone-sized: nothing wider than the screen; screenshots of both views.
    browser.viewport(390, 844, true).await.unwrap();
    let overflow =
        browser.eval("document.documentElement.scrollWidth - window.innerWidth").await.unwrap();
    assert!(overflow.as_i64().unwrap() <= 0, "settings overflow the phone screen by {overflow} px");
    let phone_settings = shots.join("settings-phone.png");
    browser.screenshot(&phone_settings).await.unwrap();
    println!("screenshot: {}", phone_settings.display());
    browser.eval(&format!("{}.click()", js("tab-prices"))).await.unwrap();
    let overflow = browser
        .eval("Math.max(document.documentElement.scrollWidth - window.innerWidth, document.getElementById('prices').getBoundingClientRect().right - window.innerWidth)")
        .await
        .unwrap();
    assert!(overflow.as_f64().unwrap() <= 0.0, "prices overflow the phone screen by {overflow} px");
    let phone_prices = shots.join("prices-phone.png");
    browser.screenshot(&phone_prices).await.unwrap();
    println!("screenshot: {}", phone_prices.display());

    // Provider Mode off again from the toggle.
    browser.eval(&format!("{}.click()", js("tab-settings"))).await.unwrap();
    browser.eval(&format!("{}.click()", js("provider-toggle"))).await.unwrap();
    browser
        .wait_for(
            "provider mode off",
            &format!("{}.dataset.enabled === 'false'", js("provider-status")),
            WAIT,
        )
        .await
        .unwrap();
    browser.close().await.unwrap();
    api.shutdown(Duration::from_secs(5)).await;
}

/// With `MESH_API_TOKEN` set, the Provider Mode form asks for the token when the API refuses
/// the POST for want of it, and the same click with the token then switches provider mode on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_the_api_token_when_the_api_needs_one() {
    let node = NodeSocket::start(FakeNode::new(vec![price("solana", SOL, "150.5")])).await.unwrap();
    let api = start_api(node.path(), |c| c.api_token = Some("page-token".into())).await.unwrap();
    eventually("the API follows the node", WAIT, async || api.node_connected()).await.unwrap();
    let base = format!("http://{}", api.local_addr());
    let mut browser = Browser::launch().await.unwrap();
    browser.navigate(&format!("{base}/")).await.unwrap();
    // The page's script has run once it shows the provider's state.
    browser
        .wait_for(
            "the page's provider state",
            &format!("{}?.dataset.enabled === 'false'", js("provider-status")),
            WAIT,
        )
        .await
        .unwrap();

    browser.eval(&format!("{}.click()", js("tab-settings"))).await.unwrap();
    browser.eval(&format!("{}.click()", js("provider-toggle"))).await.unwrap();
    browser
        .wait_for("the key form", &format!("!{}.hidden", js("provider-form")), WAIT)
        .await
        .unwrap();
    browser
        .eval(&format!("{}.value = 'good-key'; {}.click()", js("api-key"), js("provider-enable")))
        .await
        .unwrap();
    let asked = browser
        .wait_for(
            "the token asked for",
            &format!("{0}.dataset.state === 'error' && {0}.textContent", js("provider-status")),
            WAIT,
        )
        .await
        .unwrap();
    assert!(asked.as_str().unwrap().contains("needs its token"), "{asked}");
    assert_eq!(
        browser
            .eval(&format!("!{}.hidden && !{}.hidden", js("provider-form"), js("api-token-row")))
            .await
            .unwrap(),
        true,
        "the token field is shown"
    );
    assert!(node.node.keys.lock().unwrap().is_empty(), "the node never saw the key");
    browser
        .eval(&format!(
            "{}.value = 'page-token'; {}.click()",
            js("api-token"),
            js("provider-enable")
        ))
        .await
        .unwrap();
    let status = provider_mode_on(&mut browser).await;
    assert_eq!(status, "Provider mode is on.");
    assert_eq!(node.node.keys.lock().unwrap().as_slice(), ["good-key"]);
    browser.close().await.unwrap();
    api.shutdown(Duration::from_secs(2)).await;
}
