//! The gate stage in the runner: a reject halts downstream stages with exit code 3 and a
//! decision.json naming the failing clause; the deployed version's metrics are read from the
//! registry, and moving the alias makes the gate decide again.

use petgraph::graph::DiGraph;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tangle::eval::stats::Estimate;
use tangle::exit::Exit;
use tangle::graph::{Artifact, Edge, Plan, Stage, StageKind};
use tangle::report::{EvalReport, SubjectReport, REPORT_SCHEMA};
use tangle::runner::progress::ProgressMode;
use tangle::runner::record::{RunStatus, StageState};
use tangle::runner::{self, PlanSource, RunOptions, RunSummary};
use tangle::stages::gate::GateStage;
use tangle::stages::{CancelFlag, Executors, StageContext, StageError, StageExecutor, StageOutcome};

fn metrics(pairs: &[(&str, f64)]) -> BTreeMap<String, Estimate> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Estimate { value: *v, ci_low: *v - 0.02, ci_high: *v + 0.02, n: 100 }))
        .collect()
}

fn report(student: &[(&str, f64)], teacher: &[(&str, f64)]) -> EvalReport {
    EvalReport {
        schema: REPORT_SCHEMA.into(),
        pipeline: "support-intent".into(),
        run_id: "r".into(),
        created_at: "t".into(),
        spec_sha256: String::new(),
        subjects: BTreeMap::from([
            ("student".to_string(), SubjectReport { model: "s".into(), metrics: metrics(student) }),
            ("teacher".to_string(), SubjectReport { model: "t".into(), metrics: metrics(teacher) }),
        ]),
        examples: vec![],
        decision: None,
    }
}

/// Writes the report given in its config, as an eval stage would.
struct FakeEval;

impl StageExecutor for FakeEval {
    fn logic_version(&self) -> u32 {
        1
    }
    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        std::fs::write(ctx.out_dir.join("report.json"), stage.config["report"].to_string()).unwrap();
        Ok(StageOutcome::default())
    }
}

fn plan(report: &EvalReport, require: &[&str], registry: &Path) -> Plan {
    let mut g = DiGraph::new();
    let stage = |name: &str, kind, config| Stage {
        name: name.into(),
        kind,
        output: Artifact::Report,
        config,
        origin: String::new(),
    };
    let eval = g.add_node(stage("eval-student", StageKind::Step, json!({ "report": report })));
    let gate = g.add_node(stage(
        "gate",
        StageKind::Gate,
        json!({
            "pipeline": "support-intent",
            "gate": { "require": require },
            "deployed": { "alias": "production", "registry": registry.display().to_string() },
        }),
    ));
    let deploy = g.add_node(stage("deploy", StageKind::Step, json!({ "report": {} })));
    g.add_edge(eval, gate, Edge { port: "report", artifact: Artifact::Report });
    g.add_edge(gate, deploy, Edge { port: "decision", artifact: Artifact::Decision });
    Plan::new("support-intent", g).unwrap()
}

fn run(dir: &Path, plan: &Plan) -> RunSummary {
    let mut executors = Executors::default();
    executors.insert(StageKind::Step, Arc::new(FakeEval));
    executors.insert(StageKind::Gate, Arc::new(GateStage));
    let options =
        RunOptions { state_dir: dir.join("state"), runs_dir: dir.join("runs"), jobs: 2, progress: ProgressMode::Quiet };
    let source =
        PlanSource { spec: None, spec_dir: dir.to_path_buf(), spec_file: "t".into(), spec_sha256: String::new() };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(runner::run(plan, &executors, source, &options, CancelFlag::default())).unwrap()
}

fn deploy_version(registry: &Path, version: &str, exact_match: f64) {
    let dir = registry.join("support-intent/versions").join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let r = report(&[("exact_match", exact_match)], &[]);
    std::fs::write(dir.join("report.json"), serde_json::to_vec(&r).unwrap()).unwrap();
    std::fs::create_dir_all(registry.join("support-intent/aliases")).unwrap();
    std::fs::write(registry.join("support-intent/aliases/production"), format!("{version}\n")).unwrap();
}

fn decision(summary: &RunSummary) -> Value {
    serde_json::from_slice(&std::fs::read(summary.run_dir.join("gate/decision.json")).unwrap()).unwrap()
}

const REQUIRE: &[&str] =
    &["exact_match >= 0.95 * teacher.exact_match", "latency_p95_ms <= 200", "exact_match >= production.exact_match"];

#[test]
fn a_passing_candidate_is_promoted_against_teacher_and_first_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let r = report(&[("exact_match", 0.92), ("latency_p95_ms", 120.0)], &[("exact_match", 0.94)]);
    let summary = run(dir.path(), &plan(&r, REQUIRE, &dir.path().join("registry")));
    assert_eq!(summary.record.status, RunStatus::Succeeded);
    let d = decision(&summary);
    assert_eq!(d["promote"], true);
    assert!(d["clauses"][2]["note"].as_str().unwrap().contains("nothing is deployed"));
    let md = std::fs::read_to_string(summary.run_dir.join("gate/report.md")).unwrap();
    assert!(md.contains("## Gate: **promote**"), "{md}");
}

#[test]
fn a_reject_exits_3_names_the_clause_and_skips_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let r = report(&[("exact_match", 0.80), ("latency_p95_ms", 250.0)], &[("exact_match", 0.94)]);
    let summary = run(dir.path(), &plan(&r, REQUIRE, &dir.path().join("registry")));
    assert_eq!(summary.record.status, RunStatus::Rejected);
    assert_eq!(Exit::for_run(summary.record.status).code(), 3);
    let deploy = summary.record.stages.iter().find(|s| s.name == "deploy").unwrap();
    assert_eq!(deploy.state, StageState::Skipped);
    let d = decision(&summary);
    assert_eq!(d["promote"], false);
    assert_eq!(d["clauses"][0]["pass"], false);
    assert_eq!(d["clauses"][0]["values"]["teacher.exact_match"], 0.94);
    assert_eq!(d["clauses"][0]["lhs"], 0.8);
    assert_eq!(d["clauses"][1]["lhs"], 250.0);
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason.contains("`exact_match >= 0.95 * teacher.exact_match` failed: 0.8000 >= 0.8930 is false"),
        "{reason}"
    );
    assert!(reason.contains("latency_p95_ms <= 200"), "{reason}");
}

#[test]
fn the_deployed_version_must_be_beaten_and_a_moved_alias_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    deploy_version(&registry, "v1", 0.90);
    let r = report(&[("exact_match", 0.92), ("latency_p95_ms", 100.0)], &[("exact_match", 0.93)]);
    let p = plan(&r, REQUIRE, &registry);
    let first = run(dir.path(), &p);
    assert_eq!(first.record.status, RunStatus::Succeeded);
    assert_eq!(decision(&first)["clauses"][2]["values"]["production.exact_match"], 0.9);

    // Unchanged: the gate is a cache hit.
    let again = run(dir.path(), &p);
    assert!(again.record.stages.iter().find(|s| s.name == "gate").unwrap().cache_hit);

    // A better version is deployed meanwhile: the same candidate no longer beats it.
    deploy_version(&registry, "v2", 0.95);
    let after = run(dir.path(), &p);
    let gate = after.record.stages.iter().find(|s| s.name == "gate").unwrap();
    assert!(!gate.cache_hit, "the alias moved, so the gate must decide again");
    assert_eq!(after.record.status, RunStatus::Rejected);
    assert_eq!(decision(&after)["clauses"][2]["values"]["production.exact_match"], 0.95);
}
