//! Metrics of the API process itself, kept in a recorder of this server (not the process-wide
//! one, so several servers in one process keep theirs apart) and rendered by `GET /metrics`.

use metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::{Error, Result};

const REQUESTS: &str = "mesh_api_http_requests_total";
const DURATION: &str = "mesh_api_http_request_duration_seconds";
const STREAM_CLIENTS: &str = "mesh_api_stream_clients";
const STREAM_EVENTS: &str = "mesh_api_stream_events_sent_total";
const STREAM_CONFLATED: &str = "mesh_api_stream_events_conflated_total";
const STREAM_CLOSED: &str = "mesh_api_stream_clients_closed_total";
const NODE_CONNECTED: &str = "mesh_api_node_connected";
const NODE_CONNECTS: &str = "mesh_api_node_connects_total";
const NODE_EVENTS: &str = "mesh_api_node_events_total";
const PRICES: &str = "mesh_api_snapshot_prices";

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Kind of stream client, a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    Sse,
    Ws,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sse => "sse",
            Self::Ws => "ws",
        }
    }
}

/// The recorder and the handles used on hot paths.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    node_connected: Gauge,
    node_connects: Counter,
    prices: Gauge,
    conflated: Counter,
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(DURATION.to_owned()),
                &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 30.0],
            )
            .map_err(|e| Error::Metrics(e.to_string()))?
            .build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            let name = KeyName::from_const_str(name);
            let help = SharedString::const_str(help);
            match name.as_str() {
                n if n == DURATION => recorder.describe_histogram(name, unit, help),
                n if n.ends_with("_total") => recorder.describe_counter(name, unit, help),
                _ => recorder.describe_gauge(name, unit, help),
            }
        };
        describe(REQUESTS, None, "HTTP requests answered, by route, method and status");
        describe(
            DURATION,
            Some(Unit::Seconds),
            "Time to answer an HTTP request, by route and method",
        );
        describe(STREAM_CLIENTS, None, "Stream clients connected now, by kind (sse, ws)");
        describe(STREAM_EVENTS, None, "Events written to stream clients, by kind");
        describe(
            STREAM_CONFLATED,
            None,
            "Events replaced by a newer one before a slow client took them",
        );
        describe(STREAM_CLOSED, None, "Stream clients closed by the server, by kind and reason");
        describe(NODE_CONNECTED, None, "1 while the subscription to the node is live, else 0");
        describe(NODE_CONNECTS, None, "Subscriptions to the node established (1 + reconnections)");
        describe(NODE_EVENTS, None, "Events received from the node, by type");
        describe(PRICES, None, "Prices in the API's snapshot of the node's price book");
        let handle = recorder.handle();
        let node_connected =
            recorder.register_gauge(&Key::from_static_name(NODE_CONNECTED), &METADATA);
        let node_connects =
            recorder.register_counter(&Key::from_static_name(NODE_CONNECTS), &METADATA);
        let prices = recorder.register_gauge(&Key::from_static_name(PRICES), &METADATA);
        let conflated =
            recorder.register_counter(&Key::from_static_name(STREAM_CONFLATED), &METADATA);
        node_connected.set(0.0);
        node_connects.absolute(0);
        prices.set(0.0);
        conflated.absolute(0);
        let metrics = Self { recorder, handle, node_connected, node_connects, prices, conflated };
        for kind in [StreamKind::Sse, StreamKind::Ws] {
            metrics.stream_clients(kind).set(0.0);
            metrics.stream_events(kind).absolute(0);
        }
        Ok(metrics)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    pub fn request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let labels =
            [Label::new("route", route.to_owned()), Label::new("method", method.to_owned())];
        let duration = Key::from_parts(DURATION, labels.to_vec());
        self.recorder.register_histogram(&duration, &METADATA).record(seconds);
        let mut labels = labels.to_vec();
        labels.push(Label::new("status", status.to_string()));
        self.recorder.register_counter(&Key::from_parts(REQUESTS, labels), &METADATA).increment(1);
    }

    pub fn stream_clients(&self, kind: StreamKind) -> Gauge {
        self.recorder.register_gauge(
            &Key::from_parts(STREAM_CLIENTS, vec![Label::new("kind", kind.as_str())]),
            &METADATA,
        )
    }

    pub fn stream_events(&self, kind: StreamKind) -> Counter {
        self.recorder.register_counter(
            &Key::from_parts(STREAM_EVENTS, vec![Label::new("kind", kind.as_str())]),
            &METADATA,
        )
    }

    pub fn stream_closed(&self, kind: StreamKind, reason: &'static str) {
        let labels = vec![Label::new("kind", kind.as_str()), Label::new("reason", reason)];
        self.recorder
            .register_counter(&Key::from_parts(STREAM_CLOSED, labels), &METADATA)
            .increment(1);
    }

    pub fn conflated(&self) -> &Counter {
        &self.conflated
    }

    pub fn node_connected(&self, connected: bool) {
        self.node_connected.set(if connected { 1.0 } else { 0.0 });
        if connected {
            self.node_connects.increment(1);
        }
    }

    pub fn node_event(&self, kind: &'static str) {
        self.recorder
            .register_counter(
                &Key::from_parts(NODE_EVENTS, vec![Label::new("type", kind)]),
                &METADATA,
            )
            .increment(1);
    }

    pub fn prices(&self, count: usize) {
        self.prices.set(count as f64);
    }
}
