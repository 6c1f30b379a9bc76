//! Streaming through the shared router without splicing.
//!
//! The [`Provider`] trait returns whole replies, which is right for labeling and for
//! non-streaming proxy requests. A streaming client needs each piece as it arrives, yet the
//! same retries, failover, health and Retry-After handling. So every proxy target is a
//! [`ProxyTarget`] wrapping the ordinary provider: when a request runs inside a [`Relay`]
//! scope (a tokio task-local set by the proxy around `Router::send`), the wrapper streams
//! the upstream itself and forwards each text delta to the relay; otherwise it delegates.
//!
//! The failover rule: the first non-empty delta *commits* the request to that attempt.
//! Before that, any failure is an ordinary router failure (retry, fail over, cool down) and
//! the client sees nothing. After it, a failure is sent to the client as one error event and
//! the request ends: a later attempt would repeat or contradict text already delivered, so
//! re-entering the wrapper after a commit parks forever and the proxy abandons the route.
//!
//! Every streamed attempt, finished or not, is recorded in the relay as a router
//! [`Attempt`] for the ledger, since an abandoned route never returns its own list.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::board::BreakerBoard;
use super::wire::ClientError;
use crate::budget::{Reservation, Spend};
use crate::providers::anthropic::{ANTHROPIC_VERSION, DEFAULT_MAX_TOKENS};
use crate::providers::config::{ProviderKind, TargetConfig};
use crate::providers::sse::SseParser;
use crate::providers::{
    classify_reqwest_error, error_snippet, redact, retry_after_from_headers, ChatRequest, ChatResponse, Provider,
    ProviderError, Role, Usage,
};
use crate::router::{Attempt, AttemptOutcome};
use crate::support::{clock_now, lock};

tokio::task_local! {
    static RELAY: Arc<Relay>;
}

/// What a streaming request's response body receives, in order.
#[derive(Debug)]
pub(crate) enum RelayItem {
    /// The first text of the reply, from `target`; sent once, just before the first delta.
    Start {
        target: String,
    },
    Delta(String),
    /// The committed attempt failed: one error event, then the stream ends.
    Failed(ProviderError),
    /// The route ended (sent after every delta): the final reply, or why there is none.
    Finished(Result<ChatResponse, ClientError>),
}

pub(crate) struct Relay {
    tx: mpsc::UnboundedSender<RelayItem>,
    committed: AtomicBool,
    failed: AtomicBool,
    attempts: Mutex<Vec<Attempt>>,
}

impl Relay {
    pub(crate) fn new(tx: mpsc::UnboundedSender<RelayItem>) -> Arc<Self> {
        Arc::new(Self {
            tx,
            committed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            attempts: Mutex::new(Vec::new()),
        })
    }

    /// Runs `future` (the router's `send`) with this relay visible to every target.
    pub(crate) async fn scope<F: std::future::Future>(self: Arc<Self>, future: F) -> F::Output {
        RELAY.scope(self, future).await
    }

    pub(crate) fn is_committed(&self) -> bool {
        self.committed.load(Ordering::SeqCst)
    }

    /// Whether a committed attempt failed (the client was sent an error event).
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    pub(crate) fn take_attempts(&self) -> Vec<Attempt> {
        std::mem::take(&mut *lock(&self.attempts))
    }

    pub(crate) fn send(&self, item: RelayItem) {
        if matches!(item, RelayItem::Failed(_)) {
            self.failed.store(true, Ordering::SeqCst);
        }
        // The receiver is gone only when the client left; nothing to tell then.
        let _ = self.tx.send(item);
    }
}

/// Where a target-scope breaker refusal is marked, so the ledger can label it.
pub(crate) const BREAKER_OPEN_PREFIX: &str = "circuit breaker open: ";

