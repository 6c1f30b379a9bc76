//! The inference engine every model tangle serves runs on: the f32 students (converted to
//! an f32 GGUF once), quantized students and GGUF teachers.
//!
//! One thread owns the model and its KV cache and runs **continuous batching**: at every
//! step, requests join (their prompt prefilled in chunks) and leave (finished, stopped, or
//! their client gone) the running batch, and one forward pass serves every running
//! sequence — projections and MLP read the weights once for all of them, attention runs
//! per sequence over its own cells. Prefixes shared across requests (system prompts,
//! few-shot examples, the chat template's opening) are kept in a bounded **prefix cache**
//! and reused by every request that starts with them, concurrent ones included.
//!
//! Invariants:
//! - A sequence's tokens do not depend on what else runs: greedy requests give the tokens
//!   they would alone, seeded ones the same samples, and a prefix-cache hit the same tokens
//!   as a miss (tests/it/engine.rs checks all three).
//! - Admission reserves prompt + `max_tokens` KV cells per sequence, so running sequences
//!   never run out of room; the prefix cache lives in what is left and is evicted first.
//!   Requests beyond the running bound wait in a bounded queue; beyond that, submit says
//!   [`SubmitError::Overloaded`] (the server's 503).
//! - A sequence whose client is gone (its event receiver dropped) leaves the batch at the
//!   next step and its KV is freed.
//! - Only `llama.rs` touches llama.cpp. Heavy work runs on the engine thread, never on an
//!   async executor.

pub mod constraint;
pub mod llama;
pub mod metrics;
pub mod prefix_cache;
pub mod sampling;
mod scheduler;
pub mod text;

pub use constraint::Grammar;
pub use sampling::Sampling;

use crate::model::chat::render_chatml;
use metrics::EngineMetrics;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc, OnceLock};
use tokio::sync::mpsc;

/// Where the engine computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// All layers offloaded to CUDA device N (a `cuda` build).
    Cuda(usize),
}

impl Device {
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when this build has it, else the CPU).
    pub fn parse(text: &str) -> Result<Device, String> {
        match text {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(if cfg!(feature = "cuda") { Device::Cuda(0) } else { Device::Cpu }),
            "cuda" => Self::cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Self::cuda(n),
                _ => Err(format!("unknown device `{other}`\nhint: use cpu, cuda, cuda:N or auto")),
            },
        }
    }

    fn cuda(n: usize) -> Result<Device, String> {
        if cfg!(feature = "cuda") {
            Ok(Device::Cuda(n))
        } else {
            Err("this tangle was built without CUDA\nhint: build with `cargo build --release --features cuda`, or use `--device cpu`".into())
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoded together (the running batch's bound).
    pub max_running: usize,
    /// Requests that may wait for a place in the batch.
    pub queue: usize,
    /// KV cache cells, shared by running sequences and the prefix cache.
    pub kv_tokens: usize,
    /// Tokens per forward pass (decode tokens plus prefill chunks).
    pub batch_tokens: usize,
    /// Prefixes the prefix cache keeps (0 turns it off).
    pub prefix_entries: usize,
    pub threads: usize,
    pub device: Device,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_running: 16,
            queue: 256,
            kv_tokens: 8192,
            batch_tokens: 512,
            prefix_entries: 64,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            device: Device::Cpu,
        }
    }
}

/// llama.cpp keeps at most this many sequence ids per context.
const MAX_SEQUENCE_IDS: usize = 256;

/// What to load.
pub struct ModelSource {
    /// How clients name it (`/v1/models`).
    pub id: String,
    pub gguf: PathBuf,
    pub tokenizer: tokenizers::Tokenizer,
    /// Applied to chats that bring no system message (a student trained with one).
    pub default_system: Option<String>,
}

/// What callers need to know about the loaded model.
pub struct ModelInfo {
    pub id: String,
    pub tokenizer: tokenizers::Tokenizer,
    pub default_system: Option<String>,
    /// Tokens that end a turn.
    pub stop_ids: Vec<u32>,
    /// The most tokens (prompt + completion) one sequence may hold.
    pub context: usize,
    pub vocab_rows: usize,
    /// Each token's bytes (logprobs' `bytes`; the grammar's vocabulary).
    token_bytes: Vec<Vec<u8>>,
    constraints: OnceLock<Result<constraint::ConstraintFactory, String>>,
}

