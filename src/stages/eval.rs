//! The `eval-teacher` and `eval-student` stages.
//!
//! The teacher is scored on its journaled answers to the eval prompts: nothing is bought
//! twice, and its latency and cost are the ones measured while labeling. The student is
//! served by `tangle serve` in a child process, as it is deployed, and answers every eval
//! prompt greedily, one request at a time over HTTP; its report carries both subjects so
//! the gate can compare them.

use super::label::{read_labels, LABELS_FILE};
use super::package::MODEL_DIR;
use super::student::{local_model_fingerprint, prompt_of, resolve_model_source, student_system};
use super::{stage_config, FingerprintContext, StageContext, StageError, StageExecutor, StageOutcome};
use crate::eval::aggregate::{build_report, Generation, ReportMeta, SubjectRun, TEACHER};
use crate::eval::metrics::Scorer;
use crate::graph::Stage;
use crate::launch;
use crate::model::chat::StudentChat;
use crate::model::loading::resolve_model_dir;
use crate::providers::config::{GenerationParams, ProviderKind, TargetConfig};
use crate::providers::{default_http_client, ChatMessage, ChatRequest, OpenAiProvider, Provider, ProviderError};
use crate::report::EvalReport;
use crate::serve::models::WeightsChoice;
use crate::spec::{resolve_against, EvalSpec, LaunchSpec, StudentSpec};
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
/// A quantized student's full-precision weights, evaluated beside it.
pub const STUDENT_F32: &str = "student_f32";

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

    /// The student's answers, measured as it is deployed: `tangle serve` in a child process
    /// (its own threads and memory, nothing left over from training), asked one request at
    /// a time over the same OpenAI-compatible API the teacher answered on. A student exported
    /// with a quantized copy is served and scored from it (`student`), and at full precision
    /// beside it (`student_f32`), so the report shows what quantization changed.
    fn student_runs(
        &self,
        c: &EvalConfig,
        ctx: &StageContext,
        examples: &[crate::dataset::Example],
    ) -> Result<Vec<(String, Vec<GenerationRow>)>, StageError> {
        let student = c.student.as_ref().ok_or_else(|| StageError::Failed("internal: no student section".into()))?;
        let teacher_system = ctx.spec.as_ref().and_then(|s| s.spec.teacher.as_ref()).and_then(|t| t.system.clone());
        let system = student_system(student, teacher_system.as_deref());
        let (dir, label) = match ctx.input("model") {
            Some(input) => (input.dir.join(MODEL_DIR), format!("{} (fine-tuned)", student.model)),
            None => {
                let source = resolve_model_source(&student.model, &ctx.spec_dir);
                let dir = resolve_model_dir(&source)
                    .map_err(|e| StageError::Failed(format!("cannot find the student `{}`: {e}", student.model)))?;
                (dir, student.model.clone())
            }
        };
        let meta = StudentChat::read_meta(&dir).map_err(|e| StageError::Failed(e.to_string()))?;
        let quantized = meta.and_then(|m| m.quantized);
        let mut served = Vec::new();
        if let Some(copy) = &quantized {
            served.push((STUDENT, WeightsChoice::Gguf, format!("{label}, {}", copy.format)));
        }
        let name = if served.is_empty() { STUDENT } else { STUDENT_F32 };
        served.push((name, WeightsChoice::Safetensors, label));
        ctx.progress.set_length((examples.len() * served.len()) as u64);
        let mut out = Vec::with_capacity(served.len());
        for (name, weights, label) in served {
            let rows = self.served_rows(&dir, weights, &student.device, system.as_deref(), &label, c, ctx, examples)?;
            out.push((name.to_string(), rows));
        }
        Ok(out)
    }

    /// Starts `tangle serve DIR`, sends it every example greedily (streaming, so the time to
    /// the first token is measured too), and stops it.
    #[allow(clippy::too_many_arguments)]
    fn served_rows(
        &self,
        dir: &Path,
        weights: WeightsChoice,
        device: &str,
        system: Option<&str>,
        label: &str,
        c: &EvalConfig,
        ctx: &StageContext,
        examples: &[crate::dataset::Example],
    ) -> Result<Vec<GenerationRow>, StageError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| StageError::io("cannot find a free port for the student server", e))?
            .port();
        let base_url = format!("http://127.0.0.1:{port}/v1");
        let weights = match weights {
            WeightsChoice::Gguf => "gguf",
            _ => "safetensors",
        };
        let launch = LaunchSpec {
            // The request log (`TANGLE_SERVE_REQUEST_LOG`) counts a launched teacher's answers;
            // the student's must not join it.
            command: format!(
                "unset TANGLE_SERVE_REQUEST_LOG; exec \"$TANGLE_EXE\" serve {} --port \"$TANGLE_PORT\" --device {} --weights {weights} --parallel 1",
                shell_quote(&dir.display().to_string()),
                shell_quote(device)
            ),
            ready_timeout_s: 600.0,
        };
        ctx.progress.set_message(format!("starting {label} ({weights})"));
        let result = ctx.runtime.block_on(async {
            ctx.launch_server(&base_url, &launch).await?;
            ctx.progress.set_message(format!("generating with {label} ({weights})"));
            // The launched `tangle serve` is reached like any OpenAI-compatible target.
            let mut target = TargetConfig::new(ProviderKind::OpenaiCompatible, "student");
            target.base_url = Some(base_url.clone());
            let student = default_http_client()
                .and_then(|client| OpenAiProvider::new(&target, client))
                .map_err(|e| StageError::Failed(format!("cannot reach the student: {e}")))?;
            let params = GenerationParams {
                temperature: Some(0.0),
                max_tokens: Some(c.eval.max_new_tokens),
                ..Default::default()
            };
            let mut rows = Vec::with_capacity(examples.len());
            for example in examples {
                if ctx.cancel.is_cancelled() {
                    return Err(StageError::Cancelled);
                }
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(ChatMessage::system(system));
                }
                messages.push(ChatMessage::user(prompt_of(example)));
                let request = ChatRequest::new(messages, params.clone());
                let answer = timed_stream(&student, &request)
                    .await
                    .map_err(|e| StageError::Failed(format!("the student failed on example {}: {e}", example.id)))?;
                rows.push(GenerationRow {
                    id: example.id.clone(),
                    model: label.to_string(),
                    text: answer.text.trim().to_string(),
                    latency_ms: answer.latency_ms,
                    ttft_ms: Some(answer.ttft_ms.unwrap_or(answer.latency_ms)),
                    output_tokens: answer.completion_tokens,
                    // The student's cost is the machine time it occupies.
                    cost_usd: answer.latency_ms / 3_600_000.0 * c.eval.compute_usd_per_hour,
                });
                ctx.progress.inc(1);
            }
            Ok(rows)
        });
        launch::stop(&base_url);
        result
    }
}

