//! The `train` stage: fine-tunes the student on the teacher's answers (or the references
//! where there is no teacher) and exports a Hugging Face directory under `model/`.
//!
//! Checkpoints live in the stage's work directory, which survives crashes and Ctrl-C for
//! the same stage key, so an interrupted run resumes at its last checkpoint.

use super::label::{read_labels, LabelRow, LABELS_FILE};
use super::package::MODEL_DIR;
use super::student::{local_model_fingerprint, prompt_of, resolve_model_source, student_system};
use super::{stage_config, StageContext, StageError, StageExecutor, StageOutcome};
use crate::dataset::Example;
use crate::graph::Stage;
use crate::model::chat::{chat_template, write_student_files, QuantizedCopy, StudentMeta};
use crate::model::gguf_export;
use crate::model::loading::{load_model, save_model_dir, select_device, FinetuneMode};
use crate::model::lora::LoraConfig;
use crate::model::tokenizer::ChatExample;
use crate::spec::{LossKind, StudentSpec, TrainMethod, TrainSpec};
use crate::train::{AdamWParams, KdConfig, StopReason, TeacherToken, TrainConfig, TrainExample, Trainer};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

pub const TRAIN_LOG_FILE: &str = "train_log.jsonl";

#[derive(Deserialize)]
struct TrainStageConfig {
    student: StudentSpec,
    train: TrainSpec,
}

pub struct TrainStage;

fn training_examples(
    examples: &[Example],
    labels: &HashMap<String, LabelRow>,
    system: Option<&str>,
    distill_logprobs: bool,
) -> (Vec<TrainExample>, usize) {
    let mut out = Vec::with_capacity(examples.len());
    let mut without_target = 0;
    for example in examples {
        let label = labels.get(&example.id);
        let Some(target) = label.map(|l| l.text.clone()).or_else(|| example.reference.clone()) else {
            without_target += 1;
            continue;
        };
        let teacher = label.filter(|_| distill_logprobs).and_then(|l| l.logprobs.as_ref()).map(|tokens| {
            tokens
                .iter()
                .map(|t| TeacherToken {
                    token: t.token.clone(),
                    top_logprobs: t.top.iter().map(|a| (a.token.clone(), a.logprob as f32)).collect(),
                })
                .collect()
        });
        let chat = ChatExample { system: system.map(str::to_string), prompt: prompt_of(example), target };
        out.push(TrainExample { chat, teacher });
    }
    (out, without_target)
}

fn failed<E: std::fmt::Display>(context: &str) -> impl Fn(E) -> StageError + '_ {
    move |e| StageError::Failed(format!("{context}: {e}"))
}

impl StageExecutor for TrainStage {
    fn logic_version(&self) -> u32 {
        // 2: tokenizer_config.json with the chat template; the quantized copy.
        2
    }

