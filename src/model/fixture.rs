//! Tiny random model directories for tests and benchmarks, so nothing needs the hub.
//!
//! [`write_tiny_model`] writes `config.json`, `model.safetensors`, `tokenizer.json` (a
//! byte-level BPE with the ChatML special tokens and a few merges, the same format as
//! Qwen's) and `generation_config.json`. Output depends only on the spec and seed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::model::config::{ModelConfig, ModelFamily};
use crate::model::tokenizer::{byte_to_unicode, END_OF_TEXT, IM_END, IM_START};

/// Errors writing a fixture.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot write {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Config(#[from] crate::model::config::ConfigError),
    #[error("cannot serialize: {0}")]
    Json(#[from] serde_json::Error),
}

/// Shape and seed of a fixture model.
#[derive(Debug, Clone)]
pub struct FixtureSpec {
    pub family: ModelFamily,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Qwen3-style explicit head_dim (None: hidden / heads).
    pub head_dim: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Standard deviation of the random weights (HF initializer_range is 0.02).
    pub init_std: f64,
    pub seed: u64,
    /// Tokenizer size to fill with extra letter merges (0: the minimal fixture tokenizer).
    /// Benchmarks use it for a realistic vocabulary whose every id decodes to text.
    pub vocab_tokens: usize,
}

impl FixtureSpec {
    /// A tiny model of `family`: 2 layers, hidden 64, 4 heads over 2 kv heads (GQA).
    pub fn tiny(family: ModelFamily, seed: u64) -> Self {
        Self {
            family,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: matches!(family, ModelFamily::Qwen3).then_some(32),
            tie_word_embeddings: !matches!(family, ModelFamily::Llama),
            init_std: 0.1,
            seed,
            vocab_tokens: 0,
        }
    }

    /// SmolLM2-135M's shape (30 layers, hidden 576, 9 heads over 3 kv heads, 49,152-token
    /// vocabulary, tied embeddings) on `family`'s architecture, with random weights.
    pub fn shaped_135m(family: ModelFamily, seed: u64) -> Self {
        Self {
            family,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: matches!(family, ModelFamily::Qwen3).then_some(64),
            tie_word_embeddings: true,
            init_std: 0.02,
            seed,
            vocab_tokens: 49_152,
        }
    }
}

/// Words that get whole-word BPE merges, so the ChatML role names are single tokens as in
/// Qwen's vocabulary.
const MERGED_WORDS: [&str; 8] = ["system", "user", "assistant", "Ġthe", "label", "copy", "Ġis", "word"];

/// The fixture's tokenizer.json: byte-level BPE (256 byte tokens, merges for
/// [`MERGED_WORDS`]) followed by `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.
/// Returns the JSON and the total number of tokens.
pub fn tokenizer_json() -> (serde_json::Value, usize) {
    sized_tokenizer_json(0)
}

/// [`tokenizer_json`] grown to about `tokens` tokens (when larger) by merges of lowercase
/// letter sequences ("ab", …, "abc", …), so every id decodes to visible text.
pub fn sized_tokenizer_json(tokens: usize) -> (serde_json::Value, usize) {
    let mut vocab: Vec<String> = (0u8..=255).map(|b| byte_to_unicode(b).to_string()).collect();
    let mut known: std::collections::HashSet<String> = vocab.iter().cloned().collect();
    let mut merges: Vec<String> = Vec::new();
    let mut merge = |prefix: &str, c: char, vocab: &mut Vec<String>, merges: &mut Vec<String>| {
        let merged = format!("{prefix}{c}");
        if known.insert(merged.clone()) {
            merges.push(format!("{prefix} {c}"));
            vocab.push(merged);
        }
    };
    for word in MERGED_WORDS {
        let chars: Vec<char> = word.chars().collect();
        let mut prefix = chars[0].to_string();
        for c in &chars[1..] {
            merge(&prefix, *c, &mut vocab, &mut merges);
            prefix = format!("{prefix}{c}");
        }
    }
    // Three specials follow the vocabulary.
    let target = tokens.saturating_sub(3);
    let mut stems: Vec<String> = ('a'..='z').map(String::from).collect();
    while vocab.len() < target {
        let mut longer = Vec::new();
        'stems: for stem in &stems {
            for c in 'a'..='z' {
                if vocab.len() >= target {
                    break 'stems;
                }
                merge(stem, c, &mut vocab, &mut merges);
                longer.push(format!("{stem}{c}"));
            }
        }
        stems = longer;
    }
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(id, token)| (token.clone(), serde_json::Value::from(id))).collect();
    let first_special = vocab.len();
    let added: Vec<serde_json::Value> = [END_OF_TEXT, IM_START, IM_END]
        .iter()
        .enumerate()
        .map(|(offset, content)| {
            serde_json::json!({
                "id": first_special + offset, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true
    });
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map, "merges": merges
        }
    });
    (json, first_special + 3)
}

