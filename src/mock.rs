//! In-process mock LLM provider for tests and benchmarks. Speaks OpenAI Chat Completions
//! (`/v1/chat/completions`), Anthropic Messages (`/v1/messages`) and Gemini
//! (`/v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`),
//! streaming or not, on 127.0.0.1 with an ephemeral port. Answers are a deterministic
//! function of the prompt.
//!
//! Faults are injected per call: first a sticky fault if set, else the next scripted
//! fault, else one drawn from the configured probabilities (seeded RNG), else none.
//! Every call is counted (total, successes, per fault) and its prompt logged, so tests can
//! assert exactly how many calls a client made.
//!
//! Connection resets are real TCP RSTs: every accepted socket has `SO_LINGER=0`, and the
//! reset fault aborts the response body after the headers, which makes hyper drop the socket.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::lock;

/// An injected failure for one call.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// 429 with an optional `Retry-After` header value (seconds or HTTP date).
    RateLimited { retry_after: Option<String> },
    /// 500 internal server error.
    ServerError,
    /// 529 overloaded (Anthropic's code; the OpenAI endpoint sends it too).
    Overloaded,
    /// Any other status, e.g. 401 or 400.
    Status(u16),
    /// Extra latency before an otherwise normal response.
    Slow(Duration),
    /// Never answers (until the server shuts down).
    Hang,
    /// Sends headers and half the body (or half the SSE events), then stops.
    TruncatedBody,
    /// Sends headers, then resets the TCP connection.
    ConnectionReset,
    /// 200 with a body that is not valid JSON (or an invalid SSE data line).
    MalformedJson,
    /// Streaming: the first half of the events, then an in-stream error event
    /// (Anthropic `event: error` with `overloaded_error`; OpenAI `data: {"error": …}`).
    /// Non-streaming: a plain 529.
    OverloadedMidStream,
}

impl Fault {
    pub fn label(&self) -> &'static str {
        match self {
            Fault::RateLimited { .. } => "rate_limited",
            Fault::ServerError => "server_error",
            Fault::Overloaded => "overloaded",
            Fault::Status(_) => "status",
            Fault::Slow(_) => "slow",
            Fault::Hang => "hang",
            Fault::TruncatedBody => "truncated",
            Fault::ConnectionReset => "reset",
            Fault::MalformedJson => "malformed",
            Fault::OverloadedMidStream => "overloaded_mid_stream",
        }
    }
}

/// Maps the last user message to the answer text.
pub type AnswerFn = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The default answer: `label-` and 8 hex digits of the prompt's sha256, then `ok`.
pub fn default_answer(prompt: &str) -> String {
    let digest = Sha256::digest(prompt.as_bytes());
    format!("label-{} ok", &hex::encode(digest)[..8])
}

#[derive(Clone)]
pub struct MockConfig {
    /// Added to every call before answering (the benchmark uses 50 ms).
    pub base_latency: Duration,
    pub answer: AnswerFn,
    /// Faults drawn independently per call with these probabilities (checked in order).
    pub fault_rates: Vec<(Fault, f64)>,
    pub seed: u64,
    /// If set, calls without this key (Bearer or x-api-key) get 401.
    pub expected_api_key: Option<String>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            base_latency: Duration::ZERO,
            answer: Arc::new(default_answer),
            fault_rates: Vec::new(),
            seed: 0,
            expected_api_key: None,
        }
    }
}

/// Call counters at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MockCounts {
    /// Every request received.
    pub total: u64,
    /// Requests answered normally (including `Slow`).
    pub ok: u64,
    /// Per fault label (`Fault::label`), including auth/validation rejections as `status`.
    pub faults: BTreeMap<String, u64>,
    /// Most requests being handled at once (checks client concurrency bounds).
    pub max_in_flight: u64,
    /// Sum over calls of the time from arrival until the handler produced its response
    /// (µs): the mock's real latency, to separate it from client overhead in benchmarks.
    pub service_micros: u64,
}

