//! OpenAI Chat Completions (`POST {base}/chat/completions`), for api.openai.com and any
//! OpenAI-compatible server (vLLM, llama.cpp server, Ollama's `/v1`).

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::sse::SseParser;
use super::{
    classify_reqwest_error, error_snippet, redact, retry_after_from_headers, ChatMessage, ChatRequest, ChatResponse,
    Provider, ProviderError, TokenLogprobs, TopLogprob, Usage,
};
use crate::providers::config::{ProviderKind, SecretString, TargetConfig};

const OPENAI_DEFAULT_BASE: &str = "https://api.openai.com/v1";

pub struct OpenAiProvider {
    kind: ProviderKind,
    model: String,
    endpoint: String,
    api_key: Option<SecretString>,
    client: reqwest::Client,
}

impl OpenAiProvider {
    pub fn new(target: &TargetConfig, client: reqwest::Client) -> Result<Self, ProviderError> {
        let base = match (&target.base_url, target.provider) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, ProviderKind::Openai) => OPENAI_DEFAULT_BASE.to_string(),
            (None, _) => {
                return Err(ProviderError::Config(format!(
                    "target `{}` is openai_compatible but has no base_url",
                    target.display_name()
                )))
            }
        };
        Ok(Self {
            kind: target.provider,
            model: target.model.clone(),
            endpoint: format!("{base}/chat/completions"),
            api_key: target.api_key.clone(),
            client,
        })
    }

    fn secret(&self) -> Option<&str> {
        self.api_key.as_ref().map(SecretString::expose)
    }

    fn body<'a>(&'a self, request: &'a ChatRequest, stream: bool) -> WireRequest<'a> {
        let p = &request.params;
        // api.openai.com deprecated `max_tokens` (reasoning models reject it); compatible
        // servers such as llama.cpp only know `max_tokens`.
        let (max_tokens, max_completion_tokens) = match self.kind {
            ProviderKind::Openai => (None, p.max_tokens),
            _ => (p.max_tokens, None),
        };
        WireRequest {
            model: &self.model,
            messages: &request.messages,
            temperature: p.temperature,
            top_p: p.top_p,
            max_tokens,
            max_completion_tokens,
            stop: (!p.stop.is_empty()).then_some(&p.stop),
            logprobs: p.logprobs.map(|_| true),
            top_logprobs: p.logprobs,
            stream,
            stream_options: stream.then_some(StreamOptions { include_usage: true }),
        }
    }

    async fn send(&self, request: &ChatRequest, stream: bool) -> Result<reqwest::Response, ProviderError> {
        let mut builder = self.client.post(&self.endpoint).json(&self.body(request, stream));
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        let response = builder.send().await.map_err(|e| classify_reqwest_error(&e, self.secret()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after_from_headers(response.headers());
        let body = response.text().await.unwrap_or_default();
        Err(ProviderError::Http {
            status: status.as_u16(),
            retry_after,
            message: redact(&error_snippet(&body), self.secret()),
        })
    }

    async fn complete_once(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let response = self.send(request, false).await?;
        let bytes = response.bytes().await.map_err(|e| classify_reqwest_error(&e, self.secret()))?;
        let wire: WireResponse = serde_json::from_slice(&bytes)
            .map_err(|e| ProviderError::Malformed(format!("chat completion body: {e}")))?;
        let choice = wire
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| ProviderError::Malformed("response has no choices".into()))?;
        let usage = wire.usage.ok_or_else(|| ProviderError::Malformed("response has no usage".into()))?;
        Ok(ChatResponse {
            text: choice.message.content.unwrap_or_default(),
            finish_reason: choice.finish_reason,
            usage: usage.into(),
            model: wire.model,
            logprobs: choice.logprobs.and_then(|l| l.content).map(convert_logprobs),
        })
    }

    async fn complete_streaming(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let response = self.send(request, true).await?;
        let mut body = response.bytes_stream();
        let mut parser = SseParser::new();
        let mut text = String::new();
        let mut finish_reason = None;
        let mut usage = None;
        let mut model = None;
        let mut logprobs: Option<Vec<TokenLogprobs>> = None;
        let mut content_chunks = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| classify_reqwest_error(&e, self.secret()))?;
            for event in parser.push(&chunk) {
                if event.data == "[DONE]" {
                    // Some compatible servers ignore `stream_options`; rather than fail
                    // (and retry forever) estimate: one token per content chunk.
                    let usage = usage.unwrap_or_else(|| {
                        tracing::warn!(model = %self.model, "stream had no usage chunk; estimating");
                        Usage { input_tokens: request.estimated_input_tokens(), output_tokens: content_chunks }
                    });
                    return Ok(ChatResponse { text, finish_reason, usage, model, logprobs });
                }
                let wire: WireChunk = serde_json::from_str(&event.data)
                    .map_err(|e| ProviderError::Malformed(format!("stream chunk: {e}")))?;
                if let Some(error) = wire.error {
                    return Err(ProviderError::Transport(redact(
                        &format!("error event in stream: {error}"),
                        self.secret(),
                    )));
                }
                if wire.model.is_some() {
                    model = wire.model;
                }
                if let Some(u) = wire.usage {
                    usage = Some(u.into());
                }
                for choice in wire.choices {
                    if let Some(content) = choice.delta.and_then(|d| d.content) {
                        content_chunks += u64::from(!content.is_empty());
                        text.push_str(&content);
                    }
                    if choice.finish_reason.is_some() {
                        finish_reason = choice.finish_reason;
                    }
                    if let Some(tokens) = choice.logprobs.and_then(|l| l.content) {
                        logprobs.get_or_insert_with(Vec::new).extend(convert_logprobs(tokens));
                    }
                }
            }
        }
        Err(ProviderError::Truncated("stream closed before `data: [DONE]`".into()))
    }
}

