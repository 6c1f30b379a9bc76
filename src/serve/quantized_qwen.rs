//! A quantized Qwen2 decoder for serving GGUF files, with a KV cache the caller owns.
//!
//! candle-transformers' `quantized_qwen2` keeps its cache inside the model, so a cache
//! cannot be kept for a shared prompt prefix and resumed by the next request. Here the
//! cache is a value: cloning it is cheap (tensors are reference-counted and never mutated),
//! so the KV of a shared prompt prefix is computed once and later requests continue from it.
//! The arithmetic is candle-transformers' (tested against it), except that Q8_0 rows are
//! padded for candle's fast kernels (see [`QLinear`]).

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::repeat_kv;

/// Input widths the fast x86 quantized kernels take: candle's AVX-512 VNNI tiles need the
/// inner dimension to be a multiple of 256 (a k-quant super-block).
const FAST_KERNEL_K: usize = 256;

/// A quantized projection `x Wᵀ`. Q8_0 weights whose input width is not a multiple of 256
/// (Qwen2.5-0.5B's 896) are stored zero-padded to the next multiple, and inputs are padded
/// to match: the zero columns leave the product unchanged, and candle then takes its tiled
/// VNNI kernel instead of the per-row fallback (a fine-tuned 0.5B student's one-word answer
/// went from 425 to 151 ms, BENCHMARKS.md). Re-quantizing dequantized Q8_0 values
/// reproduces them exactly. The padded weights take 14% more memory.
struct QLinear {
    weight: QMatMul,
    in_features: usize,
    padded_in: usize,
}

impl QLinear {
    fn new(weight: QTensor) -> Result<Self> {
        let (_, in_features) = weight.shape().dims2()?;
        if weight.dtype() != GgmlDType::Q8_0 || in_features % FAST_KERNEL_K == 0 {
            return Ok(Self { weight: QMatMul::from_qtensor(weight)?, in_features, padded_in: in_features });
        }
        let padded_in = in_features.next_multiple_of(FAST_KERNEL_K);
        let dense = weight.dequantize(&weight.device())?.pad_with_zeros(1, 0, padded_in - in_features)?;
        let padded = QTensor::quantize(&dense, GgmlDType::Q8_0)?;
        Ok(Self { weight: QMatMul::from_qtensor(padded)?, in_features, padded_in })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padded_in == self.in_features {
            return self.weight.forward(x);
        }
        self.weight.forward(&x.pad_with_zeros(D::Minus1, 0, self.padded_in - self.in_features)?)
    }
}

struct Layer {
    wq: QLinear,
    wk: QLinear,
    wv: QLinear,
    wo: QLinear,
    bq: Tensor,
    bk: Tensor,
    bv: Tensor,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
}

pub struct QuantizedQwen2 {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QLinear,
    cos: Tensor,
    sin: Tensor,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    pub context: usize,
}

/// Keys and values of the positions seen so far, per layer: (1, kv_heads, len, head_dim).
#[derive(Clone, Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
}

