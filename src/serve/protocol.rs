//! The OpenAI wire format, as `tangle serve` speaks it: Chat Completions (with `n`,
//! `seed`, `logprobs`/`top_logprobs`, structured output) and the legacy Completions with
//! vLLM's prompt scoring (`echo` + `logprobs`). The response shapes (`completion_json`,
//! `chunk_json`, `usage_chunk_json`) are shared with the proxy, so both servers answer
//! OpenAI clients with the same bodies. No I/O here: requests in, plans and JSON out.

use super::{GenerateRequest, GenerateResult};
use crate::model::engine::{Grammar, ModelInfo, TokenLogprob};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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
    #[serde(default)]
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub response_format: Option<Value>,
    /// vLLM's spelling of a choice among fixed strings (`extra_body`).
    pub guided_choice: Option<Vec<String>>,
    pub guided_regex: Option<String>,
    pub guided_json: Option<Value>,
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
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

impl WireMessage {
    /// The message's text: a plain string, or its `text` parts joined. `Err` names the
    /// message (`messages[i]`) when it holds a part of another kind (images, audio), which
    /// tangle refuses rather than silently drop. The proxy and `tangle serve` share this.
    pub fn text(self, index: usize) -> Result<String, String> {
        match self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t),
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => Ok(t),
                    _ => Err(format!("messages[{index}]: only text content parts are supported")),
                })
                .collect(),
        }
    }
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

/// A checked chat request: what to generate and how to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPlan {
    pub generate: GenerateRequest,
    pub n: u32,
    /// `Some(k)`: each token's logprob and k alternatives.
    pub logprobs: Option<u32>,
    pub grammar: Option<Grammar>,
    pub logit_bias: Vec<(u32, f32)>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Most alternatives per position, as OpenAI allows.
pub const MAX_TOP_LOGPROBS: u32 = 20;

type Invalid = (String, &'static str);

impl ChatCompletionRequest {
    /// Checks the request. `Err` is (message, offending parameter).
    pub fn validate(self, default_max_tokens: u32) -> Result<ChatPlan, Invalid> {
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
            let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
            let content = m.text(i).map_err(|e| (e, "messages"))?;
            messages.push(Message { role, content });
        }
        let n = self.n.unwrap_or(1);
        let (temperature, top_p) = sampling(self.temperature, self.top_p)?;
        let max_tokens = self.max_completion_tokens.or(self.max_tokens).unwrap_or(default_max_tokens);
        if max_tokens == 0 {
            return Err(("`max_tokens` must be at least 1".into(), "max_tokens"));
        }
        let stop = stop_list(self.stop)?;
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(k)) if k > MAX_TOP_LOGPROBS => {
                return Err((format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}"), "top_logprobs"))
            }
            (false, Some(_)) => return Err(("`top_logprobs` needs `logprobs: true`".into(), "top_logprobs")),
            (true, k) => Some(k.unwrap_or(0)),
            (false, None) => None,
        };
        let grammar = grammar(self.response_format, self.guided_choice, self.guided_regex, self.guided_json)?;
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        Ok(ChatPlan {
            generate: GenerateRequest { messages, max_tokens, temperature, top_p, stop, seed: self.seed },
            n,
            logprobs,
            grammar,
            logit_bias: logit_bias(self.logit_bias)?,
            stream: self.stream,
            include_usage,
        })
    }
}

/// OpenAI's `logit_bias`: token ids (as JSON object keys) to a bias in [-100, 100].
fn logit_bias(map: Option<std::collections::HashMap<String, f32>>) -> Result<Vec<(u32, f32)>, Invalid> {
    let mut out = Vec::new();
    for (key, bias) in map.unwrap_or_default() {
        let id = key.parse::<u32>().map_err(|_| {
            (format!("logit_bias: `{key}` is not a token id (keys are token ids as strings)"), "logit_bias")
        })?;
        if !(-100.0..=100.0).contains(&bias) {
            return Err((format!("logit_bias: {bias} for token {id} is outside [-100, 100]"), "logit_bias"));
        }
        out.push((id, bias));
    }
    out.sort_by_key(|&(id, _)| id);
    Ok(out)
}

fn sampling(temperature: Option<f32>, top_p: Option<f32>) -> Result<(f32, f32), Invalid> {
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(("`temperature` must be between 0 and 2".into(), "temperature"));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(("`top_p` must be in (0, 1]".into(), "top_p"));
    }
    Ok((temperature, top_p))
}

fn stop_list(stop: Option<Stop>) -> Result<Vec<String>, Invalid> {
    match stop {
        None => Ok(Vec::new()),
        Some(Stop::One(s)) => Ok(vec![s]),
        Some(Stop::Many(v)) if v.len() <= 4 => Ok(v),
        Some(Stop::Many(_)) => Err(("at most 4 `stop` sequences are allowed".into(), "stop")),
    }
}

