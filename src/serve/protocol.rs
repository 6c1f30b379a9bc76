//! The OpenAI Chat Completions wire format, as `tangle serve` speaks it. The response shapes
//! (`completion_json`, `chunk_json`, `usage_chunk_json`) are shared with the proxy, so both
//! servers answer OpenAI clients with the same bodies.

use super::{FinishReason, GenerateRequest, GenerateResult, ModelError};
use axum::response::sse::Event;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<WireMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

impl ChatCompletionRequest {
    /// Checks the request; returns what to generate, whether to stream, and whether to send a
    /// usage chunk. `Err` is (message, offending parameter).
    pub fn validate(self, default_max_tokens: u32) -> Result<(GenerateRequest, bool, bool), (String, &'static str)> {
        if self.messages.is_empty() {
            return Err(("`messages` must not be empty".into(), "messages"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return Err((
                    format!("messages[{i}].role `{}` is not one of {}", m.role, ROLES.join(", ")),
                    "messages",
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            _ => {
                                return Err((
                                    format!("messages[{i}]: only text content parts are supported"),
                                    "messages",
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system".to_string() } else { m.role };
            messages.push(Message { role, content });
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(("only `n: 1` is supported".into(), "n"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(("`temperature` must be between 0 and 2".into(), "temperature"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(("`top_p` must be in (0, 1]".into(), "top_p"));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens).unwrap_or(default_max_tokens);
        if max_tokens == 0 {
            return Err(("`max_tokens` must be at least 1".into(), "max_tokens"));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) if v.len() <= 4 => v,
            Some(Stop::Many(_)) => return Err(("at most 4 `stop` sequences are allowed".into(), "stop")),
        };
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        Ok((
            GenerateRequest { messages, max_tokens, temperature, top_p, stop, seed: self.seed },
            self.stream,
            include_usage,
        ))
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(kind: &str, message: impl Into<String>, param: Option<&str>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.into(),
                param: param.map(str::to_string),
                code: None,
            },
        }
    }
}

pub fn completion_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("chatcmpl-{:016x}", h.finish())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// OpenAI's `usage` object.
pub fn usage_json(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn usage(r: &GenerateResult) -> Value {
    usage_json(r.prompt_tokens.into(), r.completion_tokens.into())
}

/// A whole `chat.completion` with one assistant choice.
pub fn completion_json(id: &str, created: u64, model: &str, text: &str, finish_reason: &str, usage: Value) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "finish_reason": finish_reason,
            "logprobs": null,
        }],
        "usage": usage,
    })
}

/// One `chat.completion.chunk` with a delta (or `{}`) and an optional finish reason.
pub fn chunk_json(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> String {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null }],
    })
    .to_string()
}

/// The last chunk of a stream asked for `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk_json(id: &str, created: u64, model: &str, usage: Value) -> String {
    json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage })
        .to_string()
}

pub fn completion(id: &str, created: u64, model: &str, text: &str, r: &GenerateResult) -> Value {
    completion_json(id, created, model, text, r.finish.as_str(), usage(r))
}

fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<FinishReason>) -> Event {
    Event::default().data(chunk_json(id, created, model, delta, finish.map(FinishReason::as_str)))
}

enum Phase {
    Start,
    Pieces,
    Usage(GenerateResult),
    Done,
    End,
}

/// The SSE events of a streamed completion: the role, each text piece as it is generated,
/// the finish reason, the usage chunk when asked for, and `[DONE]`.
pub fn sse_events(
    id: String,
    created: u64,
    model: String,
    pieces: mpsc::UnboundedReceiver<String>,
    done: oneshot::Receiver<Result<(String, GenerateResult), ModelError>>,
    include_usage: bool,
) -> impl Stream<Item = Event> {
    let state = (Phase::Start, pieces, Some(done));
    futures_util::stream::unfold(state, move |(phase, mut pieces, mut done)| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            match phase {
                Phase::Start => {
                    let event = chunk(&id, created, &model, json!({ "role": "assistant", "content": "" }), None);
                    Some((event, (Phase::Pieces, pieces, done)))
                }
                Phase::Pieces => {
                    if let Some(piece) = pieces.recv().await {
                        let event = chunk(&id, created, &model, json!({ "content": piece }), None);
                        return Some((event, (Phase::Pieces, pieces, done)));
                    }
                    let outcome = match done.take() {
                        Some(rx) => rx.await.unwrap_or_else(|_| Err(ModelError::Failed("the worker stopped".into()))),
                        None => Err(ModelError::Failed("internal: no result".into())),
                    };
                    match outcome {
                        Ok((_, result)) => {
                            let event = chunk(&id, created, &model, json!({}), Some(result.finish));
                            let next = if include_usage { Phase::Usage(result) } else { Phase::Done };
                            Some((event, (next, pieces, done)))
                        }
                        Err(e) => {
                            let body = ErrorBody::new("server_error", e.to_string(), None);
                            let event = Event::default().data(serde_json::to_string(&body).unwrap_or_default());
                            Some((event, (Phase::Done, pieces, done)))
                        }
                    }
                }
                Phase::Usage(result) => {
                    let event = Event::default().data(usage_chunk_json(&id, created, &model, usage(&result)));
                    Some((event, (Phase::Done, pieces, done)))
                }
                Phase::Done => Some((Event::default().data("[DONE]"), (Phase::End, pieces, done))),
                Phase::End => None,
            }
        }
    })
}
