//! Settings of the API server, with the defaults of the guide.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Result};

/// Settings of the API server. [`Config::default`] gives the documented defaults.
#[derive(Clone)]
pub struct Config {
    /// Address to listen on (`MESH_API_LISTEN`, default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The node's socket (`MESH_NODE_SOCKET`, default `data/node.sock`, as the node).
    pub node_socket: PathBuf,
    /// When set, POST endpoints need `Authorization: Bearer <token>` (`MESH_API_TOKEN`).
    /// When not set, they are accepted only from a loopback client that came through no proxy
    /// (an operator typing the guide's curl on the box): anything else gets 401.
    pub api_token: Option<String>,
    /// Start on a listen address that is not loopback without [`Config::api_token`]
    /// (`MESH_API_ALLOW_REMOTE_WITHOUT_TOKEN`, default `false`: refused at start). The POST
    /// endpoints stay loopback-only without a token either way; this serves the read-only
    /// API to the network.
    pub allow_remote_without_token: bool,
    /// Longest time a REST request may take, body included (default 30 s).
    pub request_timeout: Duration,
    /// Longest wait for one answer of the node (default 25 s: enabling provider mode checks the
    /// key against Birdeye first).
    pub node_timeout: Duration,
    /// Largest request body accepted (default 16 KiB).
    pub body_limit: usize,
    /// A connection must send a request's whole header section within this time from its
    /// first byte, or from the end of its previous answer, else it is closed (default 10 s).
    /// Bounds what slow clients (slowloris) and idle keep-alive connections hold.
    pub header_read_timeout: Duration,
    /// Most HTTP connections served at once besides the stream clients (default 1,024): the
    /// server serves at most `max_stream_clients + max_request_connections` connections, and
    /// further ones wait in the listen backlog until one closes.
    pub max_request_connections: usize,
    /// First wait before reconnecting to the node (default 100 ms); doubles up to
    /// [`Config::reconnect_max`].
    pub reconnect_min: Duration,
    /// Longest wait between two reconnection attempts (default 5 s).
    pub reconnect_max: Duration,
    /// Most stream clients (SSE plus WebSocket) served at once (default 10,000).
    pub max_stream_clients: usize,
    /// Most distinct updates waiting for one stream client; one more closes it (default 10,000).
    /// Updates of the same asset replace each other, so this is reached only by a client that
    /// stopped reading while the price book is larger than this.
    pub client_buffer: usize,
    /// A stream client that does not take a batch of events within this time is closed
    /// (default 10 s).
    pub client_write_timeout: Duration,
    /// The server pings WebSocket clients this often and closes those that stay silent for two
    /// intervals (default 15 s).
    pub ws_ping_interval: Duration,
    /// Comment lines keep Server-Sent Event streams open this often (default 15 s).
    pub sse_keep_alive: Duration,
    /// Most stream clients (SSE plus WebSocket) from one client address at once (default 64;
    /// `MESH_API_MAX_STREAMS_PER_ADDRESS`), so that one address cannot take the
    /// `max_stream_clients` slots of everyone. The address is the connection's peer, or, when
    /// the peer is one of [`Config::trusted_proxies`], the client that proxy names in
    /// `X-Forwarded-For`.
    pub max_streams_per_address: usize,
    /// Peers whose `X-Forwarded-For` header is believed (`MESH_API_TRUSTED_PROXIES`, default
    /// loopback: the shipped nginx site runs on the same host and appends the client's
    /// address). From any other peer the header is ignored.
    pub trusted_proxies: Vec<IpAddr>,
    /// Browser origins (`https://dashboard.example.com`) besides the API's own whose pages may
    /// call the POST endpoints (`MESH_API_ALLOWED_ORIGINS`, default none). A request with any
    /// other `Origin` header gets 403: a page on another site cannot switch provider mode from
    /// an operator's browser.
    pub allowed_origins: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            node_socket: PathBuf::from("data/node.sock"),
            api_token: None,
            allow_remote_without_token: false,
            request_timeout: Duration::from_secs(30),
            node_timeout: Duration::from_secs(25),
            body_limit: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_request_connections: 1024,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            max_stream_clients: 10_000,
            client_buffer: 10_000,
            client_write_timeout: Duration::from_secs(10),
            ws_ping_interval: Duration::from_secs(15),
            sse_keep_alive: Duration::from_secs(15),
            max_streams_per_address: 64,
            trusted_proxies: vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)],
            allowed_origins: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("node_socket", &self.node_socket)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("allow_remote_without_token", &self.allow_remote_without_token)
            .field("request_timeout", &self.request_timeout)
            .field("node_timeout", &self.node_timeout)
            .field("body_limit", &self.body_limit)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_request_connections", &self.max_request_connections)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("max_stream_clients", &self.max_stream_clients)
            .field("client_buffer", &self.client_buffer)
            .field("client_write_timeout", &self.client_write_timeout)
            .field("ws_ping_interval", &self.ws_ping_interval)
            .field("sse_keep_alive", &self.sse_keep_alive)
            .field("max_streams_per_address", &self.max_streams_per_address)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("allowed_origins", &self.allowed_origins)
            .finish()
    }
}