/// The output constraint a request asks for: OpenAI's `response_format` (`json_schema`,
/// `json_object`, `text`), or vLLM's `guided_choice` / `guided_regex` / `guided_json`.
fn grammar(
    response_format: Option<Value>,
    choice: Option<Vec<String>>,
    regex: Option<String>,
    json_schema: Option<Value>,
) -> Result<Option<Grammar>, Invalid> {
    let mut asked = Vec::new();
    if let Some(format) = response_format {
        match format["type"].as_str() {
            Some("text") => {}
            Some("json_object") => asked.push(Grammar::JsonObject),
            Some("json_schema") => match format["json_schema"]["schema"].clone() {
                Value::Object(schema) => asked.push(Grammar::JsonSchema(Value::Object(schema))),
                _ => {
                    return Err((
                        "`response_format.json_schema.schema` must be a JSON Schema object".into(),
                        "response_format",
                    ))
                }
            },
            _ => {
                return Err((
                    "`response_format.type` must be `text`, `json_object` or `json_schema`".into(),
                    "response_format",
                ))
            }
        }
    }
    if let Some(options) = choice {
        if options.is_empty() {
            return Err(("`guided_choice` needs at least one option".into(), "guided_choice"));
        }
        asked.push(Grammar::Choice(options));
    }
    if let Some(pattern) = regex {
        asked.push(Grammar::Regex(pattern));
    }
    if let Some(schema) = json_schema {
        asked.push(Grammar::JsonSchema(schema));
    }
    match asked.len() {
        0 | 1 => Ok(asked.pop()),
        _ => Err(("ask for one output format: `response_format` or one `guided_*` option".into(), "response_format")),
    }
}

/// `/v1/completions`: a raw prompt, optionally scored (`echo` with `logprobs`).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub echo: bool,
    pub logprobs: Option<u32>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_regex: Option<String>,
    pub guided_json: Option<Value>,
    pub response_format: Option<Value>,
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
}

/// A prompt as text or as token ids (one prompt per request).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionPlan {
    pub prompt: PromptInput,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub n: u32,
    pub echo: bool,
    pub logprobs: Option<u32>,
    pub grammar: Option<Grammar>,
    pub logit_bias: Vec<(u32, f32)>,
    pub stream: bool,
    pub include_usage: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// OpenAI's default `max_tokens` for completions.
const COMPLETION_MAX_TOKENS: u32 = 16;

impl CompletionRequest {
    pub fn validate(self) -> Result<CompletionPlan, Invalid> {
        let prompt = match self.prompt {
            Prompt::Text(t) => PromptInput::Text(t),
            Prompt::Texts(mut v) if v.len() == 1 => PromptInput::Text(v.remove(0)),
            Prompt::Texts(_) => return Err(("send one prompt per request".into(), "prompt")),
            Prompt::Tokens(ids) => PromptInput::Tokens(ids),
        };
        let (temperature, top_p) = sampling(self.temperature, self.top_p)?;
        let max_tokens = self.max_tokens.unwrap_or(COMPLETION_MAX_TOKENS);
        if max_tokens == 0 && !self.echo {
            return Err(("`max_tokens: 0` is only meaningful with `echo: true`".into(), "max_tokens"));
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err((format!("`logprobs` must be at most {MAX_TOP_LOGPROBS}"), "logprobs"));
        }
        Ok(CompletionPlan {
            prompt,
            max_tokens,
            temperature,
            top_p,
            stop: stop_list(self.stop)?,
            seed: self.seed,
            n: self.n.unwrap_or(1),
            echo: self.echo,
            logprobs: self.logprobs,
            grammar: grammar(self.response_format, self.guided_choice, self.guided_regex, self.guided_json)?,
            logit_bias: logit_bias(self.logit_bias)?,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        })
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

pub fn usage(r: &GenerateResult) -> Value {
    usage_json(r.prompt_tokens.into(), r.completion_tokens.into())
}

/// A whole `chat.completion` with one assistant choice.
pub fn completion_json(id: &str, created: u64, model: &str, text: &str, finish_reason: &str, usage: Value) -> Value {
    chat_completion_json(id, created, model, vec![chat_choice(0, text, finish_reason, None)], usage)
}

/// One `chat.completion.chunk` with a delta (or `{}`) and an optional finish reason.
pub fn chunk_json(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> String {
    choice_chunk_json(id, created, model, 0, delta, finish, None)
}

/// The last chunk of a stream asked for `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk_json(id: &str, created: u64, model: &str, usage: Value) -> String {
    json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage })
        .to_string()
}

/// One chat choice with its message, finish reason and (when asked) logprobs.
pub fn chat_choice(index: u32, text: &str, finish: &str, logprobs: Option<Value>) -> Value {
    json!({
        "index": index,
        "message": { "role": "assistant", "content": text },
        "finish_reason": finish,
        "logprobs": logprobs.map_or(Value::Null, |content| json!({ "content": content, "refusal": null })),
    })
}

/// A whole `chat.completion` with these choices.
pub fn chat_completion_json(id: &str, created: u64, model: &str, choices: Vec<Value>, usage: Value) -> Value {
    json!({ "id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": usage })
}

