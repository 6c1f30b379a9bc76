//! Google's Gemini API: `POST {base}/v1beta/models/{model}:generateContent`, and
//! `:streamGenerateContent?alt=sse` for server-sent events. The key goes in the
//! `x-goog-api-key` header (never the `?key=` query, which would put it in URLs and logs).
//!
//! Roles: system messages become `systemInstruction`, assistant turns are `model`. The
//! seed, stop sequences and top-K logprobs ride in `generationConfig`. A stream has no
//! terminating event of its own: the chunk carrying `finishReason` ends it, so a body that
//! closes before one is a truncated stream.

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{
    post_json, read_json, read_sse, redact, ChatRequest, ChatResponse, DeltaSink, Provider, ProviderError, Role,
    TokenLogprobs, TopLogprob, Usage,
};
use crate::providers::config::{ProviderKind, SecretString, TargetConfig};

const GEMINI_DEFAULT_BASE: &str = "https://generativelanguage.googleapis.com";

pub struct GeminiProvider {
    model: String,
    /// `{base}/v1beta/models/{model}`, to which the method is appended.
    model_url: String,
    api_key: Option<SecretString>,
    client: reqwest::Client,
}

impl GeminiProvider {
    pub fn new(target: &TargetConfig, client: reqwest::Client) -> Result<Self, ProviderError> {
        let base = target.base_url.as_deref().unwrap_or(GEMINI_DEFAULT_BASE).trim_end_matches('/');
        // A model named with its resource prefix (`models/gemini-2.5-flash`) is accepted too.
        let model = target.model.strip_prefix("models/").unwrap_or(&target.model);
        Ok(Self {
            model: target.model.clone(),
            model_url: format!("{base}/v1beta/models/{model}"),
            api_key: target.api_key.clone(),
            client,
        })
    }

    fn secret(&self) -> Option<&str> {
        self.api_key.as_ref().map(SecretString::expose)
    }

    fn body<'a>(&self, request: &'a ChatRequest) -> WireRequest<'a> {
        let system: Vec<WirePart<'a>> =
            request.messages.iter().filter(|m| m.role == Role::System).map(|m| WirePart { text: &m.content }).collect();
        let contents = request
            .messages
            .iter()
            .filter(|m| m.role != Role::System)
            .map(|m| WireContent {
                role: if m.role == Role::Assistant { "model" } else { "user" },
                parts: vec![WirePart { text: &m.content }],
            })
            .collect();
        let p = &request.params;
        WireRequest {
            contents,
            system_instruction: (!system.is_empty()).then_some(WireSystem { parts: system }),
            generation_config: WireGenerationConfig {
                temperature: p.temperature,
                top_p: p.top_p,
                max_output_tokens: p.max_tokens,
                stop_sequences: (!p.stop.is_empty()).then_some(&p.stop),
                seed: p.seed,
                response_logprobs: p.logprobs.map(|_| true),
                logprobs: p.logprobs,
            },
        }
    }

    async fn send(&self, request: &ChatRequest, stream: bool) -> Result<reqwest::Response, ProviderError> {
        let url = if stream {
            format!("{}:streamGenerateContent?alt=sse", self.model_url)
        } else {
            format!("{}:generateContent", self.model_url)
        };
        let mut builder = self.client.post(url);
        if let Some(key) = &self.api_key {
            builder = builder.header("x-goog-api-key", key.expose());
        }
        post_json(builder, &self.body(request), self.secret()).await
    }

    async fn complete_once(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let response = self.send(request, false).await?;
        let wire: WireResponse = read_json(response, self.secret(), "generateContent body").await?;
        if let Some(error) = wire.error {
            return Err(error.into_provider_error(self.secret()));
        }
        let mut reply = ChatResponse::empty();
        let candidate = wire
            .candidates
            .into_iter()
            .next()
            .ok_or_else(|| ProviderError::Malformed("response has no candidates".into()))?;
        let usage =
            wire.usage_metadata.ok_or_else(|| ProviderError::Malformed("response has no usageMetadata".into()))?;
        reply.text = candidate.text();
        reply.finish_reason = candidate.finish_reason.clone();
        reply.logprobs = candidate.logprobs();
        reply.usage = usage.into();
        reply.model = wire.model_version;
        Ok(reply)
    }

    async fn stream(&self, request: &ChatRequest, on_delta: DeltaSink<'_>) -> Result<ChatResponse, ProviderError> {
        let response = self.send(request, true).await?;
        let secret = self.secret();
        let mut reply = ChatResponse::empty();
        read_sse(response, secret, "stream closed before a chunk with `finishReason`", |data| {
            let wire: WireResponse =
                serde_json::from_str(data).map_err(|e| ProviderError::Malformed(format!("stream chunk: {e}")))?;
            if let Some(error) = wire.error {
                return Err(error.into_provider_error(secret));
            }
            if wire.model_version.is_some() {
                reply.model = wire.model_version;
            }
            // Every chunk carries the usage so far; the last one's is the total.
            if let Some(usage) = wire.usage_metadata {
                reply.usage = usage.into();
            }
            let Some(candidate) = wire.candidates.into_iter().next() else { return Ok(false) };
            let text = candidate.text();
            if !text.is_empty() {
                on_delta(&text);
                reply.text.push_str(&text);
            }
            if let Some(tokens) = candidate.logprobs() {
                reply.logprobs.get_or_insert_with(Vec::new).extend(tokens);
            }
            if candidate.finish_reason.is_some() {
                reply.finish_reason = candidate.finish_reason;
                return Ok(true);
            }
            Ok(false)
        })
        .await?;
        Ok(reply)
    }
}

