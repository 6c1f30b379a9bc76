//! `tangle diff`: significance, flips and exit codes on constructed reports; the text output
//! is snapshot-locked.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tangle::eval::stats;
use tangle::report::{EvalReport, ExampleResult, SubjectReport, REPORT_SCHEMA};

const LABELS: [&str; 5] = ["billing", "shipping", "account", "inventory", "technical"];

/// A report over `n` examples where the student answers example `i` right iff `right(i)`.
fn report(run_id: &str, n: usize, right: &dyn Fn(usize) -> bool, latency: &dyn Fn(usize) -> f64) -> EvalReport {
    let mut examples = Vec::new();
    for i in 0..n {
        let reference = LABELS[i % 5].to_string();
        let output = if right(i) { reference.clone() } else { LABELS[(i + 1) % 5].to_string() };
        let em = if right(i) { 1.0 } else { 0.0 };
        examples.push(ExampleResult {
            id: format!("ex-{i:03}"),
            prompt: format!("merchant question number {i} about {}", LABELS[i % 5]),
            reference: Some(reference),
            outputs: BTreeMap::from([("student".to_string(), output)]),
            scores: BTreeMap::from([(
                "student".to_string(),
                BTreeMap::from([("exact_match".to_string(), em), ("token_f1".to_string(), em)]),
            )]),
            latency_ms: BTreeMap::from([("student".to_string(), latency(i))]),
        });
    }
    let em: Vec<f64> = examples.iter().map(|e| e.scores["student"]["exact_match"]).collect();
    let lat: Vec<f64> = examples.iter().map(|e| e.latency_ms["student"]).collect();
    let metrics = BTreeMap::from([
        ("exact_match".to_string(), stats::bootstrap_mean(&em, 1000, 1)),
        ("token_f1".to_string(), stats::bootstrap_mean(&em, 1000, 2)),
        ("latency_p95_ms".to_string(), stats::bootstrap(&lat, &|v| stats::quantile(v, 0.95), 1000, 3)),
    ]);
    EvalReport {
        schema: REPORT_SCHEMA.into(),
        pipeline: "support-intent".into(),
        run_id: run_id.into(),
        created_at: "2026-11-25T06:00:00Z".into(),
        spec_sha256: "0".repeat(64),
        subjects: BTreeMap::from([("student".to_string(), SubjectReport { model: "tiny-qwen".into(), metrics })]),
        examples,
        decision: None,
    }
}

fn write(dir: &Path, name: &str, r: &EvalReport) {
    std::fs::write(dir.join(name), serde_json::to_vec_pretty(r).unwrap()).unwrap();
}

fn diff(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tangle().current_dir(dir).arg("diff").args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A: 150 of 200 right. B: loses 30 of those and gains 5, and is 20 ms slower everywhere.
fn regression_pair(dir: &Path) {
    let a_right = |i: usize| i % 4 != 0;
    let b_right = move |i: usize| if i % 4 != 0 { i % 5 != 1 || i >= 150 } else { i < 20 && i % 8 == 0 };
    write(dir, "a.json", &report("run-a", 200, &a_right, &|i| 100.0 + (i % 7) as f64));
    write(dir, "b.json", &report("run-b", 200, &b_right, &|i| 120.0 + (i % 7) as f64));
}

#[test]
fn a_significant_regression_is_found_with_its_flips() {
    let dir = tempfile::tempdir().unwrap();
    regression_pair(dir.path());
    let (code, stdout, stderr) = diff(dir.path(), &["a.json", "b.json", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["shared"], 200);
    let em = doc["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "exact_match").unwrap();
    assert!(em["regression"].as_bool().unwrap(), "{em:#}");
    assert!(em["mcnemar_p"].as_f64().unwrap() < 1e-3);
    let delta = em["paired"]["delta"].as_f64().unwrap();
    assert!(delta < 0.0 && em["paired"]["ci_high"].as_f64().unwrap() < 0.0);
    let lat = doc["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "latency_ms").unwrap();
    assert!(lat["regression"].as_bool().unwrap(), "slower is worse: {lat:#}");
    let flips = doc["flips"].as_array().unwrap();
    let lost = flips.iter().filter(|f| f["metric"] == "exact_match" && f["direction"] == "right_to_wrong").count();
    let gained = flips.iter().filter(|f| f["metric"] == "exact_match" && f["direction"] == "wrong_to_right").count();
    assert_eq!((lost, gained), (10, 3), "listing is capped at --max-flips (10); 3 gains exist");
    let f = flips.iter().find(|f| f["direction"] == "right_to_wrong").unwrap();
    assert_ne!(f["a_output"], f["b_output"]);
    assert_eq!(f["a_output"], f["reference"]);

    let (code, _, stderr) = diff(dir.path(), &["a.json", "b.json", "--fail-on-regression"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("exact_match"), "{stderr}");
    let (code, _, _) = diff(dir.path(), &["b.json", "a.json", "--fail-on-regression"]);
    assert_eq!(code, 0, "the reverse direction is an improvement");
}

#[test]
fn text_and_markdown_output_are_locked() {
    let dir = tempfile::tempdir().unwrap();
    regression_pair(dir.path());
    let (_, text_out, _) = diff(dir.path(), &["a.json", "b.json", "--max-flips", "3"]);
    insta::assert_snapshot!("diff_text", text_out);
    let (_, md, _) = diff(dir.path(), &["a.json", "b.json", "--format", "markdown", "--max-flips", "2"]);
    insta::assert_snapshot!("diff_markdown", md);
}

#[test]
fn identical_reports_show_no_significant_change() {
    let dir = tempfile::tempdir().unwrap();
    let r = report("run-a", 120, &|i| i % 3 != 0, &|i| 50.0 + i as f64 % 5.0);
    write(dir.path(), "a.json", &r);
    std::fs::create_dir(dir.path().join("run-b")).unwrap();
    write(&dir.path().join("run-b"), "report.json", &r);
    let (code, stdout, _) = diff(dir.path(), &["a.json", "run-b", "--json", "--fail-on-regression"]);
    assert_eq!(code, 0);
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert!(doc["metrics"].as_array().unwrap().iter().all(|m| !m["significant"].as_bool().unwrap()));
    assert_eq!(doc["flips"], json!([]));
}

#[test]
fn a_small_noisy_change_is_not_called_significant() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.json", &report("a", 40, &|i| i % 2 == 0, &|_| 10.0));
    write(dir.path(), "b.json", &report("b", 40, &|i| i % 2 == 0 && i != 4 || i == 7, &|_| 10.0));
    let (code, stdout, _) = diff(dir.path(), &["a.json", "b.json", "--json", "--fail-on-regression"]);
    assert_eq!(code, 0, "one flip each way out of 40 is noise");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let em = doc["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "exact_match").unwrap();
    assert_eq!(em["mcnemar_p"], 1.0);
}

#[test]
fn unreadable_inputs_exit_2_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.json"), "{\"schema\": 1}").unwrap();
    let (code, _, stderr) = diff(dir.path(), &["bad.json", "missing.json"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a tangle eval report") && stderr.contains("hint"), "{stderr}");
}
