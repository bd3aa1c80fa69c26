//! Relay settings.

use std::time::Duration;

use libp2p::Multiaddr;
use mesh_protocol::MessageId;
use mesh_seen_cache::SeenRecord;

use crate::core::CoreConfig;
use crate::inbound::InboundLimits;
use crate::lazy::LazyPush;
use crate::peer_manager;

/// Everything a relay needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on (`MESH_LISTEN_ADDRS`), e.g. `/ip4/0.0.0.0/tcp/4001` and
    /// `/ip4/0.0.0.0/udp/4001/quic-v1`; `/memory/<n>` for in-process tests.
    pub listen_addrs: Vec<Multiaddr>,
    /// Peer counts, budget and bans.
    pub peers: peer_manager::Config,
    /// Inbound connection limits by remote address, and the handshake timeout.
    pub inbound: InboundLimits,
    /// Seen cache and validation.
    pub core: CoreConfig,
    /// Seen ids to load at start (from the store), so a restarted node does not deliver or
    /// relay them again.
    pub seen_preload: Vec<SeenRecord<MessageId>>,
    /// Frames waiting per peer before new ones are dropped (and counted).
    pub peer_queue_len: usize,
    /// Deliveries waiting for the local subscriber before new ones are dropped (and counted).
    pub delivery_queue_len: usize,
    /// Frames waiting between the stream readers and the relay core.
    pub inbound_queue_len: usize,
    /// A connection with no stream open is closed after this long.
    pub idle_connection_timeout: Duration,
    /// How often each connection is pinged (libp2p ping). Each node stretches it by a random
    /// share of up to a third, drawn once at start, so that connections opened at the same
    /// moment (a mesh starting up) do not all ping in the same instant ever after.
    pub ping_interval: Duration,
    /// A ping not answered within this long fails (so does a ping stream that cannot be opened
    /// within libp2p's 10 s). After two failures in a row the connection is closed: the peer
    /// vanished without closing its TCP connection, or the link went dead. Below the minimum
    /// of peers, the peer manager then dials a replacement.
    pub ping_timeout: Duration,
    /// How often the peer manager runs.
    pub tick_interval: Duration,
    /// First and longest wait between attempts to reopen a peer's relay stream.
    pub stream_backoff: (Duration, Duration),
    /// Answer and send peer-exchange requests.
    pub peer_exchange: bool,
    /// Ask new peers for their peers right after connecting (besides when below the minimum).
    pub eager_peer_exchange: bool,
    /// Added to the wall clock when checking timestamps, in milliseconds: 0 in production;
    /// tests set it to play a node whose clock is wrong.
    pub clock_offset_ms: i64,
    /// Which peers get a relayed message in full and which only its id ([`LazyPush`]).
    pub lazy: LazyPush,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addrs: vec![
                "/ip4/0.0.0.0/tcp/4001".parse().expect_static(),
                #[cfg(feature = "quic")]
                "/ip4/0.0.0.0/udp/4001/quic-v1".parse().expect_static(),
            ],
            peers: peer_manager::Config::default(),
            inbound: InboundLimits::default(),
            core: CoreConfig::default(),
            seen_preload: Vec::new(),
            peer_queue_len: 1024,
            delivery_queue_len: 4096,
            inbound_queue_len: 1024,
            idle_connection_timeout: Duration::from_secs(120),
            ping_interval: Duration::from_secs(15),
            ping_timeout: Duration::from_secs(20),
            tick_interval: Duration::from_secs(1),
            stream_backoff: (Duration::from_millis(50), Duration::from_secs(5)),
            peer_exchange: true,
            eager_peer_exchange: false,
            clock_offset_ms: 0,
            lazy: LazyPush::default(),
        }
    }
}

/// Parsing a literal that is known to be valid.
trait ExpectStatic<T> {
    fn expect_static(self) -> T;
}

impl<T, E: std::fmt::Debug> ExpectStatic<T> for Result<T, E> {
    #[allow(clippy::expect_used)] // only used on string literals checked by the tests below
    fn expect_static(self) -> T {
        self.expect("static multiaddr literal")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_listen_addresses_parse() {
        // TCP, and QUIC in a build with it.
        let expected = if cfg!(feature = "quic") { 2 } else { 1 };
        assert_eq!(super::Config::default().listen_addrs.len(), expected);
    }
}
