//! Chat inference with a (trained) student directory: ChatML prompts, greedy or seeded
//! sampling with a KV cache, text streamed as it completes. Used by the eval stage and by
//! `tangle serve`, so both produce the same text for the same request.

use super::engine::{self, text::TextStream};
use super::loading::{load_model, FinetuneMode, LoadError, LoadedModel};
use super::qwen::{KvCache, QwenModel};
use super::tokenizer::{ChatTokenizer, END_OF_TEXT, IM_END, IM_START};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Written next to an exported student: what the model was trained with and must be
/// prompted with.
pub const STUDENT_META_FILE: &str = "tangle_student.json";

/// Written next to an exported student for Hugging Face tools: the chat template tangle
/// trained with (and the end-of-turn and padding tokens).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StudentMeta {
    /// The system prompt used in training; applied when a request brings none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub max_seq_len: usize,
    /// A quantized copy of the weights in the same directory, which `tangle serve` prefers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized: Option<QuantizedCopy>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantizedCopy {
    /// File name, e.g. `model-q8_0.gguf`.
    pub file: String,
    /// `q8_0` or `q4_k`.
    pub format: String,
}

/// A Jinja chat template that renders exactly what [`render_chatml`] does for
/// [`StudentChat::with_default_system`]'s messages, so transformers' `apply_chat_template`
/// and llama.cpp prompt the student as it was trained (Qwen's own template would add its
/// default system prompt, which a student trained without one has never seen).
pub fn chat_template(default_system: Option<&str>) -> String {
    let mut template = String::new();
    if let Some(system) = default_system {
        template.push_str(&format!(
            "{{%- if not messages or messages[0]['role'] != 'system' %}}{{{{- '{IM_START}system\\n' + {} + '{IM_END}\\n' }}}}{{%- endif %}}",
            jinja_string(system)
        ));
    }
    template.push_str(&format!(
        "{{%- for message in messages %}}{{{{- '{IM_START}' + message['role'] + '\\n' + message['content'] + '{IM_END}\\n' }}}}{{%- endfor %}}"
    ));
    template.push_str(&format!("{{%- if add_generation_prompt %}}{{{{- '{IM_START}assistant\\n' }}}}{{%- endif %}}"));
    template
}

/// A single-quoted Jinja string literal.
fn jinja_string(text: &str) -> String {
    let mut out = String::from("'");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Writes `tangle_student.json` and `tokenizer_config.json` into an exported student's
/// directory.
pub fn write_student_files(dir: &std::path::Path, meta: &StudentMeta) -> std::io::Result<()> {
    let to_io = |e: serde_json::Error| std::io::Error::other(e.to_string());
    std::fs::write(dir.join(STUDENT_META_FILE), serde_json::to_string_pretty(meta).map_err(to_io)?)?;
    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": chat_template(meta.system.as_deref()),
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "bos_token": null,
        "unk_token": null,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": meta.max_seq_len,
    });
    std::fs::write(dir.join(TOKENIZER_CONFIG_FILE), serde_json::to_string_pretty(&tokenizer_config).map_err(to_io)?)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Stopped by the token limit rather than an end token or stop string.
    pub hit_limit: bool,
}

pub struct StudentChat {
    model: QwenModel,
    tokenizer: ChatTokenizer,
    stop_ids: Vec<u32>,
    pub meta: StudentMeta,
}

/// `messages` with `system` put first unless they open with a system message of their own
/// (what [`chat_template`] renders too).
pub fn with_default_system(system: Option<&str>, messages: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let (Some(system), false) = (system, messages.first().is_some_and(|(r, _)| r == "system")) {
        out.push(("system".to_string(), system.to_string()));
    }
    out.extend(messages.iter().cloned());
    out
}

/// ChatML text for a conversation, ending with the assistant's turn opened.
pub fn render_chatml(messages: &[(String, String)]) -> String {
    let mut text = String::new();
    for (role, content) in messages {
        text.push_str(&format!("{IM_START}{role}\n{content}{IM_END}\n"));
    }
    text.push_str(&format!("{IM_START}assistant\n"));
    text
}

impl StudentChat {
    pub fn load(source: &str, device: &Device) -> Result<StudentChat, LoadError> {
        let LoadedModel { model, tokenizer, dir, config, .. } = load_model(source, &FinetuneMode::Frozen, 0, device)?;
        let meta = Self::read_meta(&dir)?.unwrap_or(StudentMeta {
            system: None,
            max_seq_len: config.max_positions(),
            quantized: None,
        });
        Ok(Self::new(model, tokenizer, meta))
    }

    /// `tangle_student.json` of an exported student; `None` for other model directories.
    pub fn read_meta(dir: &std::path::Path) -> Result<Option<StudentMeta>, LoadError> {
        let meta_path = dir.join(STUDENT_META_FILE);
        match std::fs::read_to_string(&meta_path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| LoadError::Read { path: meta_path.display().to_string(), message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LoadError::Read { path: meta_path.display().to_string(), message: e.to_string() }),
        }
    }

    pub fn new(model: QwenModel, tokenizer: ChatTokenizer, meta: StudentMeta) -> StudentChat {
        let mut stop_ids = vec![tokenizer.im_end_id()];
        if let Some(eot) = tokenizer.inner().token_to_id(END_OF_TEXT) {
            stop_ids.push(eot);
        }
        StudentChat { model, tokenizer, stop_ids, meta }
    }

    pub fn model(&self) -> &QwenModel {
        &self.model
    }

    /// The messages with the trained system prompt added when they have none.
    pub fn with_default_system(&self, messages: &[(String, String)]) -> Vec<(String, String)> {
        with_default_system(self.meta.system.as_deref(), messages)
    }

