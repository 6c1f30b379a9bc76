//! The client side of the proxy: OpenAI Chat Completions requests in, responses, stream
//! chunks and OpenAI-shaped errors out. Pure conversions, no I/O.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::providers::config::GenerationParams;
use crate::providers::{ChatMessage, ChatRequest, ChatResponse, Role, Usage};
use crate::serve::protocol::{self, ChatCompletionRequest, ErrorBody, Stop};

/// An error for the client, rendered as OpenAI's `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    /// Seconds, sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ClientError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code: None, param: None, message: message.into(), retry_after: None }
    }

    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { param, ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        let mut body = ErrorBody::new(self.kind, self.message.clone(), self.param);
        body.error.code = self.code.map(str::to_string);
        serde_json::to_value(&body).unwrap_or_default()
    }
}

impl IntoResponse for ClientError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert("retry-after", HeaderValue::from(secs));
        }
        response
    }
}

/// A parsed client request.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRequest {
    /// The route alias (`model`).
    pub alias: String,
    pub chat: ChatRequest,
    pub stream: bool,
    pub include_usage: bool,
}

/// Features this proxy does not carry; refused rather than silently dropped, since a client
/// sending tools expects tool calls back.
const UNSUPPORTED: &[&str] = &["tools", "functions", "tool_choice", "function_call", "audio", "modalities"];

pub fn parse_request(body: &[u8]) -> Result<ClientRequest, ClientError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ClientError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    for field in UNSUPPORTED {
        if value.get(*field).is_some_and(|v| !v.is_null()) {
            return Err(ClientError::invalid(format!("`{field}` is not supported by tangle proxy"), None));
        }
    }
    let request: ChatCompletionRequest = serde_json::from_value(value)
        .map_err(|e| ClientError::invalid(format!("invalid chat completion request: {e}"), None))?;
    let alias = match request.model.as_deref() {
        Some(m) if !m.trim().is_empty() => m.to_string(),
        _ => return Err(ClientError::invalid("`model` is required: name one of the proxy's routes", Some("model"))),
    };
    if request.messages.is_empty() {
        return Err(ClientError::invalid("`messages` must not be empty", Some("messages")));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ClientError::invalid(
                    format!("messages[{i}].role `{other}` is not supported (system, developer, user, assistant)"),
                    Some("messages"),
                ))
            }
        };
        let content = m.text(i).map_err(|e| ClientError::invalid(e, Some("messages")))?;
        messages.push(ChatMessage { role, content });
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ClientError::invalid("only `n: 1` is supported", Some("n")));
    }
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    if max_tokens == Some(0) {
        return Err(ClientError::invalid("`max_tokens` must be at least 1", Some("max_tokens")));
    }
    let stop = match request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    // Unset sampling parameters stay unset: providers apply their own defaults, and some
    // refuse `temperature` and `top_p` together.
    let params = GenerationParams {
        temperature: request.temperature,
        max_tokens,
        top_p: request.top_p,
        stop,
        logprobs: None,
        seed: request.seed,
    };
    Ok(ClientRequest {
        alias,
        chat: ChatRequest::new(messages, params),
        stream: request.stream,
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// OpenAI's finish reasons from any upstream protocol's (Anthropic's, Gemini's).
pub fn finish_reason(reason: Option<&str>) -> &str {
    match reason {
        None | Some("end_turn") | Some("stop_sequence") | Some("STOP") => "stop",
        Some("max_tokens") | Some("MAX_TOKENS") => "length",
        Some("tool_use") => "tool_calls",
        Some(other) => other,
    }
}

fn usage_json(u: Usage) -> Value {
    protocol::usage_json(u.input_tokens, u.output_tokens)
}

pub fn completion(id: &str, created: u64, alias: &str, response: &ChatResponse) -> Value {
    let finish = finish_reason(response.finish_reason.as_deref());
    protocol::completion_json(id, created, alias, &response.text, finish, usage_json(response.usage))
}

pub fn usage_chunk(id: &str, created: u64, alias: &str, usage: Usage) -> String {
    protocol::usage_chunk_json(id, created, alias, usage_json(usage))
}

/// The models list: the routes a key may use.
pub fn models<'a>(aliases: impl Iterator<Item = &'a str>) -> Value {
    let data: Vec<Value> =
        aliases.map(|a| json!({"id": a, "object": "model", "created": 0, "owned_by": "tangle-proxy"})).collect();
    json!({"object": "list", "data": data})
}

// ---- the Anthropic Messages API (`POST /v1/messages`) ----

/// Text of an Anthropic `content` (a string, or a list of text blocks).
fn anthropic_text(value: &Value, what: &str) -> Result<String, ClientError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for block in blocks {
                match (block["type"].as_str(), block["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ClientError::invalid(
                            format!("{what}: only text content blocks are supported"),
                            None,
                        ))
                    }
                }
            }
            Ok(text)
        }
        Value::Null => Ok(String::new()),
        _ => Err(ClientError::invalid(format!("{what} must be a string or a list of text blocks"), None)),
    }
}

