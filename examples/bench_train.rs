//! Training throughput on CPU: forward + backward + fused AdamW at batch 4 × seq 128, for a
//! tiny config and a ~135M Qwen2-shaped config (SmolLM2-135M's shape), plus candle's f32
//! matmul rate measured in the same run and the fraction of roofline
//! (6 · params · tokens / matmul rate). Also LoRA steps with the frozen-weight matmul op
//! versus plain matmul (which computes the unused base-weight gradient).
//!
//! Run: `cargo run --release --example bench_train -- [--steps N] [--only tiny|135m]`
//! (RAYON_NUM_THREADS sets the thread count.)

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tangle::model::config::ModelConfig;
use tangle::model::fixture::random_weights;
use tangle::model::loading::{build_model, FinetuneMode};
use tangle::model::lora::{init_lora_varmap, LoraConfig};
use tangle::model::qwen::QwenModel;
use tangle::train::data::Batch;
use tangle::train::loss::batch_loss;
use tangle::train::optim::{grad_norm, AdamWParams, FusedAdamW};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const BATCH: usize = 4;
const SEQ: usize = 128;

fn qwen2_config(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    inter: usize,
    vocab: usize,
) -> BenchResult<ModelConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true, "hidden_act": "silu"
    }))?)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// f32 GEMM rate in GFLOP/s for (m × k) · (k × n), median of 5.
fn matmul_gflops(m: usize, k: usize, n: usize) -> BenchResult<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
    let _ = a.matmul(&b)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.dims();
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / median(&mut times) / 1e9)
}

fn full_batch(vocab: usize, seed: u32) -> BenchResult<Batch> {
    let ids: Vec<u32> = (0..(BATCH * SEQ) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 5) % vocab as u32)
        .collect();
    // Every position is a loss position, like a plain LM step in PyTorch.
    let mut loss_rows = Vec::new();
    let mut labels = Vec::new();
    for b in 0..BATCH {
        for t in 0..SEQ - 1 {
            loss_rows.push((b * SEQ + t) as u32);
            labels.push(ids[b * SEQ + t + 1]);
        }
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (BATCH, SEQ), &Device::Cpu)?,
        key_padding: vec![vec![1; SEQ]; BATCH],
        teacher: vec![None; loss_rows.len()],
        loss_rows,
        labels,
        tokens: BATCH * SEQ,
        frozen_input: None,
    })
}

struct StepTimes {
    forward: f64,
    backward: f64,
    optimizer: f64,
}

fn run_steps(model: &QwenModel, trainable: &VarMap, steps: usize, label: &str) -> BenchResult<StepTimes> {
    let mut vars: Vec<(String, Var)> =
        trainable.data().lock().map_err(|_| "lock")?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut optimizer = FusedAdamW::new(vars, AdamWParams::default());
    let batch = full_batch(model.config().vocab_size, 17)?;
    let (mut fwd, mut bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    // One warm-up step, then `steps` timed ones.
    for step in 0..=steps {
        let t0 = Instant::now();
        let loss = batch_loss(model, &batch, None, None)?;
        let loss_value = loss.total.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.total.backward()?;
        let t2 = Instant::now();
        let norm = grad_norm(optimizer.vars(), &grads)?;
        let scale = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        optimizer.step(&grads, 1e-4, scale)?;
        drop(grads);
        let t3 = Instant::now();
        if step > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            opt.push((t3 - t2).as_secs_f64());
        }
        eprintln!(
            "  {label} step {step}: loss {loss_value:.3} fwd {:.3}s bwd {:.3}s adamw {:.3}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
    }
    Ok(StepTimes { forward: median(&mut fwd), backward: median(&mut bwd), optimizer: median(&mut opt) })
}

fn report(name: &str, params: usize, times: &StepTimes, gflops: f64, flop_factor: f64) {
    let tokens = (BATCH * SEQ) as f64;
    let step = times.forward + times.backward + times.optimizer;
    let ideal = flop_factor * params as f64 * tokens / (gflops * 1e9);
    println!(
        "{name}: params {:.1}M | fwd {:.3}s bwd {:.3}s adamw {:.3}s | step {:.3}s | {:.1} tok/s | roofline ({flop_factor}·N·T @ {gflops:.0} GFLOP/s) {:.3}s → {:.0}%",
        params as f64 / 1e6,
        times.forward,
        times.backward,
        times.optimizer,
        step,
        tokens / step,
        ideal,
        100.0 * ideal / step
    );
}

fn lora_models(
    config: &ModelConfig,
    weights: &std::collections::HashMap<String, Tensor>,
) -> BenchResult<(QwenModel, QwenModel, VarMap)> {
    let lora = LoraConfig {
        rank: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        last_layers: None,
    };
    let adapters = init_lora_varmap(config, &lora, 1, &Device::Cpu)?;
    // Frozen base as plain tensors: the frozen-matmul op skips dW.
    let frozen = QwenModel::new(
        config,
        VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu),
        Some((&lora, VarBuilder::from_varmap(&adapters, DType::F32, &Device::Cpu))),
    )?;
    // Same base wrapped in (never updated) variables: candle's Matmul backward computes dW.
    let base_vars = VarMap::new();
    {
        let mut data = base_vars.data().lock().map_err(|_| "lock")?;
        for (name, tensor) in weights {
            data.insert(name.clone(), Var::from_tensor(tensor)?);
        }
    }
    let plain = QwenModel::new(
        config,
        VarBuilder::from_varmap(&base_vars, DType::F32, &Device::Cpu),
        Some((&lora, VarBuilder::from_varmap(&adapters, DType::F32, &Device::Cpu))),
    )?;
    Ok((frozen, plain, adapters))
}

