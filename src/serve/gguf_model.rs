//! Serving a quantized Qwen2 GGUF: the quickstart's local teacher (a llama.cpp GGUF, with
//! the tokenizer rebuilt from its metadata) and quantized students (`model-q8_0.gguf` in an
//! exported directory, with the directory's own tokenizer.json and default system prompt).
//!
//! Consecutive requests usually share a prefix: labeling sends the same system prompt
//! every time, and every ChatML prompt opens with `<|im_start|>user\n`. The KV cache of
//! the last prompt is kept, and the next request starts from its longest common prefix
//! with it (`TANGLE_SERVE_PREFIX_CACHE=0` turns this off, for measuring). Requests are
//! generated one at a time: on a CPU one already uses every core.

use super::quantized_qwen::{KvCache, QuantizedQwen2};
use super::{ChatModel, FinishReason, GenerateRequest, GenerateResult, ModelError};
use crate::model::chat::{decode, render_chatml, with_default_system, Sampling, StudentMeta};
use crate::model::gguf_import;
use candle_core::quantized::gguf_file;
use std::path::Path;
use std::sync::Mutex;

pub struct GgufChatModel {
    id: String,
    model: QuantizedQwen2,
    /// The last prompt's token ids and the KV cache of all of them.
    last_prompt: Mutex<Option<(Vec<u32>, KvCache)>>,
    reuse_prefix: bool,
    tokenizer: tokenizers::Tokenizer,
    stop_ids: Vec<u32>,
    /// Applied when a request brings no system message (a student trained with one).
    default_system: Option<String>,
    context: usize,
}

fn reuse_prefix_from_env() -> bool {
    std::env::var("TANGLE_SERVE_PREFIX_CACHE").map(|v| v != "0").unwrap_or(true)
}

fn load_weights(path: &Path) -> Result<QuantizedQwen2, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let content =
        gguf_file::Content::read(&mut file).map_err(|e| format!("{}: not a GGUF file: {e}", path.display()))?;
    QuantizedQwen2::from_gguf(content, &mut file)
        .map_err(|e| format!("{}: cannot load the quantized Qwen2 weights: {e}", path.display()))
}

impl GgufChatModel {
    /// A GGUF file on its own; prefix reuse on unless `TANGLE_SERVE_PREFIX_CACHE=0`.
    pub fn load(path: &Path) -> Result<GgufChatModel, String> {
        Self::load_with(path, reuse_prefix_from_env())
    }

    pub fn load_with(path: &Path, reuse_prefix: bool) -> Result<GgufChatModel, String> {
        let tokenizer = gguf_import::load_tokenizer(path).map_err(|e| e.to_string())?;
        let id = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "gguf".into());
        Ok(Self::new(id, load_weights(path)?, tokenizer, None, reuse_prefix))
    }

    /// The quantized copy of an exported student in `dir`, described by its metadata.
    pub fn load_student(dir: &Path, meta: &StudentMeta, id: String) -> Result<GgufChatModel, String> {
        let copy = meta.quantized.as_ref().ok_or_else(|| format!("{} holds no quantized weights", dir.display()))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| format!("cannot load {}: {e}", tokenizer_path.display()))?;
        let model = load_weights(&dir.join(&copy.file))?;
        Ok(Self::new(id, model, tokenizer, meta.system.clone(), reuse_prefix_from_env()))
    }

    fn new(
        id: String,
        model: QuantizedQwen2,
        tokenizer: tokenizers::Tokenizer,
        default_system: Option<String>,
        reuse_prefix: bool,
    ) -> GgufChatModel {
        let context = model.context;
        let stop_ids: Vec<u32> =
            ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        // candle lays quantized weights out for its fast kernels on their first use; two
        // tokens (a prompt-sized matmul) through the model now keep that (~0.6 s for the
        // 0.5B) out of the first request. A failure here would fail every request too, so
        // it is left to them to report.
        let warm_up = stop_ids.first().copied().unwrap_or(0);
        let _ = model.forward(&[warm_up, warm_up], &mut model.new_cache());
        GgufChatModel {
            id,
            model,
            last_prompt: Mutex::new(None),
            reuse_prefix,
            tokenizer,
            stop_ids,
            default_system,
            context,
        }
    }

    /// A cache holding the KV of the longest prefix of `prompt` that the last prompt shares
    /// (at most all but its last token, whose logits the first step needs).
    fn start(&self, prompt: &[u32]) -> candle_core::Result<KvCache> {
        if !self.reuse_prefix {
            return Ok(self.model.new_cache());
        }
        let stored = crate::support::lock(&self.last_prompt);
        match stored.as_ref() {
            Some((ids, cache)) => {
                let shared = ids.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
                if shared == 0 {
                    Ok(self.model.new_cache())
                } else {
                    cache.truncated(shared)
                }
            }
            None => Ok(self.model.new_cache()),
        }
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
        let messages = with_default_system(self.default_system.as_deref(), &messages);
        let prompt = self
            .tokenizer
            .encode(render_chatml(&messages), false)
            .map_err(|e| ModelError::Failed(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec();
        if prompt.is_empty() || prompt.len() >= self.context {
            return Err(ModelError::BadRequest(format!(
                "the prompt has {} tokens; the model's context is {}",
                prompt.len(),
                self.context
            )));
        }
        let budget = (request.max_tokens as usize).min(self.context - prompt.len());
        let mut cache = self.start(&prompt).map_err(|e| ModelError::Failed(e.to_string()))?;
        // The first call gets the whole prompt: skip what the cache already holds, and keep
        // the prompt's cache for the next request.
        let mut first = true;
        let mut step = |ids: &[u32]| -> candle_core::Result<Vec<f32>> {
            if !first {
                return self.model.forward(ids, &mut cache)?.to_vec1::<f32>();
            }
            first = false;
            let logits = self.model.forward(&ids[cache.len..], &mut cache)?.to_vec1::<f32>()?;
            if self.reuse_prefix {
                *crate::support::lock(&self.last_prompt) = Some((ids.to_vec(), cache.clone()));
            }
            Ok(logits)
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