/// One streamed answer and its timing.
struct StreamedAnswer {
    text: String,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    completion_tokens: u32,
}

/// Streams one answer, timing its first piece of text and its end.
async fn timed_stream(provider: &dyn Provider, request: &ChatRequest) -> Result<StreamedAnswer, ProviderError> {
    let started = Instant::now();
    let mut ttft_ms = None;
    let mut on_delta = |_: &str| {
        ttft_ms.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1000.0);
    };
    let reply = provider.stream(request, &mut on_delta).await?;
    Ok(StreamedAnswer {
        text: reply.text,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        ttft_ms,
        completion_tokens: reply.usage.output_tokens.min(u64::from(u32::MAX)) as u32,
    })
}

/// A single-quoted shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl StageExecutor for EvalStage {
    fn logic_version(&self) -> u32 {
        // 2: students generate through the serving models; quantized students are
        // evaluated quantized and at full precision.
        2
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
            (Some(s), STUDENT) => local_model_fingerprint(&s.model, ctx.spec_dir),
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
        let runs = if c.who == TEACHER {
            vec![(TEACHER.to_string(), self.teacher_rows(ctx, &examples)?)]
        } else {
            self.student_runs(&c, ctx, &examples)?
        };
        for (name, rows) in &runs {
            subjects.push(subject(name, rows));
        }
        if let Some(teacher) = ctx.input("teacher_report").filter(|_| c.who != TEACHER) {
            subjects.push(subject(TEACHER, &read_rows(&teacher.dir.join(GENERATIONS_FILE))?));
        }
        // The evaluated subject's own answers (the served form for a student).
        write_rows(&ctx.out_dir.join(GENERATIONS_FILE), &runs[0].1)?;

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
