//! Logs and metrics for the binaries: logs to stdout and to `<MESH_LOG_DIR>/app.log` (the file
//! the guide's `tail` and `grep` commands read), and the Prometheus recorder with its listener
//! on `MESH_METRICS_LISTEN`. Library code only emits; only binaries call these.

use std::net::SocketAddr;
use std::path::Path;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Libraries whose info-level events are bookkeeping an operator does not need.
const QUIET: &str = "libp2p_swarm=warn,libp2p_tcp=warn,libp2p_quic=warn,libp2p_identify=warn,\
libp2p_noise=warn,libp2p_yamux=warn,yamux=warn,multistream_select=warn,quinn=warn,mdns_sd=warn,\
sqlx=warn,hyper=warn,reqwest=warn";

/// The default field formatting under a type of its own: formatted span fields are cached per
/// formatter type, so without it the file would reuse the terminal's coloured fields.
#[derive(Debug, Default)]
struct PlainFields(tracing_subscriber::fmt::format::DefaultFields);

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for PlainFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        self.0.format_fields(writer, fields)
    }
}

/// Keeps the log file writers alive; drop it last (it flushes).
#[derive(Debug)]
pub struct LogGuard(#[allow(dead_code)] Vec<tracing_appender::non_blocking::WorkerGuard>);

/// Errors of setting up logs or metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log directory could not be made.
    #[error("log directory {0}: {1}")]
    LogDir(String, std::io::Error),
    /// The level or filter is invalid.
    #[error("log filter: {0}")]
    Filter(String),
    /// A global subscriber or recorder was already installed.
    #[error("{0}")]
    Install(String),
}

/// Installs the log subscriber: `RUST_LOG` when set, else `level`; stdout always, and
/// `<log_dir>/app.log` unless `log_dir` is `None`.
pub fn init_logs(level: &str, log_dir: Option<&Path>) -> Result<LogGuard, Error> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f),
        // A bare level keeps the libraries' chatter (connection bookkeeping) at warnings.
        _ if !level.contains('=') => EnvFilter::try_new(format!("{level},{QUIET}")),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| Error::Filter(e.to_string()))?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let stdout = tracing_subscriber::fmt::layer().with_target(false).with_ansi(terminal);
    match log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::LogDir(dir.display().to_string(), e))?;
            let appender = tracing_appender::rolling::never(dir, "app.log");
            let (writer, guard) = tracing_appender::non_blocking(appender);
            let file = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_target(false)
                .fmt_fields(PlainFields::default())
                .with_writer(writer);
            tracing_subscriber::registry()
                .with(filter)
                .with(stdout)
                .with(file)
                .try_init()
                .map_err(|e| Error::Install(e.to_string()))?;
            Ok(LogGuard(vec![guard]))
        }
        None => {
            tracing_subscriber::registry()
                .with(filter)
                .with(stdout)
                .try_init()
                .map_err(|e| Error::Install(e.to_string()))?;
            Ok(LogGuard(Vec::new()))
        }
    }
}

/// Name of the span that marks everything one node of a multi-node process does: enter it
/// (or instrument the node's start with it) with an `index` field, and
/// [`init_logs_per_node`] writes that node's events to its own file.
pub const NODE_SPAN: &str = "node";

/// The index of the [`NODE_SPAN`] a span belongs to, kept in the span's extensions.
#[derive(Debug, Clone, Copy)]
struct NodeIndex(usize);

/// Records the `index` of each [`NODE_SPAN`] when the span is made.
struct NodeTagger;

impl<S> tracing_subscriber::Layer<S> for NodeTagger
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != NODE_SPAN {
            return;
        }
        struct Index(Option<usize>);
        impl tracing::field::Visit for Index {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "index" {
                    self.0 = usize::try_from(value).ok();
                }
            }
            fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
                if field.name() == "index" {
                    self.0 = usize::try_from(value).ok();
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut index = Index(None);
        attrs.record(&mut index);
        if let (Some(index), Some(span)) = (index.0, ctx.span(id)) {
            span.extensions_mut().insert(NodeIndex(index));
        }
    }
}

/// The node whose span the current event is in, if any.
fn current_node<S>(ctx: &tracing_subscriber::layer::Context<'_, S>) -> Option<usize>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let span = ctx.lookup_current()?;
    span.scope().find_map(|s| s.extensions().get::<NodeIndex>().map(|n| n.0))
}

