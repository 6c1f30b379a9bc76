//! The training loop: batching, accumulation, clipping, fused AdamW, schedule, logging,
//! checkpoints, exact resume and cancellation.
//!
//! Determinism: the data order of every epoch and the LoRA dropout of every micro-batch are
//! pure functions of (seed, step), so a checkpoint only needs the weights, the optimizer
//! moments and the step; a run resumed from it replays exactly what an uninterrupted run
//! would have done (bit-identical weights, tested).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::model::qwen::{DropoutRng, ModelError, QwenModel};
use crate::model::tokenizer::{ChatTokenizer, TokenizerError};
use crate::train::data::{epoch_order, make_batch, prepare_examples, DataStats, PreparedExample, TrainExample};
use crate::train::loss::{batch_loss, cross_entropy, KdConfig};
use crate::train::optim::{grad_norm, AdamWParams, FusedAdamW, OptimError};
use crate::train::schedule::LrSchedule;

/// Errors while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("checkpoint {path} does not match this run: {message}\nhint: resume with the same examples, seed and schedule, or start a fresh run")]
    CheckpointMismatch { path: String, message: String },
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("no example has assistant tokens to learn from")]
    NoTrainableExamples,
}

/// Hyper-parameters and bookkeeping of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum_steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    pub adamw: AdamWParams,
    /// Global gradient-norm clip (None: no clipping).
    pub max_grad_norm: Option<f64>,
    pub max_seq_len: usize,
    pub seed: u64,
    /// Checkpoint after every N optimizer steps (needs `checkpoint_dir`).
    pub checkpoint_every: Option<usize>,
    pub checkpoint_dir: Option<PathBuf>,
    /// JSONL file that gets one line per optimizer step (appended to).
    pub log_path: Option<PathBuf>,
    /// Token-level distillation where examples carry teacher top-k.
    pub kd: Option<KdConfig>,
    /// Stop (checkpoint and return) once this many steps are done; the schedule still spans
    /// the full run, so a later resume continues it unchanged.
    pub stop_after_steps: Option<usize>,
    /// Compute the frozen layers below the first trained one once per example and reuse
    /// their output every epoch (when it fits in memory). Off only to measure or compare.
    #[serde(default = "default_true")]
    pub cache_frozen_layers: bool,
}

fn default_true() -> bool {
    true
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 4,
            grad_accum_steps: 1,
            lr: 2e-4,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            adamw: AdamWParams::default(),
            max_grad_norm: Some(1.0),
            max_seq_len: 512,
            seed: 42,
            checkpoint_every: None,
            checkpoint_dir: None,
            log_path: None,
            kd: None,
            stop_after_steps: None,
            cache_frozen_layers: true,
        }
    }
}

/// Progress reported after every optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    /// Optimizer steps done (1-based after the first step).
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
}

/// Why [`Trainer::train`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StopReason {
    Completed,
    Cancelled,
    StepLimit,
}

/// The result of a call to [`Trainer::train`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainOutcome {
    pub stop: StopReason,
    pub steps_done: usize,
    pub total_steps: usize,
    pub last_loss: Option<f64>,
    pub data: DataStats,
}

/// Saved alongside the weights; checked on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    optimizer_steps: u64,
    seed: u64,
    total_steps: usize,
    examples: usize,
}

const STATE_FILE: &str = "trainer_state.json";
const WEIGHTS_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

fn io_error(path: &Path, error: impl std::fmt::Display) -> TrainError {
    TrainError::Io { path: path.display().to_string(), message: error.to_string() }
}

/// Trains the variables of a [`QwenModel`] (full fine-tune or LoRA adapters).
pub struct Trainer {
    config: TrainConfig,
    model: QwenModel,
    tokenizer: ChatTokenizer,
    optimizer: FusedAdamW,
    examples: Vec<PreparedExample>,
    stats: DataStats,
    step: usize,
    device: Device,
    /// Per example, the hidden states (len, hidden) entering the first trained layer, when
    /// the layers below are frozen: computed once, reused every epoch.
    frozen_prefix: Option<FrozenPrefix>,
}

/// The frozen bottom of the model's output for every example.
struct FrozenPrefix {
    layer: usize,
    hidden: Vec<Tensor>,
}

/// Largest cache of frozen-layer outputs kept in memory; beyond it they are recomputed.
const FROZEN_PREFIX_BUDGET_BYTES: usize = 1 << 30;