impl KvCache {
    /// The cache of the first `len` positions only (views, no copy).
    pub fn truncated(&self, len: usize) -> Result<KvCache> {
        if len > self.len {
            candle_core::bail!("cannot keep {len} of {} cached positions", self.len);
        }
        let kv = self
            .kv
            .iter()
            .map(|slot| match slot {
                Some((k, v)) => Ok(Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { kv, len })
    }
}

/// Positions served beyond this need a longer rope table than we precompute.
const MAX_CONTEXT: usize = 8192;

impl QuantizedQwen2 {
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(ct: gguf_file::Content, r: &mut R) -> Result<Self> {
        let device = Device::Cpu;
        let md = |k: &str| ct.metadata.get(k).ok_or_else(|| candle_core::Error::Msg(format!("missing {k}")));
        let n_head = md("qwen2.attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("qwen2.attention.head_count_kv")?.to_u32()? as usize;
        let hidden = md("qwen2.embedding_length")?.to_u32()? as usize;
        let context = (md("qwen2.context_length")?.to_u32()? as usize).min(MAX_CONTEXT);
        let blocks = md("qwen2.block_count")?.to_u32()? as usize;
        let eps = f64::from(md("qwen2.attention.layer_norm_rms_epsilon")?.to_f32()?);
        let base = md("qwen2.rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.0);
        let head_dim = hidden / n_head;
        let embed = ct.tensor(r, "token_embd.weight", &device)?.dequantize(&device)?;
        let output = match ct.tensor(r, "output.weight", &device) {
            Ok(t) => QLinear::new(t)?,
            Err(_) => QLinear::new(ct.tensor(r, "token_embd.weight", &device)?)?,
        };
        let norm = RmsNorm::from_qtensor(ct.tensor(r, "output_norm.weight", &device)?, eps)?;
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut q = |name: &str| ct.tensor(r, &format!("blk.{i}.{name}"), &device);
            layers.push(Layer {
                wq: QLinear::new(q("attn_q.weight")?)?,
                wk: QLinear::new(q("attn_k.weight")?)?,
                wv: QLinear::new(q("attn_v.weight")?)?,
                wo: QLinear::new(q("attn_output.weight")?)?,
                bq: q("attn_q.bias")?.dequantize(&device)?,
                bk: q("attn_k.bias")?.dequantize(&device)?,
                bv: q("attn_v.bias")?.dequantize(&device)?,
                attn_norm: RmsNorm::from_qtensor(q("attn_norm.weight")?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(q("ffn_norm.weight")?, eps)?,
                gate: QLinear::new(q("ffn_gate.weight")?)?,
                up: QLinear::new(q("ffn_up.weight")?)?,
                down: QLinear::new(q("ffn_down.weight")?)?,
            });
        }
        let inv_freq: Vec<f32> =
            (0..head_dim).step_by(2).map(|i| 1f32 / base.powf(i as f32 / head_dim as f32)).collect();
        let inv_freq = Tensor::new(inv_freq.as_slice(), &device)?;
        let positions = Tensor::arange(0, context as u32, &device)?.to_dtype(DType::F32)?.reshape((context, 1))?;
        let angles = positions.matmul(&inv_freq.reshape((1, head_dim / 2))?)?;
        Ok(QuantizedQwen2 {
            embed: Embedding::new(embed, hidden),
            layers,
            norm,
            output,
            cos: angles.cos()?,
            sin: angles.sin()?,
            n_head,
            n_kv_head,
            head_dim,
            context,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { kv: vec![None; self.layers.len()], len: 0 }
    }

    /// Appends `ids` to `cache` and returns the logits of the last position.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let t = ids.len();
        let offset = cache.len;
        if offset + t > self.context {
            candle_core::bail!("{} positions exceed the served context of {}", offset + t, self.context);
        }
        let device = Device::Cpu;
        let input = Tensor::from_slice(ids, (1, t), &device)?;
        let mask = if t > 1 {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..offset + t).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            Some(Tensor::from_slice(&mask, (1, 1, t, offset + t), &device)?)
        } else {
            None
        };
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let mut x = self.embed.forward(&input)?;
        for (layer, slot) in self.layers.iter().zip(cache.kv.iter_mut()) {
            let h = layer.attn_norm.forward(&x)?;
            let heads = |w: &QLinear, b: &Tensor, n: usize| -> Result<Tensor> {
                w.forward(&h)?.broadcast_add(b)?.reshape((1, t, n, self.head_dim))?.transpose(1, 2)?.contiguous()
            };
            let q = candle_nn::rotary_emb::rope(&heads(&layer.wq, &layer.bq, self.n_head)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&heads(&layer.wk, &layer.bk, self.n_kv_head)?, &cos, &sin)?;
            let v = heads(&layer.wv, &layer.bv, self.n_kv_head)?;
            let (k, v) = match slot.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            *slot = Some((k.clone(), v.clone()));
            let groups = self.n_head / self.n_kv_head;
            let k = repeat_kv(k, groups)?.contiguous()?;
            let v = repeat_kv(v, groups)?.contiguous()?;
            let mut scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
            if let Some(mask) = &mask {
                scores = scores.broadcast_add(mask)?;
            }
            let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let attn = attn.transpose(1, 2)?.reshape((1, t, self.n_head * self.head_dim))?;
            x = (layer.wo.forward(&attn)? + &x)?;
            let h = layer.ffn_norm.forward(&x)?;
            let mlp =
                layer.down.forward(&(candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?)?;
            x = (mlp + &x)?;
        }
        cache.len = offset + t;
        let last = self.norm.forward(&x.i((.., t - 1..t, ..))?)?;
        self.output.forward(&last)?.squeeze(0)?.squeeze(0)
    }
}
