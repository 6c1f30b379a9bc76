//! A fused AdamW: one pass per parameter over raw f32 slices, updating the weight in place.
//!
//! candle-nn's `AdamW` runs about a dozen tensor ops per parameter (each a full pass and an
//! allocation); here the moments live in plain `Vec<f32>` and one loop updates m, v and the
//! weight together, with gradient-norm clipping folded in as a scale. The update rule is
//! candle-nn's (decoupled weight decay, bias-corrected moments), checked against it in the
//! tests. CPU only: on other devices the weight is copied to the host and back.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

/// Errors from the optimizer.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("optimizer state does not match the parameters: {0}")]
    StateMismatch(String),
}

/// AdamW hyper-parameters (candle-nn / PyTorch names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Elements per rayon task: large enough that scheduling is noise, small enough to split a
/// 28M-element embedding over both cores.
const CHUNK: usize = 1 << 16;

/// The per-step constants of the update.
#[derive(Clone, Copy)]
struct StepConstants {
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    eps: f32,
    grad_scale: f32,
}

/// The in-place op applied to one weight with its gradient as the source.
struct FusedUpdate<'a> {
    first_moment: RefCell<&'a mut [f32]>,
    second_moment: RefCell<&'a mut [f32]>,
    constants: StepConstants,
}

fn contiguous_f32<'s>(storage: &'s CpuStorage, layout: &Layout) -> candle_core::Result<&'s [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW needs contiguous tensors".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

impl candle_core::InplaceOp2 for FusedUpdate<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        weight: &mut CpuStorage,
        weight_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let grad = contiguous_f32(grad, grad_layout)?;
        let (start, end) = weight_layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fused AdamW needs a contiguous weight".into()))?;
        let weight = match weight {
            CpuStorage::F32(values) => &mut values[start..end],
            _ => candle_core::bail!("fused AdamW supports f32 weights only"),
        };
        let mut m = self.first_moment.borrow_mut();
        let mut v = self.second_moment.borrow_mut();
        if weight.len() != grad.len() || m.len() != grad.len() || v.len() != grad.len() {
            candle_core::bail!("fused AdamW: weight, gradient and moments differ in length");
        }
        let c = self.constants;
        weight
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| {
                for i in 0..w.len() {
                    let g = g[i] * c.grad_scale;
                    let m_next = c.beta1 * m[i] + c.one_minus_beta1 * g;
                    let v_next = c.beta2 * v[i] + c.one_minus_beta2 * g * g;
                    m[i] = m_next;
                    v[i] = v_next;
                    let m_hat = m_next * c.bias_correction1;
                    let v_hat = v_next * c.bias_correction2;
                    w[i] = w[i] * c.decay - c.lr * (m_hat / (v_hat.sqrt() + c.eps));
                }
            });
        Ok(())
    }
}

/// AdamW over a fixed list of named variables.
pub struct FusedAdamW {
    vars: Vec<(String, Var)>,
    first_moments: Vec<Vec<f32>>,
    second_moments: Vec<Vec<f32>>,
    step: u64,
    params: AdamWParams,
}

