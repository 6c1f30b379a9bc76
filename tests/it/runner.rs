//! The runner with test-only stages: ordering, the concurrency bound, caching, corruption,
//! halting, failures, stops and cancellation.

use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tangle::exit::Exit;
use tangle::graph::{Artifact, Edge, Plan, Stage, StageKind};
use tangle::runner::progress::ProgressMode;
use tangle::runner::record::{RunStatus, StageState};
use tangle::runner::{self, PlanSource, RunOptions, RunSummary};
use tangle::stages::{CancelFlag, Executors, Halt, StageContext, StageError, StageExecutor, StageOutcome};

/// What a test stage does is in its config: `{"sleep_ms": 50, "value": "x", "behaviour": "ok"}`.
/// It writes `out.txt` = its value plus its inputs' values, and logs start/end times.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, &'static str, Instant)>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    executions: Mutex<HashMap<String, usize>>,
}

struct TestStage(Arc<Recorder>);

impl StageExecutor for TestStage {
    fn logic_version(&self) -> u32 {
        1
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let r = &self.0;
        *r.executions.lock().unwrap().entry(stage.name.clone()).or_default() += 1;
        r.events.lock().unwrap().push((stage.name.clone(), "start", Instant::now()));
        let now = r.running.fetch_add(1, Ordering::SeqCst) + 1;
        r.max_running.fetch_max(now, Ordering::SeqCst);
        let sleep = Duration::from_millis(stage.config["sleep_ms"].as_u64().unwrap_or(0));
        let deadline = Instant::now() + sleep;
        let mut result = Ok(());
        while Instant::now() < deadline {
            if ctx.cancel.is_cancelled() {
                result = Err(StageError::Cancelled);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        r.running.fetch_sub(1, Ordering::SeqCst);
        r.events.lock().unwrap().push((stage.name.clone(), "end", Instant::now()));
        result?;
        let mut text = stage.config["value"].as_str().unwrap_or("").to_string();
        for input in &ctx.inputs {
            text.push('|');
            text.push_str(&std::fs::read_to_string(input.dir.join("out.txt")).unwrap());
        }
        std::fs::write(ctx.out_dir.join("out.txt"), &text).unwrap();
        match stage.config["behaviour"].as_str() {
            Some("fail") => Err(StageError::Failed("told to fail".into())),
            Some("stop") => Err(StageError::Stopped("budget exhausted".into())),
            Some("reject") => Ok(StageOutcome {
                summary: json!({"text": text}),
                halt: Some(Halt::Rejected { reason: "exact_match 0.5 < 0.9".into() }),
            }),
            _ => Ok(StageOutcome { summary: json!({"text": text}), halt: None }),
        }
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    recorder: Arc<Recorder>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture { dir: tempfile::tempdir().unwrap(), recorder: Arc::default() }
    }

    fn run_with(&self, plan: &Plan, jobs: usize, cancel: CancelFlag) -> RunSummary {
        let mut executors = Executors::default();
        executors.insert(StageKind::Step, Arc::new(TestStage(Arc::clone(&self.recorder))));
        let options = RunOptions {
            state_dir: self.dir.path().join("state"),
            runs_dir: self.dir.path().join("runs"),
            jobs,
            progress: ProgressMode::Quiet,
        };
        let source = PlanSource {
            spec: None,
            spec_dir: self.dir.path().to_path_buf(),
            spec_file: "test".into(),
            spec_sha256: String::new(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        rt.block_on(runner::run(plan, &executors, source, &options, cancel)).unwrap()
    }

    fn run(&self, plan: &Plan, jobs: usize) -> RunSummary {
        self.run_with(plan, jobs, CancelFlag::default())
    }

    fn executions(&self, name: &str) -> usize {
        self.recorder.executions.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// `stages`: (name, config); `edges`: (from, to).
fn plan(stages: &[(&str, Value)], edges: &[(&str, &str)]) -> Plan {
    let mut graph = DiGraph::new();
    let mut ids: HashMap<&str, NodeIndex> = HashMap::new();
    for (name, config) in stages {
        let id = graph.add_node(Stage {
            name: name.to_string(),
            kind: StageKind::Step,
            output: Artifact::Files,
            config: config.clone(),
            origin: String::new(),
        });
        ids.insert(name, id);
    }
    for (from, to) in edges {
        graph.add_edge(ids[from], ids[to], Edge { port: "needs", artifact: Artifact::Files });
    }
    Plan::new("test", graph).unwrap()
}

fn state(summary: &RunSummary, name: &str) -> StageState {
    summary.record.stages.iter().find(|s| s.name == name).unwrap().state
}

fn cfg(value: &str, sleep_ms: u64) -> Value {
    json!({"value": value, "sleep_ms": sleep_ms})
}

/// A diamond with a tail: a → (b, c) → d → e.
fn diamond() -> Plan {
    plan(
        &[("a", cfg("a", 20)), ("b", cfg("b", 40)), ("c", cfg("c", 10)), ("d", cfg("d", 10)), ("e", cfg("e", 0))],
        &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", "e")],
    )
}

#[test]
fn stages_start_only_after_all_their_inputs_finished() {
    let f = Fixture::new();
    let p = diamond();
    let summary = f.run(&p, 4);
    assert_eq!(summary.record.status, RunStatus::Succeeded);
    let events = f.recorder.events.lock().unwrap().clone();
    let at = |name: &str, what: &str| events.iter().find(|(n, w, _)| n == name && *w == what).unwrap().2;
    for (from, to) in [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", "e")] {
        assert!(at(from, "end") <= at(to, "start"), "{to} started before {from} ended");
    }
    // The outputs flowed along the edges (sorted by port, then source name).
    let out = std::fs::read_to_string(summary.run_dir.join("e/out.txt")).unwrap();
    assert_eq!(out, "e|d|b|a|c|a");
}

#[test]
fn independent_stages_run_concurrently_up_to_the_bound() {
    let f = Fixture::new();
    let stages: Vec<(String, Value)> = (0..6).map(|i| (format!("s{i}"), cfg(&format!("{i}"), 80))).collect();
    let refs: Vec<(&str, Value)> = stages.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
    let p = plan(&refs, &[]);
    let started = Instant::now();
    f.run(&p, 2);
    assert_eq!(f.recorder.max_running.load(Ordering::SeqCst), 2, "the bound of 2 was not reached or was exceeded");
    // Six 80 ms stages, two at a time: about 240 ms, far from the 480 ms of a serial run.
    assert!(started.elapsed() < Duration::from_millis(450), "{:?}", started.elapsed());

    let f = Fixture::new();
    f.run(&p, 1);
    assert_eq!(f.recorder.max_running.load(Ordering::SeqCst), 1);
}

#[test]
fn an_unchanged_rerun_is_all_cache_hits() {
    let f = Fixture::new();
    let p = diamond();
    let first = f.run(&p, 2);
    assert!(first.record.stages.iter().all(|s| s.state == StageState::Done));
    let second = f.run(&p, 2);
    assert!(second.record.stages.iter().all(|s| s.state == StageState::Cached && s.cache_hit));
    for name in ["a", "b", "c", "d", "e"] {
        assert_eq!(f.executions(name), 1, "{name} ran again");
    }
    assert_eq!(
        std::fs::read_to_string(second.run_dir.join("e/out.txt")).unwrap(),
        std::fs::read_to_string(first.run_dir.join("e/out.txt")).unwrap()
    );
}

#[test]
fn a_changed_setting_reruns_exactly_its_downstream() {
    let f = Fixture::new();
    let base = |c_value: &str| {
        plan(
            &[
                ("a", cfg("a", 0)),
                ("b", cfg("b", 0)),
                ("c", cfg(c_value, 0)),
                ("d", cfg("d", 0)),
                ("e", cfg("e", 0)),
                ("lone", cfg("x", 0)),
            ],
            &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", "e")],
        )
    };
    f.run(&base("c"), 2);
    let second = f.run(&base("c2"), 2);
    let hits: Vec<(&str, bool)> = second.record.stages.iter().map(|s| (s.name.as_str(), s.cache_hit)).collect();
    let mut hits = hits;
    hits.sort();
    assert_eq!(hits, vec![("a", true), ("b", true), ("c", false), ("d", false), ("e", false), ("lone", true)]);
    assert_eq!(std::fs::read_to_string(second.run_dir.join("e/out.txt")).unwrap(), "e|d|b|a|c2|a");
}

#[test]
fn a_corrupted_cache_entry_is_recomputed_not_trusted() {
    let f = Fixture::new();
    let p = diamond();
    let first = f.run(&p, 2);
    let key = first.record.stages.iter().find(|s| s.name == "b").unwrap().key.clone().unwrap();
    let cached = f.dir.path().join("state/cache/step").join(&key).join("files/out.txt");
    std::fs::write(&cached, "tampered").unwrap();
    let second = f.run(&p, 2);
    assert_eq!(state(&second, "b"), StageState::Done, "the damaged entry was trusted");
    assert_eq!(f.executions("b"), 2);
    // Keys derive from inputs' keys, so the dependents stay cached.
    assert_eq!(state(&second, "d"), StageState::Cached);
    assert_eq!(std::fs::read_to_string(second.run_dir.join("b/out.txt")).unwrap(), "b|a");
    assert_eq!(std::fs::read_to_string(&cached).unwrap(), "b|a");
}

#[test]
fn a_rejection_skips_downstream_and_exits_3() {
    let f = Fixture::new();
    let p = plan(
        &[
            ("eval", cfg("e", 0)),
            ("gate", json!({"value": "g", "behaviour": "reject"})),
            ("deploy", cfg("d", 0)),
            ("notes", cfg("n", 0)),
        ],
        &[("eval", "gate"), ("gate", "deploy"), ("eval", "notes")],
    );
    let summary = f.run(&p, 2);
    assert_eq!(summary.record.status, RunStatus::Rejected);
    assert_eq!(Exit::for_run(summary.record.status).code(), 3);
    assert_eq!(state(&summary, "deploy"), StageState::Skipped);
    assert_eq!(state(&summary, "notes"), StageState::Done);
    assert_eq!(f.executions("deploy"), 0);
    // The verdict is part of the cached outcome: a re-run from cache rejects again.
    let again = f.run(&p, 2);
    assert_eq!(again.record.status, RunStatus::Rejected);
    assert_eq!(state(&again, "gate"), StageState::Cached);
}

#[test]
fn a_failure_stops_new_work_and_exits_1() {
    let f = Fixture::new();
    let p = plan(&[("a", json!({"value": "a", "behaviour": "fail"})), ("b", cfg("b", 0))], &[("a", "b")]);
    let summary = f.run(&p, 2);
    assert_eq!(summary.record.status, RunStatus::Failed);
    assert_eq!(Exit::for_run(summary.record.status).code(), 1);
    assert_eq!(state(&summary, "a"), StageState::Failed);
    assert_eq!(state(&summary, "b"), StageState::NotRun);
    let record: Value = serde_json::from_slice(&std::fs::read(summary.run_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(record["stages"][0]["error"], "told to fail");
    assert_eq!(record["exit_code"], 1);
    // A failed stage leaves no cache entry: it runs again next time.
    f.run(&p, 2);
    assert_eq!(f.executions("a"), 2);
}

#[test]
fn a_budget_stop_exits_4() {
    let f = Fixture::new();
    let p =
        plan(&[("label", json!({"value": "l", "behaviour": "stop"})), ("train", cfg("t", 0))], &[("label", "train")]);
    let summary = f.run(&p, 2);
    assert_eq!(summary.record.status, RunStatus::Stopped);
    assert_eq!(Exit::for_run(summary.record.status).code(), 4);
    assert_eq!(state(&summary, "label"), StageState::Stopped);
}

#[test]
fn cancellation_interrupts_running_stages_and_a_rerun_resumes() {
    let f = Fixture::new();
    let p = plan(
        &[("quick", cfg("q", 0)), ("slow", cfg("s", 5_000)), ("after", cfg("a", 0))],
        &[("quick", "slow"), ("slow", "after")],
    );
    let cancel = CancelFlag::default();
    let trigger = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        trigger.cancel();
    });
    let started = Instant::now();
    let summary = f.run_with(&p, 2, cancel);
    canceller.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "cancellation was not prompt");
    assert_eq!(summary.record.status, RunStatus::Interrupted);
    assert_eq!(Exit::for_run(summary.record.status).code(), 130);
    assert_eq!(state(&summary, "quick"), StageState::Done);
    assert_eq!(state(&summary, "slow"), StageState::Interrupted);
    assert_eq!(state(&summary, "after"), StageState::NotRun);

    let resumed = f.run(
        &plan(
            &[("quick", cfg("q", 0)), ("slow", cfg("s", 0)), ("after", cfg("a", 0))],
            &[("quick", "slow"), ("slow", "after")],
        ),
        2,
    );
    assert_eq!(resumed.record.status, RunStatus::Succeeded);
    assert_eq!(state(&resumed, "quick"), StageState::Cached);
    assert_eq!(f.executions("quick"), 1);
}

#[test]
fn run_json_is_written_and_latest_points_at_the_run() {
    let f = Fixture::new();
    let summary = f.run(&diamond(), 2);
    let record = tangle::runner::record::RunRecord::load(&summary.run_dir).unwrap();
    assert_eq!(record.status, RunStatus::Succeeded);
    assert!(record.stages.iter().all(|s| s.duration_ms.is_some() && s.key.as_ref().is_some_and(|k| k.len() == 64)));
    let latest = std::fs::read_link(f.dir.path().join("runs/test/latest")).unwrap();
    assert_eq!(Path::new(&record.run_id), latest);
}
