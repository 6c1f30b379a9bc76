//! Students to GGUF: a quantized copy of an exported Qwen2 directory (config.json,
//! model.safetensors, tokenizer.json) for cheap serving — by `tangle serve`'s quantized
//! Qwen2 and by llama.cpp, which read the same metadata keys llama.cpp's own converter
//! writes (architecture, tokenizer vocabulary, merges and token types, chat template).
//!
//! Matrices are quantized to the requested format where their rows fit its blocks
//! (Q4_K needs rows that are a multiple of 256; Qwen2.5-0.5B's 896-wide ones are not, and
//! fall back to Q8_0, as in llama.cpp); norms and biases stay f32. This module reads and
//! writes files and does no inference.

use super::config::ModelConfig;
use super::gguf_import::{hf_names, is_qwen2_split};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use rayon::prelude::*;
use std::path::Path;

/// The quantization a student is exported with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    Q8_0,
    Q4K,
    /// Full precision: the form the engine serves a student's safetensors in.
    F32,
}

impl From<crate::spec::Quantization> for QuantFormat {
    fn from(spec: crate::spec::Quantization) -> QuantFormat {
        match spec {
            crate::spec::Quantization::Q8_0 => QuantFormat::Q8_0,
            crate::spec::Quantization::Q4K => QuantFormat::Q4K,
        }
    }
}

impl QuantFormat {
    /// Spec spelling.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4K => "q4_k",
            QuantFormat::F32 => "f32",
        }
    }

    /// The file an exported directory holds for this format.
    pub fn file_name(self) -> String {
        format!("model-{}.gguf", self.name())
    }

    fn dtype(self) -> GgmlDType {
        match self {
            QuantFormat::Q8_0 => GgmlDType::Q8_0,
            QuantFormat::Q4K => GgmlDType::Q4K,
            QuantFormat::F32 => GgmlDType::F32,
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_K_S, ALL_F32).
    fn file_type(self) -> u32 {
        match self {
            QuantFormat::Q8_0 => 7,
            QuantFormat::Q4K => 14,
            QuantFormat::F32 => 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GgufExportError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("cannot export `{model_type}` models to GGUF; tangle's quantized export supports qwen2\nhint: remove `student.quantize`, or fine-tune a Qwen2/Qwen2.5 student")]
    Architecture { model_type: String },
    #[error("{path}: {message}\nhint: the quantized export needs a byte-level BPE tokenizer.json (Qwen's)")]
    Tokenizer { path: String, message: String },
    #[error("model.safetensors has no tensor `{0}`")]
    MissingTensor(String),
    #[error("cannot quantize `{name}`: {message}")]
    Quantize { name: String, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    pub bytes: u64,
    /// Matrices in the requested format, and those that fell back to Q8_0.
    pub quantized_tensors: usize,
    pub fallback_tensors: usize,
}

fn read_error(path: &Path, e: impl std::fmt::Display) -> GgufExportError {
    GgufExportError::Read { path: path.display().to_string(), message: e.to_string() }
}

fn tokenizer_error(path: &Path, message: impl Into<String>) -> GgufExportError {
    GgufExportError::Tokenizer { path: path.display().to_string(), message: message.into() }
}

/// llama.cpp token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// The vocabulary of tokenizer.json laid out by id over `rows` embedding rows, with
/// llama.cpp's token types; ids the tokenizer does not know become `[PAD{id}]` (unused),
/// as llama.cpp's converter writes them.
fn vocabulary(
    tokenizer: &serde_json::Value,
    rows: usize,
    path: &Path,
) -> Result<(Vec<String>, Vec<i32>), GgufExportError> {
    let model = &tokenizer["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(tokenizer_error(path, "the tokenizer model is not BPE"));
    }
    let vocab = model["vocab"].as_object().ok_or_else(|| tokenizer_error(path, "no model.vocab"))?;
    let mut tokens: Vec<Option<String>> = vec![None; rows];
    let mut types = vec![TOKEN_NORMAL; rows];
    let mut place = |id: u64, text: &str, kind: i32, tokens: &mut Vec<Option<String>>| -> Result<(), GgufExportError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            tokenizer_error(path, format!("token `{text}` has id {id}, beyond the {rows} embedding rows"))
        })?;
        *slot = Some(text.to_string());
        types[id as usize] = kind;
        Ok(())
    };
    for (text, id) in vocab {
        let id = id.as_u64().ok_or_else(|| tokenizer_error(path, format!("vocab entry `{text}` has no integer id")))?;
        let kind = if *text == format!("[PAD{id}]") { TOKEN_UNUSED } else { TOKEN_NORMAL };
        place(id, text, kind, &mut tokens)?;
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(tokenizer_error(path, "an added token lacks `id` or `content`"));
        };
        let kind = if added["special"].as_bool().unwrap_or(false) { TOKEN_CONTROL } else { TOKEN_USER_DEFINED };
        place(id, text, kind, &mut tokens)?;
    }
    let mut texts = Vec::with_capacity(rows);
    for (id, token) in tokens.into_iter().enumerate() {
        match token {
            Some(text) => texts.push(text),
            None => {
                texts.push(format!("[PAD{id}]"));
                types[id] = TOKEN_UNUSED;
            }
        }
    }
    Ok((texts, types))
}

