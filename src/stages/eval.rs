//! The `eval-teacher` and `eval-student` stages.
//!
//! The teacher is scored on its journaled answers to the eval prompts: nothing is bought
//! twice, and its latency and cost are the ones measured while labeling. The student
//! generates greedily for every eval prompt, timed one request at a time, and its report
//! carries both subjects so the gate can compare them.

use super::label::{read_labels, LABELS_FILE};
use super::package::MODEL_DIR;
use super::train::{prompt_of, resolve_model_source, student_system};
use super::{stage_config, FingerprintContext, StageContext, StageError, StageExecutor, StageOutcome};
use crate::eval::aggregate::{build_report, Generation, ReportMeta, SubjectRun, TEACHER};
use crate::eval::metrics::Scorer;
use crate::graph::Stage;
use crate::model::chat::{Sampling, StudentChat};
use crate::model::loading::select_device;
use crate::report::EvalReport;
use crate::spec::{resolve_against, EvalSpec, StudentSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

pub use super::gate::{REPORT_FILE, REPORT_MD_FILE};
/// The evaluated subject's answers, for the report that merges both subjects.
pub const GENERATIONS_FILE: &str = "generations.jsonl";
pub const STUDENT: &str = "student";

#[derive(Deserialize)]
struct EvalConfig {
    who: String,
    eval: EvalSpec,
    student: Option<StudentSpec>,
}

#[derive(Serialize, Deserialize)]
struct GenerationRow {
    id: String,
    model: String,
    text: String,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    output_tokens: u32,
    cost_usd: f64,
}

impl GenerationRow {
    fn generation(&self) -> Generation {
        Generation {
            text: self.text.clone(),
            latency_ms: self.latency_ms,
            ttft_ms: self.ttft_ms,
            output_tokens: self.output_tokens,
            cost_usd: self.cost_usd,
        }
    }
}

pub struct EvalStage;

fn scorer(eval: &EvalSpec, spec_dir: &Path) -> Result<Scorer, StageError> {
    let schema = match &eval.json_schema {
        Some(path) => {
            let path = resolve_against(spec_dir, path);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| StageError::io(format!("cannot read the JSON Schema {}", path.display()), e))?;
            Some(serde_json::from_str::<Value>(&text).map_err(|e| {
                StageError::Failed(format!(
                    "{}: not JSON ({e}); `eval.json_schema` must name a JSON Schema file",
                    path.display()
                ))
            })?)
        }
        None => None,
    };
    Scorer::new(eval.normalize.clone(), eval.regex.as_deref(), schema.as_ref())
        .map_err(|e| StageError::Failed(e.to_string()))
}

fn write_rows(path: &Path, rows: &[GenerationRow]) -> Result<(), StageError> {
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).map_err(|e| StageError::io(format!("cannot create {}", path.display()), e))?,
    );
    for row in rows {
        let line = serde_json::to_string(row).map_err(|e| StageError::Failed(e.to_string()))?;
        writeln!(file, "{line}").map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))?;
    }
    file.flush().map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))
}

fn read_rows(path: &Path) -> Result<Vec<GenerationRow>, StageError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| StageError::Failed(format!("{}: {e}", path.display()))))
        .collect()
}

fn subject(name: &str, rows: &[GenerationRow]) -> SubjectRun {
    SubjectRun {
        name: name.to_string(),
        model: rows.first().map(|r| r.model.clone()).unwrap_or_default(),
        generations: rows.iter().map(|r| (r.id.clone(), r.generation())).collect(),
    }
}

impl EvalStage {
    fn teacher_rows(
        &self,
        ctx: &StageContext,
        examples: &[crate::dataset::Example],
    ) -> Result<Vec<GenerationRow>, StageError> {
        let labels = read_labels(&ctx.require_input("labels")?.dir.join(LABELS_FILE))?;
        let by_id: HashMap<&str, _> = labels.iter().map(|l| (l.id.as_str(), l)).collect();
        Ok(examples
            .iter()
            .filter_map(|e| by_id.get(e.id.as_str()))
            .map(|l| GenerationRow {
                id: l.id.clone(),
                model: l.model.clone(),
                text: l.text.clone(),
                latency_ms: l.latency_ms as f64,
                ttft_ms: None,
                output_tokens: l.output_tokens.min(u64::from(u32::MAX)) as u32,
                cost_usd: l.cost_usd,
            })
            .collect())
    }

