//! OpenAI Chat Completions (`POST {base}/chat/completions`), for api.openai.com and any
//! OpenAI-compatible server (vLLM, llama.cpp server, Ollama's `/v1`).

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{
    post_json, read_json, read_sse, redact, ChatMessage, ChatRequest, ChatResponse, DeltaSink, Provider, ProviderError,
    TokenLogprobs, TopLogprob, Usage,
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
            seed: p.seed,
            stream,
            stream_options: stream.then_some(StreamOptions { include_usage: true }),
        }
    }

    async fn send(&self, request: &ChatRequest, stream: bool) -> Result<reqwest::Response, ProviderError> {
        let mut builder = self.client.post(&self.endpoint);
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        post_json(builder, &self.body(request, stream), self.secret()).await
    }

    async fn complete_once(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let response = self.send(request, false).await?;
        let wire: WireResponse = read_json(response, self.secret(), "chat completion body").await?;
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

    async fn stream(&self, request: &ChatRequest, on_delta: DeltaSink<'_>) -> Result<ChatResponse, ProviderError> {
        let response = self.send(request, true).await?;
        let secret = self.secret();
        let mut reply = ChatResponse::empty();
        let mut usage = None;
        let mut content_chunks = 0u64;
        read_sse(response, secret, "stream closed before `data: [DONE]`", |data| {
            if data.trim() == "[DONE]" {
                // Some compatible servers ignore `stream_options`; rather than fail (and
                // retry forever) estimate: one token per content chunk.
                reply.usage = usage.unwrap_or_else(|| {
                    tracing::warn!(model = %self.model, "stream had no usage chunk; estimating");
                    Usage { input_tokens: request.estimated_input_tokens(), output_tokens: content_chunks }
                });
                return Ok(true);
            }
            let wire: WireChunk =
                serde_json::from_str(data).map_err(|e| ProviderError::Malformed(format!("stream chunk: {e}")))?;
            if let Some(error) = wire.error {
                return Err(ProviderError::Transport(redact(&format!("error event in stream: {error}"), secret)));
            }
            if wire.model.is_some() {
                reply.model = wire.model;
            }
            if let Some(u) = wire.usage {
                usage = Some(u.into());
            }
            // One choice is ever requested (`n` is not sent).
            if let Some(choice) = wire.choices.into_iter().next() {
                if let Some(content) = choice.delta.and_then(|d| d.content).filter(|c| !c.is_empty()) {
                    content_chunks += 1;
                    on_delta(&content);
                    reply.text.push_str(&content);
                }
                if choice.finish_reason.is_some() {
                    reply.finish_reason = choice.finish_reason;
                }
                if let Some(tokens) = choice.logprobs.and_then(|l| l.content) {
                    reply.logprobs.get_or_insert_with(Vec::new).extend(convert_logprobs(tokens));
                }
            }
            Ok(false)
        })
        .await?;
        Ok(reply)
    }
}

impl Provider for OpenAiProvider {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn complete_once<'a>(&'a self, request: &'a ChatRequest) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(OpenAiProvider::complete_once(self, request))
    }

    fn stream<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_delta: DeltaSink<'a>,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(OpenAiProvider::stream(self, request, on_delta))
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
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
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