/// A `chat.completion.chunk` for one choice.
pub fn choice_chunk_json(
    id: &str,
    created: u64,
    model: &str,
    index: u32,
    delta: Value,
    finish: Option<&str>,
    logprobs: Option<Value>,
) -> String {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": index,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": logprobs.map_or(Value::Null, |content| json!({ "content": content, "refusal": null })),
        }],
    })
    .to_string()
}

/// One entry of chat `logprobs.content`: the token, its logprob and bytes, and the
/// alternatives.
pub fn chat_token_logprob(info: &ModelInfo, t: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| json!({ "token": info.token_text(id), "logprob": logprob, "bytes": info.token_bytes(id) });
    let mut value = entry(t.token, t.logprob);
    value["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
    value
}

/// Legacy completions' `logprobs` object over a list of scored tokens (`None`: the first
/// prompt token, which nothing predicts). `text_offset` counts bytes of the choice's text.
pub fn completion_logprobs(info: &ModelInfo, tokens: &[(u32, Option<&TokenLogprob>)], first_offset: usize) -> Value {
    let mut offset = first_offset;
    let mut texts = Vec::new();
    let mut logprobs = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for (id, scored) in tokens {
        let text = info.token_text(*id);
        offsets.push(offset);
        offset += text.len();
        texts.push(Value::from(text));
        match scored {
            Some(t) => {
                logprobs.push(Value::from(t.logprob));
                let top: serde_json::Map<String, Value> =
                    t.top.iter().map(|&(alt, lp)| (info.token_text(alt), Value::from(lp))).collect();
                tops.push(Value::Object(top));
            }
            None => {
                logprobs.push(Value::Null);
                tops.push(Value::Null);
            }
        }
    }
    json!({ "tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets })
}

/// One `text_completion` choice.
pub fn text_choice(index: u32, text: &str, finish: Option<&str>, logprobs: Option<Value>) -> Value {
    json!({ "index": index, "text": text, "finish_reason": finish, "logprobs": logprobs.unwrap_or(Value::Null) })
}

pub fn text_completion_json(id: &str, created: u64, model: &str, choices: Vec<Value>, usage: Option<Value>) -> Value {
    let mut body =
        json!({ "id": id, "object": "text_completion", "created": created, "model": model, "choices": choices });
    if let Some(usage) = usage {
        body["usage"] = usage;
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<ChatPlan, Invalid> {
        serde_json::from_value::<ChatCompletionRequest>(body).unwrap().validate(16)
    }

    #[test]
    fn chat_requests_carry_logprobs_n_and_formats() {
        let plan = chat(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "n": 3, "seed": 7, "logprobs": true, "top_logprobs": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        }))
        .unwrap();
        assert_eq!((plan.n, plan.logprobs, plan.generate.seed), (3, Some(5), Some(7)));
        assert_eq!(plan.grammar, Some(Grammar::JsonSchema(json!({"type": "object"}))));
        let plan = chat(json!({"messages": [{"role": "user", "content": "hi"}], "guided_choice": ["a", "b"]})).unwrap();
        assert_eq!(plan.grammar, Some(Grammar::Choice(vec!["a".into(), "b".into()])));
    }

    #[test]
    fn bad_chat_options_name_their_parameter() {
        let base = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            chat(body).unwrap_err().1
        };
        assert_eq!(base(json!({"logprobs": true, "top_logprobs": 21})), "top_logprobs");
        assert_eq!(base(json!({"top_logprobs": 2})), "top_logprobs");
        assert_eq!(base(json!({"response_format": {"type": "yaml"}})), "response_format");
        assert_eq!(base(json!({"guided_choice": [], "response_format": {"type": "text"}})), "guided_choice");
        assert_eq!(base(json!({"guided_choice": ["a"], "guided_regex": "b"})), "response_format");
        assert_eq!(base(json!({"max_tokens": 0})), "max_tokens");
        assert_eq!(base(json!({"logit_bias": {"eos": -100}})), "logit_bias");
        assert_eq!(base(json!({"logit_bias": {"7": -101}})), "logit_bias");
    }

    #[test]
    fn logit_bias_is_read_as_token_ids() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"9": 5, "2": -100}});
        assert_eq!(chat(body).unwrap().logit_bias, vec![(2, -100.0), (9, 5.0)]);
    }

    #[test]
    fn completions_allow_scoring_only_with_echo() {
        let plan = |body: Value| serde_json::from_value::<CompletionRequest>(body).unwrap().validate();
        let scored = plan(json!({"prompt": "a b", "echo": true, "logprobs": 1, "max_tokens": 0})).unwrap();
        assert_eq!((scored.echo, scored.logprobs, scored.max_tokens), (true, Some(1), 0));
        assert_eq!(plan(json!({"prompt": "a", "max_tokens": 0})).unwrap_err().1, "max_tokens");
        assert_eq!(plan(json!({"prompt": [1, 2, 3]})).unwrap().prompt, PromptInput::Tokens(vec![1, 2, 3]));
        assert_eq!(plan(json!({"prompt": "a"})).unwrap().max_tokens, 16);
    }
}