impl Trainer {
    /// Prepares a run: tokenizes examples (truncation and teacher mapping are counted in
    /// [`Trainer::data_stats`]) and creates the optimizer over every variable in `trainable`.
    pub fn new(
        model: QwenModel,
        trainable: &VarMap,
        tokenizer: ChatTokenizer,
        examples: &[TrainExample],
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        if config.batch_size == 0 || config.grad_accum_steps == 0 || config.epochs == 0 {
            return Err(TrainError::Config("epochs, batch_size and grad_accum_steps must be at least 1".into()));
        }
        if config.checkpoint_every.is_some() && config.checkpoint_dir.is_none() {
            return Err(TrainError::Config("checkpoint_every needs checkpoint_dir".into()));
        }
        let (prepared, stats) = prepare_examples(&tokenizer, examples, config.max_seq_len)?;
        // Examples with nothing to learn would make empty batches; they are counted in the
        // stats and left out.
        let prepared: Vec<PreparedExample> =
            prepared.into_iter().filter(|e| e.assistant_mask.iter().skip(1).any(|&m| m == 1)).collect();
        if prepared.is_empty() {
            return Err(TrainError::NoTrainableExamples);
        }
        let mut vars: Vec<(String, Var)> = {
            let data =
                trainable.data().lock().map_err(|_| TrainError::Config("trainable varmap lock poisoned".into()))?;
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        // HashMap order is random; a fixed order keeps the run deterministic.
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let device = model.device().clone();
        Ok(Self {
            optimizer: FusedAdamW::new(vars, config.adamw),
            config,
            model,
            tokenizer,
            examples: prepared,
            stats,
            step: 0,
            device,
            frozen_prefix: None,
        })
    }

    /// Computes the frozen layers' output for every example when there are frozen layers
    /// below the first trained one and the cache fits [`FROZEN_PREFIX_BUDGET_BYTES`].
    /// Chunks are fixed (example order, `batch_size` at a time), so the values do not depend
    /// on the epoch order and a resumed run sees the same ones.
    fn prepare_frozen_prefix(&mut self) -> Result<(), TrainError> {
        let layer = self.model.first_trainable_layer();
        if !self.config.cache_frozen_layers
            || self.frozen_prefix.is_some()
            || layer == 0
            || layer >= self.model.config().num_hidden_layers
        {
            return Ok(());
        }
        let tokens: usize = self.examples.iter().map(|e| e.input_ids.len()).sum();
        if tokens * self.model.config().hidden_size * 4 > FROZEN_PREFIX_BUDGET_BYTES {
            return Ok(());
        }
        let mut hidden = Vec::with_capacity(self.examples.len());
        for chunk in self.examples.chunks(self.config.batch_size) {
            let members: Vec<&PreparedExample> = chunk.iter().collect();
            let batch = make_batch(&members, self.tokenizer.pad_id(), &self.device)?;
            let width = batch.input_ids.dim(1)?;
            let states = self.model.hidden_before_layer(&batch.input_ids, Some(&batch.key_padding), layer)?;
            for (b, example) in chunk.iter().enumerate() {
                // Right padding and the causal mask: a real token's state ignores the padding.
                hidden.push(states.narrow(0, b * width, example.input_ids.len())?.contiguous()?);
            }
        }
        self.frozen_prefix = Some(FrozenPrefix { layer, hidden });
        Ok(())
    }

    /// The cached frozen-layer states of `indices`, padded with zero rows to `width`, as the
    /// (b·width, hidden) input of the first trained layer.
    fn frozen_input(&self, indices: &[usize], width: usize) -> Result<Option<(Tensor, usize)>, TrainError> {
        let Some(prefix) = &self.frozen_prefix else {
            return Ok(None);
        };
        let rows: Vec<Tensor> = indices
            .iter()
            .map(|&i| {
                let states = &prefix.hidden[i];
                let len = states.dim(0)?;
                states.pad_with_zeros(0, 0, width - len)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Some((Tensor::cat(&rows, 0)?, prefix.layer)))
    }

    /// The model being trained.
    pub fn model(&self) -> &QwenModel {
        &self.model
    }

    /// The tokenizer the examples were encoded with.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// Truncation and teacher-mapping counts of the training data.
    pub fn data_stats(&self) -> &DataStats {
        &self.stats
    }

    /// Optimizer steps done so far.
    pub fn step(&self) -> usize {
        self.step
    }

    fn micro_batches_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.config.batch_size)
    }

    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> usize {
        (self.micro_batches_per_epoch() * self.config.epochs).div_ceil(self.config.grad_accum_steps)
    }

    fn schedule(&self) -> LrSchedule {
        LrSchedule {
            peak_lr: self.config.lr,
            warmup_steps: self.config.warmup_steps,
            total_steps: self.total_steps(),
            min_lr_ratio: self.config.min_lr_ratio,
        }
    }

