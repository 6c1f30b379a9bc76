//! A differentiable decoder for Qwen2, Qwen3 and Llama checkpoints.
//!
//! Unlike candle-transformers' inference models, every op here has a backward pass:
//! RMS norm and rope are written from primitive ops, attention is plain matmul with an
//! additive causal + padding mask and `candle_nn::ops::softmax`, and GQA multiplies grouped
//! queries against the shared key/value heads without copying them. Tensor names match the
//! Hugging Face checkpoints, so weights load and save unchanged.
//!
//! Two forward paths:
//! - [`QwenModel::forward_hidden`] + [`QwenModel::logits_at`]: full-sequence training
//!   forward; the vocabulary projection runs only on the rows asked for (loss positions).
//! - [`QwenModel::forward_cached`]: incremental decoding with a [`KvCache`].
//!
//! This module does no file I/O; see `loading.rs`.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor, D};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};

use crate::model::config::{ConfigError, ModelConfig};
use crate::model::lora::{adapter_names, LoraAdapter, LoraConfig};

/// Errors building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("sequence of {len} positions exceeds max_position_embeddings ({max})")]
    TooLong { len: usize, max: usize },
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, ModelError>;

/// Additive mask value for disallowed attention: finite so that a fully masked row (a
/// padding query) yields a uniform softmax instead of NaN, and large enough that
/// `exp(mask - max)` underflows to exactly 0 for any realistic score.
const MASKED: f32 = -1.0e9;

/// Seeded randomness for LoRA dropout during a training forward.
pub struct DropoutRng(RefCell<rand::rngs::StdRng>);

impl DropoutRng {
    /// A dropout source seeded deterministically.
    pub fn new(seed: u64) -> Self {
        Self(RefCell::new(rand::rngs::StdRng::seed_from_u64(seed)))
    }

    /// An inverted-dropout mask (values 0 or 1/(1-p)) of `shape`.
    fn mask(&self, probability: f64, shape: &Shape, device: &Device) -> Result<Tensor> {
        let keep_scale = (1.0 / (1.0 - probability)) as f32;
        let mut rng = self.0.borrow_mut();
        let values: Vec<f32> =
            (0..shape.elem_count()).map(|_| if rng.random::<f64>() < probability { 0.0 } else { keep_scale }).collect();
        Ok(Tensor::from_vec(values, shape.clone(), device)?)
    }
}

/// `x Wᵀ` for a weight that is not trained: backward returns the input's gradient
/// `g W` and skips the weight's gradient GEMM (candle's `Matmul` backward always
/// computes both, about a third of the backward FLOPs for a frozen base).
struct FrozenMatmul {
    /// (out, in), never a variable.
    weight: Tensor,
}

impl FrozenMatmul {
    fn forward_generic<S: BackendStorage>(
        input: &S,
        input_layout: &Layout,
        weight: &S,
        weight_layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (rows, in_features) = input_layout.shape().dims2()?;
        let (out_features, weight_in) = weight_layout.shape().dims2()?;
        if in_features != weight_in {
            candle_core::bail!("frozen matmul: input has {in_features} features, weight expects {weight_in}");
        }
        let weight_t = weight_layout.transpose(0, 1)?;
        let output = input.matmul(weight, (1, rows, out_features, in_features), input_layout, &weight_t)?;
        Ok((output, Shape::from((rows, out_features))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (weight_storage, weight_layout) = self.weight.storage_and_layout();
        match &*weight_storage {
            Storage::Cpu(weight) => Self::forward_generic(storage, layout, weight, weight_layout),
            _ => candle_core::bail!("frozen matmul: weight and input on different devices"),
        }
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (weight_storage, weight_layout) = self.weight.storage_and_layout();
        match &*weight_storage {
            Storage::Cuda(weight) => Self::forward_generic(storage, layout, weight, weight_layout),
            _ => candle_core::bail!("frozen matmul: weight and input on different devices"),
        }
    }

    fn bwd(&self, _input: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_output.matmul(&self.weight)?))
    }
}

