//! Gradient checks: every trainable tensor receives a non-zero gradient (catches any op
//! whose backward silently stops), and analytic gradients agree with central finite
//! differences on the elements with the largest gradient.

use candle_core::{Device, Tensor, Var};
use tangle::model::config::ModelFamily;
use tangle::model::fixture::{write_tiny_model, FixtureSpec};
use tangle::model::loading::{load_model, FinetuneMode, LoadedModel};
use tangle::model::lora::LoraConfig;
use tangle::model::tokenizer::ChatExample;
use tangle::train::data::{make_batch, prepare_examples, Batch, TrainExample};
use tangle::train::loss::batch_loss;

fn load(family: ModelFamily, mode: FinetuneMode) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &FixtureSpec::tiny(family, 21)).unwrap();
    let loaded = load_model(dir.path().to_str().unwrap(), &mode, 3, &Device::Cpu).unwrap();
    (dir, loaded)
}

fn sample_batch(loaded: &LoadedModel) -> Batch {
    let examples: Vec<TrainExample> = [("Hi there", "Hello!"), ("Name a color", "blue is one")]
        .iter()
        .map(|(p, t)| TrainExample {
            chat: ChatExample { system: Some("Be brief.".into()), prompt: p.to_string(), target: t.to_string() },
            teacher: None,
        })
        .collect();
    let (prepared, _) = prepare_examples(&loaded.tokenizer, &examples, 128).unwrap();
    let refs: Vec<_> = prepared.iter().collect();
    make_batch(&refs, loaded.tokenizer.pad_id(), &Device::Cpu).unwrap()
}

fn vars(loaded: &LoadedModel) -> Vec<(String, Var)> {
    let data = loaded.trainable.data().lock().unwrap();
    let mut vars: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

fn assert_every_var_has_gradient(loaded: &LoadedModel) {
    let batch = sample_batch(loaded);
    let loss = batch_loss(&loaded.model, &batch, None, None).unwrap();
    let grads = loss.total.backward().unwrap();
    let vars = vars(loaded);
    assert!(!vars.is_empty());
    for (name, var) in &vars {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
        let magnitude = grad.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(magnitude > 0.0, "{name} has an all-zero gradient");
    }
}

#[test]
fn every_trainable_tensor_gets_a_gradient_full_finetune() {
    for family in [ModelFamily::Qwen2, ModelFamily::Qwen3, ModelFamily::Llama] {
        let (_dir, loaded) = load(family, FinetuneMode::Full);
        assert_every_var_has_gradient(&loaded);
    }
}

#[test]
fn every_lora_adapter_gets_a_gradient() {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        last_layers: None,
    };
    let (_dir, loaded) = load(ModelFamily::Qwen2, FinetuneMode::Lora(lora));
    // B starts at zero, which makes A's gradient exactly zero; give B a value first.
    for (name, var) in vars(&loaded) {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    assert_eq!(vars(&loaded).len(), 2 * 7 * 2);
    assert_every_var_has_gradient(&loaded);
}

fn loss_value(loaded: &LoadedModel, batch: &Batch) -> f64 {
    batch_loss(&loaded.model, batch, None, None).unwrap().total.to_scalar::<f32>().unwrap() as f64
}

fn check_finite_differences(label: &str, loaded: &LoadedModel, checked: &[&str]) {
    let batch = sample_batch(loaded);
    let grads = batch_loss(&loaded.model, &batch, None, None).unwrap().total.backward().unwrap();
    let all = vars(loaded);
    for name in checked {
        let (_, var) = all.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no variable {name}"));
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The two largest-gradient elements: their finite difference is well above f32 noise.
        let mut order: Vec<usize> = (0..analytic.len()).collect();
        order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
        let set = |values: Vec<f32>| var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
        for &index in order.iter().take(2) {
            let eps = 1e-2f32;
            let mut perturbed = original.clone();
            perturbed[index] = original[index] + eps;
            set(perturbed.clone());
            let plus = loss_value(loaded, &batch);
            perturbed[index] = original[index] - eps;
            set(perturbed);
            let minus = loss_value(loaded, &batch);
            set(original.clone());
            let numeric = (plus - minus) / (2.0 * eps as f64);
            let exact = analytic[index] as f64;
            let relative = (numeric - exact).abs() / exact.abs().max(1e-3);
            assert!(
                relative < 0.03,
                "{label} {name}[{index}]: analytic {exact:.6}, numeric {numeric:.6} ({relative:.4})"
            );
        }
    }
}

#[test]
fn analytic_gradients_match_finite_differences() {
    for family in [ModelFamily::Qwen2, ModelFamily::Qwen3, ModelFamily::Llama] {
        let (_dir, loaded) = load(family, FinetuneMode::Full);
        let mut checked = vec![
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight",
            "model.embed_tokens.weight",
        ];
        if family == ModelFamily::Qwen3 {
            checked.push("model.layers.0.self_attn.q_norm.weight");
        }
        if family == ModelFamily::Llama {
            checked.push("lm_head.weight");
        }
        check_finite_differences(&format!("{family:?}"), &loaded, &checked);
    }
}

/// LoRA gradients flow back through the frozen-weight matmul op (whose backward is ours),
/// so finite differences on early-layer adapters check that op too.
#[test]
fn lora_gradients_match_finite_differences() {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        last_layers: None,
    };
    let (_dir, loaded) = load(ModelFamily::Qwen2, FinetuneMode::Lora(lora));
    for (name, var) in vars(&loaded) {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.2, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    check_finite_differences(
        "lora",
        &loaded,
        &[
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.layers.0.self_attn.v_proj.lora_B.weight",
            "model.layers.1.mlp.down_proj.lora_A.weight",
        ],
    );
}
