//! Students from GGUF files: dequantize a llama.cpp Qwen2 GGUF into a Hugging Face model
//! directory (config.json, f32 model.safetensors, tokenizer.json built from the GGUF's own
//! tokenizer metadata), cached by the file's identity so the second use is instant. The
//! trainable decoder then loads it like any other directory.
//!
//! Also the tokenizer for GGUF serving, built from the same metadata.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use serde_json::{json, Map};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Qwen2's pre-tokenizer split (from its tokenizer.json): contractions, letters, single
/// digits, punctuation runs, newlines, and whitespace.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: architecture `{arch}` is not supported; tangle trains qwen2 GGUFs\nhint: use a Qwen2/Qwen2.5 GGUF or a Hugging Face directory")]
    Architecture { path: String, arch: String },
    #[error("{path}: metadata `{key}` is missing or has the wrong type")]
    Metadata { path: String, key: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: String, name: String },
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
}

fn read_error(path: &Path, e: impl std::fmt::Display) -> GgufError {
    GgufError::Read { path: path.display().to_string(), message: e.to_string() }
}

struct Gguf {
    path: PathBuf,
    content: gguf_file::Content,
    file: std::fs::File,
}

impl Gguf {
    fn open(path: &Path) -> Result<Gguf, GgufError> {
        let mut file = std::fs::File::open(path).map_err(|e| read_error(path, e))?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| read_error(path, format!("not a GGUF file: {e}")))?;
        let gguf = Gguf { path: path.to_path_buf(), content, file };
        let arch = gguf.string("general.architecture")?;
        if arch != "qwen2" {
            return Err(GgufError::Architecture { path: path.display().to_string(), arch });
        }
        Ok(gguf)
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::Metadata { path: self.path.display().to_string(), key: key.to_string() }
    }

    fn value(&self, key: &str) -> Result<&Value, GgufError> {
        self.content.metadata.get(key).ok_or_else(|| self.missing(key))
    }

    fn string(&self, key: &str) -> Result<String, GgufError> {
        self.value(key)?.to_string().cloned().map_err(|_| self.missing(key))
    }

    fn usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.value(key)?;
        v.to_u32().map(|n| n as usize).or_else(|_| v.to_u64().map(|n| n as usize)).map_err(|_| self.missing(key))
    }

    fn f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.value(key)?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|_| self.missing(key))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, GgufError> {
        let values = self.value(key)?.to_vec().map_err(|_| self.missing(key))?;
        values.iter().map(|v| v.to_string().cloned().map_err(|_| self.missing(key))).collect()
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn tensor(&mut self, name: &str) -> Result<Tensor, GgufError> {
        if !self.has_tensor(name) {
            return Err(GgufError::MissingTensor { path: self.path.display().to_string(), name: name.to_string() });
        }
        let q = self.content.tensor(&mut self.file, name, &Device::Cpu).map_err(|e| read_error(&self.path, e))?;
        q.dequantize(&Device::Cpu).map_err(|e| read_error(&self.path, e))
    }
}

/// tokenizer.json (the `tokenizers` library's format) from a GGUF's tokenizer metadata.
fn tokenizer_json(g: &Gguf) -> Result<serde_json::Value, GgufError> {
    let model = g.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::Metadata {
            path: g.path.display().to_string(),
            key: format!("tokenizer.ggml.model (`{model}`, expected the byte-level BPE `gpt2`)"),
        });
    }
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges = g.strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.value("tokenizer.ggml.token_type").ok().and_then(|v| v.to_vec().ok()) {
        Some(values) => values.iter().map(|v| v.to_i32().map(i64::from).unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
        // llama.cpp token types: 1 normal, 3 control, 4 user-defined.
        let kind = types.get(id).copied().unwrap_or(1);
        if kind == 3 || kind == 4 {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": kind == 3,
            }));
        }
    }
    let byte_level =
        json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false });
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": { "type": "NFC" },
        "pre_tokenizer": { "type": "Sequence", "pretokenizers": [
            { "type": "Split", "pattern": { "Regex": QWEN2_SPLIT }, "behavior": "Isolated", "invert": false },
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// The tokenizer of a GGUF, for serving it.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, GgufError> {
    let g = Gguf::open(path)?;
    let text = tokenizer_json(&g)?.to_string();
    tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| read_error(path, format!("tokenizer metadata: {e}")))
}

fn config_json(g: &Gguf, tied: bool) -> Result<serde_json::Value, GgufError> {
    let vocab = g.strings("tokenizer.ggml.tokens")?.len();
    let eos = g.usize("tokenizer.ggml.eos_token_id").ok();
    let bos = g.usize("tokenizer.ggml.bos_token_id").ok();
    let layers = g.usize("qwen2.block_count")?;
    Ok(json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": g.usize("qwen2.embedding_length")?,
        "intermediate_size": g.usize("qwen2.feed_forward_length")?,
        "num_hidden_layers": layers,
        "num_attention_heads": g.usize("qwen2.attention.head_count")?,
        "num_key_value_heads": g.usize("qwen2.attention.head_count_kv")?,
        "max_position_embeddings": g.usize("qwen2.context_length")?,
        "rope_theta": g.f64("qwen2.rope.freq_base").unwrap_or(10_000.0),
        // f32 in GGUF metadata: round to the decimal it was written from (1e-6, not 9.99e-7).
        "rms_norm_eps": format!("{:.3e}", g.f64("qwen2.attention.layer_norm_rms_epsilon")?).parse::<f64>().unwrap_or(1e-6),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "use_sliding_window": false,
        "sliding_window": g.usize("qwen2.context_length")?,
        "max_window_layers": layers,
        "torch_dtype": "float32",
    }))
}

