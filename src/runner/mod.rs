//! Executes a plan: ready stages in dependency order, independent ones concurrently up to a
//! bound, each either replayed from a verified cache entry or run and committed.
//!
//! Invariants:
//! - A stage's cache key is a hash of its kind, its executor's logic version, its resolved
//!   config (secrets redacted), external fingerprints (file contents) and its inputs' keys.
//!   Inputs' *keys*, not contents: a recomputed corrupted entry does not invalidate its
//!   dependents.
//! - A stage counts as done only after its outputs are committed to the cache, so a run
//!   killed at any instant resumes without redoing finished stages.
//! - `run.json` is rewritten atomically at every transition.
//! - On Ctrl-C no new stage starts; running stages are asked to stop and keep their partial
//!   state in their work directories.

pub mod cache;
pub mod progress;
pub mod record;

use crate::graph::{Plan, Stage};
use crate::spec::LoadedSpec;
use crate::stages::{
    CancelFlag, Executors, FingerprintContext, Halt, InputArtifact, StageContext, StageError, StageOutcome,
};
use cache::{Cache, Lookup};
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use progress::{Progress, ProgressMode};
use record::{RunRecord, RunStatus, StageRecord, StageState};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;

/// Bumped when the key derivation itself changes.
const KEY_SCHEMA: u32 = 1;

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Holds the cache, work directories and stores shared across runs (`.tangle`).
    pub state_dir: PathBuf,
    /// Run records go to `<runs_dir>/<pipeline>/<run-id>/`.
    pub runs_dir: PathBuf,
    /// At most this many stages run at once.
    pub jobs: usize,
    pub progress: ProgressMode,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub record: RunRecord,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot write the run record in {path}: {source}")]
    Record { path: PathBuf, source: std::io::Error },
    #[error(
        "this build of tangle cannot run `{stage}` ({kind} stages) yet; remove that section or use a build that has it"
    )]
    NoExecutor { stage: String, kind: &'static str },
}

/// Where the plan comes from, for the run record and for stages that need the spec.
pub struct PlanSource {
    pub spec: Option<Arc<LoadedSpec>>,
    pub spec_dir: PathBuf,
    pub spec_file: String,
    pub spec_sha256: String,
}

impl PlanSource {
    pub fn from_spec(spec: Arc<LoadedSpec>) -> PlanSource {
        PlanSource {
            spec_dir: spec.dir.clone(),
            spec_file: spec.file.display().to_string(),
            spec_sha256: spec.source_hash.clone(),
            spec: Some(spec),
        }
    }
}

struct Completed {
    node: NodeIndex,
    key: Option<String>,
    duration_ms: u64,
    result: Result<(StageOutcome, bool), StageError>,
}

