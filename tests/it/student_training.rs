//! End-to-end training on tiny fixtures: a learnable task is learned, LoRA leaves the base
//! untouched and merges exactly, exports reload to identical logits, and a run stopped
//! after a checkpoint and resumed ends bit-identical to an uninterrupted one.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use tangle::model::config::ModelFamily;
use tangle::model::fixture::{write_tiny_model, FixtureSpec};
use tangle::model::loading::{build_model, load_model, save_model_dir, FinetuneMode, LoadedModel};
use tangle::model::lora::LoraConfig;
use tangle::model::tokenizer::ChatExample;
use tangle::train::data::{prepare_examples, TeacherToken};
use tangle::train::{evaluate_loss, KdConfig, StopReason, TrainConfig, TrainExample, Trainer};

const KEYWORDS: [(&str, &str); 8] = [
    ("apple", "A"),
    ("river", "B"),
    ("stone", "C"),
    ("cloud", "D"),
    ("pear", "A"),
    ("lake", "B"),
    ("rock", "C"),
    ("rain", "D"),
];

fn keyword_examples() -> Vec<TrainExample> {
    KEYWORDS
        .iter()
        .map(|(word, label)| TrainExample {
            chat: ChatExample { system: None, prompt: format!("label {word}"), target: label.to_string() },
            teacher: None,
        })
        .collect()
}

fn fixture(family: ModelFamily, init_std: f64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = FixtureSpec::tiny(family, 7);
    spec.init_std = init_std;
    write_tiny_model(dir.path(), &spec).unwrap();
    dir
}

fn load(dir: &tempfile::TempDir, mode: &FinetuneMode) -> LoadedModel {
    load_model(dir.path().to_str().unwrap(), mode, 99, &Device::Cpu).unwrap()
}

fn flat(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn greedy_accuracy(
    loaded_model: &tangle::model::qwen::QwenModel,
    tokenizer: &tangle::model::tokenizer::ChatTokenizer,
) -> f64 {
    let mut correct = 0;
    for (word, label) in KEYWORDS {
        let prompt = tokenizer.encode_prompt(None, &format!("label {word}")).unwrap();
        let out = loaded_model.generate_greedy(&prompt, 4, &[tokenizer.im_end_id()]).unwrap();
        let text = tokenizer.decode(&out, true).unwrap();
        if text.trim() == label {
            correct += 1;
        }
    }
    correct as f64 / KEYWORDS.len() as f64
}

#[test]
fn learning_keyword_to_label_full_finetune() {
    let dir = fixture(ModelFamily::Qwen2, 0.02);
    let loaded = load(&dir, &FinetuneMode::Full);
    let examples = keyword_examples();
    let (eval_set, _) = prepare_examples(&loaded.tokenizer, &examples, 64).unwrap();
    let before = evaluate_loss(&loaded.model, &eval_set, loaded.tokenizer.pad_id(), 8).unwrap();
    let config = TrainConfig {
        epochs: 60,
        batch_size: 4,
        lr: 3e-3,
        warmup_steps: 5,
        adamw: tangle::train::AdamWParams { weight_decay: 0.0, ..Default::default() },
        max_seq_len: 64,
        seed: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &examples, config).unwrap();
    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let started = std::time::Instant::now();
    let outcome = trainer.train(&mut |_| steps += 1, &cancel).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(outcome.stop, StopReason::Completed);
    assert_eq!(steps, trainer.total_steps());
    let after = evaluate_loss(trainer.model(), &eval_set, trainer.tokenizer().pad_id(), 8).unwrap();
    let accuracy = greedy_accuracy(trainer.model(), trainer.tokenizer());
    eprintln!(
        "keyword task: loss {before:.3} -> {after:.3}, greedy accuracy {accuracy:.2}, {steps} steps in {seconds:.1}s"
    );
    assert!(after <= 0.5 * before, "eval loss fell only from {before} to {after}");
    assert!(accuracy >= 0.75, "greedy accuracy {accuracy} (chance 0.25)");
}

fn lora_config(dropout: f64) -> LoraConfig {
    LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout,
        targets: ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        last_layers: None,
    }
}

