//! `tangle validate`: every mistake located and explained; messages locked by snapshots.

use crate::common;

use common::*;
use serde_json::Value;

#[test]
fn every_invalid_spec_gets_a_location_a_hint_and_exit_2() {
    let specs = specs_in("tests/specs/invalid");
    assert!(specs.len() >= 15, "only {} invalid specs", specs.len());
    for spec in &specs {
        let output = tangle().arg("validate").arg(spec).output().unwrap();
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}:\n{stderr}", spec.display());
        assert!(output.stdout.is_empty(), "human output belongs on stderr");
        let prefix = format!("{}:", spec.display());
        let first = stderr.lines().next().unwrap_or_default();
        let location: Vec<&str> = first.strip_prefix(&prefix).unwrap_or_default().splitn(3, ':').collect();
        assert!(
            location.len() == 3 && location[0].parse::<u32>().is_ok() && location[1].parse::<u32>().is_ok(),
            "{}: first line is not file:line:col: message:\n{stderr}",
            spec.display()
        );
        assert!(stderr.contains("= hint: "), "{}: no hint:\n{stderr}", spec.display());
        assert_no_secret(&output);
        insta::assert_snapshot!(format!("validate__{}", stem(spec)), stderr);
    }
}

#[test]
fn json_output_lists_every_error_with_its_position() {
    let output = tangle().args(["validate", "--json", "tests/specs/invalid/many-mistakes.yaml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let doc: Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON document");
    assert_eq!(doc["valid"], false);
    let errors = doc["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 7, "{doc:#}");
    for e in errors {
        assert!(e["line"].as_u64().unwrap() >= 1);
        assert!(e["column"].as_u64().unwrap() >= 1);
        assert!(e["hint"].as_str().is_some_and(|h| !h.is_empty()), "{e}");
        assert!(e["code"].as_str().is_some());
    }
    let codes: Vec<&str> = errors.iter().map(|e| e["code"].as_str().unwrap()).collect();
    assert!(
        codes.contains(&"unknown-key") && codes.contains(&"unknown-metric") && codes.contains(&"wrong-type"),
        "{codes:?}"
    );
}

#[test]
fn valid_specs_pass() {
    for spec in specs_in("pipelines").into_iter().chain(specs_in("tests/specs/valid")) {
        let output = tangle().arg("validate").arg(&spec).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{}:\n{}", spec.display(), text(&output.stderr));
        let json = tangle().args(["validate", "--json"]).arg(&spec).output().unwrap();
        let doc: Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(doc["valid"], true);
        assert!(doc["stages"].as_u64().unwrap() >= 2);
        assert_no_secret(&json);
    }
}

#[test]
fn a_missing_file_and_bad_usage_exit_2() {
    let output = tangle().args(["validate", "nope/missing.yaml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("cannot read the spec"), "{}", text(&output.stderr));
    let output = tangle().args(["validate"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = tangle().args(["frobnicate"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = tangle().args(["--version"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
}

/// A section that compiles to no stage is a warning, not silence.
#[test]
fn a_section_that_compiles_to_no_stage_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.jsonl"), "{\"prompt\": \"hi\"}\n").unwrap();
    let spec = dir.path().join("p.yaml");
    std::fs::write(&spec, "name: s\nstudent: { model: Qwen/Qwen2.5-0.5B-Instruct }\ndataset: { path: data.jsonl }\n")
        .unwrap();
    let output = tangle().args(["validate", "--json"]).arg(&spec).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let doc: Value = serde_json::from_slice(&output.stdout).unwrap();
    let warnings = doc["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w["code"] == "unused-section"
            && w["line"] == 2
            && w["message"].as_str().unwrap().contains("student")),
        "{doc:#}"
    );
}