pub async fn run(
    plan: &Plan,
    executors: &Executors,
    source: PlanSource,
    options: &RunOptions,
    cancel: CancelFlag,
) -> Result<RunSummary, RunnerError> {
    for &node in &plan.order {
        let stage = &plan.graph[node];
        if executors.get(stage.kind).is_none() {
            return Err(RunnerError::NoExecutor { stage: stage.name.clone(), kind: stage.kind.as_str() });
        }
    }
    // Absolute, because steps run in the spec's directory and receive these paths.
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let state_dir = absolute(&options.state_dir);
    let runs_dir = absolute(&options.runs_dir);
    let run_id = crate::timefmt::new_run_id();
    let run_dir = runs_dir.join(&plan.name).join(&run_id);
    let record_error = |source| RunnerError::Record { path: run_dir.clone(), source };
    std::fs::create_dir_all(&run_dir).map_err(record_error)?;
    let cache = Cache::new(&state_dir);
    cache.sweep_stale();
    let display = Progress::new(options.progress);

    let mut record = RunRecord {
        schema: record::RUN_RECORD_SCHEMA,
        tangle_version: env!("CARGO_PKG_VERSION").to_string(),
        pipeline: plan.name.clone(),
        run_id: run_id.clone(),
        spec_file: source.spec_file.clone(),
        spec_sha256: source.spec_sha256.clone(),
        started_at: crate::timefmt::now_rfc3339(),
        finished_at: None,
        status: RunStatus::Running,
        exit_code: None,
        stages: plan
            .order
            .iter()
            .map(|&n| StageRecord {
                name: plan.graph[n].name.clone(),
                kind: plan.graph[n].kind.as_str().to_string(),
                key: None,
                state: StageState::Pending,
                cache_hit: false,
                started_at: None,
                duration_ms: None,
                error: None,
                summary: Value::Null,
            })
            .collect(),
    };
    record.save(&run_dir).map_err(record_error)?;
    update_latest_link(&runs_dir.join(&plan.name), &record.run_id);
    display.println(&format!("run {run_id} of `{}`: {} stages → {}", plan.name, plan.order.len(), run_dir.display()));

    let position = |node: NodeIndex| plan.order.iter().position(|&n| n == node).unwrap_or(0);
    let shared = Arc::new(Shared {
        cache,
        executors: executors.clone(),
        source,
        run_dir: run_dir.clone(),
        run_id,
        state_dir,
        cancel: cancel.clone(),
        display: display.clone(),
    });
    let mut keys: Vec<Option<String>> = vec![None; plan.graph.node_count()];
    let mut running: JoinSet<Completed> = JoinSet::new();
    let mut halted = false;
    let mut failed = false;
    let mut stopped = false;
    let jobs = options.jobs.max(1);

    loop {
        // Start every ready stage the bound allows, in plan order.
        if !failed && !stopped && !cancel.is_cancelled() {
            for &node in &plan.order {
                if running.len() >= jobs {
                    break;
                }
                let i = position(node);
                if record.stages[i].state != StageState::Pending {
                    continue;
                }
                let inputs = plan.inputs(node);
                if inputs.iter().any(|(_, s)| record.stages[position(*s)].state == StageState::Skipped) {
                    record.stages[i].state = StageState::Skipped;
                    record.stages[i].error = Some("an upstream stage halted the pipeline".into());
                    continue;
                }
                if !inputs.iter().all(|(_, s)| record.stages[position(*s)].state.is_complete()) {
                    continue;
                }
                let artifacts: Vec<InputArtifact> = inputs
                    .iter()
                    .map(|&(port, s)| {
                        let key = keys[s.index()].clone().unwrap_or_default();
                        InputArtifact {
                            port,
                            stage: plan.graph[s].name.clone(),
                            dir: shared.cache_files_dir(&plan.graph[s], &key),
                            key,
                        }
                    })
                    .collect();
                record.stages[i].state = StageState::Running;
                record.stages[i].started_at = Some(crate::timefmt::now_rfc3339());
                let stage = plan.graph[node].clone();
                let shared = Arc::clone(&shared);
                let handle = tokio::runtime::Handle::current();
                running.spawn_blocking(move || shared.execute(node, &stage, artifacts, handle));
            }
            record.save(&run_dir).map_err(record_error)?;
        }
        if running.is_empty() {
            break;
        }
        let completed = tokio::select! {
            joined = running.join_next() => match joined {
                Some(Ok(done)) => done,
                Some(Err(panic)) => {
                    // A panicking executor is a bug; record it like a failure of an unknown stage.
                    display.warn(&format!("a stage panicked: {panic}"));
                    failed = true;
                    continue;
                }
                None => break,
            },
            _ = cancel.cancelled(), if !cancel.is_cancelled() => continue,
        };
        let i = position(completed.node);
        let stage = &plan.graph[completed.node];
        let entry = &mut record.stages[i];
        entry.key = completed.key.clone();
        entry.duration_ms = Some(completed.duration_ms);
        keys[completed.node.index()] = completed.key;
        match completed.result {
            Ok((outcome, cache_hit)) => {
                entry.state = if cache_hit { StageState::Cached } else { StageState::Done };
                entry.cache_hit = cache_hit;
                entry.summary = outcome.summary.clone();
                if let Some(Halt::Rejected { reason }) = &outcome.halt {
                    halted = true;
                    display.println(&format!("  {} halted the pipeline: {reason}", stage.name));
                    for d in descendants(plan, completed.node) {
                        let r = &mut record.stages[position(d)];
                        if r.state == StageState::Pending {
                            r.state = StageState::Skipped;
                            r.error = Some(format!("`{}` halted the pipeline", stage.name));
                        }
                    }
                }
            }
            Err(StageError::Cancelled) => entry.state = StageState::Interrupted,
            Err(StageError::Stopped(reason)) => {
                entry.state = StageState::Stopped;
                entry.error = Some(reason);
                stopped = true;
            }
            Err(StageError::Failed(message)) => {
                entry.state = StageState::Failed;
                entry.error = Some(message);
                failed = true;
            }
        }
        record.save(&run_dir).map_err(record_error)?;
    }

    for stage in &mut record.stages {
        if stage.state == StageState::Pending {
            stage.state = StageState::NotRun;
        }
    }
    record.status = if failed {
        RunStatus::Failed
    } else if stopped {
        RunStatus::Stopped
    } else if cancel.is_cancelled() {
        RunStatus::Interrupted
    } else if halted {
        RunStatus::Rejected
    } else {
        RunStatus::Succeeded
    };
    record.exit_code = Some(crate::exit::Exit::for_run(record.status).code());
    record.finished_at = Some(crate::timefmt::now_rfc3339());
    record.save(&run_dir).map_err(record_error)?;
    Ok(RunSummary { run_dir, record })
}

