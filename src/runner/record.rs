//! `run.json`: the record of one run, rewritten atomically at every stage transition so a
//! crash leaves an accurate account of what had finished.

use crate::fsutil;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

pub const RUN_RECORD_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub schema: u32,
    pub tangle_version: String,
    pub pipeline: String,
    pub run_id: String,
    /// The spec file and the sha256 of its bytes.
    pub spec_file: String,
    pub spec_sha256: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub stages: Vec<StageRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    /// The gate rejected the candidate.
    Rejected,
    /// A budget or breaker stopped a stage; waiting for an operator.
    Stopped,
    Interrupted,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub name: String,
    pub kind: String,
    /// The cache key, once the stage's inputs were known.
    pub key: Option<String>,
    pub state: StageState,
    pub cache_hit: bool,
    pub started_at: Option<String>,
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Value::is_null", default)]
    pub summary: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Pending,
    Running,
    /// Ran and committed its outputs.
    Done,
    /// Reused a verified cache entry.
    Cached,
    Failed,
    /// Not run because an upstream stage halted the pipeline (the gate rejected).
    Skipped,
    /// Not run because the run ended early (a failure, a stop or Ctrl-C elsewhere).
    NotRun,
    Interrupted,
    Stopped,
}

impl StageState {
    pub fn is_complete(self) -> bool {
        matches!(self, StageState::Done | StageState::Cached)
    }
}

impl RunRecord {
    pub fn save(&self, run_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        fsutil::write_atomic(&run_dir.join("run.json"), &json)
    }

    pub fn load(run_dir: &Path) -> std::io::Result<RunRecord> {
        let bytes = std::fs::read(run_dir.join("run.json"))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}
