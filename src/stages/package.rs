//! The `package` stage: turns the trained model into a deployable artifact — the Hugging
//! Face-style model directory, a model card, and `manifest.json` with hashes and lineage —
//! next to the eval report it was judged on.

use super::{stage_config, FingerprintContext, StageContext, StageError, StageExecutor, StageOutcome};
use crate::artifact::{self, Lineage};
use crate::fsutil;
use crate::gate::{round, Decision};
use crate::graph::Stage;
use crate::report::EvalReport;
use crate::spec::{resolve_against, StudentSpec, TeacherSpec};
use serde::Deserialize;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

/// Where the train stage puts the exported model inside its output.
pub const MODEL_DIR: &str = "model";
pub const ARTIFACT_DIR: &str = "artifact";

#[derive(Deserialize)]
struct PackageConfig {
    name: String,
    description: Option<String>,
    teacher: Option<TeacherSpec>,
    student: Option<StudentSpec>,
    spec_sha256: String,
    dataset: String,
}

pub struct PackageStage;

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| StageError::Failed(format!("{} is damaged: {e}", path.display())))
}

impl StageExecutor for PackageStage {
    fn logic_version(&self) -> u32 {
        // 2: a Files section in the model card.
        2
    }

    fn fingerprint(&self, stage: &Stage, ctx: &FingerprintContext) -> Result<Value, StageError> {
        let c: PackageConfig = stage_config(stage)?;
        let path = resolve_against(ctx.spec_dir, &c.dataset);
        let hash =
            fsutil::sha256_file(&path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
        Ok(json!({ "dataset_sha256": hash }))
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: PackageConfig = stage_config(stage)?;
        let model = ctx.require_input("model")?.dir.join(MODEL_DIR);
        if !model.join("config.json").is_file() {
            return Err(StageError::Failed(format!("the trained model at {} has no config.json", model.display())));
        }
        let out = ctx.out_dir.join(ARTIFACT_DIR);
        // The trained model is a verified cache entry that nothing writes in place: link it.
        fsutil::link_tree(&model, &out).map_err(|e| StageError::io("cannot copy the model into the artifact", e))?;
        let report: Option<EvalReport> = match ctx.input("report") {
            Some(input) => Some(read_json(&input.dir.join("report.json"))?),
            None => None,
        };
        let decision: Option<Decision> = match ctx.input("decision") {
            Some(input) => Some(read_json(&input.dir.join("decision.json"))?),
            None => None,
        };
        if let Some(r) = &report {
            let json = serde_json::to_vec_pretty(r).map_err(|e| StageError::Failed(e.to_string()))?;
            std::fs::write(ctx.out_dir.join("report.json"), json)
                .map_err(|e| StageError::io("cannot write report.json", e))?;
        }
        let teacher: Vec<String> = c
            .teacher
            .as_ref()
            .map(|t| {
                t.targets
                    .iter()
                    .map(|t| {
                        format!(
                            "{}/{}",
                            serde_json::to_value(t.provider)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            t.model
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let base_model = c.student.as_ref().map(|s| s.model.clone()).unwrap_or_default();
        let quantized = crate::model::chat::StudentChat::read_meta(&model)
            .map_err(|e| StageError::Failed(e.to_string()))?
            .and_then(|m| m.quantized);
        let card = model_card(&c, &base_model, &teacher, quantized.as_ref(), report.as_ref(), decision.as_ref());
        // Atomic (a rename), so a linked file of the same name is replaced, never written through.
        fsutil::write_atomic(&out.join("README.md"), card.as_bytes())
            .map_err(|e| StageError::io("cannot write the model card", e))?;
        let dataset_sha256 = fsutil::sha256_file(&resolve_against(&ctx.spec_dir, &c.dataset))
            .map_err(|e| StageError::io("cannot hash the dataset", e))?;
        let lineage = Lineage {
            pipeline: c.name.clone(),
            run_id: ctx.run_id.clone(),
            tangle_version: env!("CARGO_PKG_VERSION").into(),
            created_at: crate::timefmt::now_rfc3339(),
            spec_sha256: c.spec_sha256.clone(),
            dataset_sha256,
            base_model,
            teacher,
        };
        let manifest =
            artifact::write_manifest(&out, lineage).map_err(|e| StageError::io("cannot write the manifest", e))?;
        // Readable by the server that deploys it, whoever runs that: models cached by an
        // older tangle were written 0600, and the artifact links them.
        for rel in fsutil::list_files(&out).map_err(|e| StageError::io("cannot list the artifact", e))? {
            fsutil::set_usual_permissions(&out.join(&rel))
                .map_err(|e| StageError::io(format!("cannot set the permissions of {}", rel.display()), e))?;
        }
        Ok(StageOutcome { summary: json!({ "files": manifest.files.len() }), halt: None })
    }
}

fn model_card(
    c: &PackageConfig,
    base: &str,
    teacher: &[String],
    quantized: Option<&crate::model::chat::QuantizedCopy>,
    report: Option<&EvalReport>,
    decision: Option<&Decision>,
) -> String {
    let mut out = String::from("---\n");
    let _ = writeln!(out, "base_model: {base}\ntags:\n- tangle\n- distillation\n---\n");
    let _ = writeln!(out, "# {}\n", c.name);
    if let Some(d) = &c.description {
        let _ = writeln!(out, "{d}\n");
    }
    let _ = writeln!(
        out,
        "Fine-tuned from `{base}` by tangle on outputs of the teacher {}.\n",
        if teacher.is_empty() {
            "(none: references only)".to_string()
        } else {
            teacher.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
        }
    );
    let _ = writeln!(out, "## Files\n");
    let _ = writeln!(
        out,
        "- `model.safetensors`, `config.json`, `tokenizer.json`, `tokenizer_config.json` (with the chat template the student was trained with): a Hugging Face directory, `AutoModelForCausalLM.from_pretrained(\"path/to/artifact\")`."
    );
    if let Some(q) = quantized {
        let _ = writeln!(
            out,
            "- `{}`: the same weights quantized to {}, for llama.cpp (`llama-cli -m {}`) and for `tangle serve`, which serves it by default (`--weights safetensors` serves the full-precision weights). The evaluation below measures both.",
            q.file,
            q.format.to_uppercase(),
            q.file
        );
    }
    let _ = writeln!(out, "- `manifest.json`: the sha256 of every file and the lineage of the run.\n");
    if let Some(r) = report {
        let _ = writeln!(
            out,
            "## Evaluation\n\n{} held-out examples; 95% bootstrap confidence intervals.\n",
            r.examples.len()
        );
        let subjects: Vec<&String> = r.subjects.keys().collect();
        let _ = writeln!(
            out,
            "| metric | {} |\n| --- |{}",
            subjects.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" | "),
            " --- |".repeat(subjects.len())
        );
        let mut names: Vec<&String> = r.subjects.values().flat_map(|s| s.metrics.keys()).collect();
        names.sort();
        names.dedup();
        for m in names {
            let cells: Vec<String> = subjects
                .iter()
                .map(|s| {
                    r.subjects[*s].metrics.get(m).map_or("—".into(), |e| {
                        format!("{} [{}, {}]", round(e.value), round(e.ci_low), round(e.ci_high))
                    })
                })
                .collect();
            let _ = writeln!(out, "| {m} | {} |", cells.join(" | "));
        }
        out.push('\n');
    }
    if let Some(d) = decision {
        let _ = writeln!(out, "## Gate decision: {}\n\n{}\n", if d.promote { "promote" } else { "reject" }, d.reason);
        for clause in &d.clauses {
            let _ = writeln!(out, "- `{}`: {}", clause.clause, if clause.pass { "pass" } else { "fail" });
        }
    }
    out
}
