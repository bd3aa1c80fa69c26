//! Provider configuration: the guide's variables, their defaults and ranges, checked once with
//! every problem reported together.

use std::fmt;
use std::time::Duration;

use crate::assets::Assets;
use crate::client::{ApiKey, ClientConfig, DEFAULT_BASE_URL};

/// `BIRDEYE_API_KEY`.
pub const ENV_API_KEY: &str = "BIRDEYE_API_KEY";
/// `MESH_BIRDEYE_BASE_URL`.
pub const ENV_BASE_URL: &str = "MESH_BIRDEYE_BASE_URL";
/// `MESH_PROVIDER_ASSETS`.
pub const ENV_ASSETS: &str = "MESH_PROVIDER_ASSETS";
/// `MESH_PROVIDER_FETCH_INTERVAL_SECS`.
pub const ENV_FETCH_INTERVAL: &str = "MESH_PROVIDER_FETCH_INTERVAL_SECS";
/// `MESH_COORDINATION_WINDOW_SECS`.
pub const ENV_COORDINATION_WINDOW: &str = "MESH_COORDINATION_WINDOW_SECS";
/// `MESH_MESSAGE_TTL`: the hop TTL the provider gives the batches it originates.
pub const ENV_MESSAGE_TTL: &str = "MESH_MESSAGE_TTL";

/// Allowed fetch intervals, seconds.
pub const FETCH_INTERVAL_RANGE: (u64, u64) = (10, 300);
/// Allowed coordination windows, seconds.
pub const COORDINATION_WINDOW_RANGE: (u64, u64) = (2, 30);
/// Allowed originator TTLs.
pub const MESSAGE_TTL_RANGE: (u64, u64) = (5, 20);

/// Provider settings as an operator writes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `BIRDEYE_API_KEY`; provider mode can also be enabled later with a key.
    pub api_key: Option<ApiKey>,
    /// `MESH_BIRDEYE_BASE_URL`, default Birdeye's public API.
    pub base_url: String,
    /// `MESH_PROVIDER_ASSETS`, default the fixture tokens of BIRDEYE.md.
    pub assets: Assets,
    /// `MESH_PROVIDER_FETCH_INTERVAL_SECS`: the round length (30, 10..=300).
    pub fetch_interval_secs: u64,
    /// `MESH_COORDINATION_WINDOW_SECS`: how long each provider rank waits (5, 2..=30).
    pub coordination_window_secs: u64,
    /// `MESH_MESSAGE_TTL`: hop TTL of the batches this provider originates (10, 5..=20).
    pub message_ttl: u8,
    /// Added to every timestamp this provider stamps, in milliseconds: 0 in production; tests
    /// set it to play a provider whose clock is wrong. Not read from the environment.
    pub clock_offset_ms: i64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_key: None,
            base_url: DEFAULT_BASE_URL.to_owned(),
            assets: Assets::default(),
            fetch_interval_secs: 30,
            coordination_window_secs: 5,
            message_ttl: 10,
            clock_offset_ms: 0,
        }
    }
}

/// One configuration problem. The API key's value is never part of a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A number outside its range.
    #[error("{var}={value} is out of range {min}..={max}")]
    OutOfRange {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: u64,
        /// Lowest allowed.
        min: u64,
        /// Highest allowed.
        max: u64,
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
    /// The API key is set but unusable (its value is not shown).
    #[error("BIRDEYE_API_KEY is {0}")]
    BadApiKey(&'static str),
    /// The coordination window does not fit in a round.
    #[error(
        "MESH_COORDINATION_WINDOW_SECS={window} must be shorter than MESH_PROVIDER_FETCH_INTERVAL_SECS={interval}"
    )]
    WindowTooLong {
        /// The window.
        window: u64,
        /// The interval.
        interval: u64,
    },
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

fn check_range(errors: &mut Vec<ConfigError>, var: &'static str, value: u64, range: (u64, u64)) {
    if !(range.0..=range.1).contains(&value) {
        errors.push(ConfigError::OutOfRange { var, value, min: range.0, max: range.1 });
    }
}

