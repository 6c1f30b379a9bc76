//! Stage executors: what each kind of stage does when the runner decides it must run.
//!
//! An executor reads its inputs' output directories, writes its own outputs into
//! `ctx.out_dir`, and returns a summary. It does not know about caching, run records or
//! concurrency: the runner owns those. Executors run on a blocking thread; async work
//! inside one goes through `ctx.runtime`.

pub mod dataset;
pub mod deploy;
pub mod eval;
pub mod gate;
pub mod label;
pub mod package;
pub mod step;
pub mod student;
pub mod train;

use crate::graph::{Stage, StageKind};
use crate::runner::progress::StageProgress;
use crate::spec::LoadedSpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub trait StageExecutor: Send + Sync {
    /// Bump whenever the executor would produce different outputs for the same inputs, so
    /// old cache entries stop matching.
    fn logic_version(&self) -> u32;

    /// Key material from outside the spec, such as the contents of a file the stage reads.
    fn fingerprint(&self, _stage: &Stage, _ctx: &FingerprintContext) -> Result<Value, StageError> {
        Ok(Value::Null)
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError>;
}

pub struct FingerprintContext<'a> {
    pub spec_dir: &'a Path,
    pub state_dir: &'a Path,
}

/// An input's output directory.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    pub port: &'static str,
    pub stage: String,
    pub key: String,
    pub dir: PathBuf,
}

pub struct StageContext {
    /// Write outputs here; the runner commits them to the cache on success.
    pub out_dir: PathBuf,
    pub inputs: Vec<InputArtifact>,
    /// Survives crashes and re-runs of the same stage key: journals, checkpoints.
    pub work_dir: PathBuf,
    /// The state directory (`.tangle`), for stores shared across keys.
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub run_id: String,
    /// Relative paths in stage configs resolve against this.
    pub spec_dir: PathBuf,
    /// The validated spec, for what stays out of configs (secrets).
    pub spec: Option<Arc<LoadedSpec>>,
    pub cancel: CancelFlag,
    pub progress: StageProgress,
    pub runtime: tokio::runtime::Handle,
}

impl StageContext {
    /// Starts (or finds, when this run already did) the server `launch` describes for
    /// `base_url`, logging under the state directory; Ctrl-C while it starts cancels.
    pub async fn launch_server(&self, base_url: &str, launch: &crate::spec::LaunchSpec) -> Result<(), StageError> {
        let flag = self.cancel.clone();
        crate::launch::ensure_running(base_url, launch, &self.spec_dir, &self.state_dir.join("logs"), &|| {
            flag.is_cancelled()
        })
        .await
        .map(|_| ())
        .map_err(|e| if self.cancel.is_cancelled() { StageError::Cancelled } else { StageError::Failed(e) })
    }

    pub fn input(&self, port: &str) -> Option<&InputArtifact> {
        self.inputs.iter().find(|i| i.port == port)
    }

    pub fn require_input(&self, port: &str) -> Result<&InputArtifact, StageError> {
        self.input(port).ok_or_else(|| StageError::Failed(format!("internal: input `{port}` is not connected")))
    }
}

/// What a finished stage reports. Stored with its cache entry and replayed on a hit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageOutcome {
    /// Counts and figures shown to the user and written to run.json.
    pub summary: Value,
    /// Set when downstream stages must not run although this one succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt: Option<Halt>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Halt {
    /// The gate rejected the candidate (exit code 3).
    Rejected { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{0}")]
    Failed(String),
    /// Ctrl-C: the stage stopped early and kept what it had (journals, checkpoints).
    #[error("interrupted")]
    Cancelled,
    /// A budget or circuit breaker stopped the stage; it resumes once an operator acts
    /// (exit code 4).
    #[error("{0}")]
    Stopped(String),
}

/// A stage's config (the graph's resolved JSON) as the executor's own type.
pub(crate) fn stage_config<T: serde::de::DeserializeOwned>(stage: &Stage) -> Result<T, StageError> {
    serde_json::from_value(stage.config.clone())
        .map_err(|e| StageError::Failed(format!("internal: bad config for `{}`: {e}", stage.name)))
}

impl StageError {
    pub fn io(context: impl std::fmt::Display, error: std::io::Error) -> StageError {
        StageError::Failed(format!("{context}: {error}"))
    }
}

/// Cooperative cancellation shared by the runner, the stages and labeling.
pub use crate::cancel::CancelToken as CancelFlag;

/// Which executor runs each stage kind.
#[derive(Clone, Default)]
pub struct Executors {
    by_kind: HashMap<StageKind, Arc<dyn StageExecutor>>,
}

impl Executors {
    /// The executors this build has.
    pub fn builtin() -> Executors {
        let mut e = Executors::default();
        e.insert(StageKind::Dataset, Arc::new(dataset::LoadExamples));
        e.insert(StageKind::Split, Arc::new(dataset::SplitExamples));
        e.insert(StageKind::Step, Arc::new(step::ShellStep));
        e.insert(StageKind::Label, Arc::new(label::LabelStage));
        e.insert(StageKind::Train, Arc::new(train::TrainStage));
        e.insert(StageKind::Eval, Arc::new(eval::EvalStage));
        e.insert(StageKind::Gate, Arc::new(gate::GateStage));
        e.insert(StageKind::Package, Arc::new(package::PackageStage));
        e.insert(StageKind::Deploy, Arc::new(deploy::DeployStage));
        e
    }

    pub fn insert(&mut self, kind: StageKind, executor: Arc<dyn StageExecutor>) {
        self.by_kind.insert(kind, executor);
    }

    pub fn get(&self, kind: StageKind) -> Option<Arc<dyn StageExecutor>> {
        self.by_kind.get(&kind).cloned()
    }
}