struct MockState {
    config: MockConfig,
    script: Mutex<VecDeque<Fault>>,
    sticky: Mutex<Option<Fault>>,
    rng: Mutex<StdRng>,
    total: AtomicU64,
    ok: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    service_micros: AtomicU64,
    faults: Mutex<BTreeMap<String, u64>>,
    prompts: Mutex<Vec<String>>,
    /// The body of every parsed call, in arrival order, as received (shared, not copied;
    /// parsed only when a test asks, so the benchmarks' hot path parses once).
    bodies: Mutex<Vec<Bytes>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Started on first use: only servers with a base latency need it.
    timer: std::sync::OnceLock<PreciseTimer>,
}

impl MockState {
    fn next_fault(&self) -> Option<Fault> {
        if let Some(f) = lock(&self.sticky).clone() {
            return Some(f);
        }
        if let Some(f) = lock(&self.script).pop_front() {
            return Some(f);
        }
        if self.config.fault_rates.is_empty() {
            return None;
        }
        let mut rng = lock(&self.rng);
        self.config.fault_rates.iter().find(|(_, p)| rng.random::<f64>() < *p).map(|(f, _)| f.clone())
    }

    fn count_fault(&self, label: &str) {
        *lock(&self.faults).entry(label.to_string()).or_insert(0) += 1;
    }
}

pub struct MockServer {
    addr: SocketAddr,
    state: Arc<MockState>,
    server: JoinHandle<()>,
}

impl MockServer {
    /// Binds 127.0.0.1:0 and serves until dropped or [`MockServer::shutdown`].
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0", config).await
    }

    pub async fn start_on(bind: &str, config: MockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let listener = listener.tap_io(|tcp| {
            // Best effort: without these the mock still works, resets become FINs.
            let _ = tcp.set_nodelay(true);
            let _ = tcp.set_zero_linger();
        });
        let state = Arc::new(MockState {
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            config,
            script: Mutex::new(VecDeque::new()),
            sticky: Mutex::new(None),
            total: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            service_micros: AtomicU64::new(0),
            faults: Mutex::new(BTreeMap::new()),
            prompts: Mutex::new(Vec::new()),
            bodies: Mutex::new(Vec::new()),
            shutdown: tokio::sync::watch::channel(false).0,
            timer: std::sync::OnceLock::new(),
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(openai_handler))
            .route("/v1/messages", post(anthropic_handler))
            .route("/v1beta/models/{call}", post(gemini_handler))
            .route("/v1/mock/stats", axum::routing::get(stats_handler))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "mock server stopped");
            }
        });
        Ok(Self { addr, state, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL for OpenAI-style targets (`…/v1`).
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Base URL for Anthropic targets (the client appends `/v1/messages`).
    /// The root a Gemini target's `base_url` names (the client appends `/v1beta/models/…`).
    pub fn gemini_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues faults for the next calls, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.script).extend(faults);
    }

    /// Applies `fault` to every call until cleared with `None` (a "dead" provider).
    pub fn set_sticky_fault(&self, fault: Option<Fault>) {
        *lock(&self.state.sticky) = fault;
    }

    pub fn counts(&self) -> MockCounts {
        MockCounts {
            total: self.state.total.load(Ordering::SeqCst),
            ok: self.state.ok.load(Ordering::SeqCst),
            faults: lock(&self.state.faults).clone(),
            max_in_flight: self.state.max_in_flight.load(Ordering::SeqCst),
            service_micros: self.state.service_micros.load(Ordering::Relaxed),
        }
    }

    /// The prompt (all messages, `role: content` lines) of every call received, in order.
    pub fn received_prompts(&self) -> Vec<String> {
        lock(&self.state.prompts).clone()
    }

    /// The JSON body of every call that parsed, in arrival order: what a client really
    /// sent (sampling params, seed, logprobs), beyond the prompt.
    pub fn received_bodies(&self) -> Vec<Value> {
        lock(&self.state.bodies).iter().map(|b| serde_json::from_slice(b).unwrap_or(Value::Null)).collect()
    }

    /// Stops accepting and releases hanging calls.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        let _ = self.state.shutdown.send(true);
        self.server.abort();
    }
}

