//! Where a 135M training step spends its time: layers vs vocabulary head, forward vs backward.
use candle_core::{Device, Tensor, Var};
use std::time::Instant;
use tangle::model::config::ModelConfig;
use tangle::model::fixture::random_weights;
use tangle::model::loading::{build_model, FinetuneMode};
use tangle::train::loss::cross_entropy;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layers: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let config: ModelConfig = serde_json::from_value(serde_json::json!({
        "model_type": "qwen2", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": layers,
        "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 2048, "tie_word_embeddings": true
    }))?;
    let weights = random_weights(&config, 0.02, 3, &Device::Cpu)?;
    let (model, _vars) = build_model(&config, weights, &FinetuneMode::Full, 0, &Device::Cpu)?;
    let ids: Vec<u32> = (0..512u32).map(|i| (i * 7919) % 49152).collect();
    let input = Tensor::from_vec(ids.clone(), (4, 128), &Device::Cpu)?;
    let rows: Vec<u32> = (0..511).collect();
    let labels: Vec<u32> = ids[1..].to_vec();
    for round in 0..3 {
        let t0 = Instant::now();
        let hidden = model.forward_hidden(&input, None, None)?;
        let t1 = Instant::now();
        // Cut the graph at the hidden states to time the head's backward alone.
        let hidden_var = Var::from_tensor(&hidden.detach())?;
        let logits = model.logits_at(hidden_var.as_tensor(), &rows)?;
        let loss = cross_entropy(&logits, &labels)?;
        let _ = loss.to_scalar::<f32>()?;
        let t2 = Instant::now();
        let head_grads = loss.backward()?;
        let t3 = Instant::now();
        let grad_hidden = head_grads.get(hidden_var.as_tensor()).ok_or("no grad")?.clone();
        let surrogate = (hidden * grad_hidden)?.sum_all()?;
        let t4 = Instant::now();
        let _layer_grads = surrogate.backward()?;
        let t5 = Instant::now();
        println!(
            "round {round} ({layers} layers): layers fwd {:.3}s | head fwd {:.3}s | head bwd {:.3}s | layers bwd {:.3}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t5 - t4).as_secs_f64()
        );
    }
    Ok(())
}
