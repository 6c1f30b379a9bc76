//! The engine's compute: llama.cpp (through the `llama-cpp-2` binding, built from source
//! with the machine's CPU features) runs the forward pass of a batch of tokens from many
//! sequences over one unified KV cache. Everything else — scheduling, prefix reuse,
//! sampling, tokenization, grammars — is tangle's, in the other engine modules.
//!
//! This is the only file that touches llama.cpp. Its KV cache is unified: one pool of
//! cells, each tagged with the set of sequences it belongs to, so copying a prefix from
//! one sequence to another tags cells and moves no memory.

use super::{Device, EngineOptions};
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;

/// One token of a batch: which sequence, at which position, and whether its logits are
/// wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchToken {
    pub token: u32,
    pub pos: usize,
    pub seq: i32,
    pub logits: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeFailure {
    /// The KV cache has no room for the batch: free cells and retry.
    #[error("the KV cache is full")]
    NoSpace,
    #[error("{0}")]
    Failed(String),
}

/// What the scheduler needs from a model runtime.
pub trait Backend {
    /// Logit rows (the embedding rows, at least the tokenizer's vocabulary).
    fn vocab_rows(&self) -> usize;
    /// Runs `batch`; afterwards [`Backend::logits`] answers for the tokens that asked.
    fn decode(&mut self, batch: &[BatchToken]) -> Result<(), DecodeFailure>;
    /// The logits of the `index`-th token of the last batch (it must have asked for them).
    fn logits(&self, index: usize) -> &[f32];
    /// Gives `to` the KV of `from`'s first `len` positions.
    fn copy_prefix(&mut self, from: i32, to: i32, len: usize);
    /// Drops a sequence's KV.
    fn clear(&mut self, seq: i32);
    /// Positions a sequence holds in the KV cache.
    fn held(&self, seq: i32) -> usize;
}

fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp logs every load in detail to stderr; they go to `tracing` (quiet by
            // default) unless TANGLE_ENGINE_LOG=1 asks for llama.cpp's own output.
            if std::env::var_os("TANGLE_ENGINE_LOG").is_none_or(|v| v != "1") {
                llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            }
            let backend = LlamaBackend::init().map_err(|e| format!("cannot start llama.cpp: {e}"))?;
            tracing::info!("llama.cpp CPU features: {}", system_info());
            Ok(backend)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The CPU features llama.cpp was compiled with, as its own system-info line reports them
/// (`AVX2 = 1 | AVX512 = 1 | ...`): what a benchmark figure was measured with.
fn system_info() -> String {
    // SAFETY: llama.cpp returns a pointer to a static, NUL-terminated buffer.
    let info = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    info.to_string_lossy().trim().to_string()
}

/// A loaded GGUF, before a context is made for it.
pub struct Weights {
    model: LlamaModel,
    pub context_train: usize,
    /// Exact for weights stored in f32 (an exported f32 student, the test fixtures), fast
    /// for quantized ones; see [`Attention`].
    pub attention: Attention,
}

/// How a context computes attention, chosen by the weights' precision.
///
/// Measured on this llama.cpp (CPU): flash attention with an f16 KV cache — llama.cpp's
/// defaults, what `llama-server` runs — answered 30% faster on the 0.5B student and 14% on
/// the 1.5B teacher than plain attention over an f32 cache, whose matmul covers every
/// cell of the unified cache up to the highest one in use (prefix entries included) where
/// flash attention skips the masked ones. But flash attention moved logprobs by up to 7e-3
/// between a request alone and the same request beside eight others, and put f32 prompt
/// scores 3.7e-3 from the reference model; plain attention over f32 gives the same bits
/// either way. Quantized weights are already that far from f32, so they get the fast
/// path; f32 weights exist to be exact, so they get the exact one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// Flash attention over an f16 KV cache.
    Fast,
    /// Plain attention over an f32 KV cache: batch-independent numbers.
    Exact,
}

impl Weights {
    pub fn load(path: &Path, device: Device) -> Result<Weights, String> {
        let backend = backend()?;
        let params = match device {
            Device::Cpu => LlamaModelParams::default().with_n_gpu_layers(0),
            Device::Cuda(n) => LlamaModelParams::default().with_n_gpu_layers(u32::MAX / 2).with_main_gpu(n as i32),
        };
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| format!("{}: llama.cpp cannot load this GGUF: {e}", path.display()))?;
        let context_train = model.n_ctx_train() as usize;
        let attention = if stored_in_f32(&model) { Attention::Exact } else { Attention::Fast };
        Ok(Weights { model, context_train, attention })
    }
}