    /// Generates a reply. `on_text` gets each new piece of complete UTF-8 text and returns
    /// `false` to stop early.
    pub fn complete(
        &self,
        messages: &[(String, String)],
        max_new_tokens: usize,
        sampling: Sampling,
        stop: &[String],
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Completion, LoadError> {
        let prompt = self.tokenizer.encode(&render_chatml(messages))?;
        let max_positions = self.model.config().max_positions();
        if prompt.len() >= max_positions {
            return Err(LoadError::Model(super::qwen::ModelError::TooLong { len: prompt.len(), max: max_positions }));
        }
        let budget = max_new_tokens.min(max_positions - prompt.len());
        let device = self.model.device().clone();
        let mut cache = KvCache::new();
        let mut step = |ids: &[u32]| -> candle_core::Result<Vec<f32>> {
            let input = Tensor::from_slice(ids, (1, ids.len()), &device)?;
            let logits = self
                .model
                .forward_cached_last(&input, &mut cache)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            logits.get(0)?.to_vec1::<f32>()
        };
        Ok(decode(self.tokenizer.inner(), &self.stop_ids, &prompt, budget, sampling, stop, on_text, &mut step)?)
    }
}

/// The one-request candle generation loop, the reference the engine is checked against:
/// `step` feeds token ids (the prompt first, then one token at a time) and returns the last
/// position's logits. Text reaches `on_text` through the engine's [`TextStream`] (complete
/// UTF-8 only, stop strings cut and never streamed).
#[allow(clippy::too_many_arguments)]
pub fn decode(
    tokenizer: &tokenizers::Tokenizer,
    stop_ids: &[u32],
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: Sampling,
    stop: &[String],
    on_text: &mut dyn FnMut(&str) -> bool,
    step: &mut dyn FnMut(&[u32]) -> candle_core::Result<Vec<f32>>,
) -> Result<Completion, DecodeError> {
    let settings = engine::sampling::Sampling {
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        seed: Some(sampling.seed),
    };
    let mut sampler = engine::sampling::Sampler::new(settings, 0);
    let detokenize = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| e.to_string());
    let mut stream = TextStream::new(stop);
    let mut hit_limit = true;
    let mut input: Vec<u32> = prompt.to_vec();
    for _ in 0..max_new_tokens {
        let logits = step(&input)?;
        let next = sampler.pick(&logits, None);
        if stop_ids.contains(&next) {
            hit_limit = false;
            break;
        }
        let text = stream.push(next, &detokenize).map_err(DecodeError::Tokenizer)?;
        if text.stopped {
            if !text.piece.is_empty() {
                on_text(&text.piece);
            }
            hit_limit = false;
            break;
        }
        if !text.piece.is_empty() && !on_text(&text.piece) {
            hit_limit = false;
            break;
        }
        input = vec![next];
    }
    let rest = stream.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Completion {
        text: stream.text().to_string(),
        prompt_tokens: prompt.len(),
        completion_tokens: stream.tokens(),
        hit_limit,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl From<DecodeError> for LoadError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Candle(c) => LoadError::Candle(c),
            DecodeError::Tokenizer(m) => LoadError::Tokenizer(super::tokenizer::TokenizerError::Encode(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `decode` with a script of byte tokens (the fixture vocabulary's first 256 ids).
    fn run(script: &str, stop: &[&str]) -> (String, Vec<String>) {
        let (json, _) = super::super::fixture::tokenizer_json();
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
        let bytes: Vec<u8> = script.bytes().collect();
        let mut i = 0;
        let mut step = |_: &[u32]| -> candle_core::Result<Vec<f32>> {
            let mut logits = vec![0f32; 300];
            logits[bytes.get(i).copied().unwrap_or(b'.') as usize] = 1.0;
            i += 1;
            Ok(logits)
        };
        let mut pieces = Vec::new();
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let completion = decode(
            &tokenizer,
            &[],
            &[1],
            bytes.len(),
            Sampling::GREEDY,
            &stop,
            &mut |p| {
                pieces.push(p.to_string());
                true
            },
            &mut step,
        )
        .unwrap();
        (completion.text, pieces)
    }

    /// The template shipped in tokenizer_config.json and the GGUF renders, in a Jinja engine,
    /// exactly the prompt tangle trains and serves with.
    #[test]
    fn chat_template_renders_what_tangle_prompts_with() {
        let conversations: Vec<Vec<(&str, &str)>> = vec![
            vec![("user", "Where is order #1042?")],
            vec![("system", "Own system.\nTwo lines, 'quoted' \\ back"), ("user", "hi")],
            vec![("user", "first"), ("assistant", "billing"), ("user", "second")],
        ];
        for default_system in [None, Some("Route the message.\nReply with 'one' word \\ only.")] {
            let source = chat_template(default_system);
            let mut env = minijinja::Environment::new();
            env.add_template("chat", &source).unwrap();
            let template = env.get_template("chat").unwrap();
            for conversation in &conversations {
                let messages: Vec<(String, String)> =
                    conversation.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect();
                let rendered = template
                    .render(minijinja::context! {
                        messages => conversation.iter().map(|(r, c)| minijinja::context! { role => r, content => c }).collect::<Vec<_>>(),
                        add_generation_prompt => true,
                    })
                    .unwrap();
                assert_eq!(rendered, render_chatml(&with_default_system(default_system, &messages)));
            }
        }
    }

    #[test]
    fn multi_character_stop_strings_are_never_streamed() {
        let (text, pieces) = run("ab}}cd", &["}}"]);
        assert_eq!(text, "ab");
        assert_eq!(pieces.concat(), "ab");
        // A tail that only looked like a stop string is released.
        let (text, pieces) = run("a}b", &["}}"]);
        assert_eq!(text, "a}b");
        assert_eq!(pieces.concat(), "a}b");
    }
}