impl Provider for GeminiProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Gemini
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn complete_once<'a>(&'a self, request: &'a ChatRequest) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(GeminiProvider::complete_once(self, request))
    }

    fn stream<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_delta: DeltaSink<'a>,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(GeminiProvider::stream(self, request, on_delta))
    }
}

// ---- wire types ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireRequest<'a> {
    contents: Vec<WireContent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<WireSystem<'a>>,
    generation_config: WireGenerationConfig<'a>,
}

#[derive(Serialize)]
struct WireContent<'a> {
    role: &'static str,
    parts: Vec<WirePart<'a>>,
}

#[derive(Serialize)]
struct WireSystem<'a> {
    parts: Vec<WirePart<'a>>,
}

#[derive(Serialize)]
struct WirePart<'a> {
    text: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireGenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<u8>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    #[serde(default)]
    candidates: Vec<WireCandidate>,
    usage_metadata: Option<WireUsage>,
    model_version: Option<String>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate {
    content: Option<WireCandidateContent>,
    finish_reason: Option<String>,
    logprobs_result: Option<WireLogprobsResult>,
}

impl WireCandidate {
    fn text(&self) -> String {
        self.content.iter().flat_map(|c| &c.parts).filter_map(|p| p.text.as_deref()).collect()
    }

    /// The chosen token of each position with its top alternatives, in OpenAI's shape.
    fn logprobs(&self) -> Option<Vec<TokenLogprobs>> {
        let result = self.logprobs_result.as_ref()?;
        Some(
            result
                .chosen_candidates
                .iter()
                .enumerate()
                .map(|(i, chosen)| TokenLogprobs {
                    token: chosen.token.clone(),
                    logprob: chosen.log_probability,
                    top: result
                        .top_candidates
                        .get(i)
                        .map(|top| {
                            top.candidates
                                .iter()
                                .map(|c| TopLogprob { token: c.token.clone(), logprob: c.log_probability })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect(),
        )
    }
}

#[derive(Deserialize)]
struct WireCandidateContent {
    #[serde(default)]
    parts: Vec<WireResponsePart>,
}

#[derive(Deserialize)]
struct WireResponsePart {
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireLogprobsResult {
    #[serde(default)]
    top_candidates: Vec<WireTopCandidates>,
    #[serde(default)]
    chosen_candidates: Vec<WireLogprobCandidate>,
}

#[derive(Deserialize)]
struct WireTopCandidates {
    #[serde(default)]
    candidates: Vec<WireLogprobCandidate>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireLogprobCandidate {
    #[serde(default)]
    token: String,
    #[serde(default)]
    log_probability: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Usage {
        Usage { input_tokens: u.prompt_token_count, output_tokens: u.candidates_token_count }
    }
}

/// Google's error object (`{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", …}}`), as
/// a body or as an in-stream event.
#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
}

impl WireError {
    /// In a stream, the status code is the error's own: a 429 or 503 mid-stream is retried
    /// like one outside it.
    fn into_provider_error(self, secret: Option<&str>) -> ProviderError {
        let status = if self.code >= 400 { self.code } else { 500 };
        let message = redact(&format!("{} {}", self.status, self.message), secret);
        ProviderError::Http { status, retry_after: None, message: message.trim().to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::config::GenerationParams;
    use crate::providers::ChatMessage;

    #[test]
    fn system_becomes_the_instruction_assistant_is_model_and_params_go_in_generation_config() {
        let mut t = TargetConfig::new(ProviderKind::Gemini, "models/gemini-2.5-flash");
        t.base_url = Some("http://127.0.0.1:1/".into());
        let p = GeminiProvider::new(&t, reqwest::Client::new()).unwrap();
        assert_eq!(p.model_url, "http://127.0.0.1:1/v1beta/models/gemini-2.5-flash");
        let req = ChatRequest::new(
            vec![ChatMessage::system("be brief"), ChatMessage::user("hi"), ChatMessage::assistant("hello")],
            GenerationParams {
                temperature: Some(0.0),
                max_tokens: Some(8),
                stop: vec!["\n".into()],
                seed: Some(3),
                logprobs: Some(2),
                ..Default::default()
            },
        );
        let v = serde_json::to_value(p.body(&req)).unwrap();
        assert_eq!(v["systemInstruction"]["parts"][0]["text"], "be brief");
        assert_eq!(v["contents"][0]["role"], "user");
        assert_eq!(v["contents"][1]["role"], "model");
        assert_eq!(v["contents"].as_array().unwrap().len(), 2);
        let g = &v["generationConfig"];
        assert_eq!(g["maxOutputTokens"], 8);
        assert_eq!(g["stopSequences"][0], "\n");
        assert_eq!(g["seed"], 3);
        assert_eq!(g["responseLogprobs"], true);
        assert_eq!(g["logprobs"], 2);
        assert!(g.get("topP").is_none());
    }

    #[test]
    fn an_in_stream_error_keeps_its_status_and_loses_the_key() {
        let e = WireError { code: 429, status: "RESOURCE_EXHAUSTED".into(), message: "quota for key k-1".into() };
        let err = e.into_provider_error(Some("k-1"));
        assert_eq!(
            err,
            ProviderError::Http {
                status: 429,
                retry_after: None,
                message: "RESOURCE_EXHAUSTED quota for key ***".into()
            }
        );
        assert!(err.is_retryable());
    }
}