/// What both protocols need from a parsed request.
struct Parsed {
    prompt_log: String,
    last_user: String,
    input_tokens: u64,
    max_tokens: Option<u64>,
    stream: bool,
    include_usage: bool,
    top_logprobs: Option<u64>,
    model: String,
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Splits an answer into "tokens": words, each but the first with its leading space.
fn tokenize(answer: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    for (i, word) in answer.split(' ').enumerate() {
        tokens.push(if i == 0 { word.to_string() } else { format!(" {word}") });
    }
    tokens
}

fn error_response(status: u16, kind: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, axum::Json(body)).into_response()
}

fn json_body(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// 200 + headers (with the full Content-Length when not streaming), then `prefix`, then
/// either an abrupt error (connection dropped) or a clean end of a chunked stream.
fn cut_response(
    full: Vec<u8>,
    prefix_len: usize,
    content_type: &'static str,
    abort: bool,
    declare_length: bool,
) -> Response {
    let full_len = full.len();
    let prefix = Bytes::from(full[..prefix_len.min(full_len)].to_vec());
    let mut chunks: Vec<Result<Bytes, std::io::Error>> = Vec::new();
    if !prefix.is_empty() {
        chunks.push(Ok(prefix));
    }
    if abort {
        chunks.push(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected fault")));
    }
    let mut response = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if declare_length {
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(full_len));
    }
    response
}

enum Protocol {
    OpenAi,
    Anthropic,
    /// The model and the method (streaming or not) are in the URL, not the body.
    Gemini {
        model: String,
        stream: bool,
    },
}

/// Decrements the in-flight gauge however the handler ends (including client disconnects,
/// which drop the handler future).
struct InFlight<'a>(&'a MockState, std::time::Instant);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        let micros = self.1.elapsed().as_micros() as u64;
        self.0.service_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

