//! Discovery settings: the variables, their defaults and ranges, checked with every problem
//! reported together.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use mdns_sd::IfKind;

use mesh_protocol::AddrFilter;

use crate::bootstrap::{self, BootstrapPeer, MAX_BOOTSTRAP_PEERS};
use crate::txt::MAX_ADDRS;

/// `MESH_MDNS_ENABLED`: advertise and browse with mDNS (`true`).
pub const ENV_MDNS_ENABLED: &str = "MESH_MDNS_ENABLED";
/// `MESH_MDNS_INTERFACES`: comma-separated interfaces for mDNS; empty means all.
pub const ENV_MDNS_INTERFACES: &str = "MESH_MDNS_INTERFACES";
/// `MESH_MDNS_PORT`: the mDNS UDP port (5353; another one only for tests and demos).
pub const ENV_MDNS_PORT: &str = "MESH_MDNS_PORT";
/// `MESH_BOOTSTRAP_PEERS`: comma-separated multiaddrs ending with `/p2p/<peer id>`.
pub const ENV_BOOTSTRAP_PEERS: &str = "MESH_BOOTSTRAP_PEERS";
/// `MESH_BLE_ENABLED`: scan for BLE advertisements (builds with the `ble` feature only).
pub const ENV_BLE_ENABLED: &str = "MESH_BLE_ENABLED";
/// Whether loopback and private addresses learned from peers may be dialed (labs only).
pub const ENV_ALLOW_PRIVATE_ADDRS: &str = "MESH_ALLOW_PRIVATE_ADDRS";

/// The standard mDNS port.
pub const MDNS_PORT: u16 = 5353;
/// Most interfaces in `MESH_MDNS_INTERFACES`.
pub const MAX_INTERFACES: usize = 32;
/// Allowed event queue lengths.
pub const EVENT_QUEUE_RANGE: (usize, usize) = (1, 65_536);
/// Allowed numbers of peers tracked at once.
pub const TRACKED_PEERS_RANGE: (usize, usize) = (1, 65_536);
/// Allowed minimum intervals between two re-advertisements.
pub const READVERTISE_RANGE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(60));

/// One entry of `MESH_MDNS_INTERFACES`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MdnsInterface {
    /// `loopback`: the loopback interface, IPv4 and IPv6 (tests and demos on one host).
    Loopback,
    /// An interface by name, for example `eth0` or `lo`.
    Name(String),
    /// The interface that has this address.
    Addr(IpAddr),
}

/// An interface entry that cannot name an interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "interface {0:?} is not valid: expected `loopback`, an IP address, or a name of 1 to 15 characters without spaces, '/' or ','"
)]
pub struct BadInterface(pub String);

impl FromStr for MdnsInterface {
    type Err = BadInterface;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("loopback") {
            return Ok(MdnsInterface::Loopback);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(MdnsInterface::Addr(ip));
        }
        let valid = (1..=15).contains(&s.len())
            && s.chars().all(|c| c.is_ascii_graphic() && !matches!(c, '/' | ','));
        if valid {
            Ok(MdnsInterface::Name(s.to_owned()))
        } else {
            Err(BadInterface(s.chars().take(64).collect()))
        }
    }
}

impl fmt::Display for MdnsInterface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MdnsInterface::Loopback => f.write_str("loopback"),
            MdnsInterface::Name(name) => f.write_str(name),
            MdnsInterface::Addr(ip) => write!(f, "{ip}"),
        }
    }
}

impl MdnsInterface {
    /// The mdns-sd selection for this entry.
    pub fn if_kinds(&self) -> Vec<IfKind> {
        match self {
            MdnsInterface::Loopback => vec![IfKind::LoopbackV4, IfKind::LoopbackV6],
            MdnsInterface::Name(name) => vec![IfKind::Name(name.clone())],
            MdnsInterface::Addr(ip) => vec![IfKind::Addr(*ip)],
        }
    }

    /// Whether an interface address (interface `name`, address `ip`) is selected by this entry.
    pub fn matches(&self, name: &str, ip: IpAddr) -> bool {
        match self {
            MdnsInterface::Loopback => ip.is_loopback(),
            MdnsInterface::Name(n) => n == name,
            MdnsInterface::Addr(a) => *a == ip,
        }
    }
}

