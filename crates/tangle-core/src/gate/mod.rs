//! The gate: promote or reject a candidate from measured metrics, clause by clause.
//!
//! Pure: the caller supplies metric values; the gate returns a [`Decision`] that names every
//! clause with its numbers, which becomes `decision.json`.

pub mod clause;

use clause::{Clause, MetricRef, Subject};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const DECISION_SCHEMA: &str = "tangle.decision/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    pub schema: String,
    pub promote: bool,
    /// One line: which clauses failed, or that all held.
    pub reason: String,
    pub clauses: Vec<ClauseResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClauseResult {
    pub clause: String,
    pub pass: bool,
    pub lhs: Option<f64>,
    pub op: String,
    pub rhs: Option<f64>,
    /// The value of every metric the clause read, by reference (`teacher.exact_match`).
    pub values: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Evaluates each clause. `lookup` answers a metric reference; `None` for a deployed
/// alias means nothing is deployed yet, and a clause comparing with it holds (the first
/// version has nothing to beat); `None` for anything else fails the clause.
pub fn evaluate(clauses: &[Clause], lookup: &dyn Fn(&MetricRef) -> Option<f64>) -> Decision {
    let results: Vec<ClauseResult> = clauses.iter().map(|clause| evaluate_clause(clause, lookup)).collect();
    let failed: Vec<&ClauseResult> = results.iter().filter(|r| !r.pass).collect();
    let reason = if failed.is_empty() {
        format!("all {} clause{} held", results.len(), if results.len() == 1 { "" } else { "s" })
    } else {
        failed.iter().map(|r| describe_failure(r)).collect::<Vec<_>>().join("; ")
    };
    Decision { schema: DECISION_SCHEMA.into(), promote: failed.is_empty(), reason, clauses: results }
}

fn evaluate_clause(clause: &Clause, lookup: &dyn Fn(&MetricRef) -> Option<f64>) -> ClauseResult {
    let mut values = BTreeMap::new();
    let mut missing_deployed = None;
    let mut missing = None;
    for r in clause.references() {
        match lookup(r) {
            Some(v) => {
                values.insert(r.to_string(), v);
            }
            None if matches!(r.subject, Subject::Deployed(_)) => missing_deployed = Some(r.to_string()),
            None => missing = Some(r.to_string()),
        }
    }
    let op = clause.op.symbol().to_string();
    let base =
        ClauseResult { clause: clause.source.clone(), pass: false, lhs: None, op, rhs: None, values, note: None };
    if let Some(name) = missing {
        return ClauseResult { note: Some(format!("`{name}` was not measured")), ..base };
    }
    if let Some(name) = missing_deployed {
        return ClauseResult {
            pass: true,
            note: Some(format!("nothing is deployed yet, so `{name}` has no value; the clause holds")),
            ..base
        };
    }
    let get = |r: &MetricRef| base.values.get(&r.to_string()).copied();
    let (lhs, rhs) = match (clause.lhs.evaluate(&get), clause.rhs.evaluate(&get)) {
        (Ok(l), Ok(r)) => (l, r),
        _ => return ClauseResult { note: Some("a value is missing".into()), ..base },
    };
    let pass = lhs.is_finite() && rhs.is_finite() && clause.op.holds(lhs, rhs);
    let note = (!lhs.is_finite() || !rhs.is_finite()).then(|| "a side is not a finite number".to_string());
    ClauseResult { pass, lhs: Some(lhs), rhs: Some(rhs), note, ..base }
}

fn describe_failure(r: &ClauseResult) -> String {
    match (r.lhs, r.rhs) {
        (Some(l), Some(rv)) => format!("`{}` failed: {} {} {} is false", r.clause, round(l), r.op, round(rv)),
        _ => format!("`{}` failed: {}", r.clause, r.note.as_deref().unwrap_or("not evaluated")),
    }
}

/// Four significant digits: enough to read, stable in text.
pub fn round(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let digits = (4 - 1 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(r: &MetricRef) -> Option<f64> {
        match (&r.subject, r.metric.as_str()) {
            (Subject::Student, "exact_match") => Some(0.90),
            (Subject::Teacher, "exact_match") => Some(0.93),
            (Subject::Student, "latency_p95_ms") => Some(180.0),
            (Subject::Student, "cost_per_1k_usd") => Some(0.01),
            (Subject::Teacher, "cost_per_1k_usd") => Some(1.2),
            (Subject::Deployed(a), "exact_match") if a == "production" => Some(0.88),
            _ => None,
        }
    }

    fn clauses(texts: &[&str]) -> Vec<Clause> {
        texts.iter().map(|s| Clause::parse(s).expect("parses")).collect()
    }

    #[test]
    fn every_clause_form() {
        let d = evaluate(
            &clauses(&[
                "exact_match >= 0.95 * teacher.exact_match", // absolute vs ratio to teacher
                "latency_p95_ms <= 200",                     // absolute threshold
                "cost_per_1k_usd <= 0.2 * teacher.cost_per_1k_usd",
                "exact_match >= production.exact_match", // beat the deployed version
                "exact_match - teacher.exact_match > -0.05", // arithmetic on both sides
            ]),
            &lookup,
        );
        assert!(d.promote, "{d:#?}");
        assert_eq!(d.clauses[0].values["teacher.exact_match"], 0.93);
        assert!((d.clauses[0].rhs.unwrap() - 0.8835).abs() < 1e-12);
        assert_eq!(d.reason, "all 5 clauses held");
    }

    #[test]
    fn a_reject_names_the_failing_clause_with_its_numbers() {
        let d = evaluate(&clauses(&["latency_p95_ms <= 200", "exact_match >= teacher.exact_match"]), &lookup);
        assert!(!d.promote);
        assert!(d.clauses[0].pass && !d.clauses[1].pass);
        assert_eq!(d.reason, "`exact_match >= teacher.exact_match` failed: 0.9000 >= 0.9300 is false");
    }

    #[test]
    fn nothing_deployed_yet_holds_but_an_unmeasured_metric_fails() {
        let d = evaluate(&clauses(&["exact_match >= staging.exact_match"]), &lookup);
        assert!(d.promote && d.clauses[0].note.as_deref().unwrap().contains("nothing is deployed"));
        let d = evaluate(&clauses(&["rouge_l >= 0.5"]), &lookup);
        assert!(!d.promote && d.reason.contains("`rouge_l` was not measured"), "{}", d.reason);
    }

    #[test]
    fn non_finite_values_fail() {
        let d = evaluate(&clauses(&["exact_match >= 1 / 0"]), &lookup);
        assert!(!d.promote);
    }
}