impl Config {
    /// Checks every setting and reports all problems together.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.node_socket.as_os_str().is_empty() {
            problems.push("MESH_NODE_SOCKET must not be empty".to_owned());
        }
        if self.api_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            problems.push("MESH_API_TOKEN is set but empty".to_owned());
        }
        if self.api_token.is_none()
            && !self.listen.ip().is_loopback()
            && !self.allow_remote_without_token
        {
            problems.push(format!(
                "MESH_API_LISTEN={} is not a loopback address and MESH_API_TOKEN is not set: set \
                 a token, or MESH_API_ALLOW_REMOTE_WITHOUT_TOKEN=true to serve the read-only API \
                 to the network (POSTs then stay loopback-only)",
                self.listen
            ));
        }
        let positive = [
            ("request_timeout", self.request_timeout),
            ("node_timeout", self.node_timeout),
            ("reconnect_min", self.reconnect_min),
            ("header_read_timeout", self.header_read_timeout),
            ("client_write_timeout", self.client_write_timeout),
            ("ws_ping_interval", self.ws_ping_interval),
            ("sse_keep_alive", self.sse_keep_alive),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                problems.push(format!("{name} must be greater than zero"));
            }
        }
        if self.reconnect_max < self.reconnect_min {
            problems.push(format!(
                "reconnect_max={:?} is below reconnect_min={:?}",
                self.reconnect_max, self.reconnect_min
            ));
        }
        for (name, value) in [
            ("body_limit", self.body_limit),
            ("max_stream_clients", self.max_stream_clients),
            ("max_request_connections", self.max_request_connections),
            ("client_buffer", self.client_buffer),
            ("max_streams_per_address", self.max_streams_per_address),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.trim_end_matches('/').matches('/').count() != 2
            {
                problems.push(format!(
                    "MESH_API_ALLOWED_ORIGINS: {origin:?} is not an origin (scheme://host[:port])"
                ));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::Config(problems.join("\n"))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_loopback_listen_address_needs_a_token_or_an_explicit_yes() {
        let public = SocketAddr::from(([0, 0, 0, 0], 8080));
        let open = Config { listen: public, ..Config::default() };
        let message = open.validate().unwrap_err().to_string();
        assert!(message.contains("MESH_API_TOKEN"), "{message}");
        assert!(message.contains("MESH_API_ALLOW_REMOTE_WITHOUT_TOKEN"), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
        Config { listen: public, api_token: Some("t".into()), ..Config::default() }
            .validate()
            .unwrap();
        Config { listen: public, allow_remote_without_token: true, ..Config::default() }
            .validate()
            .unwrap();
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 8080));
        Config { listen: v6, ..Config::default() }.validate().unwrap();
    }

    #[test]
    fn defaults_are_valid_and_every_problem_is_reported() {
        Config::default().validate().unwrap();
        let bad = Config {
            api_token: Some(" ".into()),
            body_limit: 0,
            ws_ping_interval: Duration::ZERO,
            ..Config::default()
        };
        let message = bad.validate().unwrap_err().to_string();
        assert!(message.contains("MESH_API_TOKEN"), "{message}");
        assert!(message.contains("body_limit"), "{message}");
        assert!(message.contains("ws_ping_interval"), "{message}");
        let secret = Config { api_token: Some("hunter2".into()), ..Config::default() };
        let shown = format!("{secret:?}");
        assert!(!shown.contains("hunter2") && shown.contains("<redacted>"), "{shown}");
    }
}
