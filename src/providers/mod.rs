//! Provider layer: one file per wire protocol behind the [`Provider`] trait, plus the
//! request/response types they share.
//!
//! Providers do exactly one HTTP exchange per call: no retries, no timeouts beyond the
//! connect timeout, no failover. Those belong to the router, so the proxy and the labeling
//! stage get identical behaviour. Providers never log or return their API key: every error
//! string passes through [`redact`] before leaving this module.

pub mod anthropic;
pub mod config;
pub mod gemini;
pub mod openai;
pub mod sse;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::providers::config::{GenerationParams, ProviderKind, TargetConfig};

pub use anthropic::AnthropicProvider;
pub use gemini::GeminiProvider;
pub use openai::OpenAiProvider;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: Role::System, content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: Role::User, content: content.into() }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self { role: Role::Assistant, content: content.into() }
    }
}

/// A provider-neutral chat request. Its identity ([`ChatRequest::content_id`]) covers the
/// messages and params only, never the target, so failover and re-runs de-duplicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub params: GenerationParams,
}

/// Hex sha256 of a request's canonical JSON; the journal's primary key.
pub type RequestId = String;

impl ChatRequest {
    pub fn new(messages: Vec<ChatMessage>, params: GenerationParams) -> Self {
        Self { messages, params }
    }

    /// Content hash of messages + params. serde_json writes struct fields in declaration
    /// order and we hold no maps, so the encoding is canonical for a given crate version;
    /// a version tag is hashed in so a future change of encoding can't collide silently.
    pub fn content_id(&self) -> RequestId {
        let mut hasher = Sha256::new();
        hasher.update(b"tangle-chat-request-v1\n");
        // Serializing plain structs of strings and numbers cannot fail.
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hasher.update(&canonical);
        hex::encode(hasher.finalize())
    }

    /// Rough prompt size for rate limiting and budget reservations (≈ 4 bytes per token).
    pub fn estimated_input_tokens(&self) -> u64 {
        let bytes: usize = self.messages.iter().map(|m| m.content.len() + 4).sum();
        (bytes as u64).div_ceil(4)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
}

/// One generated token with its logprob and the top-K alternatives at that position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub token: String,
    pub logprob: f64,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    /// Model name as reported by the provider (may differ from the configured alias).
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

impl ChatResponse {
    /// A reply with nothing in it yet, for a stream to fill.
    pub fn empty() -> ChatResponse {
        ChatResponse { text: String::new(), finish_reason: None, usage: Usage::default(), model: None, logprobs: None }
    }
}

/// Why a provider call failed, classified for the router.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ProviderError {
    #[error("HTTP {status}: {message}")]
    Http { status: u16, retry_after: Option<Duration>, message: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    /// The connection broke mid-exchange (reset, closed early, truncated body or stream).
    #[error("transport error: {0}")]
    Transport(String),
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The stream ended before its terminating event.
    #[error("truncated stream: {0}")]
    Truncated(String),
    /// Invalid local configuration (bad base URL, missing key); never retried.
    #[error("invalid target configuration: {0}")]
    Config(String),
}

/// What the router should do after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient: retry this target with backoff, then fail over.
    Retryable,
    /// This target cannot serve (bad key, unknown model): fail over without retrying.
    TargetFatal,
    /// The request itself is invalid: every target would refuse it; stop.
    RequestFatal,
}

impl ProviderError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ProviderError::Http { status, .. } => classify_status(*status),
            ProviderError::Timeout(_)
            | ProviderError::Connect(_)
            | ProviderError::Transport(_)
            | ProviderError::Malformed(_)
            | ProviderError::Truncated(_) => ErrorClass::Retryable,
            ProviderError::Config(_) => ErrorClass::TargetFatal,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Short stable label for ledgers and counters (`http_429`, `timeout`, ...).
    pub fn kind_label(&self) -> String {
        match self {
            ProviderError::Http { status, .. } => format!("http_{status}"),
            ProviderError::Timeout(_) => "timeout".into(),
            ProviderError::Connect(_) => "connect".into(),
            ProviderError::Transport(_) => "transport".into(),
            ProviderError::Malformed(_) => "malformed".into(),
            ProviderError::Truncated(_) => "truncated".into(),
            ProviderError::Config(_) => "config".into(),
        }
    }
}

/// 408/409/425/429 and 5xx (incl. Anthropic's 529 overloaded) are transient; 401/403/404
/// are about this target; other 4xx are about the request.
pub fn classify_status(status: u16) -> ErrorClass {
    match status {
        408 | 409 | 425 | 429 | 500..=599 => ErrorClass::Retryable,
        401..=404 => ErrorClass::TargetFatal,
        _ => ErrorClass::RequestFatal,
    }
}

/// Parses `Retry-After` (delta-seconds or an HTTP date, RFC 9110 §10.2.3). `now` is passed
/// in so the date form is testable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads the retry hint from response headers: OpenAI's `retry-after-ms` first (more
/// precise), then the standard `Retry-After`.
pub(crate) fn retry_after_from_headers(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

/// Removes a secret from text that may have been echoed by a server or a library.
pub(crate) fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() => text.replace(s, crate::providers::config::SecretString::MASK),
        _ => text.to_string(),
    }
}

/// Maps a reqwest error to our classification. reqwest errors can carry the URL but never
/// headers, so the key cannot appear; we still redact defensively.
pub(crate) fn classify_reqwest_error(err: &reqwest::Error, secret: Option<&str>) -> ProviderError {
    // `{:#}`-style chains are more useful than the top-level message ("error sending request").
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    let message = redact(&message, secret);
    if err.is_timeout() {
        ProviderError::Timeout(Duration::ZERO)
    } else if err.is_connect() {
        ProviderError::Connect(message)
    } else if err.is_decode() {
        ProviderError::Malformed(message)
    } else {
        ProviderError::Transport(message)
    }
}

