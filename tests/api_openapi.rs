//! The running API against its committed OpenAPI description (crates/mesh-api/openapi.json):
//! every documented operation is called, in the situations that give its documented answers
//! (node up, bad input, bearer token required, node away), and each answer must have a
//! documented status and a body that matches the documented schema. The schema check is
//! written here for the subset of OpenAPI 3.0 the description uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_tests::api::{BAD_KEY, FakeNode, NodeSocket, price, start_api};
use mesh_tests::eventually;
use serde_json::Value;

/// Checks `value` against `schema`; returns the problems found (empty when it matches).
fn check(spec: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.strip_prefix("#/components/schemas/").expect("local reference");
        let target = &spec["components"]["schemas"][name];
        assert!(!target.is_null(), "{reference} is not defined");
        return check(spec, target, value, at);
    }
    if value.is_null() {
        if schema["nullable"] != true {
            problems.push(format!("{at}: null but not nullable"));
        }
        return problems;
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for part in all {
            problems.extend(check(spec, part, value, at));
        }
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = options.iter().filter(|o| check(spec, o, value, at).is_empty()).count();
        if matching != 1 {
            problems.push(format!("{at}: {value} matches {matching} of the oneOf options"));
        }
    }
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => panic!("{at}: type {other} is not handled by this checker"),
        };
        if !ok {
            problems.push(format!("{at}: {value} is not of type {kind}"));
            return problems;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), value.as_f64())
        && n < min
    {
        problems.push(format!("{at}: {n} is below {min}"));
    }
    if let Some(text) = value.as_str() {
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && (text.chars().count() as u64) < min
        {
            problems.push(format!("{at}: {text:?} is shorter than {min}"));
        }
        match schema.get("format").and_then(Value::as_str) {
            Some("uuid") if uuid::Uuid::parse_str(text).is_err() => {
                problems.push(format!("{at}: {text:?} is not a UUID"));
            }
            Some("date-time") if !looks_like_rfc3339(text) => {
                problems.push(format!("{at}: {text:?} is not an RFC 3339 time"));
            }
            _ => {}
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            // The one pattern the description uses: a decimal number.
            assert_eq!(pattern, "^-?[0-9]+(\\.[0-9]+)?$", "{at}: pattern not handled");
            let digits = text.strip_prefix('-').unwrap_or(text);
            let (int, frac) = digits.split_once('.').unwrap_or((digits, "0"));
            let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if !(all_digits(int) && all_digits(frac)) {
                problems.push(format!("{at}: {text:?} is not a decimal"));
            }
        }
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !object.contains_key(name.as_str().unwrap()) {
                problems.push(format!("{at}: required {name} is missing"));
            }
        }
        for (name, field) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(field_schema) => {
                    problems.extend(check(spec, field_schema, field, &format!("{at}.{name}")));
                }
                None if schema["additionalProperties"] == false => {
                    problems.push(format!("{at}: {name} is not documented"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            problems.extend(check(spec, items, item, &format!("{at}[{i}]")));
        }
    }
    problems
}

fn looks_like_rfc3339(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[10] == b'T'
        && (text.ends_with('Z') || text[19..].contains('+') || text[19..].contains('-'))
}

/// One call and what it answered.
struct Answer {
    path: &'static str,
    method: &'static str,
    status: u16,
    content_type: String,
    body: String,
}

async fn call(
    base: &str,
    method: &'static str,
    path: &'static str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let client = reqwest::Client::new();
    let mut request = match method {
        "get" => client.get(format!("{base}{url}")),
        "post" => client.post(format!("{base}{url}")),
        other => panic!("{other}"),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_owned());
    }
    let mut response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    // Streams never end: the first chunk is enough.
    let body = if content_type.starts_with("text/event-stream") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk()).await.unwrap();
        String::from_utf8_lossy(&chunk.unwrap().unwrap_or_default()).into_owned()
    } else {
        response.text().await.unwrap()
    };
    Answer { path, method, status, content_type, body }
}

async fn websocket(addr: std::net::SocketAddr, path: &'static str) -> Answer {
    let (_socket, response) =
        tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await.unwrap();
    Answer {
        path,
        method: "get",
        status: response.status().as_u16(),
        content_type: String::new(),
        body: String::new(),
    }
}

