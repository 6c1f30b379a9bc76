//! Builds an eval report from generated outputs: per-example scores for every subject, and
//! aggregate metrics with seeded bootstrap intervals.
//!
//! Pure: generation (the student) and labeling (the teacher) happen elsewhere; this module
//! only scores what they produced.

use super::metrics::Scorer;
use super::stats::{self, Estimate};
use crate::dataset::Example;
use crate::report::{EvalReport, ExampleResult, SubjectReport, REPORT_SCHEMA};
use std::collections::{BTreeMap, HashMap};

/// One model's answer to one example, with what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    /// End-to-end time of the request.
    pub latency_ms: f64,
    /// Time to the first output token, when streamed.
    pub ttft_ms: Option<f64>,
    pub output_tokens: u32,
    /// What the request cost (provider pricing, or compute time × price per hour).
    pub cost_usd: f64,
}

/// Everything one subject (the student or the teacher) produced on the eval split.
#[derive(Debug, Clone)]
pub struct SubjectRun {
    /// `student` or `teacher`.
    pub name: String,
    pub model: String,
    /// Example id → generation. Examples without one are counted as missing.
    pub generations: HashMap<String, Generation>,
}

pub struct ReportMeta {
    pub pipeline: String,
    pub run_id: String,
    pub created_at: String,
    pub spec_sha256: String,
}

pub const TEACHER: &str = "teacher";

/// Scores every subject on every example and aggregates. Quality metrics compare with the
/// example's reference, or, where it has none, with the teacher's output (so the teacher is
/// scored only on examples with references). `teacher_agreement` applies to the student.
pub fn build_report(
    meta: ReportMeta,
    examples: &[Example],
    subjects: &[SubjectRun],
    metrics: &[String],
    scorer: &Scorer,
    bootstrap_samples: u32,
    seed: u64,
) -> EvalReport {
    let teacher = subjects.iter().find(|s| s.name == TEACHER);
    let quality: Vec<&str> =
        metrics.iter().map(String::as_str).filter(|m| !super::ALWAYS_MEASURED.contains(m)).collect();
    let mut results = Vec::with_capacity(examples.len());
    for example in examples {
        let teacher_text = teacher.and_then(|t| t.generations.get(&example.id)).map(|g| g.text.as_str());
        let mut outputs = BTreeMap::new();
        let mut scores = BTreeMap::new();
        let mut latency_ms = BTreeMap::new();
        for subject in subjects {
            let Some(generation) = subject.generations.get(&example.id) else { continue };
            let is_teacher = subject.name == TEACHER;
            let target = example.reference.as_deref().or(if is_teacher { None } else { teacher_text });
            let mut per_metric = BTreeMap::new();
            for metric in &quality {
                if is_teacher && *metric == "teacher_agreement" {
                    continue;
                }
                if let Some(score) = scorer.score(metric, &generation.text, target, teacher_text) {
                    per_metric.insert(metric.to_string(), score);
                }
            }
            outputs.insert(subject.name.clone(), generation.text.clone());
            scores.insert(subject.name.clone(), per_metric);
            latency_ms.insert(subject.name.clone(), generation.latency_ms);
        }
        results.push(ExampleResult {
            id: example.id.clone(),
            prompt: example.messages.last().map(|m| m.content.clone()).unwrap_or_default(),
            reference: example.reference.clone(),
            outputs,
            scores,
            latency_ms,
        });
    }

    let mut reports = BTreeMap::new();
    for subject in subjects {
        let mut agg = BTreeMap::new();
        let seed_for = |name: &str| seed ^ fnv1a(&format!("{}/{name}", subject.name));
        for metric in &quality {
            let values: Vec<f64> =
                results.iter().filter_map(|r| r.scores.get(&subject.name)?.get(*metric).copied()).collect();
            if !values.is_empty() {
                agg.insert(metric.to_string(), stats::bootstrap_mean(&values, bootstrap_samples, seed_for(metric)));
            }
        }
        // Generations in example order, so the bootstrap sees a stable sequence.
        let generations: Vec<&Generation> = examples.iter().filter_map(|e| subject.generations.get(&e.id)).collect();
        if generations.is_empty() {
            continue;
        }
        let latencies: Vec<f64> = generations.iter().map(|g| g.latency_ms).collect();
        for (name, q) in [("latency_p50_ms", 0.50), ("latency_p95_ms", 0.95), ("latency_p99_ms", 0.99)] {
            let est = stats::bootstrap(&latencies, &|v| stats::quantile(v, q), bootstrap_samples, seed_for(name));
            agg.insert(name.to_string(), est);
        }
        let ttfts: Vec<f64> = generations.iter().filter_map(|g| g.ttft_ms).collect();
        if ttfts.len() == generations.len() {
            for (name, q) in [("ttft_p50_ms", 0.50), ("ttft_p95_ms", 0.95), ("ttft_p99_ms", 0.99)] {
                let est = stats::bootstrap(&ttfts, &|v| stats::quantile(v, q), bootstrap_samples, seed_for(name));
                agg.insert(name.to_string(), est);
            }
        }
        let speeds: Vec<f64> = generations
            .iter()
            .filter(|g| g.latency_ms > 0.0)
            .map(|g| f64::from(g.output_tokens) / (g.latency_ms / 1000.0))
            .collect();
        if !speeds.is_empty() {
            agg.insert("tokens_per_s".into(), stats::bootstrap_mean(&speeds, bootstrap_samples, seed_for("tps")));
        }
        let per_1k: Vec<f64> = generations.iter().map(|g| g.cost_usd * 1000.0).collect();
        agg.insert("cost_per_1k_usd".into(), stats::bootstrap_mean(&per_1k, bootstrap_samples, seed_for("cost")));
        agg.insert(
            "coverage".into(),
            Estimate {
                value: generations.len() as f64 / examples.len().max(1) as f64,
                ci_low: generations.len() as f64 / examples.len().max(1) as f64,
                ci_high: generations.len() as f64 / examples.len().max(1) as f64,
                n: examples.len(),
            },
        );
        reports.insert(subject.name.clone(), SubjectReport { model: subject.model.clone(), metrics: agg });
    }
    EvalReport {
        schema: REPORT_SCHEMA.into(),
        pipeline: meta.pipeline,
        run_id: meta.run_id,
        created_at: meta.created_at,
        spec_sha256: meta.spec_sha256,
        subjects: reports,
        examples: results,
        decision: None,
    }
}