impl ModelInfo {
    /// A chat rendered with the model's template and tokenized.
    pub fn encode_chat(&self, messages: &[(String, String)]) -> Result<Vec<u32>, String> {
        let messages = crate::model::chat::with_default_system(self.default_system.as_deref(), messages);
        self.encode_text(&render_chatml(&messages))
    }

    /// Raw text, tokenized as is (special tokens written out are recognized).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| format!("tokenizer: {e}"))?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| format!("tokenizer: {e}"))
    }

    /// A token's bytes, without llguidance's special-token marker.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        match self.token_bytes.get(id as usize).map(Vec::as_slice) {
            Some([toktrie::TokTrie::SPECIAL_TOKEN_MARKER, rest @ ..]) => rest,
            Some(bytes) => bytes,
            None => &[],
        }
    }

    /// A token as text (lossy where it is part of a multi-byte character).
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }

    /// A constraint in its start state; an invalid grammar is an error for the client.
    pub fn constraint(&self, grammar: &Grammar) -> Result<constraint::Constraint, String> {
        let factory = self.constraints.get_or_init(|| {
            let end = self.stop_ids.first().copied().unwrap_or(0);
            constraint::ConstraintFactory::new(self.token_bytes.clone(), end)
        });
        match factory {
            Ok(f) => f.constraint(grammar),
            Err(e) => Err(format!("structured output is unavailable for this tokenizer: {e}")),
        }
    }
}

