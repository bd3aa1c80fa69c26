//! The configuration is written down in three places that must agree: the node's own list
//! (`mesh_service::VARIABLES`, which `mesh-node variables` prints), the README's configuration
//! reference table, and `deploy/.env.example`, which also carries mesh-api's variables (read
//! here from the `env = "..."` attributes of its command line) and the variable of the systemd
//! unit. The topology profiles in `deploy/profiles` must hold the guide's values and pass the
//! node's validation, and so must every example value of `.env.example`.
#![allow(clippy::expect_used, clippy::panic)] // helpers of tests

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use mesh_service::{NodeConfig, VARIABLES};

/// Variables that only the deployment reads: `mesh-node.service` runs `mesh-node $MESH_NODE_ARGS`.
const DEPLOYMENT_ONLY: &[&str] = &["MESH_NODE_ARGS"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn node_names() -> BTreeSet<String> {
    VARIABLES.iter().map(|v| v.name.to_owned()).collect()
}

/// Names present in one set and not the other, for assertion messages.
fn difference(a: &BTreeSet<String>, b: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (a.difference(b).cloned().collect(), b.difference(a).cloned().collect())
}

/// One row of the README's configuration reference.
struct Row {
    default: String,
    range: String,
}

/// The table under "### Configuration reference": `| `NAME` | default | range | meaning |`.
fn readme_table() -> BTreeMap<String, Row> {
    let readme = read("README.md");
    let start = readme.find("### Configuration reference").expect("README has the reference");
    let mut rows = BTreeMap::new();
    for line in readme[start..].lines().skip(1) {
        let line = line.trim();
        if line.starts_with("#") {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // A row is ["", "`NAME`", default, range, meaning, ""].
        if cells.len() < 6 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`').to_owned();
        let plain = |s: &str| s.replace('`', "");
        // "(unset)", "(unset: all)", "(unset: SQLite in ...)" all mean no default.
        let default = if cells[2].starts_with("(unset") { String::new() } else { plain(cells[2]) };
        let previous = rows.insert(name.clone(), Row { default, range: plain(cells[3]) });
        assert!(previous.is_none(), "README lists {name} twice");
    }
    assert!(!rows.is_empty(), "no rows found in the README's configuration reference");
    rows
}

/// One variable of `.env.example`: the comment block above `#NAME=value` and the value.
#[derive(Debug)]
struct Entry {
    comment: String,
    value: String,
}

fn env_example() -> BTreeMap<String, Entry> {
    let text = read("deploy/.env.example");
    let mut entries = BTreeMap::new();
    let mut comment = String::new();
    for line in text.lines() {
        let body = line.strip_prefix('#').unwrap_or(line);
        let assignment = body.split_once('=').filter(|(name, _)| {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        });
        match assignment {
            Some((name, value)) => {
                let entry =
                    Entry { comment: std::mem::take(&mut comment), value: value.to_owned() };
                assert!(!entry.comment.is_empty(), ".env.example: {name} has no comment above it");
                let previous = entries.insert(name.to_owned(), entry);
                assert!(previous.is_none(), ".env.example lists {name} twice");
            }
            None if line.trim().is_empty() => comment.clear(),
            None => {
                comment.push_str(body.trim());
                comment.push(' ');
            }
        }
    }
    entries
}

/// mesh-api's variables: the `env = "NAME"` attributes of its command line.
fn api_names() -> BTreeSet<String> {
    let source = read("bins/mesh-api-bin/src/main.rs");
    let names: BTreeSet<String> = source
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_owned()))
        .collect();
    assert!(names.contains("MESH_API_LISTEN"), "mesh-api's variables not found: {names:?}");
    names
}

fn is_numeric_range(range: &str) -> bool {
    range
        .split_once('-')
        .is_some_and(|(lo, hi)| lo.parse::<f64>().is_ok() && hi.parse::<f64>().is_ok())
}

