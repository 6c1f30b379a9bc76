//! The `gate` stage: evaluates the spec's clauses on the eval report and writes
//! `decision.json`; a reject halts the pipeline (exit code 3).

use super::{stage_config, FingerprintContext, StageContext, StageError, StageExecutor, StageOutcome};
use crate::gate::clause::{Clause, MetricRef, Subject};
use crate::gate::{self, Decision};
use crate::graph::Stage;
use crate::registry::{Deployed, Registry};
use crate::report::EvalReport;
use crate::spec::resolve_against;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub const DECISION_FILE: &str = "decision.json";
pub const REPORT_FILE: &str = "report.json";
pub const REPORT_MD_FILE: &str = "report.md";

#[derive(Deserialize)]
struct GateConfig {
    pipeline: String,
    gate: GateClauses,
    deployed: Option<DeployedConfig>,
}

/// The spec's `gate` section with its clauses parsed (validation checked them already).
#[derive(Deserialize)]
struct GateClauses {
    require: Vec<Clause>,
}

#[derive(Deserialize)]
struct DeployedConfig {
    alias: String,
    registry: Option<String>,
}

pub struct GateStage;

/// The registry the deploy section names, or the default under the state directory.
pub fn registry_dir(configured: Option<&str>, spec_dir: &Path, state_dir: &Path) -> PathBuf {
    match configured {
        Some(dir) => resolve_against(spec_dir, dir),
        None => state_dir.join("registry"),
    }
}

impl GateStage {
    fn deployed(
        &self,
        c: &GateConfig,
        pipeline: &str,
        spec_dir: &Path,
        state_dir: &Path,
    ) -> Result<Option<(Registry, Deployed)>, StageError> {
        let Some(d) = &c.deployed else { return Ok(None) };
        let registry = Registry::open(&registry_dir(d.registry.as_deref(), spec_dir, state_dir));
        let deployed = registry
            .resolve(pipeline, &d.alias)
            .map_err(|e| StageError::Failed(format!("cannot read the registry: {e}")))?;
        Ok(deployed.map(|dep| (registry, dep)))
    }
}

impl StageExecutor for GateStage {
    fn logic_version(&self) -> u32 {
        1
    }

    /// When a clause reads a deployed version, that version is part of the key: when the
    /// alias moves, the gate decides again. Gates that never look at the registry stay
    /// cached after their own deploy.
    fn fingerprint(&self, stage: &Stage, ctx: &FingerprintContext) -> Result<Value, StageError> {
        let c: GateConfig = stage_config(stage)?;
        if !c.gate.require.iter().any(Clause::reads_deployed) {
            return Ok(Value::Null);
        }
        let version = self.deployed(&c, &c.pipeline, ctx.spec_dir, ctx.state_dir)?.map(|(_, d)| d.version);
        Ok(json!({ "deployed_version": version }))
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: GateConfig = stage_config(stage)?;
        let input = ctx.require_input("report")?;
        let path = input.dir.join(REPORT_FILE);
        let bytes = std::fs::read(&path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
        let mut report: EvalReport = serde_json::from_slice(&bytes)
            .map_err(|e| StageError::Failed(format!("{} is damaged: {e}", path.display())))?;
        let deployed = self.deployed(&c, &c.pipeline, &ctx.spec_dir, &ctx.state_dir)?;
        let deployed_report = match &deployed {
            Some((registry, d)) => Some(registry.report(d).map_err(|e| {
                StageError::Failed(format!("cannot read the report of deployed version {}: {e}", d.version))
            })?),
            None => None,
        };
        let value = |report: &EvalReport, subject: &str, metric: &str| {
            report.subjects.get(subject).and_then(|s| s.metrics.get(metric)).map(|e| e.value)
        };
        let lookup = |r: &MetricRef| match &r.subject {
            Subject::Student => value(&report, "student", &r.metric),
            Subject::Teacher => value(&report, "teacher", &r.metric),
            Subject::Deployed(_) => deployed_report.as_ref().and_then(|d| value(d, "student", &r.metric)),
        };
        let decision: Decision = gate::evaluate(&c.gate.require, &lookup);
        let json = serde_json::to_vec_pretty(&decision).map_err(|e| StageError::Failed(e.to_string()))?;
        std::fs::write(ctx.out_dir.join(DECISION_FILE), json)
            .map_err(|e| StageError::io("cannot write decision.json", e))?;
        report.decision = Some(decision.clone());
        std::fs::write(ctx.out_dir.join(REPORT_MD_FILE), report.to_markdown())
            .map_err(|e| StageError::io("cannot write report.md", e))?;
        let summary = json!({
            "decision": if decision.promote { "promote" } else { "reject" },
            "clauses": decision.clauses.len(),
            "failed": decision.clauses.iter().filter(|c| !c.pass).count(),
            "deployed_version": deployed.map(|(_, d)| d.version),
        });
        let halt = (!decision.promote).then(|| super::Halt::Rejected { reason: decision.reason.clone() });
        Ok(StageOutcome { summary, halt })
    }
}