/// LoRA on the last layer only: the layer below gets no adapter, and the trainer computes
/// its output once per example instead of every epoch, with the same losses as running it
/// every time (to float rounding) and a run that still learns.
#[test]
fn lora_on_last_layers_caches_the_frozen_ones_without_changing_training() {
    let dir = fixture(ModelFamily::Qwen2, 0.05);
    let lora = LoraConfig { last_layers: Some(1), ..lora_config(0.0) };
    let run = |cache: bool| {
        let loaded = load(&dir, &FinetuneMode::Lora(lora.clone()));
        let adapters: Vec<String> = loaded.trainable.data().lock().unwrap().keys().cloned().collect();
        assert!(!adapters.is_empty());
        assert!(adapters.iter().all(|n| n.starts_with("model.layers.1.")), "{adapters:?}");
        assert_eq!(loaded.model.first_trainable_layer(), 1);
        let config = TrainConfig {
            epochs: 12,
            batch_size: 3,
            lr: 2e-2,
            max_seq_len: 64,
            seed: 4,
            cache_frozen_layers: cache,
            ..TrainConfig::default()
        };
        let mut trainer =
            Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &keyword_examples(), config).unwrap();
        let mut losses = Vec::new();
        trainer.train(&mut |p| losses.push(p.loss), &AtomicBool::new(false)).unwrap();
        losses
    };
    let cached = run(true);
    let recomputed = run(false);
    assert_eq!(cached.len(), recomputed.len());
    for (step, (a, b)) in cached.iter().zip(&recomputed).enumerate() {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "step {step}: {a} cached vs {b} recomputed");
    }
    // One adapted layer of a random 2-layer model learns slowly (5.8 → ~3.5 here).
    assert!(cached.last().unwrap() < &(0.7 * cached[0]), "{cached:?}");
}

#[test]
fn lora_trains_adapters_only_and_merges_exactly() {
    let dir = fixture(ModelFamily::Qwen3, 0.05);
    let mode = FinetuneMode::Lora(lora_config(0.05));
    let loaded = load(&dir, &mode);
    let base_before: std::collections::HashMap<String, Vec<f32>> =
        loaded.model.base_weights().unwrap().iter().map(|(k, v)| (k.clone(), flat(v))).collect();
    let config = TrainConfig { epochs: 6, batch_size: 4, lr: 5e-3, max_seq_len: 64, seed: 2, ..TrainConfig::default() };
    let mut trainer =
        Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &keyword_examples(), config).unwrap();
    let outcome = trainer.train(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(outcome.stop, StopReason::Completed);
    let model = trainer.model();
    for (name, after) in model.base_weights().unwrap() {
        assert_eq!(flat(&after), base_before[&name], "base weight {name} changed");
    }
    // The adapters moved, so merging has something to merge.
    let merged = model.export_weights().unwrap();
    let changed = merged.iter().filter(|(name, t)| flat(t) != base_before[*name]).count();
    assert!(changed >= 2 * 6, "only {changed} merged weights differ from the base");

    let config_json = model.config().clone();
    let (merged_model, _) = build_model(&config_json, merged, &FinetuneMode::Frozen, 0, &Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5u32, 17, 200, 33, 8, 120, 64], (1, 7), &Device::Cpu).unwrap();
    let adapted = flat(&model.forward(&ids, None).unwrap());
    let merged_logits = flat(&merged_model.forward(&ids, None).unwrap());
    let max_diff = adapted.iter().zip(&merged_logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_diff <= 1e-5, "merged model differs from adapted forward by {max_diff}");
}