async fn handle(state: Arc<MockState>, protocol: Protocol, headers: HeaderMap, body: Bytes) -> Response {
    state.total.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _in_flight = InFlight(&state, std::time::Instant::now());
    // Parse and log on arrival, so a call whose client dies mid-wait is still on record.
    let parsed = parse_request(&protocol, &headers, &body, &state.config);
    if let Ok(p) = &parsed {
        lock(&state.prompts).push(p.prompt_log.clone());
        lock(&state.bodies).push(body.clone());
    }
    if !state.config.base_latency.is_zero() {
        let deadline = _in_flight.1 + state.config.base_latency;
        state.timer.get_or_init(PreciseTimer::start).sleep_until(deadline).await;
    }
    let parsed = match parsed {
        Ok(p) => p,
        Err(response) => {
            state.count_fault("status");
            return *response;
        }
    };
    let fault = state.next_fault();
    if let Some(f) = &fault {
        state.count_fault(f.label());
    }
    match fault {
        Some(Fault::RateLimited { retry_after }) => {
            let mut r = error_response(429, "rate_limit_error", "rate limited by mock");
            if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        Some(Fault::ServerError) => return error_response(500, "api_error", "mock internal error"),
        Some(Fault::Overloaded) => return error_response(529, "overloaded_error", "Overloaded"),
        Some(Fault::OverloadedMidStream) if !parsed.stream => {
            return error_response(529, "overloaded_error", "Overloaded")
        }
        Some(Fault::Status(code)) => return error_response(code, "mock_error", "scripted status"),
        Some(Fault::Hang) => {
            let mut shutdown = state.shutdown.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(3600), shutdown.wait_for(|s| *s)).await;
            return error_response(503, "api_error", "mock shut down");
        }
        Some(Fault::Slow(extra)) => tokio::time::sleep(extra).await,
        _ => {}
    }

    let answer = (state.config.answer)(&parsed.last_user);
    let mut tokens = tokenize(&answer);
    let mut finish = "stop";
    if let Some(max) = parsed.max_tokens {
        if tokens.len() as u64 > max {
            tokens.truncate(max as usize);
            finish = "length";
        }
    }
    let output_tokens = tokens.len() as u64;
    let (content_type, bytes) = match (&protocol, parsed.stream) {
        (Protocol::OpenAi, false) => ("application/json", openai_body(&parsed, &tokens, finish, output_tokens)),
        (Protocol::OpenAi, true) => ("text/event-stream", openai_stream(&parsed, &tokens, finish, output_tokens)),
        (Protocol::Anthropic, false) => ("application/json", anthropic_body(&parsed, &tokens, finish, output_tokens)),
        (Protocol::Anthropic, true) => ("text/event-stream", anthropic_stream(&parsed, &tokens, finish, output_tokens)),
        (Protocol::Gemini { .. }, false) => ("application/json", gemini_body(&parsed, &tokens, finish, output_tokens)),
        (Protocol::Gemini { .. }, true) => ("text/event-stream", gemini_stream(&parsed, &tokens, finish)),
    };
    match fault {
        Some(Fault::TruncatedBody) => {
            // Non-streaming: declared length, half sent, connection dropped. Streaming: half
            // the events, then a clean end of stream without the terminating event.
            let half = bytes.len() / 2;
            cut_response(bytes, half, content_type, !parsed.stream, !parsed.stream)
        }
        Some(Fault::ConnectionReset) => cut_response(bytes, 0, content_type, true, false),
        Some(Fault::OverloadedMidStream) => {
            // Cut at an event boundary in the first half, then the error event.
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let separator = if matches!(protocol, Protocol::Gemini { .. }) { "\r\n\r\n" } else { "\n\n" };
            let events: Vec<&str> = text.split_inclusive(separator).collect();
            let mut body: String = events[..events.len() / 2].concat();
            let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
            match protocol {
                Protocol::Anthropic => body.push_str(&format!("event: error\ndata: {error}\n\n")),
                Protocol::OpenAi => body.push_str(&format!("data: {}\n\n", json!({"error": error["error"]}))),
                Protocol::Gemini { .. } => body.push_str(&format!(
                    "data: {}\r\n\r\n",
                    json!({"error": {"code": 503, "status": "UNAVAILABLE", "message": "The model is overloaded."}})
                )),
            }
            json_body(StatusCode::OK, body.into_bytes(), content_type)
        }
        Some(Fault::MalformedJson) => {
            let garbage = if parsed.stream {
                b"data: {\"choices\": [{\"delta\": {\"content\": \"x\"\n\n".to_vec()
            } else {
                b"{\"id\": \"mock\", \"choices\": [{\"message\": ".to_vec()
            };
            json_body(StatusCode::OK, garbage, content_type)
        }
        _ => {
            state.ok.fetch_add(1, Ordering::SeqCst);
            json_body(StatusCode::OK, bytes, content_type)
        }
    }
}

/// A request the mock refuses (as the real API would), boxed to keep `Result` small.
type Rejection = Box<Response>;

fn rejection(status: u16, kind: &str, message: &str) -> Rejection {
    Box::new(error_response(status, kind, message))
}