/// Every stage downstream of `node`.
fn descendants(plan: &Plan, node: NodeIndex) -> Vec<NodeIndex> {
    let mut seen = vec![false; plan.graph.node_count()];
    let mut pending = vec![node];
    let mut out = Vec::new();
    while let Some(n) = pending.pop() {
        for next in plan.graph.neighbors_directed(n, Direction::Outgoing) {
            if !seen[next.index()] {
                seen[next.index()] = true;
                out.push(next);
                pending.push(next);
            }
        }
    }
    out
}

/// `runs/<pipeline>/latest` points at the most recently started run (best effort: a convenience only).
fn update_latest_link(pipeline_dir: &Path, run_id: &str) {
    let link = pipeline_dir.join("latest");
    let tmp = pipeline_dir.join(format!(".latest.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    if std::os::unix::fs::symlink(run_id, &tmp).is_ok() && std::fs::rename(&tmp, &link).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

struct Shared {
    cache: Cache,
    executors: Executors,
    source: PlanSource,
    run_dir: PathBuf,
    run_id: String,
    state_dir: PathBuf,
    cancel: CancelFlag,
    display: Progress,
}

impl Shared {
    fn cache_files_dir(&self, stage: &Stage, key: &str) -> PathBuf {
        self.state_dir.join("cache").join(stage.kind.as_str()).join(key).join("files")
    }

    /// Runs on a blocking thread: key, cache lookup, execution, commit, publication.
    fn execute(
        &self,
        node: NodeIndex,
        stage: &Stage,
        inputs: Vec<InputArtifact>,
        runtime: tokio::runtime::Handle,
    ) -> Completed {
        let started = Instant::now();
        let progress = self.display.stage(&stage.name);
        let mut key = None;
        let result = self.execute_inner(stage, inputs, runtime, &progress, &mut key);
        let duration_ms = started.elapsed().as_millis() as u64;
        let seconds = duration_ms as f64 / 1000.0;
        let line = match &result {
            Ok((outcome, true)) => format!("✓ {} (cached){}", stage.name, brief(&outcome.summary)),
            Ok((outcome, false)) => format!("✓ {} in {seconds:.1}s{}", stage.name, brief(&outcome.summary)),
            Err(StageError::Cancelled) => format!("■ {} interrupted after {seconds:.1}s", stage.name),
            Err(StageError::Stopped(reason)) => format!("■ {} stopped: {reason}", stage.name),
            Err(StageError::Failed(message)) => format!("✗ {} failed after {seconds:.1}s: {message}", stage.name),
        };
        progress.finish(&line);
        Completed { node, key, duration_ms, result }
    }

    fn execute_inner(
        &self,
        stage: &Stage,
        inputs: Vec<InputArtifact>,
        runtime: tokio::runtime::Handle,
        progress: &progress::StageProgress,
        key_out: &mut Option<String>,
    ) -> Result<(StageOutcome, bool), StageError> {
        let executor = self
            .executors
            .get(stage.kind)
            .ok_or_else(|| StageError::Failed(format!("no executor for {} stages", stage.kind.as_str())))?;
        let fingerprint = executor
            .fingerprint(stage, &FingerprintContext { spec_dir: &self.source.spec_dir, state_dir: &self.state_dir })?;
        let key = stage_key(stage, executor.logic_version(), &fingerprint, &inputs);
        *key_out = Some(key.clone());
        let kind = stage.kind.as_str();
        let publish_dir = self.run_dir.join(&stage.name);

        match self.cache.lookup(kind, &key) {
            Ok(Lookup::Hit(entry)) => {
                let outcome: StageOutcome = serde_json::from_value(entry.manifest.outcome.clone()).unwrap_or_default();
                publish(&entry.files(), &publish_dir, progress);
                return Ok((outcome, true));
            }
            Ok(Lookup::Corrupted { reason }) => {
                progress.warn(&format!("cache entry {} was damaged ({reason}); recomputing", short(&key)));
            }
            Ok(Lookup::Miss) => {}
            Err(e) => progress.warn(&format!("cache lookup failed ({e}); recomputing")),
        }

        let staging =
            self.cache.stage(kind, &key).map_err(|e| StageError::io("cannot create a staging directory", e))?;
        let work_dir = self.state_dir.join("work").join(format!("{}-{}", stage.name, short(&key)));
        std::fs::create_dir_all(&work_dir).map_err(|e| StageError::io("cannot create the work directory", e))?;
        let ctx = StageContext {
            out_dir: staging.files(),
            inputs,
            work_dir,
            state_dir: self.state_dir.clone(),
            run_dir: self.run_dir.clone(),
            run_id: self.run_id.clone(),
            spec_dir: self.source.spec_dir.clone(),
            spec: self.source.spec.clone(),
            cancel: self.cancel.clone(),
            progress: progress.clone(),
            runtime,
        };
        let outcome = match executor.execute(stage, &ctx) {
            Ok(outcome) => outcome,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging.dir);
                return Err(e);
            }
        };
        let stored = serde_json::to_value(&outcome).unwrap_or(Value::Null);
        let entry = self
            .cache
            .commit(staging, kind, &key, stored)
            .map_err(|e| StageError::io("cannot commit the stage's outputs to the cache", e))?;
        publish(&entry.files(), &publish_dir, progress);
        Ok((outcome, false))
    }
}

/// The cache key: everything the stage's outputs depend on, hashed.
pub fn stage_key(stage: &Stage, logic_version: u32, fingerprint: &Value, inputs: &[InputArtifact]) -> String {
    let mut input_keys: Vec<(String, String)> = inputs.iter().map(|i| (i.port.to_string(), i.key.clone())).collect();
    input_keys.sort();
    // serde_json's Map is ordered by key, so this serialization is canonical.
    let material = json!({
        "schema": KEY_SCHEMA,
        "kind": stage.kind.as_str(),
        "logic_version": logic_version,
        "config": stage.config,
        "fingerprint": fingerprint,
        "inputs": input_keys,
    });
    crate::fsutil::sha256_bytes(material.to_string().as_bytes())
}

/// Exposes a stage's outputs in the run directory (hard links: no copy of large files).
fn publish(files: &Path, to: &Path, progress: &progress::StageProgress) {
    if let Err(e) = crate::fsutil::link_tree(files, to) {
        progress.warn(&format!("cannot publish outputs to {}: {e}", to.display()));
    }
}

fn short(key: &str) -> &str {
    &key[..16.min(key.len())]
}

/// A one-line rendering of a summary's scalar fields: ` (examples: 90, duplicates: 2)`.
fn brief(summary: &Value) -> String {
    let Value::Object(map) = summary else {
        return String::new();
    };
    let parts: Vec<String> = map
        .iter()
        .filter(|(_, v)| v.is_number() || v.is_string() || v.is_boolean())
        .take(6)
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}: {s}"),
            other => format!("{k}: {other}"),
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" — {}", parts.join(", "))
    }
}