fn bench(name: &str, config: &ModelConfig, steps: usize, gflops: f64) -> BenchResult<()> {
    let weights = random_weights(config, 0.02, 3, &Device::Cpu)?;
    let params = config.parameter_count();
    let (model, trainable) = build_model(config, weights.clone(), &FinetuneMode::Full, 0, &Device::Cpu)?;
    let times = run_steps(&model, &trainable, steps, &format!("{name} full"))?;
    report(&format!("{name} full fine-tune"), params, &times, gflops, 6.0);
    drop((model, trainable));

    let (frozen, plain, adapters) = lora_models(config, &weights)?;
    let frozen_times = run_steps(&frozen, &adapters, steps, &format!("{name} lora frozen-op"))?;
    // LoRA ideal: forward 2N, backward dX only 2N → 4·N·T.
    report(&format!("{name} LoRA r16 all-linear, frozen-matmul op"), params, &frozen_times, gflops, 4.0);
    let plain_times = run_steps(&plain, &adapters, steps, &format!("{name} lora plain"))?;
    report(&format!("{name} LoRA r16 all-linear, plain matmul (computes dW)"), params, &plain_times, gflops, 4.0);
    Ok(())
}

fn main() -> BenchResult<()> {
    tangle::cpu::configure();
    let args: Vec<String> = std::env::args().collect();
    let value_of = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let steps: usize = value_of("--steps").map(|s| s.parse()).transpose()?.unwrap_or(3);
    let only = value_of("--only");
    println!(
        "threads: {} (RAYON_NUM_THREADS={:?}, CANDLE_NUM_THREADS={:?}), batch {BATCH} × seq {SEQ}, median of {steps} steps after 1 warm-up",
        rayon::current_num_threads(),
        std::env::var("RAYON_NUM_THREADS").ok(),
        std::env::var("CANDLE_NUM_THREADS").ok()
    );
    let mut rates = Vec::new();
    for (m, k, n) in [(512, 576, 1536), (512, 1536, 576), (1024, 1024, 1024), (2048, 2048, 2048)] {
        let rate = matmul_gflops(m, k, n)?;
        println!("f32 matmul {m}×{k}·{k}×{n}: {rate:.1} GFLOP/s");
        rates.push(rate);
    }
    // The roofline uses the best measured rate: the bar is what the GEMM can do.
    let gflops = rates.iter().cloned().fold(0.0, f64::max);
    if only.as_deref() != Some("135m") {
        let tiny = qwen2_config(64, 2, 4, 2, 128, 320)?;
        bench("tiny", &tiny, steps.max(5), gflops)?;
    }
    if only.as_deref() != Some("tiny") {
        let smol = qwen2_config(576, 30, 9, 3, 1536, 49152)?;
        bench("135M", &smol, steps, gflops)?;
    }
    Ok(())
}