/// Truncates an error body so a huge HTML error page doesn't end up in the ledger.
pub(crate) fn error_snippet(body: &str) -> String {
    const MAX: usize = 300;
    if body.len() <= MAX {
        return body.trim().to_string();
    }
    let mut end = MAX;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", body[..end].trim())
}

/// Receives a reply's text piece by piece as a streamed exchange delivers it.
pub type DeltaSink<'a> = &'a mut (dyn FnMut(&str) + Send);

/// One wire protocol. Implementations are cheap to share (`Arc`) and safe to call
/// concurrently; each call is exactly one HTTP exchange. Everything that reaches a provider
/// — labeling, the proxy (its streaming relay included) and the eval stage — goes through
/// these two calls, so a protocol's endpoint, auth, body and parsing live in its file only.
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;
    fn model(&self) -> &str;

    /// A non-streaming exchange: the whole reply in one body.
    fn complete_once<'a>(&'a self, request: &'a ChatRequest) -> BoxFuture<'a, Result<ChatResponse, ProviderError>>;

    /// A streaming exchange: each piece of text goes to `on_delta` as it arrives; the whole
    /// reply, with the usage the stream ends with, is returned once the stream completes.
    fn stream<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_delta: DeltaSink<'a>,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>>;

    /// Either form; the reply is the same, only the wire differs.
    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
        stream: bool,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        if !stream {
            return self.complete_once(request);
        }
        Box::pin(async move {
            let mut ignore = |_: &str| {};
            self.stream(request, &mut ignore).await
        })
    }
}

/// POSTs a JSON body with the provider's auth headers already on `builder`; a non-2xx
/// status becomes [`ProviderError::Http`] with the retry hint and a redacted snippet of the
/// body.
pub(crate) async fn post_json(
    builder: reqwest::RequestBuilder,
    body: &impl Serialize,
    secret: Option<&str>,
) -> Result<reqwest::Response, ProviderError> {
    let response = builder.json(body).send().await.map_err(|e| classify_reqwest_error(&e, secret))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after_from_headers(response.headers());
    let text = response.text().await.unwrap_or_default();
    Err(ProviderError::Http { status: status.as_u16(), retry_after, message: redact(&error_snippet(&text), secret) })
}

/// Reads a whole (non-streamed) body and parses it as `T`; `what` names it in errors.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    secret: Option<&str>,
    what: &str,
) -> Result<T, ProviderError> {
    let bytes = response.bytes().await.map_err(|e| classify_reqwest_error(&e, secret))?;
    serde_json::from_slice(&bytes).map_err(|e| ProviderError::Malformed(format!("{what}: {e}")))
}

/// Feeds every server-sent event's data of a streamed body to `on_event` until it returns
/// `true` (the stream's terminating event); a body that ends first is
/// [`ProviderError::Truncated`] with `unterminated` as the message.
pub(crate) async fn read_sse(
    response: reqwest::Response,
    secret: Option<&str>,
    unterminated: &str,
    mut on_event: impl FnMut(&str) -> Result<bool, ProviderError>,
) -> Result<(), ProviderError> {
    use futures_util::StreamExt;
    let mut body = response.bytes_stream();
    let mut parser = sse::SseParser::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| classify_reqwest_error(&e, secret))?;
        for event in parser.push(&chunk) {
            if on_event(&event.data)? {
                return Ok(());
            }
        }
    }
    Err(ProviderError::Truncated(unterminated.to_string()))
}

/// Builds the provider for a target, sharing one connection pool across targets.
pub fn build_provider(target: &TargetConfig, client: &reqwest::Client) -> Result<Arc<dyn Provider>, ProviderError> {
    match target.provider {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
            Ok(Arc::new(OpenAiProvider::new(target, client.clone())?))
        }
        ProviderKind::Anthropic => Ok(Arc::new(AnthropicProvider::new(target, client.clone())?)),
        ProviderKind::Gemini => Ok(Arc::new(GeminiProvider::new(target, client.clone())?)),
    }
}

/// The HTTP client all providers share. HTTP/1.1 only (h2 is compiled out); one pool, no
/// per-host idle cap, Nagle off — labeling keeps up to `concurrency` requests in flight.
pub fn default_http_client() -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| ProviderError::Config(format!("cannot build HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_id_ignores_nothing_but_target() {
        let a = ChatRequest::new(vec![ChatMessage::user("hi")], GenerationParams::default());
        let mut b = a.clone();
        assert_eq!(a.content_id(), b.content_id());
        b.params.temperature = Some(0.0);
        assert_ne!(a.content_id(), b.content_id());
        let c = ChatRequest::new(vec![ChatMessage::system("hi")], GenerationParams::default());
        assert_ne!(a.content_id(), c.content_id());
        assert_eq!(a.content_id().len(), 64);
    }

    #[test]
    fn status_classification() {
        for s in [429, 500, 502, 503, 504, 529] {
            assert_eq!(classify_status(s), ErrorClass::Retryable, "{s}");
        }
        for s in [401, 403, 404] {
            assert_eq!(classify_status(s), ErrorClass::TargetFatal, "{s}");
        }
        for s in [400, 413, 422] {
            assert_eq!(classify_status(s), ErrorClass::RequestFatal, "{s}");
        }
        assert!(ProviderError::Truncated("x".into()).is_retryable());
        assert!(ProviderError::Malformed("x".into()).is_retryable());
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 ", now), Some(Duration::from_millis(500)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn redact_removes_secret() {
        assert_eq!(redact("bad key sk-1 given", Some("sk-1")), "bad key *** given");
        assert_eq!(redact("x", None), "x");
    }
}