fn parse_request(
    protocol: &Protocol,
    headers: &HeaderMap,
    body: &[u8],
    config: &MockConfig,
) -> Result<Parsed, Rejection> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(expected) = &config.expected_api_key {
        let given = match protocol {
            Protocol::OpenAi => header("authorization").strip_prefix("Bearer ").unwrap_or(""),
            Protocol::Anthropic => header("x-api-key"),
            Protocol::Gemini { .. } => header("x-goog-api-key"),
        };
        if given != expected {
            // Real providers echo (part of) a wrong key; echo it whole so tests prove the
            // client redacts it.
            let message = format!("Incorrect API key provided: {given}");
            return Err(rejection(401, "authentication_error", &message));
        }
    }
    if matches!(protocol, Protocol::Anthropic) && header("anthropic-version").is_empty() {
        return Err(rejection(400, "invalid_request_error", "anthropic-version header is required"));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| rejection(400, "invalid_request_error", &format!("invalid JSON: {e}")))?;
    if let Protocol::Gemini { model, stream } = protocol {
        return parse_gemini(&value, model, *stream);
    }
    let messages = value["messages"].as_array().cloned().unwrap_or_default();
    if messages.is_empty() {
        return Err(rejection(400, "invalid_request_error", "messages must be non-empty"));
    }
    let mut prompt_log = String::new();
    let mut last_user = String::new();
    if let Some(system) = value["system"].as_str() {
        prompt_log.push_str(&format!("system: {system}\n"));
    }
    for m in &messages {
        let role = m["role"].as_str().unwrap_or("");
        let content = m["content"].as_str().unwrap_or("");
        if matches!(protocol, Protocol::Anthropic) && role == "system" {
            return Err(rejection(400, "invalid_request_error", "system belongs in the top-level field"));
        }
        if role == "user" {
            last_user = content.to_string();
        }
        prompt_log.push_str(&format!("{role}: {content}\n"));
    }
    if matches!(protocol, Protocol::Anthropic) && value["max_tokens"].as_u64().is_none() {
        return Err(rejection(400, "invalid_request_error", "max_tokens is required"));
    }
    let max_tokens = value["max_tokens"].as_u64().or_else(|| value["max_completion_tokens"].as_u64());
    let top_logprobs = match (value["logprobs"].as_bool(), value["top_logprobs"].as_u64()) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        _ => None,
    };
    Ok(Parsed {
        input_tokens: words(&prompt_log),
        prompt_log,
        last_user,
        max_tokens,
        stream: value["stream"].as_bool().unwrap_or(false),
        include_usage: value["stream_options"]["include_usage"].as_bool().unwrap_or(false),
        top_logprobs,
        model: value["model"].as_str().unwrap_or("mock").to_string(),
    })
}

/// A `generateContent` body: `systemInstruction`, then `contents` with roles `user` and
/// `model`, logged with the same `role: text` lines as the other protocols.
fn parse_gemini(value: &Value, model: &str, stream: bool) -> Result<Parsed, Rejection> {
    let text_of = |parts: &Value| -> String {
        parts.as_array().map(|ps| ps.iter().filter_map(|p| p["text"].as_str()).collect()).unwrap_or_default()
    };
    let contents = value["contents"].as_array().cloned().unwrap_or_default();
    if contents.is_empty() {
        return Err(rejection(400, "INVALID_ARGUMENT", "contents must be non-empty"));
    }
    let mut prompt_log = String::new();
    let mut last_user = String::new();
    let system = text_of(&value["systemInstruction"]["parts"]);
    if !system.is_empty() {
        prompt_log.push_str(&format!("system: {system}\n"));
    }
    for content in &contents {
        let role = match content["role"].as_str().unwrap_or("user") {
            "user" => "user",
            "model" => "assistant",
            other => return Err(rejection(400, "INVALID_ARGUMENT", &format!("unknown role {other:?}"))),
        };
        let text = text_of(&content["parts"]);
        if role == "user" {
            last_user = text.clone();
        }
        prompt_log.push_str(&format!("{role}: {text}\n"));
    }
    let config = &value["generationConfig"];
    let top_logprobs = match config["responseLogprobs"].as_bool() {
        Some(true) => Some(config["logprobs"].as_u64().unwrap_or(0)),
        _ => None,
    };
    Ok(Parsed {
        input_tokens: words(&prompt_log),
        prompt_log,
        last_user,
        max_tokens: config["maxOutputTokens"].as_u64(),
        stream,
        include_usage: true,
        top_logprobs,
        model: model.to_string(),
    })
}

fn gemini_finish(finish: &str) -> &'static str {
    if finish == "length" {
        "MAX_TOKENS"
    } else {
        "STOP"
    }
}

