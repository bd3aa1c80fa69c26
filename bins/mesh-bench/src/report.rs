//! Shared shape of the JSON the benchmarks print.

use serde::Serialize;
use std::borrow::Cow;
use std::time::Duration;

/// One measured figure next to its goal.
#[derive(Debug, Serialize)]
pub struct Figure {
    /// What was measured.
    pub name: Cow<'static, str>,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The goal, as text (`>= 15000`).
    pub goal: Option<String>,
    /// Whether the goal was met (absent when there is no goal).
    pub met: Option<bool>,
}

impl Figure {
    /// A figure without a goal.
    pub fn plain(name: impl Into<Cow<'static, str>>, value: f64, unit: &'static str) -> Self {
        Self { name: name.into(), value, unit, goal: None, met: None }
    }

    /// A figure that should be at least `goal`.
    pub fn at_least(
        name: impl Into<Cow<'static, str>>,
        value: f64,
        unit: &'static str,
        goal: f64,
    ) -> Self {
        let met = Some(value >= goal);
        Self { name: name.into(), value, unit, goal: Some(format!(">= {goal}")), met }
    }

    /// A figure that should be at most `goal`.
    pub fn at_most(
        name: impl Into<Cow<'static, str>>,
        value: f64,
        unit: &'static str,
        goal: f64,
    ) -> Self {
        let met = Some(value <= goal);
        Self { name: name.into(), value, unit, goal: Some(format!("<= {goal}")), met }
    }
}

/// The document a subcommand prints.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The subcommand.
    pub bench: &'static str,
    /// Parameters of the run.
    pub params: serde_json::Value,
    /// The figures.
    pub figures: Vec<Figure>,
}

/// Operations per second of `ops` operations done in `elapsed`.
pub fn per_sec(ops: usize, elapsed: Duration) -> f64 {
    ops as f64 / elapsed.as_secs_f64()
}
