//! Evaluation of a candidate against references and the teacher.
//!
//! This module knows which metrics exist and what values each one yields; the spec
//! validator and the gate ask it, so an unknown name fails at validate time.

pub mod aggregate;
pub mod metrics;
pub mod stats;

/// A metric a spec may list under `eval.metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricInfo {
    pub name: &'static str,
    /// The values it yields, by the names a gate clause uses.
    pub yields: &'static [&'static str],
    pub summary: &'static str,
}

pub const METRICS: &[MetricInfo] = &[
    MetricInfo {
        name: "exact_match",
        yields: &["exact_match"],
        summary: "output equals the reference after normalisation",
    },
    MetricInfo { name: "contains", yields: &["contains"], summary: "output contains the reference" },
    MetricInfo { name: "regex", yields: &["regex"], summary: "output matches `eval.regex`" },
    MetricInfo { name: "json_valid", yields: &["json_valid"], summary: "output parses as JSON" },
    MetricInfo {
        name: "json_schema",
        yields: &["json_schema"],
        summary: "output validates against `eval.json_schema`",
    },
    MetricInfo { name: "token_f1", yields: &["token_f1"], summary: "token-level F1 (SQuAD definition)" },
    MetricInfo { name: "rouge_l", yields: &["rouge_l"], summary: "ROUGE-L F-measure" },
    MetricInfo { name: "chrf", yields: &["chrf"], summary: "character n-gram F-score (chrF)" },
    MetricInfo {
        name: "teacher_agreement",
        yields: &["teacher_agreement"],
        summary: "student output equals the teacher's",
    },
    MetricInfo {
        name: "latency",
        yields: &["latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms"],
        summary: "per-request latency and time to first token",
    },
    MetricInfo { name: "throughput", yields: &["tokens_per_s"], summary: "generated tokens per second" },
    MetricInfo { name: "cost", yields: &["cost_per_1k_usd"], summary: "cost per 1,000 requests" },
];

/// Values every eval measures whether listed or not: they cost nothing extra to record.
pub const ALWAYS_MEASURED: &[&str] = &["latency", "throughput", "cost"];

pub fn metric(name: &str) -> Option<&'static MetricInfo> {
    METRICS.iter().find(|m| m.name == name)
}

/// Which metric yields a gate value (`latency_p95_ms` → `latency`).
pub fn metric_yielding(value: &str) -> Option<&'static MetricInfo> {
    METRICS.iter().find(|m| m.yields.contains(&value))
}

/// Metrics that need a reference (the dataset's or the teacher's output) to compare with.
pub fn needs_reference(name: &str) -> bool {
    !matches!(name, "json_valid" | "json_schema" | "regex" | "latency" | "throughput" | "cost")
}
