//! `tangle serve`: an OpenAI-compatible HTTP server in front of the inference engine
//! (`model::engine`), which batches every concurrent request into one forward pass per
//! step.
//!
//! Endpoints: `POST /v1/chat/completions` (JSON or SSE; `n`, `seed`, `logprobs`,
//! structured output), `POST /v1/completions` (raw prompts; `echo` + `logprobs` scores the
//! prompt, vLLM's shape), `GET /v1/models` (the version answering), `GET /health`,
//! `GET /metrics` (Prometheus). A full queue answers 503 with `Retry-After`; bad requests
//! get a 400 with an OpenAI-shaped error body naming the parameter.
//!
//! The served model lives in a [`ModelSlot`]: serving a registry alias swaps in the newly
//! promoted (or rolled-back) version without a restart. A request holds the engine it
//! started on, so in-flight requests finish on their version; the old engine exits once
//! its last request is done.

pub mod metrics;
pub mod models;
pub mod protocol;

use crate::model::engine::{self, Engine, EngineOptions, Event, GenerationRequest, Sampling, SubmitError};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use protocol::{ChatCompletionRequest, CompletionRequest, ErrorBody, PromptInput};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

pub use engine::FinishReason;
pub use protocol::Message;

/// A chat to answer (the in-process form of a chat completion request).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateResult {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish: FinishReason,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The request cannot be served as asked (e.g. the prompt exceeds the context).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Failed(String),
}

/// Something that answers chats in process, one at a time: the engine (through its
/// queue), or a reference implementation in tests. Called on a plain thread, never on the
/// async executor; `on_text` receives the reply as it grows and returns `false` to stop.
pub trait ChatModel: Send + Sync + 'static {
    fn id(&self) -> &str;
    fn generate(
        &self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateResult, ModelError>;
}

fn pairs(messages: &[Message]) -> Vec<(String, String)> {
    messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect()
}

fn sampling_of(request: &GenerateRequest) -> Sampling {
    Sampling { temperature: request.temperature, top_p: request.top_p, seed: request.seed }
}

impl ChatModel for Engine {
    fn id(&self) -> &str {
        &self.info().id
    }

    fn generate(
        &self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateResult, ModelError> {
        let prompt = self.info().encode_chat(&pairs(&request.messages)).map_err(ModelError::Failed)?;
        let prompt_tokens = prompt.len() as u32;
        let mut generation = GenerationRequest::greedy(prompt, request.max_tokens);
        generation.sampling = sampling_of(request);
        generation.stop = request.stop.clone();
        let mut events = self.submit(generation).map_err(|e| match e {
            SubmitError::BadRequest(m) => ModelError::BadRequest(m),
            other => ModelError::Failed(other.to_string()),
        })?;
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::Token { piece, .. } if !piece.is_empty() && !on_text(&piece) => {
                    return Ok(GenerateResult { prompt_tokens, completion_tokens: 0, finish: FinishReason::Stop });
                }
                Event::Finished { finish, completion_tokens, text_tail, .. } => {
                    if !text_tail.is_empty() {
                        on_text(&text_tail);
                    }
                    return Ok(GenerateResult { prompt_tokens, completion_tokens, finish });
                }
                Event::Failed(m) => return Err(ModelError::Failed(m)),
                _ => {}
            }
        }
        Err(ModelError::Failed("the engine stopped".into()))
    }
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub engine: EngineOptions,
    /// Default `max_tokens` when a chat request gives none.
    pub default_max_tokens: u32,
    /// Appends one JSON line per answered request (sha256 of its messages, tokens), so
    /// what a server generated can be counted across restarts, e.g. that an interrupted
    /// labeling run never has a prompt answered twice. Holds no prompt text.
    pub request_log: Option<std::path::PathBuf>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { engine: EngineOptions::default(), default_max_tokens: 256, request_log: None }
    }
}

/// The `request_log` file; each record is one `write` on an append-mode file, so lines
/// from concurrent requests never interleave.
struct RequestLog(std::fs::File);

impl RequestLog {
    fn open(path: &std::path::Path) -> std::io::Result<RequestLog> {
        std::fs::OpenOptions::new().create(true).append(true).open(path).map(RequestLog)
    }