    fn student_rows(
        &self,
        c: &EvalConfig,
        ctx: &StageContext,
        examples: &[crate::dataset::Example],
    ) -> Result<Vec<GenerationRow>, StageError> {
        let student = c.student.as_ref().ok_or_else(|| StageError::Failed("internal: no student section".into()))?;
        crate::train::configure_cpu_threads();
        let device = select_device(&student.device).map_err(|e| StageError::Failed(e.to_string()))?;
        let (source, label) = match ctx.input("model") {
            Some(input) => (input.dir.join(MODEL_DIR).display().to_string(), format!("{} (fine-tuned)", student.model)),
            None => (resolve_model_source(&student.model, &ctx.spec_dir), student.model.clone()),
        };
        ctx.progress.set_message(format!("loading {label}"));
        let mut chat = StudentChat::load(&source, &device)
            .map_err(|e| StageError::Failed(format!("cannot load the student {source}: {e}")))?;
        if ctx.input("model").is_none() {
            // An untrained student is prompted like the trained one would be.
            let teacher_system = ctx.spec.as_ref().and_then(|s| s.spec.teacher.as_ref()).and_then(|t| t.system.clone());
            chat.meta.system = student_system(student, teacher_system.as_deref());
        }
        ctx.progress.set_length(examples.len() as u64);
        ctx.progress.set_message("generating");
        let mut rows = Vec::with_capacity(examples.len());
        for example in examples {
            if ctx.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            let messages = chat.with_default_system(&[("user".to_string(), prompt_of(example))]);
            let started = Instant::now();
            let mut first: Option<f64> = None;
            let completion = chat
                .complete(&messages, c.eval.max_new_tokens as usize, Sampling::GREEDY, &[], &mut |_| {
                    first.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1000.0);
                    true
                })
                .map_err(|e| StageError::Failed(format!("student generation failed on example {}: {e}", example.id)))?;
            let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            rows.push(GenerationRow {
                id: example.id.clone(),
                model: label.clone(),
                text: completion.text.trim().to_string(),
                latency_ms,
                ttft_ms: Some(first.unwrap_or(latency_ms)),
                output_tokens: completion.completion_tokens as u32,
                // The student's cost is the machine time it occupies.
                cost_usd: latency_ms / 3_600_000.0 * c.eval.compute_usd_per_hour,
            });
            ctx.progress.inc(1);
        }
        Ok(rows)
    }
}

impl StageExecutor for EvalStage {
    fn logic_version(&self) -> u32 {
        1
    }

    fn fingerprint(&self, stage: &Stage, ctx: &FingerprintContext) -> Result<Value, StageError> {
        let c: EvalConfig = stage_config(stage)?;
        let schema = match &c.eval.json_schema {
            Some(path) => {
                let path = resolve_against(ctx.spec_dir, path);
                Some(
                    crate::fsutil::sha256_file(&path)
                        .map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?,
                )
            }
            None => None,
        };
        // An untrained student is read straight from `student.model`: its files are inputs.
        let model = match (&c.student, c.who.as_str()) {
            (Some(s), STUDENT) => super::train::local_model_fingerprint(&s.model, ctx.spec_dir),
            _ => Value::Null,
        };
        Ok(json!({ "json_schema_sha256": schema, "model": model }))
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: EvalConfig = stage_config(stage)?;
        let split = ctx.require_input("split")?;
        let examples = super::dataset::read_examples(&split.dir.join(super::dataset::EVAL_FILE))?;
        let scorer = scorer(&c.eval, &ctx.spec_dir)?;
        let mut subjects = Vec::new();
        let rows = if c.who == TEACHER {
            self.teacher_rows(ctx, &examples)?
        } else {
            let rows = self.student_rows(&c, ctx, &examples)?;
            if let Some(teacher) = ctx.input("teacher_report") {
                subjects.push(subject(TEACHER, &read_rows(&teacher.dir.join(GENERATIONS_FILE))?));
            }
            rows
        };
        subjects.insert(0, subject(&c.who, &rows));
        write_rows(&ctx.out_dir.join(GENERATIONS_FILE), &rows)?;

        let spec = ctx.spec.as_ref();
        let meta = ReportMeta {
            pipeline: spec.map(|s| s.spec.name.clone()).unwrap_or_default(),
            run_id: ctx.run_id.clone(),
            created_at: crate::timefmt::now_rfc3339(),
            spec_sha256: spec.map(|s| s.source_hash.clone()).unwrap_or_default(),
        };
        let report: EvalReport =
            build_report(meta, &examples, &subjects, &c.eval.metrics, &scorer, c.eval.bootstrap_samples, 0x7a6e_6c65);
        let text = serde_json::to_string_pretty(&report).map_err(|e| StageError::Failed(e.to_string()))?;
        crate::fsutil::write_atomic(&ctx.out_dir.join(REPORT_FILE), text.as_bytes())
            .map_err(|e| StageError::io("cannot write report.json", e))?;
        std::fs::write(ctx.out_dir.join(REPORT_MD_FILE), report.to_markdown())
            .map_err(|e| StageError::io("cannot write report.md", e))?;

        let mut summary = serde_json::Map::new();
        summary.insert("examples".into(), json!(examples.len()));
        for (name, s) in &report.subjects {
            let figures: serde_json::Map<String, Value> =
                s.metrics.iter().map(|(m, e)| (m.clone(), json!((e.value * 1e4).round() / 1e4))).collect();
            summary.insert(name.clone(), Value::Object(figures));
        }
        let line = report
            .subjects
            .get(&c.who)
            .map(|s| {
                c.eval
                    .metrics
                    .iter()
                    .filter_map(|m| s.metrics.get(m).map(|e| format!("{m} {:.3}", e.value)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        ctx.progress.finish(&format!("{} examples: {line}", examples.len()));
        Ok(StageOutcome { summary: Value::Object(summary), halt: None })
    }
}
