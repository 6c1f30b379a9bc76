//! The pipeline spec as typed data: one struct per section of the YAML file.
//!
//! Field names are the YAML keys. Every struct denies unknown keys; optional keys have
//! documented defaults. Values are checked beyond their types in `validate.rs`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Names the pipeline; runs go to `runs/<name>/`. Letters, digits, `-`, `_`, `.`.
    pub name: String,
    pub description: Option<String>,
    pub teacher: Option<TeacherSpec>,
    pub student: Option<StudentSpec>,
    pub dataset: DatasetSpec,
    pub train: Option<TrainSpec>,
    pub eval: Option<EvalSpec>,
    pub gate: Option<GateSpec>,
    pub deploy: Option<DeploySpec>,
    /// Extra shell-command stages wired into the graph by name.
    #[serde(default)]
    pub steps: Vec<StepSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// Ordered: the first healthy target serves, later ones are failover.
    pub targets: Vec<TargetSpec>,
    /// The system prompt sent with every request.
    pub system: Option<String>,
    #[serde(default)]
    pub params: GenerationParams,
    /// Top-K logprobs per output token, for token-level distillation (OpenAI-compatible).
    pub logprobs: Option<u32>,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Calls in flight while labeling the eval split, whose latencies the report sets
    /// beside the student's (measured one request at a time); default `concurrency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_concurrency: Option<u32>,
    pub rate_limits: Option<RateLimits>,
    pub budget: Option<Budget>,
    /// Price of the teacher's tokens; targets may override it.
    pub pricing: Option<Pricing>,
    /// Seconds before one request is abandoned and retried or failed over.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    #[serde(default = "default_retries")]
    pub max_retries: u32,
}

fn default_concurrency() -> u32 {
    16
}
fn default_timeout_s() -> f64 {
    60.0
}
fn default_retries() -> u32 {
    3
}

/// Which wire protocol a teacher target speaks: the proxy's vocabulary too.
pub use crate::target::ProviderKind as Provider;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub provider: Provider,
    pub model: String,
    /// Always `${ENV_VAR}`: a literal key in a spec file is refused.
    pub api_key: Option<Secret>,
    pub base_url: Option<String>,
    pub pricing: Option<Pricing>,
    /// A local server tangle starts when (and only when) a label is missing, and stops
    /// when labeling ends. `base_url` says where it listens.
    pub launch: Option<LaunchSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    /// A shell command (`sh -c`) run in the spec's directory. `$TANGLE_EXE` is the running
    /// tangle binary and `$TANGLE_PORT` the port of the target's `base_url`.
    pub command: String,
    /// Seconds to wait for the server to answer HTTP at `base_url` before giving up.
    #[serde(default = "default_ready_timeout_s")]
    pub ready_timeout_s: f64,
}

fn default_ready_timeout_s() -> f64 {
    300.0
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerationParams {
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub top_p: Option<f64>,
    pub stop: Option<Vec<String>>,
    pub seed: Option<u64>,
}

pub use crate::target::{Budget, Pricing, RateLimits};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    /// A Hugging Face hub id (`Qwen/Qwen2.5-0.5B-Instruct`), a local model directory, or a
    /// GGUF file.
    pub model: String,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Longest tokenized example used in training and eval; longer ones are truncated and
    /// counted.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: u32,
    /// The system prompt the student is trained, evaluated and served with. Defaults to the
    /// teacher's: a fine-tuned student often needs no long instructions, and a shorter
    /// prompt is cheaper to serve.
    pub system: Option<String>,
    /// Also export the fine-tuned student as a quantized GGUF, and evaluate, deploy and
    /// serve that copy (the full-precision one is evaluated beside it, so the report shows
    /// what quantization changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<Quantization>,
}

/// Quantized export formats for the student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Quantization {
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_k")]
    Q4K,
}

fn default_device() -> String {
    "auto".into()
}
fn default_max_seq_len() -> u32 {
    512
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// JSONL (`messages` in OpenAI chat format, or `prompt`; optional `reference`) or CSV.
    pub path: String,
    pub format: Option<DatasetFormat>,
    /// Share of examples held out for eval, in (0, 1).
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub seed: u64,
    /// CSV only: the column holding the prompt.
    #[serde(default = "default_prompt_column")]
    pub prompt_column: String,
    /// CSV only: the column holding the reference output, if any.
    #[serde(default = "default_reference_column")]
    pub reference_column: String,
}

