//! Serving a quantized Qwen2 GGUF (the quickstart's local teacher) with the tokenizer
//! rebuilt from the GGUF's metadata.
//!
//! Labeling sends the same system prompt with every request, so the KV cache of the
//! conversation up to the end of the system message is kept and every request with the
//! same system prompt starts from it (`TANGLE_SERVE_PREFIX_CACHE=0` turns this off, for
//! measuring). Requests are generated one at a time: on a CPU one already uses every core.

use super::quantized_qwen::{KvCache, QuantizedQwen2};
use super::{ChatModel, FinishReason, GenerateRequest, GenerateResult, ModelError};
use crate::model::chat::{decode, render_chatml, Sampling};
use crate::model::gguf_import;
use candle_core::quantized::gguf_file;
use std::path::Path;
use std::sync::Mutex;

pub struct GgufChatModel {
    id: String,
    model: QuantizedQwen2,
    /// The system prefix's token ids and its KV cache.
    prefix: Mutex<Option<(Vec<u32>, KvCache)>>,
    reuse_prefix: bool,
    tokenizer: tokenizers::Tokenizer,
    stop_ids: Vec<u32>,
    context: usize,
}

impl GgufChatModel {
    /// Loads with system-prompt KV reuse on unless `TANGLE_SERVE_PREFIX_CACHE=0`.
    pub fn load(path: &Path) -> Result<GgufChatModel, String> {
        let reuse_prefix = std::env::var("TANGLE_SERVE_PREFIX_CACHE").map(|v| v != "0").unwrap_or(true);
        Self::load_with(path, reuse_prefix)
    }

    pub fn load_with(path: &Path, reuse_prefix: bool) -> Result<GgufChatModel, String> {
        let tokenizer = gguf_import::load_tokenizer(path).map_err(|e| e.to_string())?;
        let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| format!("{}: not a GGUF file: {e}", path.display()))?;
        let model = QuantizedQwen2::from_gguf(content, &mut file)
            .map_err(|e| format!("{}: cannot load the quantized Qwen2 weights: {e}", path.display()))?;
        let context = model.context;
        let stop_ids = ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        let id = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "gguf".into());
        Ok(GgufChatModel { id, model, prefix: Mutex::new(None), reuse_prefix, tokenizer, stop_ids, context })
    }

    /// Token count of the system message (through its `<|im_end|>` and newline), when the
    /// conversation starts with one and goes on after it.
    fn system_prefix_len(&self, messages: &[(String, String)], prompt: &[u32]) -> Option<usize> {
        if messages.first().map(|m| m.0.as_str()) != Some("system") {
            return None;
        }
        let end = prompt.iter().position(|id| Some(id) == self.stop_ids.first())?;
        (end + 2 < prompt.len()).then_some(end + 2)
    }

    /// A cache holding the KV of `prompt[..n]` for the longest reusable `n`.
    fn start(&self, messages: &[(String, String)], prompt: &[u32]) -> candle_core::Result<KvCache> {
        let Some(split) = self.system_prefix_len(messages, prompt).filter(|_| self.reuse_prefix) else {
            return Ok(self.model.new_cache());
        };
        let mut stored = crate::support::lock(&self.prefix);
        if let Some((ids, cache)) = stored.as_ref() {
            if ids.as_slice() == &prompt[..split] {
                return Ok(cache.clone());
            }
        }
        let mut cache = self.model.new_cache();
        self.model.forward(&prompt[..split], &mut cache)?;
        *stored = Some((prompt[..split].to_vec(), cache.clone()));
        Ok(cache)
    }
}

impl ChatModel for GgufChatModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn generate(
        &self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateResult, ModelError> {
        let messages: Vec<(String, String)> =
            request.messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect();
        let prompt = self
            .tokenizer
            .encode(render_chatml(&messages), false)
            .map_err(|e| ModelError::Failed(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec();
        if prompt.len() >= self.context {
            return Err(ModelError::BadRequest(format!(
                "the prompt has {} tokens; the model's context is {}",
                prompt.len(),
                self.context
            )));
        }
        let budget = (request.max_tokens as usize).min(self.context - prompt.len());
        let mut cache = self.start(&messages, &prompt).map_err(|e| ModelError::Failed(e.to_string()))?;
        // The first call gets the whole prompt: skip what the cache already holds.
        let mut skip = cache.len;
        let mut step = |ids: &[u32]| -> candle_core::Result<Vec<f32>> {
            let ids = &ids[skip.min(ids.len().saturating_sub(1))..];
            skip = 0;
            self.model.forward(ids, &mut cache)?.to_vec1::<f32>()
        };
        let sampling =
            Sampling { temperature: request.temperature, top_p: request.top_p, seed: request.seed.unwrap_or(0) };
        let completion =
            decode(&self.tokenizer, &self.stop_ids, &prompt, budget, sampling, &request.stop, on_text, &mut step)
                .map_err(|e| ModelError::Failed(e.to_string()))?;
        Ok(GenerateResult {
            prompt_tokens: completion.prompt_tokens as u32,
            completion_tokens: completion.completion_tokens as u32,
            finish: if completion.hit_limit { FinishReason::Length } else { FinishReason::Stop },
        })
    }
}