/// Reads a profile: `NAME=value` lines and comments, nothing else.
fn profile(name: &str) -> BTreeMap<String, String> {
    let path = format!("deploy/profiles/{name}.env");
    let mut values = BTreeMap::new();
    for line in read(&path).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{path}: {line:?}"));
        assert!(node_names().contains(k), "{path}: {k} is not a mesh-node variable");
        values.insert(k.to_owned(), v.to_owned());
    }
    values
}

#[test]
fn readme_table_lists_the_node_variables_with_their_defaults_and_ranges() {
    let table = readme_table();
    let documented: BTreeSet<String> = table.keys().cloned().collect();
    let (missing, unknown) = difference(&node_names(), &documented);
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README table vs mesh-node variables: missing from the README {missing:?}, \
         not variables of mesh-node {unknown:?}"
    );
    for v in VARIABLES {
        let row = &table[v.name];
        assert_eq!(row.default, v.default, "README default of {}", v.name);
        if is_numeric_range(v.range) {
            assert_eq!(row.range, v.range, "README range of {}", v.name);
        }
    }
}

#[test]
fn env_example_lists_every_variable_of_node_api_and_units() {
    let entries = env_example();
    let listed: BTreeSet<String> = entries.keys().cloned().collect();
    let mut expected = node_names();
    expected.extend(api_names());
    expected.extend(DEPLOYMENT_ONLY.iter().map(|s| (*s).to_owned()));
    let (missing, unknown) = difference(&expected, &listed);
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "deploy/.env.example: missing {missing:?}, not read by mesh-node, mesh-api or the units \
         {unknown:?}"
    );
    for (name, entry) in &entries {
        assert!(entry.comment.contains("Default"), ".env.example: {name} has no default");
    }
    for v in VARIABLES {
        let entry = &entries[v.name];
        assert!(
            entry.comment.contains("range") || entry.comment.contains("Range"),
            ".env.example: {} has no range",
            v.name
        );
        if is_numeric_range(v.range) {
            assert!(
                entry.comment.contains(&format!("range {}", v.range)),
                ".env.example: {} should say `range {}`: {:?}",
                v.name,
                v.range,
                entry.comment
            );
        }
        // The commented-out value is the default, unless it is an example of a secret or of a
        // default that is not a single value ("the 9 fixture tokens").
        if !v.secret && !v.default.contains(' ') {
            assert_eq!(entry.value, v.default, ".env.example: value of {}", v.name);
        }
    }
}

#[test]
fn env_example_values_pass_the_node_validation() {
    let node = node_names();
    let values: BTreeMap<String, String> = env_example()
        .into_iter()
        .filter(|(name, _)| node.contains(name))
        .map(|(name, entry)| (name, entry.value))
        .collect();
    if let Err(e) = NodeConfig::from_map(&values, false) {
        panic!("deploy/.env.example, uncommented, is refused by mesh-node: {e}");
    }
}

#[test]
fn profiles_hold_the_guide_topologies_and_pass_the_node_validation() {
    // The guide's "Network Topology Recommendations": min and max peer connections, TTL.
    let guide =
        [("small", ["2", "5", "5"]), ("medium", ["3", "8", "7"]), ("large", ["3", "10", "10"])];
    for (name, [min, max, ttl]) in guide {
        let values = profile(name);
        assert_eq!(values["MESH_MIN_PEER_CONNECTIONS"], min, "{name}: min peer connections");
        assert_eq!(values["MESH_MAX_PEER_CONNECTIONS"], max, "{name}: max peer connections");
        assert_eq!(values["MESH_MESSAGE_TTL"], ttl, "{name}: message TTL");
    }
    assert_eq!(profile("large")["MESH_SEEN_MESSAGES_CACHE_SIZE"], "20000");
    let dir = repo().join("deploy/profiles");
    let mut seen = 0;
    for file in std::fs::read_dir(&dir).expect("deploy/profiles") {
        let path = file.expect("profile entry").path();
        let Some(name) =
            path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".env"))
        else {
            continue;
        };
        seen += 1;
        if let Err(e) = NodeConfig::from_map(&profile(name), false) {
            panic!("deploy/profiles/{name}.env is refused by mesh-node: {e}");
        }
    }
    assert!(seen >= 3, "expected the small, medium and large profiles, found {seen}");
}