/// Merges as `"a b"` strings (tokenizer.json has them as strings or as pairs).
fn merges(tokenizer: &serde_json::Value, path: &Path) -> Result<Vec<String>, GgufExportError> {
    let list = tokenizer["model"]["merges"].as_array().ok_or_else(|| tokenizer_error(path, "no model.merges"))?;
    list.iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(pair) => {
                match (pair.first().and_then(|a| a.as_str()), pair.get(1).and_then(|b| b.as_str())) {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => Err(tokenizer_error(path, "a merge pair is not two strings")),
                }
            }
            _ => Err(tokenizer_error(path, "a merge is neither a string nor a pair")),
        })
        .collect()
}

fn metadata(
    config: &ModelConfig,
    tokenizer: &serde_json::Value,
    tokenizer_path: &Path,
    name: &str,
    chat_template: &str,
    format: QuantFormat,
) -> Result<Vec<(String, Value)>, GgufExportError> {
    let (tokens, types) = vocabulary(tokenizer, config.vocab_size, tokenizer_path)?;
    let merges = merges(tokenizer, tokenizer_path)?;
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    // llama.cpp spells GPT-2's pre-tokenizer `gpt-2`.
    let pre = if is_qwen2_split(tokenizer) { "qwen2" } else { "gpt-2" };
    let u32_of = |n: usize| Value::U32(n as u32);
    let mut md = vec![
        ("general.architecture".to_string(), Value::String("qwen2".into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(format.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("qwen2.block_count".into(), u32_of(config.num_hidden_layers)),
        ("qwen2.context_length".into(), u32_of(config.max_positions())),
        ("qwen2.embedding_length".into(), u32_of(config.hidden_size)),
        ("qwen2.feed_forward_length".into(), u32_of(config.intermediate_size)),
        ("qwen2.attention.head_count".into(), u32_of(config.num_attention_heads)),
        ("qwen2.attention.head_count_kv".into(), u32_of(config.num_kv_heads())),
        ("qwen2.rope.freq_base".into(), Value::F32(config.rope_theta() as f32)),
        ("qwen2.attention.layer_norm_rms_epsilon".into(), Value::F32(config.rms_norm_eps() as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().cloned().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), Value::String(chat_template.into())),
    ];
    // Qwen's convention: <|endoftext|> is bos and padding, <|im_end|> ends a turn.
    if let Some(eos) = id_of(super::tokenizer::IM_END) {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(eot) = id_of(super::tokenizer::END_OF_TEXT) {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(eot)));
        md.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(eot)));
    }
    Ok(md)
}

/// The format a matrix of `in_features` columns takes: `format` where its blocks fit, else
/// Q8_0 (32-value blocks), else f32.
fn matrix_dtype(format: QuantFormat, in_features: usize) -> GgmlDType {
    let wanted = format.dtype();
    if in_features % wanted.block_size() == 0 {
        wanted
    } else if in_features % GgmlDType::Q8_0.block_size() == 0 {
        GgmlDType::Q8_0
    } else {
        GgmlDType::F32
    }
}