    fn record(&self, messages: &[Message], prompt_tokens: u32, completion_tokens: u32) {
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let mut hasher = Sha256::new();
        for m in messages {
            hasher.update(m.role.as_bytes());
            hasher.update([0]);
            hasher.update(m.content.as_bytes());
            hasher.update([0]);
        }
        let line = json!({
            "messages_sha256": hex::encode(hasher.finalize()),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "unix_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()),
        });
        if let Err(e) = (&self.0).write_all(format!("{line}\n").as_bytes()) {
            eprintln!("warning: cannot append to the request log: {e}");
        }
    }
}

/// The engine answering now; replaced whole when a followed alias moves.
pub struct ModelSlot {
    current: RwLock<Engine>,
}

impl ModelSlot {
    pub fn new(engine: Engine) -> Arc<ModelSlot> {
        Arc::new(ModelSlot { current: RwLock::new(engine) })
    }

    /// The engine for a new request (cheap: a handle).
    pub fn engine(&self) -> Engine {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `engine` answer new requests; the previous one finishes what it has.
    pub fn replace(&self, engine: Engine) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = engine;
    }
}

#[derive(Clone)]
struct AppState {
    slot: Arc<ModelSlot>,
    default_max_tokens: u32,
    log: Option<Arc<RequestLog>>,
}

/// The router for `slot`; fails only if the request log cannot be opened.
pub fn router(slot: Arc<ModelSlot>, options: &ServeOptions) -> std::io::Result<Router> {
    let log = match &options.request_log {
        Some(path) => Some(Arc::new(RequestLog::open(path)?)),
        None => None,
    };
    let state = AppState { slot, default_max_tokens: options.default_max_tokens, log };
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .with_state(state))
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>, param: Option<&str>) -> Response {
    (status, Json(ErrorBody::new(kind, message, param))).into_response()
}

fn invalid(message: impl Into<String>, param: Option<&str>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message, param)
}

fn submit_error(e: SubmitError) -> Response {
    match e {
        SubmitError::BadRequest(m) => invalid(m, None),
        SubmitError::Overloaded | SubmitError::Stopped => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "server_overloaded", e.to_string(), None);
            response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
            response
        }
    }
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    let engine = state.slot.engine();
    Json(json!({
        "object": "list",
        "data": [{ "id": engine.info().id, "object": "model", "created": 0, "owned_by": "tangle" }],
    }))
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    let engine = state.slot.engine();
    let m = engine.metrics();
    Json(json!({
        "status": "ok",
        "model": engine.info().id,
        "queued": m.queued.load(std::sync::atomic::Ordering::SeqCst),
        "running": m.running.load(std::sync::atomic::Ordering::SeqCst),
    }))
}

