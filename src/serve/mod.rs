//! `tangle serve`: an OpenAI-compatible HTTP server in front of any [`ChatModel`].
//!
//! Endpoints: `POST /v1/chat/completions` (JSON or SSE streaming, with usage), `GET
//! /v1/models`, `GET /health`. Generation is CPU-bound, so it runs on dedicated worker
//! threads fed by a bounded queue: a full queue answers 503 with `Retry-After` instead of
//! piling up requests. Bad requests get a 400 with an OpenAI-shaped error body.

pub mod gguf_model;
pub mod models;
pub mod protocol;
pub mod quantized_qwen;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::{ChatCompletionRequest, ErrorBody};
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

pub use protocol::Message;

/// What to generate.
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

/// A model that can answer chat requests. Called on a worker thread, never on the async
/// executor; `on_text` receives the reply as it grows and returns `false` to stop early
/// (the client went away).
pub trait ChatModel: Send + Sync + 'static {
    fn id(&self) -> &str;
    fn generate(
        &self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateResult, ModelError>;
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Requests generated at once (worker threads).
    pub workers: usize,
    /// Requests that may wait for a worker before new ones are refused with 503.
    pub queue: usize,
    /// Default `max_tokens` when a request gives none.
    pub default_max_tokens: u32,
    /// Appends one JSON line per answered request (sha256 of its messages, tokens), so
    /// what a server generated can be counted across restarts, e.g. that an interrupted
    /// labeling run never has a prompt answered twice. Holds no prompt text.
    pub request_log: Option<std::path::PathBuf>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { workers: 1, queue: 64, default_max_tokens: 256, request_log: None }
    }
}

/// The `request_log` file, shared by the workers; each record is one `write` on an
/// append-mode file, so lines from concurrent workers never interleave.
struct RequestLog(std::fs::File);

impl RequestLog {
    fn open(path: &std::path::Path) -> std::io::Result<RequestLog> {
        std::fs::OpenOptions::new().create(true).append(true).open(path).map(RequestLog)
    }

    fn record(&self, request: &GenerateRequest, result: &GenerateResult) {
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let mut hasher = Sha256::new();
        for m in &request.messages {
            hasher.update(m.role.as_bytes());
            hasher.update([0]);
            hasher.update(m.content.as_bytes());
            hasher.update([0]);
        }
        let line = json!({
            "messages_sha256": hex::encode(hasher.finalize()),
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "unix_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()),
        });
        if let Err(e) = (&self.0).write_all(format!("{line}\n").as_bytes()) {
            eprintln!("warning: cannot append to the request log: {e}");
        }
    }
}

struct Job {
    request: GenerateRequest,
    /// Text pieces as they are generated (streaming); `None` collects them instead.
    pieces: Option<mpsc::UnboundedSender<String>>,
    done: oneshot::Sender<Result<(String, GenerateResult), ModelError>>,
}

#[derive(Clone)]
struct AppState {
    model_id: String,
    jobs: std_mpsc::SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    options: ServeOptions,
}

/// The router, with worker threads started for `model`; fails only if the request log
/// cannot be opened.
pub fn router(model: Arc<dyn ChatModel>, options: ServeOptions) -> std::io::Result<Router> {
    let log = match &options.request_log {
        Some(path) => Some(Arc::new(RequestLog::open(path)?)),
        None => None,
    };
    let (tx, rx) = std_mpsc::sync_channel::<Job>(options.queue);
    let rx = Arc::new(Mutex::new(rx));
    let queued = Arc::new(AtomicUsize::new(0));
    for i in 0..options.workers.max(1) {
        let (rx, model, queued, log) = (Arc::clone(&rx), Arc::clone(&model), Arc::clone(&queued), log.clone());
        let spawned = std::thread::Builder::new().name(format!("tangle-serve-{i}")).spawn(move || loop {
            // A poisoned lock means another worker panicked mid-receive; the queue is still
            // consistent, so keep serving.
            let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                Ok(job) => job,
                Err(_) => return, // the server is gone
            };
            queued.fetch_sub(1, Ordering::SeqCst);
            run_job(model.as_ref(), job, log.as_deref());
        });
        if let Err(e) = spawned {
            eprintln!("warning: cannot start a serve worker: {e}");
        }
    }
    let state = AppState { model_id: model.id().to_string(), jobs: tx, queued, options };
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .with_state(state))
}

fn run_job(model: &dyn ChatModel, job: Job, log: Option<&RequestLog>) {
    let mut text = String::new();
    let pieces = job.pieces;
    let result = model.generate(&job.request, &mut |piece| {
        text.push_str(piece);
        match &pieces {
            Some(tx) => tx.send(piece.to_string()).is_ok(),
            None => true,
        }
    });
    if let (Some(log), Ok(result)) = (log, &result) {
        log.record(&job.request, result);
    }
    let _ = job.done.send(result.map(|r| (text, r)));
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>, param: Option<&str>) -> Response {
    let body = ErrorBody::new(kind, message, param);
    (status, Json(body)).into_response()
}

async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": state.model_id, "object": "model", "created": 0, "owned_by": "tangle" }],
    }))
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "model": state.model_id, "queued": state.queued.load(Ordering::SeqCst) }))
}

async fn chat_completions(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let request: ChatCompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", format!("invalid request body: {e}"), None)
        }
    };
    let (generate, stream, include_usage) = match request.validate(state.options.default_max_tokens) {
        Ok(v) => v,
        Err((message, param)) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", message, Some(param)),
    };
    let (done_tx, done_rx) = oneshot::channel();
    let (pieces_tx, pieces_rx) = if stream {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    state.queued.fetch_add(1, Ordering::SeqCst);
    if state.jobs.try_send(Job { request: generate, pieces: pieces_tx, done: done_tx }).is_err() {
        state.queued.fetch_sub(1, Ordering::SeqCst);
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_overloaded",
            "the server's queue is full; retry shortly",
            None,
        );
        response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        return response;
    }
    let id = protocol::completion_id();
    let created = protocol::unix_now();
    let model = state.model_id.clone();
    match pieces_rx {
        None => match done_rx.await {
            Ok(Ok((text, result))) => Json(protocol::completion(&id, created, &model, &text, &result)).into_response(),
            Ok(Err(ModelError::BadRequest(m))) => error(StatusCode::BAD_REQUEST, "invalid_request_error", m, None),
            Ok(Err(ModelError::Failed(m))) => error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m, None),
            Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the worker stopped", None),
        },
        Some(pieces) => {
            let events = protocol::sse_events(id, created, model, pieces, done_rx, include_usage);
            Sse::new(futures_util::StreamExt::map(events, Ok::<Event, Infallible>))
                .keep_alive(KeepAlive::default())
                .into_response()
        }
    }
}

/// Serves until Ctrl-C, then drains in-flight requests.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