/// Logs of a process that runs several nodes (the demo): the events of node `i` (those inside
/// its [`NODE_SPAN`]) go to `node_dirs[i]/app.log`, everything else to `shared_dir/app.log`,
/// and to stdout as well only when `terminal` is set. `RUST_LOG` overrides `level`.
pub fn init_logs_per_node(
    level: &str,
    node_dirs: &[std::path::PathBuf],
    shared_dir: &Path,
    terminal: bool,
) -> Result<LogGuard, Error> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::DynFilterFn;

    type Base = tracing_subscriber::layer::Layered<EnvFilter, tracing_subscriber::Registry>;
    type Boxed = Box<dyn Layer<Base> + Send + Sync>;

    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f),
        _ if !level.contains('=') => EnvFilter::try_new(format!("{level},{QUIET}")),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| Error::Filter(e.to_string()))?;
    let mut guards = Vec::new();
    let mut layers: Vec<Boxed> = vec![NodeTagger.boxed()];
    let targets = node_dirs.iter().map(Some).chain(std::iter::once(None));
    for (i, dir) in targets.enumerate() {
        let node = dir.map(|_| i);
        let dir = dir.map(|d| d.as_path()).unwrap_or(shared_dir);
        std::fs::create_dir_all(dir).map_err(|e| Error::LogDir(dir.display().to_string(), e))?;
        let (writer, guard) =
            tracing_appender::non_blocking(tracing_appender::rolling::never(dir, "app.log"));
        guards.push(guard);
        // Spans pass every file's filter (a span filtered out of a layer would hide the node
        // it belongs to from that layer); events go to their node's file only.
        let only_this_node =
            DynFilterFn::new(move |meta, ctx| meta.is_span() || current_node(ctx) == node);
        layers.push(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_target(false)
                .fmt_fields(PlainFields::default())
                .with_writer(writer)
                .with_filter(only_this_node)
                .boxed(),
        );
    }
    if terminal {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        layers.push(tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi).boxed());
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init()
        .map_err(|e| Error::Install(e.to_string()))?;
    Ok(LogGuard(guards))
}

/// Installs the Prometheus recorder; with `listen`, also serves `/metrics` there. Must be
/// called inside a Tokio runtime.
pub fn init_metrics(listen: Option<SocketAddr>) -> Result<PrometheusHandle, Error> {
    let builder = PrometheusBuilder::new();
    let handle = match listen {
        Some(addr) => {
            let (recorder, exporter) = builder
                .with_http_listener(addr)
                .build()
                .map_err(|e| Error::Install(format!("metrics listener on {addr}: {e}")))?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| Error::Install(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::error!(error = ?e, "metrics listener stopped");
                }
            });
            handle
        }
        None => builder.install_recorder().map_err(|e| Error::Install(e.to_string()))?,
    };
    describe();
    Ok(handle)
}