fn verify(spec: &Value, answer: &Answer) -> Vec<String> {
    let at = format!("{} {} -> {}", answer.method.to_uppercase(), answer.path, answer.status);
    let operation = &spec["paths"][answer.path][answer.method];
    if operation.is_null() {
        return vec![format!("{at}: operation not documented")];
    }
    let documented = &operation["responses"][answer.status.to_string()];
    if documented.is_null() {
        return vec![format!("{at}: status not documented; body {}", answer.body)];
    }
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        return vec![];
    };
    let Some((media, media_spec)) =
        content.iter().find(|(media, _)| answer.content_type.starts_with(media.as_str()))
    else {
        return vec![format!("{at}: content type {:?} not documented", answer.content_type)];
    };
    if media != "application/json" {
        return vec![];
    }
    match serde_json::from_str::<Value>(&answer.body) {
        Ok(body) => check(spec, &media_spec["schema"], &body, &at),
        Err(e) => vec![format!("{at}: body is not JSON ({e}): {}", answer.body)],
    }
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let spec: Value = serde_json::from_str(mesh_api::OPENAPI_JSON).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.0"));
    let mut node = NodeSocket::start(FakeNode::new(vec![
        price("solana", "SOL", "150.5"),
        price("solana", "USDC", "1"),
        price("ethereum", "USDC", "0.9999"),
    ]))
    .await
    .unwrap();
    let api = start_api(node.path(), |_| {}).await.unwrap();
    let guarded = start_api(node.path(), |c| c.api_token = Some("t0ken".into())).await.unwrap();
    // One stream per address, taken below: the next one gets 429.
    let limited = start_api(node.path(), |c| c.max_streams_per_address = 1).await.unwrap();
    let limited_base = format!("http://{}", limited.local_addr());
    let base = format!("http://{}", api.local_addr());
    let guarded_base = format!("http://{}", guarded.local_addr());
    eventually("the APIs follow the node", Duration::from_secs(10), async || {
        api.node_connected() && guarded.node_connected() && limited.node_connected()
    })
    .await
    .unwrap();
    let _taken = reqwest::get(format!("{limited_base}/api/mesh/stream")).await.unwrap();
    assert_eq!(_taken.status(), 200);
    let served: Value =
        reqwest::get(format!("{base}/openapi.json")).await.unwrap().json().await.unwrap();
    assert_eq!(served, spec, "/openapi.json serves the committed description");

    let mut answers = vec![
        call(&base, "get", "/api/mesh/prices", "/api/mesh/prices", None, None).await,
        call(
            &base,
            "get",
            "/api/mesh/prices",
            "/api/mesh/prices?blockchain=solana&asset=SOL",
            None,
            None,
        )
        .await,
        call(&base, "get", "/api/mesh/prices/{asset}", "/api/mesh/prices/USDC", None, None).await,
        call(&base, "get", "/api/mesh/prices/{asset}", "/api/mesh/prices/NOPE", None, None).await,
        call(
            &base,
            "get",
            "/api/mesh/prices/{asset}/quotes",
            "/api/mesh/prices/USDC/quotes",
            None,
            None,
        )
        .await,
        call(
            &base,
            "get",
            "/api/mesh/prices/{asset}/quotes",
            "/api/mesh/prices/NOPE/quotes",
            None,
            None,
        )
        .await,
        call(&base, "get", "/api/mesh/network/status", "/api/mesh/network/status", None, None)
            .await,
        call(&base, "get", "/api/mesh/provider/status", "/api/mesh/provider/status", None, None)
            .await,
        call(
            &base,
            "post",
            "/api/mesh/provider/enable",
            "/api/mesh/provider/enable",
            None,
            Some(r#"{"api_key":"k"}"#),
        )
        .await,
        call(
            &base,
            "post",
            "/api/mesh/provider/enable",
            "/api/mesh/provider/enable",
            None,
            Some(&format!(r#"{{"api_key":"{BAD_KEY}"}}"#)),
        )
        .await,
        call(
            &base,
            "post",
            "/api/mesh/provider/enable",
            "/api/mesh/provider/enable",
            None,
            Some("{oops"),
        )
        .await,
        call(
            &base,
            "post",
            "/api/mesh/provider/enable",
            "/api/mesh/provider/enable",
            None,
            Some(&"x".repeat(20_000)),
        )
        .await,
        call(&base, "post", "/api/mesh/provider/disable", "/api/mesh/provider/disable", None, None)
            .await,
        call(
            &guarded_base,
            "post",
            "/api/mesh/provider/enable",
            "/api/mesh/provider/enable",
            None,
            Some(r#"{"api_key":"k"}"#),
        )
        .await,
        call(
            &guarded_base,
            "post",
            "/api/mesh/provider/disable",
            "/api/mesh/provider/disable",
            Some("wrong"),
            None,
        )
        .await,
        call(
            &guarded_base,
            "post",
            "/api/mesh/provider/disable",
            "/api/mesh/provider/disable",
            Some("t0ken"),
            None,
        )
        .await,
        call(&base, "get", "/api/mesh/stream", "/api/mesh/stream?blockchain=solana", None, None)
            .await,
        call(&base, "get", "/api/mesh/ws", "/api/mesh/ws", None, None).await,
        websocket(api.local_addr(), "/api/mesh/ws").await,
        call(&base, "get", "/metrics", "/metrics", None, None).await,
        call(&base, "get", "/healthz", "/healthz", None, None).await,
        call(&base, "get", "/readyz", "/readyz", None, None).await,
        call(&base, "get", "/", "/", None, None).await,
        call(&base, "get", "/openapi.json", "/openapi.json", None, None).await,
        refused(&base, "/api/mesh/provider/enable", &[("content-type", "text/plain")]).await,
        refused(
            &base,
            "/api/mesh/provider/disable",
            &[("content-type", "application/json"), ("origin", "https://evil.example")],
        )
        .await,
        call(&limited_base, "get", "/api/mesh/stream", "/api/mesh/stream", None, None).await,
    ];
    // The node goes away: the documented 503s.
    node.stop().await.unwrap();
    eventually("the API notices", Duration::from_secs(5), async || !api.node_connected())
        .await
        .unwrap();
    for (method, path, url, body) in [
        ("get", "/api/mesh/prices", "/api/mesh/prices", None),
        ("get", "/api/mesh/prices/{asset}", "/api/mesh/prices/SOL", None),
        ("get", "/api/mesh/prices/{asset}/quotes", "/api/mesh/prices/SOL/quotes", None),
        ("get", "/api/mesh/network/status", "/api/mesh/network/status", None),
        ("get", "/api/mesh/provider/status", "/api/mesh/provider/status", None),
        ("get", "/readyz", "/readyz", None),
        (
            "post",
            "/api/mesh/provider/enable",
            "/api/mesh/provider/enable",
            Some(r#"{"api_key":"k"}"#),
        ),
        ("post", "/api/mesh/provider/disable", "/api/mesh/provider/disable", None),
    ] {
        answers.push(call(&base, method, path, url, None, body).await);
    }

    let mut problems = Vec::new();
    for answer in &answers {
        problems.extend(verify(&spec, answer));
    }
    assert!(problems.is_empty(), "answers that differ from openapi.json:\n{}", problems.join("\n"));

    // Every documented operation was called; the statuses seen are the expected ones.
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object().unwrap().keys().map(move |m| (path.clone(), m.clone()))
        })
        .collect();
    let called: BTreeSet<(String, String)> =
        answers.iter().map(|a| (a.path.to_owned(), a.method.to_owned())).collect();
    assert_eq!(documented, called);
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [
            200, 200, 200, 404, 200, 404, 200, 200, 200, 401, 400, 413, 200, 401, 401, 200, 200,
            400, 101, 200, 200, 200, 200, 200, 415, 403, 429, 503, 503, 503, 503, 503, 503, 503,
            503
        ]
    );
    api.shutdown(Duration::from_secs(5)).await;
    guarded.shutdown(Duration::from_secs(5)).await;
    limited.shutdown(Duration::from_secs(5)).await;
}

/// A POST to `path` with a JSON body and `headers`, as a browser page of another site sends it.
async fn refused(base: &str, path: &'static str, headers: &[(&str, &str)]) -> Answer {
    let mut request =
        reqwest::Client::new().post(format!("{base}{path}")).body(r#"{"api_key":"k"}"#);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.text().await.unwrap();
    Answer { path, method: "post", status, content_type, body }
}

#[test]
fn the_checker_refuses_what_does_not_match() {
    let spec: Value = serde_json::from_str(mesh_api::OPENAPI_JSON).unwrap();
    let price = serde_json::json!({"$ref": "#/components/schemas/PriceView"});
    let good = serde_json::to_value(mesh_tests::api::price("solana", "SOL", "1.5")).unwrap();
    assert!(check(&spec, &price, &good, "p").is_empty(), "{:?}", check(&spec, &price, &good, "p"));
    let mut extra = good.clone();
    extra["surprise"] = Value::from(1);
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("hop_count");
    let mut wrong_type = good.clone();
    wrong_type["price"] = Value::from(1.5);
    let mut not_decimal = good.clone();
    not_decimal["price"] = Value::from("1.5e3");
    for bad in [extra, missing, wrong_type, not_decimal] {
        assert!(!check(&spec, &price, &bad, "p").is_empty(), "{bad}");
    }
    let freshness = serde_json::json!({"$ref": "#/components/schemas/DataFreshness"});
    for ok in
        [serde_json::json!("Fresh"), serde_json::json!({"HoursAgo": 3}), serde_json::json!("Stale")]
    {
        assert!(check(&spec, &freshness, &ok, "f").is_empty(), "{ok}");
    }
    for bad in [serde_json::json!("Old"), serde_json::json!({"DaysAgo": 1}), serde_json::json!(3)] {
        assert!(!check(&spec, &freshness, &bad, "f").is_empty(), "{bad}");
    }
}