impl Config {
    /// Checks every value; all problems at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        self.collect_errors(&mut errors);
        if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
    }

    fn collect_errors(&self, errors: &mut Vec<ConfigError>) {
        if let Some(key) = &self.api_key {
            if key.is_empty() {
                errors.push(ConfigError::BadApiKey("set but empty"));
            } else if !key.expose().bytes().all(|b| b.is_ascii_graphic()) {
                errors.push(ConfigError::BadApiKey("not printable ASCII without spaces"));
            }
        }
        match url::Url::parse(&self.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            Ok(_) => errors.push(ConfigError::Invalid {
                var: ENV_BASE_URL,
                value: self.base_url.clone(),
                reason: "not an http(s) URL".into(),
            }),
            Err(e) => errors.push(ConfigError::Invalid {
                var: ENV_BASE_URL,
                value: self.base_url.clone(),
                reason: e.to_string(),
            }),
        }
        check_range(errors, ENV_FETCH_INTERVAL, self.fetch_interval_secs, FETCH_INTERVAL_RANGE);
        check_range(
            errors,
            ENV_COORDINATION_WINDOW,
            self.coordination_window_secs,
            COORDINATION_WINDOW_RANGE,
        );
        check_range(errors, ENV_MESSAGE_TTL, u64::from(self.message_ttl), MESSAGE_TTL_RANGE);
        let in_range = |value: u64, range: (u64, u64)| (range.0..=range.1).contains(&value);
        if in_range(self.fetch_interval_secs, FETCH_INTERVAL_RANGE)
            && in_range(self.coordination_window_secs, COORDINATION_WINDOW_RANGE)
            && self.coordination_window_secs >= self.fetch_interval_secs
        {
            errors.push(ConfigError::WindowTooLong {
                window: self.coordination_window_secs,
                interval: self.fetch_interval_secs,
            });
        }
        if let Err(e) = Assets::new(self.assets.as_slice().to_vec()) {
            errors.push(ConfigError::Invalid {
                var: ENV_ASSETS,
                value: self.assets.to_string(),
                reason: e.to_string(),
            });
        }
    }

    /// Reads the variables through `lookup` (for example `|name| std::env::var(name).ok()`),
    /// keeping defaults for unset ones, and validates; every problem is reported together.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let mut config = Config::default();
        let mut errors = Vec::new();
        if let Some(key) = lookup(ENV_API_KEY) {
            config.api_key = Some(ApiKey::new(key));
        }
        if let Some(url) = lookup(ENV_BASE_URL) {
            config.base_url = url.trim().to_owned();
        }
        if let Some(text) = lookup(ENV_ASSETS) {
            match text.parse::<Assets>() {
                Ok(assets) => config.assets = assets,
                Err(e) => errors.push(ConfigError::Invalid {
                    var: ENV_ASSETS,
                    value: text,
                    reason: e.to_string(),
                }),
            }
        }
        let mut number = |var: &'static str, slot: &mut u64| {
            if let Some(text) = lookup(var) {
                match text.trim().parse::<u64>() {
                    Ok(value) => *slot = value,
                    Err(e) => errors.push(ConfigError::Invalid {
                        var,
                        value: text,
                        reason: e.to_string(),
                    }),
                }
            }
        };
        number(ENV_FETCH_INTERVAL, &mut config.fetch_interval_secs);
        number(ENV_COORDINATION_WINDOW, &mut config.coordination_window_secs);
        let mut ttl = u64::from(config.message_ttl);
        number(ENV_MESSAGE_TTL, &mut ttl);
        config.message_ttl = u8::try_from(ttl).unwrap_or(u8::MAX);
        if ttl > u64::from(u8::MAX) {
            errors.push(ConfigError::OutOfRange {
                var: ENV_MESSAGE_TTL,
                value: ttl,
                min: MESSAGE_TTL_RANGE.0,
                max: MESSAGE_TTL_RANGE.1,
            });
        } else {
            config.collect_errors(&mut errors);
        }
        if errors.is_empty() { Ok(config) } else { Err(ConfigErrors(errors)) }
    }

    /// The settings the provider loop runs with.
    pub fn settings(&self) -> Settings {
        Settings {
            interval: Duration::from_secs(self.fetch_interval_secs),
            window: Duration::from_secs(self.coordination_window_secs),
            message_ttl: self.message_ttl,
            assets: self.assets.clone(),
            client: ClientConfig { base_url: self.base_url.clone(), ..ClientConfig::default() },
            clock_offset_ms: self.clock_offset_ms,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        }
    }
}