    fn fingerprint(&self, stage: &Stage, ctx: &super::FingerprintContext) -> Result<serde_json::Value, StageError> {
        let c: TrainStageConfig = stage_config(stage)?;
        Ok(json!({ "student": local_model_fingerprint(&c.student.model, ctx.spec_dir) }))
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: TrainStageConfig = stage_config(stage)?;
        let t = &c.train;
        let split = ctx.require_input("split")?;
        let examples = super::dataset::read_examples(&split.dir.join(super::dataset::TRAIN_FILE))?;
        let labels: HashMap<String, LabelRow> = match ctx.input("labels") {
            Some(input) => read_labels(&input.dir.join(LABELS_FILE))?.into_iter().map(|l| (l.id.clone(), l)).collect(),
            None => HashMap::new(),
        };
        let teacher_system = ctx.spec.as_ref().and_then(|s| s.spec.teacher.as_ref()).and_then(|t| t.system.clone());
        let system = student_system(&c.student, teacher_system.as_deref());
        let kd = t.loss.kind == LossKind::Kd;
        let (train_examples, without_target) = training_examples(&examples, &labels, system.as_deref(), kd);
        if train_examples.is_empty() {
            return Err(StageError::Failed(format!(
                "none of the {} training examples has a teacher label or a reference to learn from",
                examples.len()
            )));
        }

        crate::cpu::configure_thread_pool();
        let device = select_device(&c.student.device).map_err(|e| StageError::Failed(e.to_string()))?;
        let mode = match t.method {
            TrainMethod::Full => FinetuneMode::Full,
            TrainMethod::Lora => {
                let l = t.lora.clone().unwrap_or_else(|| {
                    serde_json::from_value(json!({})).expect("LoraSpec has defaults for every field")
                });
                FinetuneMode::Lora(LoraConfig {
                    rank: l.rank as usize,
                    alpha: l.alpha,
                    dropout: l.dropout,
                    targets: l.targets.clone(),
                    last_layers: l.last_layers.map(|n| n as usize),
                })
            }
        };
        ctx.progress.set_message(format!("loading {}", c.student.model));
        let source = resolve_model_source(&c.student.model, &ctx.spec_dir);
        let loaded = load_model(&source, &mode, t.seed, &device)
            .map_err(|e| StageError::Failed(format!("cannot load the student `{}`: {e}", c.student.model)))?;

        let batch = t.batch_size as usize;
        let micro_per_epoch = train_examples.len().div_ceil(batch.max(1));
        let planned_steps = (micro_per_epoch * t.epochs as usize).div_ceil(t.grad_accum.max(1) as usize);
        let checkpoint_dir = ctx.work_dir.join("checkpoint");
        let log_path = ctx.work_dir.join(TRAIN_LOG_FILE);
        let config = TrainConfig {
            epochs: t.epochs as usize,
            batch_size: batch,
            grad_accum_steps: t.grad_accum as usize,
            lr: t.lr,
            warmup_steps: (t.warmup_ratio * planned_steps as f64).ceil() as usize,
            min_lr_ratio: 0.1,
            adamw: AdamWParams { weight_decay: t.weight_decay, ..AdamWParams::default() },
            max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
            max_seq_len: c.student.max_seq_len as usize,
            seed: t.seed,
            checkpoint_every: t.checkpoint_every.map(|n| n as usize),
            checkpoint_dir: Some(checkpoint_dir.clone()),
            log_path: Some(log_path.clone()),
            kd: kd.then_some(KdConfig { alpha: t.loss.alpha, temperature: t.loss.temperature }),
            stop_after_steps: test_step_limit(),
            cache_frozen_layers: true,
        };
        let source_generation_config = std::fs::read_to_string(loaded.dir.join("generation_config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        let mut trainer = Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &train_examples, config)
            .map_err(failed("cannot prepare training"))?;
        let mut resumed_at = 0;
        if Trainer::has_checkpoint(&checkpoint_dir) {
            trainer.resume_from(&checkpoint_dir).map_err(failed("cannot resume from the checkpoint"))?;
            resumed_at = trainer.step();
            ctx.progress.println(&format!("resuming training at step {resumed_at} from {}", checkpoint_dir.display()));
        }
        ctx.progress.set_length(trainer.total_steps() as u64);
        ctx.progress.set_position(resumed_at as u64);
        let started = Instant::now();
        let bar = ctx.progress.clone();
        let outcome = trainer
            .train(
                &mut |p| {
                    bar.set_position(p.step as u64);
                    bar.set_message(format!("loss {:.4}, {:.0} tok/s", p.loss, p.tokens_per_second));
                },
                ctx.cancel.as_atomic(),
            )
            .map_err(failed("training failed"))?;
        match outcome.stop {
            StopReason::Completed => {}
            StopReason::Cancelled => return Err(StageError::Cancelled),
            StopReason::StepLimit => {
                return Err(StageError::Failed(format!(
                    "stopped after {} steps (TANGLE_TEST_STOP_AFTER_STEPS); the checkpoint resumes it",
                    outcome.steps_done
                )))
            }
        }
        let seconds = started.elapsed().as_secs_f64();

        let model_dir = ctx.out_dir.join(MODEL_DIR);
        save_model_dir(trainer.model(), trainer.tokenizer(), &model_dir, source_generation_config.as_ref())
            .map_err(failed("cannot export the model"))?;
        let quantized = match c.student.quantize {
            Some(quantization) => {
                let format = crate::model::gguf_export::QuantFormat::from(quantization);
                ctx.progress.set_message(format!("exporting {}", format.file_name()));
                let name = match ctx.spec.as_ref() {
                    Some(s) => format!("{} student ({})", s.spec.name, c.student.model),
                    None => c.student.model.clone(),
                };
                let started = Instant::now();
                let exported = gguf_export::export_dir(
                    &model_dir,
                    &model_dir.join(format.file_name()),
                    format,
                    &name,
                    &chat_template(system.as_deref()),
                )
                .map_err(failed("cannot export the quantized student"))?;
                ctx.progress.println(&format!(
                    "exported {} ({:.0} MB, {} matrices {}, {} in q8_0 where rows do not fit its blocks) in {:.1} s",
                    format.file_name(),
                    exported.bytes as f64 / 1e6,
                    exported.quantized_tensors,
                    format.name(),
                    exported.fallback_tensors,
                    started.elapsed().as_secs_f64()
                ));
                Some(QuantizedCopy { file: format.file_name(), format: format.name().to_string() })
            }
            None => None,
        };
        let meta = StudentMeta { system: system.clone(), max_seq_len: c.student.max_seq_len as usize, quantized };
        write_student_files(&model_dir, &meta).map_err(|e| StageError::io("cannot write the student metadata", e))?;
        drop(trainer);
        // Activations and optimizer state are gone; the rest of the run needs none of it.
        crate::cpu::release_freed_memory();
        if log_path.exists() {
            std::fs::copy(&log_path, ctx.out_dir.join(TRAIN_LOG_FILE))
                .map_err(|e| StageError::io("cannot copy the training log", e))?;
        }
        let first_loss = first_logged_loss(&log_path);
        let d = &outcome.data;
        ctx.progress.finish(&format!(
            "{} steps, loss {} → {:.4}, {:.0} s",
            outcome.total_steps,
            first_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "?".into()),
            outcome.last_loss.unwrap_or(f64::NAN),
            seconds
        ));
        Ok(StageOutcome {
            summary: json!({
                "examples": d.examples,
                "examples_without_target": without_target,
                "from_teacher": examples.iter().filter(|e| labels.contains_key(&e.id)).count(),
                "truncated_examples": d.truncated_examples,
                "teacher_positions_mapped": d.teacher_positions_mapped,
                "teacher_positions_unmapped": d.teacher_positions_unmapped,
                "steps": outcome.total_steps,
                "resumed_at_step": resumed_at,
                "first_loss": first_loss,
                "final_loss": outcome.last_loss,
                "seconds": seconds,
                "method": match t.method { TrainMethod::Full => "full", TrainMethod::Lora => "lora" },
            }),
            halt: None,
        })
    }
}

fn first_logged_loss(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let first: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
    first.get("loss")?.as_f64()
}

/// Tests stop training part-way to prove resume; never set in normal use.
fn test_step_limit() -> Option<usize> {
    std::env::var("TANGLE_TEST_STOP_AFTER_STEPS").ok()?.parse().ok()
}