fn default_eval_fraction() -> f64 {
    0.1
}
fn default_prompt_column() -> String {
    "prompt".into()
}
fn default_reference_column() -> String {
    "reference".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Jsonl,
    Csv,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default)]
    pub method: TrainMethod,
    pub lora: Option<LoraSpec>,
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_one")]
    pub grad_accum: u32,
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Share of steps spent warming the learning rate up, before the cosine decay.
    #[serde(default = "default_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub loss: LossSpec,
    #[serde(default)]
    pub seed: u64,
    /// Save a resumable checkpoint every N optimizer steps.
    pub checkpoint_every: Option<u32>,
}

fn default_epochs() -> u32 {
    3
}
fn default_batch_size() -> u32 {
    8
}
fn default_one() -> u32 {
    1
}
fn default_warmup() -> f64 {
    0.05
}
fn default_clip() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMethod {
    #[default]
    Lora,
    Full,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    #[serde(default = "default_rank")]
    pub rank: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_lora_targets")]
    pub targets: Vec<String>,
    /// Adapt only the last N decoder layers (default: all). Backward stops below them, and
    /// the frozen layers' output is computed once per example instead of once per epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_layers: Option<u32>,
}

fn default_rank() -> u32 {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_lora_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

pub const LORA_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossSpec {
    #[serde(default)]
    pub kind: LossKind,
    /// KD only: weight of the KL term against the teacher's logprobs (the rest is CE).
    #[serde(default = "default_kd_alpha")]
    pub alpha: f64,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
}

impl Default for LossSpec {
    fn default() -> Self {
        LossSpec { kind: LossKind::Sft, alpha: default_kd_alpha(), temperature: default_temperature() }
    }
}

fn default_kd_alpha() -> f64 {
    0.5
}
fn default_temperature() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Cross-entropy on the teacher's (or the reference) text.
    #[default]
    Sft,
    /// Cross-entropy mixed with KL to the teacher's top-K logprobs.
    Kd,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub metrics: Vec<String>,
    /// Normalisation applied before exact_match / contains / teacher_agreement.
    #[serde(default)]
    pub normalize: Normalize,
    pub regex: Option<String>,
    /// Path to a JSON Schema file, for the `json_schema` metric.
    pub json_schema: Option<String>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: u32,
    /// Resamples for the 95% bootstrap confidence intervals.
    #[serde(default = "default_bootstrap")]
    pub bootstrap_samples: u32,
    /// Price of an hour of the machine that serves the student, for cost per 1k requests.
    #[serde(default = "default_usd_per_hour")]
    pub compute_usd_per_hour: f64,
}

fn default_max_new_tokens() -> u32 {
    64
}
fn default_bootstrap() -> u32 {
    1000
}
fn default_usd_per_hour() -> f64 {
    0.10
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    #[serde(default = "default_true")]
    pub lowercase: bool,
    #[serde(default = "default_true")]
    pub strip: bool,
    #[serde(default)]
    pub strip_punctuation: bool,
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize { lowercase: true, strip: true, strip_punctuation: false }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GateSpec {
    /// Every clause must hold for the candidate to be promoted.
    pub require: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    /// The registry directory; defaults to `.tangle/registry` under the state directory.
    pub registry: Option<String>,
    #[serde(default = "default_alias")]
    pub alias: String,
}

fn default_alias() -> String {
    "production".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    /// A shell command (`sh -c`), run in the spec's directory. It writes its outputs under
    /// `$TANGLE_OUT`; the outputs of each stage it needs are at `$TANGLE_INPUT_<NAME>`.
    pub run: String,
    /// Stages (built-in or steps) that must finish first.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Files whose contents are part of the step's cache key (its script, say).
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A value that came from the environment and must never be shown (`Debug`, `Display` and
/// `Serialize` print `***`): shared with the provider layer, which sends it.
pub use crate::secret::SecretString as Secret;