/// `x Wᵀ` for a trained weight, with a backward that produces `dW = gᵀ x` directly in the
/// weight's (out, in) layout. candle's `Matmul` on `W.t()` would produce `dWᵀ` and then pay
/// for a zero-filled buffer and a strided add to transpose it back, per weight per step.
struct TrainableMatmul;

impl CustomOp2 for TrainableMatmul {
    fn name(&self) -> &'static str {
        "trainable-matmul"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        FrozenMatmul::forward_generic(input, input_layout, weight, weight_layout)
    }

    fn cuda_fwd(
        &self,
        input: &CudaStorage,
        input_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        FrozenMatmul::forward_generic(input, input_layout, weight, weight_layout)
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_input = grad_output.matmul(weight)?;
        let grad_weight = grad_output.t()?.matmul(input)?;
        Ok((Some(grad_input), Some(grad_weight)))
    }
}

/// `x Wᵀ` for 2-D `x` (rows, in). A frozen `W` (not a variable) never gets a gradient
/// computed; a trained one gets it in its own layout.
pub fn linear(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    if weight.is_variable() {
        x.apply_op2(weight, TrainableMatmul)
    } else {
        x.apply_op1(FrozenMatmul { weight: weight.clone() })
    }
}

/// A projection with optional bias and optional LoRA adapter. `name` is the HF prefix,
/// e.g. `model.layers.0.self_attn.q_proj`.
#[derive(Debug, Clone)]
pub struct Projection {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Projection {
    fn load(
        vb: &VarBuilder,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        lora: Option<(&LoraConfig, &VarBuilder)>,
        module: &str,
    ) -> Result<Self> {
        let weight = vb.get((out_features, in_features), &format!("{name}.weight"))?;
        let bias = if bias { Some(vb.get(out_features, &format!("{name}.bias"))?) } else { None };
        let lora = match lora {
            Some((config, lora_vb)) if config.targets_module(module) => {
                let (a_name, b_name) = adapter_names(name);
                Some(LoraAdapter {
                    a: lora_vb.get((config.rank, in_features), &a_name)?,
                    b: lora_vb.get((out_features, config.rank), &b_name)?,
                    scale: config.scale(),
                    dropout: config.dropout,
                })
            }
            _ => None,
        };
        Ok(Self { name: name.to_string(), weight, bias, lora })
    }

    /// Applies the projection to 2-D `x` (rows, in).
    fn forward(&self, x: &Tensor, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        let mut y = linear(x, &self.weight)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(lora) = &self.lora {
            let adapter_input = match dropout {
                Some(rng) if lora.dropout > 0.0 => (x * rng.mask(lora.dropout, x.shape(), x.device())?)?,
                _ => x.clone(),
            };
            let update = adapter_input.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)?;
            y = (y + (update * lora.scale)?)?;
        }
        Ok(y)
    }

    /// The weight with any LoRA update merged in.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            Some(lora) => Ok((self.weight.detach() + lora.delta_weight()?.detach())?),
            None => Ok(self.weight.detach()),
        }
    }
}

/// RMS norm from primitive ops: `x / sqrt(mean(x²) + eps) · w` over the last dim.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normalized = x.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    Ok(normalized.broadcast_mul(weight)?)
}

/// Precomputed rope tables, (max_positions, head_dim), halves duplicated (HF rotate_half).
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let dim = config.head_dim();
        let theta = config.rope_theta();
        let mut inv_freq: Vec<f64> = (0..dim).step_by(2).map(|i| 1.0 / theta.powf(i as f64 / dim as f64)).collect();
        if let Some(scaling) = config.llama3_rope_scaling() {
            // Llama 3.1 frequency adjustment (transformers' _compute_llama3_parameters).
            let low_wavelen = scaling.original_max_position_embeddings as f64 / scaling.low_freq_factor;
            let high_wavelen = scaling.original_max_position_embeddings as f64 / scaling.high_freq_factor;
            for freq in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *freq;
                if wavelen > low_wavelen {
                    *freq /= scaling.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (scaling.original_max_position_embeddings as f64 / wavelen - scaling.low_freq_factor)
                        / (scaling.high_freq_factor - scaling.low_freq_factor);
                    *freq = (1.0 - smooth) * *freq / scaling.factor + smooth * *freq;
                }
            }
        }
        let positions = config.max_positions();
        let half = inv_freq.len();
        let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let t = Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?.reshape((positions, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Self { cos: freqs.cos()?, sin: freqs.sin()? })
    }

    /// Rotates `x` (b, heads, t, d) for positions `offset..offset + t`.
    fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, seq_len, dim) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, seq_len)?;
        let sin = self.sin.narrow(0, offset, seq_len)?;
        let first = x.narrow(D::Minus1, 0, dim / 2)?;
        let second = x.narrow(D::Minus1, dim / 2, dim / 2)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    attention: Attention,
    mlp: Mlp,
}