pub fn parse_messages_request(body: &[u8]) -> Result<ClientRequest, ClientError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ClientError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    for field in ["tools", "tool_choice"] {
        if value.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ClientError::invalid(format!("`{field}` is not supported by tangle proxy"), None));
        }
    }
    let alias = match value["model"].as_str() {
        Some(m) if !m.trim().is_empty() => m.to_string(),
        _ => return Err(ClientError::invalid("`model` is required: name one of the proxy's routes", Some("model"))),
    };
    let max_tokens = match value["max_tokens"].as_u64() {
        Some(n) if n >= 1 => u32::try_from(n).unwrap_or(u32::MAX),
        _ => return Err(ClientError::invalid("`max_tokens` is required and must be at least 1", Some("max_tokens"))),
    };
    let mut messages = Vec::new();
    let system = anthropic_text(&value["system"], "`system`")?;
    if !system.is_empty() {
        messages.push(ChatMessage::system(system));
    }
    let Some(items) = value["messages"].as_array().filter(|m| !m.is_empty()) else {
        return Err(ClientError::invalid("`messages` must be a non-empty list", Some("messages")));
    };
    for (i, m) in items.iter().enumerate() {
        let role = match m["role"].as_str() {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => {
                return Err(ClientError::invalid(
                    format!("messages[{i}].role must be `user` or `assistant`, not {other:?}"),
                    Some("messages"),
                ))
            }
        };
        messages.push(ChatMessage { role, content: anthropic_text(&m["content"], &format!("messages[{i}].content"))? });
    }
    let stop = match &value["stop_sequences"] {
        Value::Array(v) => v.iter().filter_map(|s| s.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    let params = GenerationParams {
        temperature: value["temperature"].as_f64().map(|t| t as f32),
        max_tokens: Some(max_tokens),
        top_p: value["top_p"].as_f64().map(|t| t as f32),
        stop,
        logprobs: None,
        seed: None,
    };
    Ok(ClientRequest {
        alias,
        chat: ChatRequest::new(messages, params),
        stream: value["stream"].as_bool().unwrap_or(false),
        include_usage: false,
    })
}

/// Anthropic's error type for an HTTP status.
pub fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// `{"type": "error", "error": {"type", "message"}}`, the body and the stream event alike.
pub fn anthropic_error(e: &ClientError) -> Value {
    json!({"type": "error", "error": {"type": anthropic_error_type(e.status), "message": e.message}})
}

/// Anthropic's stop reasons from any upstream protocol's finish reasons.
pub fn stop_reason(reason: Option<&str>) -> &str {
    match reason {
        None | Some("stop") | Some("STOP") => "end_turn",
        Some("length") | Some("MAX_TOKENS") => "max_tokens",
        Some(other) => other,
    }
}

pub fn anthropic_message(id: &str, alias: &str, response: &ChatResponse) -> Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": alias,
        "content": [{"type": "text", "text": response.text}],
        "stop_reason": stop_reason(response.finish_reason.as_deref()),
        "stop_sequence": null,
        "usage": {"input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_unset_sampling_unset() {
        let r = parse_request(
            br#"{"model":"m","messages":[{"role":"developer","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"stop":"x","user":"u1"}"#,
        )
        .unwrap();
        assert_eq!(r.alias, "m");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.chat.messages, vec![ChatMessage::system("s"), ChatMessage::user("hi")]);
        assert_eq!(r.chat.params.max_tokens, Some(5));
        assert_eq!(r.chat.params.temperature, None);
        assert_eq!(r.chat.params.top_p, None);
        assert_eq!(r.chat.params.stop, vec!["x".to_string()]);
    }

    #[test]
    fn refusals_are_openai_shaped_and_name_the_parameter() {
        let e = parse_request(br#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body()["error"]["param"], "model");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        let e = parse_request(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{}]}"#).unwrap_err();
        assert!(e.message.contains("`tools` is not supported"), "{}", e.message);
        let e = parse_request(br#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#).unwrap_err();
        assert!(e.message.contains("role `tool`"), "{}", e.message);
        assert!(parse_request(b"{").unwrap_err().message.contains("not valid JSON"));
        let body = ClientError::new(StatusCode::TOO_MANY_REQUESTS, "breaker_open", "m").code("breaker_open").body();
        assert_eq!(body["error"]["code"], "breaker_open");
    }

    #[test]
    fn anthropic_requests_and_errors() {
        let r = parse_messages_request(
            br#"{"model":"m","max_tokens":9,"system":[{"type":"text","text":"s"}],"stream":true,
                "messages":[{"role":"user","content":"hi"},{"role":"assistant","content":[{"type":"text","text":"yo"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.chat.messages,
            vec![ChatMessage::system("s"), ChatMessage::user("hi"), ChatMessage::assistant("yo")]
        );
        assert!(r.stream);
        assert_eq!(r.chat.params.max_tokens, Some(9));
        let e = parse_messages_request(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param, Some("max_tokens"));
        let body = anthropic_error(&ClientError::new(StatusCode::TOO_MANY_REQUESTS, "breaker_open", "stop"));
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(stop_reason(Some("length")), "max_tokens");
    }

    #[test]
    fn finish_reasons_map_to_openai() {
        assert_eq!(finish_reason(Some("end_turn")), "stop");
        assert_eq!(finish_reason(Some("max_tokens")), "length");
        assert_eq!(finish_reason(Some("length")), "length");
        assert_eq!(finish_reason(None), "stop");
    }
}
