//! The sources of configuration values, merged in order of precedence.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// One bad value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every problem of a configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join("\n  "))]
pub struct ConfigError(pub Vec<Problem>);

/// Where configuration values come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A TOML file (`--config`).
    pub file: Option<PathBuf>,
    /// A `.env` file; `None` reads `./.env` when it exists.
    pub dotenv: Option<PathBuf>,
    /// Read the process environment.
    pub environment: bool,
    /// Values set on the command line (highest precedence).
    pub overrides: BTreeMap<String, String>,
}

/// Merges the sources into one name -> value map (names upper case).
pub fn merge(sources: &Sources) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(file) = &sources.file {
        builder =
            builder.add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml));
    }
    let dotenv =
        sources.dotenv.clone().or_else(|| Some(PathBuf::from(".env")).filter(|p| p.exists()));
    if let Some(path) = dotenv {
        let mut map = config::Map::new();
        let entries = dotenvy::from_path_iter(&path)
            .map_err(|e| ConfigError(vec![Problem(format!("{}: {e}", path.display()))]))?;
        for entry in entries {
            let (k, v) = entry
                .map_err(|e| ConfigError(vec![Problem(format!("{}: {e}", path.display()))]))?;
            map.insert(k.to_lowercase(), config::Value::from(v));
        }
        builder = builder.add_source(MapSource(map));
    }
    if sources.environment {
        let mut map = config::Map::new();
        for (k, v) in std::env::vars() {
            map.insert(k.to_lowercase(), config::Value::from(v));
        }
        builder = builder.add_source(MapSource(map));
    }
    for (k, v) in &sources.overrides {
        builder = builder
            .set_override(k.to_lowercase(), v.clone())
            .map_err(|e| ConfigError(vec![Problem(e.to_string())]))?;
    }
    let merged = builder.build().map_err(|e| ConfigError(vec![Problem(e.to_string())]))?;
    let table: BTreeMap<String, config::Value> =
        merged.try_deserialize().map_err(|e| ConfigError(vec![Problem(e.to_string())]))?;
    let mut out = BTreeMap::new();
    for (k, v) in table {
        let key = k.to_uppercase();
        if let Ok(s) = v.clone().into_string() {
            out.insert(key, s);
        } else if let Ok(list) = v.into_array() {
            let items: Vec<String> =
                list.into_iter().filter_map(|i| i.into_string().ok()).collect();
            out.insert(key, items.join(","));
        }
    }
    Ok(out)
}

/// A fixed map as a `config` source (keys already lower case).
#[derive(Debug, Clone)]
struct MapSource(config::Map<String, config::Value>);

impl config::Source for MapSource {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}