/// Per-layer keys and values (after rope) for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What every layer's forward shares.
struct ForwardContext<'a> {
    geometry: Geometry,
    offset: usize,
    mask: &'a Tensor,
    dropout: Option<&'a DropoutRng>,
}

/// Shapes shared by every layer's forward.
#[derive(Clone, Copy)]
struct Geometry {
    batch: usize,
    seq_len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// The decoder: embeddings, layers, final norm and (untied) `lm_head`.
#[derive(Debug, Clone)]
pub struct QwenModel {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    rope: Rope,
    device: Device,
}

impl QwenModel {
    /// Builds the model from weights named as in HF checkpoints. `lora` adds adapters read
    /// from their own builder (see [`crate::model::lora::init_lora_varmap`]).
    pub fn new(config: &ModelConfig, vb: VarBuilder, lora: Option<(&LoraConfig, VarBuilder)>) -> Result<Self> {
        config.validate()?;
        let device = vb.device().clone();
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let q_out = config.num_attention_heads * head_dim;
        let kv_out = config.num_kv_heads() * head_dim;
        let inter = config.intermediate_size;
        let lora_ref = lora.as_ref().map(|(c, v)| (*c, v));
        let embed_tokens = vb.get((config.vocab_size, hidden), "model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let p = format!("model.layers.{index}");
            let layer_lora = lora_ref.filter(|(c, _)| c.adapts_layer(index, config.num_hidden_layers));
            let proj = |block: &str, module: &str, fan_in, fan_out, bias| {
                Projection::load(&vb, &format!("{p}.{block}.{module}"), fan_in, fan_out, bias, layer_lora, module)
            };
            let attention = Attention {
                q_proj: proj("self_attn", "q_proj", hidden, q_out, config.qkv_bias())?,
                k_proj: proj("self_attn", "k_proj", hidden, kv_out, config.qkv_bias())?,
                v_proj: proj("self_attn", "v_proj", hidden, kv_out, config.qkv_bias())?,
                o_proj: proj("self_attn", "o_proj", q_out, hidden, config.o_bias())?,
                q_norm: if config.qk_norm() {
                    Some(vb.get(head_dim, &format!("{p}.self_attn.q_norm.weight"))?)
                } else {
                    None
                },
                k_norm: if config.qk_norm() {
                    Some(vb.get(head_dim, &format!("{p}.self_attn.k_norm.weight"))?)
                } else {
                    None
                },
            };
            let mlp = Mlp {
                gate_proj: proj("mlp", "gate_proj", hidden, inter, config.mlp_bias())?,
                up_proj: proj("mlp", "up_proj", hidden, inter, config.mlp_bias())?,
                down_proj: proj("mlp", "down_proj", inter, hidden, config.mlp_bias())?,
            };
            layers.push(DecoderLayer {
                input_layernorm: vb.get(hidden, &format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: vb.get(hidden, &format!("{p}.post_attention_layernorm.weight"))?,
                attention,
                mlp,
            });
        }
        let norm = vb.get(hidden, "model.norm.weight")?;
        let lm_head =
            if config.tied_embeddings() { None } else { Some(vb.get((config.vocab_size, hidden), "lm_head.weight")?) };
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(config, &device)?,
            device,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Builds the additive mask (b, 1, 1, t, s) for queries at `offset..offset+t` over keys
    /// `0..s`: causal, and keys whose `key_padding` entry is 0 are masked.
    fn attention_mask(
        &self,
        batch: usize,
        seq_len: usize,
        offset: usize,
        key_padding: Option<&[Vec<u32>]>,
    ) -> Result<Tensor> {
        let keys = offset + seq_len;
        let mut mask = vec![0f32; batch * seq_len * keys];
        for b in 0..batch {
            for i in 0..seq_len {
                let row = &mut mask[(b * seq_len + i) * keys..(b * seq_len + i + 1) * keys];
                for (j, value) in row.iter_mut().enumerate() {
                    let padded = key_padding.map(|pad| pad[b].get(j).copied().unwrap_or(0) == 0).unwrap_or(false);
                    if j > offset + i || padded {
                        *value = MASKED;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(mask, (batch, 1, 1, seq_len, keys), &self.device)?)
    }

    fn attention_forward(
        &self,
        attention: &Attention,
        x: &Tensor,
        context: &ForwardContext<'_>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let ForwardContext { offset, mask, dropout, .. } = *context;
        let Geometry { batch: b, seq_len: t, heads, kv_heads, head_dim: d } = context.geometry;
        let eps = self.config.rms_norm_eps();
        let q = attention.q_proj.forward(x, dropout)?;
        let k = attention.k_proj.forward(x, dropout)?;
        let v = attention.v_proj.forward(x, dropout)?;
        let mut q = q.reshape((b, t, heads, d))?;
        let mut k = k.reshape((b, t, kv_heads, d))?;
        if let (Some(qn), Some(kn)) = (&attention.q_norm, &attention.k_norm) {
            q = rms_norm(&q, qn, eps)?;
            k = rms_norm(&k, kn, eps)?;
        }
        let q = self.rope.apply(&q.transpose(1, 2)?, offset)?;
        let k = self.rope.apply(&k.transpose(1, 2)?, offset)?;
        let v = v.reshape((b, t, kv_heads, d))?.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((prev_k, prev_v)) => (Tensor::cat(&[&prev_k, &k], 2)?, Tensor::cat(&[&prev_v, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let keys = k.dim(2)?;
        let groups = heads / kv_heads;
        // GQA without copying K/V: the `groups` query heads that share a kv head are
        // stacked along the row axis, (b, kv, groups·t, d) @ (b, kv, d, s).
        let scale = 1.0 / (d as f64).sqrt();
        let q = (q.contiguous()? * scale)?.reshape((b, kv_heads, groups * t, d))?;
        let scores = q.matmul(&k.contiguous()?.t()?)?;
        let scores = scores.reshape((b, kv_heads, groups, t, keys))?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let context = probs
            .reshape((b, kv_heads, groups * t, keys))?
            .matmul(&v.contiguous()?)?
            .reshape((b, heads, t, d))?
            .transpose(1, 2)?
            .reshape((b * t, heads * d))?;
        attention.o_proj.forward(&context, dropout)
    }

    fn layers_forward(
        &self,
        input_ids: &Tensor,
        offset: usize,
        key_padding: Option<&[Vec<u32>]>,
        cache: Option<&mut KvCache>,
        dropout: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let (batch, seq_len) = input_ids.dims2()?;
        let x = self.embed_tokens.index_select(&input_ids.flatten_all()?, 0)?;
        let x = self.run_layers(x, 0..self.layers.len(), (batch, seq_len), offset, key_padding, cache, dropout)?;
        rms_norm(&x, &self.norm, self.config.rms_norm_eps())
    }

    /// Runs decoder layers `layers` over hidden states `x` (b·t, hidden).
    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        mut x: Tensor,
        layers: std::ops::Range<usize>,
        (batch, seq_len): (usize, usize),
        offset: usize,
        key_padding: Option<&[Vec<u32>]>,
        mut cache: Option<&mut KvCache>,
        dropout: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        if offset + seq_len > self.config.max_positions() {
            return Err(ModelError::TooLong { len: offset + seq_len, max: self.config.max_positions() });
        }
        let geometry = Geometry {
            batch,
            seq_len,
            heads: self.config.num_attention_heads,
            kv_heads: self.config.num_kv_heads(),
            head_dim: self.config.head_dim(),
        };
        let eps = self.config.rms_norm_eps();
        let mask = self.attention_mask(batch, seq_len, offset, key_padding)?;
        let context = ForwardContext { geometry, offset, mask: &mask, dropout };
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers.resize(self.layers.len(), None);
        }
        for index in layers {
            let layer = &self.layers[index];
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[index]);
            let h = rms_norm(&x, &layer.input_layernorm, eps)?;
            let h = self.attention_forward(&layer.attention, &h, &context, slot)?;
            x = (x + h)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let gate = layer.mlp.gate_proj.forward(&h, dropout)?.silu()?;
            let up = layer.mlp.up_proj.forward(&h, dropout)?;
            let h = layer.mlp.down_proj.forward(&(gate * up)?, dropout)?;
            x = (x + h)?;
        }
        if let Some(cache) = cache {
            cache.len += seq_len;
        }
        Ok(x)
    }

    /// The first decoder layer that holds a trained tensor (a variable or a LoRA adapter);
    /// the number of layers when nothing is trained. Everything below it is frozen, so its
    /// output for an example never changes during training.
    pub fn first_trainable_layer(&self) -> usize {
        if self.embed_tokens.is_variable() {
            return 0;
        }
        self.layers
            .iter()
            .position(|layer| {
                let a = &layer.attention;
                let m = &layer.mlp;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                    .iter()
                    .any(|p| p.lora.is_some() || p.weight.is_variable())
                    || layer.input_layernorm.is_variable()
                    || layer.post_attention_layernorm.is_variable()
            })
            .unwrap_or(self.layers.len())
    }

    /// Hidden states (b·t, hidden) entering decoder layer `layer`, detached: the frozen
    /// bottom of the model, computed once per example and reused every epoch.
    pub fn hidden_before_layer(
        &self,
        input_ids: &Tensor,
        key_padding: Option<&[Vec<u32>]>,
        layer: usize,
    ) -> Result<Tensor> {
        let (batch, seq_len) = input_ids.dims2()?;
        let x = self.embed_tokens.index_select(&input_ids.flatten_all()?, 0)?;
        let layer = layer.min(self.layers.len());
        Ok(self.run_layers(x, 0..layer, (batch, seq_len), 0, key_padding, None, None)?.detach())
    }

    /// [`QwenModel::forward_hidden`] from the hidden states `hidden` (b·t, hidden) that enter
    /// decoder layer `layer` (see [`QwenModel::hidden_before_layer`]).
    pub fn forward_hidden_from(
        &self,
        hidden: &Tensor,
        layer: usize,
        (batch, seq_len): (usize, usize),
        key_padding: Option<&[Vec<u32>]>,
        dropout: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let layer = layer.min(self.layers.len());
        let x =
            self.run_layers(hidden.clone(), layer..self.layers.len(), (batch, seq_len), 0, key_padding, None, dropout)?;
        rms_norm(&x, &self.norm, self.config.rms_norm_eps())
    }

    /// Full-sequence forward to the final norm: returns hidden states (b·t, hidden), rows in
    /// batch-major order. `key_padding[b][j] == 0` marks padding keys. `dropout` enables
    /// LoRA dropout (training only).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        key_padding: Option<&[Vec<u32>]>,
        dropout: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        self.layers_forward(input_ids, 0, key_padding, None, dropout)
    }

    /// The `lm_head` (or tied embedding) weight, (vocab, hidden).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Vocabulary logits (rows, vocab) for the hidden rows `hidden` (rows, hidden).
    pub fn project_vocab(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(linear(hidden, self.lm_head_weight())?)
    }

    /// Logits (n, vocab) only at the flat row indices `rows` (into b·t) of `hidden`: the
    /// vocabulary projection over prompt tokens is skipped.
    pub fn logits_at(&self, hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let index = Tensor::from_slice(rows, rows.len(), &self.device)?;
        self.project_vocab(&hidden.index_select(&index, 0)?)
    }

    /// Full-sequence logits (b, t, vocab).
    pub fn forward(&self, input_ids: &Tensor, key_padding: Option<&[Vec<u32>]>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let hidden = self.forward_hidden(input_ids, key_padding, None)?;
        Ok(self.project_vocab(&hidden)?.reshape((b, t, self.config.vocab_size))?)
    }

    /// Incremental forward: appends `input_ids` (b, t) to `cache` and returns their logits
    /// (b, t, vocab).
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let offset = cache.len;
        let hidden = self.layers_forward(input_ids, offset, None, Some(cache), None)?;
        Ok(self.project_vocab(&hidden)?.reshape((b, t, self.config.vocab_size))?)
    }

    /// Like [`QwenModel::forward_cached`], but projects only the last position onto the
    /// vocabulary (b, vocab): a prompt's other positions need no logits when generating.
    pub fn forward_cached_last(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let offset = cache.len;
        let hidden = self.layers_forward(input_ids, offset, None, Some(cache), None)?;
        let last = hidden.reshape((b, t, ()))?.narrow(1, t - 1, 1)?.reshape((b, ()))?.contiguous()?;
        Ok(self.project_vocab(&last)?.reshape((b, self.config.vocab_size))?)
    }

    /// Greedy decoding of up to `max_new_tokens` after `prompt`, stopping after any of
    /// `stop_ids` (which is included in the output).
    pub fn generate_greedy(&self, prompt: &[u32], max_new_tokens: usize, stop_ids: &[u32]) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(ModelError::Invalid("greedy decoding needs a non-empty prompt".into()));
        }
        let mut cache = KvCache::new();
        let mut generated = Vec::new();
        let mut input = Tensor::from_slice(prompt, (1, prompt.len()), &self.device)?;
        for _ in 0..max_new_tokens {
            let logits = self.forward_cached(&input, &mut cache)?;
            let last = logits.dim(1)? - 1;
            let next = logits.get(0)?.get(last)?.argmax(0)?.to_scalar::<u32>()?;
            generated.push(next);
            if stop_ids.contains(&next) {
                break;
            }
            input = Tensor::from_slice(&[next], (1, 1), &self.device)?;
        }
        Ok(generated)
    }

    /// Every weight under its HF name, LoRA merged, detached: what `model.safetensors` holds.
    pub fn export_weights(&self) -> Result<HashMap<String, Tensor>> {
        self.collect_weights(true)
    }

    /// Every base weight under its HF name without LoRA updates (the frozen base).
    pub fn base_weights(&self) -> Result<HashMap<String, Tensor>> {
        self.collect_weights(false)
    }

    fn collect_weights(&self, merge_lora: bool) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert("model.embed_tokens.weight".to_string(), self.embed_tokens.detach());
        out.insert("model.norm.weight".to_string(), self.norm.detach());
        if let Some(head) = &self.lm_head {
            out.insert("lm_head.weight".to_string(), head.detach());
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{index}");
            out.insert(format!("{p}.input_layernorm.weight"), layer.input_layernorm.detach());
            out.insert(format!("{p}.post_attention_layernorm.weight"), layer.post_attention_layernorm.detach());
            if let Some(qn) = &layer.attention.q_norm {
                out.insert(format!("{p}.self_attn.q_norm.weight"), qn.detach());
            }
            if let Some(kn) = &layer.attention.k_norm {
                out.insert(format!("{p}.self_attn.k_norm.weight"), kn.detach());
            }
            let a = &layer.attention;
            let m = &layer.mlp;
            for projection in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
                let weight = if merge_lora { projection.merged_weight()? } else { projection.weight.detach() };
                out.insert(format!("{}.weight", projection.name), weight);
                if let Some(bias) = &projection.bias {
                    out.insert(format!("{}.bias", projection.name), bias.detach());
                }
            }
        }
        Ok(out)
    }
}