/// One upstream target as the proxy's router sees it.
pub(crate) struct ProxyTarget {
    pub(crate) index: usize,
    pub(crate) config: TargetConfig,
    pub(crate) name: String,
    inner: Arc<dyn Provider>,
    client: reqwest::Client,
    endpoint: String,
    board: Arc<BreakerBoard>,
    breaker_id: Option<String>,
}

const OPENAI_DEFAULT_BASE: &str = "https://api.openai.com/v1";
const ANTHROPIC_DEFAULT_BASE: &str = "https://api.anthropic.com";

impl ProxyTarget {
    pub(crate) fn new(
        index: usize,
        config: TargetConfig,
        inner: Arc<dyn Provider>,
        client: reqwest::Client,
        board: Arc<BreakerBoard>,
        breaker_id: Option<String>,
    ) -> Self {
        let endpoint = match config.provider {
            ProviderKind::Anthropic => {
                let base = config.base_url.as_deref().unwrap_or(ANTHROPIC_DEFAULT_BASE).trim_end_matches('/');
                format!("{base}/v1/messages")
            }
            _ => {
                let base = config.base_url.as_deref().unwrap_or(OPENAI_DEFAULT_BASE).trim_end_matches('/');
                format!("{base}/chat/completions")
            }
        };
        Self { index, name: config.display_name(), config, inner, client, endpoint, board, breaker_id }
    }

    fn secret(&self) -> Option<&str> {
        self.config.api_key.as_ref().map(|k| k.expose())
    }

    fn cost(&self, usage: Usage) -> f64 {
        self.config.pricing.map_or(0.0, |p| p.cost_usd(usage.input_tokens, usage.output_tokens))
    }

    async fn call(&self, request: &ChatRequest, stream: bool) -> Result<ChatResponse, ProviderError> {
        let relay = RELAY.try_with(Arc::clone).ok();
        if relay.as_ref().is_some_and(|r| r.is_committed()) {
            // See the module docs: the proxy drops this route as soon as it sees the failure.
            return std::future::pending().await;
        }
        let mut spend = match TargetSpend::admit(self, request) {
            Ok(spend) => spend,
            Err(refused) => {
                if let Some(relay) = &relay {
                    // No attempt object exists for a call never made; meter the refusal.
                    lock(&relay.attempts).push(Attempt {
                        target_index: self.index,
                        target: self.name.clone(),
                        provider: self.config.provider.as_str(),
                        model: self.config.model.clone(),
                        latency: Duration::ZERO,
                        usage: Usage::default(),
                        cost_usd: 0.0,
                        outcome: AttemptOutcome::Failed { kind: refused.kind_label(), message: refused.to_string() },
                    });
                }
                return Err(refused);
            }
        };
        let started = clock_now();
        let result = match relay {
            Some(relay) => self.stream_through(request, relay).await,
            None => self.inner.complete(request, stream).await,
        };
        if let Ok(response) = &result {
            spend.settle(response.usage, self.cost(response.usage), started);
        }
        result
    }

    async fn stream_through(&self, request: &ChatRequest, relay: Arc<Relay>) -> Result<ChatResponse, ProviderError> {
        let mut attempt = StreamAttempt {
            relay: &relay,
            target: self,
            started: tokio::time::Instant::now(),
            estimated_input: request.estimated_input_tokens(),
            committed_here: false,
            deltas: 0,
            finished: false,
        };
        let result = match self.config.provider {
            ProviderKind::Anthropic => self.stream_anthropic(request, &mut attempt).await,
            _ => self.stream_openai(request, &mut attempt).await,
        };
        attempt.finish(&result);
        result
    }

