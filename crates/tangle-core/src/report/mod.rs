//! Eval reports (`report.json`, `report.md`) and their comparison (`tangle diff`).
//!
//! `report.json` is versioned by its `schema` field; `docs` of every field are on the types
//! below. Pure: reading and writing files is the caller's business.

pub mod diff;

use crate::eval::stats::Estimate;
use crate::gate::{round, Decision};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

pub const REPORT_SCHEMA: &str = "tangle.report/1";

/// The evaluation of a candidate student (and the teacher) on the eval split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    /// `tangle.report/1`.
    pub schema: String,
    pub pipeline: String,
    pub run_id: String,
    pub created_at: String,
    /// sha256 of the spec file that produced the run.
    pub spec_sha256: String,
    /// `student`, `teacher`: who was evaluated, and the aggregate metrics.
    pub subjects: BTreeMap<String, SubjectReport>,
    /// Per-example outputs and scores, the basis of every aggregate and of `tangle diff`.
    pub examples: Vec<ExampleResult>,
    /// The gate's verdict, when the pipeline has a gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubjectReport {
    /// The model evaluated (hub id, path, or the teacher's target models).
    pub model: String,
    /// Metric name → mean over examples with its 95% bootstrap interval. Latency values are
    /// milliseconds, costs USD, throughput tokens per second.
    pub metrics: BTreeMap<String, Estimate>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExampleResult {
    pub id: String,
    /// The last user message, for reading; the full prompt is in the split's files.
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Subject → its output.
    pub outputs: BTreeMap<String, String>,
    /// Subject → metric → score in [0, 1].
    pub scores: BTreeMap<String, BTreeMap<String, f64>>,
    /// Subject → end-to-end latency of this request in milliseconds.
    #[serde(default)]
    pub latency_ms: BTreeMap<String, f64>,
}

/// Metrics scored right/wrong per example, where flips and McNemar's test apply.
pub fn is_binary_metric(metric: &str) -> bool {
    matches!(metric, "exact_match" | "contains" | "regex" | "json_valid" | "json_schema" | "teacher_agreement")
}

/// Whether a larger value of the metric is better.
pub fn higher_is_better(metric: &str) -> bool {
    !(metric.starts_with("latency") || metric.starts_with("ttft") || metric.starts_with("cost"))
}

fn estimate_cell(e: &Estimate) -> String {
    format!("{} [{}, {}]", round(e.value), round(e.ci_low), round(e.ci_high))
}

impl EvalReport {
    /// `report.md`: metrics side by side with their intervals, then the gate's verdict.
    pub fn to_markdown(&self) -> String {
        let mut out = format!("# Eval report: {} (run {})\n\n", self.pipeline, self.run_id);
        let subjects: Vec<&String> = self.subjects.keys().collect();
        let _ = writeln!(
            out,
            "{} eval examples. Values are means with 95% bootstrap confidence intervals.\n",
            self.examples.len()
        );
        let _ = writeln!(out, "| metric | {} |", subjects.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(out, "| --- |{}", " --- |".repeat(subjects.len()));
        let mut metrics: Vec<&String> = self.subjects.values().flat_map(|s| s.metrics.keys()).collect();
        metrics.sort();
        metrics.dedup();
        for metric in metrics {
            let cells: Vec<String> = subjects
                .iter()
                .map(|s| self.subjects[*s].metrics.get(metric).map_or_else(|| "—".to_string(), estimate_cell))
                .collect();
            let _ = writeln!(out, "| {metric} | {} |", cells.join(" | "));
        }
        for s in &subjects {
            let _ = writeln!(out, "\n{s}: `{}`", self.subjects[*s].model);
        }
        if let Some(d) = &self.decision {
            let verdict = if d.promote { "**promote**" } else { "**reject**" };
            let _ = writeln!(out, "\n## Gate: {verdict}\n\n{}\n", d.reason);
            let _ = writeln!(out, "| clause | left | right | result |\n| --- | --- | --- | --- |");
            for c in &d.clauses {
                let side = |v: Option<f64>| v.map_or_else(|| "—".into(), round);
                let result = if c.pass { "pass" } else { "FAIL" };
                let _ = writeln!(out, "| `{}` | {} | {} | {result} |", c.clause, side(c.lhs), side(c.rhs));
            }
        }
        out
    }
}