async fn prometheus(State(state): State<AppState>) -> Response {
    let engine = state.slot.engine();
    let body = metrics::render(&engine);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// One choice's answer, as collected for a non-streamed response.
#[derive(Default)]
struct ChoiceOut {
    text: String,
    /// Generated tokens with their logprobs (when asked).
    tokens: Vec<(u32, Option<engine::TokenLogprob>)>,
    finish: Option<FinishReason>,
    completion_tokens: u32,
}

struct Collected {
    choices: Vec<ChoiceOut>,
    prompt_scores: Option<Vec<Option<engine::TokenLogprob>>>,
}

/// Waits for every choice of a request.
async fn collect(mut events: mpsc::UnboundedReceiver<Event>, n: u32) -> Result<Collected, String> {
    let mut out = Collected { choices: (0..n).map(|_| ChoiceOut::default()).collect(), prompt_scores: None };
    let mut open = n;
    while open > 0 {
        match events.recv().await {
            Some(Event::Prompt(scores)) => out.prompt_scores = Some(scores),
            Some(Event::Token { choice, token, piece, logprob }) => {
                let c = &mut out.choices[choice as usize];
                c.text.push_str(&piece);
                c.tokens.push((token, logprob));
            }
            Some(Event::Finished { choice, finish, completion_tokens, text_tail }) => {
                let c = &mut out.choices[choice as usize];
                c.text.push_str(&text_tail);
                c.finish = Some(finish);
                c.completion_tokens = completion_tokens;
                open -= 1;
            }
            Some(Event::Failed(m)) => return Err(m),
            None => return Err("the engine stopped".into()),
        }
    }
    Ok(out)
}

async fn chat_completions(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let request: ChatCompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("invalid request body: {e}"), None),
    };
    let plan = match request.validate(state.default_max_tokens) {
        Ok(plan) => plan,
        Err((message, param)) => return invalid(message, Some(param)),
    };
    let engine = state.slot.engine();
    let info = Arc::clone(engine.info());
    let prompt = match info.encode_chat(&pairs(&plan.generate.messages)) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e, None),
    };
    let prompt_tokens = prompt.len() as u32;
    let generation = GenerationRequest {
        prompt,
        max_tokens: plan.generate.max_tokens,
        sampling: sampling_of(&plan.generate),
        stop: plan.generate.stop.clone(),
        n: plan.n,
        logprobs: plan.logprobs,
        prompt_logprobs: None,
        grammar: plan.grammar.clone(),
        logit_bias: plan.logit_bias.clone(),
    };
    let events = match engine.submit(generation) {
        Ok(rx) => rx,
        Err(e) => return submit_error(e),
    };
    let id = protocol::completion_id();
    let created = protocol::unix_now();
    let messages = plan.generate.messages.clone();
    if plan.stream {
        let stream = chat_stream(ChatStream {
            id,
            created,
            info,
            events,
            n: plan.n,
            include_usage: plan.include_usage,
            prompt_tokens,
            log: state.log.clone().map(|log| (log, messages)),
        });
        return Sse::new(stream.map(Ok::<SseEvent, Infallible>)).keep_alive(KeepAlive::default()).into_response();
    }
    let collected = match collect(events, plan.n).await {
        Ok(c) => c,
        Err(m) => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m, None),
    };
    let completion_tokens: u32 = collected.choices.iter().map(|c| c.completion_tokens).sum();
    if let Some(log) = &state.log {
        log.record(&messages, prompt_tokens, completion_tokens);
    }
    let choices = collected
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let logprobs = plan.logprobs.map(|_| {
                c.tokens
                    .iter()
                    .filter_map(|(_, lp)| lp.as_ref().map(|lp| protocol::chat_token_logprob(&info, lp)))
                    .collect::<Value>()
            });
            let finish = c.finish.unwrap_or(FinishReason::Stop).as_str();
            protocol::chat_choice(i as u32, &c.text, finish, logprobs)
        })
        .collect();
    let usage = protocol::usage_json(prompt_tokens.into(), completion_tokens.into());
    Json(protocol::chat_completion_json(&id, created, &info.id, choices, usage)).into_response()
}

struct ChatStream {
    id: String,
    created: u64,
    info: Arc<engine::ModelInfo>,
    events: mpsc::UnboundedReceiver<Event>,
    n: u32,
    include_usage: bool,
    prompt_tokens: u32,
    log: Option<(Arc<RequestLog>, Vec<Message>)>,
}

/// The SSE events of a streamed chat: each choice's role, its text and logprobs as they
/// are generated, its finish reason; then the usage chunk when asked for, and `[DONE]`.
/// Dropping the stream (the client left) drops the receiver, which cancels the request.
fn chat_stream(s: ChatStream) -> impl futures_util::Stream<Item = SseEvent> {
    let opening: Vec<SseEvent> = (0..s.n)
        .map(|i| {
            let delta = json!({ "role": "assistant", "content": "" });
            SseEvent::default().data(protocol::choice_chunk_json(&s.id, s.created, &s.info.id, i, delta, None, None))
        })
        .collect();
    let open = s.n;
    let body = futures_util::stream::unfold((s, open, 0u32), |(mut s, mut open, mut completion_tokens)| async move {
        if open == 0 {
            return None;
        }
        let chunk = |choice: u32, delta: Value, finish: Option<&str>, logprobs: Option<Value>| {
            protocol::choice_chunk_json(&s.id, s.created, &s.info.id, choice, delta, finish, logprobs)
        };
        let mut out = Vec::new();
        match s.events.recv().await {
            Some(Event::Token { choice, piece, logprob, .. }) => {
                let logprobs = logprob.map(|lp| json!([protocol::chat_token_logprob(&s.info, &lp)]));
                if !piece.is_empty() || logprobs.is_some() {
                    out.push(chunk(choice, json!({ "content": piece }), None, logprobs));
                }
            }
            Some(Event::Finished { choice, finish, completion_tokens: tokens, text_tail }) => {
                if !text_tail.is_empty() {
                    out.push(chunk(choice, json!({ "content": text_tail }), None, None));
                }
                out.push(chunk(choice, json!({}), Some(finish.as_str()), None));
                completion_tokens += tokens;
                open -= 1;
                if open == 0 {
                    if let Some((log, messages)) = &s.log {
                        log.record(messages, s.prompt_tokens, completion_tokens);
                    }
                    if s.include_usage {
                        let usage = protocol::usage_json(s.prompt_tokens.into(), completion_tokens.into());
                        out.push(protocol::usage_chunk_json(&s.id, s.created, &s.info.id, usage));
                    }
                    out.push("[DONE]".to_string());
                }
            }
            Some(Event::Prompt(_)) => {}
            Some(Event::Failed(message)) => {
                out.push(serde_json::to_string(&ErrorBody::new("server_error", message, None)).unwrap_or_default());
                out.push("[DONE]".to_string());
                open = 0;
            }
            None => {
                let body = ErrorBody::new("server_error", "the engine stopped", None);
                out.push(serde_json::to_string(&body).unwrap_or_default());
                out.push("[DONE]".to_string());
                open = 0;
            }
        }
        let events: Vec<SseEvent> = out.into_iter().map(|d| SseEvent::default().data(d)).collect();
        Some((futures_util::stream::iter(events), (s, open, completion_tokens)))
    });
    futures_util::stream::iter(opening).chain(body.flatten())
}