/// Everything discovery needs besides the node's peer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `MESH_MDNS_ENABLED` (true).
    pub mdns_enabled: bool,
    /// `MESH_MDNS_INTERFACES`: where mDNS runs; empty (the default) means every interface.
    /// Tests, demos and benchmarks use `[MdnsInterface::Loopback]` ([`Config::loopback`]).
    pub mdns_interfaces: Vec<MdnsInterface>,
    /// `MESH_MDNS_PORT` (5353). Every node of one mesh must use the same port.
    pub mdns_port: u16,
    /// `MESH_BOOTSTRAP_PEERS` (none).
    pub bootstrap_peers: Vec<BootstrapPeer>,
    /// `MESH_BLE_ENABLED`: false by default, so a node scans only when told to; true is allowed
    /// only in builds with the `ble` feature.
    pub ble_enabled: bool,
    /// Events waiting for the node before discovery waits for it.
    pub event_queue_len: usize,
    /// Addresses kept per peer (1..=16).
    pub max_addrs_per_peer: usize,
    /// Peers tracked at once per source; advertisements of further peers are ignored.
    pub max_tracked_peers: usize,
    /// Shortest time between two mDNS re-advertisements; changes in between are merged.
    pub readvertise_interval: Duration,
    /// `MESH_ALLOW_PRIVATE_ADDRS` (false): which advertised addresses are kept. mDNS keeps
    /// private networks anyway (it does not cross routers); loopback needs the lab setting.
    pub addr_filter: AddrFilter,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mdns_enabled: true,
            mdns_interfaces: Vec::new(),
            mdns_port: MDNS_PORT,
            bootstrap_peers: Vec::new(),
            ble_enabled: false,
            event_queue_len: 256,
            max_addrs_per_peer: MAX_ADDRS,
            max_tracked_peers: 1024,
            readvertise_interval: Duration::from_secs(1),
            addr_filter: AddrFilter::default(),
        }
    }
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A number outside its range.
    #[error("{var}={value} is out of range {min}..={max}")]
    OutOfRange {
        /// The variable or field.
        var: &'static str,
        /// Its value.
        value: String,
        /// Lowest allowed.
        min: String,
        /// Highest allowed.
        max: String,
    },
    /// A value that does not parse.
    #[error("{var}={value:?} is not valid: {reason}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A bad bootstrap entry.
    #[error("MESH_BOOTSTRAP_PEERS: {0}")]
    Bootstrap(#[from] bootstrap::BootstrapError),
    /// `MESH_BLE_ENABLED=true` in a build without BLE.
    #[error(
        "MESH_BLE_ENABLED=true but this build has no BLE support (cargo feature `ble`: \
         cargo build --release -p mesh-node --features ble)"
    )]
    BleNotBuilt,
}

/// Every problem of a configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

fn check_range<T: PartialOrd + fmt::Debug>(
    errors: &mut Vec<ConfigError>,
    var: &'static str,
    value: T,
    range: (T, T),
) {
    if value < range.0 || value > range.1 {
        errors.push(ConfigError::OutOfRange {
            var,
            value: format!("{value:?}"),
            min: format!("{:?}", range.0),
            max: format!("{:?}", range.1),
        });
    }
}

fn parse_bool(var: &'static str, text: &str) -> Result<bool, ConfigError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Invalid {
            var,
            value: text.to_owned(),
            reason: "expected true or false".into(),
        }),
    }
}

/// Parses a `MESH_MDNS_INTERFACES` value (blank entries skipped; empty means all).
pub fn parse_interfaces(text: &str) -> Result<Vec<MdnsInterface>, BadInterface> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect()
}

impl Config {
    /// mDNS on the loopback interface only, on `port`, without BLE, loopback addresses allowed
    /// ([`AddrFilter::lab`]): what tests, demos and benchmarks on one machine use.
    pub fn loopback(port: u16) -> Self {
        Self {
            mdns_interfaces: vec![MdnsInterface::Loopback],
            mdns_port: port,
            ble_enabled: false,
            addr_filter: AddrFilter::lab(),
            ..Self::default()
        }
    }