/// Sum of squares of every gradient present in `grads` for `vars` (f64 accumulation).
pub fn grad_norm(vars: &[(String, Var)], grads: &GradStore) -> Result<f64, OptimError> {
    let mut total = 0f64;
    for (_, var) in vars {
        if let Some(grad) = grads.get(var.as_tensor()) {
            let grad = grad.contiguous()?;
            let (storage, layout) = grad.storage_and_layout();
            let sum: f64 = match &*storage {
                Storage::Cpu(cpu) => contiguous_f32(cpu, layout)?
                    .par_chunks(CHUNK)
                    .map(|chunk| chunk.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                    .collect::<Vec<f64>>()
                    .iter()
                    .sum(),
                _ => grad.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
            };
            total += sum;
        }
    }
    Ok(total.sqrt())
}

impl FusedAdamW {
    /// An optimizer for `vars` with zeroed moments.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Self {
        let first_moments = vars.iter().map(|(_, v)| vec![0f32; v.elem_count()]).collect();
        let second_moments = vars.iter().map(|(_, v)| vec![0f32; v.elem_count()]).collect();
        Self { vars, first_moments, second_moments, step: 0, params }
    }

    /// The optimized variables, by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update at learning rate `lr`; every gradient is multiplied by `grad_scale` first
    /// (clipping, accumulation averaging). Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<(), OptimError> {
        self.step += 1;
        let p = self.params;
        let constants = StepConstants {
            lr: lr as f32,
            decay: (1.0 - lr * p.weight_decay) as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            bias_correction1: (1.0 / (1.0 - p.beta1.powi(self.step as i32))) as f32,
            bias_correction2: (1.0 / (1.0 - p.beta2.powi(self.step as i32))) as f32,
            eps: p.eps as f32,
            grad_scale: grad_scale as f32,
        };
        for (index, (_, var)) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let grad = grad.contiguous()?;
            let update = FusedUpdate {
                first_moment: RefCell::new(&mut self.first_moments[index]),
                second_moment: RefCell::new(&mut self.second_moments[index]),
                constants,
            };
            var.as_tensor().inplace_op2(&grad, &update)?;
        }
        Ok(())
    }

    /// Moments as tensors named `m.{name}` / `v.{name}` for checkpoints.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>, OptimError> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (index, (name, var)) in self.vars.iter().enumerate() {
            let shape = var.shape().clone();
            let device = var.device();
            out.push((format!("m.{name}"), Tensor::from_slice(&self.first_moments[index], shape.clone(), device)?));
            out.push((format!("v.{name}"), Tensor::from_slice(&self.second_moments[index], shape, device)?));
        }
        Ok(out)
    }

    /// Restores moments and step count saved by [`Self::state_tensors`].
    pub fn restore(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: u64,
    ) -> Result<(), OptimError> {
        for (index, (name, _)) in self.vars.iter().enumerate() {
            for (prefix, target) in [("m", &mut self.first_moments[index]), ("v", &mut self.second_moments[index])] {
                let key = format!("{prefix}.{name}");
                let tensor = tensors.get(&key).ok_or_else(|| OptimError::StateMismatch(format!("missing {key}")))?;
                let values = tensor.flatten_all()?.to_vec1::<f32>()?;
                if values.len() != target.len() {
                    return Err(OptimError::StateMismatch(format!("{key} has the wrong size")));
                }
                *target = values;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};
    use candle_nn::Optimizer;

    #[test]
    fn fused_adamw_matches_candle_nn_adamw() {
        let device = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (37, 53), &device).unwrap();
        let reference_var = Var::from_tensor(&init).unwrap();
        let fused_var = Var::from_tensor(&init.copy().unwrap()).unwrap();
        let params = AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut reference = candle_nn::AdamW::new(
            vec![reference_var.clone()],
            candle_nn::ParamsAdamW {
                lr: 1e-2,
                beta1: params.beta1,
                beta2: params.beta2,
                eps: params.eps,
                weight_decay: params.weight_decay,
            },
        )
        .unwrap();
        let mut fused = FusedAdamW::new(vec![("w".into(), fused_var.clone())], params);
        let target = Tensor::randn(0f32, 1.0, (37, 53), &device).unwrap();
        for _ in 0..20 {
            let loss = |v: &Var| {
                (v.as_tensor() - &target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum(D::Minus1)
                    .unwrap()
                    .tanh()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let grads = loss(&reference_var).backward().unwrap();
            reference.step(&grads).unwrap();
            let grads = loss(&fused_var).backward().unwrap();
            fused.step(&grads, 1e-2, 1.0).unwrap();
        }
        let a = reference_var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = fused_var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let moved: f32 =
            a.iter().zip(init.flatten_all().unwrap().to_vec1::<f32>().unwrap()).map(|(x, y)| (x - y).abs()).sum();
        assert!(moved > 1.0, "the weights must actually move ({moved})");
        let max_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-5, "fused AdamW differs from candle-nn by {max_diff}");
    }

    #[test]
    fn grad_scale_equals_scaled_gradient() {
        let device = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, 64, &device).unwrap();
        let a = Var::from_tensor(&init).unwrap();
        let b = Var::from_tensor(&init.copy().unwrap()).unwrap();
        let mut opt_a = FusedAdamW::new(vec![("p".into(), a.clone())], AdamWParams::default());
        let mut opt_b = FusedAdamW::new(vec![("p".into(), b.clone())], AdamWParams::default());
        for _ in 0..3 {
            let grads = (a.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap().backward().unwrap();
            opt_a.step(&grads, 1e-2, 0.5).unwrap();
            let grads = (b.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.25).unwrap().backward().unwrap();
            opt_b.step(&grads, 1e-2, 1.0).unwrap();
        }
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6);
        }
    }
}