    /// Example indices of global micro-batch `micro`.
    fn micro_batch(&self, micro: usize) -> Vec<usize> {
        let per_epoch = self.micro_batches_per_epoch();
        let epoch = micro / per_epoch;
        let within = micro % per_epoch;
        let order = epoch_order(self.examples.len(), self.config.seed, epoch);
        let start = within * self.config.batch_size;
        let end = (start + self.config.batch_size).min(order.len());
        order[start..end].to_vec()
    }

    /// Runs optimizer steps until the run completes, `cancel` is set (checked between steps)
    /// or `stop_after_steps` is reached; the latter two checkpoint before returning.
    pub fn train(
        &mut self,
        progress: &mut dyn FnMut(&Progress),
        cancel: &AtomicBool,
    ) -> Result<TrainOutcome, TrainError> {
        self.prepare_frozen_prefix()?;
        let total_steps = self.total_steps();
        let total_micro = self.micro_batches_per_epoch() * self.config.epochs;
        let schedule = self.schedule();
        let started = Instant::now();
        let steps_at_start = self.step;
        let mut tokens_seen = 0usize;
        let mut last_loss = None;
        let outcome = |stop, steps_done, last_loss, data: &DataStats| TrainOutcome {
            stop,
            steps_done,
            total_steps,
            last_loss,
            data: data.clone(),
        };
        while self.step < total_steps {
            if cancel.load(Ordering::SeqCst) {
                self.checkpoint_if_configured()?;
                return Ok(outcome(StopReason::Cancelled, self.step, last_loss, &self.stats));
            }
            if self.config.stop_after_steps.is_some_and(|limit| self.step >= limit) {
                self.checkpoint_if_configured()?;
                return Ok(outcome(StopReason::StepLimit, self.step, last_loss, &self.stats));
            }
            let lr = schedule.lr_at(self.step);
            let first_micro = self.step * self.config.grad_accum_steps;
            let last_micro = (first_micro + self.config.grad_accum_steps).min(total_micro);
            let micro_count = last_micro - first_micro;
            let mut grads: Option<candle_core::backprop::GradStore> = None;
            let mut loss_sum = 0f64;
            let mut kl_sum = 0f64;
            let mut kl_batches = 0usize;
            for (offset, micro) in (first_micro..last_micro).enumerate() {
                let indices = self.micro_batch(micro);
                let members: Vec<&PreparedExample> = indices.iter().map(|&i| &self.examples[i]).collect();
                let mut batch = make_batch(&members, self.tokenizer.pad_id(), &self.device)?;
                batch.frozen_input = self.frozen_input(&indices, batch.input_ids.dim(1)?)?;
                tokens_seen += batch.tokens;
                let dropout_seed = self
                    .config
                    .seed
                    .wrapping_mul(0x2545_F491_4F6C_DD1D)
                    .wrapping_add((self.step * 1024 + offset) as u64);
                let dropout = DropoutRng::new(dropout_seed);
                let loss = batch_loss(&self.model, &batch, self.config.kd.as_ref(), Some(&dropout))?;
                loss_sum += loss.total.to_scalar::<f32>()? as f64;
                if let Some(kl) = loss.kl {
                    kl_sum += kl;
                    kl_batches += 1;
                }
                let micro_grads = loss.total.backward()?;
                match grads.as_mut() {
                    Some(store) => store.extend(micro_grads)?,
                    None => grads = Some(micro_grads),
                }
            }
            let grads = grads.ok_or_else(|| TrainError::Config("empty optimizer step".into()))?;
            // Gradients were summed over micro-batches; average them, then clip.
            let average = 1.0 / micro_count as f64;
            let norm = grad_norm(self.optimizer.vars(), &grads)? * average;
            let clip = match self.config.max_grad_norm {
                Some(max) if norm > max => max / (norm + 1e-6),
                _ => 1.0,
            };
            self.optimizer.step(&grads, lr, average * clip)?;
            drop(grads);
            self.step += 1;
            let loss = loss_sum / micro_count as f64;
            last_loss = Some(loss);
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            let steps_this_call = (self.step - steps_at_start) as f64;
            let report = Progress {
                step: self.step,
                total_steps,
                loss,
                lr,
                grad_norm: norm,
                tokens_per_second: tokens_seen as f64 / elapsed,
                eta_seconds: elapsed / steps_this_call * (total_steps - self.step) as f64,
            };
            self.append_log(&report, (kl_batches > 0).then(|| kl_sum / kl_batches as f64))?;
            progress(&report);
            if let Some(every) = self.config.checkpoint_every {
                if every > 0 && self.step % every == 0 {
                    self.checkpoint_if_configured()?;
                }
            }
        }
        self.checkpoint_if_configured()?;
        Ok(outcome(StopReason::Completed, self.step, last_loss, &self.stats))
    }