/// One `GenerateContentResponse`: `tokens` as the candidate's text, with the usage so far.
fn gemini_chunk(p: &Parsed, tokens: &[String], first_index: usize, finish: Option<&str>, output_tokens: u64) -> Value {
    let mut candidate = json!({
        "content": {"role": "model", "parts": [{"text": tokens.concat()}]},
        "index": 0,
    });
    if let Some(finish) = finish {
        candidate["finishReason"] = json!(gemini_finish(finish));
    }
    if let Some(k) = p.top_logprobs {
        let entries: Vec<Value> =
            tokens.iter().enumerate().map(|(i, t)| logprob_entry(first_index + i, t, k)).collect();
        let gemini = |e: &Value| json!({"token": e["token"], "logProbability": e["logprob"]});
        candidate["logprobsResult"] = json!({
            "chosenCandidates": entries.iter().map(gemini).collect::<Vec<_>>(),
            "topCandidates": entries.iter().map(|e| json!({
                "candidates": e["top_logprobs"].as_array().map(|top| top.iter().map(gemini).collect::<Vec<_>>()).unwrap_or_default()
            })).collect::<Vec<_>>(),
        });
    }
    json!({
        "candidates": [candidate],
        "usageMetadata": {"promptTokenCount": p.input_tokens, "candidatesTokenCount": output_tokens,
                          "totalTokenCount": p.input_tokens + output_tokens},
        "modelVersion": p.model,
    })
}

fn gemini_body(p: &Parsed, tokens: &[String], finish: &str, output_tokens: u64) -> Vec<u8> {
    gemini_chunk(p, tokens, 0, Some(finish), output_tokens).to_string().into_bytes()
}

/// One chunk per token, the last one carrying `finishReason`; usage is cumulative.
fn gemini_stream(p: &Parsed, tokens: &[String], finish: &str) -> Vec<u8> {
    let mut out = String::new();
    for (i, t) in tokens.iter().enumerate() {
        let last = i + 1 == tokens.len();
        let chunk = gemini_chunk(p, std::slice::from_ref(t), i, last.then_some(finish), i as u64 + 1);
        out.push_str(&format!("data: {chunk}\r\n\r\n"));
    }
    if tokens.is_empty() {
        out.push_str(&format!("data: {}\r\n\r\n", gemini_chunk(p, &[], 0, Some(finish), 0)));
    }
    out.into_bytes()
}

/// Deterministic logprobs: token i has logprob -0.1·(i+1); alternatives `alt{j}` trail it.
fn logprob_entry(index: usize, token: &str, k: u64) -> Value {
    let logprob = -0.1 * (index as f64 + 1.0);
    let mut top = vec![json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})];
    for j in 1..k {
        let alt = format!("alt{j}");
        top.push(json!({"token": alt, "logprob": logprob - j as f64, "bytes": alt.as_bytes()}));
    }
    top.truncate(k as usize);
    json!({"token": token, "logprob": logprob, "bytes": token.as_bytes(), "top_logprobs": top})
}

fn openai_body(p: &Parsed, tokens: &[String], finish: &str, output_tokens: u64) -> Vec<u8> {
    let logprobs = p.top_logprobs.map(
        |k| json!({"content": tokens.iter().enumerate().map(|(i, t)| logprob_entry(i, t, k)).collect::<Vec<_>>()}),
    );
    let body = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": p.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": tokens.concat()},
            "logprobs": logprobs,
            "finish_reason": finish,
        }],
        "usage": {"prompt_tokens": p.input_tokens, "completion_tokens": output_tokens,
                  "total_tokens": p.input_tokens + output_tokens},
    });
    body.to_string().into_bytes()
}