impl Provider for OpenAiProvider {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
        stream: bool,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(async move {
            if stream {
                self.complete_streaming(request).await
            } else {
                self.complete_once(request).await
            }
        })
    }
}

fn convert_logprobs(tokens: Vec<WireTokenLogprob>) -> Vec<TokenLogprobs> {
    tokens
        .into_iter()
        .map(|t| TokenLogprobs {
            token: t.token,
            logprob: t.logprob,
            top: t.top_logprobs.into_iter().map(|a| TopLogprob { token: a.token, logprob: a.logprob }).collect(),
        })
        .collect()
}

// ---- wire types (public so the mock server speaks exactly what the client parses) ----

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
struct WireResponse {
    model: Option<String>,
    choices: Vec<WireChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    finish_reason: Option<String>,
    logprobs: Option<WireLogprobs>,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireLogprobs {
    content: Option<Vec<WireTokenLogprob>>,
}

#[derive(Deserialize)]
struct WireTokenLogprob {
    token: String,
    logprob: f64,
    #[serde(default)]
    top_logprobs: Vec<WireTopLogprob>,
}

#[derive(Deserialize)]
struct WireTopLogprob {
    token: String,
    logprob: f64,
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage { input_tokens: u.prompt_tokens, output_tokens: u.completion_tokens }
    }
}

#[derive(Deserialize)]
struct WireChunk {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    usage: Option<WireUsage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    delta: Option<WireDelta>,
    finish_reason: Option<String>,
    logprobs: Option<WireLogprobs>,
}

#[derive(Deserialize)]
struct WireDelta {
    content: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::config::GenerationParams;

    fn provider(kind: ProviderKind) -> OpenAiProvider {
        let mut t = TargetConfig::new(kind, "m");
        t.base_url = Some("http://127.0.0.1:1/v1/".into());
        OpenAiProvider::new(&t, reqwest::Client::new()).unwrap()
    }

    #[test]
    fn request_body_matches_openai_schema() {
        let req = ChatRequest::new(
            vec![ChatMessage::system("s"), ChatMessage::user("u")],
            GenerationParams {
                temperature: Some(0.0),
                max_tokens: Some(16),
                logprobs: Some(5),
                stop: vec!["\n".into()],
                ..Default::default()
            },
        );
        let p = provider(ProviderKind::OpenaiCompatible);
        assert_eq!(p.endpoint, "http://127.0.0.1:1/v1/chat/completions");
        let v = serde_json::to_value(p.body(&req, true)).unwrap();
        assert_eq!(v["messages"][0]["role"], "system");
        assert_eq!(v["max_tokens"], 16);
        assert_eq!(v["logprobs"], true);
        assert_eq!(v["top_logprobs"], 5);
        assert_eq!(v["stream_options"]["include_usage"], true);
        let v = serde_json::to_value(provider(ProviderKind::Openai).body(&req, false)).unwrap();
        assert_eq!(v["max_completion_tokens"], 16);
        assert!(v.get("max_tokens").is_none() && v.get("stream").is_none());
    }

    #[test]
    fn compatible_target_requires_base_url() {
        let t = TargetConfig::new(ProviderKind::OpenaiCompatible, "m");
        assert!(matches!(OpenAiProvider::new(&t, reqwest::Client::new()), Err(ProviderError::Config(_))));
    }
}