/// FNV-1a: a fixed hash to derive per-metric seeds (std's hasher may change between releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Message;
    use crate::spec::Normalize;

    fn example(i: usize, reference: Option<&str>) -> Example {
        Example {
            id: format!("e{i}"),
            messages: vec![Message { role: "user".into(), content: format!("q{i}") }],
            reference: reference.map(str::to_string),
        }
    }

    fn generation(text: &str, ms: f64) -> Generation {
        Generation { text: text.into(), latency_ms: ms, ttft_ms: None, output_tokens: 2, cost_usd: 0.001 }
    }

    fn run(examples: &[Example], student: &[(&str, f64)], teacher: &[&str]) -> EvalReport {
        let gens = |texts: Vec<(String, Generation)>| texts.into_iter().collect::<HashMap<_, _>>();
        let subjects = vec![
            SubjectRun {
                name: "student".into(),
                model: "tiny".into(),
                generations: gens(
                    student.iter().enumerate().map(|(i, (t, ms))| (format!("e{i}"), generation(t, *ms))).collect(),
                ),
            },
            SubjectRun {
                name: TEACHER.into(),
                model: "big".into(),
                generations: gens(
                    teacher.iter().enumerate().map(|(i, t)| (format!("e{i}"), generation(t, 500.0))).collect(),
                ),
            },
        ];
        let metrics: Vec<String> = ["exact_match", "teacher_agreement", "latency", "cost"].map(String::from).to_vec();
        let scorer = Scorer::new(Normalize::default(), None, None).expect("scorer");
        let meta =
            ReportMeta { pipeline: "p".into(), run_id: "r".into(), created_at: "t".into(), spec_sha256: "s".into() };
        build_report(meta, examples, &subjects, &metrics, &scorer, 200, 1)
    }

    #[test]
    fn scores_against_references_and_the_teacher() {
        let examples = [example(0, Some("billing")), example(1, Some("shipping")), example(2, None), example(3, None)];
        let r = run(
            &examples,
            &[("billing", 10.0), ("billing", 20.0), ("x", 30.0), ("y", 40.0)],
            &["billing", "shipping", "x", "z"],
        );
        let student = &r.subjects["student"].metrics;
        // exact_match: e0 right (reference), e1 wrong, e2 right (vs teacher), e3 wrong.
        assert_eq!(student["exact_match"].value, 0.5);
        assert_eq!(student["teacher_agreement"].value, 0.5);
        // The teacher is scored only where references exist, and never on agreement with itself.
        let teacher = &r.subjects["teacher"].metrics;
        assert_eq!(teacher["exact_match"], Estimate { value: 1.0, ci_low: 1.0, ci_high: 1.0, n: 2 });
        assert!(!teacher.contains_key("teacher_agreement"));
        assert!((student["latency_p50_ms"].value - 25.0).abs() < 1e-9);
        assert!((student["cost_per_1k_usd"].value - 1.0).abs() < 1e-12);
        assert_eq!(r.examples[2].scores["student"]["exact_match"], 1.0);
    }

    #[test]
    fn missing_generations_lower_coverage_not_scores() {
        let examples = [example(0, Some("a")), example(1, Some("b"))];
        let r = run(&examples, &[("a", 1.0)], &["a", "b"]);
        assert_eq!(r.subjects["student"].metrics["coverage"].value, 0.5);
        assert_eq!(r.subjects["student"].metrics["exact_match"].n, 1);
    }
}