/// `general.file_type` 0 is llama.cpp's LLAMA_FTYPE_ALL_F32; files without the key are
/// judged by their size per parameter.
fn stored_in_f32(model: &LlamaModel) -> bool {
    match model.meta_val_str("general.file_type") {
        Ok(file_type) => file_type.trim() == "0",
        Err(_) => model.size() as f64 >= 3.5 * model.n_params().max(1) as f64,
    }
}

pub struct LlamaSession<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    batch_capacity: usize,
    rows: usize,
    /// Batch index → row of llama.cpp's output buffer (only tokens that asked for logits).
    outputs: Vec<i32>,
}

impl<'m> LlamaSession<'m> {
    /// A context with `options.kv_tokens` cells for `sequences` sequence ids.
    pub fn new(weights: &'m Weights, options: &EngineOptions, sequences: usize) -> Result<Self, String> {
        let backend = backend()?;
        let kv = NonZeroU32::new(options.kv_tokens as u32).ok_or("the KV cache needs at least one token")?;
        let threads = options.threads as i32;
        let (kv_type, flash) = match weights.attention {
            Attention::Fast => (KvCacheType::F16, llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED),
            Attention::Exact => (KvCacheType::F32, llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED),
        };
        let params = LlamaContextParams::default()
            .with_n_ctx(Some(kv))
            .with_n_batch(options.batch_tokens as u32)
            .with_n_ubatch(options.batch_tokens as u32)
            .with_n_seq_max(sequences as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_type_k(kv_type)
            .with_type_v(kv_type)
            .with_kv_unified(true)
            .with_flash_attention_policy(flash)
            .with_no_perf(true);
        let ctx = weights
            .model
            .new_context(backend, params)
            .map_err(|e| format!("llama.cpp cannot make a context ({} KV tokens): {e}", options.kv_tokens))?;
        let rows = weights.model.n_vocab() as usize;
        Ok(LlamaSession {
            ctx,
            batch: LlamaBatch::new(options.batch_tokens, 1),
            batch_capacity: options.batch_tokens,
            rows,
            outputs: Vec::new(),
        })
    }
}

impl Backend for LlamaSession<'_> {
    fn vocab_rows(&self) -> usize {
        self.rows
    }

    fn decode(&mut self, batch: &[BatchToken]) -> Result<(), DecodeFailure> {
        if batch.len() > self.batch_capacity {
            return Err(DecodeFailure::Failed(format!(
                "internal: a batch of {} tokens exceeds {}",
                batch.len(),
                self.batch_capacity
            )));
        }
        self.batch.clear();
        self.outputs.clear();
        let mut out = 0;
        for t in batch {
            self.batch
                .add(LlamaToken(t.token as i32), t.pos as i32, &[t.seq], t.logits)
                .map_err(|e| DecodeFailure::Failed(e.to_string()))?;
            self.outputs.push(if t.logits { out } else { -1 });
            out += i32::from(t.logits);
        }
        match self.ctx.decode(&mut self.batch) {
            Ok(()) => Ok(()),
            Err(llama_cpp_2::DecodeError::NoKvCacheSlot) => Err(DecodeFailure::NoSpace),
            Err(e) => Err(DecodeFailure::Failed(format!("llama.cpp decode failed: {e}"))),
        }
    }

    fn logits(&self, index: usize) -> &[f32] {
        // Rows of the output buffer are in batch order of the tokens that asked; llama.cpp
        // indexes them by batch position.
        debug_assert!(self.outputs.get(index).is_some_and(|&o| o >= 0));
        self.ctx.get_logits_ith(index as i32)
    }

    fn copy_prefix(&mut self, from: i32, to: i32, len: usize) {
        // Positions are bounded by the context size, far below u32::MAX.
        let _ = self.ctx.kv_cache_seq_cp(from, to, Some(0), Some(len as u32));
    }

    fn clear(&mut self, seq: i32) {
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
    }

    fn held(&self, seq: i32) -> usize {
        (self.ctx.kv_cache_seq_pos_max(seq) + 1).max(0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's AMX matmul crashes on the first forward pass on Sapphire Rapids
    /// (ggml-org/llama.cpp#20824); `.cargo/config.toml` keeps it out of native builds. On a
    /// machine with AMX this fails if those flags stop reaching llama.cpp's build.
    #[test]
    fn llama_cpp_is_built_without_its_amx_kernels() {
        let info = system_info();
        assert!(info.contains("CPU"), "unexpected system info: {info}");
        assert!(!info.contains("AMX_INT8 = 1"), "llama.cpp was built with AMX (see .cargo/config.toml): {info}");
    }
}
