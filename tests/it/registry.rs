//! Package → deploy through the runner, and the registry: promote, rollback, concurrent
//! promotes, tampered artifacts refused.

use crate::common;

use common::*;
use petgraph::graph::DiGraph;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tangle::eval::stats::Estimate;
use tangle::graph::{Artifact, Edge, Plan, Stage, StageKind};
use tangle::registry::{Registry, RegistryError};
use tangle::report::{EvalReport, SubjectReport, REPORT_SCHEMA};
use tangle::runner::progress::ProgressMode;
use tangle::runner::record::RunStatus;
use tangle::runner::{self, PlanSource, RunOptions, RunSummary};
use tangle::stages::{CancelFlag, Executors, StageContext, StageError, StageExecutor, StageOutcome};

/// Stands in for train (writes an HF-style model dir) and eval (writes a report).
struct Fake;

impl StageExecutor for Fake {
    fn logic_version(&self) -> u32 {
        1
    }
    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        match stage.name.as_str() {
            "train" => {
                let dir = ctx.out_dir.join("model");
                std::fs::create_dir_all(&dir).unwrap();
                let weights = stage.config["weights"].as_str().unwrap();
                std::fs::write(dir.join("config.json"), r#"{"model_type": "qwen2"}"#).unwrap();
                std::fs::write(dir.join("model.safetensors"), weights).unwrap();
                std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
            }
            _ => {
                let em = stage.config["exact_match"].as_f64().unwrap();
                let e = Estimate { value: em, ci_low: em - 0.05, ci_high: em + 0.05, n: 50 };
                let report = EvalReport {
                    schema: REPORT_SCHEMA.into(),
                    pipeline: "intent".into(),
                    run_id: ctx.run_id.clone(),
                    created_at: "t".into(),
                    spec_sha256: String::new(),
                    subjects: BTreeMap::from([(
                        "student".to_string(),
                        SubjectReport {
                            model: "tiny".into(),
                            metrics: BTreeMap::from([("exact_match".to_string(), e)]),
                        },
                    )]),
                    examples: vec![],
                    decision: None,
                };
                std::fs::write(ctx.out_dir.join("report.json"), serde_json::to_vec(&report).unwrap()).unwrap();
            }
        }
        Ok(StageOutcome::default())
    }
}

fn plan(weights: &str, exact_match: f64, registry: &Path) -> Plan {
    let mut g = DiGraph::new();
    let mut add = |name: &str, kind, config: Value| {
        g.add_node(Stage { name: name.into(), kind, output: Artifact::Files, config, origin: String::new() })
    };
    let train = add("train", StageKind::Step, json!({ "weights": weights }));
    let eval = add("eval-student", StageKind::Step, json!({ "exact_match": exact_match }));
    let gate = add(
        "gate",
        StageKind::Gate,
        json!({ "pipeline": "intent", "gate": { "require": ["exact_match >= 0.8", "exact_match >= production.exact_match"] },
                "deployed": { "alias": "production", "registry": registry.display().to_string() } }),
    );
    let package = add(
        "package",
        StageKind::Package,
        json!({ "name": "intent", "description": "Routes merchant messages.", "teacher": null,
                "student": { "model": "Qwen/Qwen2.5-0.5B-Instruct", "device": "cpu", "max_seq_len": 512 },
                "spec_sha256": "abc", "dataset": "data.jsonl" }),
    );
    let deploy = add(
        "deploy",
        StageKind::Deploy,
        json!({ "pipeline": "intent", "deploy": { "alias": "production", "registry": registry.display().to_string() } }),
    );
    let edge = |port| Edge { port, artifact: Artifact::Files };
    g.add_edge(train, eval, edge("model"));
    g.add_edge(eval, gate, edge("report"));
    g.add_edge(train, package, edge("model"));
    g.add_edge(eval, package, edge("report"));
    g.add_edge(gate, package, edge("decision"));
    g.add_edge(package, deploy, edge("package"));
    g.add_edge(gate, deploy, edge("decision"));
    Plan::new("intent", g).unwrap()
}

fn run(dir: &Path, plan: &Plan) -> RunSummary {
    std::fs::write(dir.join("data.jsonl"), "{\"prompt\": \"x\"}\n").unwrap();
    let mut executors = Executors::builtin();
    executors.insert(StageKind::Step, Arc::new(Fake));
    let options =
        RunOptions { state_dir: dir.join("state"), runs_dir: dir.join("runs"), jobs: 2, progress: ProgressMode::Quiet };
    let source =
        PlanSource { spec: None, spec_dir: dir.to_path_buf(), spec_file: "t".into(), spec_sha256: String::new() };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(runner::run(plan, &executors, source, &options, CancelFlag::default())).unwrap()
}

fn production(registry: &Registry) -> String {
    registry.resolve("intent", "production").unwrap().unwrap().version
}