async fn completions(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let request: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("invalid request body: {e}"), None),
    };
    let plan = match request.validate() {
        Ok(plan) => plan,
        Err((message, param)) => return invalid(message, Some(param)),
    };
    if plan.stream {
        return invalid("streaming is supported on /v1/chat/completions; send `stream: false` here", Some("stream"));
    }
    let engine = state.slot.engine();
    let info = Arc::clone(engine.info());
    let (prompt, prompt_text) = match &plan.prompt {
        PromptInput::Text(text) => match info.encode_text(text) {
            Ok(ids) => (ids, text.clone()),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e, None),
        },
        PromptInput::Tokens(ids) => (ids.clone(), info.decode(ids).unwrap_or_default()),
    };
    let prompt_tokens = prompt.len() as u32;
    let generation = GenerationRequest {
        prompt: prompt.clone(),
        max_tokens: plan.max_tokens,
        sampling: Sampling { temperature: plan.temperature, top_p: plan.top_p, seed: plan.seed },
        stop: plan.stop.clone(),
        n: plan.n,
        logprobs: plan.logprobs,
        prompt_logprobs: if plan.echo { plan.logprobs } else { None },
        grammar: plan.grammar.clone(),
        logit_bias: plan.logit_bias.clone(),
    };
    let events = match engine.submit(generation) {
        Ok(rx) => rx,
        Err(e) => return submit_error(e),
    };
    let collected = match collect(events, plan.n).await {
        Ok(c) => c,
        Err(m) => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m, None),
    };
    let completion_tokens: u32 = collected.choices.iter().map(|c| c.completion_tokens).sum();
    let prompt_scores = collected.prompt_scores.unwrap_or_default();
    let choices = collected
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut text = if plan.echo { prompt_text.clone() } else { String::new() };
            text.push_str(&c.text);
            let logprobs = plan.logprobs.map(|_| {
                let mut tokens: Vec<(u32, Option<&engine::TokenLogprob>)> = Vec::new();
                if plan.echo {
                    tokens.extend(
                        prompt.iter().enumerate().map(|(p, &id)| (id, prompt_scores.get(p).and_then(Option::as_ref))),
                    );
                }
                tokens.extend(c.tokens.iter().map(|(id, lp)| (*id, lp.as_ref())));
                protocol::completion_logprobs(&info, &tokens, 0)
            });
            let finish = c.finish.unwrap_or(FinishReason::Length).as_str();
            protocol::text_choice(i as u32, &text, Some(finish), logprobs)
        })
        .collect();
    let usage = protocol::usage_json(prompt_tokens.into(), completion_tokens.into());
    let id = protocol::completion_id().replace("chatcmpl-", "cmpl-");
    Json(protocol::text_completion_json(&id, protocol::unix_now(), &info.id, choices, Some(usage))).into_response()
}

/// Serves until Ctrl-C, then drains in-flight requests.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