/// One request to the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// 0: score the prompt only (with `prompt_logprobs`).
    pub max_tokens: u32,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// Independent completions of the same prompt.
    pub n: u32,
    /// Report each generated token's logprob and this many alternatives.
    pub logprobs: Option<u32>,
    /// Report each prompt token's logprob (the first has none) and this many alternatives.
    pub prompt_logprobs: Option<u32>,
    pub grammar: Option<Grammar>,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`; -100 bans it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl GenerationRequest {
    pub fn greedy(prompt: Vec<u32>, max_tokens: u32) -> GenerationRequest {
        GenerationRequest {
            prompt,
            max_tokens,
            sampling: Sampling::GREEDY,
            stop: Vec::new(),
            n: 1,
            logprobs: None,
            prompt_logprobs: None,
            grammar: None,
            logit_bias: Vec::new(),
        }
    }
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine sends back about a request, in order per choice.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt's tokens scored (asked with `prompt_logprobs`); the first is `None`.
    Prompt(Vec<Option<TokenLogprob>>),
    /// One generated token: the text it made safe to send (may be empty) and its logprob.
    Token {
        choice: u32,
        token: u32,
        piece: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        choice: u32,
        finish: FinishReason,
        completion_tokens: u32,
        text_tail: String,
    },
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity (queue full); retry shortly")]
    Overloaded,
    #[error("{0}")]
    BadRequest(String),
    #[error("the engine has stopped")]
    Stopped,
}

struct Pending {
    request: GenerationRequest,
    constraint: Option<constraint::Constraint>,
    events: mpsc::UnboundedSender<Event>,
    accepted: std::time::Instant,
}

/// A handle to a running engine; clones share it. The engine thread finishes what it
/// has and exits once every handle is gone.
#[derive(Clone)]
pub struct Engine {
    info: Arc<ModelInfo>,
    metrics: Arc<EngineMetrics>,
    options: Arc<EngineOptions>,
    submit: std_mpsc::Sender<Pending>,
}

impl Engine {
    /// Loads the model and starts its thread; returns once it can take requests.
    pub fn start(source: ModelSource, options: EngineOptions) -> Result<Engine, String> {
        let tokenizer_json: serde_json::Value = serde_json::from_str(
            &source.tokenizer.to_string(false).map_err(|e| format!("cannot serialize the tokenizer: {e}"))?,
        )
        .map_err(|e| format!("cannot read the tokenizer: {e}"))?;
        let stop_ids: Vec<u32> = [crate::model::tokenizer::IM_END, crate::model::tokenizer::END_OF_TEXT]
            .iter()
            .filter_map(|t| source.tokenizer.token_to_id(t))
            .collect();
        let mut options = options;
        options.max_running = options.max_running.clamp(1, MAX_SEQUENCE_IDS / 2);
        options.prefix_entries = options.prefix_entries.min(MAX_SEQUENCE_IDS - options.max_running);
        options.batch_tokens = options.batch_tokens.max(options.max_running).max(32);
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let (submit, requests) = std_mpsc::channel::<Pending>();
        let metrics = Arc::new(EngineMetrics::default());
        let thread_metrics = Arc::clone(&metrics);
        let thread_options = options.clone();
        let (gguf, id) = (source.gguf.clone(), source.id.clone());
        let stops = stop_ids.clone();
        let detokenizer = source.tokenizer.clone();
        let detokenize: scheduler::Detokenizer =
            Box::new(move |ids| detokenizer.decode(ids, true).map_err(|e| format!("tokenizer: {e}")));
        std::thread::Builder::new()
            .name(format!("tangle-engine-{id}"))
            .spawn(move || {
                let weights = match llama::Weights::load(&gguf, thread_options.device) {
                    Ok(w) => w,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                tracing::info!(gguf = %gguf.display(), attention = ?weights.attention, "engine weights loaded");
                let sequences = thread_options.max_running + thread_options.prefix_entries;
                let session = match llama::LlamaSession::new(&weights, &thread_options, sequences) {
                    Ok(s) => s,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let rows = llama::Backend::vocab_rows(&session);
                let context = weights.context_train.min(thread_options.kv_tokens);
                if ready_tx.send(Ok((rows, context))).is_err() {
                    return;
                }
                scheduler::Scheduler::new(session, thread_options, thread_metrics, stops, detokenize).run(requests);
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        let (vocab_rows, context) =
            ready_rx.recv().map_err(|_| "the engine thread stopped while loading".to_string())??;
        let token_bytes = constraint::token_bytes(&tokenizer_json, vocab_rows)?;
        let info = ModelInfo {
            id: source.id,
            tokenizer: source.tokenizer,
            default_system: source.default_system,
            stop_ids,
            context,
            vocab_rows,
            token_bytes,
            constraints: OnceLock::new(),
        };
        Ok(Engine { info: Arc::new(info), metrics, options: Arc::new(options), submit })
    }

    pub fn info(&self) -> &Arc<ModelInfo> {
        &self.info
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request.
    pub fn submit(&self, request: GenerationRequest) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let prompt = request.prompt.len();
        if prompt == 0 {
            return Err(SubmitError::BadRequest("the prompt is empty".into()));
        }
        if prompt >= self.info.context {
            return Err(SubmitError::BadRequest(format!(
                "the prompt has {prompt} tokens; this server's context is {} tokens",
                self.info.context
            )));
        }
        if request.n == 0 || request.n as usize > self.options.max_running {
            return Err(SubmitError::BadRequest(format!(
                "`n` must be between 1 and {} on this server",
                self.options.max_running
            )));
        }
        if let Some(bad) = request.prompt.iter().find(|&&t| t as usize >= self.info.vocab_rows) {
            return Err(SubmitError::BadRequest(format!("token id {bad} is outside the vocabulary")));
        }
        if let Some(&(bad, _)) = request.logit_bias.iter().find(|(id, _)| *id as usize >= self.info.vocab_rows) {
            return Err(SubmitError::BadRequest(format!("logit_bias: token id {bad} is outside the vocabulary")));
        }
        let constraint = match &request.grammar {
            Some(g) => Some(self.info.constraint(g).map_err(SubmitError::BadRequest)?),
            None => None,
        };
        if self.metrics.queued.load(Ordering::SeqCst) >= self.options.queue {
            self.metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::Overloaded);
        }
        let (events, receiver) = mpsc::unbounded_channel();
        self.metrics.queued.fetch_add(1, Ordering::SeqCst);
        self.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
        let pending = Pending { request, constraint, events, accepted: std::time::Instant::now() };
        if self.submit.send(pending).is_err() {
            self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(receiver)
    }
}
