//! LoRA adapters: `y = x Wᵀ + (alpha / rank) · dropout(x) Aᵀ Bᵀ`, with `W` frozen.
//!
//! The adapters live in their own [`VarMap`] (the only trainable tensors); base weights are
//! plain tensors, so backward never allocates their gradient, and the frozen projections run
//! through [`crate::model::qwen::linear`], whose backward skips the `dW` GEMM entirely.
//! `A` is initialised from a seeded RNG (Kaiming-uniform like PEFT), `B` at zero, so an
//! untrained adapter leaves the model unchanged. This module does no file I/O.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::config::ModelConfig;

/// Errors building LoRA adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(
        "unknown LoRA target module {0:?}\nhint: use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj"
    )]
    UnknownTarget(String),
    #[error("LoRA rank must be at least 1")]
    ZeroRank,
    #[error("LoRA `last_layers` must be at least 1")]
    NoLayers,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Every projection name LoRA can target.
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// LoRA hyper-parameters (PEFT's names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout probability applied to the adapter's input during training.
    #[serde(default)]
    pub dropout: f64,
    /// Module names, e.g. `["q_proj", "v_proj"]`.
    pub targets: Vec<String>,
    /// Adapt only the last N decoder layers (all when `None`). The frozen layers below run
    /// once per example, not once per epoch, and backward stops where they begin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_layers: Option<usize>,
}

impl LoraConfig {
    /// The multiplier applied to the adapter's output.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks rank and target names.
    pub fn validate(&self) -> Result<(), LoraError> {
        if self.rank == 0 {
            return Err(LoraError::ZeroRank);
        }
        if self.last_layers == Some(0) {
            return Err(LoraError::NoLayers);
        }
        for target in &self.targets {
            if !LORA_TARGETS.contains(&target.as_str()) {
                return Err(LoraError::UnknownTarget(target.clone()));
            }
        }
        Ok(())
    }

    /// Whether the projection called `module` (e.g. `q_proj`) gets an adapter.
    pub fn targets_module(&self, module: &str) -> bool {
        self.targets.iter().any(|t| t == module)
    }

    /// Whether decoder layer `layer` (of `layers`) gets adapters.
    pub fn adapts_layer(&self, layer: usize, layers: usize) -> bool {
        self.last_layers.is_none_or(|n| layer + n >= layers)
    }
}

/// One adapter pair: `a` is (rank, in), `b` is (out, rank).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// The dense update `scale · B A` (out, in) that merging adds to the base weight.
    pub fn delta_weight(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }
}

/// The tensor names of the adapter for the projection whose weight is `{prefix}.weight`.
pub fn adapter_names(prefix: &str) -> (String, String) {
    (format!("{prefix}.lora_A.weight"), format!("{prefix}.lora_B.weight"))
}

/// Creates the adapters for every targeted projection of `config` in a fresh [`VarMap`],
/// deterministically from `seed`. Names follow PEFT: `...q_proj.lora_A.weight`.
pub fn init_lora_varmap(
    model_config: &ModelConfig,
    lora: &LoraConfig,
    seed: u64,
    device: &Device,
) -> Result<VarMap, LoraError> {
    lora.validate()?;
    let varmap = VarMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let hidden = model_config.hidden_size;
    let q_out = model_config.num_attention_heads * model_config.head_dim();
    let kv_out = model_config.num_kv_heads() * model_config.head_dim();
    let inter = model_config.intermediate_size;
    let shapes: [(&str, &str, usize, usize); 7] = [
        ("self_attn", "q_proj", hidden, q_out),
        ("self_attn", "k_proj", hidden, kv_out),
        ("self_attn", "v_proj", hidden, kv_out),
        ("self_attn", "o_proj", q_out, hidden),
        ("mlp", "gate_proj", hidden, inter),
        ("mlp", "up_proj", hidden, inter),
        ("mlp", "down_proj", inter, hidden),
    ];
    // A poisoned lock means another thread panicked while holding it; nothing else holds
    // this freshly created map, so `lock` cannot fail here. Still, surface it as an error.
    let mut data = varmap.data().lock().map_err(|_| candle_core::Error::Msg("LoRA varmap lock poisoned".into()))?;
    for layer in 0..model_config.num_hidden_layers {
        if !lora.adapts_layer(layer, model_config.num_hidden_layers) {
            continue;
        }
        for (block, module, fan_in, fan_out) in shapes {
            if !lora.targets_module(module) {
                continue;
            }
            let prefix = format!("model.layers.{layer}.{block}.{module}");
            let (a_name, b_name) = adapter_names(&prefix);
            // Kaiming-uniform with a = sqrt(5), as PEFT/torch Linear: bound = 1/sqrt(fan_in).
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a_values: Vec<f32> = (0..lora.rank * fan_in).map(|_| rng.random_range(-bound..bound) as f32).collect();
            let a = Tensor::from_vec(a_values, (lora.rank, fan_in), device)?;
            let b = Tensor::zeros((fan_out, lora.rank), DType::F32, device)?;
            data.insert(a_name, Var::from_tensor(&a)?);
            data.insert(b_name, Var::from_tensor(&b)?);
        }
    }
    drop(data);
    Ok(varmap)
}