    async fn send(&self, body: Value) -> Result<reqwest::Response, ProviderError> {
        let mut builder = self.client.post(&self.endpoint).json(&body);
        match (self.config.provider, &self.config.api_key) {
            (ProviderKind::Anthropic, key) => {
                builder = builder.header("anthropic-version", ANTHROPIC_VERSION);
                if let Some(key) = key {
                    builder = builder.header("x-api-key", key.expose());
                }
            }
            (_, Some(key)) => builder = builder.bearer_auth(key.expose()),
            (_, None) => {}
        }
        let response = builder.send().await.map_err(|e| classify_reqwest_error(&e, self.secret()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after_from_headers(response.headers());
        let text = response.text().await.unwrap_or_default();
        Err(ProviderError::Http {
            status: status.as_u16(),
            retry_after,
            message: redact(&error_snippet(&text), self.secret()),
        })
    }

    fn openai_body(&self, request: &ChatRequest) -> Value {
        let p = &request.params;
        let mut body = Map::new();
        body.insert("model".into(), json!(self.config.model));
        body.insert("messages".into(), json!(request.messages));
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
        if let Some(t) = p.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(t) = p.top_p {
            body.insert("top_p".into(), json!(t));
        }
        if let Some(n) = p.max_tokens {
            // api.openai.com deprecated `max_tokens`; compatible servers only know it.
            let field =
                if self.config.provider == ProviderKind::Openai { "max_completion_tokens" } else { "max_tokens" };
            body.insert(field.into(), json!(n));
        }
        if !p.stop.is_empty() {
            body.insert("stop".into(), json!(p.stop));
        }
        Value::Object(body)
    }

    async fn stream_openai(
        &self,
        request: &ChatRequest,
        attempt: &mut StreamAttempt<'_>,
    ) -> Result<ChatResponse, ProviderError> {
        let response = self.send(self.openai_body(request)).await?;
        let mut body = response.bytes_stream();
        let mut parser = SseParser::new();
        let mut reply = ChatResponse {
            text: String::new(),
            finish_reason: None,
            usage: Usage::default(),
            model: None,
            logprobs: None,
        };
        let mut usage = None;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| classify_reqwest_error(&e, self.secret()))?;
            for event in parser.push(&chunk) {
                if event.data == "[DONE]" {
                    reply.usage = usage.unwrap_or(Usage {
                        input_tokens: request.estimated_input_tokens(),
                        output_tokens: attempt.deltas,
                    });
                    return Ok(reply);
                }
                let value: Value = serde_json::from_str(&event.data)
                    .map_err(|e| ProviderError::Malformed(format!("stream chunk: {e}")))?;
                if !value["error"].is_null() {
                    let message = format!("error event in stream: {}", value["error"]);
                    return Err(ProviderError::Transport(redact(&message, self.secret())));
                }
                if let Some(model) = value["model"].as_str() {
                    reply.model = Some(model.to_string());
                }
                if let (Some(i), Some(o)) =
                    (value["usage"]["prompt_tokens"].as_u64(), value["usage"]["completion_tokens"].as_u64())
                {
                    usage = Some(Usage { input_tokens: i, output_tokens: o });
                }
                if let Some(choice) = value["choices"].get(0) {
                    if let Some(text) = choice["delta"]["content"].as_str() {
                        attempt.delta(text);
                        reply.text.push_str(text);
                    }
                    if let Some(reason) = choice["finish_reason"].as_str() {
                        reply.finish_reason = Some(reason.to_string());
                    }
                }
            }
        }
        Err(ProviderError::Truncated("stream closed before `data: [DONE]`".into()))
    }