/// Whether a tokenizer.json splits words with Qwen2's regex (`tokenizer.ggml.pre = qwen2`
/// in llama.cpp's terms).
pub(crate) fn is_qwen2_split(tokenizer: &serde_json::Value) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(map) => {
                map.get("Regex").and_then(|r| r.as_str()) == Some(QWEN2_SPLIT) || map.values().any(walk)
            }
            serde_json::Value::Array(items) => items.iter().any(walk),
            _ => false,
        }
    }
    walk(&tokenizer["pre_tokenizer"])
}

/// GGUF tensor names → Hugging Face Qwen2 names.
pub(crate) fn hf_names(layers: usize, tied: bool) -> Vec<(String, String)> {
    let mut names = vec![
        ("token_embd.weight".to_string(), "model.embed_tokens.weight".to_string()),
        ("output_norm.weight".into(), "model.norm.weight".into()),
    ];
    if !tied {
        names.push(("output.weight".into(), "lm_head.weight".into()));
    }
    for i in 0..layers {
        let (g, h) = (format!("blk.{i}"), format!("model.layers.{i}"));
        for (from, to) in [
            ("attn_q.weight", "self_attn.q_proj.weight"),
            ("attn_q.bias", "self_attn.q_proj.bias"),
            ("attn_k.weight", "self_attn.k_proj.weight"),
            ("attn_k.bias", "self_attn.k_proj.bias"),
            ("attn_v.weight", "self_attn.v_proj.weight"),
            ("attn_v.bias", "self_attn.v_proj.bias"),
            ("attn_output.weight", "self_attn.o_proj.weight"),
            ("ffn_gate.weight", "mlp.gate_proj.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
            ("ffn_down.weight", "mlp.down_proj.weight"),
            ("attn_norm.weight", "input_layernorm.weight"),
            ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ] {
            names.push((format!("{g}.{from}"), format!("{h}.{to}")));
        }
    }
    names
}

/// Writes the Hugging Face directory for `path` into `out` (which must not exist).
pub fn convert(path: &Path, out: &Path) -> Result<(), GgufError> {
    let mut g = Gguf::open(path)?;
    let tied = !g.has_tensor("output.weight");
    let config = config_json(&g, tied)?;
    let tokenizer = tokenizer_json(&g)?;
    let layers = g.usize("qwen2.block_count")?;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    for (from, to) in hf_names(layers, tied) {
        weights.insert(to, g.tensor(&from)?);
    }
    let write_error = |p: &Path, e: &dyn std::fmt::Display| GgufError::Write {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| write_error(out, &e))?;
    let file = out.join("model.safetensors");
    candle_core::safetensors::save(&weights, &file).map_err(|e| write_error(&file, &e))?;
    crate::fsutil::set_usual_permissions(&file).map_err(|e| write_error(&file, &e))?;
    for (name, value) in [
        ("config.json", &config),
        ("tokenizer.json", &tokenizer),
        (
            "generation_config.json",
            &json!({ "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": false }),
        ),
    ] {
        let p = out.join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(value).unwrap_or_default()).map_err(|e| write_error(&p, &e))?;
    }
    Ok(())
}

/// Identity of a GGUF for the conversion cache: size, modification time and the hash of its
/// first MiB (header and metadata), cheap for a multi-GB file.
fn cache_key(path: &Path) -> Result<String, GgufError> {
    let meta = std::fs::metadata(path).map_err(|e| read_error(path, e))?;
    let modified =
        meta.modified().ok().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos());
    let mut head = Vec::with_capacity(1 << 20);
    std::fs::File::open(path).and_then(|f| f.take(1 << 20).read_to_end(&mut head)).map_err(|e| read_error(path, e))?;
    let mut hasher = Sha256::new();
    hasher.update(format!("tangle-gguf-v1\n{}\n{modified:?}\n", meta.len()).as_bytes());
    hasher.update(&head);
    Ok(hex::encode(hasher.finalize())[..16].to_string())
}

/// `$TANGLE_HOME/converted` (default `~/.cache/tangle/converted`).
pub fn converted_root() -> PathBuf {
    let home = std::env::var_os("TANGLE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache").join("tangle")
    });
    home.join("converted")
}

/// The converted directory for `path`, converting on first use (atomically: a temporary
/// directory renamed into place, so a crash never leaves a half directory under the key).
pub fn converted_dir(path: &Path) -> Result<PathBuf, GgufError> {
    let root = converted_root();
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let dir = root.join(format!("{stem}-{}", cache_key(path)?));
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".tmp-{}-{stem}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    convert(path, &tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process converted it first: use theirs.
        Err(_) if dir.join("config.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(GgufError::Write { path: dir.display().to_string(), message: e.to_string() }),
    }
}