fn openai_stream(p: &Parsed, tokens: &[String], finish: &str, output_tokens: u64) -> Vec<u8> {
    let mut out = String::new();
    let chunk = |choices: Value, usage: Value| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
               "model": p.model, "choices": choices, "usage": usage})
    };
    // Real OpenAI sends `"usage": null` on every chunk but the last when usage is asked for.
    let usage_field = Value::Null;
    out.push_str(&format!(
        "data: {}\n\n",
        chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
            usage_field.clone()
        )
    ));
    for (i, t) in tokens.iter().enumerate() {
        let logprobs = p.top_logprobs.map(|k| json!({"content": [logprob_entry(i, t, k)]}));
        out.push_str(&format!(
            "data: {}\n\n",
            chunk(
                json!([{"index": 0, "delta": {"content": t}, "logprobs": logprobs, "finish_reason": null}]),
                usage_field.clone()
            )
        ));
    }
    out.push_str(&format!(
        "data: {}\n\n",
        chunk(json!([{"index": 0, "delta": {}, "finish_reason": finish}]), usage_field)
    ));
    if p.include_usage {
        let usage = json!({"prompt_tokens": p.input_tokens, "completion_tokens": output_tokens,
                           "total_tokens": p.input_tokens + output_tokens});
        out.push_str(&format!("data: {}\n\n", chunk(json!([]), usage)));
    }
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

fn anthropic_stop_reason(finish: &str) -> &'static str {
    if finish == "length" {
        "max_tokens"
    } else {
        "end_turn"
    }
}

fn anthropic_body(p: &Parsed, tokens: &[String], finish: &str, output_tokens: u64) -> Vec<u8> {
    json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": p.model,
        "content": [{"type": "text", "text": tokens.concat()}],
        "stop_reason": anthropic_stop_reason(finish),
        "stop_sequence": null,
        "usage": {"input_tokens": p.input_tokens, "output_tokens": output_tokens},
    })
    .to_string()
    .into_bytes()
}

fn anthropic_stream(p: &Parsed, tokens: &[String], finish: &str, output_tokens: u64) -> Vec<u8> {
    let mut out = String::new();
    let mut event = |name: &str, data: Value| out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    event(
        "message_start",
        json!({"type": "message_start", "message": {
        "id": "msg_mock", "type": "message", "role": "assistant", "model": p.model, "content": [],
        "stop_reason": null, "usage": {"input_tokens": p.input_tokens, "output_tokens": 1}}}),
    );
    event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0,
        "content_block": {"type": "text", "text": ""}}),
    );
    event("ping", json!({"type": "ping"}));
    for t in tokens {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": t}}),
        );
    }
    event("content_block_stop", json!({"type": "content_block_stop", "index": 0}));
    event(
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": anthropic_stop_reason(finish), "stop_sequence": null},
        "usage": {"output_tokens": output_tokens}}),
    );
    event("message_stop", json!({"type": "message_stop"}));
    out.into_bytes()
}

async fn openai_handler(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(state, Protocol::OpenAi, headers, body).await
}

async fn anthropic_handler(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(state, Protocol::Anthropic, headers, body).await
}

/// `POST /v1beta/models/{model}:{method}`: the path segment holds both.
async fn gemini_handler(
    State(state): State<Arc<MockState>>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let protocol = match call.rsplit_once(':') {
        Some((model, "generateContent")) => Protocol::Gemini { model: model.to_string(), stream: false },
        Some((model, "streamGenerateContent")) => Protocol::Gemini { model: model.to_string(), stream: true },
        _ => return error_response(404, "NOT_FOUND", &format!("unknown method in `{call}`")),
    };
    handle(state, protocol, headers, body).await
}

/// `GET /v1/mock/stats`: the counters as JSON (benchmarks read them before and after a run).
async fn stats_handler(State(state): State<Arc<MockState>>) -> Response {
    let counts = MockCounts {
        total: state.total.load(Ordering::SeqCst),
        ok: state.ok.load(Ordering::SeqCst),
        faults: lock(&state.faults).clone(),
        max_in_flight: state.max_in_flight.load(Ordering::SeqCst),
        service_micros: state.service_micros.load(Ordering::Relaxed),
    };
    axum::Json(counts).into_response()
}