#[test]
fn exported_directory_reloads_to_identical_logits() {
    let dir = fixture(ModelFamily::Qwen2, 0.05);
    let loaded = load(&dir, &FinetuneMode::Lora(lora_config(0.0)));
    let config = TrainConfig { epochs: 2, batch_size: 4, lr: 5e-3, max_seq_len: 64, ..TrainConfig::default() };
    let mut trainer =
        Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &keyword_examples(), config).unwrap();
    trainer.train(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_model_dir(trainer.model(), trainer.tokenizer(), out.path(), None).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"] {
        assert!(out.path().join(file).is_file(), "{file} missing");
    }
    let original_config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let saved_config = std::fs::read_to_string(out.path().join("config.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&original_config).unwrap(),
        serde_json::from_str::<serde_json::Value>(&saved_config).unwrap()
    );
    let reloaded = load(&out, &FinetuneMode::Frozen);
    let ids = Tensor::from_slice(&[1u32, 2, 3, 250, 40, 41], (1, 6), &Device::Cpu).unwrap();
    // The merged weights in memory and the reloaded file give bit-identical logits.
    let merged = trainer.model().export_weights().unwrap();
    let (in_memory, _) = build_model(trainer.model().config(), merged, &FinetuneMode::Frozen, 0, &Device::Cpu).unwrap();
    let expected = flat(&in_memory.forward(&ids, None).unwrap());
    let got = flat(&reloaded.model.forward(&ids, None).unwrap());
    assert!(expected == got, "reloaded logits differ from the exported model's");
}

#[test]
fn full_finetune_export_reloads_bit_identical() {
    let dir = fixture(ModelFamily::Llama, 0.05);
    let loaded = load(&dir, &FinetuneMode::Full);
    let config = TrainConfig { epochs: 1, batch_size: 4, lr: 5e-3, max_seq_len: 64, ..TrainConfig::default() };
    let mut trainer =
        Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &keyword_examples(), config).unwrap();
    trainer.train(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_model_dir(trainer.model(), trainer.tokenizer(), out.path(), None).unwrap();
    let reloaded = load(&out, &FinetuneMode::Frozen);
    let ids = Tensor::from_slice(&[7u32, 8, 9, 10], (1, 4), &Device::Cpu).unwrap();
    let expected = flat(&trainer.model().forward(&ids, None).unwrap());
    let got = flat(&reloaded.model.forward(&ids, None).unwrap());
    assert!(expected == got, "reloaded logits differ from the trained model's");
}

fn run_with_resume(mode: FinetuneMode, grad_accum_steps: usize) {
    let dir = fixture(ModelFamily::Qwen2, 0.05);
    let examples = keyword_examples();
    let base = TrainConfig {
        epochs: 3,
        batch_size: 2,
        grad_accum_steps,
        lr: 3e-3,
        warmup_steps: 2,
        max_seq_len: 64,
        seed: 5,
        ..TrainConfig::default()
    };
    // Uninterrupted.
    let loaded = load(&dir, &mode);
    let mut reference =
        Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &examples, base.clone()).unwrap();
    reference.train(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let expected = reference.model().export_weights().unwrap();

    // Stopped by the cancel flag after step 3, then resumed in a new Trainer.
    let checkpoints = tempfile::tempdir().unwrap();
    let log = checkpoints.path().join("log.jsonl");
    let interrupted_config = TrainConfig {
        checkpoint_every: Some(2),
        checkpoint_dir: Some(checkpoints.path().join("ckpt")),
        log_path: Some(log.clone()),
        ..base.clone()
    };
    let loaded = load(&dir, &mode);
    let mut first =
        Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &examples, interrupted_config.clone()).unwrap();
    let cancel = AtomicBool::new(false);
    let outcome = first
        .train(
            &mut |p| {
                if p.step == 3 {
                    cancel.store(true, Ordering::SeqCst)
                }
            },
            &cancel,
        )
        .unwrap();
    assert_eq!(outcome.stop, StopReason::Cancelled);
    assert_eq!(outcome.steps_done, 3);
    drop(first);

    let loaded = load(&dir, &mode);
    let mut resumed =
        Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &examples, interrupted_config).unwrap();
    assert!(Trainer::has_checkpoint(&checkpoints.path().join("ckpt")));
    resumed.resume_from(&checkpoints.path().join("ckpt")).unwrap();
    assert_eq!(resumed.step(), 3);
    let outcome = resumed.train(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(outcome.stop, StopReason::Completed);
    let got = resumed.model().export_weights().unwrap();
    for (name, tensor) in &expected {
        assert_eq!(flat(tensor), flat(&got[name]), "{name} differs after resume");
    }
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert_eq!(lines, resumed.total_steps(), "one log line per step across both runs");
}