    fn append_log(&self, progress: &Progress, kl: Option<f64>) -> Result<(), TrainError> {
        let Some(path) = &self.config.log_path else {
            return Ok(());
        };
        let line = serde_json::json!({
            "step": progress.step,
            "loss": progress.loss,
            "kl": kl,
            "lr": progress.lr,
            "grad_norm": progress.grad_norm,
            "tokens_per_second": progress.tokens_per_second,
        });
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| io_error(path, e))?;
        writeln!(file, "{line}").map_err(|e| io_error(path, e))
    }

    fn checkpoint_if_configured(&self) -> Result<(), TrainError> {
        match &self.config.checkpoint_dir {
            Some(dir) => self.save_checkpoint(dir),
            None => Ok(()),
        }
    }

    /// Writes weights, optimizer moments and the step to `dir` (each file written to a
    /// temporary name and renamed, so a crash mid-write leaves the previous checkpoint).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let weights: std::collections::HashMap<String, Tensor> =
            self.optimizer.vars().iter().map(|(name, var)| (name.clone(), var.as_tensor().detach())).collect();
        let optimizer: std::collections::HashMap<String, Tensor> =
            self.optimizer.state_tensors()?.into_iter().collect();
        let state = TrainerState {
            step: self.step,
            optimizer_steps: self.optimizer.step_count(),
            seed: self.config.seed,
            total_steps: self.total_steps(),
            examples: self.examples.len(),
        };
        let write_atomic = |name: &str, write: &dyn Fn(&Path) -> Result<(), TrainError>| {
            let final_path = dir.join(name);
            let temporary = dir.join(format!("{name}.tmp"));
            write(&temporary)?;
            std::fs::rename(&temporary, &final_path).map_err(|e| io_error(&final_path, e))
        };
        write_atomic(WEIGHTS_FILE, &|p| Ok(candle_core::safetensors::save(&weights, p)?))?;
        write_atomic(OPTIMIZER_FILE, &|p| Ok(candle_core::safetensors::save(&optimizer, p)?))?;
        // The state file goes last: its presence marks a complete checkpoint.
        write_atomic(STATE_FILE, &|p| {
            let text = serde_json::to_string_pretty(&state).map_err(|e| io_error(p, e))?;
            std::fs::write(p, text).map_err(|e| io_error(p, e))
        })
    }

    /// Whether `dir` holds a complete checkpoint.
    pub fn has_checkpoint(dir: &Path) -> bool {
        dir.join(STATE_FILE).is_file()
    }

    /// Restores weights, optimizer and step from a checkpoint written by this run's config.
    pub fn resume_from(&mut self, dir: &Path) -> Result<(), TrainError> {
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| io_error(&state_path, e))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| io_error(&state_path, e))?;
        let mismatch = |message: String| TrainError::CheckpointMismatch { path: dir.display().to_string(), message };
        if state.seed != self.config.seed {
            return Err(mismatch(format!("seed {} != {}", state.seed, self.config.seed)));
        }
        if state.total_steps != self.total_steps() || state.examples != self.examples.len() {
            return Err(mismatch(format!(
                "{} steps over {} examples != {} over {}",
                state.total_steps,
                state.examples,
                self.total_steps(),
                self.examples.len()
            )));
        }
        let weights = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &self.device)?;
        for (name, var) in self.optimizer.vars() {
            let saved = weights.get(name).ok_or_else(|| mismatch(format!("no weight {name}")))?;
            var.set(saved)?;
        }
        let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &self.device)?;
        self.optimizer.restore(&optimizer, state.optimizer_steps)?;
        self.step = state.step;
        Ok(())
    }
}

/// Mean per-token cross-entropy of `model` on prepared examples (no gradient kept).
pub fn evaluate_loss(
    model: &QwenModel,
    examples: &[PreparedExample],
    pad_id: u32,
    batch_size: usize,
) -> Result<f64, TrainError> {
    let mut weighted = 0f64;
    let mut tokens = 0usize;
    for chunk in examples.chunks(batch_size.max(1)) {
        let members: Vec<&PreparedExample> = chunk.iter().collect();
        let batch = make_batch(&members, pad_id, model.device())?;
        if batch.loss_rows.is_empty() {
            continue;
        }
        let hidden = model.forward_hidden(&batch.input_ids, Some(&batch.key_padding), None)?;
        let logits = model.logits_at(&hidden, &batch.loss_rows)?.detach();
        let loss = cross_entropy(&logits, &batch.labels)?.to_scalar::<f32>()? as f64;
        weighted += loss * batch.loss_rows.len() as f64;
        tokens += batch.loss_rows.len();
    }
    Ok(weighted / tokens.max(1) as f64)
}