    /// Checks every value; all problems at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        self.collect_errors(&mut errors);
        if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
    }

    fn collect_errors(&self, errors: &mut Vec<ConfigError>) {
        if self.mdns_port == 0 {
            errors.push(ConfigError::OutOfRange {
                var: ENV_MDNS_PORT,
                value: "0".into(),
                min: "1".into(),
                max: "65535".into(),
            });
        }
        check_range(errors, ENV_MDNS_INTERFACES, self.mdns_interfaces.len(), (0, MAX_INTERFACES));
        check_range(
            errors,
            ENV_BOOTSTRAP_PEERS,
            self.bootstrap_peers.len(),
            (0, MAX_BOOTSTRAP_PEERS),
        );
        check_range(errors, "event_queue_len", self.event_queue_len, EVENT_QUEUE_RANGE);
        check_range(errors, "max_addrs_per_peer", self.max_addrs_per_peer, (1, MAX_ADDRS));
        check_range(errors, "max_tracked_peers", self.max_tracked_peers, TRACKED_PEERS_RANGE);
        check_range(errors, "readvertise_interval", self.readvertise_interval, READVERTISE_RANGE);
        if self.ble_enabled && !cfg!(feature = "ble") {
            errors.push(ConfigError::BleNotBuilt);
        }
    }

    /// Reads the variables through `lookup` (for example `|name| std::env::var(name).ok()`),
    /// keeping defaults for unset ones, and validates; every problem is reported together.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let mut config = Config::default();
        let mut errors = Vec::new();
        if let Some(text) = lookup(ENV_MDNS_ENABLED) {
            match parse_bool(ENV_MDNS_ENABLED, &text) {
                Ok(on) => config.mdns_enabled = on,
                Err(e) => errors.push(e),
            }
        }
        if let Some(text) = lookup(ENV_MDNS_INTERFACES) {
            match parse_interfaces(&text) {
                Ok(list) => config.mdns_interfaces = list,
                Err(e) => errors.push(ConfigError::Invalid {
                    var: ENV_MDNS_INTERFACES,
                    value: text,
                    reason: e.to_string(),
                }),
            }
        }
        if let Some(text) = lookup(ENV_MDNS_PORT) {
            match text.trim().parse::<u16>() {
                Ok(port) => config.mdns_port = port,
                Err(e) => errors.push(ConfigError::Invalid {
                    var: ENV_MDNS_PORT,
                    value: text,
                    reason: e.to_string(),
                }),
            }
        }
        if let Some(text) = lookup(ENV_BOOTSTRAP_PEERS) {
            match bootstrap::parse_list(&text) {
                Ok(peers) => config.bootstrap_peers = peers,
                Err(bad) => errors.extend(bad.into_iter().map(ConfigError::Bootstrap)),
            }
        }
        if let Some(text) = lookup(ENV_BLE_ENABLED) {
            match parse_bool(ENV_BLE_ENABLED, &text) {
                Ok(on) => config.ble_enabled = on,
                Err(e) => errors.push(e),
            }
        }
        if let Some(text) = lookup(ENV_ALLOW_PRIVATE_ADDRS) {
            match parse_bool(ENV_ALLOW_PRIVATE_ADDRS, &text) {
                Ok(on) => config.addr_filter = AddrFilter { allow_private: on },
                Err(e) => errors.push(e),
            }
        }
        config.collect_errors(&mut errors);
        if errors.is_empty() { Ok(config) } else { Err(ConfigErrors(errors)) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use libp2p_identity::PeerId;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_are_valid_and_mean_all_interfaces_on_5353() {
        let config = Config::default();
        config.validate().unwrap();
        assert!(config.mdns_enabled);
        assert!(config.mdns_interfaces.is_empty());
        assert_eq!(config.mdns_port, 5353);
        assert!(!config.ble_enabled, "BLE scans only when MESH_BLE_ENABLED=true");
        assert_eq!(config.addr_filter, AddrFilter::PUBLIC, "public addresses only by default");
        assert_eq!(Config::from_lookup(lookup(&[])).unwrap(), config);
        Config::loopback(5454).validate().unwrap();
    }

    #[test]
    fn variables_are_read() {
        let peer = PeerId::random();
        let config = Config::from_lookup(lookup(&[
            ("MESH_MDNS_ENABLED", "false"),
            ("MESH_MDNS_INTERFACES", "lo, loopback ,192.168.1.2,"),
            ("MESH_MDNS_PORT", "5454"),
            ("MESH_BOOTSTRAP_PEERS", &format!("/ip4/203.0.113.1/tcp/4001/p2p/{peer}")),
            ("MESH_BLE_ENABLED", "off"),
            ("MESH_ALLOW_PRIVATE_ADDRS", "true"),
        ]))
        .unwrap();
        assert!(!config.mdns_enabled);
        assert_eq!(
            config.mdns_interfaces,
            vec![
                MdnsInterface::Name("lo".into()),
                MdnsInterface::Loopback,
                MdnsInterface::Addr("192.168.1.2".parse().unwrap())
            ]
        );
        assert_eq!(config.mdns_port, 5454);
        assert_eq!(config.bootstrap_peers.len(), 1);
        assert_eq!(config.bootstrap_peers[0].peer_id, peer);
        assert!(!config.ble_enabled);
        assert_eq!(config.addr_filter, AddrFilter::lab());
        let all = Config::from_lookup(lookup(&[("MESH_MDNS_INTERFACES", " ")])).unwrap();
        assert!(all.mdns_interfaces.is_empty(), "empty means every interface");
    }

    #[test]
    fn every_problem_is_reported_together() {
        let errors = Config::from_lookup(lookup(&[
            ("MESH_MDNS_ENABLED", "maybe"),
            ("MESH_MDNS_INTERFACES", "eth0,this-name-is-far-too-long"),
            ("MESH_MDNS_PORT", "0"),
            ("MESH_BOOTSTRAP_PEERS", "/ip4/1.2.3.4/tcp/1,nonsense"),
            ("MESH_ALLOW_PRIVATE_ADDRS", "sometimes"),
        ]))
        .unwrap_err();
        let text = errors.to_string();
        for needle in [
            "MESH_MDNS_ENABLED=\"maybe\"",
            "this-name-is-far-too-long",
            "MESH_MDNS_PORT=0 is out of range",
            "\"/ip4/1.2.3.4/tcp/1\" does not end with /p2p/<peer id>",
            "\"nonsense\" is not a multiaddr",
            "MESH_ALLOW_PRIVATE_ADDRS=\"sometimes\"",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        assert_eq!(errors.0.len(), 6, "{text}");

        let config = Config {
            event_queue_len: 0,
            max_addrs_per_peer: 17,
            max_tracked_peers: 0,
            readvertise_interval: Duration::from_secs(61),
            ..Config::default()
        };
        assert_eq!(config.validate().unwrap_err().0.len(), 4);
    }

    #[test]
    fn ble_is_only_allowed_in_builds_with_the_feature() {
        let result = Config::from_lookup(lookup(&[("MESH_BLE_ENABLED", "true")]));
        if cfg!(feature = "ble") {
            assert!(result.unwrap().ble_enabled);
        } else {
            assert_eq!(result.unwrap_err().0, vec![ConfigError::BleNotBuilt]);
        }
    }

    #[test]
    fn interface_entries_parse() {
        assert_eq!("LOOPBACK".parse(), Ok(MdnsInterface::Loopback));
        assert_eq!("::1".parse(), Ok(MdnsInterface::Addr("::1".parse().unwrap())));
        assert_eq!("wlan0".parse(), Ok(MdnsInterface::Name("wlan0".into())));
        for bad in ["", "a b", "x/y", "sixteen-chars-xx"] {
            assert!(bad.parse::<MdnsInterface>().is_err(), "{bad:?}");
        }
        assert!(MdnsInterface::Loopback.matches("lo", "127.0.0.1".parse().unwrap()));
        assert!(!MdnsInterface::Loopback.matches("eth0", "10.0.0.1".parse().unwrap()));
        assert!(MdnsInterface::Name("eth0".into()).matches("eth0", "10.0.0.1".parse().unwrap()));
    }
}