/// Writes `out` (a `.gguf` file) from the Hugging Face directory `dir`. `name` becomes
/// `general.name`; `chat_template` is the template the student was trained with.
pub fn export_dir(
    dir: &Path,
    out: &Path,
    format: QuantFormat,
    name: &str,
    chat_template: &str,
) -> Result<ExportSummary, GgufExportError> {
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_file(&config_path).map_err(|e| read_error(&config_path, e))?;
    if config.model_type != "qwen2" {
        return Err(GgufExportError::Architecture { model_type: config.model_type.clone() });
    }
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_text = std::fs::read_to_string(&tokenizer_path).map_err(|e| read_error(&tokenizer_path, e))?;
    let tokenizer: serde_json::Value =
        serde_json::from_str(&tokenizer_text).map_err(|e| tokenizer_error(&tokenizer_path, e.to_string()))?;
    let md = metadata(&config, &tokenizer, &tokenizer_path, name, chat_template, format)?;

    let weights_path = dir.join("model.safetensors");
    // SAFETY: read-only map of a file tangle wrote and never writes through (see
    // `loading::load_weights`); each tensor is copied out before quantizing.
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights_path) }
        .map_err(|e| read_error(&weights_path, e))?;
    let tied = config.tied_embeddings() || mapped.get("lm_head.weight").is_err();
    // Tensors are independent: quantize them on every core.
    let quantized: Vec<(String, QTensor, Option<bool>)> = hf_names(config.num_hidden_layers, tied)
        .into_par_iter()
        .map(|(gguf_name, hf_name)| {
            let tensor =
                mapped.load(&hf_name, &Device::Cpu).map_err(|_| GgufExportError::MissingTensor(hf_name.clone()))?;
            let quantize_error =
                |e: candle_core::Error| GgufExportError::Quantize { name: hf_name.clone(), message: e.to_string() };
            let tensor = tensor.to_dtype(candle_core::DType::F32).map_err(quantize_error)?;
            // For matrices: whether they took the requested format.
            let (dtype, requested) = match tensor.dims() {
                [_, in_features] => {
                    let dtype = matrix_dtype(format, *in_features);
                    (dtype, Some(dtype == format.dtype()))
                }
                _ => (GgmlDType::F32, None),
            };
            Ok((gguf_name, QTensor::quantize(&tensor, dtype).map_err(quantize_error)?, requested))
        })
        .collect::<Result<_, GgufExportError>>()?;
    drop(mapped);
    let quantized_tensors = quantized.iter().filter(|t| t.2 == Some(true)).count();
    let fallback_tensors = quantized.iter().filter(|t| t.2 == Some(false)).count();
    let tensors: Vec<(String, QTensor)> = quantized.into_iter().map(|(name, tensor, _)| (name, tensor)).collect();

    let write_error =
        |e: &dyn std::fmt::Display| GgufExportError::Write { path: out.display().to_string(), message: e.to_string() };
    let tmp = out.with_extension("gguf.tmp");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| write_error(&e))?);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut file, &md_refs, &tensor_refs).map_err(|e| write_error(&e))?;
    let file = file.into_inner().map_err(|e| write_error(&e))?;
    file.sync_all().map_err(|e| write_error(&e))?;
    std::fs::rename(&tmp, out).map_err(|e| write_error(&e))?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(ExportSummary { bytes, quantized_tensors, fallback_tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_fall_back_where_blocks_do_not_fit() {
        assert_eq!(matrix_dtype(QuantFormat::Q4K, 4864), GgmlDType::Q4K);
        assert_eq!(matrix_dtype(QuantFormat::Q4K, 896), GgmlDType::Q8_0);
        assert_eq!(matrix_dtype(QuantFormat::Q8_0, 896), GgmlDType::Q8_0);
        assert_eq!(matrix_dtype(QuantFormat::Q8_0, 50), GgmlDType::F32);
    }

    #[test]
    fn unknown_ids_become_unused_padding_tokens() {
        let tokenizer = serde_json::json!({
            "model": { "type": "BPE", "vocab": { "a": 0, "b": 1, "ab": 2, "[PAD4]": 4 }, "merges": [["a", "b"]] },
            "added_tokens": [ { "id": 3, "content": "<|im_end|>", "special": true } ],
        });
        let (tokens, types) = vocabulary(&tokenizer, 6, Path::new("t.json")).unwrap();
        assert_eq!(tokens, ["a", "b", "ab", "<|im_end|>", "[PAD4]", "[PAD5]"]);
        assert_eq!(types, [1, 1, 1, 3, 5, 5]);
        assert_eq!(merges(&tokenizer, Path::new("t.json")).unwrap(), ["a b"]);
        let err = vocabulary(&tokenizer, 3, Path::new("t.json")).unwrap_err();
        assert!(err.to_string().contains("beyond the 3 embedding rows"), "{err}");
    }
}
