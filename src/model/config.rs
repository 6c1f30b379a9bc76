//! Hugging Face `config.json` for the decoder families the student supports:
//! Qwen2/Qwen2.5 (q/k/v bias), Qwen3 (q/k norm, explicit `head_dim`) and Llama
//! (SmolLM2, Llama 3.2: no biases, optional `llama3` rope scaling).
//!
//! Every field keeps its Hugging Face name; fields this crate does not use are kept
//! verbatim in [`ModelConfig::extra`], and optional fields that were absent stay absent,
//! so a config read and written back is the same JSON document.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Errors reading, writing or validating a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{path} is not a valid model config: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("cannot serialize config: {0}")]
    Serialize(serde_json::Error),
    #[error("unsupported model_type {0:?}\nhint: supported families are qwen2, qwen3 and llama")]
    UnsupportedFamily(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Qwen2 / Qwen2.5: bias on q/k/v projections, none on o_proj.
    Qwen2,
    /// Qwen3: per-head RMS norm on q and k; `attention_bias` on all four projections.
    Qwen3,
    /// Llama / SmolLM2 / Llama 3.2: `attention_bias` on all four projections (usually false).
    Llama,
}

/// A Hugging Face decoder `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Every other field (architectures, torch_dtype, bos/eos ids, sliding window, ...), kept
    /// verbatim so that saving writes back what was read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The `llama3` rope frequency adjustment used by Llama 3.1/3.2.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Writes `config.json` (pretty-printed, Hugging Face field names).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = serde_json::to_string_pretty(self).map_err(ConfigError::Serialize)?;
        std::fs::write(path, text).map_err(|source| ConfigError::Write { path: path.display().to_string(), source })
    }

    /// The architecture family from `model_type`.
    pub fn family(&self) -> Result<ModelFamily, ConfigError> {
        match self.model_type.as_str() {
            "qwen2" => Ok(ModelFamily::Qwen2),
            "qwen3" => Ok(ModelFamily::Qwen3),
            "llama" => Ok(ModelFamily::Llama),
            other => Err(ConfigError::UnsupportedFamily(other.to_string())),
        }
    }

    /// Checks the shape relations the model relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.family()?;
        let kv = self.num_kv_heads();
        if self.num_attention_heads == 0 || kv == 0 || self.num_attention_heads % kv != 0 {
            return Err(ConfigError::Invalid(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            )));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(ConfigError::Invalid(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({}) and no head_dim is given",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(ConfigError::Invalid("head_dim must be even for rope".into()));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(ConfigError::Invalid(format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() && self.llama3_rope_scaling().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "rope_scaling {scaling} is not supported (only rope_type llama3)"
                )));
            }
        }
        Ok(())
    }

    /// Key/value heads (defaults to the attention heads: no GQA).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head dimension: `head_dim` when given (Qwen3), else hidden / heads.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Rope base frequency (HF default 10000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta.unwrap_or(10_000.0)
    }

    /// RMS norm epsilon (HF default 1e-6).
    pub fn rms_norm_eps(&self) -> f64 {
        self.rms_norm_eps.unwrap_or(1e-6)
    }

    /// Whether `lm_head` shares the embedding matrix (HF default: false).
    pub fn tied_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }

    /// Longest position the rope tables cover.
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.unwrap_or(4096)
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.family() {
            Ok(ModelFamily::Qwen2) => true,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether o_proj carries a bias.
    pub fn o_bias(&self) -> bool {
        match self.family() {
            Ok(ModelFamily::Qwen2) => false,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether the MLP projections carry a bias (Llama's `mlp_bias`).
    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }

    /// Whether q and k get a per-head RMS norm (Qwen3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.family(), Ok(ModelFamily::Qwen3))
    }

    /// The `llama3` rope scaling parameters, when `rope_scaling` asks for them.
    pub fn llama3_rope_scaling(&self) -> Option<Llama3RopeScaling> {
        let scaling = self.rope_scaling.as_ref()?.as_object()?;
        let kind = scaling.get("rope_type").or_else(|| scaling.get("type"))?.as_str()?;
        if kind != "llama3" {
            return None;
        }
        Some(Llama3RopeScaling {
            factor: scaling.get("factor")?.as_f64()?,
            low_freq_factor: scaling.get("low_freq_factor")?.as_f64()?,
            high_freq_factor: scaling.get("high_freq_factor")?.as_f64()?,
            original_max_position_embeddings: scaling.get("original_max_position_embeddings")?.as_u64()? as usize,
        })
    }

    /// Parameter count of the model this config describes (embeddings counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let hidden = self.hidden_size;
        let head_dim = self.head_dim();
        let q_out = self.num_attention_heads * head_dim;
        let kv_out = self.num_kv_heads() * head_dim;
        let mut attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden;
        if self.qkv_bias() {
            attention += q_out + 2 * kv_out;
        }
        if self.o_bias() {
            attention += hidden;
        }
        if self.qk_norm() {
            attention += 2 * head_dim;
        }
        let mlp = 3 * hidden * self.intermediate_size;
        let per_layer = attention + mlp + 2 * hidden;
        let embeddings = self.vocab_size * hidden;
        let head = if self.tied_embeddings() { 0 } else { embeddings };
        embeddings + head + hidden + self.num_hidden_layers * per_layer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN25_05B: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 21,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

    const LLAMA32_1B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
  "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
  "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "vocab_size": 128256
}"#;

    #[test]
    fn qwen25_config_round_trips_unchanged() {
        let config: ModelConfig = serde_json::from_str(QWEN25_05B).unwrap();
        config.validate().unwrap();
        assert_eq!(config.family().unwrap(), ModelFamily::Qwen2);
        assert!(config.qkv_bias() && !config.o_bias() && config.tied_embeddings());
        assert_eq!(config.head_dim(), 64);
        // ~494M parameters for Qwen2.5-0.5B.
        let params = config.parameter_count();
        assert!((490_000_000..500_000_000).contains(&params), "{params}");
        let original: serde_json::Value = serde_json::from_str(QWEN25_05B).unwrap();
        let written: serde_json::Value = serde_json::to_value(&config).unwrap();
        assert_eq!(original, written);
    }

    #[test]
    fn llama32_config_parses_rope_scaling_and_round_trips() {
        let config: ModelConfig = serde_json::from_str(LLAMA32_1B).unwrap();
        config.validate().unwrap();
        assert_eq!(config.family().unwrap(), ModelFamily::Llama);
        assert!(!config.qkv_bias() && !config.o_bias());
        let scaling = config.llama3_rope_scaling().unwrap();
        assert_eq!(scaling.factor, 32.0);
        assert_eq!(scaling.original_max_position_embeddings, 8192);
        let original: serde_json::Value = serde_json::from_str(LLAMA32_1B).unwrap();
        assert_eq!(original, serde_json::to_value(&config).unwrap());
    }

    #[test]
    fn rejects_unknown_family_and_bad_heads() {
        let mut config: ModelConfig = serde_json::from_str(QWEN25_05B).unwrap();
        config.model_type = "gpt2".into();
        assert!(matches!(config.validate(), Err(ConfigError::UnsupportedFamily(_))));
        config.model_type = "qwen2".into();
        config.num_key_value_heads = Some(3);
        assert!(matches!(config.validate(), Err(ConfigError::Invalid(_))));
    }
}
