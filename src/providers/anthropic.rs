//! Anthropic Messages API (`POST {base}/v1/messages`). System prompts go in the top-level
//! `system` field; `max_tokens` is mandatory there, so a default is sent when unset.
//! Anthropic offers no logprobs: `params.logprobs` is ignored and responses carry none.

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{
    post_json, read_json, read_sse, redact, ChatRequest, ChatResponse, DeltaSink, Provider, ProviderError, Role, Usage,
};
use crate::providers::config::{ProviderKind, SecretString, TargetConfig};

const ANTHROPIC_DEFAULT_BASE: &str = "https://api.anthropic.com";
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Sent when the request leaves `max_tokens` unset (the API requires it).
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

pub struct AnthropicProvider {
    model: String,
    endpoint: String,
    api_key: Option<SecretString>,
    client: reqwest::Client,
}

impl AnthropicProvider {
    pub fn new(target: &TargetConfig, client: reqwest::Client) -> Result<Self, ProviderError> {
        let base = target.base_url.as_deref().unwrap_or(ANTHROPIC_DEFAULT_BASE).trim_end_matches('/').to_string();
        Ok(Self {
            model: target.model.clone(),
            endpoint: format!("{base}/v1/messages"),
            api_key: target.api_key.clone(),
            client,
        })
    }

    fn secret(&self) -> Option<&str> {
        self.api_key.as_ref().map(SecretString::expose)
    }

    fn body<'a>(&'a self, request: &'a ChatRequest, stream: bool) -> WireRequest<'a> {
        let system: Vec<&str> =
            request.messages.iter().filter(|m| m.role == Role::System).map(|m| m.content.as_str()).collect();
        let messages = request
            .messages
            .iter()
            .filter(|m| m.role != Role::System)
            .map(|m| WireMessage {
                role: if m.role == Role::Assistant { "assistant" } else { "user" },
                content: &m.content,
            })
            .collect();
        let p = &request.params;
        WireRequest {
            model: &self.model,
            max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            system: (!system.is_empty()).then(|| system.join("\n\n")),
            messages,
            temperature: p.temperature,
            top_p: p.top_p,
            stop_sequences: (!p.stop.is_empty()).then_some(&p.stop),
            stream,
        }
    }

    async fn send(&self, request: &ChatRequest, stream: bool) -> Result<reqwest::Response, ProviderError> {
        let mut builder = self.client.post(&self.endpoint).header("anthropic-version", ANTHROPIC_VERSION);
        if let Some(key) = &self.api_key {
            builder = builder.header("x-api-key", key.expose());
        }
        post_json(builder, &self.body(request, stream), self.secret()).await
    }

    async fn complete_once(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let response = self.send(request, false).await?;
        let wire: WireResponse = read_json(response, self.secret(), "messages body").await?;
        let text = wire
            .content
            .into_iter()
            .filter_map(|block| (block.kind == "text").then_some(block.text).flatten())
            .collect::<String>();
        Ok(ChatResponse {
            text,
            finish_reason: wire.stop_reason,
            usage: Usage { input_tokens: wire.usage.input_tokens, output_tokens: wire.usage.output_tokens },
            model: wire.model,
            logprobs: None,
        })
    }

    async fn stream(&self, request: &ChatRequest, on_delta: DeltaSink<'_>) -> Result<ChatResponse, ProviderError> {
        let response = self.send(request, true).await?;
        let secret = self.secret();
        let mut reply = ChatResponse::empty();
        read_sse(response, secret, "stream closed before `message_stop`", |data| {
            let wire: WireEvent =
                serde_json::from_str(data).map_err(|e| ProviderError::Malformed(format!("stream event: {e}")))?;
            match wire.kind.as_str() {
                "message_start" => {
                    if let Some(message) = wire.message {
                        reply.model = message.model;
                        reply.usage.input_tokens = message.usage.input_tokens;
                        reply.usage.output_tokens = message.usage.output_tokens;
                    }
                }
                "content_block_delta" => {
                    if let Some(text) = wire.delta.and_then(|d| d.text).filter(|t| !t.is_empty()) {
                        on_delta(&text);
                        reply.text.push_str(&text);
                    }
                }
                "message_delta" => {
                    if let Some(reason) = wire.delta.and_then(|d| d.stop_reason) {
                        reply.finish_reason = Some(reason);
                    }
                    // message_delta usage is cumulative for output tokens.
                    if let Some(u) = wire.usage {
                        reply.usage.output_tokens = u.output_tokens;
                    }
                }
                "message_stop" => return Ok(true),
                "error" => {
                    let error = wire.error.unwrap_or_default();
                    // An in-stream overloaded_error is what a 529 is outside streams.
                    let status = match error.kind.as_str() {
                        "overloaded_error" => 529,
                        "rate_limit_error" => 429,
                        "api_error" => 500,
                        _ => 400,
                    };
                    return Err(ProviderError::Http {
                        status,
                        retry_after: None,
                        message: redact(&format!("{} in stream: {}", error.kind, error.message), secret),
                    });
                }
                _ => {} // ping, content_block_start/stop, future event types
            }
            Ok(false)
        })
        .await?;
        Ok(reply)
    }
}

impl Provider for AnthropicProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn complete_once<'a>(&'a self, request: &'a ChatRequest) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(AnthropicProvider::complete_once(self, request))
    }

    fn stream<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_delta: DeltaSink<'a>,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(AnthropicProvider::stream(self, request, on_delta))
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Deserialize)]
struct WireResponse {
    model: Option<String>,
    content: Vec<WireContentBlock>,
    stop_reason: Option<String>,
    usage: WireUsage,
}

#[derive(Deserialize)]
struct WireContentBlock {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    message: Option<WireStartMessage>,
    delta: Option<WireEventDelta>,
    usage: Option<WireUsage>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireStartMessage {
    model: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Deserialize)]
struct WireEventDelta {
    text: Option<String>,
    stop_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::config::GenerationParams;
    use crate::providers::ChatMessage;

    #[test]
    fn system_goes_top_level_and_max_tokens_defaults() {
        let t = TargetConfig::new(ProviderKind::Anthropic, "claude");
        let p = AnthropicProvider::new(&t, reqwest::Client::new()).unwrap();
        assert_eq!(p.endpoint, "https://api.anthropic.com/v1/messages");
        let req = ChatRequest::new(
            vec![ChatMessage::system("be brief"), ChatMessage::user("hi")],
            GenerationParams { stop: vec!["x".into()], ..Default::default() },
        );
        let v = serde_json::to_value(p.body(&req, false)).unwrap();
        assert_eq!(v["system"], "be brief");
        assert_eq!(v["messages"].as_array().unwrap().len(), 1);
        assert_eq!(v["messages"][0]["role"], "user");
        assert_eq!(v["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(v["stop_sequences"][0], "x");
    }
}