/// Registers help texts, and zero values so every guide metric is present from the start.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "mesh_network_active_providers",
        "Providers heard from recently (should be > 0)"
    );
    describe_gauge!("mesh_network_connected_peers", "Connected peers (should be >= 3)");
    describe_histogram!(
        "mesh_message_propagation_latency_seconds",
        "Time from a message's creation to its arrival here"
    );
    describe_counter!("mesh_cache_hits_total", "Price lookups of one asset that found it");
    describe_counter!("mesh_cache_misses_total", "Price lookups of one asset that did not find it");
    describe_gauge!("mesh_cache_data_age_seconds", "Age of the newest price held");
    describe_gauge!(
        "mesh_cache_last_update_timestamp_seconds",
        "Unix time of the newest price held (0: none yet)"
    );
    describe_counter!("mesh_network_providers_joined_total", "Providers that became active");
    describe_counter!("mesh_network_providers_left_total", "Providers no longer heard from");
    describe_gauge!("mesh_seen_messages_cache_size", "Message ids in the seen cache");
    describe_counter!("mesh_validation_failures_total", "Messages rejected, by reason");
    describe_counter!(
        "mesh_price_discrepancies_total",
        "Price discrepancies between providers detected"
    );
    describe_counter!(
        "mesh_network_round_claims_ignored_total",
        "Price batches not taken as their round's delivery (round not their time, not recent, assets missing)"
    );
    describe_gauge!("mesh_component_degraded", "1 while a component runs on its fallback");
    describe_counter!(
        "mesh_price_origin_trimmed_total",
        "Stored or mirrored prices deleted to keep each origin within its share, by store"
    );
    describe_counter!(
        "mesh_price_retention_removed_total",
        "Prices nobody sent within MESH_PRICE_RETENTION_SECS, forgotten, by store"
    );
    describe_counter!(
        "mesh_store_reload_rejected_total",
        "Stored or mirrored prices refused at start: they fail the rules of received prices"
    );
    describe_counter!(
        "mesh_store_dropped_total",
        "Rows the write-behind queues and the Redis mirror had to drop, by queue and reason"
    );
    describe_counter!("mesh_store_written_total", "Rows the write-behind queues wrote, by queue");
    describe_counter!(
        "mesh_ipc_connections_refused_total",
        "Connections to the node socket refused, by reason (peer_credentials: a user other than the node's, root or MESH_NODE_SOCKET_GROUP)"
    );
    {
        use mesh_provider::telemetry as p;
        describe_counter!(p::FETCH_ATTEMPTS_TOTAL, "Round fetches started by this provider");
        describe_counter!(p::FETCH_SUCCESS_TOTAL, "Round fetches that produced a batch");
        describe_counter!(p::BROADCAST_ATTEMPTS_TOTAL, "Batches handed to the relay");
        describe_counter!(p::BROADCAST_SUCCESS_TOTAL, "Batches the relay accepted");
        describe_histogram!(
            p::API_LATENCY_SECONDS,
            "Birdeye request time, by endpoint and outcome"
        );
        describe_counter!(p::ROUNDS_SKIPPED_TOTAL, "Rounds this node did not fetch, by reason");
        describe_counter!(p::ROUNDS_FAILED_TOTAL, "Rounds this node failed to fetch, by reason");
        describe_counter!(p::MISSING_PRICES_TOTAL, "Tokens Birdeye had no price for");
        describe_counter!(p::RATE_LIMITED_TOTAL, "Birdeye answers 429 (too many requests)");
        describe_gauge!(
            p::KEY_REJECTED,
            "1 while provider mode is off because Birdeye refused the key (401/403)"
        );
        describe_counter!(
            p::KEY_REJECTIONS_TOTAL,
            "Keys Birdeye refused in a round or at resume, by status"
        );
        describe_counter!(
            p::ROUNDS_UNDELIVERED_TOTAL,
            "Rounds leased by another provider (or a squatted key) whose batch had not arrived one window later, by reason"
        );
        describe_gauge!(
            p::CLOCK_OFFSET_SECONDS,
            "This node's wall clock minus Birdeye's Date, Redis TIME and peers' timestamps (median)"
        );
        describe_gauge!(
            p::CLOCK_MAX_SKEW_SECONDS,
            "The allowed clock skew, MESH_MAX_CLOCK_SKEW_SECS"
        );
        describe_counter!(
            p::ROUNDS_TAKEN_OVER_TOTAL,
            "Rounds this provider took over from a lease holder that did not deliver"
        );
        describe_counter!(
            p::ROUNDS_FETCHED_TOTAL,
            "Rounds this node fetched, by coordination path"
        );
    }
    describe_counter!("mesh_relay_messages_total", "Relay messages received, by outcome");
    describe_counter!("mesh_relay_dropped_total", "Relay frames dropped, by reason");
    describe_counter!("mesh_relay_bans_total", "Peers banned for invalid messages");
    describe_counter!(
        "mesh_relay_addrs_refused_total",
        "Peer addresses learned through identify or peer exchange that the address filter \
         refused (MESH_ALLOW_PRIVATE_ADDRS)"
    );
    describe_counter!(
        "mesh_relay_known_peers_refused_total",
        "Peers kept out of the known-peer table because their network, or the network of the peer that told of them, held its share"
    );
    describe_counter!(
        "mesh_relay_pex_repeats_total",
        "Peer-exchange entries left out as repeats (a peer named again, an address already known)"
    );
    describe_counter!(
        "mesh_relay_connections_refused_total",
        "Inbound connections refused, by the limit that refused them (reason)"
    );
    describe_counter!(
        "mesh_relay_suppressed_total",
        "Queued copies not sent because the peer had sent us the same message meanwhile"
    );
    describe_counter!(
        "mesh_relay_lazy_total",
        "Lazy push: ids announced instead of sent (have_sent), announced messages asked for \
         (want_sent), messages sent on request (want_served), copies answered with a PRUNE \
         (prune_sent), peers made children of an origin's tree again by a WANT (graft)"
    );
    describe_counter!("mesh_relay_frames_sent_total", "Relay frames sent to peers");
    describe_counter!("mesh_relay_bytes_sent_total", "Relay bytes sent to peers");
    for name in [
        "mesh_cache_hits_total",
        "mesh_cache_misses_total",
        "mesh_price_discrepancies_total",
        "mesh_network_providers_joined_total",
        "mesh_network_providers_left_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        "mesh_provider_fetch_attempts_total",
        "mesh_provider_fetch_success_total",
        "mesh_provider_broadcast_attempts_total",
        "mesh_provider_broadcast_success_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        "mesh_network_active_providers",
        "mesh_network_connected_peers",
        "mesh_seen_messages_cache_size",
        "mesh_cache_data_age_seconds",
        "mesh_cache_last_update_timestamp_seconds",
    ] {
        metrics::gauge!(name).set(0.0);
    }
}