/// Prompt → reference from a dataset file, for a mock teacher that answers like a competent
/// one. Rows without a reference are skipped.
pub fn answers_from_dataset(path: &std::path::Path) -> Result<std::collections::HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let parsed = crate::dataset::parse_jsonl(&text).map_err(|errors| {
        let first = errors.first().map(|e| format!("line {}: {}", e.line, e.message)).unwrap_or_default();
        format!("{}: {} bad rows (first: {first})", path.display(), errors.len())
    })?;
    Ok(parsed
        .examples
        .into_iter()
        .filter_map(|e| {
            let prompt = e.messages.iter().rev().find(|m| m.role == "user")?.content.trim().to_string();
            Some((prompt, e.reference?))
        })
        .collect())
}

/// Appends one line (newlines escaped) to a log file; best effort, for call counting.
/// One `write` of the whole line on an O_APPEND file, so concurrent calls never interleave.
pub fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = file.write_all(format!("{}\n", line.replace('\n', "\\n")).as_bytes());
    }
}

/// Wakes futures at exact instants for the mock's base latency. tokio's timer rounds every
/// deadline up to its next millisecond tick, which added ~1.1 ms to a 50 ms latency (2% of
/// the labeling benchmark's ideal, charged to the client); a thread parked until the
/// earliest deadline wakes within tens of microseconds.
struct PreciseTimer {
    shared: Arc<TimerQueue>,
    thread: std::thread::Thread,
}

#[derive(Default)]
struct TimerQueue {
    due: Mutex<std::collections::BinaryHeap<TimerEntry>>,
    next_seq: AtomicU64,
}

struct TimerEntry {
    at: std::time::Instant,
    seq: u64,
    wake: tokio::sync::oneshot::Sender<()>,
}

// Ordered so that the max-heap pops the earliest deadline first.
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for TimerEntry {}

impl PreciseTimer {
    fn start() -> Self {
        let shared = Arc::new(TimerQueue::default());
        // The thread holds only a weak reference, so it ends once the server is dropped.
        let weak = Arc::downgrade(&shared);
        let thread = std::thread::Builder::new()
            .name("mock-timer".into())
            .spawn(move || loop {
                let Some(queue) = weak.upgrade() else { return };
                let now = std::time::Instant::now();
                let next = {
                    let mut due = lock(&queue.due);
                    while due.peek().is_some_and(|e| e.at <= now) {
                        let entry = due.pop().expect("peeked");
                        let _ = entry.wake.send(());
                    }
                    due.peek().map(|e| e.at)
                };
                drop(queue);
                // Bounded so a dropped server's thread notices and exits.
                let wait = next.map_or(Duration::from_secs(1), |at| at - now).min(Duration::from_secs(1));
                std::thread::park_timeout(wait);
            })
            .expect("spawn mock timer thread");
        PreciseTimer { shared, thread: thread.thread().clone() }
    }

    async fn sleep_until(&self, at: std::time::Instant) {
        let (wake, woken) = tokio::sync::oneshot::channel();
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let earliest = {
            let mut due = lock(&self.shared.due);
            due.push(TimerEntry { at, seq, wake });
            due.peek().is_some_and(|e| e.seq == seq)
        };
        // A park token left by an unpark before the thread parks makes that park return at once,
        // so a new earliest deadline is never slept past.
        if earliest {
            self.thread.unpark();
        }
        let _ = woken.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn precise_timer_never_wakes_early_and_honours_a_later_earlier_deadline() {
        let timer = PreciseTimer::start();
        let start = Instant::now();
        // The long sleep is queued first; the short one, queued after, must not wait for it.
        let long = timer.sleep_until(start + Duration::from_millis(300));
        let short = async {
            timer.sleep_until(start + Duration::from_millis(20)).await;
            Instant::now()
        };
        let (_, short_woke) = tokio::join!(long, short);
        let long_woke = Instant::now();
        assert!(short_woke >= start + Duration::from_millis(20));
        assert!(short_woke < start + Duration::from_millis(250), "short sleep waited for the long one");
        assert!(long_woke >= start + Duration::from_millis(300));
    }
}