    fn anthropic_body(&self, request: &ChatRequest) -> Value {
        let p = &request.params;
        let system: Vec<&str> =
            request.messages.iter().filter(|m| m.role == Role::System).map(|m| m.content.as_str()).collect();
        let messages: Vec<Value> = request
            .messages
            .iter()
            .filter(|m| m.role != Role::System)
            .map(
                |m| json!({"role": if m.role == Role::Assistant { "assistant" } else { "user" }, "content": m.content}),
            )
            .collect();
        let mut body = Map::new();
        body.insert("model".into(), json!(self.config.model));
        body.insert("max_tokens".into(), json!(p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)));
        if !system.is_empty() {
            body.insert("system".into(), json!(system.join("\n\n")));
        }
        body.insert("messages".into(), Value::Array(messages));
        body.insert("stream".into(), json!(true));
        if let Some(t) = p.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(t) = p.top_p {
            body.insert("top_p".into(), json!(t));
        }
        if !p.stop.is_empty() {
            body.insert("stop_sequences".into(), json!(p.stop));
        }
        Value::Object(body)
    }

    async fn stream_anthropic(
        &self,
        request: &ChatRequest,
        attempt: &mut StreamAttempt<'_>,
    ) -> Result<ChatResponse, ProviderError> {
        let response = self.send(self.anthropic_body(request)).await?;
        let mut body = response.bytes_stream();
        let mut parser = SseParser::new();
        let mut reply = ChatResponse {
            text: String::new(),
            finish_reason: None,
            usage: Usage::default(),
            model: None,
            logprobs: None,
        };
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| classify_reqwest_error(&e, self.secret()))?;
            for event in parser.push(&chunk) {
                let value: Value = serde_json::from_str(&event.data)
                    .map_err(|e| ProviderError::Malformed(format!("stream event: {e}")))?;
                match value["type"].as_str().unwrap_or_default() {
                    "message_start" => {
                        let message = &value["message"];
                        reply.model = message["model"].as_str().map(str::to_string);
                        reply.usage.input_tokens = message["usage"]["input_tokens"].as_u64().unwrap_or(0);
                        reply.usage.output_tokens = message["usage"]["output_tokens"].as_u64().unwrap_or(0);
                    }
                    "content_block_delta" => {
                        if let Some(text) = value["delta"]["text"].as_str() {
                            attempt.delta(text);
                            reply.text.push_str(text);
                        }
                    }
                    "message_delta" => {
                        if let Some(reason) = value["delta"]["stop_reason"].as_str() {
                            reply.finish_reason = Some(reason.to_string());
                        }
                        // Cumulative for output tokens.
                        if let Some(n) = value["usage"]["output_tokens"].as_u64() {
                            reply.usage.output_tokens = n;
                        }
                    }
                    "message_stop" => return Ok(reply),
                    "error" => {
                        let kind = value["error"]["type"].as_str().unwrap_or_default();
                        // The same mapping as the Anthropic provider: in-stream errors are
                        // what the status codes are outside streams.
                        let status = match kind {
                            "overloaded_error" => 529,
                            "rate_limit_error" => 429,
                            "api_error" => 500,
                            _ => 400,
                        };
                        let message = format!("{kind} in stream: {}", value["error"]["message"].as_str().unwrap_or(""));
                        return Err(ProviderError::Http {
                            status,
                            retry_after: None,
                            message: redact(&message, self.secret()),
                        });
                    }
                    _ => {}
                }
            }
        }
        Err(ProviderError::Truncated("stream closed before `message_stop`".into()))
    }
}

impl Provider for ProxyTarget {
    fn kind(&self) -> ProviderKind {
        self.config.provider
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
        stream: bool,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(self.call(request, stream))
    }
}

/// A target-scope breaker's reservation for one attempt: settled with the real usage, or
/// released when the attempt fails or is dropped (timeout, cancelled request).
struct TargetSpend<'a> {
    target: &'a ProxyTarget,
    reservation: Option<Reservation>,
}

impl<'a> TargetSpend<'a> {
    fn admit(target: &'a ProxyTarget, request: &ChatRequest) -> Result<Self, ProviderError> {
        let Some(id) = &target.breaker_id else {
            return Ok(Self { target, reservation: None });
        };
        let output = u64::from(request.params.max_tokens.unwrap_or(256));
        let input = request.estimated_input_tokens();
        let estimate = Spend {
            tokens: input + output,
            cost_usd: target.cost(Usage { input_tokens: input, output_tokens: output }),
        };
        match target.board.admit(&[id.as_str()], estimate) {
            // `admit` on one id returns at most one reservation.
            Ok(mut reservations) => Ok(Self { target, reservation: reservations.pop().map(|(_, r)| r) }),
            // TargetFatal: the router fails over at once, without retrying this target.
            Err(refusal) => Err(ProviderError::Config(format!("{BREAKER_OPEN_PREFIX}{}", refusal.trip.message))),
        }
    }