#[test]
fn a_promoted_candidate_is_packaged_registered_and_aliased() {
    let dir = tempfile::tempdir().unwrap();
    let reg_dir = dir.path().join("registry");
    let first = run(dir.path(), &plan("weights-1", 0.85, &reg_dir));
    assert_eq!(first.record.status, RunStatus::Succeeded, "{:#?}", first.record.stages);
    let registry = Registry::open(&reg_dir);
    let v1 = production(&registry);

    let artifact = first.run_dir.join("package/artifact");
    let manifest = tangle::artifact::verify(&artifact).unwrap();
    assert_eq!(manifest.lineage.base_model, "Qwen/Qwen2.5-0.5B-Instruct");
    assert_eq!(manifest.lineage.spec_sha256, "abc");
    assert_eq!(manifest.lineage.dataset_sha256.len(), 64);
    assert!(manifest.files.contains_key("README.md") && manifest.files.contains_key("model.safetensors"));
    let card = std::fs::read_to_string(artifact.join("README.md")).unwrap();
    assert!(
        card.contains("exact_match | 0.8500 [0.8000, 0.9000]") && card.contains("Gate decision: promote"),
        "{card}"
    );

    // A better model replaces it; a worse one is rejected and production stays.
    let second = run(dir.path(), &plan("weights-2", 0.90, &reg_dir));
    assert_eq!(second.record.status, RunStatus::Succeeded);
    let v2 = production(&registry);
    assert_ne!(v1, v2);
    let third = run(dir.path(), &plan("weights-3", 0.87, &reg_dir));
    assert_eq!(third.record.status, RunStatus::Rejected);
    assert_eq!(production(&registry), v2);

    // The CLI: list, show, rollback, promote.
    let reg = reg_dir.display().to_string();
    let out = tangle().args(["registry", "--registry", &reg, "list"]).output().unwrap();
    let listing = text(&out.stdout);
    assert!(listing.contains(&format!("{v2}  ← production")), "{listing}");
    let out = tangle().args(["registry", "--registry", &reg, "show", "intent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("exact_match: 0.9000"), "{}", text(&out.stdout));
    let out = tangle().args(["registry", "--registry", &reg, "rollback", "intent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(production(&registry), v1);
    let out = tangle().args(["registry", "--registry", &reg, "rollback", "intent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "nothing before the first version");
    let out = tangle().args(["registry", "--registry", &reg, "promote"]).arg(format!("intent@{v2}")).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(production(&registry), v2);
    let out = tangle().args(["registry", "--registry", &reg, "promote", "intent@v-nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn package(dir: &Path, weights: &str) -> std::path::PathBuf {
    let pkg = dir.join(format!("pkg-{weights}"));
    let art = pkg.join("artifact");
    std::fs::create_dir_all(&art).unwrap();
    std::fs::write(art.join("model.safetensors"), weights).unwrap();
    tangle::artifact::write_manifest(
        &art,
        tangle::artifact::Lineage {
            pipeline: "intent".into(),
            run_id: weights.into(),
            tangle_version: "0".into(),
            created_at: "t".into(),
            spec_sha256: "s".into(),
            dataset_sha256: "d".into(),
            base_model: "b".into(),
            teacher: vec![],
        },
    )
    .unwrap();
    pkg
}

#[test]
fn rollback_is_a_stack_and_registering_twice_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&dir.path().join("reg"));
    let versions: Vec<String> =
        ["a", "b", "c"].iter().map(|w| registry.register("intent", &package(dir.path(), w)).unwrap()).collect();
    assert_eq!(registry.register("intent", &package(dir.path(), "a")).unwrap(), versions[0]);
    for v in &versions {
        registry.set_alias("intent", "production", v).unwrap();
    }
    assert_eq!(registry.rollback("intent", "production").unwrap(), versions[1]);
    assert_eq!(registry.rollback("intent", "production").unwrap(), versions[0]);
    assert!(matches!(registry.rollback("intent", "production"), Err(RegistryError::NoHistory { .. })));
}

#[test]
fn a_tampered_package_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&dir.path().join("reg"));
    let pkg = package(dir.path(), "w");
    std::fs::write(pkg.join("artifact/model.safetensors"), "tampered").unwrap();
    let err = registry.register("intent", &pkg).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // And a registered version damaged afterwards is refused by `show`.
    let good = package(dir.path(), "ok");
    let v = registry.register("intent", &good).unwrap();
    registry.set_alias("intent", "production", &v).unwrap();
    std::fs::write(registry.version_dir("intent", &v).join("artifact/model.safetensors"), "x").unwrap();
    let out = tangle()
        .args(["registry", "--registry"])
        .arg(dir.path().join("reg"))
        .args(["show", "intent@production"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("does not match the sha256"), "{}", text(&out.stderr));
}

#[test]
fn concurrent_promotes_never_leave_a_broken_alias() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("reg");
    let registry = Registry::open(&root);
    let versions: Vec<String> =
        (0..4).map(|i| registry.register("intent", &package(dir.path(), &format!("w{i}"))).unwrap()).collect();
    registry.set_alias("intent", "production", &versions[0]).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (root, stop) = (root.clone(), Arc::clone(&stop));
        let versions = versions.clone();
        std::thread::spawn(move || {
            let registry = Registry::open(&root);
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let d = registry.resolve("intent", "production").expect("never torn").expect("never missing");
                assert!(versions.contains(&d.version));
                reads += 1;
            }
            reads
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let (root, versions) = (root.clone(), versions.clone());
            std::thread::spawn(move || {
                let registry = Registry::open(&root);
                for j in 0..50 {
                    registry.set_alias("intent", "production", &versions[(i + j) % 4]).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().unwrap() > 0);
    let history = registry.history("intent", "production").unwrap();
    assert!(history.iter().all(|m| versions.contains(&m.version)));
}
