//! The `deploy` stage: registers the promoted package in the registry (content-verified) and
//! moves the alias to it atomically. It runs only when the gate promoted: a reject halts the
//! pipeline before it.

use super::gate::registry_dir;
use super::{StageContext, StageError, StageExecutor, StageOutcome};
use crate::gate::Decision;
use crate::graph::Stage;
use crate::registry::Registry;
use crate::spec::DeploySpec;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct DeployConfig {
    pipeline: String,
    deploy: DeploySpec,
}

pub struct DeployStage;

impl StageExecutor for DeployStage {
    fn logic_version(&self) -> u32 {
        1
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: DeployConfig = serde_json::from_value(stage.config.clone())
            .map_err(|e| StageError::Failed(format!("internal: bad config for `{}`: {e}", stage.name)))?;
        if let Some(input) = ctx.input("decision") {
            let path = input.dir.join(super::gate::DECISION_FILE);
            let bytes =
                std::fs::read(&path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
            let decision: Decision = serde_json::from_slice(&bytes)
                .map_err(|e| StageError::Failed(format!("{} is damaged: {e}", path.display())))?;
            if !decision.promote {
                return Err(StageError::Failed("internal: deploy reached with a reject decision".into()));
            }
        }
        let package = ctx.require_input("package")?;
        let registry = Registry::open(&registry_dir(c.deploy.registry.as_deref(), &ctx.spec_dir, &ctx.state_dir));
        let fail = |e: crate::registry::RegistryError| StageError::Failed(format!("cannot deploy: {e}"));
        let version = registry.register(&c.pipeline, &package.dir).map_err(fail)?;
        let previous = registry.set_alias(&c.pipeline, &c.deploy.alias, &version).map_err(fail)?;
        let record = json!({
            "pipeline": c.pipeline,
            "version": version,
            "alias": c.deploy.alias,
            "previous": previous,
            "registry": registry.root().display().to_string(),
            "deployed_at": crate::timefmt::now_rfc3339(),
        });
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| StageError::Failed(e.to_string()))?;
        std::fs::write(ctx.out_dir.join("deployment.json"), bytes)
            .map_err(|e| StageError::io("cannot write deployment.json", e))?;
        ctx.progress.println(&format!(
            "  deployed {}@{version} as `{}`{}",
            c.pipeline,
            c.deploy.alias,
            previous.map(|p| format!(" (was {p})")).unwrap_or_default()
        ));
        Ok(StageOutcome { summary: json!({ "version": version, "alias": c.deploy.alias }), halt: None })
    }
}