    fn settle(&mut self, usage: Usage, cost_usd: f64, started: Instant) {
        if let (Some(id), Some(r)) = (&self.target.breaker_id, self.reservation.take()) {
            let actual = Spend { tokens: usage.total(), cost_usd };
            self.target.board.settle(&[(id.clone(), r)], &[], actual, started, clock_now());
        }
    }
}

impl Drop for TargetSpend<'_> {
    fn drop(&mut self) {
        if let (Some(id), Some(r)) = (&self.target.breaker_id, self.reservation.take()) {
            self.target.board.release(vec![(id.clone(), r)]);
        }
    }
}

/// Bookkeeping of one streamed attempt; records it in the relay however it ends.
struct StreamAttempt<'a> {
    relay: &'a Relay,
    target: &'a ProxyTarget,
    started: tokio::time::Instant,
    estimated_input: u64,
    committed_here: bool,
    /// Non-empty deltas forwarded (an estimate of output tokens when no usage arrives).
    deltas: u64,
    finished: bool,
}

impl StreamAttempt<'_> {
    fn delta(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.committed_here {
            self.committed_here = true;
            self.relay.committed.store(true, Ordering::SeqCst);
            self.relay.send(RelayItem::Start { target: self.target.name.clone() });
        }
        self.deltas += 1;
        self.relay.send(RelayItem::Delta(text.to_string()));
    }

    fn record(&self, outcome: AttemptOutcome, usage: Usage) {
        let latency = self.started.elapsed();
        let outcome = match outcome {
            AttemptOutcome::Ok if self.target.config.latency_threshold.is_some_and(|l| latency > l) => {
                AttemptOutcome::Degraded
            }
            other => other,
        };
        lock(&self.relay.attempts).push(Attempt {
            target_index: self.target.index,
            target: self.target.name.clone(),
            provider: self.target.config.provider.as_str(),
            model: self.target.config.model.clone(),
            latency,
            usage,
            cost_usd: self.target.cost(usage),
            outcome,
        });
    }

    /// Usage of an attempt that delivered text and then failed: the prompt estimate and one
    /// token per delta, since the upstream's own count never arrived.
    fn partial_usage(&self) -> Usage {
        if self.deltas == 0 {
            Usage::default()
        } else {
            Usage { input_tokens: self.estimated_input, output_tokens: self.deltas }
        }
    }

    fn finish(&mut self, result: &Result<ChatResponse, ProviderError>) {
        self.finished = true;
        match result {
            Ok(response) => self.record(AttemptOutcome::Ok, response.usage),
            Err(error) => {
                self.record(
                    AttemptOutcome::Failed { kind: error.kind_label(), message: error.to_string() },
                    self.partial_usage(),
                );
                if self.committed_here {
                    self.relay.send(RelayItem::Failed(error.clone()));
                }
            }
        }
    }
}

impl Drop for StreamAttempt<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Dropped mid-attempt: the router's per-attempt timeout, or the request abandoned.
        let elapsed = self.started.elapsed();
        let timed_out = elapsed + Duration::from_millis(1) >= self.target.config.timeout;
        let (kind, error) = if timed_out {
            ("timeout", ProviderError::Timeout(self.target.config.timeout))
        } else {
            ("cancelled", ProviderError::Transport("the request was abandoned".into()))
        };
        self.record(AttemptOutcome::Failed { kind: kind.into(), message: error.to_string() }, self.partial_usage());
        if self.committed_here && timed_out {
            self.relay.send(RelayItem::Failed(error));
        }
    }
}