#[test]
fn resume_full_finetune_is_bit_identical() {
    run_with_resume(FinetuneMode::Full, 2);
}

#[test]
fn resume_lora_with_dropout_is_bit_identical() {
    run_with_resume(FinetuneMode::Lora(lora_config(0.1)), 1);
}

#[test]
fn step_limit_stops_and_checkpoints() {
    let dir = fixture(ModelFamily::Qwen2, 0.05);
    let checkpoints = tempfile::tempdir().unwrap();
    let loaded = load(&dir, &FinetuneMode::Full);
    let config = TrainConfig {
        epochs: 2,
        batch_size: 4,
        max_seq_len: 64,
        stop_after_steps: Some(1),
        checkpoint_dir: Some(checkpoints.path().to_path_buf()),
        ..TrainConfig::default()
    };
    let mut trainer =
        Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &keyword_examples(), config).unwrap();
    let outcome = trainer.train(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(outcome.stop, StopReason::StepLimit);
    assert_eq!(outcome.steps_done, 1);
    assert!(Trainer::has_checkpoint(checkpoints.path()));
}

#[test]
fn distillation_maps_teacher_tokens_and_counts_unmapped() {
    let dir = fixture(ModelFamily::Qwen2, 0.05);
    let loaded = load(&dir, &FinetuneMode::Full);
    let mut examples = keyword_examples();
    // Teacher for "A": its token, a top-2 with an unknown token, and a surplus position
    // (the teacher's <|im_end|> spelled differently) that cannot be mapped.
    examples[0].teacher = Some(vec![
        TeacherToken {
            token: "A".into(),
            top_logprobs: vec![("A".into(), -0.1), ("B".into(), -2.5), ("\u{1F600}zz".into(), -3.0)],
        },
        TeacherToken { token: "<|im_end|>".into(), top_logprobs: vec![("<|im_end|>".into(), -0.01)] },
        TeacherToken { token: "extra".into(), top_logprobs: vec![("extra".into(), -0.5)] },
    ]);
    examples[1].teacher = Some(vec![TeacherToken { token: "Z".into(), top_logprobs: vec![("Z".into(), -0.1)] }]);
    let config = TrainConfig {
        epochs: 3,
        batch_size: 8,
        lr: 3e-3,
        max_seq_len: 64,
        kd: Some(KdConfig { alpha: 0.5, temperature: 2.0 }),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &examples, config).unwrap();
    let stats = trainer.data_stats().clone();
    assert_eq!(stats.teacher_positions, 4);
    assert_eq!(stats.teacher_positions_mapped, 2);
    assert_eq!(stats.teacher_positions_unmapped, 2);
    let outcome = trainer.train(&mut |p| assert!(p.loss.is_finite()), &AtomicBool::new(false)).unwrap();
    assert_eq!(outcome.stop, StopReason::Completed);
}

#[test]
fn truncation_is_counted() {
    let dir = fixture(ModelFamily::Qwen2, 0.05);
    let loaded = load(&dir, &FinetuneMode::Frozen);
    let mut examples = keyword_examples();
    examples[0].chat.target = "a much longer answer that will not fit".into();
    let (_, stats) = prepare_examples(&loaded.tokenizer, &examples, 24).unwrap();
    assert_eq!(stats.examples, 8);
    assert!(stats.truncated_examples >= 1 && stats.truncated_tokens > 0, "{stats:?}");
}