/// The config a spec describes; `vocab_size` is the tokenizer's size rounded up to 64
/// (Qwen also pads its embedding matrix past the tokenizer).
pub fn fixture_config(spec: &FixtureSpec) -> ModelConfig {
    let (_, tokens) = sized_tokenizer_json(spec.vocab_tokens);
    let vocab_size = tokens.div_ceil(64) * 64;
    let (model_type, architecture) = match spec.family {
        ModelFamily::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        ModelFamily::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        ModelFamily::Llama => ("llama", "LlamaForCausalLM"),
    };
    let mut extra = serde_json::Map::new();
    extra.insert("architectures".into(), serde_json::json!([architecture]));
    extra.insert("torch_dtype".into(), serde_json::json!("float32"));
    extra.insert("bos_token_id".into(), serde_json::json!(tokens - 3));
    extra.insert("eos_token_id".into(), serde_json::json!(tokens - 1));
    // Fields candle-transformers' qwen2/qwen3 configs require.
    if spec.family != ModelFamily::Llama {
        extra.insert("sliding_window".into(), serde_json::json!(4096));
        extra.insert("max_window_layers".into(), serde_json::json!(spec.num_hidden_layers));
        extra.insert("use_sliding_window".into(), serde_json::json!(false));
    }
    ModelConfig {
        model_type: model_type.into(),
        vocab_size,
        hidden_size: spec.hidden_size,
        intermediate_size: spec.intermediate_size,
        num_hidden_layers: spec.num_hidden_layers,
        num_attention_heads: spec.num_attention_heads,
        num_key_value_heads: Some(spec.num_key_value_heads),
        head_dim: spec.head_dim,
        max_position_embeddings: Some(512),
        rope_theta: Some(10_000.0),
        rope_scaling: None,
        rms_norm_eps: Some(1e-6),
        tie_word_embeddings: Some(spec.tie_word_embeddings),
        attention_bias: (spec.family != ModelFamily::Qwen2).then_some(false),
        mlp_bias: None,
        hidden_act: Some("silu".into()),
        extra,
    }
}

/// Random weights for `config`, named as in HF checkpoints. Norm weights are 1 + noise so
/// that tests notice a norm applied to the wrong axis.
pub fn random_weights(
    config: &ModelConfig,
    init_std: f64,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>, FixtureError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut normal = move |n: usize, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller; 1 - u keeps the log argument in (0, 1].
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    };
    let mut weights = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>, mean: f64, std: f64| -> Result<(), FixtureError> {
        let count = shape.iter().product();
        let tensor = Tensor::from_vec(normal(count, mean, std), shape, device)?;
        weights.insert(name, tensor);
        Ok(())
    };
    let hidden = config.hidden_size;
    let head_dim = config.head_dim();
    let q_out = config.num_attention_heads * head_dim;
    let kv_out = config.num_kv_heads() * head_dim;
    let inter = config.intermediate_size;
    add("model.embed_tokens.weight".into(), vec![config.vocab_size, hidden], 0.0, init_std)?;
    add("model.norm.weight".into(), vec![hidden], 1.0, 0.1)?;
    if !config.tied_embeddings() {
        add("lm_head.weight".into(), vec![config.vocab_size, hidden], 0.0, init_std)?;
    }
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        add(format!("{p}.input_layernorm.weight"), vec![hidden], 1.0, 0.1)?;
        add(format!("{p}.post_attention_layernorm.weight"), vec![hidden], 1.0, 0.1)?;
        let projections = [
            ("self_attn.q_proj", q_out, hidden, config.qkv_bias()),
            ("self_attn.k_proj", kv_out, hidden, config.qkv_bias()),
            ("self_attn.v_proj", kv_out, hidden, config.qkv_bias()),
            ("self_attn.o_proj", hidden, q_out, config.o_bias()),
            ("mlp.gate_proj", inter, hidden, config.mlp_bias()),
            ("mlp.up_proj", inter, hidden, config.mlp_bias()),
            ("mlp.down_proj", hidden, inter, config.mlp_bias()),
        ];
        for (name, out_features, in_features, bias) in projections {
            add(format!("{p}.{name}.weight"), vec![out_features, in_features], 0.0, init_std)?;
            if bias {
                add(format!("{p}.{name}.bias"), vec![out_features], 0.0, init_std)?;
            }
        }
        if config.qk_norm() {
            add(format!("{p}.self_attn.q_norm.weight"), vec![head_dim], 1.0, 0.1)?;
            add(format!("{p}.self_attn.k_norm.weight"), vec![head_dim], 1.0, 0.1)?;
        }
    }
    Ok(weights)
}

fn write(path: &Path, contents: &[u8]) -> Result<(), FixtureError> {
    std::fs::write(path, contents).map_err(|source| FixtureError::Io { path: path.display().to_string(), source })
}

/// Writes a complete model directory for `spec` into `dir` (created if needed) and returns
/// its config.
pub fn write_tiny_model(dir: &Path, spec: &FixtureSpec) -> Result<ModelConfig, FixtureError> {
    std::fs::create_dir_all(dir).map_err(|source| FixtureError::Io { path: dir.display().to_string(), source })?;
    let config = fixture_config(spec);
    config.save(&dir.join("config.json"))?;
    let weights = random_weights(&config, spec.init_std, spec.seed, &Device::Cpu)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    let (tokenizer, tokens) = sized_tokenizer_json(spec.vocab_tokens);
    write(&dir.join("tokenizer.json"), serde_json::to_string(&tokenizer)?.as_bytes())?;
    let generation = serde_json::json!({
        "bos_token_id": tokens - 3, "eos_token_id": tokens - 1, "do_sample": false
    });
    write(&dir.join("generation_config.json"), serde_json::to_string_pretty(&generation)?.as_bytes())?;
    Ok(config)
}