/// What the provider loop runs with. Built from a validated [`Config`] with
/// [`Config::settings`]; tests build it directly with shorter rounds than the ranges allow.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Round length.
    pub interval: Duration,
    /// Coordination window: rank k waits k windows into the round.
    pub window: Duration,
    /// Hop TTL of originated batches.
    pub message_ttl: u8,
    /// What to fetch.
    pub assets: Assets,
    /// How to reach Birdeye.
    pub client: ClientConfig,
    /// Added to every timestamp stamped and to the wall clock the rounds follow (see
    /// [`Config::clock_offset_ms`]).
    pub clock_offset_ms: i64,
    /// The allowed clock skew (`MESH_MAX_CLOCK_SKEW_SECS`, 5 s): a provider whose clock is
    /// further off than this from Birdeye's, Redis's and peers' takes no lease and publishes
    /// nothing.
    pub max_clock_skew: Duration,
}

/// The default of [`Settings::max_clock_skew`] (the default `MESH_MAX_CLOCK_SKEW_SECS`).
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_are_the_guides_and_valid() {
        let config = Config::from_lookup(lookup(&[])).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.fetch_interval_secs, 30);
        assert_eq!(config.coordination_window_secs, 5);
        assert_eq!(config.base_url, "https://public-api.birdeye.so");
        assert_eq!(config.assets.len(), 9);
        assert!(config.api_key.is_none());
        let settings = config.settings();
        assert_eq!(settings.interval, Duration::from_secs(30));
        assert_eq!(settings.window, Duration::from_secs(5));
    }

    #[test]
    fn reads_every_variable() {
        let config = Config::from_lookup(lookup(&[
            ("BIRDEYE_API_KEY", "abc123"),
            ("MESH_BIRDEYE_BASE_URL", "http://127.0.0.1:8787"),
            ("MESH_PROVIDER_ASSETS", "solana:So11111111111111111111111111111111111111112"),
            ("MESH_PROVIDER_FETCH_INTERVAL_SECS", "10"),
            ("MESH_COORDINATION_WINDOW_SECS", "2"),
            ("MESH_MESSAGE_TTL", "7"),
        ]))
        .unwrap();
        assert_eq!(config.api_key.unwrap().expose(), "abc123");
        assert_eq!(config.base_url, "http://127.0.0.1:8787");
        assert_eq!(config.assets.len(), 1);
        assert_eq!((config.fetch_interval_secs, config.coordination_window_secs), (10, 2));
        assert_eq!(config.message_ttl, 7);
    }

    #[test]
    fn reports_every_error_at_once_without_the_key() {
        let err = Config::from_lookup(lookup(&[
            ("BIRDEYE_API_KEY", "secret with spaces"),
            ("MESH_BIRDEYE_BASE_URL", "ftp://x"),
            ("MESH_PROVIDER_ASSETS", "solana"),
            ("MESH_PROVIDER_FETCH_INTERVAL_SECS", "5"),
            ("MESH_COORDINATION_WINDOW_SECS", "abc"),
            ("MESH_MESSAGE_TTL", "30"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 6, "{text}");
        assert!(
            text.contains("MESH_PROVIDER_FETCH_INTERVAL_SECS=5 is out of range 10..=300"),
            "{text}"
        );
        assert!(text.contains("MESH_COORDINATION_WINDOW_SECS=\"abc\" is not valid"), "{text}");
        assert!(text.contains("MESH_MESSAGE_TTL=30 is out of range 5..=20"), "{text}");
        assert!(text.contains("MESH_PROVIDER_ASSETS"), "{text}");
        assert!(text.contains("MESH_BIRDEYE_BASE_URL"), "{text}");
        assert!(text.contains("BIRDEYE_API_KEY is"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn validate_checks_ranges_and_the_window_against_the_interval() {
        let config =
            Config { fetch_interval_secs: 10, coordination_window_secs: 30, ..Config::default() };
        let err = config.validate().unwrap_err();
        assert_eq!(err.0, [ConfigError::WindowTooLong { window: 30, interval: 10 }],);
        let config =
            Config { coordination_window_secs: 1, fetch_interval_secs: 301, ..Config::default() };
        assert_eq!(config.validate().unwrap_err().0.len(), 2);
        assert!(Config::default().validate().is_ok());
    }
}
